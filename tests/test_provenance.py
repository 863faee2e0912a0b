"""Provenance: replay from the PNG record (every sampler, bit-exact), invisible watermark,
C2PA content credentials, and the verify/replay/keys commands."""

import importlib.util
import io
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffuse import credentials, watermark
from diffuse.pipeline import Pipeline, SampleSettings
from diffuse.record import read_record, save_png
from diffuse.replay import replay
from diffuse.samplers import SAMPLERS

CAPTIONS = ["a red circle above a blue square", "a green triangle"]
needs_watermark = pytest.mark.skipif(importlib.util.find_spec("imwatermark") is None or importlib.util.find_spec("skimage") is None,
                                     reason="needs invisible-watermark and scikit-image (pip install 'diffuse[provenance]' scikit-image)")
needs_c2pa = pytest.mark.skipif(importlib.util.find_spec("c2pa") is None or importlib.util.find_spec("imwatermark") is None,
                                reason="needs c2pa-python and invisible-watermark (pip install 'diffuse[provenance]')")


@pytest.fixture(scope="module")
def text_model(tiny_text_model):
    folder = tiny_text_model()
    return folder


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "diffuse", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})})


def _save(pipe, tmp_path, name="a.png", **kwargs):
    [g] = pipe(CAPTIONS[0], **kwargs)
    return g, g.save(tmp_path / name)


# ---------------------------------------------------------------- replay

@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_replay_is_bit_exact_for_every_sampler(text_model, tmp_path, sampler):
    pipe = Pipeline.load(text_model)
    g, path = _save(pipe, tmp_path, seeds=[11], settings=SampleSettings(sampler=sampler, steps=3, cfg=2.0))
    report = replay(path, model=str(text_model))
    assert report.expect_exact and report.exact and report.matched, report.lines()
    assert [name for name, _, _ in report.items] == ["model", "software", "sigmas", "settings", "pixels"]


def test_replay_cli_in_a_new_process_and_a_changed_pixel(text_model, tmp_path):
    pipe = Pipeline.load(text_model)
    g, path = _save(pipe, tmp_path, seeds=[5], settings=SampleSettings(sampler="dpmpp_2m_sde", steps=4, cfg=2.0))
    r = _cli("replay", str(path), "--model", str(text_model), env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "match   pixels: bit-exact (16x16x3)" in r.stdout and "the image matches its record" in r.stdout
    # one pixel value off by one: not bit-exact, and the software is the same, so it fails
    pixels = np.asarray(g.image).copy()
    pixels[3, 4, 1] ^= 1
    save_png(Image.fromarray(pixels), tmp_path / "b.png", g.record)
    r = _cli("replay", str(tmp_path / "b.png"), "--model", str(text_model))
    assert r.returncode == 1
    assert "DIFFER  pixels: 1 of 768 values differ, max 1, mean 0.001 levels" in r.stdout
    assert "bit-exact expected" in r.stdout and "does NOT match" in r.stdout


def test_replay_with_other_software_uses_the_tolerance(text_model, tmp_path):
    pipe = Pipeline.load(text_model)
    [g] = pipe(CAPTIONS[1], seeds=[2], settings=SampleSettings(steps=3))
    record = {**g.record, "torch_version": "0.0-elsewhere"}
    pixels = np.asarray(g.image).astype(np.int16)
    pixels[:2] += 3  # 2 of 16 rows off by 3 levels: mean 0.375
    save_png(Image.fromarray(pixels.clip(0, 255).astype(np.uint8)), tmp_path / "c.png", record)
    report = replay(tmp_path / "c.png", model=str(text_model), tolerance=0.5)
    assert not report.expect_exact and report.matched
    assert "torch 0.0-elsewhere ->" in dict((n, d) for n, _, d in report.items)["software"]
    assert not replay(tmp_path / "c.png", model=str(text_model), tolerance=0.3).matched


def test_replay_refuses_what_it_cannot_replay(text_model, tmp_path):
    pipe = Pipeline.load(text_model)
    [g] = pipe(CAPTIONS[0], seeds=[0], settings=SampleSettings(steps=2))
    save_png(g.image, tmp_path / "edit.png", {**g.record, "kind": "img2img", "input_record": g.record})
    r = _cli("replay", str(tmp_path / "edit.png"), "--model", str(text_model))
    assert r.returncode == 2 and "does not identify its input by pixel hash" in r.stderr
    save_png(g.image, tmp_path / "up.png", {**g.record, "kind": "upscale"})
    with pytest.raises(ValueError, match="a 'upscale' record cannot be replayed by this version; it replays: generate, img2img, "
                                         "inpaint, outpaint, invert, invert-edit"):
        replay(tmp_path / "up.png", model=str(text_model))
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    r = _cli("replay", str(tmp_path / "plain.png"))
    assert r.returncode == 2 and "has no diffuse generation record" in r.stderr
    save_png(g.image, tmp_path / "other.png", {**g.record, "model_hash": "0123456789"})
    r = _cli("replay", str(tmp_path / "other.png"), "--model", str(text_model))
    assert r.returncode == 2 and "but the image was made with 0123456789" in r.stderr
    r = _cli("replay", str(tmp_path / "other.png"))
    assert r.returncode == 2 and "the record names model 'tiny-text'" in r.stderr and "give --model" in r.stderr
    assert all(line.count("\n") == 0 for line in r.stderr.strip().split("\n")) and "Traceback" not in r.stderr


# ---------------------------------------------------------------- watermark



@pytest.fixture(scope="module")
def photo():
    data = pytest.importorskip("skimage.data")
    return Image.fromarray(data.astronaut()).resize((256, 256), Image.LANCZOS)


def _jpeg(image, quality):
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


@needs_watermark
def test_watermark_survives_jpeg_90_and_resize_to_90_percent(photo):
    marked = watermark.embed(photo)
    assert watermark.bit_matches(marked) == 64
    assert np.abs(np.asarray(marked, dtype=float) - np.asarray(photo)).mean() < 2  # invisible: under 2 levels on average
    jpeg = watermark.detect(_jpeg(marked, 90))
    assert jpeg.present and jpeg.size == (256, 256) and not jpeg.rescaled and jpeg.matches >= 62
    small = marked.resize((230, 230), Image.BICUBIC)
    found = watermark.detect(small)
    assert found.present and found.size == (256, 256) and found.rescaled
    assert "present" in found.describe() and "rescaled back" in found.describe()


@needs_watermark
def test_no_watermark_on_unmarked_photographs(photo):
    data = pytest.importorskip("skimage.data")
    for image in (photo, Image.fromarray(data.astronaut()), Image.fromarray(data.chelsea())):
        found = watermark.detect(image)
        assert not found.present and found.matches < watermark.THRESHOLD
        assert "absent" in found.describe()
    tiny = watermark.detect(photo.resize((100, 100)))
    assert not tiny.present and tiny.size is None and "smaller than 256x256" in tiny.describe()
    with pytest.raises(ValueError, match="too small for the watermark; it needs at least 256x256"):
        watermark.embed(photo.resize((128, 128)))


@needs_watermark
def test_pipeline_marks_large_images_and_records_why_not(text_model, tmp_path):
    pipe = Pipeline.load(text_model)
    settings = SampleSettings(steps=2)
    [big] = pipe(CAPTIONS[0], seeds=[1], settings=settings, size=256)
    assert big.record["watermark"] == {"method": "dwtDctSvd", "applied": True, "bits": 64,
                                       "package": "invisible-watermark 0.2.0"}
    assert watermark.detect(big.image).matches == 64
    [small] = pipe(CAPTIONS[0], seeds=[1], settings=settings)
    assert small.record["watermark"] == {"method": "dwtDctSvd", "applied": False,
                                         "reason": "16x16 is below the 256x256 the method needs"}
    pipe.watermark = False
    [off] = pipe(CAPTIONS[0], seeds=[1], settings=settings, size=256)
    assert off.record["watermark"]["reason"] == "disabled" and not watermark.detect(off.image).present
    # replay regenerates the mark too
    path = big.save(tmp_path / "big.png")
    assert replay(path, model=str(text_model)).exact


def test_cli_says_when_no_watermark_was_added(text_model, tmp_path):
    r = _cli("generate", CAPTIONS[1], "--model", str(text_model), "--steps", "2", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "note: no invisible watermark was added: 16x16 is below the 256x256 the method needs" in r.stderr
    r = _cli("generate", CAPTIONS[1], "--model", str(text_model), "--steps", "2", "--out", str(tmp_path), "--seed", "1",
             "--no-watermark")
    assert "watermark was added: disabled" in r.stderr
    assert read_record(tmp_path / "a-green-triangle-s1.png")["watermark"]["reason"] == "disabled"


# ---------------------------------------------------------------- content credentials



@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    r = _cli("keys", "init", "--out", str(folder))
    assert r.returncode == 0, r.stderr
    assert oct((folder / "signer.key").stat().st_mode & 0o777) == "0o600"
    return folder


@pytest.fixture(scope="module")
def signed(text_model, keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("signed")
    r = _cli("generate", CAPTIONS[0], "--model", str(text_model), "--steps", "2", "--size", "256", "--out", str(out),
             "--sign", str(keys), "--quiet")
    assert r.returncode == 0, r.stderr
    return out / "a-red-circle-above-a-blue-square-s0.png"


@needs_c2pa
def test_signed_png_carries_a_valid_manifest_with_the_record(signed, keys):
    report = credentials.read_credentials(signed)
    assert report.found and report.state == "Valid" and not report.tampered
    assert report.actions == ["c2pa.created"] and report.record == read_record(signed)
    assert [f.split(":")[0] for f in report.failures] == ["signingCredential.untrusted"]
    trusted = credentials.read_credentials(signed, (keys / "root.pem").read_bytes())
    assert trusted.state == "Trusted" and trusted.failures == []
    r = _cli("verify", str(signed), "--trust", str(keys / "root.pem"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "watermark: present, intact: 64/64 bits match at 256x256" in r.stdout
    assert "content credentials: valid C2PA manifest, trusted signer" in r.stdout
    assert "actions c2pa.created; generation record included" in r.stdout and "verdict: ok" in r.stdout


def _chunks(data):
    """(type, offset of its data, length) of every PNG chunk."""
    pos, out = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos:pos + 4], "big")
        out.append((data[pos + 4:pos + 8], pos + 8, length))
        pos += 12 + length
    return out


@needs_c2pa
@pytest.mark.parametrize("chunk", [b"IDAT", b"iTXt"])
def test_a_one_byte_change_fails_verification(signed, tmp_path, chunk):
    data = bytearray(signed.read_bytes())
    kind, start, length = next(c for c in _chunks(data) if c[0] == chunk)
    data[start + length // 2] ^= 0x01
    bad = tmp_path / "bad.png"
    bad.write_bytes(bytes(data))
    report = credentials.read_credentials(bad)
    assert report.tampered and any(f.startswith("assertion.dataHash.mismatch") for f in report.failures)
    r = _cli("verify", str(bad))
    assert r.returncode == 1 and "content credentials: INVALID" in r.stdout and "verdict: TAMPERED" in r.stdout


@needs_watermark
@needs_c2pa
def test_verify_an_unmarked_photograph_finds_nothing(tmp_path, photo):
    photo.save(tmp_path / "photo.png")
    r = _cli("verify", str(tmp_path / "photo.png"))
    assert r.returncode == 1
    assert r.stdout.splitlines()[0].startswith("watermark: absent (best ")
    assert "content credentials: none" in r.stdout and "generation record: none" in r.stdout
    assert "verdict: no provenance found" in r.stdout


@needs_c2pa
def test_keys_init_refuses_to_overwrite_and_sign_needs_keys(keys, text_model, tmp_path):
    r = _cli("keys", "init", "--out", str(keys))
    assert r.returncode == 2 and "already exists; pass --overwrite" in r.stderr
    r = _cli("generate", CAPTIONS[0], "--model", str(text_model), "--steps", "2", "--out", str(tmp_path),
             "--sign", str(tmp_path / "nokeys"))
    assert r.returncode == 2 and "make a development chain with `diffuse keys init" in r.stderr


def test_manifest_of_an_edit_opens_its_input_then_edits():
    manifest = credentials.manifest_for({"kind": "img2img", "seed": 1}, "e.png")
    opened, action = manifest["assertions"][0]["data"]["actions"]
    assert opened == {"action": "c2pa.opened", "parameters": {"ingredientIds": [credentials.INGREDIENT_LABEL]}}
    assert action["action"] == "c2pa.edited" and action["digitalSourceType"].endswith("compositeWithTrainedAlgorithmicMedia")
    assert manifest["assertions"][1] == {"label": "org.diffuse.generation", "data": {"record": '{"kind": "img2img", "seed": 1}'}}
