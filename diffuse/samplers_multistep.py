"""Multistep samplers: they reuse earlier denoiser outputs (history kept in loop-local variables).

Every sampler makes exactly one denoiser evaluation per step (NFE = steps) and has the
signature of :mod:`diffuse.steps`. Notation: ``sigma`` is the noise level of the current
point, ``lambda = -log sigma`` the half log-SNR (DPM-Solver's lambda with alpha = 1),
``h = lambda_next - lambda`` the step size, ``denoised = D(x, sigma)`` the data
prediction and ``d = (x - denoised) / sigma`` the noise prediction (= dx/dsigma).

Names shared with k-diffusion (``lms``, ``dpmpp_2m``, ``dpmpp_2m_sde``, ``dpmpp_3m_sde``)
compute the same function as k-diffusion's ``sample_<name>``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from .rng import Generators
from .steps import Callback, CountingDenoiser, Noise, register, report, to_d

MULTISTEP: dict[str, Callable] = {}


def _one_per_step(steps: int, sigmas: list[float], **options) -> int:
    """NFE rule of every multistep sampler here: one denoiser evaluation per step."""
    return steps


def _check_order(name: str, order: int, highest: int) -> None:
    if int(order) != order or not 1 <= order <= highest:
        raise ValueError(f"{name}: order must be an integer in [1, {highest}], got {order}")


# ---------------------------------------------------------------- shared arithmetic

def _lagrange_basis(nodes: Sequence[float], j: int) -> list[float]:
    """Ascending power coefficients of the Lagrange basis polynomial l_j over ``nodes``
    (l_j(nodes[j]) = 1, l_j(nodes[k]) = 0 for k != j)."""
    coeffs = [1.0]
    for k, t_k in enumerate(nodes):
        if k == j:
            continue
        scale = nodes[j] - t_k
        shifted = [0.0] * (len(coeffs) + 1)
        for p, c in enumerate(coeffs):  # coeffs * (t - t_k) / scale
            shifted[p + 1] += c / scale
            shifted[p] -= c * t_k / scale
        coeffs = shifted
    return coeffs


def _lagrange_integrals(nodes: Sequence[float], a: float, b: float) -> list[float]:
    """Exact integrals int_a^b l_j(t) dt of every Lagrange basis polynomial over ``nodes``
    (float64; the variable is shifted to start at ``a`` for conditioning)."""
    shifted = [t - a for t in nodes]
    length = b - a
    return [sum(c * length ** (p + 1) / (p + 1) for p, c in enumerate(_lagrange_basis(shifted, j)))
            for j in range(len(nodes))]


def _lagrange_exp_integrals(nodes: Sequence[float], b: float) -> list[float]:
    """Exact integrals int_0^b l_j(v) e^v dv (``b`` may be -inf), using the antiderivative
    e^v Q(v) with Q = P - P' + P'' - ... for the polynomial P = l_j."""
    out = []
    for j in range(len(nodes)):
        poly = _lagrange_basis(nodes, j)
        q = [0.0] * len(poly)
        sign, deriv = 1.0, poly
        while deriv:
            for p, c in enumerate(deriv):
                q[p] += sign * c
            deriv = [p * c for p, c in enumerate(deriv)][1:]
            sign = -sign
        at_b = 0.0 if b == -math.inf else math.exp(b) * sum(c * b**p for p, c in enumerate(q))
        out.append(at_b - q[0])
    return out


def _combine(tensors: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """sum_j coeffs[j] * tensors[j] (a new tensor)."""
    out = tensors[0] * coeffs[0]
    for t, c in zip(tensors[1:], coeffs[1:]):
        out = out + t * c
    return out


def _lam(sigma: float) -> float:
    """lambda = -log sigma (half log-SNR for alpha = 1); +inf at sigma = 0."""
    return math.inf if sigma == 0 else -math.log(sigma)


# ---------------------------------------------------------------- linear multistep

@register(MULTISTEP, "lms", nfe=_one_per_step, stochastic=False)
def lms(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
        callback: Optional[Callback] = None, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) on dx/dsigma = d in the sigma variable, as in
    k-diffusion's ``sample_lms`` (Karras et al. 2022, §3 cites it; Crowson's k-diffusion).

    x_{i+1} = x_i + sum_j d_{i-j} int_{sigma_i}^{sigma_{i+1}} l_j(s) ds, with l_j the Lagrange
    basis over sigma_i, ..., sigma_{i-order+1}; warm start with lower orders. x: [B, ...].
    """
    _check_order("lms", order, 8)
    ds: list[torch.Tensor] = []  # newest first
    for i in range(len(sigmas) - 1):
        # ---- evaluate the derivative at the current point
        denoised = model(x, sigmas[i])
        ds = [to_d(x, sigmas[i], denoised)] + ds[: order - 1]
        # ---- Adams-Bashforth step with exactly integrated Lagrange coefficients
        coeffs = _lagrange_integrals(sigmas[i - len(ds) + 1: i + 1][::-1], sigmas[i], sigmas[i + 1])
        x = x + _combine(ds, coeffs)
        x = report(callback, model, i, sigmas, x, denoised)
    return x


# ---------------------------------------------------------------- improved PNDM

IPNDM_COEFFS = ([1.0], [3 / 2, -1 / 2], [23 / 12, -16 / 12, 5 / 12], [55 / 24, -59 / 24, 37 / 24, -9 / 24])


@register(MULTISTEP, "ipndm", nfe=_one_per_step, stochastic=False)
def ipndm(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
          callback: Optional[Callback] = None, order: int = 4) -> torch.Tensor:
    """Improved PNDM (Zhang & Chen 2023, "DEIS", §5 / App. D, Eq. 16 with the warm start of
    Liu et al. 2022's PNDM replaced by lower-order multistep): Adams-Bashforth with the
    fixed equal-step coefficients of orders 1-4 on dx/dsigma = d. x: [B, ...].
    """
    _check_order("ipndm", order, 4)
    ds: list[torch.Tensor] = []  # newest first
    for i in range(len(sigmas) - 1):
        # ---- evaluate the derivative at the current point
        denoised = model(x, sigmas[i])
        ds = [to_d(x, sigmas[i], denoised)] + ds[: order - 1]
        # ---- fixed-coefficient Adams-Bashforth step in sigma
        x = x + _combine(ds, IPNDM_COEFFS[len(ds) - 1]) * (sigmas[i + 1] - sigmas[i])
        x = report(callback, model, i, sigmas, x, denoised)
    return x


# ---------------------------------------------------------------- DEIS

@register(MULTISTEP, "deis", nfe=_one_per_step, stochastic=False)
def deis(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
         callback: Optional[Callback] = None, order: int = 3) -> torch.Tensor:
    """DEIS tAB (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential
    Integrator", Eq. 14-15): the exponential integrator x(s_next) = x(s) + int d ds with the
    noise prediction d interpolated by a Lagrange polynomial in log sigma through the last
    ``order`` points. With v = log(s / sigma_i) the coefficients are sigma_i int l_j(v) e^v dv,
    integrated exactly (down to sigma = 0 on the last step). x: [B, ...].
    """
    _check_order("deis", order, 3)
    ds: list[torch.Tensor] = []  # newest first
    for i in range(len(sigmas) - 1):
        # ---- evaluate the noise prediction at the current point
        denoised = model(x, sigmas[i])
        ds = [to_d(x, sigmas[i], denoised)] + ds[: order - 1]
        # ---- exponential-integrator coefficients in v = log(sigma / sigma_i)
        nodes = [math.log(sigmas[i - j] / sigmas[i]) for j in range(len(ds))]
        v_next = -math.inf if sigmas[i + 1] == 0 else math.log(sigmas[i + 1] / sigmas[i])
        coeffs = [sigmas[i] * c for c in _lagrange_exp_integrals(nodes, v_next)]
        x = x + _combine(ds, coeffs)
        x = report(callback, model, i, sigmas, x, denoised)
    return x


# ---------------------------------------------------------------- DPM-Solver++ multistep

def _dpmpp_first_order(x: torch.Tensor, denoised: torch.Tensor, h: float, eta: float) -> torch.Tensor:
    """DPM-Solver++ first-order (SDE when eta > 0) part: e^{-(1+eta) h} x + (1 - e^{-(1+eta) h}) D."""
    return x * math.exp(-(1 + eta) * h) - denoised * math.expm1(-(1 + eta) * h)


def _sde_noise(x: torch.Tensor, noise: Noise, sigma_next: float, h: float, eta: float, s_noise: float) -> torch.Tensor:
    """Add the fresh noise of an SDE step: sigma_next sqrt(1 - e^{-2 eta h}) s_noise z."""
    if eta == 0:
        return x
    return x + noise(x) * (sigma_next * math.sqrt(-math.expm1(-2 * eta * h)) * s_noise)


def _dpmpp_2m_sde(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], noise: Noise,
                  callback: Optional[Callback], eta: float, s_noise: float, solver_type: str) -> torch.Tensor:
    """DPM-Solver++(2M) with optional SDE noise; shared by ``dpmpp_2m`` and ``dpmpp_2m_sde``."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"dpmpp_2m_sde: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            # ---- last step: the data prediction itself
            x = denoised
        else:
            # ---- first-order exponential-integrator step (Lu et al. 2022b, Eq. 9)
            h = _lam(sigmas[i + 1]) - _lam(sigmas[i])
            x = _dpmpp_first_order(x, denoised, h, eta)
            # ---- second-order multistep correction from the previous data prediction (Alg. 2)
            if old_denoised is not None:
                h_eta = (1 + eta) * h
                phi_1 = -math.expm1(-h_eta)
                scale = 0.5 * phi_1 if solver_type == "midpoint" else phi_1 / -h_eta + 1
                x = x + (denoised - old_denoised) * (scale * h / h_last)
            x = _sde_noise(x, noise, sigmas[i + 1], h, eta, s_noise)
            h_last = h
        old_denoised = denoised
        x = report(callback, model, i, sigmas, x, denoised)
    return x


@register(MULTISTEP, "dpmpp_2m", nfe=_one_per_step, stochastic=False)
def dpmpp_2m(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
             callback: Optional[Callback] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, "DPM-Solver++", Algorithm 2): second-order multistep
    exponential integrator on the data prediction in lambda; first order on the first step
    and on the last step to sigma = 0. x: [B, ...]."""
    return _dpmpp_2m_sde(model, x, sigmas, Noise(generator), callback, eta=0.0, s_noise=1.0, solver_type="midpoint")


@register(MULTISTEP, "dpmpp_2m_sde", nfe=_one_per_step, stochastic=True)
def dpmpp_2m_sde(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
                 callback: Optional[Callback] = None, eta: float = 1.0, s_noise: float = 1.0,
                 solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b, §4 and App. B: the SDE solver with the
    data-prediction exponential integrator; eta scales the injected noise, eta = 0 is
    DPM-Solver++(2M)). ``solver_type`` picks the midpoint or Heun form of the second-order
    term. Noise comes from one generator per image. x: [B, ...]."""
    return _dpmpp_2m_sde(model, x, sigmas, Noise(generator), callback, eta, s_noise, solver_type)


@register(MULTISTEP, "dpmpp_3m_sde", nfe=_one_per_step, stochastic=True)
def dpmpp_3m_sde(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
                 callback: Optional[Callback] = None, eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (Lu et al. 2022b, App. B; third-order multistep of Lu et al.
    2022a, "DPM-Solver", Eq. 3.x with divided differences), as in k-diffusion: the data
    prediction extrapolated with first and second divided differences in lambda, the
    phi_2 / phi_3 functions of h (1 + eta), and fresh noise when eta > 0. x: [B, ...]."""
    noise = Noise(generator)
    hist: list[tuple[float, torch.Tensor]] = []  # (h of the step that followed, denoised), newest first
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            # ---- last step: the data prediction itself
            x = denoised
        else:
            # ---- first-order exponential-integrator step
            h = _lam(sigmas[i + 1]) - _lam(sigmas[i])
            h_eta = (1 + eta) * h
            x = _dpmpp_first_order(x, denoised, h, eta)
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            # ---- multistep corrections with divided differences of the data prediction
            if len(hist) >= 2:
                (h_1, denoised_1), (h_2, denoised_2) = hist[:2]
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + d1 * phi_2 - d2 * phi_3
            elif hist:
                h_1, denoised_1 = hist[0]
                x = x + (denoised - denoised_1) * (phi_2 * h / h_1)
            x = _sde_noise(x, noise, sigmas[i + 1], h, eta, s_noise)
            hist = [(h, denoised)] + hist[:1]
        x = report(callback, model, i, sigmas, x, denoised)
    return x


# ---------------------------------------------------------------- UniPC

def _unipc_rhos(rks: Sequence[float], h: float) -> list[float]:
    """Solve R rho = b of UniPC (Zhao et al. 2023, Eq. 8 / Algorithm 2 with B(h) = e^h - 1,
    "bh2", data prediction): R[k][m] = rks[m]^k, b_k = k! phi_{k+1}(h) / B(h) in the
    h -> -h form. A single unknown takes rho = 1/2 as in the paper (App. C)."""
    n = len(rks)
    if n == 1:
        return [0.5]
    hh = -h
    b_h = math.expm1(hh)
    g = math.expm1(hh) / hh - 1  # phi_2-like term, then recursed
    b, factorial = [], 1
    for k in range(1, n + 1):
        b.append(g * factorial / b_h)
        factorial *= k + 1
        g = g / hh - 1 / factorial
    R = torch.tensor([[r**k for r in rks] for k in range(n)], dtype=torch.float64)
    return torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64)).tolist()


def _unipc_update(x: torch.Tensor, sigma: float, sigma_next: float, hist: list[tuple[float, torch.Tensor]],
                  denoised_next: Optional[torch.Tensor]) -> torch.Tensor:
    """One UniPC update of x at ``sigma`` (hist[0] = (lambda, D) there, older points after it)
    to ``sigma_next``: the predictor UniP when ``denoised_next`` is None, else the corrector
    UniC that also uses the data prediction at the predicted point (r = 1)."""
    lam, m0 = hist[0]
    h = _lam(sigma_next) - lam
    rks = [(lam_k - lam) / h for lam_k, _ in hist[1:]]
    diffs = [(m_k - m0) / r for (_, m_k), r in zip(hist[1:], rks)]
    if denoised_next is not None:
        rks.append(1.0)
        diffs.append(denoised_next - m0)
    x_next = x * (sigma_next / sigma) - m0 * math.expm1(-h)
    if diffs:
        x_next = x_next - _combine(diffs, _unipc_rhos(rks, h)) * math.expm1(-h)
    return x_next


@register(MULTISTEP, "unipc", nfe=_one_per_step, stochastic=False)
def unipc(model: CountingDenoiser, x: torch.Tensor, sigmas: list[float], *, generator: Generators = None,
          callback: Optional[Callback] = None, order: int = 2, corrector: bool = True,
          lower_order_final: bool = True) -> torch.Tensor:
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework", Algorithms
    2-3, B(h) = e^h - 1, data prediction): a UniP-``order`` multistep predictor, and after
    each new evaluation the UniC corrector that raises the order by one at no extra NFE
    (the evaluation at the predicted point is reused as history). Warm start with lower
    orders; the last step to sigma = 0 is first order and has no corrector.

    ``order`` defaults to 2 (UniPC-2 with its corrector, third order overall), the paper's advice for
    guided sampling and diffusers' default: on the digits model with CFG 1.5 (Karras, 64 images) the
    RMS distance to a 300-step solution is 0.111 / 0.042 / 0.0058 / 0.0009 at 5 / 10 / 20 / 50 steps
    against 0.295 / 0.106 / 0.0054 / 0.0009 for order 3.

    ``lower_order_final`` (the official code's option of that name, on by default): the order of
    the step from sigma_i is at most the number of steps left, so with few steps the long last
    steps in lambda (Karras schedule, 10 steps: h = 3.2 from 0.05 to sigma_min) do not extrapolate
    a cubic from short earlier steps (order 3 at 10 steps on the digits model: 0.129 -> 0.106). Each
    corrector uses the history its predictor used.

    A post-step correction (see :mod:`diffuse.steps`) acts on the predicted point, where the model is
    evaluated next, and the same change is added to the corrector's state. x: [B, ...]."""
    _check_order("unipc", order, 3)
    hist: list[tuple[float, torch.Tensor]] = []  # (lambda, denoised), newest first
    used: list[tuple[float, torch.Tensor]] = []  # the history the last predictor step used
    x_prev: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None  # what a post-step correction added to the predicted point
    n = len(sigmas) - 1
    for i in range(n):
        denoised = model(x, sigmas[i])
        # ---- corrector UniC for the step just taken, from the same starting point; it recomputes
        #      the state, so a post-step correction of the predicted point is carried over to it
        if corrector and x_prev is not None:
            x = _unipc_update(x_prev, sigmas[i - 1], sigmas[i], used, denoised)
            if shift is not None:
                x = x + shift
        hist = [(_lam(sigmas[i]), denoised)] + hist[: order - 1]
        used = hist[: min(order, n - i)] if lower_order_final else hist
        x_prev = x
        # ---- predictor UniP (first order for the jump to sigma = 0)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            x = _unipc_update(x, sigmas[i], sigmas[i + 1], used, None)
        predicted = x
        x = report(callback, model, i, sigmas, x, denoised)
        shift = None if x is predicted else x - predicted
    return x
