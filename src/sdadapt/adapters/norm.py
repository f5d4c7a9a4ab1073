"""LyCORIS norm modules: trained offsets of a GroupNorm's / LayerNorm's affine weights (``train_norm``).

A normalisation layer computes ``y = n(x) ⊙ w + b`` with ``n`` the normalisation (no affine) and
``w``, ``b`` of shape ``(C,)``. LyCORIS' ``NormModule`` (its kohya network with
``network_args = ["train_norm=True"]``, beside any algo) learns offsets ``w_norm``, ``b_norm``
(zero at init) and, at strength ``m``::

    w' = w + m · w_norm        b' = b + m · b_norm        Δy = n(x) ⊙ (m · w_norm) + m · b_norm

(GroupNorm: along the channel axis 1; LayerNorm: the last axis). The delta does not read the base
weights; it is linear in both tensors, and merging adds ``m · w_norm`` to the weight and
``m · b_norm`` to the bias — there is no rank (``resize-lora`` / ``combine-loras`` keep or refuse it).

Geometry: a norm layer's :class:`~sdadapt.adapters.base.LayerGeometry` has ``norm`` set
(``"group"``/``"layer"`` from a live layer, ``"affine"`` from a checkpoint's 1-D weight, which
merges but cannot run) and ``weight_shape == (C,)``; this family takes only such geometries and
no other family does (``adapts_norms``).

Files (LyCORIS, ``lora_unet_<layer>.<key>``): ``w_norm`` (C,) and ``b_norm`` (C,); LyCORIS writes
``b_norm`` for every GroupNorm/LayerNorm (a layer without a bias takes ``b_norm`` only unmerged).
A1111 (``network_norm.py``, which wants both keys) and ComfyUI add them the same way, times the strength.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterModule, LayerGeometry

__all__ = ["NormConfig", "NormModule", "norm_delta_output"]


def norm_delta_output(x: Tensor, geometry: LayerGeometry, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``Δy = n(x) ⊙ weight + bias`` for a norm layer's offsets.

    Args:
        x: the layer's input: GroupNorm (N, C, *spatial); LayerNorm (..., C).
        geometry: the layer (``norm`` ``"group"`` or ``"layer"``, ``norm_groups``, ``norm_eps``).
        weight: (C,) the weight offset (strength included).
        bias: (C,) the bias offset, or ``None``.

    Returns:
        Δy, the shape of ``x``.

    Raises:
        TypeError: a geometry read from a checkpoint (``norm == "affine"``): the normalisation is unknown.
    """
    if geometry.norm == "group":
        normed = F.group_norm(x, geometry.norm_groups, None, None, geometry.norm_eps)
        shape = (-1, *([1] * (x.dim() - 2)))  # (C, 1, 1) on (N, C, H, W)
        out = normed * weight.reshape(shape)
        return out if bias is None else out + bias.reshape(shape)
    if geometry.norm == "layer":
        normed = F.layer_norm(x, (geometry.out_features,), None, None, geometry.norm_eps)
        out = normed * weight
        return out if bias is None else out + bias
    raise TypeError(f"norm offsets on a {geometry.norm or 'Linear/Conv2d'!r} geometry cannot run: build it with "
                    "geometry_of(an nn.GroupNorm / nn.LayerNorm)")


@dataclass(frozen=True, kw_only=True)
class NormConfig:
    """LyCORIS norm-module hyper-parameters (its ``train_norm=True``; target GroupNorm/LayerNorm layers).

    Attributes:
        module_dropout: probability to skip the whole module per training step.
    """

    module_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"NormConfig.module_dropout must be in [0, 1), got {self.module_dropout!r}")


class NormModule(AdapterModule):
    """Offsets ``w_norm`` (and ``b_norm`` when the layer has a bias) of one normalisation layer.

    ``Δy = n(x) ⊙ (m · w_norm) + m · b_norm`` (:func:`norm_delta_output`); ``delta_weight()`` is
    ``m · w_norm`` (C,), ``bias_delta()`` ``m · b_norm`` (C,).
    """

    family: ClassVar[str] = "norm"
    file_keys: ClassVar[tuple[str, ...]] = ("w_norm", "b_norm")
    marker_keys: ClassVar[tuple[str, ...]] = ("w_norm", "b_norm")
    linear_keys: ClassVar[tuple[str, ...]] = ("w_norm", "b_norm")
    lycoris_algo: ClassVar[str] = ""  # not an algo: LyCORIS' train_norm beside one (kohya metadata)
    adapts_norms: ClassVar[bool] = True

    def __init__(
        self,
        geometry: LayerGeometry,
        *,
        with_bias: bool | None = None,
        module_dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(geometry)
        if not geometry.is_norm:
            raise TypeError(f"NormModule adapts GroupNorm/LayerNorm layers, not a weight of shape {geometry.weight_shape}")
        channels = geometry.out_features
        self.w_norm = nn.Parameter(torch.zeros(channels, dtype=dtype, device=device))
        with_bias = geometry.has_bias if with_bias is None else with_bias
        self.b_norm = nn.Parameter(torch.zeros(channels, dtype=dtype, device=device)) if with_bias else None
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float32, device=device), persistent=False)
        self.module_dropout = module_dropout

    @property
    def rank(self) -> int:
        """The channel count (norm offsets have no rank; reports show C)."""
        return self.w_norm.numel()

    def delta_dtype(self) -> torch.dtype:
        return self.w_norm.dtype

    def delta_weight(self) -> Tensor:
        """(C,): ``m · w_norm``."""
        return self.w_norm * self.scale.to(self.w_norm.dtype)

    def bias_delta(self) -> Tensor | None:
        """(C,): ``m · b_norm``, or ``None`` without ``b_norm``."""
        return None if self.b_norm is None else self.b_norm * self.scale.to(self.b_norm.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """Δy = ``n(x) ⊙ m·w_norm + m·b_norm`` (see :func:`norm_delta_output`)."""
        return norm_delta_output(x, self.geometry, self.delta_weight(), self.bias_delta())

    def file_tensors(self) -> dict[str, Tensor]:
        tensors = {"w_norm": self.w_norm}
        if self.b_norm is not None:
            tensors["b_norm"] = self.b_norm
        return tensors

    @classmethod
    def from_config(
        cls,
        config: NormConfig,
        geometry: LayerGeometry,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> NormModule:
        """Fresh zero offsets for one norm layer (``b_norm`` when it has a bias)."""
        return cls(geometry, module_dropout=config.module_dropout, dtype=dtype, device=device)

    @classmethod
    def from_file_tensors(
        cls, geometry: LayerGeometry, tensors: dict[str, Tensor], *, name: str = "<module>"
    ) -> NormModule:
        """Build from ``{"w_norm", "b_norm"}`` (``b_norm`` optional).

        Raises:
            ValueError: ``w_norm`` missing, or a tensor that is not ``(C,)`` for the layer — naming ``name``.
        """
        if "w_norm" not in tensors:
            raise ValueError(f"{name}: LyCORIS norm tensors need w_norm (have {sorted(tensors)})")
        want = (geometry.out_features,)
        for key in ("w_norm", "b_norm"):
            value = tensors.get(key)
            if value is not None and tuple(value.shape) != want:
                raise ValueError(f"{name}.{key}: norm offset of shape {tuple(value.shape)} does not fit the layer's "
                                 f"weight {want}. The file was made for another model.")
        weight = tensors["w_norm"]
        module = cls(geometry, with_bias="b_norm" in tensors, dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            module.w_norm.copy_(weight)
            if module.b_norm is not None:
                module.b_norm.copy_(tensors["b_norm"])
        return module

    @classmethod
    def weight_shape_from_file_tensors(cls, tensors: dict[str, Tensor]) -> tuple[int, ...] | None:
        """``(C,)`` from ``w_norm`` (shapes only)."""
        weight = tensors.get("w_norm")
        return None if weight is None or weight.dim() != 1 else (int(weight.shape[0]),)

    @classmethod
    def file_rank(cls, shapes: dict[str, tuple[int, ...]]) -> tuple[int | None, bool]:
        """Norm offsets have no rank: ``(None, False)``."""
        return None, False
