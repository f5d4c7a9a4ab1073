"""The latent-consistency sampler (Luo et al. 2023), as diffusers' ``LCMScheduler`` runs it with its
defaults: for LCM-distilled models and LCM-LoRA (A1111's "LCM").

A consistency model maps a noisy sample straight to x̂0. Each step reads the model's output as x̂0
(ε, v or sample prediction at the VP sample ``x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε``), applies the
boundary-condition scalings of timestep t (``timestep_scaling = 10``, ``σ_data = 0.5``):
``c_skip = σ_data²/((10t)² + σ_data²)``, ``c_out = 10t/√((10t)² + σ_data²)``,
``denoised = c_out·x̂0 + c_skip·x_t``, and then re-noises to the next timestep:
``x_next = √ᾱ_next·denoised + √(1−ᾱ_next)·z`` with unit noise z, except after the last step,
which returns ``denoised``.

The timesteps are LCM's own: the distillation schedule ``k·(1..50) − 1`` with ``k = T // 50``
(``original_inference_steps = 50``), reversed, and ``num_steps`` of them at evenly spaced indices
(``floor(linspace(0, 50, num_steps, endpoint=False))``): 999, 759, 499, 259 for 4 steps. So
``num_steps`` runs from 1 to 50. The model sees the sample unscaled (``init_noise_sigma`` = 1).
A zero-terminal-SNR schedule (ᾱ_999 = 0) is used as it is, as ``LCMScheduler`` does: with ε
prediction the first step's x̂0 = (x − ε̂)/√ᾱ is NaN there, as in diffusers; v prediction is finite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import math

import torch
from torch import Tensor

from .sigma_space import check_prediction_type, step_noise, vp_data_prediction
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart

__all__ = ["LCM_ORIGINAL_STEPS", "LCM_TIMESTEP_SCALING", "lcm_boundary_scalings", "lcm_sample", "lcm_timesteps"]


#: diffusers' ``LCMScheduler`` defaults: the distillation schedule's step count and the boundary scaling
LCM_ORIGINAL_STEPS = 50
LCM_TIMESTEP_SCALING = 10.0
_SIGMA_DATA = 0.5


def lcm_timesteps(num_train_steps: int, num_steps: int, *, original_steps: int = LCM_ORIGINAL_STEPS) -> list[int]:
    """LCM's descending timesteps (``num_steps`` ints) on a ``num_train_steps`` schedule (diffusers'
    ``LCMScheduler.set_timesteps`` with ``strength = 1``).

    Raises:
        ValueError: ``num_steps`` outside [1, original_steps], or ``original_steps`` outside [1, T].
    """
    T, n, orig = int(num_train_steps), int(num_steps), int(original_steps)
    if not 1 <= orig <= T:
        raise ValueError(f"lcm: original_inference_steps must be in [1, {T}] (the model's training steps), got {orig}")
    if not 1 <= n <= orig:
        raise ValueError(f"lcm: num_steps must be in [1, {orig}] (LCM's steps are a subset of its "
                         f"{orig}-step distillation schedule), got {num_steps}")
    k = T // orig
    origin = [(j + 1) * k - 1 for j in range(orig)][::-1]
    # numpy's linspace(0, orig, n, endpoint=False) floored: index i·(orig/n)
    return [origin[math.floor(i * (orig / n))] for i in range(n)]


def lcm_boundary_scalings(timestep: int, *, timestep_scaling: float = LCM_TIMESTEP_SCALING) -> tuple[float, float]:
    """``(c_skip, c_out)`` of the consistency model's boundary condition at ``timestep``:
    ``c_skip = σ_data²/(s² + σ_data²)``, ``c_out = s/√(s² + σ_data²)``, ``s = timestep_scaling·t``,
    ``σ_data = 0.5`` (diffusers' ``get_scalings_for_boundary_condition_discrete``)."""
    s = float(timestep) * timestep_scaling
    return _SIGMA_DATA**2 / (s * s + _SIGMA_DATA**2), s / (s * s + _SIGMA_DATA**2) ** 0.5


def lcm_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
               prediction_type: str = "epsilon", generator: torch.Generator | None = None,
               callback: StepCallback | None = None, start: Img2ImgStart | None = None) -> Tensor:
    """Latent-consistency sampling (diffusers' ``LCMScheduler`` defaults) from unit noise x_T
    (B,C,H,W) -> x0 latents (B,C,H,W).

    ``model(x_t, t)``: the (guided) model at the VP sample x_t (B,C,H,W) and int64 timesteps t (B,);
    ``alphas_cumprod`` (T,): the training ᾱ; ``generator``: the noise injected between steps, drawn in
    the sample's dtype on the generator's device after each model call but the last, as diffusers'
    ``step`` draws it; ``callback(i, t, x)`` after each step. For LCM models and LCM-LoRA, which
    sample in 2–8 steps with guidance 1–2 (classifier-free guidance is the caller's, as given). ``start``: img2img
    as ``StableDiffusionImg2ImgPipeline`` runs an ``LCMScheduler`` (:func:`sdadapt.img2img.vp_timestep_start`:
    the timesteps of ``num_steps`` from ``t_start`` on; not ``LatentConsistencyModelImg2ImgPipeline``, whose
    ``set_timesteps(strength=)`` picks other timesteps).

    Raises:
        ValueError: an unknown prediction type, ``num_steps`` outside [1, 50], a schedule shorter than
        50 steps.
    """
    check_prediction_type("lcm", prediction_type)
    ac = alphas_cumprod.detach().double().cpu()
    timesteps = lcm_timesteps(int(ac.shape[0]), num_steps)
    x = x_T * 1.0  # init_noise_sigma
    n = len(timesteps)
    first = 0
    if start is not None:  # img2img: diffusers' timesteps[t_start:] (set_begin_index) and add_noise
        from ..img2img import vp_timestep_start

        first, x = vp_timestep_start(start, x_T, timesteps, alphas_cumprod)
    for i, step in enumerate(timesteps):
        if i < first:
            continue
        t = torch.full((x.shape[0],), step, dtype=torch.long, device=x.device)
        out = model(x, t)
        abar = float(ac[step])
        c_skip, c_out = lcm_boundary_scalings(step)
        denoised = c_out * vp_data_prediction(out, x, abar**0.5, (1 - abar) ** 0.5, prediction_type) + c_skip * x
        if i < n - 1:
            abar_next = float(ac[timesteps[i + 1]])
            noise = step_noise(denoised, generator)
            x = abar_next**0.5 * denoised + (1 - abar_next) ** 0.5 * noise
        else:
            x = denoised
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)
