"""Apply a LoRA to a model's weights in place, without injecting modules — and undo it exactly.

This is what inference front-ends do at load time: ``W += multiplier · ΔW`` for every layer of
the file, keeping a copy of each touched weight so :meth:`AppliedDelta.undo` restores the original
bits. Undo nested applications in reverse order (like a stack).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .adapters.base import geometry_of
from .adapters.lora import LoRAModule
from .formats.layers import group_by_layer, resolve_layers

__all__ = ["AppliedDelta", "apply_lora"]


class AppliedDelta:
    """Handle of one :func:`apply_lora`: the touched layer names and their original weights."""

    def __init__(self) -> None:
        self.originals: dict[str, tuple[nn.Module, Tensor]] = {}

    @property
    def names(self) -> list[str]:
        return list(self.originals)

    def undo(self) -> None:
        """Restore every touched weight bit for bit; idempotent."""
        with torch.no_grad():
            for layer, original in self.originals.values():
                layer.weight.copy_(original)
        self.originals.clear()


def apply_lora(model: nn.Module, state: Mapping[str, Tensor], *, scale: float = 1.0) -> AppliedDelta:
    """``W ← W + scale · ΔW`` for each layer in ``state`` (canonical keys, any layer naming).

    The delta is computed in float32 and cast once to the weight's dtype.

    Args:
        model: the model to modify in place.
        state: ``{"<layer>.lora_down.weight" / ".lora_up.weight" / ".alpha": tensor}``.
        scale: strength multiplier (the ``<lora:name:scale>`` number).

    Raises:
        LayerNotFoundError, ValueError: as :func:`sdadapt.load_adapter`.
    """
    groups = group_by_layer(state)
    resolved = resolve_layers(model, list(groups))
    deltas = []
    for key_name, layer_name in resolved.items():
        layer = model.get_submodule(layer_name)
        adapter = LoRAModule.from_file_tensors(geometry_of(layer, name=layer_name), groups[key_name], name=layer_name)
        deltas.append((layer_name, layer, adapter))
    applied = AppliedDelta()
    with torch.no_grad():
        for layer_name, layer, adapter in deltas:
            weight = layer.weight
            applied.originals[layer_name] = (layer, weight.detach().clone())
            acc = torch.promote_types(weight.dtype, torch.float32)  # float64 weights stay float64
            delta = adapter.to(acc).delta_weight().reshape(weight.shape).to(weight.device)
            weight.copy_((weight.to(acc) + scale * delta).to(weight.dtype))
    return applied
