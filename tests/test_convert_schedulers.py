"""diffusers scheduler configs -> our noise tables: the same betas and abar, both directions."""

from __future__ import annotations

import os

import pytest
import torch

from diffuse import schedules
from diffuse.convert.errors import UnsupportedModel
from diffuse.convert.schedulers import noise_table_from_diffusers, noise_table_to_diffusers

diffusers = pytest.importorskip("diffusers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIGS = [
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="epsilon"),  # SD 1.x
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction"),  # SD 2 768-v
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, prediction_type="epsilon", num_train_timesteps=1000),
    dict(beta_schedule="squaredcos_cap_v2", prediction_type="sample", num_train_timesteps=500),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction",
         rescale_betas_zero_snr=True),
]


@pytest.mark.parametrize("config", CONFIGS)
def test_our_table_has_the_schedulers_betas_and_maps_back(config):
    reference = diffusers.DDIMScheduler(**config)
    table = noise_table_from_diffusers(dict(reference.config))
    betas = schedules.table_betas(table)
    # diffusers computes its tables in float32; ours are float64: compare at float32's tolerance
    torch.testing.assert_close(betas.float(), reference.betas)
    torch.testing.assert_close(schedules.alphas_cumprod(betas).float(), reference.alphas_cumprod)
    assert table["prediction"] == {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}[config["prediction_type"]]
    back = diffusers.DDIMScheduler.from_config(noise_table_to_diffusers(table))
    torch.testing.assert_close(back.alphas_cumprod, reference.alphas_cumprod)
    assert back.config.prediction_type == reference.config.prediction_type
    assert noise_table_from_diffusers(dict(back.config)) == table


def test_unsupported_schedulers_are_named():
    with pytest.raises(UnsupportedModel, match="trained_betas"):
        noise_table_from_diffusers({"trained_betas": [0.1, 0.2]})
    with pytest.raises(UnsupportedModel, match="'sigmoid'"):
        noise_table_from_diffusers({"beta_schedule": "sigmoid"})
    with pytest.raises(UnsupportedModel, match="flow-matching"):
        noise_table_from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    with pytest.raises(UnsupportedModel, match="'flow'"):
        noise_table_from_diffusers({"prediction_type": "flow"})
