"""The scorer agrees with ground-truth renders and rejects images with one thing wrong."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
from PIL import Image, ImageFilter

from diffuse.adherence import _components, detect, evaluate, score
from diffuse.shapes import COLORS, EVAL_FAMILIES, SHAPES, Example, Scene, ShapeObject, parse_prompt, place, render, sample


def _examples(n_per_family: int, seed: int = 0) -> list[Example]:
    """Ground-truth examples for every evaluation family (``heldout`` from the heldout split)."""
    return [sample(seed + i, split="heldout") if f == "heldout" else sample(seed + i, f)
            for f in EVAL_FAMILIES for i in range(n_per_family)]


def _messy(image: np.ndarray, rng: np.random.Generator, blur: float = 0.5, noise: float = 10.0) -> np.ndarray:
    """Slight Gaussian blur (radius in pixels at 32x32, scaled with size) and Gaussian noise (0..255 units)."""
    radius = blur * image.shape[0] / 32
    blurred = np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)), dtype=np.float64)
    return np.clip(blurred + rng.normal(0, noise, image.shape), 0, 255).round().astype(np.uint8)


def _free_cell(rng: random.Random, objects: list[ShapeObject]) -> int:
    return rng.choice(sorted(set(range(9)) - {o.cell for o in objects}))


def _corruptions(ex: Example, rng: random.Random) -> dict[str, Scene]:
    """Scenes with exactly one thing wrong with respect to the caption, by kind of error.

    Scene objects follow caption order (counting: all objects belong to the one phrase).
    """
    spec = parse_prompt(ex.caption)
    objs = list(ex.scene.objects)
    phrase = [spec.objects[min(k, len(spec.objects) - 1)] for k in range(len(objs))]

    def replaced(k: int, obj: ShapeObject) -> list[ShapeObject]:
        return objs[:k] + [obj] + objs[k + 1:]

    i = rng.randrange(len(objs))
    out = {
        "shape": replaced(i, dataclasses.replace(objs[i], shape=rng.choice([s for s in SHAPES if s != objs[i].shape]))),
        "missing": objs[:i] + objs[i + 1:],
    }
    if colored := [k for k in range(len(objs)) if phrase[k].color]:
        k = rng.choice(colored)
        out["color"] = replaced(k, dataclasses.replace(objs[k], color=rng.choice([c for c in COLORS if c != objs[k].color])))
    if sized := [k for k in range(len(objs)) if phrase[k].size]:
        k = rng.choice(sized)
        other = "small" if objs[k].size == "large" else "large"
        out["size"] = replaced(k, place(rng, objs[k].shape, objs[k].color, other, objs[k].cell))
    if phrase[0].cell is not None:
        out["cell"] = [place(rng, objs[0].shape, objs[0].color, objs[0].size, _free_cell(rng, objs))]
    if ex.family == "counting":
        out["count"] = objs + [place(rng, objs[0].shape, objs[0].color, objs[0].size, _free_cell(rng, objs))]
    if spec.relation:
        a, b = objs
        out["swapped_positions"] = [place(rng, a.shape, a.color, a.size, b.cell), place(rng, b.shape, b.color, b.size, a.cell)]
    if len(spec.objects) == 2 and all(p.color for p in phrase) and objs[0].color != objs[1].color \
            and objs[0].shape != objs[1].shape:
        a, b = objs
        out["swapped_colors"] = [dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color)]
    return {kind: Scene(tuple(v)) for kind, v in out.items()}


@pytest.mark.parametrize("size", [32, 64])
def test_agrees_with_ground_truth_renders(size: int) -> None:
    exs = _examples(300, seed=10_000)  # 2100 prompts, 7 families
    report = evaluate([render(ex.scene, size) for ex in exs], [ex.caption for ex in exs],
                      ["heldout" if i >= 1800 else ex.family for i, ex in enumerate(exs)])
    assert [s.family for s in report.families] == list(EVAL_FAMILIES)
    assert all(s.n == 300 for s in report.families)
    assert report.overall.accuracy >= 0.99 and min(s.accuracy for s in report.families) >= 0.97
    assert report.overall.correct == 2100  # measured: 100% at 32 and 64


def _rejections(size: int, n_per_family: int, messy: bool) -> tuple[int, int]:
    rng, nrng = random.Random(size), np.random.default_rng(size)
    rejected = total = 0
    for ex in _examples(n_per_family, seed=20_000):
        for scene in _corruptions(ex, rng).values():
            image = render(scene, size)
            rejected += not score(_messy(image, nrng) if messy else image, ex.caption).ok
            total += 1
    return rejected, total


def test_rejects_images_with_one_thing_wrong() -> None:
    rejected, total = _rejections(32, 100, messy=False)
    assert total >= 2000 and rejected / total >= 0.99
    assert rejected == total  # measured: all rejected


@pytest.mark.parametrize("size", [32, 64])
def test_tolerates_blur_and_noise_but_not_wrong_content(size: int) -> None:
    nrng = np.random.default_rng(1)
    exs = _examples(60, seed=30_000)
    accepted = sum(score(_messy(render(ex.scene, size), nrng), ex.caption).ok for ex in exs)
    assert accepted / len(exs) >= 0.99
    rejected, total = _rejections(size, 40, messy=True)
    assert total >= 500 and rejected / total >= 0.99


def test_verdict_reasons_and_detections() -> None:
    scene = Scene((place(random.Random(0), "circle", "red", "large", 0), place(random.Random(1), "square", "blue", "small", 8)))
    image = render(scene)
    v = score(image, "a red circle above a blue square")
    assert v.ok and v.reason == "ok"
    assert [(d.shape, d.color, d.size, d.cell) for d in v.detections] == [("circle", "red", "large", 0),
                                                                           ("square", "blue", "small", 8)]
    assert score(image, "a red circle").ok  # other objects are allowed, as in GenEval
    assert score(image, "a large red circle at the top left").ok
    assert not score(image, "a red circle below a blue square").ok
    assert score(image, "two red circles").reason == "expected two red circles, found 1"
    assert not score(image, "a small red circle").ok
    with pytest.raises(ValueError, match="cannot parse prompt"):
        score(image, "a red dog")
    with pytest.raises(ValueError, match="uint8 numpy image"):
        score(image.astype(np.float32), "a red circle")


def test_unknown_shapes_and_mixed_colors_match_nothing() -> None:
    """A diamond (rotated square) is no shape of this world; a half red, half green blob has no color."""
    image = np.zeros((64, 64, 3), np.uint8)
    yy, xx = np.mgrid[:64, :64]
    image[np.abs(xx - 15.5) + np.abs(yy - 15.5) <= 8] = (255, 255, 255)
    image[40:52, 40:46] = (255, 0, 0)
    image[40:52, 46:52] = (0, 255, 0)
    diamond, blob = detect(image)
    assert diamond.shape is None and diamond.color == "white"
    assert blob.color is None
    assert not score(image, "a white circle").ok and not score(image, "a red square").ok


def test_noise_only_and_tiny_specks_detect_nothing() -> None:
    rng = np.random.default_rng(0)
    image = np.clip(rng.normal(0, 10, (32, 32, 3)), 0, 255).astype(np.uint8)
    image[3, 3] = (255, 0, 0)
    assert detect(image) == []


def test_components_match_flood_fill() -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((40, 50)) < 0.45
    labels, n = _components(mask)
    seen = np.zeros_like(mask)
    count = 0
    for y, x in zip(*np.nonzero(mask)):  # reference: flood fill in row-major order
        if seen[y, x]:
            continue
        count += 1
        stack = [(y, x)]
        seen[y, x] = True
        while stack:
            cy, cx = stack.pop()
            assert labels[cy, cx] == count
            for ny in range(max(cy - 1, 0), min(cy + 2, 40)):
                for nx in range(max(cx - 1, 0), min(cx + 2, 50)):
                    if mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
    assert n == count and (labels[~mask] == 0).all()


def test_evaluate_bootstrap_intervals() -> None:
    image = render(sample(0, "colors").scene)
    caption = sample(0, "colors").caption
    wrong = "a red circle" if caption != "a red circle" else "a blue circle"
    images = [image] * 40
    prompts = [caption] * 30 + [wrong] * 10
    families = ["colors"] * 20 + ["counting"] * 20
    report = evaluate(images, prompts, families, n_boot=500, seed=1)
    colors, counting = report.families
    assert (colors.accuracy, counting.accuracy) == (1.0, 0.5)
    assert colors.low == colors.high == 1.0
    assert 0.25 <= counting.low < 0.5 < counting.high <= 0.75
    assert report.overall.accuracy == 0.75 and report.overall.low < 0.75 < report.overall.high
    assert report == evaluate(images, prompts, families, n_boot=500, seed=1)
    table = report.table()
    assert "counting" in table and "0.500" in table and table.splitlines()[-1].startswith("overall")
    with pytest.raises(ValueError, match="40 images, 39 prompts"):
        evaluate(images, prompts[:-1], families)

