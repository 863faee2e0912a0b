"""Latent vs pixel diffusion on the shapes world at 64x64, and exact tiled VAE decoding.

Parts (``--parts``; each prints a markdown table):

* ``psnr``: reconstruction PSNR of the VAE (``--vae``) on held-out shapes images (seeds from
  ``HELDOUT_SEED`` on, never in a training set), mean over images with a 95% interval
  (mean +- 1.96 standard errors).
* ``train``: training images/s of the ``latent-shapes-t2i`` preset against a pixel model with the
  same U-Net at 64x64 (3 channels, attention at the same levels). Both run the real trainer
  (:func:`diffuse.train.train`: data, VAE encoding of each batch for the latent model, loss,
  backward, AdamW, EMA) for ``--warmup`` + ``--steps`` steps; images/s is the median over the
  timed steps of the per-step rate the trainer logs.
* ``sample``: seconds per image at ``--sample-steps`` steps (dpmpp_2m, CFG ``--cfg``, batch
  ``--batch``), with the VAE decode share, for the models the ``train`` part exported.
* ``adherence`` (only with ``--adherence-minutes M``): both models trained from scratch for the
  same wall time (steps = M minutes x the measured images/s / batch), then scored with the
  shapes-world adherence scorer (``--per-family`` prompts per family, 95% bootstrap interval).
* ``tiles``: :func:`diffuse.codec.decode_tiled` against the whole decode (max and mean
  |difference|) for several tile and overlap sizes, on a random VAE of the vae-shapes-f4
  architecture and on a trained VAE (``--vae``, else the ``vae-tiny`` preset trained here); then
  seconds and peak memory (extra resident set size during the decode, VmHWM after resetting it
  through /proc/self/clear_refs, one fresh process per row, malloc returning freed tensors to the
  system) of whole and tiled decoding of ``--big`` x ``--big`` latents.

    python bench/latent.py --vae models/vae-shapes            # the full run, on an idle machine
    python bench/latent.py --vae models/vae-shapes --parts tiles
    python bench/latent.py --vae models/vae-shapes --parts train adherence --adherence-minutes 90 --models pixel  # and latent beside it
    python bench/latent.py --quick                             # about a minute on one thread: checks it runs

``--quick`` shrinks everything (32x32 images, a VAE trained for a few steps here, tiny U-Nets,
a few steps): its numbers only show that the script works.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffuse import shapes  # noqa: E402
from diffuse.codec import VAECodec, decode_tiled  # noqa: E402
from diffuse.config import RunConfig, preset  # noqa: E402
from diffuse.data import make_dataset  # noqa: E402
from diffuse.evaluate import adherence_run  # noqa: E402
from diffuse.model import DiffusionModel  # noqa: E402
from diffuse.nn import build_backbone  # noqa: E402
from diffuse.nn.vae import VAE, psnr  # noqa: E402
from diffuse.pipeline import Pipeline, SampleSettings, generate  # noqa: E402
from diffuse.train import METRICS, export_run, train  # noqa: E402
from diffuse.train_vae import export_vae, train_vae, vae_preset  # noqa: E402

PARTS = ("psnr", "train", "sample", "adherence", "tiles")
HELDOUT_SEED = 10**9  # shapes seeds of the held-out images; training sets use seeds from 0


# ---------------------------------------------------------------- models compared


def latent_config(vae: Path, quick: bool) -> RunConfig:
    """The latent-shapes-t2i preset reading ``vae``; ``quick``: a tiny U-Net and text encoder on 8x8 latents."""
    cfg = preset("latent-shapes-t2i")
    model = dataclasses.replace(cfg.model, codec=str(vae))
    if quick:
        text = {"dim": 32, "depth": 1, "num_heads": 2}
        backbone = {**model.backbone_config, "image_size": 8, "model_channels": 16, "norm_groups": 8, "num_heads": 2,
                    "attention_resolutions": [4], "text_dim": text["dim"]}
        model = dataclasses.replace(model, image_size=8, text_config=text, backbone_config=backbone)
    return dataclasses.replace(cfg, model=model)


def pixel_config(latent: RunConfig, factor: int) -> RunConfig:
    """The latent model's U-Net on pixels at the same output size: side x ``factor``, RGB, attention at
    the same levels (resolutions x ``factor``), sigma_data 0.5 (the pixel presets'), no codec."""
    m = latent.model
    b = m.backbone_config
    backbone = {**b, "image_size": b["image_size"] * factor, "in_channels": 3, "out_channels": 3,
                "attention_resolutions": [r * factor for r in b["attention_resolutions"]]}
    return dataclasses.replace(latent, model=dataclasses.replace(m, backbone_config=backbone, channels=3,
                                                                 image_size=m.image_size * factor, sigma_data=0.5, codec=""))


def for_steps(cfg: RunConfig, steps: int, batch: int, dataset_size: int) -> RunConfig:
    """``cfg`` trained for ``steps`` steps of ``batch`` images, logging every step, saving only at the end."""
    t = dataclasses.replace(cfg.train, max_steps=steps, batch_size=batch, grad_accum=1, log_every=1, checkpoint_every=steps,
                            sample_every=steps, eval_every=0, dataset_size=dataset_size or cfg.train.dataset_size)
    return dataclasses.replace(cfg, train=t)


def quick_vae(root: Path) -> Path:
    """A throwaway factor-4 VAE for --quick: the vae-tiny network at 32x32, trained for 4 steps."""
    cfg = vae_preset("vae-tiny")
    cfg = dataclasses.replace(cfg, image_size=32, train=dataclasses.replace(cfg.train, max_steps=4, log_every=2,
                                                                             checkpoint_every=4, sample_every=4))
    train_vae(cfg, root / "vae-run", log=lambda s: None)
    return export_vae(root / "vae-run", root / "vae")[0]


def tiny_trained_vae(root: Path) -> Path:
    """The vae-tiny preset trained for its 40 steps (the golden VAE of tests/test_vae.py)."""
    train_vae(vae_preset("vae-tiny"), root / "vae-tiny-run", log=lambda s: None)
    return export_vae(root / "vae-tiny-run", root / "vae-tiny")[0]


def heldout_images(n: int, size: int) -> torch.Tensor:
    """[n, 3, size, size] shapes images from seeds HELDOUT_SEED.. (in no training set)."""
    data = make_dataset("shapes", size, length=n, base_seed=HELDOUT_SEED)
    return torch.stack([data[i]["image"] for i in range(n)])


# ---------------------------------------------------------------- parts


def part_psnr(codec: VAECodec, n: int, size: int) -> str:
    images = heldout_images(n, size)
    values = [psnr(codec.decode(codec.encode(images[i:i + 1])), images[i:i + 1]) for i in range(n)]
    mean, half = statistics.fmean(values), 1.96 * statistics.stdev(values) / math.sqrt(n)
    return ("| VAE | images | size | PSNR mean (dB) | 95% interval | min | max |\n|---|---|---|---|---|---|---|\n"
            f"| {codec.vae.cfg.factor}x, {codec.latent_channels} ch | {n} held-out | {size} | {mean:.2f} | "
            f"[{mean - half:.2f}, {mean + half:.2f}] | {min(values):.2f} | {max(values):.2f} |")


def measure_training(cfg: RunConfig, run_dir: Path, warmup: int) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir``; the median per-step images/s after ``warmup`` steps and the wall time."""
    start = time.perf_counter()
    train(cfg, run_dir, progress=False, log=lambda s: None)
    wall = time.perf_counter() - start
    with open(run_dir / METRICS, newline="") as f:
        rates = [float(r["img_per_s"]) for r in csv.DictReader(f) if r["img_per_s"]]
    return {"img_s": statistics.median(rates[warmup:] or rates), "wall_s": wall, "steps": cfg.train.max_steps,
            "params_m": sum(p.numel() for p in build_backbone(cfg.model.backbone, cfg.model.backbone_config).parameters()) / 1e6}


def train_table(rows: dict[str, dict[str, Any]], cfgs: dict[str, RunConfig]) -> str:
    lines = ["| model | denoiser input | U-Net params (M) | batch | images/s | steps (wall s, with the final checkpoint and preview grid) |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        m = cfgs[name].model
        lines.append(f"| {name} | {m.channels}x{m.image_size}x{m.image_size} | {r['params_m']:.2f} | {cfgs[name].train.batch_size} "
                     f"| {r['img_s']:.2f} | {r['steps']} ({r['wall_s']:.0f}) |")
    return "\n".join(lines)


@torch.no_grad()
def measure_sampling(folder: Path, steps: int, cfg_scale: float, batch: int, repeats: int) -> dict[str, float]:
    """Seconds per image (best of ``repeats``) of generation (sampling and decode) and of the VAE decode alone."""
    model, _ = DiffusionModel.load(folder)
    model.eval()
    codec = VAECodec.load(folder / model.cfg.codec) if model.cfg.codec else None
    settings = SampleSettings(steps=steps, cfg=cfg_scale)
    seeds = list(range(batch))
    prompts = [shapes.sample(s).caption for s in seeds]
    latents = torch.randn(batch, model.cfg.channels, model.cfg.image_size, model.cfg.image_size)
    sample_s, decode_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        generate(model, settings, seeds, prompts=prompts, codec=codec)  # sampling + decode, as `diffuse generate`
        sample_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        if codec is not None:
            codec.decode(latents)
        decode_s.append(time.perf_counter() - start)
    return {"sample_s": min(sample_s) / batch, "decode_s": min(decode_s) / batch}


def sample_table(rows: dict[str, dict[str, float]], steps: int, cfg_scale: float, batch: int) -> str:
    lines = [f"| model | s/image, {steps} steps, CFG {cfg_scale}, batch {batch} | of which VAE decode |", "|---|---|---|"]
    lines += [f"| {name} | {r['sample_s']:.3f} | {r['decode_s']:.3f} |" for name, r in rows.items()]
    return "\n".join(lines)


def part_adherence(cfgs: dict[str, RunConfig], rates: dict[str, float], minutes: float, root: Path, args: argparse.Namespace) -> str:
    """Train each model for the same wall time (from its measured images/s), then score adherence."""
    pairs = shapes.eval_prompts(args.per_family)
    prompts, families = [p for p, _ in pairs], [f for _, f in pairs]
    lines = [f"| model | steps in {minutes:g} min | images seen | wall (min) | adherence | 95% interval |", "|---|---|---|---|---|---|"]
    for name, cfg in cfgs.items():
        steps = max(1, round(minutes * 60 * rates[name] / cfg.train.batch_size))
        cfg = for_steps(cfg, steps, cfg.train.batch_size, args.dataset_size)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, log_every=max(1, steps // 50),
                                                                 checkpoint_every=max(1, steps // 10)))
        start = time.perf_counter()
        train(cfg, root / f"adh-{name}", progress=False, log=lambda s: None)
        wall = time.perf_counter() - start
        pipe = Pipeline.load(export_run(root / f"adh-{name}", root / f"adh-{name}-model"))
        report = adherence_run(pipe, prompts, families, SampleSettings(steps=args.sample_steps, cfg=args.cfg)).report
        s = report.overall
        lines.append(f"| {name} | {steps} | {steps * cfg.train.batch_size} | {wall / 60:.1f} | {s.accuracy:.3f} | [{s.low:.3f}, {s.high:.3f}] |")
    return "\n".join(lines)


# ---------------------------------------------------------------- tiles


def random_vae(cfg: Any, seed: int = 0) -> VAE:
    """A VAE with every parameter moved by N(0, 0.05^2) from its init (the zero-initialized convs and
    attention output of a fresh VAE would make each residual block its shortcut and the attention the identity)."""
    torch.manual_seed(seed)
    vae = VAE(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def tile_rows(label: str, vae: VAE, z: torch.Tensor, tiles: list[int], overlaps: list[Optional[int]]) -> list[str]:
    """Rows of the error table; costs are CPU seconds (process time: on a shared machine wall time says little)."""
    vae.decode(z[..., :4, :4])  # first-call set-up out of the timings
    start = time.process_time()
    whole = vae.decode(z)
    whole_s = time.process_time() - start
    scale = float(whole.abs().mean())
    rows = []
    for tile in tiles:
        for overlap in overlaps:
            start = time.process_time()
            diff = (decode_tiled(vae, z, tile, overlap) - whole).abs()
            seconds = time.process_time() - start
            shown = f"{vae.decoder.halo()} (halo)" if overlap is None else str(overlap)
            rows.append(f"| {label} | {z.shape[-2]}x{z.shape[-1]} | {tile} | {shown} | {float(diff.max()):.2e} | {float(diff.mean()):.2e} "
                        f"| {float(diff.max()) / scale:.2e} | {seconds:.2f} ({seconds / whole_s:.1f}x) |")
    return rows


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def decode_worker(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh process: seconds and extra peak RSS of one decode of ``args.big`` x ``args.big`` latents."""
    vae = random_vae(vae_preset("vae-tiny" if args.quick else "vae-shapes-f4").vae)
    z = torch.randn(1, vae.cfg.latent_channels, args.big, args.big, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        vae.decode(z[..., :4, :4])  # first-call set-up (kernels, thread pool) out of the measurement
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = status_kib("VmRSS")
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = decode_tiled(vae, z, args.worker_tile) if args.worker_tile else vae.decode(z)
    return {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "extra_mib": (status_kib("VmHWM") - before) / 1024,
            "output_mib": out.numel() * out.element_size() / 2**20}


def memory_table(args: argparse.Namespace, tiles: list[int]) -> str:
    """Whole vs tiled decoding of big latents, each in a fresh process. glibc's malloc keeps freed blocks of
    up to 32 MiB in the heap, where fragmentation by many tile-sized tensors inflates RSS; the workers set
    MALLOC_MMAP_THRESHOLD_=128 KiB so freed tensors return to the system and RSS follows live memory."""
    lines = [f"| decode of {args.big}x{args.big} latents | wall s | CPU s | peak extra RSS (MiB) | output tensor (MiB) |",
             "|---|---|---|---|---|"]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for tile in [0, *tiles]:
        cmd = [sys.executable, __file__, "--worker-tile", str(tile), "--big", str(args.big), "--threads", str(args.threads)]
        out = subprocess.run(cmd + (["--quick"] if args.quick else []), check=True, capture_output=True, text=True, env=env).stdout
        r = json.loads(out.strip().splitlines()[-1])
        name = "whole" if tile == 0 else f"tiled, tile {tile}, halo overlap"
        lines.append(f"| {name} | {r['seconds']:.2f} | {r['cpu_s']:.2f} | {r['extra_mib']:.0f} | {r['output_mib']:.1f} |")
    return "\n".join(lines)


def part_tiles(args: argparse.Namespace, root: Path) -> str:
    q = args.quick
    header = ["| VAE | latents | tile | overlap | max abs diff | mean abs diff | max diff / mean abs x | tiled CPU s (x whole) |",
              "|---|---|---|---|---|---|---|---|"]
    overlaps: list[Optional[int]] = [0, 4, None] if q else [0, 2, 4, 6, None]
    tiles = [8, 12] if q else [16, 32]
    g = torch.Generator().manual_seed(0)
    rand = random_vae(vae_preset("vae-tiny" if q else "vae-shapes-f4").vae)
    rows = tile_rows("random " + ("vae-tiny" if q else "vae-shapes-f4") + " net", rand,
                     torch.randn(1, 4, 24 if q else 64, 24 if q else 64, generator=g), tiles, overlaps)
    trained = VAECodec.load(args.vae) if args.vae else VAECodec.load(tiny_trained_vae(root))
    image = heldout_images(1, (24 if q else 64) * trained.factor)
    z = trained.vae.encode(image).mean  # latents of a real (larger than trained) shapes image
    rows += tile_rows(("trained " + args.vae.name) if args.vae else "trained vae-tiny (40 steps)", trained.vae, z, tiles, overlaps)
    return "\n".join(header + rows) + "\n\n" + memory_table(args, [8] if q else [16, 32, 64])


# ---------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", type=Path, help="a factor-4 shapes VAE folder (diffuse train-vae --preset vae-shapes-f4 --export ...)")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    p.add_argument("--quick", action="store_true", help="tiny everything, one thread: checks that the script runs")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default; --quick: 1)")
    p.add_argument("--psnr-images", type=int, default=500)
    p.add_argument("--batch", type=int, default=0, help="training batch (0 = the preset's 64)")
    p.add_argument("--steps", type=int, default=10, help="timed training steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps first")
    p.add_argument("--dataset-size", type=int, default=0, help="shapes items (0 = the preset's)")
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--sample-batch", type=int, default=8)
    p.add_argument("--cfg", type=float, default=2.0, help="guidance scale for sampling and adherence")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--adherence-minutes", type=float, default=0.0, help="training minutes per model for the adherence part (0 = skip)")
    p.add_argument("--per-family", type=int, default=50, help="adherence prompts per family")
    p.add_argument("--models", nargs="+", default=["latent", "pixel"], choices=["latent", "pixel"],
                   help="which models the train/sample/adherence parts run (one per process lets two run side by side)")
    p.add_argument("--keep", type=Path, help="write the runs and exported models here (default: a temporary folder)")
    p.add_argument("--big", type=int, default=128, help="latent side of the memory rows of the tiles part")
    p.add_argument("--worker-tile", type=int, default=-1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.threads = args.threads or 1
        args.psnr_images, args.batch, args.steps, args.warmup, args.dataset_size = 16, 4, 2, 1, 256
        args.sample_steps, args.sample_batch, args.repeats, args.per_family = 4, 2, 1, 2
        args.big = 32 if args.big == 128 else args.big
        args.adherence_minutes = min(args.adherence_minutes, 0.05)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker_tile >= 0:
        print(json.dumps(decode_worker(args)))
        return
    needs_vae = {"psnr", "train", "sample", "adherence"} & set(args.parts)
    if needs_vae and not args.vae and not args.quick:
        sys.exit("bench/latent.py: the psnr/train/sample/adherence parts need --vae FOLDER (a factor-4 shapes VAE: "
                 "diffuse train-vae --preset vae-shapes-f4 --out runs/vae --export models/vae-shapes), or use --quick")
    print(f"bench/latent.py{' --quick' if args.quick else ''}: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, {time.strftime('%Y-%m-%d %H:%M %Z')}\n")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        vae = args.vae or (quick_vae(root) if needs_vae else None)
        if "psnr" in args.parts:
            print(part_psnr(VAECodec.load(vae), args.psnr_images, 32 if args.quick else 64) + "\n", flush=True)
        if {"train", "sample", "adherence"} & set(args.parts):
            latent = latent_config(vae, args.quick)
            cfgs = {"latent (latent-shapes-t2i)": latent, "pixel (same U-Net)": pixel_config(latent, VAECodec.load(vae).factor)}
            cfgs = {k: c for k, c in cfgs.items() if k.split()[0] in args.models}
            cfgs = {k: for_steps(c, args.warmup + args.steps, args.batch or c.train.batch_size, args.dataset_size) for k, c in cfgs.items()}
            rows = {name: measure_training(cfg, root / f"run{i}", args.warmup) for i, (name, cfg) in enumerate(cfgs.items())}
            print(train_table(rows, cfgs) + "\n", flush=True)
            if "sample" in args.parts:
                sampled = {name: measure_sampling(export_run(root / f"run{i}", root / f"model{i}"), args.sample_steps, args.cfg,
                                                  args.sample_batch, args.repeats) for i, name in enumerate(cfgs)}
                print(sample_table(sampled, args.sample_steps, args.cfg, args.sample_batch) + "\n", flush=True)
            if "adherence" in args.parts and args.adherence_minutes > 0:
                print(part_adherence(cfgs, {k: r["img_s"] for k, r in rows.items()}, args.adherence_minutes, root, args) + "\n", flush=True)
        if "tiles" in args.parts:
            print(part_tiles(args, root))


if __name__ == "__main__":
    main()
