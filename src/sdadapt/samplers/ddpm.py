"""Ancestral DDPM sampling (Ho et al. 2020): diffusers' ``DDPMScheduler`` with its defaults
(``variance_type="fixed_small"``, ``clip_sample=True`` to [-1, 1], ``timestep_spacing="leading"``,
``steps_offset=0``), kohya's ``ddpm`` (its sample loop assigns ``pipeline.scheduler`` on the built pipeline,
``library/train_util.py``). Not what diffusers' SD1/SD2 pipelines run when the scheduler is handed to their
constructor: ``StableDiffusion(Img2Img|Inpaint)Pipeline.__init__`` rewrites ``steps_offset`` to 1 (timesteps 801,
..., 1 for 5 steps; the first two also ``clip_sample`` to False) — assigned after construction, the inpaint pipeline
gives these latents (docs/samplers.md, tests/test_generate_posterior.py).

Each step samples the posterior ``q(x_{t'} | x_t, x̂0)`` between consecutive inference timesteps
``t > t'`` (``t' = −1`` at the end, where ᾱ = 1):
``x_{t'} = √ᾱ_{t'}·β/(1−ᾱ_t)·x̂0 + √(ᾱ_t/ᾱ_{t'})·(1−ᾱ_{t'})/(1−ᾱ_t)·x_t + σ·z`` with
``β = 1 − ᾱ_t/ᾱ_{t'}``, ``σ² = (1−ᾱ_{t'})/(1−ᾱ_t)·β`` and no noise at t = 0.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..training import diffusion
from .sigma_space import check_prediction_type, step_noise, timestep_batch, work_dtype
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart

__all__ = ["ddpm_sample"]


def ddpm_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                callback: StepCallback | None = None, start: Img2ImgStart | None = None) -> Tensor:
    """DDPM from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W), as diffusers' ``DDPMScheduler``
    (defaults) steps it; ``model(x, t)`` at integer timesteps t (B,) int64 (no input scaling).

    ``alphas_cumprod`` (T,): the training schedule; x̂0 is clamped to [-1, 1] (diffusers'
    default ``clip_sample=True``, which kohya also forces). ``generator``: each step's noise
    z (B,C,H,W), drawn as diffusers' ``randn_tensor`` draws it (on the generator's device, in the
    model output's dtype, then moved), so a CPU generator with diffusers' seed gives its result.
    ``callback(i, t, x)`` sees each step's sample. ``x`` is carried in at least float32 between
    steps; the model sees it in ``x_T``'s dtype. ``start``: img2img (:func:`sdadapt.img2img.vp_timestep_start`:
    diffusers' ``get_timesteps`` and ``add_noise``).

    Raises:
        ValueError: an unknown prediction type, ``num_steps`` outside [1, T].
    """
    check_prediction_type("ddpm", prediction_type)
    T = alphas_cumprod.shape[0]
    steps = diffusion.ddim_timesteps(num_steps, num_train_steps=T, spacing="leading", steps_offset=0).tolist()
    ac = alphas_cumprod.detach().double().cpu().tolist()
    ac_model = alphas_cumprod.detach().to(x_T.device)
    x = x_T.to(work_dtype(x_T))  # init_noise_sigma = 1
    first = 0
    if start is not None:  # img2img: diffusers' timesteps[t_start:], x = √ᾱ·init + √(1 − ᾱ)·noise
        from ..img2img import vp_timestep_start

        first, x = vp_timestep_start(start, x_T, steps, alphas_cumprod)
        x = x.to(work_dtype(x_T))
    for i, t in enumerate(steps):
        if i < first:
            continue
        t_prev = steps[i + 1] if i + 1 < len(steps) else -1
        a, a_prev = ac[t], (ac[t_prev] if t_prev >= 0 else 1.0)
        beta = 1 - a / a_prev
        tt = timestep_batch(t, x, torch.long)
        out = model(x.to(x_T.dtype), tt)
        x0 = diffusion.predicted_x0(prediction_type, x, out, tt, ac_model).to(x.dtype).clamp(-1.0, 1.0)
        x_next = x0 * (a_prev**0.5 * beta / (1 - a)) + x * ((1 - beta) ** 0.5 * (1 - a_prev) / (1 - a))
        if t > 0:  # fixed_small: the posterior's own variance, floored at 1e-20 as diffusers does
            x_next = x_next + step_noise(out, generator) * max((1 - a_prev) / (1 - a) * beta, 1e-20) ** 0.5
        x = x_next
        if callback is not None:
            callback(i, tt, x)
    return x.to(x_T.dtype)
