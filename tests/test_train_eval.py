"""Evaluation during training: FID rows in metrics.csv and the chart, bitwise-unchanged training, exact resume."""

import csv
import math

import pytest
import torch

from diffuse import checkpoint
from diffuse.config import apply_overrides, preset
from conftest import needs_inception
from diffuse.train import train


pytestmark = needs_inception

FAST = ["train.log_every=1", "train.sample_every=1000", "train.checkpoint_every=5"]
EVAL = ["train.eval_every=5", "train.eval_n=8", "train.eval_steps=2"]


def tiny(steps: int, *extra: str):
    return apply_overrides(preset("tiny"), [*FAST, f"train.max_steps={steps}", *extra])


def final_state(run):
    tensors, _ = checkpoint.load_checkpoint(checkpoint.list_checkpoints(run)[-1], ("model", "ema", "optimizer", "rng"))
    return tensors


def assert_same(a, b):
    for stem in ("model", "ema", "optimizer"):
        for k in a[stem]:
            assert torch.equal(a[stem][k], b[stem][k]), f"{stem}/{k} differs"
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"]) and torch.equal(a["rng"]["train_generator"], b["rng"]["train_generator"])


def eval_rows(run):
    with open(run / "metrics.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r["fid"]]


def test_eval_during_training_leaves_training_bitwise_unchanged(tmp_path):
    quiet = dict(progress=False, log=lambda s: None)
    train(tiny(10), tmp_path / "off", **quiet)
    train(tiny(10, *EVAL), tmp_path / "on", **quiet)
    assert_same(final_state(tmp_path / "off"), final_state(tmp_path / "on"))
    rows = eval_rows(tmp_path / "on")
    assert [int(r["step"]) for r in rows] == [5, 10] and not eval_rows(tmp_path / "off")
    for r in rows:
        fid, lo, hi = float(r["fid"]), float(r["fid_low"]), float(r["fid_high"])
        assert math.isfinite(fid) and fid > 0 and lo <= hi and r["loss"] == "" and r["adherence"] == ""
    with open(tmp_path / "on" / "metrics.csv", newline="") as f:
        assert sum(1 for r in csv.DictReader(f) if r["loss"]) == 10
    from PIL import Image

    with Image.open(tmp_path / "on" / "loss.png") as a, Image.open(tmp_path / "off" / "loss.png") as b:
        assert a.height == 2 * b.height  # the evaluation panel under the loss chart


def test_eval_rows_survive_resume_exactly(tmp_path, monkeypatch):
    from diffuse.train import MetricsLog

    quiet = dict(progress=False, log=lambda s: None)
    train(tiny(10, *EVAL), tmp_path / "straight", **quiet)
    real = MetricsLog.write

    def crash_at_step_7(self, row):
        if row["step"] == 7:
            raise KeyboardInterrupt
        real(self, row)

    monkeypatch.setattr(MetricsLog, "write", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train(tiny(10, *EVAL), tmp_path / "split", **quiet)
    monkeypatch.setattr(MetricsLog, "write", real)
    train(None, tmp_path / "split", resume=True, **quiet)
    assert_same(final_state(tmp_path / "straight"), final_state(tmp_path / "split"))
    a, b = eval_rows(tmp_path / "straight"), eval_rows(tmp_path / "split")
    assert [r["step"] for r in b] == ["5", "10"]
    assert [r["fid"] for r in a] == [r["fid"] for r in b]  # same EMA weights, seeds and cached reference: same numbers


def test_eval_config_is_checked():
    with pytest.raises(ValueError, match="train.eval_n must be >= 4"):
        tiny(10, "train.eval_n=2")
    with pytest.raises(ValueError, match="must be >= 0"):
        tiny(10, "train.eval_every=-1")
