"""Exact prompt-adherence scoring for the shapes world (GenEval-style, Ghosh et al. 2023).

Detection, for a uint8 image [H, W, 3] of any size:

1. Color: each pixel gets the palette color whose direction in RGB is closest (largest
   projection onto the unit color vector) and an opacity alpha = projection / |color|.
   Anti-aliasing and blur only scale a color toward black, so edges keep their color.
2. Objects: 8-connected components of pixels with alpha > ``ALPHA_THRESHOLD``. A component's
   color is its alpha-weighted majority color (None when that majority is below
   ``MIN_PURITY``); components with a soft area below ``MIN_AREA_FRACTION`` of the smallest
   object are noise and dropped.
3. Shape: the blur-invariant complex moments m3, m4 of the soft alpha map (component grown
   by one pixel) pick the nearest of circle, square and triangle; the pick stands if it is
   within ``MOMENT_TOLERANCE`` and a template of that shape with the same area and
   centroid reaches soft IoU ``MIN_SHAPE_IOU`` (else shape None: not a shape of this world).
4. Size from the template extent (threshold at the geometric mean of small and large);
   cell from the template center.

Verdict rules: every object kind in the prompt must appear exactly ``count`` times (a
detection matches a kind when shape, and color/size/cell where given, agree); a relation
must hold between the two objects. Objects of other kinds are allowed, as in GenEval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from diffuse.shapes import (COLORS, PALETTE, SHAPES, SIZE_EXTENT, ObjectSpec, noun_phrase, parse_prompt,
                            relation_holds)

ALPHA_THRESHOLD = 0.3
MIN_PURITY = 0.6
MIN_AREA_FRACTION = 0.3
MIN_SHAPE_IOU = 0.5
MOMENT_TOLERANCE = 0.75  # accepted moment distance, as a fraction of the distance to the nearest other shape
SIZE_THRESHOLD = math.sqrt(SIZE_EXTENT["small"] * SIZE_EXTENT["large"])  # canvas units
TEMPLATE_SUPERSAMPLE = 4
# Area of each shape with extent d is AREA_FACTOR * d^2 (triangle: base = height = d).
AREA_FACTOR = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}
_COLOR_VECTORS = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # [8, 3]
_COLOR_NORMS = np.linalg.norm(_COLOR_VECTORS, axis=1)  # [8]


@dataclass(frozen=True)
class Detection:
    """One detected object; center (cx, cy), extent and area in canvas units."""

    shape: str | None
    color: str | None
    size: str
    cell: int
    cx: float
    cy: float
    extent: float
    area: float
    fit: float  # soft IoU with the chosen shape template


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    detections: tuple[Detection, ...]


# ---------------------------------------------------------------------------- detection


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"{type(image).__name__} {getattr(image, 'dtype', '')} {getattr(image, 'shape', '')}"
        raise ValueError(f"expected a uint8 numpy image [H, W, 3], got {desc}")
    return image.astype(np.float32)


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components: labels [H, W] (0 = off, 1..n in row-major order of first pixel), n.

    Every pixel takes the smallest pixel index among its neighbors, then jumps to the label
    of that pixel (pointer jumping), until nothing changes.
    """
    h, w = mask.shape
    none = h * w
    index = np.arange(h * w).reshape(h, w)
    labels = np.where(mask, index, none)
    padded = np.full((h + 2, w + 2), none)
    while True:
        padded[1:-1, 1:-1] = labels
        new = labels.copy()
        for dy in range(3):
            for dx in range(3):
                np.minimum(new, padded[dy:dy + h, dx:dx + w], out=new)
        new[~mask] = none
        new = np.append(new.ravel(), none)[new]
        if np.array_equal(new, labels):
            break
        labels = new
    roots = np.flatnonzero(labels == index)  # one pixel per component, sorted
    dense = np.zeros((h, w), dtype=np.int64)
    dense[mask] = np.searchsorted(roots, labels[mask]) + 1
    return dense, len(roots)


def _template(shape: str, cx: float, cy: float, d: float, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """Pixel coverage [len(ys), len(xs)] of a shape with center (cx, cy), extent d (pixels)."""
    k = TEMPLATE_SUPERSAMPLE
    sub = (np.arange(k) + 0.5) / k
    y = (ys[:, None] + sub[None]).reshape(-1, 1)  # [Y*k, 1] subpixel centers
    x = (xs[:, None] + sub[None]).reshape(1, -1)  # [1, X*k]
    if shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= (d / 2) ** 2
    elif shape == "square":
        inside = (np.abs(x - cx) <= d / 2) & (np.abs(y - cy) <= d / 2)
    else:  # apex at the top, half-width grows by 1/2 per unit of depth
        depth = y - (cy - d / 2)
        inside = (depth >= 0) & (depth <= d) & (np.abs(x - cx) <= depth / 2)
    return inside.reshape(len(ys), k, len(xs), k).mean((1, 3))


def _moments(alpha: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[complex, float, np.ndarray]:
    """Centroid x + iy, area and the scale-free complex moments (m3, m4) as 4 reals.

    m_k = sum alpha (z - centroid)^k / area^(1 + k/2) with z = x + iy. These moments are
    unchanged by an isotropic Gaussian blur (E[w^k] = 0 for a circular complex Gaussian w),
    so they tell a blurred square (m4 = -1/60) from a circle (m4 = 0) and a triangle (m3 != 0).
    """
    area = float(alpha.sum())
    z = (xs[None, :] + 0.5) + 1j * (ys[:, None] + 0.5)  # pixel centers
    centroid = (alpha * z).sum() / area
    dz = z - centroid
    m3 = (alpha * dz**3).sum() / area**2.5
    m4 = (alpha * dz**4).sum() / area**3
    return centroid, area, np.array([m3.real, m3.imag, m4.real, m4.imag])


def _reference_moments() -> dict[str, np.ndarray]:
    grid = np.arange(96.0)
    return {s: _moments(_template(s, 48.0, 48.0, 64.0, grid, grid), grid, grid)[2] for s in SHAPES}


_REFERENCE = _reference_moments()
_TOLERANCE = {s: MOMENT_TOLERANCE * min(float(np.linalg.norm(r - q)) for t, q in _REFERENCE.items() if t != s)
              for s, r in _REFERENCE.items()}


def _fit_shape(alpha: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> tuple[str | None, float, float, float, float]:
    """Classify a soft alpha patch: (shape or None, template IoU, center x, center y, extent), pixels.

    The shape is the one with the nearest reference moments; it is None when those moments
    are further than ``MOMENT_TOLERANCE`` times the distance between that reference and the
    nearest other one (a diamond is not a circle), or the template of that shape with the same area
    and centroid overlaps the patch by less than ``MIN_SHAPE_IOU``.
    """
    centroid, area, m = _moments(alpha, ys, xs)
    dist = {s: float(np.linalg.norm(m - ref)) for s, ref in _REFERENCE.items()}
    shape = min(dist, key=dist.get)
    d = math.sqrt(area / AREA_FACTOR[shape])
    cx, cy = centroid.real, centroid.imag - (d / 6 if shape == "triangle" else 0.0)  # triangle centroid: d/6 low
    t = _template(shape, cx, cy, d, ys, xs)
    iou = float(np.minimum(t, alpha).sum() / np.maximum(t, alpha).sum())
    ok = dist[shape] <= _TOLERANCE[shape] and iou >= MIN_SHAPE_IOU
    return shape if ok else None, iou, cx, cy, d


def detect(image: np.ndarray) -> list[Detection]:
    """Objects in a uint8 image [H, W, 3], in order of first pixel (row-major)."""
    pixels = _check_image(image)
    h, w, _ = pixels.shape
    proj = pixels @ (_COLOR_VECTORS / _COLOR_NORMS[:, None]).T  # [H, W, 8]
    color_idx = proj.argmax(-1)  # [H, W]
    alpha_best = np.take_along_axis(proj, color_idx[..., None], -1)[..., 0] / _COLOR_NORMS[color_idx]
    labels, n = _components(alpha_best > ALPHA_THRESHOLD)
    min_area = MIN_AREA_FRACTION * AREA_FACTOR["triangle"] * SIZE_EXTENT["small"] ** 2 * h * w
    out = []
    for k in range(1, n + 1):
        comp = labels == k
        votes = np.bincount(color_idx[comp], weights=alpha_best[comp], minlength=len(COLORS))
        c = int(votes.argmax())
        # Soft alpha of the component's color on the component grown by one pixel (not into others).
        rows, cols = np.nonzero(comp)
        r0, c0 = max(0, int(rows.min()) - 2), max(0, int(cols.min()) - 2)
        r1, c1 = int(rows.max()) + 3, int(cols.max()) + 3
        patch = comp[r0:r1, c0:c1]
        grown = np.pad(patch, 1)
        grown = np.stack([grown[dy:dy + patch.shape[0], dx:dx + patch.shape[1]]
                          for dy in range(3) for dx in range(3)]).any(0)
        grown &= (labels[r0:r1, c0:c1] == 0) | patch
        alpha = np.clip(proj[r0:r1, c0:c1, c] / _COLOR_NORMS[c], 0, 1) * grown
        if alpha.sum() < min_area:
            continue
        shape, iou, cx, cy, d = _fit_shape(alpha, np.arange(r0, r0 + patch.shape[0]), np.arange(c0, c0 + patch.shape[1]))
        extent = d / math.sqrt(h * w)
        out.append(Detection(
            shape=shape,
            color=COLORS[c] if votes[c] >= MIN_PURITY * votes.sum() else None,
            size="large" if extent > SIZE_THRESHOLD else "small",
            cell=3 * min(2, int(3 * cy / h)) + min(2, int(3 * cx / w)),
            cx=float(cx) / w, cy=float(cy) / h, extent=extent, area=float(alpha.sum()) / (h * w), fit=iou,
        ))
    return out


# ---------------------------------------------------------------------------- verdicts


def _matches(det: Detection, spec: ObjectSpec) -> bool:
    return (det.shape == spec.shape and spec.color in (None, det.color) and spec.size in (None, det.size)
            and spec.cell in (None, det.cell))


def score(image: np.ndarray, prompt: str) -> Verdict:
    """Whether ``image`` shows what ``prompt`` (shapes grammar) asks for, with the reason."""
    spec = parse_prompt(prompt)
    dets = tuple(detect(image))
    found = [[d for d in dets if _matches(d, o)] for o in spec.objects]
    for o, hits in zip(spec.objects, found):
        if len(hits) != o.count:
            wanted = noun_phrase(o.count, o.shape, o.color, o.size, o.cell, numeral=True)
            return Verdict(False, f"expected {wanted}, found {len(hits)}", dets)
    if spec.relation and not relation_holds(spec.relation, found[0][0].cell, found[1][0].cell):
        return Verdict(False, f"first object (cell {found[0][0].cell}) is not {spec.relation} "
                              f"the second (cell {found[1][0].cell})", dets)
    return Verdict(True, "ok", dets)


# ---------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class FamilyScore:
    """Accuracy of one family with its bootstrap 95% interval [low, high]."""

    family: str
    n: int
    correct: int
    accuracy: float
    low: float
    high: float


@dataclass(frozen=True)
class Report:
    families: tuple[FamilyScore, ...]
    overall: FamilyScore  # mean of the family accuracies (GenEval's overall score)
    verdicts: tuple[Verdict, ...]

    def table(self) -> str:
        """A fixed-width text table: family, n, accuracy and its 95% interval."""
        lines = [f"{'family':<18} {'n':>6} {'accuracy':>9}  95% interval", "-" * 50]
        for s in (*self.families, self.overall):
            lines.append(f"{s.family:<18} {s.n:>6} {s.accuracy:>9.3f}  [{s.low:.3f}, {s.high:.3f}]")
        return "\n".join(lines)


def evaluate(images: Sequence[np.ndarray], prompts: Sequence[str], families: Sequence[str],
             n_boot: int = 1000, seed: int = 0) -> Report:
    """Score each (image, prompt); per-family accuracy with a seeded percentile bootstrap.

    The overall score is the mean of the family accuracies; its interval resamples every
    family independently in each of the ``n_boot`` replicates.
    """
    if not len(images) == len(prompts) == len(families):
        raise ValueError(f"got {len(images)} images, {len(prompts)} prompts and {len(families)} families")
    verdicts = tuple(score(im, p) for im, p in zip(images, prompts))
    ok = np.array([v.ok for v in verdicts], dtype=np.float64)
    fam = np.asarray(families)
    rng = np.random.default_rng(seed)
    rows, boots = [], []
    for f in dict.fromkeys(families):
        o = ok[fam == f]
        boot = o[rng.integers(0, len(o), (n_boot, len(o)))].mean(1)  # [n_boot]
        boots.append(boot)
        rows.append(FamilyScore(f, len(o), int(o.sum()), float(o.mean()), *map(float, np.percentile(boot, [2.5, 97.5]))))
    mean_boot = np.mean(boots, 0)
    overall = FamilyScore("overall", len(ok), int(ok.sum()), float(np.mean([r.accuracy for r in rows])),
                          *map(float, np.percentile(mean_boot, [2.5, 97.5])))
    return Report(tuple(rows), overall, verdicts)
