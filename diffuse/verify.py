"""``diffuse verify IMAGE``: what provenance an image still carries.

Three independent checks, each reported on its own line(s):

* the invisible watermark (:mod:`diffuse.watermark`): present or absent, and how many of
  its bits survived;
* C2PA content credentials (:mod:`diffuse.credentials`): none, valid (trusted or not), or
  invalid, which means the file was changed after signing;
* the generation record in the PNG's ``diffuse`` text chunk (needed by ``diffuse replay``).

The verdict is "ok" when some provenance was found and nothing was tampered with.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from PIL import Image, UnidentifiedImageError

from . import credentials, watermark
from .record import read_record

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Verification:
    watermark: Optional[watermark.Detection]  # None when the pixels cannot be decoded
    credentials: Optional[credentials.CredentialReport]  # None for files other than PNG
    record: Optional[dict[str, Any]]

    @property
    def tampered(self) -> bool:
        return self.credentials is not None and self.credentials.tampered

    @property
    def ok(self) -> bool:
        found = (self.watermark is not None and self.watermark.present) or (self.credentials is not None and self.credentials.found)
        return found and not self.tampered

    def lines(self) -> list[str]:
        out = [self.watermark.describe() if self.watermark is not None else
               "watermark: cannot be read, the image data is damaged (Pillow cannot decode it)"]
        out += self.credentials.describe() if self.credentials is not None else ["content credentials: not checked (only PNG files are signed)"]
        if self.record is None:
            out.append("generation record: none (no 'diffuse' PNG text chunk; replay is not possible)")
        else:
            out.append(f"generation record: {self.record.get('kind', 'generate')} with model {self.record.get('model')} "
                       f"({self.record.get('model_hash')}), seed {self.record.get('seed')}; `diffuse replay` can check it")
            source = self.record.get("input_image")
            if source is not None:
                chained = self.record.get("input_record")
                out.append(f"  edited from {source.get('file') or 'an in-memory image'}, "
                           + (f"whose own {chained.get('kind', 'generate')} record is chained (replay can regenerate it)"
                              if chained else "which has no diffuse record (replay needs it as --input)"))
        if self.tampered:
            out.append("verdict: TAMPERED, the file no longer matches its signed content credentials")
        else:
            out.append("verdict: ok" if self.ok else "verdict: no provenance found (no watermark, no content credentials)")
        return out


def verify(path: str | Path, trust_anchors: Optional[bytes] = None) -> Verification:
    """Check the watermark, content credentials and record of an image file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    is_png = path.read_bytes()[:8] == PNG_SIGNATURE
    image = record = None
    try:
        with Image.open(path) as im:
            image = im.convert("RGB")
        record = read_record(path) if is_png else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:  # Pillow raises SyntaxError on bad PNG checksums
        if not is_png:
            raise ValueError(f"{path} is not an image Pillow can read ({e})") from None
    size = (record["width"], record["height"]) if record and "width" in record else None
    creds = credentials.read_credentials(path, trust_anchors) if is_png else None
    return Verification(watermark.detect(image, record_size=size) if image is not None else None, creds, record)
