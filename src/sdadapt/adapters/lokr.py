"""LoKr: a Kronecker product of two small factors (LyCORIS ``algo=lokr``; KronA, Edalati 2022).

The base weight ``W`` (out, in, *k) is split as ``out = a·b`` and ``in = c·d`` with
:func:`factorization` (``factor=-1``: the most square split, smaller part first; a positive
``factor`` asks for that size)::

    ΔW = scale · w1 ⊗ w2        w1: (a, c)   w2: (b, d, *k)    ->  (a·b, c·d, *k)

``w1`` is unsqueezed to (a, c, 1, 1) for a convolution, so ``ΔW[i·b+j, l·d+m] = w1[i, l] · w2[j, m]``.
Each factor is stored full (``lokr_w1`` (a, c), ``lokr_w2`` (b, d, *k)) or as a low-rank pair:

* ``w1 = lokr_w1_a (a, r) ⋅ lokr_w1_b (r, c)`` — only with ``decompose_both`` and r < max(a, c)/2;
* ``w2 = lokr_w2_a (b, r) ⋅ lokr_w2_b (r, d·kh·kw)`` — unless r ≥ max(b, d)/2 or ``full_matrix``
  (then ``w2`` is full), ``w2_b`` flattened for convolutions like LyCORIS;
* Tucker (``use_tucker``, kxk convs): ``w2 = rebuild_tucker(lokr_t2 (r, r, kh, kw),
  lokr_w2_a (r, b), lokr_w2_b (r, d))``.

Scale: ``alpha / r`` with r the rank of the decomposed factor (``lokr_w*_b.shape[0]``; a file whose
``lokr_w1_b`` and ``lokr_w2_b`` ranks differ, which LyCORIS never writes, uses ``lokr_w2_b``'s, as
A1111 and ComfyUI do); when both
factors are full there is no rank and the scale is 1 whatever ``alpha`` says (LyCORIS writes
``alpha = r``; A1111 and ComfyUI use 1). Init (LyCORIS): ``w1`` (or ``w1_a``, ``w1_b``) and
``w2_a``/``t2`` kaiming-uniform(a=sqrt 5), ``w2`` or ``w2_b`` zero (ΔW = 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import (
    AdapterModule,
    ConvRankAlpha,
    LayerGeometry,
    check_ranks_and_rates,
    drop_output_rows,
)
from .lora import _scaled, lora_scale
from .tucker import rebuild_tucker

__all__ = ["LoKrConfig", "LoKrModule", "lokr_delta_weight", "lokr_layout", "factorization"]

_KEYS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension = m · n`` with ``m ≤ n`` (LyCORIS ``factorization``, same results).

    ``factor > 0`` dividing ``dimension``: ``(factor, dimension / factor)`` (sorted). Otherwise
    the most square split whose smaller part is ≤ ``factor`` (any size for ``-1``), e.g.
    ``320 -> (16, 20)``, ``768 -> (24, 32)``, ``127 -> (1, 127)``.
    """
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (m, n) if m <= n else (n, m)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def lokr_delta_weight(w1: Tensor, w2: Tensor, scale: float | Tensor = 1.0) -> Tensor:
    """``ΔW = scale · w1 ⊗ w2``.

    Args:
        w1: (a, c).
        w2: (b, d) for linear, (b, d, kh, kw) for a convolution.

    Returns:
        (a·b, c·d, *kernel).

    One allocation of the delta's size: the Kronecker product is scaled in place (bit for bit
    ``kron * scale``).
    """
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))  # (a, c, 1, 1) for convs
    return _scaled(torch.kron(w1, w2.contiguous()), scale)


@dataclass(frozen=True)
class LoKrLayout:
    """Which LoKr tensors a layer has, and their shapes (see :func:`lokr_layout`)."""

    a: int
    b: int
    c: int
    d: int
    rank: int | None  # the scale's: lokr_w2_b's, else lokr_w1_b's; None when both factors are full
    shapes: dict[str, tuple[int, ...]]

    @property
    def w1_full(self) -> bool:
        return "lokr_w1" in self.shapes

    @property
    def w2_full(self) -> bool:
        return "lokr_w2" in self.shapes

    @property
    def tucker(self) -> bool:
        return "lokr_t2" in self.shapes


def lokr_layout(
    geometry: LayerGeometry,
    rank: int,
    *,
    factor: int = -1,
    decompose_both: bool = False,
    full_matrix: bool = False,
    use_tucker: bool = False,
) -> LoKrLayout:
    """LyCORIS's choice of full vs decomposed factors for one layer (``LokrModule.__init__``).

    ``full_matrix`` makes both factors full (LyCORIS lets ``decompose_both`` still split ``w1`` of
    a linear layer in that case; sdadapt treats ``full_matrix`` as the stronger request).
    """
    a, b = factorization(geometry.out_features, factor)
    c, d = factorization(geometry.in_features, factor)
    kernel = geometry.kernel
    shapes: dict[str, tuple[int, ...]] = {}
    w1_low = decompose_both and rank < max(a, c) / 2 and not full_matrix
    if w1_low:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (a, rank), (rank, c)
    else:
        shapes["lokr_w1"] = (a, c)
    w2_full = rank >= max(b, d) / 2 or full_matrix
    if w2_full:
        shapes["lokr_w2"] = (b, d, *kernel)
    elif use_tucker and geometry.is_kxk:
        shapes["lokr_t2"] = (rank, rank, *kernel)
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (rank, b), (rank, d)
    else:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (b, rank), (rank, d * math.prod(kernel))
    return LoKrLayout(a, b, c, d, None if (w2_full and not w1_low) else rank, shapes)


def _with_kernel_axes(geometry: LayerGeometry, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """``tensors`` with a 1x1 convolution's full ``lokr_w2`` stored as a Linear layer's ``(b, d)`` viewed as
    ``(b, d, 1, 1)``: kohya's own LoKr (sd-scripts ``networks/lokr.py``) treats 1x1 convolutions as Linear layers
    and stores them so; kohya's merge and ComfyUI reshape ``kron(w1, w2)`` onto the weight (the same numbers)."""
    w2 = tensors.get("lokr_w2")
    if w2 is None or w2.ndim != 2 or not geometry.is_conv or math.prod(geometry.kernel) != 1:
        return tensors
    return {**tensors, "lokr_w2": w2.reshape(*w2.shape, *geometry.kernel)}


def _layout_from_tensors(geometry: LayerGeometry, tensors: dict[str, Tensor], name: str) -> LoKrLayout:
    """The layout a file's tensors describe, checked against the base layer."""
    has = {k for k in _KEYS if k in tensors}
    w1_ok = ("lokr_w1" in has) != ({"lokr_w1_a", "lokr_w1_b"} <= has)
    w2_ok = ("lokr_w2" in has) != ({"lokr_w2_a", "lokr_w2_b"} <= has)
    if not (w1_ok and w2_ok) or ("lokr_t2" in has and "lokr_w2" in has):
        raise ValueError(
            f"{name}: LoKr needs lokr_w1 or (lokr_w1_a, lokr_w1_b), and lokr_w2 or (lokr_w2_a, lokr_w2_b[, lokr_t2]); "
            f"have {sorted(tensors)}"
        )
    r1 = int(tensors["lokr_w1_b"].shape[0]) if "lokr_w1_b" in has else None
    r2 = int(tensors["lokr_w2_b"].shape[0]) if "lokr_w2_b" in has else None
    # the scale's rank: w2_b's, w1_b's only when w2 is full — A1111 (network_lokr.py) and ComfyUI
    # (weight_adapter/lokr.py) read it so when the two differ (LyCORIS writes one rank for both)
    rank = r2 if r2 is not None else r1
    a, c = tensors["lokr_w1"].shape if "lokr_w1" in has else (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1])
    if "lokr_w2" in has:
        b, d = tensors["lokr_w2"].shape[:2]
    elif "lokr_t2" in has:
        b, d = tensors["lokr_w2_a"].shape[1], tensors["lokr_w2_b"].shape[1]
    else:
        b = tensors["lokr_w2_a"].shape[0]
        d = tensors["lokr_w2_b"].shape[1] // max(1, math.prod(geometry.kernel))
    shapes: dict[str, tuple[int, ...]] = {}
    kernel = geometry.kernel
    r = r2 or 0
    if "lokr_w1" in has:
        shapes["lokr_w1"] = (a, c)
    else:
        shapes["lokr_w1_a"], shapes["lokr_w1_b"] = (a, r1), (r1, c)
    if "lokr_w2" in has:
        shapes["lokr_w2"] = (b, d, *kernel)
    elif "lokr_t2" in has:
        shapes["lokr_t2"] = (r, r, *kernel)
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (r, b), (r, d)
    else:
        shapes["lokr_w2_a"], shapes["lokr_w2_b"] = (b, r), (r, d * math.prod(kernel))
    bad = {k: tuple(tensors[k].shape) for k in shapes if tuple(tensors[k].shape) != shapes[k]}
    if bad or a * b != geometry.out_features or c * d != geometry.in_features:
        raise ValueError(
            f"{name}: LoKr factors {dict((k, tuple(tensors[k].shape)) for k in shapes)} do not fit the base layer of "
            f"weight shape {geometry.weight_shape} (need a·b = out, c·d = in with w1 (a, c), w2 (b, d, *k)). "
            "The file was made for another model."
        )
    return LoKrLayout(a, b, c, d, rank, shapes)


@dataclass(frozen=True, kw_only=True)
class LoKrConfig(ConvRankAlpha):
    """LoKr hyper-parameters (LyCORIS names).

    Attributes:
        rank: r of the decomposed factor(s) for linear and 1x1 conv layers.
        alpha: scale numerator (``None``: alpha = rank). Ignored (scale 1) when both factors end
            up full.
        conv_rank, conv_alpha: r and alpha for kxk convolutions.
        factor: Kronecker split size (``-1``: most square).
        decompose_both: also split ``w1`` into a low-rank pair when r < max(a, c)/2.
        full_matrix: keep both factors full (no rank; scale 1).
        use_tucker: Tucker core for ``w2`` of kxk convolutions.
        rank_stabilized: scale ``alpha / sqrt(r)`` (files store ``alpha·sqrt(r)``).
        module_dropout: probability to skip the whole module per training step.
        rank_dropout: LyCORIS' rank dropout: each output row of ΔW dropped with this probability while
            training, one draw per forward for the whole batch, no rescaling (``drop_output_rows``).
    """

    rank: int = 4
    alpha: float | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    factor: int = -1
    decompose_both: bool = False
    full_matrix: bool = False
    use_tucker: bool = False
    rank_stabilized: bool = False
    module_dropout: float = 0.0
    rank_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_ranks_and_rates(self, rates=("module_dropout", "rank_dropout"))
        if not isinstance(self.factor, int) or self.factor == 0 or self.factor < -1:
            raise ValueError(f"LoKrConfig.factor must be -1 or a positive int, got {self.factor!r}")


class LoKrModule(AdapterModule):
    """One LoKr adapter for one base layer (a thin shell over :func:`lokr_delta_weight`).

    Parameters: the ``lokr_*`` tensors of its :class:`LoKrLayout`; buffer ``alpha`` (0-dim,
    saved). The forward path builds ΔW and applies it with the layer's convolution.

    ``init_weights=False`` leaves the factors uninitialised (``torch.empty``) and draws nothing from
    the global RNG: for a caller that fills every factor next, as :meth:`from_file_tensors` does.
    """

    family: ClassVar[str] = "lokr"
    scale_is_alpha_over_rank: ClassVar[bool] = True
    file_keys: ClassVar[tuple[str, ...]] = (*_KEYS, "alpha")
    marker_keys: ClassVar[tuple[str, ...]] = _KEYS
    rank_keys: ClassVar[tuple[str, ...]] = ("lokr_w2_b", "lokr_w1_b")  # (w2_b first: the scale's rank)
    tucker_keys: ClassVar[tuple[str, ...]] = ("lokr_t2",)
    #: ΔW = c · kron(W1, W2) is linear in W1, whichever form (full or W1_a·W1_b) the file holds
    linear_keys: ClassVar[tuple[str, ...]] = ("lokr_w1", "lokr_w1_a")
    lycoris_algo: ClassVar[str] = "lokr"

    def __init__(
        self,
        geometry: LayerGeometry,
        layout: LoKrLayout,
        alpha: float | None = None,
        *,
        rank_stabilized: bool = False,
        module_dropout: float = 0.0,
        rank_dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        init_weights: bool = True,
    ) -> None:
        super().__init__(geometry)
        self.layout = layout
        factory = {"dtype": dtype, "device": device}
        for key in _KEYS:
            shape = layout.shapes.get(key)
            setattr(self, key, nn.Parameter(torch.empty(shape, **factory)) if shape is not None else None)
        if layout.rank is None:  # both full: no rank, scale 1 (LyCORIS stores alpha = its rank)
            stored_alpha, scale = float(alpha) if alpha is not None else 1.0, 1.0
        else:
            scale = lora_scale(alpha, layout.rank, rank_stabilized=rank_stabilized)
            stored_alpha = scale * layout.rank
        self._register_alpha_scale(stored_alpha, scale, device)
        self.module_dropout = module_dropout
        self.rank_dropout = rank_dropout
        if not init_weights:  # the caller fills every factor (from_file_tensors): no draw, no global RNG use
            return
        with torch.no_grad():
            for key in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_t2"):
                if getattr(self, key) is not None:
                    nn.init.kaiming_uniform_(getattr(self, key), a=math.sqrt(5))
            for key in ("lokr_w2", "lokr_w2_b"):
                if getattr(self, key) is not None:
                    nn.init.zeros_(getattr(self, key))

    @property
    def rank(self) -> int:
        """r of the decomposed factor; with both factors full, the rank bound min(a,c)·min(b,d)."""
        if self.layout.rank is not None:
            return self.layout.rank
        return min(self.layout.a, self.layout.c) * min(self.layout.b, self.layout.d)

    def base_scale(self) -> float:
        """``alpha / r`` (1 with both factors full)."""
        return 1.0 if self.layout.rank is None else super().base_scale()

    def delta_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def factors(self) -> tuple[Tensor, Tensor]:
        """``(w1 (a, c), w2 (b, d, *k))`` rebuilt from whatever form the layout stores."""
        w1 = self.lokr_w1 if self.lokr_w1 is not None else self.lokr_w1_a @ self.lokr_w1_b
        if self.lokr_w2 is not None:
            w2 = self.lokr_w2
        elif self.lokr_t2 is not None:
            w2 = rebuild_tucker(self.lokr_t2, self.lokr_w2_a, self.lokr_w2_b)
        else:  # (b, r) @ (r, d*k) -> (b, d, *k)
            w2 = (self.lokr_w2_a @ self.lokr_w2_b).reshape(self.layout.b, self.layout.d, *self.geometry.kernel)
        return w1, w2

    def delta_weight(self) -> Tensor:
        """(out, in, *k): ``scale · w1 ⊗ w2``."""
        return lokr_delta_weight(*self.factors(), self.scale)

    def forward(self, x: Tensor) -> Tensor:
        """Δy = ``geometry.conv(x, ΔW)`` (training with ``rank_dropout``: ΔW's output rows dropped, as LyCORIS)."""
        delta = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            delta = drop_output_rows(delta, self.rank_dropout)
        return self.geometry.conv(x, delta)

    def file_tensors(self) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {key: getattr(self, key) for key in _KEYS if getattr(self, key) is not None}
        tensors["alpha"] = self.alpha
        return tensors

    @classmethod
    def from_config(
        cls,
        config: LoKrConfig,
        geometry: LayerGeometry,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "LoKrModule":
        """A fresh module for one layer (ΔW = 0)."""
        rank, alpha = config.rank_alpha_for(geometry)
        layout = lokr_layout(
            geometry, rank, factor=config.factor, decompose_both=config.decompose_both,
            full_matrix=config.full_matrix, use_tucker=config.use_tucker,
        )
        if layout.rank is None:
            alpha = float(rank)  # LyCORIS writes alpha = r when both factors are full
        return cls(geometry, layout, alpha, rank_stabilized=config.rank_stabilized,
                   module_dropout=config.module_dropout, rank_dropout=config.rank_dropout, dtype=dtype, device=device)

    @classmethod
    def from_file_tensors(
        cls, geometry: LayerGeometry, tensors: dict[str, Tensor], *, name: str = "<module>"
    ) -> "LoKrModule":
        """Build from ``lokr_*`` tensors (+ optional ``alpha``); the layout is read from the keys.

        Raises:
            ValueError: an inconsistent set of factors, or shapes that do not fit the base layer.
        """
        tensors = _with_kernel_axes(geometry, tensors)
        layout = _layout_from_tensors(geometry, tensors, name)
        alpha = tensors.get("alpha")
        first = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"]
        module = cls(geometry, layout, float(alpha) if alpha is not None else None, dtype=first.dtype,
                     device=first.device, init_weights=False)
        with torch.no_grad():
            for key in layout.shapes:
                getattr(module, key).copy_(tensors[key])
        return module

    @classmethod
    def weight_shape_from_file_tensors(cls, tensors: dict[str, Tensor]) -> tuple[int, ...] | None:
        """The base weight's shape ``(a·b, c·d, *kernel)`` the file tensors imply, or ``None`` (only shapes are read).

        ``w1`` (a, c) comes from ``lokr_w1`` or ``lokr_w1_a (a, r) ⋅ lokr_w1_b (r, c)``; ``w2``
        (b, d, *kernel) from ``lokr_w2`` or, in Tucker form, ``lokr_w2_a (r, b)``, ``lokr_w2_b (r, d)``
        and ``lokr_t2 (r, r, *kernel)``. ``None`` when ``w2`` is a plain low-rank pair: its
        ``lokr_w2_b`` (r, d·kh·kw) is the same for a Linear layer and a flattened kxk convolution.
        """
        if "lokr_w1" in tensors:
            a, c = (int(n) for n in tensors["lokr_w1"].shape[:2])
        elif "lokr_w1_a" in tensors and "lokr_w1_b" in tensors:
            a, c = int(tensors["lokr_w1_a"].shape[0]), int(tensors["lokr_w1_b"].shape[1])
        else:
            return None
        if "lokr_w2" in tensors:
            w2 = tensors["lokr_w2"]
            b, d, kernel = int(w2.shape[0]), int(w2.shape[1]), tuple(w2.shape[2:])
        elif "lokr_t2" in tensors and "lokr_w2_a" in tensors and "lokr_w2_b" in tensors:
            b, d = int(tensors["lokr_w2_a"].shape[1]), int(tensors["lokr_w2_b"].shape[1])
            kernel = tuple(tensors["lokr_t2"].shape[2:])
        else:
            return None
        return (a * b, c * d, *(int(k) for k in kernel))
