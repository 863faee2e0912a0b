"""Regional prompts: a prompt per box of the canvas, fused at every step (MultiDiffusion).

MultiDiffusion (Bar-Tal et al. 2023, "MultiDiffusion: Fusing Diffusion Paths for Controlled Image
Generation", Eq. 3-5) runs one denoising path per region prompt on the shared sample and sets each pixel
to the weighted average of the paths' updates there. Every sampler here updates x linearly in the
denoiser's output D within a step, so averaging the guided D estimates per pixel is the same fusion:

    D(x, sigma) = sum_r w_r * D_r(x, sigma),   sum_r w_r = 1 at every pixel,

where D_r is the denoiser guided by region r's prompt (classifier-free guidance, negative prompt and
corrections as for a plain image) and w_r is 1 inside its box, shared equally where boxes overlap. The
whole prompt covers the pixels that no box covers. All regions' paths run in one guided denoiser call per
step (a batch of regions x images), beside the whole prompt's where it is needed.

Shared or isolated paths. By default every path sees the whole shared sample (MultiDiffusion). With a
background color, each region's path sees only its own box: outside it, the path's input is the
background noised to the current sigma with a fixed noise of its own, ``x_r = m_r x + (1 - m_r)(b +
sigma n_r)``, and pixels that no box covers take the background itself (D = b) instead of the whole
prompt. A path then cannot mistake another region's object for its own: four regions asking for "a green
circle" draw four circles, where shared paths draw one or two (bench/RESULTS.md, "Isolated region paths").

A region is written ``X0,Y0,X1,Y1=PROMPT`` with the box in fractions of the canvas, (0, 0) the top left:
``0,0,1,0.5=a red circle at the top``. :func:`plan_layout` makes the layout of a shapes-grammar prompt
(two objects and their relation, a count of objects, one object) on the shapes world's
black background: the layout-planning step of LLM-grounded diffusion (Lian et al. 2023), done by the
grammar instead of a language model.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

Box = tuple[float, float, float, float]
Color = tuple[int, int, int]  # RGB, 0-255

COLOR_NAMES: dict[str, Color] = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}


class LayoutError(ValueError):
    """A layout argument that cannot be used; ``field`` names it (``regions``, ``region_background`` or
    ``plan_layout``), so that a server can answer for that field."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@contextlib.contextmanager
def blame(field: str) -> Iterator[None]:
    """Re-raise a ValueError of the checks inside as a :class:`LayoutError` naming ``field``."""
    try:
        yield
    except LayoutError:
        raise
    except ValueError as e:
        raise LayoutError(field, str(e)) from None


def parse_color(text: str) -> Color:
    """'black', '#rrggbb' or 'R,G,B' (0-255) -> (R, G, B); a one-line ValueError for anything else."""
    t = text.strip().lower()
    if t in COLOR_NAMES:
        return COLOR_NAMES[t]
    try:
        if t.startswith("#") and len(t) == 7:
            rgb = tuple(int(t[i:i + 2], 16) for i in (1, 3, 5))
        else:
            rgb = tuple(int(v) for v in t.split(","))
    except ValueError:
        rgb = ()
    if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
        raise ValueError(f"color {text!r} is not {', '.join(COLOR_NAMES)}, #rrggbb or R,G,B with values 0-255")
    return rgb  # type: ignore[return-value]


@dataclass(frozen=True)
class Region:
    """A prompt for the part of the canvas inside ``box`` = (x0, y0, x1, y1), fractions of the width and height.

    ``mirror`` and ``shift`` set the frame the region's path draws in: the path denoises its input mirrored
    left-right (``mirror``) and then moved by ``shift`` = (right, down), fractions of the width and height
    (wrapping around), and its output is moved back, so ``prompt`` describes the object where the path draws
    it. :func:`plan_layout` uses this to draw every object at the top right, where the model draws best."""

    prompt: str
    box: Box
    mirror: bool = False
    shift: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        x0, y0, x1, y1 = self.box
        if not all(math.isfinite(v) and 0 <= v <= 1 for v in self.box) or not (x0 < x1 and y0 < y1):
            raise ValueError(f"region box {self.box} must be x0,y0,x1,y1 with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                             f"(fractions of the canvas, 0,0 at the top left)")
        if not self.prompt.strip():
            raise ValueError(f"the region {self.spec()} has an empty prompt; write X0,Y0,X1,Y1=PROMPT")
        if len(self.shift) != 2 or not all(math.isfinite(v) and -1 < v < 1 for v in self.shift):
            raise ValueError(f"the region {self.spec()} has shift {self.shift}; give (right, down) as fractions of the "
                             f"canvas in (-1, 1)")

    def spec(self) -> str:
        """The ``X0,Y0,X1,Y1=PROMPT`` form (what :meth:`parse` reads; it has no frame)."""
        return ",".join(f"{v:g}" for v in self.box) + f"={self.prompt}"

    def to_dict(self) -> dict[str, Any]:
        frame = {"mirror": True} if self.mirror else {}
        return {"prompt": self.prompt, "box": list(self.box), **frame, **({"shift": list(self.shift)} if any(self.shift) else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Region":
        return cls(d["prompt"], tuple(float(v) for v in d["box"]), bool(d.get("mirror", False)),  # type: ignore[arg-type]
                   tuple(float(v) for v in d.get("shift", (0.0, 0.0))))  # type: ignore[arg-type]

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


@dataclass(frozen=True)
class Frames:
    """The frame each image of a region path's batch draws in (:class:`Region`'s ``mirror`` and ``shift``, the
    shift (right, down) in pixels of the model's square canvas)."""

    mirror: torch.Tensor  # [B] bool
    shift: tuple[tuple[int, int], ...]

    @classmethod
    def of(cls, regions: Sequence[Optional[Region]], side: int) -> Optional["Frames"]:
        """The frames of the regions (None: no region there, the canvas itself); None when all are the canvas."""
        mirror = torch.tensor([r is not None and r.mirror for r in regions])
        shift = tuple((round(r.shift[0] * side), round(r.shift[1] * side)) if r is not None else (0, 0) for r in regions)
        return cls(mirror, shift) if bool(mirror.any()) or any(any(s) for s in shift) else None

    def _roll(self, x: torch.Tensor, sign: int) -> torch.Tensor:
        if not any(any(s) for s in self.shift):
            return x
        return torch.stack([xi.roll((sign * dy, sign * dx), dims=(-2, -1)) for xi, (dx, dy) in zip(x, self.shift)])

    def _mirror(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mirror.to(x.device)[:, None, None, None], x.flip(-1), x)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """The canvas [B, C, H, W] as the paths see it."""
        return self._roll(self._mirror(x), 1)

    def leave(self, y: torch.Tensor) -> torch.Tensor:
        """A path's output back on the canvas (the inverse of :meth:`enter`)."""
        return self._mirror(self._roll(y, -1))


@dataclass(frozen=True)
class Layout:
    """One image's regions and, when ``background`` is set, the color their isolated paths are drawn over
    (no background: shared paths, the whole prompt where no box reaches)."""

    regions: tuple[Region, ...] = ()
    background: Optional[Color] = None

    def to_record(self) -> dict[str, Any]:
        return {"regions": [r.to_dict() for r in self.regions],
                "region_background": list(self.background) if self.background is not None else None}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> "Layout":
        background = record.get("region_background")
        return cls(tuple(Region.from_dict(r) for r in record.get("regions") or []),
                   tuple(int(v) for v in background) if background is not None else None)  # type: ignore[arg-type]


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
    """The per-pixel weighted sum of the whole prompt's path and the region paths:
    D(x, sigma) = w_0 D_0(x, sigma, cond_0) + sum_r w_r D_R(x_r, sigma, cond_R[r]).

    ``weights`` [1 + R, B, 1, H, W] (:func:`region_weights` per image); ``whole`` = (denoiser, cond) for the B
    images' whole prompts; ``regions`` = (denoiser, cond) for R * B virtual images, region r of image i at
    r * B + i, all R paths evaluated in one call. ``background`` [B, C, H, W] (model space) and ``isolated`` [B]
    bool: for an isolated image, region path r sees x_r = m_r x + (1 - m_r)(background + sigma n_r) with m_r its
    box and n_r = ``outside_noise`` [R * B, C, H, W] at r * B + i, and path 0 gives the background itself; other
    images' paths see x. ``frames`` (R * B): the frame each region path draws in. Path 0 is never called where
    its weight is zero everywhere. The sampler's own ``cond`` is unused (each path carries its own)."""

    def __init__(self, whole: tuple[Callable, Any], regions: tuple[Callable, Any], weights: torch.Tensor, *,
                 background: Optional[torch.Tensor] = None, isolated: Optional[torch.Tensor] = None,
                 outside_noise: Optional[torch.Tensor] = None, frames: Optional[Frames] = None):
        self.n_regions, batch = len(weights) - 1, weights.shape[1]
        if self.n_regions < 1:
            raise ValueError("a region denoiser needs at least one region")
        if frames is not None and len(frames.shift) != self.n_regions * batch:
            raise ValueError(f"frames for {len(frames.shift)} paths, not {self.n_regions} regions x {batch} images")
        self.isolated = isolated if isolated is not None and bool(isolated.any()) else None
        if self.isolated is not None and (background is None or outside_noise is None
                                          or len(outside_noise) != self.n_regions * batch):
            raise ValueError("isolated region paths need a background and an outside noise per region and image")
        self.background, self.frames, self.regions = background, frames, regions
        # what each region path sees outside its box: the background, repeated for the R paths once, not per step
        self.background_paths = background.repeat(self.n_regions, 1, 1, 1) if self.isolated is not None else None
        iso = self.isolated.float()[:, None, None, None] if self.isolated is not None else None
        # path 0 runs only where a shared image gives it weight; an isolated image takes the background there
        shared0 = weights[0] if iso is None else weights[0] * (1 - iso)
        self.whole = (weights[0], *whole) if bool(weights[0].any()) else None
        self.whole_needed = bool(shared0.any())
        self.weights = weights[1:]  # [R, B, 1, H, W]
        # [R * B, 1, H, W]: 1 where a region path sees the background instead of x; None when no image is isolated
        self.outside = (iso * (self.weights == 0).float()).flatten(0, 1) if iso is not None else None
        self.outside_noise = outside_noise

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        out = torch.zeros_like(x)
        if self.whole is not None:
            w, denoiser, c = self.whole
            if not self.whole_needed:  # every image weighting path 0 is isolated: it is the background there
                d = self.background.to(x)
            else:
                d = denoiser(x, sigma, c)
                if self.isolated is not None:
                    d = torch.where(self.isolated[:, None, None, None].to(x.device), self.background.to(x), d)
            out = out + w.to(x) * d
        r = self.n_regions
        sigmas = torch.as_tensor(sigma, device=x.device, dtype=x.dtype).reshape(-1).expand(len(x)).repeat(r)
        xin = x.repeat(r, 1, 1, 1)
        if self.outside is not None:
            outside_in = self.background_paths.to(x) + sigmas[:, None, None, None] * self.outside_noise.to(x)
            xin = torch.lerp(xin, outside_in, self.outside.to(x))
        denoiser, c = self.regions
        if self.frames is None:
            d = denoiser(xin, sigmas, c)
        else:
            d = self.frames.leave(denoiser(self.frames.enter(xin), sigmas, c))
        return out + (self.weights.to(x) * d.unflatten(0, (r, len(x)))).sum(0)


# the halves of the canvas that satisfy each relation for (first object, second object); a pair joined by "and"
# is laid out as "above". Each object's free coordinate (its column in a half of the full width, its row in a
# half of the full height) comes from the seed.
RELATION_HALVES: dict[str, tuple[Box, Box]] = {
    "above": ((0, 0, 1, 0.5), (0, 0.5, 1, 1)),
    "below": ((0, 0.5, 1, 1), (0, 0, 1, 0.5)),
    "to the left of": ((0, 0, 0.5, 1), (0.5, 0, 1, 1)),
    "to the right of": ((0.5, 0, 1, 1), (0, 0, 0.5, 1)),
}
# counting: the quadrants, each with its corner cell; 2 or 3 objects take a subset picked by the seed
QUADRANTS: tuple[tuple[Box, int], ...] = (((0, 0, 0.5, 0.5), 0), ((0.5, 0, 1, 0.5), 2), ((0, 0.5, 0.5, 1), 6),
                                          ((0.5, 0.5, 1, 1), 8))
CELL_REGION_MARGIN = 0.05  # a named cell's region reaches this far (canvas fractions) past the cell
SHAPES_BACKGROUND: Color = (0, 0, 0)  # the shapes world's canvas


def cell_box(cell: int) -> Box:
    """The box of 3x3 grid cell ``cell`` (row-major, 0 at the top left), ``CELL_REGION_MARGIN`` wider on each side."""
    row, col = divmod(cell, 3)
    return (max(0.0, col / 3 - CELL_REGION_MARGIN), max(0.0, row / 3 - CELL_REGION_MARGIN),
            min(1.0, (col + 1) / 3 + CELL_REGION_MARGIN), min(1.0, (row + 1) / 3 + CELL_REGION_MARGIN))


DRAW_CELL = 2  # the grid cell (the top right) in which the shipped shapes model draws a named object best


def _drawn(box: Box, cell: int, shape: str, color: Optional[str], size: Optional[str]) -> Region:
    """The region ``box`` for one object in grid ``cell``, drawn in the top-right cell (``DRAW_CELL``) and moved
    into place. The shipped `shapes` model places a named object in the right column far better than in the
    others (isolated cell regions, 30 colored prompts per cell: top right 30, on the right 29, bottom right 27;
    top left 21, on the left 13, bottom left 19; top 24, center 15, bottom 28), and draws an object without a
    color only in the top row ("a square" in the middle or bottom row of the right column: nothing, 12 seeds of 12;
    bench/RESULTS.md, "Drawing every object at the top right"). A left-column object is drawn mirrored left-right, which is exact in
    this world (every shape is mirror-symmetric and the mirror of "left" is "right"); a middle-column one one
    column to the right (``box`` is a cell's or spans the width); it is moved up by its row (``box`` is a cell's or
    spans the height), or a box of half the height to the top of the canvas. The moves wrap around the canvas and
    are exact but for rounding to whole pixels (a cell is a third of the canvas)."""
    from . import shapes

    row, col = divmod(cell, 3)
    up = box[1] if 0.5 <= box[3] - box[1] < 1 else row / 3
    return Region(shapes.noun_phrase(1, shape, color, size, DRAW_CELL), box, mirror=col == 0,
                  shift=(1 / 3 if col == 1 else 0.0, -up))


def plan_layout(prompt: str, seed: int = 0) -> Layout:
    """The layout of a shapes-grammar prompt, isolated over the black canvas; what the prompt leaves free comes
    from ``seed``, so that seeds vary the layout:

    - two single objects, related or joined by "and": a half each ("a red circle above a blue square" -> the top
      half for the red circle, the bottom half for the blue square; "A and B" is laid out as "A above B"), the
      first object in column (or row, for left / right) ``seed % 3`` of its half, the second in ``seed // 3 % 3``;
    - a count of 2-4 objects: one object per quadrant, 2 or 3 of the four quadrants picked by the seed;
    - one object in a named cell: that cell (a little wider) alone, black elsewhere;
    - one object with no place: the same in cell ``seed % 9`` (row-major from the top left), so that seeds 0-8
      put it in every cell.

    Every object is drawn at the top right, mirrored and moved into place (:func:`_drawn`).
    A one-line ValueError for any other prompt (:func:`planned` returns an empty layout instead)."""
    from . import shapes

    try:
        spec = shapes.parse_prompt(prompt)
    except ValueError:
        spec = None
    objects = spec.objects if spec is not None else ()
    plan: list[tuple[shapes.ObjectSpec, Box, int]] = []
    if len(objects) == 2 and all(o.cell is None and o.count == 1 for o in objects):
        for o, box, free in zip(objects, RELATION_HALVES[spec.relation or "above"], (seed % 3, seed // 3 % 3)):
            across = box[2] - box[0] == 1  # a half of the full width: the column is free, else the row
            cell = (2 if box[1] else 0) * 3 + free if across else free * 3 + (2 if box[0] else 0)
            plan.append((o, box, cell))
    elif len(objects) == 1 and objects[0].cell is None and objects[0].count in (2, 3, 4):
        subsets = list(itertools.combinations(QUADRANTS, objects[0].count))
        plan = [(objects[0], box, cell) for box, cell in subsets[seed % len(subsets)]]
    elif len(objects) == 1 and objects[0].count == 1:
        cell = objects[0].cell if objects[0].cell is not None else seed % 9
        plan = [(objects[0], cell_box(cell), cell)]
    if not plan:
        raise ValueError(f"cannot plan a layout for {prompt!r}: planning takes a shapes-world prompt of two single objects "
                         f"(\"a red circle above a blue square\"), 2-4 objects (\"three red circles\") or one object "
                         f"(\"a red circle\", \"a red circle at the top left\")")
    return Layout(tuple(_drawn(box, cell, o.shape, o.color, o.size) for o, box, cell in plan), SHAPES_BACKGROUND)


def planned(prompt: Optional[str], seed: int = 0) -> Layout:
    """:func:`plan_layout`'s layout where the prompt can be planned, else an empty one (plain sampling)."""
    try:
        return plan_layout(prompt or "", seed)
    except ValueError:
        return Layout()
