"""Training-choice ablation on `digits` at equal compute: FID vs images seen for loss weightings
(uniform, min-SNR, EDM) and parameterizations (eps, v, EDM), as a table and a PNG chart.

Every variant starts from the `digits` preset and changes only its parameterization
(``model.precond``) and loss weighting (``loss.weighting``): same U-Net, data order, noise-level
distribution (log-normal, Karras et al. 2022), optimizer, learning-rate schedule, steps and batch,
hence the same images seen and nearly the same FLOPs (the backbone dominates; the preconditioning
is a few multiply-adds per pixel). The FID comes from the trainer's own evaluation
(``train.eval_every``, :mod:`diffuse.train_eval`): the EMA weights every K steps, image i conditioned
like training image i and drawn with seed i, against the first ``eval_n`` training images, with
95% bootstrap intervals; so every variant is measured at the same image counts, seeds and n.

The variants (``--variants``, each ``parameterization:weighting``):

* ``eps:uniform`` -- epsilon prediction with L_simple (Ho et al. 2020);
* ``eps:min_snr`` -- the same with min-SNR-5 weighting (Hang et al. 2023, Eq. 9);
* ``eps:edm`` -- the same with EDM's lambda(sigma) (Karras et al. 2022, Table 1);
* ``v:uniform`` -- v-prediction with its MSE (Salimans & Ho 2022, §4) for unit data variance,
  i.e. ``model.sigma_data=1`` (with the preset's sigma_data = 0.5 the v coefficients are EDM's with
  F negated, the same training: tests/test_precond.py);
* ``edm:uniform`` -- EDM preconditioning and loss (for EDM, 'uniform' and 'edm' weightings coincide),
  the shipped digits recipe.

Runs go to ``--out`` (default ``runs/ablation``, git-ignored), one folder per variant; a finished
variant is skipped (also when only its config.json and metrics.csv were kept) and an interrupted one resumes
from its newest checkpoint, so the script can be re-run until done, on another machine too. ``--quick``
trains a few dozen steps on a tiny evaluation set: a smoke test of the script, not a result.

    python bench/ablation.py                   # the full ablation (3000 steps x 5 variants)
    python bench/ablation.py --quick           # minutes
    python bench/ablation.py --variants edm:uniform,edm:min_snr --steps 1500
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffuse import checkpoint  # noqa: E402
from diffuse.config import RunConfig, apply_overrides, preset  # noqa: E402
from diffuse.losses import WEIGHTINGS  # noqa: E402
from diffuse.plot import line_chart  # noqa: E402
from diffuse.train import METRICS, RUN_CONFIG, train  # noqa: E402

PARAMETERIZATIONS = {"eps": [], "v": ["model.sigma_data=1.0"], "edm": []}  # extra overrides per parameterization
FULL = dict(variants="eps:uniform,eps:min_snr,eps:edm,v:uniform,edm:uniform", steps=3000, batch=64, eval_every=500,
            eval_n=512, eval_steps=20, out=Path("runs/ablation"))
QUICK = dict(variants="eps:uniform,eps:min_snr,eps:edm,v:uniform,edm:uniform", steps=24, batch=16, eval_every=12,
             eval_n=16, eval_steps=2, out=Path("runs/ablation-quick"))


def variant_config(variant: str, args: argparse.Namespace) -> RunConfig:
    """The digits preset with this variant's parameterization and weighting and the run's common settings."""
    param, _, weighting = variant.partition(":")
    if param not in PARAMETERIZATIONS or weighting not in WEIGHTINGS:
        raise SystemExit(f"error: variant {variant!r} must be parameterization:weighting with parameterization one of "
                         f"{', '.join(PARAMETERIZATIONS)} and weighting one of {', '.join(WEIGHTINGS)}")
    return apply_overrides(preset("digits"), [
        f"model.precond={param}", f"loss.weighting={weighting}", *PARAMETERIZATIONS[param],
        f"train.max_steps={args.steps}", f"train.batch_size={args.batch}", f"train.warmup_steps={min(200, args.steps // 6)}",
        f"train.eval_every={args.eval_every}", f"train.eval_n={args.eval_n}", f"train.eval_steps={args.eval_steps}",
        f"train.eval_cfg={args.eval_cfg}", f"train.checkpoint_every={args.eval_every}", f"train.sample_every={args.steps}",
    ])


def run_variant(variant: str, cfg: RunConfig, run_dir: Path) -> None:
    """Train the variant to cfg.train.max_steps: fresh, resumed from its newest checkpoint, or skipped when done.

    Done means a checkpoint at max_steps or, for a run folder kept without its checkpoints (config.json and
    metrics.csv are all the table needs, so that is what a finished variant's record in git holds), an evaluation
    row at max_steps.
    """
    found = checkpoint.list_checkpoints(run_dir)
    if not found and not (run_dir / METRICS).is_file():
        print(f"{variant}: training {cfg.train.max_steps} steps in {run_dir}", flush=True)
        train(cfg, run_dir)
        return
    # compared as configs, so fields added to the config since the run began (with their defaults) do not count as
    # differences; a run stores what precision 'auto' resolved to on its machine, which a resume keeps
    saved, wanted = RunConfig.from_dict(checkpoint.read_json(run_dir / RUN_CONFIG)).to_dict(), cfg.to_dict()
    if wanted["train"]["precision"] == "auto":
        wanted["train"]["precision"] = saved["train"]["precision"]
    if saved != wanted:
        raise SystemExit(f"error: {run_dir} holds a run with other settings than this variant's; pass another --out")
    step = checkpoint.read_json(found[-1] / "state.json")["step"] if found else 0
    if step >= cfg.train.max_steps or any(int(r["step"]) >= cfg.train.max_steps for r in eval_rows(run_dir)):
        print(f"{variant}: done ({run_dir})", flush=True)
    elif found:
        print(f"{variant}: resuming {run_dir} at step {step}", flush=True)
        train(None, run_dir, resume=True)
    else:
        raise SystemExit(f"error: {run_dir} has metrics but no checkpoint and no evaluation at step "
                         f"{cfg.train.max_steps}; remove the folder to train the variant again")


def eval_rows(run_dir: Path) -> list[dict[str, str]]:
    """The evaluation rows (step, nimg, fid, fid_low, fid_high, kid) of a run's metrics CSV."""
    with open(run_dir / METRICS, newline="") as f:
        return [r for r in csv.DictReader(f) if r["fid"]]


def table(results: dict[str, list[dict[str, str]]]) -> str:
    """Markdown: one row per image count, one column per variant, FID [95% CI]."""
    counts = sorted({int(r["nimg"]) for rows in results.values() for r in rows})
    lines = ["| images seen | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for nimg in counts:
        cells = []
        for rows in results.values():
            r = next((r for r in rows if int(r["nimg"]) == nimg), None)
            cells.append(f"{float(r['fid']):.2f} [{float(r['fid_low']):.2f}, {float(r['fid_high']):.2f}]" if r else "-")
        lines.append(f"| {nimg:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few minutes' smoke run (see QUICK); not a result")
    p.add_argument("--variants", help="comma-separated parameterization:weighting (default: the five above)")
    p.add_argument("--steps", type=int, help="optimizer steps per variant (full: 3000, the digits preset's)")
    p.add_argument("--batch", type=int, help="images per step (full: 64)")
    p.add_argument("--eval-every", type=int, help="steps between evaluations (full: 500, i.e. every 32,000 images)")
    p.add_argument("--eval-n", type=int, help="images per evaluation FID (full: 512)")
    p.add_argument("--eval-steps", type=int, help="dpmpp_2m steps (= NFE) per evaluation image (full: 20)")
    p.add_argument("--eval-cfg", type=float, default=1.5, help="guidance scale of evaluation images (default 1.5, the digits default)")
    p.add_argument("--out", type=Path, help="folder of the variants' run folders (full: runs/ablation)")
    args = p.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    configs = {v: variant_config(v, args) for v in variants}  # check every variant before training any
    for v, cfg in configs.items():
        run_variant(v, cfg, args.out / v.replace(":", "-"))
    results = {v: eval_rows(args.out / v.replace(":", "-")) for v in variants}

    text = table(results)
    (args.out / "table.md").write_text(text + "\n")
    chart = args.out / "fid_vs_images.png"
    line_chart({v: [(float(r["nimg"]), float(r["fid"])) for r in rows] for v, rows in results.items()}, chart,
               title=f"digits: FID ({args.eval_n} images, dpmpp_2m {args.eval_steps} steps, cfg {args.eval_cfg:g}) vs images seen",
               log_y=False, size=(760, 400))
    print(f"\nFID [95% CI] of the EMA weights, {args.eval_n} images vs the first {args.eval_n} digits, "
          f"dpmpp_2m {args.eval_steps} steps, cfg {args.eval_cfg:g}\n{text}\n\ntable: {args.out / 'table.md'}; chart: {chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
