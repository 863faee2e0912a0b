"""Single-file SD 1.x/2.x checkpoints <-> diffusers parts (diffuse.convert.ldm), checked against diffusers' own
single-file converters as the independent reference for the layout, and family detection on synthetic key sets."""

from __future__ import annotations

import functools
import os
from typing import Iterator, Mapping

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
sfu = pytest.importorskip("diffusers.loaders.single_file_utils")

from diffuse.convert.errors import UnsupportedModel  # noqa: E402
from diffuse.convert.ldm import detect_family, diffusers_to_ldm, ldm_to_diffusers, scheduler_config_from_ldm  # noqa: E402
from diffuse.schedules import betas_cosine, betas_linear, betas_scaled_linear  # noqa: E402

UNET_FIXED = dict(mid_block_type="UNetMidBlock2DCrossAttn", act_fn="silu", norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True,
                  freq_shift=0, center_input_sample=False, downsample_padding=1, mid_block_scale_factor=1)
# SD 1-like: 8 heads, 1x1-conv projections, attention on the upper levels; SD 2-like: 64-channel heads, linear
# projections, two transformer blocks per attention (latent-diffusion's transformer_depth)
UNETS = {
    "sd1": dict(_class_name="UNet2DConditionModel", in_channels=4, out_channels=4, block_out_channels=[32, 64, 64],
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=2,
                transformer_layers_per_block=1, cross_attention_dim=64, attention_head_dim=8, use_linear_projection=False,
                **UNET_FIXED),
    "sd2": dict(_class_name="UNet2DConditionModel", in_channels=4, out_channels=4, block_out_channels=[64, 128],
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
                layers_per_block=1, transformer_layers_per_block=2, cross_attention_dim=128, attention_head_dim=[1, 2],
                use_linear_projection=True, **UNET_FIXED),
}
VAE = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, block_out_channels=[32, 64],
           down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1,
           latent_channels=4, act_fn="silu", norm_num_groups=32, scaling_factor=0.18215)
TEXTS = {
    family: dict(architectures=["CLIPTextModel"], model_type="clip_text_model", vocab_size=1000, hidden_size=width,
                 intermediate_size=2 * width, num_hidden_layers=2, num_attention_heads=width // 64, max_position_embeddings=16,
                 hidden_act=act, layer_norm_eps=1e-5)
    for family, width, act in (("sd1", 64, "quick_gelu"), ("sd2", 128, "gelu"))
}


def _kwargs(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def _randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Every parameter random, so that a swapped pair of tensors (two norms, q and k) cannot go unnoticed."""
    with torch.no_grad():
        for p in module.parameters():
            p.normal_()
    return module


def _models(family: str, in_channels: int = 4):
    torch.manual_seed(0)
    unet_config = dict(UNETS[family], in_channels=in_channels)
    unet = _randomized(diffusers.UNet2DConditionModel(**_kwargs(unet_config)))
    vae = _randomized(diffusers.AutoencoderKL(**_kwargs(VAE)))
    text = _randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(**_kwargs(TEXTS[family]), bos_token_id=0, eos_token_id=2)))
    return (unet_config, unet), (VAE, vae), (TEXTS[family], text)


@functools.lru_cache(maxsize=None)
def _parts(family: str, in_channels: int = 4) -> dict:
    """Tiny random diffusers parts (cached: callers build new dicts rather than change them)."""
    (uc, unet), (vc, vae), (tc, text) = _models(family, in_channels)
    text_state = {"text_model." + k: v for k, v in text.state_dict().items()}  # the Hub's names
    return {"unet": (uc, unet.state_dict()), "vae": (vc, vae.state_dict()), "text_encoder": (tc, text_state)}


def _assert_same_state(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape and torch.equal(got[k], want[k]), k


def _assert_same_parts(got: dict, want: dict) -> None:
    assert set(got) == set(want) == {"unet", "vae", "text_encoder"}
    for name in want:
        assert got[name][0] == want[name][0], name
        _assert_same_state(got[name][1], want[name][1])


def _shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def _raises(match: str, fn, *args) -> str:
    with pytest.raises(UnsupportedModel, match=match) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module", params=["sd1", "sd2"])
def family(request) -> str:
    return request.param


@functools.lru_cache(maxsize=None)
def _single(family: str) -> dict[str, torch.Tensor]:
    return diffusers_to_ldm(_parts(family), family)


@pytest.fixture
def parts(family) -> dict:
    return _parts(family)


@pytest.fixture
def single(family) -> dict[str, torch.Tensor]:
    return _single(family)


# ---------------------------------------------------------------- the layout is the real one

def test_diffusers_reads_the_written_file(parts, family, single):
    """diffusers' own single-file converters turn the file back into the very state dicts it was written from."""
    (unet_config, unet), (vae_config, vae), (text_config, text) = parts["unet"], parts["vae"], parts["text_encoder"]
    _assert_same_state(sfu.convert_ldm_unet_checkpoint(single, unet_config), unet)
    _assert_same_state(sfu.convert_ldm_vae_checkpoint(single, vae_config), vae)
    if family == "sd1":
        got = sfu.convert_ldm_clip_checkpoint(single)
    else:
        model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_kwargs(text_config)))
        got = sfu.convert_open_clip_checkpoint(model, single)
    _assert_same_state(got, text)
    assert detect_family(_shapes(single)) == family


def test_round_trip(parts, family, single):
    """file -> parts gives back the configs and tensors the file was written from, and the configs rebuild the
    same diffusers / transformers models, which load the states strictly."""
    back = ldm_to_diffusers(single, family)
    _assert_same_parts(back, parts)
    (_, unet), (_, vae), (_, text) = _models(family)
    (unet_config, unet_state), (vae_config, vae_state), (text_config, text_state) = back["unet"], back["vae"], back["text_encoder"]
    for cls, config, state, model in ((diffusers.UNet2DConditionModel, unet_config, unet_state, unet),
                                      (diffusers.AutoencoderKL, vae_config, vae_state, vae)):
        rebuilt = cls(**_kwargs(config))
        assert dict(rebuilt.config) == dict(model.config)
        rebuilt.load_state_dict(state, strict=True)
    rebuilt = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_kwargs(text_config), bos_token_id=0, eos_token_id=2))
    assert rebuilt.config.to_diff_dict() == text.config.to_diff_dict()
    rebuilt.load_state_dict({k.removeprefix("text_model."): v for k, v in text_state.items()}, strict=True)


def test_inpainting_unet_has_nine_input_channels():
    parts = _parts("sd1", in_channels=9)
    single = diffusers_to_ldm(parts, "sd1")
    assert single["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == 9
    back = ldm_to_diffusers(single, "sd1")
    assert back["unet"][0]["in_channels"] == 9
    _assert_same_parts(back, parts)


def test_text_encoder_without_text_model_prefix(parts, family, single):
    """transformers >= 5.6 names CLIPTextModel tensors without ``text_model.``; both spellings export alike."""
    config, state = parts["text_encoder"]
    bare = dict(parts, text_encoder=(config, {k.removeprefix("text_model."): v for k, v in state.items()}))
    _assert_same_state(diffusers_to_ldm(bare, family), single)


def test_old_transformers_sd1_layout():
    """SD 1 files saved with old transformers lack ``text_model.`` under cond_stage_model.transformer."""
    prefix = "cond_stage_model.transformer."
    old = {k.replace(prefix + "text_model.", prefix): v for k, v in _single("sd1").items()}
    assert detect_family(_shapes(old)) == "sd1"
    _assert_same_parts(ldm_to_diffusers(old, "sd1"), _parts("sd1"))


def test_sd2_whole_openclip_tower_reads_penultimate():
    """A Stability SD 2 file holds the whole OpenCLIP tower (with text_projection and logit_scale); SD 2 reads the
    penultimate layer, so its last block is dropped, as diffusers' converted SD 2 pipelines do."""
    parts, single = _parts("sd2"), _single("sd2")
    tower = "cond_stage_model.model."
    last = {k.replace("resblocks.1.", "resblocks.2."): torch.randn_like(v) for k, v in single.items() if ".resblocks.1." in k}
    width = parts["text_encoder"][0]["hidden_size"]
    whole = {**single, **last, tower + "text_projection": torch.randn(width, 32), tower + "logit_scale": torch.tensor(4.6)}
    back = ldm_to_diffusers(whole, "sd2")
    _assert_same_parts(back, parts)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**_kwargs(back["text_encoder"][0])))
    reference = sfu.convert_open_clip_checkpoint(model, whole)  # keeps block 2: it drops a hard-coded block 23 only
    dropped = {k for k in reference if ".layers.2." in k}
    assert len(dropped) == 2 * (4 + 2 + 2)  # weight and bias of q, k, v, out, two norms, two MLP layers
    _assert_same_state({k: v for k, v in reference.items() if k not in dropped}, back["text_encoder"][1])


# the structural entries of the Hub's SD 1.5 and SD 2.1 unet/config.json, text_encoder/config.json
SD_UNET = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, transformer_layers_per_block=1, in_channels=4,
               down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"], up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3)
REAL = {
    "sd1": (dict(SD_UNET, cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False),
            dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")),
    "sd2": (dict(SD_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True),
            dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu")),
}


def test_real_sizes_on_the_meta_device(family):
    """Full-size SD 1.5 / 2.1 models (meta tensors, no memory): diffusers' own model-type sniffing calls the written
    file v1 / v2, and the configs read back are the Hub's. An SD 2 file with the whole 24-block OpenCLIP tower
    reads as diffusers' loader reads it (which drops a hard-coded resblocks.23)."""
    unet_config, text_config = REAL[family]
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**unet_config)
        vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                      down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        text = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_config, vocab_size=49408, max_position_embeddings=77))
    text_state = {"text_model." + k: v for k, v in text.state_dict().items()}
    parts = {"unet": (dict(unet.config), unet.state_dict()), "vae": (dict(vae.config), vae.state_dict()),
             "text_encoder": (text.config.to_dict(), text_state)}
    single = diffusers_to_ldm(parts, family)
    assert sfu.infer_diffusers_model_type(single) == {"sd1": "v1", "sd2": "v2"}[family]
    assert detect_family(_shapes(single)) == family
    back = ldm_to_diffusers(single, family)
    assert {k: back["unet"][0][k] for k in unet_config} == unet_config
    assert {k: back["text_encoder"][0][k] for k in text_config} == text_config
    assert back["vae"][0]["block_out_channels"] == [128, 256, 512, 512] and back["vae"][0]["latent_channels"] == 4
    if family == "sd2":
        tower = "cond_stage_model.model."
        last = {k.replace(".resblocks.22.", ".resblocks.23."): v for k, v in single.items() if ".resblocks.22." in k}
        whole = {**single, **last, tower + "text_projection": torch.empty(1024, 1024, device="meta")}
        ours = ldm_to_diffusers(whole, family)["text_encoder"][1]
        assert set(ours) == set(sfu.convert_open_clip_checkpoint(text, whole)) == set(text_state)


class _Lazy(Mapping):
    """A mapping that records which tensors were read, like a lazily opened safetensors file."""

    def __init__(self, state: dict):
        self.state, self.read = state, set()

    def __getitem__(self, key: str) -> torch.Tensor:
        self.read.add(key)
        return self.state[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.state)

    def __len__(self) -> int:
        return len(self.state)


def test_extra_keys_are_ignored_and_not_read(parts, family, single):
    extra = {"model_ema.decay": torch.tensor(0.9999), "model_ema.diffusion_modelinput_blocks00weight": torch.randn(3),
             "betas": torch.rand(10), "alphas_cumprod": torch.rand(10), "logvar": torch.zeros(10),
             "first_stage_model.loss.logvar": torch.zeros(())}
    if family == "sd1":
        extra["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(16)[None]
    lazy = _Lazy({**single, **extra})
    _assert_same_parts(ldm_to_diffusers(lazy, family), parts)
    assert not lazy.read & set(extra)
    assert detect_family(_shapes(lazy.state)) == family


@pytest.mark.parametrize("table, want", [
    (betas_scaled_linear(1000), {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    (betas_linear(1000), {"beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}),
])
def test_scheduler_config_names_the_stored_table(table, want):
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):  # SD's float32 buffers, half files
        assert scheduler_config_from_ldm({"betas": table.to(dtype)}) == {"num_train_timesteps": 1000, **want}, dtype
    for dtype in (torch.float64, torch.float32):
        abar = torch.cumprod(1 - table, 0).to(dtype)
        assert scheduler_config_from_ldm({"alphas_cumprod": abar}) == {"num_train_timesteps": 1000, **want}, dtype
    other = scheduler_config_from_ldm({"betas": betas_scaled_linear(1000, 0.00085, 0.0125).half()})
    assert other == {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.0125}


def test_scheduler_config_other_table_and_none():
    betas = betas_cosine(100)
    got = scheduler_config_from_ldm({"betas": betas})
    assert got == {"num_train_timesteps": 100, "trained_betas": betas.tolist()}
    assert scheduler_config_from_ldm({"model.diffusion_model.out.2.bias": torch.zeros(4)}) is None


# ---------------------------------------------------------------- refusals

def test_missing_and_unknown_keys(family, single):
    gone = dict(single)
    key = next(k for k in single if k.endswith("out_layers.3.weight") and "output_blocks.1." in k)
    del gone[key]
    assert key in _raises("U-Net: the single file lacks", ldm_to_diffusers, gone, family)
    text = "cond_stage_model.transformer.text_model." if family == "sd1" else "cond_stage_model.model."
    _raises("text encoder: the single file lacks", ldm_to_diffusers, {k: v for k, v in single.items() if not k.startswith(text)}, family)
    _raises("VAE: the single file lacks", ldm_to_diffusers, {k: v for k, v in single.items() if "mid.attn_1.q." not in k}, family)
    odd = dict(single, **{"model.diffusion_model.input_blocks.1.2.weight": torch.zeros(1)})
    assert "input_blocks.1.2.weight" in _raises("U-Net: the single file has", ldm_to_diffusers, odd, family)
    _raises("unknown model family 'sdxl'", ldm_to_diffusers, single, "sdxl")


@pytest.mark.parametrize("part, change, match", [
    ("unet", {"attention_head_dim": 4}, "attention_head_dim=4 cannot be written to an SD 1.x single file, which implies 8"),
    ("unet", {"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
    ("unet", {"norm_num_groups": 16}, "norm_num_groups=16"),
    ("unet", {"layers_per_block": [2, 1, 2]}, "layers_per_block=.* varies per level"),
    ("vae", {"shift_factor": 0.1}, "shift_factor=0.1"),
    ("vae", {"mid_block_add_attention": False}, "mid_block_add_attention=False"),
    ("text_encoder", {"hidden_act": "gelu"}, "hidden_act='gelu' cannot be written to an SD 1.x single file, which implies 'quick_gelu'"),
    ("text_encoder", {"num_attention_heads": 2}, "num_attention_heads=2"),
])
def test_export_refuses_what_the_file_cannot_carry(change, part, match):
    parts = _parts("sd1")
    config, state = parts[part]
    _raises(match, diffusers_to_ldm, dict(parts, **{part: (dict(config, **change), state)}), "sd1")


def test_export_refuses_unmapped_tensors_and_accepts_neutral_options():
    parts, single = _parts("sd1"), _single("sd1")
    config, state = parts["unet"]
    _raises("U-Net: class_embedding.weight has no place", diffusers_to_ldm,
            dict(parts, unet=(config, dict(state, **{"class_embedding.weight": torch.zeros(1)}))), "sd1")
    neutral = dict(config, sample_size=64, upcast_attention=True, class_embed_type=None, attention_head_dim=[8, 8, 8],
                   only_cross_attention=[False] * 3, block_out_channels=(32, 64, 64))
    _assert_same_state(diffusers_to_ldm(dict(parts, unet=(neutral, state)), "sd1"), single)
    _raises("the diffusers parts lack vae", diffusers_to_ldm, {"unet": parts["unet"], "text_encoder": parts["text_encoder"]}, "sd1")


def test_latent_scale_other_than_sd_is_stored_as_scale_factor():
    config, state = _parts("sd1")["vae"]
    parts = dict(_parts("sd1"), vae=(dict(config, scaling_factor=0.123456789), state))
    single = diffusers_to_ldm(parts, "sd1")
    assert float(single["scale_factor"]) == 0.123456789
    _assert_same_parts(ldm_to_diffusers(single, "sd1"), parts)
    assert "scale_factor" not in _single("sd1")
    float32 = ldm_to_diffusers(dict(_single("sd1"), scale_factor=torch.tensor(0.3)), "sd1")  # as latent-diffusion keeps it
    assert float32["vae"][0]["scaling_factor"] == 0.3


# ---------------------------------------------------------------- family detection

UNET_KEYS = {"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}


def _to_k(width: int) -> dict[str, tuple[int, ...]]:
    return {**UNET_KEYS, "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, width)}


_LORA = "lora_unet_down_blocks_0_attentions_0_proj_in"
_CLIP_L = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
_OPENCLIP_H = "cond_stage_model.model.token_embedding.weight"
FOREIGN = [  # (what the message must say, the file's key -> shape)
    ("SDXL base checkpoint; diffuse runs SD 1.x and 2.x", {
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280), **_to_k(2048)}),
    ("SDXL refiner", {"conditioner.embedders.0.model.text_projection": (1280, 1280), **_to_k(1280)}),
    ("SDXL checkpoint \\(U-Net only\\)", {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816), **_to_k(2048)}),
    ("diffusers-format SDXL UNet", {"add_embedding.linear_1.weight": (1280, 2816), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}),
    ("SD3/SD3.5", {"model.diffusion_model.joint_blocks.0.context_block.adaLN_modulation.1.bias": (9216,),
                   "model.diffusion_model.context_embedder.weight": (1536, 4096)}),
    ("Flux", {"double_blocks.0.img_attn.norm.key_norm.scale": (128,), "single_blocks.0.linear1.weight": (21504, 3072)}),
    ("Flux", {"context_embedder.weight": (3072, 4096), "single_transformer_blocks.0.proj_out.weight": (3072, 15360)}),
    ("Stable Cascade", {"down_blocks.1.0.channelwise.0.weight": (2560, 640), "clip_txt_mapper.weight": (8192, 1280)}),
    ("PixArt", {"x_embedder.proj.weight": (1152, 4, 2, 2), "t_block.1.weight": (6912, 1152), "y_embedder.y_proj.fc1.weight": (1152, 4096)}),
    ("ControlNet", {"control_model.input_hint_block.0.weight": (16, 3, 3, 3), "control_model.time_embed.0.weight": (1280, 320)}),
    ("LoRA", {f"{_LORA}.lora_down.weight": (4, 320), f"{_LORA}.lora_up.weight": (320, 4), f"{_LORA}.alpha": ()}),
    ("LoRA", {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 320)}),
    ("textual-inversion embedding", {"emb_params": (2, 768)}),
    ("textual-inversion embedding", {"string_to_param.*": (1, 768), "string_to_token.*": (77,)}),
    ("textual-inversion embedding", {"clip_l": (2, 768), "clip_g": (2, 1280)}),
    ("standalone VAE", {"encoder.conv_in.weight": (128, 3, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3),
                        "quant_conv.weight": (8, 8, 1, 1), "post_quant_conv.weight": (4, 4, 1, 1)}),
    ("standalone VAE", {"encoder.down_blocks.0.resnets.0.conv1.weight": (128, 128, 3, 3), "decoder.conv_out.weight": (3, 128, 3, 3)}),
    ("diffusers-format UNet state dict.*pass the diffusers model folder", {
        "conv_in.weight": (320, 4, 3, 3), "time_embedding.linear_1.weight": (1280, 320), "down_blocks.0.resnets.0.conv1.weight": (320, 320, 3, 3)}),
    ("transformers text-encoder", {"text_model.embeddings.token_embedding.weight": (49408, 768), "text_model.final_layer_norm.weight": (768,)}),
    ("x4 upscaler or unCLIP", {"model.diffusion_model.label_emb.weight": (1000, 1280), **_to_k(1024)}),
    ("depth-to-image", {"depth_model.model.pretrained.act_postprocess1.0.project.0.weight": (1024, 2048), **_to_k(1024)}),
    ("not a Stable Diffusion checkpoint: no model.diffusion_model", {"foo.weight": (3, 3), "bar.baz.bias": (3,)}),
    ("no tensors", {}),
    ("no middle-block cross-attention", UNET_KEYS),
    ("attends to 768-wide text features but the SD 2.x text encoder is 1024 wide", {_OPENCLIP_H: (49408, 1024), **_to_k(768)}),
    ("both a CLIP .SD 1.x. and an OpenCLIP", {_OPENCLIP_H: (49408, 768), _CLIP_L: (49408, 768), **_to_k(768)}),
    ("no text encoder and a 512-wide cross-attention", _to_k(512)),
]


@pytest.mark.parametrize("match, shapes", FOREIGN, ids=[f"{i}-{m.split()[0]}" for i, (m, _) in enumerate(FOREIGN)])
def test_detect_family_names_what_is_not_sd(match, shapes):
    _raises(match, detect_family, shapes)


@pytest.mark.parametrize("shapes, want", [
    ({_CLIP_L: (49408, 768), **_to_k(768)}, "sd1"),
    ({_OPENCLIP_H: (49408, 1024), **_to_k(1024)}, "sd2"),
    (_to_k(768), "sd1"),  # U-Net only: by the cross-attention width
    (_to_k(1024), "sd2"),
])
def test_detect_family_sd(shapes, want):
    assert detect_family(shapes) == want
