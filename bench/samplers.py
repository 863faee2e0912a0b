"""ODE error of every deterministic sampler vs NFE, ours and k-diffusion's, on a Gaussian mixture.

For the example mixture in ``--dims`` dimensions, start ``--batch`` points at sigma_max and
measure the RMS distance (float64) of each sampler's output to the probability-flow ODE
solution (fine RK4, :func:`diffuse.gaussian_mixture.ode_reference`). Samplers are compared
at equal NFE, not equal steps: each one gets the most steps whose NFE fits the budget.
Stochastic samplers run with eta = 0 where they have it, and are skipped otherwise.

    python bench/samplers.py                # the table recorded in bench/RESULTS.md
    python bench/samplers.py --nfe 10 --dims 16
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import load_kdiffusion_sampling  # noqa: E402
from diffuse import schedules  # noqa: E402
from diffuse.gaussian_mixture import GaussianMixture, example_mixture, ode_reference  # noqa: E402
from diffuse.samplers import SAMPLERS  # noqa: E402

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
GITS_PILOTS = 256  # pilot trajectories for the GITS schedule (its own seed, 0, never the test points')
# our schedules: name -> sigmas(steps, mixture)
OUR_SCHEDULES: dict[str, Callable[[int, GaussianMixture], torch.Tensor]] = {
    "karras": lambda n, m: schedules.karras(n, SIGMA_MIN, SIGMA_MAX),
    "logsnr": lambda n, m: schedules.logsnr_uniform(n, SIGMA_MIN, SIGMA_MAX),
    "polyexp2": lambda n, m: schedules.polyexponential(n, SIGMA_MIN, SIGMA_MAX, rho=2.0),
    "vp": lambda n, m: schedules.vp_continuous(n),
    "flow_shift": lambda n, m: schedules.flow_shift(n, SIGMA_MIN, SIGMA_MAX),
    "gits": lambda n, m: schedules.gits(m.denoiser, (GITS_PILOTS, m.dim), n, SIGMA_MIN, SIGMA_MAX),
}
# k-diffusion's samplers: name -> (NFE for n steps to sigma = 0, extra keyword arguments)
KDIFF_SAMPLERS: dict[str, tuple[Callable[[int], int], dict[str, Any]]] = {
    "euler": (lambda n: n, {}),
    "heun": (lambda n: 2 * n - 1, {}),
    "dpm_2": (lambda n: 2 * n - 1, {}),
    "lms": (lambda n: n, {}),
    "dpmpp_2s_ancestral": (lambda n: 2 * n - 1, {"eta": 0.0}),
    "dpmpp_sde": (lambda n: 2 * n - 1, {"eta": 0.0}),
    "dpmpp_2m": (lambda n: n, {}),
    "dpmpp_2m_sde": (lambda n: n, {"eta": 0.0}),
    "dpmpp_3m_sde": (lambda n: n, {"eta": 0.0}),
}


def kdiff_schedules(kd: Any) -> dict[str, Callable[[int], torch.Tensor]]:
    """k-diffusion's own schedule functions, in float64."""
    return {
        "karras": lambda n: kd.get_sigmas_karras(n, SIGMA_MIN, SIGMA_MAX).double(),
        "exponential": lambda n: kd.get_sigmas_exponential(n, SIGMA_MIN, SIGMA_MAX).double(),
        "polyexp2": lambda n: kd.get_sigmas_polyexponential(n, SIGMA_MIN, SIGMA_MAX, rho=2.0).double(),
        "vp": lambda n: kd.get_sigmas_vp(n).double(),
    }


class Problem:
    """A batch of starting points z [B, d] and their ODE solutions, cached per sigma_max."""

    def __init__(self, mixture: GaussianMixture, batch: int, seed: int):
        self.mixture = mixture
        self.z = torch.randn(batch, mixture.dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.references: dict[float, torch.Tensor] = {}

    def error(self, run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], sigmas: torch.Tensor) -> float:
        """RMS error of ``run(x, sigmas)`` against the ODE solution from x = z * sigmas[0]."""
        sigma_max = float(sigmas[0])
        x = self.z * sigma_max
        if sigma_max not in self.references:
            self.references[sigma_max] = ode_reference(self.mixture, x, sigma_max)
        return float(((run(x, sigmas) - self.references[sigma_max]) ** 2).mean().sqrt())


def steps_for(nfe_of: Callable[[int], int], budget: int) -> Optional[int]:
    """The most steps whose NFE fits the budget (None when even one step does not)."""
    fits = [n for n in range(1, budget + 1) if nfe_of(n) <= budget]
    return max(fits) if fits else None


def our_rows(problem: Problem, budgets: list[int]) -> list[tuple[str, str, list[float]]]:
    """(sampler, schedule, errors per budget) for every deterministic sampler in SAMPLERS."""
    rows = []
    cache: dict[tuple[str, int], torch.Tensor] = {}

    def sigmas(sched_name: str, n: int) -> torch.Tensor:
        if (sched_name, n) not in cache:
            cache[sched_name, n] = OUR_SCHEDULES[sched_name](n, problem.mixture)
        return cache[sched_name, n]

    for name, sampler in sorted(SAMPLERS.items()):
        if sampler.stochastic and "eta" not in sampler.options:
            continue
        opts = {"eta": 0.0} if sampler.stochastic else {}
        for sched_name in OUR_SCHEDULES:
            errors = []
            for budget in budgets:
                n = steps_for(lambda k: sampler.nfe(schedules.logsnr_uniform(k, SIGMA_MIN, SIGMA_MAX), **opts), budget)
                errors.append(math.nan if n is None else problem.error(
                    lambda x, s: sampler(problem.mixture.denoiser, x, s, **opts), sigmas(sched_name, n)))
            rows.append((name, sched_name, errors))
    return rows


def kdiff_rows(kd: Any, problem: Problem, budgets: list[int]) -> list[tuple[str, str, list[float]]]:
    """(sampler, schedule, errors per budget) for k-diffusion's samplers on its schedules,
    plus DPM-Solver-fast, which picks its own steps for an NFE budget."""
    counter = {"nfe": 0}

    def model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        counter["nfe"] += 1
        return problem.mixture.denoiser(x, sigma)

    def checked(fn: Callable[[], torch.Tensor], expected: int) -> torch.Tensor:
        counter["nfe"] = 0
        out = fn()
        assert counter["nfe"] == expected, (counter["nfe"], expected)
        return out

    rows = []
    for name, (nfe_of, kwargs) in KDIFF_SAMPLERS.items():
        sample = getattr(kd, f"sample_{name}")
        for sched_name, sched in kdiff_schedules(kd).items():
            errors = []
            for budget in budgets:
                n = steps_for(nfe_of, budget)
                errors.append(math.nan if n is None else problem.error(
                    lambda x, s: checked(lambda: sample(model, x, s, disable=True, **kwargs), nfe_of(n)), sched(n)))
            rows.append((name, sched_name, errors))
    fast = [problem.error(lambda x, s: checked(lambda: kd.sample_dpm_fast(model, x, SIGMA_MIN, SIGMA_MAX, b, disable=True), b),
                          torch.tensor([SIGMA_MAX])) for b in budgets]
    rows.append(("dpm_fast", "logsnr", fast))
    return rows


def print_table(title: str, rows: list[tuple[str, str, list[float]]], budgets: list[int]) -> None:
    print(f"\n{title}\n")
    print("| sampler | schedule | " + " | ".join(f"NFE {b}" for b in budgets) + " |")
    print("|---|---|" + "---|" * len(budgets))
    for name, sched, errors in rows:
        print(f"| {name} | {sched} | " + " | ".join(f"{e:.2e}" for e in errors) + " |")


def best_at(rows: list[tuple[str, str, list[float]]], column: int) -> tuple[str, str, float]:
    name, sched, errors = min(rows, key=lambda r: r[2][column] if not math.isnan(r[2][column]) else math.inf)
    return name, sched, errors[column]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[2, 16])
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20, 50])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=2024, help="seed of the test points (GITS pilots use seed 0)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    kd = load_kdiffusion_sampling()
    for dim in args.dims:
        problem = Problem(example_mixture(dim), args.batch, args.seed)
        ours = our_rows(problem, args.nfe)
        print_table(f"### dim {dim}: diffuse (RMS ODE error, sigma {SIGMA_MAX} -> 0)", ours, args.nfe)
        theirs = kdiff_rows(kd, problem, args.nfe) if kd is not None else []
        if theirs:
            print_table(f"### dim {dim}: k-diffusion", theirs, args.nfe)
        print(f"\nbest per NFE, dim {dim}:")
        for col, budget in enumerate(args.nfe):
            o = best_at(ours, col)
            line = f"- NFE {budget}: diffuse {o[0]}+{o[1]} {o[2]:.2e}"
            if theirs:
                t = best_at(theirs, col)
                line += f"; k-diffusion {t[0]}+{t[1]} {t[2]:.2e}; ratio {o[2] / t[2]:.2f}"
            print(line)


if __name__ == "__main__":
    main()
