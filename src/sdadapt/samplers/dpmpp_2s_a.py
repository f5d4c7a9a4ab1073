"""DPM-Solver++(2S) ancestral (k-diffusion's ``sample_dpmpp_2s_ancestral``; A1111's "DPM++ 2S a",
"DPM++ 2S a Karras"). diffusers has no scheduler for it, so it runs on the discrete σ grid of the
Euler samplers (:func:`.sigma_space.discrete_sigmas`: diffusers' ``EulerAncestralDiscreteScheduler``
grid, which is what ``euler_a`` and A1111's "Euler a" map to; Karras σ with unrounded timesteps, as
``EulerDiscreteScheduler(use_karras_sigmas=True)``).

Per step from σ_i to σ_{i+1} (η = 1 by default): ``(σ_down, σ_up)`` of the ancestral split
(:func:`.sigma_space.ancestral_step` with η), then one
DPM-Solver++(2S) step from σ_i to σ_down in log σ (``λ = −log σ``, ``h = λ_down − λ_i``): the model's
x̂0 at σ_i, a first-order step to the log-midpoint ``σ_s = √(σ_i·σ_down)``,
``x₂ = (σ_s/σ_i)·x − (e^(−h/2) − 1)·x̂0``, the model's x̂0 at (x₂, σ_s), and
``x ← (σ_down/σ_i)·x − (e^(−h) − 1)·x̂0(x₂)``; then ``x ← x + s_noise·σ_up·z`` while σ_{i+1} > 0. A step
with σ_down = 0 (the last; with η > 1 also a long one, σ_up capped at σ_{i+1}) is Euler onto x̂0. So ``n``
steps cost ``2n − 1`` model calls (η ≤ 1); z is drawn from
``generator`` after each step's second call (n − 1 draws), as k-diffusion's ``randn_like`` would be.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .sigma_space import (
    ancestral_step,
    denoised,
    discrete_start,
    model_input,
    sigma_to_t,
    step_noise,
    timestep_batch,
    training_sigmas,
)
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from .schedules import ScheduleOptions

__all__ = ["dpmpp_2s_ancestral_sample"]


def dpmpp_2s_ancestral_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                              prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                              callback: StepCallback | None = None, karras: bool = False, spacing: str = "linspace",
                              steps_offset: int = 0, eta: float = 1.0, s_noise: float = 1.0,
                              schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
                              discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None) -> Tensor:
    """DPM-Solver++(2S) ancestral from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W) (see the module).

    ``model(x_in, t)``: the (guided) model at ``x/√(σ²+1)`` and float32 timesteps t (B,): the grid's
    timesteps, and at the midpoints ``t(σ_s)`` (:func:`.sigma_space.sigma_to_t`, fractional).
    ``alphas_cumprod`` (T,): the training schedule; ``karras``: σ on Karras et al.'s ρ = 7 grid;
    ``spacing``, ``steps_offset``: diffusers' ``timestep_spacing``. ``eta``: the ancestral noise share
    (k-diffusion's; 0 gives the deterministic DPM-Solver++(2S), the noise still drawn and multiplied by 0); ``s_noise``: the noise
    multiplier. ``callback(i, t, x)`` sees each step's sample. ``schedule``: one of A1111's σ grids instead
    (:mod:`.schedules`).

    Raises:
        ValueError: an unknown prediction type or spacing, ``num_steps`` outside [1, T], a negative
            ``eta`` or ``s_noise``.
    """
    if eta < 0 or s_noise < 0:
        raise ValueError(f"dpmpp_2s_a: eta and s_noise must be >= 0, got eta={eta}, s_noise={s_noise}")
    times, grid, x = discrete_start("dpmpp_2s_a", x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                                    prediction_type=prediction_type, spacing=spacing, steps_offset=steps_offset,
                                    karras=karras, schedule=schedule, schedule_options=schedule_options,
                                    discard_next_to_last_sigma=discard_next_to_last_sigma, start=start)
    splits = [ancestral_step(grid[i], grid[i + 1], eta) for i in range(len(times))]
    mids = [(grid[i] * down) ** 0.5 for i, (down, _) in enumerate(splits)]
    mid_times = sigma_to_t(torch.tensor(mids, dtype=torch.float64), training_sigmas(alphas_cumprod)).tolist()

    def x0_at(x: Tensor, sigma: float, t: Tensor) -> Tensor:
        return denoised(model(model_input(x, sigma, x_T.dtype), t), x, sigma, prediction_type)

    for i in range(len(times)):
        s, (down, up) = grid[i], splits[i]
        t = timestep_batch(times[i], x)
        x0 = x0_at(x, s, t)
        if down == 0:  # the last step: Euler onto x̂0
            x = x + (x - x0) / s * (down - s)
        else:
            h = math.log(s / down)  # λ_down − λ_i, λ = −log σ
            x_2 = x * (mids[i] / s) - x0 * math.expm1(-h / 2)
            x = x * (down / s) - x0_at(x_2, mids[i], timestep_batch(mid_times[i], x_2)) * math.expm1(-h)
        if grid[i + 1] > 0:  # drawn even when σ_up = 0 (η = 0), as k-diffusion draws it
            x = x + step_noise(x, generator, x_T.dtype) * (s_noise * up)
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)
