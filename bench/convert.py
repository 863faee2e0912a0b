"""Stable Diffusion at full size on this CPU: convert, load and generate a 512x512 image, timed, with peak memory.

Random weights in Stable Diffusion 1.5's configuration (U-Net 859.5M parameters, the SD VAE, CLIP ViT-L/14's
text transformer; 1.07B in all) are built with diffusers/transformers and saved as a diffusers pipeline folder
(fp32 safetensors, about 4.3 GB on disk), then, each in a fresh process (its peak resident memory from
``getrusage``):

1. ``diffuse convert SRC --out DST --dtype bfloat16`` (lazy reads, one tensor at a time);
2. ``diffuse generate PROMPT --model DST --size 512 --steps 20 --cfg 7.5`` (dpmpp_2m, guidance on every step) at
   each ``--precision`` asked for: bf16 keeps the bf16-stored U-Net in bf16 (1.7 GB); fp32 upcasts it (3.4 GB);
   and with ``--vae-tile 32`` (the VAE decodes 32x32-latent tiles with global GroupNorm statistics).

Random weights draw noise, not pictures: this measures time and memory only. Needs the bench extra
(``pip install -e ".[bench]"`` plus transformers). The source folder is kept under ``--work`` and reused.

    python bench/convert.py                       # about 15-25 min on a 2-core CPU
    python bench/convert.py --precisions bf16 --steps 4 --size 256   # a quick check of the script
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# a child that runs one diffuse command and reports its own wall time and peak resident memory
CHILD = """
import json, resource, sys, time
start = time.time()
from diffuse.cli import main
code = main(sys.argv[1:])
print("BENCH " + json.dumps({"code": code, "s": time.time() - start,
                             "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""
SD_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512], layers_per_block=2,
              down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4, norm_num_groups=32,
              sample_size=512, scaling_factor=0.18215)
SD_TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               max_position_embeddings=77, hidden_act="quick_gelu")
SD_SCHEDULER = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
                    steps_offset=1)


def build_source(folder: Path) -> None:
    """A random-weight StableDiffusionPipeline folder in SD 1.5's configuration."""
    import diffusers
    import torch
    import transformers

    from diffuse.clip import write_open_clip_vocab
    from diffuse.convert.unet import unet_config_to_diffusers
    from diffuse.nn.unet import UNetConfig

    torch.manual_seed(0)
    sd15 = UNetConfig(in_channels=4, out_channels=4, image_size=64, model_channels=320, channel_mult=(1, 2, 4, 4),
                      num_res_blocks=2, attention_resolutions=(64, 32, 16), num_heads=8, text_dim=768, time_embedding="add")
    unet_config = {k: v for k, v in unet_config_to_diffusers(sd15).items() if not k.startswith("_")}
    vocab = write_open_clip_vocab(folder.with_name(folder.name + "-vocab"))
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**SD_VAE), text_encoder=transformers.CLIPTextModel(transformers.CLIPTextConfig(**SD_TEXT)),
        tokenizer=transformers.CLIPTokenizer(str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77),
        unet=diffusers.UNet2DConditionModel(**unet_config), scheduler=diffusers.DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder)


def run(args: list[str]) -> dict:
    """One diffuse command in a fresh process: its exit code, wall seconds and peak RSS (GiB)."""
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH ")]
    if out.returncode or not lines or json.loads(lines[-1][6:])["code"]:
        raise SystemExit(f"diffuse {' '.join(args)} failed:\n{out.stderr[-2000:]}")
    return json.loads(lines[-1][6:])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("runs/bench-convert"), help="folder for the source and converted models")
    p.add_argument("--precisions", default="bf16,fp32", help="generate at each of these --precision values")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--no-tile", action="store_true", help="skip the --vae-tile 32 run")
    args = p.parse_args()
    source, model = args.work / "sd15-diffusers", args.work / "sd15-bf16"
    if not (source / "model_index.json").is_file():
        start = time.time()
        build_source(source)
        print(f"built the random SD 1.5 pipeline folder in {time.time() - start:.0f} s")
    rows = [("convert (diffusers folder -> bf16 model folder)",
             run(["convert", str(source), "--out", str(model), "--dtype", "bfloat16", "--overwrite"]))]
    common = ["generate", "a photo of a cat", "--model", str(model), "--size", str(args.size), "--steps", str(args.steps),
              "--cfg", "7.5", "--sampler", "dpmpp_2m", "--seed", "0", "--overwrite", "--quiet"]
    for precision in args.precisions.split(","):
        rows.append((f"generate {args.size}x{args.size}, {args.steps} steps, --precision {precision}",
                     run([*common, "--precision", precision, "--out", str(args.work / f"out-{precision}")])))
    if not args.no_tile:
        precision = args.precisions.split(",")[0]
        rows.append((f"  same, --precision {precision} --vae-tile 32",
                     run([*common, "--precision", precision, "--vae-tile", "32", "--out", str(args.work / "out-tile")])))
    import platform

    import torch

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}\n")
    print("| step | wall s (process start to exit) | peak RSS GiB |\n|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['s']:.1f} | {r['rss_gib']:.2f} |")


if __name__ == "__main__":
    main()
