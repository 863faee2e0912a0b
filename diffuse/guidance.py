"""Guidance as Denoiser -> Denoiser wrappers.

Classifier-free guidance (Ho & Salimans 2022, Eq. 6) in x0 space:

    D_w(x, sigma) = D(x, sigma, uncond) + w (D(x, sigma, cond) - D(x, sigma, uncond))

``uncond`` is the null condition (an empty prompt, the null class) or a negative prompt.
Both branches run as one batched forward. Options:

* ``rescale`` phi (Lin et al. 2023, §3.4, Eqs. 15-17): rescale the guided prediction to the
  per-image standard deviation of the conditional one, then mix with weight phi, which
  counters the over-exposure of large guidance scales.
* ``interval`` (sigma_lo, sigma_hi] (Kynkäänniemi et al. 2024): guide only at noise levels
  inside the interval; outside it the unconditional branch is skipped entirely.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from .precond import Denoiser

Cond = Any  # None, a tensor [B, ...], or a dict of tensors [B, ...]


def cat_cond(a: Cond, b: Cond) -> Cond:
    """Concatenate two conditions along the batch dimension (tensors or dicts of tensors)."""
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            raise ValueError(f"condition and unconditional condition have different keys: {sorted(a)} vs {sorted(b)}")
        return {k: cat_cond(a[k], b[k]) for k in a}
    raise ValueError(f"cannot batch a condition of type {type(a).__name__} with one of type {type(b).__name__}")


def select_cond(c: Cond, mask: torch.Tensor) -> Cond:
    """Rows of a condition where ``mask`` [B] is true."""
    if c is None:
        return None
    if isinstance(c, dict):
        return {k: select_cond(v, mask) for k, v in c.items()}
    return c[mask]


def check_interval(interval: Any) -> tuple[float, float]:
    """A guidance interval (sigma_lo, sigma_hi) as two floats; ValueError unless 0 <= lo < hi, both finite."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise ValueError(f"the guidance interval (cfg_interval, --cfg-interval LO,HI) must be two sigmas, got {interval!r}") from None
    if not (math.isfinite(hi) and 0 <= lo < hi):
        raise ValueError(f"the guidance interval (cfg_interval, --cfg-interval LO,HI) needs 0 <= LO < HI, both finite, got {interval}")
    return lo, hi


class CFGDenoiser:
    """Classifier-free guidance wrapper; itself a Denoiser.

    Args:
        denoiser: the conditional model D.
        scale: guidance weight w (1 = no guidance; the unconditional branch is then skipped).
        uncond: the null/negative condition, batched like ``cond``.
        rescale: phi in [0, 1] for guidance rescale (0 = off).
        interval: (sigma_lo, sigma_hi); guidance applies where sigma_lo < sigma <= sigma_hi.
    """

    def __init__(self, denoiser: Denoiser, scale: float, uncond: Cond, *, rescale: float = 0.0,
                 interval: Optional[tuple[float, float]] = None):
        if not math.isfinite(scale):
            raise ValueError(f"guidance scale must be a finite number, got {scale}")
        if not 0.0 <= rescale <= 1.0:
            raise ValueError(f"guidance rescale must be in [0, 1], got {rescale}")
        self.denoiser = denoiser
        self.scale = float(scale)
        self.uncond = uncond
        self.rescale = float(rescale)
        self.interval = None if interval is None else check_interval(interval)

    def active(self, sigma: torch.Tensor) -> torch.Tensor:
        """Boolean [B]: where guidance applies at these noise levels."""
        if self.scale == 1.0:
            return torch.zeros_like(sigma, dtype=torch.bool)
        if self.interval is None:
            return torch.ones_like(sigma, dtype=torch.bool)
        lo, hi = self.interval
        return (sigma > lo) & (sigma <= hi)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond = None) -> torch.Tensor:
        on = self.active(sigma)
        if not on.any():
            return self.denoiser(x, sigma, cond)
        if on.all():
            both = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cat_cond(cond, self.uncond))
            cond_out, uncond_out = both.chunk(2)
            return self.combine(cond_out, uncond_out)
        # mixed batch: guided rows get both branches, the rest only the conditional one
        out = self.denoiser(x, sigma, cond)
        uncond_out = self.denoiser(x[on], sigma[on], select_cond(self.uncond, on))
        out = out.clone()
        out[on] = self.combine(out[on], uncond_out)
        return out

    def combine(self, cond_out: torch.Tensor, uncond_out: torch.Tensor) -> torch.Tensor:
        guided = uncond_out + self.scale * (cond_out - uncond_out)
        if self.rescale == 0.0:
            return guided
        dims = tuple(range(1, guided.ndim))
        std_cond = cond_out.std(dim=dims, keepdim=True)
        std_guided = guided.std(dim=dims, keepdim=True).clamp(min=1e-12)
        rescaled = guided * (std_cond / std_guided)
        return self.rescale * rescaled + (1 - self.rescale) * guided

