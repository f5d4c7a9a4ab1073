"""LoHa: the Hadamard product of two low-rank products (LyCORIS ``algo=loha``; FedPara, Hyeon-Woo 2022).

For a base weight ``W`` of shape ``(out, in, *k)``::

    ΔW = scale · (w1_a ⋅ w1_b) ⊙ (w2_a ⋅ w2_b)      w*_a: (out, r), w*_b: (r, in·kh·kw)
    scale = alpha / r  (r = hada_w1_b.shape[0]; alpha absent or 0 means alpha = r)

The product is formed flat, ``(out, in·kh·kw)``, and reshaped to ``(out, in, kh, kw)``: files
keep ``w*_b`` flattened, as LyCORIS and peft do. The rank of ΔW is up to r², for the parameters of
two rank-r LoRAs.

Tucker form (``use_tucker``, kxk convolutions only; files ``hada_t1``/``hada_t2``)::

    ΔW = scale · T(t1, w1_a, w1_b) ⊙ T(t2, w2_a, w2_b)   t*: (r, r, kh, kw), w*_a: (r, out), w*_b: (r, in)

with ``T`` = :func:`~sdadapt.adapters.tucker.rebuild_tucker` (note ``w*_a`` is transposed there).

Init (LyCORIS): ``w1_b, w2_b ~ N(0, 1)``, ``w1_a ~ N(0, 0.1)``, ``w2_a = 0`` (so ΔW = 0),
cores ``~ N(0, 0.1)``. Files: ``hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b[, hada_t1, hada_t2], alpha``.
"""

from __future__ import annotations

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

__all__ = ["LoHaConfig", "LoHaModule", "loha_delta_weight"]

_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def loha_delta_weight(
    w1_a: Tensor,
    w1_b: Tensor,
    w2_a: Tensor,
    w2_b: Tensor,
    scale: float | Tensor = 1.0,
    *,
    kernel: tuple[int, ...] = (),
    t1: Tensor | None = None,
    t2: Tensor | None = None,
) -> Tensor:
    """``ΔW = scale · (w1_a ⋅ w1_b) ⊙ (w2_a ⋅ w2_b)`` (Tucker halves when ``t1``/``t2`` are given).

    Args:
        w1_a, w2_a: (out, r); Tucker: (r, out).
        w1_b, w2_b: (r, in·kh·kw); Tucker: (r, in).
        scale: scalar (float or 0-dim tensor).
        kernel: ``(kh, kw)`` of a convolution (``()`` for linear), to unflatten the result.
        t1, t2: Tucker cores (r, r, kh, kw), both or neither.

    Returns:
        (out, in, *kernel).

    Two allocations of the delta's size: the second half's product is multiplied into the first's
    and the result scaled in place (the same kernels as ``a * b * scale``, bit for bit; autograd
    keeps what it needs itself).
    """
    if (t1 is None) != (t2 is None):
        raise ValueError("LoHa Tucker form needs both hada_t1 and hada_t2")
    if t1 is not None:
        return _scaled(_product(rebuild_tucker(t1, w1_a, w1_b), rebuild_tucker(t2, w2_a, w2_b)), scale)  # type: ignore[arg-type]
    out_features = w1_a.shape[0]
    # (out, r) @ (r, in*k) -> (out, in*k), twice, elementwise product
    delta = _product(w1_a.reshape(out_features, -1) @ w1_b.reshape(w1_b.shape[0], -1),
                     w2_a.reshape(out_features, -1) @ w2_b.reshape(w2_b.shape[0], -1))
    return _scaled(delta, scale).reshape(out_features, -1, *kernel)


def _product(first: Tensor, second: Tensor) -> Tensor:
    """``first * second``, in place in ``first`` (a fresh product of the caller's) when that gives the same
    dtype and shape."""
    if first.dtype == second.dtype and first.shape == second.shape:
        return first.mul_(second)
    return first * second


@dataclass(frozen=True, kw_only=True)
class LoHaConfig(ConvRankAlpha):
    """LoHa hyper-parameters.

    Attributes:
        rank: r for linear and 1x1 conv layers (ΔW can reach rank r²).
        alpha: scale numerator (``None``: alpha = rank, scale 1).
        conv_rank, conv_alpha: r and alpha for kxk convolutions (fall back to rank/alpha).
        use_tucker: Tucker cores for kxk convolutions (LyCORIS ``use_tucker``).
        rank_stabilized: scale ``alpha / sqrt(r)``; files store ``alpha·sqrt(r)`` like LyCORIS.
        module_dropout: probability to skip the whole module per training step.
        rank_dropout: LyCORIS' rank dropout: each output row of ΔW dropped with this probability while
            training, one draw per forward for the whole batch, no rescaling (``drop_output_rows``).
    """

    rank: int = 4
    alpha: float | None = None
    conv_rank: int | None = None
    conv_alpha: float | None = None
    use_tucker: bool = False
    rank_stabilized: bool = False
    module_dropout: float = 0.0
    rank_dropout: float = 0.0

    def __post_init__(self) -> None:
        check_ranks_and_rates(self, rates=("module_dropout", "rank_dropout"))


def _factor_shapes(geometry: LayerGeometry, rank: int, tucker: bool) -> dict[str, tuple[int, ...]]:
    out_f, in_f = geometry.out_features, geometry.in_features
    if tucker:
        core = (rank, rank, *geometry.kernel)
        return {"hada_w1_a": (rank, out_f), "hada_w1_b": (rank, in_f), "hada_w2_a": (rank, out_f),
                "hada_w2_b": (rank, in_f), "hada_t1": core, "hada_t2": core}
    flat_in = in_f * int(torch.tensor(geometry.kernel).prod()) if geometry.kernel else in_f
    return {"hada_w1_a": (out_f, rank), "hada_w1_b": (rank, flat_in), "hada_w2_a": (out_f, rank),
            "hada_w2_b": (rank, flat_in)}


class LoHaModule(AdapterModule):
    """One LoHa adapter for one base layer (a thin shell over :func:`loha_delta_weight`).

    Parameters ``hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b`` (+ ``hada_t1, hada_t2`` in Tucker
    form, on kxk convolutions from configs, on any convolution from files); buffer ``alpha`` (0-dim, saved, ``scale = alpha / r``). The forward path builds ΔW and
    applies it with the layer's own convolution: ``Δy = geometry.conv(x, ΔW)``.

    ``init_weights=False`` leaves the factors uninitialised (``torch.empty``) and draws nothing from
    the global RNG: for a caller that fills every factor next, as :meth:`from_file_tensors` does.
    """

    family: ClassVar[str] = "loha"
    scale_is_alpha_over_rank: ClassVar[bool] = True
    file_keys: ClassVar[tuple[str, ...]] = (*_FACTORS, "hada_t1", "hada_t2", "alpha")
    marker_keys: ClassVar[tuple[str, ...]] = (*_FACTORS, "hada_t1", "hada_t2")
    rank_keys: ClassVar[tuple[str, ...]] = ("hada_w1_b",)
    tucker_keys: ClassVar[tuple[str, ...]] = ("hada_t1", "hada_t2")
    linear_keys: ClassVar[tuple[str, ...]] = ("hada_w1_a",)
    lycoris_algo: ClassVar[str] = "loha"

    def __init__(
        self,
        geometry: LayerGeometry,
        rank: int,
        alpha: float | None = None,
        *,
        use_tucker: bool = False,
        rank_stabilized: bool = False,
        module_dropout: float = 0.0,
        rank_dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        init_weights: bool = True,
    ) -> None:
        super().__init__(geometry)
        if not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"LoHa rank must be a positive int, got {rank!r}")
        self.tucker = use_tucker and geometry.is_conv  # configs ask for it on kxk convs only
        factory = {"dtype": dtype, "device": device}
        for key, shape in _factor_shapes(geometry, rank, self.tucker).items():
            setattr(self, key, nn.Parameter(torch.empty(shape, **factory)))
        if not self.tucker:
            self.hada_t1 = self.hada_t2 = None
        scale = lora_scale(alpha, rank, rank_stabilized=rank_stabilized)
        self._register_alpha_scale(scale * rank, scale, device)
        self.module_dropout = module_dropout
        self.rank_dropout = rank_dropout
        if not init_weights:  # the caller fills every factor (from_file_tensors): no draw, no global RNG use
            return
        with torch.no_grad():  # LyCORIS init: w2_a = 0 makes ΔW = 0
            nn.init.normal_(self.hada_w1_b, std=1.0)
            nn.init.normal_(self.hada_w2_b, std=1.0)
            nn.init.normal_(self.hada_w1_a, std=0.1)
            nn.init.zeros_(self.hada_w2_a)
            if self.tucker:
                nn.init.normal_(self.hada_t1, std=0.1)
                nn.init.normal_(self.hada_t2, std=0.1)

    @property
    def rank(self) -> int:
        return self.hada_w1_b.shape[0]

    def delta_dtype(self) -> torch.dtype:
        return self.hada_w1_a.dtype

    def delta_weight(self) -> Tensor:
        """(out, in, *k): ``scale · (w1_a ⋅ w1_b) ⊙ (w2_a ⋅ w2_b)``."""
        return loha_delta_weight(
            self.hada_w1_a, self.hada_w1_b, self.hada_w2_a, self.hada_w2_b, self.scale,
            kernel=self.geometry.kernel, t1=self.hada_t1, t2=self.hada_t2,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Δy = ``geometry.conv(x, ΔW)`` (training with ``rank_dropout``: ΔW's output rows dropped, as LyCORIS)."""
        delta = self.delta_weight()
        if self.training and self.rank_dropout > 0:
            delta = drop_output_rows(delta, self.rank_dropout)
        return self.geometry.conv(x, delta)

    def file_tensors(self) -> dict[str, Tensor]:
        tensors: dict[str, Tensor] = {key: getattr(self, key) for key in _FACTORS}
        if self.tucker:
            tensors["hada_t1"], tensors["hada_t2"] = self.hada_t1, self.hada_t2  # type: ignore[assignment]
        tensors["alpha"] = self.alpha
        return tensors

    @classmethod
    def from_config(
        cls,
        config: LoHaConfig,
        geometry: LayerGeometry,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "LoHaModule":
        """A fresh module for one layer (ΔW = 0)."""
        rank, alpha = config.rank_alpha_for(geometry)
        return cls(
            geometry, rank, alpha, use_tucker=config.use_tucker and geometry.is_kxk,
            rank_stabilized=config.rank_stabilized,
            module_dropout=config.module_dropout, rank_dropout=config.rank_dropout, dtype=dtype, device=device,
        )

    @classmethod
    def from_file_tensors(
        cls, geometry: LayerGeometry, tensors: dict[str, Tensor], *, name: str = "<module>"
    ) -> "LoHaModule":
        """Build from ``hada_*`` tensors (+ optional ``alpha``); rank from ``hada_w1_b``.

        Raises:
            ValueError: a tensor is missing or its shape does not fit the base layer.
        """
        missing = [k for k in _FACTORS if k not in tensors]
        tucker = "hada_t1" in tensors or "hada_t2" in tensors
        if tucker:
            missing += [k for k in ("hada_t1", "hada_t2") if k not in tensors]
        if missing:
            raise ValueError(f"{name}: LoHa tensors {missing} are missing (have {sorted(tensors)})")
        if not tucker:
            tensors = _flat_conv_factors(tensors)
        rank = tensors["hada_w1_b"].shape[0]
        if tucker and not geometry.is_conv:  # peft writes 1x1 cores too (use_effective_conv2d)
            raise ValueError(f"{name}: LoHa Tucker cores (hada_t1/t2) need a convolution; the layer's weight is {geometry.weight_shape}")
        want = _factor_shapes(geometry, rank, tucker)
        bad = {k: tuple(tensors[k].shape) for k in want if tuple(tensors[k].shape) != want[k]}
        if bad:
            raise ValueError(
                f"{name}: LoHa shapes {bad} do not fit the base layer of weight shape {geometry.weight_shape}; "
                f"expected {dict((k, want[k]) for k in bad)} for rank {rank}. The file was made for another model."
            )
        alpha = tensors.get("alpha")
        first = tensors["hada_w1_a"]
        module = cls(geometry, rank, float(alpha) if alpha is not None else None, use_tucker=tucker,
                     dtype=first.dtype, device=first.device, init_weights=False)
        with torch.no_grad():
            for key in want:
                getattr(module, key).copy_(tensors[key])
        return module

    @classmethod
    def weight_shape_from_file_tensors(cls, tensors: dict[str, Tensor]) -> tuple[int, ...] | None:
        """The base weight's shape ``(out, in, *kernel)`` the file tensors imply, or ``None`` (only shapes are read).

        Tucker form: ``(hada_w1_a.shape[1], hada_w1_b.shape[1], *hada_t1.shape[2:])``; OneTrainer's conv form (4-D
        factors, :func:`_flat_conv_factors`): ``(out, in, kh, kw)`` from them. Plain form: ``None`` — its factors
        ``(out, r)`` / ``(r, in·kh·kw)`` are the same for a Linear layer of ``in·kh·kw`` inputs and for a kxk
        convolution stored flattened, so only the base model can tell.
        """
        w1_a, w1_b, t1 = tensors.get("hada_w1_a"), tensors.get("hada_w1_b"), tensors.get("hada_t1")
        if t1 is None and w1_a is not None and w1_b is not None and w1_a.dim() == 4 and w1_b.dim() == 4:
            return (int(w1_a.shape[0]), int(w1_b.shape[1]), *(int(k) for k in w1_b.shape[2:]))  # (OneTrainer's conv form)
        if w1_a is None or w1_b is None or t1 is None or w1_a.dim() != 2 or w1_b.dim() != 2:
            return None
        return (int(w1_a.shape[1]), int(w1_b.shape[1]), *(int(k) for k in t1.shape[2:]))


def _flat_conv_factors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A conv layer's plain LoHa factors as convolutions — ``hada_w*_a`` (out, r, 1, 1), ``hada_w*_b`` (r, in, kh,
    kw), OneTrainer's form (``modules/module/LoRAModule.py``: each pair a 1x1 conv after a kxk one) — flattened to
    LyCORIS' ``(out, r)`` / ``(r, in·kh·kw)``: the same ΔW (a 1x1 conv after a kxk one is that matrix product)."""
    out = dict(tensors)
    for key in ("hada_w1_a", "hada_w2_a"):
        value = tensors[key]
        if value.dim() == 4 and tuple(value.shape[2:]) == (1, 1):
            out[key] = value.flatten(1)
    for key in ("hada_w1_b", "hada_w2_b"):
        if tensors[key].dim() == 4:
            out[key] = tensors[key].flatten(1)
    return out
