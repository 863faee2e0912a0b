"""Generation: PNG records in AUTOMATIC1111's format, seeds independent of batch, one-line errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from diffuse.pipeline import Pipeline, SampleSettings
from diffuse.record import read_record

from conftest import CAPTIONS


@pytest.fixture(scope="module")
def text_model(tiny_text_model):
    folder = tiny_text_model({"sampler": "dpmpp_2m", "steps": 6, "cfg": 2.0})
    return folder


@pytest.fixture(scope="module")
def class_model(tiny_class_model):
    return tiny_class_model


def test_same_seed_same_image_alone_or_in_a_batch(text_model):
    pipe = Pipeline.load(text_model)
    settings = SampleSettings(sampler="euler_ancestral", steps=5, cfg=3.0)
    batch = pipe(CAPTIONS[0], seeds="10-14", settings=settings, batch_size=5)
    alone = pipe(CAPTIONS[0], seeds=[12], settings=settings, batch_size=1)
    assert np.array_equal(np.asarray(batch[2].image), np.asarray(alone[0].image))
    assert not np.array_equal(np.asarray(batch[0].image), np.asarray(batch[1].image))


def test_png_carries_a1111_parameters_and_our_record(text_model, tmp_path):
    pipe = Pipeline.load(text_model)
    [img] = pipe(CAPTIONS[0], negative="a green triangle", seeds=[7])
    path = img.save(tmp_path / "a.png")
    with Image.open(path) as im:
        params = im.text["parameters"]
    lines = params.split("\n")
    assert lines[0] == CAPTIONS[0]
    assert lines[1] == "Negative prompt: a green triangle"
    assert lines[2].startswith("Steps: 6, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 2.0, Seed: 7, Size: 16x16, Model hash: ")
    assert lines[2].endswith("Model: tiny-text")
    record = read_record(path)
    assert record["seed"] == 7 and record["sampler"] == "dpmpp_2m" and len(record["sigmas"]) == 7 and record["sigmas"][-1] == 0
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        img.save(path)


def test_class_model_generates_and_refuses_prompts(class_model):
    pipe = Pipeline.load(class_model)
    out = pipe(class_label=3, seeds=[0, 1], settings=SampleSettings(steps=4, cfg=2.0))
    assert out[0].image.mode == "L" and out[0].image.size == (16, 16)
    with pytest.raises(ValueError, match="class-conditional; give a class label"):
        pipe("a red circle", seeds=[0])
    with pytest.raises(ValueError, match="class label 12 is out of range"):
        pipe(class_label=12, seeds=[0])


def _generate(*args):
    return subprocess.run([sys.executable, "-m", "diffuse", "generate", *args], capture_output=True, text=True)


def test_cli_writes_pngs_and_grid(text_model, tmp_path):
    r = _generate(CAPTIONS[1], "--model", str(text_model), "--seed", "0-2", "--out", str(tmp_path), "--grid", "--quiet")
    assert r.returncode == 0, r.stderr
    written = r.stdout.split()
    assert [p.rsplit("/", 1)[1] for p in written] == ["a-green-triangle-s0.png", "a-green-triangle-s1.png",
                                                      "a-green-triangle-s2.png", "a-green-triangle-grid.png"]
    again = _generate(CAPTIONS[1], "--model", str(text_model), "--seed", "1", "--out", str(tmp_path), "--quiet")
    assert again.returncode == 2 and "already exists; pass --overwrite" in again.stderr


@pytest.mark.parametrize("args, message", [
    (["", ], "the prompt is empty"),
    (["a pink dog"], "words this model never saw in training: pink, dog"),
    (["a red circle", "--negative", "a blurry dog"], "negative prompt has words this model never saw in training: blurry, dog"),
    (["a red circle", "--class", "3"], "text-conditional; give a prompt instead of a class label"),
    (["a red circle", "--size", "15"], "cannot make 15x15 images; it makes 16x16 (multiples of 2)"),
    (["a red circle", "--steps", "0"], "--steps must be >= 1"),
    (["a red circle", "--sampler", "fastest"], "unknown sampler 'fastest'; known samplers:"),
    (["a red circle", "--seed", "5-1"], "runs backwards"),
    (["a " * 40 + "circle"], "prompt is too long: 43 tokens"),
    (["a red circle", "--cfg-interval", "5,0.3"], "guidance interval (cfg_interval, --cfg-interval LO,HI) needs 0 <= LO < HI"),
    (["a red circle", "--cfg-interval", "0.3"], "--cfg-interval takes two sigmas LO,HI"),
    (["a red circle", "--cfg", "1", "--cfg-interval", "0.3,5"], "this run has none (cfg 1); give --cfg above 1 too"),
])
def test_cli_bad_input_is_one_line_error(text_model, tmp_path, args, message):
    r = _generate(*args, "--model", str(text_model), "--out", str(tmp_path), "--quiet")
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_missing_model_and_unwritable_output(text_model, tmp_path):
    r = _generate("a red circle", "--model", str(tmp_path / "nope"), "--quiet")
    assert r.returncode == 2 and "no model" in r.stderr and "not a model folder" in r.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = _generate("a red circle", "--model", str(text_model), "--out", str(blocker / "sub"), "--quiet")
    assert r.returncode == 2 and "cannot create output folder" in r.stderr


def test_weights_of_another_shape_than_the_config_are_a_one_line_error(text_model, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "edited"
    shutil.copytree(text_model, folder)
    state = load_file(str(folder / "model.safetensors"))
    key = next(k for k, v in state.items() if v.ndim == 1)
    state[key] = torch.zeros(state[key].shape[0] + 1)
    save_file(state, str(folder / "model.safetensors"))
    r = _generate("a red circle", "--model", str(folder), "--out", str(tmp_path / "out"), "--quiet")
    want = f"does not match its config: {key} has shape ({state[key].shape[0]},), the config gives ({state[key].shape[0] - 1},)"
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and want in r.stderr, r.stderr


def test_a_model_ships_a_guidance_interval_that_flags_override_and_records_keep(tiny_text_model, tmp_path):
    folder = tiny_text_model({"cfg": 2.0, "steps": 4, "cfg_interval": [0.3, 5]})
    assert Pipeline.load(folder).defaults.cfg_interval == (0.3, 5.0)
    runs = {"model": [], "flag": ["--cfg-interval", "0.5,10"], "none": ["--cfg-interval", "none"]}
    for name, flags in runs.items():
        r = _generate(CAPTIONS[1], "--model", str(folder), "--out", str(tmp_path / name), "--quiet", *flags)
        assert r.returncode == 0, r.stderr
    intervals = {name: read_record(tmp_path / name / "a-green-triangle-s0.png")["cfg_interval"] for name in runs}
    assert intervals == {"model": [0.3, 5.0], "flag": [0.5, 10.0], "none": None}
    pixels = {name: np.asarray(Image.open(tmp_path / name / "a-green-triangle-s0.png")) for name in runs}
    assert not np.array_equal(pixels["model"], pixels["none"]) and not np.array_equal(pixels["model"], pixels["flag"])


def _parsers(parser):
    """The parser and every subcommand's parser below it."""
    import argparse

    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_command_prints_its_help():
    from diffuse.cli import build_parser

    helps = [p.format_help() for p in _parsers(build_parser())]
    assert len(helps) > 15
    assert any("95% bootstrap" in h for h in helps)  # a '%' in a command's help once crashed `diffuse eval --help`
