"""Time to first image: `diffuse generate` from process start, and its parts.

Prints a table: the whole command in a fresh process (cold start), then, in one process,
import, model load, text encoding, sampling and saving, for batch 1 and batch 8.

    python bench/generate.py --model shapes --prompt "a red circle above a blue square"
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--prompt", default="a red circle above a blue square")
    ap.add_argument("--class-label", type=int)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    condition = ["--class", str(args.class_label)] if args.class_label is not None else [args.prompt]

    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        cold = []
        for r in range(args.repeats):
            cmd = [sys.executable, "-m", "diffuse", "generate", *condition, "--model", args.model, "--steps", str(args.steps),
                   "--seed", str(r), "--out", tmp, "--quiet"]
            _, seconds = timed(lambda: subprocess.run(cmd, check=True, capture_output=True))
            cold.append(seconds)
        rows.append(("`diffuse generate`, 1 image, fresh process (median)", sorted(cold)[len(cold) // 2]))

        _, t_import = timed(lambda: __import__("diffuse.pipeline"))
        from diffuse.pipeline import Pipeline

        pipe, t_load = timed(lambda: Pipeline.load(args.model))
        settings = pipe.defaults.__class__(**{**pipe.defaults.__dict__, "steps": args.steps})
        prompts = None if args.class_label is not None else [args.prompt]
        labels = [args.class_label] if args.class_label is not None else None
        _, t_text = timed(lambda: pipe.model.condition(prompts=prompts, labels=labels))
        rows += [("import diffuse", t_import), ("load model", t_load), ("encode condition (batch 1)", t_text)]
        for batch in (1, 8):
            runs = [timed(lambda: pipe(args.prompt if prompts else None, class_label=args.class_label,
                                       seeds=list(range(batch)), settings=settings, batch_size=batch))[1]
                    for _ in range(args.repeats)]
            rows.append((f"sample {args.steps} steps, batch {batch}: seconds per image", min(runs) / batch))
        images = pipe(args.prompt if prompts else None, class_label=args.class_label, seeds=[0], settings=settings)
        _, t_save = timed(lambda: images[0].save(Path(tmp) / "x.png"))
        rows.append(("save PNG with records", t_save))

    print(f"model {args.model}, sampler {settings.sampler}, cfg {settings.cfg}, {platform.processor() or platform.machine()}")
    print("| part | seconds |\n|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} |")


if __name__ == "__main__":
    main()
