"""Classifier-free guidance wrappers: exact combination, one batched forward, rescale, interval; the interval
in sampling (bit-exact limits, U-Net evaluations saved) and its checks."""

import pytest
import torch

from diffuse.guidance import CFGDenoiser
from diffuse.pipeline import Pipeline, SampleSettings, generate

from conftest import CAPTIONS


class Recorder:
    """D(x, sigma, cond) = x * cond_scale: the condition is a per-row scale factor [B]."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, cond):
        self.batches.append(x.shape[0])
        return x * cond.reshape(-1, 1)


def test_cfg_is_exact_and_uses_one_batched_forward():
    D = Recorder()
    x = torch.randn(3, 4, dtype=torch.float64)
    cond, uncond = torch.full((3,), 2.0, dtype=torch.float64), torch.full((3,), 0.5, dtype=torch.float64)
    out = CFGDenoiser(D, 3.0, uncond)(x, torch.ones(3), cond)
    torch.testing.assert_close(out, 0.5 * x + 3.0 * (2.0 * x - 0.5 * x))
    assert D.batches == [6]


def test_scale_one_skips_the_unconditional_branch():
    D = Recorder()
    x = torch.randn(2, 4)
    out = CFGDenoiser(D, 1.0, torch.zeros(2))(x, torch.ones(2), torch.ones(2))
    torch.testing.assert_close(out, x)
    assert D.batches == [2]


def test_rescale_one_restores_the_conditional_std():
    D = Recorder()
    x = torch.randn(2, 64, dtype=torch.float64) + torch.arange(64, dtype=torch.float64) / 64
    cond = torch.tensor([1.0, 1.5], dtype=torch.float64)
    uncond = torch.tensor([0.2, 0.1], dtype=torch.float64)
    out = CFGDenoiser(D, 7.0, uncond, rescale=1.0)(x, torch.ones(2), cond)
    torch.testing.assert_close(out.std(dim=1), (x * cond.reshape(-1, 1)).std(dim=1))
    half = CFGDenoiser(D, 7.0, uncond, rescale=0.5)(x, torch.ones(2), cond)
    plain = CFGDenoiser(D, 7.0, uncond)(x, torch.ones(2), cond)
    torch.testing.assert_close(half, 0.5 * out + 0.5 * plain)


def test_interval_guides_only_inside_and_skips_uncond_outside():
    D = Recorder()
    g = CFGDenoiser(D, 5.0, torch.zeros(2), interval=(0.5, 2.0))
    x = torch.ones(2, 3)
    torch.testing.assert_close(g(x, torch.full((2,), 3.0), torch.ones(2)), x)  # outside: plain conditional
    assert D.batches == [2]
    torch.testing.assert_close(g(x, torch.full((2,), 1.0), torch.ones(2)), 5.0 * x)  # inside: 0 + 5 (x - 0)
    mixed = g(x, torch.tensor([1.0, 3.0]), torch.ones(2))  # one row in, one out
    torch.testing.assert_close(mixed, torch.stack([5.0 * x[0], x[1]]))


def test_dict_conditions_are_batched_by_key():
    seen = {}

    def D(x, sigma, cond):
        seen.update(cond)
        return x

    c = {"text": torch.ones(2, 3, 4), "text_mask": torch.ones(2, 3, dtype=torch.bool)}
    u = {"text": torch.zeros(2, 3, 4), "text_mask": torch.ones(2, 3, dtype=torch.bool)}
    CFGDenoiser(D, 2.0, u)(torch.zeros(2, 1), torch.ones(2), c)
    assert seen["text"].shape == (4, 3, 4) and seen["text"][:2].eq(1).all() and seen["text"][2:].eq(0).all()
    with pytest.raises(ValueError, match="different keys"):
        CFGDenoiser(D, 2.0, {"text": u["text"]})(torch.zeros(2, 1), torch.ones(2), c)


@pytest.mark.parametrize("kw, message", [
    (dict(scale=float("nan")), "finite"),
    (dict(rescale=1.5), r"rescale must be in \[0, 1\]"),
    (dict(interval=(2.0, 1.0)), "interval"),
])
def test_bad_guidance_settings(kw, message):
    args = dict(scale=2.0, uncond=None) | kw
    with pytest.raises(ValueError, match=message):
        CFGDenoiser(lambda x, s, c: x, **args)


# ---------------------------------------------------------------- the guidance interval in sampling (Kynkaanniemi et al. 2024)

@pytest.fixture(scope="module")
def tiny_model(tiny_text_model):
    return Pipeline.load(tiny_text_model()).model


def _sample(model, **settings):
    return generate(model, SampleSettings(steps=6, **settings), [3, 4], prompts=[CAPTIONS[0], CAPTIONS[1]])


def test_interval_covering_every_sigma_is_plain_cfg_bit_for_bit(tiny_model):
    plain = _sample(tiny_model, cfg=3.0)
    covering = _sample(tiny_model, cfg=3.0, cfg_interval=(0.0, tiny_model.sigma_max))  # sigma_max itself: lo < sigma <= hi
    assert torch.equal(covering, plain)
    assert not torch.equal(plain, _sample(tiny_model, cfg=1.0))


@pytest.mark.parametrize("interval", [(100.0, 200.0), (0.0, 0.001)])  # above sigma_max; below the smallest sigma evaluated
def test_interval_excluding_every_sigma_is_no_guidance_bit_for_bit(tiny_model, interval):
    assert torch.equal(_sample(tiny_model, cfg=3.0, cfg_interval=interval), _sample(tiny_model, cfg=1.0))


def test_each_step_outside_the_interval_saves_one_unet_evaluation_per_image(tiny_model):
    rows = []
    hook = tiny_model.denoiser.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        _sample(tiny_model, cfg=3.0)
        plain, rows[:] = sum(rows) / 2, []
        lo, hi = 0.3, 5.0
        _sample(tiny_model, cfg=3.0, cfg_interval=(lo, hi))
        limited = sum(rows) / 2
    finally:
        hook.remove()
    sigmas = SampleSettings(steps=6).sigmas(tiny_model).tolist()[:-1]  # dpmpp_2m: one evaluation per sigma but the last 0
    skipped = sum(not lo < s <= hi for s in sigmas)
    assert 0 < skipped < 6 and plain == 2 * 6 and limited == plain - skipped


@pytest.mark.parametrize("interval, message", [
    ((5.0, 0.3), "needs 0 <= LO < HI"), ((-1.0, 2.0), "needs 0 <= LO < HI"), ((0.3, float("inf")), "both finite"),
    ((1.0,), "must be two sigmas"), ("0.3,5", "must be two sigmas"),
])
def test_bad_interval_in_settings(interval, message):
    with pytest.raises(ValueError, match=message):
        SampleSettings(cfg=2.0, cfg_interval=interval)


def test_settings_hold_the_interval_as_a_tuple_of_floats():
    assert SampleSettings(cfg_interval=[0, 5]).cfg_interval == (0.0, 5.0)
