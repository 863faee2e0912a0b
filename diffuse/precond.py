"""Preconditioning: wrappers that turn a raw network F into the denoiser D.

The contract every loss, sampler and guidance function meets (DESIGN.md §2)::

    D(x, sigma, cond) -> denoised      # x: [B, ...] noisy input x0 + sigma * eps, sigma: [B]

A :class:`Backbone` ``F(x_in, c_noise, cond)`` never sees sigma itself. Following Karras
et al. 2022 ("EDM"), Eq. 7, a preconditioner computes

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

and each classic parameterization is just a choice of the four coefficients (EDM Table 1),
written here in the variance-exploding sigma space. The arithmetic around F is float32
(float64 if x is float64); F itself may run under autocast (DESIGN.md §4 rule 7).
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch
from torch import nn

from . import schedules

Coefficients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Backbone(Protocol):
    """A raw network: ``F(x_in [B, ...], c_noise [B], cond) -> [B, ...]`` (same shape as x_in)."""

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor: ...


class Denoiser(Protocol):
    """The spine of the system: ``D(x [B, ...], sigma [B], cond) -> x0_hat [B, ...]``."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor: ...


def expand_sigma(sigma: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """sigma as [B, 1, 1, ...] broadcastable against x [B, ...] in x's float dtype (at least float32)."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    sigma = torch.as_tensor(sigma, dtype=dtype, device=x.device)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.shape != (x.shape[0],):
        raise ValueError(f"sigma must have shape [B] = [{x.shape[0]}], got {tuple(sigma.shape)}")
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class Precond(nn.Module):
    """Base class: a Backbone wrapped into a Denoiser by (c_skip, c_out, c_in, c_noise).

    Attributes ``sigma_min`` and ``sigma_max`` give the noise range the model was trained
    on; pipelines build sampling schedules from them.
    """

    name = "base"

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.002, sigma_max: float = 80.0):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = float(sigma_data)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        """(c_skip, c_out, c_in, c_noise) for sigma [B, 1, ...]; c_noise is returned as [B]."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        sigma = expand_sigma(sigma, x)  # [B, 1, ...]
        x = x.to(sigma.dtype)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.backbone(c_in * x, c_noise, cond)  # [B, ...], possibly bf16
        return c_skip * x + c_out * F_x.to(sigma.dtype)

    def extra_repr(self) -> str:
        return f"sigma_data={self.sigma_data}, sigma_min={self.sigma_min}, sigma_max={self.sigma_max}"


class EDMPrecond(Precond):
    """Karras et al. 2022, Table 1 ('ours'): unit-variance input and training target."""

    name = "edm"

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        c_noise = sigma.log().flatten() / 4
        return c_skip, c_out, c_in, c_noise


class EpsPrecond(Precond):
    """Epsilon prediction (Ho et al. 2020) in sigma space: D = x - sigma F, input scaled to unit variance."""

    name = "eps"

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_in = 1 / (sigma**2 + self.sigma_data**2).sqrt()
        return torch.ones_like(sigma), -sigma, c_in, sigma.log().flatten() / 4


class X0Precond(Precond):
    """Direct x0 prediction: D = F(c_in x)."""

    name = "x0"

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_in = 1 / (sigma**2 + self.sigma_data**2).sqrt()
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in, sigma.log().flatten() / 4


class VPrecond(Precond):
    """v-prediction (Salimans & Ho 2022, §4): v = alpha eps - sigma_t x0 with alpha^2 + sigma_t^2 = 1.

    In sigma space with data scale sigma_data this is x0 = c_skip x - |c_out| v with
    c_skip = sd^2 / (sigma^2 + sd^2) and c_out = -sigma sd / sqrt(sigma^2 + sd^2).
    """

    name = "v"

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = -sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sigma**2 + sd**2).sqrt()
        return c_skip, c_out, c_in, sigma.log().flatten() / 4


class FlowPrecond(Precond):
    """Rectified flow (Liu et al. 2022; Esser et al. 2024): x_t = (1 - t) x0 + t eps, F predicts v = eps - x0.

    With t = sigma / (1 + sigma) the sampler's x is x_t / (1 - t), so
    x0 = x_t - t v gives c_in = 1 / (1 + sigma), c_skip = 1 / (1 + sigma),
    c_out = -sigma / (1 + sigma) and c_noise = t.
    """

    name = "flow"

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        one_minus_t = 1 / (1 + sigma)
        t = sigma * one_minus_t
        return one_minus_t, -t, one_minus_t, t.flatten()


class DiscreteVPDenoiser(Precond):
    """Adapter for a discrete-time model trained on a DDPM beta table (eps, v or x0 prediction).

    The model's noise levels are sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1.
    A query sigma maps to a timestep either by nearest neighbour in log sigma or by
    linear interpolation of log sigma between the two neighbouring timesteps
    (fractional t, as k-diffusion's DiscreteSchedule does). c_in = 1 / sqrt(1 + sigma^2)
    turns x into the model's x_t. A zero-terminal-SNR table (alpha_bar_T = 0) is held at
    alpha_bar = 2**-24 so sigma_max stays finite.
    """

    name = "discrete"

    def __init__(self, backbone: nn.Module, betas: torch.Tensor, prediction: str = "eps", interpolate: bool = True):
        if prediction not in ("eps", "v", "x0"):
            raise ValueError(f"unknown prediction type {prediction!r}; use eps, v or x0")
        log_sigmas = schedules.sigma_from_alpha_bar(schedules.alphas_cumprod(betas)).log()
        super().__init__(backbone, sigma_data=1.0, sigma_min=float(log_sigmas[0].exp()), sigma_max=float(log_sigmas[-1].exp()))
        self.register_buffer("log_sigmas", log_sigmas, persistent=False)  # float64: timesteps to 1e-6
        self.prediction = prediction
        self.interpolate = interpolate

    @property
    def num_timesteps(self) -> int:
        return self.log_sigmas.shape[0]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Timestep (fractional when interpolating) for each sigma [B]."""
        log_sigma = sigma.to(torch.float64).log().reshape(-1, 1)
        table = self.log_sigmas.to(torch.float64).reshape(1, -1)
        if not self.interpolate:
            return (log_sigma - table).abs().argmin(dim=1).to(sigma.dtype)
        # index of the first table entry above log_sigma, kept inside [1, T-1]
        hi = (table < log_sigma).sum(dim=1).clamp(1, self.num_timesteps - 1)
        lo = hi - 1
        lo_v, hi_v = table[0, lo], table[0, hi]
        w = ((log_sigma.flatten() - lo_v) / (hi_v - lo_v)).clamp(0, 1)
        return (lo + w).to(sigma.dtype)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma for a (possibly fractional) timestep, by log-linear interpolation of the table."""
        t = t.to(torch.float64).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long()
        hi = t.ceil().long()
        w = t - lo
        table = self.log_sigmas.to(torch.float64)
        return ((1 - w) * table[lo] + w * table[hi]).exp()

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = self.sigma_to_t(sigma.flatten())
        if self.prediction == "eps":
            return torch.ones_like(sigma), -sigma, c_in, c_noise
        if self.prediction == "v":
            return 1 / (sigma**2 + 1), -sigma * c_in, c_in, c_noise
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in, c_noise


PRECONDS: dict[str, type[Precond]] = {
    cls.name: cls for cls in (EDMPrecond, EpsPrecond, X0Precond, VPrecond, FlowPrecond)
}


def make_precond(name: str, backbone: nn.Module, noise_table: Optional[dict] = None, **kwargs: float) -> Precond:
    """Build a preconditioner by name: continuous sigma (edm, eps, x0, v, flow; ``kwargs`` = sigma_data,
    sigma_min, sigma_max) or ``discrete``, a DDPM-table model described by ``noise_table``
    (:func:`diffuse.schedules.table_betas`; its sigma range is the table's)."""
    if name == "discrete":
        if not noise_table:
            raise ValueError("a discrete model needs model.noise_table (its DDPM beta table and prediction type)")
        return DiscreteVPDenoiser(backbone, schedules.table_betas(noise_table), prediction=noise_table["prediction"])
    if noise_table:
        raise ValueError(f"model.noise_table is only for precond 'discrete', not {name!r}")
    if name not in PRECONDS:
        raise ValueError(f"unknown parameterization {name!r}; known: {', '.join(sorted(PRECONDS))}, discrete")
    return PRECONDS[name](backbone, **kwargs)


def default_sigma_range(name: str) -> tuple[float, float]:
    """A sensible (sigma_min, sigma_max) for sampling a model of this parameterization."""
    if name == "flow":
        return 0.002, float(schedules.sigma_from_flow_t(torch.tensor(0.995)))
    return 0.002, 80.0


__all__ = [
    "Backbone", "Denoiser", "Precond", "EDMPrecond", "EpsPrecond", "X0Precond", "VPrecond",
    "FlowPrecond", "DiscreteVPDenoiser", "PRECONDS", "make_precond", "expand_sigma", "default_sigma_range",
]
