"""Inpainting models: training masks, the [mask, masked image] input, widening a base model, training and using one."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffuse import masks
from diffuse.codec import PixelCodec
from diffuse.config import ModelConfig, _unet, apply_overrides, preset
from diffuse.model import DiffusionModel
from diffuse.pipeline import Pipeline, SampleSettings
from diffuse.train import export_run, load_initial_weights, train

FAST = ["train.log_every=1", "train.sample_every=1000", "train.checkpoint_every=5"]
INPAINT = ["model.inpainting=true", "model.backbone_config.concat_channels=2"]  # tiny: 1 channel + mask


def test_training_masks_are_binary_seeded_and_mixed():
    a = masks.training_masks(400, 16, torch.Generator().manual_seed(0))
    b = masks.training_masks(400, 16, torch.Generator().manual_seed(0))
    assert a.shape == (400, 1, 16, 16) and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    replaced = a.mean(dim=(1, 2, 3))
    assert (replaced > 0).all()  # every mask replaces something
    full = float((replaced == 1).float().mean())
    assert abs(full - masks.P_FULL) < 0.07  # 400 draws: 3 binomial standard deviations is 0.065
    partial = replaced[replaced < 1]
    assert len(partial) > 250 and 0.05 < float(partial.median()) < 0.6


def test_inpaint_concat_is_mask_then_masked_pixels():
    gen = torch.Generator().manual_seed(1)
    pixels = torch.rand(2, 3, 8, 8, generator=gen) * 2 - 1
    m = torch.zeros(2, 1, 8, 8)
    m[:, :, 2:5, 3:7] = 1
    m[1, :, 0, 0] = 0.5  # a feathered weight counts as replaced
    got = masks.inpaint_concat(PixelCodec(3), pixels, m)
    binary = (m > 0).float()
    assert torch.equal(got, torch.cat([binary, pixels * (1 - binary)], 1))

    class Halve:  # a codec with factor 2: the mask is max-pooled, a cell counts as replaced if any pixel is
        factor, image_channels = 2, 3

        def encode(self, x):
            return F.avg_pool2d(x, 2)

    got = masks.inpaint_concat(Halve(), pixels, m)
    assert torch.equal(got[:, :1], F.max_pool2d(binary, 2)) and torch.equal(got[:, 1:], F.avg_pool2d(pixels * (1 - binary), 2))
    assert torch.equal(masks.replace_all(PixelCodec(3), 2, 8), torch.cat([torch.ones(2, 1, 8, 8), torch.zeros(2, 3, 8, 8)], 1))


def test_inpainting_config_needs_the_matching_extra_channels():
    backbone = _unet("tiny", in_channels=1, out_channels=1, num_classes=10)
    with pytest.raises(ValueError, match="concat_channels=2 \\(1 \\+ model.channels\\)"):
        ModelConfig(backbone_config=backbone, conditioning="class", num_classes=10, channels=1, image_size=16, inpainting=True)
    with pytest.raises(ValueError, match="set model.inpainting=true"):
        ModelConfig(backbone_config={**backbone, "concat_channels": 2}, conditioning="class", num_classes=10, channels=1,
                    image_size=16)


def test_a_widened_model_starts_as_its_base_and_needs_its_input(tmp_path):
    train(apply_overrides(preset("tiny"), [*FAST, "train.max_steps=3"]), tmp_path / "base", progress=False, log=lambda s: None)
    source = export_run(tmp_path / "base", tmp_path / "base-model")
    base = DiffusionModel.load(source)[0]
    cfg = apply_overrides(preset("tiny"), [*INPAINT, f"train.init_from={source}"])
    model, logged = DiffusionModel(cfg.model), []
    load_initial_weights(model, cfg, logged.append)
    assert any("conv_in.weight widened from 1 to 3 input channels" in line for line in logged)
    gen = torch.Generator().manual_seed(2)
    x, sigma = torch.randn(3, 1, 16, 16, generator=gen), torch.tensor([0.1, 1.0, 10.0])
    concat = torch.randn(3, 2, 16, 16, generator=gen)
    with torch.no_grad():
        want = base(x, sigma, base.condition(labels=[1, 2, 3]))
        got = model.eval()(x, sigma, model.condition(labels=[1, 2, 3], concat=concat))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # the new input channels start at zero
    with pytest.raises(ValueError, match="inpainting model: it needs the mask"):
        model.condition(labels=[1])
    with pytest.raises(ValueError, match="this model is not one"):
        base.condition(labels=[1], concat=concat[:1])


def test_trained_inpainting_model_generates_and_inpaints_keeping_pixels(tmp_path):
    run = tmp_path / "run"
    result = train(apply_overrides(preset("tiny"), [*FAST, *INPAINT, "train.max_steps=6"]), run, progress=False, log=lambda s: None)
    assert result.step == 6 and np.isfinite(result.last_loss)
    pipe = Pipeline.load(export_run(run, tmp_path / "model"))
    pipe.watermark = False
    settings = SampleSettings(sampler="euler", steps=4, cfg=2.0)
    [plain] = pipe(class_label=3, seeds=[0], settings=settings)
    assert plain.image.size == (16, 16)
    [source] = pipe(class_label=5, seeds=[1], settings=settings)
    image = np.asarray(source.image)
    hole = np.zeros((16, 16), np.float32)
    hole[4:12, 4:12] = 1
    [filled] = pipe.inpaint(source.image, hole, class_label=3, seeds=[2], settings=settings)
    out = np.asarray(filled.image)
    assert np.array_equal(out[hole == 0], image[hole == 0]) and not np.array_equal(out, image)
