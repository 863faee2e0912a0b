"""Denoising loss, weightings, noise-level distributions and EMA against hand computations."""

import math

import pytest
import torch

from diffuse import precond
from diffuse.ema import EMA
from diffuse.losses import LossConfig, bucket_edges, bucket_losses, denoising_loss, loss_weight, training_noise
from diffuse.noise_levels import NoiseLevels


class Zero(torch.nn.Module):
    def forward(self, x_in, c_noise, cond=None):
        return torch.zeros_like(x_in)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(3, 2, 4, 4, generator=g)
    noise = torch.randn(3, 2, 4, 4, generator=g)
    sigma = torch.tensor([0.05, 0.7, 9.0])
    return x0, noise, sigma


def test_uniform_weighting_on_eps_is_l_simple(batch):
    """With F = 0, eps-prediction predicts eps_hat = 0, so L_simple = mean(eps^2) per example."""
    x0, noise, sigma = batch
    model = precond.EpsPrecond(Zero())
    loss = denoising_loss(LossConfig("uniform"), model, x0, sigma, noise)
    torch.testing.assert_close(loss, noise.pow(2).flatten(1).mean(1))


def test_edm_loss_by_hand(batch):
    x0, noise, sigma = batch
    sd = 0.5
    model = precond.EDMPrecond(Zero(), sigma_data=sd)
    loss = denoising_loss(LossConfig("edm"), model, x0, sigma, noise)
    for i, s in enumerate(sigma.tolist()):
        c_skip = sd**2 / (s**2 + sd**2)
        lam = (s**2 + sd**2) / (s * sd) ** 2
        d = c_skip * (x0[i] + s * noise[i])
        assert float(loss[i]) == pytest.approx(lam * float((d - x0[i]).pow(2).mean()), rel=1e-5)
    # for EDM, 'uniform' (1 / c_out^2) and 'edm' weightings coincide (Table 1)
    torch.testing.assert_close(loss_weight(LossConfig("uniform"), model, sigma), loss_weight(LossConfig("edm"), model, sigma))


def test_min_snr_weight():
    model = precond.EpsPrecond(Zero())
    w = loss_weight(LossConfig("min_snr", min_snr_gamma=5.0), model, torch.tensor([0.1, 0.5, 2.0]))
    torch.testing.assert_close(w, torch.tensor([5.0, 4.0, 0.25]))


def test_offset_noise_adds_a_per_channel_constant():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    plain = training_noise((2, 3, 8, 8), 0.0, g1)
    offset = training_noise((2, 3, 8, 8), 0.1, g2)
    diff = offset - plain
    assert torch.allclose(diff, diff[..., :1, :1].expand_as(diff)) and diff.abs().max() > 0


def test_bucket_losses_sum_and_count():
    edges = bucket_edges(0.01, 100.0, buckets=4)  # 0.01, 0.1, 1, 10, 100
    out = bucket_losses(torch.tensor([0.02, 0.05, 5.0, 500.0]), torch.tensor([1.0, 3.0, 2.0, 7.0]), edges)
    assert out == {"loss_s0.01-0.1": (4.0, 2), "loss_s1-10": (2.0, 1), "loss_s10-100": (7.0, 1)}


def test_noise_level_distributions():
    g = torch.Generator().manual_seed(0)
    n = 200_000
    log_sigma = NoiseLevels("lognormal", p_mean=-1.2, p_std=1.2).sample(n, g).double().log()
    assert float(log_sigma.mean()) == pytest.approx(-1.2, abs=4 * 1.2 / math.sqrt(n))
    assert float(log_sigma.std()) == pytest.approx(1.2, rel=0.01)
    sigma = NoiseLevels("logit_normal", p_mean=0.0, p_std=1.0).sample(n, g).double()
    logit_t = (sigma / (1 + sigma)).logit()
    assert float(logit_t.mean()) == pytest.approx(0.0, abs=0.01) and float(logit_t.std()) == pytest.approx(1.0, rel=0.01)
    levels = NoiseLevels("discrete", beta_schedule="linear")
    table = levels.table_sigmas().float()
    draws = levels.sample(5000, g)
    assert torch.isin(draws, table).all() and len(draws.unique()) > 900
    with pytest.raises(ValueError, match="unknown noise-level distribution"):
        NoiseLevels("uniform")


def test_ema_half_life_and_ramp_up():
    m = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        m.weight.fill_(0.0)
    ema = EMA(m, ema_halflife_nimg=100.0, ema_rampup_ratio=None)
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m, batch_nimg=100, cur_nimg=100)  # one half-life: halfway
    assert float(ema.shadow["weight"]) == pytest.approx(0.5)
    ramped = EMA(m, ema_halflife_nimg=1000.0, ema_rampup_ratio=0.5)
    assert ramped.beta(batch_nimg=10, cur_nimg=20) == pytest.approx(0.5 ** (10 / 10))  # half-life limited to 0.5 * 20


class Const(torch.nn.Module):
    """A backbone whose output F is a fixed tensor, whatever its input."""

    def __init__(self, out):
        super().__init__()
        self.out = out

    def forward(self, x_in, c_noise, cond=None):
        return self.out


def _eps_target(x0, noise, s, sd):
    return noise


def _v_target(x0, noise, s, sd):  # Salimans & Ho 2022, v = alpha eps - sigma_t x0, for data scale sd
    return (sd * noise - s * x0 / sd) / (s**2 + sd**2).sqrt()


def _edm_target(x0, noise, s, sd):  # Karras et al. 2022, Eq. 8: (x0 - c_skip x) / c_out
    return (x0 - sd**2 / (s**2 + sd**2) * (x0 + s * noise)) * (s**2 + sd**2).sqrt() / (s * sd)


GAMMA = 5.0


@pytest.mark.parametrize("param, sd, target, weighting, weight_on_F", [
    # lambda(sigma) * c_out^2: the weight each choice puts on the network's own squared error, with SNR = 1 / sigma^2
    ("eps", 0.5, _eps_target, "uniform", lambda snr, s, sd: torch.ones_like(s)),  # L_simple (Ho et al. 2020)
    ("eps", 0.5, _eps_target, "min_snr", lambda snr, s, sd: snr.clamp(max=GAMMA) / snr),  # Hang et al. 2023, eps form
    ("eps", 0.5, _eps_target, "edm", lambda snr, s, sd: (s**2 + sd**2) / sd**2),
    ("v", 1.0, _v_target, "uniform", lambda snr, s, sd: torch.ones_like(s)),
    ("v", 1.0, _v_target, "min_snr", lambda snr, s, sd: snr.clamp(max=GAMMA) / (snr + 1)),  # Hang et al. 2023, v form
    ("edm", 0.5, _edm_target, "uniform", lambda snr, s, sd: torch.ones_like(s)),  # EDM's unit-weight F loss
    ("edm", 0.5, _edm_target, "min_snr", lambda snr, s, sd: snr.clamp(max=GAMMA) * s**2 * sd**2 / (s**2 + sd**2)),
])
def test_weighting_on_the_network_output_in_closed_form(param, sd, target, weighting, weight_on_F):
    """The loss over D equals the paper's weight times the squared error of F against its ideal target."""
    g = torch.Generator().manual_seed(5)
    x0 = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64) * 0.5
    noise = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    F = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.05, 0.3, 1.0, 20.0], dtype=torch.float64)
    model = precond.make_precond(param, Const(F), sigma_data=sd)
    loss = denoising_loss(LossConfig(weighting, min_snr_gamma=GAMMA), model, x0, sigma, noise)
    s = sigma.reshape(-1, 1, 1, 1)
    expected = weight_on_F(1 / sigma**2, sigma, sd) * (F - target(x0, noise, s, sd)).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=0)
