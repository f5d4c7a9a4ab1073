"""One low-precision copy of every trained adapter weight per step, made by one cast.

Under autocast a LoRA layer's ``F.linear(x, down)`` casts its float32 ``down`` to bfloat16 itself,
and backward casts that copy's gradient back: two small kernels per weight, ~512 per step for LoRA
on an SD1.5 UNet's attention — at batch 1 on an H200 about a tenth of the captured step's device
time (docs/measurements/). :func:`batched_weight_casts` makes all of those copies at once instead::

    flat = cat(w.view(-1) for w in weights).to(bf16)        # forward: 2 kernels
    copies = flat.split(sizes) viewed as each weight          # no kernel
    grad_w = cat(g.view(-1) for g in grads).float().split()   # backward: 2 kernels

and the adapters read their weights through :func:`cast_weight`, which gives that copy while the
context is open (the weight itself otherwise, or while ``torch.compile`` traces: inductor fuses the
casts there). Each element is rounded exactly as autocast rounds it, so the forward, the loss and
every gradient are bit for bit those of the per-layer casts (``tests/test_weight_casts.py``); a
weight no forward reads still gets no gradient (``None``, not zeros).

Only weights an adapter registered with :func:`read_through_cast` are batched (LoRA's factors), and
of those the float32, contiguous, plain tensors on the autocast's device: everything else — full
fine-tuning's base weights above all, which a copy of would double — keeps autocast's own casts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from .base import autocast_dtype

__all__ = ["batched_weight_casts", "cast_weight", "is_batched_cast", "read_through_cast"]

_MARK = "_sdadapt_read_through_cast"
_COPIES: ContextVar[dict[int, Tensor] | None] = ContextVar("sdadapt_weight_copies", default=None)


def read_through_cast(*weights: Tensor) -> None:
    """Mark ``weights`` as read through :func:`cast_weight` in their adapter's forward (so
    :func:`batched_weight_casts` may cast them together)."""
    for w in weights:
        setattr(w, _MARK, True)


def cast_weight(weight: Tensor) -> Tensor:
    """``weight``'s low-precision copy while :func:`batched_weight_casts` has one, else ``weight``."""
    if torch.compiler.is_compiling():  # (first: nothing below is traced)
        return weight
    copies = _COPIES.get()
    return weight if copies is None else copies.get(id(weight), weight)


class _CastTogether(torch.autograd.Function):
    """``weights`` (float32, contiguous) → their ``dtype`` copies: one concatenation and one cast
    each way."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *weights: Tensor) -> tuple[Tensor, ...]:  # type: ignore[override]
        ctx.set_materialize_grads(False)  # (an unread copy's gradient stays None: its weight gets none)
        ctx.shapes = [w.shape for w in weights]
        ctx.source_dtype = weights[0].dtype
        flat = torch.cat([w.view(-1) for w in weights]).to(dtype)  # (Σ numel,)
        return tuple(part.view(shape) for part, shape in zip(flat.split([w.numel() for w in weights]), ctx.shapes))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        read = [i for i, g in enumerate(grads) if g is not None]
        out: list[Tensor | None] = [None] * len(grads)
        if read:
            flat = torch.cat([grads[i].reshape(-1) for i in read]).to(ctx.source_dtype)  # type: ignore[union-attr]
            for i, part in zip(read, flat.split([ctx.shapes[i].numel() for i in read])):
                out[i] = part.view(ctx.shapes[i])
        return (None, *out)


def is_batched_cast(node: object) -> bool:
    """Whether autograd node ``node`` is the backward of :func:`batched_weight_casts`' cast: its
    ``next_functions[i]`` is weight ``i``'s, which gets a gradient only if copy ``i`` was read (an
    autograd-graph walk follows just those edges: ``training.step_capture``)."""
    return isinstance(node, _CastTogether._backward_cls)


def _batchable(w: Tensor, device_type: str) -> bool:
    return (getattr(w, _MARK, False) and w.dtype == torch.float32 and w.device.type == device_type
            and type(w.detach()) is Tensor and w.is_contiguous() and w.numel() > 0)


@contextmanager
def batched_weight_casts(weights: Sequence[Tensor], device_type: str) -> Iterator[None]:
    """While open, and autocast is on for ``device_type``, :func:`cast_weight` gives each batchable
    weight of ``weights`` (marked by :func:`read_through_cast`, float32, contiguous, on that device)
    its copy in autocast's dtype, all made by one cast (module docstring). Wrap the forward only: the
    copies stay in the autograd graph, so backward may run after the context has closed.

    Args:
        weights: the step's trained parameters (others in the list are left to autocast).
        device_type: the forward's device type (``"cuda"``, ``"cpu"``).
    """
    dtype = autocast_dtype(device_type)
    by_device: dict[torch.device, dict[int, Tensor]] = {}  # (one cast per device; a weight listed twice once)
    if dtype is not None and not torch.compiler.is_compiling():
        for w in weights:
            if _batchable(w, device_type):
                by_device.setdefault(w.device, {})[id(w)] = w
    chosen = [list(group.values()) for group in by_device.values() if len(group) >= 2]
    if not chosen:
        yield
        return
    made: dict[int, Tensor] = {}
    for group in chosen:
        made.update(zip(map(id, group), _CastTogether.apply(dtype, *group)))
    token = _COPIES.set(made)
    try:
        yield
    finally:
        _COPIES.reset(token)
