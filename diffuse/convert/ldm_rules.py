"""The single-file Stable Diffusion layout as rename rules: each tensor of the file and the diffusers tensor(s) it is.

Tables written from the key names of latent-diffusion's openaimodel U-Net and autoencoder (Rombach et al. 2022;
CompVis latent-diffusion, Stability stablediffusion) and of transformers' CLIPTextModel / open_clip's text tower,
against diffusers' UNet2DConditionModel and AutoencoderKL. Rules are relative to a model's prefix on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor

from .errors import UnsupportedModel


@dataclass(frozen=True)
class Rule:
    """One single-file tensor and the diffusers tensor(s) it holds."""

    ldm: str
    diffusers: tuple[str, ...]  # one name, or the q, k, v names of a fused in_proj (concatenated on dim 0)
    conv: bool = False  # kept as a 1x1 convolution [out, in, 1, 1] in the file, a linear [out, in] in diffusers


def _layers(*pairs: tuple[str, str], params: tuple[str, ...] = ("weight", "bias"), conv: bool = False) -> list[Rule]:
    return [Rule(f"{a}.{p}", (f"{b}.{p}",), conv and p == "weight") for a, b in pairs for p in params]


# ---------------------------------------------------------------- rename tables (single file, diffusers)

_UNET_RES = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
             ("out_layers.0", "norm2"), ("out_layers.3", "conv2"))
_UNET_SKIP = ("skip_connection", "conv_shortcut")
_VAE_RES = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"))
_VAE_SKIP = ("nin_shortcut", "conv_shortcut")
_VAE_ATTN = (("q", "to_q"), ("k", "to_k"), ("v", "to_v"), ("proj_out", "to_out.0"))
_BLOCK = ("norm1", "norm2", "norm3", "attn1.to_out.0", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")  # same names
_CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1", "mlp.fc1",
               "mlp.fc2", "layer_norm2")
_OPENCLIP_LAYER = (("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
                   ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))  # its q, k, v: one fused in_proj


def _resnet(a: str, b: str, table: tuple[tuple[str, str], ...], skip: tuple[str, str], shortcut: bool) -> list[Rule]:
    pairs = [(f"{a}.{x}", f"{b}.{y}") for x, y in table + ((skip,) if shortcut else ())]
    return _layers(*pairs)


def _transformer(a: str, b: str, depth: int) -> list[Rule]:
    names = ["norm", "proj_in", "proj_out"] + [f"transformer_blocks.{t}.{n}" for t in range(depth) for n in _BLOCK]
    qkv = [f"transformer_blocks.{t}.attn{i}.to_{x}" for t in range(depth) for i in (1, 2) for x in "qkv"]
    with_bias = _layers(*((f"{a}.{n}", f"{b}.{n}") for n in names))
    return with_bias + _layers(*((f"{a}.{n}", f"{b}.{n}") for n in qkv), params=("weight",))


@dataclass(frozen=True)
class UNetLayout:
    """What the key names of an SD U-Net depend on."""

    channels: tuple[int, ...]  # per level
    layers: int  # ResBlocks per down level (up levels have one more)
    attention: tuple[bool, ...]  # per level; the middle block always attends
    depth: int  # transformer blocks per attention


def unet_rules(lay: UNetLayout) -> list[Rule]:
    """openaimodel U-Net (``input_blocks`` / ``middle_block`` / ``output_blocks``) vs UNet2DConditionModel."""
    ch, n, per = lay.channels, len(lay.channels), lay.layers + 1
    rules = _layers(("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
                    ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out"))
    cur, skips = ch[0], [ch[0]]  # channels of the running feature and of the skip connections kept for the up path
    for lvl in range(n):
        for j in range(lay.layers):
            k = 1 + lvl * per + j
            rules += _resnet(f"input_blocks.{k}.0", f"down_blocks.{lvl}.resnets.{j}", _UNET_RES, _UNET_SKIP, cur != ch[lvl])
            if lay.attention[lvl]:
                rules += _transformer(f"input_blocks.{k}.1", f"down_blocks.{lvl}.attentions.{j}", lay.depth)
            cur = ch[lvl]
            skips.append(cur)
        if lvl < n - 1:
            rules += _layers((f"input_blocks.{(lvl + 1) * per}.0.op", f"down_blocks.{lvl}.downsamplers.0.conv"))
            skips.append(cur)
    for m in (0, 2):
        rules += _resnet(f"middle_block.{m}", f"mid_block.resnets.{m // 2}", _UNET_RES, _UNET_SKIP, False)
    rules += _transformer("middle_block.1", "mid_block.attentions.0", lay.depth)
    for u in range(n):
        lvl = n - 1 - u
        for j in range(per):
            k = u * per + j
            shortcut = cur + skips.pop() != ch[lvl]
            rules += _resnet(f"output_blocks.{k}.0", f"up_blocks.{u}.resnets.{j}", _UNET_RES, _UNET_SKIP, shortcut)
            if lay.attention[lvl]:
                rules += _transformer(f"output_blocks.{k}.1", f"up_blocks.{u}.attentions.{j}", lay.depth)
            cur = ch[lvl]
        if u < n - 1:
            rules += _layers((f"output_blocks.{k}.{2 if lay.attention[lvl] else 1}.conv", f"up_blocks.{u}.upsamplers.0.conv"))
    return rules


def vae_rules(channels: tuple[int, ...], layers: int) -> list[Rule]:
    """latent-diffusion's KL autoencoder (``encoder.down`` / ``decoder.up`` / ``mid``) vs AutoencoderKL."""
    n = len(channels)
    rules = _layers(*((f"{s}.{a}", f"{s}.{b}") for s in ("encoder", "decoder") for a, b in
                      (("conv_in", "conv_in"), ("norm_out", "conv_norm_out"), ("conv_out", "conv_out"))),
                    ("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv"))
    cur = channels[0]
    for i in range(n):
        for j in range(layers):
            rules += _resnet(f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", _VAE_RES, _VAE_SKIP,
                             cur != channels[i])
            cur = channels[i]
        if i < n - 1:
            rules += _layers((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
    for side in ("encoder", "decoder"):
        for m in (1, 2):
            rules += _resnet(f"{side}.mid.block_{m}", f"{side}.mid_block.resnets.{m - 1}", _VAE_RES, _VAE_SKIP, False)
        attn = f"{side}.mid_block.attentions.0"
        rules += _layers((f"{side}.mid.attn_1.norm", f"{attn}.group_norm"))
        rules += _layers(*((f"{side}.mid.attn_1.{a}", f"{attn}.{b}") for a, b in _VAE_ATTN), conv=True)
    for u in range(n):
        i = n - 1 - u  # the decoder's levels are numbered from the bottom in the file, from the top in diffusers
        for j in range(layers + 1):
            rules += _resnet(f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}", _VAE_RES, _VAE_SKIP,
                             cur != channels[i])
            cur = channels[i]
        if u < n - 1:
            rules += _layers((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv"))
    return rules


def text_rules(family: str, layers: int) -> list[Rule]:
    """Relative to the text model root in the file (``clip_root`` / ``OPENCLIP``) and to ``text_model.``."""
    if family == "sd1":
        names = ["embeddings.token_embedding.weight", "embeddings.position_embedding.weight"]
        names += [f"encoder.layers.{i}.{m}.{p}" for i in range(layers) for m in _CLIP_LAYER for p in ("weight", "bias")]
        return [Rule(n, (n,)) for n in names + ["final_layer_norm.weight", "final_layer_norm.bias"]]
    rules = [Rule("token_embedding.weight", ("embeddings.token_embedding.weight",)),
             Rule("positional_embedding", ("embeddings.position_embedding.weight",))]
    for i in range(layers):
        a, b = f"transformer.resblocks.{i}", f"encoder.layers.{i}"
        rules += [Rule(f"{a}.attn.in_proj_{p}", tuple(f"{b}.self_attn.{x}_proj.{p}" for x in "qkv")) for p in ("weight", "bias")]
        rules += _layers(*((f"{a}.{x}", f"{b}.{y}") for x, y in _OPENCLIP_LAYER))
    return rules + _layers(("ln_final", "final_layer_norm"))


# ---------------------------------------------------------------- applying the tables

def _few(keys: list[str]) -> str:
    return f"{keys[0]}" + (f" (and {len(keys) - 1} more)" if len(keys) > 1 else "")


def from_ldm(state: Mapping[str, Tensor], keys: list[str], prefix: str, rules: list[Rule], out: str,
             ignored: tuple[str, ...], what: str) -> dict[str, Tensor]:
    """The diffusers tensors (names prefixed ``out``) of the model under ``prefix`` in a single file. Its keys
    that no rule reads must start (after ``prefix``) with one of ``ignored``; missing ones raise as well."""
    missing = [prefix + r.ldm for r in rules if prefix + r.ldm not in state]
    if missing:
        raise UnsupportedModel(f"{what}: the single file lacks {_few(missing)}; it is incomplete or not this SD family")
    used = {prefix + r.ldm for r in rules}
    extra = [k for k in keys if k.startswith(prefix) and k not in used and not k[len(prefix):].startswith(ignored)]
    if extra:
        raise UnsupportedModel(f"{what}: the single file has {_few(extra)}, which SD 1.x/2.x models do not have")
    result: dict[str, Tensor] = {}
    for r in rules:
        t = state[prefix + r.ldm]
        if len(r.diffusers) > 1:  # own storage for q, k, v: safetensors refuses to save tensors that share memory
            result.update((out + name, part.clone()) for name, part in zip(r.diffusers, t.chunk(len(r.diffusers))))
        else:
            result[out + r.diffusers[0]] = t.reshape(t.shape[0], -1) if r.conv else t
    return result


def to_ldm(state: Mapping[str, Tensor], prefix: str, rules: list[Rule], src: str, what: str,
           ignored: tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The single-file tensors (names prefixed ``prefix``) of a diffusers state whose names carry ``src``:
    exactly the rules' tensors, apart from the ``ignored`` names."""
    wanted = [src + name for r in rules for name in r.diffusers]
    missing = [k for k in wanted if k not in state]
    if missing:
        raise UnsupportedModel(f"{what}: the diffusers state lacks {_few(missing)} that its config implies")
    extra = sorted(set(state) - set(wanted) - {src + name for name in ignored})
    if extra:
        raise UnsupportedModel(f"{what}: {_few(extra)} has no place in the SD single-file layout")
    result = {}
    for r in rules:
        parts = [state[src + name] for name in r.diffusers]
        t = torch.cat(parts) if len(parts) > 1 else parts[0]
        result[prefix + r.ldm] = t[:, :, None, None] if r.conv and t.ndim == 2 else t
    return result
