"""Invisible watermarks: a fixed 64-bit mark in every generated image of at least 256x256.

The mark is embedded with the ``dwtDctSvd`` method of the ``invisible-watermark`` package
(``pip install 'diffuse[provenance]'``): the image's U (chroma) channel is split by a Haar
DWT, the LL band cut into 4x4 blocks, and bit ``k mod 64`` of the mark goes into block k by
quantizing the largest singular value of the block's DCT (step 36). The package's own
check needs at least 256x256 pixels; smaller images are left unmarked, and the generation
record says so. Only RGB images are marked: the method writes a chroma channel, which a
grayscale image does not have.

Decoding reads one bit per block and takes each mark bit's majority vote. It does not
survive cropping or rescaling by itself (the block grid moves), so :func:`detect` also
tries the image scaled back to the square sizes it may have been generated at (the size
in its record, then multiples of 4 within 80%-125% of its side). A mark is reported
present when at least ``THRESHOLD`` of its 64 bits match: by chance (an unmarked image
reads as coin flips) that happens with probability 1.0e-8 per size tried.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

METHOD = "dwtDctSvd"
MIN_SIDE = 256
# the mark: 64 bits (33 ones), from the bytes of "diffuse!" XOR a fixed mask (no long runs)
MARK = np.unpackbits(np.frombuffer(bytes(a ^ b for a, b in zip(b"diffuse!", bytes.fromhex("a55a3cc35aa5c33c"))),
                                   dtype=np.uint8)).astype(bool)
THRESHOLD = 54  # of 64 bits


def _imwatermark():
    try:
        import imwatermark
    except ImportError:
        raise ValueError("watermarking needs the invisible-watermark package: pip install 'diffuse[provenance]' "
                          "(or pass --no-watermark)") from None
    return imwatermark


def too_small(width: int, height: int) -> bool:
    """True when an image is below the 256x256 the method needs (the package compares areas)."""
    return width * height < MIN_SIDE * MIN_SIDE


def embed(image: Image.Image) -> Image.Image:
    """The RGB ``image`` with the mark embedded (ValueError when it is too small or not RGB)."""
    if image.mode != "RGB":
        raise ValueError(f"only RGB images can carry the watermark, got mode {image.mode}")
    if too_small(*image.size):
        raise ValueError(f"a {image.width}x{image.height} image is too small for the watermark; it needs at least {MIN_SIDE}x{MIN_SIDE}")
    encoder = _imwatermark().WatermarkEncoder()
    encoder.set_watermark("bits", MARK.astype(int).tolist())
    bgr = np.ascontiguousarray(np.asarray(image)[..., ::-1])
    marked = encoder.encode(bgr, METHOD)
    return Image.fromarray(np.ascontiguousarray(marked[..., ::-1]).astype(np.uint8), "RGB")


def mark_generated(image: Image.Image, enabled: bool = True) -> tuple[Image.Image, dict[str, Any]]:
    """Watermark a freshly generated image when possible; returns (image, the record's ``watermark`` entry).

    The entry says plainly whether the mark was added, and why not when it was not.
    """
    entry: dict[str, Any] = {"method": METHOD, "applied": False}
    if not enabled:
        entry["reason"] = "disabled"
    elif image.mode != "RGB":
        entry["reason"] = f"{image.mode} image: the method marks a color channel, so only RGB images are marked"
    elif too_small(*image.size):
        entry["reason"] = f"{image.width}x{image.height} is below the {MIN_SIDE}x{MIN_SIDE} the method needs"
    else:
        image = embed(image)
        entry.update(applied=True, bits=len(MARK), package=f"invisible-watermark {_package_version()}")
    return image, entry


def _package_version() -> str:
    from importlib.metadata import version

    return version("invisible-watermark")


def bit_matches(image: Image.Image) -> int:
    """How many of the 64 mark bits the image (RGB, at least 256x256) reads back."""
    decoder = _imwatermark().WatermarkDecoder("bits", len(MARK))
    bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[..., ::-1])
    bits = np.asarray(decoder.decode(bgr, METHOD), dtype=bool)
    return int((bits == MARK).sum())


def chance_probability(matches: int, n: int = len(MARK)) -> float:
    """P(at least ``matches`` of ``n`` fair coin flips agree with the mark): the false-alarm odds of one try."""
    return sum(math.comb(n, k) for k in range(matches, n + 1)) / 2**n


@dataclass(frozen=True)
class Detection:
    """What :func:`detect` found: the best bit match and the size it was read at."""

    present: bool
    matches: int  # of ``bits``
    bits: int
    size: Optional[tuple[int, int]]  # (width, height) read at; None when too small to read
    rescaled: bool
    tried: int

    @property
    def accuracy(self) -> float:
        return self.matches / self.bits

    def describe(self) -> str:
        if self.size is None:
            return f"watermark: cannot be read, the image is smaller than {MIN_SIDE}x{MIN_SIDE}"
        where = f"at {self.size[0]}x{self.size[1]}" + (" (rescaled back)" if self.rescaled else "")
        if self.present:
            state = "intact" if self.matches == self.bits else "survived with bit errors"
            return (f"watermark: present, {state}: {self.matches}/{self.bits} bits match {where} "
                    f"(chance of this by luck: {chance_probability(self.matches):.1e} per size tried)")
        return (f"watermark: absent (best {self.matches}/{self.bits} bits match over {self.tried} sizes tried; "
                f"chance level is {self.bits // 2}, detection needs {THRESHOLD})")


def candidate_sizes(width: int, height: int, record_size: Optional[tuple[int, int]] = None) -> list[tuple[int, int]]:
    """Sizes to read an image at: its own, its record's, then (for near-square images) square sizes of
    at least 256 that are multiples of 4 within 80%-125% of its side, nearest first."""
    sizes = [(width, height)]
    if record_size and tuple(record_size) not in sizes:
        sizes.append(tuple(record_size))
    if abs(width - height) <= max(2, 0.02 * max(width, height)):
        side = (width + height) / 2
        lo, hi = max(MIN_SIDE, math.ceil(0.8 * side / 4) * 4), int(1.25 * side) // 4 * 4
        for s in sorted(range(lo, hi + 1, 4), key=lambda s: abs(s - side)):
            if (s, s) not in sizes:
                sizes.append((s, s))
    return [s for s in sizes if not too_small(*s)]


def detect(image: Image.Image, record_size: Optional[tuple[int, int]] = None,
           sizes: Optional[Sequence[tuple[int, int]]] = None) -> Detection:
    """Look for the mark at each candidate size (stopping at the first detection)."""
    image = image.convert("RGB")
    sizes = list(sizes) if sizes is not None else candidate_sizes(image.width, image.height, record_size)
    best: Optional[Detection] = None
    for i, size in enumerate(sizes):
        rescaled = size != image.size
        view = image.resize(size, Image.BICUBIC) if rescaled else image
        matches = bit_matches(view)
        found = Detection(matches >= THRESHOLD, matches, len(MARK), size, rescaled, i + 1)
        if best is None or matches > best.matches:
            best = found
        if found.present:
            return found
    if best is None:
        return Detection(False, 0, len(MARK), None, False, 0)
    return Detection(False, best.matches, best.bits, best.size, best.rescaled, len(sizes))
