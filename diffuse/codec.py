"""The pixel/latent boundary: a codec maps images to the space the denoiser works in and back.

Every sampler, edit and guidance method works on ``x`` in the codec's space; only the codec
knows whether that is pixels or a VAE's latents (DESIGN.md §3). ``PixelCodec`` is the
identity for pixel-space models; a latent model's folder names the codec it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol

import torch

if TYPE_CHECKING:
    from .nn.vae import VAE


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


VAE_SUBDIR = "vae"  # a latent model folder holds its VAE folder here (see README, "Latent diffusion")


class VAECodec:
    """A KL autoencoder as a codec: ``encode(x) = (mean(q(z|x)) - shift) * scale``, ``decode(x) = D(x / scale + shift)``.

    ``scale`` and ``shift`` are measured on data by :func:`latent_stats` (Rombach et al. 2022,
    §4.3.2 and App. G: latents rescaled by 1/std so the diffusion model sees unit variance) and
    stored in the VAE folder's config, so no constant appears in scripts. Decoding larger
    outputs runs in overlapping tiles blended with linear ramps (:meth:`decode`, ``tile``).
    """

    def __init__(self, vae: "VAE", scale: float = 1.0, shift: float = 0.0, tile: int = 0, overlap: int = 4):
        self.vae = vae.eval().requires_grad_(False)
        self.scale, self.shift = float(scale), float(shift)
        self.factor = vae.cfg.factor
        self.latent_channels = vae.cfg.latent_channels
        self.image_channels = vae.cfg.in_channels
        self.tile, self.overlap = tile, overlap  # in latent pixels; tile 0 = never tile

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (self.vae.encode(images).mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        z = x / self.scale + self.shift
        if self.tile and max(z.shape[-2:]) > self.tile:
            return decode_tiled(self.vae.decode, z, self.tile, self.overlap, self.factor)
        return self.vae.decode(z)

    # ------------------------------------------------------------ files

    def save(self, out: Path, *, overwrite: bool = False, extra: Optional[dict[str, Any]] = None) -> Path:
        """Write a VAE folder: config.json {"vae": ..., "latent": {"scale", "shift"}} + model.safetensors."""
        from . import checkpoint

        config = {"vae": self.vae.cfg.to_dict(), "latent": {"scale": self.scale, "shift": self.shift}, **(extra or {})}
        return checkpoint.save_model_dir(Path(out), config, self.vae.state_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, path: Path, tile: int = 0) -> "VAECodec":
        from . import checkpoint
        from .nn.vae import VAE, VAEConfig

        config, weights = checkpoint.load_model_dir(Path(path))
        if "vae" not in config or "latent" not in config:
            raise checkpoint.CheckpointError(f"{path}/config.json does not describe a diffuse VAE (needs 'vae' and 'latent')")
        vae = VAE(VAEConfig.from_dict(config["vae"]))
        missing, unexpected = vae.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
        if missing or unexpected:
            raise checkpoint.CheckpointError(f"{path}/model.safetensors does not match its VAE config "
                                             f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
        return cls(vae, config["latent"]["scale"], config["latent"]["shift"], tile=tile)


@torch.no_grad()
def latent_stats(vae: "VAE", images: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """(scale, shift) = (1 / std, mean) of the posterior means of ``images`` over all elements."""
    means = torch.cat([vae.encode(images[i:i + batch_size]).mean for i in range(0, len(images), batch_size)])
    return 1.0 / float(means.std()), float(means.mean())


def ramp(n: int, overlap: int, left: bool, right: bool) -> torch.Tensor:
    """Blend weights [n] of a tile: rising linearly over ``overlap`` samples at a side that meets
    another tile (weights (i + 0.5) / overlap), 1 elsewhere."""
    w = torch.ones(n)
    if overlap:
        up = (torch.arange(overlap) + 0.5) / overlap
        if left:
            w[:overlap] = torch.minimum(w[:overlap], up)
        if right:
            w[n - overlap:] = torch.minimum(w[n - overlap:], up.flip(0))
    return w


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins covering [0, size) with tiles of ``tile`` overlapping by at least ``overlap``."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride)) + [size - tile]
    return starts


def decode_tiled(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int,
                 factor: int) -> torch.Tensor:
    """Decode latents z [B, C, h, w] in tiles of tile x tile latents overlapping by ``overlap``; each
    decoded tile is weighted by separable linear ramps over the overlap (pixels ``overlap * factor``)
    and the weighted sum is normalized, so seams blend instead of jumping. Memory: one tile at a time."""
    if not 0 <= overlap < tile:
        raise ValueError(f"tile overlap must be in [0, tile), got overlap={overlap}, tile={tile}")
    B, _, h, w = z.shape
    out = weight = None
    rows, cols = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    for top in rows:
        for left in cols:
            piece = decode(z[..., top:top + tile, left:left + tile])
            th, tw = piece.shape[-2:]
            if out is None:
                out = torch.zeros(B, piece.shape[1], h * factor, w * factor, dtype=piece.dtype, device=piece.device)
                weight = torch.zeros(h * factor, w * factor, dtype=piece.dtype, device=piece.device)
            wy = ramp(th, overlap * factor, top > 0, top + tile < h)
            wx = ramp(tw, overlap * factor, left > 0, left + tile < w)
            wt = (wy[:, None] * wx[None, :]).to(piece)
            ys, xs = slice(top * factor, top * factor + th), slice(left * factor, left * factor + tw)
            out[..., ys, xs] += piece * wt
            weight[ys, xs] += wt
    return out / weight
