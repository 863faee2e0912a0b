"""Training throughput (images/s), peak memory and compile time per preset and execution mode.

One optimizer step here is what ``diffuse.train.train`` does per step: conditions with
dropout (``drop_conditions``), the real ``TrainStep`` forward (text encoder or class
embedding + ``denoising_loss``) under the configured autocast, backward, gradient clipping,
AdamW and the EMA update. Inputs are synthetic (random images, random shapes-world captions
or random labels), so data loading is measured separately (``data`` rows: the trainer's own
``batch_indices`` + ``dataset[i]`` + stack, single process).

A mode is a precision plus optional flags joined by ``+``:

* ``fp32`` / ``bf16``: ``train.precision`` (bf16 = ``torch.autocast('cpu', torch.bfloat16)``);
* ``compile``: ``model.denoiser.backbone.compile()``, as ``train.compile=true`` does;
* ``cl``: channels_last model and images;
* ``fused``: ``torch.optim.AdamW(fused=True)``.

Every (preset, mode) runs in its own process so that peak RSS (``VmHWM``) and compile caches
do not mix. Images/s is the batch size over the median time of ``--steps`` timed steps after
``--warmup`` steps; the first step (which includes compilation) is reported separately.

    python bench/train.py                                   # the table in bench/RESULTS.md
    python bench/train.py --presets tiny --modes fp32 bf16+compile --steps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffuse import shapes  # noqa: E402
from diffuse.config import RunConfig, preset  # noqa: E402
from diffuse.ema import EMA  # noqa: E402
from diffuse.losses import training_noise  # noqa: E402
from diffuse.model import DiffusionModel  # noqa: E402
from diffuse.text import WordTokenizer  # noqa: E402
from diffuse.train import TrainStep, batch_indices, drop_conditions, learning_rate, open_dataset  # noqa: E402

PRESETS = ("tiny", "digits", "shapes-t2i", "shapes-dit")
MODES = ("fp32", "bf16", "fp32+compile", "bf16+compile")
FLAGS = ("compile", "cl", "fused")
THREADS = 2


def parse_mode(mode: str) -> tuple[str, set[str]]:
    """'bf16+compile+cl' -> ('bf16', {'compile', 'cl'}); raises ValueError on unknown parts."""
    precision, *flags = mode.split("+")
    if precision not in ("fp32", "bf16") or not set(flags) <= set(FLAGS):
        raise ValueError(f"bad mode {mode!r}: use fp32|bf16 followed by +flags from {FLAGS}")
    return precision, set(flags)


def bench_config(name: str, precision: str, batch: int) -> RunConfig:
    """The preset with the given precision and batch size; text models get the full shapes vocabulary
    (what ``prepare_config`` would learn from the captions)."""
    cfg = preset(name)
    model = cfg.model
    if model.conditioning == "text" and "tokenizer" not in model.text_config:
        tokenizer = WordTokenizer(shapes.vocabulary()).to_dict()
        model = dataclasses.replace(model, text_config={**model.text_config, "tokenizer": tokenizer})
    train = dataclasses.replace(cfg.train, precision=precision, batch_size=batch or cfg.train.batch_size, grad_accum=1)
    return dataclasses.replace(cfg, model=model, train=train)


def synthetic_items(cfg: RunConfig, rng: random.Random, captions: list[str]) -> list[dict[str, Any]]:
    """A batch of dataset-like items without images: random captions or random labels."""
    b, kind = cfg.train.batch_size, cfg.model.conditioning
    if kind == "text":
        return [{"caption": rng.choice(captions)} for _ in range(b)]
    if kind == "class":
        return [{"label": rng.randrange(cfg.model.num_classes)} for _ in range(b)]
    return [{} for _ in range(b)]


def peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_train(name: str, mode: str, steps: int, warmup: int, batch: int) -> dict[str, Any]:
    """Time full optimizer steps of one preset in one mode (in this process)."""
    precision, flags = parse_mode(mode)
    cfg = bench_config(name, precision, batch)
    t, m = cfg.train, cfg.model
    torch.manual_seed(t.seed)
    model = DiffusionModel(m)
    fmt = torch.channels_last if "cl" in flags else torch.contiguous_format
    model = model.to(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                            fused="fused" in flags or None)
    ema = EMA(model, t.ema_halflife_nimg, t.ema_rampup_ratio)
    stepper = TrainStep(model, cfg)
    if "compile" in flags:
        model.denoiser.backbone.compile()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    gen, rng = torch.Generator().manual_seed(t.seed + 1), random.Random(t.seed)
    captions = [shapes.sample(s).caption for s in range(512)] if m.conditioning == "text" else []
    shape = (t.batch_size, m.channels, m.image_size, m.image_size)
    model.train()

    def step(i: int) -> float:
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = learning_rate(i, cfg)
        x0 = (torch.rand(shape, generator=gen) * 2 - 1).contiguous(memory_format=fmt)
        sigma = cfg.noise.sample(t.batch_size, gen)
        drop = torch.rand(t.batch_size, generator=gen) < t.cond_dropout
        noise = training_noise(shape, cfg.loss.offset_noise, gen).contiguous(memory_format=fmt)
        with autocast:
            per_example = stepper(x0, sigma, noise, drop_conditions(synthetic_items(cfg, rng, captions), cfg, drop))
        per_example.mean().backward()
        float(per_example.detach().double().sum())
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        ema.update(model, t.batch_size, (i + 1) * t.batch_size)
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    first = step(0)
    for i in range(1, 1 + warmup):
        step(i)
    times = [step(i) for i in range(1 + warmup, 1 + warmup + steps)]
    median = statistics.median(times)
    return {"preset": name, "mode": mode, "batch": t.batch_size, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            "img_s": t.batch_size / median, "step_ms": 1000 * median, "spread": (max(times) - min(times)) / median,
            "first_s": first, "peak_mib": peak_rss_mib()}


def run_data(name: str, steps: int) -> dict[str, Any]:
    """Images/s of the preset's dataset through the trainer's data path (indices, items, stack)."""
    cfg = preset(name)
    start = time.perf_counter()
    dataset = open_dataset(cfg)
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(steps):
        torch.stack([dataset[j]["image"] for j in batch_indices(i, 0, cfg, len(dataset))])
    elapsed = time.perf_counter() - start
    return {"preset": name, "data": cfg.train.data, "img_s": steps * cfg.train.batch_size / elapsed, "open_s": open_s}


def in_subprocess(args: list[str]) -> dict[str, Any]:
    """Run this script with ``--worker`` and return the JSON it prints."""
    out = subprocess.run([sys.executable, __file__, "--worker", *args], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def train_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table; speedup is relative to the same preset's fp32 (eager) row if present."""
    base = {r["preset"]: r["img_s"] for r in rows if r["mode"] == "fp32"}
    lines = ["| preset | params (M) | batch | mode | images/s | step (ms) | spread | speedup vs fp32 eager | first step (s) | peak RSS (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speedup = f"{r['img_s'] / base[r['preset']]:.2f}x" if r["preset"] in base else "-"
        lines.append(f"| {r['preset']} | {r['params_m']:.2f} | {r['batch']} | {r['mode']} | {r['img_s']:.1f} | {r['step_ms']:.0f} "
                     f"| {100 * r['spread']:.0f}% | {speedup} | {r['first_s']:.1f} | {r['peak_mib']:.0f} |")
    return "\n".join(lines)


def data_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| preset | dataset | images/s (1 process) | open (s) |", "|---|---|---|---|"]
    lines += [f"| {r['preset']} | {r['data']} | {r['img_s']:.0f} | {r['open_s']:.2f} |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="+", default=list(PRESETS), choices=PRESETS)
    p.add_argument("--modes", nargs="+", default=list(MODES), help=f"precision[+flag...], flags: {', '.join(FLAGS)}")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first one")
    p.add_argument("--batch", type=int, default=0, help="batch size (0 = the preset's)")
    p.add_argument("--data-steps", type=int, default=5, help="batches for the data-loading rows (0 = skip)")
    p.add_argument("--no-train", action="store_true", help="only the data-loading rows")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    for mode in args.modes:
        parse_mode(mode)
    torch.set_num_threads(THREADS)
    if args.worker:
        name = args.presets[0]
        result = run_data(name, args.data_steps) if args.data else run_train(name, args.modes[0], args.steps, args.warmup, args.batch)
        print(json.dumps(result))
        return

    common = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch), "--data-steps", str(args.data_steps)]
    print(f"torch {torch.__version__}, {THREADS} threads")
    rows = []
    if not args.no_train:
        for name in args.presets:
            for mode in args.modes:
                rows.append(in_subprocess(["--presets", name, "--modes", mode, *common]))
                print(train_table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        print(train_table(rows))
    if args.data_steps:
        print()
        print(data_table([in_subprocess(["--data", "--presets", name, *common]) for name in args.presets]))


if __name__ == "__main__":
    main()
