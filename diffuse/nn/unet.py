"""U-Net backbone F(x_in, c_noise, cond) (Ronneberger et al. 2015; Ho et al. 2020; Dhariwal & Nichol 2021).

Residual blocks with GroupNorm and the noise(+class) embedding injected by AdaGN scale/shift
(Dhariwal & Nichol 2021) or by addition (Stable Diffusion); self-attention at chosen
resolutions; cross-attention to text tokens in SpatialTransformer blocks (Rombach et al.
2022, §3.3), or DDPM's plain self-attention blocks (``attention='plain'``, Ho et al. 2020);
zero-initialized output conv and residual-branch last convs, so a fresh network returns
exactly zero.

The module tree mirrors diffusers' ``UNet2DConditionModel`` (conv_in, time_embedding.linear_1/2,
class_embedding, down_blocks[i].resnets[j] / .attentions[j] / .downsamplers[0], mid_block,
up_blocks[i].resnets / .attentions / .upsamplers[0], conv_norm_out, conv_out; attention blocks
hold norm, proj_in, transformer_blocks[k].{norm1, attn1, norm2, attn2, norm3, ff}, proj_out)
and, with plain attention, ``UNet2DModel`` (attention blocks hold group_norm, to_q/to_k/to_v,
to_out.0), so that diffusers weights can be imported by renaming keys (diffuse.convert.unet).
Differences: proj_in/proj_out are Linear (SD 2 style; SD 1 stores 1x1 convs — squeeze their
kernels), and the class embedding has num_classes + 1 rows (the last is the null class for guidance).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import (Attention, Downsample, FeedForward, ResBlock, SpatialSelfAttention, TimestepEmbedding, Upsample,
                     check_c_noise, group_norm, init_weights, noise_embedding, parse_cond, zero_init)

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a :class:`UNet`. Resolutions are in pixels of the network input."""

    in_channels: int = 3
    out_channels: int = 3
    image_size: int = 32                        # nominal input size; fixes where attention sits
    model_channels: int = 64                    # channels at the first level
    channel_mult: tuple[int, ...] = (1, 2, 2)   # per level; len - 1 downsamplings
    num_res_blocks: int = 2                     # per level on the way down (+1 on the way up)
    attention_resolutions: tuple[int, ...] = (16,)
    mid_attention: bool = True
    num_heads: int = 4                          # exactly one of num_heads / head_dim is > 0
    head_dim: int = 0
    transformer_depth: int = 1                  # transformer blocks per attention location
    dropout: float = 0.0
    norm_groups: int = 32
    num_classes: int = 0                        # 0 = unconditional; label num_classes = null class
    text_dim: int = 0                           # 0 = no text; else token-embedding width
    concat_channels: int = 0                    # extra input channels from cond['concat']
    time_embedding: str = "scale_shift"         # 'scale_shift' (AdaGN) or 'add' (Stable Diffusion)
    noise_embedding: str = "positional"         # 'positional' or 'fourier'
    noise_embedding_scale: float = 1.0          # positional: multiplier on c_noise; fourier: std of freqs
    noise_max_period: float = 10000.0           # positional only
    flip_sin_to_cos: bool = True                # positional only: [cos, sin] (True) or [sin, cos] features
    freq_shift: float = 0.0                     # positional only: frequencies max_period^(-i / (half - freq_shift))
    attention: str = "transformer"              # 'transformer' (SpatialTransformer) or 'plain' (SpatialSelfAttention)
    norm_eps: float = 1e-5                      # eps of the resnets', output's and plain attention's GroupNorms
    downsample_padding: int = 1                 # 1: pad all sides; 0: pad right/bottom only (DDPM)
    mid_rescale: float = 1.0                    # mid-block resnets' (and plain attention's) outputs are divided by it
    position_embedding: str = "none"            # 'none' or 'sincos': where each transformer token sits (below)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        object.__setattr__(self, "attention_resolutions", tuple(self.attention_resolutions))
        if not self.channel_mult:
            raise ValueError("channel_mult must have at least one level")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} is not divisible by {factor} ({len(self.channel_mult)} levels)")
        levels = [self.image_size // 2**i for i in range(len(self.channel_mult))]
        for r in self.attention_resolutions:
            if r not in levels:
                raise ValueError(f"attention resolution {r} is not one of the network's resolutions {levels}")
        if (self.num_heads > 0) == (self.head_dim > 0):
            raise ValueError("set exactly one of num_heads and head_dim to a positive value")
        for ch in {self.model_channels * m for m in self.channel_mult}:
            heads = self.num_heads or ch // self.head_dim
            if ch % heads or (self.head_dim and ch % self.head_dim):
                raise ValueError(f"{ch} channels cannot be split into attention heads (num_heads={self.num_heads}, "
                                 f"head_dim={self.head_dim})")
            if ch % self.norm_groups:
                raise ValueError(f"{ch} channels are not divisible by norm_groups={self.norm_groups}")
        if self.time_embedding not in ("scale_shift", "add"):
            raise ValueError(f"unknown time_embedding {self.time_embedding!r}; use 'scale_shift' or 'add'")
        if self.noise_embedding not in ("positional", "fourier"):
            raise ValueError(f"unknown noise_embedding {self.noise_embedding!r}; use 'positional' or 'fourier'")
        if self.noise_embedding == "fourier" and (not self.flip_sin_to_cos or self.freq_shift):
            raise ValueError("flip_sin_to_cos=False and freq_shift apply to the 'positional' noise embedding only")
        if self.attention not in ("transformer", "plain"):
            raise ValueError(f"unknown attention {self.attention!r}; use 'transformer' or 'plain'")
        if self.position_embedding not in ("none", "sincos"):
            raise ValueError(f"unknown position_embedding {self.position_embedding!r}; use 'none' or 'sincos'")
        if self.position_embedding != "none" and self.attention == "plain":
            raise ValueError("position_embedding applies to attention='transformer' blocks; plain attention has none")
        if self.attention == "plain" and self.text_dim:
            raise ValueError("attention='plain' has no cross-attention to text; use attention='transformer' with text_dim")
        if self.downsample_padding not in (0, 1):
            raise ValueError(f"downsample_padding must be 0 or 1, got {self.downsample_padding}")
        if self.norm_eps <= 0 or self.mid_rescale <= 0:
            raise ValueError(f"norm_eps and mid_rescale must be > 0, got {self.norm_eps} and {self.mid_rescale}")
        for name in ("num_classes", "text_dim", "concat_channels", "num_res_blocks", "transformer_depth"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    def heads(self, channels: int) -> tuple[int, int]:
        """(num_heads, head_dim) for an attention block on ``channels`` channels."""
        if self.num_heads:
            return self.num_heads, channels // self.num_heads
        return channels // self.head_dim, self.head_dim


# ----------------------------------------------------------------------------- blocks


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: self-attn, cross-attn to text (if context_dim), GEGLU FF.

    x [B, N, C], context [B, L, context_dim], mask [B, L] -> [B, N, C]. (diffusers' BasicTransformerBlock.)
    """

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim) if context_dim else None
        self.attn2 = Attention(dim, heads, dim_head, context_dim=context_dim, dropout=dropout) if context_dim else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, activation="geglu", dropout=dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context, mask)
        return x + self.ff(self.norm3(x))


POSITION_FREQUENCIES = 4  # sin/cos of (pi/2) 2^k u for k < 4, per axis: 16 features


def position_features(h: int, w: int, device: torch.device | None = None) -> torch.Tensor:
    """Fixed 2-D sin-cos features of every cell of an h x w map, [h*w, 4 * POSITION_FREQUENCIES], row-major.

    Cell centres sit at normalized coordinates u, v in (-1, 1) (u across, v down), so a cell means the
    same place on the canvas at every size; features are sin and cos of (pi/2) 2^k u and of (pi/2) 2^k v,
    the sinusoids of Vaswani et al. 2017 (Eq. 5) applied per axis as in ViT/DiT's 2-D embeddings
    (Dosovitskiy et al. 2021; Peebles & Xie 2023). The lowest frequency is monotonic across the canvas.
    """
    v = (2 * torch.arange(h, device=device, dtype=torch.float32) + 1) / h - 1
    u = (2 * torch.arange(w, device=device, dtype=torch.float32) + 1) / w - 1
    freqs = (torch.pi / 2) * 2.0 ** torch.arange(POSITION_FREQUENCIES, device=device, dtype=torch.float32)
    pu, pv = (u[:, None] * freqs).repeat(h, 1), (v[:, None] * freqs).repeat_interleave(w, dim=0)  # [h*w, F]
    return torch.cat([pu.sin(), pu.cos(), pv.sin(), pv.cos()], dim=1)


class SpatialTransformer(nn.Module):
    """Attention on a feature map (Rombach et al. 2022's SpatialTransformer; diffusers' Transformer2DModel).

    x [B, C, H, W] -> GroupNorm -> tokens [B, HW, C] (+ pos_proj(position_features) with ``position``)
    -> depth x TransformerBlock -> proj_out (zero init) -> + x. Without text (context_dim=0) it is plain
    self-attention + FF.

    Convolutions and attention are translation-equivariant, so without ``position`` the tokens know where they
    are only through the zero padding at the borders, which is how a text model fails to learn "at the top
    left". ``pos_proj`` is zero-initialized (as ControlNet's zero convolutions, Zhang et al. 2023): a network
    given it starts out computing exactly what it did without, so a trained model can be fine-tuned into one.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int, groups: int,
                 dropout: float = 0.0, position: bool = False):
        super().__init__()
        self.norm = group_norm(channels, groups, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.pos_proj = zero_init(nn.Linear(4 * POSITION_FREQUENCIES, channels)) if position else None
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, heads, dim_head, context_dim, dropout) for _ in range(depth)])
        self.proj_out = zero_init(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        h = self.proj_in(h)
        if self.pos_proj is not None:
            h = h + self.pos_proj(position_features(H, W, h.device).to(h.dtype))  # [HW, C] broadcast over B
        for block in self.transformer_blocks:
            h = block(h, context, mask)
        h = self.proj_out(h).transpose(1, 2).reshape(B, C, H, W)  # [B, C, H, W]
        return x + h


class DownBlock(nn.Module):
    """One encoder level: resnets (each followed by attention if enabled), then an optional downsampler.

    Returns the output [B, C_out, H', W'] and the list of skip tensors for the decoder.
    """

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module], downsample_channels: int | None,
                 padding: int = 1):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)  # empty: no keys, like diffusers' DownBlock2D
        self.downsamplers = nn.ModuleList([Downsample(downsample_channels, padding)]) if downsample_channels else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            h = resnet(h, emb)  # [B, C_out, H, W]
            if len(self.attentions):
                h = self.attentions[i](h, context, mask)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)  # [B, C_out, H/2, W/2]
            skips.append(h)
        return h, skips


class MidBlock(nn.Module):
    """resnets[0] -> attentions[0] (optional) -> resnets[1] at the lowest resolution."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module]):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        h = self.resnets[0](h, emb)
        if len(self.attentions):
            h = self.attentions[0](h, context, mask)
        return self.resnets[1](h, emb)


class UpBlock(nn.Module):
    """One decoder level: each resnet takes [h, skip] concatenated on channels; optional upsampler."""

    def __init__(self, resnets: list[nn.Module], attentions: list[nn.Module], upsample_channels: int | None):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions)
        self.upsamplers = nn.ModuleList([Upsample(upsample_channels)]) if upsample_channels else None

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor], emb: torch.Tensor, context: torch.Tensor | None,
                mask: torch.Tensor | None) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            h = torch.cat([h, skips.pop()], dim=1)  # [B, C + C_skip, H, W]
            h = resnet(h, emb)  # [B, C_out, H, W]
            if len(self.attentions):
                h = self.attentions[i](h, context, mask)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)  # [B, C_out, 2H, 2W]
        return h


# ----------------------------------------------------------------------------- model


class UNet(nn.Module):
    """U-Net backbone: ``forward(x_in [B, C_in, H, W], c_noise [B], cond) -> [B, C_out, H, W]``.

    H and W must be divisible by 2^(levels - 1); attention sits at the levels whose nominal
    resolution (from ``image_size``) is in ``attention_resolutions``.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch0 = cfg.model_channels
        emb_dim = 4 * ch0
        ctx = cfg.text_dim

        def resnet(c_in: int, c_out: int, rescale: float = 1.0) -> ResBlock:
            return ResBlock(c_in, c_out, emb_dim, cfg.norm_groups, cfg.dropout, cfg.time_embedding, cfg.norm_eps, rescale)

        def attention(c: int, rescale: float = 1.0) -> nn.Module:
            heads, dim_head = cfg.heads(c)
            if cfg.attention == "plain":
                return SpatialSelfAttention(c, heads, cfg.norm_groups, cfg.norm_eps, rescale, cfg.dropout)
            return SpatialTransformer(c, heads, dim_head, cfg.transformer_depth, ctx, cfg.norm_groups, cfg.dropout,
                                      position=cfg.position_embedding == "sincos")

        # embeddings
        self.time_proj = noise_embedding(cfg.noise_embedding, ch0, cfg.noise_embedding_scale, cfg.noise_max_period,
                                         cfg.flip_sin_to_cos, cfg.freq_shift)
        self.time_embedding = TimestepEmbedding(ch0, emb_dim)
        self.class_embedding = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None

        # encoder
        self.conv_in = nn.Conv2d(cfg.in_channels + cfg.concat_channels, ch0, 3, padding=1)
        chans = [ch0]  # channels of every skip tensor, in order
        down, ch = [], ch0
        n_levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            res = cfg.image_size // 2**level
            use_attn = res in cfg.attention_resolutions
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks):
                resnets.append(resnet(ch, ch0 * mult))
                ch = ch0 * mult
                if use_attn:
                    attns.append(attention(ch))
                chans.append(ch)
            last = level == n_levels - 1
            down.append(DownBlock(resnets, attns, None if last else ch, cfg.downsample_padding))
            if not last:
                chans.append(ch)
        self.down_blocks = nn.ModuleList(down)

        # middle
        mid = cfg.mid_rescale
        self.mid_block = MidBlock([resnet(ch, ch, mid), resnet(ch, ch, mid)], [attention(ch, mid)] if cfg.mid_attention else [])

        # decoder
        up = []
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            res = cfg.image_size // 2**level
            use_attn = res in cfg.attention_resolutions
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                resnets.append(resnet(ch + chans.pop(), ch0 * mult))
                ch = ch0 * mult
                if use_attn:
                    attns.append(attention(ch))
            up.append(UpBlock(resnets, attns, ch if level > 0 else None))
        self.up_blocks = nn.ModuleList(up)

        # output
        self.conv_norm_out = group_norm(ch, cfg.norm_groups, cfg.norm_eps)
        self.conv_act = nn.SiLU()
        self.conv_out = zero_init(nn.Conv2d(ch, cfg.out_channels, 3, padding=1))
        init_weights(self)

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        cfg = self.config
        if x_in.ndim != 4 or x_in.shape[1] != cfg.in_channels:
            raise ValueError(f"x_in must be [B, {cfg.in_channels}, H, W], got {tuple(x_in.shape)}")
        factor = 2 ** (len(cfg.channel_mult) - 1)
        if x_in.shape[2] % factor or x_in.shape[3] % factor:
            raise ValueError(f"H and W must be divisible by {factor}, got {tuple(x_in.shape[2:])}")
        c = parse_cond(cond, x_in, num_classes=cfg.num_classes, text_dim=cfg.text_dim,
                       concat_channels=cfg.concat_channels)
        c_noise = check_c_noise(c_noise, x_in)

        # inputs in the network's own dtype (float64 from a preconditioner, or a bf16 model)
        dtype = self.conv_in.weight.dtype
        text = None if c.text is None else c.text.to(dtype)

        # embedding of noise level (+ class)
        emb = self.time_embedding(self.time_proj(c_noise).to(dtype))  # [B, 4*ch0]
        if self.class_embedding is not None:
            emb = emb + self.class_embedding(c.class_labels)  # [B, 4*ch0]

        # encoder
        x = x_in if c.concat is None else torch.cat([x_in, c.concat.to(x_in.dtype)], dim=1)  # [B, C_in + Cc, H, W]
        h = self.conv_in(x.to(dtype))  # [B, ch0, H, W]
        skips = [h]
        for block in self.down_blocks:
            h, s = block(h, emb, text, c.text_mask)  # [B, C_level, H / 2^level, ...]
            skips.extend(s)

        # middle and decoder
        h = self.mid_block(h, emb, text, c.text_mask)
        for block in self.up_blocks:
            h = block(h, skips, emb, text, c.text_mask)  # [B, C_level, ...] upsampled
        h = self.conv_out(self.conv_act(self.conv_norm_out(h)))  # [B, C_out, H, W]
        return h


# ----------------------------------------------------------------------------- presets

UNET_PRESETS: dict[str, UNetConfig] = {
    # ~0.56M params: unit tests (16x16 input)
    "tiny": UNetConfig(image_size=16, model_channels=24, channel_mult=(1, 2), num_res_blocks=1,
                       attention_resolutions=(8,), num_heads=2, norm_groups=8),
    # ~8.3M params: 32x32 pixel models on CPU
    "small": UNetConfig(image_size=32, model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                        attention_resolutions=(16,), num_heads=4, norm_groups=32),
    # ~44M params: DDPM-CIFAR-sized 32x32 model for GPU
    "base": UNetConfig(image_size=32, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                       attention_resolutions=(16,), num_heads=4, norm_groups=32, dropout=0.1),
}

__all__ = ["UNetConfig", "UNet", "UNET_PRESETS", "TransformerBlock", "SpatialTransformer", "position_features"]
