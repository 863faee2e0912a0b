"""Does the training fast path learn the same thing? Loss curves of the real trainer in fp32 eager and
in the fast modes, against the seed-to-seed noise of fp32 itself (issue #9: "the same loss curve within noise").

Each run is ``diffuse.train.train`` on a preset (default ``digits``, the real scikit-learn digits) for
``--steps`` optimizer steps with evaluations and previews off, in its own process. The runs:

* ``fp32`` at seed 0 and at seed 1: the yardstick. A different seed changes the initial weights, the
  data order and the noise draws, so |fp32 seed 1 - fp32 seed 0| is how much two equally good runs
  differ;
* each of ``--modes`` (default ``bf16``, ``bf16+compile``; bench/train.py's mode syntax, of which the
  trainer has ``+compile``) at seed 0. Sharing seed 0 with the first fp32 run, a mode's curve tracks it
  closely at first, so the verdict below detects a systematic offset larger than seed-to-seed noise,
  not small ones.

The loss is averaged over windows of ``--window`` steps (the trainer logs the mean loss of every
``train.log_every`` = 10 steps). A mode's curve is "within noise" when its largest window difference
from fp32 seed 0 is no larger than the largest fp32 seed-to-seed difference. Speed is not measured
here (bench/train.py does); each worker's wall time is only printed.
A run folder already holding a finished run of the same settings is reused, an interrupted one resumed
(bench/ablation.py's ``run_variant``), so the script can be re-run until done.

    python bench/losscurve.py                          # digits, 1000 steps
    python bench/losscurve.py --steps 600              # the run in bench/RESULTS.md
    python bench/losscurve.py --preset tiny --steps 100 --out runs/losscurve-quick   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ablation import run_variant  # noqa: E402  (bench/ablation.py)
from train import parse_mode  # noqa: E402  (bench/train.py)

from diffuse.config import RunConfig, apply_overrides, preset  # noqa: E402
from diffuse.plot import line_chart  # noqa: E402
from diffuse.train import METRICS  # noqa: E402


def run_name(mode: str, seed: int) -> str:
    return f"{mode.replace('+', '-')}-seed{seed}"


def run_config(args: argparse.Namespace, mode: str, seed: int) -> RunConfig:
    """The preset with this mode's precision and compile switch, this seed, and evaluations off."""
    try:
        precision, flags = parse_mode(mode)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    if flags - {"compile"}:
        raise SystemExit(f"error: mode {mode!r}: the trainer has no {', '.join(sorted(flags - {'compile'}))} switch; "
                         f"use fp32 or bf16, optionally +compile")
    return apply_overrides(preset(args.preset), [
        f"train.precision={precision}", f"train.compile={str('compile' in flags).lower()}", f"train.seed={seed}",
        f"train.max_steps={args.steps}", "train.eval_every=0", f"train.sample_every={10 * args.steps}",
        f"train.checkpoint_every={args.steps}"])


def windows(run_dir: Path, window: int) -> dict[int, float]:
    """{last step of each window: mean logged loss} of one run."""
    with open(run_dir / METRICS, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["loss"]]
    means: dict[int, list[float]] = {}
    for r in rows:
        means.setdefault(((int(r["step"]) - 1) // window + 1) * window, []).append(float(r["loss"]))
    return {k: sum(v) / len(v) for k, v in means.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="digits")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--window", type=int, default=100, help="steps per averaged window of the loss")
    p.add_argument("--modes", nargs="+", default=["bf16", "bf16+compile"])
    p.add_argument("--out", type=Path, default=Path("runs/losscurve"))
    p.add_argument("--worker", nargs=2, metavar=("MODE", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:  # train, resume, or skip when done, one run in this process
        mode, seed = args.worker[0], int(args.worker[1])
        run_variant(run_name(mode, seed), run_config(args, mode, seed), args.out / run_name(mode, seed))
        return 0

    runs = [("fp32", 0), ("fp32", 1), *((m, 0) for m in args.modes)]
    for mode, seed in runs:  # check every mode before training any
        run_config(args, mode, seed)
    for mode, seed in runs:
        start = time.perf_counter()
        if subprocess.run([sys.executable, __file__, "--worker", mode, str(seed), "--preset", args.preset, "--steps",
                           str(args.steps), "--out", str(args.out)]).returncode:
            raise SystemExit(f"error: the {run_name(mode, seed)} run failed (its message is above)")
        print(f"{run_name(mode, seed)}: {time.perf_counter() - start:.0f} s in this invocation", flush=True)

    curves = {run_name(m, s): windows(args.out / run_name(m, s), args.window) for m, s in runs}
    base, other = curves["fp32-seed0"], curves["fp32-seed1"]
    noise = max(abs(other[k] - base[k]) for k in base)
    lines = ["| run | " + " | ".join(str(k) for k in sorted(base)) + " | max abs diff vs fp32 seed 0 | within noise |",
             "|---|" + "---|" * len(base) + "---|---|"]
    for name, curve in curves.items():
        diff = max(abs(curve[k] - base[k]) for k in base)
        verdict = "-" if name.startswith("fp32") else ("yes" if diff <= noise else "no")
        lines.append(f"| {name} | " + " | ".join(f"{curve[k]:.4f}" for k in sorted(base))
                     + f" | {diff:.4f} | {verdict} |")
    table = "\n".join(lines)
    chart = args.out / "loss_curves.png"
    line_chart({name: sorted(c.items()) for name, c in curves.items()}, chart,
               title=f"{args.preset}: training loss, mean of {args.window}-step windows", size=(760, 400))
    (args.out / "table.md").write_text(table + "\n")
    print(f"\nmean training loss per {args.window}-step window (column = last step of the window); "
          f"fp32 seed-to-seed noise = {noise:.4f}\n{table}\n\nchart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
