"""Apply a LoRA to a model's weights in place, without injecting modules — and undo it exactly.

This is what inference front-ends do at load time: ``W += multiplier · ΔW`` for every layer of
the file (any family: LoRA/LoCon, LoHa, LoKr, full ``diff``/``diff_b``; DoRA moves ``W`` towards
its ``W'`` by the multiplier), keeping a copy of each touched weight (and bias) so
:meth:`AppliedDelta.undo` restores the original bits. Undo nested applications in reverse order
(like a stack).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .adapters.base import geometry_of
from .adapters.registry import adapter_from_file_tensors
from .formats.layers import group_by_layer, resolve_layers

__all__ = ["AppliedDelta", "apply_lora"]


class AppliedDelta:
    """Handle of one :func:`apply_lora`: the touched layer names and their original weights."""

    def __init__(self) -> None:
        self.originals: dict[str, tuple[nn.Module, Tensor]] = {}
        self.original_biases: dict[str, Tensor] = {}

    @property
    def names(self) -> list[str]:
        return list(self.originals)

    def undo(self) -> None:
        """Restore every touched weight bit for bit; idempotent."""
        with torch.no_grad():
            for name, (layer, original) in self.originals.items():
                layer.weight.copy_(original)
                if name in self.original_biases:
                    layer.bias.copy_(self.original_biases[name])
        self.originals.clear()
        self.original_biases.clear()


def apply_lora(model: nn.Module, state: Mapping[str, Tensor], *, scale: float = 1.0) -> AppliedDelta:
    """``W ← W + scale · ΔW`` for each layer in ``state`` (canonical keys, any layer naming).

    The delta is computed in float32 and cast once to the weight's dtype.

    Args:
        model: the model to modify in place.
        state: canonical keys of any family, e.g. ``{"<layer>.lora_down.weight" / ".lora_up.weight" /
            ".alpha": tensor}`` or ``hada_*`` / ``lokr_*`` / ``diff`` / ``dora_scale`` tensors.
        scale: strength multiplier (the ``<lora:name:scale>`` number).

    Raises:
        LayerNotFoundError, ValueError: as :func:`sdadapt.load_adapter`.
    """
    groups = group_by_layer(state)
    resolved = resolve_layers(model, list(groups))
    deltas = []
    for key_name, layer_name in resolved.items():
        layer = model.get_submodule(layer_name)
        adapter = adapter_from_file_tensors(geometry_of(layer, name=layer_name), groups[key_name], name=layer_name)
        if adapter.bias_delta() is not None and getattr(layer, "bias", None) is None:
            raise ValueError(f"{layer_name}: the file has a bias delta (diff_b) but the layer has no bias")
        deltas.append((layer_name, layer, adapter))
    applied = AppliedDelta()
    with torch.no_grad():
        for layer_name, layer, adapter in deltas:
            weight = layer.weight
            applied.originals[layer_name] = (layer, weight.detach().clone())
            acc = torch.promote_types(weight.dtype, torch.float32)  # float64 weights stay float64
            adapter = adapter.to(device=weight.device, dtype=acc)
            adapter.set_multiplier(scale)  # DoRA: W + t·(W' − W); others: t·ΔW
            delta = adapter.merge_delta(weight.to(acc)).reshape(weight.shape)
            weight.copy_((weight.to(acc) + delta).to(weight.dtype))
            bias_delta = adapter.bias_delta()
            if bias_delta is not None:
                applied.original_biases[layer_name] = layer.bias.detach().clone()
                layer.bias.copy_((layer.bias.to(acc) + bias_delta).to(layer.bias.dtype))
    return applied
