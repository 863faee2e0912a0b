"""Original single-file Stable Diffusion 1.x / 2.x checkpoints <-> diffusers parts.

The single file is the state dict of latent-diffusion's ``LatentDiffusion`` (Rombach et al. 2022; the CompVis
latent-diffusion and Stability stablediffusion repositories): ``model.diffusion_model.`` holds the openaimodel
U-Net (``input_blocks.N.M`` / ``middle_block.M`` / ``output_blocks.N.M``, ResBlocks with ``in_layers`` /
``emb_layers`` / ``out_layers``, SpatialTransformers whose inner names diffusers kept), ``first_stage_model.`` the
KL autoencoder (``encoder.down.i.block.j``, ``mid.attn_1`` with 1x1-convolution q/k/v, decoder levels numbered
bottom-up), ``cond_stage_model.`` the text encoder: transformers CLIPTextModel names for SD 1.x, open_clip names
with a fused q/k/v ``in_proj`` for SD 2.x. "Diffusers parts" are the three models in the Hub's names:
``{"unet": (UNet2DConditionModel config, state), "vae": (AutoencoderKL config, state),
"text_encoder": (CLIPTextModel config, state with ``text_model.`` names)}``.

The file carries weights only, so the configs are read off tensor shapes and key indices; what shapes cannot
tell is fixed by the family: attention heads (SD 1.x: 8 per layer; SD 2.x: 64 channels each), text heads
(64 channels each, as in CLIP ViT-L/14 and OpenCLIP ViT-H/14), text activation (quick_gelu / gelu), GroupNorm
groups (32) and the latent scale (0.18215 unless the file holds ``scale_factor``). Not in the file at all, so
not in the configs: the prediction type (SD 2.x 768 models predict v) and the native resolution.

SD 2.x reads its text encoder's penultimate layer. As diffusers' converted SD 2 pipelines do, the CLIPTextModel
gets every block but the last (``final_layer_norm`` kept). Which blocks a file holds is told by ``text_projection``:
a file with it holds the whole OpenCLIP tower (Stability's releases; kohya's sd-scripts, which
make up a last block and the projection when it has no original to copy them from), and its last block is
dropped; a file without it holds the tower already cut (diffusers' convert_diffusers_to_original_stable_diffusion.py,
kohya without dummies) and is read whole. Export writes that cut layout: the dropped block, ``text_projection`` and
``logit_scale`` are not recovered (SD never uses them). diffusers' single-file loader reads such files as they
are; loaders that build the whole tower load them non-strictly, the unused last block left as initialised.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
from torch import Tensor

from .. import schedules
from .errors import UnsupportedModel
from .ldm_detect import CLIP, FAMILIES, OPENCLIP, UNET, VAE, clip_root, detect_family
from .ldm_rules import UNetLayout, from_ldm, text_rules, to_ldm, unet_rules, vae_rules

__all__ = ["detect_family", "ldm_to_diffusers", "diffusers_to_ldm", "scheduler_config_from_ldm"]

Parts = dict[str, tuple[dict, dict[str, Tensor]]]
LATENT_SCALE = 0.18215  # SD 1.x / 2.x latent scale (their yaml's scale_factor)
TEXT = "text_model."  # the Hub's CLIPTextModel names (transformers >= 5.6 also loads them without it)


# ---------------------------------------------------------------- configs from the file's shapes

def _indices(keys: list[str], prefix: str) -> list[int]:
    """Sorted distinct N of the keys ``prefix + "N." ...``."""
    return sorted({int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix) and k[len(prefix)].isdigit()})


def _shape(state: Mapping[str, Tensor], key: str, what: str) -> tuple[int, ...]:
    if key not in state:
        raise UnsupportedModel(f"{what}: the single file lacks {key}; it is incomplete or not this SD family")
    return tuple(state[key].shape)


def _unet_config(state: Mapping[str, Tensor], keys: list[str], family: str) -> tuple[dict[str, Any], UNetLayout]:
    rel = [k[len(UNET):] for k in keys if k.startswith(UNET)]
    blocks, have = _indices(rel, "input_blocks."), set(rel)
    ops = [k for k in blocks if f"input_blocks.{k}.0.op.weight" in have]
    n = len(ops) + 1
    layers = ops[0] - 1 if ops else len(blocks) - 1
    per = layers + 1
    if layers < 1 or blocks != list(range(n * per)) or ops != [(i + 1) * per for i in range(n - 1)]:
        raise UnsupportedModel(f"U-Net: input_blocks {blocks} with downsamplers at {ops} do not follow the SD layout")
    def shape(key: str) -> tuple[int, ...]:
        return _shape(state, UNET + key, "U-Net")

    channels = tuple(shape(f"input_blocks.{1 + i * per}.0.out_layers.3.weight")[0] for i in range(n))
    attention = tuple(f"input_blocks.{1 + i * per}.1.proj_in.weight" in have for i in range(n))
    attending = [f"input_blocks.{1 + i * per}.1" for i in range(n) if attention[i]] + ["middle_block.1"]
    depths = {len(_indices(rel, f"{b}.transformer_blocks.")) for b in attending}
    if len(depths) != 1 or 0 in depths:
        raise UnsupportedModel(f"U-Net: transformer depths {sorted(depths)} differ between levels; SD 1.x/2.x use one depth")
    if family == "sd1":  # 8 heads (v1-inference.yaml num_heads: 8) where it attends, the middle block included
        heads: Any = 8
        bad = [c for c, a in zip(channels + channels[-1:], attention + (True,)) if a and c % 8]
        need = "does not split into SD 1.x's 8 attention heads"
    else:  # 64 channels per head (v2-inference.yaml num_head_channels: 64); diffusers lists head counts per level
        heads = [c // 64 for c in channels]
        bad = [c for c in channels if c % 64]
        need = "is not a multiple of SD 2.x's 64-channel attention heads"
    if bad:
        raise UnsupportedModel(f"U-Net: width {bad[0]} {need}")
    config = {
        "_class_name": "UNet2DConditionModel",
        "in_channels": shape("input_blocks.0.0.weight")[1],  # 4; 9 for inpainting (latent, mask, masked-image latent)
        "out_channels": shape("out.2.weight")[0],
        "block_out_channels": list(channels),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "layers_per_block": layers,
        "transformer_layers_per_block": depths.pop(),
        "cross_attention_dim": shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")[1],
        "attention_head_dim": heads,
        "use_linear_projection": len(shape("middle_block.1.proj_in.weight")) == 2,
        **_UNET_FIXED,
    }
    return config, UNetLayout(channels, layers, attention, config["transformer_layers_per_block"])


# what latent-diffusion's openaimodel.UNetModel hard-wires, as diffusers names it
_UNET_FIXED = {"act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
               "center_input_sample": False, "downsample_padding": 1, "mid_block_scale_factor": 1}
# diffusers options the file has no room for, with the values that mean "not used"
_UNET_UNUSED = {
    "only_cross_attention": (False,), "reverse_transformer_layers_per_block": (None,), "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,), "dual_cross_attention": (False,), "class_embed_type": (None,),
    "addition_embed_type": (None,), "addition_time_embed_dim": (None,), "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",), "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",), "time_embedding_dim": (None,), "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,), "time_cond_proj_dim": (None,), "conv_in_kernel": (3,), "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
}
_VAE_UNUSED = {"shift_factor": (None, 0.0), "latents_mean": (None,), "latents_std": (None,), "use_quant_conv": (True,),
               "use_post_quant_conv": (True,), "mid_block_add_attention": (True,)}


def _vae_config(state: Mapping[str, Tensor], keys: list[str]) -> dict[str, Any]:
    rel = [k[len(VAE):] for k in keys if k.startswith(VAE)]
    n, layers = len(_indices(rel, "encoder.down.")), len(_indices(rel, "encoder.down.0.block."))
    if n < 1 or layers < 1:
        raise UnsupportedModel(f"VAE: the single file has no {VAE}encoder.down.0.block.0 weights")
    def shape(key: str) -> tuple[int, ...]:
        return _shape(state, VAE + key, "VAE")

    scale = LATENT_SCALE
    if "scale_factor" in state:  # latent-diffusion's scale_by_std buffer, mostly float32: its 7 significant digits
        stored = state["scale_factor"]
        scale = float(stored) if stored.dtype == torch.float64 else float(f"{float(stored):.7g}")
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": shape("encoder.conv_in.weight")[1],
        "out_channels": shape("decoder.conv_out.weight")[0],
        "block_out_channels": [shape(f"encoder.down.{i}.block.0.conv2.weight")[0] for i in range(n)],
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "layers_per_block": layers,
        "latent_channels": shape("post_quant_conv.weight")[0],
        "act_fn": "silu",
        "norm_num_groups": 32,
        "scaling_factor": scale,
    }


def _text_config(state: Mapping[str, Tensor], keys: list[str], family: str) -> tuple[dict[str, Any], str, int]:
    """(CLIPTextModel config, text root prefix in the file, blocks in the file)."""
    if family == "sd1":
        root, blocks, fc1 = clip_root(set(keys)), "encoder.layers.", "mlp.fc1"
        token, position = "embeddings.token_embedding.weight", "embeddings.position_embedding.weight"
    else:
        root, blocks, fc1 = OPENCLIP, "transformer.resblocks.", "mlp.c_fc"
        token, position = "token_embedding.weight", "positional_embedding"

    def shape(key: str) -> tuple[int, ...]:
        return _shape(state, root + key, "text encoder")

    vocab, width = shape(token)
    stored = len(_indices(keys, root + blocks))
    layers = stored - 1 if family == "sd2" and root + "text_projection" in state else stored  # whole tower: penultimate
    if layers < 1:
        raise UnsupportedModel(f"text encoder: the single file has {stored} blocks under {root}{blocks}, too few to run")
    if width % 64:
        raise UnsupportedModel(f"text encoder: width {width} is not a multiple of CLIP's 64-channel attention heads")
    config = {
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab,
        "hidden_size": width,
        "intermediate_size": shape(f"{blocks}0.{fc1}.weight")[0],
        "num_hidden_layers": layers,
        "num_attention_heads": width // 64,
        "max_position_embeddings": shape(position)[0],
        "hidden_act": "quick_gelu" if family == "sd1" else "gelu",
        "layer_norm_eps": 1e-5,
    }
    return config, root, stored


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise UnsupportedModel(f"unknown model family {family!r}; use one of {', '.join(FAMILIES)}")


def _configs(state: Mapping[str, Tensor], keys: list[str], family: str):
    """((U-Net config, layout), VAE config, (text config, text root, blocks in the file)), read off the file."""
    unet, layout = _unet_config(state, keys, family)
    vae = _vae_config(state, keys)
    text, root, stored = _text_config(state, keys, family)
    context, width = unet["cross_attention_dim"], text["hidden_size"]
    if context != width:
        raise UnsupportedModel(f"the U-Net attends to {context}-wide text features but the text encoder is {width} wide")
    return (unet, layout), vae, (text, root, stored)


def ldm_to_diffusers(state: Mapping[str, Tensor], family: str) -> Parts:
    """Split a single-file SD checkpoint into diffusers parts (see the module docstring).

    ``family`` is :func:`detect_family`'s answer. Keys outside the three models (``model_ema.*``, the noise-table
    buffers ``betas`` / ``alphas_cumprod`` / ..., ``logvar``, CLIP ``position_ids``, OpenCLIP ``text_projection`` /
    ``logit_scale``, ...) are ignored; unknown keys inside them and missing ones raise :class:`UnsupportedModel`.
    """
    _check_family(family)
    keys = list(state.keys())
    (unet, layout), vae, (text, root, stored) = _configs(state, keys, family)
    layers = text["num_hidden_layers"]
    ignored = ("embeddings.position_ids",) if family == "sd1" else (
        ("text_projection", "logit_scale", "attn_mask", "visual.") + (f"transformer.resblocks.{layers}.",) * (stored > layers))
    vae_table = vae_rules(tuple(vae["block_out_channels"]), vae["layers_per_block"])
    return {
        "unet": (unet, from_ldm(state, keys, UNET, unet_rules(layout), "", (), "U-Net")),
        "vae": (vae, from_ldm(state, keys, VAE, vae_table, "", ("loss.",), "VAE")),
        "text_encoder": (text, from_ldm(state, keys, root, text_rules(family, layers), TEXT, ignored, "text encoder")),
    }


# ---------------------------------------------------------------- diffusers parts -> single file

def _same(given: Any, wanted: Any) -> bool:
    """Equal as config values: tuples as lists, a scalar as that value at every level."""
    given = list(given) if isinstance(given, tuple) else given
    if isinstance(given, list) != isinstance(wanted, list):
        one, many = (given, wanted) if isinstance(wanted, list) else (wanted, given)
        return all(_same(one, v) for v in many)
    return given == wanted


def _check_config(what: str, family: str, given: Mapping[str, Any], wanted: dict[str, Any], unused: dict[str, tuple]) -> None:
    """Every option of ``given`` that the single file fixes must be what the written file reads back as."""
    for key, value in given.items():
        if key in wanted and key != "architectures":
            ok, need = _same(value, wanted[key]), wanted[key]
        elif key in unused:
            ok, need = any(_same(value, v) for v in unused[key]), unused[key][0]
        else:
            continue  # not structural (sample_size, dropout, upcast_attention, token ids, ...)
        if not ok:
            raise UnsupportedModel(
                f"{what}: {key}={value!r} cannot be written to an {FAMILIES[family]} single file, which implies {need!r}")


def _unet_layout(config: Mapping[str, Any]) -> UNetLayout:
    try:
        channels, layers = tuple(config["block_out_channels"]), config["layers_per_block"]
        down, up = list(config["down_block_types"]), list(config["up_block_types"])
        depth = config["transformer_layers_per_block"]
    except KeyError as e:
        raise UnsupportedModel(f"U-Net: the diffusers config lacks {e.args[0]!r}") from None
    attention = tuple(t == "CrossAttnDownBlock2D" for t in down)
    mirror = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)]
    if {*down} - {"CrossAttnDownBlock2D", "DownBlock2D"} or up != mirror or len(down) != len(channels):
        raise UnsupportedModel(f"U-Net: blocks {down} / {up} are not an SD U-Net's (attention down blocks, mirrored up)")
    return UNetLayout(channels, _one("layers_per_block", layers), attention, _one("transformer_layers_per_block", depth))


def _one(name: str, value: Any) -> int:
    """The value of a per-level option that SD keeps the same at every level."""
    values = set(value) if isinstance(value, (list, tuple)) else {value}
    if len(values) != 1:
        raise UnsupportedModel(f"U-Net: {name}={value!r} varies per level; SD 1.x/2.x use one value")
    return values.pop()


def diffusers_to_ldm(parts: Mapping[str, tuple[Mapping[str, Any], Mapping[str, Tensor]]], family: str) -> dict[str, Tensor]:
    """One single-file state dict from diffusers parts; the inverse of :func:`ldm_to_diffusers`.

    The text encoder's state may use the Hub's ``text_model.`` names or transformers' own (without it). Raises
    :class:`UnsupportedModel` for options the file cannot carry (heads other than the family's, class embeddings,
    a latent shift, ...): it is checked that the written file reads back with the given configs. An SD 2.x text
    encoder is written as it is (the penultimate-layer tower, no ``text_projection``): see the module docstring.
    """
    _check_family(family)
    missing = [name for name in ("unet", "vae", "text_encoder") if name not in parts]
    if missing:
        raise UnsupportedModel(f"the diffusers parts lack {', '.join(missing)}; an SD single file holds all three models")
    (unet, unet_state), (vae, vae_state), (text, text_state) = parts["unet"], parts["vae"], parts["text_encoder"]
    _check_config("U-Net", family, unet, {}, _UNET_UNUSED)  # first: such options leave tensors the file has no room for
    _check_config("VAE", family, vae, {}, _VAE_UNUSED)
    try:
        vae_table = vae_rules(tuple(vae["block_out_channels"]), vae["layers_per_block"])
        layers = text["num_hidden_layers"]
    except KeyError as e:
        raise UnsupportedModel(f"the diffusers config lacks {e.args[0]!r}") from None
    src = TEXT if TEXT + "embeddings.token_embedding.weight" in text_state else ""
    out = to_ldm(unet_state, UNET, unet_rules(_unet_layout(unet)), "", "U-Net")
    out.update(to_ldm(vae_state, VAE, vae_table, "", "VAE"))
    out.update(to_ldm(text_state, CLIP + TEXT if family == "sd1" else OPENCLIP, text_rules(family, layers), src,
                      "text encoder", ("embeddings.position_ids",)))  # a buffer older transformers saved
    if not _same(vae.get("scaling_factor", LATENT_SCALE), LATENT_SCALE):
        out["scale_factor"] = torch.tensor(float(vae["scaling_factor"]), dtype=torch.float64)  # scale_by_std buffer
    (unet_back, _), vae_back, (text_back, _, _) = _configs(out, list(out), family)
    for what, given, back in (("U-Net", unet, unet_back), ("VAE", vae, vae_back), ("text encoder", text, text_back)):
        _check_config(what, family, given, back, {})
    return out


def scheduler_config_from_ldm(state: Mapping[str, Tensor]) -> dict[str, Any] | None:
    """The noise table a single file stores (latent-diffusion's ``betas``, else ``alphas_cumprod`` buffers), as
    diffusers scheduler config entries: a named beta schedule when one reproduces it, else ``trained_betas``;
    None when the file has neither. The prediction type (eps, or v for SD 2.x 768 models) is not in the file.

    The table is judged at the precision it is stored in (``state`` must give it as stored): latent-diffusion
    computes it in float64 and keeps float32 buffers, half-precision files round it to float16 or bfloat16. A named
    schedule matches when it equals the stored table to a few units of that precision, its ``beta_start`` /
    ``beta_end`` read off the stored first and last beta to the digits the precision carries."""
    if "betas" in state:
        stored = state["betas"]
        betas = stored.to(torch.float64)
    elif "alphas_cumprod" in state:
        stored = state["alphas_cumprod"]
        abar = stored.to(torch.float64)
        betas = 1 - abar / torch.cat([abar.new_ones(1), abar[:-1]])
    else:
        return None
    eps = torch.finfo(stored.dtype).eps
    # relative precision of the first beta: the stored value's, or, from 1 - abar_0, abar's spacing near 1 over it
    precision = eps if "betas" in state else eps / max(float(betas[0]), eps)
    digits = max(1, min(6, int(-math.log10(precision))))
    steps = betas.shape[0]
    start, end = (float(f"{float(b):.{digits}g}") for b in (betas[0], betas[-1]))
    for name in ("scaled_linear", "linear"):
        table = schedules.BETA_TABLES[name](steps, start, end)
        want = table if "betas" in state else schedules.alphas_cumprod(table)
        if torch.allclose(want, stored.to(torch.float64), rtol=max(4 * eps, 1e-6), atol=0):
            return {"num_train_timesteps": steps, "beta_schedule": name, "beta_start": start, "beta_end": end}
    return {"num_train_timesteps": steps, "trained_betas": betas.tolist()}
