"""DyLoRA (Valipour et al. 2022) as kohya's ``networks/dylora.py`` trains it.

A DyLoRA layer is a LoRA of rank ``R`` whose rows are trained so that any leading ``r`` of them
(``r`` a multiple of ``unit``) is a usable LoRA. At each training forward kohya draws
``b ~ U{0, …, R-1}``, rounds it down to a multiple of ``unit`` and::

    Δy = scale · sqrt(R / (b + unit)) · up(down(x))        scale = alpha / R

with *all* ``R`` rows in the product, but only rows ``b … b+unit-1`` of ``down`` and columns
``b … b+unit-1`` of ``up`` receiving gradients (kohya flips ``requires_grad`` per row each
forward). Here the other rows enter the product detached, which gives the same gradients —
``None`` outside the slice, as kohya's frozen rows — so optimisers skip them exactly as they
do in kohya (no momentum step, no weight decay, per-row step counts). Rows are separate
parameters for that reason (kohya's ``lora_A`` / ``lora_B`` ParameterLists).

Files hold the plain LoRA tensors ``lora_down.weight`` (R, in, *k), ``lora_up.weight``
(out, R[, 1, 1]) and ``alpha`` (kohya's ``state_dict`` override), so every LoRA reader applies
them; :func:`sdadapt.loratools.dylora.dylora_cut` keeps the first ``r`` rows as
``networks/extract_lora_from_dylora.py`` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import AdapterModule, LayerGeometry, graph_capturing
from .lora import LoRAModule, lora_delta_weight, lora_scale

__all__ = ["DYLORA_COMPILE_REASON", "DyLoRAConfig", "DyLoRAModule", "dylora_forward", "dylora_trainable_rank"]

#: why a DyLoRA network is not trained compiled (``fit(..., config=FitConfig(compile_backend=...))`` and
#: ``train dylora --torch-compile`` refuse it with this reason)
DYLORA_COMPILE_REASON = ("each DyLoRA layer draws its trainable slice on the host every step, which breaks the "
                         "compiled graph at every layer and recompiles it for every slice (no speed-up, torch's "
                         "recompile limit is hit)")


def dylora_trainable_rank(draw: int, unit: int) -> int:
    """kohya's trainable slice start: ``draw - draw % unit`` for ``draw`` in ``0 … R-1``."""
    return draw - draw % unit


def dylora_forward(
    x: Tensor,
    ups: Sequence[Tensor],
    downs: Sequence[Tensor],
    scale: float | Tensor,
    geometry: LayerGeometry,
    *,
    trainable_rank: int,
    unit: int,
) -> Tensor:
    """kohya's ``DyLoRAModule.forward`` delta for a fixed trainable slice.

    Args:
        x: the base layer's input, (..., in) for linear, (B, in, H, W) for conv.
        ups: R columns, each (out, 1) or (out, 1, 1, 1).
        downs: R rows, each (1, in) or (1, in, kh, kw).
        scale: ``alpha / R`` (times the multiplier).
        trainable_rank: ``b``, the slice start (a multiple of ``unit``, ``0 <= b < R``).
        unit: the slice width.

    Returns:
        Δy = ``scale · sqrt(R / (b + unit)) · up(down(x))`` with the base layer's output shape;
        gradients reach only rows/columns ``b … b+unit-1`` (the others are used detached).
    """
    rank = len(downs)
    end = trainable_rank + unit
    down = torch.cat([d if trainable_rank <= i < end else d.detach() for i, d in enumerate(downs)], dim=0)
    up = torch.cat([u if trainable_rank <= i < end else u.detach() for i, u in enumerate(ups)], dim=1)
    h = geometry.conv(x, down)  # (..., R) or (B, R, H', W')
    h = h * scale * math.sqrt(rank / end)  # (two products: a float32 0-dim scale keeps a float64 h float64)
    if geometry.is_conv:
        return nn.functional.conv2d(h, up)  # up: (out, R, 1, 1)
    return nn.functional.linear(h, up)  # up: (out, R)


@dataclass(frozen=True)
class DyLoRAConfig:
    """DyLoRA hyper-parameters (kohya's ``networks.dylora``).

    Attributes:
        rank: R (kohya's ``network_dim``); a multiple of ``unit``.
        alpha: scale numerator, ``alpha / R``; ``None`` (or 0) means ``R``.
        unit: the width of the slice trained per forward (kohya's ``network_args unit=N``, default 1).
    """

    rank: int = 4
    alpha: float | None = None
    unit: int = 1

    def __post_init__(self) -> None:
        for name in ("rank", "unit"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DyLoRAConfig.{name} must be a positive int, got {value!r}")
        if self.rank % self.unit:
            raise ValueError(f"DyLoRA rank {self.rank} is not a multiple of unit {self.unit} (kohya asserts "
                             "'rank must be a multiple of unit'); pick a rank such as "
                             f"{max(self.unit, self.rank - self.rank % self.unit)}")


class DyLoRAModule(AdapterModule):
    """One DyLoRA adapter: ``lora_down`` / ``lora_up`` ParameterLists of R rows (1, in, *k) and
    columns (out, 1[, 1, 1]); buffer ``alpha`` (0-dim, ``scale = alpha / R``).

    Training forward: :func:`dylora_forward` with the slice drawn from the global torch CPU RNG,
    the stream sdadapt's module dropout draws from (kohya draws from Python's global ``random``):
    gradient checkpointing restores that RNG before its recompute, so the recomputed forward uses
    the same slice. Eval forward and :meth:`delta_weight`: the plain rank-R LoRA, what the saved
    file applies. Not in a captured CUDA graph (it would replay one slice forever): RuntimeError.
    """

    family = "dylora"

    def __init__(
        self,
        geometry: LayerGeometry,
        rank: int,
        alpha: float | None = None,
        *,
        unit: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(geometry)
        DyLoRAConfig(rank=rank, alpha=alpha, unit=unit)  # (the checks)
        self.unit = unit
        scale = lora_scale(alpha, rank)
        factory = {"dtype": dtype, "device": device}
        ones = [1] * len(geometry.kernel)
        self.lora_down = nn.ParameterList(
            [nn.Parameter(torch.empty(1, geometry.in_features, *geometry.kernel, **factory)) for _ in range(rank)])
        self.lora_up = nn.ParameterList(
            [nn.Parameter(torch.zeros(geometry.out_features, 1, *ones, **factory)) for _ in range(rank)])
        for row in self.lora_down:  # kohya: each (1, in[, kh, kw]) row ~ kaiming-uniform(a=sqrt 5), up = 0
            nn.init.kaiming_uniform_(row, a=math.sqrt(5))
        self._register_alpha_scale(scale * rank, scale, device)
        #: the slice start of the last training forward (for reports and tests)
        self.last_trainable_rank: int | None = None

    @property
    def rank(self) -> int:
        return len(self.lora_down)

    def base_scale(self) -> float:
        return float(self.alpha) / self.rank

    def delta_dtype(self) -> torch.dtype:
        return self.lora_down[0].dtype

    def _down(self) -> Tensor:
        return torch.cat(tuple(self.lora_down), dim=0)  # (R, in, *k)

    def _up(self) -> Tensor:
        return torch.cat(tuple(self.lora_up), dim=1)  # (out, R[, 1, 1])

    def draw_trainable_rank(self) -> int:
        """kohya's ``random.randint(0, R-1)`` rounded down to a multiple of ``unit`` (global torch CPU RNG; no device sync)."""
        draw = int(torch.randint(0, self.rank, ()))
        return dylora_trainable_rank(draw, self.unit)

    def delta_weight(self) -> Tensor:
        """(out, in, *k): the rank-R LoRA delta ``scale · up ⋅ down`` (what the file applies)."""
        return lora_delta_weight(self._up(), self._down(), self.scale)

    def forward(self, x: Tensor) -> Tensor:
        """Δy: training, kohya's random-slice forward (:func:`dylora_forward`); eval, the rank-R LoRA."""
        if not self.training:
            return dylora_forward(x, list(self.lora_up), list(self.lora_down), self.scale, self.geometry,
                                  trainable_rank=self.rank - self.unit, unit=self.unit)
        if graph_capturing():
            raise RuntimeError("DyLoRA draws its trainable slice on the host at every step; a captured CUDA graph "
                               "would replay one slice: train DyLoRA without cuda_graph (--cuda-graph)")
        b = self.draw_trainable_rank()
        self.last_trainable_rank = b
        return dylora_forward(x, list(self.lora_up), list(self.lora_down), self.scale, self.geometry,
                              trainable_rank=b, unit=self.unit)

    def file_tensors(self) -> dict[str, Tensor]:
        """kohya's DyLoRA ``state_dict``: ``lora_down.weight`` (R, in, *k), ``lora_up.weight`` (out, R[, 1, 1]), ``alpha``."""
        return {"lora_down.weight": self._down(), "lora_up.weight": self._up(), "alpha": self.alpha}

    @torch.no_grad()
    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Copy a LoRA file's ``lora_down.weight`` / ``lora_up.weight`` (and ``alpha``) of rank R into the rows
        (kohya's ``_load_from_state_dict``); shapes as :meth:`file_tensors`."""
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        want_down, want_up = tuple(self._down().shape), tuple(self._up().shape)
        down = down.reshape(want_down) if not self.geometry.is_conv and down.dim() == 4 else down
        up = up.reshape(want_up) if not self.geometry.is_conv and up.dim() == 4 else up
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise ValueError(f"DyLoRA: file tensors down {tuple(down.shape)} / up {tuple(up.shape)} do not fit "
                             f"down {want_down} / up {want_up}")
        for i, row in enumerate(self.lora_down):
            row.copy_(down[i:i + 1])
        for i, col in enumerate(self.lora_up):
            col.copy_(up[:, i:i + 1])
        if "alpha" in tensors:
            self.alpha.copy_(tensors["alpha"].float().reshape(()))
            self.refresh_scale()

    @classmethod
    def from_lora(cls, lora: LoRAModule, *, unit: int) -> "DyLoRAModule":
        """A DyLoRA module of ``lora``'s geometry, rank, alpha, dtype and device (fresh kohya init)."""
        if lora.lora_mid is not None:
            raise ValueError("DyLoRA has no Tucker form (use_tucker)")
        module = cls(lora.geometry, lora.rank, float(lora.alpha), unit=unit, dtype=lora.lora_down.dtype,
                     device=lora.lora_down.device)
        module.set_multiplier(lora.multiplier)
        module.train(lora.training)
        return module
