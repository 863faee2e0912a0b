"""The pixel/latent boundary: a codec maps images to the space the denoiser works in and back.

Every sampler, edit and guidance method works on ``x`` in the codec's space; only the codec
knows whether that is pixels or a VAE's latents (DESIGN.md §3). ``PixelCodec`` is the
identity for pixel-space models; a latent model's folder names the codec it needs.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Codec(Protocol):
    """Images [B, C, H, W] in [-1, 1] <-> model-space tensors [B, latent_channels, H/factor, W/factor]."""

    factor: int  # spatial downsampling from pixels to model space
    latent_channels: int
    image_channels: int  # channels of the images it encodes (1 gray, 3 RGB)

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def decode(self, x: torch.Tensor) -> torch.Tensor: ...


class PixelCodec:
    """Identity codec of a pixel-space model with ``channels`` image channels."""

    factor = 1

    def __init__(self, channels: int):
        self.latent_channels = channels
        self.image_channels = channels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] != self.latent_channels:
            raise ValueError(f"this model works on {self.latent_channels}-channel images, got {images.shape[1]} channels")
        return images

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x
