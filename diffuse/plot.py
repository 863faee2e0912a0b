"""Small PNG figures drawn with Pillow (no plotting library): image grids and line charts."""

from __future__ import annotations

import math
from pathlib import Path
from typing import BinaryIO, Sequence

import numpy as np
import torch
from PIL import Image

PALETTE = [(0, 0, 0), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75), (31, 119, 180), (227, 119, 194)]


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Images [B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C] (C = 1 or 3)."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: np.ndarray, columns: int = 0, scale: int = 1, pad: int = 1) -> Image.Image:
    """Tile uint8 images [B, H, W, C] into one RGB picture (upscaled by ``scale``, nearest),
    separated by ``pad`` gray pixels so black-background tiles stay apart."""
    b, h, w, c = images.shape
    cols = columns or math.ceil(math.sqrt(b))
    rows = math.ceil(b / cols)
    hs, ws = h * scale, w * scale
    grid = np.full((rows * (hs + pad) - pad, cols * (ws + pad) - pad, c), 96, dtype=np.uint8)
    for i in range(b):
        r, k = divmod(i, cols)
        tile = images[i].repeat(scale, axis=0).repeat(scale, axis=1)
        grid[r * (hs + pad):r * (hs + pad) + hs, k * (ws + pad):k * (ws + pad) + ws] = tile
    return Image.fromarray(grid[..., 0] if c == 1 else grid).convert("RGB")


def line_chart(series: dict[str, Sequence[tuple[float, float]]], path: "Path | BinaryIO", *, title: str = "", log_y: bool = True,
               size: tuple[int, int] = (640, 360)) -> None:
    """Draw named (x, y) series as a line chart PNG (log y axis by default)."""
    from PIL import ImageDraw  # loads FreeType: only charts need it, not `diffuse generate`

    width, height = size
    margin_l, margin_r, margin_t, margin_b = 60, 150, 28, 30
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    points = [(x, y) for s in series.values() for x, y in s if math.isfinite(y) and (y > 0 or not log_y)]
    if not points:
        img.save(path, format="PNG")
        return
    fy = (lambda v: math.log10(v)) if log_y else (lambda v: v)
    xs, ys = [p[0] for p in points], [fy(p[1]) for p in points]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x: float, y: float) -> tuple[float, float]:
        return (margin_l + (x - x0) / (x1 - x0) * (width - margin_l - margin_r),
                height - margin_b - (fy(y) - y0) / (y1 - y0) * (height - margin_t - margin_b))

    draw.rectangle([margin_l, margin_t, width - margin_r, height - margin_b], outline="black")
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        label = f"{10 ** yv:.3g}" if log_y else f"{yv:.3g}"
        ypix = height - margin_b - frac * (height - margin_t - margin_b)
        draw.text((4, ypix - 6), label, fill="black")
        xv = x0 + frac * (x1 - x0)
        draw.text((margin_l + frac * (width - margin_l - margin_r) - 10, height - margin_b + 6), f"{xv:.6g}", fill="black")
    draw.text((margin_l, 8), title, fill="black")
    for i, (name, s) in reversed(list(enumerate(series.items()))):  # the first series is drawn last, on top
        color = PALETTE[i % len(PALETTE)]
        pts = [px(x, y) for x, y in s if math.isfinite(y) and (y > 0 or not log_y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=3 if i == 0 else 1)
        draw.text((width - margin_r + 8, margin_t + 14 * i), name, fill=color)
    img.save(path, format="PNG")
