"""``train_vae(cfg, run_dir)``: train the KL autoencoder of :mod:`diffuse.nn.vae` with the trainer's
conventions (run folder with config.json, atomic checkpoints, metrics.csv, loss.png, resume),
then ``export_vae`` writes a VAE folder whose latent scale/shift are measured on the data.

The learning-rate schedule, data order, metrics log and checkpoint format are those of
:mod:`diffuse.train`; only the model and the loss differ.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import checkpoint
from .codec import VAECodec, latent_stats
from .config import TrainConfig
from .data import make_dataset
from .nn.vae import VAE, VAEConfig, psnr, vae_loss
from .plot import image_grid, to_uint8
from .train import METRICS, RUN_CONFIG, MetricsLog, TrainingError, TrainResult, batch_indices, learning_rate, run_config

STEMS = ("model", "optimizer", "rng")
TERMS = ("rec", "kl", "edge")


@dataclass(frozen=True)
class VAERunConfig:
    """A VAE training run: network, image size, loss weights, and the trainer's TrainConfig."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    image_size: int = 64
    kl_weight: float = 1e-6
    edge_weight: float = 0.5
    stats_images: int = 512  # images whose latents set the exported scale/shift
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {"vae": self.vae.to_dict(), "image_size": self.image_size, "kl_weight": self.kl_weight,
                "edge_weight": self.edge_weight, "stats_images": self.stats_images, "train": dataclasses.asdict(self.train)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VAERunConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VAE run config key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        return cls(**{**data, "vae": VAEConfig.from_dict(data.get("vae", {})), "train": TrainConfig(**data.get("train", {}))})


def vae_presets() -> dict[str, VAERunConfig]:
    """Named starting points for ``diffuse train-vae --preset NAME``."""
    fast = dict(precision="fp32", lr=1e-3, warmup_steps=20, min_lr_ratio=0.1, cond_dropout=0.0)
    return {
        # seconds: for tests and smoke runs
        "vae-tiny": VAERunConfig(vae=VAEConfig(base_channels=8, channel_mult=(1, 2, 2), norm_groups=4), image_size=16,
                                 stats_images=64, train=TrainConfig(data="shapes", dataset_size=64, batch_size=8, max_steps=40,
                                                                    log_every=5, checkpoint_every=20, sample_every=40, **fast)),
        # factor 4 on the shapes world at 64x64: latents 16x16x4 (for the latent-shapes-t2i preset)
        "vae-shapes-f4": VAERunConfig(vae=VAEConfig(base_channels=32, channel_mult=(1, 2, 2)), image_size=64,
                                      train=TrainConfig(data="shapes", dataset_size=100_000, batch_size=16, max_steps=3000,
                                                        log_every=10, checkpoint_every=200, sample_every=500, **fast)),
        # factor 8 for image folders (set --data folder:PATH)
        "vae-folder-f8": VAERunConfig(vae=VAEConfig(base_channels=32, channel_mult=(1, 2, 2, 4)), image_size=64,
                                      train=TrainConfig(data="folder:images", batch_size=16, max_steps=5000, log_every=10,
                                                        checkpoint_every=200, sample_every=500, **fast)),
    }


def vae_preset(name: str) -> VAERunConfig:
    known = vae_presets()
    if name not in known:
        raise ValueError(f"unknown VAE preset {name!r}; known VAE presets: {', '.join(known)}")
    return known[name]


def _dataset(cfg: VAERunConfig) -> Any:
    options: dict[str, Any] = {}
    if cfg.train.data == "shapes" and cfg.train.dataset_size:
        options["length"] = cfg.train.dataset_size
    return make_dataset(cfg.train.data, cfg.image_size, **options)


def load_initial_vae(vae: VAE, cfg: VAERunConfig, log: Callable[[str], None]) -> None:
    """``train.init_from=FOLDER``: continue training a VAE folder's weights (e.g. a longer run of an exported VAE) in a
    new run. The folder's network must be this run's (same VAE config); the optimizer starts fresh."""
    source = cfg.train.init_from
    try:
        codec = VAECodec.load(Path(source))
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        raise TrainingError(f"train.init_from={source!r}: {e}") from None
    if codec.vae.cfg != cfg.vae:
        raise TrainingError(f"train.init_from={source!r}: its VAE config differs from this run's vae section; it is another "
                            f"architecture (start from the preset it was trained with)")
    vae.load_state_dict(codec.vae.state_dict())
    log(f"train.init_from: the VAE weights of {source}")


def train_vae(cfg: Optional[VAERunConfig], run_dir: Path, *, resume: bool = False, max_steps: Optional[int] = None,
              log: Callable[[str], None] = print) -> TrainResult:
    """Train a new VAE run in ``run_dir`` (or resume it from its newest checkpoint and saved config)."""
    run_dir = Path(run_dir)
    cfg, found = run_config(run_dir, cfg, resume, VAERunConfig.from_dict)
    if max_steps is not None:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=max_steps))
    t = cfg.train
    dataset = _dataset(cfg)
    if dataset.channels != cfg.vae.in_channels:
        raise TrainingError(f"dataset has {dataset.channels} channels but vae.in_channels is {cfg.vae.in_channels}")
    if cfg.image_size % cfg.vae.factor:
        raise ValueError(f"image_size {cfg.image_size} is not divisible by the VAE factor {cfg.vae.factor}")

    torch.manual_seed(t.seed)
    vae = VAE(cfg.vae)
    if t.init_from and not resume:
        load_initial_vae(vae, cfg, log)
    run_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused train.init_from leaves no run folder behind
    checkpoint.atomic_write_json(run_dir / RUN_CONFIG, cfg.to_dict())
    opt = torch.optim.AdamW(vae.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(t.seed + 1)
    step, nimg, bad = 0, 0, 0
    if resume:
        tensors, state = checkpoint.load_checkpoint(found[-1], STEMS)
        vae.load_state_dict(tensors["model"])
        opt.load_state_dict(checkpoint.unflatten_optimizer(tensors["optimizer"], state["optimizer"]))
        torch.set_rng_state(tensors["rng"]["torch"])
        gen.set_state(tensors["rng"]["train_generator"])
        step, nimg, bad = state["step"], state["nimg"], state["bad_steps"]
        log(f"resumed {run_dir} at step {step} from {found[-1].name}")
    metrics = MetricsLog(run_dir / METRICS, [f"loss_{k}" for k in TERMS], step)

    def save() -> None:
        opt_tensors, opt_rest = checkpoint.flatten_optimizer(opt.state_dict())
        checkpoint.save_checkpoint(run_dir, step, {"model": vae.state_dict(), "optimizer": opt_tensors,
                                                   "rng": {"torch": torch.get_rng_state(), "train_generator": gen.get_state()}},
                                   {"step": step, "nimg": nimg, "bad_steps": bad, "optimizer": opt_rest}, keep=t.keep_checkpoints)

    vae.train()
    window_t, window_img, loss = time.perf_counter(), 0, float("nan")
    while step < t.max_steps:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg)
        totals = {k: 0.0 for k in ("loss", *TERMS)}
        for micro in range(t.grad_accum):
            x = torch.stack([dataset[i]["image"] for i in batch_indices(step, micro, cfg, len(dataset))])
            terms = vae_loss(vae, x, kl_weight=cfg.kl_weight, edge_weight=cfg.edge_weight, generator=gen)
            (terms["loss"].mean() / t.grad_accum).backward()
            for k in totals:
                totals[k] += float(terms[k].detach().mean()) / t.grad_accum
        grad_norm = float(nn.utils.clip_grad_norm_(vae.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf")))
        step += 1
        loss = totals["loss"]
        if math.isfinite(loss) and math.isfinite(grad_norm):
            opt.step()
            nimg += t.batch_size
        else:
            bad += 1
        opt.zero_grad(set_to_none=True)
        window_img += t.batch_size
        if step % t.log_every == 0 or step == t.max_steps:
            img_s = window_img / max(time.perf_counter() - window_t, 1e-9)
            window_t, window_img = time.perf_counter(), 0
            metrics.write({"step": step, "nimg": nimg, "loss": loss, "lr": learning_rate(step - 1, cfg), "grad_norm": grad_norm,
                           "img_per_s": img_s, "bad_steps": bad, **{f"loss_{k}": totals[k] for k in TERMS}})
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            save()
        if step % t.sample_every == 0 or step == t.max_steps:
            write_reconstructions(run_dir, step, vae, dataset)
            metrics.plot(run_dir / "loss.png")
    return TrainResult(step, run_dir, loss, bad)


@torch.no_grad()
def write_reconstructions(run_dir: Path, step: int, vae: VAE, dataset: Any, n: int = 8) -> tuple[Path, float]:
    """Save ``samples/step-XXXXXXXX.png``: the first n dataset images (top row) and their reconstructions
    from the posterior mean (bottom row); returns the path and their PSNR."""
    was_training = vae.training
    vae.eval()
    x = torch.stack([dataset[i]["image"] for i in range(min(n, len(dataset)))])
    recon = vae.decode(vae.encode(x).mean).clamp(-1, 1)
    vae.train(was_training)
    out = run_dir / "samples" / f"{checkpoint.checkpoint_name(step)}.png"
    out.parent.mkdir(exist_ok=True)
    image_grid(to_uint8(torch.cat([x, recon])), columns=len(x), scale=max(1, 128 // x.shape[-1])).save(out)
    return out, psnr(recon, x)


def export_vae(run_dir: Path, out: Path, *, overwrite: bool = False) -> tuple[Path, dict[str, float]]:
    """Write a VAE folder from a run's newest checkpoint; scale/shift come from the latents of the first
    ``stats_images`` training images. Returns the folder and {"scale", "shift", "psnr"} (PSNR on those images)."""
    run_dir = Path(run_dir)
    found = checkpoint.list_checkpoints(run_dir)
    if not found:
        raise checkpoint.CheckpointError(f"{run_dir} holds no complete checkpoint to export (looked in {run_dir}/checkpoints)")
    cfg = VAERunConfig.from_dict(checkpoint.read_json(run_dir / RUN_CONFIG))
    tensors, state = checkpoint.load_checkpoint(found[-1], ("model",))
    vae = VAE(cfg.vae)
    vae.load_state_dict(tensors["model"])
    vae.eval()
    dataset = _dataset(cfg)
    images = torch.stack([dataset[i]["image"] for i in range(min(cfg.stats_images, len(dataset)))])
    scale, shift = latent_stats(vae, images)
    codec = VAECodec(vae, scale, shift)
    with torch.no_grad():
        quality = psnr(torch.cat([codec.decode(codec.encode(images[i:i + 64])) for i in range(0, len(images), 64)]), images)
    extra = {"training": {"run": run_dir.name, "step": state["step"], "nimg": state["nimg"], "data": cfg.train.data,
                          "image_size": cfg.image_size, "psnr": quality, "stats_images": len(images)}}
    return codec.save(Path(out), overwrite=overwrite, extra=extra), {"scale": scale, "shift": shift, "psnr": quality}


def run_cli(args: Any) -> int:
    """``diffuse train-vae``: train (or resume) a VAE run, then export it when ``--export`` is given."""
    if args.resume and (args.preset or args.data or args.init_from):
        raise ValueError("--resume continues a run with its saved config; drop --preset, --data and --init-from (only "
                         "--max-steps may change)")
    cfg = None
    if not args.resume:
        cfg = vae_preset(args.preset or "vae-tiny")
        if args.data:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, data=args.data))
        if args.init_from:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=args.init_from))
    if args.max_steps is not None and args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    result = train_vae(cfg, Path(args.out), resume=args.resume, max_steps=args.max_steps)
    print(f"trained the VAE to step {result.step} (last loss {result.last_loss:.4f}); run folder: {result.run_dir}")
    if args.export:
        folder, info = export_vae(Path(args.out), Path(args.export), overwrite=args.overwrite)
        print(f"VAE folder: {folder} (latent scale {info['scale']:.4f}, shift {info['shift']:.4f}, "
              f"reconstruction PSNR {info['psnr']:.2f} dB)")
    return 0
