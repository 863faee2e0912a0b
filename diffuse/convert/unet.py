"""diffusers U-Nets <-> our :class:`~diffuse.nn.unet.UNet`: configs and state dicts (issue #10).

Two diffusers classes map onto our U-Net, whose module tree mirrors theirs (so weights move by
key, see diffuse/nn/unet.py):

* ``UNet2DConditionModel`` as Stable Diffusion 1.x/2.x uses it (CrossAttnDownBlock2D / DownBlock2D,
  UNetMidBlock2DCrossAttn, UpBlock2D / CrossAttnUpBlock2D) -> ``attention='transformer'``,
  ``text_dim = cross_attention_dim``. Its ``attention_head_dim`` is the number of heads per level
  (a historical misnomer in diffusers): a constant becomes our ``num_heads``, a constant
  channels / heads our ``head_dim``. SD 1.x's 1x1-conv proj_in/proj_out are squeezed into our
  Linear layers; on export ``use_linear_projection`` is True exactly when heads are given by
  ``head_dim`` (SD 2.x), so both families go back to their own layout (the function is the same).
* ``UNet2DModel`` (pixel DDPM models: DownBlock2D / AttnDownBlock2D, UNetMidBlock2D, UpBlock2D /
  AttnUpBlock2D) -> ``attention='plain'``. Its ``attention_head_dim`` is the width of a head
  (None: one head per block). Checkpoints saved by early diffusers versions name the attention
  tensors query/key/value/proj_attn; they are read as to_q/to_k/to_v/to_out.0.

Class labels (``num_class_embeds``, either class): diffusers' N rows become rows 0..N-1 of our
embedding; our extra null-class row N (the unconditional branch of classifier-free guidance) is
filled with zeros, i.e. label N adds nothing to the noise embedding. The source model was not
trained with a null class, so guidance on it is extrapolation, not a learned unconditional model.
Export drops that row and refuses a non-zero one (it would be lost).

``upcast_attention`` (SD 2.1) is accepted: it only changes fp16 attention in diffusers, our
attention computes in the input's dtype (fp32 or bf16, which does not overflow). Every other
option that diffuse does not reproduce raises :class:`UnsupportedModel` naming it and its value.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..nn.unet import UNet, UNetConfig
from .errors import UnsupportedModel

CONDITIONAL, PIXEL = "UNet2DConditionModel", "UNet2DModel"

# Options read into UNetConfig, with diffusers' defaults (used when a config.json omits them).
_READ: dict[str, dict[str, Any]] = {
    CONDITIONAL: dict(
        sample_size=None, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1.0,
        dropout=0.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, cross_attention_dim=1280,
        transformer_layers_per_block=1, attention_head_dim=8, use_linear_projection=False, num_class_embeds=None,
        resnet_time_scale_shift="default", time_embedding_dim=None),
    PIXEL: dict(
        sample_size=None, in_channels=3, out_channels=3, flip_sin_to_cos=True, freq_shift=0,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(224, 448, 672, 896), layers_per_block=2, downsample_padding=1, mid_block_scale_factor=1.0,
        dropout=0.0, act_fn="silu", norm_num_groups=32, norm_eps=1e-5, attention_head_dim=8, attn_norm_num_groups=None,
        resnet_time_scale_shift="default", add_attention=True, num_class_embeds=None, time_embedding_dim=None),
}
# Options whose only reproduced values are these (the first is diffusers' default); checked in this order,
# so that the option marking a model family (SDXL's addition_embed_type...) is the one named.
_FIXED: dict[str, dict[str, tuple]] = {
    CONDITIONAL: dict(
        addition_embed_type=(None,), addition_time_embed_dim=(None,), class_embed_type=(None,),
        encoder_hid_dim_type=(None,), encoder_hid_dim=(None,), time_cond_proj_dim=(None,),
        projection_class_embeddings_input_dim=(None,), class_embeddings_concat=(False,), dual_cross_attention=(False,),
        only_cross_attention=(False,), mid_block_only_cross_attention=(None, False),
        mid_block_type=("UNetMidBlock2DCrossAttn",), num_attention_heads=(None,),
        reverse_transformer_layers_per_block=(None,), attention_type=("default",), cross_attention_norm=(None,),
        center_input_sample=(False,), time_embedding_type=("positional",), time_embedding_act_fn=(None,),
        timestep_post_act=(None,), conv_in_kernel=(3,), conv_out_kernel=(3,), resnet_skip_time_act=(False,),
        resnet_out_scale_factor=(1.0,)),
    PIXEL: dict(
        class_embed_type=(None,), time_embedding_type=("positional",), center_input_sample=(False,),
        mid_block_type=("UNetMidBlock2D",), downsample_type=("conv",), upsample_type=("conv",)),
}
_HINTS = {"addition_embed_type": "SDXL-style added conditioning", "time_cond_proj_dim": "LCM-style guidance embedding",
          "encoder_hid_dim_type": "projected encoder states", "class_embed_type": "a plain num_class_embeds table is"}
# Options without effect on the network given the fixed ones above (or in fp32/bf16: upcast_attention).
_INERT = {CONDITIONAL: {"upcast_attention", "addition_embed_type_num_heads"}, PIXEL: {"num_train_timesteps"}}
_BLOCKS = {  # (plain down, attention down, plain up, attention up)
    CONDITIONAL: ("DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
    PIXEL: ("DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"),
}
_TIME_SHIFT = {"default": "add", "scale_shift": "scale_shift"}
_DEPRECATED_ATTENTION = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}


# ----------------------------------------------------------------------------- config


def _refuse(cls: str, option: str, value: Any, why: str = "") -> UnsupportedModel:
    return UnsupportedModel(f"diffusers {cls} option {option}={value!r} is not supported by diffuse's U-Net"
                            f"{f' ({why})' if why else ''}")


def _constant(cls: str, option: str, value: Any, n: int) -> Any:
    """An int option that diffusers also accepts per level: the one value, refusing differing ones."""
    if isinstance(value, (list, tuple)):
        if len(value) != n or any(v != value[0] for v in value) or isinstance(value[0], (list, tuple)):
            raise _refuse(cls, option, value, "only one value for every level is supported")
        value = value[0]
    return value


def _heads(cls: str, value: Any, channels: list[int], attention_levels: list[int], prefer_head_dim: bool) -> dict:
    """UNet2DConditionModel: ``attention_head_dim`` (heads per level) -> our num_heads or head_dim."""
    heads = value if isinstance(value, (list, tuple)) else [value] * len(channels)
    if len(heads) != len(channels):
        raise _refuse(cls, "attention_head_dim", value, f"needs one value per level ({len(channels)})")
    used = {i: heads[i] for i in attention_levels}
    if any(not isinstance(h, int) or h <= 0 or channels[i] % h for i, h in used.items()):
        raise _refuse(cls, "attention_head_dim", value, "heads must divide the channels of their level")
    same_heads = {"num_heads": used[attention_levels[0]], "head_dim": 0} if len(set(used.values())) == 1 else None
    widths = {channels[i] // h for i, h in used.items()}
    same_width = {"num_heads": 0, "head_dim": widths.pop()} if len(widths) == 1 else None
    choice = (same_width or same_heads) if prefer_head_dim else (same_heads or same_width)
    if choice is None:
        raise _refuse(cls, "attention_head_dim", value, "neither the number nor the width of heads is constant")
    return choice


def _pixel_heads(value: Any) -> dict:
    """UNet2DModel: ``attention_head_dim`` (width of a head; None = one head) -> our num_heads or head_dim."""
    if value is None:
        return {"num_heads": 1, "head_dim": 0}
    if not isinstance(value, int) or value <= 0:
        raise _refuse(PIXEL, "attention_head_dim", value, "must be None or a positive int")
    return {"num_heads": 0, "head_dim": value}


def _options(cls: str, config: dict) -> dict[str, Any]:
    """The options read into UNetConfig (defaults filled in), after refusing fixed options off their values
    and unknown ones."""
    for option, accepted in _FIXED[cls].items():
        value = config.get(option, accepted[0])
        values = value if option == "only_cross_attention" and isinstance(value, (list, tuple)) else [value]
        if any(v not in accepted for v in values):
            hint = f"{_HINTS[option]}; " if option in _HINTS else ""
            raise _refuse(cls, option, value, hint + f"only {' or '.join(map(repr, accepted))} is")
    known = set(_READ[cls]) | set(_FIXED[cls]) | _INERT[cls]
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise _refuse(cls, unknown[0], config[unknown[0]], "unknown option")
    return {**_READ[cls], **{k: v for k, v in config.items() if k in _READ[cls]}}


def _attention_levels(cls: str, c: dict[str, Any]) -> list[int]:
    """The levels whose blocks have attention, checking block types and that up mirrors down."""
    n = len(c["block_out_channels"])
    down, up = [list(c[k]) for k in ("down_block_types", "up_block_types")]
    if len(down) != n or len(up) != n:
        raise _refuse(cls, "down_block_types", down, f"needs as many down and up blocks as block_out_channels ({n})")
    plain_down, attn_down, plain_up, attn_up = _BLOCKS[cls]
    for option, types, allowed in (("down_block_types", down, (plain_down, attn_down)),
                                   ("up_block_types", up, (plain_up, attn_up))):
        for t in types:
            if t.removeprefix("UNetRes") not in allowed:
                raise _refuse(cls, option, types, f"block {t!r}; only {' and '.join(allowed)} are")
    attention_levels = [i for i, t in enumerate(down) if t.removeprefix("UNetRes") == attn_down]
    if [i for i, t in enumerate(reversed(up)) if t.removeprefix("UNetRes") == attn_up] != attention_levels:
        raise _refuse(cls, "up_block_types", up, f"attention must sit at the same levels as in down_block_types {down}")
    return attention_levels


def _sample_size(cls: str, size: Any) -> int:
    """``sample_size`` (an int or a square [h, w]) as our nominal image_size."""
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise _refuse(cls, "sample_size", size, "only square samples are")
        size = size[0]
    if not isinstance(size, int):
        raise _refuse(cls, "sample_size", size, "diffuse needs the nominal sample size to place attention")
    return size


def unet_config_from_diffusers(config: dict) -> UNetConfig:
    """A diffusers ``UNet2DConditionModel`` or ``UNet2DModel`` config.json dict (with ``_class_name``)
    -> the :class:`UNetConfig` of the same network; :class:`UnsupportedModel` for anything else."""
    cls = config.get("_class_name")
    if cls not in _READ:
        raise UnsupportedModel(f"diffusers U-Net class {cls!r} is not supported; diffuse converts {CONDITIONAL} and {PIXEL}")
    c = _options(cls, config)
    attention_levels = _attention_levels(cls, c)
    size = _sample_size(cls, c["sample_size"])
    channels = list(c["block_out_channels"])
    n = len(channels)
    if any(ch % channels[0] for ch in channels):
        raise _refuse(cls, "block_out_channels", channels, "every level's channels must be a multiple of the first's")
    if c["act_fn"] not in ("silu", "swish"):
        raise _refuse(cls, "act_fn", c["act_fn"], "only 'silu' is")
    if c["resnet_time_scale_shift"] not in _TIME_SHIFT:
        raise _refuse(cls, "resnet_time_scale_shift", c["resnet_time_scale_shift"], "only 'default' and 'scale_shift' are")
    if c["time_embedding_dim"] not in (None, 4 * channels[0]):
        raise _refuse(cls, "time_embedding_dim", c["time_embedding_dim"], "only 4 x block_out_channels[0] is")
    if c["downsample_padding"] not in (0, 1):
        raise _refuse(cls, "downsample_padding", c["downsample_padding"], "only 0 and 1 are")
    if c["norm_num_groups"] is None:
        raise _refuse(cls, "norm_num_groups", None, "the U-Net needs GroupNorm")
    classes = c["num_class_embeds"]
    if classes is not None and (not isinstance(classes, int) or classes <= 0):
        raise _refuse(cls, "num_class_embeds", classes, "must be None or a positive int")

    fields: dict[str, Any] = dict(
        in_channels=c["in_channels"], out_channels=c["out_channels"], image_size=size, model_channels=channels[0],
        channel_mult=tuple(ch // channels[0] for ch in channels),
        num_res_blocks=_constant(cls, "layers_per_block", c["layers_per_block"], n),
        attention_resolutions=tuple(size // 2**i for i in attention_levels), dropout=float(c["dropout"]),
        norm_groups=c["norm_num_groups"], num_classes=classes or 0, time_embedding=_TIME_SHIFT[c["resnet_time_scale_shift"]],
        flip_sin_to_cos=bool(c["flip_sin_to_cos"]), freq_shift=float(c["freq_shift"]), norm_eps=float(c["norm_eps"]),
        downsample_padding=c["downsample_padding"], mid_rescale=float(c["mid_block_scale_factor"]))
    if cls == CONDITIONAL:
        fields.update(_heads(cls, c["attention_head_dim"], channels, [*attention_levels, n - 1], c["use_linear_projection"]),
                      attention="transformer", mid_attention=True,
                      text_dim=_constant(cls, "cross_attention_dim", c["cross_attention_dim"], n),
                      transformer_depth=_constant(cls, "transformer_layers_per_block", c["transformer_layers_per_block"], n))
    else:
        groups = c["attn_norm_num_groups"]
        mid_norm = groups if groups is not None else (c["norm_num_groups"] if c["resnet_time_scale_shift"] == "default" else None)
        if c["add_attention"] and mid_norm != c["norm_num_groups"]:
            raise _refuse(cls, "attn_norm_num_groups", groups, "the mid-block attention needs a GroupNorm of "
                          f"norm_num_groups={c['norm_num_groups']} groups (resnet_time_scale_shift="
                          f"{c['resnet_time_scale_shift']!r})")
        fields.update(_pixel_heads(c["attention_head_dim"]), attention="plain", mid_attention=bool(c["add_attention"]))
    try:
        return UNetConfig(**fields)
    except ValueError as e:
        raise UnsupportedModel(f"diffusers {cls} config gives an invalid diffuse U-Net: {e}") from e


def _diffusers_class(cfg: UNetConfig) -> str:
    """The diffusers class that reproduces ``cfg``; :class:`UnsupportedModel` naming the field that has none."""
    if (cfg.noise_embedding, cfg.noise_embedding_scale, cfg.noise_max_period) != ("positional", 1.0, 10000.0):
        raise UnsupportedModel("diffusers U-Nets embed the noise level with sinusoids of scale 1 and max period 10000; "
                               f"this U-Net has noise_embedding={cfg.noise_embedding!r}, noise_embedding_scale="
                               f"{cfg.noise_embedding_scale}, noise_max_period={cfg.noise_max_period}")
    if cfg.position_embedding != "none":
        raise UnsupportedModel(f"position_embedding={cfg.position_embedding!r} (position features on the attention tokens) "
                               "has no diffusers counterpart")
    if cfg.attention == "plain":
        return PIXEL
    if not cfg.text_dim:
        raise UnsupportedModel("a U-Net with attention='transformer' and text_dim=0 has no diffusers counterpart "
                               f"({CONDITIONAL}'s attention blocks always cross-attend to text)")
    if not cfg.mid_attention:
        raise UnsupportedModel(f"mid_attention=False has no {CONDITIONAL} counterpart (its mid block always has attention)")
    return CONDITIONAL


def unet_config_to_diffusers(cfg: UNetConfig) -> dict:
    """The diffusers config dict (with ``_class_name``) of the network :class:`UNet` builds from ``cfg``.

    ``concat_channels`` are folded into diffusers' ``in_channels`` (the concatenated input it expects)."""
    cls = _diffusers_class(cfg)
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    levels = [cfg.image_size // 2**i in cfg.attention_resolutions for i in range(len(channels))]
    plain_down, attn_down, plain_up, attn_up = _BLOCKS[cls]
    config: dict[str, Any] = dict(
        _class_name=cls, sample_size=cfg.image_size, in_channels=cfg.in_channels + cfg.concat_channels,
        out_channels=cfg.out_channels, center_input_sample=False, time_embedding_type="positional",
        flip_sin_to_cos=cfg.flip_sin_to_cos, freq_shift=cfg.freq_shift,
        down_block_types=[attn_down if a else plain_down for a in levels],
        up_block_types=[attn_up if a else plain_up for a in reversed(levels)],
        block_out_channels=channels, layers_per_block=cfg.num_res_blocks, downsample_padding=cfg.downsample_padding,
        mid_block_scale_factor=cfg.mid_rescale, dropout=cfg.dropout, act_fn="silu", norm_num_groups=cfg.norm_groups,
        norm_eps=cfg.norm_eps, resnet_time_scale_shift="default" if cfg.time_embedding == "add" else "scale_shift",
        class_embed_type=None, num_class_embeds=cfg.num_classes or None)
    if cls == CONDITIONAL:
        config.update(
            mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=cfg.text_dim,
            transformer_layers_per_block=cfg.transformer_depth, use_linear_projection=bool(cfg.head_dim),
            attention_head_dim=[cfg.heads(c)[0] for c in channels] if cfg.head_dim else cfg.num_heads)
        return config
    attended = [c for c, a in zip(channels, levels) if a] + ([channels[-1]] if cfg.mid_attention else [])
    if cfg.head_dim or cfg.num_heads == 1:
        head_dim = cfg.head_dim or None
    elif len(set(attended)) <= 1:  # constant heads on one width: a constant head width too
        head_dim = cfg.heads(attended[0])[1] if attended else None
    else:
        raise UnsupportedModel(f"num_heads={cfg.num_heads} on attention levels of different widths {attended} has no "
                               f"{PIXEL} counterpart (its attention_head_dim fixes the width of a head); set head_dim")
    config.update(mid_block_type="UNetMidBlock2D", add_attention=cfg.mid_attention, attention_head_dim=head_dim,
                  attn_norm_num_groups=cfg.norm_groups if cfg.time_embedding == "scale_shift" else None)
    return config


# ----------------------------------------------------------------------------- state


def _our_shapes(cfg: UNetConfig) -> dict[str, torch.Size]:
    """Key -> shape of ``UNet(cfg).state_dict()``, from a network built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return {k: v.shape for k, v in UNet(cfg).state_dict().items()}


def _is_projection(key: str, cfg: UNetConfig) -> bool:
    """Whether ``key`` is a transformer's proj_in/proj_out weight (a 1x1 conv in diffusers without linear projection)."""
    return cfg.attention == "transformer" and key.endswith((".proj_in.weight", ".proj_out.weight"))


def _source_key(key: str, state: Mapping[str, torch.Tensor]) -> str:
    """``key``, or its early-diffusers name (query/key/value/proj_attn) where only that one is present."""
    if key in state:
        return key
    for new, old in _DEPRECATED_ATTENTION.items():
        if new in key and key.replace(new, old) in state:
            return key.replace(new, old)
    return key


def _few(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def unet_state_from_diffusers(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers U-Net state dict -> our ``UNet(cfg).state_dict()`` keys (renames and views, no copies except
    the class embedding, which gains the zero null-class row). ``cfg`` comes from :func:`unet_config_from_diffusers`.
    Every tensor the config needs must be present with its shape, and every tensor present must be used."""
    cls = _diffusers_class(cfg)
    out: dict[str, torch.Tensor] = {}
    used, missing = set(), []
    for key, shape in _our_shapes(cfg).items():
        src = _source_key(key, state) if cfg.attention == "plain" else key
        if src not in state:
            missing.append(key)
            continue
        t = state[src]
        used.add(src)
        if key == "class_embedding.weight" and t.shape == (shape[0] - 1, shape[1]):
            t = torch.cat([t, t.new_zeros(1, shape[1])])  # null class: adds nothing
        elif _is_projection(key, cfg) and t.shape == (*shape, 1, 1):
            t = t.reshape(shape)  # SD 1.x 1x1 conv -> Linear
        if t.shape != shape:
            raise UnsupportedModel(f"diffusers {cls} tensor {src} has shape {tuple(t.shape)}, the config gives "
                                   f"{tuple(shape)}")
        out[key] = t
    if missing:
        raise UnsupportedModel(f"diffusers {cls} state lacks {len(missing)} tensors its config needs: {_few(missing)}")
    unused = [k for k in state if k not in used]
    if unused:
        raise UnsupportedModel(f"diffusers {cls} state has {len(unused)} tensors its config does not explain: "
                               f"{_few(unused)}")
    return out


def unet_state_to_diffusers(state: Mapping[str, torch.Tensor], cfg: UNetConfig) -> dict[str, torch.Tensor]:
    """Our ``UNet(cfg).state_dict()`` -> the state dict of the diffusers model of :func:`unet_config_to_diffusers`
    (renames and views). The null-class row of the class embedding is dropped and must be zero."""
    cls = _diffusers_class(cfg)
    shapes = _our_shapes(cfg)
    missing, extra = [k for k in shapes if k not in state], [k for k in state if k not in shapes]
    if missing or extra:
        raise ValueError(f"state does not match the U-Net config: missing {_few(missing) or 'none'}, "
                         f"unexpected {_few(extra) or 'none'}")
    out: dict[str, torch.Tensor] = {}
    for key, shape in shapes.items():
        t = state[key]
        if t.shape != shape:
            raise ValueError(f"tensor {key} has shape {tuple(t.shape)}, the U-Net config gives {tuple(shape)}")
        if key == "class_embedding.weight":
            if bool(t[-1].any()):
                raise UnsupportedModel(f"class_embedding row {cfg.num_classes} (the null class for guidance) is non-zero "
                                       f"and diffusers' {cls} has no null class; zero that row to export without it")
            t = t[:-1]
        elif _is_projection(key, cfg) and not cfg.head_dim:
            t = t[:, :, None, None]  # Linear -> SD 1.x 1x1 conv (use_linear_projection=False on export)
        out[key] = t
    return out


__all__ = ["unet_config_from_diffusers", "unet_config_to_diffusers", "unet_state_from_diffusers",
           "unet_state_to_diffusers"]
