"""New token rows for any text encoder's token embedding, without touching the embedding table.

The math is one splice: for token ids ``ids (B, L)``, the embedding output ``E[ids] (B, L, D)``
and new rows ``R (n, D)`` owned by token ids ``t_0 … t_{n-1}``::

    out[b, l] = R[j]        if ids[b, l] == t_j
              = E[ids[b, l]] otherwise

:func:`splice_rows` is that function; :class:`TokenRows` holds ``R`` (a small ``nn.Parameter``,
the only thing that trains — no gradient and no optimiser state for the ``V × D`` table) and
applies it to an ``nn.Embedding`` through two hooks: a forward pre-hook that replaces the new ids
that lie beyond the table (``t_j >= V``, tokens a tokenizer added) by 0 so the lookup is valid,
and a forward hook that splices ``R`` in. Ids inside the table (an existing word, or the toy
tokenizer's spare tokens) are overridden the same way. Nothing is rebound and nothing is
registered on the module: its ``state_dict()`` keys and its weight bits stay as they were, and
:meth:`TokenRows.remove` takes the hooks out.

Several :class:`TokenRows` can sit on one embedding (each pre-hook only rewrites its own ids);
where two claim the same id, the one attached last wins. The rows live on the table's device and
dtype at attach time (training rows in float32) and are cast to the lookup's dtype and device
in the splice: inject after moving the encoder to its device, so the optimiser holds them there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["TokenRows", "find_token_embedding", "initial_rows", "slot_table", "splice_rows"]

_TOKEN_EMBEDDING_NAMES = ("token_embedding", "embed_tokens", "wte", "word_embeddings")


def find_token_embedding(module: nn.Module) -> tuple[str, nn.Embedding]:
    """The token-embedding table of a text encoder: ``(qualified name, nn.Embedding)``.

    Works on transformers ``CLIPTextModel`` / ``CLIPTextModelWithProjection`` (4.x and 5.x
    layouts), the toy encoder, LDM "compvis" encoders (``transformer.text_model.embeddings.token_embedding``,
    OpenCLIP's ``model.token_embedding``) and a bare ``nn.Embedding``. Order of preference:
    ``get_input_embeddings()`` if the module has it; else the one ``nn.Embedding`` whose name ends in
    ``token_embedding`` (or ``embed_tokens``, ``wte``, ``word_embeddings``); else the only
    ``nn.Embedding`` that is not a position embedding.

    Raises:
        ValueError: no candidate, or several (names them: pass the sub-module you mean).
    """
    if isinstance(module, nn.Embedding):
        return "", module
    getter = getattr(module, "get_input_embeddings", None)
    if callable(getter):
        try:
            found = getter()
        except (NotImplementedError, AttributeError):
            found = None
        if isinstance(found, nn.Embedding):
            for name, sub in module.named_modules():
                if sub is found:
                    return name, found
    tables = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Embedding)]
    named = [(n, m) for n, m in tables if n.rsplit(".", 1)[-1] in _TOKEN_EMBEDDING_NAMES]
    if len(named) == 1:
        return named[0]
    candidates = named or [(n, m) for n, m in tables if "position" not in n.rsplit(".", 1)[-1]]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise ValueError(
            f"{type(module).__name__} has no token-embedding table (no nn.Embedding besides position embeddings); "
            "pass the text encoder itself (e.g. CLIPTextModel) or its token nn.Embedding"
        )
    raise ValueError(
        f"{type(module).__name__} has several token-embedding tables ({', '.join(n for n, _ in candidates)}); "
        "pass the one text encoder you mean (e.g. the sub-module of one embedder), or its nn.Embedding"
    )


def slot_table(token_ids: Sequence[int], *, size: int, device: torch.device | str | None = None) -> Tensor:
    """``(max(size, max id + 1),)`` int64: ``slot[t_j] = j``, ``-1`` for every other id.

    Raises:
        ValueError: a negative or repeated id.
    """
    ids = [int(i) for i in token_ids]
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"token ids must be distinct and >= 0, got {ids}")
    table = torch.full((max([size, *(i + 1 for i in ids)]),), -1, dtype=torch.long, device=device)
    table[torch.tensor(ids, dtype=torch.long, device=device)] = torch.arange(len(ids), device=device)
    return table


def _slots_of(ids: Tensor, slots: Tensor) -> Tensor:
    """(B, L) slot per position (-1 = not ours); ids beyond the slot table are not ours."""
    inside = ids < slots.shape[0]
    return torch.where(inside, slots[ids.clamp(0, slots.shape[0] - 1)], -1)


def splice_rows(output: Tensor, slots: Tensor, rows: Tensor) -> Tensor:
    """``out[..., :] = rows[slots]`` where ``slots >= 0``, else ``output`` (bit for bit).

    Args:
        output: ``(B, L, D)`` the embedding table's lookup.
        slots: ``(B, L)`` int64, ``j`` for a position holding new token ``t_j``, ``-1`` elsewhere.
        rows: ``(n, D)`` the new rows (cast to ``output``'s dtype and device; gradients flow to them).
    """
    picked = rows.to(device=output.device, dtype=output.dtype)[slots.clamp(min=0)]  # (B, L, D)
    return torch.where((slots >= 0).unsqueeze(-1), picked, output)


def initial_rows(
    weight: Tensor,
    init_ids: Sequence[int] | None,
    count: int,
    *,
    generator: torch.Generator | None = None,
    repeat_in_place: bool = False,
) -> Tensor:
    """Starting vectors ``(count, D)`` float32 for a new token.

    With ``init_ids`` (the init word's token ids, no BOS/EOS): vector ``i`` is the table row of
    ``init_ids[i mod n]`` — kohya's rule. It equals A1111's (``embedded[i·n // k]`` of the first ``k``
    init tokens) when ``n >= k`` or ``n == 1``, and diffusers' (every vector = the one initializer
    token) when ``n == 1``; for ``1 < n < k`` A1111 repeats each token in place (a a b b) where this
    cycles (a b a b) — ``repeat_in_place=True`` is A1111's rule (its ``create_embedding``, and
    DreamArtist's). Without: ``N(0, σ²)`` with σ the table's own standard deviation.

    Raises:
        ValueError: ``count < 1``, or an init id outside the table.
    """
    if count < 1:
        raise ValueError(f"a token needs at least one vector, got {count}")
    table = weight.detach()
    if init_ids:
        bad = [i for i in init_ids if not 0 <= int(i) < table.shape[0]]
        if bad:
            raise ValueError(f"init token ids {bad} are outside the {table.shape[0]}-row embedding table")
        if repeat_in_place:  # (A1111: the first k tokens, row i·n // k of them)
            first = list(init_ids[:count])
            order = [first[i * len(first) // count] for i in range(count)]
        else:
            order = [init_ids[i % len(init_ids)] for i in range(count)]
        picks = torch.tensor([int(i) for i in order], device=table.device)
        return table[picks].float().clone()
    std = float(table.float().std())
    noise = torch.randn((count, table.shape[1]), generator=generator, dtype=torch.float32)
    return (noise * std).to(table.device)


class TokenRows:
    """New rows for token ids on one ``nn.Embedding``, spliced in by hooks (see the module docstring).

    Attributes:
        embedding: the table the rows attach to (never modified).
        token_ids: ``[t_0, …, t_{n-1}]``.
        rows: ``(n, D)`` ``nn.Parameter`` (``requires_grad`` as asked) — the only trainable state.
    """

    def __init__(self, embedding: nn.Embedding, token_ids: Sequence[int], vectors: Tensor, *, trainable: bool = False,
                 dtype: torch.dtype | None = None) -> None:
        if not isinstance(embedding, nn.Embedding):
            raise TypeError(f"TokenRows attaches to an nn.Embedding, got {type(embedding).__name__}")
        vectors = vectors.detach()
        if vectors.ndim != 2 or vectors.shape[0] != len(token_ids):
            raise ValueError(f"need one (D,) vector per token id: {len(token_ids)} ids, vectors of shape {tuple(vectors.shape)}")
        if vectors.shape[1] != embedding.embedding_dim:
            raise ValueError(
                f"the vectors are {vectors.shape[1]} wide but the token embedding is "
                f"{embedding.num_embeddings}×{embedding.embedding_dim}"
            )
        self.embedding = embedding
        self.token_ids = [int(i) for i in token_ids]
        weight = embedding.weight
        store = dtype or (torch.float32 if trainable else weight.dtype)
        self.rows = nn.Parameter(vectors.to(device=weight.device, dtype=store).clone(), requires_grad=trainable)
        self._slots = slot_table(self.token_ids, size=embedding.num_embeddings, device=weight.device)
        self._outside = any(i >= embedding.num_embeddings for i in self.token_ids)
        self._pending: Tensor | None = None
        self._hooks = [embedding.register_forward_pre_hook(self._pre_hook), embedding.register_forward_hook(self._hook)]

    def _pre_hook(self, module: nn.Module, args: tuple) -> tuple | None:
        ids = args[0]
        if self._slots.device != ids.device:  # the encoder moved after injection: follow it once
            self._slots = self._slots.to(ids.device)
        pending = _slots_of(ids, self._slots)  # (B, L)
        self._pending = pending
        if self._outside:  # tokens a tokenizer added beyond the table: look up row 0, replaced below
            return (torch.where(pending >= 0, torch.zeros_like(ids), ids), *args[1:])
        return None

    def _hook(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        pending, self._pending = self._pending, None
        if pending is None:  # pragma: no cover - only if another hook called the table's forward directly
            return output
        return splice_rows(output, pending, self.rows)

    def remove(self) -> None:
        """Take the hooks out; the embedding is as it was before (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    @property
    def attached(self) -> bool:
        return bool(self._hooks)
