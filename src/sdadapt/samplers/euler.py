"""Euler on σ (diffusers' ``EulerDiscreteScheduler``, k-diffusion's ``sample_euler``; kohya's
``euler``/``k_euler``, A1111's "Euler") and its ancestral form (``EulerAncestralDiscreteScheduler``,
``sample_euler_ancestral``; kohya's ``euler_a``/``k_euler_a``, A1111's "Euler a").

Both integrate ``dx/dσ = (x − x̂0(x, σ))/σ`` down the σ grid of :func:`.sigma_space.discrete_sigmas`
with one model call per step. The ancestral one steps to σ_down and adds fresh noise·σ_up, so
each step lands at σ_next with the marginal variance of the forward process.

``x`` is carried in at least float32 between steps (diffusers upcasts for the update too); the
model sees it in the caller's dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .churn import SigmaChurn, check_churn, churned, churned_timestep
from .sigma_space import (
    ancestral_step,
    discrete_start,
    sigma_slope,
    step_noise,
    timestep_batch,
)
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from .schedules import ScheduleOptions

__all__ = ["euler_ancestral_sample", "euler_sample"]


def _run(name: str, model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int, prediction_type: str,
         generator: torch.Generator | None, callback: StepCallback | None, karras: bool, spacing: str,
         steps_offset: int, ancestral: bool, schedule: str | None = None,
         schedule_options: ScheduleOptions | None = None,
         discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None, eta: float = 1.0,
         churn: SigmaChurn | None = None) -> Tensor:
    """Both Euler samplers; ``ancestral`` steps to σ_down and adds noise·σ_up after each step's model call;
    ``churn`` (Euler on A1111's grids): :mod:`.churn` before each step."""
    if eta < 0:
        raise ValueError(f"{name}: eta must be >= 0, got {eta}")
    churning = check_churn(name, churn, schedule)
    times, grid, x = discrete_start(name, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                                    prediction_type=prediction_type, spacing=spacing, steps_offset=steps_offset,
                                    karras=karras, schedule=schedule, schedule_options=schedule_options,
                                    discard_next_to_last_sigma=discard_next_to_last_sigma, start=start)
    for i in range(len(times)):
        s, s_next = grid[i], grid[i + 1]
        t = timestep_batch(times[i], x)
        if churning:  # (k-diffusion: from σ̂, the model at t(σ̂))
            x, s, moved = churned(x, s, len(times), churn, generator)
            t = churned_timestep(s, alphas_cumprod, x_T, schedule, x) if moved else t
        d = sigma_slope(model, x, s, t, prediction_type=prediction_type, dtype=x_T.dtype)
        if ancestral:
            down, up = ancestral_step(s, s_next, eta, dtype=x.dtype)
            x = x + d * (down - s) + step_noise(x, generator, x.dtype if schedule is not None else x_T.dtype) * up
        else:
            x = x + d * (s_next - s)
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)


def euler_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                 prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                 callback: StepCallback | None = None, karras: bool = False, spacing: str = "linspace",
                 steps_offset: int = 0, schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
                 discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None,
                 churn: SigmaChurn | None = None) -> Tensor:
    """Euler from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W), step for step diffusers'
    ``EulerDiscreteScheduler`` (``timestep_spacing=spacing``, ``steps_offset``, ``use_karras_sigmas=karras``).

    ``x ← x_T·init_noise_sigma``; per step i: ``out = model(x/√(σ_i²+1), t_i)``, ``d = (x − x̂0)/σ_i``,
    ``x ← x + d·(σ_{i+1} − σ_i)``, with σ_n = 0 (the last step lands on x̂0). ``churn``: A1111's "Sigma churn"
    settings (:mod:`.churn`; with a ``schedule``; its noise drawn from ``generator`` on every step). ``model`` gets
    float32 timesteps t (B,), fractional for the linspace spacing and Karras σ, as diffusers passes
    them. ``alphas_cumprod`` (T,): the training schedule. ``generator``: unused (no noise).
    ``callback(i, t, x)`` sees each step's sample. ``schedule``: one of A1111's σ grids instead
    (:mod:`.schedules`; not ``automatic``, which :func:`sdadapt.samplers.sample_latents` resolves).

    Raises:
        ValueError: an unknown prediction type, spacing or schedule, ``num_steps`` outside [1, T]; ``churn``
            without a schedule.
    """
    return _run("euler", model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                prediction_type=prediction_type, generator=generator if churn is not None else None,
                callback=callback, karras=karras, spacing=spacing,
                steps_offset=steps_offset, ancestral=False, schedule=schedule, schedule_options=schedule_options,
                discard_next_to_last_sigma=discard_next_to_last_sigma, start=start, churn=churn)


def euler_ancestral_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                           prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                           callback: StepCallback | None = None, spacing: str = "linspace",
                           steps_offset: int = 0, schedule: str | None = None,
                           schedule_options: ScheduleOptions | None = None,
                           discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None,
                           eta: float = 1.0) -> Tensor:
    """Euler ancestral from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W), step for step diffusers'
    ``EulerAncestralDiscreteScheduler`` (it has no Karras σ).

    Per step i: ``(σ_down, σ_up)`` of σ_i → σ_{i+1} (:func:`.sigma_space.ancestral_step`),
    ``x ← x + d·(σ_down − σ_i) + σ_up·z`` with ``z`` drawn from ``generator`` after the model call
    of every step, the last (σ_up = 0) included, as diffusers draws it; so a seeded CPU generator
    gives diffusers' numbers. Other arguments as :func:`euler_sample` (``schedule`` too: the class has
    no Karras σ, A1111's "Euler a" runs on any schedule). ``eta``: the ancestral η (k-diffusion's
    ``sample_euler_ancestral(eta=)``, A1111's "Eta for ancestral samplers"; 1: diffusers' class; 0: plain Euler's
    σ_down with the noise still drawn, times 0, as k-diffusion).

    Raises:
        ValueError: an unknown prediction type or spacing, ``num_steps`` outside [1, T], a negative ``eta``.
    """
    return _run("euler_a", model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                prediction_type=prediction_type, generator=generator, callback=callback, karras=False,
                spacing=spacing, steps_offset=steps_offset, ancestral=True, schedule=schedule,
                schedule_options=schedule_options,
                discard_next_to_last_sigma=discard_next_to_last_sigma, start=start, eta=eta)
