"""Training-free sampling corrections that any sampler can use.

* :class:`EpsScaling` -- epsilon scaling (Ning et al. 2023, "Elucidating the Exposure Bias
  in Diffusion Models", §4, Eq. 11 and §5.1): the network's noise prediction is divided by
  lambda_t > 1 to counter the exposure bias (the sampler's x_t has a larger norm than the
  training x_t). In sigma space eps = (x - D) / sigma, so the corrected denoiser is
  ``D'(x, sigma) = x - sigma eps / lambda = x - (x - D(x, sigma)) / lambda(sigma)``. The paper's schedule is
  linear in the time step, lambda_t = k t + b, and its recommended practical form the
  constant ("uniform") lambda_t = b (k = 0). In EDM's parameterization the time is sigma
  itself, so here ``lambda(sigma) = b + k sigma / sigma_max`` (b at the clean end, b + k at
  the noisiest level). A Denoiser -> Denoiser wrapper: it works with every sampler.
* :class:`DCW` -- the wavelet low-frequency SNR-t correction ("Elucidating the SNR-t Bias of
  Diffusion Probabilistic Models", 2026; the differential correction in the wavelet domain):
  after each solver step i, the single-level Haar low band (LL) of the new sample is pushed
  along its difference from the low band of the latest denoised estimate,
  ``x_lo <- x_lo + s_i (x_lo - D_lo)`` with ``s_i = lambda_l sigma_i / sigma_max``; the high
  bands are untouched. The paper's EDM setting is lambda_l = 0.005 for 13-step Euler on
  CIFAR-10; its sign and size must be tuned per model (bench/quality.py). It is a post-step
  correction (``post_step=`` of every registered sampler, see :mod:`diffuse.steps`).

The Haar transform is the orthonormal single-level 2-D one on 2x2 blocks (exact inverse).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .precond import Denoiser
from .steps import StepInfo


# ---------------------------------------------------------------- single-level 2-D Haar transform

def haar2d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Orthonormal single-level Haar transform of x [..., H, W] (H, W even) over 2x2 blocks
    [[a, b], [c, d]]: LL = (a+b+c+d)/2, LH = (a-b+c-d)/2, HL = (a+b-c-d)/2, HH = (a-b-c+d)/2,
    each [..., H/2, W/2]."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"the Haar transform needs even height and width, got {h}x{w}")
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, (a - b + c - d) / 2, (a + b - c - d) / 2, (a - b - c + d) / 2


def ihaar2d(ll: torch.Tensor, lh: torch.Tensor, hl: torch.Tensor, hh: torch.Tensor) -> torch.Tensor:
    """Exact inverse of :func:`haar2d`: four bands [..., h, w] -> x [..., 2h, 2w]."""
    out = ll.new_empty((*ll.shape[:-2], 2 * ll.shape[-2], 2 * ll.shape[-1]))
    out[..., 0::2, 0::2] = (ll + lh + hl + hh) / 2
    out[..., 0::2, 1::2] = (ll - lh + hl - hh) / 2
    out[..., 1::2, 0::2] = (ll + lh - hl - hh) / 2
    out[..., 1::2, 1::2] = (ll - lh - hl + hh) / 2
    return out


# ---------------------------------------------------------------- epsilon scaling

def check_eps_scaling(b: float, k: float = 0.0) -> None:
    """Raise ValueError unless lambda = b + k sigma/sigma_max stays finite and > 0 on [0, sigma_max]."""
    if not (math.isfinite(b) and math.isfinite(k)) or b <= 0 or b + k <= 0:
        raise ValueError(f"epsilon scaling divides the noise prediction by lambda = b + k sigma/sigma_max, which must stay > 0; "
                         f"got b={b}, k={k} (typical: b slightly above 1, e.g. 1.005)")


class EpsScaling:
    """``D'(x, sigma) = x - sigma eps / lambda(sigma)`` with eps = (x - D(x, sigma)) / sigma, i.e.
    ``x - (x - D) / lambda``, lambda = b + k sigma / sigma_max
    (Ning et al. 2023, Eq. 11 with the linear schedule lambda_t = k t + b; k = 0 is their
    uniform schedule). b = 1, k = 0 returns D's output unchanged."""

    def __init__(self, denoiser: Denoiser, b: float, k: float = 0.0, sigma_max: float = 80.0):
        check_eps_scaling(b, k)
        if not sigma_max > 0:
            raise ValueError(f"eps scaling: sigma_max must be > 0, got {sigma_max}")
        self.denoiser, self.b, self.k, self.sigma_max = denoiser, float(b), float(k), float(sigma_max)

    def factor(self, sigma: torch.Tensor) -> torch.Tensor:
        """lambda(sigma) for sigma [B]."""
        return self.b + self.k * sigma / self.sigma_max

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        denoised = self.denoiser(x, sigma, cond)
        if self.b == 1.0 and self.k == 0.0:
            return denoised
        view = (-1,) + (1,) * (x.ndim - 1)
        return x - (x - denoised) / self.factor(sigma).to(x.dtype).reshape(view)


# ---------------------------------------------------------------- DCW: wavelet low-band correction

def check_dcw(lam: float) -> None:
    """Raise ValueError unless DCW's lambda_l is a finite number."""
    if not math.isfinite(lam):
        raise ValueError(f"DCW's lambda_l must be a finite number (0 = off; the paper's EDM value is 0.005), got {lam}")


class DCW:
    """Post-step correction ``x_lo += s_i (x_lo - D_lo)``, s_i = lambda_l sigma_i / sigma_max, on the
    single-level Haar low band of x [B, C, H, W] (SNR-t bias paper, 2026). Call with a StepInfo;
    returns the corrected x (``info.x`` itself when lambda_l = 0)."""

    def __init__(self, lam: float, sigma_max: float):
        check_dcw(lam)
        if not sigma_max > 0:
            raise ValueError(f"DCW: sigma_max must be > 0, got {sigma_max}")
        self.lam, self.sigma_max = float(lam), float(sigma_max)

    def scale(self, sigma: float) -> float:
        """s_i for the step that starts at noise level ``sigma``."""
        return self.lam * sigma / self.sigma_max

    def __call__(self, info: StepInfo) -> torch.Tensor:
        s = self.scale(info.sigma)
        if s == 0:
            return info.x
        ll, lh, hl, hh = haar2d(info.x)
        ll_d = haar2d(info.denoised.to(info.x.dtype))[0]
        return ihaar2d(ll + s * (ll - ll_d), lh, hl, hh)
