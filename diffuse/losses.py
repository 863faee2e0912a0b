"""The denoising loss over D, with weightings, offset noise and per-noise-level buckets.

    L = E_{x0, sigma, n} [ lambda(sigma) * mean_pixels (D(x0 + sigma n, sigma, cond) - x0)^2 ]

(Karras et al. 2022, Eq. 2 and §5). Because the loss is written over D, one function
trains every parameterization; the weighting decides what is emphasised:

* ``uniform``: lambda = 1 / c_out(sigma)^2, the plain MSE on the network's own output
  (L_simple of Ho et al. 2020 for eps models, the velocity MSE for flow models, EDM's
  unit-variance target for EDM).
* ``edm``: lambda = (sigma^2 + sd^2) / (sigma sd)^2 (Karras et al. 2022, Table 1).
* ``min_snr``: lambda = min(SNR, gamma) with SNR = 1 / sigma^2 in x0 space, equivalently
  min(SNR, gamma) / SNR on the eps loss (Hang et al. 2023, Eq. 9).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .precond import Precond, expand_sigma
from .rng import randn

WEIGHTINGS = ("uniform", "edm", "min_snr")


@dataclass(frozen=True)
class LossConfig:
    """Loss weighting and noise options."""

    weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    offset_noise: float = 0.0  # std of a per-image, per-channel constant added to the noise (Guttenberg 2023)

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {self.weighting!r}; known: {', '.join(WEIGHTINGS)}")
        if self.offset_noise < 0:
            raise ValueError(f"offset_noise must be >= 0, got {self.offset_noise}")


def loss_weight(cfg: LossConfig, model: Precond, sigma: torch.Tensor) -> torch.Tensor:
    """lambda(sigma) [B] for the configured weighting."""
    sigma = sigma.double()
    if cfg.weighting == "uniform":
        _, c_out, _, _ = model.coefficients(sigma.reshape(-1, 1))
        return (1 / c_out.flatten() ** 2).float()
    if cfg.weighting == "edm":
        sd = model.sigma_data
        return ((sigma**2 + sd**2) / (sigma * sd) ** 2).float()
    return torch.minimum(1 / sigma**2, torch.full_like(sigma, cfg.min_snr_gamma)).float()


def training_noise(shape: tuple[int, ...], offset_noise: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Gaussian noise [B, C, ...] (CPU, float32), plus optional offset noise constant over space."""
    n = randn(shape, generator)
    if offset_noise > 0:
        per_channel = randn((*shape[:2], *([1] * (len(shape) - 2))), generator)
        n = n + offset_noise * per_channel
    return n


def denoising_loss(cfg: LossConfig, model: Precond, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                   cond: Any = None) -> torch.Tensor:
    """Per-example weighted loss [B] (float32) for clean x0 [B, ...], sigma [B] and noise like x0."""
    x = x0 + expand_sigma(sigma, x0) * noise
    denoised = model(x, sigma, cond)
    per_example = (denoised.float() - x0.float()).pow(2).flatten(1).mean(1)  # [B]
    return loss_weight(cfg, model, sigma) * per_example


def bucket_edges(sigma_min: float = 0.002, sigma_max: float = 80.0, buckets: int = 6) -> torch.Tensor:
    """Log-spaced bucket edges over [sigma_min, sigma_max] for per-noise-level loss logging."""
    return torch.logspace(torch.log10(torch.tensor(sigma_min)), torch.log10(torch.tensor(sigma_max)), buckets + 1)


def bucket_losses(sigma: torch.Tensor, loss: torch.Tensor, edges: torch.Tensor) -> dict[str, tuple[float, int]]:
    """Sum of loss and count per sigma bucket, keyed 'loss_s<lo>-<hi>' (sigmas outside go to the end buckets)."""
    idx = (torch.bucketize(sigma.float().cpu(), edges[1:-1])).tolist()
    out: dict[str, tuple[float, int]] = {}
    for b, value in zip(idx, loss.detach().float().cpu().tolist()):
        key = f"loss_s{edges[b]:.3g}-{edges[b + 1]:.3g}"
        total, count = out.get(key, (0.0, 0))
        out[key] = (total + value, count + 1)
    return out
