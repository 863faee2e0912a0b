"""Sources of foreign models, each read into "diffusers parts": ``{component: (config dict, lazy tensors)}``
with diffusers'/transformers' names, plus the scheduler config and the tokenizer folder.

* a diffusers pipeline folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``scheduler/``; or ``unet/`` + ``scheduler/`` for a pixel DDPM pipeline);
* an original single-file Stable Diffusion 1.x / 2.x checkpoint (UNet + VAE + CLIP text encoder in one
  ``.safetensors``; see :mod:`diffuse.convert.ldm`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from .errors import UnsupportedModel
from .io import find_weights, open_weights

# diffusers pipeline classes we convert, and the components each needs
PIPELINES = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionInpaintPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "DDPMPipeline": ("unet", "scheduler"),
    "DDIMPipeline": ("unet", "scheduler"),
}
# pipelines people have that we name instead of failing on a missing key
KNOWN_OTHERS = {
    "StableDiffusionXLPipeline": "SDXL", "StableDiffusionXLImg2ImgPipeline": "SDXL (refiner)",
    "StableDiffusion3Pipeline": "Stable Diffusion 3", "FluxPipeline": "Flux", "PixArtAlphaPipeline": "PixArt-alpha",
    "PixArtSigmaPipeline": "PixArt-sigma", "StableCascadeCombinedPipeline": "Stable Cascade",
    "KandinskyV22Pipeline": "Kandinsky 2.2", "StableDiffusionInstructPix2PixPipeline": "InstructPix2Pix",
    "LatentConsistencyModelPipeline": "a latent consistency model", "StableDiffusionUpscalePipeline": "the SD x4 upscaler",
}
SD_SAMPLING = {"sampler": "dpmpp_2m", "steps": 20, "schedule": "karras", "cfg": 7.5}  # the ecosystem's usual default
PIXEL_SAMPLING = {"sampler": "dpmpp_2m", "steps": 50, "schedule": "karras", "cfg": 1.0}


@dataclass
class Parts:
    """A foreign model in diffusers' terms."""

    components: dict[str, tuple[dict[str, Any], Mapping[str, torch.Tensor]]]  # unet / vae / text_encoder
    scheduler: dict[str, Any]
    tokenizer: Optional[Path] = None  # a CLIPTokenizer folder (vocab.json + merges.txt, or tokenizer.json), if any
    family: str = ""  # sd1 | sd2 | ddpm
    sampling: dict[str, Any] = field(default_factory=dict)  # default sampling settings for the model folder


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UnsupportedModel(f"{path} is missing; the folder is not a complete diffusers pipeline") from None
    except json.JSONDecodeError as e:
        raise UnsupportedModel(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None


def read_diffusers(folder: Path, dtype: Optional[torch.dtype] = None) -> Parts:
    """A diffusers pipeline folder; components are read lazily (``dtype`` converts floating tensors as read)."""
    folder = Path(folder)
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        if (folder / "config.json").is_file():
            raise UnsupportedModel(f"{folder} is a single diffusers component; give the pipeline folder above it (the one "
                                   f"with model_index.json), which also holds the scheduler")
        raise UnsupportedModel(f"{folder} has no model_index.json, so it is not a diffusers pipeline folder; give the "
                               f"folder that holds model_index.json, or a single-file .safetensors checkpoint")
    index = read_json(index_file)
    name = index.get("_class_name", "")
    if name in KNOWN_OTHERS:
        raise UnsupportedModel(f"{folder} is {KNOWN_OTHERS[name]} ({name}); diffuse converts Stable Diffusion 1.x/2.x "
                               f"and DDPM pipelines")
    if name not in PIPELINES:
        raise UnsupportedModel(f"{folder} is a {name or 'nameless'} pipeline; diffuse converts: {', '.join(PIPELINES)}")
    components = {}
    for part in ("unet", "vae", "text_encoder"):
        if part in PIPELINES[name]:
            stem = "model" if part == "text_encoder" else "diffusion_pytorch_model"
            components[part] = (read_json(folder / part / "config.json"), find_weights(folder / part, stem, dtype))
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    tokenizer = folder / "tokenizer" if "tokenizer" in PIPELINES[name] else None
    if tokenizer is not None and not ((tokenizer / "vocab.json").is_file() and (tokenizer / "merges.txt").is_file()
                                      or (tokenizer / "tokenizer.json").is_file()):
        raise UnsupportedModel(f"{tokenizer} has neither vocab.json + merges.txt nor tokenizer.json (a CLIP tokenizer folder)")
    text = "text_encoder" in components
    family = ("sd2" if components["unet"][0].get("cross_attention_dim") == 1024 else "sd1") if text else "ddpm"
    return Parts(components, scheduler, tokenizer, family, dict(SD_SAMPLING if text else PIXEL_SAMPLING))


def read_single_file(path: Path, dtype: Optional[torch.dtype] = None, prediction: Optional[str] = None) -> Parts:
    """An original Stable Diffusion checkpoint. SD 2.x files come as eps (512-base) and v (768-v) models and do
    not say which, so ``prediction`` ('eps' or 'v') is required for them (SD 1.x is eps)."""
    weights = open_weights(Path(path), dtype)  # refuses a pickle before anything else looks at it
    from . import ldm

    family = ldm.detect_family(weights.shapes())
    if family == "sd2" and prediction is None:
        raise UnsupportedModel(f"{path} is a Stable Diffusion 2.x checkpoint, which comes as an eps model (512-base) or a "
                               f"v model (768-v) without saying which; give --prediction eps or --prediction v")
    prediction = prediction or "eps"
    if prediction not in ("eps", "v"):
        raise UnsupportedModel(f"--prediction must be eps or v, got {prediction!r}")
    components = ldm.ldm_to_diffusers(weights, family)
    # the native size is not in the file: SD 1.x and SD 2 512-base make 512x512 (64x64 latents), SD 2 768-v 768x768;
    # other sizes (multiples of 64 pixels) are a --size away
    unet_config, unet_state = components["unet"]
    components["unet"] = ({"sample_size": 96 if family == "sd2" and prediction == "v" else 64, **unet_config}, unet_state)
    # the file's own beta table when it carries one (read as stored, not in ``dtype``), else Stable Diffusion's
    table = ldm.scheduler_config_from_ldm(open_weights(Path(path))) or {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                                        "beta_start": 0.00085, "beta_end": 0.012}
    scheduler = {**table, "prediction_type": "epsilon" if prediction == "eps" else "v_prediction"}
    return Parts(components, scheduler, None, family, dict(SD_SAMPLING))


def read_source(src: Path, dtype: Optional[torch.dtype] = None, prediction: Optional[str] = None) -> Parts:
    """A diffusers pipeline folder or a single-file checkpoint."""
    src = Path(src)
    if src.is_dir():
        if prediction is not None:
            raise UnsupportedModel("--prediction is for single-file checkpoints; a diffusers folder's scheduler says it")
        return read_diffusers(src, dtype)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    return read_single_file(src, dtype, prediction)
