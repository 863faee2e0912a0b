"""transformers' ``CLIPTextModel`` (the text encoder of Stable Diffusion 1.x/2.x) <-> our CLIP text encoder.

Config: transformers' ``config.json`` (``CLIPTextConfig``) <-> our ``text_config`` for
``build_text_encoder("clip", ...)`` (architecture keys only: the caller adds ``"tokenizer"`` and the
tokenizer settings from :func:`clip_tokenizer_settings`). State: transformers' file names
(``text_model.embeddings.token_embedding.weight``, ``text_model.encoder.layers.N.self_attn.q_proj.weight``,
..., ``text_model.final_layer_norm.*``; the ``text_model.`` prefix may be absent on input, as in
transformers 5's in-memory module) <-> the keys of :class:`~diffuse.clip.CLIPTextEncoder`'s
``state_dict()``. ``position_ids`` buffers are ignored. Tensors are renamed, never copied.

Export drops the layers ``skip_last_layers`` skips, so the exported model's last hidden state equals
our output (diffusers stores SD 2.x's text encoder that way: 23 of OpenCLIP's 24 layers).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..checkpoint import read_json
from ..clip import ACTIVATIONS, BOS_TOKEN, EOS_TOKEN, CLIPTextEncoder, CLIPTextTransformer
from .errors import UnsupportedModel

PREFIX = "text_model."
# transformers' CLIPTextConfig defaults (a config.json may omit keys equal to them)
DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
            "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
# ours <- transformers: config keys
CONFIG_KEYS = {"vocab_size": "vocab_size", "dim": "hidden_size", "mlp_dim": "intermediate_size",
               "depth": "num_hidden_layers", "num_heads": "num_attention_heads", "max_length": "max_position_embeddings",
               "activation": "hidden_act", "layer_norm_eps": "layer_norm_eps"}
# ours <- transformers: module names inside one layer
LAYER_KEYS = {"norm1": "layer_norm1", "attn1.to_q": "self_attn.q_proj", "attn1.to_k": "self_attn.k_proj",
              "attn1.to_v": "self_attn.v_proj", "attn1.to_out.0": "self_attn.out_proj", "norm2": "layer_norm2",
              "fc1": "mlp.fc1", "fc2": "mlp.fc2"}


def clip_config_from_transformers(config: dict) -> dict:
    """transformers ``CLIPTextModel`` config.json -> our text_config (architecture keys; no tokenizer)."""
    architectures = config.get("architectures") or ["CLIPTextModel"]
    if list(architectures) != ["CLIPTextModel"]:
        raise UnsupportedModel(f"text encoder architecture {architectures} is not supported: only CLIPTextModel "
                               "(SD 1.x/2.x); projection models such as SDXL's CLIPTextModelWithProjection are not")
    model_type = config.get("model_type", "clip_text_model")
    if model_type != "clip_text_model":
        raise UnsupportedModel(f"text encoder model_type {model_type!r} is not supported: only 'clip_text_model'")
    c = {**DEFAULTS, **config}
    if c["hidden_act"] not in ACTIVATIONS:
        raise UnsupportedModel(f"CLIP text encoder hidden_act {c['hidden_act']!r} is not supported; "
                               f"only {' and '.join(ACTIVATIONS)}")
    return {ours: c[theirs] for ours, theirs in CONFIG_KEYS.items()}


def clip_config_to_transformers(text_config: dict) -> dict:
    """Our text_config -> transformers ``CLIPTextModel`` config.json (the layers skip_last_layers skips are dropped)."""
    c = {**_our_defaults(), **text_config}
    out = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
           **{theirs: c[ours] for ours, theirs in CONFIG_KEYS.items()}}
    out["num_hidden_layers"] = c["depth"] - c["skip_last_layers"]
    return out


def _our_defaults() -> dict:
    """CLIPTextEncoder's default config values (keys a text_config may leave out)."""
    params = inspect.signature(CLIPTextEncoder).parameters.items()
    return {k: p.default for k, p in params if p.default is not p.empty and k != "root"}


def _key_pairs(depth: int) -> list[tuple[str, str]]:
    """(our key, transformers key without prefix) for a ``depth``-layer encoder."""
    pairs = [("transformer.token_embedding.weight", "embeddings.token_embedding.weight"),
             ("transformer.position_embedding.weight", "embeddings.position_embedding.weight")]
    for i in range(depth):
        for ours, theirs in LAYER_KEYS.items():
            for p in ("weight", "bias"):
                pairs.append((f"transformer.layers.{i}.{ours}.{p}", f"encoder.layers.{i}.{theirs}.{p}"))
    pairs += [(f"transformer.final_layer_norm.{p}", f"final_layer_norm.{p}") for p in ("weight", "bias")]
    return pairs


def _our_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    """Key -> shape of our encoder's ``state_dict()`` for the full config ``c``, built on the meta device (no memory)."""
    with torch.device("meta"):
        net = CLIPTextTransformer(c["vocab_size"], c["dim"], c["depth"], c["num_heads"], c["mlp_dim"], c["activation"],
                                  c["max_length"], c["layer_norm_eps"], c["skip_last_layers"])
    return {f"transformer.{k}": tuple(v.shape) for k, v in net.state_dict().items()}


def clip_state_from_transformers(state: Mapping[str, Tensor], text_config: dict) -> dict[str, Tensor]:
    """transformers CLIPTextModel state (keys with or without ``text_model.``) -> our CLIPTextEncoder state;
    every tensor must have the shape the config gives it."""
    prefix = PREFIX if any(k.startswith(PREFIX) for k in state) else ""
    c = {**_our_defaults(), **text_config}
    pairs = _key_pairs(c["depth"])
    wanted = {prefix + theirs for _, theirs in pairs}
    extra = sorted(k for k in state if k not in wanted and not k.endswith("position_ids"))
    if any("projection" in k for k in extra):
        raise UnsupportedModel(f"the text encoder has a projection ({next(k for k in extra if 'projection' in k)}): "
                               "only CLIPTextModel without projection (SD 1.x/2.x) is supported")
    if extra:
        raise UnsupportedModel(f"unexpected CLIP text encoder weights {extra[:3]} ({len(extra)} in all); "
                               "the weights do not match a CLIPTextModel with this config")
    missing = sorted(k for k in wanted if k not in state)
    if missing:
        raise UnsupportedModel(f"CLIP text encoder weights are missing {missing[:3]} ({len(missing)} in all); "
                               "the weights do not match a CLIPTextModel with this config")
    shapes = _our_shapes(c)
    out = {ours: state[prefix + theirs] for ours, theirs in pairs}
    for (ours, theirs), tensor in zip(pairs, out.values()):
        if tuple(tensor.shape) != shapes[ours]:
            raise UnsupportedModel(f"CLIP text encoder tensor {prefix + theirs} has shape {tuple(tensor.shape)}, the config "
                                   f"gives {shapes[ours]}; the weights do not belong to this config")
    return out


def clip_state_to_transformers(state: Mapping[str, Tensor], text_config: dict) -> dict[str, Tensor]:
    """Our CLIPTextEncoder state -> transformers' file names (``text_model.*``), without the skipped layers."""
    c = {**_our_defaults(), **text_config}
    pairs = _key_pairs(c["depth"] - c["skip_last_layers"])
    ours = {k for k, _ in _key_pairs(c["depth"])}
    if set(state) != ours:
        bad = sorted(set(state) ^ ours)
        raise ValueError(f"state is not a CLIPTextEncoder state for this config (e.g. {bad[0]!r} missing or unexpected)")
    return {PREFIX + theirs: state[k] for k, theirs in pairs}


def clip_tokenizer_settings(folder: Path | str) -> dict:
    """Our tokenizer settings (``pad_token``) from a transformers tokenizer folder's ``tokenizer_config.json`` /
    ``special_tokens_map.json``; transformers' default pad token '<|endoftext|>' when neither names one."""
    folder = Path(folder)
    pad = EOS_TOKEN
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = folder / name
        if f.is_file():
            value = read_json(f).get("pad_token")
            if value is not None:
                pad = value["content"] if isinstance(value, dict) else value
                break
    return {"pad_token": pad}


def write_clip_tokenizer_config(folder: Path | str, text_config: dict) -> None:
    """Write ``tokenizer_config.json`` + ``special_tokens_map.json`` beside vocab.json/merges.txt, so that transformers'
    CLIPTokenizer (diffusers) pads and truncates as our encoder does."""
    c = {**_our_defaults(), **text_config}
    special = {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "unk_token": EOS_TOKEN, "pad_token": c["pad_token"]}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2), encoding="utf-8")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": c["max_length"], **special}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
