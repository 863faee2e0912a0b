"""The trainer: loss falls, exact resume (also after kill -9), never loses work, torchrun parity."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffuse import checkpoint, losses
from diffuse.config import apply_overrides, preset
from diffuse.train import TrainingError, export_run, learning_rate, train

FAST = ["train.log_every=1", "train.sample_every=1000", "train.checkpoint_every=5"]


def tiny(steps: int, *extra: str):
    return apply_overrides(preset("tiny"), [*FAST, f"train.max_steps={steps}", *extra])


def final_tensors(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    tensors, state = checkpoint.load_checkpoint(checkpoint.list_checkpoints(run)[-1], ("model", "ema", "optimizer"))
    return tensors


def assert_bitwise_equal(a: dict, b: dict) -> None:
    for stem in a:
        assert a[stem].keys() == b[stem].keys()
        for k in a[stem]:
            assert torch.equal(a[stem][k], b[stem][k]), f"{stem}/{k} differs"


def test_tiny_training_loss_falls(tmp_path):
    result = train(tiny(50), tmp_path / "run", progress=False, log=lambda s: None)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    loss = [float(r.split(",")[2]) for r in rows]
    assert result.step == 50 and len(loss) == 50
    assert sum(loss[-10:]) / 10 < 0.7 * sum(loss[:10]) / 10
    assert (tmp_path / "run" / "loss.png").stat().st_size > 0
    assert (tmp_path / "run" / "samples" / "step-00000050.png").exists()


def test_learning_rate_warmup_then_cosine():
    cfg = tiny(110, "train.warmup_steps=10", "train.lr=1.0", "train.min_lr_ratio=0.0")
    assert learning_rate(0, cfg) == pytest.approx(0.1)
    assert learning_rate(9, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.5)
    assert learning_rate(110, cfg) == pytest.approx(0.0, abs=1e-12)


def test_resume_after_crash_during_checkpoint_write_is_bitwise_exact(tmp_path, monkeypatch):
    train(tiny(20), tmp_path / "straight", progress=False, log=lambda s: None)

    # crash while the step-15 checkpoint is being written: model file written, the rest not
    real = checkpoint.write_tensors
    calls = {"n": 0}

    def crashing(path, tensors, metadata=None):
        if "step-00000015" in str(path) and path.name == "ema.safetensors":
            raise KeyboardInterrupt("simulated crash")
        calls["n"] += 1
        return real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "write_tensors", crashing)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(20), tmp_path / "crashed", progress=False, log=lambda s: None)
    monkeypatch.setattr(checkpoint, "write_tensors", real)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path / "crashed")]
    assert names == ["step-00000005", "step-00000010"]  # the half-written one is not a checkpoint
    assert (tmp_path / "crashed" / "checkpoints" / ("step-00000015" + checkpoint.TMP_SUFFIX)).exists()

    train(tiny(20), tmp_path / "crashed", resume=True, progress=False, log=lambda s: None)
    assert_bitwise_equal(final_tensors(tmp_path / "straight"), final_tensors(tmp_path / "crashed"))
    steps = [int(r.split(",")[0]) for r in (tmp_path / "crashed" / "metrics.csv").read_text().splitlines()[1:]]
    assert steps == list(range(1, 21))  # rows past the resumed step were replaced, none duplicated


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffuse", *args]


def test_kill_9_then_resume_matches_uninterrupted(tmp_path):
    steps = 60
    sets = [f"--set={s}" for s in ["train.checkpoint_every=3", "train.sample_every=1000", "train.log_every=1"]]
    train(tiny(steps, "train.checkpoint_every=3"), tmp_path / "straight", progress=False, log=lambda s: None)
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", "--preset", "tiny", "--out", str(run), "--max-steps", str(steps), *sets),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(checkpoint.list_checkpoints(run)) < 2 and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = checkpoint.list_checkpoints(run)
    assert done, "the run was killed before its first checkpoint"
    assert int(done[-1].name.split("-")[1]) < steps, "the run finished before it could be killed"
    out = subprocess.run(_cli("train", "--out", str(run), "--resume", "--max-steps", str(steps)), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert_bitwise_equal(final_tensors(tmp_path / "straight"), final_tensors(run))


def test_resume_without_checkpoint_and_with_corrupt_checkpoint_are_clear_errors(tmp_path):
    out = subprocess.run(_cli("train", "--out", str(tmp_path / "none"), "--resume"), capture_output=True, text=True)
    assert out.returncode == 2 and "holds no complete checkpoint" in out.stderr and "Traceback" not in out.stderr
    train(tiny(5), tmp_path / "run", progress=False, log=lambda s: None)
    latest = checkpoint.list_checkpoints(tmp_path / "run")[-1] / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:100])
    out = subprocess.run(_cli("train", "--out", str(tmp_path / "run"), "--resume", "--max-steps", "8"), capture_output=True, text=True)
    assert out.returncode == 2 and "model.safetensors is not a readable safetensors file" in out.stderr
    out = subprocess.run(_cli("train", "--preset", "tiny", "--out", str(tmp_path / "run")), capture_output=True, text=True)
    assert out.returncode == 2 and "already holds checkpoints; pass --resume" in out.stderr


def test_non_finite_steps_are_skipped_then_stop_training_with_checkpoint_intact(tmp_path, monkeypatch):
    real = losses.denoising_loss
    state = {"calls": 0}

    def flaky(*args, **kwargs):
        state["calls"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if state["calls"] in (3, 4) or state["calls"] > 12 else out

    monkeypatch.setattr("diffuse.train.denoising_loss", flaky)
    with pytest.raises(TrainingError, match="non-finite steps in a row"):
        train(tiny(40, "train.max_bad_steps=3"), tmp_path / "run", progress=False, log=lambda s: None)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1:]
    assert int(rows[4].split(",")[6]) == 2  # two skipped steps counted by step 5
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path / "run")] == ["step-00000010", "step-00000015"]


def test_export_writes_a_loadable_model_folder(tmp_path):
    from diffuse.model import DiffusionModel

    train(tiny(5), tmp_path / "run", progress=False, log=lambda s: None)
    out = export_run(tmp_path / "run", tmp_path / "model")
    model, config = DiffusionModel.load(out)
    ema = final_tensors(tmp_path / "run")["ema"]
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)
    assert config["training"]["step"] == 5
    with pytest.raises(checkpoint.CheckpointError, match="already exists"):
        export_run(tmp_path / "run", tmp_path / "model")
    umask = os.umask(0o027)
    try:  # weights get the umask's permissions, as the JSON does (safetensors alone makes them 0600)
        out = export_run(tmp_path / "run", tmp_path / "shared", overwrite=True)
    finally:
        os.umask(umask)
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == {"config.json": 0o640, "model.safetensors": 0o640}
    from diffuse.cli import main
    from diffuse.pipeline import Pipeline

    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "planned"), "--cfg", "2", "--plan-layout"]) == 0
    pipe = Pipeline.load(tmp_path / "planned")
    assert pipe.plan_layout and pipe.defaults.cfg == 2 and not Pipeline.load(tmp_path / "model").plan_layout


def test_init_from_starts_a_new_run_from_a_model_folder(tmp_path):
    from diffuse.model import DiffusionModel
    from diffuse.train import load_initial_weights

    train(tiny(5), tmp_path / "run", progress=False, log=lambda s: None)
    source = export_run(tmp_path / "run", tmp_path / "model")
    exported = DiffusionModel.load(source)[0].state_dict()
    # a larger architecture: the folder's tensors are copied exactly, the new position projections stay zero
    cfg = tiny(5, f"train.init_from={source}", "model.backbone_config.position_embedding=sincos")
    torch.manual_seed(0)
    model, logged = DiffusionModel(cfg.model), []
    load_initial_weights(model, cfg, logged.append)
    state = model.state_dict()
    assert all(torch.equal(state[k], exported[k]) for k in exported)
    fresh = [k for k in state if k not in exported]
    assert fresh and all(".pos_proj." in k and not state[k].any() for k in fresh)
    assert f"{len(fresh)} new parameters keep their initialization" in logged[0]
    # a run started from it trains, and its first checkpoint holds the folder's weights moved by one step only
    train(apply_overrides(cfg, ["train.max_steps=1", "train.lr=1e-9"]), tmp_path / "tuned", progress=False, log=lambda s: None)
    tuned = final_tensors(tmp_path / "tuned")["model"]
    assert max((tuned[k] - exported[k]).abs().max() for k in exported if exported[k].is_floating_point()) < 1e-6
    # what does not fit is a one-line error naming the problem
    for overrides, message in [([f"train.init_from={tmp_path / 'nowhere'}"], "train.init_from=.*no model"),
                               ([f"train.init_from={source}", "model.backbone_config.model_channels=16"], "another architecture")]:
        bad = tiny(5, *overrides)
        with pytest.raises(TrainingError, match=message):
            load_initial_weights(DiffusionModel(bad.model), bad, logged.append)
    with pytest.raises(TrainingError, match="another architecture"):  # and train() leaves no run folder behind
        train(tiny(5, f"train.init_from={source}", "model.backbone_config.model_channels=16"), tmp_path / "refused",
              progress=False, log=logged.append)
    assert not (tmp_path / "refused").exists()


def test_init_from_a_text_model_needs_the_same_vocabulary(tmp_path):
    from diffuse.model import DiffusionModel
    from diffuse.train import load_initial_weights

    cfg = apply_overrides(preset("shapes-t2i"), [f"train.init_from={tmp_path / 'model'}"])
    vocab = cfg.model.text_config | {"tokenizer": {"max_length": 8, "vocab": ["a", "red", "circle"]}}
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, text_config=vocab))
    model = DiffusionModel(cfg.model)
    checkpoint.save_model_dir(tmp_path / "model", {"model": dataclasses.asdict(cfg.model)},
                              model.state_dict())
    other = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, text_config=vocab | {"tokenizer": {"max_length": 8, "vocab": ["a", "circle", "red"]}}))
    with pytest.raises(TrainingError, match="vocabulary differs"):
        load_initial_weights(DiffusionModel(other.model), other, lambda s: None)
    load_initial_weights(DiffusionModel(cfg.model), cfg, lambda s: None)  # the same vocabulary loads


@pytest.mark.timeout(300)
def test_torchrun_two_processes_match_one_process(tmp_path):
    steps, sets = 4, ["--set=train.sample_every=1000", "--set=train.checkpoint_every=4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run(_cli("train", "--preset", "tiny", "--out", str(tmp_path / "one"), "--max-steps", str(steps), *sets),
                         capture_output=True, text=True, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "diffuse",
                          "train", "--preset", "tiny", "--out", str(tmp_path / "two"), "--max-steps", str(steps), *sets],
                         capture_output=True, text=True, env=env)
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = final_tensors(tmp_path / "one")["model"], final_tensors(tmp_path / "two")["model"]
    differ = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert differ < 1e-5


def test_family_weights_are_checked_and_reach_the_dataset():
    from diffuse.train import open_dataset

    cfg = apply_overrides(preset("shapes-t2i"), ['train.family_weights={"position": 2, "single": 1}'])
    ds = open_dataset(cfg)
    assert ds.families == ("position", "single") and ds.weights == (2.0, 1.0)
    assert apply_overrides(cfg, ["train.family_weights.counting=0.5"]).train.family_weights == {"position": 2, "single": 1, "counting": 0.5}
    for bad, match in ([{"heldout": 1}], "unknown family 'heldout'"), ([{"single": -1}], "numbers >= 0"), ([{"single": 0}], "at least one > 0"):
        with pytest.raises(ValueError, match=match):
            apply_overrides(cfg, [f"train.family_weights={json.dumps(bad[0])}"])
    with pytest.raises(ValueError, match="shapes data only"):
        apply_overrides(preset("digits"), ['train.family_weights={"single": 1}'])


def test_folder_preset_trains_an_unconditional_pixel_model_on_an_image_folder(tmp_path):
    from PIL import Image

    from diffuse.model import DiffusionModel

    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(6):  # mixed sizes: resized and center-cropped to the preset's 32x32
        Image.fromarray(rng.integers(0, 256, (40 + 8 * i, 48, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    cfg = apply_overrides(preset("folder"), [*FAST, "train.max_steps=2", "train.batch_size=4", f"train.data=folder:{tmp_path / 'imgs'}",
                                             "train.precision=fp32"])
    assert (cfg.model.conditioning, cfg.model.channels, cfg.model.image_size) == ("none", 3, 32)
    assert train(cfg, tmp_path / "run", progress=False, log=lambda s: None).step == 2
    model, _ = DiffusionModel.load(export_run(tmp_path / "run", tmp_path / "model"))
    x = torch.randn(1, 3, 32, 32)
    assert model.denoise(x, torch.tensor([1.0]), model.condition()).shape == (1, 3, 32, 32)


def test_a_latent_preset_without_its_vae_is_a_one_line_error_and_writes_nothing(tmp_path):
    cfg = apply_overrides(preset("latent-shapes-t2i"), [f"model.codec={tmp_path / 'no-vae'}"])
    with pytest.raises(TrainingError, match=r"model.codec=.*no-vae: no VAE folder there; export one there first"):
        train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert not (tmp_path / "run").exists()
