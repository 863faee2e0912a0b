"""Reading weights from other tools: safetensors only, recognised by content, loaded lazily.

A weights file is identified by its first bytes, never by its name: safetensors starts with an
8-byte little-endian header length followed by a JSON object (``{``). Pickle-based files (PyTorch
``torch.save`` zip archives starting ``PK``, raw pickles starting with the PROTO opcode ``0x80``, old
``.ckpt``/``.pt``/``.bin``) are refused before anything in them is parsed: unpickling runs code the file
chooses (a ``__reduce__`` payload), so such a file must be converted in an isolated environment. A
safetensors file is read through ``safe_open``: tensors are loaded one at a time when indexed, so a
multi-gigabyte checkpoint is never held twice in memory.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open

from .errors import UnsupportedModel

PICKLE_HINT = ("diffuse reads only safetensors because loading a pickle can run any code the file contains; convert "
               "it in an isolated environment (a throwaway container or VM without your files) with "
               "`safetensors.torch.save_file(torch.load(SRC, map_location='cpu', weights_only=True), DST)`, then "
               "pass the .safetensors file")
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


def sniff(path: Path) -> str:
    """What a file is, from its first bytes: 'safetensors', 'pickle', 'zip' (torch.save), or 'unknown'."""
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9:
        (n,) = struct.unpack("<Q", head[:8])
        if 2 <= n <= MAX_HEADER and head[8:9] == b"{" and n + 8 <= Path(path).stat().st_size:
            return "safetensors"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if head[:1] == b"\x80" and head[1:2] and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def check_safetensors(path: Path) -> Path:
    """``path`` if it is a safetensors file; otherwise a one-line error saying what it is and what to do."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    if path.stat().st_size == 0:
        raise UnsupportedModel(f"{path} is empty (0 bytes): an unfinished download or copy; fetch it again")
    kind = sniff(path)
    if kind == "safetensors":
        return path
    if kind in ("pickle", "zip"):
        what = "a PyTorch pickle (torch.save zip archive)" if kind == "zip" else "a pickle file"
        raise UnsupportedModel(f"{path} is {what}, whatever its extension says; {PICKLE_HINT}")
    raise UnsupportedModel(f"{path} is not a safetensors file (its first bytes are neither a safetensors header nor "
                           f"a known checkpoint format); give a .safetensors weights file or a diffusers model folder")


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only ``{name: tensor}`` over one or more safetensors files; a tensor is read when indexed.

    ``dtype`` converts floating-point tensors as they are read (e.g. bf16 to halve memory); integer
    tensors and scalars (buffers such as a latent ``scale_factor``: converting them saves nothing and loses
    digits) are returned as stored. ``shapes`` gives every tensor's shape without reading any data.
    """

    def __init__(self, paths: list[Path], dtype: Optional[torch.dtype] = None):
        self.dtype = dtype
        self._files: list[Any] = []
        self._where: dict[str, int] = {}
        self.metadata: dict[str, str] = {}
        for path in paths:
            path = check_safetensors(path)
            try:
                handle = safe_open(str(path), framework="pt")
            except (SafetensorError, OSError) as e:
                raise UnsupportedModel(f"{path} is not a readable safetensors file ({e}); it may be truncated or "
                                       f"corrupt") from None
            self.metadata.update(handle.metadata() or {})
            for key in handle.keys():
                self._where[key] = len(self._files)
            self._files.append(handle)

    def __getitem__(self, key: str) -> torch.Tensor:
        tensor = self._files[self._where[key]].get_tensor(key)
        if self.dtype is not None and tensor.is_floating_point() and tensor.ndim and tensor.dtype != self.dtype:
            tensor = tensor.to(self.dtype)
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {key: tuple(self._files[i].get_slice(key).get_shape()) for key, i in self._where.items()}


def open_weights(path: Path, dtype: Optional[torch.dtype] = None) -> LazyTensors:
    """Lazy tensors of a safetensors file, or of a sharded set given by its ``*.safetensors.index.json`` (or a
    variant's ``*.safetensors.index.VARIANT.json``)."""
    path = Path(path)
    if ".safetensors.index." in path.name and path.name.endswith(".json"):
        weight_map = json.loads(path.read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UnsupportedModel(f"{path} has no 'weight_map'; it is not a sharded safetensors index")
        return LazyTensors([path.parent / name for name in dict.fromkeys(weight_map.values())], dtype)
    return LazyTensors([path], dtype)


def find_weights(folder: Path, stem: str, dtype: Optional[torch.dtype] = None) -> LazyTensors:
    """The weights of one diffusers/transformers component folder (``stem`` = diffusion_pytorch_model or model).

    Looks for ``STEM.safetensors`` or its sharded index, else for the one variant the folder holds
    (``STEM.fp16.safetensors``, or its index ``STEM.safetensors.index.fp16.json``: what a download of the Hub's
    fp16 files alone leaves; ``dtype`` converts it as read). A folder that has only pickle weights (``.bin``,
    ``.ckpt``, ``.pt``) gets the pickle explanation, naming the file.
    """
    folder = Path(folder)
    for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json"):
        if (folder / name).is_file():
            return open_weights(folder / name, dtype)
    variant = re.compile(rf"{re.escape(stem)}\.(?:(\w+)\.safetensors|safetensors\.index\.(\w+)\.json)")
    found = {p.name: m.group(1) or m.group(2) for p in folder.glob(f"{stem}.*") if (m := variant.fullmatch(p.name))}
    if len(set(found.values())) == 1:
        index = [name for name in found if name.endswith(".json")]
        return open_weights(folder / (index or list(found))[0], dtype)
    if found:
        raise UnsupportedModel(f"{folder} has no {stem}.safetensors but the variants {', '.join(sorted(found))}; keep "
                               f"one variant's files (or add {stem}.safetensors)")
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in (".bin", ".ckpt", ".pt", ".pth"))
    if pickles:
        raise UnsupportedModel(f"{folder} has only pickle weights ({pickles[0]}); {PICKLE_HINT}")
    raise UnsupportedModel(f"{folder} has no {stem}.safetensors; it is not a complete diffusers component folder")
