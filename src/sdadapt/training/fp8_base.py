"""kohya's ``--fp8_base``: the frozen base's Linear / Conv weights stored in ``float8_e4m3fn``.

Autocast casts every ``linear`` / ``conv`` weight (and bias) to its compute dtype (bf16 / fp16)
op by op, so a base stored in fp8 trains the adapters exactly as a base *rounded* to fp8 and kept
in the compute dtype, at a quarter of the fp32 bytes (half of bf16). kohya does
``unet.to(torch.float8_e4m3fn)`` (and the text encoders the same, minus ``text_model.embeddings``,
because "nn.Embedding not support FP8"). sdadapt casts the modules autocast upcasts —
``nn.Linear`` and ``nn.Conv1d/2d/3d`` (subclasses included), weight and bias as kohya does — and keeps
the rest where it is:

* embeddings (kohya keeps the text encoders' too: ``F.embedding`` has no autocast rule);
* norms (GroupNorm / LayerNorm weights, < 0.1 % of an SD UNet's bytes: kohya's ``.to()`` casts them
  as well, which CUDA autocast tolerates and CPU autocast refuses — "mixed dtype (CPU)" — and an e4m3
  scale near 1 has steps of 0.125);
* anything trainable (``requires_grad``) and every adapter (``<layer>.sdadapt.*``).

``state_dict()`` keys do not change (the dtypes of the cast tensors do, as kohya's). The cast is
lossy (3 mantissa bits), so there is no way back: load the model again for full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["FP8_DTYPE", "Fp8Cast", "cast_base_to_fp8", "fp8_castable"]

#: kohya's storage dtype (``torch.float8_e4m3fn``: 4 exponent bits, 3 mantissa bits, max 448).
FP8_DTYPE = torch.float8_e4m3fn

_CASTABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Fp8Cast:
    """What :func:`cast_base_to_fp8` changed: the cast tensors' names (``state_dict()`` keys) and
    the bytes of the model's parameters and buffers before and after."""

    names: tuple[str, ...]
    bytes_before: int
    bytes_after: int


def _model_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def fp8_castable(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The ``(name, module)`` pairs :func:`cast_base_to_fp8` casts: every ``nn.Linear`` /
    ``nn.Conv1d/2d/3d`` (subclasses count) that is not inside an adapter (an ``sdadapt`` child)."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, _CASTABLE) and "sdadapt" not in name.split(".")]


def cast_base_to_fp8(model: nn.Module, *, dtype: torch.dtype = FP8_DTYPE) -> Fp8Cast:
    """Store ``model``'s frozen Linear / Conv weights and biases in fp8, in place (kohya's ``--fp8_base``).

    Each chosen floating tensor ``W`` (weight (out, in, *k), bias (out,)) becomes ``W.to(dtype)``
    (round to nearest, saturating at ±448 for e4m3fn): exactly kohya's ``module.to(float8_e4m3fn)``
    on those tensors. Run the model under ``torch.autocast`` (bf16 or fp16) afterwards: its
    ``linear`` / ``conv`` ops upcast the fp8 weights to the compute dtype; outside autocast they fail.

    Args:
        model: any module (a UNet, a text encoder); adapters may already be injected (they are skipped,
            as are trainable parameters, norms and embeddings).
        dtype: ``torch.float8_e4m3fn`` (kohya's) or ``torch.float8_e5m2``.

    Returns:
        :class:`Fp8Cast` naming the cast tensors, with the model's bytes before / after.

    Raises:
        TypeError: ``dtype`` is not a float8 dtype.
        ValueError: a chosen layer has an adapter merged into its weight (unmerge it first: merging into fp8
            would round the delta to 3 mantissa bits), or a chosen weight is trainable (``requires_grad``:
            full fine-tuning trains the base, which fp8 storage cannot hold).
    """
    if dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        raise TypeError(f"cast_base_to_fp8 stores weights in a float8 dtype (torch.float8_e4m3fn, kohya's), got {dtype}")
    chosen = fp8_castable(model)
    for name, module in chosen:
        slot = module._modules.get("sdadapt")
        if slot is not None and getattr(slot, "original_weight", None) is not None:
            raise ValueError(f"{name}: an adapter is merged into this layer's weight; unmerge it before storing the base "
                             "in fp8 (or merge after loading the model again in full precision)")
        trainable = [p for p in ("weight", "bias") if getattr(module, p, None) is not None and getattr(module, p).requires_grad]
        if trainable:
            raise ValueError(f"{name}.{trainable[0]} is trainable: an fp8 base stores frozen weights only (kohya's "
                             "--fp8_base is for network training); freeze the base or train an adapter")
    before = _model_bytes(model)
    names: list[str] = []
    with torch.no_grad():
        for name, module in chosen:
            for key in ("weight", "bias"):
                param = getattr(module, key, None)
                if param is None or not param.is_floating_point() or param.dtype == dtype:
                    continue
                param.data = param.data.to(dtype)  # (the Parameter object and its state_dict key stay)
                names.append(f"{name}.{key}" if name else key)
    return Fp8Cast(names=tuple(names), bytes_before=before, bytes_after=_model_bytes(model))
