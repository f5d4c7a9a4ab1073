"""A word-level tokenizer with a fixed vocabulary and spare tokens for new concepts.

Ids: ``<pad>`` 0, ``<unk>`` 1, ``<bos>`` 2, ``<eos>`` 3 (not 2: transformers' CLIP treats
``eos_token_id == 2`` as a legacy config and pools at the largest id instead of at ``<eos>``), then the toy world's words, then 16 spare
tokens ``<new0>`` … ``<new15>`` and ``sks`` (DreamBooth's rare token) that the pretrained model
never sees. Sequences are ``<bos> words <eos>`` padded with ``<pad>`` to :data:`MAX_LENGTH`; the
text encoder pools at the ``<eos>`` position like CLIP.

*Added words* (:meth:`ToyTokenizer.add_word`) map one prompt word to several ids — how a
textual-inversion trigger with ``k`` vectors becomes ``k`` tokens (``sdadapt.embeddings`` gives a
new trigger the next free spare tokens, ``<new0>`` first).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .shapes import BACKGROUNDS, COLOURS, POSITIONS, SHAPES, SIZES

__all__ = ["MAX_LENGTH", "VOCAB", "SPARE_TOKENS", "ToyTokenizer"]

MAX_LENGTH = 16
SPECIAL = ("<pad>", "<unk>", "<bos>", "<eos>")
WORDS = tuple(
    dict.fromkeys(
        ("a", "an", "the", "on", "in", "of", "with", "and", "photo", "picture", "style", "background", "shape")
        + tuple(SIZES)
        + tuple(COLOURS)
        + SHAPES
        + tuple(POSITIONS)
        + tuple(BACKGROUNDS)
    )
)
SPARE_TOKENS = tuple(f"<new{i}>" for i in range(16)) + ("sks",)
VOCAB = SPECIAL + WORDS + SPARE_TOKENS


class ToyTokenizer:
    """``tokenizer(["a red circle", ...]) -> (B, 16) int64``; unknown words map to ``<unk>``."""

    pad_id, unk_id, bos_id, eos_id = 0, 1, 2, 3

    def __init__(self) -> None:
        self.vocab = VOCAB
        self.ids = {word: i for i, word in enumerate(VOCAB)}
        #: added words: prompt word -> the ids it becomes (textual-inversion triggers)
        self.added: dict[str, tuple[int, ...]] = {}

    def __len__(self) -> int:
        return len(self.vocab)

    def token_id(self, word: str) -> int:
        """Id of one vocabulary word (``KeyError`` with the spare tokens listed if absent)."""
        if word not in self.ids:
            raise KeyError(f"{word!r} is not in the toy vocabulary; new concepts use one of {list(SPARE_TOKENS)}")
        return self.ids[word]

    def add_word(self, word: str, ids: tuple[int, ...] | list[int]) -> None:
        """Make the prompt word ``word`` (lower case, one word) encode as ``ids``.

        Raises:
            ValueError: not one lower-case word, already added, or ids outside the vocabulary.
        """
        if not word or word != word.lower() or len(word.replace(",", " ").split()) != 1:
            raise ValueError(f"the toy tokenizer adds single lower-case words (no spaces or commas), got {word!r}")
        if word in self.added:
            raise ValueError(f"{word!r} is already an added word ({len(self.added[word])} tokens); remove it first")
        if not ids or any(not 0 <= int(i) < len(self.vocab) for i in ids):
            raise ValueError(f"ids for {word!r} must be 1+ ids of the {len(self.vocab)}-word vocabulary, got {list(ids)}")
        self.added[word] = tuple(int(i) for i in ids)

    def remove_word(self, word: str) -> None:
        """Undo :meth:`add_word` (``KeyError`` if ``word`` was not added)."""
        del self.added[word]

    def free_spare_ids(self) -> list[int]:
        """Ids of the spare ``<newN>`` tokens no added word uses, in order."""
        used = {i for ids in self.added.values() for i in ids}
        return [self.ids[t] for t in SPARE_TOKENS if t.startswith("<new") and self.ids[t] not in used]

    def encode(self, text: str) -> list[int]:
        words = text.lower().replace(",", " ").split()
        body = [i for w in words for i in self.added.get(w, (self.ids.get(w, self.unk_id),))]
        if len(body) > MAX_LENGTH - 2:
            raise ValueError(f"prompt {text!r} has {len(body)} tokens; the toy text encoder takes at most {MAX_LENGTH - 2}")
        ids = [self.bos_id] + body + [self.eos_id]
        return ids + [self.pad_id] * (MAX_LENGTH - len(ids))

    def __call__(self, texts: list[str] | str) -> Tensor:
        if isinstance(texts, str):
            texts = [texts]
        return torch.tensor([self.encode(t) for t in texts], dtype=torch.long)

    def decode(self, ids: Tensor | list[int]) -> str:
        out = []
        for i in list(ids.tolist() if isinstance(ids, Tensor) else ids):
            if i in (self.pad_id, self.bos_id):
                continue
            if i == self.eos_id:
                break
            out.append(self.vocab[i])
        return " ".join(out)
