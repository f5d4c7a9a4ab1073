"""Full deltas: a dense weight difference ``diff`` and optional bias difference ``diff_b``.

LyCORIS ``algo=full`` (and "dylora full"/fine-tune extractions) store, per layer::

    ΔW = diff       (out, in, *k)
    Δb = diff_b     (out,)

with no rank and no alpha (scale 1). ``Δy = geometry.conv(x, ΔW) + Δb``; merging adds ``ΔW`` to
the weight and ``Δb`` to the bias (a layer without a bias cannot take a merged ``diff_b``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import AdapterModule, LayerGeometry
from .lora import _scaled

__all__ = ["FullConfig", "FullModule"]


@dataclass(frozen=True, kw_only=True)
class FullConfig:
    """A trainable dense delta per layer (LyCORIS ``full``).

    Attributes:
        train_bias: also learn ``diff_b`` on layers that have a bias.
        module_dropout: probability to skip the whole module per training step.
    """

    train_bias: bool = True
    module_dropout: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.module_dropout < 1.0:
            raise ValueError(f"FullConfig.module_dropout must be in [0, 1), got {self.module_dropout!r}")


class FullModule(AdapterModule):
    """Parameters ``diff`` (out, in, *k) and optionally ``diff_b`` (out,), zero at init.

    ``init_weights=False`` leaves them uninitialised (``torch.empty``): for a caller that fills them next, as
    :meth:`from_file_tensors` does (no pass over a weight-sized tensor that the file overwrites).
    """

    family: ClassVar[str] = "full"
    #: parameters a working copy may hand over to its delta (adapter_working_copy(consumable=True) sets it)
    _consumable: frozenset[str] = frozenset()
    file_keys: ClassVar[tuple[str, ...]] = ("diff", "diff_b")
    marker_keys: ClassVar[tuple[str, ...]] = ("diff", "diff_b")
    linear_keys: ClassVar[tuple[str, ...]] = ("diff", "diff_b")
    lycoris_algo: ClassVar[str] = "full"

    def __init__(
        self,
        geometry: LayerGeometry,
        *,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        init_weights: bool = True,
    ) -> None:
        super().__init__(geometry)
        factory = {"dtype": dtype, "device": device}
        new = torch.zeros if init_weights else torch.empty
        self.diff = nn.Parameter(new(geometry.weight_shape, **factory))
        self.diff_b = nn.Parameter(new(geometry.out_features, **factory)) if bias else None
        self.register_buffer("scale", torch.tensor(1.0, dtype=torch.float32, device=device), persistent=False)

    @property
    def rank(self) -> int:
        """Full rank bound ``min(out, in·kh·kw)``."""
        return min(self.diff.shape[0], self.diff[0].numel())

    def delta_dtype(self) -> torch.dtype:
        return self.diff.dtype

    def delta_weight(self) -> Tensor:
        """(out, in, *k): ``multiplier · diff``.

        A working copy made with ``consumable`` (:func:`~sdadapt.adapters.registry.adapter_working_copy`:
        ``merge-lora``'s float32 copy of an fp16 file's layer) scales its own ``diff`` in place and hands
        it over (no second tensor of the layer's size; the copy has no ``diff`` after); otherwise a new
        tensor."""
        if self.diff is None:
            raise RuntimeError("this working copy's diff was handed over by its delta_weight (consumable); make a "
                               "new working copy for another delta")
        if "diff" in self._consumable and not (torch.is_grad_enabled() and self.diff.requires_grad):
            diff = self.diff.detach()
            self.diff = None  # (handed over: scaled in place below)
            self._consumable = self._consumable - {"diff"}
            return _scaled(diff, self.scale)
        return self.diff * self.scale

    def bias_delta(self) -> Tensor | None:
        """(out,): ``multiplier · diff_b`` or ``None``."""
        return None if self.diff_b is None else self.diff_b * self.scale

    def forward(self, x: Tensor) -> Tensor:
        """Δy = ``geometry.conv(x, ΔW) + Δb``."""
        out = self.geometry.conv(x, self.diff)
        if self.diff_b is not None:
            out = out + (self.diff_b.view(-1, 1, 1) if self.geometry.is_conv else self.diff_b)
        return out * self.scale

    def file_tensors(self) -> dict[str, Tensor]:
        tensors = {"diff": self.diff}
        if self.diff_b is not None:
            tensors["diff_b"] = self.diff_b
        return tensors

    @classmethod
    def from_config(
        cls,
        config: FullConfig,
        geometry: LayerGeometry,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> "FullModule":
        module = cls(geometry, bias=config.train_bias and geometry.has_bias, dtype=dtype, device=device)
        module.module_dropout = config.module_dropout
        return module

    @classmethod
    def from_file_tensors(
        cls, geometry: LayerGeometry, tensors: dict[str, Tensor], *, name: str = "<module>"
    ) -> "FullModule":
        """Build from ``{"diff"[, "diff_b"]}``.

        Raises:
            ValueError: missing ``diff`` or shapes that do not fit the layer.
        """
        if "diff" not in tensors:
            raise ValueError(f"{name}: a full delta needs 'diff' (have {sorted(tensors)})")
        diff, diff_b = tensors["diff"], tensors.get("diff_b")
        if tuple(diff.shape) != geometry.weight_shape or (
            diff_b is not None and tuple(diff_b.shape) != (geometry.out_features,)
        ):
            raise ValueError(
                f"{name}: full delta shapes diff {tuple(diff.shape)}"
                + (f", diff_b {tuple(diff_b.shape)}" if diff_b is not None else "")
                + f" do not fit the base layer of weight shape {geometry.weight_shape}"
            )
        module = cls(geometry, bias=diff_b is not None, dtype=diff.dtype, device=diff.device, init_weights=False)
        with torch.no_grad():
            module.diff.copy_(diff)
            if diff_b is not None:
                module.diff_b.copy_(diff_b)  # type: ignore[union-attr]
        return module

    @classmethod
    def weight_shape_from_file_tensors(cls, tensors: dict[str, Tensor]) -> tuple[int, ...] | None:
        """The base weight's shape: ``diff.shape`` (``None`` without ``diff``; only shapes are read)."""
        diff = tensors.get("diff")
        return None if diff is None else tuple(int(n) for n in diff.shape)
