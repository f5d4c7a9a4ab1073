"""Linear multistep on σ (diffusers' ``LMSDiscreteScheduler``, k-diffusion's ``sample_lms``;
kohya's ``lms``/``k_lms``, A1111's "LMS").

The ODE ``dx/dσ = (x − x̂0(x, σ))/σ`` is stepped from σ_i to σ_{i+1} with the integral of the
Lagrange polynomial through the last ``order`` derivatives (order 4, fewer on the first steps).
diffusers integrates each Lagrange basis polynomial numerically (``scipy.integrate.quad``); it is a
product of linear factors, so here it is expanded and integrated exactly (float64, no scipy).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.polynomial import polynomial as P
from torch import Tensor

from .sigma_space import (
    discrete_start,
    sigma_slope,
    timestep_batch,
)
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from .schedules import ScheduleOptions

__all__ = ["lms_coefficients", "lms_sample"]


def lms_coefficients(nodes: list[float], start: float, end: float) -> list[float]:
    """``∫_start^end ℓ_j(τ) dτ`` for each Lagrange basis polynomial ``ℓ_j`` on ``nodes``.

    ``nodes``: the σ of the derivatives the step combines, newest first (σ_i, σ_{i-1}, ...);
    ``start``/``end``: σ_i and σ_{i+1}. ``ℓ_j(τ) = Π_{k≠j} (τ − σ_k)/(σ_j − σ_k)``, expanded
    into its monomial coefficients and integrated exactly in float64. Returns one float per node.
    """
    out = []
    for j, node in enumerate(nodes):
        others = [s for k, s in enumerate(nodes) if k != j]
        denom = float(np.prod([node - s for s in others])) if others else 1.0
        antiderivative = P.polyint(P.polyfromroots(others) if others else np.ones(1))
        out.append(float((P.polyval(end, antiderivative) - P.polyval(start, antiderivative)) / denom))
    return out


def lms_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
               prediction_type: str = "epsilon", generator: torch.Generator | None = None,
               callback: StepCallback | None = None, karras: bool = False,
               order: int = 4, schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
               discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None) -> Tensor:
    """LMS from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W), as diffusers' ``LMSDiscreteScheduler``
    with its defaults (``timestep_spacing="linspace"``, ``steps_offset=0``) steps it.

    ``model(x_in, t)``: the guided model at ``x/√(σ²+1)`` and fractional float32 timesteps t (B,);
    ``alphas_cumprod`` (T,): the training schedule; ``karras``: σ on Karras et al.'s ρ = 7 grid
    (diffusers' ``use_karras_sigmas``); ``order``: the multistep order (diffusers' ``step(order=)``);
    ``schedule``: one of A1111's σ grids instead (:mod:`.schedules`).
    ``generator`` is unused (LMS draws no noise). ``callback(i, t, x)`` sees each step's sample.
    ``x`` is carried in at least float32 between steps; the model sees it in ``x_T``'s dtype.

    Raises:
        ValueError: an unknown prediction type, ``num_steps`` outside [1, T], ``order`` < 1.
    """
    del generator
    if order < 1:
        raise ValueError(f"lms: order must be >= 1, got {order}")
    times, grid, x = discrete_start("lms", x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                                    prediction_type=prediction_type, karras=karras, schedule=schedule,
                                    schedule_options=schedule_options,
                                    discard_next_to_last_sigma=discard_next_to_last_sigma, start=start)
    derivatives: list[Tensor] = []
    for i in range(len(times)):
        s = grid[i]
        t = timestep_batch(times[i], x)
        derivatives = (derivatives + [sigma_slope(model, x, s, t, prediction_type=prediction_type,
                                                  dtype=x_T.dtype)])[-order:]
        nodes = grid[max(i + 1 - order, 0):i + 1][::-1]  # σ of the derivatives used, newest first
        coeffs = lms_coefficients(nodes, s, grid[i + 1])
        x = x + sum(c * d for c, d in zip(coeffs, reversed(derivatives)))
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)
