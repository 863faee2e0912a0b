"""Shared network blocks: noise embeddings, norms, attention (SDPA), feed-forward, resampling.

Every backbone (U-Net, DiT, the text encoder, later the VAE) builds from these blocks
(DESIGN.md §4 rule 9). Module attribute names follow diffusers' conventions
(``to_q``/``to_k``/``to_v``/``to_out.0``, ``ff.net.0.proj``, ``norm1``/``conv1``/
``time_emb_proj``...) so pretrained weights can be imported by a key mapping.

Weight initialization lives in one place, :func:`init_weights`; a block that must start
at zero is marked with :func:`zero_init` and zeroed there.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------- init


def zero_init(module: nn.Module) -> nn.Module:
    """Mark ``module`` to be zero-initialized (weights and bias) by :func:`init_weights`."""
    module._zero_init = True  # type: ignore[attr-defined]
    return module


@torch.no_grad()
def init_weights(model: nn.Module) -> None:
    """The one weight initializer: Xavier-uniform linear/conv weights, zero biases, N(0, 0.02)
    embeddings, unit norms; then every module marked by :func:`zero_init` is set to zero.

    Buffers (e.g. Fourier frequencies) are left alone.
    """
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=0.02)
        elif isinstance(m, (nn.GroupNorm, nn.LayerNorm)) and m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in model.modules():
        if getattr(m, "_zero_init", False):
            for p in m.parameters():
                p.zero_()


# ----------------------------------------------------------------------------- noise embedding


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a float c_noise [B] -> [B, dim] (Vaswani et al. 2017; Ho et al. 2020).

    Frequencies are max_period^(-i / (half - freq_shift)) for i < half, applied to ``scale * c_noise``;
    the output is [cos, sin], or [sin, cos] with ``flip_sin_to_cos=False`` (diffusers' ``Timesteps``
    options; the defaults are Stable Diffusion's, DDPM's are ``False`` and ``freq_shift=1``). ``scale``
    sets the frequency scale: 1 suits timesteps 0..999 and also EDM's c_noise = ln(sigma)/4 (as EDM's
    ADM network uses it); use ~1000 for t in [0, 1].
    """

    def __init__(self, dim: int, scale: float = 1.0, max_period: float = 10000.0, flip_sin_to_cos: bool = True,
                 freq_shift: float = 0.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        if freq_shift >= dim // 2:
            raise ValueError(f"freq_shift must be below dim / 2 = {dim // 2}, got {freq_shift}")
        self.dim, self.scale, self.max_period = dim, float(scale), float(max_period)
        self.flip_sin_to_cos, self.freq_shift = flip_sin_to_cos, freq_shift

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        steps = torch.arange(half, dtype=torch.float32, device=c_noise.device)
        freqs = torch.exp(-math.log(self.max_period) * steps / (half - self.freq_shift))
        args = (self.scale * c_noise.float())[:, None] * freqs[None]  # [B, half]
        if self.flip_sin_to_cos:
            return torch.cat([args.cos(), args.sin()], dim=1)  # [B, dim]
        return torch.cat([args.sin(), args.cos()], dim=1)  # [B, dim]


class FourierEmbedding(nn.Module):
    """Random Fourier features of c_noise [B] -> [B, dim] (Tancik et al. 2020; Song et al. 2021, NCSN++).

    Frequencies ~ N(0, scale^2) drawn once from a fixed seed and stored as a buffer (saved with
    the weights); output [cos(2 pi f c), sin(2 pi f c)]. scale=16 suits c_noise = ln(sigma)/4.
    """

    def __init__(self, dim: int, scale: float = 16.0, seed: int = 0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"embedding dim must be even, got {dim}")
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", torch.randn(dim // 2, generator=gen) * scale)

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        args = 2 * math.pi * c_noise.float()[:, None] * self.freqs[None].float()  # [B, dim/2]
        return torch.cat([args.cos(), args.sin()], dim=1)  # [B, dim]


def noise_embedding(kind: str, dim: int, scale: float, max_period: float = 10000.0, flip_sin_to_cos: bool = True,
                    freq_shift: float = 0.0) -> nn.Module:
    """'positional' (sinusoidal, ``scale`` multiplies c_noise) or 'fourier' (``scale`` = std of frequencies;
    it has no ``flip_sin_to_cos``/``freq_shift`` options and refuses non-default ones)."""
    if kind == "positional":
        return PositionalEmbedding(dim, scale, max_period, flip_sin_to_cos, freq_shift)
    if kind == "fourier":
        if not flip_sin_to_cos or freq_shift:
            raise ValueError("flip_sin_to_cos=False and freq_shift apply to the 'positional' noise embedding only")
        return FourierEmbedding(dim, scale)
    raise ValueError(f"unknown noise_embedding {kind!r}; use 'positional' or 'fourier'")


class TimestepEmbedding(nn.Module):
    """MLP on the noise embedding: [B, in_dim] -> [B, dim] (diffusers' linear_1 / linear_2)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(emb)))  # [B, dim]


# ----------------------------------------------------------------------------- norms


def group_norm(channels: int, groups: int = 32, eps: float = 1e-5) -> nn.GroupNorm:
    """GroupNorm that refuses a channel count not divisible by ``groups`` (no silent fix)."""
    if channels % groups:
        raise ValueError(f"GroupNorm: {channels} channels are not divisible into {groups} groups; change norm_groups")
    return nn.GroupNorm(groups, channels, eps=eps)


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Adaptive normalization h * (1 + scale) + shift with shift/scale broadcast over h's extra dims.

    h: [B, C, H, W] with shift/scale [B, C] (AdaGN, Dhariwal & Nichol 2021) or h: [B, N, C] with
    shift/scale [B, C] (adaLN, Peebles & Xie 2023).
    """
    if h.ndim == 4:
        shift, scale = shift[:, :, None, None], scale[:, :, None, None]  # [B, C, 1, 1]
    else:
        shift, scale = shift[:, None, :], scale[:, None, :]  # [B, 1, C]
    return h * (1 + scale) + shift


class AdaGroupNorm(nn.Module):
    """GroupNorm whose scale/shift come from an embedding (Dhariwal & Nichol 2021, AdaGN):
    norm(h) * (1 + s) + b with (s, b) = Linear(emb). h [B, C, H, W], emb [B, E]."""

    def __init__(self, emb_dim: int, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.linear = nn.Linear(emb_dim, 2 * channels)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(emb).chunk(2, dim=1)  # 2 x [B, C]
        return modulate(self.norm(h), shift, scale)


# ----------------------------------------------------------------------------- attention


def attention_mask(mask: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Key padding mask [B, L] (True = real) -> (SDPA mask [B, 1, 1, L], rows_valid [B, 1, 1] or None).

    A row with no valid key would make softmax NaN; it attends to all keys instead and its
    output is zeroed with ``rows_valid``.
    """
    if mask is None:
        return None, None
    any_valid = mask.any(dim=1)  # [B]
    mask = mask | ~any_valid[:, None]  # [B, L]
    return mask[:, None, None, :], any_valid[:, None, None]  # [B, 1, 1, L], [B, 1, 1]


class Attention(nn.Module):
    """Multi-head self- or cross-attention through ``F.scaled_dot_product_attention``.

    x [B, N, query_dim], context [B, L, context_dim] (None = self-attention),
    mask [B, L] bool key padding (True = attend) -> [B, N, query_dim].
    ``causal=True`` lets query i attend to keys 0..i only (a left-to-right text transformer
    such as CLIP's, Radford et al. 2021); it takes no padding mask.
    Cross-attention to text tokens follows Rombach et al. 2022 (latent diffusion), §3.3.
    """

    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 qkv_bias: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dim_head = heads, dim_head
        self.to_q = nn.Linear(query_dim, inner, bias=qkv_bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=qkv_bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        context = x if context is None else context
        L = context.shape[1]
        if mask is not None and mask.shape != (B, L):
            raise ValueError(f"attention mask must be [B, L] = [{B}, {L}], got {tuple(mask.shape)}")
        if causal and mask is not None:
            raise ValueError("causal attention takes no key padding mask")
        q = self.to_q(x).view(B, N, self.heads, self.dim_head).transpose(1, 2)  # [B, h, N, d]
        k = self.to_k(context).view(B, L, self.heads, self.dim_head).transpose(1, 2)  # [B, h, L, d]
        v = self.to_v(context).view(B, L, self.heads, self.dim_head).transpose(1, 2)  # [B, h, L, d]
        attn_mask, rows_valid = attention_mask(mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)  # [B, h, N, d]
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.dim_head)  # [B, N, inner]
        if rows_valid is not None:
            out = out * rows_valid.to(out.dtype)
        return self.to_out[1](self.to_out[0](out))  # [B, N, query_dim]


class SpatialSelfAttention(Attention):
    """Self-attention on a feature map with its own GroupNorm and residual (Ho et al. 2020's attention
    block; the latent-diffusion autoencoder's mid block; diffusers' ``Attention`` with ``group_norm``).

    x [B, C, H, W] -> GroupNorm -> tokens [B, HW, C] -> attention (qkv with bias) -> + x, divided by
    ``rescale``. The output projection is zero-initialized, so a fresh block is the identity (rescale 1).
    """

    def __init__(self, channels: int, heads: int, groups: int = 32, eps: float = 1e-6, rescale: float = 1.0,
                 dropout: float = 0.0):
        if channels % heads:
            raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
        super().__init__(channels, heads, channels // heads, qkv_bias=True, dropout=dropout)
        self.group_norm = group_norm(channels, groups, eps=eps)
        self.rescale = rescale
        zero_init(self.to_out[0])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        if context is not None or mask is not None:
            raise ValueError("SpatialSelfAttention is self-attention only; it takes no context or mask")
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        h = super().forward(h).transpose(1, 2).reshape(B, C, H, W)  # [B, C, H, W]
        return (x + h) / self.rescale


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020): [.., dim] -> [.., dim_out]."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)  # 2 x [.., dim_out]
        return h * F.gelu(gate)


class GELUProj(nn.Module):
    """Linear then GELU (tanh approximation, as in DiT's MLP): [.., dim] -> [.., dim_out]."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Transformer MLP: [.., dim] -> [.., dim] through ``mult * dim`` hidden units ('geglu' or 'gelu')."""

    def __init__(self, dim: int, mult: float = 4.0, activation: str = "geglu", dropout: float = 0.0):
        super().__init__()
        inner = int(dim * mult)
        if activation == "geglu":
            act: nn.Module = GEGLU(dim, inner)
        elif activation == "gelu":
            act = GELUProj(dim, inner)
        else:
            raise ValueError(f"unknown activation {activation!r}; use 'geglu' or 'gelu'")
        self.net = nn.ModuleList([act, nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


# ----------------------------------------------------------------------------- convolutional blocks


class Downsample(nn.Module):
    """Strided 3x3 conv: [B, C, H, W] -> [B, C, H/2, W/2].

    ``padding=1`` pads every side by one; ``padding=0`` pads only the right and bottom by one
    (the latent-diffusion autoencoder's and diffusers' ``Downsample2D(padding=0)`` layout).
    """

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        if padding not in (0, 1):
            raise ValueError(f"Downsample padding must be 0 (right/bottom) or 1 (all sides), got {padding}")
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # [B, C, H/2, W/2]


class Upsample(nn.Module):
    """Nearest-neighbour 2x then 3x3 conv: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # [B, C, 2H, 2W]
        return self.conv(x)


class ResBlock(nn.Module):
    """Residual block (He et al. 2016; U-Net form of Ho et al. 2020) with optional embedding injection.

    x [B, C_in, H, W], emb [B, E] or None -> [B, C_out, H, W]. ``time_embedding``:
    'scale_shift' = AdaGN, norm2(h) * (1 + s) + b (Dhariwal & Nichol 2021);
    'add' = h + Linear(emb) before norm2 (DDPM / Stable Diffusion). ``emb_dim=0`` gives a plain
    block (VAE). The last conv is zero-initialized so the block starts as its shortcut.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int = 0, groups: int = 32,
                 dropout: float = 0.0, time_embedding: str = "scale_shift", eps: float = 1e-5, rescale: float = 1.0):
        super().__init__()
        if time_embedding not in ("scale_shift", "add"):
            raise ValueError(f"unknown time_embedding {time_embedding!r}; use 'scale_shift' or 'add'")
        self.time_embedding = time_embedding
        self.rescale = rescale  # the sum (skip + h) is divided by it (diffusers' output_scale_factor)
        self.norm1 = group_norm(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None
        if emb_dim:
            width = 2 * out_channels if time_embedding == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(emb_dim, width)
        self.norm2 = group_norm(out_channels, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # [B, C_out, H, W]
        if self.time_emb_proj is not None:
            if emb is None:
                raise ValueError("this ResBlock was built with an embedding; pass emb")
            e = self.time_emb_proj(F.silu(emb))  # [B, 2*C_out] or [B, C_out]
            if self.time_embedding == "scale_shift":
                scale, shift = e.chunk(2, dim=1)  # 2 x [B, C_out]
                h = modulate(self.norm2(h), shift, scale)
            else:
                h = self.norm2(h + e[:, :, None, None])
        else:
            h = self.norm2(h)
        h = self.conv2(self.dropout(F.silu(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)  # [B, C_out, H, W]
        if self.rescale != 1.0:
            return (skip + h) / self.rescale
        return skip + h


# ----------------------------------------------------------------------------- conditioning


class Cond(NamedTuple):
    """Checked conditioning: class_labels [B] long, text [B, L, D], text_mask [B, L] bool, concat [B, Cc, H, W]."""

    class_labels: torch.Tensor | None
    text: torch.Tensor | None
    text_mask: torch.Tensor | None
    concat: torch.Tensor | None


COND_KEYS = ("class_labels", "text", "text_mask", "concat")


def parse_cond(cond: Any, x: torch.Tensor, *, num_classes: int, text_dim: int, concat_channels: int) -> Cond:
    """Validate ``cond`` (None or dict) against what a backbone was built for; raise ValueError otherwise.

    x [B, C, H, W] is the network input. A key whose value is None counts as absent. A
    missing text_mask means all tokens are real. Label num_classes is the null class (CFG).
    """
    if cond is None:
        cond = {}
    if not isinstance(cond, dict):
        raise ValueError(f"cond must be None or a dict with keys {COND_KEYS}, got {type(cond).__name__}")
    unknown = sorted(set(cond) - set(COND_KEYS))
    if unknown:
        raise ValueError(f"unknown cond key(s) {unknown}; known: {list(COND_KEYS)}")
    B = x.shape[0]
    labels, text, mask, concat = (cond.get(k) for k in COND_KEYS)

    if num_classes:
        if labels is None:
            raise ValueError(f"this backbone is class-conditional ({num_classes} classes); cond['class_labels'] is "
                             f"missing (use label {num_classes} for the unconditional/null class)")
        if labels.shape != (B,) or labels.dtype != torch.long:
            raise ValueError(f"class_labels must be a LongTensor [B] = [{B}], got {labels.dtype} {tuple(labels.shape)}")
        if not torch.compiler.is_compiling() and bool(((labels < 0) | (labels > num_classes)).any()):
            raise ValueError(f"class_labels must lie in [0, {num_classes}] ({num_classes} = null class), got {labels.tolist()}")
    elif labels is not None:
        raise ValueError("cond has 'class_labels' but this backbone was built with num_classes=0")

    if text_dim:
        if text is None:
            raise ValueError(f"this backbone is text-conditional (text_dim={text_dim}); cond['text'] is missing "
                             "(encode the empty prompt for the unconditional case)")
        if text.ndim != 3 or text.shape[0] != B or text.shape[2] != text_dim:
            raise ValueError(f"text must be [B, L, {text_dim}] with B={B}, got {tuple(text.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != text.shape[:2]):
            raise ValueError(f"text_mask must be a BoolTensor {tuple(text.shape[:2])}, got {mask.dtype} {tuple(mask.shape)}")
    elif text is not None or mask is not None:
        raise ValueError("cond has 'text'/'text_mask' but this backbone was built with text_dim=0")

    if concat_channels:
        want = (B, concat_channels, *x.shape[2:])
        if concat is None:
            raise ValueError(f"this backbone needs cond['concat'] of shape {want}")
        if tuple(concat.shape) != want:
            raise ValueError(f"concat must have shape {want}, got {tuple(concat.shape)}")
    elif concat is not None:
        raise ValueError("cond has 'concat' but this backbone was built with concat_channels=0")
    return Cond(labels, text, mask, concat)


def check_c_noise(c_noise: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """c_noise as a float tensor [B] (a scalar is broadcast); raise on any other shape."""
    c_noise = torch.as_tensor(c_noise, device=x.device)
    if c_noise.ndim == 0:
        c_noise = c_noise.expand(x.shape[0])
    if c_noise.shape != (x.shape[0],):
        raise ValueError(f"c_noise must have shape [B] = [{x.shape[0]}], got {tuple(c_noise.shape)}")
    return c_noise.float()


__all__ = [
    "zero_init", "init_weights", "PositionalEmbedding", "FourierEmbedding", "noise_embedding", "TimestepEmbedding",
    "group_norm", "modulate", "AdaGroupNorm", "attention_mask", "Attention", "GEGLU", "GELUProj", "FeedForward",
    "Downsample", "Upsample", "ResBlock", "Cond", "COND_KEYS", "parse_cond", "check_c_noise",
]
