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

__all__ = ["attention_spans", "parse_prompt_attention", "weighted_token_ids"]


def _attention_pattern(blanks: str) -> re.Pattern[str]:
    """A1111's ``re_attention`` with ``blanks`` allowed around an explicit weight (``""``: kohya's copy)."""
    return re.compile(rf"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escaped brackets and backslashes
\(|\[|:{blanks}([+-]?[.\d]+){blanks}\)|\)|]|  # opening, an explicit weight closing a (, closing
[^\\()\[\]:]+|:               # text
""", re.VERBOSE)


#: the emphasis tokens: kohya's copy of A1111's pattern (sd-scripts ``re_attention``: ``(cat:1.2)`` only) and
#: A1111's own (``modules/prompt_parser.py`` ``re_attention`` at 28bd8e142d5f: ``(cat: 1.2 )`` too)
_ATTENTION = {False: _attention_pattern(""), True: _attention_pattern(r"\s*")}
_UP, _DOWN = 1.1, 1 / 1.1
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)


def parse_prompt_attention(text: str, *, breaks: bool = False, a1111: bool = False) -> list[tuple[str, float]]:
    """``text`` as ``[(piece, weight), ...]`` by A1111's emphasis rules (module docstring, step 1).

    ``breaks``: A1111's ``BREAK`` (the word, with the blanks around it) in plain text becomes a
    ``("BREAK", -1.0)`` piece (:mod:`sdadapt.prompt_chunks` starts a new chunk there); like A1111,
    brackets around it multiply that -1 as well, and such a piece is then read as the word.

    ``a1111``: A1111 1.x's pattern, which allows blanks around an explicit weight (``(cat: 1.2 )`` is
    ``cat`` at 1.2); by default kohya's copy (``--weighted_captions``, its sample prompts), which reads
    ``: 1.2 `` as text and the ``)`` as x1.1. Nothing else differs.

    >>> parse_prompt_attention("a (red:1.5) [dog]")
    [('a ', 1.0), ('red', 1.5), (' ', 1.0), ('dog', 0.9090909090909091)]
    >>> parse_prompt_attention("(cat: 1.2)", a1111=True), parse_prompt_attention("(cat: 1.2)")
    ([('cat', 1.2)], [('cat: 1.2', 1.1)])
    """
    return [(piece, weight) for piece, weight, _ in attention_spans(text, breaks=breaks, a1111=a1111)]


def attention_spans(text: str, *, breaks: bool = False,
                    a1111: bool = False) -> list[tuple[str, float, tuple[int, ...]]]:
    """:func:`parse_prompt_attention`'s pieces with, for each character of a piece, its index in ``text``:
    ``[(piece, weight, where), ...]``, ``len(where) == len(piece)`` and ``piece[j] == text[where[j]]`` (an escaped
    ``\\(`` is the ``(`` after the backslash). ``breaks``, ``a1111``: :func:`parse_prompt_attention`'s.

    What an edit of ``text`` needs to reach the characters A1111 tokenizes (``sdadapt.embeddings.a1111_match``).

    >>> attention_spans("(ca)(t)")
    [('cat', 1.1, (1, 2, 5))]
    """
    pieces: list[list[Any]] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            piece[1] *= factor

    for match in _ATTENTION[a1111].finditer(text):
        token, weight, at = match.group(0), match.group(1), match.start()
        if token.startswith("\\"):
            pieces.append([token[1:], 1.0, tuple(range(at + 1, match.end()))])
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
            start = 0
            for found in _BREAK.finditer(token):
                pieces.append([token[start:found.start()], 1.0, tuple(range(at + start, at + found.start()))])
                word = at + found.start() + found.group(0).index("BREAK")
                pieces.append(["BREAK", -1.0, tuple(range(word, word + 5))])
                start = found.end()
            pieces.append([token[start:], 1.0, tuple(range(at + start, match.end()))])
        else:
            pieces.append([token, 1.0, tuple(range(at, match.end()))])
    for start in round_open:
        scale(start, _UP)
    for start in square_open:
        scale(start, _DOWN)
    if not pieces:
        pieces = [["", 1.0, ()]]
    merged = [pieces[0]]
    for piece in pieces[1:]:
        if piece[1] == merged[-1][1]:
            merged[-1][0] += piece[0]
            merged[-1][2] += piece[2]
        else:
            merged.append(piece)
    return [(str(piece), float(weight), where) for piece, weight, where in merged]


def _piece_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` (one emphasis piece) without ``<BOS>``/``<EOS>`` (sdadapt's or a transformers CLIP
    tokenizer), with the embeddings injected with ``a1111=True`` matched in them as A1111 matches them
    (:func:`sdadapt.embeddings.a1111_match.match_token_ids`; the plain ids when there are none)."""
    from .clip_text import added_tokens, clip_clean
    from .clip_tokenizer import CLIPTokenizer

    text = clip_clean(text, added=added_tokens(tokenizer))  # (the slow CLIP tokenizer's clean-up: kohya's, A1111's ids)
    if isinstance(tokenizer, CLIPTokenizer):
        return tokenizer.encode_words(text)
    from .embeddings.a1111_match import match_token_ids

    return match_token_ids(tokenizer, list(tokenizer(text).input_ids[1:-1]))


def weighted_token_ids(tokenizer: Any, prompts: list[str], length: int, *,
                       a1111: bool = False) -> tuple[Tensor, Tensor]:
    """Token ids and per-token weights of emphasised ``prompts`` (module docstring, step 2).

    Args:
        tokenizer: sdadapt's :class:`~sdadapt.clip_tokenizer.CLIPTokenizer` or a transformers CLIP tokenizer.
        prompts: B captions with A1111 emphasis.
        length: ``L`` ids per prompt (77; ``n * 75 + 2`` for a long prompt).
        a1111: the emphasis read by A1111's pattern (:func:`parse_prompt_attention`); by default kohya's.

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
        for piece, weight in parse_prompt_attention(prompt, a1111=a1111):
            tokens = _piece_ids(tokenizer, piece)
            ids += tokens
            weights += [weight] * len(tokens)
            if len(ids) > length - 2:
                break
        ids, weights = ids[: length - 2], weights[: length - 2]
        all_ids.append([bos, *ids, eos] + [pad] * (length - 2 - len(ids)))
        all_weights.append([1.0, *weights] + [1.0] * (length - 1 - len(weights)))
    return torch.tensor(all_ids, dtype=torch.long), torch.tensor(all_weights, dtype=torch.float32)
