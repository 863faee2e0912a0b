"""The ``diffuse`` command (also ``python -m diffuse``): one subcommand per job.

Errors a user can fix (bad arguments, missing files, bad checkpoints) print one line,
``error: ...``, and exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

EXAMPLES = {
    "train": "diffuse train --preset tiny --out runs/tiny\n  diffuse train --preset shapes-t2i --out runs/shapes --set train.lr=2e-4 --max-steps 5000\n  diffuse train --out runs/shapes --resume",
    "export": "diffuse export runs/shapes --out models/my-shapes",
    "generate": 'diffuse generate "a red circle above a blue square" --seed 0-7 --out out/',
    "presets": "diffuse presets",
    "samplers": "diffuse samplers",
}


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the example block's line breaks."""


def _subparser(subs: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    return subs.add_parser(name, help=help_text, description=help_text, formatter_class=Formatter,
                           epilog=f"example:\n  {EXAMPLES[name]}")


# ---------------------------------------------------------------- commands

def cmd_train(args: argparse.Namespace) -> int:
    import dataclasses

    from .config import RunConfig, apply_overrides, preset
    from .train import train

    if args.resume:
        if args.preset or args.set:
            raise ValueError("--resume continues a run with its saved config; drop --preset and --set (only --max-steps may change)")
        cfg = RunConfig()
    else:
        cfg = apply_overrides(preset(args.preset or "tiny"), args.set or [])
    if args.max_steps is not None:
        if args.max_steps < 1:
            raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=args.max_steps))
    elif args.resume:
        from .checkpoint import read_json

        cfg = RunConfig.from_dict(read_json(Path(args.out) / "config.json"))
    result = train(cfg, Path(args.out), resume=args.resume, device=args.device)
    print(f"trained to step {result.step} (last loss {result.last_loss:.4f}, {result.bad_steps} skipped steps); run folder: {result.run_dir}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .train import export_run

    out = export_run(Path(args.run_dir), Path(args.out), overwrite=args.overwrite, dtype=args.dtype)
    print(f"wrote model folder {out}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import presets

    for name, cfg in presets().items():
        m, t = cfg.model, cfg.train
        print(f"{name:12s} {m.backbone:5s} {m.conditioning:6s} {m.image_size}x{m.image_size}x{m.channels}  data={t.data} "
              f"batch={t.batch_size} steps={t.max_steps} lr={t.lr} precision={t.precision}")
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    from .samplers import SAMPLERS
    from .schedules import SCHEDULES

    for name, fn in SAMPLERS.items():
        opts = ", ".join(f"{k}={v}" for k, v in fn.options.items()) or "-"
        kind = "stochastic" if fn.stochastic else "deterministic"
        print(f"{name:20s} {kind:13s} options: {opts}")
    print("schedules: " + ", ".join(SCHEDULES))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "export": cmd_export, "presets": cmd_presets, "samplers": cmd_samplers,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffuse", description="Diffusion-model image generation: train, sample, evaluate.",
                                     formatter_class=Formatter)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs.required = True

    p = _subparser(subs, "train", "Train a denoiser from a preset (or resume a run).")
    p.add_argument("--preset", help="preset name (see `diffuse presets`); default tiny")
    p.add_argument("--out", required=True, help="run folder (config, checkpoints/, samples/, metrics.csv, loss.png)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.lr=1e-4 (repeatable)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides train.max_steps)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")

    p = _subparser(subs, "export", "Write a model folder (EMA weights + config + tokenizer) from a run.")
    p.add_argument("run_dir", help="training run folder")
    p.add_argument("--out", required=True, help="model folder to create")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="storage dtype of the weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")

    _subparser(subs, "presets", "List training presets.")
    _subparser(subs, "samplers", "List samplers, their options, and sigma schedules.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from .checkpoint import CheckpointError

    try:
        return COMMANDS[args.command](args)
    except (ValueError, CheckpointError, FileNotFoundError, PermissionError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from .train import TrainingError

        if isinstance(e, TrainingError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
