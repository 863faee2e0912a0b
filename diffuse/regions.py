"""Regional prompts: a prompt per box of the canvas, fused at every step (MultiDiffusion).

MultiDiffusion (Bar-Tal et al. 2023, "MultiDiffusion: Fusing Diffusion Paths for Controlled Image
Generation", Eq. 3-5) runs one denoising path per region prompt on the shared sample and sets each pixel
to the weighted average of the paths' updates there. Every sampler here updates x linearly in the
denoiser's output D within a step, so averaging the guided D estimates per pixel is the same fusion:

    D(x, sigma) = sum_r w_r * D_r(x, sigma),   sum_r w_r = 1 at every pixel,

where D_r is the denoiser guided by region r's prompt (classifier-free guidance, negative prompt and
corrections as for a plain image) and w_r is 1 inside its box, shared equally where boxes overlap. The
whole prompt covers the pixels that no box covers. Each region adds one guided denoiser call per step.

A region is written ``X0,Y0,X1,Y1=PROMPT`` with the box in fractions of the canvas, (0, 0) the top left:
``0,0,1,0.5=a red circle at the top``. :func:`plan_layout` makes the regions of a shapes-grammar prompt
of two objects ("a red circle above a blue square", "a red circle and a blue square"): the
layout-planning step of LLM-grounded diffusion (Lian et al. 2023), done by the grammar instead of a
language model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class Region:
    """A prompt for the part of the canvas inside ``box`` = (x0, y0, x1, y1), fractions of the width and height."""

    prompt: str
    box: Box

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        if not all(math.isfinite(v) and 0 <= v <= 1 for v in self.box) or not (x0 < x1 and y0 < y1):
            raise ValueError(f"region box {self.box} must be x0,y0,x1,y1 with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                             f"(fractions of the canvas, 0,0 at the top left)")
        if not self.prompt.strip():
            raise ValueError(f"the region {self.spec()} has an empty prompt; write X0,Y0,X1,Y1=PROMPT")

    def spec(self) -> str:
        """The ``X0,Y0,X1,Y1=PROMPT`` form (what :meth:`parse` reads)."""
        return ",".join(f"{v:g}" for v in self.box) + f"={self.prompt}"

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "box": list(self.box)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Region":
        return cls(d["prompt"], tuple(float(v) for v in d["box"]))  # type: ignore[arg-type]

    @classmethod
    def parse(cls, text: str) -> "Region":
        """'0,0,1,0.5=a red circle at the top' -> Region; a one-line ValueError for anything else."""
        box_text, sep, prompt = text.partition("=")
        values = box_text.split(",")
        try:
            box = tuple(float(v) for v in values)
        except ValueError:
            box = ()
        if not sep or len(box) != 4:
            raise ValueError(f"region {text!r} is not X0,Y0,X1,Y1=PROMPT (four fractions of the canvas, then the prompt), "
                             f"e.g. 0,0,1,0.5=a red circle at the top")
        return cls(prompt.strip(), box)  # type: ignore[arg-type]


def region_weights(boxes: Sequence[Box], side: int) -> torch.Tensor:
    """[1 + R, 1, 1, side, side] per-pixel weights: first the whole prompt's (where no box reaches), then each
    box's; they sum to 1 at every pixel. A pixel belongs to a box when its center lies inside it."""
    centers = (torch.arange(side, dtype=torch.float32) + 0.5) / side
    weights = torch.zeros(1 + len(boxes), side, side)
    for r, (x0, y0, x1, y1) in enumerate(boxes, start=1):
        rows = ((centers >= y0) & (centers < y1)).float()
        cols = ((centers >= x0) & (centers < x1)).float()
        weights[r] = rows[:, None] * cols[None, :]
        if not weights[r].any():
            raise ValueError(f"region box {boxes[r - 1]} covers no pixel center of the {side}x{side} canvas the model "
                             f"samples; make it larger")
    covered = weights[1:].sum(0)
    weights[0] = (covered == 0).float()
    return (weights / weights.sum(0).clamp(min=1))[:, None, None]


class RegionDenoiser:
    """The per-pixel weighted sum of several (denoiser, cond) paths: D(x, sigma) = sum_r w_r D_r(x, sigma, cond_r).

    ``weights`` [P, 1, 1, H, W] (:func:`region_weights`); a path whose weight is zero everywhere is never called.
    The sampler's own ``cond`` is unused (each path carries its own)."""

    def __init__(self, paths: Sequence[tuple[Callable, Any]], weights: torch.Tensor):
        if len(paths) != len(weights):
            raise ValueError(f"{len(paths)} denoisers for {len(weights)} weight maps")
        self.parts = [(w, d, c) for (d, c), w in zip(paths, weights) if bool(w.any())]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        out = None
        for w, denoiser, c in self.parts:
            term = w.to(x.device, x.dtype) * denoiser(x, sigma, c)
            out = term if out is None else out + term
        return out


# the halves of the canvas that satisfy each relation for (first object, second object), and the place phrase
# (shapes.CELL_PHRASES index) that tells the model to draw there. The phrases were picked on the first 60
# position prompts of shapes.eval_prompts with the shipped `shapes` (bench/RESULTS.md, "A layout for the
# relation words"): corners, which that model places best, beat "at the top" / "on the left" (29 vs 25 of 33
# above/below prompts; 21 vs 8 of 27 left/right ones).
RELATION_LAYOUT: dict[str, tuple[tuple[Box, int], tuple[Box, int]]] = {
    "above": (((0, 0, 1, 0.5), 2), ((0, 0.5, 1, 1), 8)),  # at the top right / at the bottom right
    "below": (((0, 0.5, 1, 1), 8), ((0, 0, 1, 0.5), 2)),
    "to the left of": (((0, 0, 0.5, 1), 6), ((0.5, 0, 1, 1), 2)),  # at the bottom left / at the top right
    "to the right of": (((0.5, 0, 1, 1), 2), ((0, 0, 0.5, 1), 6)),
}


def plan_layout(prompt: str) -> list[Region]:
    """Two regions for a shapes-grammar prompt of two single objects, related or joined by "and":
    "a red circle above a blue square" -> [0,0,1,0.5=a red circle at the top right, 0,0.5,1,1=a blue square at
    the bottom right]; "A and B" is laid out as "A above B". The halves cover the canvas, so the whole prompt
    itself is not sampled. A one-line ValueError for any other prompt (:func:`planned` returns [] instead)."""
    from . import shapes

    try:
        spec = shapes.parse_prompt(prompt)
    except ValueError:
        spec = None
    if spec is None or len(spec.objects) != 2 or any(o.cell is not None or o.count != 1 for o in spec.objects):
        raise ValueError(f"cannot plan a layout for {prompt!r}: planning takes two single objects of the shapes world "
                         f"without places, e.g. \"a red circle above a blue square\" or \"a red circle and a blue square\"")
    return [Region(shapes.noun_phrase(1, o.shape, o.color, o.size, cell), box)
            for o, (box, cell) in zip(spec.objects, RELATION_LAYOUT[spec.relation or "above"])]


def planned(prompt: Optional[str]) -> list[Region]:
    """:func:`plan_layout`'s regions where the prompt can be planned, else [] (plain sampling)."""
    try:
        return plan_layout(prompt or "")
    except ValueError:
        return []
