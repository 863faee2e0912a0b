"""diffusers U-Nets <-> ours (diffuse.convert.unet): same outputs from mapped configs and weights, exact round trips,
real Stable Diffusion / DDPM configs, and one-line refusals naming every option we do not reproduce."""

from __future__ import annotations

import dataclasses
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

diffusers = pytest.importorskip("diffusers")

from diffuse.convert.errors import UnsupportedModel  # noqa: E402
from diffuse.convert.unet import (unet_config_from_diffusers, unet_config_to_diffusers,  # noqa: E402
                                  unet_state_from_diffusers, unet_state_to_diffusers)
from diffuse.nn.unet import UNET_PRESETS, UNet, UNetConfig  # noqa: E402

B, TOKENS = 2, 7

# SD 1.x layout: attention_head_dim = 2 heads everywhere, 1x1-conv proj_in/proj_out
SD1 = dict(_class_name="UNet2DConditionModel", sample_size=16, in_channels=4, out_channels=4,
           block_out_channels=[32, 64], layers_per_block=2, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
           up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=2, cross_attention_dim=24,
           norm_num_groups=8)
# SD 2.x layout: heads per level of constant width 16, linear projection, 2 transformer layers, plus class labels
SD2 = dict(_class_name="UNet2DConditionModel", sample_size=16, in_channels=4, out_channels=4,
           block_out_channels=[32, 64, 64], layers_per_block=1,
           down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
           up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], attention_head_dim=[2, 4, 4],
           use_linear_projection=True, upcast_attention=True, cross_attention_dim=20, transformer_layers_per_block=2,
           norm_num_groups=8, num_class_embeds=3, resnet_time_scale_shift="scale_shift")
# pixel U-Nets (UNet2DModel): attention in a down block, AdaGN, a large eps (so that it matters), a rescaled mid block
PIXEL = dict(_class_name="UNet2DModel", sample_size=16, in_channels=3, out_channels=3, block_out_channels=[16, 32],
             layers_per_block=2, down_block_types=["DownBlock2D", "AttnDownBlock2D"],
             up_block_types=["AttnUpBlock2D", "UpBlock2D"], attention_head_dim=8, norm_num_groups=8, norm_eps=1e-2,
             resnet_time_scale_shift="scale_shift", attn_norm_num_groups=8, mid_block_scale_factor=1.5)
PIXEL_CLASSES = dict(_class_name="UNet2DModel", sample_size=8, in_channels=3, out_channels=3, block_out_channels=[16, 32],
                     layers_per_block=1, down_block_types=["AttnDownBlock2D", "DownBlock2D"],
                     up_block_types=["UpBlock2D", "AttnUpBlock2D"], attention_head_dim=None, norm_num_groups=8,
                     num_class_embeds=4, dropout=0.1)
# google/ddpm-cifar10-32's options at a smaller size
CIFAR = dict(_class_name="UNet2DModel", _diffusers_version="0.0.4", act_fn="silu", sample_size=16, in_channels=3,
             out_channels=3, block_out_channels=[16, 32, 32], center_input_sample=False,
             down_block_types=["DownBlock2D", "AttnDownBlock2D", "DownBlock2D"], downsample_padding=0,
             flip_sin_to_cos=False, freq_shift=1, layers_per_block=2, mid_block_scale_factor=1, norm_eps=1e-6,
             norm_num_groups=8, time_embedding_type="positional", attention_head_dim=None,
             up_block_types=["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"])
LAYOUTS = {"sd1": SD1, "sd2": SD2, "pixel": PIXEL, "pixel_classes": PIXEL_CLASSES, "cifar": CIFAR}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter a fresh normal (weights fan-in scaled), so no zero-init or default hides a wrong mapping."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            std = p[0].numel() ** -0.5 if p.ndim > 1 else 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def build_diffusers(config: dict) -> torch.nn.Module:
    return getattr(diffusers, config["_class_name"]).from_config(config).eval()


def inputs(config: dict, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor, dict]:
    gen = torch.Generator().manual_seed(seed)
    size = config["sample_size"]
    x = torch.randn(B, config["in_channels"], size, size, generator=gen)
    t = torch.tensor([3.0, 517.5])
    cond = {}
    if config.get("cross_attention_dim"):
        cond["text"] = torch.randn(B, TOKENS, config["cross_attention_dim"], generator=gen)
        cond["text_mask"] = torch.tensor([[True] * TOKENS, [True] * 3 + [False] * (TOKENS - 3)])
    if config.get("num_class_embeds"):
        cond["class_labels"] = torch.tensor([config["num_class_embeds"] - 1, 1])
    return x, t, cond


@torch.no_grad()
def run_diffusers(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
    kwargs = {"class_labels": cond.get("class_labels")}
    if "text" in cond:
        kwargs.update(encoder_hidden_states=cond["text"], encoder_attention_mask=cond["text_mask"])
    return model(x, t, return_dict=False, **kwargs)[0]


def assert_rel_close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    err = ((ours - ref).norm() / ref.norm()).item()
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"


def converted(config: dict) -> tuple[torch.nn.Module, UNet, UNetConfig]:
    """(random-weight diffusers model, our U-Net built from the mapped config and loaded strictly, the config)."""
    theirs = randomize(build_diffusers(config))
    cfg = unet_config_from_diffusers(config)
    ours = UNet(cfg).eval()
    ours.load_state_dict(unet_state_from_diffusers(theirs.state_dict(), cfg), strict=True)
    return theirs, ours, cfg


# ----------------------------------------------------------------------------- outputs and round trips


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_converted_unet_computes_what_diffusers_computes(layout):
    config = LAYOUTS[layout]
    theirs, ours, cfg = converted(config)
    x, t, cond = inputs(config)
    ref = run_diffusers(theirs, x, t, cond)
    with torch.no_grad():
        out = ours(x, t, cond or None)  # c_noise = the diffusers timestep
    assert ref.std() > 0.1
    assert_rel_close(out, ref)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_round_trips_are_exact(layout):
    config = LAYOUTS[layout]
    theirs, ours, cfg = converted(config)
    # config: ours -> diffusers -> ours is the same config
    exported = unet_config_to_diffusers(cfg)
    assert exported["_class_name"] == config["_class_name"]
    assert unet_config_from_diffusers(exported) == cfg
    # state: ours -> diffusers gives diffusers' own tensors, loads strictly into the exported config's model
    back = unet_state_to_diffusers(ours.state_dict(), cfg)
    original = theirs.state_dict()
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in back)
    twin = build_diffusers(exported)
    twin.load_state_dict(back, strict=True)
    x, t, cond = inputs(config)
    torch.testing.assert_close(run_diffusers(twin, x, t, cond), run_diffusers(theirs, x, t, cond), rtol=1e-6, atol=1e-6)
    # ... and -> ours again is identical
    again = unet_state_from_diffusers(back, cfg)
    mine = ours.state_dict()
    assert again.keys() == mine.keys()
    assert all(torch.equal(again[k], mine[k]) for k in mine)


def test_sd1_conv_projection_is_squeezed_and_restored():
    theirs, ours, cfg = converted(SD1)
    key = "down_blocks.0.attentions.0.proj_in.weight"
    assert theirs.state_dict()[key].shape == (32, 32, 1, 1) and ours.state_dict()[key].shape == (32, 32)
    assert unet_config_to_diffusers(cfg)["use_linear_projection"] is False
    assert unet_state_to_diffusers(ours.state_dict(), cfg)[key].shape == (32, 32, 1, 1)
    assert unet_config_to_diffusers(unet_config_from_diffusers(SD2))["use_linear_projection"] is True


def test_class_embedding_gets_a_zero_null_row_and_export_refuses_a_trained_one():
    theirs, ours, cfg = converted(PIXEL_CLASSES)
    table = ours.class_embedding.weight
    assert cfg.num_classes == 4 and table.shape[0] == 5
    assert torch.equal(table[:4], theirs.class_embedding.weight) and not table[4].any()
    state = ours.state_dict()
    state["class_embedding.weight"] = state["class_embedding.weight"].clone()
    state["class_embedding.weight"][4] = 1.0
    with pytest.raises(UnsupportedModel, match="null class"):
        unet_state_to_diffusers(state, cfg)


def test_early_diffusers_attention_names_are_read():
    theirs, ours, cfg = converted(CIFAR)
    old = {}
    for key, value in theirs.state_dict().items():
        for new, name in ((".to_q.", ".query."), (".to_k.", ".key."), (".to_v.", ".value."), (".to_out.0.", ".proj_attn.")):
            key = key.replace(new, name)
        old[key] = value
    assert "mid_block.attentions.0.proj_attn.weight" in old
    mapped = unet_state_from_diffusers(old, cfg)
    assert mapped.keys() == ours.state_dict().keys()
    assert all(torch.equal(mapped[k], v) for k, v in ours.state_dict().items())


def test_state_mismatches_are_refused():
    theirs, ours, cfg = converted(SD1)
    state = dict(theirs.state_dict())
    state.pop("conv_in.bias")
    with pytest.raises(UnsupportedModel, match="lacks 1 tensors.*conv_in.bias"):
        unet_state_from_diffusers(state, cfg)
    with pytest.raises(UnsupportedModel, match="does not explain: extra.weight"):
        unet_state_from_diffusers({**theirs.state_dict(), "extra.weight": torch.zeros(1)}, cfg)
    wrong = {**theirs.state_dict(), "conv_in.weight": torch.zeros(32, 4, 1, 1)}
    with pytest.raises(UnsupportedModel, match="conv_in.weight has shape"):
        unet_state_from_diffusers(wrong, cfg)
    with pytest.raises(ValueError, match="missing conv_out.bias"):
        unet_state_to_diffusers({k: v for k, v in ours.state_dict().items() if k != "conv_out.bias"}, cfg)


# ----------------------------------------------------------------------------- real configs

SD15_CONFIG = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu", "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}
SD2_CONFIG = {**SD15_CONFIG, "_diffusers_version": "0.8.0", "attention_head_dim": [5, 10, 20, 20],
              "cross_attention_dim": 1024, "dual_cross_attention": False, "sample_size": 96, "use_linear_projection": True,
              "upcast_attention": True, "num_class_embeds": None, "only_cross_attention": False, "class_embed_type": None}
CIFAR_CONFIG = {
    "_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu", "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False, "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32, "out_channels": 3, "sample_size": 32,
    "time_embedding_type": "positional", "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}


def test_real_configs_map_to_the_expected_networks():
    sd_common = dict(in_channels=4, out_channels=4, model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                     time_embedding="add", norm_groups=32, attention="transformer")
    assert unet_config_from_diffusers(SD15_CONFIG) == UNetConfig(
        **sd_common, image_size=64, attention_resolutions=(64, 32, 16), num_heads=8, text_dim=768)
    assert unet_config_from_diffusers(SD2_CONFIG) == UNetConfig(
        **sd_common, image_size=96, attention_resolutions=(96, 48, 24), num_heads=0, head_dim=64, text_dim=1024)
    # google/ddpm-cifar10-32 has no attention_head_dim key: diffusers' default 8 is the width of a head
    assert unet_config_from_diffusers(CIFAR_CONFIG) == UNetConfig(
        in_channels=3, out_channels=3, image_size=32, model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
        attention_resolutions=(16,), num_heads=0, head_dim=8, norm_groups=32, time_embedding="add", attention="plain",
        norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1.0)
    for config in (SD15_CONFIG, SD2_CONFIG, CIFAR_CONFIG):
        cfg = unet_config_from_diffusers(config)
        assert unet_config_from_diffusers(unet_config_to_diffusers(cfg)) == cfg


# ----------------------------------------------------------------------------- refusals

REFUSED = [
    (SD1, "addition_embed_type", "text_time"), (SD1, "addition_time_embed_dim", 256), (SD1, "class_embed_type", "timestep"),
    (SD1, "encoder_hid_dim_type", "text_proj"), (SD1, "time_cond_proj_dim", 256), (SD1, "dual_cross_attention", True),
    (SD1, "only_cross_attention", [True, False]), (SD1, "mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    (SD1, "mid_block_type", None), (SD1, "center_input_sample", True), (SD1, "attention_head_dim", [2, 8]),
    (SD1, "down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    (SD1, "up_block_types", ["CrossAttnUpBlock2D", "UpBlock2D"]), (SD1, "layers_per_block", [1, 2]),
    (SD1, "cross_attention_dim", [24, 32]), (SD1, "time_embedding_type", "fourier"), (SD1, "conv_in_kernel", 1),
    (SD1, "attention_type", "gligen"), (SD1, "resnet_time_scale_shift", "spatial"), (SD1, "a_future_option", 1),
    (CIFAR, "time_embedding_type", "fourier"), (CIFAR, "center_input_sample", True), (CIFAR, "class_embed_type", "identity"),
    (CIFAR, "downsample_type", "resnet"), (CIFAR, "upsample_type", "resnet"), (CIFAR, "downsample_padding", 2),
    (CIFAR, "act_fn", "mish"), (CIFAR, "time_embedding_dim", 100), (CIFAR, "sample_size", None),
    (CIFAR, "sample_size", [16, 32]), (CIFAR, "mid_block_type", None), (CIFAR, "norm_num_groups", None),
    (CIFAR, "resnet_time_scale_shift", "scale_shift"),  # mid-block attention without GroupNorm
    (CIFAR, "attn_norm_num_groups", 4), (CIFAR, "block_out_channels", [16, 24, 32]),
    (CIFAR, "down_block_types", ["DownBlock2D", "AttnSkipDownBlock2D", "DownBlock2D"]),
]


@pytest.mark.parametrize("base, option, value", REFUSED, ids=[f"{b['_class_name']}-{o}-{v}" for b, o, v in REFUSED])
def test_unsupported_options_are_refused_by_name(base, option, value):
    with pytest.raises(UnsupportedModel) as err:
        unet_config_from_diffusers({**base, option: value})
    message = str(err.value)
    assert option in message and "\n" not in message


def test_unsupported_classes_and_exports_are_refused():
    with pytest.raises(UnsupportedModel, match="UNet3DConditionModel"):
        unet_config_from_diffusers({**SD1, "_class_name": "UNet3DConditionModel"})
    with pytest.raises(UnsupportedModel, match="text_dim=0"):
        unet_config_to_diffusers(UNET_PRESETS["tiny"])  # transformer attention without text
    fourier = UNetConfig(image_size=16, model_channels=24, channel_mult=(1, 2), attention_resolutions=(8,), num_heads=2,
                         norm_groups=8, text_dim=8, noise_embedding="fourier", noise_embedding_scale=16.0)
    with pytest.raises(UnsupportedModel, match="noise_embedding='fourier'"):
        unet_config_to_diffusers(fourier)
    placed = dataclasses.replace(fourier, noise_embedding="positional", noise_embedding_scale=1.0, position_embedding="sincos")
    with pytest.raises(UnsupportedModel, match="position_embedding='sincos'"):
        unet_config_to_diffusers(placed)
    widths = UNetConfig(image_size=16, model_channels=16, channel_mult=(1, 2), attention_resolutions=(16,), num_heads=2,
                        norm_groups=8, attention="plain")
    with pytest.raises(UnsupportedModel, match="num_heads=2"):
        unet_config_to_diffusers(widths)
