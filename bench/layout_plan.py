"""Does a layout help the shapes model draw relations? Plain sampling against `--plan-layout`.

For each position-family prompt ("a red circle above a blue square"), :func:`diffuse.regions.plan_layout`
gives each object a half of the canvas that satisfies the relation and a sub-prompt naming the matching
place ("a red circle at the top", "a blue square at the bottom"); the pipeline fuses the two guided
denoisers per pixel at every step (MultiDiffusion, :mod:`diffuse.regions`). The same prompts and seeds are
also sampled plainly; both are scored with the adherence scorer, per relation.

    python bench/layout_plan.py --n 40                     # the first 40 position prompts of shapes.eval_prompts
    python bench/layout_plan.py --n 200 --prompt-seed 1    # 200 prompts the planner was not tuned on
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
from diffuse.regions import RELATION_LAYOUT  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n", type=int, default=40, help="prompts of the position family (shapes.eval_prompts)")
    ap.add_argument("--prompt-seed", type=int, default=0,
                    help="shapes.eval_prompts seed (0: the eval set `diffuse eval adherence` uses; the planner's place "
                         "phrases were picked on its first 60 prompts, so 1 gives prompts not used for that)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.model)
    prompts = [p for p, f in shapes.eval_prompts(args.n, seed=args.prompt_seed) if f == "position"]
    tally: dict[tuple[str, str], list[int]] = {}
    for seed, prompt in enumerate(prompts):
        relation = shapes.parse_prompt(prompt).relation
        for how, plan in (("plain", False), ("planned", True)):
            [g] = pipe(prompt, seeds=[seed], plan_layout=plan)
            ok = adherence.score(np.asarray(g.image), prompt).ok
            for key in ((how, relation), (how, "all")):
                counts = tally.setdefault(key, [0, 0])
                counts[0] += ok
                counts[1] += 1
    d = pipe.defaults
    print(f"position family, {len(prompts)} prompts (eval_prompts seed {args.prompt_seed}), {args.model}, {d.sampler} {d.steps} steps, cfg {d.cfg:g}; "
          f"seed i for prompt i in both columns\n")
    print("| relation | plain | planned halves |\n|---|---|---|")
    for relation in (*RELATION_LAYOUT, "all"):
        plain, planned = tally.get(("plain", relation), [0, 0]), tally.get(("planned", relation), [0, 0])
        print(f"| {relation} | {plain[0]}/{plain[1]} | {planned[0]}/{planned[1]} |")


if __name__ == "__main__":
    main()
