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

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .sigma_space import (
    ancestral_step,
    denoise,
    discrete_start,
    grid_table,
    sigma_to_t,
    step_noise,
    timestep_batch,
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
    dt, table = x.dtype, grid_table(alphas_cumprod, x_T, schedule)  # (float32 latents: A1111's float32 run)

    def x0_at(x: Tensor, sigma: float | Tensor, t: Tensor) -> Tensor:
        return denoise(model, x, sigma, t, prediction_type=prediction_type, dtype=x_T.dtype)

    for i in range(len(times)):
        s = grid[i]
        down, up = ancestral_step(s, grid[i + 1], eta, dtype=dt)
        t = timestep_batch(times[i], x)
        x0 = x0_at(x, s, t)
        if down == 0:  # the last step: Euler onto x̂0
            x = x + (x - x0) / s * (down - s)
        else:  # 0-dim times in k-diffusion's order (sampling.py:524-530): λ = −log σ, h = λ_down − λ_i
            lam, lam_next = -torch.tensor(s, dtype=dt).log(), -torch.tensor(down, dtype=dt).log()
            h = lam_next - lam
            mid = (lam + 0.5 * h).neg().exp()  # σ_s = √(σ_i·σ_down)
            x_2 = (mid / lam.neg().exp()) * x - (-h * 0.5).expm1() * x0
            t_mid = timestep_batch(float(sigma_to_t(mid.reshape(1), table)[0]), x_2)
            x = (lam_next.neg().exp() / lam.neg().exp()) * x - (-h).expm1() * x0_at(x_2, mid, t_mid)
        if grid[i + 1] > 0:  # drawn even when σ_up = 0 (η = 0), as k-diffusion draws it
            x = x + step_noise(x, generator, x.dtype) * s_noise * up
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)
