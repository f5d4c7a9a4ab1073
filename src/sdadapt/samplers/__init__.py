"""Samplers: from unit noise to latents with any ``model(x, t, cond)``, by the schedulers people
sample with (kohya's ``sample_sampler`` names, diffusers' scheduler classes, A1111's samplers).

Every sampler here equals the diffusers scheduler of the same name built with that class's
defaults on the model's ᾱ (as kohya's ``get_my_scheduler`` builds it), step for step; the
ancestral ones draw their noise from ``generator`` in the order diffusers does, so a CPU
generator with the same seed gives the same image. ``karras=True`` is diffusers'
``use_karras_sigmas`` (A1111's "Karras" samplers) where the scheduler has it. Three exceptions:
``dpmpp_2s_a`` (k-diffusion's ``sample_dpmpp_2s_ancestral``; diffusers has no such class) runs on the
Euler σ grid; ``dpmsolver++_3m_sde`` corrects one weight of diffusers' third-order SDE step; ``dpmpp_sde``
draws its Brownian tree's seed from ``generator`` (diffusers: from the global RNG) and needs torchsde.
``schedule=`` is A1111's "Schedule type" (:mod:`.schedules`): the σ samplers on A1111's grids instead of
diffusers' (:data:`SCHEDULE_SAMPLERS`), DPM2, DPM2 a and DPM++ 3M SDE with A1111's ``discard_next_to_last_sigma``
(:data:`DISCARD_NEXT_TO_LAST_SIGMA`); ``schedule_options=`` A1111's settings for those grids (:class:`ScheduleOptions`).
``generator`` may be an :class:`.a1111_noise.A1111Noise`: the ancestral noise and the Brownian trees' seeds are then
A1111's (its per-image generators, NV or CPU source, ENSD).

``sample_latents`` is the one entry point: it adds classifier-free guidance
(:func:`sdadapt.training.diffusion.guided`) and dispatches by name. ``ddim`` is
:func:`sdadapt.training.diffusion.ddim_sample` with the options the caller passes (the system's
own DDIM configuration).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..cond_padding import CondPadding
from ..denoised_branches import ReadDenoised, denoised_of, reading_first
from ..guidance_rescale import GuidanceRescale, as_guidance_rescale
from ..sampler_tables import (  # (the names and checks, torch-free: their one home, re-exported here)
    CHURN_SAMPLERS,
    DISCARD_NEXT_TO_LAST_SIGMA,
    KARRAS_SAMPLERS,
    SAMPLER_ALIASES,
    SAMPLERS,
    SCHEDULE_SAMPLERS,
    SCHEDULES,
    SGM_SAMPLERS,
    a1111_total_steps,
    canonical_sampler,
    check_karras,
    resolve_schedule,
    runs_a1111_timesteps,
)
from ..training import diffusion
from ..uncond_skip import UncondSkip

if TYPE_CHECKING:
    from ..dynamic_thresholding import DynamicThresholding
    from ..img2img import Img2ImgStart
    from ..perturbed_attention import PerturbedAttentionGuidance
    from ..self_attention_guidance import SelfAttentionGuidance
from .a1111_timesteps import (
    a1111_ddim_cfgpp_sample,
    a1111_ddim_sample,
    a1111_plms_sample,
)
from .ddpm import ddpm_sample
from .dpm2 import dpm2_ancestral_sample, dpm2_sample
from .dpm_fast_adaptive import dpm_adaptive_sample, dpm_fast_sample
from .dpm_solver import (
    dpmsingle_sample,
    dpmsolver_pp_3m_sde_sample,
    dpmsolver_pp_sample,
    dpmsolver_pp_sde_heun_sample,
    dpmsolver_pp_sde_sample,
    dpmsolver_sample,
)
from .dpmpp_2s_a import dpmpp_2s_ancestral_sample
from .dpmpp_sde import dpmpp_sde_sample
from .euler import euler_ancestral_sample, euler_sample
from .heun import heun_sample
from .lcm import lcm_sample
from .lms import lms_sample
from .pndm import pndm_sample
from .restart import restart_sample
from .schedules import ScheduleOptions
from .sigma_space import model_sigmas, work_dtype
from .unipc import unipc_sample
from .unipc_a1111 import a1111_unipc_sample

__all__ = ["DISCARD_NEXT_TO_LAST_SIGMA", "KARRAS_SAMPLERS", "KDIFFUSION_ONLY", "SAMPLERS", "SAMPLER_ALIASES", "SCHEDULES",
           "SCHEDULE_SAMPLERS", "ScheduleOptions", "canonical_sampler", "check_downcast_run", "check_karras",
           "guidance_rescale_for_run", "resolve_schedule", "run_sampling_steps", "run_total_steps", "sample_latents"]

#: σ samplers whose A1111 grid (a ``schedule``) runs A1111's k-diffusion arithmetic bit for bit on float32 / half
#: latents (:mod:`.sigma_space`: float32 σ table, ``x·c_in``, float32 ``sigma_to_t``): there ``schedule="karras"``
#: stays A1111's float32 Karras grid instead of ``karras=True`` (diffusers' float64 one, as on float64 latents)
_A1111_FLOAT32: tuple[str, ...] = ("euler", "heun", "lms", "dpmpp_2s_a", "dpm_2", "dpm_2_a", "dpmpp_sde",
                                   "dpmsolver++", "dpmsolver++_sde", "dpmsolver++_sde_heun", "dpmsolver++_3m_sde")

#: samplers without a diffusers class (k-diffusion's, A1111's Restart): guided on x̂0 with or without a schedule
KDIFFUSION_ONLY: tuple[str, ...] = ("dpmpp_2s_a", "dpm_fast", "dpm_adaptive", "restart")

#: sampler name -> its function ``fn(model, x_T, *, alphas_cumprod, num_steps, prediction_type, generator,
#: callback[, karras][, **options]) -> x0`` (``ddim`` is dispatched separately, with its own options)
_SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "ddpm": ddpm_sample,
    "pndm": pndm_sample,
    "lms": lms_sample,
    "euler": euler_sample,
    "euler_a": euler_ancestral_sample,
    "heun": heun_sample,
    "dpm_2": dpm2_sample,
    "dpm_2_a": dpm2_ancestral_sample,
    "dpmsolver": dpmsolver_sample,
    "dpmsolver++": dpmsolver_pp_sample,
    "dpmsingle": dpmsingle_sample,
    "unipc": unipc_sample,  # not a kohya name: diffusers' UniPCMultistepScheduler
    "dpmsolver++_sde": dpmsolver_pp_sde_sample,  # not a kohya name: algorithm_type="sde-dpmsolver++"
    "lcm": lcm_sample,  # not a kohya name: diffusers' LCMScheduler (LCM models, LCM-LoRA); A1111's LCM on a schedule
    "dpmpp_sde": dpmpp_sde_sample,  # not a kohya name: diffusers' DPMSolverSDEScheduler (needs torchsde)
    "dpmpp_2s_a": dpmpp_2s_ancestral_sample,  # not a kohya name: k-diffusion's sample_dpmpp_2s_ancestral
    "dpmsolver++_3m_sde": dpmsolver_pp_3m_sde_sample,  # not a kohya name: solver_order=3, sde-dpmsolver++
    "dpmsolver++_sde_heun": dpmsolver_pp_sde_heun_sample,  # not a kohya name: sde-dpmsolver++, solver_type="heun"
    "dpm_fast": dpm_fast_sample,  # not a kohya name: k-diffusion's sample_dpm_fast (num_steps = model calls)
    "dpm_adaptive": dpm_adaptive_sample,  # not a kohya name: k-diffusion's sample_dpm_adaptive (its own steps)
    "restart": restart_sample,  # not a kohya name: A1111's restart_sampler (Heun + restart segments, Karras σ)
    "plms": a1111_plms_sample,  # not a kohya name: A1111's PLMS (sd_samplers_timesteps_impl.plms)
    "ddim_cfgpp": a1111_ddim_cfgpp_sample,  # not a kohya name: A1111's DDIM CFG++
    "unipc_a1111": a1111_unipc_sample,  # not a kohya name: A1111's UniPC (its uni_pc port, bh1, order 3)
}
# (SAMPLERS, sdadapt.sampler_tables: "ddim" and these names, in this order; tests/test_cli_parse_tables.py)
def sample_latents(model: Callable[[Tensor, Tensor, object], Tensor], x_T: Tensor, cond: object, *, sampler: str,
                   alphas_cumprod: Tensor, num_steps: int, uncond: object | None = None, guidance_scale: float = 1.0,
                   prediction_type: str = "epsilon", karras: bool = False, generator: torch.Generator | None = None,
                   callback: Callable[[int, Tensor, Tensor], None] | None = None, schedule: str | None = None,
                   discard_next_to_last_sigma: bool | None = None, schedule_options: ScheduleOptions | None = None,
                   start: Img2ImgStart | None = None,
                   before_model_call: Callable[[int, int], None] | None = None,
                   uncond_skip: UncondSkip | None = None, pad_conds: CondPadding | None = None,
                   guidance_rescale: float | GuidanceRescale = 0.0,
                   perturbed_attention: PerturbedAttentionGuidance | None = None,
                   self_attention_guidance: SelfAttentionGuidance | None = None,
                   dynamic_thresholding: DynamicThresholding | None = None, **options) -> Tensor:
    """Latents (B,C,H,W) sampled from unit noise ``x_T`` (B,C,H,W) by ``sampler``, with
    classifier-free guidance ``u + s·(c − u)`` when ``uncond`` is given: over the model outputs on diffusers' grids
    (diffusers' pipelines), over each output's x̂0 on A1111's (a ``schedule``; ``dpmpp_2s_a``, ``dpm_fast``,
    ``dpm_adaptive``, ``restart`` always), as A1111's ``CFGDenoiser`` (:mod:`sdadapt.denoised_branches`).
    ``uncond_skip``: A1111's "Skip Early CFG" / NGMS (:class:`sdadapt.uncond_skip.UncondSkip`; NGMS on A1111's grids);
    ``pad_conds``: ``cond`` and ``uncond`` padded to one length first (:class:`sdadapt.cond_padding.CondPadding`).
    ``guidance_rescale``: a :class:`sdadapt.guidance_rescale.GuidanceRescale` on each combination (checked by
    :func:`guidance_rescale_for_run`), or its φ: where it is combined — the outputs on diffusers' grids (diffusers'
    ``guidance_rescale``), x̂0 on A1111's σ grids and ε on its timestep samplers (A1111's "CFG Rescale" extension);
    0 off. ``perturbed_attention``: perturbed-attention guidance on every call
    (:class:`sdadapt.perturbed_attention.PerturbedAttentionGuidance`, hooked on ``model``'s UNet; its term on the
    outputs on diffusers' grids, on x̂0 on A1111's); ``None`` off. ``self_attention_guidance``: self-attention
    guidance on every call (:class:`sdadapt.self_attention_guidance.SelfAttentionGuidance`: diffusers' SAG pipeline on
    diffusers' grids, ComfyUI's / Forge's on A1111's σ grids; refused on A1111's timestep samplers and LCM).
    ``dynamic_thresholding``: A1111's / Forge's "CFG Scale Fix" in place of every combination
    (:class:`sdadapt.dynamic_thresholding.DynamicThresholding`; on A1111's σ grids only, a ``schedule`` needed:
    :func:`sdadapt.dynamic_thresholding.check_dynamic_thresholding_run`).

    ``model(x_t, t, cond)``: the denoiser (a system's ``denoiser()``); ``alphas_cumprod`` (T,):
    its training schedule (float16: A1111's "Downcast alphas_cumprod", read as A1111 reads it on its σ samplers,
    :func:`.sigma_space.downcast_alphas_cumprod`; refused elsewhere); ``generator``: the ancestral samplers' noise
    (drawn on the generator's device, then moved, as diffusers does); ``callback(i, t, x)`` sees each step's sample;
    ``options``: the sampler's own (``ddim``: ``eta``, ``final_alpha_cumprod``, ``clip_sample``...).
    ``schedule``: A1111's "Schedule type" (:func:`resolve_schedule`; ``None``: the sampler's diffusers grid),
    for :data:`SCHEDULE_SAMPLERS`, ``"automatic"`` on ``ddim``: A1111's own DDIM (:mod:`.a1111_timesteps`; without a
    schedule ``ddim`` is diffusers' ``DDIMScheduler``; ``plms`` and ``ddim_cfgpp`` are A1111's PLMS and DDIM CFG++
    always); ``"karras"`` on a sampler in :data:`KARRAS_SAMPLERS` is ``karras=True``, but on
    DPM2, DPM2 a and DPM++ 3M SDE (:data:`DISCARD_NEXT_TO_LAST_SIGMA`), which run any schedule as A1111 does:
    the grid of n + 1 steps without its next-to-last σ (``karras=True`` alone stays diffusers' Karras grid).
    ``discard_next_to_last_sigma`` (with a ``schedule``): ``None``, A1111's choice per sampler (those three);
    ``True``, every sampler (A1111's setting "Always discard next-to-last sigma"); ``False``, none. It does nothing
    where the schedule resolves to the sampler's own steps (``"automatic"`` on ``ddim``, ``lcm``...), as in A1111.
    ``schedule_options``: A1111's settings sigma min/max, rho, Beta α/β, old Karras σ
    (:class:`.schedules.ScheduleOptions`), for a ``schedule`` (``"karras"`` then runs A1111's grid, not diffusers').
    ``generator``: an :class:`.a1111_noise.A1111Noise` draws A1111's sampler noise (docs/samplers.md).
    ``start``: img2img / hires fix — start from its init latents part way along the grid
    (:class:`sdadapt.img2img.Img2ImgStart`: its ``index`` as given, or from its strength by the sampler's rule —
    A1111's for :data:`sdadapt.img2img.A1111_RULE_SAMPLERS`, diffusers' for the others; every sampler takes it); with ``start.mask``, inpainting on a
    4-channel model: A1111's blend (:func:`sdadapt.inpaint.masked_model`, then ``samples·mask + init·(1 − mask)``).
    ``before_model_call(steps_done, calls)``: called before each call of ``model``, with the steps finished so far
    (the ``callback`` calls: every sampler calls it once after each step; ``dpm_adaptive``: the tries, rejected ones
    too, k-diffusion's ``info['steps']``) and ``model``'s calls since the last of them (0: the step's first call) —
    e.g. to switch weights between model calls
    (:mod:`sdadapt.jobs.generate_lbw_steps`). One announced call is one guided sampler model call (both halves of
    classifier-free guidance, batched or not: :func:`sdadapt.training.diffusion.guided`). A ``before_model_call``
    with a ``launch(steps)`` method hears the run's steps first (:func:`run_sampling_steps`, A1111's
    ``launch_sampling``: e.g. :class:`sdadapt.freeu.FreeUSteps`).

    Raises:
        ValueError: an unknown sampler or schedule, ``karras=True`` for a sampler without Karras σ, a schedule
            for a sampler without a σ grid, ``discard_next_to_last_sigma=True`` without a schedule, or
            ``schedule_options`` other than the defaults without a schedule, or a ``start`` for a sampler that
            cannot start from an image.
    """
    name = canonical_sampler(sampler)
    guidance_rescale = guidance_rescale_for_run(guidance_rescale, name, schedule=schedule,
                                                prediction_type=prediction_type)
    if self_attention_guidance is not None:
        from ..self_attention_guidance import check_sag_run

        check_sag_run(name, schedule=schedule)
    if dynamic_thresholding is not None:
        from ..dynamic_thresholding import check_dynamic_thresholding_run

        check_dynamic_thresholding_run(name, schedule=schedule)
    if start is not None:
        from ..img2img import check_img2img_sampler, img2img_rule

        check_img2img_sampler(name)
        if start.extra_noise and img2img_rule(name, schedule) != "a1111":
            raise ValueError(f"extra_noise is A1111's 'Extra noise multiplier for img2img and hires fix', added where "
                             f"A1111 starts from an image; {name} runs diffusers' img2img here: give it a schedule "
                             "(schedule='automatic' is A1111's default) or take an A1111 sampler")
    if options.get("churn") is not None and name not in CHURN_SAMPLERS:
        raise ValueError(f"churn (A1111's Sigma churn settings) is for {', '.join(CHURN_SAMPLERS)}, not {name}")
    tuned = schedule_options is not None and not schedule_options.is_default
    if tuned and schedule_options.always_discard_next_to_last_sigma and discard_next_to_last_sigma is None:
        discard_next_to_last_sigma = True  # (A1111's setting "Always discard next-to-last sigma")
    if tuned and schedule is None:
        raise ValueError("schedule_options (A1111's sigma min/max, rho, Beta α/β, always discard next-to-last "
                         "sigma) shape one of A1111's schedules: "
                         "give a schedule too (schedule='automatic' is A1111's default)")
    timesteps = runs_a1111_timesteps(name, schedule)  # (A1111's DDIM, PLMS, DDIM CFG++: .a1111_timesteps)
    if tuned and schedule_options.sgm_noise_multiplier and start is None and (timesteps or name not in SGM_SAMPLERS):
        raise ValueError(f"A1111's SGM noise multiplier (schedule_options.sgm_noise_multiplier) starts a txt2img run "
                         f"of its k-diffusion samplers from x_T·√(1 + σ_0²); {name} does not start from x_T·σ_0 on its "
                         f"grid here (A1111's timestep samplers, DPM fast / adaptive and diffusers' own are not "
                         f"built for it): leave it out, or take one of {', '.join(SGM_SAMPLERS)}")
    if discard_next_to_last_sigma and schedule is None and not timesteps:
        raise ValueError("discard_next_to_last_sigma=True drops a σ of A1111's grid: give a schedule too "
                         "(schedule='automatic' is A1111's default); without one the sampler runs diffusers' grid")
    if alphas_cumprod.dtype == torch.float16:
        check_downcast_run(name, schedule=schedule, karras=karras)
    schedule = resolve_schedule(name, schedule, karras)
    run_grid = "automatic" if timesteps else schedule  # (sampler_tables.run_schedule's: A1111's own timesteps kept)
    discard = bool(discard_next_to_last_sigma) if timesteps else schedule is not None and (
        name in DISCARD_NEXT_TO_LAST_SIGMA if discard_next_to_last_sigma is None
        else bool(discard_next_to_last_sigma))  # (A1111: n + 1 σ, less one; its timesteps: one more)
    if schedule == "karras" and name in KARRAS_SAMPLERS and not discard and not tuned and not (
            name in _A1111_FLOAT32 and work_dtype(x_T) != torch.float64) and dynamic_thresholding is None \
            and alphas_cumprod.dtype != torch.float16:
        karras, schedule = True, None
    check_karras(name, karras)
    a1111 = schedule is not None or name in KDIFFUSION_ONLY or timesteps  # (A1111's path: by branch, σ known)
    if uncond_skip is not None and uncond_skip.ngms > 0 and not a1111:
        raise ValueError(f"NGMS (A1111's 'Negative Guidance minimum sigma') compares each model call's σ, which "
                         f"sdadapt reads on A1111's grids only; {name} runs diffusers' grid here: give it a schedule "
                         "(schedule='automatic' is A1111's default) or leave NGMS out")
    # guidance first, once: A1111's CFGDenoiser (its call count over the run's expected calls, for uncond_skip)
    model = diffusion.guided(model, cond, uncond, guidance_scale, uncond_skip=uncond_skip,
                             total_steps=run_total_steps(name, num_steps, start=start, schedule=run_grid),
                             pad_conds=pad_conds, guidance_rescale=guidance_rescale,
                             perturbed_attention=perturbed_attention,
                             self_attention_guidance=self_attention_guidance,
                             dynamic_thresholding=dynamic_thresholding)
    launch = getattr(before_model_call, "launch", None)
    if launch is not None:  # (A1111's launch_sampling: the pass's steps, for what counts them per call)
        launch(run_sampling_steps(name, num_steps, start=start, schedule=run_grid))
    if before_model_call is not None:  # (one announced call per guided call, as A1111's on_cfg_denoiser fires once
        # per CFGDenoiser.forward, also where the conditionings do not batch)
        if name == "dpm_adaptive":  # (its steps_done: the tries, each reported after all its calls, as k-diffusion)
            model, options["tried"] = _announced_tries(model, before_model_call, options.pop("tried", None))
        else:
            model, callback = _announced(model, callback, before_model_call)
    if start is not None and start.mask is not None:  # inpainting on a 4-channel model: A1111's blend
        return _inpaint(model, x_T, cond, sampler=name, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                        prediction_type=prediction_type, karras=karras,
                        generator=generator, callback=callback, schedule=run_grid,
                        start=start,
                        discard_next_to_last_sigma=discard if schedule is not None or timesteps else None,
                        schedule_options=schedule_options if tuned else None, **options)
    if start is not None:  # (A1111's noise multiplier for img2img, once: not again in _inpaint's run above)
        x_T = start.start_noise(x_T)
    if timesteps:
        run = a1111_ddim_sample if name == "ddim" else _SAMPLERS[name]
        return run(_A1111Denoiser(model, cond), x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                   prediction_type=prediction_type, generator=generator, callback=callback, start=start,
                   discard_next_to_last_sigma=discard, **options)
    if name == "ddim":
        if start is not None:  # img2img / hires fix: diffusers' strength rule (sdadapt.img2img)
            from ..img2img import ddim_img2img

            return ddim_img2img(lambda x, t, _c: model(x, t, cond), x_T, start,
                                alphas_cumprod=alphas_cumprod, num_steps=num_steps, prediction_type=prediction_type,
                                generator=generator, callback=callback, **options)
        return diffusion.ddim_sample(model, x_T, cond, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                                     prediction_type=prediction_type, generator=generator, callback=callback,
                                     **options)
    run = _SAMPLERS[name]
    if karras:
        options["karras"] = True
    if schedule is not None:
        options["schedule"] = schedule
        if tuned:  # (every sampler with a σ grid takes them on to schedules.schedule_sigmas)
            options["schedule_options"] = schedule_options
    if discard:
        options["discard_next_to_last_sigma"] = True
    if start is not None:
        options["start"] = start
    bound = _A1111Denoiser(model, cond) if a1111 else lambda x, t: model(x, t, cond)
    return run(bound, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
               prediction_type=prediction_type, generator=generator, callback=callback, **options)


def check_downcast_run(sampler: str, *, schedule: str | None, karras: bool = False) -> None:
    """Refuse a float16 ᾱ (A1111's "Downcast alphas_cumprod", :func:`.sigma_space.downcast_alphas_cumprod`) for a
    run of ``sampler`` on ``schedule`` (``karras``: diffusers' Karras grid) that does not read A1111's σ table of it.

    Raises:
        ValueError: A1111's timestep samplers (DDIM with a schedule, PLMS, DDIM CFG++, its UniPC), LCM, or diffusers'
            grid (no ``schedule``, DDPM's and PNDM's own steps), naming the sampler and what to do.
    """
    name = canonical_sampler(sampler)
    timesteps = runs_a1111_timesteps(name, schedule)
    schedule = resolve_schedule(name, schedule, karras)
    if timesteps or name == "lcm":
        raise ValueError(f"a float16 ᾱ (A1111's 'Downcast alphas_cumprod') is read here by A1111's σ samplers, from "
                         f"its σ table; {name} steps on ᾱ itself, which sdadapt does not run in float16: take a σ "
                         "sampler (euler, dpmpp_2m...) or leave the downcast out")
    if schedule is None and name not in KDIFFUSION_ONLY:
        raise ValueError(f"a float16 ᾱ (A1111's 'Downcast alphas_cumprod') is A1111's; {name} without a schedule runs "
                         "diffusers' grid: give a schedule (schedule='automatic' is A1111's default) or leave the "
                         "downcast out")


def guidance_rescale_for_run(guidance_rescale: float | GuidanceRescale | None, sampler: str, *,
                             schedule: str | None, prediction_type: str, edm: bool = False) -> GuidanceRescale | None:
    """The :class:`~sdadapt.guidance_rescale.GuidanceRescale` a run of ``sampler`` on ``schedule`` (``None``:
    diffusers' grid) of a model predicting ``prediction_type`` takes (``None``: off), its ``outputs_are_v`` set;
    ``edm``: an EDM model (Playground v2.5, CosXL), sampled by diffusers' EDM schedulers.

    Raises:
        ValueError: a rescale in v (ComfyUI's RescaleCFG) where a call's σ is not read: A1111's timestep samplers
            (DDIM with a schedule, PLMS, DDIM CFG++, its UniPC) and LCM, diffusers' grid on a model that does not
            predict v, or an EDM model — naming the sampler and what to do instead.
    """
    rescale = as_guidance_rescale(guidance_rescale)
    if rescale is None or rescale.space != "v":
        return rescale
    if edm:
        raise ValueError("an EDM model (Playground v2.5, CosXL) rescales its guidance as diffusers' SDXL pipeline does, on "
                         "the UNet outputs: leave the rescale's space 'combined'")
    name = canonical_sampler(sampler)
    if runs_a1111_timesteps(name, schedule) or name == "lcm":
        raise ValueError(f"a guidance rescale in v (ComfyUI's RescaleCFG) reads each call's σ; {name} steps on "
                         "timesteps here: take a σ sampler (euler, dpmsolver++...) or rescale where it combines "
                         "(space 'combined')")
    v = prediction_type == "v_prediction"
    if schedule is None and name not in KDIFFUSION_ONLY and not v:
        raise ValueError(f"a guidance rescale in v (ComfyUI's RescaleCFG) reads each call's σ, which {name} on "
                         f"diffusers' grid does not; the model predicts {prediction_type}, not v: give a schedule "
                         "(schedule='automatic' is A1111's default) or rescale where it combines (space 'combined')")
    return GuidanceRescale(rescale.phi, "v", outputs_are_v=v)


def run_total_steps(sampler: str, num_steps: int, *, start: Img2ImgStart | None = None,
                    schedule: str | None = None) -> int:
    """A1111's ``CFGDenoiser.total_steps`` of a sampler run (:func:`sdadapt.sampler_tables.a1111_total_steps`) of the
    steps it takes (:func:`run_sampling_steps`)."""
    name = canonical_sampler(sampler)
    return a1111_total_steps(name, run_sampling_steps(name, num_steps, start=start, schedule=schedule))


def run_sampling_steps(sampler: str, num_steps: int, *, start: Img2ImgStart | None = None,
                       schedule: str | None = None) -> int:
    """The steps a sampler run takes, A1111's ``launch_sampling(steps)`` (``state.sampling_steps``): ``num_steps``,
    less an img2img ``start``'s index by the sampler's rule on ``schedule``'s grid (A1111's ``t_enc + 1``;
    :func:`sdadapt.sampler_tables.run_schedule`'s grid: ``"automatic"`` for A1111's own DDIM, which
    ``resolve_schedule`` reads as none, diffusers' DDIM)."""
    if start is None:
        return int(num_steps)
    from ..img2img import img2img_rule, start_index

    name = canonical_sampler(sampler)
    return int(num_steps) - start_index(start, num_steps, rule=img2img_rule(name, schedule))


class _A1111Denoiser:
    """The guided ``fn(x_in, t, cond)`` bound to ``cond`` for a sampler on one of A1111's grids (a ``schedule``;
    :data:`KDIFFUSION_ONLY` always), read as A1111's ``CFGDenoiser`` over its ``CompVisDenoiser`` reads the model:
    each branch's output (half ones in float32, A1111's σ scalings are float32 tensors) read to x̂0, then guidance,
    ``AND`` and the inpainting blend on x̂0 (:mod:`sdadapt.denoised_branches`). Samplers that read no x̂0 call it
    ``(x_in, t)``: ``fn``'s output."""

    def __init__(self, fn: Callable[[Tensor, Tensor, object], Tensor], cond: object) -> None:
        self.fn, self.cond = fn, cond

    def __call__(self, x_in: Tensor, t: Tensor) -> Tensor:
        return self.fn(x_in, t, self.cond)

    def denoised_by_branch(self, read: ReadDenoised, x_in: Tensor, t: Tensor, *, sigma: float | Tensor) -> Tensor:
        read_float32 = reading_first(read, lambda out: out.to(torch.promote_types(out.dtype, torch.float32)))
        return denoised_of(self.fn, read_float32, x_in, t, self.cond, sigma=sigma)


class _Announced:
    """``model(x, t, cond)`` that tells ``before_model_call(done, calls)`` before each call (:func:`sample_latents`):
    ``done`` steps (or tries) finished, as :meth:`finished` last set it, and the calls since."""

    def __init__(self, model: Callable[[Tensor, Tensor, object], Tensor],
                 before_model_call: Callable[[int, int], None]) -> None:
        self.model, self.before_model_call, self.done, self.calls = model, before_model_call, 0, 0

    def __call__(self, x: Tensor, t: Tensor, cond: object) -> Tensor:
        self._announce()
        return self.model(x, t, cond)

    def denoised_by_branch(self, read: ReadDenoised, x: Tensor, t: Tensor, cond: object, *,
                           sigma: float | Tensor) -> Tensor:
        self._announce()
        return denoised_of(self.model, read, x, t, cond, sigma=sigma)

    def _announce(self) -> None:
        self.before_model_call(self.done, self.calls)
        self.calls += 1

    def finished(self, done: int) -> None:
        self.done, self.calls = done, 0


def _announced(model: Callable[[Tensor, Tensor, object], Tensor], callback: Callable[[int, Tensor, Tensor], None] | None,
               before_model_call: Callable[[int, int], None]):
    """``model`` and ``callback`` that tell ``before_model_call(steps_done, calls)`` before each model call
    (:func:`sample_latents`)."""
    announced = _Announced(model, before_model_call)

    def counted_callback(i: int, t: Tensor, x: Tensor) -> None:
        announced.finished(announced.done + 1)
        if callback is not None:
            callback(i, t, x)

    return announced, counted_callback


def _announced_tries(model: Callable[[Tensor, Tensor, object], Tensor],
                     before_model_call: Callable[[int, int], None], tried: Callable[[int], None] | None):
    """``model`` and a ``tried(k)`` for :func:`.dpm_fast_adaptive.dpm_adaptive_sample` that tell
    ``before_model_call(tries_done, calls)`` before each model call (:func:`sample_latents`); ``tried``: the
    caller's own, still called."""
    announced = _Announced(model, before_model_call)

    def counted_try(k: int) -> None:
        announced.finished(k + 1)
        if tried is not None:
            tried(k)

    return announced, counted_try


def _inpaint(model, x_T: Tensor, cond: object, *, sampler: str, alphas_cumprod: Tensor, prediction_type: str,
             karras: bool, schedule: str | None, start: Img2ImgStart, **options) -> Tensor:
    """:func:`sample_latents` with ``start.mask`` (inpainting a 4-channel model, :mod:`sdadapt.inpaint`): the guided
    ``model`` wrapped by :func:`sdadapt.inpaint.masked_model` (A1111's blend), then ``samples·nmask + init·mask``
    (with ``start.soft_inpainting``: its blend, and the samples as they are, A1111's ``is_final_blend``)."""
    from dataclasses import replace

    from ..img2img import DIFFUSERS_RULE_SAMPLERS
    from ..inpaint import blend_denoised, masked_model

    if karras and (sampler in DIFFUSERS_RULE_SAMPLERS or sampler in ("dpm_2", "dpm_2_a")):  # (A1111's grids: t(σ))
        raise ValueError(f"inpainting with a mask reads σ back from the model's timesteps; {sampler} on diffusers' "
                         "Karras σ rounds them, so the blend would be off: inpaint on its own grid, on one of A1111's "
                         "(--schedule karras on float32 latents), or with a σ-grid sampler (euler, euler_a, heun, lms)")
    init = start.init_like(x_T)
    blended = masked_model(model, init=init, latmask=start.mask, sampler=sampler, alphas_cumprod=alphas_cumprod,
                           prediction_type=prediction_type, linear_timesteps=schedule is None and not karras,
                           sigma_table=None if schedule is None else model_sigmas(alphas_cumprod),
                           soft=start.soft_inpainting)
    plain = replace(start, mask=None, soft_inpainting=None)
    latents = sample_latents(blended, x_T, cond, sampler=sampler,
                             alphas_cumprod=alphas_cumprod, prediction_type=prediction_type, karras=karras,
                             schedule=schedule, start=plain, **options)
    return latents if start.soft_inpainting is not None else blend_denoised(latents, init, start.mask)
