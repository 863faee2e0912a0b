"""Diffusion Transformer backbone F(x_in, c_noise, cond) (Peebles & Xie 2023, "Scalable Diffusion
Models with Transformers").

Patchify (a p x p stride-p conv), add a 2D position embedding (fixed sin-cos or learned),
run transformer blocks conditioned by adaLN-Zero on the noise(+class) embedding, then a
final adaLN layer, a linear map to p*p*C_out per token, and unpatchify. As in the paper, the
adaLN modulations and the final linear are zero-initialized, so every block starts as the
identity and a fresh DiT returns exactly zero. Text enters either by cross-attention after
each self-attention (as in PixArt-alpha, Chen et al. 2023; output projection zero-initialized)
or as in-context tokens appended to the image tokens (DiT §3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .layers import (Attention, FeedForward, TimestepEmbedding, check_c_noise, init_weights, modulate,
                     noise_embedding, parse_cond, zero_init)

# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class DiTConfig:
    """Everything needed to rebuild a :class:`DiT`."""

    in_channels: int = 3
    out_channels: int = 3
    image_size: int = 32                # input must be exactly image_size x image_size
    patch_size: int = 2
    hidden_size: int = 256
    depth: int = 8
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    pos_embed: str = "sincos"           # 'sincos' (fixed) or 'learned'
    num_classes: int = 0                # 0 = unconditional; label num_classes = null class
    text_dim: int = 0                   # 0 = no text
    text_mode: str = "cross"            # 'cross' (cross-attention) or 'in_context' (extra tokens)
    concat_channels: int = 0
    noise_embedding: str = "positional"
    noise_embedding_scale: float = 1.0
    noise_max_period: float = 10000.0
    noise_embedding_dim: int = 256      # width of the sinusoidal features fed to the MLP

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise ValueError("a 2D sin-cos position embedding needs hidden_size divisible by 4")
        if self.pos_embed not in ("sincos", "learned"):
            raise ValueError(f"unknown pos_embed {self.pos_embed!r}; use 'sincos' or 'learned'")
        if self.text_mode not in ("cross", "in_context"):
            raise ValueError(f"unknown text_mode {self.text_mode!r}; use 'cross' or 'in_context'")
        if self.noise_embedding not in ("positional", "fourier"):
            raise ValueError(f"unknown noise_embedding {self.noise_embedding!r}; use 'positional' or 'fourier'")
        for name in ("num_classes", "text_dim", "concat_channels"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


# ----------------------------------------------------------------------------- blocks


def sincos_pos_embed_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding [grid*grid, dim] (Vaswani et al. 2017; MAE/DiT 2D form):
    half the channels encode the row, half the column, each as [sin, cos] over dim/4 frequencies."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]
    coords = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")  # [grid, grid] each

    def encode(pos: torch.Tensor) -> torch.Tensor:
        args = pos.reshape(-1, 1) * omega[None]  # [grid^2, dim/4]
        return torch.cat([args.sin(), args.cos()], dim=1)  # [grid^2, dim/2]

    return torch.cat([encode(yy), encode(xx)], dim=1).float()  # [grid^2, dim]


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero (Peebles & Xie 2023, §3.2, Fig. 3).

    x [B, N, D], c [B, D]: (shift, scale, gate) for attention and MLP from Linear(SiLU(c)), zero-init,
    so the block starts as the identity. Optional cross-attention to text (context [B, L, text_dim],
    mask [B, L]) between them; ``mask`` for self-attention covers in-context tokens ([B, N]).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, context_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, dim // heads, qkv_bias=True, dropout=dropout)
        self.norm_cross = nn.LayerNorm(dim, eps=1e-6) if context_dim else None
        self.cross_attn = None
        if context_dim:
            self.cross_attn = Attention(dim, heads, dim // heads, context_dim=context_dim, qkv_bias=True, dropout=dropout)
            zero_init(self.cross_attn.to_out[0])
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = FeedForward(dim, mult=mlp_ratio, activation="gelu", dropout=dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 6 * dim)))

    def forward(self, x: torch.Tensor, c: torch.Tensor, self_mask: torch.Tensor | None = None,
                context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x [B, D]
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), mask=self_mask)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + zero-init linear: x [B, N, D], c [B, D] -> [B, N, p*p*C_out]."""

    def __init__(self, dim: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = zero_init(nn.Linear(dim, patch_size * patch_size * out_channels))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), zero_init(nn.Linear(dim, 2 * dim)))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x [B, D]
        return self.linear(modulate(self.norm_final(x), shift, scale))  # [B, N, p*p*C_out]


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> tokens [B, (H/p)(W/p), D] by a p x p, stride-p conv."""

    def __init__(self, in_channels: int, dim: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]


# ----------------------------------------------------------------------------- model


class DiT(nn.Module):
    """DiT backbone: ``forward(x_in [B, C_in, S, S], c_noise [B], cond) -> [B, C_out, S, S]`` (S = image_size)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        D = cfg.hidden_size
        self.x_embedder = PatchEmbed(cfg.in_channels + cfg.concat_channels, D, cfg.patch_size)
        n_tokens = cfg.grid_size**2
        if cfg.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed_2d(D, cfg.grid_size)[None], persistent=False)  # [1, N, D]
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, D))  # [1, N, D]
        self.t_proj = noise_embedding(cfg.noise_embedding, cfg.noise_embedding_dim, cfg.noise_embedding_scale,
                                      cfg.noise_max_period)
        self.t_embedder = TimestepEmbedding(cfg.noise_embedding_dim, D)
        self.y_embedder = nn.Embedding(cfg.num_classes + 1, D) if cfg.num_classes else None
        cross = cfg.text_dim if cfg.text_mode == "cross" else 0
        self.text_embedder = nn.Linear(cfg.text_dim, D) if cfg.text_dim and cfg.text_mode == "in_context" else None
        self.blocks = nn.ModuleList([DiTBlock(D, cfg.num_heads, cfg.mlp_ratio, cross, cfg.dropout) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, cfg.patch_size, cfg.out_channels)
        init_weights(self)
        if cfg.pos_embed == "learned":
            with torch.no_grad():
                nn.init.normal_(self.pos_embed, std=0.02)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, S, S]."""
        B, p, g, C = x.shape[0], self.config.patch_size, self.config.grid_size, self.config.out_channels
        x = x.reshape(B, g, g, p, p, C)  # [B, gh, gw, p, p, C]
        x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, gh, p, gw, p]
        return x.reshape(B, C, g * p, g * p)  # [B, C, S, S]

    def forward(self, x_in: torch.Tensor, c_noise: torch.Tensor, cond: Any = None) -> torch.Tensor:
        cfg = self.config
        want = (cfg.in_channels, cfg.image_size, cfg.image_size)
        if x_in.ndim != 4 or tuple(x_in.shape[1:]) != want:
            raise ValueError(f"x_in must be [B, {', '.join(map(str, want))}], got {tuple(x_in.shape)}")
        c = parse_cond(cond, x_in, num_classes=cfg.num_classes, text_dim=cfg.text_dim, concat_channels=cfg.concat_channels)
        c_noise = check_c_noise(c_noise, x_in)

        # inputs in the network's own dtype (float64 from a preconditioner, or a bf16 model)
        dtype = self.x_embedder.proj.weight.dtype
        text = None if c.text is None else c.text.to(dtype)

        # conditioning vector
        cvec = self.t_embedder(self.t_proj(c_noise).to(dtype))  # [B, D]
        if self.y_embedder is not None:
            cvec = cvec + self.y_embedder(c.class_labels)  # [B, D]

        # tokens
        x = x_in if c.concat is None else torch.cat([x_in, c.concat.to(x_in.dtype)], dim=1)  # [B, C_in + Cc, S, S]
        h = self.x_embedder(x.to(dtype)) + self.pos_embed.to(dtype)  # [B, N, D]
        N = h.shape[1]
        self_mask = context = context_mask = None
        if text is not None and self.text_embedder is not None:
            tokens = self.text_embedder(text)  # [B, L, D]
            h = torch.cat([h, tokens.to(h.dtype)], dim=1)  # [B, N + L, D]
            if c.text_mask is not None:
                image_mask = torch.ones(h.shape[0], N, dtype=torch.bool, device=h.device)
                self_mask = torch.cat([image_mask, c.text_mask], dim=1)  # [B, N + L]
        elif text is not None:
            context, context_mask = text, c.text_mask

        for block in self.blocks:
            h = block(h, cvec, self_mask, context, context_mask)  # [B, N (+ L), D]
        h = self.final_layer(h[:, :N], cvec)  # [B, N, p*p*C_out]
        return self.unpatchify(h)  # [B, C_out, S, S]


# ----------------------------------------------------------------------------- presets

DIT_PRESETS: dict[str, DiTConfig] = {
    # unit tests, 16x16 input
    "tiny": DiTConfig(image_size=16, patch_size=2, hidden_size=64, depth=2, num_heads=2),
    # 32x32 pixel models on CPU
    "small": DiTConfig(image_size=32, patch_size=2, hidden_size=256, depth=8, num_heads=4),
    # DiT-S/2 widths (Peebles & Xie 2023, Table 1) at 32x32
    "S": DiTConfig(image_size=32, patch_size=2, hidden_size=384, depth=12, num_heads=6),
    # DiT-B/2 widths at 32x32 (GPU)
    "B": DiTConfig(image_size=32, patch_size=2, hidden_size=768, depth=12, num_heads=12),
}

__all__ = ["DiTConfig", "DiT", "DIT_PRESETS", "DiTBlock", "FinalLayer", "sincos_pos_embed_2d"]
