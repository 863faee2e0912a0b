"""The fast path of sampling and training: the precision choice, channels_last, and ``torch.compile``
with an on-disk cache. Every choice is recorded in a PNG's record and honored by replay.

**Precision** (``--precision``, ``Pipeline.load(precision=)``, ``train.precision``) is ``auto``,
``fp32`` or ``bf16``. ``bf16`` runs the backbone under bf16 autocast (the preconditioning and the
sampler stay float32, DESIGN.md §4 rule 7). It pays only where the hardware multiplies bf16
natively; elsewhere oneDNN emulates it and it is slower than fp32 (on an Intel Xeon without
avx512_bf16, 1024² bf16 matmuls ran 3-30x slower than fp32 and shapes sampling took 2.0x the CPU
time; on an AMD EPYC with native bf16, training ran 1.8x faster). So ``auto`` resolves
(:func:`resolve_precision`) to

* ``bf16`` on CUDA when ``torch.cuda.is_bf16_supported()``;
* ``bf16`` on a CPU whose flags include ``avx512_bf16`` or ``amx_bf16`` (:data:`NATIVE_BF16_FLAGS`,
  read from torch's own CPU capability query and ``/proc/cpuinfo``);
* ``fp32`` everywhere else (other CPUs, including ARM ones whose bf16 speed was never measured here,
  and other devices).

The resolved choice, never ``auto``, is what a PNG's generation record keeps, so replay on any
machine regenerates with the same arithmetic. Records written before the field existed were fp32.

**channels_last** (default on, :meth:`diffuse.model.DiffusionModel.set_fast_path`): NHWC convolutions,
9-20% less CPU time on the shipped models with the same 8-bit images.

**Compile** (``--compile``, off by default): the denoiser is wrapped by ``torch.compile`` (inductor),
its compiled artifacts cached on disk (inductor's FX graph, AOTAutograd and kernel caches) in
``$TORCHINDUCTOR_CACHE_DIR`` when set, else ``$DIFFUSE_CACHE/inductor`` (``~/.cache/diffuse/inductor``),
so a second process starts from the cache. The batch dimension becomes symbolic at the first change
of batch size (torch's automatic dynamic shapes): two graphs serve every batch size, not one each.
On CPU compiling takes minutes for a gain of 11-14% per denoiser call, so no entry point compiles
unless asked (README, "Fast path").
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Optional

if TYPE_CHECKING:  # torch is imported where it is used: the CLI reads PRECISIONS before it needs torch
    import torch

PRECISIONS = ("auto", "fp32", "bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 CPU flags of native bf16 dot products / matrix tiles


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags: the ones torch's capability query reports true, plus ``/proc/cpuinfo``'s."""
    import torch

    flags: set[str] = set()
    query = getattr(getattr(torch._C, "_cpu", None), "_get_cpu_capability", None)  # present in torch 2.13
    if query is not None:
        flags.update(name for name, value in query().items() if value is True)
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags.update(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    return frozenset(flags)


def resolve_precision(precision: str, device: str | torch.device, flags: Optional[Iterable[str]] = None) -> tuple[str, str]:
    """(``fp32`` or ``bf16``, why) for a requested precision on ``device``; ``flags``: the CPU's flags
    (default :func:`cpu_flags`), given explicitly by tests."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision, "asked for"
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU supports bf16"
        return "fp32", "auto: this GPU has no bf16 support"
    if kind != "cpu":
        return "fp32", f"auto: bf16 speed on {kind} devices was never measured"
    native = [f for f in NATIVE_BF16_FLAGS if f in set(cpu_flags() if flags is None else flags)]
    if native:
        return "bf16", f"auto: this CPU multiplies bf16 natively ({', '.join(native)})"
    return "fp32", f"auto: this CPU has no native bf16 ({' or '.join(NATIVE_BF16_FLAGS)}), where bf16 is slower than fp32"


def inductor_cache_dir() -> Path:
    """Where compiled graphs are kept: ``$TORCHINDUCTOR_CACHE_DIR``, else ``$DIFFUSE_CACHE/inductor``."""
    given = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if given:
        return Path(given)
    return Path(os.environ.get("DIFFUSE_CACHE", "~/.cache/diffuse")).expanduser() / "inductor"


def check_compile(device: str | torch.device) -> None:
    """A one-line error when torch.compile cannot work here: inductor builds C++ kernels on CPU (a C++
    compiler is needed) and Triton kernels on CUDA."""
    import torch

    kind = torch.device(device).type
    if kind == "cpu":
        cxx = os.environ.get("CXX") or ("clang++" if sys.platform == "darwin" else "g++")
        if shutil.which(cxx) is None:
            raise ValueError(f"--compile needs a C++ compiler on CPU and {cxx!r} was not found; install one "
                             f"(or set CXX), or drop --compile")
    elif kind == "cuda":
        import importlib.util

        if importlib.util.find_spec("triton") is None:
            raise ValueError("--compile on CUDA needs triton (pip install triton), or drop --compile")
    else:
        raise ValueError(f"--compile supports cpu and cuda devices, not {kind}; drop --compile")


def use_disk_cache() -> Path:
    """Point inductor's caches at :func:`inductor_cache_dir` (before anything is compiled); returns it."""
    path = inductor_cache_dir()
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path)
    return path


def compile_denoiser(fn: Callable) -> Callable:
    """``torch.compile(fn)`` with inductor, its artifacts cached in :func:`inductor_cache_dir`.

    The batch dimension varies (guidance doubles it, a server batches jobs); torch's automatic
    dynamic shapes recompile once with it symbolic rather than once per size.
    """
    import torch

    use_disk_cache()
    return torch.compile(fn, dynamic=None)
