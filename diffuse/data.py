"""Datasets that work offline: the shapes world, scikit-learn's digits, and image folders.

Every dataset is map-style and deterministic (item i never changes; the trainer owns
shuffling and resume) and returns dicts ``{"image": float32 [C, H, W] in [-1, 1]}`` plus
``"label": int`` when it has classes and ``"caption": str`` when it has captions. Each has
the attributes ``channels``, ``size``, ``num_classes`` (0 if none), ``has_captions`` and
``captions()`` (all captions, for building a vocabulary).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from diffuse import shapes

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, C] (or [H, W]) -> float32 [C, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(image)).float()
    x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
    return x / 127.5 - 1.0


# ---------------------------------------------------------------------------- shapes


class ShapesDataset(Dataset):
    """Captioned shapes-world scenes: item i is ``shapes.sample(base_seed + i)`` rendered.

    Train split only (held-out color-shape pairs never appear). ``families`` restricts the
    caption families (default: all of ``shapes.FAMILIES``, drawn uniformly per item);
    ``family_weights`` ({family: weight}) draws them in those proportions instead.
    """

    channels = 3
    num_classes = 0
    has_captions = True

    def __init__(self, size: int = 32, length: int = 100_000, base_seed: int = 0,
                 families: Sequence[str] | None = None, family_weights: dict[str, float] | None = None) -> None:
        if family_weights:
            if families is not None:
                raise ValueError("give the shapes dataset families or family_weights, not both")
            families = tuple(f for f, w in family_weights.items() if w > 0)
        families = tuple(shapes.FAMILIES if families is None else families)
        unknown = [f for f in (*families, *(family_weights or {})) if f not in shapes.FAMILIES]
        if unknown or not families:
            raise ValueError(f"unknown shapes families {unknown or families!r}; expected some of {shapes.FAMILIES}")
        self.weights = tuple(float(family_weights[f]) for f in families) if family_weights else None
        if size < 8 or length < 1:
            raise ValueError(f"shapes dataset needs size >= 8 and length >= 1, got size={size}, length={length}")
        self.size, self.length, self.base_seed, self.families = size, length, base_seed, families

    def __len__(self) -> int:
        return self.length

    def example(self, i: int) -> shapes.Example:
        if not 0 <= i < self.length:
            raise IndexError(f"index {i} out of range for {self.length} shapes items")
        return shapes.sample(self.base_seed + i, families=self.families, weights=self.weights)

    def __getitem__(self, i: int) -> dict:
        ex = self.example(i)
        return {"image": to_tensor(shapes.render(ex.scene, self.size)), "caption": ex.caption}

    def captions(self, limit: int = 20_000) -> list[str]:
        """The captions of the first ``limit`` items (20k cover every word of the grammar)."""
        return [self.example(i).caption for i in range(min(limit, self.length))]


# ---------------------------------------------------------------------------- digits


class DigitsDataset(Dataset):
    """scikit-learn's 1,797 8x8 handwritten digits (values 0..16), one channel, label = digit.

    Upsampled to ``size`` with bilinear interpolation (``align_corners=False``, so the 8x8
    pixel grid maps onto the whole canvas), then mapped 0..16 -> [-1, 1].
    """

    channels = 1
    num_classes = 10
    has_captions = False

    def __init__(self, size: int = 32) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.from_numpy(digits.images).float()[:, None] / 16.0  # [N, 1, 8, 8] in [0, 1]
        if size != 8:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        self.images = (x * 2 - 1).clamp(-1, 1).contiguous()  # [N, 1, size, size]
        self.labels = [int(t) for t in digits.target]
        self.size = size

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i]}

    def captions(self) -> list[str]:
        return []


# ---------------------------------------------------------------------------- folders


def load_image(path: Path, size: int) -> np.ndarray:
    """Read an image as uint8 RGB [size, size, 3]: shorter side resized, then center crop.

    Conversion is explicit: transparency (RGBA, LA, palette with transparency) is composited
    over black; grayscale and palette images are expanded to RGB. Resizing is bicubic (PIL,
    antialiased when shrinking) to make the shorter side ``size``; the longer side is then
    center-cropped (offset floor((long - size) / 2)).
    """
    with Image.open(path) as im:
        im.load()
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in ("RGBA", "LA", "PA"):
            rgba = im.convert("RGBA")
            im = Image.new("RGB", rgba.size)
            im.paste(rgba, mask=rgba.getchannel("A"))
        im = im.convert("RGB")
    w, h = im.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.array(im.crop((left, top, left + size, top + size)))


def read_jsonl(path: Path, keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Rows of a JSON-lines file, keyed by their ``file_name``; each row must hold ``keys``.
    A bad line is a ValueError naming ``file:line``."""
    out: dict[str, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            missing = [k for k in ("file_name", *keys) if k not in row]
            if missing:
                raise KeyError(missing[0])
            out[Path(row["file_name"]).as_posix()] = row
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            wanted = ", ".join(repr(k) for k in ("file_name", *keys))
            raise ValueError(f"{path}:{n}: expected a JSON object with {wanted} ({e})") from e
    return out


def _read_metadata(root: Path) -> dict[str, str]:
    """Captions from ``root/metadata.jsonl`` lines ``{"file_name": ..., "text": ...}``."""
    path = root / "metadata.jsonl"
    return {name: str(row["text"]) for name, row in read_jsonl(path, ("text",)).items()} if path.exists() else {}


class FolderDataset(Dataset):
    """Every image under ``root`` (png/jpg/jpeg/webp/bmp, any mode, any size), see ``load_image``.

    Captions: ``name.txt`` beside ``name.png`` wins over ``root/metadata.jsonl`` (paths relative
    to root); an image without a caption gets "" (with a warning) when others have one.
    Classes: when all images sit in first-level subfolders, the label is the index of the
    subfolder's name in sorted order (``class_names``); images in the root then are an error.
    Bad files: every file's header is checked at construction and a failure names the file;
    with ``skip_bad_files=True`` every file is fully decoded at construction instead and bad
    ones are skipped with a warning. A file that fails later still raises naming the file.
    """

    channels = 3

    def __init__(self, root: str | Path, size: int = 32, skip_bad_files: bool = False) -> None:
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        files = sorted(p for p in self.root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ValueError(f"image folder {self.root} contains no images ({', '.join(IMAGE_SUFFIXES)})")
        self.files = [p for p in files if self._usable(p, skip_bad_files)]
        if not self.files:
            raise ValueError(f"image folder {self.root}: every image failed to load")
        rel = [p.relative_to(self.root) for p in self.files]
        nested = [len(r.parts) > 1 for r in rel]
        if any(nested) and not all(nested):
            top = next(r for r, n in zip(rel, nested) if not n)
            raise ValueError(f"image folder {self.root} mixes class subfolders with images in the root (e.g. {top})")
        self.class_names = sorted({r.parts[0] for r in rel}) if all(nested) else []
        self.labels = [self.class_names.index(r.parts[0]) for r in rel] if self.class_names else []
        self.num_classes = len(self.class_names)
        metadata = _read_metadata(self.root)
        missing = sorted(set(metadata) - {r.as_posix() for r in rel})
        if missing and not skip_bad_files:
            raise ValueError(f"{self.root / 'metadata.jsonl'} names files that are not images here: {missing[:5]}")
        self._captions = [self._caption(p, r, metadata) for p, r in zip(self.files, rel)]
        self.has_captions = any(self._captions)
        if self.has_captions and not all(self._captions):
            warnings.warn(f"{self._captions.count('')} of {len(self.files)} images in {self.root} have no caption; "
                          "they get the empty caption")

    @staticmethod
    def _usable(path: Path, skip_bad_files: bool) -> bool:
        try:
            with Image.open(path) as im:
                if skip_bad_files:
                    im.load()
        except (OSError, UnidentifiedImageError, ValueError) as e:
            if not skip_bad_files:
                raise ValueError(f"cannot read image {path}: {e}") from e
            warnings.warn(f"skipping unreadable image {path}: {e}")
            return False
        return True

    @staticmethod
    def _caption(path: Path, rel: Path, metadata: dict[str, str]) -> str:
        txt = path.with_suffix(".txt")
        return txt.read_text(encoding="utf-8").strip() if txt.exists() else metadata.get(rel.as_posix(), "")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict:
        path = self.files[i]
        try:
            image = load_image(path, self.size)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise ValueError(f"cannot read image {path}: {e}") from e
        item = {"image": to_tensor(image)}
        if self.labels:
            item["label"] = self.labels[i]
        if self.has_captions:
            item["caption"] = self._captions[i]
        return item

    def captions(self) -> list[str]:
        return list(self._captions) if self.has_captions else []


# ---------------------------------------------------------------------------- factory


def make_dataset(spec: str, size: int, **kwargs) -> Dataset:
    """Build a dataset from ``'shapes'``, ``'digits'`` or ``'folder:PATH'`` at ``size`` pixels.

    ``kwargs`` go to the dataset class (shapes: length, base_seed, families; folder:
    skip_bad_files).
    """
    if spec == "shapes":
        return ShapesDataset(size, **kwargs)
    if spec == "digits":
        return DigitsDataset(size, **kwargs)
    if spec.startswith("folder:") and spec != "folder:":
        return FolderDataset(spec.removeprefix("folder:"), size, **kwargs)
    raise ValueError(f"unknown dataset {spec!r}; expected 'shapes', 'digits' or 'folder:PATH'")
