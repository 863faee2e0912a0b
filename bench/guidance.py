"""Time to a good image: prompt adherence vs wall time per image for guidance intervals and fewer steps.

For the shipped ``shapes`` model (or ``--model``), every configuration samples the same evaluation
prompts (``shapes.eval_prompts``, ``--n-per-family`` per family) with the same seeds (image i from
seed ``--seed-base + i``), dpmpp_2m on the Karras schedule at the model's guidance scale, batch
``--batch-size``, and is scored with the project's adherence scorer (``diffuse eval adherence``:
per-family accuracy and the overall mean with percentile-bootstrap 95% intervals). Configurations:
every step count of ``--steps`` with guidance on every step and with each guidance interval of
``--intervals``: guidance only where LO < sigma <= HI, the unconditional branch skipped elsewhere
(Kynkaanniemi et al. 2024, "Applying guidance in a limited interval improves sample and
distribution quality"). The plain recipe is the first step count (20) with guidance on every step.

Wall time per image is the sampling call alone (``Pipeline.generate_batch``: sampling, decoding,
watermark, record), after one uncounted warm-up batch; scoring is not timed. U-Net evaluations per
image are counted on the network (rows through its forward / images), so a guided step counts 2
and a step outside the interval 1. The speedups are against the plain recipe; the issue's goal is
the plain recipe's adherence (and at least 0.90) in a third of its wall time per image.

    python bench/guidance.py                      # the full grid: 4 step counts x (every step + 3 intervals)
    python bench/guidance.py --quick              # minutes: 2 prompts per family, plain vs 10 steps with an interval
    python bench/guidance.py --n-per-family 100 --steps 20,10,8 --intervals "1,80;0.3,5"
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffuse import adherence, shapes  # noqa: E402
from diffuse.pipeline import Pipeline, SampleSettings  # noqa: E402

Interval = Optional[tuple[float, float]]


@dataclasses.dataclass
class Row:
    steps: int
    interval: Interval
    seconds_per_image: float
    evals_per_image: float
    report: adherence.Report


def parse_intervals(spec: str) -> list[tuple[float, float]]:
    """'1,80;0.3,5' -> [(1.0, 80.0), (0.3, 5.0)] (checked like --cfg-interval)."""
    out = []
    for part in filter(None, spec.split(";")):
        try:
            lo, hi = (float(v) for v in part.split(","))
            out.append(SampleSettings(cfg_interval=(lo, hi)).cfg_interval)
        except ValueError as e:
            raise SystemExit(f"--intervals takes LO,HI pairs separated by ';', e.g. '1,80;0.3,5'; {part!r}: {e}") from None
    return out


def run(pipe: Pipeline, settings: SampleSettings, prompts: list[str], families: list[str], seeds: list[int],
        batch_size: int) -> Row:
    """Sample every prompt with ``settings`` (timed, U-Net rows counted), then score."""
    rows = []
    hook = pipe.model.denoiser.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        start = time.perf_counter()
        generated = pipe.generate_batch(seeds, prompts=prompts, settings=settings, batch_size=batch_size, plan_layout=False)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
    report = adherence.evaluate([np.asarray(g.image.convert("RGB")) for g in generated], prompts, families)
    return Row(settings.steps, settings.cfg_interval, seconds / len(seeds), sum(rows) / len(seeds), report)


def describe(interval: Interval) -> str:
    return "every step" if interval is None else f"{interval[0]:g} < sigma <= {interval[1]:g}"


def markdown(rows: list[Row]) -> str:
    plain = rows[0]
    names = [s.family for s in plain.report.families]
    head = ["steps", "guidance", "U-Net evals / image", "s / image", "speedup (wall)", "speedup (evals)",
            *names, "overall [95% CI]"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        fams = [f"{s.accuracy:.2f} [{s.low:.2f}, {s.high:.2f}]" for s in r.report.families]
        o = r.report.overall
        lines.append("| " + " | ".join([str(r.steps), describe(r.interval), f"{r.evals_per_image:g}", f"{r.seconds_per_image:.3f}",
                                        f"{plain.seconds_per_image / r.seconds_per_image:.2f}x",
                                        f"{plain.evals_per_image / r.evals_per_image:.2f}x", *fams,
                                        f"{o.accuracy:.3f} [{o.low:.3f}, {o.high:.3f}]"]) + " |")
    return "\n".join(lines)


def verdict(rows: list[Row]) -> str:
    """The fastest configuration at least as adherent as the plain recipe, against the issue's goal."""
    plain = rows[0]
    good = [r for r in rows[1:] if r.report.overall.accuracy >= plain.report.overall.accuracy]
    if not good:
        return f"no configuration reaches the plain recipe's overall adherence ({plain.report.overall.accuracy:.3f})"
    best = min(good, key=lambda r: r.seconds_per_image)
    speedup = plain.seconds_per_image / best.seconds_per_image
    o = best.report.overall
    return (f"fastest configuration with overall adherence >= the plain recipe's ({plain.report.overall.accuracy:.3f}): "
            f"{best.steps} steps, guidance {describe(best.interval)}: {o.accuracy:.3f} [{o.low:.3f}, {o.high:.3f}], "
            f"{speedup:.2f}x faster per image ({plain.evals_per_image / best.evals_per_image:.2f}x fewer U-Net evaluations); "
            f"goal (>= 3x, adherence >= 0.90): {'met' if speedup >= 3 and o.accuracy >= 0.90 else 'not met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes", help="text-to-image shapes model (shipped name or folder)")
    ap.add_argument("--n-per-family", type=int, default=50, help="evaluation prompts per family (7 families)")
    ap.add_argument("--steps", default="20,15,12,10", help="step counts; the first, guided every step, is the plain recipe")
    ap.add_argument("--intervals", default="1,80;0.3,5;1,20", help="guidance intervals LO,HI in sigma, ';'-separated")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt-seed", type=int, default=0)
    ap.add_argument("--seed-base", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="2 prompts per family; the plain recipe vs 10 steps with the first interval")
    args = ap.parse_args()

    steps = [int(s) for s in args.steps.split(",")]
    intervals = parse_intervals(args.intervals)
    configs = [(n, iv) for n in steps for iv in [None, *intervals]]
    if args.quick:
        args.n_per_family, configs = 2, [(steps[0], None), (10, intervals[0])]
    pipe = Pipeline.load(args.model)
    prompts, families = map(list, zip(*shapes.eval_prompts(args.n_per_family, args.prompt_seed)))
    seeds = [args.seed_base + i for i in range(len(prompts))]
    base = dataclasses.replace(pipe.defaults, sampler="dpmpp_2m", schedule="karras", sampler_options={})
    print(f"model {pipe.name} ({pipe.model_hash}), dpmpp_2m karras, cfg {base.cfg:g}, {len(prompts)} prompts "
          f"({args.n_per_family} per family), seeds {seeds[0]}-{seeds[-1]}, batch {args.batch_size}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}", flush=True)
    warm = dataclasses.replace(base, steps=2, cfg_interval=None)
    pipe.generate_batch(seeds[:args.batch_size], prompts=prompts[:args.batch_size], settings=warm, batch_size=args.batch_size,
                        plan_layout=False)
    rows = []
    for n, interval in configs:
        rows.append(run(pipe, dataclasses.replace(base, steps=n, cfg_interval=interval), prompts, families, seeds, args.batch_size))
        r = rows[-1]
        print(f"  {n} steps, guidance {describe(interval)}: {r.evals_per_image:g} U-Net evals/image, "
              f"{r.seconds_per_image:.3f} s/image, overall {r.report.overall.accuracy:.3f}", flush=True)
    print()
    print(markdown(rows))
    print()
    print(verdict(rows))


if __name__ == "__main__":
    main()
