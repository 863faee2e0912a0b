"""What every sampler shares: input checks, the sampler registry, NFE counting, StepInfo.

A sampler is a plain function over a descending sigma array ending in 0::

    fn(denoiser, x, sigmas, cond=None, *, generator=None, callback=None, **options) -> Tensor

where ``x`` is the initial noise already scaled by ``sigmas[0]``. Samplers are registered
with :func:`register`, which wraps them so that every public entry point

* checks its inputs and raises one clear ``ValueError`` (sigmas not descending, not
  ending in 0, too short, non-finite x, unknown options, a generator list of the wrong
  length),
* counts denoiser evaluations (``StepInfo.nfe``), and knows the exact count in advance
  (``SAMPLERS[name].nfe(sigmas, **options)``),
* never changes ``x`` in place, so a callback that raises to cancel leaves nothing behind,
* applies an optional post-step correction ``post_step(StepInfo) -> x`` after every solver
  step (e.g. :class:`diffuse.corrections.DCW`): the corrected x is what the sampler carries
  on from (and what the callback sees). Samplers get it through :func:`report`, whose return
  value is the state to continue from; without a correction it is the same tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .precond import Denoiser
from .rng import Generators, check_generators, randn_like

Callback = Callable[["StepInfo"], None]
PostStep = Callable[["StepInfo"], torch.Tensor]
NfeRule = Callable[..., int]


@dataclass(frozen=True)
class StepInfo:
    """Reported after each solver step ``i`` of ``n`` (from ``sigma`` to ``sigma_next``).

    ``x`` is the state at ``sigma_next``; ``denoised`` the latest x0 estimate; ``nfe``
    the denoiser evaluations so far. A callback may raise to stop sampling.
    """

    i: int
    n: int
    sigma: float
    sigma_next: float
    x: torch.Tensor
    denoised: torch.Tensor
    nfe: int


class CountingDenoiser:
    """Calls D with sigma broadcast to [B] and counts the calls."""

    def __init__(self, denoiser: Denoiser, cond: Any):
        self.denoiser = denoiser
        self.cond = cond
        self.nfe = 0

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        self.nfe += 1
        sigma_vec = torch.full((x.shape[0],), float(sigma), dtype=x.dtype, device=x.device)
        return self.denoiser(x, sigma_vec, self.cond).to(x.dtype)


def report(hook: Optional[PostStep], model: CountingDenoiser, i: int, sigmas: list[float], x: torch.Tensor,
           denoised: torch.Tensor) -> torch.Tensor:
    """End of solver step i (sigmas[i] -> sigmas[i+1]): pass a StepInfo to the step hook that
    :func:`register` built (post-step correction, then the user's callback) and return the x to
    continue from -- ``x`` itself when there is no correction, so an uncorrected run is bit-identical."""
    if hook is None:
        return x
    return hook(StepInfo(i, len(sigmas) - 1, sigmas[i], sigmas[i + 1], x, denoised, model.nfe))


def step_hook(post_step: Optional[PostStep], callback: Optional[Callback]) -> Optional[PostStep]:
    """The hook :func:`report` calls: correct x (if ``post_step``), then show ``callback`` the
    corrected state; returns the corrected x (the callback's return value is ignored)."""
    if post_step is None and callback is None:
        return None

    def hook(info: StepInfo) -> torch.Tensor:
        x = info.x if post_step is None else post_step(info)
        if callback is not None:
            callback(info if x is info.x else dataclasses.replace(info, x=x))
        return x

    return hook


class Noise:
    """Per-image Gaussian noise for stochastic steps: ``noise(x)`` draws N(0, I) shaped like x."""

    def __init__(self, generator: Generators):
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return randn_like(x, self.generator)


def check_sigmas(sigmas: torch.Tensor | list[float]) -> list[float]:
    """Validate a sampling schedule and return it as a list of Python floats."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu()
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D array of at least 2 values ending in 0, got shape {tuple(s.shape)}; build one with diffuse.schedules.karras(n, sigma_min, sigma_max)")
    if not torch.isfinite(s).all():
        raise ValueError("sigmas contain NaN or inf; every noise level must be a finite number")
    if s[-1] != 0:
        raise ValueError(f"sigmas must end in 0 (the clean image), got last value {float(s[-1])}; append a 0")
    if not (s[:-1] > s[1:]).all():
        bad = int(torch.nonzero(s[:-1] <= s[1:])[0])
        raise ValueError(f"sigmas must be strictly descending, but sigmas[{bad}]={float(s[bad])} <= sigmas[{bad + 1}]={float(s[bad + 1])}")
    return s.tolist()


def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 2:
        raise ValueError("x must be a tensor of shape [B, ...] holding the initial noise times sigmas[0]")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if not torch.isfinite(x).all():
        raise ValueError("x contains NaN or inf; start from finite noise, e.g. sigmas[0] * torch.randn(...)")


def register(registry: dict[str, Callable], name: str, *, nfe: NfeRule, stochastic: bool) -> Callable[[Callable], Callable]:
    """Decorator: check inputs, count NFE, and add the sampler to ``registry`` under ``name``.

    ``nfe(steps, sigmas, **options)`` gives the exact number of denoiser evaluations for
    ``steps = len(sigmas) - 1`` solver steps.
    """

    def wrap(fn: Callable) -> Callable:
        params = inspect.signature(fn).parameters
        option_defaults = {k: p.default for k, p in params.items() if p.kind == p.KEYWORD_ONLY and k not in ("generator", "callback")}

        @functools.wraps(fn)
        def sampler(denoiser: Denoiser, x: torch.Tensor, sigmas, cond: Any = None, *, generator: Generators = None,
                    callback: Optional[Callback] = None, post_step: Optional[PostStep] = None, **options: Any) -> torch.Tensor:
            unknown = sorted(set(options) - set(option_defaults))
            if unknown:
                known = ", ".join(sorted(option_defaults)) or "none"
                raise ValueError(f"sampler {name!r} does not take option(s) {', '.join(unknown)}; its options are: {known}")
            sigma_list = check_sigmas(sigmas)
            _check_x(x)
            check_generators(generator, x.shape[0])
            model = CountingDenoiser(denoiser, cond)
            out = fn(model, x, sigma_list, generator=generator, callback=step_hook(post_step, callback), **options)
            expected = sampler.nfe(sigmas, **options)
            assert model.nfe == expected, f"{name}: counted {model.nfe} evaluations, rule says {expected}"
            return out

        def count(sigmas, **options: Any) -> int:
            s = check_sigmas(sigmas)
            return nfe(len(s) - 1, s, **{**option_defaults, **options})

        sampler.nfe = count
        sampler.stochastic = stochastic
        sampler.options = dict(option_defaults)
        if name in registry:
            raise ValueError(f"sampler {name!r} registered twice")
        registry[name] = sampler
        return sampler

    return wrap


# ---------------------------------------------------------------- shared step arithmetic

def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """Probability-flow ODE derivative dx/dsigma = (x - D(x, sigma)) / sigma (EDM Eq. 4 with s(t) = 1)."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step sigma -> sigma_next into a deterministic part down to sigma_down and
    fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2
    (the DDPM ancestral step written in sigma space; eta = 0 is deterministic)."""
    if eta == 0 or sigma_next == 0:
        return sigma_next, 0.0
    sigma_up = min(sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2))
    sigma_down = math.sqrt(sigma_next**2 - sigma_up**2)
    return sigma_down, sigma_up
