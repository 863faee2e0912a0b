"""What a single checkpoint file is: Stable Diffusion 1.x or 2.x, or which other thing, by its key names and shapes.

The original SD single file (CompVis latent-diffusion / Stability stablediffusion repositories, Rombach et al.
2022) keeps the U-Net under ``model.diffusion_model.``, the VAE under ``first_stage_model.`` and the text encoder
under ``cond_stage_model.``: OpenAI CLIP ViT-L/14 in transformers names under ``cond_stage_model.transformer.``
for SD 1.x, OpenCLIP ViT-H/14 under ``cond_stage_model.model.`` for SD 2.x. Every other family leaves its own
marks in the key names (SDXL's ``conditioner.embedders``, SD3's ``joint_blocks``, Flux's ``double_blocks``, ...);
those are recognised and named so that the error says what the file is.
"""

from __future__ import annotations

from typing import Mapping

from .errors import UnsupportedModel

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."  # SD 1.x: transformers CLIPTextModel names (``text_model.`` since 2021)
OPENCLIP = "cond_stage_model.model."  # SD 2.x: open_clip names, fused q/k/v
FAMILIES = {"sd1": "SD 1.x", "sd2": "SD 2.x"}
_RUNS = "diffuse runs SD 1.x and 2.x"
_CONTEXT = {768: "sd1", 1024: "sd2"}  # CLIP ViT-L/14 and OpenCLIP ViT-H/14 text widths
_VAE_PARTS = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.")


def clip_root(keys: set[str]) -> str:
    """Prefix of the SD 1.x text model: with ``text_model.``, or without it in files saved by old transformers."""
    return CLIP if CLIP + "embeddings.token_embedding.weight" in keys else CLIP + "text_model."


def _foreign(keys: list[str], shapes: Mapping[str, tuple[int, ...]]) -> str | None:
    """One line naming what the file is when it is not an SD 1.x/2.x checkpoint, else None."""
    if not keys:
        return "the file holds no tensors; not a Stable Diffusion checkpoint"
    parts = {part for key in keys for part in key.split(".")}
    first = {key.split(".")[0] for key in keys}
    if parts & {"lora_up", "lora_down", "lora_A", "lora_B", "hada_w1", "lokr_w1"}:
        return "this is a LoRA (or LyCORIS) file of weight deltas for a base model, not a model; diffuse cannot apply LoRAs"
    if parts & {"emb_params", "string_to_param", "string_to_token"} or (len(keys) <= 4 and parts == set(keys)):
        return "this is a textual-inversion embedding (learned token vectors), not a model; diffuse cannot load embeddings"
    if any(key.startswith("conditioner.embedders.") for key in keys):
        kind = "base" if any(key.startswith("conditioner.embedders.1.") for key in keys) else "refiner"
        return f"this is an SDXL {kind} checkpoint; {_RUNS}"
    if parts & {"double_blocks", "single_blocks", "single_transformer_blocks"}:  # before SD3: both have context_embedder
        return f"this is a Flux checkpoint; {_RUNS}"
    if parts & {"joint_blocks", "context_embedder"}:
        return f"this is an SD3/SD3.5 (MMDiT) checkpoint; {_RUNS}"
    if parts & {"channelwise", "clip_txt_mapper", "clip_txt_pooled_mapper"}:
        return f"this is a Stable Cascade (Wuerstchen) checkpoint; {_RUNS}"
    if parts & {"t_block", "y_embedder", "adaln_single", "caption_projection"}:
        return f"this is a PixArt-style diffusion transformer (PixArt, Sana); {_RUNS}"
    if parts & {"control_model", "input_hint_block", "controlnet_cond_embedding", "controlnet_down_blocks"}:
        return f"this is a ControlNet (an add-on for a base model), not a model; {_RUNS}"
    if "add_embedding" in first:
        return f"this is a diffusers-format SDXL UNet; {_RUNS}"
    if UNET + "label_emb.0.0.weight" in shapes:
        context = shapes.get(UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight", (0, 0))[-1]
        if context in (1280, 2048):  # refiner, base
            return f"this is an SDXL checkpoint (U-Net only); {_RUNS}"
    if UNET + "label_emb.weight" in shapes or UNET + "label_emb.0.0.weight" in shapes:
        return f"this is an SD variant with a class/noise-level embedding (x4 upscaler or unCLIP); {_RUNS} text-to-image"
    if "depth_model" in first:
        return f"this is an SD 2 depth-to-image checkpoint (MiDaS depth input); {_RUNS} text-to-image"
    own = [key.removeprefix(VAE) for key in keys if not key.startswith(("model_ema.", "loss.", VAE + "loss."))]
    if own and all(key.startswith(_VAE_PARTS) for key in own):
        return "this is a standalone VAE file (only encoder/decoder weights); use it as a model's VAE, not as a model"
    if first & {"down_blocks", "mid_block", "up_blocks", "time_embedding"}:
        return "this is a diffusers-format UNet state dict, not a single-file checkpoint; pass the diffusers model folder"
    if "text_model" in first or {"encoder", "embeddings"} <= first:
        return "this is a transformers text-encoder state dict, not a single-file checkpoint; pass the model folder"
    if UNET + "input_blocks.0.0.weight" not in shapes:
        return f"not a Stable Diffusion checkpoint: no {UNET}* U-Net weights (keys look like {sorted(keys)[0]!r})"
    return None


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """``"sd1"`` or ``"sd2"`` for an original single-file SD checkpoint, from its key names -> tensor shapes.

    SD 1.x vs 2.x is told by the text encoder's layout (CLIP in transformers names vs OpenCLIP), or, for a file
    without one, by the U-Net's cross-attention width (768 CLIP ViT-L/14, 1024 OpenCLIP ViT-H/14). Raises
    :class:`UnsupportedModel` naming SDXL, SD3, Flux, Stable Cascade, PixArt, ControlNet, a LoRA, a VAE, a
    textual-inversion embedding, a diffusers-format state dict, ... or "not a Stable Diffusion checkpoint".
    """
    keys = list(shapes)
    reason = _foreign(keys, shapes)
    if reason:
        raise UnsupportedModel(reason)
    to_k = UNET + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    if to_k not in shapes:
        raise UnsupportedModel(f"the U-Net has no middle-block cross-attention ({to_k}); not a text-to-image SD model")
    context = shapes[to_k][-1]
    key_set = set(keys)
    clip, openclip = clip_root(key_set) + "embeddings.token_embedding.weight", OPENCLIP + "token_embedding.weight"
    if clip in key_set and openclip in key_set:
        raise UnsupportedModel("the file holds both a CLIP (SD 1.x) and an OpenCLIP (SD 2.x) text encoder; which one is its?")
    if clip in key_set or openclip in key_set:
        family, width = ("sd1", shapes[clip][-1]) if clip in key_set else ("sd2", shapes[openclip][-1])
        if width != context:
            raise UnsupportedModel(
                f"the U-Net attends to {context}-wide text features but the {FAMILIES[family]} text encoder is {width} wide"
            )
        return family
    if context not in _CONTEXT:
        raise UnsupportedModel(
            f"the file has no text encoder and a {context}-wide cross-attention: neither SD 1.x (768) nor 2.x (1024)")
    return _CONTEXT[context]
