"""Command-line flags turned into pipeline objects, shared by the ``diffuse`` subcommands (generate, edit, eval):
sampling settings, fast-path and provenance options, output folders and file names, writing results."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

if TYPE_CHECKING:
    from .credentials import SigningKeys
    from .pipeline import Generated, Pipeline, SampleSettings


def slug(text: str, limit: int = 60) -> str:
    """A file-name stem from a prompt: lower-case words joined by '-', at most ``limit`` characters."""
    words = "".join(c if c.isalnum() else " " for c in text.lower()).split()
    return "-".join(words)[:limit].strip("-") or "image"


def writable_folder(path: Path) -> Path:
    """``path``, created if needed; a one-line error when it cannot be created or written to."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create output folder {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK):
        raise ValueError(f"output folder {path} is not writable; choose another --out")
    return path


def sample_settings(pipe: "Pipeline", args: argparse.Namespace) -> "SampleSettings":
    """The model's sampling defaults with --sampler/--steps/--cfg/--schedule applied and checked."""
    import dataclasses

    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    settings = dataclasses.replace(pipe.defaults, **setting_flags(args))
    if settings.cfg == 1.0 and settings.cfg_interval is not None and getattr(args, "cfg_interval", None) is not None:
        raise ValueError("--cfg-interval limits guidance, but this run has none (cfg 1); give --cfg above 1 too")
    return settings


def setting_flags(args: argparse.Namespace) -> dict:
    """The sampling flags the user gave (--sampler, --steps, --cfg, --cfg-interval, --schedule, --eps-scaling[-k], --dcw)."""
    flags = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps), ("cfg", args.cfg), ("schedule", args.schedule),
                               *((k, getattr(args, k, None)) for k in ("eps_scaling", "eps_scaling_k", "dcw"))) if v is not None}
    if getattr(args, "cfg_interval", None) is not None:
        flags["cfg_interval"] = _cfg_interval(args.cfg_interval)
    return flags


def _cfg_interval(spec: str) -> Optional[tuple[float, float]]:
    """--cfg-interval LO,HI (sigmas; SampleSettings checks 0 <= LO < HI), or none: guidance on every step."""
    if spec.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in spec.split(","))
    except ValueError:
        raise ValueError(f"--cfg-interval takes two sigmas LO,HI (guidance where LO < sigma <= HI), e.g. 0.3,5, "
                         f"or none; got {spec!r}") from None
    return lo, hi


def fast_path_options(args: argparse.Namespace) -> dict:
    """Pipeline.load's keywords from the fast-path flags."""
    return {"precision": args.precision, "channels_last": args.channels_last, "compile": args.compile}


def provenance_options(pipe: "Pipeline", args: argparse.Namespace) -> Optional["SigningKeys"]:
    """Apply --blocklist and --no-watermark to the pipeline; the signing keys of --sign (or None)."""
    from .credentials import SigningKeys
    from .safety import PromptFilter

    if args.blocklist is not None:
        pipe.prompt_filter = None if args.blocklist == "none" else PromptFilter.load(args.blocklist)
    pipe.watermark = not args.no_watermark
    return SigningKeys.load(Path(args.sign)) if args.sign else None


def write_results(items: Sequence["Generated"], paths: Sequence[Path], args: argparse.Namespace, keys: Optional["SigningKeys"],
                   ingredient: Optional[Path] = None) -> None:
    """Save each result PNG (signed with --sign; an edit's input file is the manifest's ingredient), print its
    path, and say when no watermark was added."""
    from .credentials import sign_png

    for item, path in zip(items, paths):
        item.save(path, overwrite=args.overwrite)
        if keys is not None:
            sign_png(path, keys, item.record, ingredient=ingredient)
        print(path)
    if not items[0].record["watermark"]["applied"] and not args.quiet:
        print(f"note: no invisible watermark was added: {items[0].record['watermark']['reason']}", file=sys.stderr)
