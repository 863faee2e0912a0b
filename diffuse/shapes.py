"""The shapes world: procedural captioned images of colored shapes, rendered from a seed.

Objects are circles, squares and (upward, isosceles, base = height) triangles in one of
eight palette colors and two sizes, each centered in its own cell of a 3x3 grid on a black
canvas, so objects never overlap. Coordinates are fractions of the canvas, so one scene
renders at any size; rendering draws at 4x with PIL and box-downsamples (anti-aliasing).

Caption families (in the spirit of GenEval, Ghosh et al. 2023):

- ``single``: one object; color, size and cell are each optional in the caption
  ("a circle", "a large red circle", "a blue square at the top left").
- ``colors``: one object named by color and shape only ("a purple square"); the color is
  the tested attribute, as in GenEval's ``colors`` task.
- ``two_objects``: two objects with different (color, shape) pairs, sizes optional
  ("a red circle and a small red square").
- ``counting``: n in 1..4 objects sharing color, shape and size, each in its own cell
  ("three yellow squares", "two small green circles", "one red triangle").
- ``position``: "A REL B" with REL in above / below / to the left of / to the right of.
  "A above B" means row(A) < row(B) (any columns); "A to the left of B" means
  col(A) < col(B) (any rows); below / right of mirror them.
- ``color_attribution``: two objects with different shapes and different colors
  ("a red circle and a blue square"); swapping the colors makes a wrong image.

Held-out color-shape pairs (purple triangle, cyan square, orange circle) never occur in
the ``train`` split, neither in captions nor in images; the ``heldout`` split puts at least
one of them into every caption (and its image). ``parse_prompt`` turns any caption of this
grammar back into a ``PromptSpec``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

# ---------------------------------------------------------------------------- vocabulary

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "purple": (170, 0, 255),
    "cyan": (0, 255, 255),
    "orange": (255, 128, 0),
    "white": (255, 255, 255),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Object extent (circle diameter, square side, triangle base and height) in canvas units.
SIZE_EXTENT: dict[str, float] = {"small": 0.17, "large": 0.27}
CELL_MARGIN = 0.03  # minimum gap between an object and its cell border, canvas units
# Cell index = 3 * row + col, row 0 at the top.
CELL_PHRASES: tuple[str, ...] = (
    "at the top left", "at the top", "at the top right",
    "on the left", "in the center", "on the right",
    "at the bottom left", "at the bottom", "at the bottom right",
)
RELATIONS: tuple[str, ...] = ("above", "below", "to the left of", "to the right of")
NUMBERS: tuple[str, ...] = ("one", "two", "three", "four")
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset(
    {("purple", "triangle"), ("cyan", "square"), ("orange", "circle")}
)
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)
FAMILIES: tuple[str, ...] = ("single", "colors", "two_objects", "counting", "position", "color_attribution")
EVAL_FAMILIES: tuple[str, ...] = FAMILIES + ("heldout",)
SPLITS: tuple[str, ...] = ("train", "heldout", "any")
SUPERSAMPLE = 4


# ---------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class ShapeObject:
    """One object: its kind, and its center (cx, cy) in canvas units [0, 1] inside ``cell``."""

    shape: str
    color: str
    size: str
    cell: int
    cx: float
    cy: float


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]


@dataclass(frozen=True)
class Example:
    scene: Scene
    caption: str
    family: str


def cell_row_col(cell: int) -> tuple[int, int]:
    return divmod(cell, 3)


def relation_holds(relation: str, cell_a: int, cell_b: int) -> bool:
    """Whether object A in ``cell_a`` stands in ``relation`` to object B in ``cell_b``."""
    (ra, ca), (rb, cb) = cell_row_col(cell_a), cell_row_col(cell_b)
    return {"above": ra < rb, "below": ra > rb, "to the left of": ca < cb, "to the right of": ca > cb}[relation]


def place(rng: random.Random, shape: str, color: str, size: str, cell: int) -> ShapeObject:
    """An object at a random position inside ``cell`` that keeps ``CELL_MARGIN`` to its borders."""
    row, col = cell_row_col(cell)
    slack = max(0.0, (1 / 3 - SIZE_EXTENT[size]) / 2 - CELL_MARGIN)
    cx = (col + 0.5) / 3 + rng.uniform(-slack, slack)
    cy = (row + 0.5) / 3 + rng.uniform(-slack, slack)
    return ShapeObject(shape, color, size, cell, cx, cy)


# ---------------------------------------------------------------------------- rendering


def render(scene: Scene, size: int = 32) -> np.ndarray:
    """Render a scene to an anti-aliased uint8 image [size, size, 3] on black."""
    s = size * SUPERSAMPLE
    canvas = Image.new("RGB", (s, s))
    draw = ImageDraw.Draw(canvas)
    for obj in scene.objects:
        half = SIZE_EXTENT[obj.size] * s / 2
        x, y = obj.cx * s, obj.cy * s
        fill = PALETTE[obj.color]
        # PIL boxes include their last pixel: subtract 1 so the object covers 2*half pixels.
        if obj.shape == "circle":
            draw.ellipse([x - half, y - half, x + half - 1, y + half - 1], fill=fill)
        elif obj.shape == "square":
            draw.rectangle([round(x - half), round(y - half), round(x + half) - 1, round(y + half) - 1], fill=fill)
        else:  # PIL fills the pixels whose index lies inside; pixel i has its center at i + 0.5
            x, y = x - 0.5, y - 0.5
            draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=fill)
    return np.array(canvas.reduce(SUPERSAMPLE))  # box downsample -> [size, size, 3]


# ---------------------------------------------------------------------------- captions


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(count: int, shape: str, color: str | None = None, size: str | None = None,
                cell: int | None = None, numeral: bool = False) -> str:
    """"a large red circle", "an orange square at the top", "three small blue triangles"."""
    words = [w for w in (size, color, shape + ("s" if count > 1 else "")) if w]
    head = NUMBERS[count - 1] if numeral or count > 1 else article(words[0])
    phrase = " ".join([head, *words])
    return phrase if cell is None else f"{phrase} {CELL_PHRASES[cell]}"


def _pick_pairs(rng: random.Random, k: int, split: str,
                valid: Callable[[list[tuple[str, str]]], bool]) -> list[tuple[str, str]]:
    """k (color, shape) pairs allowed by ``split`` and accepted by ``valid`` (rejection sampling)."""
    pool = ALL_PAIRS if split == "any" else TRAIN_PAIRS
    while True:
        pairs = [rng.choice(pool) for _ in range(k)]
        if split == "heldout":
            pairs[rng.randrange(k)] = rng.choice(sorted(HELDOUT_PAIRS))
        if valid(pairs):
            return pairs


def _maybe(rng: random.Random, p: float, value: str) -> str | None:
    return value if rng.random() < p else None


def _one_object(rng: random.Random, split: str, family: str) -> tuple[list[ShapeObject], str]:
    [(color, shape)] = _pick_pairs(rng, 1, split, lambda p: True)
    obj = place(rng, shape, color, rng.choice(SIZES), rng.randrange(9))
    if family == "colors":
        return [obj], noun_phrase(1, shape, color)
    # A held-out caption must name the held-out pair, so its color is always mentioned there.
    named_color = color if split == "heldout" else _maybe(rng, 0.7, color)
    cell = obj.cell if rng.random() < 0.5 else None
    return [obj], noun_phrase(1, shape, named_color, _maybe(rng, 0.5, obj.size), cell)


def _two_objects(rng: random.Random, split: str, family: str) -> tuple[list[ShapeObject], str]:
    if family == "color_attribution":
        pairs = _pick_pairs(rng, 2, split, lambda p: p[0][0] != p[1][0] and p[0][1] != p[1][1])
    else:
        pairs = _pick_pairs(rng, 2, split, lambda p: p[0] != p[1])
    if family == "position":
        relation = rng.choice(RELATIONS)
        cells = rng.choice([(a, b) for a in range(9) for b in range(9) if a != b and relation_holds(relation, a, b)])
    else:
        cells = tuple(rng.sample(range(9), 2))
    objs = [place(rng, shape, color, rng.choice(SIZES), cell) for (color, shape), cell in zip(pairs, cells)]
    p_size = 0.0 if family == "color_attribution" else 0.3
    a, b = (noun_phrase(1, o.shape, o.color, _maybe(rng, p_size, o.size)) for o in objs)
    return objs, f"{a} {relation} {b}" if family == "position" else f"{a} and {b}"


def _counting(rng: random.Random, split: str, family: str) -> tuple[list[ShapeObject], str]:
    [(color, shape)] = _pick_pairs(rng, 1, split, lambda p: True)
    count, size = rng.randint(1, 4), rng.choice(SIZES)
    objs = [place(rng, shape, color, size, cell) for cell in rng.sample(range(9), count)]
    return objs, noun_phrase(count, shape, color, _maybe(rng, 0.5, size), numeral=True)


_GENERATORS = {
    "single": _one_object, "colors": _one_object, "two_objects": _two_objects,
    "counting": _counting, "position": _two_objects, "color_attribution": _two_objects,
}


def sample(seed: int, family: str | None = None, split: str = "train",
           families: Sequence[str] = FAMILIES, weights: Sequence[float] | None = None) -> Example:
    """The captioned scene for ``seed``; ``family=None`` draws one from ``families``, uniformly or
    in proportion to ``weights`` (one per family).

    ``split``: "train" (no held-out pair anywhere), "heldout" (at least one held-out pair,
    named in the caption) or "any" (all pairs).
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = random.Random(seed)
    if family is None:
        family = rng.choice(list(families)) if weights is None else rng.choices(list(families), weights)[0]
    if family not in _GENERATORS:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    objs, caption = _GENERATORS[family](rng, split, family)
    return Example(Scene(tuple(objs)), caption, family)


def eval_prompts(n_per_family: int, seed: int = 0) -> list[tuple[str, str]]:
    """``n_per_family`` (prompt, family) pairs for each of ``EVAL_FAMILIES``, deterministic.

    The ``heldout`` prompts come from the heldout split with a random family; the others
    come from the train split of their family.
    """
    out = []
    for f, family in enumerate(EVAL_FAMILIES):
        for i in range(n_per_family):
            s = seed * 1_000_003 + f * 100_003 + i
            ex = sample(s, split="heldout") if family == "heldout" else sample(s, family)
            out.append((ex.caption, family))
    return out


def vocabulary() -> list[str]:
    """Every word the caption grammar can produce, sorted."""
    words = {"a", "an", "and", *NUMBERS, *SIZES, *COLORS, *SHAPES, *(s + "s" for s in SHAPES)}
    for phrase in CELL_PHRASES + RELATIONS:
        words.update(phrase.split())
    return sorted(words)


# ---------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ObjectSpec:
    """A required object kind: ``count`` objects of this shape (color/size/cell if given)."""

    shape: str
    color: str | None = None
    size: str | None = None
    count: int = 1
    cell: int | None = None


@dataclass(frozen=True)
class PromptSpec:
    """Objects asked for; ``relation`` (if any) relates objects[0] to objects[1]."""

    objects: tuple[ObjectSpec, ...]
    relation: str | None = None


def _alternatives(words: Sequence[str]) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJECT_RE = (
    rf"(?P<head{{i}}>a|an|{_alternatives(NUMBERS)}) (?:(?P<size{{i}}>{_alternatives(SIZES)}) )?"
    rf"(?:(?P<color{{i}}>{_alternatives(COLORS)}) )?(?P<shape{{i}}>{_alternatives(SHAPES)})(?P<plural{{i}}>s?)"
    rf"(?: (?P<cell{{i}}>{_alternatives(CELL_PHRASES)}))?"
)


@lru_cache(maxsize=None)
def _prompt_re() -> re.Pattern[str]:
    first, second = _OBJECT_RE.format(i=0), _OBJECT_RE.format(i=1)
    return re.compile(rf"{first}(?: (?P<link>and|{_alternatives(RELATIONS)}) {second})?")


def _object_spec(m: re.Match[str], i: int, text: str) -> ObjectSpec:
    head = m[f"head{i}"]
    count = NUMBERS.index(head) + 1 if head in NUMBERS else 1
    if (count > 1) != bool(m[f"plural{i}"]):
        raise ValueError(f"cannot parse prompt {text!r}: '{head} ... {m[f'shape{i}']}{m[f'plural{i}']}' "
                         "mixes singular and plural")
    cell = CELL_PHRASES.index(m[f"cell{i}"]) if m[f"cell{i}"] else None
    return ObjectSpec(m[f"shape{i}"], m[f"color{i}"], m[f"size{i}"], count, cell)


def parse_prompt(text: str) -> PromptSpec:
    """Parse a caption of the shapes grammar (case and a final period are ignored).

    Raises ValueError naming the text when it does not follow the grammar.
    """
    norm = " ".join(text.lower().strip().rstrip(".").split())
    m = _prompt_re().fullmatch(norm)
    if m is None:
        raise ValueError(
            f"cannot parse prompt {text!r}: expected e.g. 'a red circle', 'three small blue squares', "
            "'a red circle and a green triangle' or 'a red circle above a blue square'"
        )
    objects = [_object_spec(m, 0, text)]
    if m["link"]:
        objects.append(_object_spec(m, 1, text))
    relation = m["link"] if m["link"] not in (None, "and") else None
    if relation and any(o.count != 1 for o in objects):
        raise ValueError(f"cannot parse prompt {text!r}: a relation needs one object on each side")
    return PromptSpec(tuple(objects), relation)


def prompt_family(text: str) -> str:
    """The evaluation family (``EVAL_FAMILIES``) whose structure a caption of the grammar has.

    ``heldout`` when it names a held-out color-shape pair; else ``position`` for a relation,
    ``counting`` for a numeral head ("one red triangle", "three blue squares"),
    ``color_attribution`` for two colored objects of different colors and shapes without
    sizes, ``two_objects`` for other pairs, ``colors`` for "a COLOR SHAPE", ``single`` for
    other single objects. A caption that two families can produce goes to the more specific
    one: the ``single`` caption "a red circle" is ``colors``. Raises ValueError like ``parse_prompt``.
    """
    spec = parse_prompt(text)
    objs = spec.objects
    if any((o.color, o.shape) in HELDOUT_PAIRS for o in objs):
        return "heldout"
    if spec.relation:
        return "position"
    if len(objs) == 2:
        a, b = objs
        attribution = a.color and b.color and a.color != b.color and a.shape != b.shape and not (a.size or b.size)
        return "color_attribution" if attribution else "two_objects"
    [obj] = objs
    if obj.count > 1 or text.lower().split()[0] in NUMBERS:  # parse_prompt accepted it: the first word is the head
        return "counting"
    return "colors" if obj.color and not (obj.size or obj.cell is not None) else "single"
