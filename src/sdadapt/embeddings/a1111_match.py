"""A1111's embedding matching on token ids, inside each emphasis piece.

A1111 (``modules/sd_hijack_clip.py`` ``tokenize_line``) parses a prompt's emphasis
(``prompt_parser.parse_prompt_attention``: pieces of equal weight merged, ``\\(`` unescaped), tokenizes each piece
on its own and scans its ids from the left; at each position ``EmbeddingDatabase.find_embedding_at_position``
(``modules/textual_inversion/textual_inversion.py``) tries the embeddings whose name's ids start with that id, the
longest name first (loading order among equal lengths), and the first one whose ids follow takes their place; the
scan goes on after it. So ``(cat)(s)`` is one piece ``cats`` (``cat`` + ``s</w>``: no ``cat</w>``), ``(ca)(t)`` is
``cat</w>``, ``atom-cat`` is ``a`` (a word-inner piece) and then ``tom-cat``, ``tom-cat-dog`` with ``tom-cat`` and
``cat-dog`` loaded is ``tom-cat`` and ``-dog``, and ``easynegative \\(1\\)`` is the file ``easynegative (1).pt``.

An embedding injected with ``inject_embedding(..., a1111=True)`` registers here, per tokenizer, an
:class:`A1111Name`: the name's ids and the ids A1111's vectors stand on (the alias tokens ``<emb-name>`` … of a name
of several tokens; a one-token name of ``k > 1`` vectors keeps its own id and its aliases ``<emb-name>_1`` …
follow). sdadapt's tokenizing paths (:func:`sdadapt.prompt_weights.weighted_token_ids`,
:func:`sdadapt.prompt_chunks.prompt_chunks`, :class:`sdadapt.diffusers_system.DiffusersSystem`'s plain ids) call
:func:`match_token_ids` on each piece's ids; with nothing registered on a tokenizer the ids are returned as they
are (the training paths, which never inject with ``a1111=True``, are untouched).

:func:`expand_a1111` writes the same matches into the prompt text (the alias tokens, for a caller that tokenizes the
text itself) wherever the text can say it exactly — the name starts a word of its piece and its characters are not
broken by prompt syntax, and its aliases hold no prompt syntax — and leaves the rest (``atom-cat``,
``(tom-)(cat)``, ``easynegative \\(1\\)``) to :func:`match_token_ids`; :func:`match_token_ids` of an expanded piece
is that of the original (an own id already followed by its aliases is left as is).
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from typing import Any

__all__ = ["A1111Name", "expand_a1111", "has_a1111_names", "match_token_ids", "register_name", "unregister_name"]

#: tokenizer -> the A1111 names registered on it, in loading order
_NAMES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: characters of A1111's prompt syntax: text holding one cannot be written into a prompt as it is
_PROMPT_SYNTAX = re.compile(r"[()\[\]\\:|]")


@dataclass(frozen=True, eq=False)
class A1111Name:
    """One embedding as A1111's database holds it.

    Attributes:
        name: the embedding's name (its file stem).
        ids: the name's token ids without BOS/EOS (A1111's lookup key).
        tokens: the ids written in their place (the vectors' ids); ``keep``: they start with ``ids``.
        text: the text written in the name's place by :func:`expand_a1111` (``keep``: after it, with a blank);
            ``None`` when it holds prompt syntax (then only :func:`match_token_ids` applies it).
        keep: a one-token name keeps its own id, its further vectors' aliases follow it.
    """

    name: str
    ids: tuple[int, ...]
    tokens: tuple[int, ...]
    text: str | None
    keep: bool = False


def register_name(tokenizer: Any, name: str, ids: list[int], tokens: list[int], text: str, *,
                  keep: bool = False) -> A1111Name:
    """Register an embedding on ``tokenizer`` (after its other names: A1111's loading order); returns the entry
    :func:`unregister_name` takes. ``text`` holding prompt syntax (``( ) [ ] \\ : |``) is never written."""
    if not ids or not tokens:
        raise ValueError(f"the embedding {name!r} needs its name's token ids and its vectors' ids "
                         f"(got {ids}, {tokens})")
    entry = A1111Name(name, tuple(int(i) for i in ids), tuple(int(i) for i in tokens),
                      None if _PROMPT_SYNTAX.search(text) else text, keep)
    _NAMES.setdefault(tokenizer, []).append(entry)
    return entry


def unregister_name(tokenizer: Any, entry: A1111Name) -> None:
    """Undo :func:`register_name` (a no-op for an entry not registered)."""
    names = _NAMES.get(tokenizer, [])
    if any(e is entry for e in names):
        names[:] = [e for e in names if e is not entry]


def has_a1111_names(tokenizer: Any) -> bool:
    """Whether an embedding is registered on ``tokenizer`` (its ids then go through :func:`match_token_ids`)."""
    try:
        return bool(_NAMES.get(tokenizer))
    except TypeError:  # (a tokenizer that cannot be weakly referenced holds none)
        return False


def _scan(names: list[A1111Name], ids: list[int]) -> list[tuple[int, A1111Name, bool]]:
    """A1111's left-to-right scan of one piece's ``ids``: ``(position, entry, done)`` per match, ``done`` for an
    own id already followed by its aliases (an expanded prompt)."""
    lookup: dict[int, list[A1111Name]] = {}
    for entry in names:
        lookup.setdefault(entry.ids[0], []).append(entry)
    for candidates in lookup.values():
        candidates.sort(key=lambda e: len(e.ids), reverse=True)  # (stable: loading order among equal lengths)
    found, i = [], 0
    while i < len(ids):
        candidates = lookup.get(ids[i], ())
        done = next((e for e in candidates if e.keep and ids[i : i + len(e.tokens)] == list(e.tokens)), None)
        entry = done or next((e for e in candidates if ids[i : i + len(e.ids)] == list(e.ids)), None)
        if entry is None:
            i += 1
            continue
        found.append((i, entry, done is not None))
        i += len(entry.tokens) if done is not None else len(entry.ids)
    return found


def match_token_ids(tokenizer: Any, ids: list[int]) -> list[int]:
    """One emphasis piece's token ids (no BOS/EOS) with the registered names put in as A1111 does: each match's
    ``ids`` replaced by its ``tokens``. ``ids`` itself when nothing is registered on ``tokenizer``."""
    names = _NAMES.get(tokenizer) if has_a1111_names(tokenizer) else None
    if not names:
        return ids
    out: list[int] = []
    start = 0
    for i, entry, done in _scan(names, list(ids)):
        out += ids[start:i]
        width = len(entry.tokens) if done else len(entry.ids)
        out += list(entry.tokens)
        start = i + width
    return out + list(ids[start:])


def expand_a1111(prompt: str, tokenizer: Any, *, only: A1111Name | None = None) -> str:
    """``prompt`` with the registered names' matches (all, or ``only`` that entry's, found by the scan over all of
    them) written as their alias tokens where the text can say it exactly (module docstring); idempotent."""
    from ..prompt_weights import attention_spans
    from .token_offsets import token_spans

    names = _NAMES.get(tokenizer) if has_a1111_names(tokenizer) else None
    if not names:
        return prompt
    edits: list[tuple[int, int, str]] = []  # (start, end, text) in the prompt
    added = set(tokenizer.get_added_vocab().values())  # (an added token ends the word before it, as "</w>" does)
    for piece, weight, where in attention_spans(prompt, breaks=True, a1111=True):
        if not piece.strip() or (piece == "BREAK" and weight == -1):
            continue
        ids, offsets = token_spans(tokenizer, piece)
        for i, entry, done in _scan(names, ids):
            if done or entry.text is None or (only is not None and entry is not only):
                continue
            first, last = int(offsets[i][0]), int(offsets[i + len(entry.ids) - 1][1]) - 1
            if entry.keep:  # (after the own token's last character: its weight, its word's other pieces kept)
                cut = where[last] + 1
                blank = "" if cut == len(prompt) or prompt[cut].isspace() else " "
                edits.append((cut, cut, f" {entry.text}{blank}"))
                continue
            chars = where[first : last + 1]
            if chars != tuple(range(chars[0], chars[0] + len(chars))):
                continue  # (prompt syntax between its characters: "(tom-)(cat)")
            if i and ids[i - 1] not in added and not tokenizer.convert_ids_to_tokens(ids[i - 1]).endswith("</w>"):
                continue  # (it starts inside a word, "atom-cat": the alias would end that word's first piece)
            edits.append((chars[0], chars[-1] + 1, entry.text))
    for start, end, text in sorted(edits, reverse=True):
        prompt = prompt[:start] + text + prompt[end:]
    return prompt
