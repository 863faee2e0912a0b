"""CLIP text encoder: our BPE tokenizer against open_clip's and transformers', long-prompt windows, the text
transformer against transformers' CLIPTextModel, and the transformers <-> ours conversion both ways."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("regex")
pytest.importorskip("ftfy")
if importlib.util.find_spec("open_clip") is None:
    pytest.skip("open-clip-torch (its BPE file) is not installed", allow_module_level=True)

from diffuse.clip import EOS_TOKEN, CLIPTextEncoder, CLIPTokenizer, write_open_clip_vocab  # noqa: E402
from diffuse.convert.clip import (clip_config_from_transformers, clip_config_to_transformers,  # noqa: E402
                                  clip_state_from_transformers, clip_state_to_transformers, clip_tokenizer_settings,
                                  write_clip_tokenizer_config)
from diffuse.convert.errors import UnsupportedModel  # noqa: E402
from diffuse.nn.layers import parse_cond  # noqa: E402
from diffuse.text import build_text_encoder  # noqa: E402

LONG = ("a highly detailed matte painting of an ancient castle on a cliff above a stormy sea at dusk, volumetric "
        "lighting, dramatic clouds, crashing waves, seagulls, tiny figures on the battlements, by a famous artist, "
        "trending on artstation, octane render, 8k, ultra wide angle, golden hour, rim light, cinematic composition, "
        "intricate stonework, moss, ivy, lanterns glowing in the windows, a winding road, horses and carts, banners "
        "fluttering in the wind, lightning in the distance, rain, mist, reflections on wet cobblestones")
PROMPTS = [
    "a photo of a cat", "A Photo OF a CAT!!!", "", "   ", "masterpiece, best quality, (detailed:1.2), [foo|bar] {x}",
    "it's a dog's life; we'll see, they'd've DON'T", "café naïve résumé Ærøskøbing Straße", "東京の夜景, 城市 서울",
    "emoji 🐱‍👤🚀👍🏽 ☕", "numbers 3.14159 and 1,000,000 and 2024-01-31", "x_y-z/w\\v @user #tag $5 100%",
    "supercalifragilisticexpialidocious pneumonoultramicroscopicsilicovolcanoconiosis", "multiple     spaces\tand\nnewlines",
    "ｆｕｌｌ width", LONG,
]
FTFY_ONLY = "it’s “quoted” &amp; caf\u00c3\u00a9"  # curly quotes, an HTML entity, mojibake: ftfy repairs them, NFC does not


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_open_clip_vocab(tmp_path_factory.mktemp("clip") / "tokenizer")


@pytest.fixture(scope="module")
def tok(folder) -> CLIPTokenizer:
    return CLIPTokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def open_clip_tok():
    spec = importlib.util.find_spec("open_clip")
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)  # not the package: it needs torchvision
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer():
    os.environ["HF_HUB_OFFLINE"] = "1"
    return pytest.importorskip("transformers").CLIPTokenizer


def test_long_prompt_is_long(tok):
    assert len(tok.encode(LONG)) > 100


def test_tokenizer_equals_open_clip(folder, tok, open_clip_tok):
    for prompt in [*PROMPTS, FTFY_ONLY]:
        assert tok.encode(prompt) == open_clip_tok.encode(prompt), prompt
    short = [p for p in PROMPTS if p != LONG]
    sd2 = CLIPTokenizer.from_folder(folder, pad_token="!")  # SD 2.x / OpenCLIP pads with id 0
    assert torch.equal(sd2.windows(short)[:, 0], open_clip_tok(short))


def test_tokenizer_equals_transformers(folder, hf_tokenizer):
    ours = CLIPTokenizer.from_folder(folder, cleanup="nfc")
    hf = hf_tokenizer.from_pretrained(str(folder))
    assert len(hf) == ours.vocab_size == 49408
    for prompt in [*PROMPTS, FTFY_ONLY, "a <|endoftext|> b"]:
        assert ours.encode(prompt) == hf(prompt, add_special_tokens=False).input_ids, prompt
    short = [p for p in PROMPTS if p != LONG]
    want = hf(short, padding="max_length", max_length=77, return_tensors="pt").input_ids  # SD 1.x pads with EOS
    assert torch.equal(ours.windows(short)[:, 0], want)
    ftfy = CLIPTokenizer.from_folder(folder)  # the default cleanup is CLIP's own (ftfy), which repairs FTFY_ONLY
    assert ftfy.encode(FTFY_ONLY) != ours.encode(FTFY_ONLY)
    assert ftfy.encode(FTFY_ONLY) == ours.encode("it's \"quoted\" & café")


def test_vocab_files_round_trip(folder, tok, tmp_path):
    fresh = CLIPTokenizer.from_open_clip()
    assert tok.vocab == fresh.vocab and tok.merges == fresh.merges and len(tok.merges) == 48894
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (49406, 49407, 49407)
    again = tok.save(tmp_path / "again")
    for name in ("vocab.json", "merges.txt"):
        assert (again / name).read_bytes() == (folder / name).read_bytes()


def test_broken_vocabularies_are_refused(tok, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1}))  # transformers' offline placeholder
    (bad / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(ValueError, match="only 2 entries"):
        CLIPTokenizer.from_folder(bad)
    vocab = dict(tok.vocab)
    vocab["dog</w>"] = vocab["cat</w>"]
    with pytest.raises(ValueError, match="maps distinct tokens .* to one id"):
        CLIPTokenizer(vocab, tok.merges)
    with pytest.raises(ValueError, match="do not belong together"):
        CLIPTokenizer(tok.vocab, [*tok.merges, ("zq", "xj")])
    with pytest.raises(ValueError, match="no '<pad>' token"):
        CLIPTokenizer(tok.vocab, tok.merges, pad_token="<pad>")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(ValueError, match="unknown CLIP text cleanup"):
        CLIPTokenizer(tok.vocab, tok.merges, cleanup="none")


def test_missing_packages_name_the_extra(tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "ftfy", None)
    with pytest.raises(ImportError, match=r'needs ftfy .*pip install -e "\.\[clip\]"'):
        CLIPTokenizer(tok.vocab, tok.merges)
    assert CLIPTokenizer(tok.vocab, tok.merges, cleanup="nfc").encode("a cat") == tok.encode("a cat")
    monkeypatch.setitem(sys.modules, "regex", None)
    with pytest.raises(ImportError, match=r'needs regex .*pip install -e "\.\[clip\]"'):
        CLIPTokenizer(tok.vocab, tok.merges, cleanup="nfc")


def test_windows_count_and_layout(tok):
    cat = tok.vocab["cat</w>"]
    assert tok.encode("cat " * 75) == [cat] * 75
    assert [tok.num_windows("cat " * n) for n in (0, 1, 75, 76, 150, 151)] == [1, 1, 1, 2, 2, 3]
    ids = tok.windows(["cat " * 151, ""])
    assert ids.shape == (2, 3, 77)
    bos, eos, pad = tok.bos_id, tok.eos_id, tok.pad_id
    assert ids[0, 0].tolist() == ids[0, 1].tolist() == [bos, *[cat] * 75, eos]
    assert ids[0, 2].tolist() == [bos, cat, eos, *[pad] * 74]
    assert (ids[1] == torch.tensor([bos, eos, *[pad] * 75])).all()  # the empty prompt: empty windows
    assert tok.windows(["cat"], min_windows=2).shape == (1, 2, 77)


def tiny_hf_config(activation: str, depth: int = 3) -> dict:
    return {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 32,
            "intermediate_size": 48, "num_hidden_layers": depth, "num_attention_heads": 4, "max_position_embeddings": 77,
            "hidden_act": activation, "layer_norm_eps": 1e-5, "projection_dim": 32}


def tiny_hf_model(activation: str, depth: int = 3):
    transformers = pytest.importorskip("transformers")
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**tiny_hf_config(activation, depth))).eval()
    with torch.no_grad():
        for p in model.parameters():  # non-trivial norms and biases, so a swapped key cannot go unnoticed
            p.add_(0.1 * torch.randn_like(p))
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("activation,skip", [("quick_gelu", 0), ("gelu", 0), ("quick_gelu", 1), ("gelu", 2)])
def test_text_transformer_equals_transformers(folder, activation, skip):
    hf = tiny_hf_model(activation)
    cfg = {**clip_config_from_transformers(hf.config.to_dict()), "tokenizer": str(folder), "skip_last_layers": skip}
    ours = build_text_encoder("clip", cfg).eval()
    ours.load_state_dict(clip_state_from_transformers(hf.state_dict(), cfg), strict=True)
    prompts = ["a photo of a cat", "", "it's a dog's life 🐱"]
    ids = ours.tokenizer.windows(prompts)[:, 0]  # [3, 77]
    with torch.no_grad():
        out = hf(input_ids=ids, output_hidden_states=True)
        want = hf.final_layer_norm(out.hidden_states[-1 - skip]) if skip else out.last_hidden_state
        got = ours.encode(prompts)
    assert got["text"].shape == (3, 77, 32) and rel_err(got["text"], want) <= 1e-4
    assert got["text_mask"].dtype == torch.bool and got["text_mask"].all()
    x = torch.zeros(3, 4, 8, 8)
    assert parse_cond(got, x, num_classes=0, text_dim=32, concat_channels=0).text_mask.all()


def test_long_prompts_concatenate_windows(folder):
    enc = build_text_encoder("clip", {**clip_config_from_transformers(tiny_hf_config("quick_gelu")),
                                      "tokenizer": str(folder)}).eval()
    long = "cat " * 151
    assert enc.num_windows([long, ""]) == 3 and enc.prompt_warnings("cat " * 75) == []
    assert "151 CLIP tokens" in enc.prompt_warnings(long)[0] and "3 windows" in enc.prompt_warnings(long)[0]
    with torch.no_grad():
        got = enc.encode([long, ""])["text"]  # [2, 231, 32]
        window = enc.encode(["cat " * 75, "cat", ""])["text"]  # [3, 77, 32]
        padded = enc.encode(["cat"], windows=2)["text"]
    assert got.shape == (2, 231, 32) and padded.shape == (1, 154, 32)
    torch.testing.assert_close(got[0, :77], window[0])
    torch.testing.assert_close(got[0, 77:154], window[0])
    torch.testing.assert_close(got[0, 154:], window[1])
    for w in range(3):
        torch.testing.assert_close(got[1, 77 * w:77 * (w + 1)], window[2])
    torch.testing.assert_close(padded[0, 77:], window[2])


@pytest.mark.parametrize("skip", [0, 1])
def test_state_round_trip_through_transformers(folder, tmp_path, skip):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import save_file
    cfg = {**clip_config_from_transformers(tiny_hf_config("gelu")), "tokenizer": str(folder), "skip_last_layers": skip}
    torch.manual_seed(1)
    ours = build_text_encoder("clip", cfg).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.1 * torch.randn_like(p))
    exported = clip_state_to_transformers(ours.state_dict(), cfg)
    hf_cfg = clip_config_to_transformers(cfg)
    assert hf_cfg["num_hidden_layers"] == 3 - skip and hf_cfg["hidden_act"] == "gelu"
    hf_dir = tmp_path / "text_encoder"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(json.dumps(hf_cfg))
    save_file(exported, str(hf_dir / "model.safetensors"))
    hf, info = transformers.CLIPTextModel.from_pretrained(str(hf_dir), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert set(exported) == {"text_model." + k for k in hf.state_dict() if not k.endswith("position_ids")}
    ids = ours.tokenizer.windows(["a photo of a cat", ""])[:, 0]
    with torch.no_grad():
        assert rel_err(ours.encode(["a photo of a cat", ""])["text"], hf.eval()(input_ids=ids).last_hidden_state) <= 1e-4
    back = clip_state_from_transformers(exported, {**cfg, "depth": 3 - skip, "skip_last_layers": 0})
    skipped = tuple(f"transformer.layers.{i}." for i in range(3 - skip, 3))
    kept = {k: v for k, v in ours.state_dict().items() if not k.startswith(skipped)}
    assert back.keys() == kept.keys() and all(torch.equal(back[k], kept[k]) for k in kept)
    arch = {k: v for k, v in cfg.items() if k not in ("tokenizer", "skip_last_layers")}
    assert clip_config_from_transformers(hf_cfg) == {**arch, "depth": 3 - skip}


def test_unsupported_models_are_named(folder):
    cfg = tiny_hf_config("quick_gelu")
    with pytest.raises(UnsupportedModel, match="hidden_act 'relu'"):
        clip_config_from_transformers({**cfg, "hidden_act": "relu"})
    with pytest.raises(UnsupportedModel, match="CLIPTextModelWithProjection"):
        clip_config_from_transformers({**cfg, "architectures": ["CLIPTextModelWithProjection"]})
    ours = clip_config_from_transformers(cfg)
    state = clip_state_to_transformers(build_text_encoder("clip", {**ours, "tokenizer": str(folder)}).state_dict(), ours)
    prefixless = {k.removeprefix("text_model."): v for k, v in state.items()}  # transformers 5's module keys
    assert clip_state_from_transformers(prefixless, ours) == clip_state_from_transformers(state, ours)
    with pytest.raises(UnsupportedModel, match="projection"):
        clip_state_from_transformers({**state, "text_projection.weight": torch.zeros(32, 32)}, ours)
    with pytest.raises(UnsupportedModel, match=r"layers.1.layer_norm1.weight has shape \(33,\), the config gives \(32,\)"):
        clip_state_from_transformers({**state, "text_model.encoder.layers.1.layer_norm1.weight": torch.ones(33)}, ours)
    del state["text_model.encoder.layers.2.mlp.fc2.bias"]
    with pytest.raises(UnsupportedModel, match="missing .*layers.2.mlp.fc2.bias"):
        clip_state_from_transformers(state, ours)


def test_build_from_model_folder_and_tokenizer_settings(folder, tmp_path, hf_tokenizer):
    model_dir = tmp_path / "model"
    CLIPTokenizer.from_folder(folder).save(model_dir / "tokenizer")
    cfg = {**clip_config_from_transformers(tiny_hf_config("quick_gelu")), "tokenizer": "tokenizer", "pad_token": "!"}
    enc = build_text_encoder("clip", cfg, root=model_dir)
    assert isinstance(enc, CLIPTextEncoder) and enc.to_dict()["tokenizer"] == "tokenizer" and enc.tokenizer.pad_id == 0
    again = build_text_encoder("clip", enc.to_dict(), root=model_dir)
    again.load_state_dict(enc.state_dict(), strict=True)
    assert again.to_dict() == enc.to_dict() == {**cfg, "skip_last_layers": 0, "text_cleanup": "ftfy"}
    with pytest.raises(FileNotFoundError, match="tokenizer folder .* not found"):
        build_text_encoder("clip", cfg, root=tmp_path)
    with pytest.raises(ValueError, match="unknown clip text encoder config key 'hidden_size'"):
        build_text_encoder("clip", {**cfg, "hidden_size": 32}, root=model_dir)
    write_clip_tokenizer_config(model_dir / "tokenizer", cfg)
    assert clip_tokenizer_settings(model_dir / "tokenizer") == {"pad_token": "!"}
    assert clip_tokenizer_settings(folder) == {"pad_token": EOS_TOKEN}
    hf = hf_tokenizer.from_pretrained(str(model_dir / "tokenizer"))
    want = hf(["a cat", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    assert torch.equal(enc.tokenizer.windows(["a cat", ""])[:, 0], want)
    (model_dir / "tokenizer" / "special_tokens_map.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"special_tokens_map.json is not valid JSON \(Expecting property name"):
        clip_tokenizer_settings(model_dir / "tokenizer")
