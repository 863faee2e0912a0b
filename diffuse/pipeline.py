"""The one place that wires model + guidance + schedule + sampler into images.

``generate(model, settings, ...)`` draws one image per seed: each image's initial noise
and every stochastic step come from its own generator, so an image depends on its seed
and settings only, never on the batch it was drawn in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from . import rng, schedules
from .guidance import CFGDenoiser
from .model import DiffusionModel
from .samplers import get_sampler
from .steps import StepInfo


@dataclass(frozen=True)
class SampleSettings:
    """How to sample: solver, steps, schedule, guidance."""

    sampler: str = "dpmpp_2m"
    steps: int = 20
    schedule: str = "karras"
    cfg: float = 1.0  # classifier-free guidance scale (1 = off)
    cfg_rescale: float = 0.0
    cfg_interval: Optional[tuple[float, float]] = None
    sampler_options: dict = field(default_factory=dict)

    def sigmas(self, model: DiffusionModel) -> torch.Tensor:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        return schedules.get_sigmas(self.schedule, self.steps, model.sigma_min, model.sigma_max)


@torch.no_grad()
def generate(model: DiffusionModel, settings: SampleSettings, seeds: Sequence[int], *,
             prompts: Optional[Sequence[str]] = None, negative: Optional[Sequence[str]] = None,
             labels: Optional[Sequence[int]] = None, size: Optional[int] = None,
             callback: Optional[Callable[[StepInfo], None]] = None) -> torch.Tensor:
    """Sample len(seeds) images [B, C, H, W] in [-1, 1] (float32)."""
    device = next(model.parameters()).device
    res = size or model.cfg.image_size
    batch = len(seeds)
    cond = model.condition(prompts=prompts, labels=labels)
    denoiser: Callable = model
    if settings.cfg != 1.0:
        if model.cfg.conditioning == "none":
            raise ValueError("guidance (cfg != 1) needs a conditional model; this model is unconditional")
        uncond = model.condition(prompts=negative) if negative is not None else model.null_condition(batch)
        denoiser = CFGDenoiser(model, settings.cfg, uncond, rescale=settings.cfg_rescale, interval=settings.cfg_interval)
    sigmas = settings.sigmas(model)
    generators = rng.generators_for(seeds, "cpu")
    x = rng.randn((batch, model.cfg.channels, res, res), generators, device=device) * float(sigmas[0])
    sampler = get_sampler(settings.sampler)
    out = sampler(denoiser, x, sigmas, cond, generator=generators, callback=callback, **settings.sampler_options)
    return out.clamp(-1, 1)
