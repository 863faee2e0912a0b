"""The pixel/latent boundary: a codec maps images to the space the denoiser works in and back.

Every sampler, edit and guidance method works on ``x`` in the codec's space; only the codec
knows whether that is pixels or a VAE's latents (DESIGN.md §3). ``PixelCodec`` is the
identity for pixel-space models; a latent model's folder names the codec it needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

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
    stored in the VAE folder's config, so no constant appears in scripts. With ``tile`` > 0, latents
    larger than ``tile`` on a side decode in tiles (:func:`decode_tiled`: one padded tile in memory at a
    time after the decoder's stem ran on the whole latent, equal to the whole decode for the default ``overlap``,
    several times slower).
    """

    def __init__(self, vae: "VAE", scale: float = 1.0, shift: float = 0.0, tile: int = 0, overlap: Optional[int] = None):
        self.vae = vae.eval().requires_grad_(False)
        self.scale, self.shift = float(scale), float(shift)
        self.factor = vae.cfg.factor
        self.latent_channels = vae.cfg.latent_channels
        self.image_channels = vae.cfg.in_channels
        self.tile, self.overlap = tile, overlap  # in latents; tile 0 = never tile; overlap None = the decoder's halo

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return (self.vae.encode(images).mean - self.shift) * self.scale

    @torch.no_grad()
    def decode(self, x: torch.Tensor) -> torch.Tensor:
        z = x / self.scale + self.shift
        if self.tile and max(z.shape[-2:]) > self.tile:
            return decode_tiled(self.vae, z, self.tile, self.overlap)
        return self.vae.decode(z)

    # ------------------------------------------------------------ files

    def save(self, out: Path, *, overwrite: bool = False, extra: Optional[dict[str, Any]] = None) -> Path:
        """Write a VAE folder: config.json {"vae": ..., "latent": {"scale", "shift"}} + model.safetensors."""
        from . import checkpoint

        config = {"vae": self.vae.cfg.to_dict(), "latent": {"scale": self.scale, "shift": self.shift}, **(extra or {})}
        return checkpoint.save_model_dir(Path(out), config, self.vae.state_dict(), overwrite=overwrite)

    @classmethod
    def load(cls, path: Path, tile: int = 0, overlap: Optional[int] = None) -> "VAECodec":
        from . import checkpoint
        from .nn.vae import VAE, VAEConfig

        config, weights = checkpoint.load_model_dir(Path(path))
        if "vae" not in config or "latent" not in config:
            raise checkpoint.CheckpointError(f"{path}/config.json does not describe a diffuse VAE (needs 'vae' and 'latent')")
        vae = VAE(VAEConfig.from_dict(config["vae"]))
        checkpoint.check_shapes(Path(path), vae.state_dict(), {k: tuple(v.shape) for k, v in weights.items()})
        missing, unexpected = vae.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
        if missing or unexpected:
            raise checkpoint.CheckpointError(f"{path}/model.safetensors does not match its VAE config "
                                             f"({len(missing)} missing, {len(unexpected)} unexpected tensors)")
        return cls(vae, config["latent"]["scale"], config["latent"]["shift"], tile=tile, overlap=overlap)


@torch.no_grad()
def latent_stats(vae: "VAE", images: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """(scale, shift) = (1 / std, mean) of the posterior means of ``images`` over all elements."""
    means = torch.cat([vae.encode(images[i:i + batch_size]).mean for i in range(0, len(images), batch_size)])
    return 1.0 / float(means.std()), float(means.mean())


class _Measured(Exception):
    """Raised by the GroupNorm whose statistics a pass of :func:`decode_tiled` measures: the rest of
    the decoder is not needed in that pass."""


class _TiledGroupNorms:
    """While active, the i-th call of the GroupNorms in ``parts`` normalizes with the global
    statistics ``stats[i]`` (mean, var [B, G] float64); the call after the known ones adds count, sum
    and sum of squares of its input over the tile's core to ``acc`` and raises :class:`_Measured`."""

    def __init__(self, parts: list[torch.nn.Module]):
        self.norms = [m for part in parts for m in part.modules() if isinstance(m, torch.nn.GroupNorm)]
        self.stats: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.acc: Optional[list[torch.Tensor]] = None
        self.core = (0, 0, 0, 0)  # the core's rows and columns (y0, y1, x0, x1) in the padded tile, latents
        self.tile_h = 1  # latent height of the padded tile (sets the scale of each level)
        self.calls = 0

    def __enter__(self) -> "_TiledGroupNorms":
        for norm in self.norms:
            norm.forward = lambda x, norm=norm: self.group_norm(norm, x)  # instance attribute shadows the class method
        return self

    def __exit__(self, *exc: Any) -> None:
        for norm in self.norms:
            del norm.forward

    def group_norm(self, norm: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        i, self.calls = self.calls, self.calls + 1
        B, C, H, W = x.shape
        g = norm.num_groups
        if i == len(self.stats):
            s = H // self.tile_h  # this level's pixels per latent
            y0, y1, x0, x1 = self.core
            core = x[..., y0 * s:y1 * s, x0 * s:x1 * s].double().reshape(B, g, -1)  # [B, G, n]
            part = [torch.tensor(float(core.shape[-1])), core.sum(-1), core.square().sum(-1)]
            self.acc = part if self.acc is None else [a + p for a, p in zip(self.acc, part)]
            raise _Measured
        mean, var = self.stats[i]  # [B, G]
        rstd = torch.rsqrt(var + norm.eps)
        h = (x.reshape(B, g, -1) - mean[..., None].to(x)) * rstd[..., None].to(x)  # [B, G, C/G * H * W]
        h = h.reshape(B, C, H, W)
        return h if not norm.affine else h * norm.weight[:, None, None] + norm.bias[:, None, None]

    def finish_pass(self) -> bool:
        """Turn the accumulated sums into the next (mean, biased var); False when the pass measured nothing."""
        if self.acc is None:
            return False
        n, total, squares = self.acc
        mean = total / n
        self.stats.append((mean, (squares / n - mean.square()).clamp_min(0.0)))
        self.acc = None
        return True


@torch.no_grad()
def decode_tiled(vae: "VAE", z: torch.Tensor, tile: int, overlap: Optional[int] = None) -> torch.Tensor:
    """Decode latents z [B, C, h, w] -> [B, C_img, h*f, w*f] with the up-sampling part of the decoder run one
    tile at a time, equal to ``vae.decode(z)`` up to float rounding when ``overlap`` >= ``vae.decoder.halo()``
    (the default).

    The decoder's stem (post-quant conv, conv_in and the mid block, whose self-attention makes every latent
    depend on all others) runs once on the whole latent grid: it is cheap there (latent resolution, about
    1/f^2 of the pixels), and what it returns is exact. Only its output [B, C_mid, h, w] and one padded tile
    of the body (:meth:`~diffuse.nn.vae.Decoder.body`: up blocks and output head) are in memory at a time,
    besides the output.

    Tiles: the latent grid is cut into cores of ``tile`` x ``tile`` latents (smaller at the far edges)
    that partition it; each core's stem output is run through the body with ``overlap`` latents of real
    neighbours on every side (fewer at the image border, where the whole decode zero-pads too) and cropped
    back to its core, so the convolutions inside a core see exactly what they see in the whole decode.

    GroupNorm (Wu & He 2018) is the one layer of the body that sees the whole image; its statistics are made
    global as in the "Tiled VAE" of multidiffusion-upscaler-for-automatic1111 (per-group sums over all tiles,
    then every tile normalized with the global mean/var), but recomputed rather than stored so memory stays
    bounded: pass k runs each tile up to the body's k-th GroupNorm (the earlier ones normalized with the
    global statistics of passes 1..k-1), adds count, sum and sum of squares (float64) of that GroupNorm's
    input over the core (exact there, since the halo reaches further than the context used so far), and
    stops; the pass after the last GroupNorm writes the output. Cost: one whole stem plus (number of body
    GroupNorms + 1) partial body runs of every padded tile, several times a whole decode (see
    bench/RESULTS.md). With ``overlap`` < halo, the convolutions near a core's edge miss context and seams
    appear.
    """
    decoder = vae.decoder
    halo = decoder.halo()
    overlap = halo if overlap is None else overlap
    if tile < 1 or overlap < 0:
        raise ValueError(f"tiled decoding needs tile >= 1 and overlap >= 0 latents, got tile={tile}, overlap={overlap}")
    B, _, h, w = z.shape
    f = vae.cfg.factor
    stem = decoder.stem(vae.post_quant_conv(z))  # [B, C_mid, h, w], whole: the mid-block attention is global
    cores = [(y, min(y + tile, h), x, min(x + tile, w)) for y in range(0, h, tile) for x in range(0, w, tile)]
    out: Optional[torch.Tensor] = None
    with _TiledGroupNorms(decoder.body_parts()) as norms:
        while True:
            for y0, y1, x0, x1 in cores:
                py0, py1, px0, px1 = max(0, y0 - overlap), min(h, y1 + overlap), max(0, x0 - overlap), min(w, x1 + overlap)
                norms.core, norms.tile_h, norms.calls = (y0 - py0, y1 - py0, x0 - px0, x1 - px0), py1 - py0, 0
                try:
                    piece = decoder.body(stem[..., py0:py1, px0:px1])  # [B, C_img, (py1-py0)*f, (px1-px0)*f]
                except _Measured:
                    continue
                if out is None:
                    out = piece.new_empty(B, piece.shape[1], h * f, w * f)
                out[..., y0 * f:y1 * f, x0 * f:x1 * f] = piece[..., (y0 - py0) * f:(y1 - py0) * f, (x0 - px0) * f:(x1 - px0) * f]
            if not norms.finish_pass():
                assert out is not None
                return out
