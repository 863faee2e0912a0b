"""Evaluation during training: a small FID (and prompt adherence for shapes text models) of the
EMA weights every ``train.eval_every`` steps, computed between optimizer steps.

It leaves training untouched: the global torch RNG is saved and restored around it (building
the evaluation model draws from it), sampling uses its own per-image generators, and the
training generator is never used; so a run with evaluation has bitwise the same weights as
one without (tests/test_train_eval.py). Image i is conditioned like training image i (its
class label or caption) and drawn with seed i, and the reference is the first
``train.eval_n`` training images, whose Inception statistics are cached on disk after the
first evaluation. Sampling: ``train.eval_steps`` dpmpp_2m steps at guidance ``train.eval_cfg``
(1 for unconditional models).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from .config import RunConfig
from .ema import EMA
from .model import DiffusionModel
from .plot import to_uint8

EVAL_COLUMNS = ["fid", "fid_low", "fid_high", "kid", "adherence", "adherence_low", "adherence_high"]


class TrainingEvaluator:
    """Holds the feature network and the reference images between evaluations of one run."""

    def __init__(self, cfg: RunConfig, dataset: Any):
        from .fid import InceptionFeatures, find_inception_weights

        find_inception_weights()  # fail at the start of training, not at the first evaluation
        self.cfg, self.dataset = cfg, dataset
        self.network = InceptionFeatures()
        n = min(cfg.train.eval_n, len(dataset))
        items = [dataset[i] for i in range(n)]
        self.reference = to_uint8(torch.stack([it["image"] for it in items]))
        kind = cfg.model.conditioning
        self.labels = [int(it["label"]) for it in items] if kind == "class" else None
        self.prompts = [it["caption"] for it in items] if kind == "text" else None
        self.name = f"train-{cfg.train.data.replace(':', '_').replace('/', '_')}-{cfg.model.image_size}-n{n}"
        self.adherence_prompts: Optional[list[tuple[str, str]]] = None
        if kind == "text" and cfg.train.data == "shapes" and cfg.train.eval_adherence_per_family > 0:
            from .shapes import eval_prompts

            self.adherence_prompts = eval_prompts(cfg.train.eval_adherence_per_family)

    def __call__(self, ema: EMA, callback: Optional[Any] = None) -> dict[str, float]:
        """The EVAL_COLUMNS of the EMA weights (adherence columns only for shapes text models)."""
        from . import adherence
        from .fid import fid_against_reference
        from .pipeline import SampleSettings, generate

        t = self.cfg.train
        with torch.random.fork_rng(devices=[]):
            model = DiffusionModel(self.cfg.model)
            model.load_state_dict(ema.state_dict())
        model.eval()
        guided = self.cfg.model.conditioning != "none"
        settings = SampleSettings(sampler="dpmpp_2m", steps=t.eval_steps, cfg=t.eval_cfg if guided else 1.0)
        batch = 64

        def sample(seeds: list[int], **conditions: Optional[list]) -> np.ndarray:
            out = []
            for start in range(0, len(seeds), batch):
                part = {k: v[start:start + batch] for k, v in conditions.items() if v is not None}
                out.append(to_uint8(generate(model, settings, seeds[start:start + batch], callback=callback, **part)))
            return np.concatenate(out)

        n = len(self.reference)
        images = sample(list(range(n)), labels=self.labels, prompts=self.prompts)
        report = fid_against_reference(images, self.name, self.reference, network=self.network, n_boot=100)
        row = {"fid": report.fid, "fid_low": report.fid_interval[0], "fid_high": report.fid_interval[1], "kid": report.kid}
        if self.adherence_prompts is not None:
            prompts = [p for p, _ in self.adherence_prompts]
            shots = sample(list(range(len(prompts))), prompts=prompts)
            overall = adherence.evaluate(list(shots), prompts, [f for _, f in self.adherence_prompts], n_boot=200).overall
            row.update(adherence=overall.accuracy, adherence_low=overall.low, adherence_high=overall.high)
        return row

    def images_per_eval(self) -> int:
        """Images one evaluation samples (for the progress bar)."""
        return len(self.reference) + (len(self.adherence_prompts) if self.adherence_prompts else 0)
