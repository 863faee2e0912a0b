"""Sample quality vs NFE: FID (95% bootstrap intervals) of a class model per sampler and NFE, a
1000-step ancestral DDPM reference, the training-free corrections (epsilon scaling, DCW), and
prompt adherence of a shapes text model at the same settings; then the 10-NFE goal check.

Image i is conditioned on the label of reference image i and drawn with seed i (``evaluate.fid_run``),
so every row uses the same seeds and condition mix. NFE counts denoiser evaluations, exactly as the
sampler registry counts them (a guided evaluation, conditional and unconditional in one batch, is
one); each sampler gets the most steps whose NFE fits the budget, and the table shows the NFE it
actually used (Heun: 2 per step but 1 on the last, so budget 10 -> 5 steps, NFE 9). A sampler may
carry its own schedule: ``ddim:vp`` is DDIM on the uniform VP-time spacing it was published with
(with the model's Karras schedule DDIM with eta = 0 would be Euler exactly). FID depends on n:
compare rows of one n only.

Every finished row is appended to a CSV at once and rows already there (same model hash, reference,
n, guidance, sampler, schedule, steps and correction) are skipped, so an interrupted run continues
where it stopped; the tables are printed from the CSV.

    python bench/quality.py                   # the full table (n = 898); see bench/RESULTS.md for its cost
    python bench/quality.py --quick           # minutes: n = 16, 3 samplers, NFE 5 and 10, 20-step reference
    python bench/quality.py --samplers euler,dpmpp_2m --nfe 10 --eps-scaling 1.005 --dcw '' --no-adherence
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffuse import evaluate, schedules, shapes  # noqa: E402
from diffuse.pipeline import Pipeline, SampleSettings  # noqa: E402
from diffuse.samplers import SAMPLERS  # noqa: E402

FULL = dict(n=898, samplers="euler,heun,dpmpp_2m,unipc,ipndm,ddim:vp", nfe="5,10,20,50", eps_scaling="1.002,1.005,1.01",
            dcw="0.005,-0.005,0.02,-0.02", reference_steps=1000, adherence_per_family=10,
            out=Path("bench/quality.csv"))  # committed: each session's finished rows, where the next one resumes
QUICK = dict(n=16, samplers="euler,heun,ddim:vp", nfe="5,10", eps_scaling="1.005", dcw="-0.005", reference_steps=20,
             adherence_per_family=1, out=Path("runs/bench-quality/quick.csv"))
KEY = ["kind", "model", "model_hash", "ref", "n", "cfg", "sampler", "schedule", "steps", "eps_scaling", "dcw"]
COLUMNS = [*KEY, "nfe", "nfe_budget", "correction", "fid", "fid_low", "fid_high", "kid", "kid_low", "kid_high",
           "precision", "recall", "adherence", "adherence_low", "adherence_high", "seconds", "finished_utc", "machine"]
GOAL_NFE, GOAL_RATIO = 10, 1.10  # the goal: best 10-NFE FID within 10% of the 1000-step reference


@dataclass(frozen=True)
class Planned:
    """One table row to compute: a sampler at a step count (and its actual NFE) with one correction."""

    kind: str  # "fid" | "adherence"
    sampler: str
    schedule: str
    steps: int
    nfe: int
    nfe_budget: int
    correction: str
    eps_scaling: float = 1.0
    dcw: float = 0.0


def floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def fmt(value: Any) -> str:
    """The one way a value is written to (and compared with) the CSV."""
    return repr(float(value)) if isinstance(value, float) else str(value)


def sampler_specs(text: str, default_schedule: str) -> list[tuple[str, str]]:
    """'euler,ddim:vp' -> [(euler, <default schedule>), (ddim, vp)], names checked."""
    out = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        name, _, schedule = spec.partition(":")
        if name not in SAMPLERS:
            raise SystemExit(f"error: unknown sampler {name!r}; known: {', '.join(sorted(SAMPLERS))}")
        if schedule and schedule not in schedules.SCHEDULES:
            raise SystemExit(f"error: unknown schedule {schedule!r} in {spec!r}; known: {', '.join(schedules.SCHEDULES)}")
        out.append((name, schedule or default_schedule))
    return out


def nfe_of(sampler: str, steps: int, schedule: str, pipe: Pipeline) -> int:
    """Denoiser evaluations of ``sampler`` over ``steps`` steps of ``schedule`` (the registry's exact count)."""
    return SAMPLERS[sampler].nfe(schedules.get_sigmas(schedule, steps, pipe.model.sigma_min, pipe.model.sigma_max))


def steps_for(sampler: str, budget: int, schedule: str, pipe: Pipeline) -> int:
    """The most steps whose NFE fits ``budget`` (at least 1)."""
    steps = 1
    while steps < budget and nfe_of(sampler, steps + 1, schedule, pipe) <= budget:
        steps += 1
    return steps


def corrections(args: argparse.Namespace) -> list[tuple[str, dict[str, float]]]:
    """(label, SampleSettings overrides): no correction, then each eps-scaling b, then each DCW lambda_l."""
    out: list[tuple[str, dict[str, float]]] = [("none", {})]
    out += [(f"eps b={b:g}", {"eps_scaling": b}) for b in floats(args.eps_scaling)]
    out += [(f"dcw {lam:+g}", {"dcw": lam}) for lam in floats(args.dcw)]
    return out


def plan(kind: str, pipe: Pipeline, args: argparse.Namespace) -> list[Planned]:
    """Every (NFE budget, sampler, correction) row; corrections only at the --correction-nfe budgets."""
    rows = []
    correction_nfe = set(ints(args.correction_nfe)) if args.correction_nfe is not None else set(ints(args.nfe))
    for budget in ints(args.nfe):
        for sampler, schedule in sampler_specs(args.samplers, pipe.defaults.schedule):
            steps = steps_for(sampler, budget, schedule, pipe)
            for label, extra in corrections(args) if budget in correction_nfe else [("none", {})]:
                rows.append(Planned(kind, sampler, schedule, steps, nfe_of(sampler, steps, schedule, pipe), budget, label, **extra))
    return rows


class ResultsCSV:
    """Rows appended as they finish; a row whose KEY is already in the file is not computed again."""

    def __init__(self, path: Path):
        self.path = path
        self.rows: dict[tuple[str, ...], dict[str, str]] = {}
        if path.exists():
            with open(path, newline="") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames != COLUMNS:
                    raise SystemExit(f"error: {path} has other columns than this script writes; pass another --out")
                self.rows = {tuple(r[k] for k in KEY): r for r in reader}
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "w", newline="") as f:
                csv.DictWriter(f, COLUMNS).writeheader()

    def add(self, row: dict[str, Any]) -> dict[str, str]:
        text = {k: fmt(row[k]) if row.get(k) is not None else "" for k in COLUMNS}
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, COLUMNS).writerow(text)
        self.rows[tuple(text[k] for k in KEY)] = text
        return text


def key_fields(p: Planned, model: str, model_hash: str, ref: str, n: int, cfg: float) -> dict[str, Any]:
    return dict(kind=p.kind, model=model, model_hash=model_hash, ref=ref, n=n, cfg=float(cfg), sampler=p.sampler,
                schedule=p.schedule, steps=p.steps, eps_scaling=float(p.eps_scaling), dcw=float(p.dcw))


def measure(p: Planned, pipe: Pipeline, settings: SampleSettings, args: argparse.Namespace,
            prompts: Optional[list[tuple[str, str]]]) -> dict[str, Any]:
    """The metric columns of one row."""
    if p.kind == "fid":
        r = evaluate.fid_run(pipe, args.ref, settings, n=args.n, batch_size=64, n_boot=200)
        return dict(fid=r.fid, fid_low=r.fid_interval[0], fid_high=r.fid_interval[1], kid=r.kid, kid_low=r.kid_interval[0],
                    kid_high=r.kid_interval[1], precision=r.precision, recall=r.recall)
    o = evaluate.adherence_run(pipe, [q for q, _ in prompts], [f for _, f in prompts], settings, batch_size=32,
                               plan_layout=False).report.overall
    return dict(adherence=o.accuracy, adherence_low=o.low, adherence_high=o.high)


def run_rows(kind: str, model: str, args: argparse.Namespace, results: ResultsCSV) -> list[dict[str, str]]:
    """Compute (or find in the CSV) every planned row of one model; returns them in plan order."""
    pipe = Pipeline.load(model)
    if kind == "fid":
        cfg = pipe.defaults.cfg if args.cfg is None else args.cfg
        ref, n, prompts = args.ref, evaluate.reference_count(args.ref, pipe.model.cfg.image_size, args.n), None
    else:
        cfg = args.adherence_cfg
        prompts = shapes.eval_prompts(args.adherence_per_family)
        evaluate.check_adherence_model(pipe, [q for q, _ in prompts])
        ref, n = f"shapes-eval-prompts-{args.adherence_per_family}-per-family", len(prompts)
    base = dataclasses.replace(pipe.defaults, cfg=cfg)
    rows = plan(kind, pipe, args)
    if kind == "fid" and args.reference_steps:
        # DDPM's reference: ancestral steps spaced uniformly in the VP time like the original 1000-step chain
        rows.insert(0, Planned(kind, "ddpm", "vp", args.reference_steps, args.reference_steps, args.reference_steps, "none"))
    what = f"FID vs {ref}" if kind == "fid" else "adherence"
    print(f"{what} of {pipe.name} ({pipe.model_hash}), n = {n}, cfg {cfg:g}: {len(rows)} rows, results in {results.path}", flush=True)
    out = []
    for i, p in enumerate(rows):
        key = key_fields(p, pipe.name, pipe.model_hash, ref, n, cfg)
        done = results.rows.get(tuple(fmt(key[k]) for k in KEY))
        if done is None:
            settings = dataclasses.replace(base, sampler=p.sampler, schedule=p.schedule, steps=p.steps,
                                           eps_scaling=p.eps_scaling, dcw=p.dcw)
            t0 = time.perf_counter()
            metrics = measure(p, pipe, settings, args, prompts)
            done = results.add({**key, **metrics, "nfe": p.nfe, "nfe_budget": p.nfe_budget, "correction": p.correction,
                                "seconds": round(time.perf_counter() - t0, 1),
                                "finished_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                                "machine": machine()})
            print(f"  [{i + 1}/{len(rows)}] {table_line(done)}", flush=True)
        out.append(done)
    return out


def machine() -> str:
    """'<cores>-core <CPU model> (<arch>)' for the results' provenance."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{os.cpu_count()}-core {names[0] if names else platform.processor() or 'CPU'} ({platform.machine()})"


def table_line(r: dict[str, str]) -> str:
    head = f"| {r['sampler']:<10} | {r['schedule']:<7} | {r['nfe_budget']:>4} | {r['nfe']:>4} | {r['steps']:>5} | {r['correction']:<11} |"
    if r["kind"] == "fid":
        return (f"{head} {float(r['fid']):6.2f} [{float(r['fid_low']):6.2f}, {float(r['fid_high']):6.2f}] | "
                f"{float(r['kid']) * 1e3:7.2f} [{float(r['kid_low']) * 1e3:6.2f}, {float(r['kid_high']) * 1e3:6.2f}] | "
                f"{float(r['precision']):.3f} | {float(r['recall']):.3f} | {float(r['seconds']):6.0f} |")
    return f"{head} {float(r['adherence']):.3f} [{float(r['adherence_low']):.3f}, {float(r['adherence_high']):.3f}] | {float(r['seconds']):6.0f} |"


def print_table(rows: list[dict[str, str]]) -> None:
    head = "| sampler    | schedule | NFE budget | NFE | steps | correction  |"
    if rows[0]["kind"] == "fid":
        print(f"{head} FID [95% CI] | KID x1e3 [95% CI] | precision | recall | s |\n|---|---|---|---|---|---|---|---|---|---|---|")
    else:
        print(f"{head} adherence [95% CI] | s |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(table_line(r))


def print_fid_summary(rows: list[dict[str, str]], reference_steps: int) -> None:
    """The 10-NFE goal check against the reference row, and each correction's FID change against 'none'."""
    reference = [r for r in rows if (r["sampler"], r["schedule"], r["steps"]) == ("ddpm", "vp", str(reference_steps))]
    at_goal = [r for r in rows if r["nfe_budget"] == str(GOAL_NFE)]
    if reference and at_goal:
        ref, best = reference[0], min(at_goal, key=lambda r: float(r["fid"]))
        ratio = float(best["fid"]) / float(ref["fid"])
        print(f"\ngoal: best {GOAL_NFE}-NFE FID {float(best['fid']):.2f} ({best['sampler']}, NFE {best['nfe']}, {best['correction']}) "
              f"vs the {ref['steps']}-step DDPM reference {float(ref['fid']):.2f}: ratio {ratio:.3f} -> "
              f"{'within' if ratio <= GOAL_RATIO else 'NOT within'} {GOAL_RATIO - 1:.0%}")
    plain = {(r["sampler"], r["schedule"], r["steps"]): r for r in rows if r["correction"] == "none"}
    lines = []
    for r in rows:
        base = plain.get((r["sampler"], r["schedule"], r["steps"]))
        if r["correction"] != "none" and base is not None:
            delta = float(r["fid"]) - float(base["fid"])
            clear = " (clear of both intervals)" if (float(r["fid_high"]) < float(base["fid_low"]) or
                                                      float(r["fid_low"]) > float(base["fid_high"])) else ""
            lines.append(f"  {r['sampler']:<10} NFE {r['nfe']:>3} {r['correction']:<11} dFID {delta:+6.2f}{clear}")
    if lines:
        print("\ncorrections: FID change against the same sampler and steps without correction")
        print("\n".join(lines))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a few minutes' smoke run (see QUICK); not a result")
    p.add_argument("--model", default="digits", help="class-conditional model for FID (default digits)")
    p.add_argument("--ref", default="digits", help="reference dataset (default digits)")
    p.add_argument("--n", type=int, help="images per FID row (full: 898, half the digits; quick: 16)")
    p.add_argument("--samplers", help="comma-separated sampler[:schedule] (full: euler,heun,dpmpp_2m,unipc,ipndm,ddim:vp)")
    p.add_argument("--nfe", help="comma-separated NFE budgets (full: 5,10,20,50)")
    p.add_argument("--correction-nfe", help="budgets at which the corrections are swept (default: all of --nfe)")
    p.add_argument("--cfg", type=float, help="guidance scale of the FID rows (default: the model's)")
    p.add_argument("--eps-scaling", help="comma-separated eps-scaling b values ('' = none; full: 1.002,1.005,1.01)")
    p.add_argument("--dcw", help="comma-separated DCW lambda_l values ('' = none; full: 0.005,-0.005,0.02,-0.02)")
    p.add_argument("--reference-steps", type=int, help="ancestral DDPM steps of the reference row (full: 1000; 0 = skip)")
    p.add_argument("--adherence-model", default="shapes", help="shapes text model for the adherence rows (default shapes)")
    p.add_argument("--no-adherence", action="store_true", help="skip the adherence rows")
    p.add_argument("--no-fid", action="store_true", help="skip the FID rows")
    p.add_argument("--adherence-per-family", type=int, help="adherence prompts per family (full: 10, i.e. 70 prompts)")
    p.add_argument("--adherence-cfg", type=float, default=2.0, help="guidance scale for adherence (default 2, the shapes default)")
    p.add_argument("--out", type=Path, help="results CSV, appended to and resumed from (full: bench/quality.csv, kept in git)")
    args = p.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.n < 4:
        raise SystemExit(f"error: --n must be >= 4 (precision/recall uses 3 neighbours), got {args.n}")

    results = ResultsCSV(args.out)
    if not args.no_fid:
        rows = run_rows("fid", args.model, args, results)
        print()
        print_table(rows)
        print_fid_summary(rows, args.reference_steps)
    if not args.no_adherence:
        rows = run_rows("adherence", args.adherence_model, args, results)
        print()
        print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
