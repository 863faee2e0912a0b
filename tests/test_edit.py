"""Editing: SDEdit's schedule tail, exact kept pixels, re-imposition every step, RePaint blocks,
feathering, the codec path (factor 2), outpainting, inversion error vs NFE, records, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffuse import edit, masks, rng
from diffuse.cli import main
from diffuse.config import ModelConfig, _unet
from diffuse.pipeline import Pipeline, SampleSettings
from diffuse.record import read_record
from diffuse.samplers import SAMPLERS, get_sampler
from diffuse.schedules import get_sigmas

from conftest import torch_threads
from diffuse.gaussian_mixture import example_mixture

from conftest import CAPTIONS
EULER = SampleSettings(sampler="euler", steps=6, cfg=1.0)


@pytest.fixture(scope="module")
def text_model(tiny_text_model):
    folder = tiny_text_model({"sampler": "dpmpp_2m", "steps": 6, "cfg": 2.0})
    return folder


@pytest.fixture(scope="module")
def text_pipe(text_model) -> Pipeline:
    return Pipeline.load(text_model)


@pytest.fixture(scope="module")
def class_pipe(tmp_path_factory, random_model) -> Pipeline:
    cfg = ModelConfig(backbone_config=_unet("tiny", in_channels=1, out_channels=1, num_classes=10), conditioning="class",
                      num_classes=10, channels=1, image_size=16)
    folder = tmp_path_factory.mktemp("m") / "tiny-class"
    random_model(cfg).save(folder)
    return Pipeline.load(folder)


@pytest.fixture(scope="module")
def photo(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A 16x16 RGB test picture (smooth gradients plus a square) saved as PNG."""
    yy, xx = np.mgrid[0:16, 0:16]
    img = np.stack([xx * 16, yy * 16, 255 - (xx + yy) * 8], -1).astype(np.uint8)
    img[4:9, 5:11] = (250, 20, 30)
    path = tmp_path_factory.mktemp("img") / "photo.png"
    Image.fromarray(img).save(path)
    return str(path), img


def right_half_mask(h: int = 16, w: int = 16, start: int = 8) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    m[:, start:] = 1
    return m


# ---------------------------------------------------------------- img2img

def test_img2img_strength_1_equals_plain_generation(text_pipe, photo):
    for settings in (EULER, SampleSettings(sampler="euler_ancestral", steps=5, cfg=2.0)):
        [edited] = text_pipe.img2img(photo[0], CAPTIONS[0], strength=1.0, seeds=[3], settings=settings)
        [plain] = text_pipe(CAPTIONS[0], seeds=[3], settings=settings)
        assert np.array_equal(np.asarray(edited.image), np.asarray(plain.image))
        assert edited.record["steps_run"] == settings.steps and edited.record["first_step"] == 0


def test_img2img_noises_to_the_selected_sigma_and_runs_the_tail(text_pipe, photo):
    [out] = text_pipe.img2img(photo[0], CAPTIONS[1], strength=0.5, seeds=[5], settings=EULER)
    r = out.record
    assert (r["first_step"], r["steps_run"], r["nfe"], r["denoising_strength"]) == (3, 3, 3, 0.5)
    # the same computation by hand: x0 + sigma_3 eps, Euler over sigmas[3:]
    model = text_pipe.model
    sigmas = get_sigmas("karras", 6, model.sigma_min, model.sigma_max)
    x0 = torch.from_numpy(photo[1]).permute(2, 0, 1)[None].float() / 127.5 - 1
    g = rng.generators_for([5])
    x = x0 + float(sigmas[3]) * rng.randn(x0.shape, g)
    with torch.no_grad():
        ref = get_sampler("euler")(model, x, sigmas[3:], model.condition(prompts=[CAPTIONS[1]]), generator=g)
    ref_u8 = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(out.image), ref_u8)
    # low strength stays near the input, full strength does not
    [near] = text_pipe.img2img(photo[0], CAPTIONS[1], strength=1 / 6, seeds=[5], settings=EULER)
    assert np.abs(np.asarray(near.image).astype(int) - photo[1]).mean() < np.abs(np.asarray(out.image).astype(int) - photo[1]).mean()


@pytest.mark.parametrize("strength, message", [(0, r"strength must be in \(0, 1\]"), (1.5, r"strength must be in \(0, 1\]"),
                                               (0.1, r"runs 0 steps .* use strength >= 0.167 or more --steps")])
def test_img2img_strength_that_runs_no_steps_is_an_error(text_pipe, photo, strength, message):
    with pytest.raises(ValueError, match=message):
        text_pipe.img2img(photo[0], CAPTIONS[0], strength=strength, settings=EULER)


# ---------------------------------------------------------------- inpaint

@pytest.mark.parametrize("sampler, options", [("dpmpp_2m", {}), ("euler_ancestral", {}), ("heun", {}),
                                              ("dpmpp_3m_sde", {"feather_px": 3}), ("euler", {"jumps": 2, "jump_length": 2})])
def test_inpaint_keeps_unmasked_pixels_exactly(text_pipe, photo, sampler, options):
    mask = right_half_mask()
    settings = SampleSettings(sampler=sampler, steps=5, cfg=2.0)
    outs = text_pipe.inpaint(photo[0], mask, CAPTIONS[1], seeds=[0, 1], settings=settings, **options)
    for out in outs:
        a = np.asarray(out.image)
        assert np.array_equal(a[:, :8], photo[1][:, :8])
        assert not np.array_equal(a[:, 8:], photo[1][:, 8:])
    assert not np.array_equal(np.asarray(outs[0].image), np.asarray(outs[1].image))


@pytest.mark.parametrize("sampler", sorted(name for name, fn in SAMPLERS.items() if not fn.stochastic))
def test_known_region_is_at_the_current_noise_level_after_every_step(text_pipe, photo, sampler):
    """Deterministic samplers: in the kept region x = x0 + sigma_next * eps (the initial eps) after each step."""
    x0 = torch.from_numpy(photo[1]).permute(2, 0, 1)[None].float() / 127.5 - 1
    settings = SampleSettings(sampler=sampler, steps=6, cfg=1.0)
    sigmas = settings.sigmas(text_pipe.model).tolist()
    eps = rng.randn(x0.shape, rng.generators_for([4]))
    seen = []
    text_pipe.inpaint(photo[0], right_half_mask(), CAPTIONS[0], seeds=[4], settings=settings,
                      callback=lambda info: seen.append((info.sigma_next, info.x.clone())))
    assert [s for s, _ in seen] == sigmas[1:]
    for sigma_next, x in seen:
        torch.testing.assert_close(x[..., :8], (x0 + sigma_next * eps)[..., :8], atol=1e-4 * max(1.0, sigma_next), rtol=0)
    assert (seen[0][1][..., 8:] - (x0 + sigmas[1] * eps)[..., 8:]).abs().max() > 0.1  # the masked region moves freely


def test_repaint_blocks_and_their_cost(text_pipe, photo):
    assert edit.repaint_blocks(7, 2, 3) == [(0, 3)] * 3 + [(3, 6)] * 3 + [(6, 7)]
    assert edit.repaint_blocks(6, 0, 3) == [(0, 6)]
    steps = []
    [out] = text_pipe.inpaint(photo[0], right_half_mask(), CAPTIONS[2], seeds=[0], jumps=2, jump_length=3,
                              settings=SampleSettings(sampler="heun", steps=7, cfg=1.0), callback=lambda info: steps.append(info))
    # 19 solver steps; heun uses 2 evaluations per step except the last one to sigma = 0
    assert (out.record["steps_run"], out.record["nfe"]) == (19, 37)
    assert [s.i for s in steps] == list(range(19)) and steps[-1].n == 19 and steps[-1].nfe == 37
    with pytest.raises(ValueError, match="jump length must be"):
        edit.repaint_blocks(7, 2, 0)


def test_feather_is_an_inward_linear_ramp():
    mask = torch.zeros(9, 9)
    mask[2:7, 2:7] = 1
    soft = edit.feather(mask, 2)
    assert soft[mask == 0].eq(0).all()
    assert soft[4, 4] == 1 and soft[3, 3] == 1  # Chebyshev distance 3 and 2 from the kept ring
    assert soft[2, 4] == 0.5 and soft[2, 2] == 0.5  # distance 1
    assert torch.equal(edit.feather(mask, 0), mask)
    with pytest.raises(ValueError, match="feather must be a whole number"):
        edit.feather(mask, -1)


def test_model_space_mask_keeps_a_cell_only_if_all_its_pixels_are_kept():
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 1, 16, 16, generator=g) > 0.8).float()
    assert torch.equal(masks.model_space_mask(mask, 2), (F.avg_pool2d(mask, 2) > 0).float())
    assert torch.equal(masks.model_space_mask(mask, 1), mask)


class PoolCodec:
    """Stand-in latent codec of factor 2: average-pool encode, nearest-neighbor decode."""

    factor = 2

    def __init__(self, channels: int):
        self.latent_channels = self.image_channels = channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(images, 2)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="nearest")


def test_latent_path_downsamples_the_mask_and_reimposes_in_model_space(text_pipe, photo, tmp_path):
    """A 32x32 image through a factor-2 codec into the 16x16 model; the mask boundary at column 13
    splits model cell 6 (pixels 12-13), which must be replaced, while cells 0-5 are re-imposed."""
    big = np.asarray(Image.fromarray(photo[1]).resize((32, 32), Image.NEAREST))
    big = big.copy()
    big[::2, ::2] = 255 - big[::2, ::2]  # detail the codec cannot represent (its error is not zero)
    path = tmp_path / "big.png"
    Image.fromarray(big).save(path)
    pipe = Pipeline(text_pipe.model, "tiny-latent", "0", {"sampler": "euler", "steps": 5})
    pipe.codec = PoolCodec(3)
    mask = right_half_mask(32, 32, start=13)
    z0 = pipe.codec.encode(torch.from_numpy(big).permute(2, 0, 1)[None].float() / 127.5 - 1)
    eps = rng.randn(z0.shape, rng.generators_for([2]))
    seen = []
    [out] = pipe.inpaint(str(path), mask, CAPTIONS[1], seeds=[2], callback=lambda info: seen.append((info.sigma_next, info.x)))
    a = np.asarray(out.image)
    assert a.shape == (32, 32, 3) and np.array_equal(a[:, :13], big[:, :13])  # kept pixels pasted back exactly
    assert not np.array_equal(a[:, 13:], big[:, 13:])
    for sigma_next, x in seen:
        torch.testing.assert_close(x[..., :6], (z0 + sigma_next * eps)[..., :6], atol=1e-4 * max(1.0, sigma_next), rtol=0)
    assert (seen[0][1][..., 6] - (z0 + seen[0][0] * eps)[..., 6]).abs().max() > 0.1  # the split cell is free
    with pytest.raises(ValueError, match="each side must be a multiple of the codec's factor 2"):
        pipe.outpaint(str(path), "left=3", CAPTIONS[0])


# ---------------------------------------------------------------- outpaint

def test_outpaint_extends_the_canvas_and_keeps_the_original(text_pipe, photo, tmp_path):
    strip = photo[1][4:12]
    path = tmp_path / "strip.png"
    Image.fromarray(strip).save(path)
    [out] = text_pipe.outpaint(str(path), "top=4,bottom=4", CAPTIONS[0], seeds=[1], settings=EULER, feather_px=2)
    a = np.asarray(out.image)
    assert a.shape == (16, 16, 3) and np.array_equal(a[4:12], strip)
    assert out.record["kind"] == "outpaint" and out.record["extend"] == {"left": 0, "top": 4, "right": 0, "bottom": 4}
    with pytest.raises(ValueError, match="is 16x12 but this model makes square images"):
        text_pipe.outpaint(str(path), "top=4", CAPTIONS[0])
    with pytest.raises(ValueError, match="unknown side 'up'"):
        text_pipe.outpaint(str(path), "up=4", CAPTIONS[0])
    with pytest.raises(ValueError, match="adds no pixels"):
        text_pipe.outpaint(str(path), "left=0", CAPTIONS[0])


# ---------------------------------------------------------------- inversion

def test_inversion_round_trip_error_falls_with_nfe():
    """On a Gaussian mixture (exact denoiser): invert a data sample to noise, sample back; Euler error
    falls with steps, Heun's falls faster."""
    mix = example_mixture(2)
    x0 = mix.sample(256, torch.Generator().manual_seed(0))
    errors = {}
    with torch_threads(1):
        for name, order in (("euler", 1), ("heun", 2)):
            for steps in (8, 32, 128):
                sigmas = get_sigmas("karras", steps, 0.002, 80.0).double()
                noise, nfe = edit.invert_to_noise(mix.denoiser, None, x0, sigmas.tolist(), order)
                assert nfe == get_sampler(name).nfe(sigmas)
                back = get_sampler(name)(mix.denoiser, noise, sigmas)
                errors[name, steps] = float((back - x0).abs().max())
    assert errors["euler", 8] > errors["euler", 32] > errors["euler", 128]
    assert errors["heun", 8] > errors["heun", 32] > errors["heun", 128]
    assert errors["heun", 32] < errors["euler", 128]


def test_pipeline_invert_reconstructs_and_redraws_from_the_same_noise(text_pipe, photo):
    rmse = {}
    for steps in (4, 40):
        outs = text_pipe.invert(photo[0], CAPTIONS[0], target_prompts=[CAPTIONS[1]],
                                settings=SampleSettings(sampler="heun", steps=steps, cfg=1.0))
        rec, edited = outs
        assert rec.record["kind"] == "invert" and edited.record["kind"] == "invert-edit"
        assert edited.record["prompt"] == CAPTIONS[1] and edited.record["source_prompt"] == CAPTIONS[0]
        assert rec.record["inversion_nfe"] == rec.record["nfe"] == 2 * steps - 1
        rmse[steps] = rec.record["reconstruction_rmse"]
        assert rmse[steps] == pytest.approx(edit.rmse(np.asarray(rec.image), photo[1]), abs=1e-4)
    assert rmse[40] < rmse[4]
    with pytest.raises(ValueError, match="invert runs deterministic Euler/DDIM or Heun steps"):
        text_pipe.invert(photo[0], CAPTIONS[0], settings=SampleSettings(sampler="dpmpp_2m", steps=4))


# ---------------------------------------------------------------- records and inputs

def test_records_chain_and_carry_the_edit(text_pipe, photo, tmp_path):
    [first] = text_pipe.inpaint(photo[0], right_half_mask(), CAPTIONS[1], seeds=[0], settings=EULER, feather_px=1)
    p1 = first.save(tmp_path / "a.png")
    r1 = read_record(p1)
    assert r1["kind"] == "inpaint" and r1["input_record"] is None and r1["mask"]["feather"] == 1
    assert r1["input_image"]["file"] == "photo.png" and len(r1["input_image"]["sha256"]) == 10
    [second] = text_pipe.img2img(p1, CAPTIONS[2], strength=0.5, seeds=[1], settings=EULER)
    p2 = second.save(tmp_path / "b.png")
    assert read_record(p2)["input_record"] == r1
    with Image.open(p2) as im:
        assert im.text["parameters"].endswith("Denoising strength: 0.5")


def test_bad_inputs_give_one_line_errors(text_pipe, photo, tmp_path, monkeypatch):
    path, img = photo
    gray = (right_half_mask() * 255).astype(np.uint8)
    gray[0, 0] = 77
    cases = {"gray.png": gray, "black.png": np.zeros((16, 16), np.uint8), "white.png": np.full((16, 16), 255, np.uint8),
             "small.png": np.zeros((8, 16), np.uint8)}
    for name, arr in cases.items():
        Image.fromarray(arr).save(tmp_path / name)
    (tmp_path / "text.png").write_text("not a picture")
    checks = [
        (lambda: text_pipe.inpaint(path, tmp_path / "gray.png", CAPTIONS[0]), "1 gray pixels .* pass --binarize"),
        (lambda: text_pipe.inpaint(path, tmp_path / "black.png", CAPTIONS[0]), "all black: it replaces nothing"),
        (lambda: text_pipe.inpaint(path, tmp_path / "white.png", CAPTIONS[0]), "all white: it replaces everything"),
        (lambda: text_pipe.inpaint(path, tmp_path / "small.png", CAPTIONS[0]), "mask is 16x8 but the image is 16x16"),
        (lambda: text_pipe.img2img(tmp_path / "text.png", CAPTIONS[0]), "is not an image Pillow can read"),
        (lambda: text_pipe.img2img(tmp_path / "none.png", CAPTIONS[0]), "does not exist"),
        (lambda: text_pipe.img2img(tmp_path / "small.png", CAPTIONS[0]), "16x8 but this model makes square images"),
        (lambda: text_pipe.img2img(path, "a purple dragon"), "never saw in training: purple, dragon"),
    ]
    for call, message in checks:
        with pytest.raises((ValueError, OSError), match=message):
            call()
    [ok] = text_pipe.inpaint(path, tmp_path / "gray.png", CAPTIONS[0], binarize=True, settings=EULER)
    assert ok.record["mask"]["binarized"] and np.array_equal(np.asarray(ok.image)[:, :8], img[:, :8])
    monkeypatch.setattr(edit, "MAX_INPUT_PIXELS", 100)
    with pytest.raises(ValueError, match="more than the limit of 100"):
        text_pipe.img2img(path, CAPTIONS[0])


def test_conversions_are_explicit(text_pipe, class_pipe, photo, tmp_path):
    rgba = np.concatenate([photo[1], np.full((16, 16, 1), 128, np.uint8)], -1)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    [out] = text_pipe.img2img(tmp_path / "rgba.png", CAPTIONS[0], strength=0.5, settings=EULER)
    assert out.record["input_conversions"] == ["composited the RGBA image's transparency over black (alpha is not an image channel)"]
    # RGB into a 1-channel class model: converted to grayscale and said so; resize on request only
    big = tmp_path / "big.png"
    Image.fromarray(photo[1]).resize((17, 17)).save(big)
    with pytest.raises(ValueError, match=r"cannot make 17x17 .* pass --resize"):
        class_pipe.img2img(big, class_label=3, settings=EULER)
    [g] = class_pipe.inpaint(big, right_half_mask(17, 17, 9), class_label=3, resize=True, settings=EULER)
    notes = g.record["input_conversions"]
    assert notes == ["converted the RGB image to grayscale for this 1-channel model", "resized the 17x17 image to 16x16 (Lanczos)"]
    assert g.image.mode == "L" and g.image.size == (16, 16)


def test_cli_edit_writes_pngs_and_never_overwrites(text_model, photo, tmp_path, capsys):
    folder = text_model
    mask = tmp_path / "mask.png"
    Image.fromarray((right_half_mask() * 255).astype(np.uint8)).save(mask)
    args = ["edit", "inpaint", "--model", str(folder), "--image", photo[0], "--mask", str(mask), "--prompt", CAPTIONS[1],
            "--seed", "0-1", "--steps", "3", "--out", str(tmp_path / "out"), "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "inpaint: strength 1 ran 3 solver steps" in out and "3 denoiser evaluations per image" in out
    written = sorted((tmp_path / "out").glob("*.png"))
    assert [p.name for p in written] == ["photo-inpaint-s0.png", "photo-inpaint-s1.png"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "already exists; pass --overwrite" in err and "\n" not in err
    assert main(["edit", "img2img", "--model", str(folder), "--image", photo[0], "--prompt", CAPTIONS[0], "--strength", "0.01",
                 "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "runs 0 steps" in capsys.readouterr().err
    assert main(["edit", "invert", "--model", str(folder), "--image", photo[0], "--prompt", CAPTIONS[0], "--steps", "3",
                 "--cfg", "1", "--target-prompt", CAPTIONS[2], "--out", str(tmp_path / "o3"), "--quiet"]) == 0
    assert "reconstruction RMSE" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "o3").iterdir()) == ["photo-invert-reconstruction.png", "photo-invert-two-yellow-squares.png"]
