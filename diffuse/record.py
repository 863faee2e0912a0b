"""The generation record a PNG carries, and the PNG text chunks that hold it.

Two chunks are written (DESIGN.md §6):

* ``parameters``: the AUTOMATIC1111 text format that the ecosystem's metadata readers parse::

      a red circle above a blue square
      Negative prompt: a green triangle
      Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 3.0, Seed: 7, Size: 32x32, Model hash: 1a2b3c4d5e, Model: shapes

* ``diffuse``: our JSON record with everything needed to regenerate the image exactly
  (model hash, code version, sampler and options, schedule and its sigmas, seed, guidance,
  prompt/label, size), plus the record of the input image for edits.

Edits identify their inputs by :func:`pixels_hash` (a SHA-256 of the decoded pixels, not of
the file), so re-saving, re-compressing or signing an input does not change its identity.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image, PngImagePlugin

# our sampler name -> AUTOMATIC1111's label for the same method
A1111_SAMPLERS = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2", "lms": "LMS",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_3m_sde": "DPM++ 3M SDE", "ddim": "DDIM", "unipc": "UniPC",
    "ipndm": "iPNDM", "deis": "DEIS", "ddpm": "DDPM", "edm": "EDM",
}
A1111_SCHEDULES = {"karras": "Karras", "exponential": "Exponential", "polyexponential": "Polyexponential"}


def file_hash(path: Path, length: int = 10) -> str:
    """First ``length`` hex digits of the file's SHA-256 (AUTOMATIC1111's 'Model hash')."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def pixels_hash(pixels: np.ndarray) -> str:
    """SHA-256 (64 hex digits) of a uint8 array [H, W, C] and its shape: an image's content, whatever file holds it."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3:
        raise ValueError(f"pixels_hash takes uint8 [H, W, C] arrays, got {pixels.dtype} {pixels.shape}")
    h = hashlib.sha256("{}x{}x{} uint8\n".format(*pixels.shape).encode())
    h.update(np.ascontiguousarray(pixels).tobytes())
    return h.hexdigest()


def a1111_parameters(record: dict[str, Any]) -> str:
    """The ``parameters`` text of AUTOMATIC1111 for a generation record."""
    prompt = record.get("prompt") or ""
    if record.get("class_label") is not None:
        prompt = prompt or f"class {record['class_label']}"
    lines = [prompt]
    if record.get("negative_prompt"):
        lines.append(f"Negative prompt: {record['negative_prompt']}")
    fields = [
        ("Steps", record["steps"]),
        ("Sampler", A1111_SAMPLERS.get(record["sampler"], record["sampler"])),
        ("Schedule type", A1111_SCHEDULES.get(record["schedule"], record["schedule"])),
        ("CFG scale", record["cfg"]),
        ("Seed", record["seed"]),
        ("Size", f"{record['width']}x{record['height']}"),
        ("Model hash", record["model_hash"]),
        ("Model", record["model"]),
    ]
    if record.get("denoising_strength") is not None:
        fields.append(("Denoising strength", record["denoising_strength"]))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def png_info(record: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """The two text chunks (``parameters``, ``diffuse``) for ``Image.save(..., pnginfo=...)``."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(record))
    info.add_itxt("diffuse", json.dumps(record, sort_keys=True))
    return info


def save_png(image: Image.Image, path: Path, record: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Write ``image`` to ``path`` with both text chunks; an existing file is an error unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass --overwrite to replace it or choose another --out")
    info = png_info(record)
    tmp = path.with_name(path.name + ".incomplete")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path


def read_record(path: Path) -> Optional[dict[str, Any]]:
    """The ``diffuse`` JSON record of a PNG, or None when it has none."""
    with Image.open(path) as im:
        text = im.text.get("diffuse") if hasattr(im, "text") else None
    return json.loads(text) if text else None
