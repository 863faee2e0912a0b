"""Sampling speed per model and execution mode: GFLOP per image, seconds per image, peak memory,
the fraction of this machine's matmul peaks, and diffusers' ``UNet2DConditionModel`` of the
matching configuration side by side (issue #9).

Models: every preset of ``diffuse presets`` (the shipped weights where the preset is shipped and
its folder has the preset's configuration, else random weights); ``sd15``, our U-Net with
Stable Diffusion 1.5's configuration (64x64x4 latents, 320 channels x (1, 2, 4, 4), 2 residual
blocks, attention at 64, 32 and 16 with 8 heads, 77 context tokens of width 768, transformer
depth 1; 859.5M parameters, as SD 1.5's U-Net); and ``NAME@diffusers``, the diffusers U-Net of
NAME's configuration, loaded with NAME's weights (so the models table shows that the two compute
the same function). Random weights are fan-in-scaled Gaussians: the networks' own init zeroes the
output layers, so a fresh network would return exactly c_skip x and hide precision errors.

What one measurement is: a guided step is one call of the sampler's denoiser, classifier-free
guidance with both branches as one batched forward (``CFGDenoiser``: effective batch 2B), at
sigma = 1 on per-image seeded noise, through the model's preconditioning (``Precond``), the text
already encoded. The 20-step run is ``dpmpp_2m`` with 20 Karras steps and guidance on every step
(the plain recipe), run when 20 steps are estimated to fit ``--sample-budget`` seconds; the VAE
decode of latent models is not part of it. Both networks go through the same preconditioning,
guidance and sampler code, so the comparison is between the networks.

* GFLOP: ``torch.utils.flop_counter.FlopCounterMode`` (matmuls, convolutions, attention; not
  norms or elementwise ops) on the fp32 eager forward at batch 1, per image.
* Seconds per image: median of ``--repeats`` timed calls after the first call and ``--warmup``
  more, divided by the batch. "first call" includes compilation; "compile" is first call minus
  the median. On CUDA every timing synchronizes the device.
* Peak memory: each (model, mode, batch) runs in its own process (forked on CPU, spawned on
  CUDA); its peak resident set size (VmHWM) is reset after the model is built (clear_refs), so
  it covers weights + activations + the imported libraries during the timed calls (the first
  one compiles, where a mode compiles) and the 20-step run, not construction. On CUDA,
  ``torch.cuda.max_memory_allocated`` as well.
* Roofline: the best of several 1024^2 and 2048^2 matmuls (on CUDA 4096^2 and 8192^2) in fp32
  and bf16, measured at the start and the end of the run; each row's GFLOP/s is given as a
  fraction of the better fp32 and the better bf16 peak.
* Accuracy: max |D - D_ref| of image 0's guided output, where D_ref is the same model's fp32
  eager output at batch 1 on the same input (image 0 of every batch is the same image).

Modes: ``fp32`` or ``bf16`` (``torch.autocast``) plus flags joined by ``+``: ``cl`` (channels_last
model and input), ``compile`` (``backbone.compile()``, cold: a fresh Inductor cache per process
unless ``--compile-cache DIR``; Inductor's precompiled C++ headers stay shared), ``freeze`` (with
``compile``: Inductor's ``freezing``, which folds the weights into the graph as constants so that
convolutions and linear layers run on weights prepacked once for oneDNN, inference only), ``graph`` (CUDA
only: ``torch.compile(mode="reduce-overhead")``, i.e. one CUDA graph replayed per denoiser call
of the sampling loop; the loop itself is not captured, since guidance and the sampler decide on
the host).

The full grid (all models x modes x batches 1 and 8) takes many hours on a 2-core CPU; it prints
its own estimate after measuring the peaks. Split it, e.g.:

    python bench/speed.py --quick                                     # ~1 minute smoke run, not a result
    SMALL="tiny digits shapes-t2i shapes-t2i@diffusers latent-shapes-t2i latent-shapes-t2i@diffusers latent-folder shapes-dit"
    python bench/speed.py --models $SMALL --modes fp32 bf16 fp32+cl bf16+cl
    python bench/speed.py --models $SMALL --modes fp32+compile bf16+compile
    python bench/speed.py --models sd15 sd15@diffusers --modes fp32 bf16 fp32+cl bf16+cl --batches 1 --repeats 2 --warmup 0
    python bench/speed.py --models sd15 sd15@diffusers --modes fp32 bf16 fp32+cl bf16+cl --batches 8 --repeats 1 --warmup 0
    python bench/speed.py --models sd15 sd15@diffusers --modes fp32+compile bf16+compile --repeats 1 --warmup 0
    python bench/speed.py --device cuda                               # the whole grid on a GPU (+graph modes)
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import math
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from train import bench_config, peak_rss_mib  # noqa: E402  (bench/train.py)

from diffuse import rng, schedules, shapes  # noqa: E402
from diffuse.config import presets  # noqa: E402
from diffuse.guidance import CFGDenoiser  # noqa: E402
from diffuse.model import DiffusionModel  # noqa: E402
from diffuse.nn import backbone_config_from_dict  # noqa: E402
from diffuse.nn.unet import UNet, UNetConfig  # noqa: E402
from diffuse.pipeline import resolve_model  # noqa: E402
from diffuse.precond import make_precond  # noqa: E402
from diffuse.samplers import get_sampler  # noqa: E402

# Stable Diffusion 1.5's U-Net (Rombach et al. 2022; the v1-inference.yaml configuration) in our U-Net
SD15 = UNetConfig(in_channels=4, out_channels=4, image_size=64, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                  attention_resolutions=(64, 32, 16), num_heads=8, text_dim=768, time_embedding="add", norm_groups=32)
SD15_TOKENS = 77
SHIPPED = {"digits": "digits", "shapes-t2i": "shapes"}  # preset -> shipped model folder
PRESETS = tuple(presets())
TWINS = tuple(name for name, cfg in presets().items() if cfg.model.backbone == "unet" and cfg.model.conditioning == "text") + ("sd15",)
MODELS = (*PRESETS, "sd15", *(f"{name}@diffusers" for name in TWINS))
MODES = ("fp32", "bf16", "fp32+cl", "bf16+cl", "fp32+compile", "bf16+compile")
CUDA_MODES = ("fp32+graph", "bf16+graph")
FLAGS = ("cl", "compile", "freeze", "graph")
GUIDANCE, SIGMA, LABEL = 3.0, 1.0, 3  # any scale != 1 runs both branches; sigma of the timed steps; class label
PROMPT = shapes.sample(1).caption
SAMPLER, SCHEDULE = "dpmpp_2m", "karras"
EAGER_EFFICIENCY = 0.5  # assumed fraction of the matmul peak, only for the time estimate printed before the grid

# FlopCounterMode has no formula for the CPU flash-attention kernel that F.scaled_dot_product_attention
# dispatches to on CPU (torch 2.13), so attention would count 0 FLOP there; it computes what the others do.
if torch.ops.aten._scaled_dot_product_flash_attention_for_cpu not in flop_registry:
    register_flop_formula(torch.ops.aten._scaled_dot_product_flash_attention_for_cpu, get_raw=True)(sdpa_flop)


# ----------------------------------------------------------------------------- machine

def cpu_description() -> str:
    """CPU model and its bf16-relevant flags from /proc/cpuinfo, plus what PyTorch makes of them."""
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    field = lambda key: next((line.split(":", 1)[1].strip() for line in lines if line.startswith(key)), "")  # noqa: E731
    flags = set(field("flags").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx_ne_convert", "amx_tile", "amx_bf16")
    shown = " ".join(f"{f}={'yes' if f in flags else 'no'}" for f in wanted)
    return (f"{os.cpu_count()} logical CPUs, {field('model name') or platform.processor() or platform.machine()}; "
            f"flags: {shown}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}")


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """(seconds, result) of one call, the device synchronized before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def matmul_peaks(device: str, sizes: tuple[int, ...], repeats: int, threads: int) -> dict[str, Any]:
    """Best GFLOP/s of an n x n matmul (2 n^3 FLOP) per dtype and size, over ``repeats`` calls after one warm-up."""
    torch.set_num_threads(threads)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device cuda: no CUDA device is available to torch {torch.__version__}; use --device cpu")
    out: dict[str, Any] = {"gpu": torch.cuda.get_device_name() if device == "cuda" else ""}
    for dtype in (torch.float32, torch.bfloat16):
        for n in sizes:
            a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
            times = [timed(lambda: a @ b, device)[0] for _ in range(repeats + 1)][1:]
            out[f"{dtype_name(dtype)}-{n}"] = 2 * n**3 / min(times) / 1e9
    return out


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]


def reset_peak_memory(device: str) -> None:
    """Free what construction left behind and start the peak counters from the current memory."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed heap pages, so RSS is live memory
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------- models

@dataclasses.dataclass
class Subject:
    """A denoiser D(x, sigma, cond) to time, its conditions for one image and its input shape."""

    denoiser: nn.Module  # a Precond: D = c_skip x + c_out F(c_in x, c_noise, cond)
    cond: Optional[dict[str, torch.Tensor]]  # [1, ...] tensors; None = unconditional (no guidance)
    uncond: Optional[dict[str, torch.Tensor]]
    shape: tuple[int, int, int]  # C, H, W of the denoiser's input
    weights: str  # "shipped" | "random"


@torch.no_grad()
def randomize(module: nn.Module, seed: int = 0) -> None:
    """Seeded random weights: N(0, 1/fan_in) for matrices and kernels, 1 + N(0, 0.1^2) for 1-D weights
    (norm gains), N(0, 0.1^2) for biases, so every layer passes a signal of unit scale."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        if p.ndim >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        else:
            p.copy_(1 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)


def preset_subject(name: str) -> Subject:
    """A preset's DiffusionModel: the shipped weights when its folder has the preset's backbone, else random."""
    cfg = bench_config(name, "fp32", 0).model
    folder = SHIPPED.get(name)
    model = DiffusionModel.load(resolve_model(folder))[0] if folder else None
    weights = "shipped"
    same = model is not None and (backbone_config_from_dict(cfg.backbone, model.cfg.backbone_config)
                                  == backbone_config_from_dict(cfg.backbone, cfg.backbone_config))  # defaults filled in
    if not same:
        model, weights = DiffusionModel(cfg), "random"
        randomize(model.denoiser.backbone)
    cond = uncond = None
    if cfg.conditioning == "text":
        cond, uncond = model.condition(prompts=[PROMPT]), model.null_condition(1)
    elif cfg.conditioning == "class":
        cond, uncond = model.condition(labels=[LABEL]), model.null_condition(1)
    return Subject(model.denoiser, cond, uncond, (cfg.channels, cfg.image_size, cfg.image_size), weights)


def sd15_subject() -> Subject:
    """Our U-Net with SD 1.5's configuration and random weights, random 77-token contexts, EDM preconditioning."""
    with torch.device("meta"):  # skip the 860M-parameter init that randomize overwrites
        backbone = UNet(SD15)
    if any(True for _ in backbone.buffers()):
        raise RuntimeError("the SD 1.5 U-Net has buffers, which to_empty would leave uninitialized; build it on the CPU")
    backbone.to_empty(device="cpu")
    randomize(backbone)
    gen = torch.Generator().manual_seed(1)
    cond, uncond = ({"text": torch.randn(1, SD15_TOKENS, SD15.text_dim, generator=gen)} for _ in range(2))
    size = SD15.image_size
    return Subject(make_precond("edm", backbone, sigma_data=1.0), cond, uncond, (SD15.in_channels, size, size), "random")


class DiffusersUNet(nn.Module):
    """diffusers' ``UNet2DConditionModel`` behind our backbone interface ``F(x_in [B, C, H, W], c_noise [B], cond)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.unet(x_in, c_noise, encoder_hidden_states=cond["text"], encoder_attention_mask=cond.get("text_mask"),
                         return_dict=False)[0]


def diffusers_twin(subject: Subject) -> Subject:
    """The subject with its U-Net replaced by diffusers' of the same configuration and the same weights, through
    diffuse.convert.unet (built on the meta device and given our tensors, so the weights are neither initialized nor
    held twice). Only text-conditional U-Nets have a twin: diffusers' cross-attention blocks need a context."""
    from diffusers import UNet2DConditionModel

    from diffuse.convert.unet import unet_config_to_diffusers, unet_state_to_diffusers

    ours = subject.denoiser.backbone
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_config_to_diffusers(ours.config))
    unet.load_state_dict(unet_state_to_diffusers(ours.state_dict(), ours.config), strict=True, assign=True)
    if any(p.is_meta for p in unet.parameters()) or any(b.is_meta for b in unet.buffers()):
        raise RuntimeError("diffusers' U-Net has tensors our U-Net has no weights for")
    subject.denoiser.backbone = DiffusersUNet(unet.eval())
    return subject


def build_subject(name: str) -> Subject:
    """``name`` is a preset, ``sd15`` or ``<one of those>@diffusers``; the model is in eval mode on the CPU.
    Seeded, so that every process builds the same weights (the text encoders of random presets included)."""
    torch.manual_seed(0)
    base, _, impl = name.partition("@")
    subject = sd15_subject() if base == "sd15" else preset_subject(base)
    if impl:
        subject = diffusers_twin(subject)
    subject.denoiser.eval()
    return subject


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def guided_call(subject: Subject, batch: int, device: str, fmt: torch.memory_format
                ) -> tuple[Callable, torch.Tensor, torch.Tensor, Any]:
    """(denoiser the sampler calls, x [B, C, H, W], sigma [B], cond) for ``batch`` images of seeds 0..B-1."""
    def batched(c: Optional[dict[str, torch.Tensor]]) -> Optional[dict[str, torch.Tensor]]:
        return None if c is None else {k: v.repeat_interleave(batch, dim=0).to(device) for k, v in c.items()}

    cond, uncond = batched(subject.cond), batched(subject.uncond)
    denoiser = subject.denoiser if cond is None else CFGDenoiser(subject.denoiser, GUIDANCE, uncond)
    noise = rng.randn((batch, *subject.shape), rng.generators_for(range(batch)))
    x = (SIGMA * noise).to(device).contiguous(memory_format=fmt)
    return denoiser, x, torch.full((batch,), SIGMA, device=device), cond


# ----------------------------------------------------------------------------- workers (one process each)

def parse_mode(mode: str, device: str) -> tuple[str, set[str]]:
    """'bf16+compile+cl' -> ('bf16', {'compile', 'cl'}); ValueError on unknown parts or graph off CUDA."""
    precision, *flags = mode.split("+")
    if precision not in ("fp32", "bf16") or not set(flags) <= set(FLAGS):
        raise ValueError(f"bad mode {mode!r}: use fp32 or bf16 followed by +flags from {', '.join(FLAGS)}, e.g. bf16+cl")
    if "freeze" in flags and "compile" not in flags:
        raise ValueError(f"mode {mode!r}: freeze is an Inductor option, use it with compile, e.g. bf16+compile+freeze")
    if "graph" in flags and device != "cuda":
        raise ValueError(f"mode {mode!r}: CUDA graphs need --device cuda")
    return precision, set(flags)


def reference(name: str, device: str, threads: int) -> dict[str, Any]:
    """fp32 eager at batch 1: FLOP per evaluation and per guided step, image 0's guided output, parameters."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    subject = build_subject(name)
    subject.denoiser.to(device)
    build_s = time.perf_counter() - start
    denoiser, x, sigma, cond = guided_call(subject, 1, device, torch.contiguous_format)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            out = denoiser(x, sigma, cond)
        step_flop = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            subject.denoiser(x, sigma, cond)
        eval_flop = counter.get_total_flops()
    return {"model": name, "params": count_params(subject.denoiser.backbone), "weights": subject.weights,
            "shape": subject.shape, "guided": subject.cond is not None, "gflop_eval": eval_flop / 1e9,
            "gflop_step": step_flop / 1e9, "out": out[0].float().cpu().numpy(), "out_max": float(out.abs().max()),
            "build_s": build_s}


def measure(name: str, mode: str, batch: int, ref_out: Any, opts: dict[str, Any]) -> dict[str, Any]:
    """Time guided steps (and a 20-step run if it fits the budget) of one model, mode and batch."""
    device = opts["device"]
    torch.set_num_threads(opts["threads"])
    precision, flags = parse_mode(mode, device)
    with tempfile.TemporaryDirectory(prefix="speed-inductor-") as fresh:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = opts["compile_cache"] or fresh
        subject = build_subject(name)
        fmt = torch.channels_last if "cl" in flags else torch.contiguous_format
        subject.denoiser.to(device=device, memory_format=fmt)
        if flags & {"compile", "graph"}:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = "freeze" in flags
            subject.denoiser.backbone.compile(mode="reduce-overhead" if "graph" in flags else None)
        denoiser, x, sigma, cond = guided_call(subject, batch, device, fmt)
        step = lambda: denoiser(x, sigma, cond)  # noqa: E731
        reset_peak_memory(device)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
            first, out = timed(step, device)
            for _ in range(opts["warmup"]):
                step()
            times = [timed(step, device)[0] for _ in range(opts["repeats"])]
            median = statistics.median(times)
            sample_s = float("nan")
            if opts["sample_steps"] * median <= opts["sample_budget"]:
                sigmas = schedules.get_sigmas(SCHEDULE, opts["sample_steps"], subject.denoiser.sigma_min, subject.denoiser.sigma_max)
                x_T = (float(sigmas[0]) * rng.randn(x.shape, rng.generators_for(range(batch)))).to(device).contiguous(memory_format=fmt)
                sample_s = timed(lambda: get_sampler(SAMPLER)(denoiser, x_T, sigmas, cond), device)[0]
    ref = torch.from_numpy(ref_out)
    return {"model": name, "mode": mode, "batch": batch, "step_s": median, "spread": (max(times) - min(times)) / median,
            "first_s": first, "compile": bool(flags & {"compile", "graph"}), "sample_s": sample_s,
            "rss_mib": peak_rss_mib(), "gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan"),
            "max_diff": float((out[0].float().cpu() - ref).abs().max())}


def in_process(fn: Callable, *args: Any, device: str) -> Any:
    """``fn(*args)`` in a fresh process: forked on CPU (no re-import), spawned on CUDA (CUDA does not survive a fork)."""
    context = multiprocessing.get_context("spawn" if device == "cuda" else "fork")
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


# ----------------------------------------------------------------------------- tables

def cell(x: Optional[float], spec: str, unit: str = "") -> str:
    """``x`` formatted, '-' when missing or nan."""
    return "-" if x is None or math.isnan(x) else format(x, spec) + unit


def peaks_table(start: dict[str, Any], end: dict[str, Any]) -> str:
    lines = ["| matmul | GFLOP/s at start | GFLOP/s at end |", "|---|---|---|"]
    for key in (k for k in start if k != "gpu"):
        dtype, n = key.split("-")
        lines.append(f"| {dtype} {n}x{n} | {start[key]:.1f} | {cell(end.get(key), '.1f')} |")
    return "\n".join(lines)


def best_peak(peaks: list[dict[str, Any]], dtype: str) -> float:
    return max(v for p in peaks for k, v in p.items() if k.startswith(dtype + "-"))


def models_table(refs: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | weights | params | input | GFLOP/img per evaluation | GFLOP/img per guided step | max abs D (fp32) "
             "| max abs (ours - diffusers), fp32 |", "|---|---|---|---|---|---|---|---|"]
    for name, r in refs.items():
        base = name.partition("@")[0]
        parity = "-"
        if "@" in name and base in refs:
            parity = f"{float(abs(torch.from_numpy(r['out']) - torch.from_numpy(refs[base]['out'])).max()):.1e}"
        step = f"{r['gflop_step']:.2f}" if r["guided"] else "(no guidance)"
        lines.append(f"| {name} | {r['weights']} | {r['params']:,} | {'x'.join(map(str, r['shape']))} | {r['gflop_eval']:.2f} "
                     f"| {step} | {r['out_max']:.2f} | {parity} |")
    return "\n".join(lines)


def result_line(r: dict[str, Any], refs: dict[str, dict[str, Any]], peak32: float, peak16: float, steps: int) -> str:
    if "error" in r:
        return f"| {r['model']} | {r['mode']} | {r['batch']} | failed: {r['error']} |"
    gflops = refs[r["model"]]["gflop_step"] * r["batch"] / r["step_s"]
    overhead = r["sample_s"] / (steps * r["step_s"]) - 1
    compile_s = r["first_s"] - r["step_s"] if r["compile"] else float("nan")
    return (f"| {r['model']} | {r['mode']} | {r['batch']} | {r['step_s'] / r['batch']:.4g} | {100 * r['spread']:.0f}% | {gflops:.1f} "
            f"| {100 * gflops / peak32:.0f}% | {100 * gflops / peak16:.0f}% | {cell(r['sample_s'] / r['batch'], '.4g')} "
            f"| {cell(100 * overhead, '+.0f', '%')} | {r['first_s']:.2f} | {cell(compile_s, '.1f')} "
            f"| {r['rss_mib']:.0f} | {cell(r['gpu_mib'], '.0f')} | {r['max_diff']:.1e} |")


RESULTS_HEAD = ("| model | mode | batch | guided step (s/img) | spread | GFLOP/s | % fp32 peak | % bf16 peak | {steps}-step run (s/img) "
                "| run vs {steps} steps | first call (s) | compile (s) | peak RSS (MiB) | peak GPU (MiB) | max abs diff vs fp32 eager |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def diffusers_table(rows: list[dict[str, Any]]) -> str:
    """Ours vs the diffusers twin, same mode and batch: images/s ratio of the guided step and of the 20-step run."""
    done = {(r["model"], r["mode"], r["batch"]): r for r in rows if "error" not in r}
    lines = ["| model | mode | batch | ours (s/img) | diffusers (s/img) | ours / diffusers images/s (step) | (20-step run) |",
             "|---|---|---|---|---|---|---|"]
    for (model, mode, batch), theirs in done.items():
        ours = done.get((model.partition("@")[0], mode, batch))
        if "@" in model and ours:
            lines.append(f"| {ours['model']} | {mode} | {batch} | {ours['step_s'] / batch:.4g} | {theirs['step_s'] / batch:.4g} "
                         f"| {theirs['step_s'] / ours['step_s']:.2f}x | {cell(theirs['sample_s'] / ours['sample_s'], '.2f', 'x')} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def estimate_s(ref: dict[str, Any], mode: str, batch: int, opts: dict[str, Any], peak32: float, peak16: float) -> float:
    """Rough seconds for one configuration: build + calls at EAGER_EFFICIENCY of the precision's peak (+ the 20-step run
    if it fits the budget); compilation is not included."""
    step_s = ref["gflop_step"] * batch / (EAGER_EFFICIENCY * (peak16 if mode.startswith("bf16") else peak32))
    sample_s = opts["sample_steps"] * step_s if opts["sample_steps"] * step_s <= opts["sample_budget"] else 0.0
    return ref["build_s"] + (1 + opts["warmup"] + opts["repeats"]) * step_s + sample_s


# ----------------------------------------------------------------------------- main

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny, batch 1, fp32 and bf16, 1 repeat (not a result)")
    p.add_argument("--models", nargs="+", choices=MODELS, help="default: all")
    p.add_argument("--modes", nargs="+", help=f"precision[+flag...], flags {', '.join(FLAGS)}; default: {' '.join(MODES)} "
                                              f"(+ {' '.join(CUDA_MODES)} on CUDA)")
    p.add_argument("--batches", nargs="+", type=int, help="images per guided step (default 1 8)")
    p.add_argument("--repeats", type=int, help="timed guided steps per configuration, median reported (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed guided steps after the first (default 1)")
    p.add_argument("--sample-steps", type=int, default=20, help=f"steps of the full {SAMPLER} run (default 20)")
    p.add_argument("--sample-budget", type=float, default=120.0,
                   help="run the full sampling only where it is estimated to take at most this many seconds (default 120)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads (default: torch's, here %(default)s)")
    p.add_argument("--compile-cache", default="", help="Inductor cache folder to use and keep (default: a fresh one per process)")
    args = p.parse_args()
    quick = dict(models=["tiny"], modes=["fp32", "bf16"], batches=[1], repeats=1)
    full = dict(models=list(MODELS), modes=list(MODES) + (list(CUDA_MODES) if args.device == "cuda" else []), batches=[1, 8], repeats=3)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    try:
        for mode in args.modes:
            parse_mode(mode, args.device)
        if min(args.batches) < 1 or args.repeats < 1 or args.warmup < 0 or args.sample_steps < 1 or args.threads < 1:
            raise ValueError("--batches, --repeats, --sample-steps and --threads must be >= 1 and --warmup >= 0")
    except ValueError as e:
        p.error(str(e))
    opts = dict(device=args.device, threads=args.threads, repeats=args.repeats, warmup=args.warmup, sample_steps=args.sample_steps,
                sample_budget=args.sample_budget, compile_cache=args.compile_cache)
    sizes = (4096, 8192) if args.device == "cuda" else (1024,) if args.quick else (1024, 2048)
    peak_repeats = 3 if args.quick else 10

    print(f"# bench/speed.py, {time.strftime('%Y-%m-%d %H:%M %Z')}\n")
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} threads; {cpu_description()}")
    if any("@" in m for m in args.models):
        try:
            from diffusers import __version__ as diffusers_version
        except ImportError:
            p.error("the NAME@diffusers models need diffusers: pip install -e '.[bench]'")
        print(f"diffusers {diffusers_version}")
    try:
        start_peaks = in_process(matmul_peaks, args.device, sizes, peak_repeats, args.threads, device=args.device)
    except ValueError as e:
        p.error(str(e))
    if start_peaks["gpu"]:
        print(f"GPU: {start_peaks['gpu']}")
    peak32, peak16 = best_peak([start_peaks], "fp32"), best_peak([start_peaks], "bf16")
    print(f"matmul peaks at start: fp32 {peak32:.1f}, bf16 {peak16:.1f} GFLOP/s", file=sys.stderr, flush=True)

    refs: dict[str, dict[str, Any]] = {}
    for name in args.models:
        refs[name] = in_process(reference, name, args.device, args.threads, device=args.device)
        print(f"reference {name}: {refs[name]['params']:,} parameters, {refs[name]['gflop_step']:.2f} GFLOP per guided step "
              f"(built in {refs[name]['build_s']:.1f} s)", file=sys.stderr, flush=True)
    grid = [(m, mode, b) for m in args.models for mode in args.modes for b in args.batches]
    total = sum(estimate_s(refs[m], mode, b, opts, peak32, peak16) for m, mode, b in grid)
    n_compile = sum(1 for _, mode, _ in grid if "compile" in mode or "graph" in mode)
    print(f"{len(grid)} configurations, estimated {total / 60:.1f} min at {EAGER_EFFICIENCY:.0%} of the measured peaks"
          + (f", plus a cold Inductor compile in {n_compile} of them (minutes each on 2 cores)" if n_compile else ""), file=sys.stderr, flush=True)

    rows = []
    for m, mode, b in grid:
        try:
            rows.append(in_process(measure, m, mode, b, refs[m]["out"], opts, device=args.device))
        except Exception as e:  # one failed configuration (a compile error, out of memory) must not end the run
            rows.append({"model": m, "mode": mode, "batch": b, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"})
        print(result_line(rows[-1], refs, peak32, peak16, args.sample_steps), file=sys.stderr, flush=True)
    end_peaks = in_process(matmul_peaks, args.device, sizes, peak_repeats, args.threads, device=args.device)
    peak32, peak16 = best_peak([start_peaks, end_peaks], "fp32"), best_peak([start_peaks, end_peaks], "bf16")

    print(f"\nMatmul peaks (best of {peak_repeats}); the fractions below use the better of start and end: "
          f"fp32 {peak32:.1f}, bf16 {peak16:.1f} GFLOP/s.\n")
    print(peaks_table(start_peaks, end_peaks))
    print(f"\nModels (GFLOP counted by FlopCounterMode at batch 1, fp32; guidance scale {GUIDANCE} runs both branches "
          f"as one batch):\n")
    print(models_table(refs))
    print(f"\nGuided steps at sigma = {SIGMA} ({args.repeats} timed after {args.warmup} warm-up) and {SAMPLER} runs of "
          f"{args.sample_steps} {SCHEDULE} steps ('-': estimated over --sample-budget {args.sample_budget:.0f} s):\n")
    print(RESULTS_HEAD.format(steps=args.sample_steps))
    print("\n".join(result_line(r, refs, peak32, peak16, args.sample_steps) for r in rows))
    comparison = diffusers_table(rows)
    if comparison:
        print(f"\nOurs vs diffusers on the same configuration and weights:\n\n{comparison}")


if __name__ == "__main__":
    main()
