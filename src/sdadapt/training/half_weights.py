"""kohya's ``full_fp16`` / ``full_bf16`` for adapters: trainable weights stored in fp16 / bf16.

kohya's ``train_network.py`` casts the whole network to the mixed-precision dtype
(``network.to(weight_dtype)``) and, for fp16, patches accelerate's ``GradScaler`` so that it
unscales fp16 gradients (``train_util.patch_accelerator_for_fp16_training``: torch's scaler refuses
them). This module holds the two pieces sdadapt needs for the same run:

* :func:`cast_trainable_`: the trainable parameters' storage cast in place (the same
  ``nn.Parameter`` objects, so optimisers built afterwards and the adapters' modules see them);
* :class:`HalfGradScaler` / :func:`loss_scaler`: the dynamic loss scaler that unscales fp16
  gradients too. It is torch's ``GradScaler`` otherwise: a step whose gradients hold an inf or a
  nan is skipped (the optimiser does not run) and the scale is multiplied by its
  ``backoff_factor`` (0.5); after ``growth_interval`` (2000) good steps it doubles.

The optimisers write the updated weights back from float32 arithmetic: bf16 weights with
stochastic rounding (:func:`sdadapt.training.optim.copy_stochastic_`), fp16 weights rounded to
nearest, as kohya's plain fp16 AdamW does (fp16 keeps 10 mantissa bits, 3 more than bf16: an
update is lost only below half an ulp, up to 2⁻¹¹ ≈ 4.9e-4 of the weight, where bf16 loses it below up
to 2⁻⁸ ≈ 3.9e-3).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["HalfGradScaler", "cast_trainable_", "found_inf", "loss_scaler"]


class HalfGradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` that also unscales fp16 gradients (of fp16 weights).

    Torch's refuses them ("Attempting to unscale FP16 gradients") because unscaling in fp16 can
    underflow; kohya's ``full_fp16`` allows it (its patch passes ``allow_fp16=True``), and so does
    this class. Everything else — inf/nan detection, skipped steps, the scale's growth and backoff,
    ``state_dict`` — is torch's.
    """

    def _unscale_grads_(self, optimizer, inv_scale: Tensor, found_inf: Tensor, allow_fp16: bool):  # type: ignore[override]
        return super()._unscale_grads_(optimizer, inv_scale, found_inf, True)


def loss_scaler(params: Iterable[Tensor], device_type: str) -> torch.amp.GradScaler:
    """The fp16 loss scaler for ``params``: :class:`HalfGradScaler` when any is stored in fp16,
    else torch's ``GradScaler`` (float32 weights under fp16 autocast)."""
    if any(p.dtype == torch.float16 for p in params):
        return HalfGradScaler(device_type)
    return torch.amp.GradScaler(device_type)


def found_inf(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> Tensor:
    """Whether ``scaler`` will skip ``optimizer``'s step: a 0-dim bool tensor on the scale's device, true
    when the unscaled gradients hold an inf or a nan — no host sync (torch's ``GradScaler.step`` reads
    the same flags to skip). Call it between ``scaler.unscale_(optimizer)`` and ``scaler.update()``
    (which forgets them).

    accelerate (kohya's runs) does not step the LR scheduler after a skipped step
    (``AcceleratedScheduler.step`` returns when ``optimizer.step_was_skipped``):
    :class:`~sdadapt.training.step.TrainState` counts these in ``skipped_steps`` so the schedule counts
    the optimiser steps actually taken.

    Raises:
        ValueError: ``optimizer``'s gradients were not unscaled by ``scaler`` this step.
    """
    flags = list(scaler._found_inf_per_device(optimizer).values())  # (torch's (1,) flags per device, from unscale_)
    if not flags:
        raise ValueError("found_inf: call scaler.unscale_(optimizer) first (and before scaler.update())")
    total = flags[0]
    for flag in flags[1:]:  # (several devices: summed on the first's, as GradScaler.step sums them)
        total = total + flag.to(total.device, non_blocking=True)
    return total.reshape(()) > 0


def cast_trainable_(params: Iterable[nn.Parameter], dtype: torch.dtype) -> None:
    """Store each parameter in ``dtype``, in place (``param.data``: the same objects).

    Call it before the optimiser is built (its states follow the parameters' shapes, and sdadapt's
    optimisers keep float32 states for low-precision weights).

    Raises:
        ValueError: ``dtype`` is not fp16 or bf16.
    """
    if dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"cast_trainable_ stores trainable weights in float16 or bfloat16, got {dtype}")
    with torch.no_grad():
        for param in params:
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
