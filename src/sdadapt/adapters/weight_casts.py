"""One low-precision copy of every trained adapter weight per step, made by one cast.

Under autocast a LoRA layer's ``F.linear(x, down)`` casts its float32 ``down`` to bfloat16 itself,
and backward casts that copy's gradient back: two small kernels per weight, ~512 per step for LoRA
on an SD1.5 UNet's attention — at batch 1 on an H200 about a tenth of the captured step's device
time (docs/measurements/). :func:`batched_weight_casts` makes all of those copies at once instead::

    flat = (cat(w.view(-1) for w in weights) · m).to(bf16)      # forward: a fixed few kernels
    copies = flat.split(sizes) viewed as each weight              # no kernel
    grad_w = (cat(g.view(-1) for g in grads).float() · m).split() # backward: likewise

where ``m`` is 1, or, for a weight registered with a ``scale_of`` (LoRA's up factor), that module's
``scale`` over the weight's elements: the copy is ``scale · up``, the product :func:`~.lora.lora_forward`
multiplies its up factor by, so the layer runs no scale multiply of its own, forward or backward.
The adapters read their weights through :func:`cast_weight` and :func:`cast_scaled_weight`, which
give those copies while the context is open (else the weight, or ``scale · weight``; also while
``torch.compile`` traces: inductor fuses the casts there). Each element is computed and rounded as
the per-layer path computes and autocast rounds it (``scale · up`` in float32, then the cast), so
the forward, the loss and every gradient are bit for bit those of the per-layer path
(``tests/test_weight_casts.py``); a weight no forward reads still gets no gradient (``None``).

Only weights an adapter registered with :func:`read_through_cast` are batched (LoRA's factors), and
of those the float32, contiguous, plain tensors on the autocast's device: everything else — full
fine-tuning's base weights above all, which a copy of would double — keeps autocast's own casts.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor, nn

from .base import autocast_dtype

__all__ = ["batched_weight_casts", "cast_scaled_weight", "cast_weight", "is_batched_cast", "read_through_cast"]

_MARK = "_sdadapt_read_through_cast"
_SCALED = "_sdadapt_cast_scaled"
# id of a weight read scaled -> the module whose ``scale`` it is read with. Not an attribute of the weight: a
# parameter's attributes are pickled with it (a reference to its module would drag the module along, a weak
# one cannot be pickled); the module must still hold the weight among its own parameters (ids are reused)
_SCALE_OWNERS: weakref.WeakValueDictionary[int, object] = weakref.WeakValueDictionary()
# (plain copies, scale · weight copies) by id of the weight, while a batched_weight_casts context is open
_Copies = tuple[dict[int, Tensor], dict[int, Tensor]]
_COPIES: ContextVar[_Copies | None] = ContextVar("sdadapt_weight_copies", default=None)
# (device, sizes, scale slots) -> the (Σn,) index of each element's slot in the stacked scales (+ a final 1)
_SLOTS: OrderedDict[tuple, Tensor] = OrderedDict()
_SLOTS_KEPT = 8


def read_through_cast(*weights: Tensor, scale_of: object | None = None) -> None:
    """Mark ``weights`` as read through :func:`cast_weight` in their adapter's forward (so
    :func:`batched_weight_casts` may cast them together); with ``scale_of`` (the module holding them,
    with a 0-dim ``scale`` tensor; held weakly) as read through :func:`cast_scaled_weight` with that
    scale. A copy of the module (``copy.deepcopy``, unpickled) is not registered: its weights take the
    per-layer path."""
    for w in weights:
        setattr(w, _MARK, True)
        if scale_of is not None:
            setattr(w, _SCALED, True)
            _SCALE_OWNERS[id(w)] = scale_of


def cast_weight(weight: Tensor) -> Tensor:
    """``weight``'s low-precision copy while :func:`batched_weight_casts` has one, else ``weight``."""
    if torch.compiler.is_compiling():  # (first: nothing below is traced)
        return weight
    copies = _COPIES.get()
    return weight if copies is None else copies[0].get(id(weight), weight)


def cast_scaled_weight(weight: Tensor, scale: Tensor) -> Tensor:
    """``scale · weight``'s low-precision copy while :func:`batched_weight_casts` has one (made with
    this ``scale``: the one its ``scale_of`` holds), else ``weight * scale``."""
    if torch.compiler.is_compiling() or scale.requires_grad:
        return weight * scale
    copies = _COPIES.get()
    copy = None if copies is None else copies[1].get(id(weight))
    if copy is not None:
        return copy
    if torch.is_grad_enabled() and weight.requires_grad:
        return _ScaledWeight.apply(weight, scale)
    return weight * scale  # (no graph: inference, a frozen adapter)


class _ScaledWeight(torch.autograd.Function):
    """``weight * scale`` (0-dim ``scale``, no gradient) that saves no tensor for backward (``scale``
    rides on its context), as the batched copy saves none: a layer under non-reentrant gradient
    checkpointing, recomputed in backward after the context closed, takes this path and must save
    what its first forward saved (``torch.utils.checkpoint`` compares them)."""

    @staticmethod
    def forward(ctx, weight: Tensor, scale: Tensor) -> Tensor:  # type: ignore[override]
        ctx.scale = scale
        return weight * scale

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad * ctx.scale, None


class _CastTogether(torch.autograd.Function):
    """The first ``count`` tensors (the weights: float32, contiguous) → their ``dtype`` copies, each
    times its scale (the rest: one 0-dim float32 tensor per scaled weight): one concatenation, one
    multiply and one cast each way. ``slots`` (Σn,): each element's index into the scales plus a final 1."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, aux: tuple[int, Tensor | None],  # type: ignore[override]
                *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.set_materialize_grads(False)  # (an unread copy's gradient stays None: its weight gets none)
        count, slots = aux
        weights, scales = tensors[:count], tensors[count:]
        ctx.shapes, ctx.dtype, ctx.scales = [w.shape for w in weights], dtype, len(scales)
        flat = torch.cat([w.view(-1) for w in weights])  # (Σn,) float32
        ctx.multiplier = None
        if scales:  # (Σn,) each element's scale (1 for the unscaled weights): scale · w in float32, as w * scale
            one = torch.ones(1, dtype=flat.dtype, device=flat.device)
            ctx.multiplier = torch.cat([torch.stack(scales), one]).index_select(0, slots)
            flat = flat * ctx.multiplier
        flat = flat.to(dtype)
        return tuple(part.view(shape) for part, shape in zip(flat.split([w.numel() for w in weights]), ctx.shapes))

    @staticmethod
    def backward(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        out: list[Tensor | None] = [None] * len(grads)
        read = [i for i, g in enumerate(grads) if g is not None]
        if read:
            sizes = [shape.numel() for shape in ctx.shapes]
            if ctx.multiplier is not None:  # (it spans every weight: zeros stand in for an unread copy, rare)
                device = ctx.multiplier.device
                pieces = [g.reshape(-1) if g is not None else torch.zeros(n, dtype=ctx.dtype, device=device)
                          for g, n in zip(grads, sizes)]
                parts = (torch.cat(pieces).float() * ctx.multiplier).split(sizes)  # (the chain rule of w * scale)
                for i in read:
                    out[i] = parts[i].view(ctx.shapes[i])
            else:
                flat = torch.cat([grads[i].reshape(-1) for i in read]).float()  # type: ignore[union-attr]
                for i, part in zip(read, flat.split([sizes[i] for i in read])):
                    out[i] = part.view(ctx.shapes[i])
        return (None, None, *out, *([None] * ctx.scales))


def is_batched_cast(node: object) -> bool:
    """Whether autograd node ``node`` is the backward of :func:`batched_weight_casts`' cast: its
    ``next_functions[i]`` is weight ``i``'s, which gets a gradient only if copy ``i`` was read (an
    autograd-graph walk follows just those edges: ``training.step_capture``)."""
    return isinstance(node, _CastTogether._backward_cls)


def _batchable(w: Tensor, device_type: str) -> bool:
    # (a plain tensor, not a DTensor's shard: the usual types answer without making a detached tensor)
    return (getattr(w, _MARK, False) and w.dtype == torch.float32 and w.device.type == device_type
            and (type(w) is nn.Parameter or type(w) is Tensor or type(w.detach()) is Tensor)
            and w.is_contiguous() and w.numel() > 0)


def _scale_for(w: Tensor) -> Tensor | None | bool:
    """The scale ``w``'s copy is multiplied by: ``None`` for a plain weight, its ``scale_of``'s 0-dim
    ``scale`` on ``w``'s device as float32 (what ``w * scale`` computes with: a bf16 buffer, after a
    model's ``.to(torch.bfloat16)``, converts exactly), or ``False`` when there is none (the per-layer path)."""
    if not getattr(w, _SCALED, False):
        return None
    owner = _SCALE_OWNERS.get(id(w))
    if owner is None or not any(p is w for p in getattr(owner, "_parameters", {}).values()):
        return False
    scale = getattr(owner, "scale", None)
    if not (isinstance(scale, Tensor) and scale.dim() == 0 and scale.is_floating_point() and scale.device == w.device):
        return False
    return scale if scale.dtype == torch.float32 else scale.float()


def _slots(device: torch.device, sizes: tuple[int, ...], slot_of: tuple[int, ...]) -> Tensor:
    """(Σn,) int64: ``slot_of[i]`` over weight ``i``'s elements, made on the host once per layout and
    kept (a CUDA graph's capture reuses what its eager warm-up made: no host copy while capturing)."""
    key = (device, sizes, slot_of)
    slots = _SLOTS.get(key)
    if slots is None:
        slots = torch.repeat_interleave(torch.tensor(slot_of), torch.tensor(sizes)).to(device)
        _SLOTS[key] = slots
        while len(_SLOTS) > _SLOTS_KEPT:
            _SLOTS.popitem(last=False)
    else:
        _SLOTS.move_to_end(key)
    return slots


@contextmanager
def batched_weight_casts(weights: Sequence[Tensor], device_type: str) -> Iterator[None]:
    """While open, and autocast is on for ``device_type``, :func:`cast_weight` and
    :func:`cast_scaled_weight` give each batchable weight of ``weights`` (marked by
    :func:`read_through_cast`, float32, contiguous, on that device) its copy in autocast's dtype, all
    made by one cast per device (module docstring). Wrap the forward only: the copies stay in the
    autograd graph, so backward may run after the context has closed.

    Args:
        weights: the step's trained parameters (others in the list are left to autocast).
        device_type: the forward's device type (``"cuda"``, ``"cpu"``).
    """
    dtype = autocast_dtype(device_type)
    by_device: dict[torch.device, dict[int, tuple[Tensor, Tensor | None]]] = {}  # (a weight listed twice: once)
    if dtype is not None and not torch.compiler.is_compiling():
        for w in weights:
            scale = _scale_for(w) if _batchable(w, device_type) else False
            if scale is not False:
                by_device.setdefault(w.device, {})[id(w)] = (w, scale)
    plain: dict[int, Tensor] = {}
    scaled: dict[int, Tensor] = {}
    for device, group in by_device.items():
        if len(group) < 2:
            continue
        members = list(group.values())
        scales = [scale for _, scale in members if scale is not None]
        slot_of, next_slot = [], 0
        for _, scale in members:
            slot_of.append(len(scales) if scale is None else next_slot)
            next_slot += scale is not None
        slots = _slots(device, tuple(w.numel() for w, _ in members), tuple(slot_of)) if scales else None
        copies = _CastTogether.apply(dtype, (len(members), slots), *(w for w, _ in members), *scales)
        for (w, scale), copy in zip(members, copies):
            (plain if scale is None else scaled)[id(w)] = copy
    if not plain and not scaled:
        yield
        return
    token = _COPIES.set((plain, scaled))
    try:
        yield
    finally:
        _COPIES.reset(token)
