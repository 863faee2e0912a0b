"""``diffuse eval``: prompt adherence and FID/KID/precision/recall, of a model's samples or a folder of images.

The command-line side of :mod:`diffuse.evaluate` (the metrics themselves live there); ``diffuse.cli`` builds the
parser and dispatches here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .cli_options import sample_settings, writable_folder

if TYPE_CHECKING:
    from .evaluate import AdherenceRun

def _guidance_scales(spec: str) -> list[float]:
    try:
        scales = [float(x) for x in spec.split(",")]
    except ValueError:
        raise ValueError(f"--guidance-sweep takes comma-separated guidance scales like 1,2,3,4,6, got {spec!r}") from None
    if any(w < 1 for w in scales) or len(set(scales)) != len(scales):
        raise ValueError(f"--guidance-sweep takes distinct guidance scales >= 1, got {spec!r}")
    return scales


def _free_path(path: Path, overwrite: bool) -> Path:
    if path.exists() and not overwrite:
        raise ValueError(f"{path} already exists; pass --overwrite to replace it or choose another path")
    return path


def _save_eval_images(run: "AdherenceRun", names: Sequence[str], families: Sequence[str], folder: Path, overwrite: bool) -> None:
    """Write a run's images (PNG with records) and a prompts.jsonl that `eval adherence --images` reads back."""
    import json

    from .evaluate import PROMPTS_FILE

    for g, name in zip(run.generated, names):
        g.save(folder / name, overwrite=overwrite)
    lines = [json.dumps({"file_name": n, "prompt": g.record["prompt"], "family": f})
             for n, g, f in zip(names, run.generated, families)]
    (folder / PROMPTS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")


def _adherence_of_folder(args: argparse.Namespace) -> dict:
    """Score the images in --images; print the table; return the JSON report."""
    from . import evaluate

    generation_flags = [flag for flag, v in (("--sampler", args.sampler), ("--steps", args.steps), ("--cfg", args.cfg),
                                             ("--schedule", args.schedule), ("--guidance-sweep", args.guidance_sweep),
                                             ("--eps-scaling", args.eps_scaling), ("--eps-scaling-k", args.eps_scaling_k), ("--dcw", args.dcw),
                                             ("--save-images", args.save_images)) if v]
    if generation_flags:
        raise ValueError(f"{', '.join(generation_flags)} only apply when generating with --model, not with --images")
    items, report = evaluate.score_folder(evaluate.read_prompted_folder(Path(args.images), skip_unprompted=args.skip_unprompted))
    print(f"{len(items)} images from {args.images}")
    print(report.table())
    return {"images": str(args.images), "runs": [{"settings": None, **evaluate.report_json(
        report, [it.prompt for it in items], [it.family for it in items], {"file": [it.path.name for it in items]})}]}


def _adherence_of_model(args: argparse.Namespace) -> dict:
    """Generate one image per evaluation prompt (per guidance scale) with --model, score, print; return the JSON report."""
    import dataclasses

    from tqdm import tqdm

    from . import evaluate
    from .pipeline import Pipeline
    from .shapes import eval_prompts

    if args.n_per_family < 1:
        raise ValueError(f"--n-per-family must be >= 1, got {args.n_per_family}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.guidance_sweep and args.cfg is not None:
        raise ValueError("give either --cfg or --guidance-sweep, not both")
    prompts, families = map(list, zip(*eval_prompts(args.n_per_family, args.prompt_seed)))
    pipe = Pipeline.load(args.model)
    evaluate.check_adherence_model(pipe, prompts)
    settings = sample_settings(pipe, args)
    planning = pipe.planning(args.plan_layout)
    scales = _guidance_scales(args.guidance_sweep) if args.guidance_sweep else [settings.cfg]
    folders = {w: Path(args.out) / (f"cfg-{w:g}" if args.guidance_sweep else "") for w in scales}
    names = [f"{i:04d}-{f}-s{args.seed_base + i}.png" for i, f in enumerate(families)]
    if args.save_images:
        for folder in folders.values():
            writable_folder(folder)
            for name in [evaluate.PROMPTS_FILE, *names]:
                _free_path(folder / name, args.overwrite)
    print(f"model {pipe.name} ({pipe.model_hash}): {len(prompts)} prompts ({args.n_per_family} per family), "
          f"{settings.sampler}, {settings.steps} steps, {settings.schedule} schedule, "
          f"seeds {args.seed_base}-{args.seed_base + len(prompts) - 1}{', planned layouts' if planning else ''}")
    runs = []
    for w in scales:
        bar = tqdm(total=len(prompts) * settings.steps, desc=f"cfg {w:g}", unit="step", disable=args.quiet)
        runs.append(evaluate.adherence_run(pipe, prompts, families, dataclasses.replace(settings, cfg=w), seed_base=args.seed_base,
                                           batch_size=args.batch_size, callback=lambda info: bar.update(len(info.x)),
                                           plan_layout=planning))
        bar.close()
        if args.save_images:
            _save_eval_images(runs[-1], names, families, folders[w], args.overwrite)
    result = {"model": pipe.name, "model_hash": pipe.model_hash, "n_per_family": args.n_per_family, "plan_layout": planning,
              "prompt_seed": args.prompt_seed, "seed_base": args.seed_base,
              "runs": [{"settings": dataclasses.asdict(r.settings),
                        **evaluate.report_json(r.report, prompts, families, {"seed": r.seeds})} for r in runs]}
    if args.guidance_sweep:
        best = evaluate.best_run(runs)
        o = best.report.overall
        print(evaluate.sweep_table(runs))
        print(f"best guidance scale: {best.settings.cfg:g} (overall {o.accuracy:.3f} [{o.low:.3f}, {o.high:.3f}])")
        result["best_cfg"] = best.settings.cfg
    else:
        interval = f", guidance where {settings.cfg_interval[0]:g} < sigma <= {settings.cfg_interval[1]:g}" if settings.cfg_interval else ""
        print(f"cfg {settings.cfg:g}{interval}")
        print(runs[0].report.table())
    if args.save_images:
        print(f"images and {evaluate.PROMPTS_FILE} in {args.out}")
    return result


def _eval_adherence(args: argparse.Namespace) -> int:
    import json

    if (args.model is None) == (args.images is None):
        raise ValueError("give --model M to generate and score images, or --images DIR to score existing images (not both)")
    json_path = _free_path(Path(args.json), args.overwrite) if args.json else None
    result = _adherence_of_folder(args) if args.images is not None else _adherence_of_model(args)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2), encoding="utf-8")
        print(f"report: {json_path}")
    return 0


def _eval_fid(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from tqdm import tqdm

    from . import evaluate
    from .pipeline import Pipeline

    if (args.model is None) == (args.images is None):
        raise ValueError("give --model M to generate and score images, or --images DIR to score existing images (not both)")
    if args.n is not None and args.n < 2:
        raise ValueError(f"--n must be >= 2, got {args.n}")
    json_path = _free_path(Path(args.json), args.overwrite) if args.json else None
    if args.images is not None:
        report = evaluate.fid_of_folder(Path(args.images), args.ref, n_boot=args.n_boot)
        settings = None
    else:
        pipe = Pipeline.load(args.model)
        settings = sample_settings(pipe, args)
        total = evaluate.reference_count(args.ref, pipe.model.cfg.image_size, args.n)
        bar = tqdm(total=total * settings.steps, desc="generate", unit="step", disable=args.quiet)
        report = evaluate.fid_run(pipe, args.ref, settings, n=args.n, seed_base=args.seed_base, batch_size=args.batch_size,
                                  n_boot=args.n_boot, callback=lambda info: bar.update(len(info.x)))
        bar.close()
        print(f"model {pipe.name} ({pipe.model_hash}): {settings.sampler}, {settings.steps} steps, cfg {settings.cfg:g}, "
              f"eps scaling {settings.eps_scaling:g} (k {settings.eps_scaling_k:g}), dcw {settings.dcw:g}")
    lo, hi = report.fid_interval
    klo, khi = report.kid_interval
    print(f"FID {report.fid:.2f} [{lo:.2f}, {hi:.2f}]  KID x1e3 {report.kid * 1e3:.2f} [{klo * 1e3:.2f}, {khi * 1e3:.2f}]  "
          f"precision {report.precision:.3f}  recall {report.recall:.3f}  "
          f"(n = {report.n_generated} generated vs {report.n_reference} reference {args.ref}; 95% bootstrap intervals)")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"settings": dataclasses.asdict(settings) if settings else None,
                                         "model": args.model, "images": args.images, **dataclasses.asdict(report)}, indent=2))
        print(f"report: {json_path}")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"adherence": _eval_adherence, "fid": _eval_fid}[args.metric](args)
