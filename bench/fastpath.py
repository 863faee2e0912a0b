"""The fast path's defaults, measured: what each switch costs a one-off `diffuse generate`, and how much
of sampling runs outside the network.

Part ``command``: wall seconds of a fresh `python -m diffuse generate` process (imports, model load,
sampling, PNGs) per mode:

* ``plain``: ``--precision fp32 --no-channels-last`` (the path before the fast path);
* ``default``: no flags (precision auto, channels_last);
* ``no-cl``: ``--no-channels-last`` (precision auto, NCHW): what channels_last buys on this machine;
* ``bf16``: ``--precision bf16``;
* ``compile-cold``: ``--compile`` with an empty inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR);
* ``compile-warm``: ``--compile`` again with that cache, as a second run would (list it after compile-cold).

Part ``loop``: CPU time of ``pipeline.generate`` against the CPU time inside the backbone (one
thread, process time), i.e. the share of sampling spent in Python, the sampler, guidance and
preconditioning.

    python bench/fastpath.py                                   # shapes, 8 images, every mode and part
    python bench/fastpath.py --model digits --images 2 --modes plain default bf16 --quick
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

MODES = {
    "plain": ["--precision", "fp32", "--no-channels-last"],
    "default": [],
    "no-cl": ["--no-channels-last"],
    "bf16": ["--precision", "bf16"],
    "compile-cold": ["--compile"],
    "compile-warm": ["--compile"],
}


def command_seconds(model: str, prompt: str, images: int, steps: int, mode: str, cache: Path, threads: int) -> float:
    """Wall seconds of one fresh `diffuse generate` process in ``mode``."""
    with tempfile.TemporaryDirectory() as out:
        args = [sys.executable, "-m", "diffuse", "generate", *([prompt] if prompt else ["--class", "3"]), "--model", model,
                "--seed", f"0-{images - 1}", "--steps", str(steps), "--out", out, "--quiet", *MODES[mode]]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TORCHINDUCTOR_CACHE_DIR": str(cache),
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        start = time.perf_counter()
        subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL)
        return time.perf_counter() - start


def loop_share(model: str, prompt: str, images: int, steps: int) -> tuple[float, float]:
    """(CPU seconds of sampling, share outside the backbone) for one batch, in this process, one thread."""
    from diffuse.pipeline import Pipeline, SampleSettings, generate

    torch.set_num_threads(1)
    pipe = Pipeline.load(model)
    m = pipe.model
    inside = [0.0]
    forward = m.denoiser.backbone.forward

    def timed(*args, **kwargs):
        start = time.process_time()
        y = forward(*args, **kwargs)
        inside[0] += time.process_time() - start
        return y

    m.denoiser.backbone.forward = timed
    settings = SampleSettings(sampler="dpmpp_2m", steps=steps, cfg=2.0)
    conditions = {"prompts": [prompt] * images} if prompt else {"labels": [3] * images}
    generate(m, settings, list(range(images)), **conditions)  # warm-up
    inside[0] = 0.0
    start = time.process_time()
    generate(m, settings, list(range(images)), **conditions)
    total = time.process_time() - start
    return total, 1 - inside[0] / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="shapes")
    p.add_argument("--prompt", default="a red circle above a blue square", help="'' for a class model (class 3)")
    p.add_argument("--images", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--quick", action="store_true", help="2 steps, to check the script")
    args = p.parse_args()
    prompt = "" if args.model == "digits" else args.prompt
    steps = 2 if args.quick else args.steps
    print(f"{args.model}, {args.images} images, {steps} dpmpp_2m steps, {args.threads} threads, torch {torch.__version__}")
    print("\n| mode | command wall s | vs default |\n|---|---|---|")
    with tempfile.TemporaryDirectory() as cache:
        seconds = {mode: command_seconds(args.model, prompt, args.images, steps, mode, Path(cache), args.threads)
                   for mode in args.modes}
    for mode, s in seconds.items():
        print(f"| {mode} | {s:.2f} | {s / seconds['default']:.2f}x |" if "default" in seconds else f"| {mode} | {s:.2f} | |")
    total, share = loop_share(args.model, prompt, args.images, steps)
    print(f"\nsampling loop: {total:.2f} CPU s for the batch, {100 * share:.1f}% outside the backbone")


if __name__ == "__main__":
    main()
