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

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..denoised_branches import ReadDenoised, denoised_of
from .sigma_space import (
    check_prediction_type,
    first_sample,
    model_input,
    model_sigmas,
    sgm_of,
    step_noise,
    t_to_sigma,
    vp_data_prediction,
    work_dtype,
)
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from .schedules import ScheduleOptions

__all__ = ["LCM_ORIGINAL_STEPS", "LCM_TIMESTEP_SCALING", "lcm_a1111_sigmas", "lcm_boundary_scalings", "lcm_sample",
           "lcm_sigma_table", "lcm_sigma_to_t", "lcm_timesteps"]


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
               callback: StepCallback | None = None, start: Img2ImgStart | None = None, schedule: str | None = None,
               schedule_options: ScheduleOptions | None = None, discard_next_to_last_sigma: bool = False) -> Tensor:
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

    ``schedule`` (resolved, :func:`sdadapt.samplers.resolve_schedule`: ``"uniform"`` is A1111's "Automatic"):
    A1111's LCM sampler on that grid instead (see the module; any ``num_steps`` ≥ 1; ``start`` by A1111's rule;
    ``schedule_options``: A1111's σ min/max, ρ and Beta settings (not read by ``uniform``, as in A1111);
    ``discard_next_to_last_sigma``: A1111's setting of that name). ``model`` is then called at the quantized
    timesteps ``k·j + k − 1`` (int64, (B,)), ``callback(i, t, x)`` after each step.

    Raises:
        ValueError: an unknown prediction type, ``num_steps`` outside [1, 50], a schedule shorter than
        50 steps, ``schedule_options`` / ``discard_next_to_last_sigma`` without a schedule; with ``schedule``: an
        unknown schedule, a prediction type other than ε, a schedule of fewer than 50 training steps.
    """
    if schedule is not None:
        return _a1111_lcm(model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps, schedule=schedule,
                          prediction_type=prediction_type, generator=generator, callback=callback, start=start,
                          schedule_options=schedule_options, discard_next_to_last_sigma=discard_next_to_last_sigma)
    if schedule_options is not None or discard_next_to_last_sigma:
        raise ValueError("lcm: schedule_options / discard_next_to_last_sigma shape A1111's LCM grid: give a schedule "
                         "too (schedule='automatic' is A1111's LCM)")
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


# ------------------------------------------------------------------ A1111's "LCM" sampler (a schedule given)
def lcm_sigma_table(alphas_cumprod: Tensor, dtype: torch.dtype = torch.float32,
                    *, original_steps: int = LCM_ORIGINAL_STEPS) -> Tensor:
    """A1111's LCM σ table (50,) ascending, CPU: σ of ᾱ at the distillation timesteps ``k·(j+1) − 1``
    (``k = T // 50``; ``alphas_cumprod_valid[49 − x] = alphas_cumprod[999 − 20x]``, ``LCMCompVisDenoiser.__init__``,
    modules/sd_samplers_lcm.py:11-20), computed as :func:`.sigma_space.model_sigmas` computes A1111's table
    (float32 unless ``dtype`` is float64; a zero-terminal-SNR ᾱ_{T−1} read as A1111 reads it).

    Raises:
        ValueError: a schedule of fewer than ``original_steps`` training steps.
    """
    T, orig = int(alphas_cumprod.shape[0]), int(original_steps)
    if T < orig:
        raise ValueError(f"lcm: A1111's LCM reads {orig} of the model's training steps; this schedule has {T}")
    k = T // orig
    rows = [T - 1 - x * k for x in range(orig)][::-1]
    return model_sigmas(alphas_cumprod.detach().cpu()[rows], torch.float64 if dtype == torch.float64 else
                        torch.float32)


def lcm_sigma_to_t(sigma: Tensor, table: Tensor, *, skip: int) -> Tensor:
    """A1111's quantized LCM timesteps (int64, ``sigma``'s shape) of noise levels ``sigma``: the nearest entry of
    ``table`` (:func:`lcm_sigma_table`, (50,)) in log σ, ``argmin|log σ − log σ_j|·skip + skip − 1``
    (``skip = T // 50``; ``LCMCompVisDenoiser.sigma_to_t``, modules/sd_samplers_lcm.py:35-38)."""
    dists = sigma.log() - table.log()[:, None]
    return dists.abs().argmin(dim=0).view(sigma.shape) * skip + (skip - 1)


def lcm_a1111_sigmas(table: Tensor, num_steps: int, schedule: str, *, skip: int,
                     schedule_options: ScheduleOptions | None = None,
                     discard_next_to_last_sigma: bool = False) -> Tensor:
    """A1111's σ grid (m+1,) descending for its LCM sampler, in ``table``'s dtype (CPU), A1111's schedule
    functions (modules/sd_schedulers.py) given the LCM denoiser as ``inner_model``: ``uniform`` (and ``automatic``,
    A1111's "Automatic" for LCM) is ``LCMCompVisDenoiser.get_sigmas(n)`` (modules/sd_samplers_lcm.py:23-32): t from
    t(σ_max) to t(σ_min) (:func:`lcm_sigma_to_t`: 999 … 19) in n steps of a float32 ``torch.linspace``, σ of
    ``clamp((t − (skip − 1))/skip, 0, 49)`` log-linear on ``table`` (k-diffusion's ``DiscreteSchedule.t_to_sigma``),
    then 0; ``normal`` the same between ``schedule_options``' σ bounds, ``sgm_uniform`` the first n of n + 1 such
    t; the others (karras, exponential, polyexponential, kl_optimal, align_your_steps, simple, ddim, beta) are
    :func:`.schedules.schedule_sigmas` on the 50-entry ``table`` (A1111's ``model_wrap.sigmas``: its σ_min/σ_max,
    ``simple`` and ``ddim`` its entries). ``discard_next_to_last_sigma``: the grid of n + 1 steps without its
    next-to-last σ.

    Raises:
        ValueError: an unknown schedule, ``num_steps`` < 1.
    """
    from .schedules import canonical_schedule, schedule_sigmas

    key = canonical_schedule(schedule)
    key = "uniform" if key == "automatic" else key
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"lcm: num_steps must be >= 1, got {num_steps}")
    if key not in ("uniform", "normal", "sgm_uniform"):
        return schedule_sigmas(key, n, table, options=schedule_options,
                               discard_next_to_last_sigma=discard_next_to_last_sigma)
    if discard_next_to_last_sigma:
        longer = lcm_a1111_sigmas(table, n + 1, key, skip=skip, schedule_options=schedule_options)
        return torch.cat([longer[:-2], longer[-1:]])
    lo, hi = float(table[0]), float(table[-1])
    if key != "uniform" and schedule_options is not None:  # (uniform: get_sigmas, without the σ bounds)
        lo, hi = schedule_options.bounds(table)
    start, end = (int(lcm_sigma_to_t(torch.tensor(s, dtype=table.dtype), table, skip=skip)) for s in (hi, lo))
    t = torch.linspace(start, end, n + 1 if key == "sgm_uniform" else n, dtype=table.dtype)[:n]
    index = ((t - (skip - 1)) / skip).clamp(min=0, max=table.shape[0] - 1)
    return torch.cat([t_to_sigma(index, table), table.new_zeros(1)])


def _consistency_read(x: Tensor, sigma: Tensor, scaled: Tensor) -> ReadDenoised:
    """``LCMCompVisDenoiser``'s output for an ε at the σ-scaled x (B,C,H,W), σ and A1111's scaled timestep (0-dim):
    ``c_out·(x − σ·ε) + c_skip·x`` with the consistency scalings in x's dtype — what A1111's guidance combines."""
    c_skip = _SIGMA_DATA**2 / (scaled**2 + _SIGMA_DATA**2)
    c_out = scaled / (scaled**2 + _SIGMA_DATA**2) ** 0.5
    return lambda eps: c_out * (x + eps.to(x.dtype) * -sigma) + c_skip * x


def _a1111_lcm(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int, schedule: str,
               prediction_type: str, generator: torch.Generator | None, callback: StepCallback | None,
               start: Img2ImgStart | None, schedule_options: ScheduleOptions | None,
               discard_next_to_last_sigma: bool) -> Tensor:
    """A1111's ``sample_lcm`` with ``LCMCompVisDenoiser`` (modules/sd_samplers_lcm.py:50-80) on ``schedule``'s grid
    from unit noise x_T (B,C,H,W) -> x0 latents (B,C,H,W) (see the module)."""
    if prediction_type != "epsilon":
        check_prediction_type("lcm", prediction_type)
        raise ValueError(f"lcm: A1111's LCM sampler (a schedule given) reads the model as ε prediction only (its "
                         f"LCMCompVisDenoiser is a DiscreteEpsDDPMDenoiser); for a {prediction_type!r} model run "
                         "lcm without a schedule (diffusers' LCMScheduler)")
    dt = work_dtype(x_T)
    table = lcm_sigma_table(alphas_cumprod, dt)
    skip = int(alphas_cumprod.shape[0]) // LCM_ORIGINAL_STEPS
    sigmas = lcm_a1111_sigmas(table, num_steps, schedule, skip=skip, schedule_options=schedule_options,
                              discard_next_to_last_sigma=discard_next_to_last_sigma)
    if start is not None:  # A1111's sample_img2img: sigmas[steps - t_enc - 1:], xi = init + noise·σ_start
        from ..img2img import start_index

        sigmas = sigmas[start_index(start, len(sigmas) - 1, rule="a1111"):]
        x = start.noised(x_T, float(sigmas[0]))
    else:
        x = first_sample(x_T, sigmas[0], sgm_noise_multiplier=sgm_of(schedule_options))
    scaling = torch.tensor(LCM_TIMESTEP_SCALING, dtype=dt)
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]
        t = lcm_sigma_to_t(sigma, table, skip=skip)
        batch_t = t.expand(x.shape[0]).to(x.device)
        scaled = (t.to(dt) * scaling).to(x.device)  # (A1111: the int64 timestep · 10.0, in float32)
        x = denoised_of(model, _consistency_read(x, sigma.to(x.device), scaled), model_input(x, sigma, x_T.dtype),
                        batch_t, sigma=sigma)
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1].to(x.device) * step_noise(x, generator)
        if callback is not None:
            callback(i, batch_t, x)
    return x.to(x_T.dtype)
