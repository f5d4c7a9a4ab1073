"""``generate --refiner``: the SDXL base then the SDXL refiner in one sampler run (diffusers' "ensemble of experts",
A1111's "Refiner: switch at").

diffusers runs two pipelines: ``StableDiffusionXLPipeline(denoising_end=f, output_type="latent")`` steps the grid's
timesteps ``t >= round(T - f·T)`` (pipeline_stable_diffusion_xl.py, ``discrete_timestep_cutoff``), then
``StableDiffusionXLImg2ImgPipeline(image=latents, denoising_start=f)`` builds the same grid and steps the rest,
``t < round(T - f·T)`` (``get_timesteps``), from those latents as they are (``add_noise=False``: no noise added,
nothing decoded). A1111 switches the checkpoint inside one k-diffusion run at the first model call whose timestep
(the σ's nearest index) has ``(999 - t) / 1000 >= f`` (sd_samplers_common.apply_refiner) — for integer timesteps the
same cut when ``f`` has at most three decimals (A1111's slider steps 0.01; 0.3333: A1111 one timestep later). sdadapt does A1111's design with diffusers' cut: one sampler run over the grid, each model call to the base
(with its two encoders' conditioning and 6 time ids) while ``t >= round(T - f·T)``, to the refiner (OpenCLIP-G,
its aesthetic score's 5 time ids) after. For a one-step deterministic sampler (``ddim``, ``euler``, ``lcm`` ...)
that is diffusers' two pipelines exactly; a multistep sampler (DPM++ 2M, UniPC, LMS, PNDM) keeps its history
across the switch and a second-order one (Heun, DPM2) may switch between a step's two calls, as A1111's does,
where diffusers' refiner starts a fresh scheduler (and moves an even cut of a 2nd-order grid by one); an ancestral
sampler's noise continues one generator where diffusers' second pipeline draws from the generator it is given.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["check_refiner_pair", "refiner_cutoff", "sample_base_then_refiner"]


def refiner_cutoff(switch_at: float, num_train_timesteps: int = 1000) -> int:
    """diffusers' ``discrete_timestep_cutoff``: ``int(round(T - switch_at·T))``; the base runs the model calls at
    timesteps ``t >= cutoff``, the refiner those below.

    Raises:
        ValueError: ``switch_at`` outside (0, 1) (diffusers ignores ``denoising_end`` there; A1111's slider is
            0.01-1, 1 never switching: leave ``--refiner`` out instead).
    """
    if not 0.0 < float(switch_at) < 1.0:
        raise ValueError(f"--refiner-switch-at must be in (0, 1) (the fraction of the schedule the base runs; "
                         f"diffusers' denoising_end, A1111's 'Switch at'), got {switch_at}")
    return int(round(num_train_timesteps - float(switch_at) * num_train_timesteps))


def check_refiner_pair(base, refiner, *, refiner_name: str = "--refiner") -> None:
    """Refuse a pair that cannot hand latents over: ``refiner`` not an SDXL refiner, ``base`` not SDXL (or a refiner
    itself), another latent space (latent channels, VAE scaling factor, VAE factor) or another training schedule.

    Raises:
        ValueError: naming the model at fault and the fix.
    """
    if not getattr(refiner, "is_refiner", False):
        raise ValueError(f"{refiner_name}: not the SDXL refiner (sd_xl_refiner_1.0 or a model of its layout: "
                         "OpenCLIP-G alone, an aesthetic score); give the refiner file or folder")
    if not getattr(base, "is_sdxl", False) or getattr(base, "is_refiner", False):
        raise ValueError(f"{refiner_name}: --model must be an SDXL base model (its two text encoders), the refiner "
                         "then refining its latents; this --model is "
                         + ("the refiner itself" if getattr(base, "is_refiner", False) else "not SDXL"))
    mine = (int(base.vae.config.latent_channels), float(base.scaling_factor), int(getattr(base, "vae_factor", 8)))
    theirs = (int(refiner.vae.config.latent_channels), float(refiner.scaling_factor),
              int(getattr(refiner, "vae_factor", 8)))
    if mine != theirs:
        raise ValueError(f"{refiner_name}: its latent space (channels, VAE scaling factor, VAE factor) {theirs} is "
                         f"not the base's {mine}; the base's latents are handed over undecoded, so both must share "
                         "one VAE's latent space (SDXL's)")
    if getattr(base, "prediction_type", "epsilon") != getattr(refiner, "prediction_type", "epsilon"):
        raise ValueError(f"{refiner_name}: it predicts {refiner.prediction_type}, the base {base.prediction_type}; "
                         "give both models the same prediction type (--prediction-type applies to both)")
    if not torch.equal(base.alphas_cumprod.detach().cpu().double(), refiner.alphas_cumprod.detach().cpu().double()):
        raise ValueError(f"{refiner_name}: its training schedule (alphas_cumprod) is not the base's; the one "
                         "sampler grid both run on needs the same schedule")


def sample_base_then_refiner(base, refiner, prompts: list[str], *, switch_at: float, negative: str = "",
                             seed: int = 0, steps: int = 25, guidance: float = 7.5, sampler: str = "ddim",
                             karras: bool = False, schedule: str | None = None, height: int | None = None,
                             width: int | None = None, noise=None, schedule_options=None,
                             output: str = "images",
                             log: Callable[[str], None] | None = None) -> Tensor:
    """``prompts`` made by ``base`` then ``refiner`` (:class:`~sdadapt.diffusers_system.DiffusersSystem`, both
    SDXL; :func:`check_refiner_pair`) in one run of ``sampler``: images (B, 3, H, W) in [-1, 1] decoded by the
    refiner's VAE (diffusers' refiner pipeline decodes), or ``output="latents"`` (B, 4, H/8, W/8).

    The start noise and the ancestral noise are ``base.sample``'s (``torch.Generator().manual_seed(seed)``, or
    A1111's ``noise``); the grid is the sampler's on the base's schedule (``steps``, ``karras``, ``schedule``,
    ``schedule_options`` as :meth:`~sdadapt.diffusers_system.DiffusersSystem.sample`); each model call is
    classifier-free guided by the base while its timestep ``t >= refiner_cutoff(switch_at)`` and by the refiner
    after (module docstring: diffusers' two pipelines exactly for one-step deterministic samplers). Each model
    conditions as its own ``sample`` does: the base its two encoders and ``(H, W, 0, 0, H, W)``, the refiner
    OpenCLIP-G and ``(H, W, 0, 0, aesthetic score)`` (its negative with the negative aesthetic score; an empty
    negative encoded, not zeroed). Prompts may carry A1111 emphasis, as ``sample`` reads it.

    Raises:
        ValueError: a ``switch_at`` outside (0, 1); a pair :func:`check_refiner_pair` refuses.
    """
    from .. import samplers
    from ..diffusers_system import check_image_size
    from ..training import diffusion

    check_refiner_pair(base, refiner)
    cutoff = refiner_cutoff(switch_at, len(base.alphas_cumprod))
    height, width = height or base.image_size, width or base.image_size
    check_image_size(width, height, multiple=base.size_multiple)
    name = samplers.canonical_sampler(sampler)
    samplers.check_karras(name, karras)
    schedule = samplers.resolve_schedule(name, schedule, karras)
    if schedule == "align_your_steps":
        schedule = "align_your_steps_sdxl"
    device = base.alphas_cumprod.device
    if noise is not None:
        g = noise.for_batch(seed, len(prompts))
        x = g.start_noise((len(prompts), *base.latent_shape(height, width))).to(device)
    else:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(len(prompts), *base.latent_shape(height, width), generator=g).to(device)
    count = len(prompts)

    def guided_for(system, last: float | None):
        ids = [height, width, 0, 0] + ([float(last)] if last is not None else [height, width])
        time_ids = torch.tensor([ids], dtype=torch.float32, device=device).expand(count, len(ids))
        cond = system._prompt_condition(prompts, time_ids)
        uncond = system._uncond(negative, cond, count, time_ids)
        return diffusion.guided(system.denoiser(), cond, uncond, guidance), cond

    base_fn, base_cond = guided_for(base, None)
    refiner_fn, refiner_cond = guided_for(refiner, refiner.aesthetic_score)
    calls = {"base": 0, "refiner": 0}

    def switched(x_t: Tensor, t: Tensor, _cond: object) -> Tensor:
        # (t: the sampler's timesteps for the batch, all equal; the base while t >= cutoff, as diffusers' filter)
        if float(torch.as_tensor(t).flatten()[0]) >= cutoff:
            calls["base"] += 1
            return base_fn(x_t, t, base_cond)
        calls["refiner"] += 1
        return refiner_fn(x_t, t, refiner_cond)

    latents = samplers.sample_latents(switched, x, None, sampler=name, alphas_cumprod=base.alphas_cumprod,
                                      num_steps=steps, prediction_type=base.prediction_type, karras=karras,
                                      generator=g, schedule=schedule, schedule_options=schedule_options)
    if log is not None:
        log(f"refiner: {calls['base']} model calls on the base, {calls['refiner']} on the refiner "
            f"(switch at {switch_at:g}: timesteps below {cutoff})")
    return latents if output == "latents" else refiner.decode_latents(latents)
