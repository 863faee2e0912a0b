"""Training-time noise-level distributions p_train(sigma).

Each distribution draws sigma [B] (float32) from a ``torch.Generator``:

* ``lognormal``: ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1, 'ours').
* ``logit_normal``: flow time t = sigmoid(m + s n), sigma = t / (1 - t) (Esser et al. 2024, Eq. 19).
* ``discrete``: t uniform over a DDPM table's timesteps, sigma = sqrt((1 - abar_t) / abar_t)
  (Ho et al. 2020, Algorithm 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import schedules


@dataclass(frozen=True)
class NoiseLevels:
    """Settings of the training noise-level distribution (see module docstring)."""

    kind: str = "lognormal"
    p_mean: float = -1.2  # lognormal: mean of ln sigma; logit_normal: mean m of the logit
    p_std: float = 1.2  # lognormal: std of ln sigma; logit_normal: std s of the logit
    beta_schedule: str = "linear"  # discrete: DDPM table
    num_timesteps: int = 1000  # discrete: table length
    t_eps: float = 1e-3  # logit_normal: t is kept in [t_eps, 1 - t_eps]

    def __post_init__(self) -> None:
        if self.kind not in NOISE_LEVEL_KINDS:
            raise ValueError(f"unknown noise-level distribution {self.kind!r}; known: {', '.join(NOISE_LEVEL_KINDS)}")
        if self.kind == "discrete" and self.beta_schedule not in schedules.BETA_TABLES:
            raise ValueError(f"unknown beta schedule {self.beta_schedule!r}; known: {', '.join(schedules.BETA_TABLES)}")
        if self.p_std <= 0:
            raise ValueError(f"p_std must be > 0, got {self.p_std}")

    def table_sigmas(self) -> torch.Tensor:
        """The discrete table's sigmas [T] (ascending in t)."""
        betas = schedules.BETA_TABLES[self.beta_schedule](self.num_timesteps)
        return schedules.sigma_from_alpha_bar(schedules.alphas_cumprod(betas))

    def sample(self, batch: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Draw sigma [batch] (float32)."""
        if self.kind == "lognormal":
            n = torch.randn(batch, generator=generator, dtype=torch.float64)
            return (self.p_mean + self.p_std * n).exp().float()
        if self.kind == "logit_normal":
            n = torch.randn(batch, generator=generator, dtype=torch.float64)
            t = torch.sigmoid(self.p_mean + self.p_std * n).clamp(self.t_eps, 1 - self.t_eps)
            return schedules.sigma_from_flow_t(t).float()
        t = torch.randint(0, self.num_timesteps, (batch,), generator=generator)
        return self.table_sigmas()[t].float()


NOISE_LEVEL_KINDS = ("lognormal", "logit_normal", "discrete")
