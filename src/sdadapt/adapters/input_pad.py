"""A 4-input-channel ``conv_in`` delta on an inpainting UNet's 9-channel ``conv_in``.

An inpainting UNet's ``conv_in`` reads 9 channels (the 4 latent channels, the mask, the 4
masked-image latent channels); a LoRA-family file made on a plain model carries a ``conv_in`` delta
of 4 input channels. A1111's Lora extension zero-pads such a delta's input axis 4 -> 9
(``networks.py`` ``network_apply_weights``): the latent channels change, the mask and masked-image
channels do not. Every sdadapt application path does the same:

* :func:`sdadapt.apply_lora` pads the merged delta ``ΔW (out, 4, kh, kw)`` to ``(out, 9, kh, kw)``;
* :func:`sdadapt.load_adapter` wraps the 4-channel adapter in a :class:`ChannelPadAdapter`, whose
  ``Δy`` reads the first 4 input channels only (``conv(x[:, :4], ΔW)``, equal to
  ``conv(x, pad(ΔW))``) and whose merge delta is the padded ``ΔW``.

Every other mismatch between a file's delta and its layer is refused, as before.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import AdapterModule, LayerGeometry
from .registry import weight_shape_of_file_tensors

__all__ = ["INPAINTING_IN_CHANNELS", "LATENT_CHANNELS", "ChannelPadAdapter", "is_inpainting_conv_in_delta"]

#: an inpainting UNet's ``conv_in`` input channels: latents, mask, masked-image latents
INPAINTING_IN_CHANNELS = 9
#: a plain UNet's ``conv_in`` input channels (the latents)
LATENT_CHANNELS = 4


def is_inpainting_conv_in_delta(tensors: Mapping[str, Tensor], geometry: LayerGeometry, layer_name: str) -> bool:
    """Whether one layer's file tensors are a 4-input-channel ``conv_in`` delta for an inpainting
    UNet's 9-channel ``conv_in`` (diffusers ``conv_in``, LDM ``input_blocks.0.0``): the only shape
    mismatch sdadapt pads (A1111's ``network_apply_weights`` rule) rather than refuses.

    Args:
        tensors: the layer's canonical file tensors (``lora_down.weight`` ..., shapes read only).
        geometry: the model layer's geometry.
        layer_name: the model layer's qualified name.

    Raises:
        ValueError: such a layer with a DoRA magnitude (``dora_scale``: its delta reads the base
            weight, which has 9 input channels), naming the layer.
    """
    if not (geometry.kernel and geometry.in_features == INPAINTING_IN_CHANNELS
            and (layer_name.rsplit(".", 1)[-1] == "conv_in" or layer_name.endswith("input_blocks.0.0"))):
        return False
    try:
        shape = weight_shape_of_file_tensors(tensors, name=layer_name)
    except ValueError:
        return False  # (keys of no family: file_layer_delta says so)
    if shape is None or tuple(shape) != (geometry.out_features, LATENT_CHANNELS, *geometry.kernel):
        return False
    if "dora_scale" in tensors:
        raise ValueError(f"{layer_name}: a DoRA delta made for a 4-channel conv_in on an inpainting model's 9-channel "
                         "conv_in; DoRA reads the base weight, which does not fit it; apply the file to a "
                         "non-inpainting model, or leave conv_in out of the file")
    return True


class ChannelPadAdapter(AdapterModule):
    """An adapter made for the first ``inner.geometry.in_features`` input channels of a wider layer:
    ``Δy = inner(x[:, :n])``, merge delta ``ΔW`` zero-padded on the input axis to the layer's width.

    Everything else (file tensors, rank, alpha, scale and multiplier) is the inner adapter's, so the
    adapter's canonical state keys are those of the file it was loaded from.

    Args:
        inner: the adapter built for ``geometry`` with ``in_features = n`` (an additive family: not DoRA).
        geometry: the layer's geometry (``in_features`` > n).
    """

    def __init__(self, inner: AdapterModule, geometry: LayerGeometry) -> None:
        if inner.uses_base_weight or inner.geometry.in_features >= geometry.in_features:
            raise ValueError(f"ChannelPadAdapter pads an additive adapter of fewer input channels than the layer's "
                             f"{geometry.in_features}; got a {type(inner).__name__} of {inner.geometry.in_features}")
        super().__init__(geometry)
        self.inner = inner
        self.family = inner.family  # (reports and max-norm read the family of the file)
        self.module_dropout = inner.module_dropout

    @property
    def channels(self) -> int:
        """n: the input channels the inner adapter reads (the first n of the layer's)."""
        return self.inner.geometry.in_features

    @property
    def rank(self) -> int:
        return self.inner.rank

    def base_scale(self) -> float:
        return self.inner.base_scale()

    def set_multiplier(self, value: float) -> None:
        self.multiplier = float(value)
        self.inner.set_multiplier(value)

    def refresh_scale(self) -> None:
        self.inner.refresh_scale()

    def delta_weight(self) -> Tensor:
        """(out, in, *kernel): the inner ``ΔW`` (out, n, *kernel) with zeros on input channels n..in-1."""
        delta = self.inner.delta_weight()
        pad = [0, 0] * (delta.dim() - 2) + [0, self.geometry.in_features - self.channels]
        return F.pad(delta, pad)

    def bias_delta(self) -> Tensor | None:
        return self.inner.bias_delta()

    def forward(self, x: Tensor) -> Tensor:
        """Δy (B, out, H', W') for the layer's input ``x`` (B, in, H, W): the inner adapter's on ``x[:, :n]``."""
        return self.inner(x[:, : self.channels])

    def file_tensors(self) -> dict[str, Tensor]:
        return self.inner.file_tensors()

    def delta_dtype(self) -> torch.dtype:
        return self.inner.delta_dtype()

