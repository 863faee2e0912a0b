"""Inpainting masks and the extra input of an inpainting model.

Convention (the ecosystem's): mask 1 (white) = replace, 0 (black) = keep.

An *inpainting model* (``ModelConfig.inpainting``) sees, besides the noisy x, ``cond['concat']`` =
[mask, masked image] stacked on channels in model space (1 + C channels), the layout of Stable
Diffusion's inpainting U-Nets (Rombach et al. 2022, Sec. 4.5; their checkpoint's 9 input channels are
4 latent + 1 mask + 4 masked-image latent):

* the masked image is the input with every replaced pixel set to 0 (mid-gray in [-1, 1]), taken to
  model space by the model's codec (identity for a pixel model, the VAE encoder for a latent one);
* the mask goes to model space by max-pooling over each cell (a cell counts as replaced if any of its
  pixels is; for a binary mask that is the area average thresholded at > 0).

Training draws masks with :func:`training_masks`: a quarter of them replace everything (so the
model still generates from a prompt alone, as SD-inpainting was trained), the rest are 1-3 rectangles
or 1-3 thick brush strokes. Generating with an inpainting model and no picture uses that "replace
everything" input (:func:`replace_all`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from PIL import Image

    from .codec import Codec

P_FULL, P_BOXES = 0.25, 0.5  # shares of "replace everything" and rectangle masks; the rest are brush strokes
BOX_SIDE = (0.15, 0.6)  # a rectangle's sides, as fractions of the image side
STROKE_WIDTH = (0.06, 0.15)  # a brush stroke's width, as a fraction of the image side


def model_space_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel mask [B, 1, H, W] -> model space [B, 1, H/f, W/f]: each cell's largest replace weight
    (for a binary mask: area average thresholded at > 0), so a cell is kept only if all its pixels are."""
    return mask if factor == 1 else F.max_pool2d(mask, factor)


def inpaint_concat(codec: "Codec", pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """An inpainting model's ``cond['concat']`` [B, 1 + C, H/f, W/f]: the binary model-space mask, then the
    pixels [B, C_pix, H, W] (in [-1, 1]) with every pixel the mask [B, 1, H, W] touches (> 0) set to 0, encoded."""
    replaced = (mask > 0).to(pixels.dtype)
    masked = codec.encode(pixels * (1 - replaced))
    return torch.cat([model_space_mask(replaced, codec.factor).to(masked.dtype), masked], dim=1)


def replace_all(codec: "Codec", batch: int, side: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The concat input that replaces everything (pixel side ``side``): plain generation with an inpainting model."""
    pixels = torch.zeros(batch, codec.image_channels, side, side, device=device)
    return inpaint_concat(codec, pixels, torch.ones(batch, 1, side, side, device=device))


def concat_without_picture(inpainting: bool, codec: "Codec", batch: int, side: int,
                           device: torch.device | str = "cpu") -> Optional[torch.Tensor]:
    """``cond['concat']`` when there is no picture to keep: :func:`replace_all` for an inpainting model, None otherwise."""
    return replace_all(codec, batch, side, device) if inpainting else None


def _uniform(gen: torch.Generator, lo: float = 0.0, hi: float = 1.0) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=gen))


def _drawn(size: int, gen: torch.Generator, boxes: bool) -> "Image.Image":
    """1-3 filled rectangles (``boxes``) or 1-3 thick brush strokes on a black canvas, drawn from ``gen``."""
    from PIL import Image, ImageDraw  # training only: generating never loads PIL's drawing modules

    canvas = Image.new("L", (size, size))
    draw = ImageDraw.Draw(canvas)
    for _ in range(1 + int(torch.randint(3, (), generator=gen))):
        if boxes:
            w, h = (max(1, round(_uniform(gen, *BOX_SIDE) * size)) for _ in range(2))
            x, y = int(torch.randint(size - w + 1, (), generator=gen)), int(torch.randint(size - h + 1, (), generator=gen))
            draw.rectangle([x, y, x + w - 1, y + h - 1], fill=255)
        else:
            width = max(1, round(_uniform(gen, *STROKE_WIDTH) * size))
            points = [(_uniform(gen) * size, _uniform(gen) * size) for _ in range(2 + int(torch.randint(4, (), generator=gen)))]
            draw.line(points, fill=255, width=width, joint="curve")
    return canvas


def training_masks(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``n`` random binary masks [n, 1, size, size] (1 = replace), drawn from ``gen``: replace everything with
    probability P_FULL, else 1-3 rectangles (probability P_BOXES) or 1-3 brush strokes. Every mask replaces something."""
    out = torch.zeros(n, 1, size, size)
    for i in range(n):
        kind = _uniform(gen)
        if kind < P_FULL:
            out[i] = 1
            continue
        drawn = _drawn(size, gen, boxes=kind < P_FULL + P_BOXES)
        out[i, 0] = torch.frombuffer(bytearray(drawn.tobytes()), dtype=torch.uint8).reshape(size, size).float() / 255
        if not out[i].any():  # a stroke can miss a tiny canvas: fall back to one pixel's worth of hole
            out[i, 0, size // 2, size // 2] = 1
    return (out > 0.5).float()
