"""Pseudo numerical methods (Liu et al. 2022, "PNDM"): diffusers' ``PNDMScheduler`` with its
defaults (``skip_prk_steps=False``, ``set_alpha_to_one=False``, ``timestep_spacing="leading"``,
``steps_offset=0``), kohya's ``pndm``.

Both phases move along the DDIM transfer ``φ(x_t, ε, t → t')`` (the deterministic DDIM step):
first three pseudo Runge–Kutta steps (4 model calls each, two at the half step), then pseudo
linear multistep steps that extrapolate ε from the last four with the Adams–Bashforth weights
``(55, −59, 37, −9)/24``. With ``n`` steps the model runs ``n + 9`` times.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..training import diffusion
from .sigma_space import timestep_batch, work_dtype
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart

__all__ = ["pndm_sample", "pndm_timesteps"]


def pndm_timesteps(num_steps: int, num_train_steps: int = 1000) -> tuple[list[int], list[int]]:
    """diffusers' ``PNDMScheduler.set_timesteps`` (leading spacing, offset 0, with PRK steps):
    ``(prk, plms)`` model timesteps, both descending.

    On the grid ``g_i = i·r`` (``r = T//n``, i < n), ``prk`` (12) holds three Runge–Kutta steps
    ``g → g − r`` over the four largest grid points, each as ``g, g−r+h, g−r+h, g−r`` with
    ``h = r//2`` (the half step rounds as diffusers rounds it); ``plms`` the other ``n − 3``
    grid points. ``num_steps`` must be at least 4 (diffusers' scheduler fails below that).
    """
    T = num_train_steps
    if not 4 <= num_steps <= T:
        raise ValueError(f"pndm: num_steps must be in [4, {T}] (its Runge-Kutta warm-up takes 3 steps, "
                         f"and diffusers' PNDMScheduler fails below 4), got {num_steps}")
    ratio = T // num_steps
    grid = diffusion.ddim_timesteps(num_steps, num_train_steps=T, spacing="leading", steps_offset=0).flip(0).tolist()
    pairs = [v for g in grid[-4:] for v in (g, g + ratio // 2)][:-1]
    prk = [v for v in pairs for _ in range(2)][1:-1][::-1]
    return prk, grid[:-3][::-1]


def pndm_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                callback: StepCallback | None = None, start: Img2ImgStart | None = None) -> Tensor:
    """PNDM from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W), as diffusers' ``PNDMScheduler``
    (defaults) steps it; ``model(x, t)`` at integer timesteps t (B,) int64 (no input scaling).

    ``alphas_cumprod`` (T,): the training schedule (the last step goes to ᾱ_0,
    ``set_alpha_to_one=False``); ``prediction_type``: ``"epsilon"`` or ``"v_prediction"``. Like
    diffusers, the steps mix the raw model outputs and read the mix as ε at the step's start
    (x_t, t): for ε that is the method; for v it reads each v at (x_t, t) rather than where it was
    evaluated (diffusers' behaviour, kept so the images match). ``generator`` is unused (no
    noise). ``callback(i, t, x)`` sees the sample after each of the ``n + 9`` model calls (i
    counts calls, t is that call's timestep, as a loop over diffusers' ``timesteps`` sees them).
    ``x`` is carried in at least float32 between steps; the model sees it in ``x_T``'s dtype. ``start``: img2img as
    ``StableDiffusionImg2ImgPipeline`` runs this scheduler (:func:`_pndm_img2img`).

    Raises:
        ValueError: ``num_steps`` outside [4, T]; a prediction type other than ε or v.
    """
    del generator
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"pndm: prediction_type must be 'epsilon' or 'v_prediction' (as diffusers' "
                         f"PNDMScheduler), got {prediction_type!r}")
    T = alphas_cumprod.shape[0]
    prk, plms = pndm_timesteps(num_steps, T)
    if start is not None:
        return _pndm_img2img(model, x_T, start, prk, plms, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                             prediction_type=prediction_type, callback=callback)
    ratio = T // num_steps
    half = ratio // 2
    ac = alphas_cumprod.detach().to(x_T.device)  # indexed per step on the sample's device
    calls = 0

    def run(x: Tensor, t: int) -> tuple[Tensor, Tensor]:
        tt = timestep_batch(t, x, torch.long)
        return model(x.to(x_T.dtype), tt), tt

    def transfer(x: Tensor, out: Tensor, t: int, t_prev: int, tt: Tensor) -> Tensor:
        # diffusers' ``_get_prev_sample`` (the paper's φ) is the deterministic DDIM step t -> t_prev
        # (ᾱ_0 past the end)
        nonlocal calls
        x = diffusion.ddim_step(out, t, t_prev, x, ac, prediction_type=prediction_type)
        if callback is not None:
            callback(calls, tt, x)
        calls += 1
        return x

    x = x_T.to(work_dtype(x_T))  # init_noise_sigma = 1
    history: list[Tensor] = []  # the first output of each step, for the multistep phase
    # pseudo Runge-Kutta, t -> t-r from x_t: outputs at t, t-h, t-h, t-r (the prk list), RK4 mean
    for k in range(0, len(prk), 4):
        t, x_t = prk[k], x
        o1, tt = run(x_t, t)
        history.append(o1)
        x = transfer(x_t, o1, t, t - half, tt)
        o2, tt = run(x, prk[k + 1])
        x = transfer(x_t, o2, t, prk[k + 1], tt)
        o3, tt = run(x, prk[k + 2])
        x = transfer(x_t, o3, t, prk[k + 2] - half, tt)
        o4, tt = run(x, prk[k + 3])
        x = transfer(x_t, o1 / 6 + o2 / 3 + o3 / 3 + o4 / 6, t, prk[k + 3], tt)
    # pseudo linear multistep: Adams-Bashforth 4 on the outputs (the RK phase left 3)
    for t in plms:
        o, tt = run(x, t)
        history = (history + [o])[-4:]
        x = transfer(x, (55 * history[3] - 59 * history[2] + 37 * history[1] - 9 * history[0]) / 24, t, t - ratio, tt)
    return x.to(x_T.dtype)


def _pndm_img2img(model: Denoise, x_T: Tensor, start: Img2ImgStart, prk: list[int], plms: list[int], *,
                  alphas_cumprod: Tensor, num_steps: int, prediction_type: str,
                  callback: StepCallback | None) -> Tensor:
    """img2img as ``StableDiffusionImg2ImgPipeline`` runs ``PNDMScheduler`` (order 1): ``get_timesteps`` cuts
    ``t_start`` entries (:func:`sdadapt.img2img.diffusers_start_index` of ``num_steps``) off the front of the
    scheduler's whole model-call list (the 12 PRK calls, then PLMS: n + 9 entries), ``add_noise`` at the first kept
    entry, then ``PNDMScheduler.step`` as diffusers writes it: its call counter starts at 0, so the first 12 calls
    still take the PRK branch — RK4 bookkeeping by the counter, the step's start read from ``prk[counter//4·4]``
    and its end from the timestep given (``t − (0 if counter odd else r//2)``) — then the PLMS branch from the
    timestep given (``t → t − r``; Adams–Bashforth on the last four outputs). Transcribed from diffusers 0.42
    (``step_prk``, ``step_plms``); the model calls are the kept entries, the sample is x (B,C,H,W) -> x0."""
    from ..img2img import start_index

    calls = prk + plms
    first = start_index(start, num_steps, rule="diffusers")  # (t_start counts inference steps, not calls)
    init = start.init_like(x_T)
    if first >= num_steps:
        return init
    a = alphas_cumprod[calls[first]].detach().double().cpu()
    x = (a.sqrt() * init.double() + (1 - a).sqrt() * x_T.double()).to(x_T.dtype)
    ratio = int(alphas_cumprod.shape[0]) // num_steps
    ac = alphas_cumprod.detach().to(x_T.device)
    x = x.to(work_dtype(x_T))
    ets: list[Tensor] = []
    cur_sample: Tensor | None = None
    cur_output: Tensor | float = 0.0
    for counter, t in enumerate(calls[first:]):
        tt = timestep_batch(t, x, torch.long)
        out = model(x.to(x_T.dtype), tt)
        if counter < len(prk):  # step_prk
            t_prev = t - (0 if counter % 2 else ratio // 2)
            t_from = prk[counter // 4 * 4]
            if counter % 4 == 0:
                cur_output = cur_output + out / 6
                ets.append(out)
                cur_sample = x
            elif counter % 4 in (1, 2):
                cur_output = cur_output + out / 3
            else:
                out = cur_output + out / 6
                cur_output = 0.0
            x = diffusion.ddim_step(out, t_from, t_prev, cur_sample if cur_sample is not None else x, ac,
                                    prediction_type=prediction_type)
        else:  # step_plms (after 12 PRK calls: len(ets) = 3, counter > 1)
            ets = (ets[-3:] + [out])
            mix = (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4]) / 24
            x = diffusion.ddim_step(mix, t, t - ratio, x, ac, prediction_type=prediction_type)
        if callback is not None:
            callback(counter, tt, x)
    return x.to(x_T.dtype)
