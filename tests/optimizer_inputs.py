"""Seeded random parameters and gradients for the optimiser tests (Lion, schedule-free)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["random_grads", "random_params"]


def random_params(seed: int, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype = torch.float32) -> list[nn.Parameter]:
    """Standard-normal parameters of ``shapes`` in ``dtype``, drawn from a generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def random_grads(seed: int, params: Sequence[torch.Tensor], steps: int) -> list[list[torch.Tensor]]:
    """``steps`` lists of standard-normal gradients, one per parameter in its shape and dtype, drawn
    from a generator seeded ``seed + 1000`` (not the parameters' stream)."""
    g = torch.Generator().manual_seed(seed + 1000)
    return [[torch.randn(p.shape, generator=g).to(p.dtype) for p in params] for _ in range(steps)]
