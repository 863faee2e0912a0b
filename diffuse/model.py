"""A diffusion model: the preconditioned backbone (the denoiser D) plus its conditioner.

``DiffusionModel`` is itself a Denoiser, ``model(x, sigma, cond) -> denoised``, and turns
user-level conditions (prompts, class labels) into the backbone's ``cond`` dict with
:meth:`condition`. It is rebuilt from a :class:`~diffuse.config.ModelConfig` alone, so a
model folder (``config.json`` + ``model.safetensors``) is everything needed to load it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from . import checkpoint, fastpath
from .config import ModelConfig
from .nn import build_backbone
from .precond import make_precond
from .text import build_text_encoder


META_BUILD_BYTES = 64 * 2**20  # weights files above this size are loaded into a model built on the meta device


class DiffusionModel(nn.Module):
    """Denoiser D(x, sigma, cond) with its text encoder (if any) and null condition."""

    def __init__(self, cfg: ModelConfig, root: Optional[Path] = None):
        """``root``: the model folder, against which the config's relative paths (a CLIP tokenizer) resolve."""
        super().__init__()
        self.cfg = cfg
        self.root = root
        backbone = build_backbone(cfg.backbone, cfg.backbone_config)
        with torch.device("cpu"):  # a discrete model's noise table is computed, never stored: not on the meta device
            self.denoiser = make_precond(cfg.precond, backbone, noise_table=cfg.noise_table, sigma_data=cfg.sigma_data,
                                         sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max)
        self.text_encoder = build_text_encoder(cfg.text_encoder, cfg.text_config, root) if cfg.conditioning == "text" else None
        self.precision = "fp32"  # sampling: fp32, or bf16 (the backbone under autocast); see set_fast_path
        self.channels_last = False
        self.compiled = False
        self._compiled_denoise: Optional[Callable] = None

    @property
    def sigma_min(self) -> float:
        return self.denoiser.sigma_min  # the config's, or a discrete model's table's

    @property
    def sigma_max(self) -> float:
        return self.denoiser.sigma_max

    def size_factor(self) -> Optional[int]:
        """Sizes this backbone can make besides its native one are multiples of this (None: native only)."""
        if self.cfg.backbone == "unet":
            return 2 ** (len(self.cfg.backbone_config["channel_mult"]) - 1)
        return None

    def set_fast_path(self, precision: str = "fp32", *, channels_last: bool = False, compile: bool = False) -> None:
        """How forward runs: ``precision`` fp32 or bf16 (resolved, see :func:`diffuse.fastpath.resolve_precision`);
        ``channels_last``: convolution weights and activations in NHWC memory order; ``compile``: through
        torch.compile (compiled on the first call, cached on disk)."""
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"a model runs in fp32 or bf16, got {precision!r} (resolve 'auto' first)")
        if precision == "fp32":  # a backbone kept in bf16 by load(keep_bf16=True) computes in float32 from now on
            self.denoiser.backbone.float()
        self.precision, self.channels_last, self.compiled = precision, bool(channels_last), bool(compile)
        self._compiled_denoise = None  # a graph traced under the old settings is not reused
        self.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)  # 4-d weights only

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        if not self.compiled:
            return self.denoise(x, sigma, cond)
        if self._compiled_denoise is None:
            self._compiled_denoise = fastpath.compile_denoiser(self.denoise)
        return self._compiled_denoise(x, sigma, cond)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None) -> torch.Tensor:
        """D(x, sigma, cond) [B, ...] float32, contiguous, at ``self.precision``: with bf16 the backbone runs
        under autocast, the preconditioning around it stays float32. With fp32 no autocast is entered (a
        caller's own applies)."""
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.precision == "bf16":
            with torch.autocast(x.device.type, dtype=torch.bfloat16):
                return self.denoiser(x, sigma, cond).contiguous()
        return self.denoiser(x, sigma, cond).contiguous()

    # ------------------------------------------------------------ conditions

    def condition(self, *, prompts: Optional[Sequence[str]] = None, labels: Optional[Sequence[int] | torch.Tensor] = None,
                  windows: int = 1, concat: Optional[torch.Tensor] = None) -> Optional[dict[str, torch.Tensor]]:
        """The backbone's cond dict for prompts (text models) or class labels (class models).

        An empty prompt "" and the label ``num_classes`` are the null condition used for
        classifier-free guidance. ``windows``: text encoded in this many windows (a CLIP encoder's long
        prompts, :meth:`text_windows`); other encoders have one. ``concat``: an inpainting model's
        [mask, masked image] (:func:`diffuse.masks.inpaint_concat`), required by such a model and refused by others.
        """
        if self.cfg.inpainting and concat is None:
            raise ValueError("this is an inpainting model: it needs the mask and the masked image (diffuse.masks.inpaint_concat; "
                             "diffuse.masks.replace_all to generate without a picture)")
        if concat is not None and not self.cfg.inpainting:
            raise ValueError("a mask and masked image (concat) are the input of an inpainting model; this model is not one")
        cond = self._condition(prompts, labels, windows)
        return cond if concat is None else {**(cond or {}), "concat": concat}

    def _condition(self, prompts: Optional[Sequence[str]], labels: Optional[Sequence[int] | torch.Tensor],
                   windows: int) -> Optional[dict[str, torch.Tensor]]:
        kind = self.cfg.conditioning
        device = next(self.parameters()).device
        if kind == "none":
            if prompts is not None or labels is not None:
                raise ValueError("this model is unconditional; it takes no prompt and no class label")
            return None
        if kind == "class":
            if prompts is not None and any(p for p in prompts):
                raise ValueError("this model is class-conditional; give a class label (--class N) instead of a prompt")
            if labels is None:
                raise ValueError(f"this model is class-conditional; give a class label in 0..{self.cfg.num_classes - 1}")
            labels = torch.as_tensor(labels, dtype=torch.long, device=device).reshape(-1)
            bad = labels[(labels < 0) | (labels > self.cfg.num_classes)]
            if bad.numel():
                raise ValueError(f"class label {int(bad[0])} is out of range; this model knows classes 0..{self.cfg.num_classes - 1}")
            return {"class_labels": labels}
        if labels is not None:
            raise ValueError("this model is text-conditional; give a prompt instead of a class label")
        if prompts is None:
            raise ValueError("this model is text-conditional; give a prompt")
        assert self.text_encoder is not None
        if windows != 1:
            return self.text_encoder.encode(list(prompts), windows=windows)
        return self.text_encoder.encode(list(prompts))

    def text_windows(self, *prompt_lists: Optional[Sequence[str]]) -> int:
        """The text windows that the longest prompt of all the lists needs (1 unless a CLIP prompt is long)."""
        if self.text_encoder is None:
            return 1
        return self.text_encoder.num_windows([p for prompts in prompt_lists if prompts for p in prompts])

    def null_condition(self, batch: int, windows: int = 1, concat: Optional[torch.Tensor] = None) -> Optional[dict[str, torch.Tensor]]:
        """The unconditional condition for ``batch`` images (empty prompt / null class; an inpainting model keeps its
        ``concat`` input, as in SD-inpainting's guidance)."""
        if self.cfg.conditioning == "class":
            return self.condition(labels=[self.cfg.num_classes] * batch, concat=concat)
        if self.cfg.conditioning == "text":
            return self.condition(prompts=[""] * batch, windows=windows, concat=concat)
        return self.condition(concat=concat)

    # ------------------------------------------------------------ files

    def save(self, out: Path, *, weights: Optional[dict[str, torch.Tensor]] = None, extra: Optional[dict[str, Any]] = None,
             overwrite: bool = False, dtype: Optional[torch.dtype] = None) -> Path:
        """Write a model folder (``weights`` defaults to this module's state)."""
        config = {"model": dataclasses.asdict(self.cfg), **(extra or {})}
        return checkpoint.save_model_dir(Path(out), config, weights if weights is not None else self.state_dict(),
                                         overwrite=overwrite, dtype=dtype)

    @classmethod
    def load(cls, path: Path, keep_bf16: bool = False) -> tuple["DiffusionModel", dict[str, Any]]:
        """Rebuild a model from its folder; returns the model (eval mode) and its full config dict.

        Weights are read lazily from ``model.safetensors`` straight into the modules (the network is
        built on the meta device and nothing is initialized first), so a model costs its own size in
        memory once. Weights are float32, except that with ``keep_bf16`` a backbone stored in bfloat16
        stays bfloat16: half the memory, and the same outputs at bf16 precision (autocast would round its
        float32 copy to the same bf16 values; :meth:`set_fast_path` upcasts it for fp32).
        """
        from .convert.io import open_weights

        path = Path(path)
        config = checkpoint.load_model_config(path)
        try:
            cfg = ModelConfig(**config["model"])
        except (KeyError, TypeError) as e:
            raise checkpoint.CheckpointError(f"{path}/config.json does not describe a diffuse model ({e})") from None
        file = checkpoint.weights_file(path)
        weights = open_weights(file)
        # a large model is built on the meta device (no memory, no initialization before its weights arrive); a small
        # one on the CPU, where initializing costs less than the meta device's first use (torch then imports its
        # compiler stack: 2.5 s measured, most of a cold `diffuse generate`)
        with torch.device("meta" if file.stat().st_size > META_BUILD_BYTES else "cpu"):
            model = cls(cfg, root=path)
        checkpoint.check_shapes(path, model.state_dict(), weights.shapes())

        def dtype(key: str, tensor: torch.Tensor) -> torch.dtype:
            keep = keep_bf16 and tensor.dtype == torch.bfloat16 and key.startswith("denoiser.backbone.")
            return torch.bfloat16 if keep else torch.float32

        state = {k: (t.to(dtype(k, t)) if t.is_floating_point() else t) for k, t in ((k, weights[k]) for k in weights)}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise checkpoint.CheckpointError(
                f"{path}/model.safetensors does not match its config: {len(missing)} missing and "
                f"{len(unexpected)} unexpected tensors (e.g. {(missing or unexpected)[0]!r})")
        model.materialize_buffers()
        return model.eval(), config

    def materialize_buffers(self) -> None:
        """Recompute the buffers that are not stored in a model folder (left on the meta device by
        :meth:`load`) from a freshly built twin on the CPU: they depend on the config alone."""
        left = {name for name, b in self.named_buffers() if b.is_meta}
        if not left:
            return
        fresh = dict(type(self)(self.cfg, self.root).named_buffers())
        for name in left:
            owner, _, attr = name.rpartition(".")
            self.get_submodule(owner).register_buffer(attr, fresh[name], persistent=False)
