"""The API documentation page: an OpenAPI schema rendered as one self-contained HTML page.

Nothing on it comes from elsewhere (no script, style sheet or font from a CDN, which leaves
Swagger UI blank offline), and it needs no JavaScript: every route with its parameters, request
body and responses, then every schema (the job kinds' request models among them) with its fields'
types, limits, defaults and descriptions. Links point inside the page or to ``/openapi.json``.
"""

from __future__ import annotations

import json
from html import escape
from typing import Any

LIMITS = {"minimum": ">=", "exclusiveMinimum": ">", "maximum": "<=", "exclusiveMaximum": "<", "minLength": "length >=",
          "maxLength": "length <=", "pattern": "matches"}

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1100px; padding: 0 1em 3em; color: #222; }
h2 { border-bottom: 2px solid #ccc; margin-top: 2em; }
h3 { margin: 1.6em 0 0.3em; font-family: ui-monospace, monospace; }
.method { display: inline-block; min-width: 4.5em; color: #fff; background: #456; padding: 0 0.3em; border-radius: 3px; }
table { border-collapse: collapse; width: 100%; margin: 0.4em 0; }
th, td { text-align: left; vertical-align: top; border-bottom: 1px solid #ddd; padding: 0.25em 0.5em; }
th { background: #f3f3f3; }
code, td:first-child { font-family: ui-monospace, monospace; font-size: 0.92em; }
.required { font-weight: bold; }
"""


def schema_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def value_html(v: Any) -> str:
    """A JSON value as code (whole floats as integers: limits such as 1000.0 or 2**63)."""
    return f"<code>{escape(json.dumps(int(v) if isinstance(v, float) and v.is_integer() else v))}</code>"


def type_html(s: dict[str, Any]) -> str:
    """A JSON schema's type as HTML: references link to their schema's section."""
    if "$ref" in s:
        name = escape(schema_name(s["$ref"]))
        return f'<a href="#schema-{name}">{name}</a>'
    if "const" in s:
        return value_html(s["const"])
    if "enum" in s:
        return " | ".join(value_html(v) for v in s["enum"])
    for key in ("oneOf", "anyOf"):
        if key in s:
            return " or ".join(type_html(t) for t in s[key])
    kind = s.get("type", "any")
    if kind == "array":
        return "array of " + type_html(s.get("items", {}))
    if kind == "object" and isinstance(s.get("additionalProperties"), dict):
        return "object of " + type_html(s["additionalProperties"])
    return escape(str(kind))


def limits_html(s: dict[str, Any]) -> str:
    """The range, length and pattern limits of a schema and of the members of its union."""
    parts = [f"{escape(words)} " + (f"<code>{escape(s[k])}</code>" if k == "pattern" else value_html(s[k]))
             for k, words in LIMITS.items() if k in s]
    members = (limits_html(member) for member in s.get("anyOf", []) + s.get("oneOf", []))
    return ", ".join(parts + [m for m in members if m])


def table(head: list[str], rows: list[list[str]]) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + f"</tr>{cells}</table>"


def fields_html(schema: dict[str, Any]) -> str:
    required = set(schema.get("required", []))
    rows = [[f'<span class="required">{escape(name)}</span>' if name in required else escape(name), type_html(prop),
             limits_html(prop), value_html(prop["default"]) if "default" in prop else "",
             escape(prop.get("description", ""))]
            for name, prop in schema.get("properties", {}).items()]
    extra = "" if schema.get("additionalProperties") is not False else "<p>Other fields are refused (422).</p>"
    return table(["field (bold: required)", "type", "limits", "default", "description"], rows) + extra


def operation_html(method: str, path: str, op: dict[str, Any]) -> str:
    out = [f'<h3><span class="method">{method.upper()}</span> {escape(path)}</h3>',
           *(f"<p>{escape(op[key])}</p>" for key in ("summary", "description") if op.get(key))]
    if op.get("security"):
        out.append("<p>Needs <code>Authorization: Bearer TOKEN</code> when the server has a token.</p>")
    if op.get("parameters"):
        out.append(table(["parameter", "in", "type", "limits", "description"],
                         [[escape(p["name"]), escape(p["in"]), type_html(p["schema"]), limits_html(p["schema"]),
                           escape(p.get("description", ""))] for p in op["parameters"]]))
    for media, body in op.get("requestBody", {}).get("content", {}).items():
        union = "oneOf" in body["schema"]
        out.append(f"<p>Body (<code>{escape(media)}</code>){': one of' if union else ''} {type_html(body['schema'])}"
                   f"{', told apart by <code>kind</code>' if union else ''}.</p>")
    out.append(table(["status", "description", "content"],
                     [[escape(code), escape(r.get("description", "")),
                       ", ".join(f"<code>{escape(m)}</code>" + (f" {type_html(c['schema'])}" if c.get("schema") else "")
                                 for m, c in r.get("content", {}).items())]
                      for code, r in op.get("responses", {}).items()]))
    return "\n".join(out)


def render(schema: dict[str, Any]) -> str:
    """The page for an OpenAPI schema (as FastAPI's ``app.openapi()`` gives it)."""
    info = schema.get("info", {})
    title = escape(f"{info.get('title', 'API')} API {info.get('version', '')}".strip())
    routes = [operation_html(method, path, op) for path, ops in schema.get("paths", {}).items() for method, op in ops.items()]
    schemas = [f'<h3 id="schema-{escape(name)}">{escape(name)}</h3><p>{escape(s.get("description", ""))}</p>{fields_html(s)}'
               for name, s in schema.get("components", {}).get("schemas", {}).items()]
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title><style>{STYLE}</style>'
            f'</head><body><h1>{title}</h1><p>{escape(info.get("description", ""))}</p>'
            f'<p>The schema as JSON: <a href="/openapi.json">/openapi.json</a>. The web page: <a href="/">/</a>.</p>'
            f'<h2>Routes</h2>{"".join(routes)}<h2>Schemas</h2>{"".join(schemas)}</body></html>\n')
