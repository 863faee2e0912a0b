"""Sample quality vs NFE: FID (95% bootstrap intervals) of a class model per sampler and NFE, a
many-step DDPM reference, and the training-free corrections (epsilon scaling, DCW); optionally
prompt adherence of a shapes text model at the same settings.

Image i is conditioned on the label of reference image i and drawn with seed i (``evaluate.fid_run``),
so every row uses the same seeds and condition mix; each sampler gets the most steps whose NFE
(denoiser evaluations, counted by the sampler registry) fits the budget. FID depends on n: compare
rows of one run only.

    python bench/quality.py                                        # full: 4 samplers x NFE 5-50, n = 898
    python bench/quality.py --n 300 --samplers euler,dpmpp_2m --nfe 10,20 --eps-scaling 1.005 --dcw 0.005,-0.005
    python bench/quality.py --adherence shapes --adherence-per-family 10 --nfe 10,20 --no-reference
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffuse import evaluate, schedules, shapes  # noqa: E402
from diffuse.pipeline import Pipeline, SampleSettings  # noqa: E402
from diffuse.samplers import SAMPLERS  # noqa: E402


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def steps_for(sampler: str, nfe: int, pipe: Pipeline, schedule: str) -> int:
    """The most steps whose NFE fits ``nfe`` (at least 1)."""
    steps = 1
    while steps < nfe and SAMPLERS[sampler].nfe(schedules.get_sigmas(schedule, steps + 1, pipe.model.sigma_min,
                                                                      pipe.model.sigma_max)) <= nfe:
        steps += 1
    return steps


def configurations(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(label, SampleSettings overrides): no correction, then each eps-scaling b, then each DCW lambda."""
    out = [("none", {})]
    out += [(f"eps b={b:g}", {"eps_scaling": b}) for b in floats(args.eps_scaling)]
    out += [(f"dcw {lam:g}", {"dcw": lam}) for lam in floats(args.dcw)]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits", help="class-conditional model for FID (default digits)")
    p.add_argument("--ref", default="digits", help="reference dataset (default digits)")
    p.add_argument("--n", type=int, default=898, help="images per row (default 898: half the digits)")
    p.add_argument("--samplers", default="euler,heun,dpmpp_2m,unipc,ipndm", help="comma-separated sampler names")
    p.add_argument("--nfe", default="5,10,20,50", help="comma-separated NFE budgets")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--eps-scaling", default="1.005", help="comma-separated eps-scaling b values to try ('' = none)")
    p.add_argument("--dcw", default="0.005,-0.005", help="comma-separated DCW lambda_l values to try ('' = none)")
    p.add_argument("--reference-steps", type=int, default=1000, help="DDPM steps of the reference row (0 = skip)")
    p.add_argument("--no-reference", action="store_true", help="skip the DDPM reference row")
    p.add_argument("--adherence", metavar="MODEL", help="also score prompt adherence of this shapes text model")
    p.add_argument("--adherence-per-family", type=int, default=10, help="adherence prompts per family")
    p.add_argument("--adherence-cfg", type=float, default=3.0, help="guidance scale for adherence")
    p.add_argument("--skip-fid", action="store_true", help="only adherence")
    args = p.parse_args()

    nfes = [int(v) for v in args.nfe.split(",")]
    samplers = [s for s in args.samplers.split(",") if s]
    for s in samplers:
        if s not in SAMPLERS:
            raise SystemExit(f"error: unknown sampler {s!r}; known: {', '.join(sorted(SAMPLERS))}")
    rows: list[str] = []

    if not args.skip_fid:
        pipe = Pipeline.load(args.model)
        base = pipe.defaults if args.cfg is None else dataclasses.replace(pipe.defaults, cfg=args.cfg)
        print(f"FID of {pipe.name} ({pipe.model_hash}) vs {args.ref}, n = {args.n}, cfg {base.cfg:g}, {base.schedule} schedule")
        header = f"| {'sampler':<10} | NFE | steps | {'correction':<12} | FID [95% CI]         | KID x1e3 | precision | recall | s |"
        print(header)
        rows.append(header)

        def run(label: str, sampler: str, nfe: int, steps: int, schedule: str, extra: dict) -> None:
            settings = dataclasses.replace(base, sampler=sampler, steps=steps, schedule=schedule, **extra)
            t0 = time.perf_counter()
            r = evaluate.fid_run(pipe, args.ref, settings, n=args.n, batch_size=64, n_boot=200)
            line = (f"| {sampler:<10} | {nfe:>3} | {steps:>5} | {label:<12} | {r.fid:6.2f} [{r.fid_interval[0]:6.2f}, "
                    f"{r.fid_interval[1]:6.2f}] | {r.kid * 1e3:8.2f} | {r.precision:9.3f} | {r.recall:6.3f} | "
                    f"{time.perf_counter() - t0:4.0f} |")
            print(line, flush=True)
            rows.append(line)

        if args.reference_steps and not args.no_reference:
            # DDPM's reference: many ancestral steps, spaced uniformly in the VP time like the original 1000-step chain
            run("none", "ddpm", args.reference_steps, args.reference_steps, "vp", {})
        for nfe in nfes:
            for sampler in samplers:
                steps = steps_for(sampler, nfe, pipe, base.schedule)
                for label, extra in configurations(args):
                    run(label, sampler, nfe, steps, base.schedule, extra)

    if args.adherence:
        apipe = Pipeline.load(args.adherence)
        pairs = shapes.eval_prompts(args.adherence_per_family)
        prompts, families = [q for q, _ in pairs], [f for _, f in pairs]
        print(f"adherence of {apipe.name} ({apipe.model_hash}), {len(prompts)} prompts, cfg {args.adherence_cfg:g}")
        for nfe in nfes:
            for sampler in samplers:
                steps = steps_for(sampler, nfe, apipe, apipe.defaults.schedule)
                for label, extra in configurations(args):
                    settings = dataclasses.replace(apipe.defaults, sampler=sampler, steps=steps, cfg=args.adherence_cfg, **extra)
                    o = evaluate.adherence_run(apipe, prompts, families, settings, batch_size=32).report.overall
                    line = f"| {sampler:<10} | {nfe:>3} | {steps:>5} | {label:<12} | adherence {o.accuracy:.3f} [{o.low:.3f}, {o.high:.3f}] |"
                    print(line, flush=True)
                    rows.append(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
