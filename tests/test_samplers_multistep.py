"""Multistep samplers: parity with k-diffusion, convergence order, SDE distribution, per-image RNG, NFE."""

import math

import pytest
import torch

from diffuse import schedules
from diffuse.rng import generators_for, randn, randn_like
from diffuse.samplers_multistep import MULTISTEP

from conftest import SIGMA_MAX, SIGMA_MIN

SDE_SAMPLERS = ["dpmpp_2m_sde", "dpmpp_3m_sde"]


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean().sqrt())


# ---------------------------------------------------------------- parity with k-diffusion

@pytest.mark.parametrize("name, opts", [
    ("lms", {}), ("lms", {"order": 2}), ("dpmpp_2m", {}),
    ("dpmpp_2m_sde", {"eta": 0.0}), ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}),
    ("dpmpp_3m_sde", {"eta": 0.0}),
])
def test_deterministic_samplers_match_kdiffusion(kdiff, mixture2, name, opts):
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * SIGMA_MAX
    for sigmas in (schedules.karras(12, SIGMA_MIN, SIGMA_MAX), schedules.exponential(5, SIGMA_MIN, SIGMA_MAX)):
        ours = MULTISTEP[name](mixture2.denoiser, x, sigmas, **opts)
        ref = getattr(kdiff, f"sample_{name}")(mixture2.denoiser, x, sigmas, disable=True, **opts)
        torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name, opts", [
    ("dpmpp_2m_sde", {}), ("dpmpp_2m_sde", {"eta": 0.5, "s_noise": 0.9, "solver_type": "heun"}), ("dpmpp_3m_sde", {}),
])
def test_sde_samplers_match_kdiffusion_with_the_same_noise(kdiff, mixture2, name, opts):
    x = torch.randn(1, 2, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * SIGMA_MAX
    sigmas = schedules.karras(10, SIGMA_MIN, SIGMA_MAX)
    ours = MULTISTEP[name](mixture2.denoiser, x, sigmas, generator=torch.Generator().manual_seed(9), **opts)
    gen = torch.Generator().manual_seed(9)
    ref = getattr(kdiff, f"sample_{name}")(mixture2.denoiser, x, sigmas, disable=True,
                                          noise_sampler=lambda s, s_next: randn_like(x, gen), **opts)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- convergence order

# error ratio when the number of logSNR-uniform steps doubles 25 -> 50 -> 100 (measured bands;
# 2nd order gives 4, 3rd order 8). k-diffusion's 3M formula weighs its second divided
# difference by phi_3 where the Taylor term needs 2 phi_3, so it converges at 2nd order.
ORDER_BANDS = {
    "dpmpp_2m": (3.5, 4.8), "ipndm": (3.5, 4.8), "dpmpp_3m_sde": (3.8, 6.0),
    "deis": (7.0, 11.0), "lms": (7.0, 16.0), "unipc": (6.5, 20.0),
}


@pytest.mark.parametrize("name", sorted(ORDER_BANDS))
def test_convergence_order_against_the_ode_reference(mixture2, ode_start, name):
    x, ref = ode_start
    opts = {"eta": 0.0} if MULTISTEP[name].stochastic else {}
    errors = [rms(MULTISTEP[name](mixture2.denoiser, x, schedules.exponential(n, SIGMA_MIN, SIGMA_MAX), **opts), ref)
              for n in (25, 50, 100)]
    lo, hi = ORDER_BANDS[name]
    for coarse, fine in zip(errors[:-1], errors[1:]):
        assert lo < coarse / fine < hi, (name, errors)


def test_unipc_corrector_raises_the_order(mixture2, ode_start):
    x, ref = ode_start
    sigmas = schedules.exponential(50, SIGMA_MIN, SIGMA_MAX)
    with_c = rms(MULTISTEP["unipc"](mixture2.denoiser, x, sigmas, order=2), ref)
    without = rms(MULTISTEP["unipc"](mixture2.denoiser, x, sigmas, order=2, corrector=False), ref)
    assert with_c < without / 2


def test_unipc_lower_order_final_caps_the_order_by_the_steps_left(mixture2, ode_start):
    """4 steps: the step from sigma_2 has two steps left, so order 3 runs as order 2 there (and its
    corrector with the same history); the warm start already limits the steps before it."""
    x, _ = ode_start
    sigmas = schedules.karras(4, SIGMA_MIN, SIGMA_MAX)
    third = MULTISTEP["unipc"](mixture2.denoiser, x, sigmas, order=3)
    torch.testing.assert_close(third, MULTISTEP["unipc"](mixture2.denoiser, x, sigmas, order=2), rtol=0, atol=0)
    uncapped = MULTISTEP["unipc"](mixture2.denoiser, x, sigmas, order=3, lower_order_final=False)
    assert rms(uncapped, third) > 1e-6


# ---------------------------------------------------------------- SDE samples the data distribution

@pytest.mark.parametrize("name", SDE_SAMPLERS)
def test_sde_samplers_draw_from_the_mixture(mixture2, name):
    """20k SDE samples vs 20k exact draws, both split by the most likely component:
    shares, per-component means and variances agree within sampling error."""
    n = 20_000
    x = torch.randn(n, 2, generator=torch.Generator().manual_seed(11), dtype=torch.float64) * SIGMA_MAX
    out = MULTISTEP[name](mixture2.denoiser, x, schedules.karras(40, SIGMA_MIN, SIGMA_MAX),
                          generator=torch.Generator().manual_seed(12), eta=1.0)
    true = mixture2.sample(n, torch.Generator().manual_seed(13))
    k_out, k_true = mixture2.component_of(out), mixture2.component_of(true)
    for c in range(3):
        p = float((k_true == c).double().mean())
        assert abs(float((k_out == c).double().mean()) - p) < 4 * math.sqrt(2 * p * (1 - p) / n)
        a, b = out[k_out == c], true[k_true == c]
        sd = b.std(0)
        torch.testing.assert_close(a.mean(0), b.mean(0), atol=float(4 * sd.max()) * math.sqrt(2 / len(b)), rtol=0)
        assert ((a.var(0) / b.var(0) - 1).abs() < 4 * math.sqrt(4 / len(b)) + 0.02).all(), (name, c, a.var(0), b.var(0))


# ---------------------------------------------------------------- determinism per image, NFE, contract

@pytest.mark.parametrize("name", sorted(MULTISTEP))
def test_an_image_does_not_depend_on_its_batch(mixture2, name):
    seeds = [5, 6, 7, 8, 9]
    sigmas = schedules.karras(8, SIGMA_MIN, SIGMA_MAX)
    gens = generators_for(seeds)
    x = randn((5, 2), gens, dtype=torch.float64) * SIGMA_MAX
    batch = MULTISTEP[name](mixture2.denoiser, x, sigmas, generator=generators_for(seeds))
    alone = MULTISTEP[name](mixture2.denoiser, x[2:3], sigmas, generator=generators_for([7]))
    torch.testing.assert_close(batch[2:3], alone, rtol=1e-12, atol=1e-12)
    same = MULTISTEP[name](mixture2.denoiser, x[2:3].expand(5, 2).clone(), sigmas, generator=generators_for([7] * 5))
    torch.testing.assert_close(same, alone.expand(5, 2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(MULTISTEP))
@pytest.mark.parametrize("steps", [1, 2, 3, 7])
def test_nfe_rule_is_exact(mixture2, name, steps):
    calls = []

    def counted(x, sigma, cond=None):
        calls.append(1)
        return mixture2.denoiser(x, sigma)

    sigmas = schedules.exponential(steps, SIGMA_MIN, SIGMA_MAX)
    x = torch.randn(3, 2, dtype=torch.float64) * SIGMA_MAX
    x_before = x.clone()
    seen = []
    MULTISTEP[name](counted, x, sigmas, generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert len(calls) == MULTISTEP[name].nfe(sigmas) == steps
    assert [info.i for info in seen] == list(range(steps)) and seen[-1].nfe == steps
    assert torch.equal(x, x_before)


def test_bad_options_fail_loudly(mixture2):
    x = torch.randn(2, 2, dtype=torch.float64)
    sigmas = schedules.karras(4, SIGMA_MIN, SIGMA_MAX)
    with pytest.raises(ValueError, match="does not take option"):
        MULTISTEP["unipc"](mixture2.denoiser, x, sigmas, eta=1.0)
    with pytest.raises(ValueError, match="order must be"):
        MULTISTEP["deis"](mixture2.denoiser, x, sigmas, order=4)
    with pytest.raises(ValueError, match="solver_type"):
        MULTISTEP["dpmpp_2m_sde"](mixture2.denoiser, x, sigmas, solver_type="rk4")


# ---------------------------------------------------------------- GITS schedule

def test_gits_schedule_beats_logsnr_at_10_nfe(mixture2, ode_start):
    x, ref = ode_start
    sigmas = schedules.gits(mixture2.denoiser, (128, 2), 10, SIGMA_MIN, SIGMA_MAX, grid_size=40)
    assert sigmas.shape == (11,) and sigmas[-1] == 0 and float(sigmas[0]) == pytest.approx(SIGMA_MAX)
    assert (sigmas[:-1] > sigmas[1:]).all()
    uniform = schedules.logsnr_uniform(10, SIGMA_MIN, SIGMA_MAX)
    err = rms(MULTISTEP["ipndm"](mixture2.denoiser, x, sigmas), ref)
    assert err < 0.5 * rms(MULTISTEP["ipndm"](mixture2.denoiser, x, uniform), ref)
