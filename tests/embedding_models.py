"""Tiny offline text encoders and tokenizers for the embedding tests (no hub access)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn


def bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def tiny_tokenizer(folder: Path, *, max_length: int = 12):
    """A byte-level CLIPTokenizer (514 tokens: bytes, bytes + </w>, BOS, EOS), saved to ``folder``."""
    transformers = pytest.importorskip("transformers")
    folder.mkdir(parents=True, exist_ok=True)
    chars = bytes_to_unicode()
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)
    return tok


def tiny_clip_text(*, hidden: int = 32, seed: int = 0, projection: bool = False, vocab: int = 514, max_length: int = 12,
                   projection_dim: int = 16):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=max_length, eos_token_id=513, bos_token_id=512, projection_dim=projection_dim,
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def ids_of(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


class LDMTransformerEmbedder(nn.Module):
    """SD1's LDM ``cond_stage_model``: a ``transformer`` (CLIPTextModel) inside a wrapper."""

    def __init__(self, clip: nn.Module) -> None:
        super().__init__()
        self.transformer = clip

    def forward(self, ids):
        return self.transformer(ids).last_hidden_state


class OpenCLIPLike(nn.Module):
    """SD2's LDM OpenCLIP embedder layout: ``model.token_embedding`` + ``model.positional_embedding``."""

    def __init__(self, vocab: int = 40, dim: int = 24, length: int = 8) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.token_embedding = nn.Embedding(vocab, dim)
        self.model.positional_embedding = nn.Parameter(torch.randn(length, dim) * 0.01)
        self.model.ln_final = nn.LayerNorm(dim)

    def forward(self, ids):
        return self.model.ln_final(self.model.token_embedding(ids) + self.model.positional_embedding[: ids.shape[1]])


def tokenizer_snapshot(tokenizer) -> object:
    """Everything an embedding's add/remove changes in a transformers tokenizer, to compare before and after: a fast
    one's serialized backend; transformers 4's slow one's added-token table (each token's settings), its split trie
    and its length."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        return backend.to_str()
    table = [(i, t.content, t.single_word, t.lstrip, t.rstrip, t.normalized, t.special)
             for i, t in sorted(tokenizer._added_tokens_decoder.items())]
    return (table, sorted(tokenizer._added_tokens_encoder.items()), json.dumps(tokenizer.tokens_trie.data, sort_keys=True),
            len(tokenizer))
