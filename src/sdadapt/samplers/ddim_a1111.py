"""A1111's own DDIM (its timesteps sampler, v1.6+: ``modules/sd_samplers_timesteps.py`` and
``sd_samplers_timesteps_impl.ddim``): ``ddim`` with a ``schedule`` (``"automatic"``, the only one DDIM takes) in
:func:`sdadapt.samplers.sample_latents` and ``generate`` — as ``lcm`` with a schedule is A1111's LCM. Without one
``ddim`` is diffusers' ``DDIMScheduler`` (another timestep grid and last step).

A1111's run of ``n`` steps on a model of ``T`` training steps: timesteps ``range(0, T, T // n) + 1`` clipped to
``T − 1`` (``n + 1`` of them with "Always discard next-to-last sigma"), the sample starting at the unit noise itself,
and ``len − 1`` model calls from the last timestep down to the second (the first is only the last step's
``ᾱ_prev``), each in float32 with the ᾱ of the float32 table::

    x̂0 = (x − √(1−ᾱ_t)·ε̂)/√ᾱ_t,   x ← √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ_t²)·ε̂ + σ_t·z

``σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev))`` in float64 as A1111's numpy / torch mix computes it ("Eta DDIM",
default 0), and ``z`` drawn on every step, also at η = 0 (A1111's ``randn_like``). The guided model's output is ε
(A1111's ``CFGDenoiserTimesteps`` combines the ε outputs; a v-prediction model's v is read as ε at the call's
timestep: ``√ᾱ·v + √(1−ᾱ)·x``, its ``CompVisTimestepsVDenoiser``). img2img (``sample_img2img``): ``t_enc`` from
A1111's rule, the init latent noised to ``timesteps[t_enc]`` (``√ᾱ·init + √(1−ᾱ)·noise``) and the run over
``timesteps[:t_enc]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..denoised_branches import ReadDenoised, denoised_of
from .sigma_space import check_prediction_type, step_noise
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart

__all__ = ["a1111_ddim_sample", "a1111_ddim_timesteps"]


def _as_eps(prediction_type: str, x: Tensor, a_t: Tensor, sqrt_one_minus_at: Tensor) -> ReadDenoised:
    """One branch's output as ε at the sample ``x`` (B,C,H,W): itself, or a v's ``√ᾱ·v + √(1−ᾱ)·x``."""
    if prediction_type == "epsilon":
        return lambda out: out.to(x.dtype)
    return lambda v: a_t.sqrt() * v + sqrt_one_minus_at * x


def a1111_ddim_timesteps(num_steps: int, num_train_steps: int = 1000) -> Tensor:
    """A1111's DDIM timesteps (``get_timesteps``): ``range(0, T, T // n) + 1`` clipped to ``T − 1``, int64 (rising).

    Raises:
        ValueError: ``num_steps`` outside [1, T].
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"A1111's DDIM: steps must be in [1, {num_train_steps}], got {num_steps}")
    return (torch.arange(0, num_train_steps, num_train_steps // num_steps) + 1).clamp(0, num_train_steps - 1)


def a1111_ddim_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                      prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                      callback: StepCallback | None = None, eta: float = 0.0,
                      discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None) -> Tensor:
    """A1111's DDIM from unit noise ``x_T`` (B,C,H,W) -> latents (B,C,H,W) (the module's steps). ``model(x, t)``: the
    (guided) model at the sample and the timesteps t (B,) float32 of integer values, as A1111 passes them (each
    branch's ε apart where it offers ``denoised_by_branch``, :mod:`sdadapt.denoised_branches`: a v model's CFG then is
    A1111's bit for bit; the call's "σ" is the timesteps, as A1111 hands its CFGDenoiser);
    ``alphas_cumprod`` (T,) (held in float32, as A1111's buffer); ``generator``: the per-step noise (an
    :class:`~.a1111_noise.A1111Noise`: A1111's ``randn_like``); ``eta``: A1111's "Eta DDIM"; ``callback(i, t, x)``
    after each step; ``discard_next_to_last_sigma``: A1111's setting (one more timestep); ``start``: img2img by
    A1111's rule.

    Raises:
        ValueError: an unknown prediction type, a step count outside [1, T], a negative ``eta``.
    """
    check_prediction_type("ddim", prediction_type)
    if prediction_type == "sample":
        raise ValueError("A1111's DDIM reads ε or v; for a sample-prediction model use ddim (diffusers' "
                         "DDIMScheduler)")
    if eta < 0:
        raise ValueError(f"A1111's DDIM: eta must be >= 0, got {eta}")
    ac = alphas_cumprod.detach().float().cpu()  # (A1111's alphas_cumprod buffer: float32)
    steps = num_steps + (1 if discard_next_to_last_sigma else 0)
    timesteps = a1111_ddim_timesteps(steps, int(ac.shape[0]))
    work = torch.promote_types(x_T.dtype, torch.float32)
    x = x_T.to(work)
    if start is not None:  # sample_img2img: noised to timesteps[t_enc], the run over timesteps[:t_enc]
        from ..img2img import start_index

        t_enc = steps - 1 - start_index(start, steps, rule="a1111")
        a = ac[timesteps[min(t_enc, len(timesteps) - 1)]]
        x = start.init_like(x_T).to(work) * a.sqrt() + x * (1 - a).sqrt()
        timesteps = timesteps[:t_enc]
    alphas = ac[timesteps]
    alphas_prev = ac[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].double()
    sqrt_one_minus = (1 - alphas).sqrt()
    # A1111's numpy/torch mix, its rounding: numpy / tensor is torch's reciprocal() * other; numpy's sqrt
    product = (1 - alphas).reciprocal() * (1 - alphas_prev) * (1 - alphas.double() / alphas_prev)
    sigmas = eta * torch.from_numpy(np.sqrt(product.numpy()))
    ones = torch.ones(x.shape[0], 1, 1, 1, dtype=work, device=x.device)  # (A1111's s_x)
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        t = torch.full((x.shape[0],), float(timesteps[index]), dtype=torch.float32, device=x.device)
        a_t = alphas[index].item() * ones
        a_prev = alphas_prev[index].item() * ones
        sigma_t = sigmas[index].item() * ones
        sqrt_one_minus_at = sqrt_one_minus[index].item() * ones
        # each branch's ε (a v model's read as CompVisTimestepsVDenoiser reads it), guided on ε; A1111 hands its
        # CFGDenoiser the timesteps as "sigma" (its NGMS compares them)
        e_t = denoised_of(model, _as_eps(prediction_type, x, a_t, sqrt_one_minus_at), x.to(x_T.dtype), t, sigma=t)
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
        noise = sigma_t * step_noise(x, generator, work)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)
