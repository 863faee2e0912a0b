"""CLIP's text encoder as Stable Diffusion uses it: byte-level BPE tokenizer + causal text transformer.

    enc = build_text_encoder("clip", text_config, root=model_folder)
    enc.encode(["a photo of a cat", ""]) -> {"text": [B, 77 * k, dim], "text_mask": [B, 77 * k] all True}

- :class:`CLIPTokenizer`: the byte-level byte-pair encoding of CLIP (Radford et al. 2021, §2.4;
  BPE of Sennrich et al. 2016 over GPT-2's byte alphabet, Radford et al. 2019), read from a
  ``vocab.json`` + ``merges.txt`` pair (the transformers/diffusers tokenizer folder) or from
  open_clip's ``bpe_simple_vocab_16e6.txt.gz``. Needs the optional extra ``pip install -e ".[clip]"``
  (``regex`` for the Unicode-class pre-tokenizer, ``ftfy`` for the default text cleanup).
- :class:`CLIPTextTransformer`: token + learned position embeddings, pre-LayerNorm transformer
  layers with causal self-attention, final LayerNorm (the text tower of CLIP, without its projection).
- :class:`CLIPTextEncoder`: the two behind the :class:`~diffuse.text.TextEncoder` interface.

Prompts longer than one window (75 tokens between BOS and EOS) are split into windows of 75
tokens, each wrapped in BOS/EOS, padded to 77 and encoded separately; the hidden states are
concatenated along the sequence axis (AUTOMATIC1111's long-prompt scheme, without its
comma back-tracking; diffusers would truncate instead). Every prompt of a batch gets the same
number of windows, missing ones are empty windows (BOS, EOS, padding).

Stable Diffusion's U-Net cross-attends to all 77 positions of a window, padding included, so
``text_mask`` is all True.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import math
import unicodedata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .nn.layers import Attention, init_weights
from .text import TextEncoder

CLIP_INSTALL_HINT = 'pip install -e ".[clip]"'
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
END_OF_WORD = "</w>"
CLEANUPS = ("ftfy", "nfc")
ACTIVATIONS = ("quick_gelu", "gelu")
MIN_VOCAB = 1000  # a real CLIP vocabulary has 49408 entries; anything this small is a broken or placeholder file
# Unicode-class pre-tokenizer of CLIP: special tokens, English contractions, letter runs, single digits, symbol runs
_PIECES = r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"


def _need(module: str, why: str) -> Any:
    """Import an optional dependency of the tokenizer, or fail naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"the CLIP tokenizer needs {module} ({why}): {CLIP_INSTALL_HINT}") from e


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> character table (Radford et al. 2019): the 188 printable Latin-1
    bytes stand for themselves; the other 68 (controls, space, ...) get chr(256 + n) in byte order.

    Insertion order (printables first) is the order of the first 256 ids of CLIP's vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in table)})
    return table


def _open_clip_vocab_file() -> Path:
    """open_clip's ``bpe_simple_vocab_16e6.txt.gz``, found without importing open_clip (its __init__ needs torchvision)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip's BPE file needs the open-clip-torch package: pip install --no-deps open-clip-torch")
    path = Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed open_clip package; reinstall open-clip-torch")
    return path


class CLIPTokenizer:
    """CLIP's byte-level BPE: text -> ids, and prompts -> windows of ``max_length`` ids.

    Text cleanup ``cleanup``: 'ftfy' (CLIP and OpenCLIP: ``ftfy.fix_text`` then HTML unescaping;
    the tokenization these models were trained with) or 'nfc' (Unicode NFC only: transformers'
    fast CLIPTokenizer, hence diffusers). Both then collapse whitespace and lower-case; they differ
    only on text ftfy repairs (curly quotes, HTML entities, mojibake, full-width forms). 'ftfy' is the
    default and needs ftfy (an ImportError naming the extra otherwise): tokens never depend on
    whether ftfy happens to be installed.
    Pre-tokenization splits special tokens, contractions, letter runs, single digits and symbol runs;
    each piece's UTF-8 bytes are mapped through :func:`bytes_to_unicode`, the last symbol gets
    ``</w>``, and merges are applied lowest rank first. BOS/EOS ids are read from the vocabulary;
    windows are padded with ``pad_token`` ('<|endoftext|>' in SD 1.x, '!' = id 0 in SD 2.x).
    """

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, pad_token: str = EOS_TOKEN,
                 cleanup: str = "ftfy", max_length: int = 77):
        regex = _need("regex", "Unicode character classes in the pre-tokenizer")
        if cleanup not in CLEANUPS:
            raise ValueError(f"unknown CLIP text cleanup {cleanup!r}; use one of {', '.join(CLEANUPS)}")
        if cleanup == "ftfy":
            self._ftfy = _need("ftfy", "text cleanup 'ftfy'; or set text_cleanup 'nfc'")
        if max_length < 3:
            raise ValueError(f"max_length must be >= 3 (BOS, a token, EOS), got {max_length}")
        _check_vocab(vocab, merges)
        for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
            if token not in vocab:
                raise ValueError(f"CLIP vocabulary has no {token!r} token; these are not CLIP tokenizer files")
        self.vocab, self.merges = vocab, merges
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN], vocab[pad_token]
        self.pad_token, self.cleanup, self.max_length = pad_token, cleanup, int(max_length)
        specials = "|".join(regex.escape(t) for t in (BOS_TOKEN, EOS_TOKEN))
        self._pattern = regex.compile(f"{specials}|{_PIECES}", regex.IGNORECASE)
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._merge)

    # ------------------------------------------------------------ files

    @classmethod
    def from_folder(cls, folder: Path | str, **options: Any) -> "CLIPTokenizer":
        """Read ``vocab.json`` + ``merges.txt`` (transformers' CLIPTokenizer files, a diffusers ``tokenizer/`` folder),
        or, without them, the BPE vocabulary and merges inside a ``tokenizer.json`` (what transformers 5 saves)."""
        folder = Path(folder)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        if not vocab_file.is_file() and not merges_file.is_file() and (folder / "tokenizer.json").is_file():
            return cls._from_tokenizer_json(folder / "tokenizer.json", **options)
        for f in (vocab_file, merges_file):
            if not f.is_file():
                raise FileNotFoundError(f"CLIP tokenizer file {f} not found; a tokenizer folder holds vocab.json and merges.txt")
        vocab = json.loads(vocab_file.read_text(encoding="utf-8"))
        if not isinstance(vocab, dict):
            raise ValueError(f"{vocab_file} must hold a JSON object token -> id")
        lines = merges_file.read_text(encoding="utf-8").splitlines()
        if lines and lines[0].startswith("#version"):
            lines = lines[1:]
        return cls(vocab, _parse_merges(lines, merges_file), **options)

    @classmethod
    def _from_tokenizer_json(cls, path: Path, **options: Any) -> "CLIPTokenizer":
        """The "model" block of a Hugging Face tokenizers file: {"type": "BPE", "vocab": {...}, "merges": [...]}, each
        merge a "a b" string or an [a, b] pair."""
        try:
            model = json.loads(path.read_text(encoding="utf-8")).get("model", {})
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e.msg}); it is not a tokenizer file") from None
        if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict) or not isinstance(model.get("merges"), list):
            raise ValueError(f"{path} does not hold a BPE vocabulary and merges; it is not a CLIP tokenizer file")
        lines = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
        return cls(model["vocab"], _parse_merges(lines, path), **options)

    @classmethod
    def from_open_clip(cls, vocab_size: int = 49408, **options: Any) -> "CLIPTokenizer":
        """CLIP's vocabulary from open_clip's ``bpe_simple_vocab_16e6.txt.gz``: 256 byte symbols, the same
        with ``</w>``, the first ``vocab_size - 514`` merges (most frequent first), then BOS and EOS."""
        path = _open_clip_vocab_file()
        lines = gzip.decompress(path.read_bytes()).decode("utf-8").split("\n")
        merges = _parse_merges(lines[1:1 + vocab_size - 2 * 256 - 2], path)  # line 0 is a version header
        symbols = list(bytes_to_unicode().values())
        tokens = [*symbols, *(s + END_OF_WORD for s in symbols), *(a + b for a, b in merges), BOS_TOKEN, EOS_TOKEN]
        return cls({t: i for i, t in enumerate(tokens)}, merges, **options)

    def save(self, folder: Path | str) -> Path:
        """Write ``vocab.json`` + ``merges.txt`` (loadable by :meth:`from_folder` and by transformers' CLIPTokenizer)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges), encoding="utf-8")
        return folder

    # ------------------------------------------------------------ tokenizing

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def window_tokens(self) -> int:
        """Prompt tokens per window (between BOS and EOS): 75 for CLIP's 77 positions."""
        return self.max_length - 2

    def clean(self, text: str) -> str:
        if self.cleanup == "ftfy":
            text = html.unescape(html.unescape(self._ftfy.fix_text(text)))
        else:
            text = unicodedata.normalize("NFC", text)
        return " ".join(text.split()).lower()

    def _merge(self, word: str) -> tuple[str, ...]:
        """One pre-tokenized piece (byte symbols) -> its BPE tokens: repeatedly merge the best-ranked pair."""
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            rank, pair = min((self.ranks.get(p, math.inf), p) for p in zip(parts, parts[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(parts)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS (the literal '<|startoftext|>'/'<|endoftext|>' give their ids)."""
        byte_chars = bytes_to_unicode()
        ids: list[int] = []
        for piece in self._pattern.findall(self.clean(text)):
            if piece in (BOS_TOKEN, EOS_TOKEN):
                ids.append(self.vocab[piece])
            else:
                ids.extend(self.vocab[t] for t in self._bpe("".join(byte_chars[b] for b in piece.encode("utf-8"))))
        return ids

    def num_windows(self, text: str) -> int:
        """Windows ``text`` needs: ceil(tokens / 75), at least 1 (75 tokens fit one window, 76 need two)."""
        return max(1, -(-len(self.encode(text)) // self.window_tokens))

    def windows(self, prompts: list[str], min_windows: int = 1) -> torch.Tensor:
        """prompts -> ids LongTensor [B, k, max_length]: each window is BOS, up to 75 tokens, EOS, padding;
        k = the most any prompt needs (at least ``min_windows``); shorter prompts get empty windows."""
        if isinstance(prompts, str):
            raise ValueError("windows takes a list of prompts, not a single string")
        encoded = [self.encode(p) for p in prompts]
        n = self.window_tokens
        k = max([min_windows, *(-(-len(ids) // n) for ids in encoded)])
        out = torch.full((len(prompts), k, self.max_length), self.pad_id, dtype=torch.long)
        out[:, :, 0] = self.bos_id
        for i, ids in enumerate(encoded):
            for w in range(k):
                chunk = ids[w * n:(w + 1) * n]
                out[i, w, 1:len(chunk) + 1] = torch.tensor(chunk, dtype=torch.long)
                out[i, w, len(chunk) + 1] = self.eos_id
        return out


def _parse_merges(lines: list[str], source: Path) -> list[tuple[str, str]]:
    merges = []
    for n, line in enumerate(lines):
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"{source}: merge {n} {line!r} is not two space-separated symbols")
        merges.append((parts[0], parts[1]))
    return merges


def _check_vocab(vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """Refuse vocabularies that would silently tokenize wrong (e.g. transformers' 2-token offline placeholder)."""
    if len(vocab) < MIN_VOCAB:
        raise ValueError(f"CLIP vocabulary has only {len(vocab)} entries (CLIP has 49408): the tokenizer files are a "
                         "placeholder or broken; write real ones with diffuse.clip.write_open_clip_vocab(folder)")
    by_id: dict[int, str] = {}
    for token, i in vocab.items():
        if i in by_id:
            raise ValueError(f"CLIP vocabulary maps distinct tokens {by_id[i]!r} and {token!r} to one id {i}: "
                             "the tokenizer files are broken")
        by_id[i] = token
    if set(by_id) != set(range(len(vocab))):
        raise ValueError(f"CLIP vocabulary ids are not 0..{len(vocab) - 1}: the tokenizer files are broken")
    missing = [s for c in bytes_to_unicode().values() for s in (c, c + END_OF_WORD) if s not in vocab]
    missing += [a + b for a, b in merges if a + b not in vocab]
    if missing:
        raise ValueError(f"CLIP vocabulary lacks {len(missing)} byte symbols or merge results (e.g. {missing[0]!r}): "
                         "vocab.json and merges.txt do not belong together")


def write_open_clip_vocab(folder: Path | str) -> Path:
    """Write CLIP's ``vocab.json`` + ``merges.txt`` built from open_clip's BPE file into ``folder``."""
    return CLIPTokenizer.from_open_clip(cleanup="nfc").save(folder)


# ----------------------------------------------------------------------------- text transformer


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(1.702 x): the sigmoid approximation of GELU (Hendrycks & Gimpel 2016) OpenAI's CLIP uses."""
    return x * torch.sigmoid(1.702 * x)


class CLIPLayer(nn.Module):
    """Pre-LayerNorm transformer layer with causal self-attention: x [B, T, D] -> [B, T, D].

    Attention is our :class:`~diffuse.nn.layers.Attention` (q/k/v/out with bias); the MLP is
    fc1 -> activation -> fc2 ('quick_gelu' for OpenAI CLIP / SD 1.x, exact 'gelu' for OpenCLIP / SD 2.x).
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, activation: str, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, num_heads, dim // num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.fc1 = nn.Linear(dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, dim)
        self.act = quick_gelu if activation == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), causal=True)
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class CLIPTextTransformer(nn.Module):
    """ids [B, T] (T <= max_length) -> final_layer_norm(hidden states after ``depth - skip_last_layers`` layers) [B, T, D].

    ``skip_last_layers`` is AUTOMATIC1111's "clip skip" minus one (diffusers' ``clip_skip``): 1 takes
    the penultimate layer, as SD 2.x was trained; the skipped layers are kept (their weights load) but not run.
    """

    def __init__(self, vocab_size: int, dim: int, depth: int, num_heads: int, mlp_dim: int, activation: str,
                 max_length: int, layer_norm_eps: float, skip_last_layers: int):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown CLIP activation {activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if dim % num_heads:
            raise ValueError(f"CLIP dim {dim} is not divisible by num_heads {num_heads}")
        if not 0 <= skip_last_layers < depth:
            raise ValueError(f"skip_last_layers must be in 0..{depth - 1} for a {depth}-layer CLIP, got {skip_last_layers}")
        self.skip_last_layers = skip_last_layers
        self.token_embedding = nn.Embedding(vocab_size, dim)
        self.position_embedding = nn.Embedding(max_length, dim)
        self.layers = nn.ModuleList([CLIPLayer(dim, num_heads, mlp_dim, activation, layer_norm_eps) for _ in range(depth)])
        self.final_layer_norm = nn.LayerNorm(dim, eps=layer_norm_eps)
        init_weights(self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        if T > self.position_embedding.num_embeddings:
            raise ValueError(f"CLIP takes at most {self.position_embedding.num_embeddings} tokens per window, got {T}")
        x = self.token_embedding(ids) + self.position_embedding.weight[:T]  # [B, T, D]
        for layer in self.layers[:len(self.layers) - self.skip_last_layers]:
            x = layer(x)
        return self.final_layer_norm(x)  # [B, T, D]


# ----------------------------------------------------------------------------- text encoder


class CLIPTextEncoder(TextEncoder):
    """CLIP tokenizer + text transformer: ``encode(prompts) -> {"text": [B, 77 k, dim], "text_mask": all True}``.

    ``tokenizer`` is a folder with ``vocab.json`` + ``merges.txt``; a relative path is resolved against
    ``root`` (the model folder; the current directory when None). Defaults are SD 1.x's ViT-L/14 text tower.
    ``to_dict()`` returns the config as given (the tokenizer path unresolved). State keys: ``transformer.*``.
    """

    kind = "clip"

    def __init__(self, tokenizer: str, vocab_size: int = 49408, dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_dim: int = 3072, activation: str = "quick_gelu", max_length: int = 77, layer_norm_eps: float = 1e-5,
                 skip_last_layers: int = 0, pad_token: str = EOS_TOKEN, text_cleanup: str = "ftfy",
                 root: Path | None = None):
        super().__init__()
        folder = Path(tokenizer) if root is None else Path(root) / tokenizer
        if not folder.is_dir():
            raise FileNotFoundError(f"CLIP tokenizer folder {folder} not found (text_config 'tokenizer': {tokenizer!r}, "
                                    "relative to the model folder); it should hold vocab.json and merges.txt")
        self.tokenizer = CLIPTokenizer.from_folder(folder, pad_token=pad_token, cleanup=text_cleanup, max_length=max_length)
        if self.tokenizer.vocab_size > vocab_size:
            raise ValueError(f"tokenizer in {folder} has {self.tokenizer.vocab_size} tokens but the text encoder only "
                             f"{vocab_size} embeddings; the tokenizer does not belong to this model")
        self.transformer = CLIPTextTransformer(vocab_size, dim, depth, num_heads, mlp_dim, activation, max_length,
                                               layer_norm_eps, skip_last_layers)
        self.dim, self.max_length = dim, max_length
        self._config = {"tokenizer": str(tokenizer), "vocab_size": vocab_size, "dim": dim, "depth": depth,
                        "num_heads": num_heads, "mlp_dim": mlp_dim, "activation": activation, "max_length": max_length,
                        "layer_norm_eps": layer_norm_eps, "skip_last_layers": skip_last_layers, "pad_token": pad_token,
                        "text_cleanup": text_cleanup}

    def num_windows(self, prompts: list[str]) -> int:
        """Windows the longest of ``prompts`` needs: pass it as ``encode(..., windows=)`` to give a prompt batch
        and its negative/empty prompts the same length (classifier-free guidance concatenates them)."""
        return max((self.tokenizer.num_windows(p) for p in prompts), default=1)

    def prompt_warnings(self, prompt: str) -> list[str]:
        n = len(self.tokenizer.encode(prompt))
        per = self.tokenizer.window_tokens
        if n <= per:
            return []
        return [f"the prompt has {n} CLIP tokens, more than the {per} of one window: it is encoded as "
                f"{self.tokenizer.num_windows(prompt)} windows of {per} tokens, concatenated (AUTOMATIC1111's long-prompt "
                "scheme; diffusers would truncate it)"]

    def encode(self, prompts: list[str], windows: int = 1) -> dict[str, torch.Tensor]:
        """prompts -> {"text": [B, max_length * k, dim], "text_mask": [B, max_length * k] all True}, k >= ``windows``."""
        ids = self.tokenizer.windows(list(prompts), windows)  # [B, k, T]
        B, k, T = ids.shape
        weight = self.transformer.token_embedding.weight
        text = self.transformer(ids.view(B * k, T).to(weight.device)).reshape(B, k * T, self.dim)  # [B, k T, D]
        return {"text": text, "text_mask": torch.ones(B, k * T, dtype=torch.bool, device=weight.device)}

    def to_dict(self) -> dict[str, Any]:
        return dict(self._config)


__all__ = [
    "CLIPTokenizer", "CLIPTextTransformer", "CLIPTextEncoder", "CLIPLayer", "bytes_to_unicode", "quick_gelu",
    "write_open_clip_vocab", "CLIP_INSTALL_HINT", "BOS_TOKEN", "EOS_TOKEN", "ACTIVATIONS", "CLEANUPS",
]
