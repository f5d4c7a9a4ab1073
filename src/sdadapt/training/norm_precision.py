"""GroupNorm and LayerNorm in the autocast dtype: half-precision in and out, float32 statistics.

CUDA autocast runs ``group_norm`` and ``layer_norm`` in float32: a bfloat16 input is cast up, the
weight and bias are cast up, the norm writes a float32 result, whatever follows runs on float32
(SiLU in a ResNet block) and every convolution or linear reading it casts it back down — LoRA's
down-projections too, once per adapted layer. In backward each of those casts has its own. An SD1.5
LoRA step (61 GroupNorms, 48 LayerNorms) dispatches 841 casts under that rule and 8 without it
(``benchmarks/norm_casts.py``), and at batch 8 moves the normalised activations as float32. Inside
the norm kernels the mean and variance accumulate in float32 whatever the input dtype, so running
them on the half-precision tensor directly changes one thing: the normalised output is rounded to
the half dtype as it is written (autocast rounds it at the next matmul's input, after the SiLU).

:func:`half_precision_norms` is the context the training step enters for
``StepConfig(half_precision_norms=True)``: a torch function mode that runs each of these calls with
autocast off and the affine weights in the input's dtype when the input already is autocast's dtype.
Nothing is patched and nothing of the model changes; outside the context autocast is as before. A
mode sees every torch call on the host, so an eager step pays a little Python time for it; a
:class:`~sdadapt.training.step_capture.CapturedStep` pays it once, at capture.

Gradient checkpointing recomputes a block inside backward, which must run its norms as the forward
did (torch refuses a recompute whose saved tensors differ). The training step starts its backward inside
the mode too (:func:`~sdadapt.training.step.step_backward`): autograd runs backward under the thread-local
state of that call, torch function modes included, so a model that checkpoints through its own code
(diffusers' ``enable_gradient_checkpointing()``) recomputes under it; ``loss.backward()`` called inside
the context does too (the mode restarts it: :class:`~sdadapt.training.engine_backward.BackwardKeepingMode`).
:func:`~sdadapt.training.grad_checkpointing.enable_checkpointing` also re-enters the mode for its
recomputes (:func:`~sdadapt.training.engine_backward.kept_for_recompute`, its ``context_fn``), for a loop that calls
``backward()`` outside it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapters.base import autocast_dtype
from .engine_backward import BackwardKeepingMode, kept_for_recompute

__all__ = ["NORM_FUNCTIONS", "half_precision_norms"]

#: the calls the mode runs in half precision (``nn.GroupNorm``/``nn.LayerNorm`` reach the first two);
#: for all four the input is argument 0, the weight argument 2 and the bias argument 3
NORM_FUNCTIONS: frozenset[Callable[..., Tensor]] = frozenset(
    {F.group_norm, F.layer_norm, torch.group_norm, torch.layer_norm})


def half_precision_norms(enabled: bool, device_type: str) -> AbstractContextManager[object]:
    """Context in which GroupNorm and LayerNorm calls on ``device_type`` tensors of autocast's dtype
    run in that dtype (input (B, C, *) or (*, normalized_shape), output the same shape and dtype),
    instead of autocast's float32; ``enabled=False``: a no-op context.

    Calls outside autocast, on other devices, or on inputs of another dtype are left alone.
    """
    return _half_precision_norms(device_type) if enabled else nullcontext()


@contextmanager
def _half_precision_norms(device_type: str) -> Iterator[None]:
    """The mode, kept for checkpointed blocks to recompute under (``kept_for_recompute``)."""
    with kept_for_recompute(_HalfPrecisionNorms, lambda: _half_precision_norms(device_type)), \
            _HalfPrecisionNorms(device_type):
        yield


class _HalfPrecisionNorms(BackwardKeepingMode):
    functions = NORM_FUNCTIONS

    def __init__(self, device_type: str) -> None:
        super().__init__()
        self.device_type = device_type

    def handle(self, func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if func in NORM_FUNCTIONS:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor) and x.device.type == self.device_type:
                dtype = autocast_dtype(self.device_type)
                if dtype is not None and x.dtype == dtype:
                    return _norm_in(func, dtype, self.device_type, args, kwargs)
        return func(*args, **kwargs)


def _norm_in(func: Callable[..., Tensor], dtype: torch.dtype, device_type: str, args: Sequence[Any],
             kwargs: Mapping[str, Any]) -> Tensor:
    """``func`` with autocast off on ``device_type`` and its weight and bias cast to ``dtype``."""
    args, kwargs = list(args), dict(kwargs)
    for index, name in ((2, "weight"), (3, "bias")):
        if index < len(args):
            args[index] = _cast(args[index], dtype)
        elif name in kwargs:
            kwargs[name] = _cast(kwargs[name], dtype)
    with torch.autocast(device_type, enabled=False):
        return func(*args, **kwargs)


def _cast(weight: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return weight if weight is None or weight.dtype == dtype else weight.to(dtype)
