"""Replay and provenance of edits: bit-exact replay of every edit kind (input by --input or
regenerated from the chained record, masks embedded or by --mask), tampering and wrong inputs,
watermark / block list / signing options on edits, and the training-free corrections in edits."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from diffuse import credentials, edit, watermark
from diffuse.cli import main
from diffuse.pipeline import Pipeline, SampleSettings
from diffuse.record import pixels_hash, read_record, save_png
from diffuse.replay import replay

from conftest import CAPTIONS

needs_provenance = pytest.mark.skipif(importlib.util.find_spec("imwatermark") is None or importlib.util.find_spec("c2pa") is None,
                                      reason="needs invisible-watermark and c2pa-python (pip install 'diffuse[provenance]')")
ITEMS = ["model", "software", "sigmas", "settings"]


@pytest.fixture(scope="module")
def text_model(tiny_text_model):
    return tiny_text_model({"sampler": "dpmpp_2m", "steps": 4, "cfg": 2.0})


@pytest.fixture
def pipe(text_model) -> Pipeline:
    return Pipeline.load(text_model)


def _picture(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // w, yy * 255 // h, 255 - (xx + yy) * 127 // (h + w)], -1).astype(np.uint8)
    img[h // 4:h // 2, w // 3:2 * w // 3] = (250, 20, 30)
    return img


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """(path, pixels) of a 16x16 RGB picture without a diffuse record."""
    path = tmp_path_factory.mktemp("img") / "photo.png"
    img = _picture(16, 16)
    Image.fromarray(img).save(path)
    return path, img


def right_half(h: int = 16, w: int = 16) -> np.ndarray:
    m = np.zeros((h, w), np.float32)
    m[:, w // 2:] = 1
    return m


def _names(report) -> list[str]:
    return [name for name, _, _ in report.items]


def _edit_of_kind(pipe, kind, photo, tmp_path):
    """One edit of ``kind`` of a plain picture (no record), with a sampler and options that exercise it."""
    path, img = photo
    if kind == "img2img":  # a 20x20 input resized to the model's 16x16
        big = tmp_path / "big.png"
        Image.fromarray(_picture(20, 20)).save(big)
        return big, pipe.img2img(big, CAPTIONS[0], strength=0.5, seeds=[7], resize=True,
                                 settings=SampleSettings(sampler="dpmpp_2m_sde", steps=4, cfg=2.0))[0]
    if kind == "inpaint":
        return path, pipe.inpaint(path, right_half(), CAPTIONS[1], strength=0.8, feather_px=2, jumps=1, jump_length=2,
                                  seeds=[3], settings=SampleSettings(sampler="euler_ancestral", steps=4, cfg=2.0))[0]
    if kind == "outpaint":
        strip = tmp_path / "strip.png"
        Image.fromarray(img[:, 4:12]).save(strip)
        return strip, pipe.outpaint(strip, "left=4,right=4", CAPTIONS[2], feather_px=1, seeds=[5],
                                    settings=SampleSettings(sampler="heun", steps=3, cfg=2.0))[0]
    recon, redrawn = pipe.invert(path, CAPTIONS[0], target_prompts=[CAPTIONS[1]], settings=SampleSettings(sampler="heun", steps=3))
    return path, recon if kind == "invert" else redrawn


@pytest.mark.parametrize("kind", ["img2img", "inpaint", "outpaint", "invert", "invert-edit"])
def test_every_edit_kind_replays_bit_exact_from_its_input(pipe, text_model, photo, tmp_path, kind):
    source, result = _edit_of_kind(pipe, kind, photo, tmp_path)
    assert result.record["kind"] == kind
    out = result.save(tmp_path / "out.png")
    report = replay(out, model=str(text_model), input_image=source)
    assert report.expect_exact and report.exact and report.matched, report.lines()
    assert _names(report) == ITEMS + ["input"] + (["mask"] if kind == "inpaint" else []) + ["pixels"]
    assert dict((n, d) for n, _, d in report.items)["input"].startswith(f"{source} has the recorded pixels (sha256 ")


def test_edit_records_identify_inputs_by_pixels(pipe, photo, tmp_path):
    path, img = photo
    [g] = pipe.inpaint(path, right_half(), CAPTIONS[1], seeds=[0])
    info, mask = g.record["input_image"], g.record["mask"]
    assert info["pixels_sha256"] == pixels_hash(img) and len(info["pixels_sha256"]) == 64
    # the same pixels in another file (other compression, extra text chunk) have the same identity
    other = tmp_path / "same.png"
    info_chunk = PngImagePlugin.PngInfo()
    info_chunk.add_text("comment", "re-saved")
    Image.fromarray(img).save(other, compress_level=1, pnginfo=info_chunk)
    assert edit.read_image(other, 3).info["pixels_sha256"] == info["pixels_sha256"] != info["sha256"]
    assert np.array_equal(edit.decode_mask(mask["embedded"]), right_half())
    assert mask["pixels_sha256"] == edit.mask_hash(right_half()) and g.record["resize"] is False


def test_chain_generate_img2img_inpaint_replays_without_inputs(pipe, text_model, tmp_path, capsys):
    [a] = pipe(CAPTIONS[0], seeds=[1], settings=SampleSettings(sampler="euler_ancestral", steps=3, cfg=2.0))
    [b] = pipe.img2img(a.save(tmp_path / "a.png"), CAPTIONS[1], strength=0.7, seeds=[2])
    [c] = pipe.inpaint(b.save(tmp_path / "b.png"), right_half(), CAPTIONS[2], seeds=[3], jumps=1, jump_length=2)
    path = c.save(tmp_path / "c.png")
    assert c.record["input_record"]["input_record"]["kind"] == "generate"
    report = replay(path, model=str(text_model))
    assert report.exact and report.matched, report.lines()
    assert _names(report) == ITEMS + [f"input/{n}" for n in ITEMS] + [f"input/input/{n}" for n in ITEMS] \
        + ["input/input", "input", "mask", "pixels"]
    assert main(["replay", str(path), "--model", str(text_model)]) == 0
    out = capsys.readouterr().out
    assert "match   input/input: regenerated from its chained generate record: the recorded pixels" in out
    assert "match   input: regenerated from its chained img2img record" in out and "the image matches its record" in out


def test_tampered_output_wrong_or_missing_input_and_changed_chained_input(pipe, text_model, photo, tmp_path, capsys):
    path, img = photo
    [g] = pipe.img2img(path, CAPTIONS[0], strength=0.5, seeds=[4])
    good = g.save(tmp_path / "good.png")
    pixels = np.asarray(g.image).copy()
    pixels[2, 3, 0] ^= 1
    save_png(Image.fromarray(pixels), tmp_path / "bad.png", g.record)
    model = ["--model", str(text_model)]
    assert main(["replay", str(tmp_path / "bad.png"), "--input", str(path), *model]) == 1
    out = capsys.readouterr().out
    assert "DIFFER  pixels: 1 of 768 values differ, max 1" in out and "does NOT match" in out
    wrong = tmp_path / "wrong.png"
    Image.fromarray(255 - img).save(wrong)
    errors = {
        ("--input", str(wrong)): f"--input {wrong} is not this img2img's input: its pixels hash to",
        (): "this img2img record's input (photo.png, 16x16 RGB) carries no diffuse record to regenerate it from; "
            "give the input image with --input FILE",
        ("--input", str(path), "--mask", str(wrong)): "--mask only applies to inpainting",
    }
    for extra, message in errors.items():
        assert main(["replay", str(good), *model, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and err.count("\n") == 0, err
    # a generated input whose pixels were changed after it was made (record kept): the chain no longer holds
    [a] = pipe(CAPTIONS[1], seeds=[0])
    changed = np.asarray(a.image).copy()
    changed[0, 0] = 0
    save_png(Image.fromarray(changed), tmp_path / "a.png", a.record)
    [e] = pipe.img2img(tmp_path / "a.png", CAPTIONS[2], strength=0.5, seeds=[0])
    report = replay(e.save(tmp_path / "e.png"), model=str(text_model))
    assert not report.matched and "its pixels hash to" in dict((n, d) for n, _, d in report.items)["input"]
    assert replay(tmp_path / "e.png", model=str(text_model), input_image=tmp_path / "a.png").exact


def test_a_mask_too_large_to_embed_is_given_with_mask(pipe, text_model, photo, tmp_path, monkeypatch, capsys):
    path, _ = photo
    monkeypatch.setattr(edit, "MASK_EMBED_LIMIT", 10)
    mask = tmp_path / "mask.png"
    Image.fromarray((right_half() * 255).astype(np.uint8)).save(mask)
    [g] = pipe.inpaint(path, mask, CAPTIONS[1], seeds=[1])
    assert g.record["mask"]["embedded"] is None and g.record["mask"]["file"] == "mask.png"
    out = g.save(tmp_path / "out.png")
    args = ["replay", str(out), "--model", str(text_model), "--input", str(path)]
    assert main(args) == 2 and "keeps only its mask's hash" in capsys.readouterr().err
    other = tmp_path / "other.png"
    Image.fromarray((right_half().T * 255).astype(np.uint8)).save(other)
    assert main(args + ["--mask", str(other)]) == 2 and f"--mask {other} is not this inpaint's mask" in capsys.readouterr().err
    assert main(args + ["--mask", str(mask)]) == 0
    assert f"match   mask: {mask} is the recorded mask" in capsys.readouterr().out


def test_edits_honor_no_watermark_and_the_block_list(text_model, photo, tmp_path, capsys):
    path, _ = photo
    base = ["edit", "img2img", "--model", str(text_model), "--image", str(path), "--strength", "0.5"]
    assert main(base + ["--prompt", CAPTIONS[1], "--out", str(tmp_path / "a")]) == 0  # not --quiet: it silences the note
    record = read_record(tmp_path / "a" / "photo-img2img-s0.png")
    assert record["watermark"]["reason"] == "16x16 is below the 256x256 the method needs"
    assert record["prompt_filter"]["source"] == "the default block list" and record["prompt_filter"]["rules"] > 0
    assert "note: no invisible watermark was added: 16x16 is below" in capsys.readouterr().err
    assert main(base + ["--prompt", CAPTIONS[1], "--out", str(tmp_path / "b"), "--no-watermark", "--blocklist", "none",
                        "--quiet"]) == 0
    record = read_record(tmp_path / "b" / "photo-img2img-s0.png")
    assert record["watermark"] == {"method": "dwtDctSvd", "applied": False, "reason": "disabled"}
    assert record["prompt_filter"] is None
    blocklist = tmp_path / "block.txt"
    blocklist.write_text("word: triangle\n")
    capsys.readouterr()
    for edit_args in (["--prompt", CAPTIONS[1]], ["--prompt", CAPTIONS[0], "--negative", CAPTIONS[1]]):
        assert main(base + edit_args + ["--out", str(tmp_path / "c"), "--blocklist", str(blocklist)]) == 2
        err = capsys.readouterr().err
        assert f"refused by block rule word: triangle, {blocklist} line 1" in err and err.count("\n") == 1
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").iterdir())


def test_corrections_change_edits_and_replay_reproduces_them(pipe, text_model, photo, tmp_path):
    path, _ = photo
    plain, scaled, dcw = (SampleSettings(sampler="euler", steps=4, cfg=2.0, **c)
                          for c in ({}, {"eps_scaling": 1.1}, {"dcw": 0.2}))
    ref = np.asarray(pipe.img2img(path, CAPTIONS[0], strength=0.75, seeds=[2], settings=plain)[0].image).astype(int)
    for settings in (scaled, dcw):
        [g] = pipe.img2img(path, CAPTIONS[0], strength=0.75, seeds=[2], settings=settings)
        assert np.abs(np.asarray(g.image).astype(int) - ref).max() > 0
        assert (g.record["eps_scaling"], g.record["dcw"]) == (settings.eps_scaling, settings.dcw)
        assert replay(g.save(tmp_path / f"{settings.dcw}.png"), model=str(text_model), input_image=path).exact
        # strength 1 still equals plain generation, corrections included (DCW scaled by the full schedule's sigma_max)
        [full] = pipe.img2img(path, CAPTIONS[0], strength=1.0, seeds=[2], settings=settings)
        [gen] = pipe(CAPTIONS[0], seeds=[2], settings=settings)
        assert np.array_equal(np.asarray(full.image), np.asarray(gen.image))
    # the inversion's redraw and inpainting take DCW too; the CLI flags reach the edit's record
    args = ["edit", "inpaint", "--model", str(text_model), "--image", str(path), "--prompt", CAPTIONS[1], "--quiet",
            "--steps", "3"]
    mask = tmp_path / "mask.png"
    Image.fromarray((right_half() * 255).astype(np.uint8)).save(mask)
    assert main(args + ["--mask", str(mask), "--dcw", "0.3", "--eps-scaling", "1.05", "--out", str(tmp_path / "o")]) == 0
    out = tmp_path / "o" / "photo-inpaint-s0.png"
    assert (read_record(out)["dcw"], read_record(out)["eps_scaling"]) == (0.3, 1.05)
    assert replay(out, model=str(text_model), input_image=path).exact
    heun = SampleSettings(sampler="heun", steps=3)
    [a] = pipe.invert(path, CAPTIONS[0], settings=heun)
    [b] = pipe.invert(path, CAPTIONS[0], settings=SampleSettings(sampler="heun", steps=3, dcw=0.3))
    assert not np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_replay_honors_the_guidance_interval_of_generate_and_edit_records(pipe, text_model, tmp_path):
    limited = SampleSettings(steps=4, cfg=3.0, cfg_interval=(0.3, 5.0))
    [a] = pipe(CAPTIONS[0], seeds=[1], settings=limited)
    [b] = pipe.img2img(a.save(tmp_path / "a.png"), CAPTIONS[1], strength=0.8, seeds=[2], settings=limited)
    assert a.record["cfg_interval"] == b.record["cfg_interval"] == (0.3, 5.0)
    report = replay(b.save(tmp_path / "b.png"), model=str(text_model))
    assert report.exact and report.matched, report.lines()
    assert "cfg 3 where 0.3 < sigma <= 5," in dict((n, d) for n, _, d in report.items)["settings"]
    # the same pixels under a record without the interval: replay guides every step and no longer matches
    save_png(a.image, tmp_path / "plain.png", {**a.record, "cfg_interval": None})
    assert not replay(tmp_path / "plain.png", model=str(text_model)).matched


@pytest.fixture(scope="module")
def deep_text_model(tmp_path_factory, random_model):
    """A 16x16 text model with 5 levels and attention only at the deepest (1/16 of the side), so
    256x256 images (the watermark's minimum) take a fraction of a second."""
    from diffuse.config import ModelConfig, _unet
    from diffuse.text import WordTokenizer

    cfg = ModelConfig(backbone_config=_unet("tiny", text_dim=32, model_channels=8, channel_mult=[1, 1, 1, 1, 1],
                                            attention_resolutions=[1], norm_groups=4),
                      conditioning="text", image_size=16,
                      text_config={"dim": 32, "depth": 1, "num_heads": 2, "tokenizer": WordTokenizer.from_captions(CAPTIONS).to_dict()})
    folder = tmp_path_factory.mktemp("m") / "deep-text"
    random_model(cfg).save(folder)
    return folder


@needs_provenance
def test_a_large_edit_is_watermarked_signed_with_its_input_as_ingredient_and_replays(deep_text_model, tmp_path, capsys):
    keys = credentials.init_keys(tmp_path / "keys")
    fast = ["--model", str(deep_text_model), "--steps", "2", "--quiet", "--sign", str(keys)]
    assert main(["generate", CAPTIONS[0], "--size", "256", "--out", str(tmp_path / "g"), *fast]) == 0
    source = tmp_path / "g" / "a-red-circle-above-a-blue-square-s0.png"
    assert main(["edit", "img2img", "--image", str(source), "--prompt", CAPTIONS[1], "--strength", "0.5",
                 "--out", str(tmp_path / "e"), *fast]) == 0
    out = tmp_path / "e" / "a-red-circle-above-a-blue-square-s0-img2img-s0.png"
    record = read_record(out)
    assert record["watermark"]["applied"] and watermark.detect(Image.open(out)).matches == 64
    creds = credentials.read_credentials(out, (keys / "root.pem").read_bytes())
    assert creds.state == "Trusted" and creds.actions == ["c2pa.opened", "c2pa.edited"]
    assert creds.ingredients == [f"{source.name} (signed)"] and creds.record == record
    capsys.readouterr()
    assert main(["verify", str(out), "--trust", str(keys / "root.pem")]) == 0
    lines = capsys.readouterr().out
    assert "watermark: present, intact: 64/64" in lines and "actions c2pa.opened, c2pa.edited" in lines
    assert "edited from a-red-circle-above-a-blue-square-s0.png, whose own generate record is chained" in lines
    report = replay(out, model=str(deep_text_model))  # the input and both watermarks regenerated from the records
    assert report.exact and report.matched, report.lines()
    with pytest.raises(ValueError, match="needs its input image as the C2PA ingredient"):
        credentials.sign_png(out, credentials.SigningKeys.load(keys))
