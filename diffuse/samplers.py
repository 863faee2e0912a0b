"""Single-step samplers and the SAMPLERS registry.

Every sampler has the signature of :mod:`diffuse.steps`::

    fn(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, **options) -> Tensor

Multistep solvers live in :mod:`diffuse.samplers_multistep` and join the same registry.
"""

from __future__ import annotations

from typing import Callable

from .samplers_multistep import MULTISTEP

SAMPLERS: dict[str, Callable] = {}

# (single-step samplers are registered here with @register(SAMPLERS, name, nfe=..., stochastic=...))

SAMPLERS.update(MULTISTEP)
