"""Tucker (CP-style) reconstruction of a kxk convolution weight from a small core.

LyCORIS's ``use_tucker`` stores a kxk convolution delta as a core ``t`` (r, r, kh, kw) and two
factor matrices, one per channel axis::

    W[p, q, :, :] = Σ_ij t[i, j, :, :] · w_out[i, p] · w_in[j, q]

``w_out`` is (r, out) and ``w_in`` is (r, in). LoHa stores them as ``hada_wX_a`` / ``hada_wX_b``,
LoKr as ``lokr_w2_a`` / ``lokr_w2_b`` (core ``lokr_t2``), LoCon as ``lora_up`` (out, r, 1, 1, i.e.
``w_out`` transposed) / ``lora_down`` (r, in, 1, 1) with core ``lora_mid``. This is
``lycoris.functional.rebuild_tucker(t, w_out, w_in)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rebuild_tucker"]


def rebuild_tucker(core: Tensor, w_out: Tensor, w_in: Tensor) -> Tensor:
    """``W[p, q, *k] = Σ_ij core[i, j, *k] · w_out[i, p] · w_in[j, q]``.

    Args:
        core: (r_out, r_in, *kernel).
        w_out: (r_out, out).
        w_in: (r_in, in).

    Returns:
        (out, in, *kernel).

    Raises:
        ValueError: the ranks of the core and the factors disagree.
    """
    if core.shape[0] != w_out.shape[0] or core.shape[1] != w_in.shape[0]:
        raise ValueError(
            f"Tucker core {tuple(core.shape)} does not fit factors w_out {tuple(w_out.shape)} and "
            f"w_in {tuple(w_in.shape)}: expected core (r_out, r_in, k, k), w_out (r_out, out), w_in (r_in, in)"
        )
    # (r_out, r_in, *k) x (r_in, in) -> (r_out, in, *k)
    partial = torch.einsum("ij...,jq->iq...", core, w_in)
    # (r_out, out) x (r_out, in, *k) -> (out, in, *k)
    return torch.einsum("ip,iq...->pq...", w_out, partial)
