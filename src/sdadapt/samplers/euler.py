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

from collections.abc import Callable

import torch
from torch import Tensor

from .sigma_space import (
    ancestral_step,
    check_prediction_type,
    denoised,
    discrete_sigmas,
    initial_noise_sigma,
    model_input,
    step_noise,
    timestep_batch,
)

__all__ = ["euler_ancestral_sample", "euler_sample"]

#: ``model(x_in, t) -> output`` over x_in (B,C,H,W) at timesteps t (B,), already guided
Denoise = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, Tensor, Tensor], None]


def euler_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                 prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                 callback: Callback | None = None, karras: bool = False, spacing: str = "linspace",
                 steps_offset: int = 0) -> Tensor:
    """Euler from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W), step for step diffusers'
    ``EulerDiscreteScheduler`` (``timestep_spacing=spacing``, ``steps_offset``, ``use_karras_sigmas=karras``).

    ``x ← x_T·init_noise_sigma``; per step i: ``out = model(x/√(σ_i²+1), t_i)``, ``d = (x − x̂0)/σ_i``,
    ``x ← x + d·(σ_{i+1} − σ_i)``, with σ_n = 0 (the last step lands on x̂0). ``model`` gets
    float32 timesteps t (B,), fractional for the linspace spacing and Karras σ, as diffusers passes
    them. ``alphas_cumprod`` (T,): the training schedule. ``generator``: unused (no noise).
    ``callback(i, t, x)`` sees each step's sample.

    Raises:
        ValueError: an unknown prediction type or spacing, ``num_steps`` outside [1, T].
    """
    del generator
    check_prediction_type("euler", prediction_type)
    timesteps, sigmas = discrete_sigmas(alphas_cumprod, num_steps, spacing=spacing, steps_offset=steps_offset,
                                        karras=karras)
    times, grid = timesteps.tolist(), sigmas.tolist()
    x = x_T.to(torch.promote_types(x_T.dtype, torch.float32)) * initial_noise_sigma(sigmas, spacing)
    for i in range(num_steps):
        s, s_next = grid[i], grid[i + 1]
        t = timestep_batch(times[i], x)
        out = model(model_input(x, s, x_T.dtype), t)
        x = x + (x - denoised(out, x, s, prediction_type)) * ((s_next - s) / s)
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)


def euler_ancestral_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                           prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                           callback: Callback | None = None, spacing: str = "linspace",
                           steps_offset: int = 0) -> Tensor:
    """Euler ancestral from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W), step for step diffusers'
    ``EulerAncestralDiscreteScheduler`` (it has no Karras σ).

    Per step i: ``(σ_down, σ_up)`` of σ_i → σ_{i+1} (:func:`.sigma_space.ancestral_step`),
    ``x ← x + d·(σ_down − σ_i) + σ_up·z`` with ``z`` drawn from ``generator`` after the model call
    of every step, the last (σ_up = 0) included, as diffusers draws it; so a seeded CPU generator
    gives diffusers' numbers. Other arguments as :func:`euler_sample`.

    Raises:
        ValueError: an unknown prediction type or spacing, ``num_steps`` outside [1, T].
    """
    check_prediction_type("euler_a", prediction_type)
    timesteps, sigmas = discrete_sigmas(alphas_cumprod, num_steps, spacing=spacing, steps_offset=steps_offset)
    times, grid = timesteps.tolist(), sigmas.tolist()
    x = x_T.to(torch.promote_types(x_T.dtype, torch.float32)) * initial_noise_sigma(sigmas, spacing)
    for i in range(num_steps):
        s, s_next = grid[i], grid[i + 1]
        t = timestep_batch(times[i], x)
        out = model(model_input(x, s, x_T.dtype), t)
        down, up = ancestral_step(s, s_next)
        x = x + (x - denoised(out, x, s, prediction_type)) * ((down - s) / s)
        x = x + step_noise(x, generator, x_T.dtype) * up
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)
