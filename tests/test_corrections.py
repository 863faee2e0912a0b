"""Training-free corrections: the Haar transform, epsilon scaling and DCW, and the post-step hook."""

import math

import pytest
from PIL import Image
import torch

from diffuse import rng
from diffuse.corrections import DCW, EpsScaling, haar2d, ihaar2d
from diffuse.gaussian_mixture import GaussianMixture
from diffuse.samplers import SAMPLERS
from diffuse.schedules import karras

from conftest import SIGMA_MAX, SIGMA_MIN

DETERMINISTIC = ["euler", "heun", "dpm_2", "lms", "ipndm", "deis", "dpmpp_2m", "unipc"]
STOCHASTIC = ["ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde", "dpmpp_sde", "edm"]
SEEDS = [3, 4]


def image_denoiser(x: torch.Tensor, sigma: torch.Tensor, cond=None) -> torch.Tensor:
    """Exact denoiser of per-pixel N(0.3, 0.5^2) data, for image-shaped tests."""
    s2 = 0.25
    return 0.3 + s2 / (s2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - 0.3)


def start(shape=(1, 8, 8)) -> torch.Tensor:
    return rng.randn((len(SEEDS), *shape), rng.generators_for(SEEDS)).double() * SIGMA_MAX


# ---------------------------------------------------------------- Haar transform

def test_haar_reconstructs_exactly_and_preserves_energy():
    x = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bands = haar2d(x)
    assert all(b.shape == (2, 3, 4, 3) for b in bands)
    torch.testing.assert_close(ihaar2d(*bands), x, rtol=0, atol=1e-15)
    assert math.isclose(sum(float((b**2).sum()) for b in bands), float((x**2).sum()), rel_tol=1e-12)
    xs = torch.randint(-100, 100, (1, 1, 4, 4)).float()  # dyadic arithmetic: exact in float32
    assert torch.equal(ihaar2d(*haar2d(xs)), xs)


def test_haar_of_constant_and_checkerboard():
    const = torch.full((1, 2, 4, 4), 0.75)
    ll, lh, hl, hh = haar2d(const)
    assert torch.equal(ll, torch.full((1, 2, 2, 2), 1.5)) and not lh.any() and not hl.any() and not hh.any()
    checker = (torch.arange(4)[:, None] + torch.arange(4)[None]) % 2 * 2.0 - 1  # [4, 4] of -1/+1
    ll, lh, hl, hh = haar2d(checker)
    assert not ll.any() and not lh.any() and not hl.any() and torch.equal(hh, torch.full((2, 2), -2.0))


def test_haar_low_band_alone_inverts_to_block_means():
    x = torch.randn(1, 1, 6, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ll = haar2d(x)[0]
    zero = torch.zeros_like(ll)
    means = torch.nn.functional.avg_pool2d(x, 2)
    torch.testing.assert_close(ihaar2d(ll, zero, zero, zero), means.repeat_interleave(2, -2).repeat_interleave(2, -1))


def test_haar_needs_even_size():
    with pytest.raises(ValueError, match="even height and width, got 5x4"):
        haar2d(torch.zeros(1, 1, 5, 4))


# ---------------------------------------------------------------- corrections off = bit-identical

@pytest.mark.parametrize("name", DETERMINISTIC + STOCHASTIC)
def test_corrections_off_are_bit_identical(name: str):
    sigmas = karras(7, SIGMA_MIN, SIGMA_MAX)
    x = start()
    plain = SAMPLERS[name](image_denoiser, x, sigmas, generator=rng.generators_for(SEEDS))
    for denoiser, post_step in [(EpsScaling(image_denoiser, 1.0), None), (image_denoiser, DCW(0.0, SIGMA_MAX)),
                                (image_denoiser, lambda info: info.x.clone())]:
        out = SAMPLERS[name](denoiser, x, sigmas, generator=rng.generators_for(SEEDS), post_step=post_step)
        assert torch.equal(out, plain)


@pytest.mark.parametrize("name", DETERMINISTIC + STOCHASTIC)
def test_dcw_changes_every_sampler_and_the_callback_sees_the_corrected_state(name: str):
    sigmas = karras(7, SIGMA_MIN, SIGMA_MAX)
    x = start()
    plain = SAMPLERS[name](image_denoiser, x, sigmas, generator=rng.generators_for(SEEDS))
    seen, returned = [], []
    dcw = DCW(0.05, SIGMA_MAX)

    def post_step(info):
        returned.append(dcw(info))
        return returned[-1]

    out = SAMPLERS[name](image_denoiser, x, sigmas, generator=rng.generators_for(SEEDS), post_step=post_step,
                         callback=lambda info: seen.append(info.x))
    assert not torch.allclose(out, plain)
    assert len(seen) == len(returned) == 7 and all(a is b for a, b in zip(seen, returned))
    assert out is returned[-1]


@pytest.mark.parametrize("name", ["euler", "ddim", "heun"])
def test_single_step_samplers_continue_from_the_corrected_state(name: str):
    """A correction after step 0 gives the same result as restarting the sampler from the corrected x."""
    sigmas = karras(6, SIGMA_MIN, SIGMA_MAX)
    x = start()
    delta = torch.linspace(-1, 1, 64, dtype=torch.float64).reshape(1, 1, 8, 8)
    corrected = SAMPLERS[name](image_denoiser, x, sigmas, post_step=lambda info: info.x + delta if info.i == 0 else info.x)
    states = []
    SAMPLERS[name](image_denoiser, x, sigmas, callback=lambda info: states.append(info.x))
    restarted = SAMPLERS[name](image_denoiser, states[0] + delta, sigmas[1:])
    torch.testing.assert_close(corrected, restarted, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- epsilon scaling: closed forms

def test_eps_scaling_divides_the_noise_prediction_by_its_linear_schedule():
    x = torch.randn(3, 1, 2, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sigma = torch.tensor([80.0, 8.0, 0.5], dtype=torch.float64)
    es = EpsScaling(image_denoiser, 1.01, k=0.04, sigma_max=80.0)
    lam = torch.tensor([1.05, 1.014, 1.01025], dtype=torch.float64)
    torch.testing.assert_close(es.factor(sigma), lam)
    d = image_denoiser(x, sigma)
    eps = (x - d) / sigma.reshape(-1, 1, 1, 1)
    expected = x - sigma.reshape(-1, 1, 1, 1) * eps / lam.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(es(x, sigma), expected, rtol=0, atol=1e-14)


@pytest.mark.parametrize("b", [1.0, 1.02, 0.97])
def test_eps_scaling_on_an_exact_gaussian_gives_the_closed_form_flow(b: float):
    """For data N(mu, s^2) the scaled ODE dx/dsigma = (x - mu) sigma / (b (s^2 + sigma^2)) maps
    x_T - mu to (x_T - mu) (s^2 / (s^2 + sigma_T^2))^(1 / (2b)) at sigma = 0."""
    mu, s = 0.7, 0.5
    gauss = GaussianMixture(torch.ones(1, dtype=torch.float64), torch.full((1, 1), mu, dtype=torch.float64),
                            torch.full((1,), s, dtype=torch.float64))
    x = torch.randn(16, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * SIGMA_MAX
    out = SAMPLERS["heun"](EpsScaling(gauss.denoiser, b, sigma_max=SIGMA_MAX), x, karras(300, 1e-4, SIGMA_MAX))
    expected = mu + (x - mu) * (s**2 / (s**2 + SIGMA_MAX**2)) ** (1 / (2 * b))
    torch.testing.assert_close(out - mu, expected - mu, rtol=1e-3, atol=0)  # b = 1.02 moves it by ~10%


def test_eps_scaling_rejects_factors_that_reach_zero():
    with pytest.raises(ValueError, match="must stay > 0; got b=1.0, k=-1.5"):
        EpsScaling(image_denoiser, 1.0, k=-1.5)
    with pytest.raises(ValueError, match="got b=0.0"):
        EpsScaling(image_denoiser, 0.0)


# ---------------------------------------------------------------- DCW: closed forms

def test_dcw_scales_the_low_band_of_the_step_and_leaves_high_bands():
    """With D = 0, an Euler step scales x by sigma_next / sigma; DCW then multiplies the low band
    by 1 + lambda sigma / sigma_max: a constant image grows, a checkerboard does not."""
    lam, sigmas = 0.2, [80.0, 40.0, 0.0]
    const = torch.full((1, 1, 4, 4), 2.0, dtype=torch.float64)
    checker = ((torch.arange(4)[:, None] + torch.arange(4)[None]) % 2 * 2.0 - 1).to(torch.float64).reshape(1, 1, 4, 4)
    zero = lambda x, sigma, cond=None: torch.zeros_like(x)  # noqa: E731
    for x, factor in ((const, 0.5 * (1 + lam)), (checker, 0.5), (const + checker, None)):
        states = []
        SAMPLERS["euler"](zero, x, sigmas, post_step=DCW(lam, 80.0), callback=lambda info: states.append(info.x))
        expected = 0.5 * (const * (1 + lam) + checker) if factor is None else x * factor
        torch.testing.assert_close(states[0], expected, rtol=0, atol=1e-14)
        torch.testing.assert_close(states[1], torch.zeros_like(x), rtol=0, atol=1e-14)  # the last step lands on D = 0


def test_dcw_is_x_plus_s_times_block_means_of_x_minus_d():
    from diffuse.steps import StepInfo

    g = torch.Generator().manual_seed(4)
    x, d = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64), torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    out = DCW(0.005, 80.0)(StepInfo(2, 13, 20.0, 10.0, x, d, 3))
    s = 0.005 * 20.0 / 80.0
    block = torch.nn.functional.avg_pool2d(x - d, 2).repeat_interleave(2, -2).repeat_interleave(2, -1)
    torch.testing.assert_close(out, x + s * block, rtol=0, atol=1e-14)
    assert DCW(0.0, 80.0)(StepInfo(2, 13, 20.0, 10.0, x, d, 3)) is x
    with pytest.raises(ValueError, match="lambda_l must be a finite number"):
        DCW(float("nan"), 80.0)


# ---------------------------------------------------------------- settings, records and CLI

@pytest.fixture(scope="module")
def class_model(tiny_class_model):
    return tiny_class_model


def test_settings_record_and_cli_flags(class_model, tmp_path):
    import numpy as np

    from diffuse.cli import main
    from diffuse.pipeline import Pipeline, SampleSettings
    from diffuse.record import read_record

    pipe = Pipeline.load(class_model)
    plain = pipe(class_label=3, seeds=[5], settings=SampleSettings(steps=4))[0]
    off = pipe(class_label=3, seeds=[5], settings=SampleSettings(steps=4, eps_scaling=1.0, eps_scaling_k=0.0, dcw=0.0))[0]
    assert np.array_equal(np.asarray(plain.image), np.asarray(off.image))
    assert plain.record["eps_scaling"] == 1.0 and plain.record["dcw"] == 0.0
    assert main(["generate", "--model", str(class_model), "--class", "3", "--seed", "5", "--steps", "4", "--eps-scaling", "1.05",
                 "--eps-scaling-k", "0.1", "--dcw", "-0.5", "--out", str(tmp_path), "--quiet"]) == 0
    [path] = tmp_path.glob("*.png")
    record = read_record(path)
    assert (record["eps_scaling"], record["eps_scaling_k"], record["dcw"]) == (1.05, 0.1, -0.5)
    corrected = pipe(class_label=3, seeds=[5], settings=SampleSettings(steps=4, eps_scaling=1.05, eps_scaling_k=0.1, dcw=-0.5))[0]
    with Image.open(path) as im:
        assert np.array_equal(np.asarray(im), np.asarray(corrected.image))
    assert not np.array_equal(np.asarray(corrected.image), np.asarray(plain.image))
    with pytest.raises(ValueError, match="must stay > 0"):
        SampleSettings(eps_scaling=0.5, eps_scaling_k=-0.6)
    with pytest.raises(ValueError, match="lambda_l must be a finite number"):
        SampleSettings(dcw=float("inf"))
