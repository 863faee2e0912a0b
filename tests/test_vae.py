"""KL autoencoder and VAECodec: shapes, closed-form KL, trained round trip, latent scale, files, tiled decode."""

import dataclasses
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffuse.checkpoint import CheckpointError
from diffuse.codec import VAECodec, decode_tiled, latent_stats
from diffuse.data import make_dataset
from diffuse.nn.vae import VAE, DiagonalGaussian, VAEConfig, psnr, vae_loss
from diffuse.train_vae import _dataset, export_vae, train_vae, vae_preset

TINY = VAEConfig(base_channels=8, channel_mult=(1, 2, 2), norm_groups=4)


def random_vae(cfg: VAEConfig = TINY) -> VAE:
    torch.manual_seed(0)
    vae = VAE(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return vae.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The vae-tiny preset trained for its 40 steps on 64 shapes images at 16x16, exported."""
    root = tmp_path_factory.mktemp("vae")
    train_vae(vae_preset("vae-tiny"), root / "run", log=lambda s: None)
    folder, info = export_vae(root / "run", root / "vae")
    return root, folder, info


def test_shapes_and_factor():
    for mult, factor in (((1, 2, 2), 4), ((1, 2, 2, 2), 8)):
        vae = random_vae(VAEConfig(base_channels=8, channel_mult=mult, norm_groups=4))
        post = vae.encode(torch.zeros(2, 3, 32, 32))
        assert vae.cfg.factor == factor and post.mean.shape == (2, 4, 32 // factor, 32 // factor)
        assert vae.decode(post.mean).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible by 4"):
        random_vae().encode(torch.zeros(1, 3, 30, 30))


def test_kl_matches_closed_form():
    mean = torch.full((2, 4, 3, 3), 0.5)
    logvar = torch.full((2, 4, 3, 3), math.log(0.25))
    per_element = 0.5 * (0.25 + 0.25 - 1 - math.log(0.25))
    assert DiagonalGaussian(mean, logvar).kl() == pytest.approx(torch.full((2,), 36 * per_element), rel=1e-6)
    assert DiagonalGaussian(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2)).kl().item() == 0.0


def test_loss_terms_combine():
    vae = random_vae()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    t = vae_loss(vae, x, kl_weight=0.01, edge_weight=0.5, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(t["loss"], t["rec"] + 0.01 * t["kl"] + 0.5 * t["edge"])


def test_trained_round_trip_psnr_and_unit_latent_std(trained):
    root, folder, info = trained
    codec = VAECodec.load(folder)
    data = _dataset(vae_preset("vae-tiny"))
    x = torch.stack([data[i]["image"] for i in range(64)])
    # golden: 14.69 dB measured for this seeded run (7.46 dB after 5 steps); the threshold leaves 0.5 dB
    assert psnr(codec.decode(codec.encode(x)), x) > 14.2
    assert info["psnr"] == pytest.approx(psnr(codec.decode(codec.encode(x)), x), abs=1e-4)
    z = codec.encode(x)
    assert float(z.std()) == pytest.approx(1.0, abs=1e-4) and abs(float(z.mean())) < 1e-4
    assert (root / "run" / "metrics.csv").exists() and (root / "run" / "samples" / "step-00000040.png").exists()


def test_init_from_continues_an_exported_vae_and_refuses_another_architecture(trained, tmp_path):
    from diffuse.train import TrainingError

    root, folder, info = trained
    start = VAECodec.load(folder).vae.state_dict()
    cfg = vae_preset("vae-tiny")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, init_from=str(folder), lr=1e-12, warmup_steps=0))
    logged: list[str] = []
    train_vae(cfg, tmp_path / "more", max_steps=2, log=logged.append)  # lr 1e-12: the weights stay the exported ones
    continued = VAECodec.load(export_vae(tmp_path / "more", tmp_path / "vae")[0]).vae.state_dict()
    assert f"train.init_from: the VAE weights of {folder}" in logged
    assert max(float((continued[k] - start[k]).abs().max()) for k in start) < 1e-8
    wider = dataclasses.replace(cfg, vae=dataclasses.replace(cfg.vae, base_channels=16))
    with pytest.raises(TrainingError, match="its VAE config differs from this run's vae section"):
        train_vae(wider, tmp_path / "refused", log=logged.append)
    assert not (tmp_path / "refused").exists()


def test_save_load_round_trip_is_exact(tmp_path):
    vae = random_vae()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    scale, shift = latent_stats(vae, x)
    codec = VAECodec(vae, scale, shift)
    codec.save(tmp_path / "vae")
    again = VAECodec.load(tmp_path / "vae")
    assert (again.scale, again.shift) == (scale, shift)
    assert torch.equal(again.encode(x), codec.encode(x))
    assert torch.equal(again.decode(codec.encode(x)), codec.decode(codec.encode(x)))
    with pytest.raises(Exception, match="already exists"):
        codec.save(tmp_path / "vae")
    state = load_file(str(tmp_path / "vae" / "model.safetensors"))
    state["decoder.conv_out.bias"] = torch.zeros(4)
    save_file(state, str(tmp_path / "vae" / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"decoder.conv_out.bias has shape \(4,\), the config gives \(3,\)"):
        VAECodec.load(tmp_path / "vae")


def relative_max_error(tiled: torch.Tensor, whole: torch.Tensor) -> float:
    return float((tiled - whole).abs().max() / whole.abs().mean())


def test_decoder_halo_is_its_receptive_radius_in_latents():
    # the tiled body only (conv_in and the mid block run on the whole latent): per level, 2 convs per res block
    # (num_res_blocks + 1 blocks) and the upsample conv, / 2^l, + conv_out at the last level:
    # (1, 2, 2) = 4 + (1 + 4)/2 + (1 + 4)/4 + 1/4 = 8
    assert VAE(TINY).decoder.halo() == 8
    assert VAE(VAEConfig(base_channels=8, channel_mult=(1, 2, 2, 4), norm_groups=4)).decoder.halo() == 9  # 8.5
    assert VAE(VAEConfig(base_channels=8, num_res_blocks=2, norm_groups=4)).decoder.halo() == 12  # 6 + 7/2 + 7/4 + 1/4


@pytest.mark.parametrize("cfg", [TINY, dataclasses.replace(TINY, quant_conv=True), dataclasses.replace(TINY, mid_attention=False)],
                         ids=["mid-attention", "quant-convs", "no-attention"])
def test_tiled_decode_equals_whole_decode_random_vae(cfg):
    vae = random_vae(cfg)
    z = torch.randn(1, 4, 16, 19, generator=torch.Generator().manual_seed(0))  # 2 x 3 tiles, ragged last column
    with torch.no_grad():
        whole = vae.decode(z)
    # the stem (with the attention) on the whole latent, global GroupNorm statistics and a halo of the body's
    # receptive field: measured 3.8e-6 (float rounding) where per-tile statistics gave mean |diff| 0.078
    # (14% of mean |x|)
    exact = relative_max_error(decode_tiled(vae, z, tile=8), whole)
    assert exact < 1e-4
    assert relative_max_error(VAECodec(vae, scale=0.5, tile=8).decode(z * 0.5), whole) < 1e-4
    # the halo is needed: one latent less of context misses some (measured 5.5e-5, 15x the rounding error)
    assert relative_max_error(decode_tiled(vae, z, tile=8, overlap=7), whole) > 5 * exact
    with pytest.raises(ValueError, match="tile >= 1"):
        decode_tiled(vae, z, tile=0)


def test_tiled_decode_equals_whole_decode_trained_vae_without_seams(trained):
    _, folder, _ = trained
    codec = VAECodec.load(folder)
    x = torch.stack([make_dataset("shapes", 48, length=2)[i]["image"] for i in range(2)])
    z = codec.encode(x)  # [2, 4, 12, 12]
    whole, tiled = codec.decode(z), decode_tiled(codec.vae, z / codec.scale + codec.shift, tile=5)
    assert relative_max_error(tiled, whole) < 1e-4
    # no seam: the jump between pixel columns at the tile borders (20, 40) is that of the whole decode
    jump = lambda im: (im[..., 1:] - im[..., :-1]).abs().mean(dim=(0, 1, 2))  # noqa: E731
    assert torch.allclose(jump(tiled)[[19, 39]], jump(whole)[[19, 39]], atol=1e-5)


def latent_model_cfg(codec: str):
    from diffuse.config import ModelConfig
    from diffuse.nn import backbone_preset, config_to_dict

    unet = config_to_dict(backbone_preset("unet", "tiny", image_size=8, in_channels=4, out_channels=4, attention_resolutions=[4]))
    return ModelConfig(backbone_config=unet, channels=4, image_size=8, sigma_data=1.0, codec=codec)


def test_latent_generate_decodes_to_pixel_size(tmp_path, random_model):
    from diffuse.pipeline import Pipeline, SampleSettings, generate

    codec = VAECodec(random_vae(), scale=0.5, shift=0.1)
    model = random_model(latent_model_cfg("vae"))
    model.save(tmp_path / "m")
    codec.save(tmp_path / "m" / "vae")
    pipe = Pipeline.load(tmp_path / "m")
    assert isinstance(pipe.codec, VAECodec) and pipe.codec.scale == 0.5
    out = pipe(seeds=[0, 1], settings=SampleSettings(steps=3))
    assert [im.image.size for im in out] == [(32, 32)] * 2 and out[0].record["width"] == 32
    # the pipeline is generate() in latent shape followed by the codec's decode (with the pipeline's model,
    # whose fast path may run the denoiser in bf16 on a CPU with native bf16)
    direct = generate(pipe.model, SampleSettings(steps=3), [0, 1], codec=codec)
    from diffuse.plot import to_uint8
    import numpy as np

    assert direct.shape == (2, 3, 32, 32)
    assert np.array_equal(np.stack([np.asarray(im.image) for im in out]), to_uint8(direct))


def test_pipeline_vae_tile_decodes_the_same_image_and_records_it(tmp_path, random_model):
    from diffuse.pipeline import Pipeline, SampleSettings

    model = random_model(latent_model_cfg("vae"))
    model.save(tmp_path / "m")
    VAECodec(random_vae(), scale=0.5, shift=0.1).save(tmp_path / "m" / "vae")
    whole = Pipeline.load(tmp_path / "m")(seeds=[0], settings=SampleSettings(steps=3))[0]
    tiled = Pipeline.load(tmp_path / "m", vae_tile=4)(seeds=[0], settings=SampleSettings(steps=3))[0]
    assert whole.record["vae_tile"] == 0 and tiled.record["vae_tile"] == 4
    a, b = (np.asarray(g.image).astype(int) for g in (whole, tiled))
    assert np.abs(a - b).max() <= 1  # float rounding may move a value across a uint8 step
    with pytest.raises(ValueError, match="--vae-tile must be >= 0"):
        Pipeline.load(tmp_path / "m", vae_tile=-1)


def test_latent_training_encodes_through_the_frozen_vae(tmp_path):
    from diffuse.config import RunConfig, TrainConfig
    from diffuse.pipeline import Pipeline, SampleSettings
    from diffuse.train import export_run, train

    vae = random_vae()
    data = _dataset(vae_preset("vae-tiny"))
    VAECodec(vae, *latent_stats(vae, torch.stack([data[i]["image"] for i in range(16)]))).save(tmp_path / "vae")
    cfg = RunConfig(model=latent_model_cfg(str(tmp_path / "vae")),
                    train=TrainConfig(data="shapes", dataset_size=16, batch_size=4, max_steps=2, warmup_steps=1,
                                      precision="fp32", checkpoint_every=2, sample_every=2, log_every=1))
    cfg = RunConfig(model=cfg.model.__class__(**{**cfg.model.__dict__, "image_size": 4,
                    "backbone_config": {**cfg.model.backbone_config, "image_size": 4}}), train=cfg.train)
    train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    folder = export_run(tmp_path / "run", tmp_path / "model")
    assert (folder / "vae" / "config.json").exists()
    pipe = Pipeline.load(folder)
    assert pipe.model.cfg.codec == "vae" and pipe(seeds=[0], settings=SampleSettings(steps=2))[0].image.size == (16, 16)
