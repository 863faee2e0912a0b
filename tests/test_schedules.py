"""Sigma schedules and DDPM tables against their closed forms."""

import math

import pytest
import torch

from diffuse import schedules


@pytest.mark.parametrize("name", ["karras", "exponential", "logsnr", "polyexponential", "flow_shift"])
def test_every_schedule_descends_from_sigma_max_to_sigma_min_then_zero(name):
    s = schedules.get_sigmas(name, 10, 0.002, 80.0)
    assert s.shape == (11,) and s[-1] == 0
    assert (s[:-2] > s[1:-1]).all()
    assert float(s[0]) == pytest.approx(80.0) and float(s[-2]) == pytest.approx(0.002)


def test_karras_matches_eq_5():
    n, lo, hi, rho = 7, 0.1, 10.0, 7.0
    s = schedules.karras(n, lo, hi, rho)
    for i in range(n):
        expect = (hi ** (1 / rho) + i / (n - 1) * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho
        assert float(s[i]) == pytest.approx(expect, rel=1e-12)


def test_exponential_is_geometric_and_polyexponential_rho_1_equals_it():
    s = schedules.exponential(6, 0.01, 100.0)
    ratios = s[1:-1] / s[:-2]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (0.01 / 100.0) ** (1 / 5)))
    torch.testing.assert_close(schedules.polyexponential(6, 0.01, 100.0, rho=1.0), s)


def test_flow_shift_spends_more_steps_at_high_noise():
    plain = schedules.flow_shift(8, 0.01, 50.0, shift=1.0)
    shifted = schedules.flow_shift(8, 0.01, 50.0, shift=3.0)
    t_plain = schedules.flow_t_from_sigma(plain[:-1])
    # shift 1 is uniform in flow time t
    torch.testing.assert_close(t_plain[1:] - t_plain[:-1], torch.full((7,), float(t_plain[1] - t_plain[0]), dtype=torch.float64))
    assert (shifted[1:-2] > plain[1:-2]).all()


def test_vp_continuous_matches_song_eq_33():
    s = schedules.vp_continuous(3, beta_d=19.9, beta_min=0.1, eps_s=1e-3)
    t = 1.0
    assert float(s[0]) == pytest.approx(math.sqrt(math.exp(19.9 * t * t / 2 + 0.1 * t) - 1))


def test_timestep_spacings_match_lin_et_al_table_2():
    assert schedules.vp_timesteps(10, 1000, "trailing").tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert schedules.vp_timesteps(10, 1000, "leading").tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert schedules.vp_timesteps(10, 1000, "linspace").tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


def test_beta_tables():
    lin = schedules.betas_linear()
    assert float(lin[0]) == pytest.approx(1e-4) and float(lin[-1]) == pytest.approx(0.02)
    sl = schedules.betas_scaled_linear()
    assert float(sl[0]) == pytest.approx(0.00085) and float(sl[-1]) == pytest.approx(0.012)
    cos = schedules.betas_cosine(1000)
    abar = schedules.alphas_cumprod(cos)
    t = torch.tensor([100, 500])
    f = lambda u: math.cos((u / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2
    for ti in t.tolist():
        assert float(abar[ti]) == pytest.approx(f(ti + 1) / f(0), rel=1e-9)


def test_zero_terminal_snr_rescale():
    betas = schedules.betas_scaled_linear()
    z = schedules.rescale_zero_terminal_snr(betas)
    abar, abar_z = schedules.alphas_cumprod(betas), schedules.alphas_cumprod(z)
    assert float(abar_z[-1]) == pytest.approx(0.0, abs=1e-20)
    assert float(abar_z[0]) == pytest.approx(float(abar[0]), rel=1e-12)
    # sqrt(abar) is an affine map of the original (Lin et al. 2023, Algorithm 1)
    a, b = abar.sqrt(), abar_z.sqrt()
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    torch.testing.assert_close(b, slope * (a - a[-1]))


def test_sigma_alpha_and_flow_conversions_round_trip():
    s = torch.tensor([0.01, 1.0, 30.0], dtype=torch.float64)
    torch.testing.assert_close(schedules.sigma_from_alpha_bar(schedules.alpha_bar_from_sigma(s)), s)
    torch.testing.assert_close(schedules.sigma_from_flow_t(schedules.flow_t_from_sigma(s)), s)


def test_vp_discrete_uses_the_tables_sigmas():
    abar = schedules.alphas_cumprod(schedules.betas_linear())
    s = schedules.vp_discrete(4, abar, "trailing")
    assert float(s[0]) == pytest.approx(float(schedules.sigma_from_alpha_bar(abar[999])))
    assert s[-1] == 0 and s.shape == (5,)


@pytest.mark.parametrize("call, message", [
    (lambda: schedules.karras(0, 0.1, 1.0), "number of steps"),
    (lambda: schedules.karras(5, 1.0, 0.1), "sigma_min < sigma_max"),
    (lambda: schedules.get_sigmas("cosine", 5, 0.1, 1.0), "unknown schedule 'cosine'; known schedules: exponential, flow_shift, karras"),
    (lambda: schedules.vp_timesteps(5, 1000, "middle"), "unknown timestep spacing"),
    (lambda: schedules.vp_timesteps(2000, 1000), r"integer in \[1, 1000\]"),
])
def test_bad_arguments(call, message):
    with pytest.raises(ValueError, match=message):
        call()
