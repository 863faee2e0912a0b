"""Editing benchmarks on the shapes world: inversion round-trip error vs NFE, and inpainting success.

* ``inversion``: rendered shapes scenes (their captions as prompts) inverted to noise with
  Euler (= DDIM) or Heun steps forward in sigma, then sampled back with the same solver;
  RMSE (0..255 levels) and PSNR of the reconstruction for each number of steps.
* ``inpaint``: two-object scenes; the second object's grid cell is masked and inpainted;
  success = the adherence scorer accepts the result for "<first object> and a green triangle"
  (the kept pixels are checked to equal the input exactly). ``--prompts`` picks what the model is
  told: ``scene`` that whole-scene prompt, ``new`` only "a green triangle", ``new-negative`` "a green
  triangle" with the first object as negative prompt (so no copy of it is drawn into the hole),
  ``new-place`` "a green triangle" with the masked cell's place words ("... at the top left").

    python bench/edit.py inversion --n 8 --steps 5,10,20,50,100
    python bench/edit.py inpaint --n 50 --jumps 0,3 --prompts scene,new
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import itertools
import math
import platform
import time

import numpy as np
import torch

from diffuse import adherence, edit, shapes
from diffuse.pipeline import Pipeline, SampleSettings, guided_denoiser
from diffuse.samplers import get_sampler


def scenes(n: int, family: str, seed0: int = 10_000) -> list[shapes.Example]:
    return [shapes.sample(seed0 + i, family=family, split="any") for i in range(n)]


def inversion(pipe: Pipeline, n: int, steps_list: list[int], cfg: float) -> None:
    examples = scenes(n, "two_objects")
    images = np.stack([shapes.render(e.scene, pipe.model.cfg.image_size) for e in examples])
    x0 = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    print("| solver | steps | NFE (invert + reconstruct) | RMSE (0..255) | PSNR dB | seconds |")
    print("|---|---|---|---|---|---|")
    for name, order in (("euler", 1), ("heun", 2)):
        for steps in steps_list:
            settings = SampleSettings(sampler=name, steps=steps, cfg=cfg)
            denoiser, cond = guided_denoiser(pipe.model, settings, n, prompts=[e.caption for e in examples])
            sigmas = settings.sigmas(pipe.model).tolist()
            start = time.perf_counter()
            with torch.no_grad():
                noise, nfe_inv = edit.invert_to_noise(denoiser, cond, x0, sigmas, order)
                back = get_sampler(name)(denoiser, noise, sigmas, cond)
            seconds = time.perf_counter() - start
            rec = ((back.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
            mse = float(np.mean((rec - images.astype(np.float64)) ** 2))
            nfe = nfe_inv + get_sampler(name).nfe(sigmas)
            print(f"| {name} | {steps} | {nfe_inv} + {nfe - nfe_inv} | {math.sqrt(mse):.2f} | {10 * math.log10(255**2 / mse):.1f} | {seconds:.0f} |")


def cell_mask(cell: int, size: int) -> np.ndarray:
    row, col = shapes.cell_row_col(cell)
    m = np.zeros((size, size), np.float32)
    lo = lambda k: math.floor(k * size / 3)  # noqa: E731
    hi = lambda k: math.ceil((k + 1) * size / 3)  # noqa: E731
    m[lo(row):hi(row), lo(col):hi(col)] = 1
    return m


INPAINT_PROMPTS = ("scene", "new", "new-negative", "new-place")
NEW_OBJECT = "a green triangle"


def what_fills(verdict: adherence.Verdict, cell: int) -> str:
    """A failed case's fill, as the scorer sees it: the objects it detects in the masked cell."""
    found = [f"{d.color or '?'} {d.shape or 'blob'}" for d in verdict.detections if d.cell == cell]
    return " + ".join(sorted(found)) or "nothing"


def inpaint(pipe: Pipeline, n: int, jumps_list: list[int], prompt_modes: list[str], settings: SampleSettings,
            cfgs: list[float]) -> None:
    size = pipe.model.cfg.image_size
    cases = []
    for e in scenes(4 * n, "two_objects"):
        a, b = e.scene.objects
        if (a.shape, a.color) == ("triangle", "green") or (b.shape, b.color) == ("triangle", "green"):
            continue
        kept = shapes.noun_phrase(1, a.shape, a.color)
        cases.append((shapes.render(e.scene, size), cell_mask(b.cell, size), f"{kept} and {NEW_OBJECT}", kept, b.cell))
        if len(cases) == n:
            break
    before = sum(adherence.score(img, p).ok for img, _, p, _, _ in cases)
    print(f"{len(cases)} scenes; the source images satisfy the new prompt in {before} cases")
    print("| model told | cfg | jumps | steps run | NFE | success | 95% CI | seconds | failed fills (top 3) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, cfg, jumps in itertools.product(prompt_modes, cfgs, jumps_list):
        settings = dataclasses.replace(settings, cfg=cfg)
        ok, fails, start = [], collections.Counter(), time.perf_counter()
        for i, (img, mask, target, kept, cell) in enumerate(cases):
            told = {"scene": target, "new-place": f"{NEW_OBJECT} {shapes.CELL_PHRASES[cell]}"}.get(mode, NEW_OBJECT)
            negative = kept if mode == "new-negative" else None
            [out] = pipe.inpaint(img_to_pil(img), mask, told, negative=negative, seeds=[i], settings=settings,
                                 jumps=jumps, jump_length=5)
            arr = np.asarray(out.image)
            assert np.array_equal(arr[mask == 0], img[mask == 0])
            verdict = adherence.score(arr, target)
            ok.append(verdict.ok)
            if not verdict.ok:
                fails[what_fills(verdict, cell)] += 1
        p = float(np.mean(ok))
        half = 1.96 * math.sqrt(p * (1 - p) / len(ok))
        top = ", ".join(f"{k} {v}" for k, v in fails.most_common(3))
        print(f"| {mode} | {cfg:g} | {jumps} | {out.record['steps_run']} | {out.record['nfe']} | {p:.2f} "
              f"| [{max(0, p - half):.2f}, {min(1, p + half):.2f}] | {time.perf_counter() - start:.0f} | {top} |")


def img_to_pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(img)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["inversion", "inpaint"])
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", default="5,10,20,50,100", help="inversion: steps per direction")
    ap.add_argument("--cfg", default=None,
                    help="guidance scale; inversion: one value, used in both directions (default 1); "
                         "inpaint: comma-separated values to compare (default: the model's)")
    ap.add_argument("--jumps", default="0,3", help="inpaint: RePaint jumps to compare (jump length 5)")
    ap.add_argument("--prompts", default="scene", help=f"inpaint: what the model is told, any of {', '.join(INPAINT_PROMPTS)}")
    args = ap.parse_args()
    modes = args.prompts.split(",")
    if set(modes) - set(INPAINT_PROMPTS):
        ap.error(f"--prompts: unknown {', '.join(sorted(set(modes) - set(INPAINT_PROMPTS)))}; use {', '.join(INPAINT_PROMPTS)}")
    pipe = Pipeline.load(args.model)
    print(f"{time.strftime('%Y-%m-%d')} {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"model {pipe.name} ({pipe.model_hash})")
    if args.what == "inversion":
        inversion(pipe, args.n, [int(s) for s in args.steps.split(",")], float(args.cfg or 1.0))
    else:
        cfgs = [float(c) for c in args.cfg.split(",")] if args.cfg else [pipe.defaults.cfg]
        inpaint(pipe, args.n, [int(j) for j in args.jumps.split(",")], modes, pipe.defaults, cfgs)


if __name__ == "__main__":
    main()
