"""Prompts longer than one CLIP window, kohya's way (``max_token_length`` 150 or 225).

A CLIP text encoder reads ``C = 77`` tokens: ``<BOS>``, 75 prompt tokens, ``<EOS>`` (padding
after it). kohya sd-scripts' ``--max_token_length N`` (N = 150 or 225; unset = 75) trains on
longer captions by cutting them into ``n = N // 75`` windows, encoding each window on its own and
joining the hidden states again (``library/strategy_base.py`` ``TokenizeStrategy._get_input_ids``,
``library/strategy_sd.py`` / ``strategy_sdxl.py`` ``encode_tokens``):

1. tokenize to ``L = n * (C - 2) + 2`` ids, ``<BOS> t_1 … t_k <EOS> <PAD> …`` (truncated to ``L``);
2. window ``j`` is ``ids[0]``, ``ids[1 + j(C-2) : 1 + (j+1)(C-2)]``, ``ids[-1]``: (B, n, C);
   when the pad token is not ``<EOS>`` (SD2, SDXL's second encoder) a window whose last prompt
   slot is a real token ends in ``<EOS>`` instead of the pad, and an empty window (``<BOS>
   <PAD> …``) becomes ``<BOS> <EOS> <PAD> …`` (with ``<EOS>`` padding both rules change nothing;
   as in kohya they look at ids only, so with ``!`` as the pad a window starting with a real ``!``
   gets ``<EOS>`` there, and one whose last slot is a real ``!`` keeps the pad after it);
3. encode the ``B * n`` windows (clip skip applies to each), (B * n, C, D);
4. keep the first window's ``<BOS>`` state, the ``C - 2`` prompt-slot states of every window in
   order, and the last window's last state: (B, L, D). The UNet's cross-attention takes any
   length, so that is the conditioning. SDXL's pooled ``text_embeds`` come from the first window.

kohya's SD2 branch also means to copy an empty window's first ``<PAD>`` state over its ``<EOS>``
state, but it compares a token id with the ``<EOS>`` *string*, so the copy never happens (and its
SDXL twin is commented out): sdadapt joins every model's states as in step 4 above.

For an encoder whose window is not 77 (the tiny test models) the same rules hold with its own
``C``: ``max_token_length // 75`` windows of ``C - 2`` prompt tokens each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import InputError

__all__ = ["MAX_TOKEN_LENGTHS", "chunk_count", "chunk_token_ids", "long_prompt_length", "merge_chunk_states"]

#: the prompt lengths kohya's ``--max_token_length`` allows (its ``None`` is 75: one window)
MAX_TOKEN_LENGTHS = (75, 150, 225)


def chunk_count(max_token_length: int) -> int:
    """How many encoder windows ``max_token_length`` prompt tokens take: 75 -> 1, 150 -> 2, 225 -> 3.

    Raises:
        InputError: (a ValueError) not 75, 150 or 225 (kohya allows only these).
    """
    if isinstance(max_token_length, bool) or max_token_length not in MAX_TOKEN_LENGTHS:
        raise InputError(f"max_token_length must be 75, 150 or 225 (kohya's choices; 75 = one CLIP window, its "
                         f"default), got {max_token_length!r}")
    return int(max_token_length) // 75


def long_prompt_length(max_token_length: int, *, window: int = 77) -> int:
    """Ids per prompt for ``max_token_length``: ``n * (window - 2) + 2`` (77, 152, 227 for CLIP)."""
    if window < 3:
        raise InputError(f"an encoder window holds <BOS>, prompt tokens and <EOS>: window must be >= 3, got {window}")
    return chunk_count(max_token_length) * (window - 2) + 2


def _windows(length: int, window: int) -> int:
    if window < 3:
        raise InputError(f"an encoder window holds <BOS>, prompt tokens and <EOS>: window must be >= 3, got {window}")
    if length < window or (length - 2) % (window - 2):
        raise InputError(f"{length} ids do not split into {window}-token encoder windows: a long prompt has "
                         f"n * {window - 2} + 2 ids (tokenize it with the system's max_token_length)")
    return (length - 2) // (window - 2)


def chunk_token_ids(ids: Tensor, *, window: int, eos_id: int, pad_id: int) -> Tensor:
    """Split long prompts' ids into encoder windows, each ``<BOS> … <EOS>`` (kohya's rule, module docstring).

    Args:
        ids: (..., L) token ids, ``L = n * (window - 2) + 2``: ``<BOS>`` first, the last slot
            ``<EOS>`` or the pad token (a tokenizer padding to ``L`` with truncation makes them).
        window: the encoder's sequence length ``C`` (77 for CLIP).
        eos_id, pad_id: the tokenizer's ``<EOS>`` and pad ids (equal for SD1 and SDXL's first encoder).

    Returns:
        (..., n, window) ids; ``n = 1`` gives ``ids`` back unchanged (kohya splits only longer ids).

    Raises:
        InputError: (a ValueError) ``L`` is not ``n * (window - 2) + 2``.
    """
    n = _windows(ids.shape[-1], window)
    lead = ids.shape[:-1]
    if n == 1:
        return ids[..., None, :]
    body = ids[..., 1:-1].reshape(*lead, n, window - 2)  # (..., n, C-2)
    bos = ids[..., None, :1].expand(*lead, n, 1)  # (..., n, 1)
    last = ids[..., None, -1:].expand(*lead, n, 1)  # (..., n, 1)
    before_last, first = body[..., -1:], body[..., :1]  # (..., n, 1) each (the same slot when C = 3)
    # a full window ends in <EOS>; an empty one starts with it (both no-ops when pad == <EOS>)
    last = last.masked_fill((before_last != eos_id) & (before_last != pad_id), eos_id)
    first = first.masked_fill(first == pad_id, eos_id)
    return torch.cat([bos, first, body[..., 1:], last], dim=-1)


def merge_chunk_states(states: Tensor, *, chunks: int) -> Tensor:
    """Join the windows' hidden states into one long sequence (kohya's rule, module docstring).

    Args:
        states: (B * n, C, D) states of :func:`chunk_token_ids`' windows flattened batch-major
            (prompt ``b``'s window ``j`` at row ``b * n + j``), or (B, n, C, D).
        chunks: ``n``, the windows per prompt.

    Returns:
        (B, n * (C - 2) + 2, D): window 0's first state, every window's ``C - 2`` middle states in
        order, the last window's last state. ``chunks=1`` gives the (B, C, D) states back.

    Raises:
        InputError: (a ValueError) ``states`` are not ``chunks`` windows per prompt.
    """
    if chunks < 1 or (states.ndim == 3 and states.shape[0] % chunks) or (states.ndim == 4 and states.shape[1] != chunks) \
            or states.ndim not in (3, 4):
        raise InputError(f"states of shape {tuple(states.shape)} are not {chunks} windows per prompt "
                         "((B * n, C, D) or (B, n, C, D))")
    window, width = states.shape[-2], states.shape[-1]
    grouped = states.reshape(-1, chunks, window, width)  # (B, n, C, D)
    body = grouped[:, :, 1:-1].reshape(grouped.shape[0], chunks * (window - 2), width)  # (B, n(C-2), D)
    return torch.cat([grouped[:, 0, :1], body, grouped[:, -1, -1:]], dim=1)

