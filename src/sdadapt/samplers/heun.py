"""Heun's second-order method on σ (diffusers' ``HeunDiscreteScheduler``, k-diffusion's
``sample_heun``; kohya's ``heun``, A1111's "Heun").

Each step is an Euler predictor to σ_{i+1} and a trapezoidal corrector with the derivative there:
two model calls, except the last step (σ_{i+1} = 0), which is a plain Euler step onto x̂0. So
``num_steps`` steps cost ``2·num_steps − 1`` model calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .churn import SigmaChurn, check_churn, churned, churned_timestep
from .sigma_space import (
    discrete_start,
    grid_table,
    sigma_slope,
    sigma_to_t,
    timestep_batch,
)
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from .schedules import ScheduleOptions

__all__ = ["heun_sample"]


def heun_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                callback: StepCallback | None = None, karras: bool = False,
                spacing: str = "linspace", steps_offset: int = 0, clip_sample: float | None = None,
                schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
                discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None,
                churn: SigmaChurn | None = None) -> Tensor:
    """Heun from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W), step for step diffusers'
    ``HeunDiscreteScheduler`` (``timestep_spacing=spacing``, ``steps_offset``, ``use_karras_sigmas=karras``).

    Per step i < n−1: ``d = (x − x̂0(x, σ_i))/σ_i`` at ``t_i``, ``x' = x + d·Δ`` (Δ = σ_{i+1} − σ_i),
    ``d' = (x' − x̂0(x', σ_{i+1}))/σ_{i+1}`` at ``t_{i+1}``, ``x ← x + (d + d')/2·Δ``; the last step
    is Euler onto x̂0 (with a ``schedule``: a step onto σ = 0 is, as k-diffusion's ``sample_heun``). ``clip_sample``: clamp x̂0 to ±that (diffusers' ``clip_sample=True`` with
    ``clip_sample_range``; kohya's sample images use 1.0). ``generator``: unused but by ``churn`` (A1111's
    "Sigma churn" settings, :mod:`.churn`, with a ``schedule``: the step from σ̂). ``callback(i, t, x)``
    sees each step's sample. Other arguments as :func:`.euler.euler_sample` (``schedule`` too).

    Raises:
        ValueError: an unknown prediction type or spacing, ``num_steps`` outside [1, T].
    """
    churning = check_churn("heun", churn, schedule)
    times, grid, x = discrete_start("heun", x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                                    prediction_type=prediction_type, spacing=spacing, steps_offset=steps_offset,
                                    karras=karras, schedule=schedule, schedule_options=schedule_options,
                                    discard_next_to_last_sigma=discard_next_to_last_sigma, start=start)

    def slope(x: Tensor, s: float, t: Tensor) -> Tensor:
        return sigma_slope(model, x, s, t, prediction_type=prediction_type, dtype=x_T.dtype, clip_sample=clip_sample)

    for i in range(len(times)):
        s, s_next = grid[i], grid[i + 1]
        t = timestep_batch(times[i], x)
        if churning:  # (k-diffusion: from σ̂, the model at t(σ̂))
            x, s, moved = churned(x, s, len(times), churn, generator)
            t = churned_timestep(s, alphas_cumprod, x_T, schedule, x) if moved else t
        d = slope(x, s, t)
        if s_next == 0:
            x = x + d * (s_next - s)
        else:
            x_pred = x + d * (s_next - s)
            # t of σ_{i+1}; past the last timestep (a schedule ending above σ = 0, kl_optimal's) t(σ) of the end
            if i + 1 < len(times):
                t_next = times[i + 1]
            else:
                table = grid_table(alphas_cumprod, x_T, schedule)
                t_next = float(sigma_to_t(torch.tensor([s_next], dtype=table.dtype), table)[0])
            x = x + (d + slope(x_pred, s_next, timestep_batch(t_next, x))) * ((s_next - s) / 2)
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)
