"""Put an :class:`~sdadapt.embeddings.Embedding` into a text encoder + tokenizer, and take it out.

    handle = sdadapt.inject_embedding(text_encoder, tokenizer, sdadapt.load_embedding("my-style.pt"))
    ids = tokenizer(handle.expand("a photo in the style of my-style"), ...)   # trigger -> its k tokens
    ...
    handle.remove()                                # encoder and tokenizer exactly as before

SDXL: pass both encoders and tokenizers, keyed like the embedding (or as a pair in pipeline order)::

    sdadapt.inject_embedding({"clip_l": pipe.text_encoder, "clip_g": pipe.text_encoder_2},
                             {"clip_l": pipe.tokenizer, "clip_g": pipe.tokenizer_2}, embedding)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from .embedding import ENCODER_KEY, SDXL_KEYS, Embedding
from .table import TokenRows, find_token_embedding, initial_rows
from .tokens import TokenizerSide, tokenizer_side

__all__ = ["EmbeddingHandle", "initial_embedding", "inject_embedding"]

_WIDTHS = {768: "SD1 / SDXL CLIP-L", 1024: "SD2 OpenCLIP-H", 1280: "SDXL CLIP-G"}


def _per_key(value, keys: tuple[str, ...], what: str, *, shared_ok: bool):
    """``{key: part}`` from a single object, a mapping keyed like the embedding, or a sequence in key order."""
    if isinstance(value, Mapping):
        missing = [k for k in keys if k not in value]
        if missing:
            raise ValueError(f"{what} for keys {list(keys)} is missing {missing} (got keys {sorted(value)})")
        return {k: value[k] for k in keys}
    if isinstance(value, Sequence) and not isinstance(value, (str, nn.Module)):
        if len(value) != len(keys):
            raise ValueError(f"{len(keys)} {what}(s) needed for keys {list(keys)}, got {len(value)}")
        return dict(zip(keys, value))
    if len(keys) == 1 or shared_ok:
        return dict.fromkeys(keys, value)
    raise ValueError(
        f"an SDXL embedding ({'/'.join(keys)}) needs both text encoders: pass "
        "{'clip_l': pipe.text_encoder, 'clip_g': pipe.text_encoder_2} (or the pair in that order)"
    )


def _width_hint(dim: int) -> str:
    return _WIDTHS.get(dim, "another model")


class EmbeddingHandle:
    """What :func:`inject_embedding` changed, and how to undo it.

    Attributes:
        name: the trigger word.
        rows: ``{encoder key: TokenRows}`` — ``rows[key].rows`` is the ``(k, dim)`` parameter.
        token_ids: ``{encoder key: [ids]}`` the trigger's ``k`` token ids in that encoder's tokenizer.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.rows: dict[str, TokenRows] = {}
        self.token_ids: dict[str, list[int]] = {}
        self._sides: list[TokenizerSide] = []
        self._removed = False

    def parameters(self) -> list[nn.Parameter]:
        """The ``(k, dim)`` row parameters, one per encoder (what an optimiser trains)."""
        return [r.rows for r in self.rows.values()]

    def expand(self, prompt: str) -> str:
        """The prompt with the trigger spelled as its ``k`` tokens where the tokenizer needs it
        (transformers tokenizers: ``name name_1 …``, diffusers' rule); the toy tokenizer expands itself."""
        for side in self._sides:
            prompt = side.expand(prompt)
        return prompt

    @property
    def matched_by_ids(self) -> bool:
        """True when every tokenizer side matches the name by token ids inside each emphasis piece (``a1111=True``:
        :mod:`sdadapt.embeddings.a1111_match`), so the model's own tokenizing finds it and the text needs no
        :meth:`expand` — as A1111, which schedules prompt editing on the text and matches each scheduled text."""
        return bool(self._sides) and all(getattr(side, "_entry", None) is not None for side in self._sides)

    @property
    def expands_itself(self) -> bool:
        """True when plain tokenization already gives the ``k`` tokens (no :meth:`expand` needed)."""
        return all(side.expands_itself for side in self._sides)

    def embedding(self, *, step: int | None = None, metadata: Mapping[str, str] | None = None) -> Embedding:
        """The current vectors as an :class:`Embedding` (detached CPU copies, the rows' dtype)."""
        self._check_alive()
        vectors = {key: r.rows.detach().to("cpu").clone() for key, r in self.rows.items()}
        return Embedding(self.name, vectors, step=step, metadata=dict(metadata or {}))

    @torch.no_grad()
    def load(self, embedding: Embedding) -> None:
        """Copy ``embedding``'s vectors into the rows (same keys and shapes)."""
        self._check_alive()
        for key, r in self.rows.items():
            value = embedding.vectors.get(key)
            if value is None or tuple(value.shape) != tuple(r.rows.shape):
                got = None if value is None else tuple(value.shape)
                raise ValueError(f"embedding {embedding.name!r}: {key} is {got}, the injected rows are {tuple(r.rows.shape)}")
            r.rows.copy_(value)

    def remove(self) -> None:
        """Take the rows out of the encoders and the tokens out of the tokenizers (idempotent)."""
        if self._removed:
            return
        for r in self.rows.values():
            r.remove()
        for side in reversed(self._sides):
            side.remove()
        self._removed = True

    def _check_alive(self) -> None:
        if self._removed:
            raise RuntimeError(f"embedding {self.name!r} was removed; inject it again to use it")

    def __repr__(self) -> str:
        shapes = {k: tuple(r.rows.shape) for k, r in self.rows.items()}
        return f"EmbeddingHandle(name={self.name!r}, rows={shapes}, removed={self._removed})"


def inject_embedding(text_encoder, tokenizer, embedding: Embedding, *, trainable: bool = False,
                     a1111: bool = False) -> EmbeddingHandle:
    """Add ``embedding``'s trigger word to the tokenizer(s) and its vectors to the text encoder(s).

    The trigger becomes ``k`` tokens (``k = embedding.count``) whose rows are spliced into the
    token-embedding output by hooks (:class:`~sdadapt.embeddings.table.TokenRows`): the encoder's
    weights and ``state_dict()`` keys do not change, and :meth:`EmbeddingHandle.remove` restores
    encoder and tokenizer exactly.

    Args:
        text_encoder: a text encoder (``CLIPTextModel``, the toy encoder, an LDM conditioner's
            embedder, a bare token ``nn.Embedding``); for SDXL ``{"clip_l": te, "clip_g": te_2}``
            or ``(te, te_2)``.
        tokenizer: ``CLIPTokenizer`` or the toy tokenizer; for SDXL ``{"clip_l": tok, "clip_g": tok_2}``,
            the pair, or one tokenizer shared by both.
        embedding: e.g. from :func:`sdadapt.load_embedding`.
        trainable: rows as float32 ``nn.Parameter`` s with gradients (training); else stored in the
            table's dtype without gradients.
        a1111: a name of several tokens (``my-style``) is matched by its token ids in the tokenized prompt, as
            A1111 matches it (``my - style`` too, ``amy-style`` not; :meth:`EmbeddingHandle.expand` writes its alias
            tokens ``<emb-my-style>`` …), instead of being added as the token ``my-style`` that diffusers'
            ``load_textual_inversion`` adds and its pipelines match as text (the default).

    Returns:
        an :class:`EmbeddingHandle`; prompts go through :meth:`EmbeddingHandle.expand` before a
        transformers tokenizer when ``k > 1`` (diffusers pipelines do this themselves).

    Raises:
        ValueError: vectors whose width is not the encoder's (names both), a trigger the tokenizer
            already has, or encoders that do not match the embedding's keys.
    """
    if not isinstance(embedding, Embedding):
        raise TypeError(f"inject_embedding takes an sdadapt Embedding (e.g. from load_embedding), got {type(embedding).__name__}")
    keys = embedding.encoders
    encoders = _per_key(text_encoder, keys, "text encoder", shared_ok=False)
    tokenizers = _per_key(tokenizer, keys, "tokenizer", shared_ok=True)
    tables: dict[str, tuple[str, nn.Embedding]] = {}
    for key, encoder in encoders.items():
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"the text encoder for {key!r} must be an nn.Module, got {type(encoder).__name__}")
        path, table = find_token_embedding(encoder)
        dim = embedding.dims[key]
        if dim != table.embedding_dim:
            raise ValueError(
                f"embedding {embedding.name!r}: its {key} vectors are {dim} wide ({_width_hint(dim)}) but the text "
                f"encoder's token embedding {path or '(the module)'} is {table.num_embeddings}×{table.embedding_dim} "
                f"({table.embedding_dim} wide, {_width_hint(table.embedding_dim)}): the embedding was made for another model"
            )
        tables[key] = (path, table)
    handle = EmbeddingHandle(embedding.name)
    sides: dict[int, tuple[TokenizerSide, list[int]]] = {}
    try:
        for key in keys:
            tok = tokenizers[key]
            if id(tok) not in sides:
                side = tokenizer_side(tok, a1111=a1111)
                ids = side.add(embedding.name, embedding.count)
                handle._sides.append(side)
                sides[id(tok)] = (side, ids)
            ids = sides[id(tok)][1]
            handle.token_ids[key] = ids
            handle.rows[key] = TokenRows(tables[key][1], ids, embedding.vectors[key], trainable=trainable)
    except BaseException:
        handle.remove()
        raise
    return handle


def initial_embedding(
    text_encoder,
    tokenizer,
    name: str,
    *,
    vectors: int = 1,
    init_word: str | None = None,
    sdxl: bool = False,
    generator: torch.Generator | None = None,
    repeat_in_place: bool = False,
) -> Embedding:
    """Starting vectors for a new trigger word (what textual inversion then trains).

    Per encoder, vector ``i`` is the token-embedding row of the init word's token
    ``i mod n`` (:func:`~sdadapt.embeddings.table.initial_rows`: kohya's cycling rule; A1111 and
    diffusers agree for a one-token init word; ``repeat_in_place``: A1111's ``i·n // k``). ``init_word=None``: the trigger's own row when the
    vocabulary already has it as one token (re-learning an existing word, e.g. the toy's held-out
    colour), else ``N(0, σ²)`` with the table's σ.

    Args:
        text_encoder, tokenizer: as for :func:`inject_embedding` (``sdxl=True``: the pairs).
        vectors: ``k``, how many tokens the trigger becomes.

    Raises:
        ValueError: an init word the tokenizer turns into no tokens.
    """
    keys = SDXL_KEYS if sdxl else (ENCODER_KEY,)
    encoders = _per_key(text_encoder, keys, "text encoder", shared_ok=False)
    tokenizers = _per_key(tokenizer, keys, "tokenizer", shared_ok=True)
    out: dict[str, Tensor] = {}
    for key in keys:
        _, table = find_token_embedding(encoders[key])
        side = tokenizer_side(tokenizers[key])
        if init_word is not None:
            init_ids = side.word_ids(init_word)
            if not init_ids:
                raise ValueError(f"the init word {init_word!r} has no tokens in the tokenizer; pass a word the model knows")
        else:
            own = side.known_single_token(name)
            init_ids = [own] if own is not None and own < table.num_embeddings else None
        out[key] = initial_rows(table.weight, init_ids, vectors, generator=generator,
                                repeat_in_place=repeat_in_place).cpu()
    return Embedding(name, out)
