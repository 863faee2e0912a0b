"""The ``diffuse edit img2img|inpaint|outpaint|invert`` command: flags in, one PNG (with its record) per result out.
The edits themselves are :mod:`diffuse.edit`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

from . import rng
from .cli_options import fast_path_options, provenance_options, sample_settings, slug, writable_folder, write_results
from .edit import img2img, inpaint, invert, outpaint
from .steps import StepInfo


def run_edit(args: Any) -> int:
    """`diffuse edit img2img|inpaint|outpaint|invert`: write one PNG (with its record) per result."""
    from tqdm import tqdm

    from .pipeline import Pipeline

    image = Path(args.image)
    pipe = Pipeline.load(args.model, vae_tile=args.vae_tile, **fast_path_options(args))
    keys = provenance_options(pipe, args)
    if args.edit == "invert":  # unless asked otherwise: an invertible sampler, and the unguided ODE
        pipe.defaults = dataclasses.replace(pipe.defaults, sampler="heun", sampler_options={}, cfg=1.0)
    settings = sample_settings(pipe, args)
    for prompt in [args.prompt, *getattr(args, "target_prompt", [])]:  # refuse bad prompts before the progress bar starts
        for note in pipe.check_prompt(prompt, args.negative):
            print(f"note: {note}", file=sys.stderr)
    out = writable_folder(Path(args.out))
    stem = slug(image.stem)
    common = dict(negative=args.negative, class_label=args.class_label, settings=settings)
    if args.edit == "invert":
        names = [f"{stem}-invert-reconstruction.png"] + [f"{stem}-invert-{slug(p)}.png" for p in args.target_prompt] \
            + [f"{stem}-invert-class{c}.png" for c in args.target_class]
    else:
        seeds = rng.parse_seeds(args.seed)
        names = [f"{stem}-{args.edit}-s{seed}.png" for seed in seeds]
        common.update(seeds=seeds, batch_size=args.batch_size)
    paths = [out / name for name in names]
    for path in paths:
        if path.exists() and path.resolve() == image.resolve():
            raise ValueError(f"{path} is the input image; edits never overwrite their input, choose another --out")
        if path.exists() and not args.overwrite:
            raise ValueError(f"{path} already exists; pass --overwrite to replace it or choose another --out")
    bar = tqdm(desc=args.edit, unit="step", disable=args.quiet)

    def progress(info: StepInfo) -> None:
        bar.total = info.n * (len(paths) if args.edit == "invert" else len(common["seeds"]))
        bar.update(len(info.x))

    common["callback"] = progress
    if args.edit == "img2img":
        results = img2img(pipe, image, args.prompt, strength=args.strength, resize=args.resize, **common)
    elif args.edit == "inpaint":
        results = inpaint(pipe, image, args.mask, args.prompt, strength=args.strength, feather_px=args.feather,
                          binarize=args.binarize, jumps=args.jumps, jump_length=args.jump_length, resize=args.resize, **common)
    elif args.edit == "outpaint":
        results = outpaint(pipe, image, args.extend, args.prompt, feather_px=args.feather, jumps=args.jumps,
                           jump_length=args.jump_length, **common)
    else:
        results = invert(pipe, image, args.prompt, target_prompts=args.target_prompt, target_labels=args.target_class,
                         resize=args.resize, **common)
    bar.close()
    rec = results[0].record
    for note in rec["input_conversions"]:
        print(f"note: {note}")
    if args.edit == "invert":
        print(f"inverted with {rec['inversion_nfe']} evaluations and reconstructed with {rec['nfe']} ({settings.sampler}, "
              f"{settings.steps} steps): reconstruction RMSE {rec['reconstruction_rmse']:.2f} of 255")
    else:
        print(f"{args.edit}: strength {rec['denoising_strength']:g} ran {rec['steps_run']} solver steps "
              f"({settings.steps - rec['first_step']} of the {settings.steps}-step schedule, from sigma "
              f"{rec['sigmas'][rec['first_step']]:.3g}), {rec['nfe']} denoiser evaluations per image")
    write_results(results, paths, args, keys, ingredient=image)
    if args.edit in ("inpaint", "outpaint") and rec["watermark"]["applied"] and not args.quiet:
        print("note: the invisible watermark changes every pixel slightly, the kept ones too; --no-watermark keeps them "
              "equal to the input", file=sys.stderr)
    return 0
