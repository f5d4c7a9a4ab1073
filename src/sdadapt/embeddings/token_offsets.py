"""Token ids and their character spans in the text, from a fast tokenizer or transformers 4's slow ``CLIPTokenizer``.

A fast (tokenizers-backed) tokenizer reports each token's span itself (``return_offsets_mapping``). transformers 4's
slow Python ``CLIPTokenizer`` — what ``CLIPTokenizer.from_pretrained`` and a diffusers pipeline give under
transformers 4, as in kohya's sd-scripts, OneTrainer and A1111 — cannot; its spans are found here by walking its
tokens through the text: an added token is its own text, a BPE token its bytes (``byte_decoder``) without ``</w>``,
looked up from where the previous token ended in the text lowercased as the tokenizer lowercases it (a character
whose lowercase is two, ``İ``, spans both). A token that is part of one character (a multi-byte character split by
BPE) spans that whole character, as the fast one reports. Text the slow tokenizer rewrites before splitting it
(Unicode normalisation of decomposed accents, ``ftfy`` fixes when ftfy is installed) cannot be walked: an error says
to use the fast tokenizer.
"""

from __future__ import annotations

import unicodedata
from typing import Any

__all__ = ["TokenSpanError", "token_spans"]


class TokenSpanError(ValueError):
    """A slow tokenizer's tokens could not be found in order in the text (it rewrote the text: ``ftfy`` quotes,
    Unicode normalisation)."""


def token_spans(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """The ids of ``text`` without BOS/EOS and each one's ``(start, end)`` character span in ``text``.

    Args:
        tokenizer: a transformers CLIP tokenizer, fast or transformers 4's slow one.
        text: the prompt (or a piece of it).

    Returns:
        ``(ids, spans)``, two lists of one length: ``ids[i]`` covers ``text[spans[i][0]:spans[i][1]]``.

    Raises:
        TokenSpanError: a slow tokenizer rewrote ``text`` so that its tokens cannot be placed (says to use
            ``CLIPTokenizerFast``).
    """
    if getattr(tokenizer, "is_fast", False):
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [int(i) for i in encoded["input_ids"]], [(int(a), int(b)) for a, b in encoded["offset_mapping"]]
    tokens = tokenizer.tokenize(text)
    ids = [int(i) for i in tokenizer.convert_tokens_to_ids(tokens)]
    return ids, _walk(tokenizer, text, tokens)


def _walk(tokenizer: Any, text: str, tokens: list[str]) -> list[tuple[int, int]]:
    """Each slow-tokenizer token's span in ``text`` (module docstring)."""
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.byte_decoder
    # (the text lowercased as the tokenizer does, and each lowered character's index in text: "İ" lowers to two)
    lowered, where = [], []
    for i, c in enumerate(text):
        lowered.extend(c.lower())
        where.extend([i] * len(c.lower()))
    lowered, where = "".join(lowered), where + [len(text)]
    spans: list[tuple[int, int]] = []
    pending: list[int] = []  # (tokens holding the first bytes of a character not yet complete)
    held = bytearray()
    at = 0  # (in lowered)
    for token in tokens:
        if token in added:  # (matched in the text as written; found here in the lowered text, where it stands too)
            piece = token.lower()
        else:
            held += bytes(decoder[c] for c in token.removesuffix("</w>"))
            try:
                piece = held.decode("utf-8")
            except UnicodeDecodeError:  # (a character split over tokens: placed when its last byte comes)
                pending.append(len(spans))
                spans.append((0, 0))
                continue
            held.clear()
        start = lowered.find(piece, at)
        if start < 0 or not _skippable(lowered[at:start]):
            raise TokenSpanError(
                f"{type(tokenizer).__name__} rewrote the text {text!r} (token {token!r} not found after character "
                f"{where[at]}): sdadapt cannot place its tokens; load the tokenizer with transformers.CLIPTokenizerFast"
            )
        at = start + len(piece)
        span = (where[start], where[at - 1] + 1)
        for i in pending:
            spans[i] = span
        pending.clear()
        spans.append(span)
    return spans


def _skippable(gap: str) -> bool:
    """Whether text between two tokens is what the slow CLIP tokenizer drops: whitespace and control characters."""
    return all(c.isspace() or unicodedata.category(c).startswith("C") for c in gap)
