"""The fast path (diffuse.fastpath): precision resolution from given CPU flags, every fast path against
the plain one (bit-exact where the math is the same, within a measured tolerance where it is not), the
precision in records and replay, train.precision=auto, and the flags' one-line errors."""

import json
import os

import numpy as np
import pytest
import torch

from diffuse import cli, fastpath
from diffuse.config import ModelConfig, _unet, apply_overrides, preset
from diffuse.pipeline import Pipeline, SampleSettings
from diffuse.record import read_record, save_png
from diffuse.replay import replay
from diffuse.train import train

from conftest import CAPTIONS

SETTINGS = SampleSettings(sampler="dpmpp_2m", steps=6, cfg=2.0)
NO_BF16 = frozenset({"avx2", "avx512f", "avx512bw", "avx512_vnni"})  # an Intel Xeon of Ice Lake's generation
# bf16 vs fp32 on the tiny seeded text model (6 dpmpp_2m steps, cfg 2, 8 seeds): measured mean 0.26 and
# max 2 levels of 255; the stated tolerance leaves room for other CPUs' bf16 kernels
BF16_MEAN_LEVELS, BF16_MAX_LEVELS = 1.0, 8


@pytest.fixture(scope="module")
def text_model(tiny_text_model):
    return tiny_text_model()


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(g.image).astype(np.int16) for g in images])


# ---------------------------------------------------------------- resolving auto

@pytest.mark.parametrize("flags, expected", [
    (NO_BF16, "fp32"),
    (NO_BF16 | {"avx512_bf16"}, "bf16"),  # AMD Zen 4, Intel Cooper Lake
    ({"avx2", "amx_tile", "amx_bf16"}, "bf16"),  # Intel Sapphire Rapids
    (frozenset(), "fp32"),
])
def test_auto_precision_on_cpu_follows_native_bf16_flags(flags, expected):
    choice, why = fastpath.resolve_precision("auto", "cpu", flags)
    assert choice == expected
    assert ("natively" in why) == (expected == "bf16")


def test_explicit_precision_is_kept_and_unknown_ones_are_refused():
    assert fastpath.resolve_precision("bf16", "cpu", NO_BF16) == ("bf16", "asked for")
    assert fastpath.resolve_precision("fp32", "cpu", {"amx_bf16"}) == ("fp32", "asked for")
    with pytest.raises(ValueError, match="unknown precision 'fp16'; use one of: auto, fp32, bf16"):
        fastpath.resolve_precision("fp16", "cpu")


@pytest.mark.parametrize("supported, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_on_cuda_asks_torch(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: supported)
    assert fastpath.resolve_precision("auto", "cuda:0")[0] == expected
    assert fastpath.resolve_precision("auto", "mps")[0] == "fp32"


def test_cpu_flags_include_what_torch_reports(monkeypatch):
    # made-up names, so that /proc/cpuinfo (added to the flags) cannot decide the outcome on any CPU
    reported = {"diffuse_true_feature": True, "diffuse_false_feature": False, "cpu_name": "x"}
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: reported)
    flags = fastpath.cpu_flags()
    assert "diffuse_true_feature" in flags and "diffuse_false_feature" not in flags and "cpu_name" not in flags


def test_inductor_cache_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("DIFFUSE_CACHE", str(tmp_path))
    assert fastpath.inductor_cache_dir() == tmp_path / "inductor"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert fastpath.inductor_cache_dir() == tmp_path / "mine"


# ---------------------------------------------------------------- fast paths vs the plain path

def test_auto_resolving_to_fp32_is_bit_exact_with_fp32(text_model, monkeypatch):
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: NO_BF16)
    auto = Pipeline.load(text_model)  # the default: precision auto
    assert auto.model.precision == "fp32" and not auto.model.compiled
    fp32 = Pipeline.load(text_model, precision="fp32")
    a, b = auto(CAPTIONS[0], seeds="0-3", settings=SETTINGS), fp32(CAPTIONS[0], seeds="0-3", settings=SETTINGS)
    assert np.array_equal(pixels(a), pixels(b))
    assert a[0].record["precision"] == "fp32" and a[0].record["compile"] is False


def test_auto_resolving_to_bf16_samples_in_bf16(text_model, monkeypatch):
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: NO_BF16 | {"avx512_bf16"})
    auto = Pipeline.load(text_model)
    bf16 = Pipeline.load(text_model, precision="bf16")
    a, b = auto(CAPTIONS[1], seeds=[5], settings=SETTINGS), bf16(CAPTIONS[1], seeds=[5], settings=SETTINGS)
    assert np.array_equal(pixels(a), pixels(b)) and a[0].record["precision"] == "bf16"


def test_a_bf16_stored_backbone_stays_bf16_for_bf16_sampling_with_the_same_images(text_model, tmp_path):
    from diffuse.model import DiffusionModel

    model, config = DiffusionModel.load(text_model)
    stored = model.save(tmp_path / "bf16", extra={k: v for k, v in config.items() if k != "model"}, dtype=torch.bfloat16)
    kept = Pipeline.load(stored, precision="bf16")
    backbone = {p.dtype for p in kept.model.denoiser.backbone.parameters()}
    assert backbone == {torch.bfloat16} and {p.dtype for p in kept.model.text_encoder.parameters()} == {torch.float32}
    upcast, _ = DiffusionModel.load(stored)  # float32 copies of the same bf16 values
    assert {p.dtype for p in upcast.parameters()} == {torch.float32}
    reference = Pipeline(upcast, kept.name, kept.model_hash, config.get("sampling"))
    reference.set_fast_path("bf16")
    a, b = kept(CAPTIONS[1], seeds="0-3", settings=SETTINGS), reference(CAPTIONS[1], seeds="0-3", settings=SETTINGS)
    assert np.array_equal(pixels(a), pixels(b))
    kept.set_fast_path("fp32")  # fp32 sampling upcasts the kept backbone: the fp32 images of the upcast model
    reference.set_fast_path("fp32")
    assert {p.dtype for p in kept.model.parameters()} == {torch.float32}
    assert np.array_equal(pixels(kept(CAPTIONS[1], seeds=[0], settings=SETTINGS)), pixels(reference(CAPTIONS[1], seeds=[0], settings=SETTINGS)))


def test_bf16_images_are_within_the_stated_tolerance_of_fp32(text_model):
    fp32 = pixels(Pipeline.load(text_model, precision="fp32")(CAPTIONS[0], seeds="0-7", settings=SETTINGS))
    bf16 = pixels(Pipeline.load(text_model, precision="bf16")(CAPTIONS[0], seeds="0-7", settings=SETTINGS))
    diff = np.abs(fp32 - bf16)
    assert diff.any(), "bf16 gave the fp32 images bit for bit: autocast was not applied"
    assert diff.mean() <= BF16_MEAN_LEVELS and diff.max() <= BF16_MAX_LEVELS


def test_bf16_denoiser_output_is_float32_and_an_outer_autocast_still_applies(text_model):
    pipe = Pipeline.load(text_model, precision="fp32", channels_last=False)
    x, sigma = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([2.0, 0.5])
    cond = pipe.model.condition(prompts=CAPTIONS[:2])
    with torch.no_grad():
        plain = pipe.model(x, sigma, cond)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 enters no autocast of its own, so a caller's applies
            outer = pipe.model(x, sigma, cond)
        pipe.model.set_fast_path("bf16")
        inner = pipe.model(x, sigma, cond)
    assert plain.dtype == inner.dtype == torch.float32
    assert torch.equal(outer, inner) and not torch.equal(plain, inner)


# ---------------------------------------------------------------- records and replay

def test_replay_uses_the_recorded_precision(text_model, tmp_path, monkeypatch):
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: NO_BF16)  # replay's own default would be fp32
    [g] = Pipeline.load(text_model, precision="bf16")(CAPTIONS[2], seeds=[3], settings=SETTINGS)
    path = g.save(tmp_path / "bf16.png")
    assert read_record(path)["precision"] == "bf16"
    report = replay(path, model=str(text_model))
    assert report.exact and report.matched
    assert any(name == "settings" and detail.endswith(", bf16, channels_last") for name, _, detail in report.items)


def test_records_without_the_field_replay_as_fp32(text_model, tmp_path):
    """Records from before the fast path sampled fp32, contiguous: without the fields replay stays bit-exact
    for them, and an image that was in fact made in bf16 then no longer matches (the field is what makes it replay)."""
    for precision, exact in (("fp32", True), ("bf16", False)):
        old_pipe = Pipeline.load(text_model, precision=precision, channels_last=False)
        [g] = old_pipe(CAPTIONS[0], seeds=[1], settings=SETTINGS)
        old = {k: v for k, v in g.record.items() if k not in ("precision", "channels_last", "compile")}
        path = save_png(g.image, tmp_path / f"old-{precision}.png", old)
        report = replay(path, model=str(text_model))
        assert report.exact == exact and report.matched == exact


def test_an_edit_chain_replays_each_record_with_its_own_fast_path(text_model, tmp_path):
    """The input (fp32, contiguous) is regenerated on the same pipeline as the edit (bf16, channels_last):
    each record's settings apply to its own step."""
    [g] = Pipeline.load(text_model, precision="fp32", channels_last=False)(CAPTIONS[0], seeds=[2], settings=SETTINGS)
    source = g.save(tmp_path / "in.png")
    [e] = Pipeline.load(text_model, precision="bf16").img2img(source, CAPTIONS[1], strength=0.6, seeds=[4], settings=SETTINGS)
    report = replay(e.save(tmp_path / "edit.png"), model=str(text_model))
    assert report.exact and report.matched


# ---------------------------------------------------------------- channels_last

def test_channels_last_images_match_contiguous_ones(text_model):
    """NHWC convolutions round differently (measured: at most 9e-7 per denoiser call on the tiny model,
    4e-6 on shapes) but gave the same 8-bit images on the tiny, digits and shapes models."""
    # fp32 on every CPU (auto is bf16 where bf16 is native, and bf16 NHWC kernels round differently again)
    plain = Pipeline.load(text_model, precision="fp32", channels_last=False)
    fast = Pipeline.load(text_model, precision="fp32")  # channels_last by default
    conv = plain.model.denoiser.backbone.conv_in.weight, fast.model.denoiser.backbone.conv_in.weight
    assert conv[0].is_contiguous() and conv[1].is_contiguous(memory_format=torch.channels_last) and not conv[1].is_contiguous()
    a, b = plain(CAPTIONS[0], seeds="0-7", settings=SETTINGS), fast(CAPTIONS[0], seeds="0-7", settings=SETTINGS)
    assert np.array_equal(pixels(a), pixels(b))
    assert a[0].record["channels_last"] is False and b[0].record["channels_last"] is True
    x, sigma = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([80.0, 5.0, 0.5, 0.01])
    cond = plain.model.condition(prompts=CAPTIONS[:1] * 4)
    with torch.no_grad():
        y0, y1 = plain.model(x, sigma, cond), fast.model(x, sigma, cond)
    assert y1.is_contiguous() and (y0 - y1).abs().max() <= 1e-5


# ---------------------------------------------------------------- torch.compile

@pytest.fixture(scope="module")
def micro_model(tmp_path_factory, random_model):
    """A seeded random 8x8 unconditional U-Net with one level and no attention: few kernels to compile."""
    cfg = ModelConfig(backbone_config=_unet("tiny", image_size=8, in_channels=1, out_channels=1, channel_mult=[1],
                                            attention_resolutions=[], mid_attention=False),
                      channels=1, image_size=8)
    folder = tmp_path_factory.mktemp("m") / "micro"
    random_model(cfg).save(folder)
    return folder


def compiled_vs_eager(folder, max_levels: int) -> None:
    """Compiled and eager images of batches 1, 2, 3 within ``max_levels``; at most two graphs (batch 1,
    then the batch dimension symbolic: torch's automatic dynamic shapes, no compile per batch size)."""
    from torch._dynamo.utils import counters

    settings = SampleSettings(sampler="euler", steps=2)
    eager = Pipeline.load(folder, precision="fp32")
    compiled = Pipeline.load(folder, precision="fp32", compile=True)
    torch._dynamo.reset()
    counters.clear()
    for batch in (1, 2, 3):
        seeds = list(range(batch))
        a, b = pixels(eager(seeds=seeds, settings=settings)), pixels(compiled(seeds=seeds, settings=settings, batch_size=batch))
        assert np.abs(a - b).max() <= max_levels
    assert counters["stats"]["unique_graphs"] == 2
    [g] = compiled(seeds=[0], settings=settings)
    assert g.record["compile"] is True and g.record["precision"] == "fp32"


def test_compile_traces_once_per_batch_kind_and_is_recorded(micro_model, monkeypatch):
    """The compile wiring with inductor replaced by AOTAutograd's eager backend (same graphs and guards,
    no C++ build: inductor's own numerics are the opt-in test below), so the images are the eager ones."""
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **options: real(fn, backend="aot_eager", **options))
    compiled_vs_eager(micro_model, max_levels=0)


@pytest.mark.skipif(os.environ.get("DIFFUSE_TEST_INDUCTOR") != "1",
                    reason="inductor builds C++ kernels: minutes on a 2-core CPU; run with DIFFUSE_TEST_INDUCTOR=1")
def test_inductor_compiled_images_are_within_one_level_of_eager(micro_model, tmp_path, monkeypatch):
    """Inductor fuses and reorders float32 operations (measured: at most 3e-7 per denoiser call on the tiny
    model, 4e-6 on shapes), so its images may differ from eager ones by one 8-bit level; artifacts go to the
    cache folder."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    compiled_vs_eager(micro_model, max_levels=1)
    assert any((tmp_path / "inductor").iterdir())


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("flags, stored", [(NO_BF16, "fp32"), (NO_BF16 | {"amx_bf16"}, "bf16")])
def test_train_precision_auto_is_resolved_and_stored_with_the_run(tmp_path, monkeypatch, flags, stored):
    monkeypatch.setattr(fastpath, "cpu_flags", lambda: flags)
    cfg = apply_overrides(preset("tiny"), ["train.precision=auto", "train.max_steps=2", "train.sample_every=1000"])
    lines = []
    train(cfg, tmp_path / "run", progress=False, log=lines.append)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["train"]["precision"] == stored
    assert any(line.startswith(f"train.precision auto -> {stored}") for line in lines)


def test_train_precision_default_is_auto():
    assert preset("shapes-t2i").train.precision == "auto" and preset("shapes-t2i").train.compile is False
    with pytest.raises(ValueError, match="unknown precision 'fp16'; use auto, fp32 or bf16"):
        apply_overrides(preset("tiny"), ["train.precision=fp16"])


# ---------------------------------------------------------------- the command line

def test_cli_precision_is_recorded_and_compile_without_a_compiler_is_a_one_line_error(text_model, tmp_path, monkeypatch, capsys):
    assert cli.main(["generate", CAPTIONS[0], "--model", str(text_model), "--precision", "bf16", "--steps", "2",
                     "--out", str(tmp_path), "--quiet"]) == 0
    [path] = tmp_path.glob("*.png")
    assert read_record(path)["precision"] == "bf16"
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert cli.main(["generate", CAPTIONS[0], "--model", str(text_model), "--compile", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --compile needs a C++ compiler on CPU and 'no-such-compiler-here' was not found; install one "
                   "(or set CXX), or drop --compile")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["generate", "x", "--precision", "fp16"])
