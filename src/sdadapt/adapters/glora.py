"""GLoRA: a low-rank map of the base weight plus a LoRA (LyCORIS ``algo=glora``; Chavan et al. 2023).

For a base weight ``W`` of shape ``(out, in, *k)`` (LyCORIS 2.x-4.x ``GLoRAModule``)::

    ΔW = scale · (W ·ᵢ (a1 ⋅ a2) + b1 ⋅ b2)       scale = alpha / r (alpha absent or 0: alpha = r)
    a1: (in, r)   a2: (r, in)   b1: (out, r)   b2: (r, in, *k)

``W ·ᵢ A`` multiplies the input axis of ``W`` by ``A`` at every kernel position:
``(W ·ᵢ A)[o, j, ...] = Σ_i W[o, i, ...] A[i, j]`` (LyCORIS' ``einsum("o i ..., i j -> o j ...")``).
The ``a`` half reads the base weight, so the family does too (``uses_base_weight``): the layer
computes ``y = op(x, W + ΔW) + b``, i.e. ``Δy = scale · (op(a1 ⋅ a2 x, W) + b1 ⋅ op(x, b2))`` —
the ``a`` half is a low-rank map of the *input* the base layer then sees (for a convolution a 1x1
channel mix, which commutes with the layer's padding). The ``b`` half is a LoRA (down ``b2``, up
``b1``) with the layer's kernel, stride and padding on ``b2``. The bias is not touched.

Init (LyCORIS): ``a1``, ``b1`` Kaiming-uniform, ``a2 = b2 = 0`` (ΔW = 0). ΔW is linear in the pair
(``a2``, ``b2``): scaling both scales it (block weights).

Files (LyCORIS, ``lora_unet_<layer>.<key>``): ``a1.weight`` (in, r[, 1, 1]), ``a2.weight``
(r, in[, 1, 1]), ``b1.weight`` (out, r[, 1, 1]), ``b2.weight`` (r, in[, kh, kw]) and ``alpha``.

Tucker (``bm.weight``, a kxk convolution only): LyCORIS 3.0.0 / 3.0.0.post1 (commits 8c6576f to
ac9c244, May-July 2024) built a GLoRA module with ``use_tucker`` on a kxk convolution as a 1x1
``b2`` (r, in, 1, 1), a core ``bm`` (r, r, kh, kw) with the layer's kernel, stride and padding, and
``b1`` (out, r, 1, 1); its ``make_weight`` bakes the ``b`` half as
``tucker_weight_from_conv(b1, b2, bm) = einsum("m n ..., i m, n j -> i j ...", bm, b1, b2)``
(lycoris/modules/glora.py:187-188, lycoris/functional/general.py:82-85 of 3.0.0.post1), i.e.
``b1 ⋅ b2`` becomes :func:`~sdadapt.adapters.tucker.rebuild_tucker` ``(bm, b1ᵀ, b2)``; the ``a``
half, alpha and scale are unchanged. Later versions still list ``bm.weight`` but their constructor
never creates it (``use_tucker`` is cleared for kxk kernels first, glora.py:97-106 of 4.1.3), so such
files load in no later LyCORIS, nor in A1111 or ComfyUI (neither reads ``bm``); sdadapt reads, applies,
bakes and writes them back (``tests/test_glora_tucker.py``).

A1111's ``network_glora.py`` computes LyCORIS 1.x's layout, ``b2 ⋅ b1 + W ⋅ a2 ⋅ a1`` without
alpha, whose products do not chain on the current files' shapes (unless the widths coincide).
sdadapt reads the current layout and refuses the 1.x shapes, naming them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import AdapterModule, ConvRankAlpha, LayerGeometry, check_ranks_and_rates
from .lora import lora_forward, lora_scale
from .tucker import rebuild_tucker

__all__ = ["GLoRAConfig", "GLoRAModule", "glora_delta_weight"]

_FACTORS = ("a1.weight", "a2.weight", "b1.weight", "b2.weight")
_TUCKER = "bm.weight"


def glora_delta_weight(base_weight: Tensor, a1: Tensor, a2: Tensor, b1: Tensor, b2: Tensor,
                       scale: float | Tensor = 1.0, *, bm: Tensor | None = None) -> Tensor:
    """``ΔW = scale · (W ·ᵢ (a1 ⋅ a2) + b1 ⋅ b2)``; with a Tucker core ``bm`` the ``b`` half is
    ``rebuild_tucker(bm, b1ᵀ, b2)``: ``Σ_mn bm[m, n, *k] · b1[o, m] · b2[n, i]``.

    Args:
        base_weight: W, (out, in, *kernel).
        a1: (in, r) or (in, r, 1, 1).
        a2: (r, in) or (r, in, 1, 1).
        b1: (out, r) or (out, r, 1, 1).
        b2: (r, in, *kernel) (flattened ``(r, in·kh·kw)`` also works); (r, in, 1, 1) with ``bm``.
        scale: ``alpha / r`` times the strength (float or 0-dim tensor).
        bm: optional Tucker core (r, r, kh, kw) (LyCORIS 3.0.0 ``use_tucker``, kxk convolutions).

    Returns:
        (out, in, *kernel).
    """
    rank = a2.shape[0]
    a = a1.reshape(a1.shape[0], rank) @ a2.reshape(rank, -1)  # (in, in)
    wa = torch.einsum("oi...,ij->oj...", base_weight, a)  # (out, in, *kernel)
    if bm is None:
        wb = (b1.reshape(b1.shape[0], -1) @ b2.reshape(rank, -1)).reshape(base_weight.shape)
    else:  # (r, r, *k), (r, out), (r, in) -> (out, in, *k)
        wb = rebuild_tucker(bm, b1.reshape(b1.shape[0], rank).transpose(0, 1), b2.reshape(rank, -1))
    return (wa + wb) * scale


@dataclass(frozen=True, kw_only=True)
class GLoRAConfig(ConvRankAlpha):
    """GLoRA hyper-parameters (LyCORIS ``algo=glora``).

    Attributes:
        rank: r, the width of both low-rank halves (LyCORIS ``lora_dim`` / ``network_dim``).
        alpha: scale numerator (``None``: alpha = rank, scale 1).
        conv_rank, conv_alpha: r and alpha for kxk convolutions (fall back to rank/alpha).
        module_dropout: probability to skip the whole module per training step.
    """

    rank: int = 4
    alpha: float | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    module_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_ranks_and_rates(self)


def _factor_shapes(geometry: LayerGeometry, rank: int, *, tucker: bool = False) -> dict[str, tuple[int, ...]]:
    """The file shapes of one layer's factors (convolutions keep 1x1 kernels on a1, a2, b1; with a
    Tucker core ``bm.weight`` (r, r, *kernel), on b2 too)."""
    out_f, in_f = geometry.out_features, geometry.in_features
    ones = (1,) * len(geometry.kernel) if geometry.is_conv else ()
    shapes = {"a1.weight": (in_f, rank, *ones), "a2.weight": (rank, in_f, *ones), "b1.weight": (out_f, rank, *ones),
              "b2.weight": (rank, in_f, *(ones if tucker else geometry.kernel))}
    if tucker:
        shapes[_TUCKER] = (rank, rank, *geometry.kernel)
    return shapes


class GLoRAModule(AdapterModule):
    """One GLoRA adapter for one base layer (a thin shell over :func:`glora_delta_weight`).

    Parameters ``a1``, ``a2``, ``b1``, ``b2`` (file shapes, see :func:`_factor_shapes`), ``bm``
    (the Tucker core, or ``None``), buffer ``alpha`` (0-dim, saved). ``Δy`` for the base weight
    ``W`` the hook passes: ``scale · (op(a1 ⋅ a2 x, W) + b1 ⋅ op(x, b2))`` — two rank-r maps and one
    more pass of the base layer's op, never ΔW itself; with ``bm``, ``op(x, b2)`` is
    ``op(b2 x, bm)`` (``b2`` a 1x1 channel map, ``bm`` the layer's kernel, stride and padding).

    ``tucker=True`` (kxk convolutions only) gives the layer LyCORIS 3.0.0's Tucker ``b`` half
    (init as LyCORIS: ``bm`` Kaiming-uniform, the default of its ``nn.Conv2d``; ΔW = 0 still).

    ``init_weights=False`` leaves the factors uninitialised (``torch.empty``) and draws nothing from
    the global RNG: for a caller that fills every factor next, as :meth:`from_file_tensors` does.
    """

    family: ClassVar[str] = "glora"
    scale_is_alpha_over_rank: ClassVar[bool] = True
    file_keys: ClassVar[tuple[str, ...]] = (*_FACTORS, _TUCKER, "alpha")
    marker_keys: ClassVar[tuple[str, ...]] = (*_FACTORS, _TUCKER)
    rank_keys: ClassVar[tuple[str, ...]] = ("b2.weight",)
    tucker_keys: ClassVar[tuple[str, ...]] = (_TUCKER,)
    linear_keys: ClassVar[tuple[str, ...]] = ("a2.weight", "b2.weight")
    lycoris_algo: ClassVar[str] = "glora"
    uses_base_weight: ClassVar[bool] = True

    def __init__(
        self,
        geometry: LayerGeometry,
        rank: int,
        alpha: float | None = None,
        *,
        module_dropout: float = 0.0,
        tucker: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        init_weights: bool = True,
    ) -> None:
        super().__init__(geometry)
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"GLoRA rank must be a positive int, got {rank!r}")
        if tucker and not geometry.is_kxk:
            raise ValueError(f"a GLoRA Tucker core (bm.weight) needs a kxk convolution, not a layer of weight shape "
                             f"{geometry.weight_shape}")
        factory = {"dtype": dtype, "device": device}
        shapes = _factor_shapes(geometry, rank, tucker=tucker)
        self.a1 = nn.Parameter(torch.empty(shapes["a1.weight"], **factory))
        fill = torch.zeros if init_weights else torch.empty
        self.a2 = nn.Parameter(fill(shapes["a2.weight"], **factory))
        self.b1 = nn.Parameter(torch.empty(shapes["b1.weight"], **factory))
        self.b2 = nn.Parameter(fill(shapes["b2.weight"], **factory))
        self.bm = nn.Parameter(torch.empty(shapes[_TUCKER], **factory)) if tucker else None
        scale = lora_scale(alpha, rank)
        self._register_alpha_scale(scale * rank, scale, device)
        self.module_dropout = module_dropout
        if not init_weights:  # the caller fills every factor (from_file_tensors): no draw, no global RNG use
            return
        with torch.no_grad():  # LyCORIS init: a2 = b2 = 0 makes ΔW = 0
            nn.init.kaiming_uniform_(self.a1, a=math.sqrt(5))
            nn.init.kaiming_uniform_(self.b1, a=math.sqrt(5))
            if self.bm is not None:  # LyCORIS 3.0.0 leaves its nn.Conv2d's default init
                nn.init.kaiming_uniform_(self.bm, a=math.sqrt(5))

    @property
    def rank(self) -> int:
        return self.a2.shape[0]

    def delta_dtype(self) -> torch.dtype:
        return self.a1.dtype

    def delta_weight(self) -> Tensor:
        """GLoRA has no delta without the base weight: use :meth:`merge_delta`."""
        raise TypeError("GLoRAModule.delta_weight needs the base layer's weight: call merge_delta(base_weight)")

    def merge_delta(self, base_weight: Tensor) -> Tensor:
        """(out, in, *k): ``scale · (W ·ᵢ (a1 ⋅ a2) + b1 ⋅ b2)`` for the base weight ``W``."""
        base = base_weight.to(self.a1.dtype).reshape(self.geometry.weight_shape)
        return glora_delta_weight(base, self.a1, self.a2, self.b1, self.b2, self.scale.to(self.a1.dtype), bm=self.bm)

    def forward(self, x: Tensor, base_weight: Tensor | None = None) -> Tensor:  # type: ignore[override]
        """Δy for input ``x`` (linear: (..., in); conv: (N, in, H, W)): ``scale · (op(a1 a2 x, W) + b1 op(x, b2))``."""
        if base_weight is None:
            raise TypeError("GLoRAModule.forward needs the base layer's weight: forward(x, base_weight)")
        base = base_weight.to(self.a1.dtype).reshape(self.geometry.weight_shape)
        if self.geometry.is_conv:
            ax = F.conv2d(F.conv2d(x, self.a2), self.a1)  # 1x1 channel mixes: (N, in, H, W)
        else:
            ax = F.linear(F.linear(x, self.a2), self.a1)
        bx = lora_forward(x, self.b1, self.b2, 1.0, self.geometry, mid=self.bm)  # the b half is a LoRA (Tucker: bm)
        return (self.geometry.conv(ax, base) + bx) * self.scale.to(self.a1.dtype)

    def file_tensors(self) -> dict[str, Tensor]:
        tensors = {"a1.weight": self.a1, "a2.weight": self.a2, "b1.weight": self.b1, "b2.weight": self.b2}
        if self.bm is not None:
            tensors[_TUCKER] = self.bm
        return {**tensors, "alpha": self.alpha}

    @classmethod
    def from_config(
        cls,
        config: GLoRAConfig,
        geometry: LayerGeometry,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> GLoRAModule:
        """A fresh module for one layer (ΔW = 0)."""
        rank, alpha = config.rank_alpha_for(geometry)
        return cls(geometry, rank, alpha, module_dropout=config.module_dropout, dtype=dtype, device=device)

    @classmethod
    def from_file_tensors(
        cls, geometry: LayerGeometry, tensors: dict[str, Tensor], *, name: str = "<module>"
    ) -> GLoRAModule:
        """Build from ``a1/a2/b1/b2.weight`` (+ optional ``bm.weight``, ``alpha``); rank from ``a2.weight``.

        Raises:
            ValueError: a factor is missing, its shape does not fit the base layer (LyCORIS 1.x's
                transposed layout included), or ``bm.weight`` on a layer that is no kxk
                convolution — naming ``name``.
        """
        missing = [k for k in _FACTORS if k not in tensors]
        if missing:
            raise ValueError(f"{name}: GLoRA tensors {missing} are missing (have {sorted(tensors)})")
        rank = tensors["a2.weight"].shape[0]
        tucker = _TUCKER in tensors
        if tucker and not geometry.is_kxk:
            raise ValueError(
                f"{name}: GLoRA Tucker core bm.weight {tuple(tensors[_TUCKER].shape)} on a base layer of weight shape "
                f"{geometry.weight_shape}: LyCORIS writes it for kxk convolutions only. The file was made for another "
                "model.")
        keys = (*_FACTORS, _TUCKER) if tucker else _FACTORS
        want = _factor_shapes(geometry, rank, tucker=tucker)
        got = {k: tuple(tensors[k].shape) for k in keys}
        bad = {k: shape for k, shape in got.items() if shape != want[k]}
        if bad:
            old = not tucker and _old_layout(got, geometry)
            raise ValueError(
                f"{name}: GLoRA shapes {bad} do not fit the base layer of weight shape {geometry.weight_shape}; "
                f"expected { {k: want[k] for k in bad} } for rank {rank}. "
                + ("These are LyCORIS 1.x's transposed GLoRA factors (a1 (r, in), b2 (out, r)), which sdadapt does "
                   "not read: retrain or convert the file with LyCORIS 2+." if old else
                   "The file was made for another model.")
            )
        alpha = tensors.get("alpha")
        first = tensors["a1.weight"]
        module = cls(geometry, rank, float(alpha) if alpha is not None else None, tucker=tucker, dtype=first.dtype,
                     device=first.device, init_weights=False)
        with torch.no_grad():
            for key in keys:
                getattr(module, key.split(".")[0]).copy_(tensors[key])
        return module

    @classmethod
    def weight_shape_from_file_tensors(cls, tensors: dict[str, Tensor]) -> tuple[int, ...] | None:
        """``(b1.shape[0], a1.shape[0], *kernel)`` (shapes only), the kernel of ``bm.weight`` when present,
        else of ``b2.weight``; ``None`` when a factor is missing."""
        a1, b1, b2 = tensors.get("a1.weight"), tensors.get("b1.weight"), tensors.get("b2.weight")
        if a1 is None or b1 is None or b2 is None or b2.dim() not in (2, 4):
            return None
        bm = tensors.get(_TUCKER)
        kernel = (bm if bm is not None and bm.dim() == 4 else b2).shape[2:]
        return (int(b1.shape[0]), int(a1.shape[0]), *(int(k) for k in kernel))


def _old_layout(shapes: dict[str, tuple[int, ...]], geometry: LayerGeometry) -> bool:
    """Whether the factors have LyCORIS 1.x's shapes: a1 (r, in), a2 (in, r), b1 (r, in·k), b2 (out, r)."""
    a1, a2, b1, b2 = (shapes[k] for k in _FACTORS)
    return (len(a1) >= 2 and len(b2) >= 2 and a1[1] == geometry.in_features and a2[0] == geometry.in_features
            and b2[0] == geometry.out_features and a1[0] == a2[1] == b1[0] == b2[1])
