"""Apply a LoRA to a model's weights in place, without injecting modules — and undo it exactly.

This is what inference front-ends do at load time: ``W += multiplier · ΔW`` for every layer of
the file (any family: LoRA/LoCon, LoHa, LoKr, full ``diff``/``diff_b``; DoRA moves ``W`` towards
its ``W'`` by the multiplier), keeping a copy of each touched weight (and bias) so
:meth:`AppliedDelta.undo` restores the original bits. Undo nested applications in reverse order
(like a stack).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .adapters.base import LayerGeometry, geometry_of
from .adapters.input_pad import is_inpainting_conv_in_delta
from .adapters.registry import file_layer_delta
from .checks import finite_number
from .formats.layers import group_by_layer, resolve_layers
from .model_args import as_module, check_layer_state

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


def _merge_geometry(layer: nn.Module, name: str):
    """The layer's :func:`~sdadapt.adapters.base.geometry_of`; an ``nn.Embedding`` (a text encoder's token or
    position table, which ComfyUI's extracted LoRAs and kohya's full fine-tune diffs reach) as the linear map of its
    ``(num_embeddings, dim)`` weight: merging adds ``ΔW`` to the table as ComfyUI's loader does (the training path
    still wraps Linear / Conv2d / norm layers only)."""
    if isinstance(layer, nn.Embedding):
        return LayerGeometry(layer.num_embeddings, layer.embedding_dim, has_bias=False)
    return geometry_of(layer, name=name)


def apply_lora(model: nn.Module, state: Mapping[str, Tensor], *, scale: float = 1.0) -> AppliedDelta:
    """``W ← W + scale · ΔW`` for each layer in ``state`` (canonical keys, any layer naming).

    The delta is computed in float32 and cast once to the weight's dtype.

    Args:
        model: the model to modify in place.
        state: canonical keys of any family, e.g. ``{"<layer>.lora_down.weight" / ".lora_up.weight" /
            ".alpha": tensor}`` or ``hada_*`` / ``lokr_*`` / ``diff`` / ``dora_scale`` tensors.
        scale: strength multiplier (the ``<lora:name:scale>`` number).

    A ``conv_in`` delta of 4 input channels on an inpainting UNet's 9-channel ``conv_in`` is
    zero-padded to 9, as A1111's Lora extension does: the latent channels change, the mask and
    masked-image channels do not (:mod:`sdadapt.adapters.input_pad`; ``load_adapter`` does the same).

    Raises:
        LayerNotFoundError, ValueError, TypeError: as :func:`sdadapt.load_adapter`; InputError (a
            ValueError): ``scale`` is not a finite number.
    """
    scale = finite_number(scale, name="apply_lora's scale")  # (NaN would poison every touched weight)
    model = as_module(model, caller="apply_lora")
    check_layer_state(state, caller="apply_lora")
    groups = group_by_layer(state)
    resolved = resolve_layers(model, list(groups))
    deltas = []  # every delta first: a bad layer leaves the model untouched
    for key_name, layer_name in resolved.items():
        layer = model.get_submodule(layer_name)
        weight = layer.weight.detach()
        acc = torch.promote_types(weight.dtype, torch.float32)  # float64 weights stay float64
        geometry = _merge_geometry(layer, layer_name)
        padded = is_inpainting_conv_in_delta(groups[key_name], geometry, layer_name)
        delta, bias_delta = file_layer_delta(
            groups[key_name], dataclasses.replace(geometry, in_features=4) if padded else geometry,
            base_weight=None if padded else weight, scale=scale, dtype=acc, name=layer_name,
        )
        if padded:  # (A1111: the mask and masked-image channels 4..8 get no change)
            delta = torch.nn.functional.pad(delta.to(weight.device), (0, 0, 0, 0, 0, 5))
        if bias_delta is not None and getattr(layer, "bias", None) is None:
            raise ValueError(f"{layer_name}: the file has a bias delta (diff_b) but the layer has no bias")
        deltas.append((layer_name, layer, delta, bias_delta))
    applied = AppliedDelta()
    with torch.no_grad():
        for layer_name, layer, delta, bias_delta in deltas:
            weight = layer.weight
            applied.originals[layer_name] = (layer, weight.detach().clone())
            weight.copy_((weight.to(delta.dtype) + delta.reshape(weight.shape)).to(weight.dtype))
            if bias_delta is not None:
                applied.original_biases[layer_name] = layer.bias.detach().clone()
                layer.bias.copy_((layer.bias.to(bias_delta.dtype) + bias_delta.to(layer.bias.device)).to(layer.bias.dtype))
    return applied
