"""DPM-Solver (Lu et al. 2022) and DPM-Solver++ (Lu et al. 2022b), second order, as diffusers'
``DPMSolverMultistepScheduler`` (kohya's ``dpmsolver`` / ``dpmsolver++``, A1111's "DPM++ 2M") and
``DPMSolverSinglestepScheduler`` (kohya's ``dpmsingle``) run them with their default configs, and
the stochastic DPM-Solver++ 2M (``algorithm_type="sde-dpmsolver++"``: ``dpmsolver++_sde``, A1111's
"DPM++ 2M SDE" with Gaussian instead of Brownian-tree noise).

They step the VP sample ``x_t = α_t·x0 + σ_t·ε`` (the model sees it unscaled; ``init_noise_sigma``
is 1) in log-SNR ``λ = log(α_t/σ_t)`` with ``h = λ_next − λ``:

* DPM-Solver++ (data prediction D = x̂0), first order (= DDIM):
  ``x' = (σ'/σ)·x − α'·(e^(−h) − 1)·D``;
  multistep 2M (midpoint): the same with ``D = D0 + ½·(D0 − D_prev)/r``, ``r = h_prev/h``.
* SDE-DPM-Solver++: ``x' = (σ'/σ)·e^(−h)·x + α'·(1 − e^(−2h))·D + σ'·√(1 − e^(−2h))·z``, z drawn
  (float32) every step; 2M: ``D = D0 + ½·(D0 − D_prev)/r`` likewise.
* DPM-Solver (noise prediction ε̂), first order: ``x' = (α'/α)·x − σ'·(e^h − 1)·ε̂``; 2M likewise.
* Singlestep 2S: order 1 to the next σ, then one order-2 step from the same start over both
  intervals with the two predictions (orders ``1, 2, 1, 2, ..., 1``).

The grid is diffusers': integer timesteps ``round(linspace(0, T−1, n+1))[::-1][:-1]`` and their σ,
or (``karras=True``, ``use_karras_sigmas``) Karras σ between the training σ_min and σ_max with the
model run at the *rounded* timesteps of those σ; the last σ is 0 (``final_sigmas_type="zero"``),
for ``dpmsolver`` σ_min of t = 0 (diffusers refuses "zero" there and names "sigma_min"; kohya's
``dpmsolver``, built with the class's defaults, fails on the diffusers it pins, 0.32.1). The
multistep update runs in float32 or wider (diffusers upcasts); its first step is first order, and
so is its last when it lands on σ = 0 or, on σ_min (``dpmsolver``), in runs of fewer than 15 steps
(diffusers' ``lower_order_final``).

With a ``schedule`` (one of A1111's grids) the DPM++ samplers that are A1111's k-diffusion samplers
(:data:`K_DIFFUSION_DPMPP`) run k-diffusion's own form on it instead (:mod:`.dpmpp_sigma`: A1111's run, bit for bit
on float32 latents). With ``karras=True`` past the model's T timesteps (A1111's hires pass of 1000 exact steps at
denoising 0.75: a grid of 1333) they run k-diffusion's Karras grid with the model at the unrounded float32 ``t(σ)``
of k-diffusion's ``sigma_to_t`` and diffusers' update (up to T steps diffusers' rounded timesteps, bit for bit as
diffusers).
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..training.diffusion import numpy_linspace
from .a1111_noise import A1111Noise
from .sigma_space import (
    check_prediction_type,
    karras_sigmas,
    sigma_to_t,
    step_noise,
    timestep_batch,
    training_sigmas,
    vp_alpha_sigma,
    vp_data_prediction,
    vp_noise_prediction,
    work_dtype,
)
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from .schedules import ScheduleOptions

__all__ = [
    "K_DIFFUSION_DPMPP",
    "continuous_grid",
    "dpm_grid",
    "dpmsingle_sample",
    "dpmsolver_pp_3m_sde_sample",
    "dpmsolver_pp_sample",
    "dpmsolver_pp_sde_heun_sample",
    "dpmsolver_pp_sde_sample",
    "dpmsolver_sample",
    "require_distinct_steps",
    "singlestep_orders",
    "vp_start",
]


#: the DPM-Solver samplers that are A1111's k-diffusion samplers (``sample_dpmpp_2m``, ``sample_dpmpp_2m_sde``
#: midpoint / Heun, ``sample_dpmpp_3m_sde``): on a continuous σ grid they run more steps than the model's timesteps,
#: the model called at fractional timesteps there (:func:`dpm_grid`'s ``past_timesteps``)
K_DIFFUSION_DPMPP: tuple[str, ...] = ("dpmsolver++", "dpmsolver++_sde", "dpmsolver++_sde_heun", "dpmsolver++_3m_sde")


def continuous_grid(*, karras: bool = False, schedule: str | None = None) -> bool:
    """Whether the DPM-Solver grid of ``karras`` / ``schedule`` (a resolved one of A1111's) is continuous in σ, so it
    holds any step count: Karras σ, or any A1111 schedule but those that pick training steps (``simple``, ``ddim``:
    :func:`.sigma_space.any_step_count`). diffusers' own linspace grid rounds to the model's integer timesteps."""
    from .sigma_space import any_step_count

    return (karras and schedule is None) or (schedule is not None and any_step_count(schedule))


def dpm_grid(alphas_cumprod: Tensor, num_steps: int, *, karras: bool = False,
             final_sigma: str = "zero", schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
             discard_next_to_last_sigma: bool = False, past_timesteps: bool = False) -> tuple[Tensor, Tensor]:
    """The timesteps and noise levels of diffusers' DPM-Solver / UniPC schedulers
    (``timestep_spacing="linspace"``, ``set_timesteps(num_steps)``).

    ``alphas_cumprod`` (T,): the training ᾱ. ``karras``: ``use_karras_sigmas`` (Karras σ, timesteps
    rounded). ``final_sigma``: ``"zero"`` or ``"sigma_min"`` (σ of t = 0), appended after the last step.
    ``schedule``: one of A1111's σ grids instead (:func:`.schedules.schedule_sigmas`, not ``automatic``):
    its σ, the model run at the rounded timesteps ``t(σ)`` as with Karras σ (diffusers' ``use_exponential_sigmas``
    / ``use_beta_sigmas`` truncate them instead: docs/samplers.md), then the schedule's last σ (0 read as
    σ of t = 0 under ``final_sigma="sigma_min"``; ``kl_optimal`` ends on σ_min itself).
    ``discard_next_to_last_sigma``: with a ``schedule``, A1111's option of that name
    (:func:`.schedules.schedule_sigmas`); unused without one. ``past_timesteps``: on Karras σ a grid of more
    steps than the model's T timesteps is built, as k-diffusion's ``get_sigmas_karras(n)`` is, its timesteps then
    the unrounded ``t(σ)`` (k-diffusion's ``sigma_to_t``, where A1111 calls the model: rounding would repeat
    timesteps); up to T steps the grid is the same either way. (The DPM++ samplers that are k-diffusion's run
    A1111's schedules in k-diffusion's own form, :mod:`.dpmpp_sigma`, any step count there.)

    Returns:
        ``timesteps`` (n,) descending: int64, or float64 fractional on a Karras grid past T; ``sigmas`` (n+1,)
        float64 k-diffusion σ (CPU).

    Raises:
        ValueError: ``num_steps`` < 1, or > T but on Karras σ with ``past_timesteps``, an unknown ``final_sigma``.
    """
    T = int(alphas_cumprod.shape[0])
    past = past_timesteps and int(num_steps) > T and karras and schedule is None
    if not 1 <= int(num_steps) <= T and not past:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    if final_sigma not in ("zero", "sigma_min"):
        raise ValueError(f"final_sigma must be 'zero' or 'sigma_min', got {final_sigma!r}")
    n = int(num_steps)
    train = training_sigmas(alphas_cumprod)
    if schedule is not None:
        from .schedules import schedule_sigmas

        full = schedule_sigmas(schedule, n, train, discard_next_to_last_sigma=discard_next_to_last_sigma,
                               options=schedule_options)
        last = full[-1:] if float(full[-1]) > 0 or final_sigma == "zero" else train[:1]
        return sigma_to_t(full[:-1], train).round().long(), torch.cat([full[:-1], last])
    if karras:
        sigmas = karras_sigmas(float(train[0]), float(train[-1]), n)
        timesteps = sigma_to_t(sigmas, train)
        timesteps = timesteps if past else timesteps.round().long()
    else:
        timesteps = numpy_linspace(T - 1, n + 1).round().flip(0)[:-1].long()
        sigmas = train[timesteps]
    last = torch.zeros(1, dtype=torch.float64) if final_sigma == "zero" else train[:1]
    return timesteps, torch.cat([sigmas, last])


def require_distinct_steps(sampler: str, sigmas: list[float], num_train_steps: int) -> None:
    """Raise when two model steps of the grid share a noise level: ``num_steps = T`` on the linspace
    grid rounds two timesteps to the same one; the multistep updates divide by the λ-step between
    them (diffusers returns NaN there).

    Raises:
        ValueError: naming the sampler, the step count and the fix.
    """
    steps = sigmas[:-1]
    if any(a == b for a, b in pairwise(steps)):
        raise ValueError(f"{sampler}: {len(steps)} steps repeat a timestep of the {num_train_steps}-step schedule "
                         f"(diffusers' scheduler returns NaN there); use at most {num_train_steps - 1} steps, "
                         f"or karras=True")


def vp_start(start: Img2ImgStart, x_T: Tensor, sigmas: list[float], *, rule: str) -> tuple[int, Tensor]:
    """img2img on a VP grid of n + 1 noise levels ``sigmas`` (k-diffusion σ): ``(first, x)`` by
    :func:`sdadapt.img2img.vp_add_noise_start` with ᾱ = 1/(σ² + 1) of each step — the first step's index (an
    index in ``start`` being A1111's rule, a strength ``rule``'s) and diffusers' ``add_noise`` at ``sigmas[first]``
    (its ``set_begin_index``), which is A1111's ``init + noise·σ`` as the model sees it (``/√(σ² + 1)``).
    ``first = n`` (diffusers' rule at strength 0): no step, ``x`` the init latent."""
    from ..img2img import vp_add_noise_start

    alphas_cumprod = [1.0 / (float(s) ** 2 + 1.0) for s in sigmas[:-1]]
    return vp_add_noise_start(start, x_T, alphas_cumprod, rule="a1111" if start.index is not None else rule)


def _first_order(x: Tensor, pred: Tensor, s: float, s_next: float, *, data: bool) -> Tensor:
    """One DPM-Solver(++) step of order 1 from noise level ``s`` to ``s_next`` (k-diffusion σ) with the
    data (``data``) or noise prediction ``pred``; the midpoint order-2 step is this one with
    ``pred = D0 + ½·D1``."""
    a, st, lam = vp_alpha_sigma(s)
    a_n, st_n, lam_n = vp_alpha_sigma(s_next)
    h = lam_n - lam
    if data:
        return (st_n / st) * x - (a_n * math.expm1(-h)) * pred
    return (a_n / a) * x - (st_n * math.expm1(h)) * pred


def _sde_first_order(x: Tensor, pred: Tensor, noise: Tensor, s: float, s_next: float) -> Tensor:
    """One SDE-DPM-Solver++ step of order 1 from ``s`` to ``s_next`` (k-diffusion σ) with the data
    prediction ``pred`` and unit ``noise`` (B,C,H,W): ``x' = (σ'/σ)·e^(−h)·x + α'·(1 − e^(−2h))·D
    + σ'·√(1 − e^(−2h))·z`` (diffusers' ``sde-dpmsolver++``; the midpoint order-2 step is this one with
    ``pred = D0 + ½·D1``). At σ' = 0 it is ``D``."""
    _, st, lam = vp_alpha_sigma(s)
    a_n, st_n, lam_n = vp_alpha_sigma(s_next)
    h = lam_n - lam
    keep = -math.expm1(-2.0 * h)  # 1 − e^(−2h)
    return ((st_n / st) * math.exp(-h)) * x + (a_n * keep) * pred + (st_n * keep**0.5) * noise


def _sde_third_order_terms(preds: tuple[Tensor, Tensor, Tensor], lams: tuple[float, float, float, float],
                           s_next: float) -> Tensor:
    """The third-order SDE-DPM-Solver++ correction ``α'·φ₂·D1 + α'·c₃·D2`` (B,C,H,W) added to the first-order
    step over [λ_i, λ_{i+1}] (``lams`` = λ_{i−2}, λ_{i−1}, λ_i, λ_{i+1}) with the data predictions
    ``preds`` = (m2, m1, m0) at the first three: ``D1_0 = (m0 − m1)/r0``, ``D1_1 = (m1 − m2)/r1``
    (``r0 = h_0/h``, ``r1 = h_1/h``), ``D1 = D1_0 + r0/(r0 + r1)·(D1_0 − D1_1)``, ``D2 = (D1_0 − D1_1)/(r0 + r1)``,
    ``φ₂ = (1 − e^(−2h))/(−2h) + 1``, ``c₃ = ½ − (e^(−2h) − 1 + 2h)/(2h)²``: k-diffusion's
    ``sample_dpmpp_3m_sde`` at η = 1 (``φ₂·d1 − φ₃·d2``), the SDE counterpart of diffusers' deterministic
    DPM++ 3M weights (second order: D2 ≈ h²·x̂0''/2, and c₃ is half the Taylor weight of that term, the
    same convention as DPM-Solver's). diffusers 0.42 writes ``c₃ − 1`` for c₃ (its
    ``multistep_dpm_solver_third_order_update``, sde-dpmsolver++ branch; first order): docs/samplers.md."""
    m2, m1, m0 = preds
    l2, l1, l0, l_next = lams
    h, h0, h1 = l_next - l0, l0 - l1, l1 - l2
    r0, r1 = h0 / h, h1 / h
    d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
    d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    a_n = vp_alpha_sigma(s_next)[0]
    phi2 = math.expm1(-2.0 * h) / (2.0 * h) + 1.0
    c3 = 0.5 - (math.expm1(-2.0 * h) + 2.0 * h) / (2.0 * h) ** 2
    return (a_n * phi2) * d1 + (a_n * c3) * d2


def _multistep(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int, prediction_type: str,
               karras: bool, data: bool, callback: StepCallback | None, sde: bool = False,
               generator: torch.Generator | None = None, order: int = 2, heun: bool = False,
               schedule: str | None = None,
               schedule_options: ScheduleOptions | None = None, discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None,
               eta: float = 1.0) -> Tensor:
    label = ("dpmsolver++_3m_sde" if order == 3 else "dpmsolver++_sde_heun" if heun else "dpmsolver++_sde") if sde \
        else "dpmsolver++" if data else "dpmsolver"
    check_prediction_type(label, prediction_type)
    if schedule is not None and label in K_DIFFUSION_DPMPP:  # A1111's grid: A1111's k-diffusion sampler on it
        from .dpmpp_sigma import dpmpp_on_sigmas

        return dpmpp_on_sigmas(label, model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                               prediction_type=prediction_type, generator=generator, callback=callback,
                               schedule=schedule, schedule_options=schedule_options,
                               discard_next_to_last_sigma=discard_next_to_last_sigma, start=start, eta=eta)
    if eta != 1.0:
        raise ValueError(f"{label}: eta (A1111's 'Eta for ancestral samplers') is k-diffusion's, on A1111's grids: give "
                         "a schedule (schedule='automatic' is A1111's default); diffusers' DPMSolverMultistepScheduler "
                         "has none")
    final = "zero" if data else "sigma_min"
    timesteps, sigmas = dpm_grid(alphas_cumprod, num_steps, karras=karras, final_sigma=final, schedule=schedule,
                                 schedule_options=schedule_options,
                                 discard_next_to_last_sigma=discard_next_to_last_sigma,
                                 past_timesteps=label in K_DIFFUSION_DPMPP)
    n = int(timesteps.shape[0])
    sig = sigmas.tolist()
    require_distinct_steps(label, sig, int(alphas_cumprod.shape[0]))
    fractional = timesteps.is_floating_point()  # (past T: float32 t(σ), as the σ samplers and A1111 pass it)
    final_zero = sig[-1] == 0
    lam = [vp_alpha_sigma(s)[2] for s in sig]
    out_dtype = x_T.dtype
    work = work_dtype(x_T)
    x = x_T * 1.0  # init_noise_sigma
    first = 0
    if start is not None:  # img2img (sdadapt.img2img): from grid index `first`, indices kept global
        first, x = vp_start(start, x_T, sig, rule="diffusers")
        if first >= n:
            return x
    brownian = None
    if sde and isinstance(generator, A1111Noise):  # A1111: a Brownian tree per image, seeded with its seed
        from .dpmpp_sde import brownian_noise

        positive = [s for s in sig if s > 0]
        brownian = brownian_noise(x_T.float(), min(positive), max(positive), generator.seeds, source=generator.source)
    prev: Tensor | None = None
    prev2: Tensor | None = None
    for i in range(first, n):
        t = (timestep_batch(float(timesteps[i]), x) if fractional else
             torch.full((x.shape[0],), int(timesteps[i]), dtype=torch.long, device=x.device))
        out = model(x, t)
        a, st, _ = vp_alpha_sigma(sig[i])
        pred = (vp_data_prediction if data else vp_noise_prediction)(out, x, a, st, prediction_type)
        lower_final = i == n - 1 and (n < 15 or final_zero)
        # order 3 (diffusers' solver_order=3): from the third step on, but order 2 on the next-to-last of < 15
        third = order == 3 and prev2 is not None and not lower_final and not (i == n - 2 and n < 15)
        xw = x.to(work)
        # the SDE's noise: float32, drawn every step (the last too) where diffusers' step draws it
        noise = step_noise(out, generator, torch.float32) if sde and brownian is None else None
        if brownian is not None:  # (k-diffusion's noise_sampler(σ_i, σ_{i+1}); none onto σ = 0)
            noise = (brownian(torch.tensor(sig[i], dtype=torch.float32), torch.tensor(sig[i + 1], dtype=torch.float32))
                     if sig[i + 1] > 0 else torch.zeros_like(out, dtype=torch.float32)).to(out.device)
        d = pred
        heun_d1: Tensor | None = None
        if prev is not None and not lower_final and not third:
            h, h_prev = lam[i + 1] - lam[i], lam[i] - lam[i - 1]
            if heun:  # the SDE's Heun form: + α'·φ₂·D1 (φ₂ = (1 − e^(−2h))/(−2h) + 1) instead of the midpoint ½·D1
                heun_d1 = (h / h_prev) * (pred.to(work) - prev.to(work))
            else:
                d = pred + (0.5 * h / h_prev) * (pred - prev)  # D0 + ½·D1, D1 = (m0 − m1)/r, r = h_prev/h
        if noise is not None:
            x_next = _sde_first_order(xw, d, noise.to(work), sig[i], sig[i + 1])
            if heun_d1 is not None:
                h = lam[i + 1] - lam[i]
                x_next = x_next + (vp_alpha_sigma(sig[i + 1])[0] * (math.expm1(-2.0 * h) / (2.0 * h) + 1.0)) * heun_d1
            if third and prev is not None and prev2 is not None:
                x_next = x_next + _sde_third_order_terms((prev2.to(work), prev.to(work), pred.to(work)),
                                                         (lam[i - 2], lam[i - 1], lam[i], lam[i + 1]), sig[i + 1])
        else:
            x_next = _first_order(xw, d, sig[i], sig[i + 1], data=data)
        x = x_next.to(out_dtype)
        prev2, prev = prev, pred
        if callback is not None:
            callback(i, t, x)
    return x


def dpmsolver_pp_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                        prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                        callback: StepCallback | None = None, karras: bool = False,
                        schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
                        discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None) -> Tensor:
    """DPM-Solver++ 2M (diffusers' ``DPMSolverMultistepScheduler`` defaults; with ``schedule``, one of A1111's grids,
    A1111's "DPM++ 2M" / "DPM++ 2M Karras": k-diffusion's ``sample_dpmpp_2m``, :mod:`.dpmpp_sigma`) from unit noise
    x_T (B,C,H,W) -> x0 latents (B,C,H,W).

    ``model(x_t, t)``: the (guided) model at the VP sample x_t (B,C,H,W) and int64 timesteps t (B,);
    ``alphas_cumprod`` (T,); ``callback(i, t, x)`` after each step. Deterministic (``generator`` unused).

    Raises:
        ValueError: an unknown prediction type, ``num_steps`` < 1 or, off a continuous grid, > T
        (:func:`dpm_grid`), or ``num_steps = T``
        without Karras σ (the linspace grid repeats a timestep there).
    """
    return _multistep(model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                      prediction_type=prediction_type, karras=karras, data=True, callback=callback, schedule=schedule,
                      schedule_options=schedule_options,
                      discard_next_to_last_sigma=discard_next_to_last_sigma, start=start)


def dpmsolver_pp_sde_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                            prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                            callback: StepCallback | None = None, karras: bool = False,
                            schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
                            discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None,
                            eta: float = 1.0) -> Tensor:
    """SDE-DPM-Solver++ 2M (diffusers' ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++")``,
    order 2, midpoint; the algorithm of A1111's "DPM++ 2M SDE" with Gaussian noise per step instead of
    k-diffusion's Brownian tree; with ``schedule``, A1111's run itself: :mod:`.dpmpp_sigma`) from unit noise x_T
    (B,C,H,W) -> x0 latents (B,C,H,W).

    Each step is DPM++ 2M's data-prediction update with the stochastic term
    ``x' = (σ'_t/σ_t)·e^(−h)·x + α'(1 − e^(−2h))·(D0 + ½·D1) + σ'_t·√(1 − e^(−2h))·z``; z is unit
    noise drawn from ``generator`` in float32 once per step, the last step included (where it is
    multiplied by σ' = 0), after the model call, as diffusers' ``step`` draws it, so a CPU generator
    with diffusers' seed gives diffusers' result. ``model``, ``alphas_cumprod``, ``callback``,
    ``karras`` as in :func:`dpmsolver_pp_sample`.

    Raises:
        ValueError: an unknown prediction type, ``num_steps`` < 1 or, off a continuous grid, > T
        (:func:`dpm_grid`), or ``num_steps = T``
        without Karras σ (the linspace grid repeats a timestep there).
    """
    return _multistep(model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                      prediction_type=prediction_type, karras=karras, data=True, callback=callback, sde=True,
                      generator=generator, schedule=schedule, schedule_options=schedule_options,
                      discard_next_to_last_sigma=discard_next_to_last_sigma, start=start, eta=eta)


def dpmsolver_pp_sde_heun_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                                 prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                                 callback: StepCallback | None = None, karras: bool = False,
                                 schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
                                 discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None,
                                 eta: float = 1.0) -> Tensor:
    """SDE-DPM-Solver++ 2M, Heun form (``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++",
    solver_type="heun")``; the algorithm of A1111's "DPM++ 2M SDE Heun", k-diffusion's
    ``sample_dpmpp_2m_sde(solver_type="heun")``, with Gaussian noise per step instead of its Brownian tree; with
    ``schedule``, A1111's run itself: :mod:`.dpmpp_sigma`) from unit noise x_T (B,C,H,W) -> x0 latents (B,C,H,W).

    As :func:`dpmsolver_pp_sde_sample` (grid, noise draws, first and last steps order 1) with the order-2
    correction ``α'·((1 − e^(−2h))/(−2h) + 1)·D1`` (``D1 = (m0 − m1)/r``, ``r = h_prev/h``) in place of the
    midpoint's ``½·α'·(1 − e^(−2h))·D1``.

    Raises:
        ValueError: an unknown prediction type or schedule, ``num_steps`` < 1 or, off a continuous grid, > T
        (:func:`dpm_grid`), or ``num_steps = T``
        on diffusers' linspace grid (it repeats a timestep there).
    """
    return _multistep(model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                      prediction_type=prediction_type, karras=karras, data=True, callback=callback, sde=True,
                      generator=generator, heun=True, schedule=schedule, schedule_options=schedule_options,
                      discard_next_to_last_sigma=discard_next_to_last_sigma, start=start, eta=eta)


def dpmsolver_pp_3m_sde_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                               prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                               callback: StepCallback | None = None, karras: bool = False,
                               schedule: str | None = None,
                               schedule_options: ScheduleOptions | None = None,
                               discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None,
                               eta: float = 1.0) -> Tensor:
    """SDE-DPM-Solver++ 3M (``DPMSolverMultistepScheduler(solver_order=3, algorithm_type="sde-dpmsolver++")``;
    A1111's "DPM++ 3M SDE", Gaussian noise per step instead of its Brownian tree; with ``schedule``, A1111's run
    itself: :mod:`.dpmpp_sigma`) from unit noise x_T (B,C,H,W) -> x0 latents (B,C,H,W).

    As :func:`dpmsolver_pp_sde_sample` (grid, noise draws, first step order 1, last step order 1 onto
    σ = 0, order 2 on the second step and, in runs of fewer than 15 steps, on the next-to-last), with
    third-order multistep steps in between: the first-order SDE step plus ``α'·φ₂·D1 + α'·c₃·D2`` from the
    last three data predictions (see ``_sde_third_order_terms``). Its c₃ is k-diffusion's
    (``sample_dpmpp_3m_sde``'s ``−φ₃``); diffusers 0.42's class uses ``c₃ − 1`` there (a sign slip on its
    ½ term), so on third-order steps this sampler is diffusers' plus ``α'·D2`` (docs/samplers.md).
    ``schedule``: one of A1111's grids (:func:`dpm_grid`); ``discard_next_to_last_sigma`` with it: A1111's
    option of that name, which A1111 sets for this sampler (:func:`.schedules.schedule_sigmas`).

    Raises:
        ValueError: an unknown prediction type, ``num_steps`` < 1 or, off a continuous grid, > T
        (:func:`dpm_grid`), or ``num_steps = T``
        without Karras σ (the linspace grid repeats a timestep there).
    """
    return _multistep(model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                      prediction_type=prediction_type, karras=karras, data=True, callback=callback, sde=True,
                      generator=generator, order=3, schedule=schedule, schedule_options=schedule_options,
                      discard_next_to_last_sigma=discard_next_to_last_sigma, start=start, eta=eta)


def dpmsolver_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                     prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                     callback: StepCallback | None = None, karras: bool = False,
                     schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
                     discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None) -> Tensor:
    """DPM-Solver 2M on the noise prediction (``DPMSolverMultistepScheduler(algorithm_type="dpmsolver",
    final_sigmas_type="sigma_min")``: the last step lands on σ of t = 0, as diffusers requires for
    this algorithm) from unit noise x_T (B,C,H,W) -> x0 latents (B,C,H,W).

    ``model(x_t, t)``: the (guided) model at the VP sample x_t (B,C,H,W) and int64 timesteps t (B,);
    ``alphas_cumprod`` (T,); ``callback(i, t, x)`` after each step. Deterministic (``generator`` unused).

    Raises:
        ValueError: an unknown prediction type, ``num_steps`` outside [1, T], or ``num_steps = T``
        without Karras σ (the linspace grid repeats a timestep there).
    """
    return _multistep(model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                      prediction_type=prediction_type, karras=karras, data=False, callback=callback, schedule=schedule,
                      schedule_options=schedule_options,
                      discard_next_to_last_sigma=discard_next_to_last_sigma, start=start)


def singlestep_orders(num_steps: int) -> list[int]:
    """Solver order of each step of the order-2 singlestep DPM-Solver++ with diffusers' defaults
    (``lower_order_final`` forced on by ``final_sigmas_type="zero"``): ``1, 2, 1, 2, ..., 1``
    ending in ``1, 1`` for an even count."""
    n = int(num_steps)
    orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    orders[-1] = 1
    return orders


def dpmsingle_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                     prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                     callback: StepCallback | None = None, karras: bool = False,
                     schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
                     discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None) -> Tensor:
    """DPM-Solver++ 2S (diffusers' ``DPMSolverSinglestepScheduler`` defaults; kohya's ``dpmsingle``)
    from unit noise x_T (B,C,H,W) -> x0 latents (B,C,H,W).

    Each order-2 step restarts from the sample two σ back with both data predictions; ``model``,
    ``alphas_cumprod``, ``callback`` as in :func:`dpmsolver_pp_sample`. Deterministic. ``start``: img2img
    (:func:`vp_start`); the orders stay those of the whole grid, an order-2 first step run as order 1 (diffusers'
    ``while self.model_outputs[-order] is None: order -= 1``).

    Raises:
        ValueError: an unknown prediction type, ``num_steps`` outside [1, T], or a timestep the grid
        repeats (``num_steps = T`` without Karras σ) where an order-2 step would divide by it.
    """
    check_prediction_type("dpmsingle", prediction_type)
    timesteps, sigmas = dpm_grid(alphas_cumprod, num_steps, karras=karras, final_sigma="zero", schedule=schedule,
                                 schedule_options=schedule_options,
                                 discard_next_to_last_sigma=discard_next_to_last_sigma)
    n = int(timesteps.shape[0])
    sig = sigmas.tolist()
    lam = [vp_alpha_sigma(s)[2] for s in sig]
    orders = singlestep_orders(n)
    if any(orders[i] == 2 and sig[i] == sig[i - 1] for i in range(1, n)):  # an order-2 step over a zero λ-step
        require_distinct_steps("dpmsingle", sig, int(alphas_cumprod.shape[0]))
    out_dtype = x_T.dtype
    work = work_dtype(x_T)
    x = x_T * 1.0
    first = 0
    if start is not None:  # img2img: from grid index `first` (set_begin_index), the orders of the whole grid
        first, x = vp_start(start, x_T, sig, rule="diffusers")
    anchor = x.to(work)  # the sample where the current single step started
    prev: Tensor | None = None
    for i in range(first, n):
        t = torch.full((x.shape[0],), int(timesteps[i]), dtype=torch.long, device=x.device)
        out = model(x, t)
        a, st, _ = vp_alpha_sigma(sig[i])
        pred = vp_data_prediction(out, x, a, st, prediction_type)
        if orders[i] == 1 or prev is None:
            anchor = x.to(work)
            x_next = _first_order(anchor, pred, sig[i], sig[i + 1], data=True)
        else:
            # from σ_{i−1} to σ_{i+1}: D0 = m1 (at σ_{i−1}), D1 = (m0 − m1)/r, r = h_0/h
            h, h0 = lam[i + 1] - lam[i - 1], lam[i] - lam[i - 1]
            d = prev + (0.5 * h / h0) * (pred - prev)
            x_next = _first_order(anchor, d, sig[i - 1], sig[i + 1], data=True)
        x = x_next.to(out_dtype)
        prev = pred
        if callback is not None:
            callback(i, t, x)
    return x
