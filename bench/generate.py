"""Time to first image: `diffuse generate` from process start, and its parts.

Prints three tables:

* the cold start of ``diffuse generate PROMPT`` (a fresh process, progress bar on, as a user runs
  it): interpreter start, imports, argument parsing and checks, model load (and the weights'
  SHA-256), text encoding, sampling, watermarking, saving and interpreter exit, timed inside the
  real command (the bench wraps the pipeline's functions with timers; each part's own time,
  nested parts excluded), then the whole command timed from outside;
* the import part split into the top modules by cumulative time, from ``python -X importtime``
  of the same command: each module's time goes to the first package on its import chain that is
  not diffuse (numpy imported by torch counts as torch), diffuse's own modules to ``diffuse``;
* in one process after warm-up: import, model load, text encoding, sampling at batch 1 and 8
  (seconds per image) and saving.

Every fresh process runs with Python's bytecode cache on (PYTHONDONTWRITEBYTECODE removed from its
environment), after one uncounted warm-up run: the state of an installed package.

    python bench/generate.py --model shapes --prompt "a red circle" --repeats 3
"""

from __future__ import annotations

import time

_T_START = time.time()  # first thing: a child's "interpreter start" ends here

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

TOP_MODULES = 6  # rows of the import split (the rest is summed as "other")


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


class Phases:
    """Exclusive time per named part: a timed call nested in another counts only for itself."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.stack: list[list[Any]] = []  # [name, start of its current uninterrupted stretch]

    def wrap(self, name: str, fn: Callable) -> Callable:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            now = time.perf_counter()
            if self.stack:
                outer = self.stack[-1]
                self.seconds[outer[0]] += now - outer[1]
            self.stack.append([name, now])
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.seconds[name] += end - self.stack.pop()[1]
                if self.stack:
                    self.stack[-1][1] = end

        return timed_call


def child(argv: list[str]) -> None:
    """In a fresh process: import what the command imports, wrap its parts with timers, run it."""
    t_imported = time.time()
    from diffuse import cli, model, pipeline, watermark

    t_imported = time.time() - t_imported
    phases = Phases()
    pipeline.Pipeline.load = phases.wrap("model load", pipeline.Pipeline.load)
    for name, owner, attr in (("weights SHA-256 (model hash)", pipeline, "file_hash"), ("sampling", pipeline, "generate"),
                              ("text encoding", model.DiffusionModel, "condition"),
                              ("watermark", watermark, "mark_generated"), ("save PNG with records", pipeline, "save_png")):
        setattr(owner, attr, phases.wrap(name, getattr(owner, attr)))
    t_main = time.perf_counter()
    code = cli.main(argv)
    t_main = time.perf_counter() - t_main
    parts = {"imports": t_imported, "rest of the command (argument parsing, checks, progress bar)": t_main - sum(phases.seconds.values()),
             **phases.seconds}
    print(json.dumps({"start": _T_START, "parts": parts, "end": time.time(), "code": code}))


def fresh_env() -> dict[str, str]:
    """The environment of the fresh processes: ours, with the bytecode cache on."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def command_parts(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """One fresh process of the command with timers: its parts from process start to exit."""
    spawned = time.time()
    r = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, env=env)
    done = time.time()
    if r.returncode != 0:
        raise SystemExit(f"the timed command failed:\n{r.stderr}")
    report = json.loads(r.stdout.strip().splitlines()[-1])
    return {"interpreter start": report["start"] - spawned, **report["parts"], "interpreter exit": done - report["end"]}


def import_split(argv: list[str], env: dict[str, str]) -> tuple[list[tuple[str, float]], float]:
    """(top modules by cumulative import seconds, total) from ``-X importtime`` of the command: every import
    from the first of diffuse on (those at start-up and later ones such as Pillow's plugins at save);
    the interpreter's own start-up imports (site, encodings) before it are left out."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "diffuse", *argv], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"the command failed under -X importtime:\n{r.stderr[-2000:]}")
    rows = [(int(m[1]), (len(m[2]) - 1) // 2, m[3]) for m in
            re.finditer(r"^import time:\s+(\d+) \|\s+\d+ \|( +)(\S+)$", r.stderr, re.MULTILINE)]
    groups: list[list[tuple[int, int, str]]] = [[]]  # one per top-level import: it and, before it, what it imported
    for row in rows:
        groups[-1].append(row)
        if row[1] == 0:
            groups.append([])
    first = next(i for i, g in enumerate(groups) if g and g[-1][2].startswith("diffuse"))
    owner: dict[str, float] = collections.defaultdict(float)
    for group in groups[first:]:
        chain: list[str] = []
        for self_us, depth, name in reversed(group):  # importtime prints a module after its imports: reversed, parents first
            chain = chain[:depth] + [name]
            outside = [m for m in chain if not m.startswith("diffuse")]
            owner[outside[0].split(".")[0] if outside else "diffuse (own modules)"] += self_us / 1e6
    ranked = sorted(owner.items(), key=lambda kv: -kv[1])
    top = ranked[:TOP_MODULES] + ([("other", sum(s for _, s in ranked[TOP_MODULES:]))] if len(ranked) > TOP_MODULES else [])
    return top, sum(owner.values())


def table(rows: list[tuple[str, float]], head: str = "| part | seconds |\n|---|---|") -> str:
    return "\n".join([head, *(f"| {name} | {seconds:.3f} |" for name, seconds in rows)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--prompt", default="a red circle")
    ap.add_argument("--class-label", type=int)
    ap.add_argument("--steps", type=int, help="solver steps (default: the model's)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    condition = ["--class", str(args.class_label)] if args.class_label is not None else [args.prompt]
    steps = ["--steps", str(args.steps)] if args.steps else []
    env = fresh_env()

    with tempfile.TemporaryDirectory() as tmp:
        def argv(run: str, *extra: str) -> list[str]:
            return ["generate", *condition, "--model", args.model, *steps, "--out", str(Path(tmp) / run), *extra]

        subprocess.run([sys.executable, "-m", "diffuse", *argv("warm-up", "--quiet")], check=True, capture_output=True, env=env)
        start = [timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True, env=env))[1] for _ in range(args.repeats)]
        whole = [timed(lambda: subprocess.run([sys.executable, "-m", "diffuse", *argv(f"cold{r}")], check=True,
                                              capture_output=True, env=env))[1] for r in range(args.repeats)]
        runs = [command_parts(argv(f"parts{r}"), env) for r in range(args.repeats)]
        split, import_total = import_split(argv("importtime", "--quiet"), env)
        parts = [(name, statistics.median(run[name] for run in runs)) for name in runs[0]]

        _, t_import = timed(lambda: __import__("diffuse.pipeline"))
        from diffuse.pipeline import Pipeline

        pipe, t_load = timed(lambda: Pipeline.load(args.model))
        settings = pipe.defaults.__class__(**{**pipe.defaults.__dict__, "steps": args.steps or pipe.defaults.steps})
        prompts = None if args.class_label is not None else [args.prompt]
        labels = [args.class_label] if args.class_label is not None else None
        _, t_text = timed(lambda: pipe.model.condition(prompts=prompts, labels=labels))
        rows = [("`diffuse generate`, 1 image, fresh process (median)", statistics.median(whole)),
                ("import diffuse.pipeline", t_import), ("load model", t_load), ("encode condition (batch 1)", t_text)]
        for batch in (1, 8):
            times = [timed(lambda: pipe(args.prompt if prompts else None, class_label=args.class_label,
                                        seeds=list(range(batch)), settings=settings, batch_size=batch))[1]
                     for _ in range(args.repeats)]
            rows.append((f"sample {settings.steps} steps, batch {batch}: seconds per image", min(times) / batch))
        images = pipe(args.prompt if prompts else None, class_label=args.class_label, seeds=[0], settings=settings)
        _, t_save = timed(lambda: images[0].save(Path(tmp) / "x.png"))
        rows.append(("save PNG with records", t_save))

    print(f"model {args.model}, sampler {settings.sampler}, {settings.steps} steps, cfg {settings.cfg}, "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, median of {args.repeats} fresh processes each")
    print(f"\nCold start of `diffuse generate {' '.join(condition)!r}` to the first PNG on disk (the parts of one "
          "process, timed inside it):\n")
    to_png = sum(s for name, s in parts if name != "interpreter exit")
    print(table(parts + [("**to the first PNG on disk** (the parts before exit)", to_png),
                         ("to the process's exit (all the parts)", sum(s for _, s in parts))]))
    print(f"\ncold start, timed from outside: {statistics.median(whole):.3f} s (interpreter alone, `python -c pass`: "
          f"{statistics.median(start):.3f} s)")
    print(f"\nImports by top module, cumulative (`-X importtime`, one run, {import_total:.3f} s in all; "
          "importtime itself adds overhead):\n")
    print(table(split, "| module (with what it imports) | seconds |\n|---|---|"))
    print("\nIn one process, after warm-up:\n")
    print(table(rows))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(sys.argv[2:])
    else:
        main()
