"""A1111-style emphasis in captions, kohya's ``--weighted_captions``: ``(word)``, ``(word:1.3)``, ``[word]``.

kohya sd-scripts (``library/strategy_base.py`` ``TokenizeStrategy._get_weighted_input_ids``,
``library/strategy_sd.py`` / ``strategy_sdxl.py`` ``encode_tokens_with_weights``):

1. :func:`parse_prompt_attention` splits the caption into ``(text, weight)`` pieces, A1111's rules:
   ``(…)`` multiplies by 1.1, ``[…]`` by 1/1.1, ``(…:w)`` by ``w``; nested brackets multiply; an
   unclosed bracket acts to the end; ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are literal; pieces
   of equal weight are merged.
2. each piece is tokenized on its own (without ``<BOS>``/``<EOS>``), every token taking its piece's
   weight; the tokens are cut to ``L - 2`` and laid out as ``<BOS> tokens <EOS> <PAD> …`` with
   weight 1 for ``<BOS>``, ``<EOS>`` and the padding (:func:`weighted_token_ids`).
3. the text encoder's output states (after clip skip's final norm; a long prompt's windows joined,
   :mod:`sdadapt.text_chunks`) are multiplied token by token by the weights:
   ``states (B, L, D) * weights (B, L, 1)``. SDXL: each encoder's states by its own tokenizer's
   weights; the pooled ``text_embeds`` are not weighted. The mean is NOT renormalised (the older
   ``get_weighted_text_embeddings`` of kohya's custom_train_functions.py did that; train_network.py
   no longer calls it).

A caption without brackets gives the ids the plain tokenizer gives and weights of 1 everywhere.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

__all__ = ["parse_prompt_attention", "weighted_token_ids"]

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escaped brackets and backslashes
\(|\[|:([+-]?[.\d]+)\)|\)|]|  # opening, an explicit weight closing a (, closing
[^\\()\[\]:]+|:               # text
""", re.VERBOSE)
_UP, _DOWN = 1.1, 1 / 1.1
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_prompt_attention(text: str, *, breaks: bool = False) -> list[tuple[str, float]]:
    """``text`` as ``[(piece, weight), ...]`` by A1111's emphasis rules (module docstring, step 1).

    ``breaks``: A1111's ``BREAK`` (the word, with the blanks around it) in plain text becomes a
    ``("BREAK", -1.0)`` piece (:mod:`sdadapt.prompt_chunks` starts a new chunk there); like A1111,
    brackets around it multiply that -1 as well, and such a piece is then read as the word.

    >>> parse_prompt_attention("a (red:1.5) [dog]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('dog', 0.9090909090909091)]
    """
    pieces: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION.finditer(text):
        token, weight = match.group(0), match.group(1)
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0])
        elif token == "(":
            round_open.append(len(pieces))
        elif token == "[":
            square_open.append(len(pieces))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:  # the pattern lets "(word:1.2.3)" or "(word:.)" through
                raise ValueError(f"caption {text!r}: the emphasis weight {weight!r} is not a number; write "
                                 "(word:1.2), or escape literal brackets as \\( \\)") from None
            scale(round_open.pop(), factor)
        elif token == ")" and round_open:
            scale(round_open.pop(), _UP)
        elif token == "]" and square_open:
            scale(square_open.pop(), _DOWN)
        elif breaks:
            for index, part in enumerate(_BREAK.split(token)):
                if index:
                    pieces.append(["BREAK", -1.0])
                pieces.append([part, 1.0])
        else:
            pieces.append([token, 1.0])
    for start in round_open:
        scale(start, _UP)
    for start in square_open:
        scale(start, _DOWN)
    if not pieces:
        pieces = [["", 1.0]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
        else:
            merged.append(piece)
    return [(str(piece), float(weight)) for piece, weight in merged]


def _piece_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without ``<BOS>``/``<EOS>`` (sdadapt's or a transformers CLIP tokenizer)."""
    from .clip_tokenizer import CLIPTokenizer

    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer.encode_words(text)
    return list(tokenizer(text).input_ids[1:-1])


def weighted_token_ids(tokenizer: Any, prompts: list[str], length: int) -> tuple[Tensor, Tensor]:
    """Token ids and per-token weights of emphasised ``prompts`` (module docstring, step 2).

    Args:
        tokenizer: sdadapt's :class:`~sdadapt.clip_tokenizer.CLIPTokenizer` or a transformers CLIP tokenizer.
        prompts: B captions with A1111 emphasis.
        length: ``L`` ids per prompt (77; ``n * 75 + 2`` for a long prompt).

    Returns:
        ``(ids, weights)``: (B, L) int64 ids ``<BOS> tokens <EOS> <PAD> …`` and (B, L) float32
        weights (1 at ``<BOS>``, ``<EOS>`` and the padding).
    """
    if length < 2:
        raise ValueError(f"a prompt needs room for <BOS> and <EOS>: length must be >= 2, got {length}")
    from .clip_tokenizer import special_token_ids

    bos, eos, pad = special_token_ids(tokenizer)
    all_ids, all_weights = [], []
    for prompt in prompts:
        ids: list[int] = []
        weights: list[float] = []
        for piece, weight in parse_prompt_attention(prompt):
            tokens = _piece_ids(tokenizer, piece)
            ids += tokens
            weights += [weight] * len(tokens)
            if len(ids) > length - 2:
                break
        ids, weights = ids[: length - 2], weights[: length - 2]
        all_ids.append([bos, *ids, eos] + [pad] * (length - 2 - len(ids)))
        all_weights.append([1.0, *weights] + [1.0] * (length - 1 - len(weights)))
    return torch.tensor(all_ids, dtype=torch.long), torch.tensor(all_weights, dtype=torch.float32)
