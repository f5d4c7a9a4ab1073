"""A LoRA-adapted linear layer as one autograd function: its delta accumulated into the base GEMM's output.

The hook path (:func:`~.lora.lora_forward` added to the base layer's output by a forward hook) runs four
kernels per adapted linear layer in forward — the base GEMM, ``down``, ``up``, and an add that reads the base
and delta ``(N, out)`` outputs and writes a third — and six in backward, where the input gradients of the base
and the delta paths are summed by a seventh tensor. :func:`lora_linear` runs three and five::

    forward                                 (x: (N, in))
    y  = x Wᵀ + b           (N, out)        the base GEMM
    h  = x downᵀ            (N, r)
    y += h upᵀ              (N, out)        the GEMM adds into y in place (beta = 1)

    backward                                (g: (N, out))
    g_r   = g up            (N, r)
    dx    = g W             (N, in)
    dx   += g_r down        (N, in)         the GEMM adds into dx in place
    ddown = g_rᵀ x          (r, in)
    dup   = gᵀ h            (out, r)

where ``up`` is the scaled factor ``scale · up`` (the LoRA's ``cast_scaled_weight`` copy). No ``(N, out)`` or
``(N, in)`` temporary is written: the accumulating GEMMs read and write the output once. Kept for backward:
``x`` and ``h``, as the hook path keeps them. The value is the hook path's with one rounding fewer — the
delta product is summed into ``y`` at the GEMM's float32 accumulation instead of being rounded to ``y``'s
dtype first (float32: equal to ~1e-6; half dtypes: no further from a float64 reference,
``tests/test_fused_lora.py``).

A merged weight ``W + up ⋅ down`` would run two kernels in forward, but on CUDA ``addmm`` into a new tensor
copies ``W`` first (three kernels), and backward needs the merged weight again: recomputed (two more kernels)
or kept (a weight-sized tensor per layer: ~190 MB for LoRA on SD1.5's attention in bf16). Accumulating in
place gets the same count without either, and does not round the delta into the weight's precision.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor, nn

from .base import autocast_dtype
from .lora import LoRAModule

__all__ = ["lora_linear", "lora_linear_unchecked", "note_adapted_layer", "servable_lora"]

# id(layer.weight) -> the layer, for each layer an adapter hook was attached to (AdapterHandle): how a torch
# function mode seeing ``F.linear(x, weight, bias)`` finds the layer. Not an attribute of the weight or the
# adapter (those are pickled with the model); checked at each use (``layer.weight is weight``: ids are reused)
_LAYERS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, up: Tensor, down: Tensor) -> Tensor:
    """``x Wᵀ + b + (x downᵀ) upᵀ``: a LoRA-adapted linear layer's output, the delta accumulated into the base
    GEMM's output in place (module docstring).

    Args:
        x: (..., in) input.
        weight: (out, in) base weight.
        bias: (out,) base bias, or ``None``.
        up: (out, r) up factor, already multiplied by the LoRA's scale.
        down: (r, in) down factor.

    Returns:
        (..., out), dtype of the inputs (all of one dtype and device; autocast is not applied here: cast
        first, as :func:`~sdadapt.training.fused_lora.fused_lora_linear` does).

    Gradients flow to every input that requires one.

    Raises:
        ValueError: shapes that do not fit together, or inputs of different dtypes or devices.
    """
    out_features, in_features = weight.shape if weight.dim() == 2 else (-1, -1)
    rank = down.shape[0] if down.dim() == 2 else -1
    if (min(out_features, rank) < 0 or up.shape != (out_features, rank) or down.shape != (rank, in_features)
            or x.dim() == 0 or x.shape[-1] != in_features or (bias is not None and bias.shape != (out_features,))):
        raise ValueError(f"lora_linear: x {tuple(x.shape)}, weight {tuple(weight.shape)}, up {tuple(up.shape)}, "
                         f"down {tuple(down.shape)}, bias {None if bias is None else tuple(bias.shape)} do not fit "
                         "(x: (..., in), weight: (out, in), up: (out, r), down: (r, in), bias: (out,))")
    tensors = [t for t in (x, weight, bias, up, down) if t is not None]
    if len({t.dtype for t in tensors}) != 1 or len({t.device for t in tensors}) != 1:
        raise ValueError("lora_linear: x, weight, bias, up and down must share one dtype and device, got "
                         + ", ".join(f"{t.dtype} on {t.device}" for t in tensors))
    return lora_linear_unchecked(x, weight, bias, up, down)


def lora_linear_unchecked(x: Tensor, weight: Tensor, bias: Tensor | None, up: Tensor, down: Tensor) -> Tensor:
    """:func:`lora_linear` without its checks, for a caller whose tensors fit by construction (the training
    step's mode, once per adapted layer and step)."""
    return _LoRALinear.apply(x, weight, bias, up, down)


class _LoRALinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, up: Tensor, down: Tensor) -> Tensor:
        with _autocast_off(x.device.type):  # (the inputs are cast already: their dtype is the result's)
            x2 = x.reshape(-1, weight.shape[1])  # (N, in)
            y = x2 @ weight.t() if bias is None else torch.addmm(bias, x2, weight.t())  # (N, out)
            h = x2 @ down.t()  # (N, r)
            y.addmm_(h, up.t())  # (N, out): y + h upᵀ, summed in the GEMM
        ctx.save_for_backward(x, weight, up, down, h)
        ctx.has_bias = bias is not None
        return y.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        with _autocast_off(grad.device.type), _without_function_modes():
            return _backward(ctx, grad)


def _autocast_off(device_type: str) -> AbstractContextManager[object]:
    """Autocast off on ``device_type`` while it is on there (entering ``torch.autocast`` costs microseconds of
    host time a layer when there is nothing to turn off)."""
    return nullcontext() if autocast_dtype(device_type) is None else torch.autocast(device_type, enabled=False)


@contextmanager
def _without_function_modes() -> Iterator[None]:
    """The torch function modes of this thread off the stack (tensor subclasses keep their ``__torch_function__``):
    the backward runs as a built-in op's does, unseen by modes. The training step starts its backward inside
    its kernel-choice mode (``step_backward``), which would otherwise see this Python backward's ~20 torch calls
    per layer — ~1,800 of the ~3,300 calls it handled in an SD1.5-layout step, each ~3 µs of host time."""
    modes = [torch._C._pop_torch_function_stack() for _ in range(torch._C._len_torch_function_stack())]
    try:
        yield
    finally:
        for mode in reversed(modes):
            torch._C._push_on_torch_function_stack(mode)


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients of :class:`_LoRALinear`'s inputs for ``grad`` (..., out) (module docstring)."""
    x, weight, up, down, h = ctx.saved_tensors
    need_x, need_w, need_b, need_up, need_down = ctx.needs_input_grad
    g = grad.reshape(-1, weight.shape[0])  # (N, out)
    x2 = x.reshape(-1, weight.shape[1])  # (N, in)
    g_r = g @ up if (need_x or need_down) else None  # (N, r)
    dx = dw = db = dup = ddown = None
    if need_x:
        dx = (g @ weight).addmm_(g_r, down).view(x.shape)  # (N, in): both paths' input gradients, summed in the GEMM
    if need_w:
        dw = g.t() @ x2  # (out, in)
    if need_b and ctx.has_bias:
        db = g.sum(0)  # (out,)
    if need_down:
        ddown = g_r.t() @ x2  # (r, N) @ (N, in)
    if need_up:
        dup = g.t() @ h  # (out, N) @ (N, r)
    return dx, dw, db, dup, ddown


def note_adapted_layer(layer: nn.Module) -> None:
    """Record that an adapter's forward hook was attached to ``layer`` (``AdapterHandle`` calls it), so that
    :func:`servable_lora` can find the layer from its weight. Held weakly."""
    weight = getattr(layer, "weight", None)
    if isinstance(weight, Tensor):
        _LAYERS[id(weight)] = layer


def servable_lora(weight: Tensor) -> tuple[nn.Linear, LoRAModule] | None:
    """The layer and the LoRA whose output :func:`lora_linear` may compute in place of the layer's
    ``F.linear(x, weight, bias)`` plus its forward hook, or ``None`` (then the call runs as written and the
    hooks add their deltas).

    That is the first forward hook's adapter of a plain ``nn.Linear`` whose weight is ``weight`` when it
    is a linear LoRA without a Tucker core or bias delta, enabled and unmerged, not in a shared-input group,
    and without dropout of any kind while training — and no global forward hook runs before it: any of
    those would make the layer's output differ from ``x Wᵀ + b + scale · (x downᵀ) upᵀ``.
    """
    layer = _LAYERS.get(id(weight))
    if layer is None or getattr(layer, "weight", None) is not weight:
        return None
    if type(layer).forward is not nn.Linear.forward or getattr(nn.modules.module, "_global_forward_hooks", None):
        return None
    first = next(iter(layer._forward_hooks.values()), None)
    adapter = getattr(first, "__self__", None)
    if (type(adapter) is not LoRAModule or getattr(first, "__func__", None) is not LoRAModule.hook
            or adapter.geometry.is_conv or adapter.lora_mid is not None or adapter.diff_b is not None
            or adapter.merged or not adapter.enabled or adapter._shared_input is not None):
        return None
    if adapter.training and (adapter.dropout > 0 or adapter.rank_dropout > 0 or adapter.module_dropout > 0):
        return None
    return layer, adapter  # type: ignore[return-value]
