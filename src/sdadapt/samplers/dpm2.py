"""DPM-Solver-2 in k-diffusion's form (diffusers' ``KDPM2DiscreteScheduler``, ``sample_dpm_2``;
kohya's ``dpm_2``/``k_dpm_2``, A1111's "DPM2") and its ancestral form
(``KDPM2AncestralDiscreteScheduler``, ``sample_dpm_2_ancestral``; ``dpm_2_a``/``k_dpm_2_a``, "DPM2 a").

Each step evaluates the model at σ_i, takes an Euler half step to the log-midpoint
``σ_mid = √(σ_i·σ_target)`` and steps the whole way from σ_i with the derivative there: two model
calls, except the last step (onto σ = 0), a plain Euler step onto x̂0. At the midpoint the model
gets diffusers' interpolated timestep ``t(σ_mid)`` (fractional, by :func:`.sigma_space.sigma_to_t`);
with Karras σ the main timesteps are rounded to whole steps, as diffusers rounds them.

On one of A1111's grids (``schedule``) both run as A1111 runs k-diffusion's ``sample_dpm_2`` /
``sample_dpm_2_ancestral`` (k_diffusion/sampling.py:188-244 at 4601bf0): every timestep the unrounded ``t(σ)``,
``σ_mid = exp(lerp(log σ_i, log σ_target, ½))`` and the ancestral step in the work dtype (float32 latents: A1111's
float32 table and arithmetic, :mod:`.sigma_space`, bit for bit; float64: the same in float64).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .churn import SigmaChurn, check_churn, churned, churned_timestep
from .sigma_space import (
    ancestral_step,
    discrete_start,
    grid_table,
    sigma_slope,
    sigma_to_t,
    step_noise,
    timestep_batch,
    training_sigmas,
)
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from .schedules import ScheduleOptions

__all__ = ["dpm2_ancestral_sample", "dpm2_sample"]

def _run(name: str, model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int, prediction_type: str,
         generator: torch.Generator | None, callback: StepCallback | None, karras: bool, spacing: str, steps_offset: int,
         ancestral: bool, schedule: str | None = None,
         schedule_options: ScheduleOptions | None = None, discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None,
         eta: float = 1.0, churn: SigmaChurn | None = None) -> Tensor:
    """Both DPM2 samplers; ``ancestral`` steps to σ_down and adds noise·σ_up after each two-call step; ``churn``
    (DPM2 on A1111's grids): :mod:`.churn` before each step, the midpoint then between σ̂ and σ_{i+1}."""
    if eta < 0:
        raise ValueError(f"{name}: eta must be >= 0, got {eta}")
    churning = check_churn(name, churn, schedule)
    times, grid, x = discrete_start(name, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                                    prediction_type=prediction_type, spacing=spacing, steps_offset=steps_offset,
                                    karras=karras, round_karras_timesteps=schedule is None, schedule=schedule,
                                    schedule_options=schedule_options,
                                    discard_next_to_last_sigma=discard_next_to_last_sigma, start=start)
    # per step: the σ the whole step reaches (σ_down when ancestral), the noise scale, the midpoint
    work = x.dtype  # (A1111's grid: k-diffusion's arithmetic in it; diffusers' grid: float64 σ)
    targets, ups = [], []
    for i in range(len(times)):
        down, up = (ancestral_step(grid[i], grid[i + 1], eta, dtype=work if schedule is not None else torch.float64)
                    if ancestral else (grid[i + 1], 0.0))
        targets.append(down)
        ups.append(up)
    if schedule is not None:  # k-diffusion: sigma.log().lerp(target.log(), 0.5).exp(), t(σ_mid) on A1111's table
        mid_sigmas = torch.tensor(grid[:-1], dtype=work).log().lerp(
            torch.tensor(targets, dtype=work).clamp_min(torch.finfo(work).tiny).log(), 0.5).exp()
        mid_times = sigma_to_t(mid_sigmas, grid_table(alphas_cumprod, x_T, schedule)).tolist()
        mids = mid_sigmas.tolist()
    else:
        mids = [(s * target) ** 0.5 for s, target in zip(grid[:-1], targets)]
        mid_times = sigma_to_t(torch.tensor(mids, dtype=torch.float64), training_sigmas(alphas_cumprod)).tolist()

    def slope(x: Tensor, s: float, t: Tensor) -> Tensor:
        return sigma_slope(model, x, s, t, prediction_type=prediction_type, dtype=x_T.dtype)

    for i in range(len(times)):
        s, target, mid = grid[i], targets[i], mids[i]
        t = timestep_batch(times[i], x)
        mid_t = mid_times[i]
        if churning:  # (k-diffusion: from σ̂, the model at t(σ̂), the log-midpoint of σ̂ and σ_{i+1})
            x, s, moved = churned(x, s, len(times), churn, generator)
            if moved:
                t = churned_timestep(s, alphas_cumprod, x_T, schedule, x)
                mid_sigma = torch.tensor(s, dtype=work).log().lerp(torch.tensor(target, dtype=work).clamp_min(
                    torch.finfo(work).tiny).log(), 0.5).exp()
                mid, mid_t = float(mid_sigma), float(churned_timestep(float(mid_sigma), alphas_cumprod, x_T, schedule,
                                                                      x)[0])
        d = slope(x, s, t)
        if target == 0:  # the last step: Euler onto x̂0, no noise (k-diffusion: σ_next / σ_down = 0)
            x = x + d * (target - s)
        else:
            x_mid = x + d * (mid - s)
            x = x + slope(x_mid, mid, timestep_batch(mid_t, x)) * (target - s)
            if ancestral:
                x = x + step_noise(x, generator, work if schedule is not None else x_T.dtype) * ups[i]
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)


def dpm2_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                callback: StepCallback | None = None, karras: bool = False, spacing: str = "linspace",
                steps_offset: int = 0, schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
                discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None,
                churn: SigmaChurn | None = None) -> Tensor:
    """DPM2 from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W), step for step diffusers'
    ``KDPM2DiscreteScheduler`` (``timestep_spacing=spacing``, ``steps_offset``, ``use_karras_sigmas=karras``).

    Per step i < n−1: ``d = (x − x̂0(x, σ_i))/σ_i``, ``x' = x + d·(σ_mid − σ_i)`` with
    ``σ_mid = √(σ_i σ_{i+1})``, ``x ← x + d'·(σ_{i+1} − σ_i)`` with
    ``d' = (x' − x̂0(x', σ_mid))/σ_mid``;
    the last step is Euler onto x̂0 (``2·num_steps − 1`` model calls). ``generator``: unused but by ``churn``
    (A1111's "Sigma churn" settings, :mod:`.churn`, with a ``schedule``: the step from σ̂).
    ``callback(i, t, x)`` sees each step's sample. Other arguments as :func:`.euler.euler_sample`
    (``schedule`` too: timesteps rounded as with Karras σ; a last σ above 0, ``kl_optimal``'s, gets a DPM2
    step, as in k-diffusion; ``discard_next_to_last_sigma`` with it: A1111's option of that name, which A1111
    sets for DPM2 and DPM2 a, :func:`.schedules.schedule_sigmas`).

    Raises:
        ValueError: an unknown prediction type or spacing, ``num_steps`` outside [1, T].
    """
    return _run("dpm_2", model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                prediction_type=prediction_type, generator=generator if churn is not None else None,
                callback=callback, karras=karras, spacing=spacing,
                steps_offset=steps_offset, ancestral=False, schedule=schedule, schedule_options=schedule_options,
                discard_next_to_last_sigma=discard_next_to_last_sigma, start=start, churn=churn)


def dpm2_ancestral_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                          prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                          callback: StepCallback | None = None, karras: bool = False, spacing: str = "linspace",
                          steps_offset: int = 0, schedule: str | None = None,
                          schedule_options: ScheduleOptions | None = None,
                          discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None,
                          eta: float = 1.0) -> Tensor:
    """DPM2 ancestral from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W), step for step diffusers'
    ``KDPM2AncestralDiscreteScheduler``.

    As :func:`dpm2_sample`, but each step aims at σ_down of σ_i → σ_{i+1}
    (:func:`.sigma_space.ancestral_step`; midpoint ``√(σ_i σ_down)``) and then adds σ_up·z, ``z``
    drawn from ``generator`` after the step's second model call (n − 1 draws; none on the last,
    Euler step), as diffusers draws it. ``eta``: the ancestral η (k-diffusion's ``sample_dpm_2_ancestral(eta=)``,
    A1111's "Eta for ancestral samplers"; 1: diffusers' class).

    Raises:
        ValueError: an unknown prediction type or spacing, ``num_steps`` outside [1, T], a negative ``eta``.
    """
    return _run("dpm_2_a", model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                prediction_type=prediction_type, generator=generator, callback=callback, karras=karras,
                spacing=spacing, steps_offset=steps_offset, ancestral=True, schedule=schedule,
                schedule_options=schedule_options,
                discard_next_to_last_sigma=discard_next_to_last_sigma, start=start, eta=eta)
