"""Textual-inversion embeddings: new token rows for any text encoder (see ``docs/textual-inversion.md``).

* :mod:`.embedding` — :class:`Embedding`, the value (trigger word + ``(k, dim)`` vectors per encoder);
* :mod:`.table` — the pure splice (:func:`splice_rows`), finding a token table in any encoder
  (:func:`find_token_embedding`), initial vectors (:func:`initial_rows`) and :class:`TokenRows`,
  the thin hook-based holder of the new rows;
* :mod:`.tokens` — the tokenizer side: transformers ``CLIPTokenizer`` and the toy tokenizer
  behind :class:`TokenizerSide`;
* :mod:`.a1111_match` — A1111's matching of embedding names by token ids inside each emphasis piece
  (``inject_embedding(..., a1111=True)``, ``generate``'s embeddings);
* :mod:`.inject` — :func:`inject_embedding` / :class:`EmbeddingHandle` (exactly reversible) and
  :func:`initial_embedding`.

Files (A1111, kohya, diffusers) are read and written by :func:`sdadapt.load_embedding` and
:func:`sdadapt.save_embedding` (:mod:`sdadapt.formats.embeddings`).
"""

from .embedding import ENCODER_KEY, ENCODER_KEYS, SDXL_KEYS, Embedding
from .inject import EmbeddingHandle, initial_embedding, inject_embedding
from .table import (
    TokenRows,
    find_token_embedding,
    initial_rows,
    slot_table,
    splice_rows,
)
from .tokens import (
    CLIPTokenizerSide,
    TokenizerSide,
    WordTableSide,
    expand_prompt,
    token_strings,
    tokenizer_side,
)

__all__ = [
    "ENCODER_KEY",
    "ENCODER_KEYS",
    "SDXL_KEYS",
    "CLIPTokenizerSide",
    "Embedding",
    "EmbeddingHandle",
    "TokenRows",
    "TokenizerSide",
    "WordTableSide",
    "expand_prompt",
    "find_token_embedding",
    "initial_embedding",
    "initial_rows",
    "inject_embedding",
    "slot_table",
    "splice_rows",
    "token_strings",
    "tokenizer_side",
]
