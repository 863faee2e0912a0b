"""diffuse: diffusion-model image generation (train, sample, guide, edit, evaluate, serve)."""

__version__ = "0.1.0"

from .pipeline import Generated, Pipeline, SampleSettings, generate  # noqa: E402

__all__ = ["Pipeline", "SampleSettings", "Generated", "generate", "__version__"]
