"""diffuse: diffusion-model image generation (train, sample, guide, edit, evaluate, serve)."""

__version__ = "0.1.0"
