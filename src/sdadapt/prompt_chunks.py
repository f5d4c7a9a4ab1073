"""A1111's 75-token chunks of a prompt with ``BREAK`` (``modules/sd_hijack_clip.py`` ``tokenize_line``).

A1111 encodes a prompt in chunks of ``C - 2`` tokens (75 for CLIP), each ``<BOS> tokens <EOS>`` padded
to ``C`` and encoded on its own; the chunks' states are concatenated, ``(B, n * C, D)``. Its tokens are
cut into chunks:

* at ``BREAK`` (a word of the prompt, :func:`sdadapt.prompt_weights.parse_prompt_attention` with
  ``breaks=True``): the chunk so far is closed and padded, the next one starts;
* when a chunk is full: the next one starts — but if a comma was among its last
  ``comma_backtrack`` tokens (A1111's "Prompt word wrap length limit", default 20), the tokens after
  that comma move to the next chunk;
* the padding is ``<EOS>``; for a tokenizer whose pad token is another (SD2, SDXL's second encoder)
  everything after a chunk's first ``<EOS>`` becomes the pad token (A1111's ``process_tokens``).

* a textual-inversion embedding of ``k > 1`` vectors (its tokens ``name name_1 … name_{k-1}``, added to
  the tokenizer by :func:`sdadapt.inject_embedding`) that does not fit in the chunk's room starts the next
  chunk whole (A1111's ``if len(chunk.tokens) + emb_len > self.chunk_length: next_chunk()``).

An empty prompt is one chunk of padding; a prompt ending in ``BREAK`` adds no empty chunk after it.
Each chunk's tokens carry their emphasis weights (1 at ``<BOS>``, ``<EOS>`` and the padding); A1111's
"Original" emphasis multiplies a chunk's states by them and rescales the chunk to its unweighted
mean — per chunk (:meth:`sdadapt.diffusers_system.DiffusersSystem` does that for prompts with BREAK).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

__all__ = ["COMMA_BACKTRACK", "has_break", "needs_chunks", "prompt_chunks"]

#: A1111's default "Prompt word wrap length limit" (``comma_padding_backtrack``)
COMMA_BACKTRACK = 20
_BREAK_WORD = re.compile(r"\bBREAK\b")


def has_break(text: str) -> bool:
    """Whether ``text`` holds the word ``BREAK`` (then :func:`prompt_chunks` lays it out)."""
    return _BREAK_WORD.search(text) is not None


def needs_chunks(tokenizer: Any, text: str, *, literal: bool = False) -> bool:
    """Whether A1111 lays ``text`` out in more than one chunk: it holds ``BREAK``, or its tokens (emphasis
    parsed, :func:`prompt_chunks`) do not fit one chunk of ``C - 2``; ``literal``: A1111's emphasis "None" (the
    text as it is: no ``BREAK``, no emphasis)."""
    return (not literal and has_break(text)) or prompt_chunks(tokenizer, text, literal=literal)[0].shape[0] > 1


def _embedding_runs(tokenizer: Any, ids: list[int]) -> list[int]:
    """For each position of ``ids``: the length of the textual-inversion token run starting there (diffusers'
    multi-vector names ``name name_1 …`` among the tokenizer's added tokens, or a one-token trigger's own vocabulary
    token followed by its ``<emb-name>_1 …``, :mod:`sdadapt.embeddings.tokens`; 1 elsewhere, also inside a run)."""
    added = tokenizer.get_added_vocab() if hasattr(tokenizer, "get_added_vocab") else {}
    names = {index: text for text, index in added.items()}
    runs = [1] * len(ids)
    for i, token in enumerate(ids):
        name = names.get(token)
        follower = names.get(ids[i + 1], "") if i + 1 < len(ids) and name is None else ""
        if follower.startswith("<emb-") and follower.endswith(">_1") and follower[:-2] not in added:
            name = follower[:-2]  # (a vocabulary token carrying an embedding's first vector)
        if name is None or runs[i] == 0:  # (not an added token, or inside a run found already)
            continue
        j = i + 1
        while j < len(ids) and names.get(ids[j]) == f"{name}_{j - i}":
            runs[j] = 0
            j += 1
        runs[i] = j - i
    return [max(run, 1) for run in runs]


def prompt_chunks(tokenizer: Any, text: str, *, comma_backtrack: int = COMMA_BACKTRACK,
                  literal: bool = False) -> tuple[Tensor, Tensor]:
    """``text`` (A1111 emphasis and ``BREAK``) as A1111's chunks.

    Args:
        tokenizer: sdadapt's or a transformers CLIP tokenizer; its ``model_max_length`` is ``C``.
        text: one prompt.
        comma_backtrack: the comma rule's reach in tokens (0: off).
        literal: A1111's emphasis "None": the text as it is, one piece of weight 1 (brackets and ``BREAK`` are
            words; its ``tokenize_line`` then has ``parsed = [[line, 1.0]]``).

    Returns:
        ``(ids, weights)``: (n, C) int64 token ids and (n, C) float32 weights, one row per chunk.
    """
    from .clip_tokenizer import special_token_ids
    from .prompt_weights import _piece_ids, parse_prompt_attention

    bos, eos, pad = special_token_ids(tokenizer)
    length = int(tokenizer.model_max_length) - 2
    comma = _piece_ids(tokenizer, ",")
    comma = comma[0] if len(comma) == 1 else None
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []

    def close() -> None:
        nonlocal tokens, weights
        fill = length - len(tokens)
        ids = [bos, *tokens, *[eos] * max(fill, 0), eos]
        if pad != eos:
            first = ids.index(eos)
            ids = ids[:first + 1] + [pad] * (len(ids) - first - 1)
        chunks.append((ids, [1.0, *weights, *[1.0] * max(fill, 0), 1.0]))
        tokens, weights = [], []

    last_comma = -1
    pieces = [(text, 1.0)] if literal else parse_prompt_attention(text, breaks=True, a1111=True)
    for piece, weight in pieces:
        if piece == "BREAK" and weight == -1:
            close()
            last_comma = -1
            continue
        piece_ids = _piece_ids(tokenizer, piece)
        for token, run in zip(piece_ids, _embedding_runs(tokenizer, piece_ids)):
            if token == comma:
                last_comma = len(tokens)
            elif (comma_backtrack and len(tokens) == length and last_comma != -1
                  and len(tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                close()
                last_comma = -1
                tokens, weights = moved, moved_weights
            if len(tokens) == length or (run > 1 and len(tokens) + run > length >= run):
                close()  # (full, or a k-vector embedding that does not fit: it starts the next chunk whole)
                last_comma = -1
            tokens.append(token)
            weights.append(weight)
    if tokens or not chunks:
        close()
    return (torch.tensor([ids for ids, _ in chunks], dtype=torch.long),
            torch.tensor([w for _, w in chunks], dtype=torch.float32))
