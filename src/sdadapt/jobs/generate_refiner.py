"""``generate --refiner``: the SDXL base then the SDXL refiner in one sampler run (diffusers' "ensemble of experts",
A1111's "Refiner: switch at") — or any model then another of its latent space, as A1111's Refiner takes any
checkpoint (:func:`check_refiner_pair`; that refiner gets the run's networks, :mod:`sdadapt.jobs.second_model`).

diffusers runs two pipelines: ``StableDiffusionXLPipeline(denoising_end=f, output_type="latent")`` steps the grid's
timesteps ``t >= round(T - f·T)`` (pipeline_stable_diffusion_xl.py, ``discrete_timestep_cutoff``), then
``StableDiffusionXLImg2ImgPipeline(image=latents, denoising_start=f)`` builds the same grid and steps the rest,
``t < round(T - f·T)`` (``get_timesteps``), from those latents as they are (``add_noise=False``: no noise added,
nothing decoded). A1111 switches the checkpoint inside one k-diffusion run at the first model call whose timestep
(the σ's nearest index) has ``(999 - t) / 1000 >= f`` (sd_samplers_common.apply_refiner) — for integer timesteps the
same cut when ``f`` has at most three decimals (A1111's slider steps 0.01; 0.3333: A1111 one timestep later).
sdadapt does A1111's design with diffusers' cut (A1111's own on A1111's σ grids, :meth:`RefinerHandoff.late`; the
refiner keeps the run once it took a call, as A1111's loaded model): one sampler run over the grid, each model call
to the base
(with its two encoders' conditioning and 6 time ids) while ``t >= round(T - f·T)``, to the refiner (OpenCLIP-G,
its aesthetic score's 5 time ids) after. For a one-step deterministic sampler (``ddim``, ``euler``, ``lcm`` ...)
that is diffusers' two pipelines exactly; a multistep sampler (DPM++ 2M, UniPC, LMS, PNDM) keeps its history
across the switch and a second-order one (Heun, DPM2) may switch between a step's two calls, as A1111's does,
where diffusers' refiner starts a fresh scheduler (and moves an even cut of a 2nd-order grid by one); an ancestral
sampler's noise continues one generator where diffusers' second pipeline draws from the generator it is given.
That restart is not offered: A1111 does not restart, and sdadapt's run equals one diffusers scheduler stepped over
both models (tests/test_refiner_a1111.py; docs/train.md, "Multistep samplers keep one solver").

:class:`RefinerHandoff` is the switch as :meth:`~sdadapt.diffusers_system.DiffusersSystem.sample` takes it
(``refiner=``), so it rides on every run ``generate`` makes, as A1111's ``apply_refiner`` sits in its denoiser: an
img2img run's shortened grid, the hires fix's passes (:func:`sdadapt.jobs.generate_hires.sample_image`, A1111's
"Hires fix: which pass to enable refiner for"), a prompt plan (re-encoded by the refiner, its call count running on).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import Tensor

from ..denoised_branches import ReadDenoised, denoised_of
from ..sampler_tables import (  # (their one home; re-exported here)
    A1111_SECOND_ORDER,
    a1111_total_steps,
)

__all__ = ["A1111_SECOND_ORDER", "REFINER_HIRES_PASSES", "RefinerHandoff", "a1111_total_steps", "check_refiner_hires_pass",
           "check_refiner_pair", "handoff_report", "refiner_cutoff", "sample_base_then_refiner"]

#: A1111's setting "Hires fix: which pass to enable refiner for" (``hires_fix_refiner_pass``, default "second pass";
#: modules/shared_options.py), as ``generate --refiner-hires-pass`` names it
REFINER_HIRES_PASSES: tuple[str, ...] = ("second", "first", "both")


def check_refiner_hires_pass(value: str) -> None:
    """Refuse a ``--refiner-hires-pass`` that is not one of :data:`REFINER_HIRES_PASSES`.

    Raises:
        ValueError: naming the choices.
    """
    if value not in REFINER_HIRES_PASSES:
        raise ValueError(f"--refiner-hires-pass must be one of {', '.join(REFINER_HIRES_PASSES)} (A1111's "
                         f"'Hires fix: which pass to enable refiner for'), got {value!r}")


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
    """Refuse a pair that cannot hand latents over. The SDXL refiner (:attr:`is_refiner`) takes over from an SDXL base
    only; any other model — A1111's "Refiner" takes any checkpoint — must be a plain text-to-image model (no image
    conditioning, no EDM schedule) and ``base`` not the SDXL refiner. Either way both share a latent space (latent
    channels, VAE scaling factor, VAE factor), a prediction type and a training schedule.

    Raises:
        ValueError: naming the model at fault and the fix.
    """
    if getattr(refiner, "is_refiner", False):
        if not getattr(base, "is_sdxl", False) or getattr(base, "is_refiner", False):
            raise ValueError(f"{refiner_name}: the SDXL refiner refines an SDXL base model's latents (its two text "
                             "encoders) as --model; this --model is "
                             + ("the refiner itself" if getattr(base, "is_refiner", False) else "not SDXL"))
    else:
        unet = getattr(refiner, "unet", None)
        if getattr(base, "unet", None) is None or not hasattr(base, "vae"):
            raise ValueError(f"{refiner_name}: --model is no Stable Diffusion model (the toy model), whose latents no "
                             "refiner takes")
        if unet is None or not hasattr(refiner, "vae"):
            raise ValueError(f"{refiner_name}: it is no Stable Diffusion model (the toy model); give a checkpoint of "
                             "--model's latent space, or the SDXL refiner")
        if getattr(base, "is_refiner", False):
            raise ValueError(f"{refiner_name}: --model is the SDXL refiner, which refines an SDXL base; give the base "
                             "model as --model")
        if getattr(refiner, "edm", None) is not None:
            raise ValueError(f"{refiner_name}: it is an EDM model (Playground v2.5, CosXL), which samples on its own "
                             "schedule; give a model of --model's schedule")
        if (int(unet.config.in_channels) != int(refiner.vae.config.latent_channels)
                or getattr(unet.config, "class_embed_type", None) == "projection"):
            raise ValueError(f"{refiner_name}: its UNet takes image conditioning (an inpainting, InstructPix2Pix or "
                             "unCLIP model); a refiner here is a plain text-to-image model")
    mine = (int(base.vae.config.latent_channels), float(base.scaling_factor), int(getattr(base, "vae_factor", 8)))
    theirs = (int(refiner.vae.config.latent_channels), float(refiner.scaling_factor),
              int(getattr(refiner, "vae_factor", 8)))
    if mine != theirs:
        raise ValueError(f"{refiner_name}: its latent space (channels, VAE scaling factor, VAE factor) {theirs} is "
                         f"not the base's {mine}; the base's latents are handed over undecoded, so both must share "
                         "one VAE's latent space")
    if getattr(base, "prediction_type", "epsilon") != getattr(refiner, "prediction_type", "epsilon"):
        raise ValueError(f"{refiner_name}: it predicts {refiner.prediction_type}, the base {base.prediction_type}; "
                         "give both models the same prediction type (--prediction-type applies to both)")
    if not torch.equal(base.alphas_cumprod.detach().cpu().double(), refiner.alphas_cumprod.detach().cpu().double()):
        raise ValueError(f"{refiner_name}: its training schedule (alphas_cumprod) is not the base's; the one "
                         "sampler grid both run on needs the same schedule")


class RefinerHandoff:
    """A refiner (the SDXL refiner, or any model :func:`check_refiner_pair` takes) taking over a sampler run of the
    base: :meth:`switched` sends each model call to the base while its timestep ``t >= cutoff``
    (:func:`refiner_cutoff` of ``switch_at``) and to the refiner after; ``switch_at=None`` sends every call to the
    refiner (A1111's hires pass once the refiner took over in the first pass: the refiner is
    then the loaded model). :meth:`~sdadapt.diffusers_system.DiffusersSystem.sample` takes it as ``refiner=``.

    Args:
        base, refiner: the base and the refiner (:class:`~sdadapt.diffusers_system.DiffusersSystem`), both held.
        switch_at: A1111's "Switch at", in (0, 1); ``None``: every call the refiner's.
        by_steps: A1111's setting "Refiner switch by sampling steps" (``refiner_switch_by_sample_steps``,
            modules/shared_options.py): the switch counted in model calls over the calls A1111 expects of the run,
            not by timestep — call ``k`` (0-based, counted per sampler run) is the refiner's once
            ``k / a1111_total_steps(sampler, run_steps) >= switch_at`` (modules/sd_samplers_common.py
            ``apply_refiner``: ``completed_ratio = cfg_denoiser.step / cfg_denoiser.total_steps``; ``step`` counts
            ``CFGDenoiser.forward`` calls, modules/sd_samplers_cfg_denoiser.py). Default ``False``: the timestep cut.

    ``calls``: ``{"base": n, "refiner": m}``, the model calls each took so far (over every run it switched).

    Raises:
        ValueError: a ``switch_at`` outside (0, 1); a pair :func:`check_refiner_pair` refuses.
    """

    def __init__(self, base, refiner, *, switch_at: float | None, by_steps: bool = False) -> None:
        check_refiner_pair(base, refiner)
        if getattr(base, "edm", None) is not None:  # (its sampling runs diffusers' EDM schedulers, no handoff)
            raise ValueError("--refiner: this --model is an EDM model (Playground v2.5, CosXL), which samples on its own EDM "
                             "schedule; a refiner takes over from a model on the ᾱ schedule")
        self.refiner = refiner
        self.switch_at = switch_at
        self.by_steps = bool(by_steps)
        self.cutoff = math.inf if switch_at is None else refiner_cutoff(switch_at, len(base.alphas_cumprod))
        self.calls = {"base": 0, "refiner": 0}
        self._taken_before = 0
        acp = base.alphas_cumprod.detach().double().cpu()
        self._train_sigmas = ((1 - acp) / acp).sqrt()  # (T,) the model's σ, A1111's inner_model.sigmas

    @property
    def taken(self) -> bool:
        """True once the refiner took a model call."""
        return self.calls["refiner"] > 0

    def decoder(self, base):
        """The system whose VAE decodes the run's latents: the refiner once it took a call of the last run (A1111
        decodes with the model loaded at the end), else ``base``."""
        return self.refiner if self.calls["refiner"] > self._taken_before else base

    def taken_over(self) -> RefinerHandoff:
        """A handoff that sends every call to the refiner, counting into the same :attr:`calls` (the hires pass once
        the refiner took over in the first pass)."""
        whole = copy.copy(self)  # (a shallow copy: the same calls dict)
        whole.switch_at, whole.cutoff = None, math.inf
        return whole

    def late(self, t: float, *, a1111_grid: bool = False) -> bool:
        """Whether a call at timestep ``t`` is past the switch: diffusers' ``t < cutoff`` (``denoising_end``'s filter
        keeps ``t >= cutoff`` for the base, fractional timesteps as they are), or on one of A1111's σ grids
        (``a1111_grid``) A1111's ``apply_refiner``: the σ's nearest model index ``i`` (``argmin |sigmas - σ|``) with
        ``(T - 1 - i) / T >= switch_at`` — the same for integer timesteps and ``switch_at`` of three decimals, one
        call apart where a fractional ``t`` lies within half a step below the cut."""
        if self.switch_at is None:
            return True
        if not a1111_grid:
            return t < self.cutoff
        from ..samplers.sigma_space import t_to_sigma

        sigma = t_to_sigma(torch.tensor([float(t)], dtype=torch.float64), self._train_sigmas)
        index = int(torch.argmin((self._train_sigmas - sigma).abs()))
        total = len(self._train_sigmas)
        return (total - 1 - index) / total >= self.switch_at

    def late_by_steps(self, call: int, total_steps: int) -> bool:
        """Whether model call ``call`` (0-based, of a run A1111 expects ``total_steps`` calls of:
        :func:`a1111_total_steps`) is past the switch by A1111's "Refiner switch by sampling steps":
        ``call / total_steps >= switch_at`` (``apply_refiner``'s ``completed_ratio``; every call once
        ``switch_at`` is ``None``)."""
        if self.switch_at is None:
            return True
        return call / max(int(total_steps), 1) >= self.switch_at

    def switched(self, base_model: Callable, refiner_model: Callable, *, a1111_grid: bool = False,
                 total_steps: int | None = None) -> Callable:
        """``model(x_t, t, cond)`` that calls ``base_model`` until a call is :meth:`late` (``t``: the batch's
        timesteps, all equal) and ``refiner_model`` from then on — the refiner stays, as A1111's loaded model stays
        (a Restart sampler's climb back up the σ grid is the refiner's too). Each model is guided already (``cond``
        is not read). A prompt plan's :class:`~sdadapt.prompt_guidance.ScheduledGuidance` on either side is told the
        run's call count before each call, so the schedule runs on across the switch (A1111's ``CFGDenoiser.step``).
        ``a1111_grid``: the run is on one of A1111's schedules (``schedule=``), so A1111's cut. With :attr:`by_steps`
        the switch is :meth:`late_by_steps` of the run's call count over ``total_steps`` (required then).

        Raises:
            ValueError: :attr:`by_steps` without ``total_steps``.
        """
        if self.by_steps and total_steps is None:
            raise ValueError("a refiner switched by sampling steps needs the run's total_steps "
                             "(a1111_total_steps(sampler, steps))")
        self._taken_before = self.calls["refiner"]
        done, switched = [0], [False]

        def past(t: Tensor) -> bool:
            if self.by_steps:
                return self.late_by_steps(done[0], total_steps)
            return self.late(float(torch.as_tensor(t).flatten()[0]), a1111_grid=a1111_grid)

        def pick(t: Tensor) -> Callable:
            switched[0] = switched[0] or past(t)
            chosen = refiner_model if switched[0] else base_model
            if hasattr(chosen, "calls"):  # (a ScheduledGuidance: its texts picked by the run's call count)
                chosen.calls = done[0]
            done[0] += 1
            self.calls["refiner" if switched[0] else "base"] += 1
            return chosen

        return _Switched(pick)


class _Switched:
    """:meth:`RefinerHandoff.switched`'s model: each call goes to the model ``pick(t)`` chooses — its x̂0 by branch
    too, where the sampler asks for it (:mod:`sdadapt.denoised_branches`)."""

    def __init__(self, pick: Callable[[Tensor], Callable]) -> None:
        self.pick = pick

    def __call__(self, x_t: Tensor, t: Tensor, _cond: object = None) -> Tensor:
        return self.pick(t)(x_t, t, None)

    def denoised_by_branch(self, read: ReadDenoised, x_t: Tensor, t: Tensor, _cond: object = None, *,
                           sigma: float | Tensor) -> Tensor:
        return denoised_of(self.pick(t), read, x_t, t, None, sigma=sigma)


def sample_base_then_refiner(base, refiner, prompts: list[str], *, switch_at: float, by_steps: bool = False,
                             negative: str = "",
                             seed: int = 0, steps: int = 25, guidance: float = 7.5, sampler: str = "ddim",
                             karras: bool = False, schedule: str | None = None, height: int | None = None,
                             width: int | None = None, noise=None, schedule_options=None,
                             output: str = "images",
                             log: Callable[[str], None] | None = None) -> Tensor:
    """``prompts`` made by ``base`` then ``refiner`` (:class:`~sdadapt.diffusers_system.DiffusersSystem`, both
    SDXL; :func:`check_refiner_pair`) in one run of ``sampler``: images (B, 3, H, W) in [-1, 1] decoded by the
    refiner's VAE (diffusers' refiner pipeline decodes), or ``output="latents"`` (B, 4, H/8, W/8).

    ``base.sample`` with a :class:`RefinerHandoff`: the start noise and the ancestral noise are ``base.sample``'s
    (``torch.Generator().manual_seed(seed)``, or A1111's ``noise``); the grid is the sampler's on the base's schedule
    (``steps``, ``karras``, ``schedule``, ``schedule_options``); each model call is classifier-free guided by the base
    while its timestep ``t >= refiner_cutoff(switch_at)`` and by the refiner after (module docstring: diffusers' two
    pipelines exactly for one-step deterministic samplers); ``by_steps``: A1111's "Refiner switch by sampling steps"
    instead (:class:`RefinerHandoff`). Each model conditions as its own ``sample`` does: the base
    its two encoders and ``(H, W, 0, 0, H, W)``, the refiner OpenCLIP-G and ``(H, W, 0, 0, aesthetic score)`` (its
    negative with the negative aesthetic score; an empty negative encoded, not zeroed). Prompts may carry A1111
    emphasis, as ``sample`` reads it.

    Raises:
        ValueError: a ``switch_at`` outside (0, 1); a pair :func:`check_refiner_pair` refuses.
    """
    handoff = RefinerHandoff(base, refiner, switch_at=switch_at, by_steps=by_steps)
    out = base.sample(prompts, seed=seed, steps=steps, guidance=guidance, negative=negative, sampler=sampler,
                      karras=karras, schedule=schedule, height=height, width=width, noise=noise,
                      schedule_options=schedule_options, output=output, refiner=handoff)
    if log is not None:
        log(handoff_report(handoff))
    return out


def handoff_report(handoff: RefinerHandoff) -> str:
    """The log line of a handoff's model calls (those of the runs it switched: with the hires fix's ``second`` pass
    setting, the first pass is the base's and not counted)."""
    where = ("every call" if handoff.switch_at is None else
             f"switch at {handoff.switch_at:g} of the sampling steps" if handoff.by_steps else
             f"switch at {handoff.switch_at:g}: timesteps below {handoff.cutoff}")
    from ..plurals import plural

    return (f"refiner: {plural(handoff.calls['base'], 'model call')} on the base, {handoff.calls['refiner']} on the "
            f"refiner ({where})")
