"""Backbones: shapes for every conditioning path, and numbers — zero init, invariances, SDPA parity."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffuse.nn import (DIT_PRESETS, UNET_PRESETS, DiT, DiTConfig, UNet, UNetConfig, backbone_config_from_dict,
                        backbone_kind, backbone_preset, build_backbone, config_to_dict)
from diffuse.nn.dit import sincos_pos_embed_2d
from diffuse.nn.layers import Attention, FourierEmbedding, PositionalEmbedding, ResBlock
from diffuse.nn.unet import position_features

B, S, TEXT_DIM, L = 2, 16, 24, 6


def tiny(kind: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(kind, backbone_preset(kind, "tiny", **overrides))


def perturb(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Move every parameter off its init (zero-init layers included) so outputs depend on everything."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def full_cond(num_classes: int = 0, text: bool = False, concat: int = 0, seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cond = {}
    if num_classes:
        cond["class_labels"] = torch.tensor([1, num_classes])  # second one is the null class
    if text:
        cond["text"] = torch.randn(B, L, TEXT_DIM, generator=gen)
        cond["text_mask"] = torch.tensor([[True] * 4 + [False] * 2, [True] * 2 + [False] * 4])
    if concat:
        cond["concat"] = torch.randn(B, concat, S, S, generator=gen)
    return cond


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, 3, S, S, generator=gen), torch.tensor([-1.2, 0.7])


PATHS = [dict(), dict(num_classes=5), dict(text_dim=TEXT_DIM), dict(concat_channels=2),
         dict(num_classes=5, text_dim=TEXT_DIM, concat_channels=2)]
KINDS = ["unet", "dit", "dit_in_context"]


def make(kind: str, **overrides) -> torch.nn.Module:
    if kind == "dit_in_context":
        return tiny("dit", text_mode="in_context", **overrides)
    return tiny(kind, **overrides)


def cond_for(overrides: dict, seed: int = 1) -> dict:
    return full_cond(overrides.get("num_classes", 0), bool(overrides.get("text_dim")), overrides.get("concat_channels", 0), seed)


# ----------------------------------------------------------------------------- attention


def manual_attention(attn: Attention, x, context=None, mask=None):
    context = x if context is None else context
    h, d = attn.heads, attn.dim_head
    q = attn.to_q(x).unflatten(-1, (h, d)).transpose(1, 2)
    k = attn.to_k(context).unflatten(-1, (h, d)).transpose(1, 2)
    v = attn.to_v(context).unflatten(-1, (h, d)).transpose(1, 2)
    logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # [B, h, N, L]
    if mask is not None:
        logits = logits.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = (logits.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return attn.to_out[0](out)


def test_sdpa_attention_matches_manual_softmax():
    torch.manual_seed(0)
    x, ctx = torch.randn(3, 7, 16), torch.randn(3, 5, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    self_attn, cross = Attention(16, 4, 8), Attention(16, 2, 8, context_dim=12, qkv_bias=True)
    torch.testing.assert_close(self_attn(x), manual_attention(self_attn, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(cross(x, ctx, mask), manual_attention(cross, x, ctx, mask), atol=1e-5, rtol=0)
    # a row with no real token attends to nothing: output is the out-projection bias, not NaN
    empty = torch.zeros(3, 5, dtype=torch.bool)
    out = cross(x, ctx, empty)
    torch.testing.assert_close(out, cross.to_out[0].bias.expand_as(out), atol=0, rtol=0)


def test_noise_embeddings():
    c = torch.tensor([0.0, 0.5, -1.0])
    pe = PositionalEmbedding(8)(c)
    assert pe.shape == (3, 8)
    torch.testing.assert_close(pe[0], torch.tensor([1.0] * 4 + [0.0] * 4))  # [cos, sin] at 0
    torch.testing.assert_close(pe[1, 0], torch.tensor(math.cos(0.5)))  # highest frequency is 1
    torch.testing.assert_close(PositionalEmbedding(8, scale=1000)(c), PositionalEmbedding(8)(1000 * c))
    # DDPM's variant: [sin, cos] and frequencies 10000^(-i / (half - 1)), so the last one is 1/10000
    ddpm = PositionalEmbedding(8, flip_sin_to_cos=False, freq_shift=1)(c)
    freqs = 10000.0 ** (-torch.arange(4) / 3)
    torch.testing.assert_close(ddpm, torch.cat([(c[:, None] * freqs).sin(), (c[:, None] * freqs).cos()], dim=1))
    fe1, fe2 = FourierEmbedding(8, scale=16), FourierEmbedding(8, scale=16)
    torch.testing.assert_close(fe1(c), fe2(c), atol=0, rtol=0)  # fixed seed
    assert fe1.freqs.abs().mean() > 4  # scale is the std of the frequencies
    assert "freqs" in fe1.state_dict()


# ----------------------------------------------------------------------------- backbones: numbers


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("overrides", PATHS, ids=["uncond", "class", "text", "concat", "all"])
def test_fresh_backbone_outputs_exact_zero_with_right_shape(kind, overrides):
    model = make(kind, **overrides)
    x, c_noise = inputs()
    out = model(x, c_noise, cond_for(overrides))
    assert out.shape == (B, 3, S, S)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_depend_on_each_condition_and_ignore_padded_tokens(kind):
    overrides = dict(num_classes=5, text_dim=TEXT_DIM, concat_channels=2)
    model = perturb(make(kind, **overrides)).eval()
    x, c_noise = inputs()
    cond = cond_for(overrides)
    with torch.no_grad():
        base = model(x, c_noise, cond)
        assert base.abs().mean() > 1e-3

        def changed(**updates) -> torch.Tensor:
            return model(x, c_noise, {**cond, **updates})

        # class label
        assert (changed(class_labels=torch.tensor([2, 5])) - base)[0].abs().max() > 1e-4
        # real text tokens
        text = cond["text"].clone()
        text[:, 0] += 1.0
        assert (changed(text=text) - base).abs().max() > 1e-4
        # padded text tokens: identical output
        text = cond["text"].clone()
        text[~cond["text_mask"]] = torch.randn(int((~cond["text_mask"]).sum()), TEXT_DIM) * 10
        torch.testing.assert_close(changed(text=text), base, atol=1e-6, rtol=0)
        # spatial concat and noise level
        assert (changed(concat=cond["concat"] + 1) - base).abs().max() > 1e-4
        assert (model(x, c_noise + 0.5, cond) - base).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_deterministic_and_batch_independent(kind):
    overrides = dict(num_classes=5, text_dim=TEXT_DIM)
    a, b = perturb(make(kind, **overrides)).eval(), perturb(make(kind, **overrides)).eval()
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.equal(pa, pb)
    x, c_noise = inputs()
    cond = cond_for(overrides)
    with torch.no_grad():
        out = a(x, c_noise, cond)
        assert torch.equal(out, b(x, c_noise, cond))
        # each image's output does not depend on the rest of the batch
        single = a(x[1:], c_noise[1:], {k: v[1:] for k, v in cond.items()})
    torch.testing.assert_close(single, out[1:], atol=1e-5, rtol=1e-5)


def test_unet_variants_and_sizes():
    # SD-style additive time embedding, head_dim instead of num_heads, fourier noise embedding
    model = perturb(tiny("unet", time_embedding="add", num_heads=0, head_dim=8, noise_embedding="fourier",
                         noise_embedding_scale=16.0, transformer_depth=2)).eval()
    assert model.down_blocks[1].attentions[0].transformer_blocks[1].attn1.heads == 48 // 8
    x = torch.randn(1, 3, 24, 40)  # any size divisible by 2^(levels-1)
    with torch.no_grad():
        out = model(x, torch.tensor([0.3]))
    assert out.shape == (1, 3, 24, 40) and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="divisible by 2"):
        model(torch.randn(1, 3, 15, 16), torch.tensor([0.3]))
    block = ResBlock(8, 8, emb_dim=4, groups=4, time_embedding="add")
    assert block.time_emb_proj.out_features == 8
    assert ResBlock(8, 8, emb_dim=4, groups=4).time_emb_proj.out_features == 16


def test_unet_module_tree_follows_diffusers_names():
    keys = set(tiny("unet", num_classes=3, text_dim=TEXT_DIM).state_dict())
    for key in ["conv_in.weight", "time_embedding.linear_1.weight", "time_embedding.linear_2.bias",
                "class_embedding.weight", "down_blocks.0.resnets.0.conv1.weight",
                "down_blocks.0.resnets.0.time_emb_proj.weight", "down_blocks.0.downsamplers.0.conv.weight",
                "down_blocks.1.attentions.0.proj_in.weight", "down_blocks.1.attentions.0.norm.weight",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0.bias",
                "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
                "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2.weight",
                "down_blocks.1.attentions.0.transformer_blocks.0.norm3.weight",
                "down_blocks.1.attentions.0.proj_out.weight", "down_blocks.1.resnets.0.conv_shortcut.weight",
                "mid_block.resnets.1.conv2.weight", "mid_block.attentions.0.proj_out.bias",
                "up_blocks.0.resnets.1.conv_shortcut.weight", "up_blocks.0.upsamplers.0.conv.weight",
                "up_blocks.1.resnets.1.norm1.weight", "conv_norm_out.weight", "conv_out.weight"]:
        assert key in keys, key
    # the text key width is the text_dim (diffusers' cross_attention_dim)
    model = tiny("unet", text_dim=TEXT_DIM)
    assert model.mid_block.attentions[0].transformer_blocks[0].attn2.to_k.in_features == TEXT_DIM
    assert len(model.up_blocks[0].resnets) == UNET_PRESETS["tiny"].num_res_blocks + 1


def test_unet_position_features_are_sincos_of_normalized_cell_centres():
    pe = position_features(2, 4)  # 2 rows, 4 columns: u in (-3/4, -1/4, 1/4, 3/4), v in (-1/2, 1/2)
    assert pe.shape == (8, 16)
    token = 1 * 4 + 2  # row 1, column 2: u = 1/4, v = 1/2
    freqs = (math.pi / 2) * torch.tensor([1.0, 2.0, 4.0, 8.0])
    want = torch.cat([(0.25 * freqs).sin(), (0.25 * freqs).cos(), (0.5 * freqs).sin(), (0.5 * freqs).cos()])
    torch.testing.assert_close(pe[token], want)
    # a cell means the same place at every size: the centre of a 1x1 map and the lowest frequency's sign
    torch.testing.assert_close(position_features(1, 1)[0], torch.cat([torch.zeros(4), torch.ones(4)] * 2))
    u_sin = position_features(8, 8)[:, 0].reshape(8, 8)  # sin((pi/2) u): rises left to right, equal down a column
    assert (u_sin.diff(dim=1) > 0).all() and (u_sin.diff(dim=0) == 0).all()


def test_zero_initialized_position_embedding_starts_as_the_network_without_it():
    plain = perturb(tiny("unet", text_dim=TEXT_DIM)).eval()
    placed = tiny("unet", text_dim=TEXT_DIM, position_embedding="sincos").eval()
    missing, unexpected = placed.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and missing and all(".pos_proj." in k for k in missing)
    assert len(missing) == 2 * (1 + 2 + 1)  # weight and bias in each transformer: 1 down, 2 up at 8x8, 1 mid
    x, c_noise = inputs()
    cond = full_cond(text=True)
    with torch.no_grad():
        torch.testing.assert_close(placed(x, c_noise, cond), plain(x, c_noise, cond), rtol=0, atol=0)
        placed.mid_block.attentions[0].pos_proj.weight.normal_()
        assert (placed(x, c_noise, cond) - plain(x, c_noise, cond)).abs().max() > 1e-3


def test_dit_patchify_roundtrip_and_position_embedding():
    model = tiny("dit")
    cfg = model.config
    p, g = cfg.patch_size, cfg.grid_size
    x = torch.randn(B, 3, S, S)
    tokens = x.reshape(B, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B, g * g, p * p * 3)
    assert torch.equal(model.unpatchify(tokens), x)
    pe = sincos_pos_embed_2d(64, 4)
    assert pe.shape == (16, 64)
    assert torch.cdist(pe, pe).add(torch.eye(16) * 100).min() > 0.1  # every position distinct
    torch.testing.assert_close(pe[0], torch.tensor([0.0] * 16 + [1.0] * 16 + [0.0] * 16 + [1.0] * 16))
    learned = tiny("dit", pos_embed="learned")
    assert learned.pos_embed.requires_grad and "pos_embed" in learned.state_dict()
    assert "pos_embed" not in model.state_dict()  # fixed sincos is recomputed, not stored


# ----------------------------------------------------------------------------- checks and config


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_backbones_reject_wrong_conditions(kind):
    x, c_noise = inputs()
    plain, cls = tiny(kind), tiny(kind, num_classes=5)
    text, concat = tiny(kind, text_dim=TEXT_DIM), tiny(kind, concat_channels=2)
    cases = [
        (plain, {"class_labels": torch.tensor([0, 1])}, "num_classes=0"),
        (plain, {"text": torch.randn(B, L, TEXT_DIM)}, "text_dim=0"),
        (plain, {"concat": torch.randn(B, 2, S, S)}, "concat_channels=0"),
        (plain, {"labels": torch.tensor([0, 1])}, "unknown cond key"),
        (cls, None, r"class_labels'\] is missing"),
        (cls, {"class_labels": torch.tensor([0, 6])}, r"\[0, 5\]"),
        (cls, {"class_labels": torch.tensor([0.0, 1.0])}, "LongTensor"),
        (text, {}, r"'text'\] is missing"),
        (text, {"text": torch.randn(B, L, TEXT_DIM + 1)}, "text must be"),
        (text, {"text": torch.randn(B, L, TEXT_DIM), "text_mask": torch.ones(B, L)}, "BoolTensor"),
        (concat, None, "needs cond\\['concat'\\]"),
        (concat, {"concat": torch.randn(B, 2, S // 2, S // 2)}, "concat must have shape"),
    ]
    for model, cond, match in cases:
        with pytest.raises(ValueError, match=match):
            model(x, c_noise, cond)
    with pytest.raises(ValueError, match="x_in must be"):
        plain(torch.randn(B, 4, S, S), c_noise)
    with pytest.raises(ValueError, match="c_noise"):
        plain(x, torch.zeros(3))


def test_config_validation():
    with pytest.raises(ValueError, match="attention resolution 12"):
        UNetConfig(image_size=32, attention_resolutions=(12,))
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNetConfig(num_heads=4, head_dim=8)
    with pytest.raises(ValueError, match="norm_groups"):
        UNetConfig(model_channels=48, norm_groups=32)
    with pytest.raises(ValueError, match="attention='plain' has no cross-attention"):
        UNetConfig(attention="plain", text_dim=8)
    with pytest.raises(ValueError, match="unknown attention"):
        UNetConfig(attention="linear")
    with pytest.raises(ValueError, match="downsample_padding"):
        UNetConfig(downsample_padding=2)
    with pytest.raises(ValueError, match="positional"):
        UNetConfig(noise_embedding="fourier", freq_shift=1)
    with pytest.raises(ValueError, match="unknown position_embedding"):
        UNetConfig(position_embedding="learned")
    with pytest.raises(ValueError, match="plain attention has none"):
        UNetConfig(attention="plain", position_embedding="sincos")
    with pytest.raises(ValueError, match="patch_size"):
        DiTConfig(image_size=30, patch_size=4)
    with pytest.raises(ValueError, match="text_mode"):
        DiTConfig(text_mode="prefix")


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_config_json_roundtrip_rebuilds_the_same_network(kind):
    cfg = backbone_preset(kind, "tiny", num_classes=4, text_dim=8)
    data = json.loads(json.dumps(config_to_dict(cfg)))
    assert backbone_config_from_dict(kind, data) == cfg
    a = perturb(build_backbone(kind, cfg)).eval()
    b = build_backbone(kind, data)
    b.load_state_dict(a.state_dict(), strict=True)
    assert backbone_kind(b) == kind and backbone_kind(cfg) == kind
    x, c_noise = inputs()
    cond = {"class_labels": torch.tensor([0, 4]), "text": torch.randn(B, 3, 8)}
    with torch.no_grad():
        assert torch.equal(a(x, c_noise, cond), b(x, c_noise, cond))
    with pytest.raises(ValueError, match="'chanel_mult'"):
        build_backbone(kind, {**data, "chanel_mult": [1]})
    with pytest.raises(ValueError, match="unknown backbone kind"):
        build_backbone("resnet", data)
    with pytest.raises(ValueError, match="unknown .* preset"):
        backbone_preset(kind, "huge")


def test_preset_sizes():
    def count(model: torch.nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    with torch.device("meta"):
        unet_tiny, unet_small = UNet(UNET_PRESETS["tiny"]), UNet(UNET_PRESETS["small"])
        dit_tiny, dit_small = DiT(DIT_PRESETS["tiny"]), DiT(DIT_PRESETS["small"])
    assert count(unet_tiny) < 1_000_000
    assert 5_000_000 < count(unet_small) < 15_000_000
    assert count(dit_tiny) < 1_000_000
    assert 5_000_000 < count(dit_small) < 15_000_000


# ----------------------------------------------------------------------------- training precision


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_backward_under_bf16_autocast_on_cpu(kind):
    model = perturb(tiny(kind, num_classes=3, text_dim=TEXT_DIM), std=0.02)
    x, c_noise = inputs()
    cond = {"class_labels": torch.tensor([0, 3]), **{k: v for k, v in full_cond(text=True).items()}}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, c_noise, cond)
        loss = F.mse_loss(out.float(), x)
    assert out.dtype == torch.bfloat16
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
    # fresh (zero-init) model: the output layer still gets a gradient, so training can start
    fresh = tiny(kind)
    F.mse_loss(fresh(x, c_noise), x).backward()
    last = fresh.conv_out.weight if kind == "unet" else fresh.final_layer.linear.weight
    assert last.grad.abs().sum() > 0


def test_dataclass_replace_keeps_tuples():
    cfg = dataclasses.replace(UNET_PRESETS["tiny"], channel_mult=[1, 2], attention_resolutions=[8])
    assert cfg.channel_mult == (1, 2) and cfg.attention_resolutions == (8,)
    assert hash(cfg) == hash(UNET_PRESETS["tiny"])


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_input_dtype_follows_the_network(kind):
    model = perturb(tiny(kind, text_dim=TEXT_DIM)).eval()
    x, c_noise = inputs()
    cond = full_cond(text=True)
    with torch.no_grad():
        ref = model(x, c_noise, cond)
        # a float64 preconditioner feeds float64; the float32 network computes in float32
        out64 = model(x.double(), c_noise.double(), {k: v.double() if v.is_floating_point() else v for k, v in cond.items()})
        assert out64.dtype == torch.float32 and torch.equal(out64, ref)
        # a bf16 network takes float32 inputs
        out_bf16 = model.to(torch.bfloat16)(x, c_noise, cond)
    assert out_bf16.dtype == torch.bfloat16
    assert (out_bf16.float() - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_spatial_self_attention_starts_as_identity_and_matches_a_hand_computation():
    from diffuse.nn.layers import SpatialSelfAttention, init_weights

    torch.manual_seed(0)
    block = SpatialSelfAttention(8, heads=2, groups=4)
    init_weights(block)
    x = torch.randn(2, 8, 3, 5)
    assert torch.equal(block(x), x)  # zero-initialized output projection
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.3)
    h = block.group_norm(x).flatten(2).transpose(1, 2)  # [B, 15, 8]
    q, k, v = (lin(h).view(2, 15, 2, 4).transpose(1, 2) for lin in (block.to_q, block.to_k, block.to_v))
    att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v  # scale 1/sqrt(4)
    out = block.to_out[0](att.transpose(1, 2).reshape(2, 15, 8)).transpose(1, 2).reshape(2, 8, 3, 5)
    torch.testing.assert_close(block(x), x + out, rtol=1e-5, atol=1e-5)
    block.rescale = 2.0
    torch.testing.assert_close(block(x), (x + out) / 2, rtol=1e-5, atol=1e-5)


def test_downsample_padding_zero_pads_right_and_bottom_only():
    from diffuse.nn.layers import Downsample

    torch.manual_seed(0)
    down = Downsample(3, padding=0)
    x = torch.randn(1, 3, 8, 8)
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), down.conv.weight, down.conv.bias, stride=2)
    assert down(x).shape == (1, 3, 4, 4)
    torch.testing.assert_close(down(x), expected)
    with pytest.raises(ValueError, match="padding must be 0"):
        Downsample(3, padding=2)
