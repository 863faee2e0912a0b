"""Does a layout help the shapes model? Plain sampling against planned layouts, shared and isolated.

For each prompt that :func:`diffuse.regions.plan_layout` can plan (a relation or "and" of two objects, a count
of 2-4, one object), the same seed is sampled three ways and scored with the adherence scorer:

* plain: the prompt alone;
* shared: the planned regions, each path seeing the whole shared image (MultiDiffusion), the whole prompt where
  no box reaches (`--region` without `--region-background`);
* isolated: the planned regions, each path seeing only its own box over the black canvas (`--plan-layout`).

Rows: the kind of plan (the relation word, "and", "count N", "named cell", "one object": no place named).

    python bench/layout_plan.py --n 40 --families position            # the first 40 position prompts
    python bench/layout_plan.py --n 200 --prompt-seed 1 --families position counting single
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffuse import adherence, shapes  # noqa: E402
from diffuse.pipeline import Pipeline  # noqa: E402
from diffuse.regions import planned  # noqa: E402

MODES = ("plain", "shared", "isolated")


def kind(prompt: str) -> str:
    spec = shapes.parse_prompt(prompt)
    if len(spec.objects) == 2:
        return spec.relation or "and"
    o = spec.objects[0]
    return "named cell" if o.cell is not None else "one object" if o.count == 1 else f"count {o.count}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n", type=int, default=40, help="prompts per family of shapes.eval_prompts (the unplannable ones are skipped)")
    ap.add_argument("--families", nargs="+", default=["position"], choices=shapes.EVAL_FAMILIES)
    ap.add_argument("--prompt-seed", type=int, default=0,
                    help="shapes.eval_prompts seed (0: the eval set `diffuse eval adherence` uses, on whose first "
                         "prompts the planner's choices were compared; 1 gives prompts not used for that)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.model)
    prompts = [p for p, f in shapes.eval_prompts(args.n, seed=args.prompt_seed) if f in args.families and planned(p).regions]
    tally: dict[tuple[str, str], list[int]] = {}
    for seed, prompt in enumerate(prompts):
        layout = planned(prompt, seed)
        for mode in MODES:
            if mode == "plain":
                [g] = pipe(prompt, seeds=[seed], plan_layout=False)
            else:
                [g] = pipe(prompt, seeds=[seed], regions=layout.regions,
                           region_background=layout.background if mode == "isolated" else None)
            ok = adherence.score(np.asarray(g.image), prompt).ok
            for key in ((mode, kind(prompt)), (mode, "all")):
                counts = tally.setdefault(key, [0, 0])
                counts[0] += ok
                counts[1] += 1
    d = pipe.defaults
    print(f"{', '.join(args.families)}: {len(prompts)} planned prompts of {args.n} per family (eval_prompts seed "
          f"{args.prompt_seed}), {args.model}, {d.sampler} {d.steps} steps, cfg {d.cfg:g}; seed i for prompt i in every column\n")
    print("| plan | " + " | ".join(MODES) + " |\n|---|" + "---|" * len(MODES))
    for k in sorted({k for _, k in tally if k != "all"}) + ["all"]:
        print(f"| {k} | " + " | ".join("{}/{}".format(*tally[(m, k)]) for m in MODES) + " |")


if __name__ == "__main__":
    main()
