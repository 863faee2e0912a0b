"""Networks: U-Net and DiT backbones ``F(x_in, c_noise, cond)`` and the factory that rebuilds them
from a model folder's plain-JSON config (checked keys; no exec, no class names in strings).

    cfg = backbone_preset("unet", "small", num_classes=10)
    model = build_backbone("unet", config_to_dict(cfg))     # same network, e.g. from config.json
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from .dit import DIT_PRESETS, DiT, DiTConfig
from .unet import UNET_PRESETS, UNet, UNetConfig

BackboneConfig = UNetConfig | DiTConfig

_KINDS: dict[str, tuple[type, type, dict]] = {
    "unet": (UNetConfig, UNet, UNET_PRESETS),
    "dit": (DiTConfig, DiT, DIT_PRESETS),
}


def _kind(kind: str) -> tuple[type, type, dict]:
    if kind not in _KINDS:
        raise ValueError(f"unknown backbone kind {kind!r}; use one of {sorted(_KINDS)}")
    return _KINDS[kind]


def backbone_config_from_dict(kind: str, config: dict[str, Any]) -> BackboneConfig:
    """A config dataclass from plain data; an unknown key raises ValueError naming it. Lists become tuples."""
    cls = _kind(kind)[0]
    if not isinstance(config, dict):
        raise ValueError(f"backbone config must be a dict, got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(cls)}
    for key in config:
        if key not in fields:
            raise ValueError(f"unknown {kind} config key {key!r}; known keys: {', '.join(sorted(fields))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return cls(**values)


def config_to_dict(config: BackboneConfig) -> dict[str, Any]:
    """Plain JSON-able dict of a backbone config (tuples become lists)."""
    if not isinstance(config, (UNetConfig, DiTConfig)):
        raise ValueError(f"not a backbone config: {type(config).__name__}")
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


to_dict = config_to_dict


def backbone_kind(config_or_model: BackboneConfig | nn.Module) -> str:
    """'unet' or 'dit' for a config or a built backbone."""
    cfg = getattr(config_or_model, "config", config_or_model)
    for kind, (cls, _, _) in _KINDS.items():
        if isinstance(cfg, cls):
            return kind
    raise ValueError(f"not a backbone or backbone config: {type(config_or_model).__name__}")


def backbone_preset(kind: str, name: str, **overrides: Any) -> BackboneConfig:
    """A named size preset with checked overrides, e.g. ``backbone_preset('unet', 'small', num_classes=10)``."""
    presets = _kind(kind)[2]
    if name not in presets:
        raise ValueError(f"unknown {kind} preset {name!r}; known: {', '.join(presets)}")
    return backbone_config_from_dict(kind, {**config_to_dict(presets[name]), **overrides})


def build_backbone(kind: str, config: dict[str, Any] | BackboneConfig) -> nn.Module:
    """Build a 'unet' or 'dit' backbone from a plain dict (checked keys) or a config dataclass."""
    cfg_cls, model_cls, _ = _kind(kind)
    if isinstance(config, dict):
        config = backbone_config_from_dict(kind, config)
    if not isinstance(config, cfg_cls):
        raise ValueError(f"backbone kind {kind!r} needs a {cfg_cls.__name__}, got {type(config).__name__}")
    return model_cls(config)


__all__ = [
    "UNet", "UNetConfig", "UNET_PRESETS", "DiT", "DiTConfig", "DIT_PRESETS", "BackboneConfig",
    "build_backbone", "backbone_config_from_dict", "config_to_dict", "to_dict", "backbone_kind", "backbone_preset",
]
