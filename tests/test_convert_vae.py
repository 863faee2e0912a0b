"""diffusers AutoencoderKL <-> our VAE: same posterior and decode as diffusers on random weights, exact round
trips of weights and config, early attention names, and one clear error per unsupported option."""

import json
import os

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
diffusers = pytest.importorskip("diffusers")

from diffuse.convert.errors import UnsupportedModel  # noqa: E402
from diffuse.convert.vae import (  # noqa: E402
    vae_config_from_diffusers, vae_config_to_diffusers, vae_state_from_diffusers, vae_state_to_diffusers)
from diffuse.nn.vae import VAE, VAEConfig  # noqa: E402

# tiny AutoencoderKLs: 3 levels with quant convs (the SD layout), 2 levels with 2 blocks and none (SD3/Flux-like),
# and one without the mid-block attention and with a latent shift
CONFIGS = {
    "sd-like": dict(block_out_channels=[8, 16, 16], layers_per_block=1, norm_num_groups=4),
    "no-quant-conv": dict(block_out_channels=[8, 16], layers_per_block=2, norm_num_groups=4, use_quant_conv=False,
                          use_post_quant_conv=False, scaling_factor=0.36, shift_factor=0.11),
    "no-mid-attention": dict(block_out_channels=[4, 8, 12], layers_per_block=1, norm_num_groups=2,
                             mid_block_add_attention=False, in_channels=1, out_channels=1),
}


def diffusers_vae(options: dict) -> "diffusers.AutoencoderKL":
    """An AutoencoderKL built from ``options`` with every parameter moved by seeded noise, so that no tensor
    keeps a value (zero bias, unit norm weight) a wrong mapping could match by chance."""
    n = len(options["block_out_channels"])
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                                    latent_channels=4, **options)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def config_json(model) -> dict:
    """The model's config as its config.json holds it."""
    return json.loads(model.to_json_string())


def relative_max_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours - reference).abs().max() / reference.abs().mean())


@pytest.mark.parametrize("name", CONFIGS)
def test_our_vae_gives_diffusers_posterior_and_decode(name):
    reference = diffusers_vae(CONFIGS[name])
    cfg, scale, shift = vae_config_from_diffusers(config_json(reference))
    assert (scale, shift) == (CONFIGS[name].get("scaling_factor", 0.18215), CONFIGS[name].get("shift_factor", 0.0))
    ours = VAE(cfg).eval()
    ours.load_state_dict(vae_state_from_diffusers(reference.state_dict(), cfg), strict=True)
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, cfg.in_channels, 8 * cfg.factor, 6 * cfg.factor, generator=g) * 2 - 1  # not square
    z = torch.randn(2, 4, 8, 6, generator=g)
    with torch.no_grad():
        theirs, mine = reference.encode(x).latent_dist, ours.encode(x)
        assert relative_max_error(mine.mean, theirs.mean) < 1e-4
        assert relative_max_error(mine.logvar, theirs.logvar) < 1e-4
        assert relative_max_error(ours.decode(z), reference.decode(z).sample) < 1e-4


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trips_are_exact(name):
    reference = diffusers_vae(CONFIGS[name])
    cfg, scale, shift = vae_config_from_diffusers(config_json(reference))
    ours = VAE(cfg)
    ours.load_state_dict(vae_state_from_diffusers(reference.state_dict(), cfg))
    state = ours.state_dict()
    exported = vae_state_to_diffusers(state, cfg)
    assert exported.keys() == reference.state_dict().keys()
    back = vae_state_from_diffusers(exported, cfg)
    assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in state)
    assert all(back[k] is state[k] for k in state)  # a rename: no tensor copied
    # the exported config builds an AutoencoderKL that takes the exported weights strictly and decodes the same
    config = vae_config_to_diffusers(cfg, scale, shift)
    assert config["_class_name"] == "AutoencoderKL"
    rebuilt = diffusers.AutoencoderKL.from_config(config).eval()
    rebuilt.load_state_dict(exported, strict=True)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(rebuilt.decode(z).sample, reference.decode(z).sample)
    assert vae_config_from_diffusers(config_json(rebuilt)) == (cfg, scale, shift)


@pytest.mark.parametrize("shift", [0.0, -0.25])
def test_config_round_trip_of_our_presets(shift):
    from diffuse.train_vae import vae_presets

    for preset in vae_presets().values():
        config = vae_config_to_diffusers(preset.vae, 0.7, shift)
        assert config["shift_factor"] == (shift or None)
        assert vae_config_from_diffusers(config) == (preset.vae, 0.7, shift)
    wide = VAEConfig(base_channels=16, channel_mult=(2, 3), norm_groups=4)  # block_out_channels [32, 48]: base 16
    assert vae_config_from_diffusers(vae_config_to_diffusers(wide, 1.0, 0.0))[0] == wide


def test_early_diffusers_attention_names_load():
    reference = diffusers_vae(CONFIGS["sd-like"])
    cfg, _, _ = vae_config_from_diffusers(config_json(reference))
    current = reference.state_dict()
    legacy = {k.replace("to_q.", "query.").replace("to_k.", "key.").replace("to_v.", "value.").replace("to_out.0.", "proj_attn."): v
              for k, v in current.items()}
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    mapped = vae_state_from_diffusers(legacy, cfg)
    assert mapped.keys() == vae_state_from_diffusers(current, cfg).keys()
    assert all(mapped[k] is current[k] for k in mapped)
    with pytest.raises(UnsupportedModel, match="hold both"):
        vae_state_from_diffusers({**current, "decoder.mid_block.attentions.0.query.bias": current["decoder.mid_block.attentions.0.to_q.bias"]}, cfg)


def test_weights_that_do_not_fit_the_config_are_refused():
    reference = diffusers_vae(CONFIGS["sd-like"])
    cfg, _, _ = vae_config_from_diffusers(config_json(reference))
    state = reference.state_dict()
    with pytest.raises(UnsupportedModel, match="lack 'quant_conv.weight'"):
        vae_state_from_diffusers({k: v for k, v in state.items() if k != "quant_conv.weight"}, cfg)
    with pytest.raises(UnsupportedModel, match="'encoder.extra.weight' has no place"):
        vae_state_from_diffusers({**state, "encoder.extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(UnsupportedModel, match=r"'encoder.conv_in.weight' has shape \(8, 3, 1, 1\)"):
        vae_state_from_diffusers({**state, "encoder.conv_in.weight": torch.zeros(8, 3, 1, 1)}, cfg)
    ours = VAE(cfg).state_dict()
    with pytest.raises(UnsupportedModel, match="'decoder.extra', which a VAE of this config does not have"):
        vae_state_to_diffusers({**ours, "decoder.extra": torch.zeros(1)}, cfg)


@pytest.mark.parametrize("option, value, match", [
    ("_class_name", "AutoencoderTiny", "AutoencoderTiny, not an AutoencoderKL"),
    ("down_block_types", ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "DownEncoderBlock2D"], "down_block_types"),
    ("up_block_types", ["UpDecoderBlock2D"] * 2, "up_block_types"),
    ("act_fn", "gelu", "act_fn='gelu'"),
    ("out_channels", 1, "out_channels=1"),
    ("latents_mean", [0.0] * 4, "latents_mean"),
    ("latents_std", [1.0] * 4, "latents_std"),
    ("use_post_quant_conv", False, "use_post_quant_conv=False"),
    ("norm_num_groups", 3, "norm_num_groups=3"),
    ("block_out_channels", [8] * 6, "factor 32"),
    ("scaling_factor", 0.0, "scaling_factor must be a positive number"),
    ("spatial_norm_dim", 4, "option 'spatial_norm_dim'"),
])
def test_unsupported_options_are_named(option, value, match):
    config = config_json(diffusers_vae(CONFIGS["sd-like"]))
    if option == "block_out_channels":
        config["down_block_types"], config["up_block_types"] = ["DownEncoderBlock2D"] * 6, ["UpDecoderBlock2D"] * 6
    with pytest.raises(UnsupportedModel, match=match) as info:
        vae_config_from_diffusers({**config, option: value})
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_ignored_options_change_nothing():
    config = config_json(diffusers_vae(CONFIGS["sd-like"]))
    plain = vae_config_from_diffusers(config)
    assert vae_config_from_diffusers({**config, "force_upcast": False, "sample_size": 768}) == plain
    defaults = {k: v for k, v in config.items() if k not in ("act_fn", "use_quant_conv", "mid_block_add_attention", "shift_factor")}
    assert vae_config_from_diffusers(defaults) == plain  # omitted keys mean AutoencoderKL's defaults
