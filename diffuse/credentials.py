"""C2PA content credentials: sign generated PNGs with a manifest, read and validate it back.

A signed PNG carries a C2PA manifest (the ``caBX`` chunk) whose claim, signed with ES256,
holds a hash of every other byte of the file plus two assertions:

* ``c2pa.actions``: ``c2pa.created`` with IPTC digitalSourceType ``trainedAlgorithmicMedia``
  and diffuse as the software agent. An edit (record kind other than "generate") is
  ``c2pa.opened`` of its input, then ``c2pa.edited`` with ``compositeWithTrainedAlgorithmicMedia``;
  the input file is embedded as the ``parentOf`` ingredient, so a signed input keeps its own
  manifest inside the edit's (a provenance chain). The SDK refuses a manifest whose first
  action is neither created nor opened, so an edit cannot be signed without its input;
* ``org.diffuse.generation``: ``{"record": JSON}``, the generation record as the same JSON text
  as the PNG's ``diffuse`` chunk. (It is kept as a string because the SDK's JSON-to-CBOR
  conversion turns arrays of numbers, such as the sigmas, into byte strings.)

Changing any byte outside the manifest (pixels, text chunks) breaks the hash; changing the
manifest breaks the signature. ``diffuse keys init`` makes a development certificate chain
(a self-signed ES256 root and a signing certificate it issues, made with ``cryptography``);
such a chain validates as "untrusted" unless its root is given as a trust anchor
(``diffuse verify --trust keys/root.pem``). Signing works offline: no timestamp authority
is contacted, so the signature's time is the signing certificate's validity, not a TSA's.

Uses ``c2pa-python`` 0.38 (``pip install 'diffuse[provenance]'``); its API changed often
between versions, so the version is pinned.
"""

from __future__ import annotations

import datetime
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import __version__

ASSERTION_LABEL = "org.diffuse.generation"
IPTC = "http://cv.iptc.org/newscodes/digitalsourcetype/"
CHAIN_FILE, KEY_FILE, ROOT_FILE = "chain.pem", "signer.key", "root.pem"


def _c2pa():
    try:
        import c2pa
    except ImportError:
        raise ValueError("content credentials need the c2pa-python package: pip install 'diffuse[provenance]'") from None
    return c2pa


# ---------------------------------------------------------------- keys

def init_keys(out: Path, *, common_name: str = "diffuse development signer", days: int = 365,
              overwrite: bool = False) -> Path:
    """Write a development certificate chain to ``out``: ``root.pem`` (the self-signed ES256 root,
    a trust anchor for verify), ``chain.pem`` (signing certificate then root) and ``signer.key``
    (its P-256 private key, PKCS#8, mode 0600). The root's private key is discarded."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    if days < 1:
        raise ValueError(f"--days must be >= 1, got {days}")
    out = Path(out)
    files = [out / CHAIN_FILE, out / KEY_FILE, out / ROOT_FILE]
    existing = [f for f in files if f.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{existing[0]} already exists; pass --overwrite to replace the keys or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "diffuse (development, not trusted)")])

    def usage(**on: bool) -> x509.KeyUsage:
        flags = dict(digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                     key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)
        return x509.KeyUsage(**{**flags, **on})

    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    root_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = (x509.CertificateBuilder().subject_name(name("diffuse development root")).issuer_name(name("diffuse development root"))
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    # the C2PA certificate profile: not a CA, digitalSignature, an allowed EKU (emailProtection), key identifiers
    leaf = (x509.CertificateBuilder().subject_name(name(common_name)).issuer_name(root.subject)
            .public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage(digital_signature=True), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    root_pem = root.public_bytes(pem)
    (out / ROOT_FILE).write_bytes(root_pem)
    (out / CHAIN_FILE).write_bytes(leaf.public_bytes(pem) + root_pem)
    key_path = out / KEY_FILE
    key_bytes = leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_bytes)
    return out


@dataclass(frozen=True)
class SigningKeys:
    """A certificate chain (PEM, signing certificate first) and its private key (PEM)."""

    chain: bytes
    key: bytes

    @classmethod
    def load(cls, folder: Path) -> "SigningKeys":
        """Read ``chain.pem`` and ``signer.key`` from a folder made by ``diffuse keys init`` (or your own)."""
        folder = Path(folder)
        for f in (folder / CHAIN_FILE, folder / KEY_FILE):
            if not f.is_file():
                raise FileNotFoundError(f"{f} does not exist; make a development chain with `diffuse keys init --out {folder}` "
                                        f"or put your certificate chain ({CHAIN_FILE}) and key ({KEY_FILE}) there")
        return cls((folder / CHAIN_FILE).read_bytes(), (folder / KEY_FILE).read_bytes())


# ---------------------------------------------------------------- signing

INGREDIENT_LABEL = "input"


def is_edit(record: dict[str, Any]) -> bool:
    return record.get("kind", "generate") != "generate"


def manifest_for(record: dict[str, Any], title: str) -> dict[str, Any]:
    """The C2PA manifest definition for an image with generation ``record`` (an edit's refers to
    the ingredient labelled INGREDIENT_LABEL, which :func:`sign_png_bytes` adds)."""
    agent = {"name": "diffuse", "version": __version__}
    if not is_edit(record):
        actions = [{"action": "c2pa.created", "digitalSourceType": IPTC + "trainedAlgorithmicMedia", "softwareAgent": agent}]
    else:
        actions = [{"action": "c2pa.opened", "parameters": {"ingredientIds": [INGREDIENT_LABEL]}},
                   {"action": "c2pa.edited", "digitalSourceType": IPTC + "compositeWithTrainedAlgorithmicMedia",
                    "softwareAgent": agent}]
    return {
        "claim_generator_info": [agent],
        "title": title,
        "format": "image/png",
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": actions}},
            {"label": ASSERTION_LABEL, "data": {"record": json.dumps(record, sort_keys=True)}},
        ],
    }


@dataclass(frozen=True)
class Ingredient:
    """An edit's input file as it goes into the manifest: its bytes, MIME type and title (file name)."""

    data: bytes
    mime: str
    title: str

    @classmethod
    def from_file(cls, path: Path) -> "Ingredient":
        from PIL import Image, UnidentifiedImageError

        path = Path(path)
        try:
            with Image.open(path) as im:
                mime = Image.MIME.get(im.format or "")
        except (OSError, UnidentifiedImageError):
            mime = None
        if mime is None:
            raise ValueError(f"cannot tell the image type of {path}, the edit's input, to add it to the content credentials")
        return cls(path.read_bytes(), mime, path.name)


def sign_png_bytes(png: bytes, record: dict[str, Any], keys: SigningKeys, title: str = "image.png",
                   ingredient: Optional[Ingredient] = None) -> bytes:
    """``png`` with a signed C2PA manifest embedded (no thumbnail, no timestamp authority); an edit's
    record needs its input as ``ingredient``."""
    if is_edit(record) and ingredient is None:
        raise ValueError(f"signing a {record['kind']} result needs its input image as the C2PA ingredient "
                         f"(sign_png(..., ingredient=INPUT_FILE)); the manifest must say what was edited")
    c2pa = _c2pa()
    context = c2pa.Context(c2pa.Settings.from_dict({"builder": {"thumbnail": {"enabled": False}}}))
    try:
        signer = c2pa.Signer.from_info(c2pa.C2paSignerInfo(b"es256", keys.chain, keys.key, None))
    except c2pa.C2paError as e:
        raise ValueError(f"the signing certificate chain or key is not usable for ES256 C2PA signing ({e})") from None
    out = io.BytesIO()
    with signer, c2pa.Builder(manifest_for(record, title), context=context) as builder:
        if ingredient is not None:
            try:
                builder.add_ingredient({"title": ingredient.title, "relationship": "parentOf", "label": INGREDIENT_LABEL},
                                       ingredient.mime, io.BytesIO(ingredient.data))
            except c2pa.C2paError as e:
                raise ValueError(f"cannot add {ingredient.title} ({ingredient.mime}) to the content credentials as the "
                                 f"edit's ingredient ({e})") from None
        builder.sign(signer, "image/png", io.BytesIO(png), out)
    return out.getvalue()


def sign_png(path: Path, keys: SigningKeys, record: Optional[dict[str, Any]] = None,
             ingredient: Optional[Path] = None) -> Path:
    """Sign a PNG in place (written to a temp file, then renamed); the record defaults to the PNG's own.
    ``ingredient``: the input file of an edit (required for edits, ignored for generated images)."""
    from .record import read_record

    path = Path(path)
    record = record if record is not None else read_record(path)
    if record is None:
        raise ValueError(f"{path} has no diffuse generation record to sign; sign images written by diffuse")
    parent = Ingredient.from_file(ingredient) if ingredient is not None and is_edit(record) else None
    signed = sign_png_bytes(path.read_bytes(), record, keys, title=path.name, ingredient=parent)
    tmp = path.with_name(path.name + ".incomplete")
    tmp.write_bytes(signed)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- reading and validation

@dataclass(frozen=True)
class CredentialReport:
    """The outcome of reading a file's C2PA manifest."""

    found: bool
    state: Optional[str] = None  # the SDK's validation state: "Invalid", "Valid" (untrusted signer) or "Trusted"
    failures: list[str] = field(default_factory=list)  # validation codes with explanations
    signer: Optional[str] = None
    actions: list[str] = field(default_factory=list)
    record: Optional[dict[str, Any]] = None
    ingredients: list[str] = field(default_factory=list)  # "title (signed)" / "title (unsigned)"

    @property
    def tampered(self) -> bool:
        """Something the manifest covers (file bytes, assertions, signature) no longer matches."""
        return self.found and self.state == "Invalid"

    def describe(self) -> list[str]:
        if not self.found:
            return ["content credentials: none (no C2PA manifest in the file)"]
        if self.tampered:
            lines = ["content credentials: INVALID, the file was changed after signing or the manifest is damaged"]
            lines += [f"  {f}" for f in self.failures if not f.startswith("signingCredential.untrusted")]
            return lines
        trust = "trusted signer" if self.state == "Trusted" else "signer not in the trust list (self-signed or unknown; --trust ROOT.pem)"
        lines = [f"content credentials: valid C2PA manifest, {trust}",
                 f"  signed by {self.signer}; actions {', '.join(self.actions) or 'none'}; "
                 f"generation record {'included' if self.record else 'absent'}"]
        if self.ingredients:
            lines.append(f"  ingredients: {', '.join(self.ingredients)}")
        return lines


def read_credentials(path: Path, trust_anchors: Optional[bytes] = None) -> CredentialReport:
    """Read and validate the C2PA manifest of ``path``; ``trust_anchors`` (PEM) are root certificates to trust."""
    c2pa = _c2pa()
    settings: dict[str, Any] = {}
    if trust_anchors:
        settings = {"trust": {"user_anchors": trust_anchors.decode("ascii")}, "verify": {"verify_trust": True}}
    context = c2pa.Context(c2pa.Settings.from_dict(settings)) if settings else None
    data = Path(path).read_bytes()
    try:
        reader = c2pa.Reader.try_create("image/png", io.BytesIO(data), None, context) if context else \
            c2pa.Reader.try_create("image/png", io.BytesIO(data))
    except c2pa.C2paError as e:
        return CredentialReport(True, "Invalid", [f"the manifest cannot be read: {e}"])
    if reader is None:
        return CredentialReport(False)
    with reader:
        state = reader.get_validation_state()
        results = reader.get_validation_results() or {}
        manifest = reader.get_active_manifest() or {}
    active = results.get("activeManifest", {})
    failures = [f"{r['code']}: {r.get('explanation', '')}" for r in active.get("failure", [])]
    info = manifest.get("signature_info", {})
    signer = f"{info.get('common_name', '?')} (issuer {info.get('issuer', '?')}, {info.get('alg', '?')})"
    actions, record = [], None
    for assertion in manifest.get("assertions", []):
        if assertion.get("label", "").startswith("c2pa.actions"):
            actions += [a.get("action", "?") for a in assertion.get("data", {}).get("actions", [])]
        elif assertion.get("label") == ASSERTION_LABEL:
            record = json.loads(assertion.get("data", {}).get("record", "null"))
    ingredients = [f"{i.get('title', '?')} ({'signed' if i.get('active_manifest') else 'unsigned'})"
                   for i in manifest.get("ingredients", [])]
    return CredentialReport(True, state, failures, signer, actions, record, ingredients)

