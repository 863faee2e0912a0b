"""The ``diffuse`` command (also ``python -m diffuse``): one subcommand per job.

Errors a user can fix (bad arguments, missing files, bad checkpoints) print one line,
``error: ...``, and exit with status 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from .cli_options import (fast_path_options, provenance_options, sample_settings, setting_flags, slug, writable_folder,
                          write_results)

EXAMPLES = {
    "train": "diffuse train --preset tiny --out runs/tiny\n  diffuse train --preset shapes-t2i --out runs/shapes --set train.lr=2e-4 --max-steps 5000\n  diffuse train --out runs/shapes --resume",
    "export": "diffuse export runs/shapes --out models/my-shapes",
    "convert": "diffuse convert stable-diffusion-v1-5/ --out models/sd15 --dtype bfloat16\n"
               "  diffuse convert v1-5-pruned-emaonly.safetensors --out models/sd15\n"
               "  diffuse convert v2-1_768-ema-pruned.safetensors --prediction v --out models/sd21\n"
               "  diffuse convert models/sd15 --to diffusers --out sd15-diffusers/",
    "generate": 'diffuse generate "a red circle above a blue square" --seed 0-7 --out out/',
    "edit": 'diffuse edit inpaint --image in.png --mask mask.png --prompt "a green triangle" --seed 0-3 --out out/',
    "img2img": 'diffuse edit img2img --image in.png --prompt "a red circle above a blue square" --strength 0.6 --out out/',
    "inpaint": 'diffuse edit inpaint --image in.png --mask mask.png --prompt "a green triangle" --feather 2 --jumps 3 --out out/',
    "outpaint": 'diffuse edit outpaint --image in.png --extend left=16,right=16 --model my-model --prompt "..." --out out/',
    "invert": 'diffuse edit invert --image in.png --prompt "a red circle" --target-prompt "a blue circle" --steps 50 --out out/',
    "presets": "diffuse presets",
    "train-vae": "diffuse train-vae --preset vae-shapes-f4 --out runs/vae --export models/vae-shapes\n  diffuse train-vae --preset vae-folder-f8 --data folder:photos --out runs/vae-photos\n  diffuse train-vae --out runs/vae --resume --max-steps 6000 --export models/vae-shapes --overwrite\n  diffuse train-vae --preset vae-shapes-f4 --init-from training/vae-shapes/model --out runs/vae-longer",
    "info": "diffuse info shapes",
    "samplers": "diffuse samplers",
    "eval": "diffuse eval adherence --model shapes --n-per-family 50 --guidance-sweep 1,2,3,4,6",
    "fid": "diffuse eval fid --model digits --ref digits --steps 10\n  diffuse eval fid --model digits --steps 10 --eps-scaling 1.005 --dcw 0.005\n"
           "  diffuse eval fid --images out/ --ref digits",
    "serve": "diffuse serve --model shapes --port 7860   (then open http://127.0.0.1:7860/)\n"
             "  diffuse serve --model shapes --host 0.0.0.0 --token \"$(openssl rand -hex 16)\"",
    "adherence": "diffuse eval adherence --model shapes --n-per-family 200 --cfg 3 --json adherence.json\n"
                 "  diffuse eval adherence --images out/",
    "replay": "diffuse replay out/a-red-circle-s0.png\n  diffuse replay image.png --model models/my-shapes --tolerance 0.5\n"
              "  diffuse replay out/photo-inpaint-s0.png --input photo.png",
    "verify": "diffuse verify out/a-red-circle-s0.png --trust keys/root.pem",
    "init": "diffuse keys init --out keys/",
    "keys": "diffuse keys init --out keys/\n  diffuse generate \"a red circle\" --size 256 --sign keys/ --out out/",
}


EDITS = {
    "img2img": "SDEdit: noise the image to the sigma --strength selects and denoise from there (only those steps run).",
    "inpaint": "Replace the mask's white region and keep the black region exactly (known pixels re-imposed every step).",
    "outpaint": "Extend the canvas (--extend left=16,top=0,...) and fill the new area; the canvas must stay a size the model makes.",
    "invert": "Deterministic DDIM/ODE inversion of an image to noise and its reconstruction; --target-prompt redraws it "
              "from the same noise (same layout, different prompt). Sampler euler, ddim or heun (default heun), "
              "cfg default 1; seeds are unused.",
}


class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows real defaults (not None or an unset flag's False) and keeps the example block's line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "(default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _subparser(subs: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    # argparse %-formats help strings (for %(default)s) but not descriptions
    return subs.add_parser(name, help=help_text.replace("%", "%%"), description=help_text, formatter_class=Formatter,
                           epilog=f"example:\n  {EXAMPLES[name]}")


# ---------------------------------------------------------------- commands

def cmd_train(args: argparse.Namespace) -> int:
    from .config import apply_overrides, preset
    from .train import train

    if args.resume and (args.preset or args.set):
        raise ValueError("--resume continues a run with its saved config; drop --preset and --set (only --max-steps may change)")
    cfg = None if args.resume else apply_overrides(preset(args.preset or "tiny"), args.set or [])
    result = train(cfg, Path(args.out), resume=args.resume, max_steps=args.max_steps, device=args.device)
    print(f"trained to step {result.step} (last loss {result.last_loss:.4f}, {result.bad_steps} skipped steps); run folder: {result.run_dir}")
    return 0


def cmd_train_vae(args: argparse.Namespace) -> int:
    from .train_vae import run_cli

    return run_cli(args)


def cmd_export(args: argparse.Namespace) -> int:
    from .train import export_run

    from .pipeline import SampleSettings

    sampling = setting_flags(args)
    SampleSettings(**sampling)  # checks the values
    if args.plan_layout:
        sampling["plan_layout"] = True
    out = export_run(Path(args.run_dir), Path(args.out), overwrite=args.overwrite, dtype=args.dtype, sampling=sampling)
    print(f"wrote model folder {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert.build import convert, export_diffusers

    if args.to == "diffusers":
        if args.prediction or args.dtype != "float32":
            raise ValueError("--prediction and --dtype are for importing; --to diffusers writes the model's own weights")
        out = export_diffusers(Path(args.src), Path(args.out), overwrite=args.overwrite)
        print(f"wrote diffusers pipeline folder {out} (load it with DiffusionPipeline.from_pretrained)")
        return 0
    out = convert(Path(args.src), Path(args.out), dtype=args.dtype, prediction=args.prediction, overwrite=args.overwrite)
    prompt = "\"a photo of a cat\" " if (out / "tokenizer").is_dir() else ""
    print(f"wrote model folder {out}; try: diffuse generate {prompt}--model {out}")
    return 0


def _correction_flags(p: argparse.ArgumentParser) -> None:
    """--eps-scaling, --eps-scaling-k, --dcw: the training-free corrections of diffuse.corrections."""
    p.add_argument("--eps-scaling", type=float, metavar="B", help="epsilon scaling (Ning et al. 2023): divide the noise "
                   "prediction by lambda = B + K sigma/sigma_max, e.g. 1.005; default: the model's (1 = off)")
    p.add_argument("--eps-scaling-k", type=float, metavar="K", help="slope K of the epsilon-scaling schedule; default 0 (uniform)")
    p.add_argument("--dcw", type=float, metavar="L", help="wavelet low-band SNR-t correction strength lambda_l (SNR-t bias "
                   "paper, 2026), e.g. 0.005 or -0.005; default: the model's (0 = off)")


def cmd_generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .pipeline import Pipeline
    from .plot import image_grid
    from .rng import parse_seeds

    if args.prompt is not None and len(args.prompt) > 1000:
        raise ValueError(f"the prompt is {len(args.prompt)} characters long; keep it under 1000")
    seeds = parse_seeds(args.seed)
    pipe = Pipeline.load(args.model, vae_tile=args.vae_tile, **fast_path_options(args))
    keys = provenance_options(pipe, args)
    settings = sample_settings(pipe, args)
    notes = pipe.check_prompt(args.prompt, args.negative)  # refuse bad input before any folder or progress bar
    size = pipe.check_size(args.size) if args.size is not None else pipe.model.cfg.image_size * pipe.codec.factor
    pipe.layouts([args.prompt] * len(seeds), seeds, size, args.region or [], args.region_background, args.plan_layout,
                 require_plan=True)  # refuse bad layouts before any folder or progress bar
    out = writable_folder(Path(args.out))
    stem = slug(args.prompt) if args.prompt else pipe.name  # unconditional models: just the model's name
    if not args.prompt and args.class_label is not None:
        stem += f"-class{args.class_label}"
    paths = [out / f"{stem}-s{seed}.png" for seed in seeds]
    grid_path = out / f"{stem}-grid.png"
    existing = [p for p in paths + ([grid_path] if args.grid else []) if p.exists()]
    if existing and not args.overwrite:
        raise ValueError(f"{existing[0]} already exists; pass --overwrite to replace it or choose another --out")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    bar = tqdm(total=len(seeds) * settings.steps, desc="generate", unit="step", disable=args.quiet)
    images = pipe(args.prompt, negative=args.negative, class_label=args.class_label, seeds=seeds, settings=settings,
                  size=args.size, batch_size=args.batch_size, callback=lambda info: bar.update(len(info.x)),
                  regions=args.region or [], region_background=args.region_background, plan_layout=args.plan_layout)
    bar.close()
    write_results(images, paths, args, keys)
    if args.grid:
        import numpy as np

        grid = image_grid(np.stack([np.asarray(g.image.convert("RGB")) for g in images]), scale=max(1, 128 // images[0].image.width))
        grid.save(grid_path)
        print(grid_path)
    return 0


def cmd_edit(args: argparse.Namespace) -> int:
    from .cli_edit import run_edit

    return run_edit(args)


def cmd_replay(args: argparse.Namespace) -> int:
    from .replay import replay

    report = replay(args.image, model=args.model, device=args.device, tolerance=args.tolerance, input_image=args.input,
                    mask=args.mask)
    print("\n".join(report.lines()))
    return 0 if report.matched else 1


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify

    result = verify(args.image, Path(args.trust).read_bytes() if args.trust else None)
    print("\n".join(result.lines()))
    return 0 if result.ok else 1


def cmd_keys(args: argparse.Namespace) -> int:
    from .credentials import init_keys

    out = init_keys(Path(args.out), common_name=args.name, days=args.days, overwrite=args.overwrite)
    print(f"wrote a development certificate chain to {out} (chain.pem, signer.key, root.pem); it is self-signed, "
          f"so verifiers call it untrusted unless given --trust {out / 'root.pem'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .cli_eval import run

    return run(args)


def cmd_info(args: argparse.Namespace) -> int:
    from .pipeline import Pipeline

    pipe = Pipeline.load(args.model)
    m = pipe.model.cfg
    params = sum(p.numel() for p in pipe.model.parameters())
    size = f"{m.image_size}x{m.image_size}x{m.channels}"
    if pipe.codec.factor > 1:  # a latent model: its native image size, then what the denoiser sees
        native = m.image_size * pipe.codec.factor
        size = f"{native}x{native} images ({size} latents, VAE factor {pipe.codec.factor})"
    print(f"model {pipe.name}: {m.backbone}, {params / 1e6:.2f}M parameters, {m.precond} parameterization, "
          f"{size}, sigma {m.sigma_min:.4g}..{m.sigma_max:.4g}, model hash {pipe.model_hash}")
    if m.conditioning == "class":
        print(f"class-conditional: labels 0..{m.num_classes - 1}")
    elif m.conditioning == "text" and m.text_encoder == "builtin":
        words = pipe.model.text_encoder.tokenizer.vocab
        print(f"text-conditional ({m.text_encoder} encoder); vocabulary ({len(words)} words): {' '.join(words)}")
    elif m.conditioning == "text":
        print(f"text-conditional ({m.text_encoder} encoder): any prompt" +
              ("; 75 tokens per window, longer prompts take several windows" if m.text_encoder == "clip" else ""))
    if m.inpainting:
        print("inpainting model: also sees [mask, masked image] (edit inpaint/outpaint use them; plain generation "
              "passes a mask that replaces everything)")
    d = pipe.defaults
    interval = f" (guidance where {d.cfg_interval[0]:g} < sigma <= {d.cfg_interval[1]:g})" if d.cfg_interval else ""
    print(f"sampling defaults: sampler {d.sampler}, {d.steps} steps, schedule {d.schedule}, cfg {d.cfg}{interval}")
    if pipe.plan_layout:
        print("layout planning: on by default (--no-plan-layout / plan_layout=False: off)")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    serve(args.model or ["shapes"], host=args.host, port=args.port, max_queue=args.max_queue, max_batch=args.max_batch,
          keep_jobs=args.keep_jobs, token=args.token, max_upload_mb=args.max_upload_mb, max_upload_pixels=args.max_upload_pixels,
          out=Path(args.out) if args.out else None, device=args.device, **fast_path_options(args))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from .config import presets

    for name, cfg in presets().items():
        m, t = cfg.model, cfg.train
        print(f"{name:12s} {m.backbone:5s} {m.conditioning:6s} {m.image_size}x{m.image_size}x{m.channels}  data={t.data} "
              f"batch={t.batch_size} steps={t.max_steps} lr={t.lr} precision={t.precision}")
    return 0


def cmd_samplers(args: argparse.Namespace) -> int:
    from .samplers import SAMPLERS
    from .schedules import SCHEDULES

    for name, fn in SAMPLERS.items():
        opts = ", ".join(f"{k}={v}" for k, v in fn.options.items()) or "-"
        kind = "stochastic" if fn.stochastic else "deterministic"
        print(f"{name:20s} {kind:13s} options: {opts}")
    print("schedules: " + ", ".join(SCHEDULES))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "export": cmd_export, "generate": cmd_generate, "edit": cmd_edit, "info": cmd_info, "eval": cmd_eval, "presets": cmd_presets, "samplers": cmd_samplers,
    "serve": cmd_serve,
    "replay": cmd_replay, "verify": cmd_verify, "keys": cmd_keys,
    "train-vae": cmd_train_vae, "convert": cmd_convert,
}


def _generation_flags(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options `generate` and every `edit` share: model, conditioning, sampling, seeds, output."""
    p.add_argument("--negative", help="negative prompt: what guidance steers away from")
    p.add_argument("--model", default="shapes", help="shipped model name (shapes, digits) or a model folder")
    p.add_argument("--class", dest="class_label", type=int, help="class label for class-conditional models")
    p.add_argument("--sampler", help="sampler name (see `diffuse samplers`); default: the model's")
    p.add_argument("--steps", type=int, help="solver steps; default: the model's")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = off); default: the model's")
    _cfg_interval_flag(p, "default: the model's")
    p.add_argument("--schedule", help="sigma schedule (karras, exponential, ...); default: the model's")
    p.add_argument("--seed", default="0", help="seeds, one image each: 7, 0-7 or 1,5,9")
    p.add_argument("--batch-size", type=int, default=8, help="images sampled together (results do not depend on it)")
    p.add_argument("--vae-tile", type=int, default=0, metavar="N",
                   help="latent models: decode latents larger than N on a side in tiles (less memory, same image)")
    p.add_argument("--out", default="out", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace existing files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _fast_path_flags(p: argparse.ArgumentParser) -> None:
    """--precision, --[no-]channels-last and --[no-]compile (diffuse.fastpath): for generate, every edit and serve."""
    from .fastpath import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="denoiser arithmetic; auto: bf16 autocast "
                   "where the hardware multiplies bf16 natively (CUDA, CPUs with avx512_bf16 or amx_bf16), else fp32 "
                   "(recorded in the PNG)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="convolutions in "
                   "NHWC memory order (faster on CPU; recorded in the PNG)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False, help="run the denoiser through "
                   "torch.compile, compiled graphs cached in $DIFFUSE_CACHE/inductor; off by default: on CPU compiling "
                   "takes far longer than sampling (see README)")


def _cfg_interval_flag(p: argparse.ArgumentParser, default: str) -> None:
    p.add_argument("--cfg-interval", metavar="LO,HI", help="guide only where LO < sigma <= HI, skipping the unconditional "
                   f"branch elsewhere (Kynkaanniemi et al. 2024), e.g. 0.3,5; none: every step; {default}")


def _provenance_flags(p: argparse.ArgumentParser) -> None:
    """--no-watermark, --sign, --blocklist: for generate and every edit."""
    p.add_argument("--no-watermark", action="store_true", help="do not add the invisible watermark (recorded in the PNG)")
    p.add_argument("--sign", metavar="KEYDIR", help="sign each PNG with C2PA content credentials (chain.pem + signer.key in KEYDIR)")
    p.add_argument("--blocklist", metavar="FILE", help="prompt block list replacing the default one ('none': no list)")


def _edit_flags(edit: str, p: argparse.ArgumentParser) -> None:
    p.add_argument("--image", required=True, help="input image (PNG, JPEG, WebP); never overwritten")
    p.add_argument("--prompt", help="what the result shows (text models)")
    if edit == "inpaint":
        p.add_argument("--mask", required=True, help="mask of the image's size: white = replace, black = keep")
        p.add_argument("--binarize", action="store_true", help="threshold a mask with gray pixels at 50%% (otherwise an error)")
    if edit in ("img2img", "inpaint"):
        p.add_argument("--strength", type=float, default=0.75 if edit == "img2img" else 1.0,
                       help="fraction of the schedule to run, in (0, 1]; 1 starts from pure noise")
    if edit == "outpaint":
        p.add_argument("--extend", required=True, help="pixels to add per side, e.g. left=16,top=0,right=16,bottom=0")
    if edit in ("inpaint", "outpaint"):
        p.add_argument("--feather", type=int, default=0, help="soften the mask edge inward over this many pixels")
        p.add_argument("--jumps", type=int, default=0, help="RePaint resampling: rerun each block of steps this many more times")
        p.add_argument("--jump-length", type=int, default=10, help="RePaint block length in steps")
    if edit == "invert":
        p.add_argument("--target-prompt", action="append", default=[], help="redraw from the inverted noise with this prompt (repeatable)")
        p.add_argument("--target-class", action="append", type=int, default=[], help="redraw with this class label (repeatable)")
    if edit != "outpaint":
        p.add_argument("--resize", action="store_true", help="resample a square image of another size to the model's size")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffuse", description="Diffusion-model image generation: train, sample, evaluate.",
                                     formatter_class=Formatter)
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    subs.required = True

    p = _subparser(subs, "train", "Train a denoiser from a preset (or resume a run).")
    p.add_argument("--preset", help="preset name (see `diffuse presets`); default tiny")
    p.add_argument("--out", required=True, help="run folder (config, checkpoints/, samples/, metrics.csv, loss.png)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.lr=1e-4 (repeatable)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (overrides train.max_steps)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")

    p = _subparser(subs, "train-vae", "Train a KL autoencoder for latent diffusion; --export writes a VAE folder.")
    p.add_argument("--preset", help="vae-tiny (default), vae-shapes-f4 (64x64 -> 16x16x4) or vae-folder-f8")
    p.add_argument("--data", help="dataset: shapes, digits or folder:PATH (default: the preset's)")
    p.add_argument("--out", required=True, help="run folder (config, checkpoints/, samples/ reconstructions, metrics.csv)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    p.add_argument("--init-from", metavar="VAE_FOLDER", help="start a new run from an exported VAE of the same preset "
                                                            "(to train it longer; fresh optimizer and schedule)")
    p.add_argument("--export", metavar="DIR", help="then write a VAE folder (latent scale/shift measured on the data)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --export folder")

    p = _subparser(subs, "export", "Write a model folder (EMA weights + config + tokenizer) from a run.")
    p.add_argument("run_dir", help="training run folder")
    p.add_argument("--out", required=True, help="model folder to create")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="storage dtype of the weights")
    p.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    p.add_argument("--sampler", help="the model's default sampler (default: dpmpp_2m)")
    p.add_argument("--steps", type=int, help="the model's default number of steps (default: 20)")
    p.add_argument("--cfg", type=float, help="the model's default guidance scale (default: 1, off)")
    _cfg_interval_flag(p, "the model's default (default: none)")
    p.add_argument("--schedule", help="the model's default sigma schedule (default: karras)")
    p.add_argument("--plan-layout", action="store_true", help="shapes models: plan layouts by default (see `diffuse "
                   "generate --help`)")

    p = _subparser(subs, "convert", "Import a diffusers pipeline folder or a Stable Diffusion 1.x/2.x .safetensors file as a "
                   "model folder, or export a converted model folder to diffusers (--to diffusers). Only safetensors are "
                   "read; pickle files (.ckpt/.pt/.bin) are refused, whatever their name.")
    p.add_argument("src", help="diffusers pipeline folder (with model_index.json), single-file .safetensors, or (with "
                   "--to diffusers) a model folder")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--to", choices=["diffuse", "diffusers"], default="diffuse", help="what to write")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="storage dtype of the converted U-Net and text encoder (bfloat16 halves their size; the VAE stays float32)")
    p.add_argument("--prediction", choices=["eps", "v"],
                   help="what an SD 2.x single file predicts (512-base: eps, 768-v: v); SD 1.x files are eps")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")

    p = _subparser(subs, "generate", "Generate images from a prompt (text models) or a class label (class models).")
    p.add_argument("prompt", nargs="?", help="what to draw, e.g. \"a red circle above a blue square\"")
    _generation_flags(p)
    _correction_flags(p)
    p.add_argument("--size", type=int, help="image size in pixels; default: the model's native size")
    p.add_argument("--region", action="append", metavar="X0,Y0,X1,Y1=PROMPT",
                   help="a prompt for a box of the canvas (fractions, 0,0 the top left), fused with the whole prompt at "
                        "every step (MultiDiffusion); repeat for more boxes, e.g. --region \"0,0,1,0.5=a red circle at the top\"")
    p.add_argument("--region-background", metavar="COLOR",
                   help="isolate the --region boxes over this background (black, #rrggbb or R,G,B): each region's path sees "
                        "only its own box, and pixels no box covers are the background; needed when regions repeat an object")
    p.add_argument("--plan-layout", action=argparse.BooleanOptionalAction,
                   help="shapes models: lay out the prompt as isolated regions on the black canvas: two objects (\"a red "
                        "circle above a blue square\", \"... and ...\"), a count (\"three red circles\") or one object "
                        "(in its named place, else in cell SEED %% 9); default: the model's (the shipped shapes plans "
                        "what it can); --no-plan-layout: the network alone")
    p.add_argument("--grid", action="store_true", help="also write a grid of all images")
    _provenance_flags(p)
    _fast_path_flags(p)

    p = _subparser(subs, "edit", "Edit an image: img2img (SDEdit), inpaint, outpaint, invert.")
    edits = p.add_subparsers(dest="edit", metavar="EDIT")
    edits.required = True
    for name, help_text in EDITS.items():
        sub = _generation_flags(_subparser(edits, name, help_text))
        _edit_flags(name, sub)
        _correction_flags(sub)
        _provenance_flags(sub)
        _fast_path_flags(sub)

    p = _subparser(subs, "eval", "Evaluate a model or a folder of images.")
    metrics = p.add_subparsers(dest="metric", metavar="METRIC")
    metrics.required = True
    p = _subparser(metrics, "adherence", "Prompt adherence on the shapes world (GenEval-style): per-family accuracy "
                   "with bootstrap intervals, for a model's images or a folder of images.")
    p.add_argument("--model", help="text-to-image shapes model (shipped name or folder) to generate and score images")
    p.add_argument("--images", metavar="DIR", help="score the images in DIR instead; prompts from prompts.jsonl "
                   "({\"file_name\", \"prompt\"[, \"family\"]}), the PNG's diffuse record or AUTOMATIC1111 parameters")
    p.add_argument("--skip-unprompted", action="store_true", help="with --images: skip images without a prompt (warning) instead of failing")
    p.add_argument("--n-per-family", type=int, default=200, help="evaluation prompts per family (7 families)")
    p.add_argument("--prompt-seed", type=int, default=0, help="seed of the evaluation prompt set")
    p.add_argument("--seed-base", type=int, default=0, help="image i is drawn with seed SEED_BASE + i")
    p.add_argument("--sampler", help="sampler name (see `diffuse samplers`); default: the model's")
    p.add_argument("--steps", type=int, help="solver steps; default: the model's")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale; default: the model's")
    _cfg_interval_flag(p, "default: the model's")
    p.add_argument("--schedule", help="sigma schedule; default: the model's")
    _correction_flags(p)
    p.add_argument("--guidance-sweep", metavar="W1,W2,...", help="evaluate each guidance scale on the same prompts and seeds, e.g. 1,2,3,4,6")
    p.add_argument("--plan-layout", action=argparse.BooleanOptionalAction, help="lay out each prompt the planner can (two "
                   "objects, a count, one object; as `diffuse generate --plan-layout`), the others sampled plainly; "
                   "default: the model's; --no-plan-layout scores the network alone")
    p.add_argument("--batch-size", type=int, default=16, help="images sampled together (results do not depend on it)")
    p.add_argument("--save-images", action="store_true", help="write the images (PNG with records) and prompts.jsonl to --out")
    p.add_argument("--out", default="out/adherence", help="folder for --save-images (one subfolder cfg-W per swept scale)")
    p.add_argument("--json", metavar="FILE", help="write the report (settings, model hash, per-family accuracy and interval, per-image verdicts)")
    p.add_argument("--overwrite", action="store_true", help="replace existing images and report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = _subparser(metrics, "fid", "FID and KID (95% bootstrap intervals) and precision/recall against a dataset, on "
                   "TF-FID Inception features; reference statistics are cached.")
    p.add_argument("--model", help="model (shipped name or folder) to generate images with")
    p.add_argument("--images", metavar="DIR", help="score the images in DIR instead (any tool's; one size)")
    p.add_argument("--ref", default="digits", help="reference dataset: digits, shapes or folder:PATH")
    p.add_argument("--n", type=int, help="number of images (default: the whole reference set, at most 10,000)")
    p.add_argument("--seed-base", type=int, default=0, help="image i is drawn with seed SEED_BASE + i")
    p.add_argument("--sampler", help="sampler name; default: the model's")
    p.add_argument("--steps", type=int, help="solver steps; default: the model's")
    p.add_argument("--cfg", type=float, help="classifier-free guidance scale; default: the model's")
    p.add_argument("--schedule", help="sigma schedule; default: the model's")
    _correction_flags(p)
    p.add_argument("--batch-size", type=int, default=32, help="images sampled together (results do not depend on it)")
    p.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples for the intervals")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = _subparser(subs, "info", "Describe a model: network, conditioning, vocabulary, sampling defaults.")
    p.add_argument("model", nargs="?", default="shapes", help="shipped model name or model folder")

    p = _subparser(subs, "serve", "Serve an HTTP job API and a web page (needs the serve extra: pip install 'diffuse[serve]').")
    p.add_argument("--model", action="append", help="shipped model name or model folder (repeatable); default: shapes")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (non-loopback needs --token)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--max-queue", type=int, default=32, help="queued jobs before new ones get 429 Too Many Requests")
    p.add_argument("--max-batch", type=int, default=8, help="most images sampled together (one job's batch at most this)")
    p.add_argument("--keep-jobs", type=int, default=100, help="finished jobs kept in memory (oldest evicted)")
    p.add_argument("--token", help="require 'Authorization: Bearer TOKEN' on every route but the page")
    p.add_argument("--max-upload-mb", type=float, default=4.0, help="largest edit upload (image or mask file) in MB")
    p.add_argument("--max-upload-pixels", type=int, default=2048 * 2048, help="largest edit upload in pixels")
    p.add_argument("--out", help="also write every result PNG to this folder, named JOBID-N.png")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    _fast_path_flags(p)

    p = _subparser(subs, "replay", "Regenerate a PNG from its generation record and compare the pixels "
                   "(bit-exact on the same software, else within --tolerance); exit status 1 when they differ. "
                   "An edit's input is regenerated from its chained record, or given with --input.")
    p.add_argument("image", help="PNG written by diffuse generate or diffuse edit")
    p.add_argument("--model", action="append", help="model folder, when the record's model is not a shipped one "
                   "(repeatable: for a chain of edits made with several models; matched by hash)")
    p.add_argument("--input", metavar="IN.png", help="an edit's input image (checked against the record's pixel hash); "
                   "needed when the input has no diffuse record of its own")
    p.add_argument("--mask", metavar="MASK.png", help="an inpainting's mask, when it was too large to embed in the record")
    p.add_argument("--device", default="cpu", help="device to regenerate on")
    p.add_argument("--tolerance", type=float, default=1.0, help="largest mean |pixel difference| (8-bit levels) accepted "
                   "when the software differs from the record's")

    p = _subparser(subs, "verify", "Report an image's invisible watermark, C2PA content credentials and generation "
                   "record; exit status 1 when nothing is found or the file was tampered with.")
    p.add_argument("image", help="image file (PNG, JPEG, ...)")
    p.add_argument("--trust", metavar="ROOT.pem", help="trust this root certificate (e.g. keys/root.pem from `diffuse keys init`)")

    p = _subparser(subs, "keys", "Make signing keys for content credentials.")
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    p = _subparser(actions, "init", "Write a self-signed development certificate chain (ES256): chain.pem, signer.key, root.pem.")
    p.add_argument("--out", default="keys", help="folder for the keys")
    p.add_argument("--name", default="diffuse development signer", help="common name of the signing certificate")
    p.add_argument("--days", type=int, default=365, help="validity of the certificates in days")
    p.add_argument("--overwrite", action="store_true", help="replace existing keys")

    _subparser(subs, "presets", "List training presets.")
    _subparser(subs, "samplers", "List samplers, their options, and sigma schedules.")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ValueError, OSError, ImportError) as e:  # CheckpointError is a ValueError; ImportError: an optional extra
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from .train import TrainingError

        if isinstance(e, TrainingError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
