"""Typed, frozen configuration: model, noise levels, loss, training; named presets; checked overrides.

A run is configured by a :class:`RunConfig` built from a named preset and ``key=value``
overrides with dotted, checked keys (``train.lr=1e-4``, ``model.backbone_config.model_channels=64``).
Values are parsed by the type of the field they replace. No exec, no class names in strings.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from .fastpath import PRECISIONS
from .losses import LossConfig
from .noise_levels import NoiseLevels

CONDITIONINGS = ("none", "class", "text")


@dataclass(frozen=True)
class ModelConfig:
    """What a model is: backbone, parameterization, conditioning, image format."""

    backbone: str = "unet"  # unet | dit
    backbone_config: dict[str, Any] = field(default_factory=dict)  # checked by diffuse.nn.build_backbone
    precond: str = "edm"  # edm | eps | x0 | v | flow | discrete (a DDPM-table model: see noise_table)
    noise_table: dict[str, Any] = field(default_factory=dict)  # discrete only: diffuse.schedules.table_betas
    sigma_data: float = 0.5
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    conditioning: str = "none"  # none | class | text
    num_classes: int = 0
    text_encoder: str = "builtin"
    text_config: dict[str, Any] = field(default_factory=dict)
    channels: int = 3  # channels the denoiser works on (latent channels for a latent model)
    image_size: int = 32  # side the denoiser works on (latent side for a latent model)
    codec: str = ""  # "" = pixels; else a VAE folder: a path when training, "vae" (inside the model folder) once exported
    # an inpainting model: the backbone also sees [mask, masked image] (backbone_config.concat_channels = 1 + channels;
    # see diffuse.masks), trained on random masks
    inpainting: bool = False

    def __post_init__(self) -> None:
        if self.conditioning not in CONDITIONINGS:
            raise ValueError(f"unknown conditioning {self.conditioning!r}; use one of: {', '.join(CONDITIONINGS)}")
        if self.conditioning == "class" and self.num_classes < 1:
            raise ValueError("class conditioning needs model.num_classes >= 1")
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {self.sigma_min}, {self.sigma_max}")
        from .nn import backbone_config_from_dict, config_to_dict  # lazy: diffuse.nn is heavy

        # stored complete, with the backbone's defaults filled in and its keys checked, so a config saved before a
        # backbone field was added reads back equal to one written today
        object.__setattr__(self, "backbone_config",
                           config_to_dict(backbone_config_from_dict(self.backbone, self.backbone_config)))
        concat = self.backbone_config.get("concat_channels", 0)
        if self.inpainting and concat != self.channels + 1:
            raise ValueError(f"an inpainting model's backbone also takes the mask and the masked image: set "
                             f"model.backbone_config.concat_channels={self.channels + 1} (1 + model.channels), not {concat}")
        if concat and not self.inpainting:
            raise ValueError(f"model.backbone_config.concat_channels={concat} is the extra input of an inpainting model; "
                             f"set model.inpainting=true too (with concat_channels = 1 + model.channels)")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: data, optimizer, schedule, precision, bookkeeping."""

    data: str = "shapes"  # shapes | digits | folder:PATH
    dataset_size: int = 0  # shapes: number of distinct rendered examples (0 = dataset default)
    # shapes: {family: weight} to draw caption families in those proportions (empty = all families uniformly)
    family_weights: dict[str, float] = field(default_factory=dict)
    batch_size: int = 32  # global batch per optimizer step (split over processes and accumulation)
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    warmup_steps: int = 100
    max_steps: int = 1000
    grad_clip: float = 1.0
    ema_halflife_nimg: float = 20_000.0
    ema_rampup_ratio: float = 0.05
    # auto | fp32 | bf16 (autocast; fp16 is never used on CPU). A new run stores what auto resolved to:
    # bf16 where the hardware multiplies it natively, else fp32 (diffuse.fastpath.resolve_precision)
    precision: str = "auto"
    compile: bool = False  # torch.compile the backbone: +1-8% images/s for 86-102 s of compiling (bench/RESULTS.md)
    cond_dropout: float = 0.1
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 200
    sample_every: int = 500
    keep_checkpoints: int = 2
    max_bad_steps: int = 20
    skip_bad_files: bool = False
    eval_every: int = 0  # FID (+ adherence for shapes text models) of the EMA weights every K steps; 0 = off
    eval_n: int = 256  # images for that FID, against the first eval_n training images
    eval_steps: int = 10  # dpmpp_2m steps per evaluation image
    eval_cfg: float = 2.0  # guidance scale of evaluation images (conditional models)
    eval_adherence_per_family: int = 8  # shapes text models: adherence prompts per family
    init_from: str = ""  # a model folder (or shipped model name) whose weights a new run starts from: fine-tuning

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"unknown precision {self.precision!r}; use auto, fp32 or bf16 (fp16 is not supported: it is "
                             f"~200x slower on CPU)")
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "checkpoint_every", "sample_every", "keep_checkpoints", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        if self.eval_every < 0 or self.eval_adherence_per_family < 0:
            raise ValueError("train.eval_every and train.eval_adherence_per_family must be >= 0 (0 = off)")
        if self.eval_n < 4 or self.eval_steps < 1:
            raise ValueError(f"train.eval_n must be >= 4 (precision/recall uses 3 neighbours) and train.eval_steps >= 1, "
                             f"got {self.eval_n}, {self.eval_steps}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"train.batch_size {self.batch_size} is not divisible by train.grad_accum {self.grad_accum}")
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"train.cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.lr <= 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if self.family_weights:
            from .shapes import FAMILIES

            if self.data != "shapes":
                raise ValueError(f"train.family_weights applies to the shapes data only, not {self.data!r}")
            unknown = sorted(set(self.family_weights) - set(FAMILIES))
            if unknown:
                raise ValueError(f"train.family_weights: unknown family {unknown[0]!r}; known: {', '.join(FAMILIES)}")
            weights = list(self.family_weights.values())
            if not all(isinstance(w, (int, float)) and not isinstance(w, bool) and w >= 0 for w in weights) or not any(weights):
                raise ValueError(f"train.family_weights must be numbers >= 0, at least one > 0; got {self.family_weights}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run needs."""

    model: ModelConfig = field(default_factory=ModelConfig)
    noise: NoiseLevels = field(default_factory=NoiseLevels)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        unknown = sorted(set(data) - set(SECTIONS))
        if unknown:
            raise ValueError(f"unknown config section {unknown[0]!r}; valid sections: {', '.join(SECTIONS)}")
        return cls(**{name: _build(section, data.get(name, {}), name) for name, section in SECTIONS.items()})


SECTIONS: dict[str, type] = {"model": ModelConfig, "noise": NoiseLevels, "loss": LossConfig, "train": TrainConfig}


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config key {prefix}.{unknown[0]}; valid keys: {', '.join(sorted(known))}")
    return cls(**data)


def _parse_value(text: str, current: Any, key: str) -> Any:
    """Parse ``text`` as the type of ``current`` (the value it replaces)."""
    try:
        if isinstance(current, bool):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        return json.loads(text)
    except ValueError:
        kind = type(current).__name__ if current is not None else "JSON"
        raise ValueError(f"--set {key}={text}: expected a value of type {kind}") from None


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply ``section.key=value`` (or ``section.dict_field.key=value``) overrides with checked keys."""
    data = cfg.to_dict()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-4")
        path = key.strip().split(".")
        node: Any = data
        for depth, part in enumerate(path[:-1]):
            if not isinstance(node, dict) or part not in node:
                valid = ", ".join(sorted(node)) if isinstance(node, dict) else "none"
                raise ValueError(f"unknown config key {'.'.join(path[:depth + 1])}; valid keys here: {valid}")
            node = node[part]
        leaf = path[-1]
        in_free_dict = len(path) > 2  # e.g. model.backbone_config.X: checked by the backbone factory
        if leaf not in node and not in_free_dict:
            raise ValueError(f"unknown config key {key}; valid keys here: {', '.join(sorted(node))}")
        node[leaf] = _parse_value(text.strip(), node.get(leaf), key)
    return RunConfig.from_dict(data)


# ---------------------------------------------------------------- presets

def _unet(name: str, **overrides: Any) -> dict[str, Any]:
    from .nn import backbone_preset, config_to_dict

    return config_to_dict(backbone_preset("unet", name, **overrides))


def _dit(name: str, **overrides: Any) -> dict[str, Any]:
    from .nn import backbone_preset, config_to_dict

    return config_to_dict(backbone_preset("dit", name, **overrides))


TEXT_SMALL = {"dim": 128, "depth": 2, "num_heads": 4}


def presets() -> dict[str, RunConfig]:
    """Named starting points for ``diffuse train --preset NAME``."""
    return {
        # seconds on a CPU: a class-conditional U-Net on 16x16 digits, for tests and smoke runs
        "tiny": RunConfig(
            model=ModelConfig(backbone_config=_unet("tiny", in_channels=1, out_channels=1, num_classes=10),
                              conditioning="class", num_classes=10, channels=1, image_size=16),
            train=TrainConfig(data="digits", batch_size=16, max_steps=50, warmup_steps=10, lr=1e-3, log_every=5,
                              checkpoint_every=25, sample_every=50, ema_halflife_nimg=500.0, precision="fp32"),
        ),
        # the shipped class-conditional digits model: real scikit-learn digits at 16x16
        "digits": RunConfig(
            model=ModelConfig(backbone_config=_unet("small", image_size=16, in_channels=1, out_channels=1, num_classes=10,
                                                    model_channels=32, channel_mult=[1, 2, 2], num_res_blocks=1,
                                                    attention_resolutions=[8], norm_groups=16),
                              conditioning="class", num_classes=10, channels=1, image_size=16),
            train=TrainConfig(data="digits", batch_size=64, max_steps=3000, warmup_steps=200, lr=4e-4,
                              checkpoint_every=250, sample_every=1000, ema_halflife_nimg=50_000.0),
        ),
        # the shipped text-to-image model: the shapes world at 32x32 with the built-in text encoder
        # (one residual block per level: on a 2-core CPU more images beat more depth, see bench/RESULTS.md)
        "shapes-t2i": RunConfig(
            model=ModelConfig(backbone_config=_unet("small", num_res_blocks=1, text_dim=TEXT_SMALL["dim"]), conditioning="text",
                              text_config=dict(TEXT_SMALL)),
            train=TrainConfig(data="shapes", dataset_size=1_000_000, batch_size=64, max_steps=8000, warmup_steps=300, lr=5e-4,
                              checkpoint_every=250, sample_every=500, ema_halflife_nimg=25_000.0),
        ),
        # latent diffusion on the shapes world at 64x64: a factor-4 VAE (train it first with
        # `diffuse train-vae --preset vae-shapes-f4 --export models/vae-shapes`) gives 16x16x4 latents
        "latent-shapes-t2i": RunConfig(
            model=ModelConfig(backbone_config=_unet("small", image_size=16, in_channels=4, out_channels=4, num_res_blocks=1,
                                                    attention_resolutions=[8], text_dim=TEXT_SMALL["dim"]),
                              conditioning="text", text_config=dict(TEXT_SMALL), channels=4, image_size=16,
                              sigma_data=1.0, codec="models/vae-shapes"),
            train=TrainConfig(data="shapes", dataset_size=1_000_000, batch_size=64, max_steps=8000, warmup_steps=300, lr=5e-4,
                              checkpoint_every=250, sample_every=500, ema_halflife_nimg=25_000.0),
        ),
        # your own images in pixels: an unconditional U-Net at 32x32 RGB (--set train.data=folder:PATH; a folder
        # of mixed sizes is resized and center-cropped)
        "folder": RunConfig(
            model=ModelConfig(backbone_config=_unet("small", num_res_blocks=1), channels=3, image_size=32),
            train=TrainConfig(data="folder:images", batch_size=32, max_steps=5000, warmup_steps=200, lr=3e-4,
                              checkpoint_every=250, sample_every=500, ema_halflife_nimg=20_000.0),
        ),
        # latent diffusion on an image folder (--set train.data=folder:PATH) with a factor-8 VAE at 64x64 (8x8x4 latents)
        "latent-folder": RunConfig(
            model=ModelConfig(backbone_config=_unet("small", image_size=8, in_channels=4, out_channels=4, channel_mult=[1, 2],
                                                    num_res_blocks=2, attention_resolutions=[4]),
                              channels=4, image_size=8, sigma_data=1.0, codec="models/vae-folder"),
            train=TrainConfig(data="folder:images", batch_size=32, max_steps=10_000, warmup_steps=300, lr=2e-4,
                              checkpoint_every=250, sample_every=500, ema_halflife_nimg=25_000.0),
        ),
        # inpainting: the shipped shapes model fine-tuned to also see [mask, masked image] (diffuse.masks); its new input
        # channels start at zero, so it begins as the shapes model exactly
        "shapes-inpaint": RunConfig(
            model=ModelConfig(backbone_config=_unet("small", num_res_blocks=1, text_dim=TEXT_SMALL["dim"], concat_channels=4,
                                                    position_embedding="sincos"),
                              conditioning="text", text_config=dict(TEXT_SMALL), inpainting=True),
            train=TrainConfig(data="shapes", dataset_size=1_000_000, batch_size=64, max_steps=1500, warmup_steps=100, lr=2e-4,
                              checkpoint_every=250, sample_every=500, ema_halflife_nimg=25_000.0, init_from="shapes"),
        ),
        # a diffusion transformer on the same task (adaLN-Zero, cross-attention to text)
        "shapes-dit": RunConfig(
            model=ModelConfig(backbone="dit", backbone_config=_dit("small", text_dim=TEXT_SMALL["dim"]), conditioning="text",
                              text_config=dict(TEXT_SMALL)),
            train=TrainConfig(data="shapes", batch_size=64, max_steps=20_000, warmup_steps=500, lr=2e-4,
                              checkpoint_every=250, sample_every=1000, ema_halflife_nimg=100_000.0),
        ),
    }


def preset(name: str) -> RunConfig:
    """Look up a preset by name, with a clear error listing the known ones."""
    known = presets()
    if name not in known:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(known)}")
    return known[name]
