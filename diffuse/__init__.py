"""diffuse: diffusion-model image generation (train, sample, guide, edit, evaluate, serve).

The public API (``Pipeline``, ``SampleSettings``, ``Generated``, ``generate``) is imported on first
use (PEP 562 module ``__getattr__``), so ``import diffuse`` and commands that never sample
(``diffuse --help``, ``verify``, ``keys``) do not pay for importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Pipeline", "SampleSettings", "Generated", "generate", "__version__"]

if TYPE_CHECKING:
    from .pipeline import Generated, Pipeline, SampleSettings, generate


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module 'diffuse' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
