"""ODE error of deterministic samplers on a real model: the RMS distance (pixels in [-1, 1]) of each
sampler's images to a many-step solution from the same noise, per number of steps.

Where ``bench/samplers.py`` measures the error against an exact reference on a Gaussian mixture, this
measures it on a shipped network with its guidance (``--cfg``, default the model's), whose long last
steps in log-SNR and guided outputs a mixture does not have. The reference is ``--reference`` (a
sampler spec) at ``--reference-steps``; image i has seed i and, for a class model, label i mod the
number of classes. A sampler spec is ``name`` or ``name:key=value,...`` with numeric or true/false
options, e.g. ``unipc:order=3,lower_order_final=false``.

    python bench/ode_error.py                                   # digits, the main samplers at 5/10/20/50 steps
    python bench/ode_error.py --samplers unipc,unipc:order=3 --steps 10
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffuse.pipeline import Pipeline, generate  # noqa: E402


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'unipc:order=3,lower_order_final=false' -> ('unipc', {'order': 3, 'lower_order_final': False})."""
    name, _, rest = spec.partition(":")
    options: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            sys.exit(f"bench/ode_error.py: sampler option {item!r} in {spec!r} is not key=value")
        low = value.lower()
        options[key] = low == "true" if low in ("true", "false") else float(value) if "." in value else int(value)
    return name, options


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="digits")
    p.add_argument("--samplers", default="euler,dpmpp_2m,ipndm,unipc,unipc:order=3")
    p.add_argument("--steps", default="5,10,20,50")
    p.add_argument("--n", type=int, default=64, help="images (seeds 0..n-1)")
    p.add_argument("--cfg", type=float, help="guidance scale (default: the model's)")
    p.add_argument("--reference", default="dpmpp_2m")
    p.add_argument("--reference-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = Pipeline.load(args.model)
    model = pipe.model
    base = pipe.defaults if args.cfg is None else dataclasses.replace(pipe.defaults, cfg=args.cfg)
    seeds = list(range(args.n))
    labels = [s % model.cfg.num_classes for s in seeds] if model.cfg.conditioning == "class" else None
    prompts = ["a red circle"] * args.n if model.cfg.conditioning == "text" else None

    def run(spec: str, steps: int) -> torch.Tensor:
        name, options = parse_spec(spec)
        settings = dataclasses.replace(base, sampler=name, steps=steps, sampler_options=options)
        return generate(model, settings, seeds, labels=labels, prompts=prompts, codec=pipe.codec)

    reference = run(args.reference, args.reference_steps)
    steps = [int(s) for s in args.steps.split(",")]
    print(f"ODE error on {args.model}: RMS distance to {args.reference} at {args.reference_steps} steps, "
          f"{args.n} images, CFG {base.cfg:g}, {base.schedule} schedule\n")
    print("| sampler | " + " | ".join(f"{k} steps" for k in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for spec in args.samplers.split(","):
        errors = [float((run(spec, k) - reference).pow(2).mean().sqrt()) for k in steps]
        print(f"| {spec} | " + " | ".join(f"{e:.4f}" for e in errors) + " |", flush=True)


if __name__ == "__main__":
    main()
