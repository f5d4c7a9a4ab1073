"""Sampling an EDM-formulation model (Playground v2.5) as diffusers' EDM schedulers do.

An EDM model is a denoiser ``D(x; σ) = c_skip(σ)·x + c_out(σ)·F(c_in(σ)·x, c_noise(σ))`` over continuous σ
(Karras et al. 2022, table 1), with σ_data the data's std::

    c_skip = σ_data² / (σ² + σ_data²)      c_out = ±σ·σ_data / √(σ² + σ_data²)   (− for v-prediction)
    c_in   = 1 / √(σ² + σ_data²)           c_noise = ¼·ln σ

(diffusers ``schedulers/scheduling_edm_euler.py`` ``precondition_inputs`` / ``precondition_noise`` /
``precondition_outputs``, the same in ``scheduling_edm_dpmsolver_multistep.py``; ComfyUI
``comfy/model_sampling.py`` ``EDM.calculate_denoised`` and ``ModelSamplingContinuousEDM.timestep``). ``F`` is
the UNet, called with ``c_noise`` as its timestep. The samplers here equal diffusers' two EDM schedulers
built from the model's scheduler config (``Scheduler.from_config(pipe.scheduler.config)``), step for step:

* ``euler`` — ``EDMEulerScheduler`` (``s_churn`` 0, as its pipeline calls it): σ grid computed in float64
  then rounded to float32, ``x ← x + (x − D)/σ · (σ_next − σ)``.
* ``dpmsolver++`` / ``dpmsolver++_sde`` — ``EDMDPMSolverMultistepScheduler`` with ``algorithm_type``
  ``dpmsolver++`` / ``sde-dpmsolver++`` (the config's ``solver_order``, ``solver_type``, ``lower_order_final``,
  ``euler_at_final``), σ grid in float32; α = 1 (the inputs are pre-scaled), so λ = −ln σ.

Both start from unit noise times diffusers' ``init_noise_sigma`` = √(σ_max² + 1) and end at σ = 0
(``final_sigmas_type`` ``zero``) or σ_min (``sigma_min``). Classifier-free guidance mixes the UNet outputs
``F`` (the pipeline's ``noise_pred``), before the preconditioning, as diffusers' SDXL pipeline does.

img2img, the hires fix's second pass and inpainting (``start=``, an :class:`sdadapt.img2img.Img2ImgStart`, the
contract every sampler of :mod:`sdadapt.samplers` takes) follow diffusers' ``StableDiffusionXLImg2ImgPipeline`` and
``StableDiffusionXLInpaintPipeline`` with these schedulers (:func:`edm_start`, :func:`edm_inpaint_blend`): the grid
of ``steps`` steps is built whole and run from ``t_start = steps − int(steps·strength)`` (``get_timesteps``, the
scheduler's ``set_begin_index``: the step counters and the solver's last-step order rules see the whole grid, its
history starts empty), from ``init + σ[t_start]·noise`` (the EDM schedulers' ``add_noise``); the inpainting pipeline
starts from ``noise·init_noise_sigma`` at strength 1 and blends after every step
``x ← (1 − m)·(init + σ_next·noise) + m·x`` (the init unnoised after the last step).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .sigma_space import karras_sigmas

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from ..perturbed_attention import PerturbedAttentionGuidance

__all__ = ["EDM_SAMPLERS", "EDMSchedule", "check_edm_request", "edm_dpmsolver_sample", "edm_euler_sample",
           "edm_inpaint_blend", "edm_own_grid", "edm_precondition", "edm_sample_latents", "edm_sigmas", "edm_start"]

#: sampler name -> (diffusers scheduler class, its algorithm_type)
EDM_SAMPLERS: dict[str, tuple[str, str | None]] = {
    "euler": ("EDMEulerScheduler", None),
    "dpmsolver++": ("EDMDPMSolverMultistepScheduler", "dpmsolver++"),
    "dpmsolver++_sde": ("EDMDPMSolverMultistepScheduler", "sde-dpmsolver++"),
}

Model = Callable[[Tensor, Tensor], Tensor]
Blend = Callable[[int, Tensor], Tensor]


@dataclass(frozen=True)
class EDMSchedule:
    """The EDM part of a diffusers scheduler config (the defaults: diffusers' EDM schedulers', which are
    Playground v2.5's). The solver fields are ``EDMDPMSolverMultistepScheduler``'s; the Euler sampler ignores them."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    sigma_schedule: str = "karras"
    rho: float = 7.0
    prediction_type: str = "epsilon"
    final_sigmas_type: str = "zero"
    solver_order: int = 2
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> EDMSchedule:
        """From a scheduler config dict (``scheduler_config.json``); unknown keys are ignored, as diffusers'
        ``from_config`` ignores them.

        Raises:
            ValueError: a value diffusers' EDM schedulers do not take (or ``thresholding``, which sdadapt does
                not run), naming the key.
        """
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known}
        schedule = cls(**values)
        if schedule.sigma_schedule not in ("karras", "exponential"):
            raise ValueError(f"EDM scheduler config: sigma_schedule must be 'karras' or 'exponential', got "
                             f"{schedule.sigma_schedule!r}")
        if schedule.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"EDM scheduler config: prediction_type must be 'epsilon' or 'v_prediction' (diffusers' "
                             f"precondition_outputs), got {schedule.prediction_type!r}")
        if schedule.final_sigmas_type not in ("zero", "sigma_min"):
            raise ValueError(f"EDM scheduler config: final_sigmas_type must be 'zero' or 'sigma_min', got "
                             f"{schedule.final_sigmas_type!r}")
        if schedule.solver_order not in (1, 2, 3) or schedule.solver_type not in ("midpoint", "heun"):
            raise ValueError(f"EDM scheduler config: solver_order 1-3 and solver_type 'midpoint' or 'heun', got "
                             f"{schedule.solver_order!r} / {schedule.solver_type!r}")
        if not 0 < schedule.sigma_min < schedule.sigma_max or schedule.sigma_data <= 0:
            raise ValueError(f"EDM scheduler config: needs 0 < sigma_min < sigma_max and sigma_data > 0, got "
                             f"{schedule.sigma_min}, {schedule.sigma_max}, {schedule.sigma_data}")
        if config.get("thresholding"):
            raise ValueError("EDM scheduler config: thresholding=True (dynamic thresholding of the denoised latents) "
                             "is not run by sdadapt; set it false in scheduler/scheduler_config.json")
        return schedule

    @property
    def init_noise_sigma(self) -> float:
        """diffusers' ``init_noise_sigma``: √(σ_max² + 1) (what the start noise is multiplied by)."""
        return (self.sigma_max ** 2 + 1) ** 0.5


def edm_precondition(sigma: Tensor, *, sigma_data: float, prediction_type: str = "epsilon"
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` at noise level ``sigma`` (any shape; the module docstring's
    formulas, in ``sigma``'s dtype).

    Raises:
        ValueError: a ``prediction_type`` other than ``epsilon`` / ``v_prediction``.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"EDM preconditioning takes prediction_type 'epsilon' or 'v_prediction', got {prediction_type!r}")
    total = sigma ** 2 + sigma_data ** 2
    c_skip = sigma_data ** 2 / total
    c_out = sigma * sigma_data / total ** 0.5
    if prediction_type == "v_prediction":
        c_out = -c_out
    c_in = 1 / total ** 0.5
    c_noise = 0.25 * torch.log(sigma)
    return c_skip, c_out, c_in, c_noise


def edm_sigmas(schedule: EDMSchedule, num_steps: int, *, sampler: str) -> Tensor:
    """The (num_steps + 1,) float32 σ grid diffusers' scheduler for ``sampler`` sets (``set_timesteps``): Karras'
    ρ grid (or log-linear, ``exponential``) from σ_max to σ_min, then 0 (or the last σ). The Euler scheduler
    computes it in float64, the DPM-Solver one in float32, as diffusers does.

    Raises:
        ValueError: ``num_steps`` < 1, or a sampler not in :data:`EDM_SAMPLERS`.
    """
    if num_steps < 1:
        raise ValueError(f"steps must be >= 1, got {num_steps}")
    if sampler not in EDM_SAMPLERS:
        raise ValueError(f"unknown EDM sampler {sampler!r}; use one of {', '.join(EDM_SAMPLERS)}")
    euler = sampler == "euler"
    dtype = torch.float64 if euler else torch.float32
    if schedule.sigma_schedule == "karras":
        sigmas = karras_sigmas(schedule.sigma_min, schedule.sigma_max, num_steps, rho=schedule.rho, dtype=dtype)
    else:  # (k-diffusion's get_sigmas_exponential, as diffusers' _compute_exponential_sigmas: float32 linspace)
        sigmas = torch.linspace(math.log(schedule.sigma_min), math.log(schedule.sigma_max), num_steps).exp().flip(0)
    sigmas = sigmas.to(torch.float32)
    if schedule.final_sigmas_type == "zero":
        last = torch.zeros(1)
    else:  # (Euler: the grid's last σ; DPM-Solver: the config's sigma_min)
        last = sigmas[-1:].clone() if euler else torch.tensor([schedule.sigma_min], dtype=torch.float32)
    return torch.cat([sigmas, last])


def edm_start(start: Img2ImgStart | None, x_T: Tensor, sigmas: Tensor, *, schedule: EDMSchedule
              ) -> tuple[int, Tensor]:
    """Where an EDM sampler on the (n + 1,) grid ``sigmas`` starts and from what: ``(first, x)`` (B, C, H, W).

    No ``start`` (txt2img): ``(0, x_T·init_noise_sigma)``. Otherwise diffusers' img2img rule for every EDM sampler
    (:func:`sdadapt.img2img.start_index` ``rule="diffusers"``: ``start.index`` as given, else
    ``t_start = n − min(int(n·strength), n)``, ``get_timesteps`` in ``pipeline_stable_diffusion_xl_img2img.py``) and
    the EDM schedulers' ``add_noise`` at ``sigmas[first]``: ``init + x_T·σ`` (``scheduling_edm_euler.py``
    ``add_noise``, the same in ``scheduling_edm_dpmsolver_multistep.py``; ``prepare_latents`` calls it at the first
    kept timestep). With ``start.mask`` at strength 1 (no ``index``): ``x_T·init_noise_sigma``, the inpainting
    pipeline's ``is_strength_max`` start (``pipeline_stable_diffusion_xl_inpaint.py`` ``prepare_latents``).
    ``first = n`` (strength 0): no step, ``x`` the init latent (diffusers' pipelines refuse it).
    """
    if start is None:
        return 0, x_T * schedule.init_noise_sigma
    from ..img2img import start_index

    n = sigmas.shape[0] - 1
    init = start.init_like(x_T).to(torch.float32)
    if start.mask is not None and start.index is None and start.strength in (None, 1.0):
        return 0, x_T * schedule.init_noise_sigma
    first = start_index(start, n, rule="diffusers")
    if first >= n:
        return n, init
    return first, init + x_T.to(torch.float32) * sigmas[first].to(x_T.device)


def edm_inpaint_blend(start: Img2ImgStart | None, x_T: Tensor, sigmas: Tensor) -> Blend | None:
    """diffusers' inpainting blend for a 4-channel UNet (``StableDiffusionXLInpaintPipeline``'s loop, after each
    ``scheduler.step``): ``blend(i, x)`` after step ``i`` of the (n + 1,) grid ``sigmas`` is
    ``(1 − m)·p + m·x`` with ``m`` = ``start.mask`` (1 or B, 1, H, W; 1 = repaint) and ``p = init + x_T·σ[i + 1]``
    (``add_noise`` at the next timestep: the scheduler's ``step_index`` once the step is done), ``p = init`` after
    the last step. ``None`` without a mask, and for an inpainting UNet (``start.conditioning``: its 9-channel input
    carries the mask and the masked image; the pipeline blends only for a 4-channel UNet)."""
    if start is not None and start.soft_inpainting is not None:
        raise ValueError("soft inpainting is A1111's; an EDM model's samplers blend as diffusers' inpaint pipeline "
                         "(no soft blend): leave it out")
    if start is None or start.mask is None or start.conditioning is not None:
        return None
    init = start.init_like(x_T).to(torch.float32)
    mask = start.mask.to(device=x_T.device, dtype=torch.float32)
    noise = x_T.to(torch.float32)
    n = sigmas.shape[0] - 1

    def blend(i: int, x: Tensor) -> Tensor:
        proper = init if i == n - 1 else init + noise * sigmas[i + 1].to(x.device)
        return (1 - mask) * proper + mask * x

    return blend


def _denoised(model: Model, x: Tensor, sigma: Tensor, schedule: EDMSchedule) -> Tensor:
    """``D(x; σ)`` (B, C, H, W) for a 0-dim float32 ``sigma``: the UNet on ``c_in·x`` at ``c_noise``, mixed
    into the denoised latent (diffusers' ``scale_model_input`` then ``precondition_outputs``)."""
    c_skip, c_out, c_in, c_noise = edm_precondition(sigma, sigma_data=schedule.sigma_data,
                                                    prediction_type=schedule.prediction_type)
    out = model(x * c_in.to(x.device), c_noise.to(x.device).expand(x.shape[0]))  # (c_noise as the (B,) timesteps)
    return c_skip.to(x.device) * x + c_out.to(x.device) * out


def edm_euler_sample(model: Model, x_T: Tensor, *, schedule: EDMSchedule, num_steps: int,
                     callback: Callable[[int, Tensor, Tensor], None] | None = None,
                     start: Img2ImgStart | None = None) -> Tensor:
    """Latents (B, C, H, W) from unit noise ``x_T`` (B, C, H, W) by ``EDMEulerScheduler``'s steps.

    ``model(x_in, c_noise)``: the guided UNet output ``F`` for the preconditioned input; ``callback(i, σ, x)``
    after each step (``i`` the step's index on the whole grid). ``start``: img2img / hires / inpainting from its
    init latents (:func:`edm_start`, :func:`edm_inpaint_blend`).
    """
    sigmas = edm_sigmas(schedule, num_steps, sampler="euler")
    first, x = edm_start(start, x_T, sigmas, schedule=schedule)
    blend = edm_inpaint_blend(start, x_T, sigmas)
    for i in range(first, num_steps):
        sigma, after = sigmas[i], sigmas[i + 1]
        x = x.to(torch.float32)
        denoised = _denoised(model, x, sigma, schedule)
        x = x + (x - denoised) / sigma.to(x.device) * (after - sigma).to(x.device)
        if blend is not None:
            x = blend(i, x)
        if callback is not None:
            callback(i, sigma, x)
    return x


def edm_dpmsolver_sample(model: Model, x_T: Tensor, *, schedule: EDMSchedule, num_steps: int,
                         algorithm_type: str = "dpmsolver++", generator: torch.Generator | None = None,
                         callback: Callable[[int, Tensor, Tensor], None] | None = None,
                         start: Img2ImgStart | None = None) -> Tensor:
    """Latents (B, C, H, W) from unit noise ``x_T`` by ``EDMDPMSolverMultistepScheduler``'s steps
    (``algorithm_type`` ``dpmsolver++`` or ``sde-dpmsolver++``; the SDE draws each step's noise from
    ``generator`` on its device, then moves it, as diffusers' ``randn_tensor``).

    With α = 1 and λ = −ln σ, h = λ_next − λ, the first-order step is ``x ← (σ_next/σ)·x + (1 − e^{−h})·D``
    (SDE: ``(σ_next/σ)e^{−h}·x + (1 − e^{−2h})·D + σ_next√(1 − e^{−2h})·z``); the second and third orders
    add diffusers' ``D1`` / ``D2`` differences of the previous denoised latents. The order drops at the last
    step(s) by the config's ``lower_order_final`` / ``euler_at_final`` / ``final_sigmas_type`` rule.
    ``start``: img2img / hires / inpainting (:func:`edm_start`, :func:`edm_inpaint_blend`): the steps from its
    first index on, the order rules still counted on the whole grid and the history empty at the first step
    (diffusers' ``set_begin_index``; ``lower_order_nums`` 0); ``callback(i, σ, x)`` with ``i`` on the whole grid.

    Raises:
        ValueError: another ``algorithm_type``, or the third order with the SDE (diffusers has none).
    """
    if algorithm_type not in ("dpmsolver++", "sde-dpmsolver++"):
        raise ValueError(f"algorithm_type must be 'dpmsolver++' or 'sde-dpmsolver++', got {algorithm_type!r}")
    sde = algorithm_type == "sde-dpmsolver++"
    order = schedule.solver_order
    if sde and order == 3:
        raise ValueError("the EDM DPM-Solver SDE has no third-order step (diffusers' neither); use solver_order 2")
    sigmas = edm_sigmas(schedule, num_steps, sampler="dpmsolver++")
    one = torch.tensor(1)  # (diffusers' alpha_t: an integer tensor)
    lam = [torch.log(one) - torch.log(s) for s in sigmas]  # λ = log α − log σ
    first, x = edm_start(start, x_T, sigmas, schedule=schedule)
    blend = edm_inpaint_blend(start, x_T, sigmas)
    outputs: list[Tensor | None] = [None] * order
    lower = 0
    for i in range(first, num_steps):
        last = i == num_steps - 1
        final_low = last and (schedule.euler_at_final or (schedule.lower_order_final and num_steps < 15)
                              or schedule.final_sigmas_type == "zero")
        second_low = i == num_steps - 2 and schedule.lower_order_final and num_steps < 15
        denoised = _denoised(model, x, sigmas[i], schedule)
        outputs = [*outputs[1:], denoised]
        noise = None
        if sde:
            noise = torch.randn(denoised.shape, generator=generator, dtype=denoised.dtype,
                                device=generator.device if generator is not None else denoised.device).to(denoised.device)
        s_t, s_0 = sigmas[i + 1], sigmas[i]
        h = lam[i + 1] - lam[i]
        dev = x.device
        if order == 1 or lower < 1 or final_low:
            if sde:
                x = ((s_t / s_0 * torch.exp(-h)).to(dev) * x + (1 - torch.exp(-2.0 * h)).to(dev) * denoised
                     + (s_t * torch.sqrt(1.0 - torch.exp(-2 * h))).to(dev) * noise)
            else:
                x = (s_t / s_0).to(dev) * x - (one * (torch.exp(-h) - 1.0)).to(dev) * denoised
        elif order == 2 or lower < 2 or second_low:
            m0, m1 = outputs[-1], outputs[-2]
            r0 = (lam[i] - lam[i - 1]) / h
            d0, d1 = m0, (1.0 / r0).to(dev) * (m0 - m1)
            if sde:
                decay = (1 - torch.exp(-2.0 * h)).to(dev)
                if schedule.solver_type == "midpoint":
                    tail = 0.5 * decay * d1
                else:
                    tail = ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0).to(dev) * d1
                x = ((s_t / s_0 * torch.exp(-h)).to(dev) * x + decay * d0 + tail
                     + (s_t * torch.sqrt(1.0 - torch.exp(-2 * h))).to(dev) * noise)
            else:
                step = (one * (torch.exp(-h) - 1.0)).to(dev)
                if schedule.solver_type == "midpoint":
                    x = (s_t / s_0).to(dev) * x - step * d0 - 0.5 * step * d1
                else:
                    x = (s_t / s_0).to(dev) * x - step * d0 + (one * ((torch.exp(-h) - 1.0) / h + 1.0)).to(dev) * d1
        else:
            m0, m1, m2 = outputs[-1], outputs[-2], outputs[-3]
            h0, h1 = lam[i] - lam[i - 1], lam[i - 1] - lam[i - 2]
            r0, r1 = h0 / h, h1 / h
            d1_0, d1_1 = (1.0 / r0).to(dev) * (m0 - m1), (1.0 / r1).to(dev) * (m1 - m2)
            d1 = d1_0 + (r0 / (r0 + r1)).to(dev) * (d1_0 - d1_1)
            d2 = (1.0 / (r0 + r1)).to(dev) * (d1_0 - d1_1)
            x = ((s_t / s_0).to(dev) * x - (one * (torch.exp(-h) - 1.0)).to(dev) * m0
                 + (one * ((torch.exp(-h) - 1.0) / h + 1.0)).to(dev) * d1
                 - (one * ((torch.exp(-h) - 1.0 + h) / h ** 2 - 0.5)).to(dev) * d2)
        lower = min(lower + 1, order)
        if blend is not None:
            x = blend(i, x)
        if callback is not None:
            callback(i, sigmas[i], x)
    return x


def edm_own_grid(sigma_schedule: str, *, sampler: str, karras: bool = False, schedule: str | None = None,
                 schedule_options: object = None) -> bool:
    """Whether the σ grid ``karras`` / ``schedule`` ask ``sampler`` for is an EDM model's own, ``sigma_schedule``
    (its scheduler config's: ``"karras"`` for Playground v2.5, :attr:`EDMSchedule.sigma_schedule`), with A1111's
    settings at their defaults (``schedule_options`` ``None`` or ``is_default``). ``schedule``: a schedule name or
    A1111 label, ``"automatic"`` resolved for ``sampler`` as A1111 resolves it
    (:func:`sdadapt.samplers.resolve_schedule`); ``karras``: Karras' ρ grid. An EDM run's infotext names its grid
    ("Schedule type: Karras", :func:`sdadapt.jobs.infotext._edm_grid`; diffusers' docstring of
    ``EDMDPMSolverMultistepScheduler``: "an EDM formulation of the DPM++ 2M Karras scheduler"), so asking for it
    asks for nothing else: the model samples on it either way. ``False`` when no grid is asked for, for another
    grid, a schedule option moved, or a request :func:`~sdadapt.samplers.resolve_schedule` refuses.

    The one rule both the library (:func:`check_edm_request` given ``edm``, which
    :meth:`sdadapt.diffusers_system.DiffusersSystem.sample` passes) and ``generate``'s header check before the model
    loads (``sdadapt.jobs.generate._is_edm_own_grid``) read."""
    if schedule is None and not karras:
        return False
    if schedule_options is not None and not getattr(schedule_options, "is_default", False):
        return False
    from ..sampler_tables import canonical_sampler, resolve_schedule

    try:
        asked = resolve_schedule(canonical_sampler(sampler), schedule, karras)
    except ValueError:  # (an unknown schedule, or karras with another grid: refused as a schedule by the caller)
        return False
    return (asked or "karras") == str(sigma_schedule)


def check_edm_request(name: str, *, karras: bool = False, schedule: str | None = None, noise: object = None,
                      clip_sample: float | None = None, schedule_options: object = None,
                      refiner: object = None, edm: EDMSchedule | None = None) -> None:
    """Refuse, before any work, what an EDM model's samplers do not do here: a sampler diffusers has no EDM
    scheduler for (``name``: a name in :data:`sdadapt.samplers.SAMPLERS`), A1111's σ grids and settings,
    ``karras`` (the EDM grid is Karras' already), A1111's noise, ``clip_sample`` and an SDXL refiner handoff (the
    refiner is a discrete-time model). A ``start`` (img2img / hires / inpainting) runs (:func:`edm_start`).

    ``edm``: the model's schedule. Given, ``karras`` / ``schedule`` naming the model's own σ grid
    (:func:`edm_own_grid` of its ``sigma_schedule``, A1111's settings at their defaults) are not refused: the
    model samples on that grid anyway, so the images are those without the option, bit for bit (what an EDM run's
    infotext pasted back asks). Another grid is refused as without ``edm``.

    Raises:
        ValueError: naming the option, why, and what works.
    """
    if name not in EDM_SAMPLERS:
        raise ValueError(f"sampler {name!r} has no EDM form: an EDM model (Playground v2.5, CosXL) samples with "
                         f"{', '.join(EDM_SAMPLERS)} (diffusers' EDMEulerScheduler and EDMDPMSolverMultistepScheduler; "
                         "the model's own scheduler is EDMDPMSolverMultistepScheduler: --sampler dpmsolver++)")
    if edm is not None and edm_own_grid(edm.sigma_schedule, sampler=name, karras=karras, schedule=schedule,
                                        schedule_options=schedule_options):
        karras, schedule, schedule_options = False, None, None  # (the model's own grid: nothing asked for)
    refused = [label for label, given in (("karras (the EDM σ grid is Karras' ρ grid already)", karras),
                                          ("a schedule (A1111's σ grids are for the discrete-time SD models)",
                                           schedule is not None),
                                          ("schedule options", schedule_options is not None
                                           and not getattr(schedule_options, "is_default", False)),
                                          ("A1111's noise (its seeds draw for the discrete samplers)", noise is not None),
                                          ("clip_sample", clip_sample is not None),
                                          ("a refiner (the SDXL refiner samples on the discrete DDPM schedule)",
                                           refiner is not None)) if given]
    if refused:
        raise ValueError(f"an EDM model (Playground v2.5, CosXL) samples by diffusers' EDM schedulers only; leave out "
                         f"{'; '.join(refused)}")


def edm_sample_latents(model: Callable[[Tensor, Tensor, object], Tensor], x_T: Tensor, cond: object, *,
                       sampler: str, schedule: EDMSchedule, num_steps: int, uncond: object | None = None,
                       guidance_scale: float = 1.0, generator: torch.Generator | None = None,
                       callback: Callable[[int, Tensor, Tensor], None] | None = None,
                       before_model_call: Callable[[int, int], None] | None = None,
                       start: Img2ImgStart | None = None, guidance_rescale: float = 0.0,
                       perturbed_attention: PerturbedAttentionGuidance | None = None) -> Tensor:
    """:func:`sdadapt.samplers.sample_latents` for an EDM model: latents (B, C, H, W) from unit noise ``x_T``
    by ``sampler`` (a name in :data:`EDM_SAMPLERS`), with classifier-free guidance ``u + s·(c − u)`` over the
    UNet outputs when ``uncond`` is given. ``model(x_in, t, cond)``: the system's denoiser (the UNet); ``t`` is
    ``c_noise`` (B,). ``before_model_call(steps_done, calls)``: as :func:`~sdadapt.samplers.sample_latents`.
    ``start``: img2img / hires fix / inpainting from its init latents (``start.index``, or its strength by
    diffusers' rule; ``start.mask``: diffusers' inpainting blend), :func:`edm_start`. ``guidance_rescale``: φ of
    :func:`sdadapt.guidance_rescale.rescale_guidance` on the guided UNet outputs (diffusers' SDXL pipeline's); 0 off.
    ``perturbed_attention``: PAG on the UNet outputs (:class:`sdadapt.perturbed_attention.PerturbedAttentionGuidance`,
    its adaptive scale reading ``t`` as diffusers' SDXL PAG pipeline reads an EDM scheduler's timesteps).

    Raises:
        ValueError: a sampler diffusers has no EDM scheduler for (names the ones there are).
    """
    from ..training import diffusion
    from . import _announced, canonical_sampler, run_sampling_steps

    name = canonical_sampler(sampler)
    check_edm_request(name)
    guided = diffusion.guided(model, cond, uncond, guidance_scale, guidance_rescale=guidance_rescale,
                              perturbed_attention=perturbed_attention)
    launch = getattr(before_model_call, "launch", None)
    if launch is not None:  # (the run's steps, diffusers' img2img rule: sample_latents' launch)
        launch(run_sampling_steps(name, num_steps, start=start))
    if before_model_call is not None:
        guided, callback = _announced(guided, callback, before_model_call)

    def fn(x: Tensor, t: Tensor) -> Tensor:
        return guided(x, t, cond)

    if start is not None:  # (the noise multiplier for img2img: the start's noise, and the inpainting blend's)
        x_T = start.start_noise(x_T)
    if name == "euler":
        return edm_euler_sample(fn, x_T, schedule=schedule, num_steps=num_steps, callback=callback, start=start)
    return edm_dpmsolver_sample(fn, x_T, schedule=schedule, num_steps=num_steps, algorithm_type=EDM_SAMPLERS[name][1],
                                generator=generator, callback=callback, start=start)
