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

First, the text encoder alone: for prompts that differ in one word (above/below, left/right, top/bottom, two/three,
red/green, circle/triangle, each over several fillings of the rest), the distance between the two encodings at the
changed word's token, relative to that token's norm, and over the whole prompt (mean over its tokens). A word the
encoder maps close to its partner cannot steer the denoiser, whatever the denoiser learns.

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


# (prompt template, word a, word b): the template's {} is filled with a, then b
WORD_SWAPS = (("a {c} {s} {} a {c2} {s2}", "above", "below"), ("a {c} {s} to the {} of a {c2} {s2}", "left", "right"),
              ("a {c} {s} at the {} left", "top", "bottom"), ("{} {c} {s}s", "two", "three"),
              ("a {} {s} above a {c2} {s2}", "red", "green"), ("a {c} {} above a {c2} {s2}", "circle", "triangle"))
FILLS = [dict(c=c, s=s, c2=c2, s2=s2) for c, c2 in (("red", "blue"), ("yellow", "white"), ("cyan", "orange"))
         for s, s2 in (("circle", "square"), ("square", "triangle"))]


def text_separation(model, template: str, a: str, b: str) -> tuple[float, float]:
    """Mean over FILLS of (distance at the swapped word's token / its norm, mean distance over the prompt's tokens /
    mean token norm) between the encodings of ``template`` with ``a`` and with ``b``."""
    at_word, whole = [], []
    for fill in FILLS:
        keep = {k: v for k, v in fill.items() if f"{{{k}}}" in template}
        pa, pb = template.replace("{}", a).format(**keep), template.replace("{}", b).format(**keep)
        c = model.condition(prompts=[pa, pb])
        ea, eb, mask = c["text"][0], c["text"][1], c["text_mask"][0]
        i = pa.split().index(a) + 1  # the word tokenizer: <bos>, then one token per word
        dist = (ea - eb).norm(dim=-1)
        at_word.append(float(dist[i] / ea[i].norm()))
        whole.append(float(dist[mask].mean() / ea[mask].norm(dim=-1).mean()))
    return sum(at_word) / len(at_word), sum(whole) / len(whole)


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
        print("  text encoder: relative distance between prompts that differ in one word (at that word's token; whole prompt)")
        for template, a, b in WORD_SWAPS:
            word, whole = text_separation(model, template, a, b)
            print(f"    {a + ' / ' + b:<18} {word:.3f}  {whole:.3f}")
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
