"""diffusers ``AutoencoderKL`` (the KL autoencoder of latent diffusion and Stable Diffusion) <-> our
:class:`~diffuse.nn.vae.VAE`.

Our VAE is built with AutoencoderKL's module layout and names (see :mod:`diffuse.nn.vae`), so the weight
mapping keeps every key; it checks the tensors against the configuration (each expected key present with
its shape, nothing else) and renames the attention tensors of early diffusers files (``query``, ``key``,
``value``, ``proj_attn`` -> ``to_q``, ``to_k``, ``to_v``, ``to_out.0``), as diffusers does when it loads them.

Config: ``block_out_channels`` = base_channels * channel_mult (base = their greatest common divisor),
``layers_per_block`` = num_res_blocks, ``mid_block_add_attention`` = mid_attention, ``use_quant_conv`` =
``use_post_quant_conv`` = quant_conv; the latent scale and shift are ``scaling_factor`` and ``shift_factor``
(z_model = (z - shift) * scale, the convention of :class:`~diffuse.codec.VAECodec` and of diffusers' SD3/Flux
pipelines). ``force_upcast`` (half-precision advice; our VAE runs in float32) and ``sample_size`` (the
tile size of diffusers' own tiling) do not change the network and are not kept.
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch
from torch import Tensor

from ..nn.vae import VAE, VAEConfig
from .errors import UnsupportedModel

# AutoencoderKL's constructor defaults (diffusers 0.2x-0.4x): what a config.json that omits a key means
DIFFUSERS_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "scaling_factor": 0.18215, "shift_factor": None, "latents_mean": None, "latents_std": None, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "force_upcast", "sample_size"}
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_KEY = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")


def _check_scale(scale: float, shift: float) -> None:
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(shift)):
        raise UnsupportedModel(f"AutoencoderKL scaling_factor must be a positive number and shift_factor a finite one, "
                               f"got {scale} and {shift}")


def vae_config_from_diffusers(config: dict) -> tuple[VAEConfig, float, float]:
    """An AutoencoderKL config.json dict -> (our VAEConfig, latent scale, latent shift); UnsupportedModel names
    the first option our VAE does not have."""
    name = config.get("_class_name", "AutoencoderKL")
    if name != "AutoencoderKL":
        raise UnsupportedModel(f"the VAE is a diffusers {name}, not an AutoencoderKL; only the KL autoencoder converts")
    unknown = sorted(set(config) - set(DIFFUSERS_DEFAULTS) - IGNORED)
    if unknown:
        raise UnsupportedModel(f"AutoencoderKL option {unknown[0]!r} is unknown to diffuse's converter; "
                               "convert a VAE without it")
    c = {**DIFFUSERS_DEFAULTS, **config}
    widths = [int(w) for w in c["block_out_channels"]]
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = list(c[key])
        if len(types) != len(widths) or any(t != block for t in types):
            raise UnsupportedModel(f"AutoencoderKL {key}={types} is not supported: diffuse's VAE has one {block} "
                                   f"per entry of block_out_channels ({len(widths)})")
    if c["act_fn"] != "silu":
        raise UnsupportedModel(f"AutoencoderKL act_fn={c['act_fn']!r} is not supported; diffuse's VAE uses 'silu'")
    if c["out_channels"] != c["in_channels"]:
        raise UnsupportedModel(f"AutoencoderKL out_channels={c['out_channels']} differs from in_channels={c['in_channels']}; "
                               "diffuse's VAE decodes to the channels it encodes")
    for key in ("latents_mean", "latents_std"):
        if c[key] is not None:
            raise UnsupportedModel(f"AutoencoderKL {key} (per-channel latent statistics) is not supported; diffuse's "
                                   "latent codec has one scalar scale and shift")
    if bool(c["use_quant_conv"]) != bool(c["use_post_quant_conv"]):
        raise UnsupportedModel(f"AutoencoderKL use_quant_conv={c['use_quant_conv']} with use_post_quant_conv="
                               f"{c['use_post_quant_conv']} is not supported; diffuse's VAE has both quant convs or neither")
    base = math.gcd(*widths)
    try:
        cfg = VAEConfig(in_channels=int(c["in_channels"]), latent_channels=int(c["latent_channels"]), base_channels=base,
                        channel_mult=tuple(w // base for w in widths), num_res_blocks=int(c["layers_per_block"]),
                        norm_groups=int(c["norm_num_groups"]), mid_attention=bool(c["mid_block_add_attention"]),
                        quant_conv=bool(c["use_quant_conv"]))
    except ValueError as e:
        raise UnsupportedModel(f"AutoencoderKL config (block_out_channels={widths}, norm_num_groups="
                               f"{c['norm_num_groups']}, layers_per_block={c['layers_per_block']}): {e}") from e
    scale, shift = float(c["scaling_factor"]), float(c["shift_factor"] or 0.0)
    _check_scale(scale, shift)
    return cfg, scale, shift


def vae_config_to_diffusers(cfg: VAEConfig, scale: float, shift: float) -> dict:
    """Our VAEConfig and latent scale/shift -> an AutoencoderKL config.json dict (shift 0 is written as None,
    as in Stable Diffusion's VAE)."""
    _check_scale(float(scale), float(shift))
    n = len(cfg.channel_mult)
    return {
        "_class_name": "AutoencoderKL", "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": cfg.widths, "layers_per_block": cfg.num_res_blocks, "act_fn": "silu",
        "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_groups, "scaling_factor": float(scale),
        "shift_factor": float(shift) if shift else None, "latents_mean": None, "latents_std": None,
        "force_upcast": True, "use_quant_conv": cfg.quant_conv, "use_post_quant_conv": cfg.quant_conv,
        "mid_block_add_attention": cfg.mid_attention,
    }


def _shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of ``VAE(cfg).state_dict()``, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        vae = VAE(cfg)
    return {k: tuple(v.shape) for k, v in vae.state_dict().items()}


def _take(state: Mapping[str, Tensor], names: dict[str, str], shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, Tensor]:
    """{target key: state[source key]} for ``names`` (target -> source), checked against ``shapes`` (target keys)."""
    missing = [k for k in shapes if k not in names]
    if missing:
        raise UnsupportedModel(f"the {source} VAE weights lack {missing[0]!r} ({len(missing)} tensors missing) that the "
                               "config implies; the weights do not belong to this config")
    out: dict[str, Tensor] = {}
    for target, key in names.items():
        tensor = state[key]
        if tuple(tensor.shape) != shapes[target]:
            raise UnsupportedModel(f"the {source} VAE tensor {key!r} has shape {tuple(tensor.shape)}, the config implies "
                                   f"{shapes[target]}; the weights do not belong to this config")
        out[target] = tensor
    return out


def vae_state_from_diffusers(state: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """AutoencoderKL weights (current or early attention names) -> the keys of ``VAE(cfg).state_dict()``."""
    shapes = _shapes(cfg)
    names: dict[str, str] = {}
    for key in state.keys():
        m = _LEGACY_KEY.match(key)
        ours = f"{m[1]}.{LEGACY_ATTENTION[m[2]]}.{m[3]}" if m else key
        if ours not in shapes:
            raise UnsupportedModel(f"the diffusers VAE tensor {key!r} has no place in the AutoencoderKL its config "
                                   "describes; the weights do not belong to this config")
        if ours in names:
            raise UnsupportedModel(f"the diffusers VAE weights hold both {names[ours]!r} and {key!r}; keep one")
        names[ours] = key
    return _take(state, {k: names[k] for k in shapes if k in names}, shapes, "diffusers")


def vae_state_to_diffusers(state: Mapping[str, Tensor], cfg: VAEConfig) -> dict[str, Tensor]:
    """Our VAE weights -> AutoencoderKL's (same keys, checked against ``cfg``)."""
    shapes = _shapes(cfg)
    extra = sorted(set(state.keys()) - set(shapes))
    if extra:
        raise UnsupportedModel(f"our VAE weights hold {extra[0]!r}, which a VAE of this config does not have")
    return _take(state, {k: k for k in shapes if k in state}, shapes, "diffuse")
