"""Input checks shared by the merge operators (:mod:`.operators`, :mod:`.supermerger_modes`,
:mod:`.meh_modes`): the tensor count and shapes, the single ``α``, and up-cast copies to work on.

Its own module so the mode modules need not import :mod:`.operators`, which registers them.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__: list[str] = []  # private helpers of the operator modules


def _up(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(tensor).__name__}")
    if not (tensor.is_floating_point() or tensor.is_complex()):
        raise TypeError(f"merge operators take floating-point tensors, got {tensor.dtype}; copy integer tensors instead")
    return tensor.to(dtype, copy=True)  # always a new tensor: operators work in place on it


def _same_shape(tensors: Sequence[Tensor], base: Tensor | None, name: str) -> None:
    shapes = {tuple(t.shape) for t in tensors} | ({tuple(base.shape)} if base is not None else set())
    if len(shapes) > 1:
        raise ValueError(f"{name}: tensors must share one shape, got {sorted(shapes)}")


def _count(tensors: Sequence[Tensor], n: int | tuple[int, int], name: str) -> None:
    low, high = (n, n) if isinstance(n, int) else n
    if not low <= len(tensors) <= high:
        want = str(low) if low == high else f"{low}..{high}"
        raise ValueError(f"{name}: needs {want} tensors, got {len(tensors)}")


def _alpha(weights: float | Sequence[float], name: str) -> float:
    if isinstance(weights, (int, float)):
        return float(weights)
    values = list(weights)
    if len(values) != 1:
        raise ValueError(f"{name}: weights is one alpha (a float), got {values}")
    return float(values[0])


def _difference_inputs(tensors: Sequence[Tensor], weights: float | Sequence[float], base: Tensor | None, name: str,
                       compute_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, float]:
    """Checked ``(A, B, C, α)`` in ``compute_dtype`` for the A/B/C difference operators."""
    if len(tensors) == 3 and base is None:  # (the command line's order A B C, handed over as it is)
        raise ValueError(f"{name}: takes tensors=(A, B) and the third model as base=C (the command line's A B C), "
                         f"got 3 tensors and no base: call {name}([A, B], ..., base=C)")
    _count(tensors, 2, name)
    if base is None:
        raise ValueError(f"{name}: needs base= (the C model the difference B − C is taken from)")
    _same_shape(tensors, base, name)
    alpha = _alpha(weights, name)
    a, b = (_up(t, compute_dtype) for t in tensors)
    return a, b, _up(base, compute_dtype), alpha
