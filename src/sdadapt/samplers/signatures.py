"""The two callables every sampler takes: the (guided) model and the per-step callback."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["Denoise", "StepCallback"]

#: ``model(x_in, t) -> output``: the (guided) model over a batch x_in (B,C,H,W) at timesteps t (B,)
Denoise = Callable[[Tensor, Tensor], Tensor]
#: ``callback(i, t, x)``: step i's timesteps t (B,) and the sample x (B,C,H,W) after it
StepCallback = Callable[[int, Tensor, Tensor], None]
