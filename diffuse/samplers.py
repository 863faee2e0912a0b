"""Single-step samplers and the SAMPLERS registry.

Every sampler has the signature of :mod:`diffuse.steps`::

    fn(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, **options) -> Tensor

with ``x`` [B, ...] the initial noise times ``sigmas[0]`` and ``sigmas`` descending to 0.
Inside, ``model(x, sigma)`` is a :class:`~diffuse.steps.CountingDenoiser` and ``sigmas`` a
list of floats. All arithmetic is in sigma space (variance exploding, x = x0 + sigma eps),
where several classic methods coincide: an Euler step of the probability-flow ODE is
DDIM with eta = 0 and first-order DPM-Solver++, and DDPM's ancestral step is DDIM with
eta = 1 (checked in tests/test_samplers.py). Where a name matches k-diffusion's
``sample_<name>``, the function computed is the same.

Multistep solvers live in :mod:`diffuse.samplers_multistep` and join the same registry.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from .rng import Generators
from .samplers_multistep import MULTISTEP
from .steps import Callback, CountingDenoiser, Noise, ancestral_step, register, report, to_d

SAMPLERS: dict[str, Callable] = {}


# ---------------------------------------------------------------- NFE rules

def one_per_step(steps: int, sigmas: list[float], **options) -> int:
    """One evaluation per step (Euler-type and ancestral first-order samplers)."""
    return steps


def two_per_step_but_last(steps: int, sigmas: list[float], **options) -> int:
    """Two evaluations per step, except one for the final (Euler) step to sigma = 0."""
    return 2 * steps - 1


def ancestral_two_stage(steps: int, sigmas: list[float], *, eta: float, **options) -> int:
    """Two evaluations per step, one where the step's deterministic target sigma_down is 0."""
    return steps + sum(ancestral_step(s, s_next, eta)[0] != 0 for s, s_next in zip(sigmas[:-1], sigmas[1:]))


# ---------------------------------------------------------------- shared step arithmetic

def require_nonnegative(sampler: str, **options: float) -> None:
    """Raise ValueError naming the first option that is negative (noise scales, eta, churn)."""
    for key, value in options.items():
        if not value >= 0:
            raise ValueError(f"{sampler}: option {key} must be >= 0, got {value}")


def with_noise(x: torch.Tensor, noise: Noise, std: float) -> torch.Tensor:
    """x [B, ...] plus fresh per-image Gaussian noise of standard deviation ``std`` (no draw if std = 0)."""
    return x + std * noise(x) if std > 0 else x


def churn(x: torch.Tensor, sigma: float, noise: Noise, steps: int, s_churn: float, s_tmin: float,
          s_tmax: float, s_noise: float) -> tuple[torch.Tensor, float]:
    """Karras et al. 2022, Alg. 2 lines 4-6: raise the noise level of x [B, ...] from sigma to
    sigma_hat = (1 + gamma) sigma by adding noise, gamma = min(S_churn / N, sqrt(2) - 1)
    inside [S_tmin, S_tmax]. Returns (x_hat, sigma_hat)."""
    gamma = min(s_churn / steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    return with_noise(x, noise, s_noise * math.sqrt(sigma_hat**2 - sigma**2)), sigma_hat


def first_order(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_to: float) -> torch.Tensor:
    """DPM-Solver++(1) from sigma to sigma_to (Lu et al. 2022b, Eq. 9 with alpha = 1 and
    e^-h = sigma_to / sigma): x_to = (sigma_to / sigma) x + (1 - sigma_to / sigma) denoised,
    which is also the Euler step in sigma. x, denoised [B, ...] -> [B, ...]."""
    ratio = sigma_to / sigma
    return ratio * x + (1 - ratio) * denoised


def heun_step(model: CountingDenoiser, x: torch.Tensor, d: torch.Tensor, sigma: float,
              sigma_next: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Karras et al. 2022, Alg. 1 lines 5-8: the trapezoidal correction of the Euler step
    with slope d [B, ...] at (x, sigma). Returns (x_next, denoised at the predictor)."""
    x_euler = x + (sigma_next - sigma) * d
    denoised_2 = model(x_euler, sigma_next)
    return x + (sigma_next - sigma) * (d + to_d(x_euler, sigma_next, denoised_2)) / 2, denoised_2


# ---------------------------------------------------------------- ODE samplers

@register(SAMPLERS, "euler", nfe=one_per_step, stochastic=False)
def euler(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
          callback: Optional[Callback] = None, s_churn: float = 0.0, s_tmin: float = 0.0,
          s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    """Euler steps of the probability-flow ODE (Karras et al. 2022, Alg. 2 with Euler steps
    only; deterministic unless s_churn > 0). x [B, ...] -> [B, ...]."""
    require_nonnegative("euler", s_churn=s_churn, s_noise=s_noise)
    noise, steps = Noise(generator), len(sigmas) - 1
    for i in range(steps):
        # churn (no-op with the default s_churn = 0)
        x, sigma_hat = churn(x, sigmas[i], noise, steps, s_churn, s_tmin, s_tmax, s_noise)
        # Euler step from sigma_hat to sigma_next
        denoised = model(x, sigma_hat)
        x = x + (sigmas[i + 1] - sigma_hat) * to_d(x, sigma_hat, denoised)
        x = report(callback, model, i, sigmas, x, denoised)
    return x


@register(SAMPLERS, "heun", nfe=two_per_step_but_last, stochastic=False)
def heun(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
         callback: Optional[Callback] = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Alg. 1), with an Euler step for the
    last step to sigma = 0. x [B, ...] -> [B, ...]."""
    return heun_with_churn(model, x, sigmas, Noise(generator), callback, 0.0, 0.0, float("inf"), 1.0)


@register(SAMPLERS, "dpm_2", nfe=two_per_step_but_last, stochastic=False)
def dpm_2(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
          callback: Optional[Callback] = None) -> torch.Tensor:
    """Second-order midpoint method in log sigma, after DPM-Solver-2 (Lu et al. 2022a, Alg. 4
    with r = 1/2) written as Euler steps in sigma (k-diffusion's sample_dpm_2). x [B, ...] -> [B, ...]."""
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            # last step: Euler
            x = x + (sigma_next - sigma) * d
        else:
            # Euler half step to the geometric midpoint, then the full step with its slope
            sigma_mid = math.sqrt(sigma * sigma_next)
            x_mid = x + (sigma_mid - sigma) * d
            denoised = model(x_mid, sigma_mid)
            x = x + (sigma_next - sigma) * to_d(x_mid, sigma_mid, denoised)
        x = report(callback, model, i, sigmas, x, denoised)
    return x


# ---------------------------------------------------------------- stochastic samplers

@register(SAMPLERS, "edm", nfe=two_per_step_but_last, stochastic=True)
def edm(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
        callback: Optional[Callback] = None, S_churn: float = 80.0, S_tmin: float = 0.05, S_tmax: float = 50.0,
        S_noise: float = 1.003) -> torch.Tensor:
    """Karras et al. 2022, Alg. 2: Heun steps with stochastic churn. Defaults are the paper's
    ImageNet-64 settings (Table 5); S_churn = 0 gives :func:`heun`. x [B, ...] -> [B, ...]."""
    require_nonnegative("edm", S_churn=S_churn, S_noise=S_noise)
    return heun_with_churn(model, x, sigmas, Noise(generator), callback, S_churn, S_tmin, S_tmax, S_noise)


def heun_with_churn(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, callback: Optional[Callback],
                    S_churn: float, S_tmin: float, S_tmax: float, S_noise: float) -> torch.Tensor:
    """The loop of Karras et al. 2022, Alg. 2 (Alg. 1 when S_churn = 0), shared by heun and edm."""
    steps = len(sigmas) - 1
    for i in range(steps):
        sigma_next = sigmas[i + 1]
        # churn: raise the noise level to sigma_hat (lines 4-6; a no-op when S_churn = 0)
        x, sigma_hat = churn(x, sigmas[i], noise, steps, S_churn, S_tmin, S_tmax, S_noise)
        denoised = model(x, sigma_hat)
        d = to_d(x, sigma_hat, denoised)
        if sigma_next == 0:
            # last step: Euler (line 8)
            x = x + (sigma_next - sigma_hat) * d
        else:
            # second-order correction (lines 9-11)
            x, denoised = heun_step(model, x, d, sigma_hat, sigma_next)
        x = report(callback, model, i, sigmas, x, denoised)
    return x


@register(SAMPLERS, "euler_ancestral", nfe=one_per_step, stochastic=True)
def euler_ancestral(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
                    callback: Optional[Callback] = None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """Ancestral sampling with Euler steps (k-diffusion's sample_euler_ancestral): an Euler
    step down to sigma_down, then fresh noise up to sigma_next; eta = 0 is :func:`euler`.
    x [B, ...] -> [B, ...]."""
    require_nonnegative("euler_ancestral", eta=eta, s_noise=s_noise)
    noise = Noise(generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        denoised = model(x, sigma)
        # Euler step to sigma_down, then noise
        x = x + (sigma_down - sigma) * to_d(x, sigma, denoised)
        x = with_noise(x, noise, s_noise * sigma_up)
        x = report(callback, model, i, sigmas, x, denoised)
    return x


@register(SAMPLERS, "dpmpp_2s_ancestral", nfe=ancestral_two_stage, stochastic=True)
def dpmpp_2s_ancestral(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
                       callback: Optional[Callback] = None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1 with r = 1/2) down to sigma_down, then
    ancestral noise up to sigma_next (k-diffusion's sample_dpmpp_2s_ancestral). x [B, ...] -> [B, ...]."""
    require_nonnegative("dpmpp_2s_ancestral", eta=eta, s_noise=s_noise)
    noise = Noise(generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        denoised = model(x, sigma)
        if sigma_down == 0:
            # nothing left to solve: jump to the denoised estimate
            x = first_order(x, denoised, sigma, sigma_down)
        else:
            # single-step second order: first-order to the log-sigma midpoint, then the full step with its estimate
            sigma_mid = math.sqrt(sigma * sigma_down)
            denoised = model(first_order(x, denoised, sigma, sigma_mid), sigma_mid)
            x = first_order(x, denoised, sigma, sigma_down)
        # ancestral noise
        x = with_noise(x, noise, s_noise * sigma_up)
        x = report(callback, model, i, sigmas, x, denoised)
    return x


@register(SAMPLERS, "dpmpp_sde", nfe=two_per_step_but_last, stochastic=True)
def dpmpp_sde(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
              callback: Optional[Callback] = None, eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5) -> torch.Tensor:
    """Stochastic DPM-Solver++ (k-diffusion's sample_dpmpp_sde): a two-stage DPM-Solver++
    step (Lu et al. 2022b, Alg. 1 with intermediate point s = t + r h in lambda = -log sigma)
    in which each stage is ancestral, i.e. ends eta-wise below its target and adds fresh
    noise (two draws per step). eta = 0 is deterministic DPM-Solver++(2S). x [B, ...] -> [B, ...]."""
    if not 0 < r <= 1:
        raise ValueError(f"dpmpp_sde: r is the intermediate point's fraction of the step in log sigma, must be in (0, 1], got {r}")
    require_nonnegative("dpmpp_sde", eta=eta, s_noise=s_noise)
    noise = Noise(generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        if sigma_next == 0:
            # last step: Euler
            x = x + (sigma_next - sigma) * to_d(x, sigma, denoised)
        else:
            # stage 1: ancestral first-order step to sigma_s = sigma^(1-r) sigma_next^r
            sigma_s = sigma ** (1 - r) * sigma_next**r
            sigma_down, sigma_up = ancestral_step(sigma, sigma_s, eta)
            x_s = with_noise(first_order(x, denoised, sigma, sigma_down), noise, s_noise * sigma_up)
            denoised_s = model(x_s, sigma_s)
            # stage 2: ancestral step to sigma_next with the extrapolated estimate
            sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
            fac = 1 / (2 * r)
            denoised = (1 - fac) * denoised + fac * denoised_s
            x = with_noise(first_order(x, denoised, sigma, sigma_down), noise, s_noise * sigma_up)
        x = report(callback, model, i, sigmas, x, denoised)
    return x


@register(SAMPLERS, "ddpm", nfe=one_per_step, stochastic=True)
def ddpm(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
         callback: Optional[Callback] = None) -> torch.Tensor:
    """Ancestral sampling of Ho et al. 2020 (Alg. 2) in sigma space: x_next is drawn from the
    forward-process posterior q(x_next | x, x0 = denoised) (Eqs. 6-7), which for
    x = x_next + sqrt(sigma^2 - sigma_next^2) z has mean x0 + (sigma_next / sigma)^2 (x - x0)
    and variance sigma_next^2 (1 - (sigma_next / sigma)^2). x [B, ...] -> [B, ...]."""
    noise = Noise(generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        # posterior mean and standard deviation
        ratio2 = (sigma_next / sigma) ** 2
        mean = denoised + ratio2 * (x - denoised)
        x = with_noise(mean, noise, sigma_next * math.sqrt(1 - ratio2))
        x = report(callback, model, i, sigmas, x, denoised)
    return x


@register(SAMPLERS, "ddim", nfe=one_per_step, stochastic=False)
def ddim(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
         callback: Optional[Callback] = None, eta: float = 0.0) -> torch.Tensor:
    """Song et al. 2021 (DDIM), Eq. 12 in sigma space: x_next = x0 + sqrt(sigma_next^2 - s^2) eps + s z
    with eps = (x - x0) / sigma and s = eta sigma_next sqrt(1 - (sigma_next / sigma)^2) (Eq. 16).
    eta = 0 is deterministic (equal to :func:`euler`); eta = 1 is :func:`ddpm`. x [B, ...] -> [B, ...]."""
    require_nonnegative("ddim", eta=eta)
    noise = Noise(generator)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        denoised = model(x, sigma)
        # predicted x0 and eps, recombined at the lower noise level, plus fresh noise
        s_eta = ancestral_step(sigma, sigma_next, eta)[1]
        eps = to_d(x, sigma, denoised)
        x = with_noise(denoised + math.sqrt(sigma_next**2 - s_eta**2) * eps, noise, s_eta)
        x = report(callback, model, i, sigmas, x, denoised)
    return x


def get_sampler(name: str) -> Callable:
    """The registered sampler called ``name``; ValueError listing the known names otherwise."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; known samplers: {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


SAMPLERS.update(MULTISTEP)
