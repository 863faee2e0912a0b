"""``train(cfg, run_dir)``: the training loop as a library function (no argument parsing here).

What it guarantees:

* **Exact resume.** The data order is a pure function of (seed, step); noise levels,
  noise and condition dropout come from one trainer-owned generator whose state is saved
  with model, EMA, optimizer and the global torch RNG. On CPU, N steps + crash + resume
  + M steps gives bitwise the same weights as N + M steps in one go.
* **Never loses work.** Checkpoints are written atomically (see :mod:`diffuse.checkpoint`);
  a non-finite loss or gradient skips the step, and too many in a row stop training with
  the last good checkpoint intact.
* **Many processes.** Under ``torchrun`` each rank takes its slice of every global batch
  (gloo on CPU, nccl on GPU, DistributedDataParallel), draws the same global noise and
  keeps its slice, so K processes compute what one process computes with the same global
  batch. Rank 0 alone writes files.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import math
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import nn
from PIL import Image
from tqdm import tqdm

from . import checkpoint, fastpath
from .config import RunConfig
from .codec import VAE_SUBDIR, PixelCodec, VAECodec
from .data import make_dataset
from .ema import EMA
from .losses import bucket_edges, bucket_losses, denoising_loss, training_noise
from .masks import inpaint_concat, training_masks
from .model import DiffusionModel
from .plot import image_grid, line_chart, to_uint8
from .text import WordTokenizer
from .train_eval import EVAL_COLUMNS, TrainingEvaluator

RUN_CONFIG = "config.json"
METRICS = "metrics.csv"
STEMS = ("model", "ema", "optimizer", "rng")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite steps in a row, bad run folder, bad resume)."""


@dataclass
class TrainResult:
    step: int
    run_dir: Path
    last_loss: float
    bad_steps: int


# ---------------------------------------------------------------- schedule and data order

def learning_rate(step: int, cfg: RunConfig) -> float:
    """Linear warmup to lr over warmup_steps, then cosine decay to lr * min_lr_ratio at max_steps."""
    t = cfg.train
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.lr * (t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@functools.lru_cache(maxsize=2)
def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The seeded permutation of range(n) that epoch ``epoch`` visits."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(step: int, micro: int, cfg: RunConfig, n: int) -> list[int]:
    """Dataset indices of one global micro-batch: a pure function of (seed, step, micro)."""
    micro_batch = cfg.train.batch_size // cfg.train.grad_accum
    start = (step * cfg.train.grad_accum + micro) * micro_batch
    out: list[int] = []
    while len(out) < micro_batch:
        epoch, offset = divmod(start + len(out), n)
        out.extend(epoch_order(cfg.train.seed, epoch, n)[offset:offset + micro_batch - len(out)].tolist())
    return out


# ---------------------------------------------------------------- distributed

@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= d.world
    return value


# ---------------------------------------------------------------- one training step

class TrainStep(nn.Module):
    """Conditioning + noising + loss for a micro-batch slice; wrapped by DDP under torchrun."""

    def __init__(self, model: DiffusionModel, cfg: RunConfig):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor, conditions: dict[str, Any]) -> torch.Tensor:
        cond = self.model.condition(**conditions)
        return denoising_loss(self.cfg.loss, self.model.denoiser, x0, sigma, noise, cond)


def drop_conditions(batch: list[dict[str, Any]], cfg: RunConfig, drop: torch.Tensor) -> dict[str, Any]:
    """User-level conditions of a batch with dropout applied (empty prompt / null class)."""
    kind = cfg.model.conditioning
    if kind == "text":
        return {"prompts": ["" if d else item["caption"] for item, d in zip(batch, drop.tolist())]}
    if kind == "class":
        return {"labels": [cfg.model.num_classes if d else int(item["label"]) for item, d in zip(batch, drop.tolist())]}
    return {}


# ---------------------------------------------------------------- the loop

def open_codec(cfg: RunConfig) -> Optional[VAECodec]:
    """The frozen VAE of a latent model (``model.codec`` names its folder), or None for a pixel model."""
    if not cfg.model.codec:
        return None
    if not Path(cfg.model.codec).is_dir():
        raise TrainingError(f"model.codec={cfg.model.codec}: no VAE folder there; export one there first (diffuse train-vae "
                            f"--preset vae-shapes-f4 (or vae-folder-f8) --out runs/vae --export {cfg.model.codec}) or "
                            f"--set model.codec=PATH (training/vae-shapes/model in the repository is a trained shapes VAE)")
    codec = VAECodec.load(Path(cfg.model.codec))
    if codec.latent_channels != cfg.model.channels:
        raise TrainingError(f"the VAE {cfg.model.codec} makes {codec.latent_channels}-channel latents but model.channels is "
                            f"{cfg.model.channels}; set model.channels={codec.latent_channels}")
    return codec


def open_dataset(cfg: RunConfig, factor: int = 1) -> Any:
    """The run's dataset with the options that apply to its kind, at model.image_size * factor pixels
    (``factor``: the codec's downsampling)."""
    t = cfg.train
    options: dict[str, Any] = {}
    if t.data == "shapes" and t.dataset_size:
        options["length"] = t.dataset_size
    if t.family_weights:
        options["family_weights"] = t.family_weights
    if t.data.startswith("folder:"):
        options["skip_bad_files"] = t.skip_bad_files
    return make_dataset(t.data, cfg.model.image_size * factor, **options)


def prepare_config(cfg: RunConfig, dataset: Any, codec: Optional[VAECodec] = None) -> RunConfig:
    """Fill in what a fresh run learns from its data (the text vocabulary) and check the match."""
    m = cfg.model
    if codec is not None:
        if dataset.channels != codec.vae.cfg.in_channels:
            raise TrainingError(f"dataset has {dataset.channels} channels but the VAE {m.codec} encodes {codec.vae.cfg.in_channels}")
    elif dataset.channels != m.channels:
        raise TrainingError(f"dataset has {dataset.channels} channels but model.channels is {m.channels}; set model.channels={dataset.channels}")
    if m.conditioning == "class" and dataset.num_classes != m.num_classes:
        raise TrainingError(f"dataset has {dataset.num_classes} classes but model.num_classes is {m.num_classes}")
    if m.conditioning == "text" and not dataset.has_captions:
        raise TrainingError(f"a text-conditional model needs captions, and dataset {cfg.train.data!r} has none")
    if m.conditioning == "text" and m.text_encoder == "builtin" and "tokenizer" not in m.text_config:
        tokenizer = WordTokenizer.from_captions(dataset.captions()).to_dict()
        m = dataclasses.replace(m, text_config={**m.text_config, "tokenizer": tokenizer})
    return dataclasses.replace(cfg, model=m)


def load_initial_weights(model: DiffusionModel, cfg: RunConfig, log: Callable[[str], None]) -> None:
    """``train.init_from``: start a new run from a model folder's weights (fine-tuning), not from random ones.

    Every tensor of the folder must have a place of the same shape in this model, and a text model must use the same
    vocabulary (token ids index the embedding); tensors the folder lacks keep their fresh initialization, so a model
    can be fine-tuned into a larger architecture whose new parts start at zero (``position_embedding``'s
    ``pos_proj``). The EMA starts from the loaded weights.
    """
    from .pipeline import resolve_model

    source = cfg.train.init_from
    try:
        path = resolve_model(source)
        config, tensors = checkpoint.load_model_dir(path)
    except (FileNotFoundError, checkpoint.CheckpointError) as e:
        raise TrainingError(f"train.init_from={source!r}: {e}") from None
    vocab = (config.get("model", {}).get("text_config") or {}).get("tokenizer")
    if vocab != (cfg.model.text_config or {}).get("tokenizer"):
        raise TrainingError(f"train.init_from={source!r}: its text vocabulary differs from this run's, so its token embeddings "
                            f"would mean other words; fine-tune on data with the same captions' words")
    own = model.state_dict()
    if cfg.model.inpainting:
        tensors = {k: widen_input(k, t, own.get(k), log) for k, t in tensors.items()}
    alien = [k for k, t in tensors.items() if k not in own or tuple(own[k].shape) != tuple(t.shape)]
    if alien:
        k = alien[0]
        where = f"shape {tuple(tensors[k].shape)}, this model's {tuple(own[k].shape)}" if k in own else "not in this model"
        raise TrainingError(f"train.init_from={source!r}: {len(alien)} of its tensors do not fit this model (e.g. {k!r}: {where}); "
                            f"it is another architecture")
    model.load_state_dict({k: t.to(own[k].dtype) for k, t in tensors.items()}, strict=False)
    fresh = sorted(k for k, _ in model.named_parameters() if k not in tensors)
    log(f"train.init_from: {len(tensors)} tensors from {path}" + (f"; {len(fresh)} new parameters keep their initialization "
                                                                   f"(e.g. {fresh[0]})" if fresh else ""))


INPUT_WEIGHTS = ("denoiser.backbone.conv_in.weight", "denoiser.backbone.x_embedder.proj.weight")  # U-Net, DiT


def widen_input(key: str, tensor: torch.Tensor, own: Optional[torch.Tensor], log: Callable[[str], None]) -> torch.Tensor:
    """A base model's input convolution fitted into an inpainting model's wider one (its extra input channels for
    the mask and the masked image): the base weights on the first channels, zeros on the new ones, so the
    inpainting model starts out computing exactly what the base model did (SD-inpainting's initialization)."""
    if (key not in INPUT_WEIGHTS or own is None or own.ndim != tensor.ndim or own.shape[0] != tensor.shape[0]
            or own.shape[2:] != tensor.shape[2:] or own.shape[1] <= tensor.shape[1]):
        return tensor
    wide = torch.zeros(own.shape, dtype=tensor.dtype)
    wide[:, :tensor.shape[1]] = tensor
    log(f"train.init_from: {key} widened from {tensor.shape[1]} to {own.shape[1]} input channels (the new ones start at zero)")
    return wide


def run_config(run_dir: Path, cfg: Any, resume: bool, from_dict: Callable[[dict], Any]) -> tuple[Any, list[Path]]:
    """(config, complete checkpoints) of a run: ``cfg`` for a new run folder, the saved config with ``resume``.

    A resume without a complete checkpoint, or a new run in a folder that has checkpoints, is an error.
    """
    found = checkpoint.list_checkpoints(run_dir)
    if resume:
        if not found:
            raise checkpoint.CheckpointError(f"--resume: {run_dir}/checkpoints holds no complete checkpoint; start without --resume")
        return from_dict(checkpoint.read_json(run_dir / RUN_CONFIG)), found
    if found:
        raise TrainingError(f"{run_dir} already holds checkpoints; pass --resume to continue it, or choose a new --out")
    if cfg is None:
        raise ValueError("a new run needs a config (e.g. a preset)")
    return cfg, found

def train(cfg: Optional[RunConfig], run_dir: Path, *, resume: bool = False, max_steps: Optional[int] = None,
          device: Optional[str] = None, progress: bool = True, log: Callable[[str], None] = print) -> TrainResult:
    """Train a new run in ``run_dir`` from ``cfg``, or resume it from its newest checkpoint and saved config
    (``cfg`` is then ignored). ``max_steps`` overrides train.max_steps. Returns the final step and last loss."""
    run_dir = Path(run_dir)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = init_distributed(dev)
    if dev.type == "cuda" and d.world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))

    # ---- run folder and config
    cfg, found = run_config(run_dir, cfg, resume, RunConfig.from_dict)
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=max_steps))

    t = cfg.train
    codec = open_codec(cfg)
    dataset = open_dataset(cfg, codec.factor if codec is not None else 1)
    precision, why = fastpath.resolve_precision(t.precision, dev)
    if not resume:  # the run keeps what auto chose, so a resume elsewhere computes the same way
        cfg = prepare_config(cfg, dataset, codec)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))
        if t.precision == "auto" and d.main:
            log(f"train.precision auto -> {precision} ({why}); set train.precision=fp32 or bf16 to choose")
    micro_batch = t.batch_size // t.grad_accum
    if micro_batch % d.world:
        raise TrainingError(f"the micro-batch {micro_batch} (batch_size / grad_accum) must divide among {d.world} processes")
    local = micro_batch // d.world

    # ---- model, optimizer, EMA, RNG
    torch.manual_seed(t.seed)
    model = DiffusionModel(cfg.model)
    if t.init_from and not resume:
        load_initial_weights(model, cfg, log if d.main else lambda _: None)
    if d.main:  # only now: a run whose starting weights do not fit leaves no run folder behind
        run_dir.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_json(run_dir / RUN_CONFIG, cfg.to_dict())
    model = model.to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay)
    ema = EMA(model, t.ema_halflife_nimg, t.ema_rampup_ratio)
    gen = torch.Generator().manual_seed(t.seed + 1)
    step, nimg, bad_total, bad_run = 0, 0, 0, 0
    if resume:
        path = found[-1]
        tensors, state = checkpoint.load_checkpoint(path, STEMS)
        model.load_state_dict(tensors["model"])
        ema.load_state_dict(tensors["ema"])
        opt.load_state_dict(checkpoint.unflatten_optimizer(tensors["optimizer"], state["optimizer"]))
        torch.set_rng_state(tensors["rng"]["torch"])
        gen.set_state(tensors["rng"]["train_generator"])
        step, nimg, bad_total = state["step"], state["nimg"], state["bad_steps"]
        log(f"resumed {run_dir} at step {step} from {path.name}")

    stepper: nn.Module = TrainStep(model, cfg)
    if t.compile:
        fastpath.check_compile(dev)
        fastpath.use_disk_cache()
        model.denoiser.backbone.compile()
    if d.world > 1:
        stepper = nn.parallel.DistributedDataParallel(stepper, device_ids=[dev.index] if dev.type == "cuda" else None)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    edges = bucket_edges(cfg.model.sigma_min, cfg.model.sigma_max)
    metrics = MetricsLog(run_dir / METRICS, [f"loss_s{edges[i]:.3g}-{edges[i + 1]:.3g}" for i in range(len(edges) - 1)], step) if d.main else None
    evaluator = TrainingEvaluator(cfg, dataset) if d.main and t.eval_every else None
    last_eval: dict[str, str] = {}

    def save() -> None:
        if d.main:
            opt_tensors, opt_rest = checkpoint.flatten_optimizer(opt.state_dict())
            checkpoint.save_checkpoint(run_dir, step, {
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt_tensors,
                "rng": {"torch": torch.get_rng_state(), "train_generator": gen.get_state()},
            }, {"step": step, "nimg": nimg, "bad_steps": bad_total, "optimizer": opt_rest}, keep=t.keep_checkpoints)

    bar = tqdm(total=t.max_steps, initial=step, disable=not (progress and d.main), desc="train", unit="step")
    last_loss, window_t, window_img = float("nan"), time.perf_counter(), 0
    model.train()
    while step < t.max_steps:
        for group in opt.param_groups:
            group["lr"] = learning_rate(step, cfg)
        loss_sum, buckets = torch.zeros((), dtype=torch.float64), {}
        for micro in range(t.grad_accum):
            # the whole global micro-batch's randomness is drawn on every rank; each keeps its slice
            idx = batch_indices(step, micro, cfg, len(dataset))
            sigma = cfg.noise.sample(micro_batch, gen)
            drop = torch.rand(micro_batch, generator=gen) < t.cond_dropout
            mine = slice(d.rank * local, (d.rank + 1) * local)
            items = [dataset[i] for i in idx[mine]]
            pixels = torch.stack([it["image"] for it in items])
            x0 = (codec.encode(pixels) if codec is not None else pixels).to(dev)  # latent models train on scaled VAE latents
            noise = training_noise((micro_batch, *x0.shape[1:]), cfg.loss.offset_noise, gen)[mine].to(dev)
            conditions = drop_conditions(items, cfg, drop[mine])
            if cfg.model.inpainting:  # a random mask per image (diffuse.masks); the caption still describes the whole image
                masks = training_masks(micro_batch, pixels.shape[-1], gen)[mine]
                conditions["concat"] = inpaint_concat(codec or PixelCodec(cfg.model.channels), pixels, masks).to(dev)
            sync = d.world == 1 or micro == t.grad_accum - 1
            with (nullcontext() if sync else stepper.no_sync()), autocast:
                per_example = stepper(x0, sigma[mine].to(dev), noise, conditions)
            (per_example.mean() / t.grad_accum).backward()
            loss_sum += per_example.detach().double().sum().cpu()
            for k, (s, c) in bucket_losses(sigma[mine], per_example, edges).items():
                buckets[k] = (buckets.get(k, (0.0, 0))[0] + s, buckets.get(k, (0.0, 0))[1] + c)
        loss = float(all_mean(loss_sum, d)) / local / t.grad_accum
        grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf")))
        step += 1
        if math.isfinite(loss) and math.isfinite(grad_norm):
            opt.step()
            bad_run = 0
            nimg += t.batch_size
            ema.update(model, t.batch_size, nimg)
            last_loss = loss
        else:  # skip the update; the batch is consumed so a bad batch is not retried forever
            bad_total, bad_run = bad_total + 1, bad_run + 1
            if bad_run > t.max_bad_steps:
                bar.close()
                raise TrainingError(f"{bad_run} non-finite steps in a row at step {step} (loss {loss}, grad norm {grad_norm}); "
                                    f"stopped with the last good checkpoint intact; lower train.lr or use train.precision=fp32")
        opt.zero_grad(set_to_none=True)
        window_img += t.batch_size
        bar.update(1)
        if metrics is not None and (step % t.log_every == 0 or step == t.max_steps):
            elapsed = time.perf_counter() - window_t
            img_s = window_img / max(elapsed, 1e-9)
            window_t, window_img = time.perf_counter(), 0
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_s:.1f}", **last_eval)
            metrics.write({"step": step, "nimg": nimg, "loss": loss, "lr": learning_rate(step - 1, cfg), "grad_norm": grad_norm,
                           "img_per_s": img_s, "bad_steps": bad_total,
                           **{k: s / c for k, (s, c) in buckets.items()}})
        if step % t.checkpoint_every == 0 or step == t.max_steps:
            save()
        if evaluator is not None and step % t.eval_every == 0:
            # between steps, on rank 0, with the global RNG restored afterwards: training is unchanged
            bar.set_description_str(f"eval ({evaluator.images_per_eval()} images)")
            row = evaluator(ema)
            bar.set_description_str("train")
            last_eval = {"fid": f"{row['fid']:.1f}", **({"adh": f"{row['adherence']:.2f}"} if "adherence" in row else {})}
            metrics.write({"step": step, "nimg": nimg, **row})
            metrics.plot(run_dir / "loss.png")
        if d.main and (step % t.sample_every == 0 or step == t.max_steps):
            write_previews(run_dir, step, cfg, ema, dataset, codec)
            metrics.plot(run_dir / "loss.png")
    bar.close()
    if d.world > 1:
        dist.barrier()
    return TrainResult(step, run_dir, last_loss, bad_total)


# ---------------------------------------------------------------- run-folder outputs

class MetricsLog:
    """Append-only metrics CSV; on resume, rows past the resumed step are dropped first.

    Training rows fill the loss columns; evaluation rows (``train.eval_every``) fill step, nimg
    and EVAL_COLUMNS. A CSV written before the evaluation columns existed is rewritten with them."""

    def __init__(self, path: Path, bucket_columns: list[str], resume_step: int):
        self.path = path
        self.buckets = bucket_columns
        self.columns = ["step", "nimg", "loss", "lr", "grad_norm", "img_per_s", "bad_steps", *bucket_columns, *EVAL_COLUMNS]
        rows = self.read() if path.exists() else []
        rows = [r for r in rows if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, self.columns)
            w.writeheader()
            w.writerows(rows)

    def read(self) -> list[dict[str, str]]:
        with open(self.path, newline="") as f:
            return list(csv.DictReader(f))

    def write(self, row: dict[str, float]) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({k: row.get(k, "") for k in self.columns})

    def plot(self, out: Path) -> None:
        """Loss curves; below them, when the run has evaluations, FID (and adherence x 100) by step."""
        rows = self.read()
        loss_rows = [r for r in rows if r.get("loss")]
        series = {"loss": [(float(r["step"]), float(r["loss"])) for r in loss_rows]}
        for col in self.buckets:
            series[col.removeprefix("loss_")] = [(float(r["step"]), float(r[col])) for r in loss_rows if r.get(col)]
        evals = {name: [(float(r["step"]), scale * float(r[col])) for r in rows if r.get(col)]
                 for name, col, scale in (("FID", "fid", 1.0), ("FID 95% low", "fid_low", 1.0), ("FID 95% high", "fid_high", 1.0),
                                          ("adherence x100", "adherence", 100.0))}
        evals = {k: v for k, v in evals.items() if v}
        if not evals:
            line_chart(series, out, title="training loss (total and per sigma bucket)")
            return
        parts = []
        for s, title, log_y in ((series, "training loss (total and per sigma bucket)", True),
                                (evals, "evaluation of the EMA weights (train.eval_n images)", False)):
            buf = io.BytesIO()
            line_chart(s, buf, title=title, log_y=log_y)
            parts.append(Image.open(buf).convert("RGB"))
        canvas = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
        canvas.paste(parts[0], (0, 0))
        canvas.paste(parts[1], (0, parts[0].height))
        canvas.save(out)


PREVIEW_SEEDS = list(range(16))


def preview_conditions(cfg: RunConfig, dataset: Any) -> dict[str, Any]:
    """Fixed conditions for the preview grid: the first dataset captions or classes 0.. in turn."""
    if cfg.model.conditioning == "text":
        return {"prompts": [dataset[i]["caption"] for i in PREVIEW_SEEDS]}
    if cfg.model.conditioning == "class":
        return {"labels": [i % cfg.model.num_classes for i in PREVIEW_SEEDS]}
    return {}


def write_previews(run_dir: Path, step: int, cfg: RunConfig, ema: EMA, dataset: Any, codec: Optional[VAECodec] = None) -> Path:
    """Sample a grid from the EMA weights at fixed seeds and save ``samples/step-XXXXXXXX.png``."""
    from .pipeline import SampleSettings, generate

    model = DiffusionModel(cfg.model)
    model.load_state_dict(ema.state_dict())
    model.eval()
    guided = cfg.model.conditioning != "none"
    images = generate(model, SampleSettings(sampler="dpmpp_2m", steps=20, cfg=2.0 if guided else 1.0), PREVIEW_SEEDS,
                      codec=codec, **preview_conditions(cfg, dataset))
    out = run_dir / "samples" / f"{checkpoint.checkpoint_name(step)}.png"
    out.parent.mkdir(exist_ok=True)
    image_grid(to_uint8(images), columns=8, scale=max(1, 128 // images.shape[-1])).save(out)
    return out


def export_run(run_dir: Path, out: Path, *, overwrite: bool = False, dtype: str = "float32",
               sampling: Optional[dict[str, Any]] = None) -> Path:
    """Write a model folder from a run's newest checkpoint, using its EMA weights; ``sampling``
    (SampleSettings fields) becomes the model's default sampling settings."""
    run_dir = Path(run_dir)
    found = checkpoint.list_checkpoints(run_dir)
    if not found:
        raise checkpoint.CheckpointError(f"{run_dir} holds no complete checkpoint to export (looked in {run_dir}/checkpoints)")
    cfg = RunConfig.from_dict(checkpoint.read_json(run_dir / RUN_CONFIG))
    tensors, state = checkpoint.load_checkpoint(found[-1], ("ema",))
    codec = open_codec(cfg)
    if codec is not None:  # the model folder carries its VAE folder as vae/ (see README, "Latent diffusion")
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, codec=VAE_SUBDIR))
    model = DiffusionModel(cfg.model)
    extra = {"training": {"run": run_dir.name, "step": state["step"], "nimg": state["nimg"], "preset_config": cfg.to_dict()},
             "sampling": sampling or {}}
    folder = model.save(Path(out), weights=tensors["ema"], extra=extra, overwrite=overwrite, dtype=getattr(torch, dtype))
    if codec is not None:
        codec.save(folder / VAE_SUBDIR)
    return folder
