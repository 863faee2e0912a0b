"""Preconditioning: each parameterization recovers x0 exactly when F outputs its ideal target."""

import math

import pytest
import torch

from diffuse import precond, schedules


def _oracle(target_fn):
    """A backbone that outputs target_fn(sigma) for the (x0, eps) it was built around."""

    class Oracle(torch.nn.Module):
        def forward(self, x_in, c_noise, cond=None):
            return target_fn(self.sigma)

    return Oracle()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64) * 0.5
    eps = torch.randn(4, 3, 5, 5, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.3, 2.0, 50.0], dtype=torch.float64)
    return x0, eps, sigma


def _s(sigma):
    return sigma.reshape(-1, 1, 1, 1)


@pytest.mark.parametrize(
    "name, target",
    [
        ("eps", lambda x0, eps, s, sd: eps),
        ("x0", lambda x0, eps, s, sd: x0),
        # v = alpha eps - sigma_t x0 (Salimans & Ho 2022) generalized to data scale sd
        ("v", lambda x0, eps, s, sd: (sd * eps - s * x0 / sd) / (s**2 + sd**2).sqrt()),
        ("flow", lambda x0, eps, s, sd: eps - x0),
    ],
)
def test_parameterization_recovers_x0(batch, name, target):
    x0, eps, sigma = batch
    sd = 1.0 if name == "flow" else 0.5
    net = _oracle(lambda s: target(x0, eps, _s(s), sd))
    net.sigma = sigma
    D = precond.make_precond(name, net) if name == "flow" else precond.make_precond(name, net, sigma_data=sd)
    x = x0 + _s(sigma) * eps
    torch.testing.assert_close(D(x, sigma), x0, rtol=1e-10, atol=1e-10)


def test_edm_coefficients_match_table_1_and_give_unit_variance_target():
    sd = 0.5
    D = precond.EDMPrecond(torch.nn.Identity(), sigma_data=sd)
    for s in [0.002, 0.1, 1.0, 80.0]:
        sigma = torch.tensor([[s]], dtype=torch.float64)
        c_skip, c_out, c_in, c_noise = (float(c.flatten()[0]) for c in D.coefficients(sigma))
        assert c_skip == pytest.approx(sd**2 / (s**2 + sd**2))
        assert c_out == pytest.approx(s * sd / math.sqrt(s**2 + sd**2))
        assert c_in == pytest.approx(1 / math.sqrt(s**2 + sd**2))
        assert c_noise == pytest.approx(math.log(s) / 4)
        # target (x0 - c_skip x) / c_out for x0 ~ N(0, sd^2), x = x0 + s n has unit variance (EDM Eq. 8 design)
        var = ((1 - c_skip) ** 2 * sd**2 + c_skip**2 * s**2) / c_out**2
        assert var == pytest.approx(1.0)
        # and the input c_in x has unit variance
        assert c_in**2 * (sd**2 + s**2) == pytest.approx(1.0)


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_discrete_adapter_matches_ddpm_forward_process(batch, prediction):
    x0, eps, _ = batch
    betas = schedules.betas_scaled_linear()
    abar = schedules.alphas_cumprod(betas)
    t = torch.tensor([0, 10, 500, 999])
    a, s_vp = abar[t].sqrt().reshape(-1, 1, 1, 1), (1 - abar[t]).sqrt().reshape(-1, 1, 1, 1)
    x_t = a * x0 + s_vp * eps  # Ho et al. 2020 Eq. 4
    seen = {}

    class Net(torch.nn.Module):
        def forward(self, x_in, c_noise, cond=None):
            seen["x_in"], seen["t"] = x_in, c_noise
            return {"eps": eps, "x0": x0, "v": a * eps - s_vp * x0}[prediction]

    D = precond.DiscreteVPDenoiser(Net(), betas, prediction=prediction)
    sigma = schedules.sigma_from_alpha_bar(abar[t])
    out = D(x_t / a, sigma)  # sampler space: x = x_t / sqrt(abar) = x0 + sigma eps
    torch.testing.assert_close(out, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["x_in"], x_t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(seen["t"], t.to(torch.float64), rtol=0, atol=1e-6)


def test_discrete_sigma_to_t_nearest_and_interpolated():
    D = precond.DiscreteVPDenoiser(torch.nn.Identity(), schedules.betas_linear())
    mid = D.t_to_sigma(torch.tensor([10.25, 700.5]))
    torch.testing.assert_close(D.sigma_to_t(mid), torch.tensor([10.25, 700.5], dtype=torch.float64))
    D.interpolate = False
    assert D.sigma_to_t(mid).tolist() == [10.0, 700.0]
    assert D.sigma_min == pytest.approx(float(schedules.sigma_from_alpha_bar(torch.tensor(1 - 1e-4, dtype=torch.float64))))


def test_zero_terminal_snr_table_keeps_finite_sigma_max():
    betas = schedules.rescale_zero_terminal_snr(schedules.betas_scaled_linear())
    D = precond.DiscreteVPDenoiser(torch.nn.Identity(), betas, prediction="v")
    assert math.isfinite(D.sigma_max) and D.sigma_max == pytest.approx(2.0**12, rel=1e-3)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="unknown parameterization 'foo'; known: edm, eps, flow, v, x0"):
        precond.make_precond("foo", torch.nn.Identity())
    with pytest.raises(ValueError, match="prediction type"):
        precond.DiscreteVPDenoiser(torch.nn.Identity(), schedules.betas_linear(), prediction="sample")
    D = precond.EDMPrecond(torch.nn.Identity())
    with pytest.raises(ValueError, match=r"sigma must have shape \[B\] = \[2\]"):
        D(torch.zeros(2, 3), torch.ones(3))


def test_v_at_the_data_scale_is_edm_with_F_negated_and_at_unit_scale_the_vp_table_v(batch):
    """VPrecond with sigma_data = sd has EDM's coefficients up to the sign of c_out, so it trains the same
    model (bench/ablation.py uses v at sigma_data = 1, the VP definition); at sigma_data = 1 its
    coefficients are the discrete adapter's for v-prediction."""
    x0, eps, sigma = batch
    g = torch.Generator().manual_seed(1)
    F = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    net, neg = _oracle(lambda s: F), _oracle(lambda s: -F)
    net.sigma = neg.sigma = sigma
    x = x0 + _s(sigma) * eps
    torch.testing.assert_close(precond.VPrecond(net, sigma_data=0.5)(x, sigma), precond.EDMPrecond(neg, sigma_data=0.5)(x, sigma),
                               rtol=1e-12, atol=1e-12)
    s = _s(sigma)
    c_skip, c_out, c_in, _ = precond.VPrecond(net, sigma_data=1.0).coefficients(s)
    torch.testing.assert_close(c_skip, 1 / (s**2 + 1))
    torch.testing.assert_close(c_out, -s / (s**2 + 1).sqrt())
    torch.testing.assert_close(c_in, 1 / (s**2 + 1).sqrt())
