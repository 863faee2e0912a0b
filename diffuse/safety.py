"""Safety checks around generation: a prompt filter with a configurable block list, and a hook
for an output image classifier.

The prompt filter runs inside :meth:`diffuse.pipeline.Pipeline.check_prompt`, so the CLI,
the Python API and the server (which calls the same Pipeline) all refuse the same prompts,
with a message naming the rule that matched.

Block list file format (UTF-8 text, one rule per line)::

    # a comment line; blank lines are ignored
    word: gore
    word: graphic violence
    regex: \\bkill(s|ed|ing)?\\s+(a|the)\\s+\\w+

``word`` rules are whole words or phrases (a phrase matches with any whitespace between
its words); ``regex`` rules are Python regular expressions. Both are case-insensitive.

Words match whole words only ("gore" blocks "Gore!" but not "gorey" or
"Algorean"); both kinds see the prompt after Unicode NFKC normalization, so full-width or
ligature spellings of a word are caught too. A ``name = `` prefix gives a rule a name for
messages: ``word: violence = graphic violence``. A word list is a blunt tool: it blocks
what it names and misses misspellings and paraphrases; pair it with an output classifier.

The output classifier hook is any callable ``check(image) -> Optional[str]`` that returns
None for an acceptable image or a short reason to withhold it. No classifier ships with
diffuse (none can be had offline); :attr:`Pipeline.image_check` takes one.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from PIL import Image

DEFAULT_BLOCKLIST = Path(__file__).parent / "blocklist.txt"

ImageCheck = Callable[[Image.Image], Optional[str]]


class Refused(ValueError):
    """A prompt or an image refused by a safety rule; the message names the rule."""


@dataclass(frozen=True)
class Rule:
    """One block rule: ``kind`` is "word" or "regex"; ``where`` says which file and line it came from."""

    kind: str
    value: str
    name: str
    where: str
    pattern: re.Pattern

    def describe(self) -> str:
        label = f"{self.kind}: {self.value}" if self.name == self.value else f"{self.name!r} ({self.kind}: {self.value})"
        return f"{label}, {self.where}"


def normalize(text: str) -> str:
    """NFKC-normalized, case-folded text: what every rule is matched against."""
    return unicodedata.normalize("NFKC", text).casefold()


def make_rule(kind: str, value: str, where: str, name: Optional[str] = None) -> Rule:
    """A rule from its kind and value (ValueError naming ``where`` when the value is empty or a bad regex)."""
    value = value.strip()
    if not value:
        raise ValueError(f"{where}: the {kind} rule is empty; write e.g. '{kind}: gore'")
    if kind == "word":
        words = normalize(value).split()
        pattern = re.compile(r"(?<!\w)" + r"\s+".join(re.escape(w) for w in words) + r"(?!\w)")
    elif kind == "regex":
        try:
            pattern = re.compile(unicodedata.normalize("NFKC", value), re.IGNORECASE)
        except re.error as e:
            raise ValueError(f"{where}: the regex {value!r} does not compile ({e}); fix the pattern") from None
    else:
        raise ValueError(f"{where}: unknown rule kind {kind!r}; lines start with 'word:' or 'regex:'")
    return Rule(kind, value, (name or value).strip(), where, pattern)


class PromptFilter:
    """Refuses prompts that match any of its rules (:class:`Refused` naming the rule)."""

    def __init__(self, rules: Sequence[Rule], source: str = "block list"):
        self.rules = list(rules)
        self.source = source

    @classmethod
    def parse(cls, text: str, source: str = "block list") -> "PromptFilter":
        """Rules from the block list format in the module docstring."""
        rules = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            kind, sep, rest = line.partition(":")
            where = f"{source} line {number}"
            if not sep:
                raise ValueError(f"{where}: {line!r} is not a rule; write 'word: TEXT' or 'regex: PATTERN'")
            kind = kind.strip()
            name, eq, value = rest.partition(" = ")
            rules.append(make_rule(kind, value if eq else rest, where, name if eq else None))
        return cls(rules, source)

    @classmethod
    def load(cls, path: str | Path) -> "PromptFilter":
        """Rules from a block list file (OSError/ValueError naming the file and line)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise FileNotFoundError(f"block list {path} does not exist; give an existing file to --blocklist") from None
        except UnicodeDecodeError:
            raise ValueError(f"block list {path} is not UTF-8 text") from None
        return cls.parse(text, str(path) if path != DEFAULT_BLOCKLIST else "the default block list")

    @classmethod
    def default(cls) -> "PromptFilter":
        """The block list that ships with diffuse (diffuse/blocklist.txt)."""
        return cls.load(DEFAULT_BLOCKLIST)

    def summary(self) -> dict[str, Any]:
        """What a generation record keeps of the filter: its source, rule count and a SHA-256 of the rules."""
        digest = hashlib.sha256("\n".join(f"{r.kind}:{r.name}={r.value}" for r in self.rules).encode()).hexdigest()
        return {"source": self.source, "rules": len(self.rules), "sha256": digest[:16]}

    def match(self, text: str) -> Optional[Rule]:
        """The first rule that ``text`` matches, or None."""
        normalized = normalize(text)
        return next((rule for rule in self.rules if rule.pattern.search(normalized)), None)

    def check(self, text: Optional[str], what: str = "prompt") -> None:
        """Raise :class:`Refused` when ``text`` matches a rule."""
        rule = self.match(text) if text else None
        if rule is not None:
            raise Refused(f"the {what} was refused by block rule {rule.describe()}; rephrase it "
                          f"(the rules are in {self.source}; --blocklist FILE uses another list)")


def check_image(check: Optional[ImageCheck], image: Image.Image, seed: int) -> None:
    """Run the output classifier hook on one image; :class:`Refused` naming the seed and reason when it objects."""
    if check is None:
        return
    reason = check(image)
    if reason is not None:
        name = getattr(check, "__name__", type(check).__name__)
        raise Refused(f"the image for seed {seed} was withheld by the output classifier {name}: {reason}")
