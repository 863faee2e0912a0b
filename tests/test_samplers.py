"""Single-step samplers: parity with k-diffusion, convergence order against the exact ODE
solution of a Gaussian mixture, sampling distribution, per-image noise, NFE and input checks."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from diffuse import rng
from diffuse.gaussian_mixture import GaussianMixture
from diffuse.samplers import SAMPLERS, get_sampler
from diffuse.schedules import karras
from diffuse.steps import Noise, StepInfo

from conftest import SIGMA_MAX, SIGMA_MIN, torch_threads

SINGLE_STEP = ["euler", "euler_ancestral", "heun", "edm", "dpm_2", "dpmpp_2s_ancestral", "dpmpp_sde", "ddpm", "ddim"]
STOCHASTIC = ["euler_ancestral", "edm", "dpmpp_2s_ancestral", "dpmpp_sde", "ddpm"]  # with default options
SEEDS = [3, 7, 11, 5, 9]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tests use small tensors: one intra-op thread is fastest (see conftest.torch_threads)."""
    with torch_threads(1):
        yield


def start(seeds: list[int], shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Initial noise [len(seeds), *shape] times SIGMA_MAX, one generator per image."""
    return rng.randn((len(seeds), *shape), rng.generators_for(seeds), dtype=dtype) * SIGMA_MAX


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
    """Exact D for data N(0, I): x / (1 + sigma^2). x [B, ...], sigma [B]."""
    return x / (1 + sigma.reshape(-1, *[1] * (x.ndim - 1)) ** 2)


# ---------------------------------------------------------------- parity with k-diffusion

@pytest.mark.parametrize("name", ["euler", "heun", "dpm_2"])
def test_deterministic_matches_kdiffusion(kdiff, mixture2: GaussianMixture, name: str):
    sigmas = karras(12, SIGMA_MIN, SIGMA_MAX)
    x = start(SEEDS, (2,))
    ours = SAMPLERS[name](mixture2.denoiser, x, sigmas)
    ref = getattr(kdiff, f"sample_{name}")(mixture2.denoiser, x, sigmas, disable=True)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("name, options", [
    ("euler_ancestral", {}),
    ("euler_ancestral", {"eta": 0.5, "s_noise": 0.8}),
    ("dpmpp_2s_ancestral", {}),
    ("dpmpp_2s_ancestral", {"eta": 2.0}),  # sigma_down reaches 0 on some steps: Euler branch
    ("dpmpp_sde", {}),
    ("dpmpp_sde", {"eta": 0.6, "s_noise": 1.1, "r": 0.3}),
])
def test_stochastic_matches_kdiffusion_with_injected_noise(kdiff, mixture2: GaussianMixture, name: str, options: dict):
    sigmas = karras(10, SIGMA_MIN, SIGMA_MAX)
    x = start(SEEDS, (2,))
    ours = SAMPLERS[name](mixture2.denoiser, x, sigmas, generator=rng.generators_for(SEEDS), **options)
    noise = Noise(rng.generators_for(SEEDS))
    ref = getattr(kdiff, f"sample_{name}")(mixture2.denoiser, x, sigmas, disable=True,
                                           noise_sampler=lambda sigma, sigma_next: noise(x), **options)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("ours_name, options, kdiff_name", [
    ("euler", {"s_churn": 5.0, "s_noise": 1.01}, "sample_euler"),
    ("edm", {"S_churn": 5.0, "S_tmin": 0.0, "S_tmax": float("inf"), "S_noise": 1.01}, "sample_heun"),
])
def test_churn_matches_kdiffusion(kdiff, mixture2: GaussianMixture, ours_name: str, options: dict, kdiff_name: str):
    # k-diffusion draws churn noise from the global generator on every step; with churn on
    # every step (S_tmin = 0) and float32 our global-generator draws are the same numbers.
    sigmas = karras(10, SIGMA_MIN, SIGMA_MAX)
    x = start(SEEDS, (2,), torch.float32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        ours = SAMPLERS[ours_name](mixture2.denoiser, x, sigmas, **options)
        torch.manual_seed(0)
        ref = getattr(kdiff, kdiff_name)(mixture2.denoiser, x, sigmas.float(), disable=True,
                                         **{k.lower(): v for k, v in options.items()})
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("a, a_options, b, b_options", [
    ("ddim", {"eta": 0.0}, "euler", {}),
    ("ddim", {"eta": 1.0}, "ddpm", {}),
    ("euler_ancestral", {"eta": 1.0}, "ddpm", {}),
    ("edm", {"S_churn": 0.0}, "heun", {}),
    ("dpmpp_sde", {"eta": 0.0}, "dpmpp_2s_ancestral", {"eta": 0.0}),
])
def test_identities_in_sigma_space(mixture2: GaussianMixture, a: str, a_options: dict, b: str, b_options: dict):
    sigmas = karras(8, SIGMA_MIN, SIGMA_MAX)
    x = start(SEEDS, (2,))
    out_a = SAMPLERS[a](mixture2.denoiser, x, sigmas, generator=rng.generators_for(SEEDS), **a_options)
    out_b = SAMPLERS[b](mixture2.denoiser, x, sigmas, generator=rng.generators_for(SEEDS), **b_options)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=1e-10)


# ---------------------------------------------------------------- convergence order

@pytest.mark.parametrize("name, options, order, steps", [
    ("euler", {}, 1, [16, 32, 64]),
    ("heun", {}, 2, [32, 64, 128]),
    ("dpm_2", {}, 2, [32, 64, 128]),
    ("dpmpp_2s_ancestral", {"eta": 0.0}, 2, [32, 64, 128]),
])
def test_convergence_order(mixture2: GaussianMixture, ode_to_sigma_min, name: str, options: dict, order: int, steps: list[int]):
    x, target = ode_to_sigma_min
    errors = [(SAMPLERS[name](mixture2.denoiser, x, karras(n, SIGMA_MIN, SIGMA_MAX), **options) - target).norm(dim=1).mean()
              for n in steps]
    ratios = [float(e0 / e1) for e0, e1 in zip(errors, errors[1:])]
    band = (1.6, 2.6) if order == 1 else (3.2, 5.0)
    assert all(band[0] <= r <= band[1] for r in ratios), f"{name}: errors {errors}, ratios {ratios}, expected in {band}"
    assert float(errors[-1]) < (4e-2 if order == 1 else 1e-3)


# ---------------------------------------------------------------- sampling distribution

@pytest.mark.parametrize("name, options, correct", [
    ("euler_ancestral", {}, True),
    ("ddpm", {}, True),
    ("dpmpp_2s_ancestral", {}, True),
    ("dpmpp_sde", {}, True),
    ("edm", {}, True),
    ("euler_ancestral", {"s_noise": 0.9}, False),  # the check has power: too little noise is caught
])
def test_stochastic_samplers_sample_the_data_distribution(separated_mixture1: GaussianMixture, name: str, options: dict, correct: bool):
    # 20k draws started from the exact noisy marginal at sigma = 10; 200 steps keep the
    # discretization bias (first order for ancestral steps) at ~2% of a component's std.
    mix, n, sigma_max = separated_mixture1, 20_000, 10.0
    g = torch.Generator().manual_seed(0)
    x = mix.sample(n, g) + sigma_max * rng.randn((n, 1), g, dtype=torch.float64)
    out = SAMPLERS[name](mix.denoiser, x, karras(200, SIGMA_MIN, sigma_max), generator=g, **options)
    k = mix.component_of(out)
    failures = []
    for j in range(3):
        x_j = out[k == j, 0]
        weight, mean, std = len(x_j) / n, float(x_j.mean()), float(x_j.std())
        mu, s = float(mix.means[j, 0]), float(mix.stds[j])
        # tolerances: about 4-5 standard errors of each statistic (weight SE <= 0.0035)
        if abs(weight - float(mix.weights[j])) > 0.015:
            failures.append(f"component {j}: weight {weight:.4f} vs {float(mix.weights[j])}")
        if abs(mean - mu) > 5 * s / math.sqrt(len(x_j)) + 0.01:
            failures.append(f"component {j}: mean {mean:.4f} vs {mu}")
        if abs(std / s - 1) > 0.05:
            failures.append(f"component {j}: std {std:.4f} vs {s}")
    assert (not failures) == correct, failures or f"{name} {options} should have failed"


# ---------------------------------------------------------------- per-image randomness

@pytest.mark.parametrize("name", SINGLE_STEP)
def test_image_does_not_depend_on_its_batch(name: str):
    sigmas = karras(6, SIGMA_MIN, SIGMA_MAX)
    options = {"eta": 1.0} if name == "ddim" else {}
    batch = SAMPLERS[name](gaussian_denoiser, start(SEEDS, (3, 4, 4), torch.float32), sigmas,
                           generator=rng.generators_for(SEEDS), **options)
    alone = SAMPLERS[name](gaussian_denoiser, start([11], (3, 4, 4), torch.float32), sigmas,
                           generator=rng.generators_for([11]), **options)
    torch.testing.assert_close(batch[2:3], alone)
    other = SAMPLERS[name](gaussian_denoiser, start([12], (3, 4, 4), torch.float32), sigmas,
                           generator=rng.generators_for([12]), **options)
    assert not torch.allclose(other, alone)


def test_stochastic_flags():
    assert {name for name in SINGLE_STEP if SAMPLERS[name].stochastic} == set(STOCHASTIC)


# ---------------------------------------------------------------- NFE

@pytest.mark.parametrize("name, options", [(name, {}) for name in SINGLE_STEP] + [
    ("dpmpp_2s_ancestral", {"eta": 2.0}),
    ("dpmpp_2s_ancestral", {"eta": 0.0}),
    ("edm", {"S_churn": 0.0}),
    ("ddim", {"eta": 0.5}),
])
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_nfe_rule_matches_counted_calls(name: str, options: dict, steps: int):
    sigmas = karras(steps, SIGMA_MIN, SIGMA_MAX)
    calls, infos = [], []

    def denoiser(x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        calls.append(float(sigma[0]))
        return gaussian_denoiser(x, sigma)

    SAMPLERS[name](denoiser, start(SEEDS[:2], (3,)), sigmas, generator=rng.generators_for(SEEDS[:2]),
                   callback=infos.append, **options)
    assert SAMPLERS[name].nfe(sigmas, **options) == len(calls) == infos[-1].nfe
    assert [(info.i, info.n, info.sigma, info.sigma_next) for info in infos] == \
        [(i, steps, float(sigmas[i]), float(sigmas[i + 1])) for i in range(steps)]


def test_nfe_of_second_order_samplers():
    sigmas = karras(10, SIGMA_MIN, SIGMA_MAX)
    for name in ["heun", "edm", "dpm_2", "dpmpp_2s_ancestral", "dpmpp_sde"]:
        assert SAMPLERS[name].nfe(sigmas) == 19, name
    for name in ["euler", "euler_ancestral", "ddpm", "ddim"]:
        assert SAMPLERS[name].nfe(sigmas) == 10, name


# ---------------------------------------------------------------- bad input

BAD_SIGMAS = [
    ([80.0, 10.0, 20.0, 0.0], "strictly descending"),
    ([80.0, 10.0, 1.0], "must end in 0"),
    ([0.0], "at least 2"),
    ([80.0, float("nan"), 0.0], "NaN"),
]


@pytest.mark.parametrize("name", SINGLE_STEP)
def test_bad_input_raises_helpful_errors(name: str):
    sampler, x, sigmas = SAMPLERS[name], start(SEEDS, (2,)), karras(4, SIGMA_MIN, SIGMA_MAX)
    for bad, message in BAD_SIGMAS:
        with pytest.raises(ValueError, match=message):
            sampler(gaussian_denoiser, x, bad)
    with pytest.raises(ValueError, match="NaN"):
        sampler(gaussian_denoiser, x.clone().index_fill_(0, torch.tensor([1]), float("nan")), sigmas)
    with pytest.raises(ValueError, match=f"{name}.*does not take option.*s_churnn"):
        sampler(gaussian_denoiser, x, sigmas, s_churnn=1.0)
    with pytest.raises(ValueError, match="got 2 generators for a batch of 5"):
        sampler(gaussian_denoiser, x, sigmas, generator=rng.generators_for([1, 2]))


@pytest.mark.parametrize("name, options, message", [
    ("euler_ancestral", {"eta": -1.0}, "eta must be >= 0"),
    ("ddim", {"eta": float("nan")}, "eta must be >= 0"),
    ("edm", {"S_noise": -0.5}, "S_noise must be >= 0"),
    ("dpmpp_sde", {"r": 0.0}, "r is the intermediate point"),
])
def test_bad_options_raise(name: str, options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        SAMPLERS[name](gaussian_denoiser, start(SEEDS, (2,)), karras(4, SIGMA_MIN, SIGMA_MAX), **options)


class Cancel(Exception):
    pass


@pytest.mark.parametrize("name", SINGLE_STEP)
def test_raising_callback_stops_sampling_and_leaves_x_unchanged(name: str):
    x = start(SEEDS, (2,))
    x_before = x.clone()
    seen: list[StepInfo] = []

    def callback(info: StepInfo) -> None:
        seen.append(info)
        if info.i == 1:
            raise Cancel

    with pytest.raises(Cancel):
        SAMPLERS[name](gaussian_denoiser, x, karras(6, SIGMA_MIN, SIGMA_MAX), generator=rng.generators_for(SEEDS), callback=callback)
    assert [info.i for info in seen] == [0, 1]
    assert torch.equal(x, x_before)


# ---------------------------------------------------------------- registry front

def test_get_sampler():
    assert get_sampler("heun") is SAMPLERS["heun"]
    with pytest.raises(ValueError, match=r"unknown sampler 'hune'; known samplers: .*euler.*heun"):
        get_sampler("hune")
    assert set(SINGLE_STEP) <= set(SAMPLERS)
