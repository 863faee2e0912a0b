"""The shapes world: deterministic renders, held-out pairs, grammar round trips."""

from __future__ import annotations

import numpy as np
import pytest

from diffuse.adherence import detect
from diffuse.shapes import (CELL_PHRASES, EVAL_FAMILIES, FAMILIES, HELDOUT_PAIRS, PALETTE, ObjectSpec, PromptSpec,
                            Scene, ShapeObject, eval_prompts, noun_phrase, parse_prompt, relation_holds, render,
                            sample, vocabulary)


def test_render_is_deterministic_per_seed_at_any_size() -> None:
    for size in (32, 48, 64):
        a, b = render(sample(7).scene, size), render(sample(7).scene, size)
        assert a.shape == (size, size, 3) and a.dtype == np.uint8
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(render(sample(7).scene), render(sample(8).scene))
    assert sample(7) == sample(7)


def test_render_golden_values() -> None:
    """Large shapes centered on a 30-pixel canvas have extent 0.27 * 30 = 8.1 pixels."""
    square = render(Scene((ShapeObject("square", "red", "large", 4, 0.5, 0.5),)), size=30)
    red = square[..., 0].astype(np.float64) / 255
    assert square[..., 1:].max() == 0
    assert red.sum() == 64.0  # the side snaps to 32 supersampled pixels = 8 pixels
    assert square[15, 15].tolist() == [255, 0, 0] and square[0, 0].tolist() == [0, 0, 0]
    circle = render(Scene((ShapeObject("circle", "white", "large", 4, 0.5, 0.5),)), size=30)
    assert circle[..., 0].sum() / 255 == pytest.approx(np.pi / 4 * 8.1**2, rel=0.03)
    assert ((circle[..., 0] > 0) & (circle[..., 0] < 255)).sum() >= 12  # anti-aliased border pixels
    triangle = render(Scene((ShapeObject("triangle", "blue", "large", 4, 0.5, 0.5),)), size=30)
    assert triangle[..., 2].sum() / 255 == pytest.approx(8.1**2 / 2, rel=0.05)


def test_objects_sit_in_their_own_cells() -> None:
    for seed in range(500):
        objs = sample(seed).scene.objects
        assert len({o.cell for o in objs}) == len(objs)
        for o in objs:
            assert 3 * int(3 * o.cy) + int(3 * o.cx) == o.cell


def test_heldout_pairs_never_in_training_captions_scenes_or_images() -> None:
    n, n_images = 20_000, 5_000
    for seed in range(n):
        ex = sample(seed)
        assert not {(o.color, o.shape) for o in ex.scene.objects} & HELDOUT_PAIRS
        assert not {(o.color, o.shape) for o in parse_prompt(ex.caption).objects} & HELDOUT_PAIRS
        if seed < n_images:
            dets = detect(render(ex.scene))
            assert len(dets) == len(ex.scene.objects)
            assert not {(d.color, d.shape) for d in dets} & HELDOUT_PAIRS
    # Each held-out color and shape still appears in training.
    seen = {(o.color, o.shape) for s in range(2000) for o in sample(s).scene.objects}
    for color, shape in HELDOUT_PAIRS:
        assert any(c == color for c, _ in seen) and any(s == shape for _, s in seen)


def test_heldout_split_names_a_heldout_pair() -> None:
    for seed in range(2000):
        ex = sample(seed, split="heldout")
        named = {(o.color, o.shape) for o in parse_prompt(ex.caption).objects}
        assert named & HELDOUT_PAIRS
        assert named & HELDOUT_PAIRS <= {(o.color, o.shape) for o in ex.scene.objects}


@pytest.mark.parametrize("family", FAMILIES)
def test_parse_round_trip_matches_scene(family: str) -> None:
    for seed in range(300):
        ex = sample(seed, family)
        spec = parse_prompt(ex.caption)
        objs = ex.scene.objects
        if family == "counting":
            (o,) = spec.objects
            assert o.count == len(objs) and {(x.color, x.shape) for x in objs} == {(o.color, o.shape)}
            assert ex.caption.split()[0] in ("one", "two", "three", "four")
            continue
        assert len(spec.objects) == len(objs)
        for o, x in zip(spec.objects, objs):
            assert o.shape == x.shape and o.color in (None, x.color) and o.size in (None, x.size)
            assert o.cell in (None, x.cell) and o.count == 1
        if family == "position":
            assert relation_holds(spec.relation, objs[0].cell, objs[1].cell)
        if family in ("colors", "color_attribution", "two_objects", "position"):
            assert all(o.color for o in spec.objects)
        if family == "color_attribution":
            a, b = spec.objects
            assert a.color != b.color and a.shape != b.shape and a.size is None


def test_parse_prompt_examples_and_errors() -> None:
    assert parse_prompt("A large red circle.") == PromptSpec((ObjectSpec("circle", "red", "large"),))
    assert parse_prompt("an orange square at the top left") == PromptSpec((ObjectSpec("square", "orange", cell=0),))
    assert parse_prompt("three yellow squares") == PromptSpec((ObjectSpec("square", "yellow", count=3),))
    assert parse_prompt("a red circle to the right of a small blue square") == PromptSpec(
        (ObjectSpec("circle", "red"), ObjectSpec("square", "blue", "small")), "to the right of")
    for bad in ("a red dog", "two red circle", "one red circles", "", "a circle beside a square",
                "two red circles above a blue square"):
        with pytest.raises(ValueError, match="cannot parse prompt"):
            parse_prompt(bad)


def test_captions_are_grammatical() -> None:
    assert noun_phrase(1, "square", "orange") == "an orange square"
    assert noun_phrase(1, "circle", "red", "large", 4) == "a large red circle in the center"
    assert noun_phrase(3, "triangle", "blue") == "three blue triangles"
    words = set(vocabulary())
    for seed in range(3000):
        caption = sample(seed, split="any").caption
        assert set(caption.split()) <= words
        assert "a orange" not in caption and " an " + "r" not in caption
    assert len(CELL_PHRASES) == 9 and set(PALETTE) >= {c for c, _ in HELDOUT_PAIRS}


def test_relation_definitions() -> None:
    assert relation_holds("above", 2, 3) and not relation_holds("above", 3, 5)  # any column, higher row
    assert relation_holds("to the left of", 6, 1) and not relation_holds("to the left of", 1, 7)
    assert relation_holds("below", 8, 0) and relation_holds("to the right of", 5, 3)


def test_eval_prompts_cover_every_family_deterministically() -> None:
    prompts = eval_prompts(20, seed=3)
    assert prompts == eval_prompts(20, seed=3) and prompts != eval_prompts(20, seed=4)
    assert [f for _, f in prompts] == [f for f in EVAL_FAMILIES for _ in range(20)]
    for prompt, family in prompts:
        named = {(o.color, o.shape) for o in parse_prompt(prompt).objects}
        assert bool(named & HELDOUT_PAIRS) == (family == "heldout")
