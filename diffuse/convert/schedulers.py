"""diffusers scheduler configs <-> our noise tables (a discrete model's DDPM beta table and prediction type).

A diffusers scheduler is one sampler over a training table; here the table becomes the model's
:class:`~diffuse.precond.DiscreteVPDenoiser` (sigma_t = sqrt((1 - abar_t) / abar_t), Ho et al. 2020)
and any of our samplers runs on it. Only the table matters; sampler choices (timestep spacing,
``steps_offset``, ``set_alpha_to_one``) are the sampler's business, not the model's.
"""

from __future__ import annotations

from typing import Any

from .errors import UnsupportedModel

PREDICTION_FROM_DIFFUSERS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
SCHEDULE_FROM_DIFFUSERS = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}


def noise_table_from_diffusers(config: dict[str, Any]) -> dict[str, Any]:
    """Our ``model.noise_table`` from a diffusers scheduler's config.json (any DDPM-family scheduler)."""
    if config.get("trained_betas") is not None:
        raise UnsupportedModel("the scheduler has a custom trained_betas table; diffuse reads the named beta schedules only")
    schedule = config.get("beta_schedule", "linear")
    if schedule not in SCHEDULE_FROM_DIFFUSERS:
        raise UnsupportedModel(f"scheduler beta_schedule {schedule!r} is not supported; known: {', '.join(SCHEDULE_FROM_DIFFUSERS)}")
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_FROM_DIFFUSERS:
        raise UnsupportedModel(f"scheduler prediction_type {prediction!r} is not supported; known: "
                               f"{', '.join(PREDICTION_FROM_DIFFUSERS)}")
    if str(config.get("_class_name", "")).startswith("FlowMatch"):
        raise UnsupportedModel("flow-matching schedulers are not DDPM tables; diffuse converts DDPM-family models only")
    table: dict[str, Any] = {"num_timesteps": int(config.get("num_train_timesteps", 1000)),
                             "beta_schedule": SCHEDULE_FROM_DIFFUSERS[schedule],
                             "prediction": PREDICTION_FROM_DIFFUSERS[prediction],
                             "zero_terminal_snr": bool(config.get("rescale_betas_zero_snr", False))}
    if schedule != "squaredcos_cap_v2":
        table["beta_start"] = float(config.get("beta_start", 0.0001))
        table["beta_end"] = float(config.get("beta_end", 0.02))
    return table


def noise_table_to_diffusers(table: dict[str, Any], class_name: str = "DDIMScheduler") -> dict[str, Any]:
    """A diffusers scheduler config.json for our noise table (``class_name``: what ``from_pretrained`` builds;
    any DDPM-family scheduler reads the same keys)."""
    schedule = {v: k for k, v in SCHEDULE_FROM_DIFFUSERS.items()}[table["beta_schedule"]]
    config: dict[str, Any] = {"_class_name": class_name, "num_train_timesteps": int(table.get("num_timesteps", 1000)),
                              "beta_schedule": schedule, "trained_betas": None,
                              "prediction_type": {v: k for k, v in PREDICTION_FROM_DIFFUSERS.items()}[table["prediction"]],
                              "rescale_betas_zero_snr": bool(table.get("zero_terminal_snr", False))}
    if "beta_start" in table:
        config.update(beta_start=table["beta_start"], beta_end=table["beta_end"])
    if class_name == "DDIMScheduler":  # Stable Diffusion's published DDIM settings
        config.update(clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    return config
