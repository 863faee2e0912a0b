"""Gaussian-mixture data: a target whose ideal denoiser and ODE solution are known exactly.

For data p(x0) = sum_k pi_k N(mu_k, s_k^2 I) in d dimensions, the noisy marginal at level
sigma is sum_k pi_k N(mu_k, (s_k^2 + sigma^2) I), and the minimum-MSE denoiser is

    D(x, sigma) = sum_k w_k(x, sigma) [mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)],
    w_k proportional to pi_k N(x; mu_k, (s_k^2 + sigma^2) I).

Solvers are measured against the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma
(Karras et al. 2022, Eq. 4) solved with a fine classical Runge-Kutta integrator in
log sigma (to about 1e-10 in float64), so solver error and convergence order can be
asserted instead of eyeballed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class GaussianMixture:
    """Mixture weights [K], means [K, d] and per-component standard deviations [K]."""

    weights: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """The exact D(x [B, d], sigma [B]) -> [B, d], computed in float64."""
        x64 = x.to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1)  # [B]
        mu = self.means.to(torch.float64)[None]  # [1, K, d]
        w = self.denoiser_weights(x64, sigma)[..., None]  # [B, K, 1]
        var_k = (self.stds.to(torch.float64) ** 2)[None, :, None]  # [1, K, 1]
        shrink = var_k / (var_k + sigma.reshape(-1, 1, 1) ** 2)  # [B, K, 1]
        diff = x64[:, None, :] - mu  # [B, K, d]
        return (w * (mu + shrink * diff)).sum(1).to(x.dtype)  # [B, d]

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """n draws from the data distribution [n, d] (float64)."""
        k = torch.multinomial(self.weights.to(torch.float64), n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        return self.means.to(torch.float64)[k] + self.stds.to(torch.float64)[k, None] * z

    def component_of(self, x: torch.Tensor) -> torch.Tensor:
        """Index [B] of the component with the highest posterior for clean points x [B, d]."""
        return self.denoiser_weights(x, torch.zeros(x.shape[0], dtype=torch.float64)).argmax(1)

    def denoiser_weights(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Posterior component probabilities w_k(x, sigma) [B, K]."""
        x64 = x.to(torch.float64)
        var = (self.stds.to(torch.float64) ** 2)[None] + sigma.to(torch.float64).reshape(-1, 1) ** 2  # [B, K]
        d2 = ((x64[:, None, :] - self.means.to(torch.float64)[None]) ** 2).sum(-1)  # [B, K]
        log_w = self.weights.to(torch.float64).log()[None] - 0.5 * (d2 / var + self.dim * var.log())
        return torch.softmax(log_w, dim=1)


def example_mixture(dim: int = 2) -> GaussianMixture:
    """A fixed, asymmetric three-component mixture with unit-scale data (used by tests and bench)."""
    g = torch.Generator().manual_seed(1234)
    means = torch.randn(3, dim, generator=g, dtype=torch.float64) * 1.5
    return GaussianMixture(
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64),
        means=means,
        stds=torch.tensor([0.3, 0.5, 0.2], dtype=torch.float64),
    )


def ode_reference(mixture: GaussianMixture, x: torch.Tensor, sigma_max: float, steps: int = 4000,
                  sigma_end: float = 1e-7) -> torch.Tensor:
    """The probability-flow ODE solution at sigma = 0 from x [B, d] at sigma_max.

    Classical RK4 in u = log sigma (dx/du = x - D(x, e^u)) from log sigma_max down to
    log sigma_end, then the final jump x(0) = D(x, sigma_end), whose error is
    O(sigma_end^2). With the default 4000 steps the error is far below 1e-8.
    """
    x = x.to(torch.float64)
    u0, u1 = math.log(sigma_max), math.log(sigma_end)
    h = (u1 - u0) / steps

    def f(x: torch.Tensor, u: float) -> torch.Tensor:
        sigma = torch.full((x.shape[0],), math.exp(u), dtype=torch.float64)
        return x - mixture.denoiser(x, sigma)

    for i in range(steps):
        u = u0 + i * h
        k1 = f(x, u)
        k2 = f(x + h / 2 * k1, u + h / 2)
        k3 = f(x + h / 2 * k2, u + h / 2)
        k4 = f(x + h * k3, u + h)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return mixture.denoiser(x, torch.full((x.shape[0],), sigma_end, dtype=torch.float64))
