"""`diffuse convert`: diffusers pipelines in and out, the same sampling loop as diffusers, clear refusals."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffuse import schedules
from diffuse.cli import main
from diffuse.model import DiffusionModel
from diffuse.samplers import SAMPLERS

diffusers = pytest.importorskip("diffusers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

DDIM = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
            steps_offset=1, timestep_spacing="leading")


def randomize(module: torch.nn.Module, seed: int, std: float = 0.05) -> torch.nn.Module:
    """Every parameter random (diffusers zero-inits output layers), so that a wrong mapping cannot pass."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module.eval()


def ours_like_diffusers_ddim(denoiser, x_vp: torch.Tensor, cond, scheduler, steps: int) -> torch.Tensor:
    """Our DDIM sampler on diffusers' DDIM timesteps, returned as diffusers' final latents.

    Our samplers run on x_VE = x_VP / sqrt(abar) and end at sigma 0; diffusers' DDIM with
    set_alpha_to_one=False ends at the table's first level sigma_0 instead: its last state is
    x0_hat + sigma_0 * eps_hat (in VE terms) from the last step's estimate, which the callback gives.
    """
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod.double()
    sigma = schedules.sigma_from_alpha_bar(abar)
    sigmas = [float(sigma[t]) for t in scheduler.timesteps] + [0.0]
    states: list[torch.Tensor] = []
    last = SAMPLERS["ddim"](denoiser, x_vp / abar[scheduler.timesteps[0]].sqrt().float(), sigmas, cond,
                            callback=lambda info: states.append(info.x))
    x_1, x0_hat = states[-2], last  # the state at the last timestep, and the estimate the last step returned
    final_ve = x0_hat + float(sigma[0]) * (x_1 - x0_hat) / sigmas[-2]
    return final_ve * abar[0].sqrt().float()


@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory) -> Path:
    unet = randomize(diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                           block_out_channels=(16, 32), down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                           up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                                           attention_head_dim=8), seed=1)
    folder = tmp_path_factory.mktemp("src") / "ddpm"
    diffusers.DDPMPipeline(unet=unet, scheduler=diffusers.DDPMScheduler(**{k: DDIM[k] for k in ("beta_schedule", "beta_start",
                                                                                                 "beta_end")})).save_pretrained(folder)
    return folder


def test_a_ddpm_pipeline_converts_and_samples_like_diffusers_ddim(ddpm_folder, tmp_path):
    out = tmp_path / "ours"
    assert main(["convert", str(ddpm_folder), "--out", str(out)]) == 0
    model, config = DiffusionModel.load(out)
    assert model.cfg.precond == "discrete" and model.cfg.noise_table["prediction"] == "eps" and config["source"]["family"] == "ddpm"
    unet = diffusers.UNet2DModel.from_pretrained(ddpm_folder / "unet").eval()
    scheduler = diffusers.DDIMScheduler(**DDIM)
    scheduler.set_timesteps(10)
    x_vp = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        latents = x_vp.clone()
        for t in scheduler.timesteps:
            latents = scheduler.step(unet(latents, t).sample, t, latents).prev_sample
        ours = ours_like_diffusers_ddim(model, x_vp, None, scheduler, 10)
    assert latents.abs().mean() > 0.1  # a real image, not a vanishing one
    torch.testing.assert_close(ours, latents, rtol=1e-3, atol=1e-4)
    assert main(["generate", "--model", str(out), "--steps", "2", "--seed", "0-1", "--out", str(tmp_path / "img"), "--quiet"]) == 0
    # an unconditional model's images are named after it (no class label)
    assert {p.name: Image.open(p).size for p in (tmp_path / "img").iterdir()} == {"ours-s0.png": (8, 8), "ours-s1.png": (8, 8)}


def exported_and_original(src: Path, tmp_path: Path):
    """``src`` converted to ours, exported back to diffusers; both pipelines loaded by diffusers."""
    ours, exported = tmp_path / "ours", tmp_path / "exported"
    assert main(["convert", str(src), "--out", str(ours)]) == 0
    assert main(["convert", str(ours), "--to", "diffusers", "--out", str(exported)]) == 0
    return diffusers.DiffusionPipeline.from_pretrained(exported), diffusers.DiffusionPipeline.from_pretrained(src)


def test_export_gives_diffusers_the_same_pipeline_back(ddpm_folder, tmp_path):
    back, original = exported_and_original(ddpm_folder, tmp_path)
    assert type(back).__name__ == "DDPMPipeline"
    assert torch.equal(back.scheduler.alphas_cumprod, original.scheduler.alphas_cumprod)
    x, t = torch.randn(1, 3, 8, 8), torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(back.unet(x, t).sample, original.unet(x, t).sample, rtol=0, atol=0)


def test_bad_sources_are_one_line_errors_and_nothing_is_written(ddpm_folder, tmp_path, capsys):
    canary = tmp_path / "payload-ran"
    evil = tmp_path / "model.safetensors"
    evil.write_bytes(pickle.dumps(type("P", (), {"__reduce__": lambda self: (Path.touch, (canary,))})()))
    other = tmp_path / "sdxl"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    cases = [
        ([str(evil)], "is a pickle file, whatever its extension says"),
        ([str(other)], "is SDXL (StableDiffusionXLPipeline)"),
        ([str(ddpm_folder / "unet")], "is a single diffusers component; give the pipeline folder"),
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(other.parent)], "has no model_index.json, so it is not a diffusers pipeline folder; give the folder that "
                              "holds model_index.json, or a single-file .safetensors checkpoint"),
        ([str(ddpm_folder), "--prediction", "v"], "--prediction is for single-file checkpoints"),
    ]
    for args, words in cases:
        assert main(["convert", *args, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and words in err and err.count("\n") == 1, err
    assert not canary.exists() and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".incomplete")]
    (tmp_path / "taken").mkdir()
    assert main(["convert", str(ddpm_folder), "--out", str(tmp_path / "taken")]) == 2
    assert "already exists; choose another --out or pass --overwrite" in capsys.readouterr().err
    assert main(["convert", str(ddpm_folder), "--out", str(tmp_path / "taken"), "--overwrite"]) == 0
    capsys.readouterr()
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    for out, words in ((notes, f"{notes} is a file, and --overwrite replaces only folders; choose another --out"),
                       (notes / "model", f"cannot create {notes / 'model'}: Not a directory; choose another --out")):
        assert main(["convert", str(ddpm_folder), "--out", str(out), "--overwrite"]) == 2
        assert capsys.readouterr().err == f"error: {words}\n"
    assert notes.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors", "notes.txt", "sdxl", "taken"]
    for src, out in ((ddpm_folder, ddpm_folder), (ddpm_folder, ddpm_folder.parent), (tmp_path / "taken", tmp_path / "taken")):
        to = ["--to", "diffusers"] if src == tmp_path / "taken" else []
        assert main(["convert", str(src), *to, "--out", str(out), "--overwrite"]) == 2
        assert capsys.readouterr().err == (f"error: --out {out} is or holds the source {src}; replacing it would delete "
                                           "the source: choose another --out\n")
    assert (ddpm_folder / "model_index.json").is_file() and (tmp_path / "taken" / "config.json").is_file()


def test_our_own_models_are_not_exported_to_diffusers(ddpm_folder, tmp_path, capsys):
    assert main(["convert", "digits", "--to", "diffusers", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "only discrete DDPM-table U-Nets" in err and not (tmp_path / "x").exists()
    assert main(["convert", str(ddpm_folder), "--to", "diffusers", "--out", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err == (f"error: {ddpm_folder} is already a diffusers pipeline folder; --to diffusers "
                                       "exports a model folder that `diffuse convert` wrote\n")
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- Stable Diffusion layout, tiny and random

@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory) -> Path:
    """A tiny StableDiffusionPipeline (SD 1.x layout: conv projections, quick_gelu CLIP) with random weights."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("regex")
    from diffuse.clip import write_open_clip_vocab

    root = tmp_path_factory.mktemp("sd")
    vocab = write_open_clip_vocab(root / "vocab")
    tokenizer = transformers.CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77)
    text_encoder = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="quick_gelu")), seed=2, std=0.2)
    unet = randomize(diffusers.UNet2DConditionModel(
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),  # SD's nominal size
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32), seed=3)  # SD 1.x: 8 heads, CLIP 64-wide heads
    vae = randomize(diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64),
                                            down_block_types=("DownEncoderBlock2D",) * 2,
                                            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
                                            layers_per_block=1), seed=4, std=0.25)
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                             scheduler=diffusers.DDIMScheduler(**DDIM), safety_checker=None,
                                             feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipeline")
    return root / "pipeline"


def test_a_stable_diffusion_pipeline_samples_like_diffusers_with_guidance(sd_folder, tmp_path, capsys):
    """Tokenizer, CLIP text encoder, U-Net, guidance, DDIM loop and VAE decode, end to end (within 1e-3)."""
    from diffuse.codec import VAECodec
    from diffuse.guidance import CFGDenoiser

    ours = tmp_path / "ours"
    assert main(["convert", str(sd_folder), "--out", str(ours)]) == 0
    capsys.readouterr()
    assert main(["info", str(ours)]) == 0
    assert "4.04M parameters, discrete parameterization, 128x128 images (64x64x4 latents, VAE factor 2), " \
           "sigma 0.02917..14.61" in capsys.readouterr().out
    model, config = DiffusionModel.load(ours)
    codec = VAECodec.load(ours / model.cfg.codec)
    assert model.cfg.text_encoder == "clip" and config["source"]["family"] == "sd1" and codec.scale == 0.18215
    reference = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder)
    prompts, negative = ["a photo of a red cat", "a castle on a hill, oil painting"], ["blurry", "low quality"]
    x_vp = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(prompts, negative_prompt=negative, num_inference_steps=10, guidance_scale=7.5, latents=x_vp,
                         height=16, width=16, output_type="pt").images  # [2, 3, 16, 16] in [0, 1]
        guided = CFGDenoiser(model, 7.5, model.condition(prompts=negative))
        latents = ours_like_diffusers_ddim(guided, x_vp, model.condition(prompts=prompts), reference.scheduler, 10)
        got = (codec.decode(latents) / 2 + 0.5).clamp(0, 1)
    assert want.std() > 0.05  # not a flat image
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_stable_diffusion_export_loads_in_diffusers_with_the_same_outputs(sd_folder, tmp_path):
    back, original = exported_and_original(sd_folder, tmp_path)
    assert type(back).__name__ == "StableDiffusionPipeline"
    ids = original.tokenizer(["a red cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(back.tokenizer(["a red cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids, ids)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    with torch.no_grad():
        text = original.text_encoder(ids)[0]
        torch.testing.assert_close(back.text_encoder(ids)[0], text, rtol=0, atol=0)
        torch.testing.assert_close(back.unet(x, t, text).sample, original.unet(x, t, text).sample, rtol=0, atol=0)
        torch.testing.assert_close(back.vae.decode(x).sample, original.vae.decode(x).sample, rtol=0, atol=0)
    assert back.vae.config.scaling_factor == original.vae.config.scaling_factor
    assert torch.equal(back.scheduler.alphas_cumprod, original.scheduler.alphas_cumprod)


def sd_with_unet_inputs(sd_folder: Path, folder: Path, in_channels: int, pipeline: str) -> Path:
    """The tiny SD pipeline with a random U-Net taking ``in_channels`` inputs, saved as a ``pipeline`` folder."""
    parts = diffusers.StableDiffusionPipeline.from_pretrained(sd_folder).components
    unet = randomize(diffusers.UNet2DConditionModel.from_config({**parts["unet"].config, "in_channels": in_channels}), seed=5)
    getattr(diffusers, pipeline)(**{**parts, "unet": unet}).save_pretrained(folder)
    return folder


def test_an_sd_inpainting_pipeline_converts_samples_like_diffusers_and_exports_back(sd_folder, tmp_path, capsys):
    """SD-inpainting's 9-channel U-Net [latent, mask, masked-image latent] becomes an inpainting model (x + 5-channel
    concat): the same DDIM loop as diffusers' with the same extra input, and the same pipeline class back."""
    src = sd_with_unet_inputs(sd_folder, tmp_path / "inpaint", 9, "StableDiffusionInpaintPipeline")
    ours, exported = tmp_path / "ours", tmp_path / "exported"
    assert main(["convert", str(src), "--out", str(ours)]) == 0
    assert main(["info", str(ours)]) == 0
    assert "inpainting model" in capsys.readouterr().out
    model, _ = DiffusionModel.load(ours)
    assert model.cfg.inpainting and model.cfg.channels == 4 and model.cfg.backbone_config["concat_channels"] == 5
    reference = diffusers.StableDiffusionInpaintPipeline.from_pretrained(src)
    gen = torch.Generator().manual_seed(0)
    x_vp, concat = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 5, 8, 8, generator=gen)
    concat[:, :1] = (concat[:, :1] > 0).float()  # a binary mask channel
    prompt = ["a red cat"]
    with torch.no_grad():
        ids = reference.tokenizer(prompt, padding="max_length", max_length=77, return_tensors="pt").input_ids
        text = reference.text_encoder(ids)[0]
        scheduler = reference.scheduler
        scheduler.set_timesteps(6)
        want = x_vp
        for t in scheduler.timesteps:
            want = scheduler.step(reference.unet(torch.cat([want, concat], 1), t, text).sample, t, want).prev_sample
        got = ours_like_diffusers_ddim(model, x_vp, model.condition(prompts=prompt, concat=concat), scheduler, 6)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    assert main(["convert", str(ours), "--to", "diffusers", "--out", str(exported)]) == 0
    back = diffusers.DiffusionPipeline.from_pretrained(exported)
    assert type(back).__name__ == "StableDiffusionInpaintPipeline" and back.unet.config.in_channels == 9
    x, t = torch.randn(1, 9, 8, 8), torch.tensor([500])
    with torch.no_grad():
        torch.testing.assert_close(back.unet(x, t, text).sample, reference.unet(x, t, text).sample, rtol=0, atol=0)
    from safetensors.torch import save_file

    from diffuse.checkpoint import read_json
    from diffuse.convert import ldm
    from diffuse.convert.sources import read_diffusers

    single = tmp_path / "tiny-inpaint.safetensors"  # the same model as an original single file
    save_file({k: v.contiguous() for k, v in ldm.diffusers_to_ldm(read_diffusers(src).components, "sd1").items()}, str(single))
    assert main(["convert", str(single), "--out", str(tmp_path / "from-file")]) == 0
    assert read_json(tmp_path / "from-file" / "config.json")["model"] == read_json(ours / "config.json")["model"]


def test_an_instruction_editing_unet_is_refused_by_name(sd_folder, tmp_path, capsys):
    src = sd_with_unet_inputs(sd_folder, tmp_path / "pix2pix", 8, "StableDiffusionPipeline")
    capsys.readouterr()  # diffusers' own progress bars while building the source
    assert main(["convert", str(src), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == ("error: the U-Net takes 8 input channels, neither the VAE's 4 latents nor an "
                                       "inpainting model's 9: an instruction-editing model, which diffuse does not run\n")
    assert not (tmp_path / "out").exists()


def test_a_single_file_converts_to_the_same_model_as_its_diffusers_folder(sd_folder, tmp_path):
    """The tiny pipeline written in the original single-file layout converts to the same tensors and settings."""
    from safetensors.torch import save_file

    from diffuse.checkpoint import read_json, read_tensors
    from diffuse.convert import ldm
    from diffuse.convert.sources import read_diffusers

    parts = read_diffusers(sd_folder)
    single = tmp_path / "tiny-sd1.safetensors"
    state = {k: v.contiguous() for k, v in ldm.diffusers_to_ldm(parts.components, "sd1").items()}
    state["betas"] = schedules.betas_scaled_linear(1000).half()  # the noise table as a half-precision file keeps it
    save_file(state, str(single))
    assert main(["convert", str(sd_folder), "--out", str(tmp_path / "from-folder")]) == 0
    assert main(["convert", str(single), "--out", str(tmp_path / "from-file")]) == 0
    assert main(["convert", str(single), "--dtype", "bfloat16", "--out", str(tmp_path / "from-file-bf16")]) == 0
    assert read_json(tmp_path / "from-file-bf16" / "config.json")["model"] == read_json(tmp_path / "from-folder" / "config.json")["model"]
    dtypes = {name: {t.dtype for t in read_tensors(tmp_path / "from-file-bf16" / name).values()}
              for name in ("model.safetensors", "vae/model.safetensors")}
    assert dtypes == {"model.safetensors": {torch.bfloat16}, "vae/model.safetensors": {torch.float32}}
    for name in ("model.safetensors", "vae/model.safetensors"):
        a, b = read_tensors(tmp_path / "from-folder" / name), read_tensors(tmp_path / "from-file" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = read_json(tmp_path / "from-folder" / "config.json"), read_json(tmp_path / "from-file" / "config.json")
    assert a["model"] == b["model"] and b["source"]["family"] == "sd1"
    for name in ("vocab.json", "merges.txt"):  # the folder's tokenizer files and open_clip's vocabulary agree
        assert (tmp_path / "from-folder" / "tokenizer" / name).read_text() == (tmp_path / "from-file" / "tokenizer" / name).read_text()


def test_a_conversion_failing_midway_leaves_the_old_out_and_no_partial_folder(sd_folder, tmp_path, capsys):
    """The VAE is written last: a VAE tensor of the wrong shape fails after model.safetensors is staged."""
    import shutil

    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    vae_file = broken / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(vae_file))
    state["decoder.conv_out.weight"] = state["decoder.conv_out.weight"][..., :1].contiguous()
    save_file(state, str(vae_file))
    out = tmp_path / "ours"
    out.mkdir()
    (out / "old.txt").write_text("the old model")
    assert main(["convert", str(broken), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "'decoder.conv_out.weight' has shape (3, 32, 3, 1)" in err
    assert [p.name for p in out.iterdir()] == ["old.txt"] and (out / "old.txt").read_text() == "the old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "ours"]


def test_a_large_models_meta_device_build_loads_the_same_model(ddpm_folder, tmp_path, monkeypatch):
    """Big weights files are loaded into a model built on the meta device: the same tensors and outputs."""
    from diffuse import model as model_module

    assert main(["convert", str(ddpm_folder), "--out", str(tmp_path / "ours")]) == 0
    small, _ = DiffusionModel.load(tmp_path / "ours")
    monkeypatch.setattr(model_module, "META_BUILD_BYTES", 0)
    big, _ = DiffusionModel.load(tmp_path / "ours")
    a, b = small.state_dict(), big.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(small.denoiser.log_sigmas, big.denoiser.log_sigmas)  # a computed buffer, not in the file
    assert not any(t.is_meta for t in (*big.parameters(), *big.buffers()))
    x, sigma = torch.randn(1, 3, 8, 8), torch.tensor([2.0])
    with torch.no_grad():
        assert torch.equal(small(x, sigma), big(x, sigma))
