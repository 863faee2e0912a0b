"""Sigma discretizations for sampling, DDPM beta tables, and sigma <-> alpha / t conversions.

Every schedule function returns a float64 tensor of ``n + 1`` values: ``n`` strictly
decreasing positive noise levels followed by a final ``0``. ``n`` is the number of solver
steps (not the number of denoiser evaluations, which depends on the solver).

Noise level ``sigma`` is the standard deviation of the noise in the variance-exploding
parameterization ``x = x0 + sigma * eps`` (Karras et al. 2022, "EDM", §2). A variance-
preserving model with ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`` has
``sigma = sqrt((1 - abar) / abar)`` and sees ``x_t = x / sqrt(1 + sigma^2)``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

Schedule = Callable[..., torch.Tensor]
ALPHA_BAR_FLOOR = 2.0**-24  # stands in for alpha_bar = 0 under a zero-terminal-SNR table


# ---------------------------------------------------------------- conversions

def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """sigma = sqrt((1 - abar) / abar) for a VP cumulative alpha ``abar`` in (0, 1]."""
    alpha_bar = torch.as_tensor(alpha_bar, dtype=torch.float64).clamp(min=ALPHA_BAR_FLOOR)
    return ((1 - alpha_bar) / alpha_bar).sqrt()


def alpha_bar_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """abar = 1 / (1 + sigma^2), the inverse of :func:`sigma_from_alpha_bar`."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return 1.0 / (1.0 + sigma**2)


def sigma_from_flow_t(t: torch.Tensor) -> torch.Tensor:
    """Rectified flow ``x_t = (1 - t) x0 + t eps`` is ``x0 + sigma eps`` scaled by (1 - t): sigma = t / (1 - t)."""
    t = torch.as_tensor(t, dtype=torch.float64)
    return t / (1 - t)


def flow_t_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """t = sigma / (1 + sigma), the inverse of :func:`sigma_from_flow_t`."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    return sigma / (1 + sigma)


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas.to(torch.float64), sigmas.new_zeros(1, dtype=torch.float64)])


def _check_range(n: int, sigma_min: float, sigma_max: float) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {n}")
    if not (0 < sigma_min < sigma_max) or not math.isfinite(sigma_max):
        raise ValueError(f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}")


# ---------------------------------------------------------------- sampling schedules

def karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, Eq. 5: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    _check_range(n, sigma_min, sigma_max)
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    inv_min, inv_max = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((inv_max + ramp * (inv_min - inv_max)) ** rho)


def exponential(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Geometric spacing: log sigma uniform from log sigma_max to log sigma_min.

    Since logSNR = -2 log sigma, this is also the uniform-logSNR (uniform lambda) spacing
    of DPM-Solver (Lu et al. 2022, §3.3).
    """
    _check_range(n, sigma_min, sigma_max)
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64).exp())


def logsnr_uniform(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Uniform in logSNR lambda = -2 log sigma (DPM-Solver's 'logSNR' time steps); equal to :func:`exponential`."""
    return exponential(n, sigma_min, sigma_max)


def polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0) -> torch.Tensor:
    """log sigma interpolated along ramp**rho (k-diffusion's polyexponential); rho = 1 is exponential."""
    _check_range(n, sigma_min, sigma_max)
    ramp = torch.linspace(1, 0, n, dtype=torch.float64) ** rho
    return _append_zero((ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min)).exp())


def vp_continuous(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3) -> torch.Tensor:
    """Continuous VP-SDE (Song et al. 2021, Eq. 33) at t uniform in [1, eps_s]:
    sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    if int(n) != n or n < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {n}")
    t = torch.linspace(1, eps_s, n, dtype=torch.float64)
    return _append_zero(torch.special.expm1(beta_d * t**2 / 2 + beta_min * t).sqrt())


def flow_shift(n: int, sigma_min: float, sigma_max: float, shift: float = 3.0) -> torch.Tensor:
    """Flow-matching time shift (Esser et al. 2024, SD3 §5.3.2): t' = s t / (1 + (s - 1) t).

    Uniform steps in the unshifted time u, mapped through the shift, between the times
    that correspond to sigma_max and sigma_min (sigma = t' / (1 - t')). shift > 1 spends
    more steps at high noise.
    """
    _check_range(n, sigma_min, sigma_max)
    if shift <= 0:
        raise ValueError(f"flow shift must be > 0, got {shift}")

    def unshift(t: float) -> float:  # inverse of t' = s u / (1 + (s - 1) u)
        return t / (shift - (shift - 1) * t)

    t_hi, t_lo = (float(flow_t_from_sigma(torch.tensor(s))) for s in (sigma_max, sigma_min))
    u = torch.linspace(unshift(t_hi), unshift(t_lo), n, dtype=torch.float64)
    t = shift * u / (1 + (shift - 1) * u)
    return _append_zero(sigma_from_flow_t(t))


def gits(denoiser: Callable[..., torch.Tensor], shape: tuple[int, ...], n: int, sigma_min: float, sigma_max: float,
         grid_size: int = 80, substeps: int = 4, seed: int = 0, cond: object = None) -> torch.Tensor:
    """Geometry-inspired time scheduling (Chen et al. 2024, "On the Trajectory Regularity of
    ODE-based Diffusion Sampling", GITS, Alg. 1), fitted to a given denoiser.

    Pilot points x = sigma_max z (z [P, ...] of ``shape`` from ``seed``) follow a fine teacher
    ODE solution (Heun in log sigma, ``substeps`` per interval) over a log-uniform grid of
    ``grid_size`` levels from sigma_max to sigma_min, followed by sigma = 0. The cost of a
    jump from grid level i to j is the mean squared deviation of one first-order (Euler /
    DDIM) step from the teacher at j; dynamic programming picks the ``n`` jumps of least
    total cost from sigma_max to 0, so the last nonzero level is chosen too. Deterministic
    given the denoiser; the pilot seed is independent of any sampling seed.
    """
    _check_range(n, sigma_min, sigma_max)
    grid = exponential(grid_size, sigma_min, sigma_max)[:-1].tolist()

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return denoiser(x, torch.full((x.shape[0],), sigma, dtype=x.dtype), cond).to(torch.float64)

    # ---- teacher trajectory on the grid (Heun in u = log sigma: dx/du = x - D)
    x = sigma_max * torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    xs, den = [x], [denoise(x, grid[0])]
    for s0, s1 in zip(grid[:-1], grid[1:]):
        u = torch.linspace(math.log(s0), math.log(s1), substeps + 1, dtype=torch.float64).tolist()
        d = x - den[-1]
        for u0, u1 in zip(u[:-1], u[1:]):
            x_euler = x + (u1 - u0) * d
            d_next = x_euler - denoise(x_euler, math.exp(u1))
            x = x + (u1 - u0) / 2 * (d + d_next)
            d = x - denoise(x, math.exp(u1))
        xs.append(x)
        den.append(x - d)
    nodes, targets = grid + [0.0], xs + [den[-1]]

    # ---- cost of one first-order step between every pair of levels
    size = len(nodes)
    cost = torch.full((size, size), math.inf, dtype=torch.float64)
    for i in range(size - 1):
        for j in range(i + 1, size):
            ratio = nodes[j] / nodes[i]
            step = ratio * xs[i] + (1 - ratio) * den[i]
            cost[i, j] = ((step - targets[j]) ** 2).mean()

    # ---- dynamic programming: n jumps of least total cost from sigma_max to 0
    total = torch.full((size,), math.inf, dtype=torch.float64)
    total[0] = 0.0
    back = []
    for _ in range(n):
        total, arg = (total[:, None] + cost).min(0)
        back.append(arg)
    path = [size - 1]
    for arg in reversed(back):
        path.append(int(arg[path[-1]]))
    return torch.tensor([nodes[p] for p in reversed(path)], dtype=torch.float64)


# ---------------------------------------------------------------- DDPM beta tables

def betas_linear(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Ho et al. 2020, §4: betas linear from 1e-4 to 0.02 over T = 1000 steps."""
    return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)


def betas_scaled_linear(num_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """Latent diffusion's table: sqrt(beta) linear (Rombach et al. 2022; Stable Diffusion)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def betas_cosine(num_timesteps: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021, Eq. 17: abar(t) = cos^2((t/T + s) / (1 + s) * pi / 2), betas clipped at 0.999."""
    t = torch.arange(num_timesteps + 1, dtype=torch.float64) / num_timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(abar) so the last step has SNR 0."""
    sqrt_ab = torch.cumprod(1 - betas.to(torch.float64), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alpha_bar = sqrt_ab**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1 - alphas


BETA_TABLES: dict[str, Callable[..., torch.Tensor]] = {
    "linear": betas_linear,
    "scaled_linear": betas_scaled_linear,
    "cosine": betas_cosine,
}


NOISE_TABLE_KEYS = ("num_timesteps", "beta_schedule", "beta_start", "beta_end", "zero_terminal_snr", "prediction")
PREDICTIONS = ("eps", "v", "x0")


def table_betas(table: dict) -> torch.Tensor:
    """The betas [T] (float64) of a discrete model's noise table, a plain dict as stored in a model folder:
    ``num_timesteps``, ``beta_schedule`` (one of :data:`BETA_TABLES`), ``beta_start``/``beta_end`` (linear
    tables only), ``zero_terminal_snr`` (rescale, Lin et al. 2023) and ``prediction`` (eps | v | x0, what
    the network outputs; checked here, used by :class:`~diffuse.precond.DiscreteVPDenoiser`)."""
    unknown = sorted(set(table) - set(NOISE_TABLE_KEYS))
    if unknown:
        raise ValueError(f"unknown noise_table key {unknown[0]!r}; known keys: {', '.join(NOISE_TABLE_KEYS)}")
    schedule = table.get("beta_schedule")
    if schedule not in BETA_TABLES:
        raise ValueError(f"noise_table.beta_schedule {schedule!r} is not one of: {', '.join(BETA_TABLES)}")
    if table.get("prediction") not in PREDICTIONS:
        raise ValueError(f"noise_table.prediction {table.get('prediction')!r} is not one of: {', '.join(PREDICTIONS)}")
    options = {k: float(table[k]) for k in ("beta_start", "beta_end") if k in table}
    if schedule == "cosine" and options:
        raise ValueError("noise_table: a cosine table has no beta_start/beta_end; remove them")
    betas = BETA_TABLES[schedule](int(table.get("num_timesteps", 1000)), **options)
    return rescale_zero_terminal_snr(betas) if table.get("zero_terminal_snr", False) else betas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """abar_t = prod_{s <= t} (1 - beta_s)."""
    return torch.cumprod(1 - betas.to(torch.float64), 0)


def vp_timesteps(n: int, num_timesteps: int, spacing: str = "trailing") -> torch.Tensor:
    """Descending integer timesteps of a discrete model for ``n`` steps.

    Spacings as named by Lin et al. 2023, Table 2: ``linspace`` (uniform, both ends
    included), ``leading`` (DDIM's ``arange(0, T, T // n)`` + 1 offset omitted),
    ``trailing`` (``round(arange(T, 0, -T / n)) - 1``, which starts at the last timestep).
    """
    if int(n) != n or not 1 <= n <= num_timesteps:
        raise ValueError(f"number of steps must be an integer in [1, {num_timesteps}], got {n}")
    if spacing in ("uniform", "linspace"):
        t = torch.linspace(0, num_timesteps - 1, n, dtype=torch.float64).round()
    elif spacing == "leading":
        t = torch.arange(n, dtype=torch.float64) * (num_timesteps // n)
    elif spacing == "trailing":
        t = (torch.arange(num_timesteps, 0, -num_timesteps / n, dtype=torch.float64)).round() - 1
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}; use one of: linspace, leading, trailing")
    return t.long().flip(0) if spacing != "trailing" else t.long()


def vp_discrete(n: int, alpha_bar: torch.Tensor, spacing: str = "trailing") -> torch.Tensor:
    """Sigmas of a discrete VP model's timesteps chosen by :func:`vp_timesteps`, then 0."""
    t = vp_timesteps(n, len(alpha_bar), spacing)
    return _append_zero(sigma_from_alpha_bar(alpha_bar[t]))


SCHEDULES: dict[str, Schedule] = {
    "karras": karras,
    "exponential": exponential,
    "logsnr": logsnr_uniform,
    "polyexponential": polyexponential,
    "vp": vp_continuous,
    "flow_shift": flow_shift,
}


def get_sigmas(name: str, n: int, sigma_min: float, sigma_max: float, **options) -> torch.Tensor:
    """Look up a schedule by name and build ``n`` steps between ``sigma_max`` and ``sigma_min``."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known schedules: {', '.join(sorted(SCHEDULES))}")
    if name == "vp":
        return vp_continuous(n, **options)
    return SCHEDULES[name](n, sigma_min, sigma_max, **options)
