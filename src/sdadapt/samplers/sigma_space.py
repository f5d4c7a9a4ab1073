"""What the samplers share: σ at fractional timesteps, Karras et al.'s ρ-spaced σ, σ back to
a (fractional) timestep, the model output read as x̂0 at a noise level, the discrete-σ samplers'
first sample (:func:`discrete_start`) and derivative (:func:`sigma_slope`), and the timestep
batches, working dtype and noise draws of every sampler.

``σ_t = √((1-ᾱ_t)/ᾱ_t)`` is the k-diffusion noise level of DDPM step t; a sampler on σ runs the
model at ``x·c_in``, ``c_in = 1/√(σ²+1)``, and timestep ``t(σ)``. The grids live on the CPU (a few dozen
numbers, made once per sampling run); the samples stay on the caller's device.

**Dtypes.** On float32 (and half) latents the σ table, A1111's grids and ``t(σ)`` are float32 and ``c_in`` /
the v-prediction scalings are float32 0-dim tensors, computed as A1111's k-diffusion wrapper computes them
(``CompVisDenoiser``: ``((1 − ᾱ)/ᾱ)**0.5`` of float32 ᾱ, ``sigma_to_t`` and ``get_sigmas`` in float32;
k_diffusion/external.py:59-110, 141-167 at 4601bf0): :func:`model_sigmas`. Float64 latents keep all of it in
float64 (a precise mode). diffusers' grids (no ``schedule``; ``karras``) keep the float64 table, σ and ``t(σ)``
(:func:`grid_table`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..training.diffusion import (
    PREDICTION_TYPES,
    numpy_linspace,
    sigmas_of,
    timestep_grid,
)

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from .schedules import ScheduleOptions
from ..denoised_branches import denoised_of
from .a1111_noise import A1111Noise

__all__ = [
    "A1111_ZERO_SNR_ALPHA_CUMPROD",
    "DOWNCAST_FIELD",
    "TRAINING_STEP_SCHEDULES",
    "a1111_alphas_cumprod",
    "ancestral_step",
    "any_step_count",
    "check_grid_steps",
    "check_prediction_type",
    "denoise",
    "denoised",
    "discrete_sigmas",
    "discrete_start",
    "downcast_alphas_cumprod",
    "first_sample",
    "grid_table",
    "grid_timesteps",
    "initial_noise_sigma",
    "karras_sigmas",
    "model_input",
    "model_sigmas",
    "sgm_of",
    "sigma_slope",
    "sigma_to_t",
    "sigmas_at",
    "step_noise",
    "t_to_sigma",
    "timestep_batch",
    "training_sigmas",
    "vp_alpha_sigma",
    "vp_data_prediction",
    "vp_noise_prediction",
    "work_dtype",
]

#: A1111's schedules that pick the model's own training σ, so they hold at most T distinct steps (past T A1111's
#: ``simple`` repeats σ and its ``ddim_uniform`` strides by ``max(T // n, 1)``, a shorter grid than asked:
#: degenerate or other grids, refused here — repeated σ divide by zero in LMS and DPM++)
TRAINING_STEP_SCHEDULES: tuple[str, ...] = ("simple", "ddim")

#: A1111's infotext key of its "Downcast alphas_cumprod" setting (``apply_alpha_schedule_override``)
DOWNCAST_FIELD = "Downcast alphas_cumprod"

#: the last ᾱ of a zero-terminal-SNR schedule (ᾱ = 0, σ = ∞) as the σ samplers use it: diffusers'
#: Euler, Euler ancestral, DPM-Solver multistep and UniPC set it so under ``rescale_betas_zero_snr``
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24

#: the same as A1111 reads it (``rescale_zero_terminal_snr_abar``, modules/sd_models.py, for its "Zero Terminal
#: SNR" noise schedule and checkpoints marked ``ztsnr``; ComfyUI's ``rescale_zero_terminal_snr_sigmas`` too):
#: σ_max ≈ 4518.8 on A1111's grids
A1111_ZERO_SNR_ALPHA_CUMPROD = 4.8973451890853435e-08


def training_sigmas(alphas_cumprod: Tensor, *, zero_snr_alpha_cumprod: float = ZERO_SNR_ALPHA_CUMPROD) -> Tensor:
    """σ of each training step (T,) float64 CPU, ``√((1-ᾱ_t)/ᾱ_t)``, from the training ᾱ (T,).

    A zero last ᾱ (a zero-terminal-SNR schedule) is read as ``zero_snr_alpha_cumprod``: by default
    :data:`ZERO_SNR_ALPHA_CUMPROD`, as diffusers' schedulers do, so σ_max ≈ 4096 rather than ∞ (which would make
    every σ sampler NaN).
    """
    ac = alphas_cumprod.detach().double().cpu()
    if float(ac[-1]) == 0.0:
        ac = torch.cat([ac[:-1], ac.new_full((1,), zero_snr_alpha_cumprod)])
    return sigmas_of(ac)


def a1111_alphas_cumprod(alphas_cumprod: Tensor, device: torch.device | str | None = None) -> Tensor:
    """ᾱ (T,) as A1111 holds it, float32 (``sd_model.alphas_cumprod``), or float16 when given so (A1111's "Downcast
    alphas_cumprod", and every A1111 before 1.7.0-225 on a half model: :func:`downcast_alphas_cumprod`): a zero last
    entry (a zero-terminal-SNR schedule) is :data:`A1111_ZERO_SNR_ALPHA_CUMPROD`, where
    ``rescale_zero_terminal_snr_abar`` leaves it (so its timestep samplers and σ tables stay finite at t = T − 1)."""
    dtype = torch.float16 if alphas_cumprod.dtype == torch.float16 else torch.float32
    ac = alphas_cumprod.detach().to(device=alphas_cumprod.device if device is None else device, dtype=dtype)
    if float(ac[-1]) == 0.0:
        ac = torch.cat([ac[:-1], ac.new_full((1,), A1111_ZERO_SNR_ALPHA_CUMPROD)])
    return ac


def downcast_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """ᾱ (T,) as A1111's "Downcast alphas_cumprod" holds it (``sd_model.alphas_cumprod.half()``,
    ``apply_alpha_schedule_override``): float16. What every A1111 before 1.7.0-225 sampled with on a half model (its
    ``model.half()`` cast the buffer too; its infotext backcompat turns the option on for those versions). Handed to
    :func:`sdadapt.samplers.sample_latents` as ``alphas_cumprod``, A1111's σ samplers read it as A1111 does
    (:func:`model_sigmas`).

    Raises:
        ValueError: a schedule whose first ᾱ round to 1 in float16 (β below about 2.4e-4: σ 0 there, log σ −∞ — no
            A1111 could sample it so; SD's first ᾱ, 0.99915, is 0.99902), saying how many.
    """
    half = alphas_cumprod.detach().to(torch.float32).to(torch.float16)  # (LDM's float32 buffer, halved)
    ones = int((half == 1).sum())
    if ones:
        raise ValueError(f"this model's first {ones} ᾱ round to 1 in float16 (σ 0, log σ −∞: its schedule starts with "
                         f"β below ~2.4e-4, unlike SD's), so a downcast σ table breaks; leave the downcast out")
    return half


def model_sigmas(alphas_cumprod: Tensor, dtype: torch.dtype = torch.float64,
                 device: torch.device | str = "cpu") -> Tensor:
    """The σ table (T,) the samplers read in ``dtype`` on ``device``: float64, :func:`training_sigmas`; otherwise
    A1111's (``CompVisDenoiser.sigmas``, k_diffusion/external.py:94 at 4601bf0: ``((1 − ᾱ)/ᾱ)**0.5`` computed in
    float32 from ᾱ as float32, the buffer LDM and A1111 keep), in float32 whatever lower ``dtype`` (half latents:
    A1111 keeps ᾱ float32). A zero last ᾱ reads as A1111 reads it, :data:`A1111_ZERO_SNR_ALPHA_CUMPROD` (float64
    too: the precise mode of A1111's table; diffusers' grids read :func:`training_sigmas`' 2⁻²⁴). A float16 ᾱ
    (:func:`downcast_alphas_cumprod`) gives A1111's table of it whatever ``dtype``: float16, computed in float16 as
    k-diffusion computes it from a half buffer (:func:`sigma_to_t` / :func:`t_to_sigma` then read its float16 logs)."""
    if dtype == torch.float64 and alphas_cumprod.dtype != torch.float16:
        return training_sigmas(alphas_cumprod, zero_snr_alpha_cumprod=A1111_ZERO_SNR_ALPHA_CUMPROD).to(device)
    ac = a1111_alphas_cumprod(alphas_cumprod, device)
    return ((1 - ac) / ac) ** 0.5


def grid_table(alphas_cumprod: Tensor, x: Tensor, schedule: str | None) -> Tensor:
    """The σ table (T,) CPU a discrete-σ sampler reads its timesteps ``t(σ)`` on, for latents ``x``: A1111's in the
    work dtype (:func:`model_sigmas`, :func:`work_dtype`) on one of A1111's grids (``schedule`` given), else float64
    (diffusers' grids: its float64 ``_sigma_to_t``)."""
    return model_sigmas(alphas_cumprod, work_dtype(x)) if schedule is not None else training_sigmas(alphas_cumprod)


def sigmas_at(timesteps: Tensor, train_sigmas: Tensor) -> Tensor:
    """σ at (fractional) timesteps (n,), linear in t between training steps (diffusers'
    ``np.interp(timesteps, arange(T), sigmas)``; its ``interpolation_type="linear"``).

    ``train_sigmas``: (T,) σ of each training step. Returns (n,) float64.
    """
    sig = train_sigmas.double().cpu()
    ts = timesteps.double().cpu().clamp(0, sig.shape[0] - 1)
    lo = ts.floor().long().clamp(max=sig.shape[0] - 1)
    hi = (lo + 1).clamp(max=sig.shape[0] - 1)
    frac = ts - lo.double()
    return sig[lo] * (1 - frac) + sig[hi] * frac


def karras_sigmas(sigma_min: float, sigma_max: float, num_steps: int, *, rho: float = 7.0,
                  dtype: torch.dtype = torch.float64) -> Tensor:
    """Karras et al. (2022) noise levels (n,) in ``dtype``, descending from ``sigma_max`` to ``sigma_min``:
    ``σ_i = (σ_max^(1/ρ) + i/(n-1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ`` (diffusers' ``use_karras_sigmas`` in float64;
    float32: k-diffusion's ``get_sigmas_karras``, sampling.py:17-23 at 4601bf0 — a float32 ramp, the ends' 1/ρ
    powers as Python floats — A1111's Karras grid)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    ramp = torch.linspace(0, 1, num_steps, dtype=dtype)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigmas: Tensor, train_sigmas: Tensor) -> Tensor:
    """Fractional timesteps (n,) of noise levels ``sigmas`` (n,): linear in log σ between the two training steps
    around each (diffusers' ``_sigma_to_t``), clamped to [0, T-1]; on ``train_sigmas``' device, in the dtype both
    promote to (float32 sigmas on a float32 table: k-diffusion's float32 ``DiscreteSchedule.sigma_to_t``,
    k_diffusion/external.py:65-77 at 4601bf0, unquantized, bit for bit; on a float16 table as k-diffusion reads a
    half buffer; float64 otherwise)."""
    dtype = torch.promote_types(sigmas.dtype, train_sigmas.dtype)
    # (a float16 table: k-diffusion's float16 log_sigmas buffer, its low − high in float16, the rest float32)
    log_train = train_sigmas.log() if train_sigmas.dtype == torch.float16 else train_sigmas.to(dtype).log()
    log_sigma = sigmas.to(device=log_train.device, dtype=dtype).clamp_min(1e-10).log()
    dists = log_sigma[None, :] - log_train[:, None]  # (T, n)
    low = (dists >= 0).cumsum(0).argmax(0).clamp(max=log_train.shape[0] - 2)
    high = low + 1
    w = ((log_train[low] - log_sigma) / (log_train[low] - log_train[high])).clamp(0, 1)
    return (1 - w) * low + w * high


def t_to_sigma(t: Tensor, train_sigmas: Tensor) -> Tensor:
    """The inverse of :func:`sigma_to_t` (k-diffusion's ``DiscreteSchedule.t_to_sigma``): σ (n,) at
    fractional timesteps ``t`` (n,), linear in log σ between the two training steps around each."""
    log_sigmas = train_sigmas.log()
    lo, hi, w = t.floor().long(), t.ceil().long(), t - t.floor()
    return ((1 - w) * log_sigmas[lo] + w * log_sigmas[hi]).exp()


def denoised(output: Tensor, x: Tensor, sigma: float | Tensor, prediction_type: str) -> Tensor:
    """x̂0 (B,C,H,W) from the model's ``output`` at the σ-scaled sample ``x`` (the model saw
    ``x/√(σ²+1)``): ε: ``x − σ·out``; v: ``out·c_out + x·c_skip``, ``c_out = −σ/√(σ²+1)``, ``c_skip = 1/(σ²+1)``
    computed in x's dtype as A1111's ``CompVisVDenoiser`` computes them (k_diffusion/external.py:149-167 at
    4601bf0); sample: ``out``. ``sigma``: a float, or a tensor broadcasting against x."""
    if prediction_type == "epsilon":
        return x - sigma * output
    if prediction_type == "v_prediction":
        s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
        return output * (-s / (s ** 2 + 1) ** 0.5) + x * (1 / (s ** 2 + 1))
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def vp_alpha_sigma(sigma: float) -> tuple[float, float, float]:
    """The VP process's ``(α_t, σ_t, λ_t)`` at the k-diffusion noise level ``sigma``:
    ``α_t = 1/√(σ²+1) = √ᾱ``, ``σ_t = σ·α_t = √(1−ᾱ)``, ``λ_t = log(α_t/σ_t) = −log σ``
    (diffusers' ``_sigma_to_alpha_sigma_t``; λ is +inf at σ = 0, where the sample is x̂0).

    The DPM-Solver and UniPC samplers step the VP sample ``x_t = α_t·x0 + σ_t·ε`` (what the
    model sees unscaled) in these terms."""
    alpha = 1.0 / (sigma * sigma + 1.0) ** 0.5
    return alpha, sigma * alpha, (-math.log(sigma) if sigma > 0 else math.inf)


def vp_data_prediction(output: Tensor, x: Tensor, alpha_t: float, sigma_t: float, prediction_type: str) -> Tensor:
    """x̂0 (B,C,H,W) from the model's ``output`` at the VP sample ``x`` (B,C,H,W) with
    coefficients ``(α_t, σ_t)``: ε: ``(x − σ_t·out)/α_t``; v: ``α_t·x − σ_t·out``; sample: ``out``."""
    if prediction_type == "epsilon":
        return (x - sigma_t * output) / alpha_t
    if prediction_type == "v_prediction":
        return alpha_t * x - sigma_t * output
    if prediction_type == "sample":
        return output
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


def vp_noise_prediction(output: Tensor, x: Tensor, alpha_t: float, sigma_t: float, prediction_type: str) -> Tensor:
    """ε̂ (B,C,H,W) from the model's ``output`` at the VP sample ``x`` (B,C,H,W) with
    coefficients ``(α_t, σ_t)``: ε: ``out``; v: ``α_t·out + σ_t·x``; sample: ``(x − α_t·out)/σ_t``."""
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        return alpha_t * output + sigma_t * x
    if prediction_type == "sample":
        return (x - alpha_t * output) / sigma_t
    raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}")


# ------------------------------------------------- the discrete-σ schedulers' grids (Euler, Heun, KDPM2)
def any_step_count(schedule: str | None = None, spacing: str = "linspace") -> bool:
    """Whether a σ grid can hold more steps than the model's T training timesteps: ``schedule`` (a resolved one of
    A1111's, or ``None`` for diffusers' grid by ``spacing``) continuous in t or σ — diffusers' unrounded
    ``linspace`` timesteps (``EulerDiscreteScheduler`` & co. set any count), Karras σ and every A1111 schedule but
    :data:`TRAINING_STEP_SCHEDULES` (k-diffusion's ``get_sigmas(n)``, ``get_sigmas_karras(n, ...)``: any ``n``).
    A1111 runs such grids past T, e.g. img2img's ``int(steps / strength)`` with exact steps."""
    if schedule is not None:
        from .schedules import canonical_schedule

        return canonical_schedule(schedule) not in TRAINING_STEP_SCHEDULES
    return spacing == "linspace"


def check_grid_steps(num_steps: int, num_train_steps: int, *, schedule: str | None = None,
                     spacing: str = "linspace", label: str = "num_steps") -> None:
    """Refuse a step count a σ grid cannot be built for: below 1, or above ``num_train_steps`` where the grid picks
    training steps (:func:`any_step_count` false).

    Raises:
        ValueError: naming ``label``, the limit and why.
    """
    n, T = int(num_steps), int(num_train_steps)
    if n < 1:
        raise ValueError(f"{label} must be >= 1, got {num_steps}")
    if n > T and not any_step_count(schedule, spacing):
        grid = f"schedule {schedule!r}" if schedule is not None else f"{spacing!r} timestep spacing"
        raise ValueError(f"{label} must be in [1, {T}] on the {grid} (it picks the model's {T} training steps), "
                         f"got {num_steps}")


def grid_timesteps(num_steps: int, num_train_steps: int, spacing: str, steps_offset: int) -> Tensor:
    """diffusers' descending float64 timesteps (n,) of the σ schedulers (:func:`sdadapt.training.diffusion.
    timestep_grid`, linspace unrounded); past ``num_train_steps`` the ``linspace`` grid goes on as
    ``np.linspace(0, T − 1, n)`` (diffusers sets it so, with fractional timesteps); other spacings are refused
    there (:func:`check_grid_steps`)."""
    n, T = int(num_steps), int(num_train_steps)
    if n > T and spacing == "linspace":
        return numpy_linspace(T - 1, n).flip(0)
    check_grid_steps(n, T, spacing=spacing)
    return timestep_grid(n, T, spacing, steps_offset, round_linspace=False)


def discrete_sigmas(alphas_cumprod: Tensor, num_steps: int, *, spacing: str = "linspace", steps_offset: int = 0,
                    karras: bool = False, round_karras_timesteps: bool = False,
                    schedule: str | None = None,
                    schedule_options: ScheduleOptions | None = None,
                    discard_next_to_last_sigma: bool = False,
                    dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """``(timesteps (n,), sigmas (n+1,))`` CPU of diffusers' discrete-σ schedulers
    (``EulerDiscreteScheduler``, ``EulerAncestral``, ``Heun``, ``KDPM2``, ``KDPM2Ancestral``,
    ``LMS``) after ``set_timesteps(num_steps)``, on the training schedule ``alphas_cumprod`` (T,).

    timesteps: descending by ``timestep_spacing`` (linspace unrounded), held as float32 as
    diffusers holds them (what the UNet gets); σ_i: the training σ linear in t at t_i; σ_n = 0.
    ``karras``: σ_0..σ_{n-1} on Karras et al.'s ρ = 7 grid between the last and first of those σ
    (``use_karras_sigmas``), timesteps ``t(σ)`` by :func:`sigma_to_t`, rounded to whole steps with
    ``round_karras_timesteps`` (KDPM2 does; Euler and Heun don't). ``schedule``: one of A1111's schedules
    (:func:`.schedules.schedule_sigmas`, not ``automatic``) instead: its σ (m+1,), timesteps ``t(σ)`` as for
    Karras σ (``spacing`` unused); the last σ is the schedule's (0, or σ_min for ``kl_optimal``).
    ``discard_next_to_last_sigma``: with a ``schedule``, A1111's option of that name
    (:func:`.schedules.schedule_sigmas`); unused without one. ``dtype``: the σ table's with a ``schedule``
    (:func:`model_sigmas`): float32 makes A1111's grid and ``t(σ)`` float32, as A1111 computes them; diffusers'
    grids (no ``schedule``, ``karras`` too) stay float64, as diffusers' ``np.interp`` / ``_sigma_to_t``.

    Raises:
        ValueError: ``num_steps`` below 1, or above T on a grid of training steps (:func:`check_grid_steps`: the
            ``leading`` / ``trailing`` spacings, the ``simple`` / ``ddim`` schedules), an unknown spacing or schedule.
    """
    train = model_sigmas(alphas_cumprod, dtype) if schedule is not None else training_sigmas(alphas_cumprod)
    if schedule is not None:
        from .schedules import schedule_sigmas

        check_grid_steps(num_steps, train.shape[0], schedule=schedule)
        full = schedule_sigmas(schedule, num_steps, train, discard_next_to_last_sigma=discard_next_to_last_sigma,
                               options=schedule_options)
        timesteps = sigma_to_t(full[:-1], train)
        return (timesteps.round() if round_karras_timesteps else timesteps), full
    timesteps = grid_timesteps(num_steps, train.shape[0], spacing, steps_offset).float().double()
    sigmas = sigmas_at(timesteps, train)
    if karras:
        sigmas = karras_sigmas(float(sigmas[-1]), float(sigmas[0]), num_steps)
        timesteps = sigma_to_t(sigmas, train)
        if round_karras_timesteps:
            timesteps = timesteps.round()
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)])


def initial_noise_sigma(sigmas: Tensor, spacing: str = "linspace") -> float:
    """The scale of the starting noise (diffusers' ``init_noise_sigma``): σ_max for the
    ``linspace``/``trailing`` spacings, ``√(σ_max² + 1)`` for ``leading``. ``sigmas``: (n+1,)."""
    top = float(sigmas.max())
    return top if spacing in ("linspace", "trailing") else (top * top + 1) ** 0.5


def first_sample(x_T: Tensor, sigma_0: Tensor, *, sgm_noise_multiplier: bool = False) -> Tensor:
    """A txt2img run's first sample (B,C,H,W) from unit noise ``x_T`` in :func:`work_dtype`: ``x_T·σ_0``
    (k-diffusion's ``x * sigmas[0]``), or with A1111's "SGM noise multiplier" ``x_T·√(1 + σ_0²)`` — A1111's
    ``KDiffusionSampler.sample``: ``x * torch.sqrt(1.0 + sigmas[0] ** 2.0)``, on the 0-dim ``sigma_0`` in the grid's
    dtype (the official SDXL code's start)."""
    x = x_T.to(work_dtype(x_T))
    if not sgm_noise_multiplier:
        return x * float(sigma_0)
    return x * torch.sqrt(1.0 + torch.as_tensor(sigma_0) ** 2.0).to(x.device)


def sgm_of(schedule_options: ScheduleOptions | None) -> bool:
    """Whether ``schedule_options`` ask for A1111's "SGM noise multiplier" (:func:`first_sample`)."""
    return bool(getattr(schedule_options, "sgm_noise_multiplier", False))


def work_dtype(x: Tensor) -> torch.dtype:
    """The dtype the samplers carry the sample in between steps: ``x``'s, at least float32
    (diffusers upcasts for its updates; the model still sees the caller's dtype)."""
    return torch.promote_types(x.dtype, torch.float32)


def discrete_start(sampler: str, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int, prediction_type: str,
                   spacing: str = "linspace", steps_offset: int = 0, karras: bool = False,
                   round_karras_timesteps: bool = False, schedule: str | None = None,
                   schedule_options: ScheduleOptions | None = None,
                   discard_next_to_last_sigma: bool = False,
                   start: Img2ImgStart | None = None) -> tuple[list[float], list[float], Tensor]:
    """What each sampler on the discrete σ grid (Euler, Heun, DPM2, LMS) does first: refuse a
    prediction type :func:`denoised` does not read (naming ``sampler``), make the grid
    (:func:`discrete_sigmas`, whose options these are), and scale the unit noise ``x_T`` (B,C,H,W)
    to the first sample (times :func:`initial_noise_sigma`, in :func:`work_dtype`). ``start``: img2img /
    hires fix — the grid from ``start.index`` on (A1111's ``sigmas[steps - t_enc - 1:]``) and the first
    sample ``init + x_T·σ_start`` (:mod:`sdadapt.img2img`).

    Returns:
        ``(timesteps, sigmas, x)``: the n timesteps and n+1 σ as Python floats, x (B,C,H,W) (with a
        ``schedule``, m timesteps and m+1 σ: the ``ddim`` schedule's m is not always n).

    Raises:
        ValueError: an unknown prediction type or spacing, ``num_steps`` outside [1, T].
    """
    check_prediction_type(sampler, prediction_type)
    timesteps, sigmas = discrete_sigmas(alphas_cumprod, num_steps, spacing=spacing, steps_offset=steps_offset,
                                        karras=karras, round_karras_timesteps=round_karras_timesteps,
                                        schedule=schedule,
                                        schedule_options=schedule_options,
                                        discard_next_to_last_sigma=discard_next_to_last_sigma,
                                        dtype=work_dtype(x_T))
    if start is not None:  # img2img / hires fix: A1111's sigmas[index:], x = init + noise·σ (sdadapt.img2img)
        from ..img2img import start_index

        index = start_index(start, len(timesteps), rule="a1111")
        timesteps, sigmas = timesteps[index:], sigmas[index:]
        x = start.noised(x_T, float(sigmas[0]))
        return timesteps.tolist(), sigmas.tolist(), x
    # (a schedule starts at its σ_0, as k-diffusion's x·σ_0; ``spacing`` is not used with it)
    if schedule is not None and sgm_of(schedule_options):  # (A1111's "SGM noise multiplier": x·√(1 + σ_0²))
        return timesteps.tolist(), sigmas.tolist(), first_sample(x_T, sigmas[0], sgm_noise_multiplier=True)
    x = x_T.to(work_dtype(x_T)) * initial_noise_sigma(sigmas, "linspace" if schedule is not None else spacing)
    return timesteps.tolist(), sigmas.tolist(), x


def model_input(x: Tensor, sigma: float, dtype: torch.dtype) -> Tensor:
    """What the model sees at noise level σ: ``x·c_in``, ``c_in = 1/(σ² + 1)**0.5`` computed in x's dtype (A1111's
    ``CompVisDenoiser``, k_diffusion/external.py:99-110 at 4601bf0), (B,C,H,W) in ``dtype`` (the caller's latent
    dtype; the samplers keep ``x`` in at least float32 between steps)."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    return (x * (1 / (s ** 2 + 1) ** 0.5)).to(dtype)


def timestep_batch(t: float, x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """The timestep ``t`` as the model gets it: (B,) on ``x``'s device; float32 by default
    (diffusers' σ schedulers hold fractional float32 timesteps; a UNet embeds them in float32),
    ``torch.long`` for the samplers on integer timesteps (DDPM, PNDM, DPM-Solver, UniPC)."""
    return torch.full((x.shape[0],), t, device=x.device, dtype=dtype)


def denoise(model: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: float | Tensor, t: Tensor, *,
            prediction_type: str, dtype: torch.dtype) -> Tensor:
    """x̂0 (B,C,H,W) at the σ-scaled sample ``x`` (B,C,H,W): one ``model`` call on :func:`model_input` (in ``dtype``)
    at timesteps ``t`` (B,), its output read by :func:`denoised` — each guidance branch's output apart, combined on
    x̂0, where the model offers that (:func:`sdadapt.denoised_branches.denoised_of`: guidance on A1111's grids)."""
    return denoised_of(model, lambda out: denoised(out, x, sigma, prediction_type), model_input(x, sigma, dtype), t,
                       sigma=sigma)


def sigma_slope(model: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: float, t: Tensor, *,
                prediction_type: str, dtype: torch.dtype, clip_sample: float | None = None) -> Tensor:
    """``dx/dσ = (x − x̂0(x, σ))/σ`` (B,C,H,W) at the σ-scaled sample ``x`` (B,C,H,W), with one
    ``model`` call on :func:`model_input` (in ``dtype``) at timesteps ``t`` (B,); k-diffusion's
    ``to_d``, diffusers' ``derivative``. ``clip_sample``: clamp x̂0 to ±that first (Heun's
    ``clip_sample``)."""
    x0 = denoise(model, x, sigma, t, prediction_type=prediction_type, dtype=dtype)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    return (x - x0) / sigma


def step_noise(like: Tensor, generator: torch.Generator | None, dtype: torch.dtype | None = None) -> Tensor:
    """Unit noise shaped like ``like`` (B,C,H,W), drawn as diffusers' ``randn_tensor`` draws it:
    on the generator's device (CPU generators: on the CPU), then moved to ``like``'s device, so a
    seeded CPU generator gives the same numbers as diffusers on any device. An
    :class:`~.a1111_noise.A1111Noise` as ``generator``: its next draw (A1111's ``randn_like``)."""
    dtype = like.dtype if dtype is None else dtype
    if isinstance(generator, A1111Noise):
        return generator.next_noise(like).to(device=like.device, dtype=dtype)
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, dtype=dtype, device=device).to(like.device)


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0,
                   dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """``(σ_down, σ_up)`` of an ancestral step from σ_from to σ_to (k-diffusion's
    ``get_ancestral_step``): ``σ_up = min(σ_to, η·√(σ_to²(σ_from² − σ_to²)/σ_from²))``,
    ``σ_down = √(σ_to² − σ_up²)``; the deterministic part steps to σ_down, noise·σ_up is added.
    η = 1 (diffusers' ancestral schedulers) needs no cap (σ_up ≤ σ_to) and has none, as in diffusers;
    η = 0 is ``(σ_to, 0)``. ``dtype`` float32: computed on float32 0-dim tensors in k-diffusion's order
    (k_diffusion/sampling.py:51-58 at 4601bf0, as A1111 calls it on its float32 σ), returned as floats."""
    if not eta:
        return sigma_to, 0.0
    if dtype != torch.float64:
        s_from, s_to = torch.tensor(sigma_from, dtype=torch.float32), torch.tensor(sigma_to, dtype=torch.float32)
        up = torch.minimum(s_to, eta * (s_to ** 2 * (s_from ** 2 - s_to ** 2) / s_from ** 2) ** 0.5)
        return float((s_to ** 2 - up ** 2).clamp_min(0) ** 0.5), float(up)
    up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    if eta != 1.0:
        up = min(sigma_to, eta * up)
    return max(sigma_to**2 - up**2, 0.0) ** 0.5, up


def check_prediction_type(sampler: str, prediction_type: str) -> None:
    """Raise before the first model call when ``prediction_type`` is not one :func:`denoised` reads.

    Raises:
        ValueError: naming the sampler and the types taken.
    """
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"{sampler}: prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                         f"got {prediction_type!r}")
