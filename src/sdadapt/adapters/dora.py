"""DoRA: weight-decomposed adaptation (Liu et al. 2024) over any additive family.

The adapted weight is a learned magnitude times the direction of the base weight plus the inner
family's delta ``ΔW`` (LoRA, LoHa, LoKr)::

    W' = m ⊙ (W + ΔW) / ‖W + ΔW‖

Two orientations are in use; the norm is taken over every axis but one:

* output axis (``wd_on_out=True``): ``‖·‖`` per output row, ``m`` of shape (out, 1[, 1, 1]).
  This is the paper, peft/diffusers (``lora_magnitude_vector``, (out,) for linear, (1, out, 1, 1)
  for conv) and LyCORIS since 2025-04 (``dora_scale`` (out, 1[, 1, 1])). sdadapt writes this one.
* input axis (``wd_on_out=False``): ``‖·‖`` per input column, ``m`` of shape (1, in[, 1, 1]):
  older LyCORIS files and A1111's implementation. Read, applied and written back as they are.

sdadapt's canonical tensor is ``dora_scale`` in the file's own orientation; its shape says which
(``(out, 1, ...)`` vs ``(1, in, ...)``).

Gradient through the norm: the paper (§4.3) and peft treat ``‖W + ΔW‖`` as a constant in the
backward pass (``detach``), which saves the memory of the norm's graph and, the paper reports, costs
no accuracy; LyCORIS back-propagates through it. sdadapt detaches, like peft: the forward values
are identical either way, only the gradient of the inner factors differs (by the term through the
norm). The magnitude's own gradient is the same in both.

Strength: ``multiplier`` t interpolates the merged weight, ``W + t·(W' − W)``, as ComfyUI does;
t = 1 is exact DoRA everywhere. (LyCORIS instead rescales the ratio, ``(W+ΔW)·(t·(m/‖·‖ − 1) + 1)``,
which agrees at t = 1 only.)

At init ``m = ‖W‖`` and ``ΔW = 0``, so ``W' = W`` exactly.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .base import AdapterModule, LayerGeometry, drop_output_rows
from .lora import LoRAConfig

__all__ = ["DoRAConfig", "DoRAModule", "weight_norm", "dora_weight", "dora_orientation"]


def weight_norm(weight: Tensor, *, wd_on_out: bool = True) -> Tensor:
    """L2 norm of ``weight`` (out, in, *k) per output row or per input column.

    Returns:
        (out, 1, *1) for ``wd_on_out``, else (1, in, *1).
    """
    ones = [1] * (weight.dim() - 2)
    if wd_on_out:
        return weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(weight.shape[0], 1, *ones)
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(1, weight.shape[1], *ones)


def dora_weight(
    base: Tensor, delta: Tensor, magnitude: Tensor, *, wd_on_out: bool = True, detach_norm: bool = True
) -> Tensor:
    """``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖``.

    Args:
        base: W (out, in, *k).
        delta: ΔW (out, in, *k), the inner family's scaled delta.
        magnitude: m, (out, 1, *1) or (1, in, *1) matching ``wd_on_out``.
        detach_norm: treat the norm as a constant in backward (paper §4.3, peft).

    Returns:
        (out, in, *k). A zero row/column of ``W + ΔW`` stays zero (its norm is clamped to the
        smallest normal float instead of dividing by zero).
    """
    directed = base + delta
    norm = weight_norm(directed, wd_on_out=wd_on_out)
    if detach_norm:
        norm = norm.detach()
    return directed * (magnitude / norm.clamp_min(torch.finfo(norm.dtype).tiny))


def dora_orientation(shape: tuple[int, ...], geometry: LayerGeometry) -> bool:
    """``wd_on_out`` for a ``dora_scale`` of ``shape`` on a layer (raises if it fits neither)."""
    ones = (1,) * len(geometry.kernel)
    if tuple(shape) == (geometry.out_features, 1, *ones):
        return True
    if tuple(shape) == (1, geometry.in_features, *ones):
        return False
    raise ValueError(
        f"dora_scale of shape {tuple(shape)} fits neither orientation of a layer of weight shape "
        f"{geometry.weight_shape}: expected {(geometry.out_features, 1, *ones)} (per output row) or "
        f"{(1, geometry.in_features, *ones)} (per input column)"
    )


@dataclass(frozen=True)
class DoRAConfig:
    """DoRA over an inner additive family.

    Attributes:
        inner: the inner family's config (:class:`LoRAConfig`, ``LoHaConfig``, ``LoKrConfig``).
        wd_on_out: magnitude per output row (paper, peft, LyCORIS ≥ 2025-04); ``False`` for the
            per-input-column variant of older LyCORIS.
    """

    inner: Any = field(default_factory=LoRAConfig)
    _: KW_ONLY
    wd_on_out: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.inner, DoRAConfig):
            raise ValueError("DoRAConfig.inner cannot itself be a DoRAConfig")
        if getattr(self.inner, "init", None) == "pissa":
            raise ValueError("DoRAConfig: a PiSSA-initialised inner LoRA is not supported; use init='kaiming' or 'gaussian'")
        if getattr(self.inner, "dropout", 0.0):
            raise ValueError("DoRAConfig: the inner LoRA's dropout (on its rank activations) never runs, DoRA forms ΔW as "
                             "a weight (LyCORIS ignores it too); use rank_dropout (whole output rows of ΔW dropped at "
                             "each training step, as LyCORIS' DoRA) or leave it out")


class DoRAModule(AdapterModule):
    """DoRA around one inner adapter module.

    Children/parameters: ``inner`` (the additive adapter, its tensors keep their file names) and
    ``dora_scale`` (the magnitude, in the orientation of ``wd_on_out``; the adapter dtype, or
    the file's when loaded). Not additive:
    Δy depends on the base weight, which the hook passes in (``uses_base_weight``).
    """

    family: ClassVar[str] = "dora"
    #: DoRA wraps another family: its own key beside that family's tensors (LyCORIS ``dora_wd``)
    file_keys: ClassVar[tuple[str, ...]] = ("dora_scale",)
    marker_keys: ClassVar[tuple[str, ...]] = ("dora_scale",)
    wraps_family: ClassVar[bool] = True
    #: m ⊙ (W + ΔW)/‖W + ΔW‖ is not linear in any tensor: block weights scale W' − W instead
    linear_keys: ClassVar[tuple[str, ...]] = ()
    uses_base_weight: ClassVar[bool] = True

    def __init__(
        self,
        inner: AdapterModule,
        *,
        wd_on_out: bool = True,
        dtype: torch.dtype | None = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(inner.geometry)
        if inner.uses_base_weight:
            raise ValueError(f"DoRA wraps an additive adapter (LoRA, LoHa, LoKr, full), not {type(inner).__name__}, whose "
                             "delta is made from the base weight (DoRA, (IA)³, OFT, GLoRA)")
        self.inner = inner
        self.wd_on_out = wd_on_out
        geometry = inner.geometry
        ones = [1] * len(geometry.kernel)
        shape = (geometry.out_features, 1, *ones) if wd_on_out else (1, geometry.in_features, *ones)
        self.dora_scale = nn.Parameter(torch.ones(shape, dtype=dtype, device=device))
        # ``multiplier`` as a 0-dim buffer (not saved): set_scale() fills it in place, so a
        # torch.compile'd model neither specialises on the strength nor recompiles when it changes
        strength_dtype = torch.promote_types(dtype or torch.float32, torch.float32)  # float64 DoRA: a float64 strength
        self.register_buffer("strength", torch.tensor(1.0, dtype=strength_dtype, device=device), persistent=False)
        self.module_dropout = inner.module_dropout

    @property
    def rank(self) -> int:
        return self.inner.rank

    def refresh_scale(self) -> None:
        """The inner adapter always runs at strength 1; ``multiplier`` interpolates the result
        (through the ``strength`` buffer, updated in place)."""
        self.inner.multiplier = 1.0
        self.inner.refresh_scale()
        with torch.no_grad():
            self.strength.fill_(self.multiplier)

    def delta_dtype(self) -> torch.dtype:
        return self.inner.delta_dtype()

    @classmethod
    def file_rank(cls, shapes: dict[str, tuple[int, ...]]) -> tuple[int | None, bool]:
        """The wrapped family's rank (see :meth:`AdapterModule.file_rank`)."""
        from .registry import family_of_keys

        inner = {k: v for k, v in shapes.items() if k not in cls.file_keys}
        return family_of_keys(inner).module_type.file_rank(inner)

    def init_from_base(self, weight: Tensor) -> None:
        """``m ← ‖W‖`` in this module's orientation, so that ``W' = W`` at init."""
        with torch.no_grad():
            self.dora_scale.copy_(weight_norm(weight.detach().to(self.delta_dtype()), wd_on_out=self.wd_on_out))

    def delta_weight(self) -> Tensor:
        """The inner family's ΔW (scaled, strength 1) — the *direction* update, not the merge delta."""
        return self.inner.delta_weight()

    def adapted_weight(self, base_weight: Tensor) -> Tensor:
        """(out, in, *k): ``W' = m ⊙ (W + ΔW) / ‖W + ΔW‖`` at strength 1. Training with the inner LoRA's
        ``rank_dropout`` p: each output row of ΔW is dropped with probability p, one draw per step for the whole
        batch and no rescaling (LyCORIS' DoRA, ``LoConModule.make_weight``)."""
        delta = self.inner.delta_weight()
        drop = getattr(self.inner, "rank_dropout", 0.0)
        if self.training and drop > 0:
            delta = drop_output_rows(delta, drop)
        base = base_weight.to(delta.dtype).reshape(delta.shape)
        return dora_weight(base, delta, self.dora_scale.to(delta.dtype), wd_on_out=self.wd_on_out)

    def merge_delta(self, base_weight: Tensor) -> Tensor:
        """``t · (W' − W)`` for strength t = ``multiplier``."""
        base = base_weight.to(self.delta_dtype())
        return (self.adapted_weight(base) - base.reshape(self.geometry.weight_shape)) * self.strength

    def bias_delta(self) -> Tensor | None:
        """(out,): ``t · diff_b`` of the inner layer's bias delta (a file's, beside its factors), else ``None``: the
        bias is not normalised, so it moves by the strength alone, as ComfyUI patches it."""
        inner = self.inner.bias_delta()  # (the inner adapter runs at strength 1)
        return None if inner is None else inner * self.strength

    def forward(self, x: Tensor, base_weight: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Δy = ``geometry.conv(x, t · (W' − W))`` (one extra pass of the layer's op over ``x``), plus a bias delta."""
        if base_weight is None:
            raise TypeError("DoRAModule.forward needs the base layer's weight: forward(x, base_weight)")
        out = self.geometry.conv(x, self.merge_delta(base_weight))
        bias = self.bias_delta()
        if bias is None:
            return out
        return out + (bias.view(-1, 1, 1) if self.geometry.is_conv else bias).to(out.dtype)

    def file_tensors(self) -> dict[str, Tensor]:
        return {**self.inner.file_tensors(), "dora_scale": self.dora_scale}

    @classmethod
    def from_config(
        cls,
        config: DoRAConfig,
        geometry: LayerGeometry,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "DoRAModule":
        """A fresh module; call :meth:`init_from_base` with the layer's weight before use."""
        from .registry import build_adapter

        inner = build_adapter(config.inner, geometry, dtype=dtype, device=device)
        return cls(inner, wd_on_out=config.wd_on_out, dtype=dtype or torch.float32, device=device)

    @classmethod
    def from_file_tensors(
        cls, geometry: LayerGeometry, tensors: dict[str, Tensor], *, name: str = "<module>"
    ) -> "DoRAModule":
        """Build from the inner family's tensors plus ``dora_scale`` (orientation from its shape).

        Raises:
            ValueError: missing ``dora_scale``, a shape that fits neither orientation, or inner
                tensors that do not fit the layer.
        """
        from .registry import adapter_from_file_tensors

        if "dora_scale" not in tensors:
            raise ValueError(f"{name}: DoRA needs a dora_scale tensor (have {sorted(tensors)})")
        scale = tensors["dora_scale"]
        try:
            wd_on_out = dora_orientation(tuple(scale.shape), geometry)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        inner = adapter_from_file_tensors(
            geometry, {k: v for k, v in tensors.items() if k != "dora_scale"}, name=name
        )
        module = cls(inner, wd_on_out=wd_on_out, dtype=scale.dtype, device=scale.device)
        with torch.no_grad():
            module.dora_scale.copy_(scale)
        return module

    @classmethod
    def weight_shape_from_file_tensors(cls, tensors: dict[str, Tensor]) -> tuple[int, ...] | None:
        """The base weight's shape the wrapped family's tensors imply (``None`` when they cannot tell;
        only shapes are read). ``dora_scale`` alone does not fix it (one of its axes is 1)."""
        from .registry import weight_shape_of_file_tensors

        inner = {k: v for k, v in tensors.items() if k not in cls.file_keys}
        try:
            return weight_shape_of_file_tensors(inner)
        except ValueError:
            return None
