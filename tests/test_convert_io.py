"""Reading foreign weights: safetensors recognised by content; pickles refused without running them."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffuse.convert.errors import UnsupportedModel
from diffuse.convert.io import find_weights, open_weights, sniff


class Payload:
    """Unpickling this touches a canary file: what a malicious checkpoint's __reduce__ would do."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return (Path.touch, (self.canary,))


def malicious_files(tmp_path: Path, canary: Path) -> list[Path]:
    files = []
    for name in ("evil.safetensors", "evil.ckpt", "evil.pt", "evil.bin", "evil"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps({"state_dict": Payload(canary)}, protocol=4))
        files.append(path)
    zipped = tmp_path / "zipped.safetensors"
    torch.save({"state_dict": Payload(canary)}, zipped)  # torch.save's zip archive with the pickle inside
    return [*files, zipped]


def test_the_payload_is_real(tmp_path):
    """The canary check below can fail: unpickling the payload does create the canary."""
    canary = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(canary)))
    assert canary.exists()


def test_pickles_are_refused_by_content_and_never_run(tmp_path):
    canary = tmp_path / "payload-ran"
    for path in malicious_files(tmp_path, canary):
        assert sniff(path) in ("pickle", "zip")
        with pytest.raises(UnsupportedModel, match="pickle") as err:
            open_weights(path)
        assert str(path) in str(err.value) and "isolated environment" in str(err.value)
        assert "\n" not in str(err.value)
    assert not canary.exists()


def test_safetensors_is_read_whatever_its_name_lazily_and_in_the_asked_dtype(tmp_path):
    path = tmp_path / "weights.bin"  # a safetensors file with a pickle's usual extension
    save_file({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor([1, 2]),
               "scale_factor": torch.tensor(0.18215)}, str(path))
    assert sniff(path) == "safetensors"
    weights = open_weights(path, dtype=torch.bfloat16)
    assert weights.shapes() == {"w": (2, 3), "n": (2,), "scale_factor": ()}
    assert weights["w"].dtype == torch.bfloat16 and torch.equal(weights["w"].float(), torch.arange(6.0).reshape(2, 3))
    assert weights["n"].dtype == torch.int64  # integers stay as stored
    assert weights["scale_factor"].dtype == torch.float32 and float(weights["scale_factor"]) == float(torch.tensor(0.18215))
    assert sorted(weights) == ["n", "scale_factor", "w"] and len(weights) == 3 and "w" in weights


def test_other_files_and_truncated_safetensors_get_one_line_errors(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("hello")
    with pytest.raises(UnsupportedModel, match="not a safetensors file"):
        open_weights(text)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModel, match=r"empty.safetensors is empty \(0 bytes\): an unfinished download"):
        open_weights(tmp_path / "empty.safetensors")
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(good))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:200])
    with pytest.raises(UnsupportedModel, match="truncated or corrupt|not a safetensors file"):
        open_weights(cut)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_weights(tmp_path / "missing.safetensors")


def test_sharded_index_and_component_folders(tmp_path):
    save_file({"a": torch.ones(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    weights = find_weights(tmp_path, "model")
    assert weights.shapes() == {"a": (2,), "b": (3,)} and torch.equal(weights["b"], torch.zeros(3))
    variant = tmp_path / "text_encoder"  # the Hub's fp16 files alone, single and sharded
    variant.mkdir()
    save_file({"a": torch.ones(2, dtype=torch.float16)}, str(variant / "model.fp16.safetensors"))
    assert torch.equal(find_weights(variant, "model", torch.float32)["a"], torch.ones(2))
    (variant / "model.fp16.safetensors").rename(variant / "model.fp16-00001-of-00001.safetensors")
    index["weight_map"] = {"a": "model.fp16-00001-of-00001.safetensors"}
    (variant / "model.safetensors.index.fp16.json").write_text(json.dumps(index))
    assert find_weights(variant, "model").shapes() == {"a": (2,)}
    save_file({"a": torch.ones(2)}, str(variant / "model.non_ema.safetensors"))
    with pytest.raises(UnsupportedModel, match="has no model.safetensors but the variants model.non_ema.safetensors, "
                                               "model.safetensors.index.fp16.json; keep one variant's files"):
        find_weights(variant, "model")
    only_pickle = tmp_path / "unet"
    only_pickle.mkdir()
    torch.save({"w": torch.zeros(1)}, only_pickle / "diffusion_pytorch_model.bin")
    with pytest.raises(UnsupportedModel, match="only pickle weights .*diffusion_pytorch_model.bin"):
        find_weights(only_pickle, "diffusion_pytorch_model")
