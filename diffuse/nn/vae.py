"""KL-regularized autoencoder for latent diffusion (Kingma & Welling 2014; Rombach et al. 2022, §3).

The encoder maps an image x [B, C, H, W] in [-1, 1] to a diagonal Gaussian posterior
q(z|x) = N(mean, diag(exp(logvar))) over latents z [B, latent_channels, H/f, W/f] with
f = 2 ** (len(channel_mult) - 1); the decoder maps z back to pixels. Built from the shared
ResBlock / SpatialSelfAttention / Downsample / Upsample blocks of :mod:`diffuse.nn.layers`.

Layout: the autoencoder of latent diffusion (Rombach et al. 2022; the Stable Diffusion VAE), with the
module names of diffusers' ``AutoencoderKL`` so its weights load by key (:mod:`diffuse.convert.vae`):

    encoder: conv_in -> down_blocks[i] (num_res_blocks ResBlocks, then a stride-2 conv padded right/bottom
             except at the last level) -> mid_block (ResBlock, [1-head self-attention], ResBlock)
             -> GroupNorm, SiLU, conv_out (2 * latent_channels: mean and logvar) -> [quant_conv 1x1]
    decoder: [post_quant_conv 1x1] -> conv_in -> mid_block -> up_blocks[i] (widths reversed,
             num_res_blocks + 1 ResBlocks, then nearest 2x + conv except at the last level)
             -> GroupNorm, SiLU, conv_out

Every GroupNorm has ``norm_groups`` groups and eps 1e-6.

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

from .layers import Downsample, ResBlock, SpatialSelfAttention, Upsample, group_norm, init_weights

NORM_EPS = 1e-6  # every GroupNorm of the latent-diffusion autoencoder


@dataclass(frozen=True)
class VAEConfig:
    """Everything needed to rebuild a :class:`VAE`."""

    in_channels: int = 3  # image channels, encoded and decoded
    latent_channels: int = 4
    base_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)  # level widths base * mult; len - 1 downsamplings: (1, 2, 2) -> factor 4
    num_res_blocks: int = 1  # ResBlocks per encoder level; each decoder level has one more (as in latent diffusion)
    norm_groups: int = 8
    mid_attention: bool = True  # a 1-head self-attention between the two mid-block ResBlocks of encoder and decoder
    quant_conv: bool = False  # 1x1 convs on the posterior moments and on z before decoding (Stable Diffusion has them)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        if self.factor not in (1, 2, 4, 8, 16):
            raise ValueError(f"VAE channel_mult {list(self.channel_mult)} gives factor {self.factor}; use 1 to 5 levels")
        for ch in {self.base_channels * m for m in self.channel_mult}:
            if ch % self.norm_groups:
                raise ValueError(f"VAE width {ch} is not divisible by norm_groups={self.norm_groups}")
        if self.latent_channels < 1 or self.num_res_blocks < 1:
            raise ValueError("VAE latent_channels and num_res_blocks must be >= 1")

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def widths(self) -> list[int]:
        """Channels of each level, from the image side."""
        return [self.base_channels * m for m in self.channel_mult]

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


class MidBlock(nn.Module):
    """ResBlock, optional 1-head self-attention (the only non-local layer besides GroupNorm), ResBlock,
    at constant width: [B, C, h, w] -> [B, C, h, w]."""

    def __init__(self, channels: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(channels, channels, groups=groups, eps=NORM_EPS) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, 1, groups=groups, eps=NORM_EPS)] if attention else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.resnets[0](h)
        for attention in self.attentions:
            h = attention(h)
        return self.resnets[1](h)


class Level(nn.Module):
    """``blocks`` ResBlocks from ``in_channels`` to ``out_channels``, then ``resample``: 'down' (stride-2 conv
    padded right/bottom: [.., H, W] -> [.., H/2, W/2]), 'up' (nearest 2x + conv) or '' (none)."""

    def __init__(self, in_channels: int, out_channels: int, blocks: int, groups: int, resample: str = ""):
        super().__init__()
        if resample not in ("", "down", "up"):
            raise ValueError(f"unknown resample {resample!r}; use 'down', 'up' or ''")
        self.resnets = nn.ModuleList([ResBlock(in_channels if i == 0 else out_channels, out_channels, groups=groups, eps=NORM_EPS)
                                      for i in range(blocks)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels, padding=0)] if resample == "down" else [])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)] if resample == "up" else [])

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in (*self.resnets, *self.downsamplers, *self.upsamplers):
            h = layer(h)
        return h


class Encoder(nn.Module):
    """[B, C, H, W] -> [B, 2 * latent_channels, H/f, W/f] (mean and logvar, before the quant conv)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.widths
        self.conv_in = nn.Conv2d(cfg.in_channels, widths[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            Level(widths[max(i - 1, 0)], width, cfg.num_res_blocks, cfg.norm_groups, "down" if i < len(widths) - 1 else "")
            for i, width in enumerate(widths)])
        self.mid_block = MidBlock(widths[-1], cfg.norm_groups, cfg.mid_attention)
        self.conv_norm_out = group_norm(widths[-1], cfg.norm_groups, NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))


class Decoder(nn.Module):
    """[B, latent_channels, h, w] -> [B, C, h*f, w*f] = ``body(stem(z))``.

    ``stem``: conv_in and the mid block at the latent grid (its attention sees every latent);
    ``body``: the up blocks and the output head, local apart from GroupNorm, so it can run tile by tile
    (:func:`diffuse.codec.decode_tiled`)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        widths = cfg.widths[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1)
        self.mid_block = MidBlock(widths[0], cfg.norm_groups, cfg.mid_attention)
        self.up_blocks = nn.ModuleList([
            Level(widths[max(i - 1, 0)], width, cfg.num_res_blocks + 1, cfg.norm_groups, "up" if i < len(widths) - 1 else "")
            for i, width in enumerate(widths)])
        self.conv_norm_out = group_norm(widths[-1], cfg.norm_groups, NORM_EPS)
        self.conv_out = nn.Conv2d(widths[-1], cfg.in_channels, 3, padding=1)

    def stem(self, z: torch.Tensor) -> torch.Tensor:
        """[B, latent_channels, h, w] -> [B, widths[-1], h, w]."""
        return self.mid_block(self.conv_in(z))

    def body_parts(self) -> list[nn.Module]:
        """The modules of :meth:`body`, in the order it runs them."""
        return [*self.up_blocks, self.conv_norm_out, self.conv_out]

    def body(self, h: torch.Tensor) -> torch.Tensor:
        """[B, widths[-1], h, w] -> [B, C, h*f, w*f]."""
        for level in self.up_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    def halo(self) -> int:
        """Latents of context, per side, that one output pixel of :meth:`body` depends on (its receptive-field
        radius in latent pixels, rounded up): a k x k convolution at level l (2^l times the latent grid, after l
        nearest 2x upsamplings) reaches (k // 2) / 2^l latents further. GroupNorm is the only non-local layer
        of the body besides the convolutions; :func:`diffuse.codec.decode_tiled` makes its statistics global
        (and runs the stem, whose attention is global, on the whole latent)."""
        level, radius = 0, 0.0
        for part in self.body_parts():
            for m in part.modules():  # pre-order: an Upsample comes before its conv, which runs after the 2x
                level += isinstance(m, Upsample)
                if isinstance(m, nn.Conv2d):
                    radius += (m.kernel_size[0] // 2) / 2 ** level
        return math.ceil(radius)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(z))


class VAE(nn.Module):
    """KL autoencoder: ``encode(x) -> DiagonalGaussian``, ``decode(z) -> x``. Without ``cfg.quant_conv`` the
    quant convs are identities (no weights)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.quant_conv else nn.Identity()
        init_weights(self)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        if x.shape[1] != self.cfg.in_channels or x.shape[-1] % self.cfg.factor or x.shape[-2] % self.cfg.factor:
            raise ValueError(f"this VAE encodes {self.cfg.in_channels}-channel images with sides divisible by "
                             f"{self.cfg.factor}, got shape {tuple(x.shape)}")
        mean, logvar = self.quant_conv(self.encoder(x)).chunk(2, dim=1)
        return DiagonalGaussian(mean, logvar)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


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
