"""`diffuse eval adherence`: folders of images with prompts, generation runs, family classification, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from diffuse import shapes
from diffuse.adherence import evaluate as adherence_evaluate
from diffuse.cli import main
from diffuse.config import ModelConfig, _unet
from diffuse.evaluate import read_prompted_folder, score_folder
from diffuse.pipeline import Pipeline, SampleSettings
from diffuse.shapes import COLORS, EVAL_FAMILIES, SHAPES, SIZES, eval_prompts, prompt_family, render, sample
from diffuse.text import WordTokenizer

N_PER_FAMILY = 10


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, random_model) -> Path:
    """A random tiny text-to-image model that knows every word of the shapes grammar."""
    tok = WordTokenizer.from_captions(shapes.vocabulary()).to_dict()
    cfg = ModelConfig(backbone_config=_unet("tiny", text_dim=32), conditioning="text", image_size=16,
                      text_config={"dim": 32, "depth": 1, "num_heads": 2, "tokenizer": tok})
    folder = tmp_path_factory.mktemp("m") / "tiny-shapes"
    random_model(cfg).save(folder, extra={"sampling": {"sampler": "dpmpp_2m", "steps": 3, "cfg": 2.0}})
    return folder


@pytest.fixture(scope="module")
def class_model(tmp_path_factory, random_model) -> Path:
    cfg = ModelConfig(backbone_config=_unet("tiny", num_classes=10), conditioning="class", num_classes=10, image_size=16)
    folder = tmp_path_factory.mktemp("m") / "tiny-class"
    random_model(cfg).save(folder)
    return folder


def _eval(*args: str) -> int:
    return main(["eval", "adherence", *args])


def _save(image: np.ndarray, path: Path, prompt: str, source: str) -> None:
    """A PNG whose prompt is in our diffuse record, in AUTOMATIC1111's parameters chunk, or nowhere."""
    info = PngImagePlugin.PngInfo()
    if source == "record":
        info.add_itxt("diffuse", json.dumps({"prompt": prompt, "seed": 0}))
    elif source == "parameters":
        info.add_text("parameters", f"{prompt}\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512")
    Image.fromarray(image).save(path, pnginfo=info)


def _examples(seed: int) -> list[tuple[shapes.Example, str]]:
    """N_PER_FAMILY ground-truth examples per evaluation family, with that family."""
    return [(sample(seed + i, split="heldout") if f == "heldout" else sample(seed + i, f), f)
            for f in EVAL_FAMILIES for i in range(N_PER_FAMILY)]


def _write_folder(folder: Path, examples: list[tuple[shapes.Example, str]], scenes: list[shapes.Scene]) -> None:
    """Image i shows ``scenes[i]`` under the prompt of example i, at size 32 or 48.

    Every third prompt is listed in prompts.jsonl (with its family); the others sit in the
    PNG's diffuse record or its AUTOMATIC1111 parameters.
    """
    folder.mkdir()
    lines = []
    for i, (ex, family) in enumerate(examples):
        source = ("jsonl", "record", "parameters")[i % 3]
        _save(render(scenes[i], 32 if i % 2 else 48), folder / f"{i:03d}.png", ex.caption, source)
        if source == "jsonl":
            lines.append(json.dumps({"file_name": f"{i:03d}.png", "prompt": ex.caption, "family": family}))
    (folder / "prompts.jsonl").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------- families


def test_prompt_family_of_every_family_prompts() -> None:
    """Exact for every family, except captions that the more specific family also produces."""
    prompts = eval_prompts(200, seed=3)
    size_word = re.compile(rf"\b({'|'.join(SIZES)})\b")
    for prompt, family in prompts:
        got = prompt_family(prompt)
        if family == "single" and got == "colors":  # "a red circle": also a colors caption
            assert re.fullmatch(rf"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})", prompt), prompt
        elif family == "two_objects" and got == "color_attribution":  # two colors, two shapes, no sizes
            (c1, s1), (c2, s2) = [(o.color, o.shape) for o in shapes.parse_prompt(prompt).objects]
            assert c1 != c2 and s1 != s2 and not size_word.search(prompt), prompt
        else:
            assert got == family, (prompt, family, got)
    mismatched = sum(prompt_family(p) != f for p, f in prompts)
    assert mismatched == 106  # of 1400: 44 singles, 62 pairs
    assert [prompt_family(p) for p in ("a circle", "a small red circle", "a red circle", "one red triangle",
                                       "two small blue squares", "a red circle and a small blue square",
                                       "a red circle and a blue square", "a red circle below a green square",
                                       "an orange circle", "three cyan squares")] == [
        "single", "single", "colors", "counting", "counting", "two_objects", "color_attribution", "position",
        "heldout", "heldout"]
    with pytest.raises(ValueError, match="cannot parse prompt 'a pink dog'"):
        prompt_family("a pink dog")


# ---------------------------------------------------------------------------- folders


def test_ground_truth_folder_scores_100_percent_per_family(tmp_path: Path) -> None:
    examples = _examples(seed=500)
    _write_folder(tmp_path / "imgs", examples, [ex.scene for ex, _ in examples])
    items, report = score_folder(read_prompted_folder(tmp_path / "imgs"))
    assert len(items) == 7 * N_PER_FAMILY
    assert [s.family for s in report.families] == list(EVAL_FAMILIES)
    assert all(s.accuracy == 1.0 and s.low == 1.0 for s in report.families)
    assert report.overall.correct == 7 * N_PER_FAMILY
    listed = {f"{i:03d}.png": family for i, (_, family) in enumerate(examples) if i % 3 == 0}
    assert all(it.family == listed[it.path.name] for it in items if it.path.name in listed)
    assert all(it.family == prompt_family(it.prompt) for it in items if it.path.name not in listed)

    assert _eval("--images", str(tmp_path / "imgs"), "--json", str(tmp_path / "r.json")) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    [run] = result["runs"]
    assert run["settings"] is None and run["overall"]["accuracy"] == 1.0
    assert sorted(item["file"] for item in run["items"]) == sorted(f"{i:03d}.png" for i in range(7 * N_PER_FAMILY))
    assert all(item["ok"] and item["reason"] == "ok" and item["detected"] for item in run["items"])


def _unrelated_scene(prompt: str, pool: list[shapes.Example], start: int) -> shapes.Scene:
    """The first scene of ``pool`` from ``start`` on with no object of a kind (shape, named color) the prompt asks for."""
    specs = shapes.parse_prompt(prompt).objects
    for k in range(len(pool)):
        scene = pool[(start + k) % len(pool)].scene
        if not any(o.shape == sp.shape and sp.color in (None, o.color) for o in scene.objects for sp in specs):
            return scene
    raise AssertionError(f"no unrelated scene for {prompt!r}")


def test_wrong_scenes_score_zero(tmp_path: Path) -> None:
    """Each prompt over a scene of another seed and family without the objects it asks for."""
    examples = _examples(seed=500)
    pool = [ex for ex, _ in examples]
    scenes = [_unrelated_scene(ex.caption, pool, i + N_PER_FAMILY + 1) for i, (ex, _) in enumerate(examples)]
    _write_folder(tmp_path / "imgs", examples, scenes)
    items, report = score_folder(read_prompted_folder(tmp_path / "imgs"))
    assert report.overall.correct == 0 and report.overall.high == 0.0
    assert all(not v.ok and v.reason.startswith(("expected", "first object")) for v in report.verdicts)


def test_bootstrap_interval_contains_estimate_and_shrinks_with_n() -> None:
    ex = sample(7, "colors")
    good, bad = render(ex.scene), np.zeros((32, 32, 3), np.uint8)
    widths = []
    for n in (20, 320):
        images = [good if i % 10 < 7 else bad for i in range(n)]  # 70% correct
        report = adherence_evaluate(images, [ex.caption] * n, ["colors"] * n, n_boot=2000, seed=1)
        [row] = report.families
        assert row.accuracy == pytest.approx(0.7) and row.low <= 0.7 <= row.high
        widths.append(row.high - row.low)
    # The width of the interval goes as 1/sqrt(n): 16x more images, about 4x narrower.
    assert 2.5 < widths[0] / widths[1] < 6.0, widths


# ---------------------------------------------------------------------------- generation


def test_generation_run_report_seeds_images_and_rescoring(text_model: Path, tmp_path: Path) -> None:
    out, rep = tmp_path / "out", tmp_path / "r.json"
    assert _eval("--model", str(text_model), "--n-per-family", "2", "--guidance-sweep", "1,2", "--seed-base", "100",
                 "--batch-size", "5", "--save-images", "--out", str(out), "--json", str(rep), "--quiet") == 0
    result = json.loads(rep.read_text())
    prompts, families = map(list, zip(*eval_prompts(2, 0)))
    assert result["model"] == "tiny-shapes" and len(result["model_hash"]) == 10 and result["seed_base"] == 100
    assert [r["settings"]["cfg"] for r in result["runs"]] == [1.0, 2.0] and result["best_cfg"] in (1.0, 2.0)
    for run in result["runs"]:
        assert run["settings"]["sampler"] == "dpmpp_2m" and run["settings"]["steps"] == 3
        assert [it["prompt"] for it in run["items"]] == prompts and [it["family"] for it in run["items"]] == families
        assert [it["seed"] for it in run["items"]] == list(range(100, 114))
        assert list(run["families"]) == list(EVAL_FAMILIES) and all(f["n"] == 2 for f in run["families"].values())
        assert all(f["low"] <= f["accuracy"] <= f["high"] for f in (*run["families"].values(), run["overall"]))
        assert all(isinstance(it["ok"], bool) and it["reason"] for it in run["items"])

    # Same images with another batch size; the saved folder rescored gives the same verdicts.
    assert _eval("--model", str(text_model), "--n-per-family", "2", "--cfg", "2", "--seed-base", "100",
                 "--batch-size", "14", "--save-images", "--out", str(tmp_path / "again"), "--quiet") == 0
    names = sorted(p.name for p in (out / "cfg-2").glob("*.png"))
    assert names[0] == "0000-single-s100.png" and len(names) == 14
    assert names == sorted(p.name for p in (tmp_path / "again").glob("*.png"))
    for name in names:
        assert np.array_equal(np.asarray(Image.open(out / "cfg-2" / name)), np.asarray(Image.open(tmp_path / "again" / name)))
    assert _eval("--model", str(text_model), "--n-per-family", "2", "--cfg", "2", "--save-images", "--out",
                 str(tmp_path / "again"), "--quiet") == 2  # refuses to overwrite before generating

    # --cfg-interval reaches the sampler and the report: the images are the pipeline's with that interval
    assert _eval("--model", str(text_model), "--n-per-family", "2", "--cfg", "2", "--cfg-interval", "0.5,10", "--seed-base",
                 "100", "--save-images", "--out", str(tmp_path / "interval"), "--json", str(tmp_path / "i.json"), "--quiet") == 0
    assert json.loads((tmp_path / "i.json").read_text())["runs"][0]["settings"]["cfg_interval"] == [0.5, 10.0]
    pipe = Pipeline.load(text_model)
    (want,) = pipe.generate_batch([100], prompts=[prompts[0]], settings=SampleSettings(sampler="dpmpp_2m", steps=3, cfg=2.0,
                                                                                       cfg_interval=(0.5, 10.0)))
    interval_image = np.asarray(Image.open(tmp_path / "interval" / names[0]))
    assert np.array_equal(interval_image, np.asarray(want.image))
    assert not np.array_equal(interval_image, np.asarray(Image.open(out / "cfg-2" / names[0])))
    assert _eval("--images", str(out / "cfg-2"), "--json", str(tmp_path / "folder.json")) == 0
    rescored = {it["file"]: it for it in json.loads((tmp_path / "folder.json").read_text())["runs"][0]["items"]}
    for name, item in zip(names, result["runs"][1]["items"]):
        assert (rescored[name]["prompt"], rescored[name]["family"], rescored[name]["ok"], rescored[name]["reason"]) == \
            (item["prompt"], item["family"], item["ok"], item["reason"])


# ---------------------------------------------------------------------------- errors


def test_folder_errors_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    folder = tmp_path / "imgs"
    folder.mkdir()
    ex = sample(1, "colors")
    _save(render(ex.scene), folder / "a.png", ex.caption, "record")
    _save(render(ex.scene), folder / "b.png", ex.caption, "none")
    cases = [
        (["--images", str(tmp_path / "empty")], "no images in"),
        (["--images", str(tmp_path / "nope")], "no folder"),
        (["--images", str(folder)], "b.png has no prompt"),
    ]
    for args, message in cases:
        assert _eval(*args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err

    with pytest.warns(UserWarning, match="b.png has no prompt.*; skipped"):
        assert _eval("--images", str(folder), "--skip-unprompted") == 0
    captured = capsys.readouterr()
    assert "1 images from" in captured.out and "colors                  1     1.000" in captured.out

    (folder / "c.png").write_bytes(b"not a png")
    assert _eval("--images", str(folder), "--skip-unprompted") == 2
    assert "cannot read image" in capsys.readouterr().err
    (folder / "c.png").unlink()
    _save(render(ex.scene), folder / "d.png", "a pink dog", "parameters")
    assert _eval("--images", str(folder), "--skip-unprompted") == 2
    assert "d.png: cannot parse prompt 'a pink dog'" in capsys.readouterr().err


def test_model_and_argument_errors_are_one_line(text_model: Path, class_model: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    cases = [
        (["--model", str(tmp_path / "nope")], "no model"),
        (["--model", str(class_model)], "is class-conditional; adherence scores images against text prompts"),
        ([], "give --model M to generate and score images, or --images DIR"),
        (["--model", str(text_model), "--images", str(tmp_path)], "(not both)"),
        (["--model", str(text_model), "--guidance-sweep", "1,x"], "--guidance-sweep takes comma-separated"),
        (["--model", str(text_model), "--guidance-sweep", "1,2", "--cfg", "3"], "either --cfg or --guidance-sweep"),
        (["--model", str(text_model), "--steps", "0"], "--steps must be >= 1"),
        (["--model", str(text_model), "--n-per-family", "0"], "--n-per-family must be >= 1"),
        (["--images", str(tmp_path), "--steps", "5"], "--steps only apply when generating with --model"),
    ]
    for args, message in cases:
        assert _eval(*args) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
