"""Foreign models -> our model folders, and back to diffusers pipeline folders.

``convert(src, out)`` reads a diffusers pipeline folder or an SD single file (:mod:`.sources`), maps
each component's config and tensors onto ours (:mod:`.unet`, :mod:`.vae`, :mod:`.clip`) and writes a
self-contained model folder (README, "Files"): the U-Net as a discrete DDPM-table denoiser
(``precond = "discrete"``, the scheduler's table and prediction type in ``noise_table``), the CLIP text
encoder with its tokenizer files in ``tokenizer/``, the VAE as our VAE folder in ``vae/`` with
Stable Diffusion's latent scale. ``export_diffusers(model_dir, out)`` writes the folder diffusers'
``from_pretrained`` loads.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .. import checkpoint
from ..codec import VAE_SUBDIR, VAECodec
from ..config import ModelConfig
from ..nn import config_to_dict
from .errors import UnsupportedModel
from .schedulers import noise_table_from_diffusers, noise_table_to_diffusers
from .sources import Parts, read_source

TOKENIZER_SUBDIR = "tokenizer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# the diffusers release whose folder layout export_diffusers writes (tests/test_convert.py loads it with that release);
# diffusers reads model_index.json's version, e.g. to tell a legacy inpainting checkpoint (<= 0.5.1) from a current one
DIFFUSERS_LAYOUT = "0.42.1"
STAGING = ".convert"  # --out is written as OUT.convert.incomplete, then moved


def sigma_range(noise_table: dict[str, Any]) -> tuple[float, float]:
    from .. import schedules

    sigmas = schedules.sigma_from_alpha_bar(schedules.alphas_cumprod(schedules.table_betas(noise_table)))
    return float(sigmas[0]), float(sigmas[-1])


def check_not_inside(src: Path, out: Path) -> None:
    """Refuse an ``--out`` that is the source or holds it: --overwrite would delete the source with it."""
    if Path(src).resolve().is_relative_to(Path(out).resolve()):
        raise UnsupportedModel(f"--out {out} is or holds the source {src}; replacing it would delete the source: "
                               f"choose another --out")


def model_config(parts: Parts) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Our ModelConfig and model.safetensors tensors (backbone + text encoder) for ``parts``."""
    from .unet import unet_config_from_diffusers, unet_state_from_diffusers

    unet_config, unet_state = parts.components["unet"]
    unet = unet_config_from_diffusers(unet_config)
    inpainting = False
    if "vae" in parts.components and unet.in_channels != (latent := parts.components["vae"][0].get("latent_channels", 4)):
        if unet.in_channels != 2 * latent + 1:
            raise UnsupportedModel(f"the U-Net takes {unet.in_channels} input channels, neither the VAE's {latent} latents "
                                   f"nor an inpainting model's {2 * latent + 1}: an instruction-editing model, which diffuse "
                                   f"does not run")
        # SD inpainting: input [latent, mask, masked-image latent], our x then cond['concat'] (diffuse.masks)
        unet = dataclasses.replace(unet, in_channels=latent, concat_channels=latent + 1)
        inpainting = True
    weights = {f"denoiser.backbone.{k}": v for k, v in unet_state_from_diffusers(unet_state, unet).items()}
    table = noise_table_from_diffusers(parts.scheduler)
    sigma_min, sigma_max = sigma_range(table)
    fields: dict[str, Any] = dict(backbone="unet", backbone_config=config_to_dict(unet), precond="discrete",
                                  noise_table=table, sigma_min=sigma_min, sigma_max=sigma_max,
                                  channels=unet.in_channels, image_size=unet.image_size, inpainting=inpainting)
    if "text_encoder" in parts.components:
        from .clip import clip_config_from_transformers, clip_state_from_transformers

        text_config, text_state = parts.components["text_encoder"]
        text = {**clip_config_from_transformers(text_config), **tokenizer_settings(parts), "tokenizer": TOKENIZER_SUBDIR,
                # Unicode NFC, as diffusers' (transformers') tokenizer cleans text: the prompts these models see there
                "text_cleanup": "nfc"}
        weights.update({f"text_encoder.{k}": v for k, v in clip_state_from_transformers(text_state, text).items()})
        fields.update(conditioning="text", text_encoder="clip", text_config=text)
    elif unet.num_classes:
        fields.update(conditioning="class", num_classes=unet.num_classes)
    if "vae" in parts.components:
        fields["codec"] = VAE_SUBDIR
    return ModelConfig(**fields), weights


SINGLE_FILE_PAD = {"sd1": "<|endoftext|>", "sd2": "!"}  # SD 1.x pads with the end token; SD 2.x (OpenCLIP) with id 0


def tokenizer_settings(parts: Parts) -> dict[str, Any]:
    """The tokenizer's pad token: a diffusers folder's tokenizer files say it; a single file's family decides it."""
    if parts.tokenizer is not None:
        from .clip import clip_tokenizer_settings

        return clip_tokenizer_settings(parts.tokenizer)
    return {"pad_token": SINGLE_FILE_PAD[parts.family]}


def write_vae(parts: Parts, folder: Path) -> None:
    from ..nn.vae import VAE
    from .vae import vae_config_from_diffusers, vae_state_from_diffusers

    config, state = parts.components["vae"]
    cfg, scale, shift = vae_config_from_diffusers(config)
    with torch.device("meta"):
        vae = VAE(cfg)
    vae.load_state_dict({k: v.float() for k, v in vae_state_from_diffusers(state, cfg).items()}, strict=True, assign=True)
    VAECodec(vae, scale, shift).save(folder / VAE_SUBDIR, extra={"source": "converted"})


def write_tokenizer(parts: Parts, folder: Path) -> None:
    from ..clip import CLIPTokenizer, write_open_clip_vocab

    target = folder / TOKENIZER_SUBDIR
    if parts.tokenizer is not None:  # vocab.json + merges.txt, or a tokenizer.json: written as the former
        CLIPTokenizer.from_folder(parts.tokenizer, cleanup="nfc", **tokenizer_settings(parts)).save(target)
    else:  # a single file carries no tokenizer: CLIP's BPE vocabulary is the same for SD 1.x and 2.x
        write_open_clip_vocab(target)


def convert(src: Path, out: Path, *, dtype: str = "float32", prediction: Optional[str] = None,
            overwrite: bool = False) -> Path:
    """Convert a diffusers pipeline folder or an SD 1.x/2.x single file into our model folder ``out``
    (U-Net and text-encoder weights stored in ``dtype``: float32 or bfloat16; the VAE, small and decoded in float32,
    stays float32). Nothing is written to ``out`` until it is complete."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    check_not_inside(src, out)
    tmp = checkpoint.staging_dir(out, overwrite, STAGING)
    try:
        parts = read_source(Path(src), DTYPES[dtype], prediction)
        cfg, weights = model_config(parts)
        extra = {"sampling": parts.sampling, "source": {"converted_from": Path(src).name, "family": parts.family}}
        checkpoint.write_model_files(tmp, {"model": dataclasses.asdict(cfg), **extra}, weights, dtype=DTYPES[dtype])
        if cfg.text_encoder == "clip":
            write_tokenizer(parts, tmp)
        if cfg.codec:
            write_vae(parts, tmp)
        return checkpoint.replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- export


def export_diffusers(model_dir: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Write a diffusers pipeline folder (StableDiffusionPipeline, or DDPMPipeline for a pixel model) for one of
    our discrete DDPM-table models (the ones :func:`convert` makes). Our EDM/eps/v/flow models have no
    diffusers pipeline that applies their preconditioning, so they are refused."""
    import json

    from ..model import DiffusionModel
    from ..pipeline import resolve_model
    from .unet import unet_config_to_diffusers, unet_state_to_diffusers

    if (Path(model_dir) / "model_index.json").is_file():
        raise UnsupportedModel(f"{model_dir} is already a diffusers pipeline folder; --to diffusers exports a model folder "
                               f"that `diffuse convert` wrote")
    model_dir = resolve_model(model_dir)
    check_not_inside(model_dir, out)
    model, config = DiffusionModel.load(model_dir)
    cfg = model.cfg
    if cfg.precond != "discrete" or cfg.backbone != "unet":
        raise UnsupportedModel(f"{model_dir} is a {cfg.backbone} {cfg.precond} model; only discrete DDPM-table U-Nets (the "
                               f"kind `diffuse convert` imports) have a diffusers pipeline")
    if cfg.conditioning == "text" and cfg.text_encoder != "clip":
        raise UnsupportedModel(f"{model_dir} has the {cfg.text_encoder!r} text encoder; diffusers pipelines need CLIP")
    tmp = checkpoint.staging_dir(Path(out), overwrite, STAGING)
    try:
        state = model.state_dict()
        unet = model.denoiser.backbone.config
        components: dict[str, tuple[dict[str, Any], Mapping[str, torch.Tensor], str]] = {
            "unet": (unet_config_to_diffusers(unet), unet_state_to_diffusers(prefixed(state, "denoiser.backbone."), unet),
                     "diffusion_pytorch_model")}
        index: dict[str, Any] = {"_class_name": "DDPMPipeline", "_diffusers_version": DIFFUSERS_LAYOUT, "unet": ["diffusers", components["unet"][0]["_class_name"]]}
        if cfg.conditioning == "text":
            from .clip import clip_config_to_transformers, clip_state_to_transformers

            components["text_encoder"] = (clip_config_to_transformers(cfg.text_config),
                                          clip_state_to_transformers(prefixed(state, "text_encoder."), cfg.text_config),
                                          "model")
            from .clip import write_clip_tokenizer_config

            shutil.copytree(model_dir / cfg.text_config["tokenizer"], tmp / TOKENIZER_SUBDIR)
            write_clip_tokenizer_config(tmp / TOKENIZER_SUBDIR, cfg.text_config)
            index.update(_class_name="StableDiffusionInpaintPipeline" if cfg.inpainting else "StableDiffusionPipeline",
                         text_encoder=["transformers", "CLIPTextModel"],
                         tokenizer=["transformers", "CLIPTokenizer"], safety_checker=[None, None],
                         feature_extractor=[None, None], requires_safety_checker=False)
        if cfg.codec:
            from .vae import vae_config_to_diffusers, vae_state_to_diffusers

            codec = VAECodec.load(model_dir / cfg.codec)
            if codec.shift != 0 and cfg.conditioning == "text":
                raise UnsupportedModel(f"{model_dir}'s VAE has a latent shift of {codec.shift:g}, which diffusers' "
                                       f"StableDiffusionPipeline ignores; such a model has no diffusers pipeline")
            vae_cfg = codec.vae.cfg
            components["vae"] = (vae_config_to_diffusers(vae_cfg, codec.scale, codec.shift),
                                 vae_state_to_diffusers(codec.vae.state_dict(), vae_cfg), "diffusion_pytorch_model")
            index["vae"] = ["diffusers", "AutoencoderKL"]
        scheduler_class = "DDIMScheduler" if cfg.conditioning == "text" else "DDPMScheduler"
        index["scheduler"] = ["diffusers", scheduler_class]
        for name, (part_config, tensors, stem) in components.items():
            (tmp / name).mkdir()
            checkpoint.write_json(tmp / name / "config.json", part_config)
            checkpoint.write_tensors(tmp / name / f"{stem}.safetensors", {k: v.contiguous() for k, v in tensors.items()},
                                     metadata={"format": "pt"})
        (tmp / "scheduler").mkdir()
        checkpoint.write_json(tmp / "scheduler" / "scheduler_config.json", noise_table_to_diffusers(cfg.noise_table, scheduler_class))
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        return checkpoint.replace_dir(tmp, Path(out))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prefixed(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix``, with it removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
