"""Linear LoRA layers as one autograd function each during the training step, the delta accumulated in place.

A LoRA on a linear layer normally adds its delta in a forward hook: the base GEMM, ``down``, ``up`` and an add
of two ``(N, out)`` tensors in forward, six kernels in backward (the two paths' input gradients summed by a
seventh tensor). :func:`~sdadapt.adapters.fused_lora.lora_linear` runs three and five: the delta's up GEMM
adds into the base output, and backward's second input-gradient GEMM into the first. For LoRA on an SD1.5
UNet's attention (128 layers) that is 221 fewer kernels per step (two per layer whose input needs a gradient,
one for the others; counted by ``benchmarks/norm_casts.py``), and at batch 8 no ``(N, out)`` delta written and
read back.

:func:`fused_lora_linear` is the context the training step enters for ``StepConfig(fused_lora_linear=True)``:
a torch function mode that, for each ``F.linear`` call of a plain ``nn.Linear`` whose first forward hook is a
LoRA's it may serve (:func:`~sdadapt.adapters.fused_lora.servable_lora`), computes the layer's adapted output
by :func:`~sdadapt.adapters.fused_lora.lora_linear` and tells the hook that the output has the delta. Every
other call — convolutions, LoRA with dropout, a Tucker core or a bias delta, other families, q/k/v LoRAs
batched by :func:`~sdadapt.adapters.shared_input.batch_shared_input_adapters` — runs as before. Nothing is
patched or rebound; outside the context the hooks work as always.

Dtypes follow autocast: under it the input, weight, bias and both factors are cast to its dtype (the factors'
copies from :func:`~sdadapt.adapters.weight_casts.batched_weight_casts` when the step made them), as
``F.linear`` and the hook path cast them; without it a call is served only when the input, the weight and the
factors share one dtype. The output is the hook path's with one rounding fewer (the delta product is summed
into the base output at the GEMM's float32 accumulation instead of being rounded first): float32 equal to
~1e-6, bit for bit the base layer's while ``up`` is zero (a fresh LoRA).

Gradient checkpointing recomputes a block in backward, which must take the path its forward took: the step
starts its backward inside the mode (:func:`~sdadapt.training.step.step_backward`), and
:func:`~sdadapt.training.grad_checkpointing.enable_checkpointing` re-enters it for its recomputes
(:func:`~sdadapt.training.engine_backward.kept_for_recompute`). Under ``torch.compile`` tracing the mode does
nothing (Inductor fuses the graph).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapters.base import autocast_dtype
from ..adapters.fused_lora import lora_linear_unchecked, servable_lora
from ..adapters.weight_casts import cast_scaled_weight, cast_weight
from .engine_backward import BackwardKeepingMode, kept_for_recompute

__all__ = ["fused_lora_linear"]


def fused_lora_linear(enabled: bool = True) -> AbstractContextManager[object]:
    """Context in which the linear LoRA layers it can serve run as one autograd function each, the delta
    accumulated into the base GEMM's output (module docstring); ``enabled=False``: a no-op context. Input
    (..., in) and output (..., out) as the layer's own."""
    return _fused_lora_linear() if enabled else nullcontext()


@contextmanager
def _fused_lora_linear() -> Iterator[None]:
    """The mode, kept for checkpointed blocks to recompute under (``kept_for_recompute``)."""
    with kept_for_recompute(_FusedLoRALinear, _fused_lora_linear), _FusedLoRALinear():
        yield


class _FusedLoRALinear(BackwardKeepingMode):
    functions = frozenset({F.linear})

    def handle(self, func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if func is F.linear and not torch.compiler.is_compiling():
            served = _served_linear(args, kwargs)
            if served is not None:
                return served
        return func(*args, **kwargs)


def _served_linear(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Tensor | None:
    """``F.linear(x, weight, bias)``'s adapted output by :func:`~sdadapt.adapters.fused_lora.lora_linear`, with the
    hook told; ``None``
    when the call is not one to serve."""
    names = ("input", "weight", "bias")
    x, weight, bias = (args[i] if i < len(args) else kwargs.get(name) for i, name in enumerate(names))
    if not isinstance(weight, Tensor) or not isinstance(x, Tensor):
        return None
    served = servable_lora(weight)
    if served is None or not _in_forward_of(served[0]):
        return None
    adapter = served[1]
    dtype = autocast_dtype(x.device.type) if x.is_floating_point() else None
    if dtype is None and len({t.dtype for t in (x, weight, bias, adapter.lora_up, adapter.lora_down)
                              if t is not None}) != 1:
        return None  # (the hook path computes the delta in the factors' dtype and casts it: not this GEMM's sum)
    up = cast_scaled_weight(adapter.lora_up, adapter.scale)  # (out, r): scale · up
    down = cast_weight(adapter.lora_down)  # (r, in)
    tensors = (x, weight, bias, up, down)
    if dtype is not None:  # as autocast casts F.linear's operands and the hook path's factors
        x, weight, bias, up, down = (t if t is None or t.dtype == dtype else t.to(dtype) for t in tensors)
    output = lora_linear_unchecked(x, weight, bias, up, down)
    object.__setattr__(adapter, "_served_output", output)  # (not nn.Module's: a plain attribute, set each call)
    return output


_LINEAR_FORWARD = nn.Linear.forward.__code__
_MODULE_FILE = nn.Module._call_impl.__code__.co_filename  # (__call__'s code: _call_impl, or its nested inner)


def _in_forward_of(layer: nn.Module) -> bool:
    """Whether the innermost ``nn.Linear.forward`` running on this thread is ``layer``'s, called by the module's
    ``__call__``: the ``F.linear`` call being handled is the layer's own, whose output its forward hook will see
    (a call elsewhere with the layer's weight, or ``layer.forward(x)`` called directly, which runs no hook, runs
    as written, as it would without the mode)."""
    frame = sys._getframe(1)
    for _ in range(8):  # (_served_linear, handle, the mode's __torch_function__, then the caller)
        if frame is None:
            return False
        if frame.f_code is _LINEAR_FORWARD:
            caller = frame.f_back
            return (frame.f_locals.get("self") is layer and caller is not None
                    and caller.f_code.co_filename == _MODULE_FILE)
        frame = frame.f_back
    return False
