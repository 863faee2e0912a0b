"""KL-regularized autoencoder for latent diffusion (Kingma & Welling 2014; Rombach et al. 2022, §3).

The encoder maps an image x [B, C, H, W] in [-1, 1] to a diagonal Gaussian posterior
q(z|x) = N(mean, diag(exp(logvar))) over latents z [B, latent_channels, H/f, W/f] with
f = 2 ** (len(channel_mult) - 1); the decoder maps z back to pixels. Built from the shared
ResBlock / Downsample / Upsample blocks of :mod:`diffuse.nn.layers`.

Loss (Rombach et al. 2022, §3 and App. G, without the perceptual and adversarial terms, for
which no network is available offline):  L = |x - D(z)|_1 + kl_weight * KL(q(z|x) || N(0, I))
+ edge_weight * |grad(x) - grad(D(z))|_1, with z = mean + std * eps (reparameterization,
Kingma & Welling 2014 eq. 10) and the KL in closed form (their App. B):
KL = 0.5 * sum(mean^2 + var - 1 - logvar), summed over latent elements, averaged over the batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Downsample, ResBlock, Upsample, group_norm, init_weights


@dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild a :class:`VAE`."""

    in_channels: int = 3
    latent_channels: int = 4
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # len - 1 downsamplings: (1, 2, 2) -> factor 4
    num_res_blocks: int = 1
    norm_groups: int = 8

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        if self.factor not in (1, 2, 4, 8, 16):
            raise ValueError(f"VAE channel_mult {list(self.channel_mult)} gives factor {self.factor}; use 2 to 5 levels")
        for ch in {self.base_channels * m for m in self.channel_mult}:
            if ch % self.norm_groups:
                raise ValueError(f"VAE width {ch} is not divisible by norm_groups={self.norm_groups}")
        if self.latent_channels < 1 or self.num_res_blocks < 1:
            raise ValueError("VAE latent_channels and num_res_blocks must be >= 1")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VAEConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VAE config key {unknown[0]!r}; known keys: {', '.join(sorted(known))}")
        return cls(**data)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))); mean/logvar [B, C, h, w]. logvar is clamped to [-30, 20]."""

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
        self.mean = mean
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) (reparameterization; Kingma & Welling 2014, eq. 10)."""
        eps = torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype).to(self.mean.device)
        return self.mean + self.std * eps

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per example [B] = 0.5 * sum(mean^2 + var - 1 - logvar) (Kingma & Welling 2014, App. B)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).flatten(1).sum(1)


class Encoder(nn.Module):
    """[B, C, H, W] -> [B, 2 * latent_channels, H/f, W/f] (mean and logvar)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        ch = widths[0]
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, width, groups=cfg.norm_groups))
                ch = width
            if level < len(widths) - 1:
                blocks.append(Downsample(ch))
        self.blocks = nn.ModuleList(blocks)
        self.mid = ResBlock(ch, ch, groups=cfg.norm_groups)
        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """[B, latent_channels, h, w] -> [B, C, h*f, w*f]."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = [cfg.base_channels * m for m in cfg.channel_mult][::-1]
        ch = widths[0]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch, 3, padding=1)
        self.mid = ResBlock(ch, ch, groups=cfg.norm_groups)
        blocks: list[nn.Module] = []
        for level, width in enumerate(widths):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, width, groups=cfg.norm_groups))
                ch = width
            if level < len(widths) - 1:
                blocks.append(Upsample(ch))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = group_norm(ch, cfg.norm_groups)
        self.conv_out = nn.Conv2d(ch, cfg.in_channels, 3, padding=1)

    def halo(self) -> int:
        """Latents of context, per side, that one output pixel depends on (the receptive-field radius in
        latent pixels, rounded up): a k x k convolution at level l (2^l times the latent grid, after l
        nearest 2x upsamplings) reaches (k // 2) / 2^l latents further. GroupNorm is the only non-local
        layer besides the convolutions; :func:`diffuse.codec.decode_tiled` makes its statistics global."""
        level, radius = 0, 0.0
        for part in (self.conv_in, self.mid, *self.blocks, self.conv_out):  # in the order forward runs them
            level += isinstance(part, Upsample)  # its conv runs after the 2x upsampling
            radius += sum((m.kernel_size[0] // 2) / 2 ** level for m in part.modules() if isinstance(m, nn.Conv2d))
        return math.ceil(radius)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for block in self.blocks:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """KL autoencoder: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        init_weights(self)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if x.shape[1] != self.cfg.in_channels or x.shape[-1] % self.cfg.factor or x.shape[-2] % self.cfg.factor:
            raise ValueError(f"this VAE encodes {self.cfg.in_channels}-channel images with sides divisible by "
                             f"{self.cfg.factor}, got shape {tuple(x.shape)}")
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)


def image_gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences along width and height: [B, C, H, W-1], [B, C, H-1, W]."""
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def vae_loss(vae: VAE, x: torch.Tensor, *, kl_weight: float, edge_weight: float,
             generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
    """Per-example loss terms [B] (see the module docstring): 'loss' = rec + kl_weight*kl + edge_weight*edge.
    rec and edge are means over pixels (L1); kl is the sum over latent elements."""
    posterior = vae.encode(x)
    recon = vae.decode(posterior.sample(generator))
    rec = (recon - x).abs().flatten(1).mean(1)
    kl = posterior.kl()
    gx, gy = image_gradients(x)
    rx, ry = image_gradients(recon)
    edge = 0.5 * ((rx - gx).abs().flatten(1).mean(1) + (ry - gy).abs().flatten(1).mean(1))
    return {"loss": rec + kl_weight * kl + edge_weight * edge, "rec": rec, "kl": kl, "edge": edge}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2): 10 log10(4 / MSE)."""
    mse = float((a.clamp(-1, 1) - b.clamp(-1, 1)).pow(2).mean())
    return 10.0 * torch.log10(torch.tensor(4.0 / max(mse, 1e-12))).item()
