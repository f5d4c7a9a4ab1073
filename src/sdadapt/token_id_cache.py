"""A bounded cache of token ids by caption text: a training step tokenises the same captions again.

Captions repeat (every epoch, every repeat of an image, the class prompts of prior preservation),
and tokenising one with a CLIP tokenizer costs tens of µs of Python per caption, each step (issue
16: a batch-1 step on a fast GPU is host-bound). :class:`TokenIdCache` keeps the ids a caption gave
and hands them back, identical, the next time.

**Key.** The exact caption text (no case folding, no white-space clean-up: the tokenizer decides
what is the same) plus a *state* that holds everything else deciding the ids: the tokenizer
objects, their vocabulary size (adding an embedding's tokens changes it), their padding id and
sides, the sequence length (``max_token_length``: 77, 152 or 227 ids, :mod:`sdadapt.text_chunks`).
A lookup with another state empties the cache first (:func:`tokenizer_state` builds a tokenizer's
part; an embedding's removal swaps the transformers tokenizer's backend object, which the state
holds, so its identity is never reused). Weighted captions (:mod:`sdadapt.prompt_weights`) keep
their own cache, the ids and the weights side by side.

**Memory.** The ids stay on the host (each batch is copied to the device as before); at most
``max_entries`` captions are kept, the least recently used dropped first, so shuffled or
ever-new captions never grow it past the bound. Per caption: ``L`` int64 ids (77 x 8 B = 616 B; an
SDXL pair twice that; weighted captions add ``L`` float32 weights). A dataset with more distinct
captions than the bound re-tokenises the ones dropped; give a system a larger cache with
``system.token_cache = TokenIdCache(max_entries=N)``.

What it cannot see: an in-place edit of a tokenizer's normaliser or post-processor, or a new
``bos_token``/``eos_token`` (anything but adding tokens, the padding token and sides) after ids were
cached; call :meth:`TokenIdCache.clear` after such an edit. Not thread-safe: one cache per system,
used from the thread that runs the training loop (sdadapt's data pipeline tokenises there).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["DEFAULT_MAX_ENTRIES", "TokenIdCache", "tokenizer_state"]

#: captions a cache keeps by default (about 2.5 MB of SD1 ids, 5 MB of SDXL pairs)
DEFAULT_MAX_ENTRIES = 4096
_VALUES = (int, float, str, bool, type(None))


def tokenizer_state(tokenizer: Any) -> tuple | None:
    """What, besides the text and the length, decides the ids ``tokenizer`` gives, as a tuple for
    :meth:`TokenIdCache.lookup`; ``None`` for a tokenizer whose state cannot be read cheaply (its
    ids are then not cached).

    sdadapt's :class:`~sdadapt.clip_tokenizer.CLIPTokenizer`: the object, its vocabulary size and
    special ids. A transformers fast tokenizer: the object, its backend (``add_tokens`` grows it in
    place; removing an embedding's tokens replaces it), the vocabulary size with added tokens, the
    padding id and the padding / truncation sides. transformers 4's slow ``CLIPTokenizer``: the object, its
    added-token table and split trie (an embedding's removal replaces both) and the table's size (``add_tokens``
    grows it in place), the padding id and sides.
    """
    from .clip_tokenizer import CLIPTokenizer

    if isinstance(tokenizer, CLIPTokenizer):
        return (tokenizer, len(tokenizer.encoder), tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id)
    sides = tuple(getattr(tokenizer, a, None) for a in ("pad_token_id", "padding_side", "truncation_side"))
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "get_vocab_size"):
        return (tokenizer, backend, backend.get_vocab_size(with_added_tokens=True), *sides)
    table, trie = getattr(tokenizer, "_added_tokens_decoder", None), getattr(tokenizer, "tokens_trie", None)
    if isinstance(table, dict) and trie is not None:  # (transformers 4's slow tokenizer: its added tokens, its trie)
        return (tokenizer, table, trie, len(table), *sides)
    return None


def _same_state(a: object, b: object) -> bool:
    """Equal states: values (ints, strings) by value, tuples item by item (the toy's added-word table,
    ``((word, ids), ...)``, is built anew per lookup), objects (tokenizers, backends) by identity."""
    if a is b:
        return True
    if type(a) is tuple:
        return type(b) is tuple and len(a) == len(b) and all(x is y or _same_state(x, y) for x, y in zip(a, b))
    return isinstance(a, _VALUES) and type(a) is type(b) and a == b


class TokenIdCache:
    """Caption text -> its rows of token ids (and weights), on the host; least recently used dropped.

    ``cache.lookup(texts, encode, state=...)`` returns what ``encode(texts)`` returns — a tuple of
    host tensors, each (B, ...) — taking the rows of captions seen before (under the same
    ``state``) from the cache and encoding only the others (each distinct caption once).

    Args:
        max_entries: captions kept at most (>= 1).

    Raises:
        ValueError: ``max_entries`` < 1.
    """

    def __init__(self, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        if int(max_entries) < 1:
            raise ValueError(f"a token-id cache keeps at least one caption: max_entries must be >= 1, got {max_entries}")
        self.max_entries = int(max_entries)
        self._rows: OrderedDict[str, tuple[Tensor, ...]] = OrderedDict()
        self._state: tuple | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, text: object) -> bool:
        return text in self._rows

    def clear(self) -> None:
        """Drop every cached caption (and the state they were encoded under)."""
        self._rows.clear()
        self._state = None

    def cached_tensors(self) -> list[Tensor]:
        """Every tensor the cache holds (to check where they live and what they take)."""
        return [t for row in self._rows.values() for t in row]

    def lookup(self, texts: Sequence[str], encode: Callable[[list[str]], tuple[Tensor, ...]], *,
               state: tuple) -> tuple[Tensor, ...]:
        """``encode(list(texts))`` with the rows of known captions taken from the cache.

        Args:
            texts: B captions (exact text; repeats allowed).
            encode: captions (M) -> a tuple of host tensors, each (M, ...), row ``i`` depending only
                on caption ``i`` (called with the captions not cached yet, each once).
            state: everything else that decides the ids (:func:`tokenizer_state` parts, the
                length); another state than the cached rows' empties the cache first.

        Returns:
            a tuple of host tensors, each (B, ...): the rows of ``texts`` in order.

        Raises:
            ValueError: ``encode`` returned other than one row per caption, or a tensor not on the host.
        """
        if self._state is None or not _same_state(self._state, state):
            self._rows.clear()
            self._state = state
        rows = self._rows
        missing = [text for text in dict.fromkeys(texts) if text not in rows]
        if missing:
            encoded = encode(missing)
            for t in encoded:
                if t.shape[0] != len(missing) or t.device.type != "cpu":
                    raise ValueError(f"the token-id encoder gave {tuple(t.shape)} on {t.device} for {len(missing)} "
                                     "captions: it must give one row per caption, on the host")
            for i, text in enumerate(missing):
                rows[text] = tuple(t[i].clone() for t in encoded)  # (a row of its own: no view of the batch)
        picked = []
        for text in texts:
            rows.move_to_end(text)
            picked.append(rows[text])
        while len(rows) > self.max_entries:  # (after the batch is gathered: a batch larger than the bound works)
            rows.popitem(last=False)
        return tuple(torch.stack([row[k] for row in picked]) for k in range(len(picked[0]))) if picked else \
            encode([])
