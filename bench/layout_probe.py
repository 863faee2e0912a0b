"""Does a shapes text model's prediction depend on the place words of its prompt? (issue #4)

For each prompt of one object at different places, the denoiser D(x, sigma, c) is applied to pure-noise
inputs x = sigma * eps at a few high noise levels, where the noisy image does not show the object yet, so
where the predicted x0 puts its brightness is the model's own idea of the layout. Printed per prompt and
sigma: the share of the brightness above black, (x0 + 1) clamped at 0 and averaged over channels and
inputs, that falls in each cell of the 3x3 grid (row-major, top left first). A model that has learned
"at the top left" puts well over 1/9 of it in cell 0; one that ignores place words prints the same map
for every prompt. Also printed: the mean |D| difference between the first two prompts at each sigma,
against that between two prompts that differ in color and shape. For relations, the same for "a red circle above a
blue square" and "... below ...": their mean |D| difference and, for each, how far the red object's predicted mass
sits below the blue one's (row centroids as fractions of the height: negative = red above blue; a model that has
learned the relation prints opposite signs).

    python bench/layout_probe.py --models shapes runs/export
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edit import cell_mask  # noqa: E402  (bench/edit.py)

from diffuse.pipeline import Pipeline  # noqa: E402

PROMPTS = ("a red circle at the top left", "a red circle at the bottom right", "a red circle on the left",
           "a red circle at the top")
CONTENT_PAIR = ("a red circle", "a blue square")
RELATION_PAIR = ("a red circle above a blue square", "a red circle below a blue square")


def cell_shares(x0: torch.Tensor) -> list[float]:
    """x0 [B, C, H, W] in [-1, 1] -> 9 shares of its mean brightness above black, one per grid cell."""
    bright = (x0 + 1).clamp(min=0).mean((0, 1)).numpy()  # [H, W]
    cells = [bright[cell_mask(cell, bright.shape[0]) == 1].mean() for cell in range(9)]
    return [float(v / sum(cells)) for v in cells]


def red_below_blue(x0: torch.Tensor) -> float:
    """x0 [B, 3, H, W] in [-1, 1] -> row centroid of its red mass minus that of its blue mass, in fractions of H.

    Red mass is where the red channel exceeds the blue one (a red object is (1, -1, -1)), blue mass the reverse.
    """
    rb = (x0[:, 0] - x0[:, 2]).mean(0) / 2  # [H, W]
    rows = (torch.arange(rb.shape[0], dtype=rb.dtype) + 0.5) / rb.shape[0]

    def centroid(w: torch.Tensor) -> float:
        return float((w.sum(1) * rows).sum() / w.sum().clamp(min=1e-8))

    return centroid(rb.clamp(min=0)) - centroid((-rb).clamp(min=0))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes"], help="shapes text models (shipped names or folders)")
    ap.add_argument("--sigmas", default="20,5,2", help="noise levels to probe")
    ap.add_argument("--n", type=int, default=32, help="pure-noise inputs per prompt")
    args = ap.parse_args()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    torch.set_grad_enabled(False)
    for name in args.models:
        pipe = Pipeline.load(name, precision="fp32")
        model = pipe.model
        if model.cfg.conditioning != "text":
            raise SystemExit(f"error: {name} is not a text model; the probe needs a shapes text-to-image model")
        print(f"{name} ({pipe.model_hash})")
        for sigma in sigmas:
            x = torch.randn(args.n, model.cfg.channels, model.cfg.image_size, model.cfg.image_size,
                            generator=torch.Generator().manual_seed(0)) * sigma
            s = torch.full((args.n,), sigma)
            d = {p: model.denoise(x, s, model.condition(prompts=[p] * args.n)) for p in PROMPTS + CONTENT_PAIR + RELATION_PAIR}
            place = (d[PROMPTS[0]] - d[PROMPTS[1]]).abs().mean().item()
            content = (d[CONTENT_PAIR[0]] - d[CONTENT_PAIR[1]]).abs().mean().item()
            print(f"  sigma {sigma:g}: mean |D| difference, place words {place:.4f}, color and shape {content:.4f}")
            for p in PROMPTS:
                print(f"    {p:<34} " + " ".join(f"{v:.2f}" for v in cell_shares(d[p])))
            relation = (d[RELATION_PAIR[0]] - d[RELATION_PAIR[1]]).abs().mean().item()
            print(f"    relation words {relation:.4f}; red below blue by " +
                  ", ".join(f"{red_below_blue(d[p]):+.3f} ({p.split()[3]})" for p in RELATION_PAIR))


if __name__ == "__main__":
    main()
