"""img2img and hires fix: where a sampler starts on its grid, and the latent upscalers.

Two rules decide how much of a sampler's grid an img2img run (or a hires-fix second pass) walks:

* **A1111's** (``modules/sd_samplers_common.py`` ``setup_img2img_steps`` and
  ``sd_samplers_kdiffusion.py`` ``sample_img2img``), for the samplers on the discrete σ grid
  (:data:`A1111_RULE_SAMPLERS`: Euler, Euler a, Heun, DPM2, DPM2 a, LMS, DPM++ 2S a)::

      img2img:       total = steps,                          t_enc = int(min(strength, 0.999) * steps)
      hires / "img2img does exactly the steps" (img2img_fix_steps):
                     total = int(steps / min(strength, 0.999)), t_enc = steps - 1
      grid = sigmas(total)[total - t_enc - 1:]                (t_enc + 1 steps)
      x    = init + noise * grid[0]

* **diffusers'** (``StableDiffusionImg2ImgPipeline.get_timesteps`` / ``prepare_latents``), for the
  samplers sdadapt runs as diffusers' schedulers (:data:`DIFFUSERS_RULE_SAMPLERS`: DDIM and the
  DPMSolverMultistep family)::

      t_start = max(steps - min(int(steps * strength), steps), 0)
      timesteps = timesteps(steps)[t_start:]                  (steps - t_start steps; none: the init latent)
      x = √ᾱ_t0 · init + √(1 − ᾱ_t0) · noise                 (the scheduler's add_noise)

  the multistep solvers keep their global step index (diffusers' ``set_begin_index``).

:class:`Img2ImgStart` is an init latent and where on the grid to start from it: the ``start=`` argument of
:func:`sdadapt.samplers.sample_latents` (which hands it to :func:`sdadapt.samplers.sigma_space.discrete_start`,
its DDIM and :mod:`sdadapt.samplers.dpm_solver`'s multistep solvers) and of ``DiffusersSystem.sample``;
:func:`sdadapt.sampling.generate` builds it from ``init_latents=``.

:func:`upscale_latents` is A1111's latent upscalers (``shared.latent_upscale_modes``): ``torch``'s
``interpolate`` of the (B, C, h, w) latents to the hires size / 8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .sampler_tables import (  # (torch-free: their one home)
    HIRES_UPSCALERS,
    LATENT_UPSCALERS,
    TIMESTEP_SAMPLERS,
    VAE_ENCODE_METHODS,
    runs_a1111_timesteps,
)

__all__ = [
    "A1111_RULE_SAMPLERS",
    "DIFFUSERS_RULE_SAMPLERS",
    "HIRES_UPSCALERS",
    "IMG2IMG_SAMPLERS",
    "LATENT_UPSCALERS",
    "SCHEDULE_FOLLOWS_A1111",
    "VAE_ENCODE_METHODS",
    "Img2ImgStart",
    "a1111_img2img_steps",
    "a1111_start_index",
    "check_fixed_grid",
    "check_img2img_sampler",
    "check_step_count",
    "check_strength",
    "check_vae_encode",
    "ddim_img2img",
    "diffusers_start_index",
    "img2img_rule",
    "init_generator",
    "start_index",
    "takes_any_step_count",
    "upscale_latents",
    "vp_add_noise_start",
    "vp_timestep_start",
]

#: samplers on A1111's σ grid (k-diffusion's samplers and A1111's Restart): A1111's t_enc rule (A1111's timestep
#: samplers take it too: :func:`img2img_rule`)
A1111_RULE_SAMPLERS: tuple[str, ...] = ("euler", "euler_a", "heun", "dpm_2", "dpm_2_a", "lms", "dpmpp_2s_a",
                                        "dpmpp_sde", "restart", "dpm_fast", "dpm_adaptive")
#: samplers run as diffusers' scheduler: diffusers' strength rule
DIFFUSERS_RULE_SAMPLERS: tuple[str, ...] = ("ddim", "dpmsolver", "dpmsolver++", "dpmsolver++_sde",
                                            "dpmsolver++_sde_heun", "dpmsolver++_3m_sde", "dpmsingle", "unipc",
                                            "ddpm", "lcm", "pndm")
#: samplers on the diffusers rule whose grid can be one of A1111's (``schedule=``): on A1111's grid they take
#: A1111's rule, as A1111 runs them on that grid (k-diffusion's ``sample_img2img``)
SCHEDULE_FOLLOWS_A1111: tuple[str, ...] = ("dpmsolver", "dpmsolver++", "dpmsolver++_sde", "dpmsolver++_sde_heun",
                                           "dpmsolver++_3m_sde", "dpmsingle", "unipc", "lcm", "ddim")
IMG2IMG_SAMPLERS: tuple[str, ...] = tuple(dict.fromkeys((*DIFFUSERS_RULE_SAMPLERS, *A1111_RULE_SAMPLERS,
                                                          *TIMESTEP_SAMPLERS)))


def check_img2img_sampler(sampler: str) -> str:
    """``sampler`` (a canonical name) if img2img runs on it.

    Raises:
        ValueError: another sampler, naming those that run.
    """
    if sampler not in IMG2IMG_SAMPLERS:
        raise ValueError(f"img2img / hires fix runs on {', '.join(IMG2IMG_SAMPLERS)}; sampler {sampler!r} cannot start "
                         "from an image yet (pick one of those)")
    return sampler


def img2img_rule(sampler: str, schedule: str | None = None) -> str:
    """``"a1111"`` or ``"diffusers"``: the rule ``sampler`` (a canonical name in :data:`IMG2IMG_SAMPLERS`) starts
    from an image by — A1111's for :data:`A1111_RULE_SAMPLERS`, for A1111's timestep samplers
    (:func:`~sdadapt.sampler_tables.runs_a1111_timesteps`) and, on one of A1111's grids (``schedule`` not None), for
    :data:`SCHEDULE_FOLLOWS_A1111`; diffusers' otherwise.

    Raises:
        ValueError: a sampler that cannot start from an image (:func:`check_img2img_sampler`).
    """
    check_img2img_sampler(sampler)
    if (sampler in A1111_RULE_SAMPLERS or runs_a1111_timesteps(sampler, schedule)
            or (schedule is not None and sampler in SCHEDULE_FOLLOWS_A1111)):
        return "a1111"
    return "diffusers"


def check_vae_encode(method: str) -> str:
    """``method`` if it is one of :data:`VAE_ENCODE_METHODS` (``generate --vae-encode``).

    Raises:
        ValueError: another name, naming those taken.
    """
    if method not in VAE_ENCODE_METHODS:
        raise ValueError(f"--vae-encode must be one of {', '.join(VAE_ENCODE_METHODS)} (how the init image is "
                         f"VAE-encoded), got {method!r}")
    return method


def init_generator(seed: int, *, a1111_noise: bool = False, shape: tuple[int, ...] | None = None) -> torch.Generator:
    """The CPU generator the image of ``seed`` draws its init image's VAE posterior sample from
    (``generate --vae-encode sample``: ``system.encode_images(pixels, generator=g)``).

    sdadapt's own noise: ``torch.Generator().manual_seed(seed)``, to be handed on to
    :func:`sdadapt.sampling.generate` (``generator=g``) so that the start noise (and an ancestral sampler's noise)
    is drawn from it after the posterior sample — diffusers' order (``pipeline_stable_diffusion_img2img.py`` and
    ``pipeline_stable_diffusion_xl_img2img.py`` ``prepare_latents``: ``retrieve_latents(vae.encode(image),
    generator=generator)`` and then ``randn_tensor(shape, generator=generator)``, diffusers 0.42), which makes
    sdadapt's img2img that pipeline's with ``generator=torch.Generator().manual_seed(seed)``.

    ``a1111_noise``: A1111 draws the sample from its global torch RNG at whatever state earlier work left it
    (``modules/sd_samplers_common.py`` ``images_tensor_to_samples`` → ldm's ``get_first_stage_encoding`` →
    ``DiagonalGaussianDistribution.sample``: ``torch.randn``), which no seed reproduces; here the same CPU generator
    after one draw of ``shape`` (the init latents' (1, C, h, w)) is discarded, so the posterior noise is never the
    CPU-source start noise A1111's noise draws for the seed (that generator's first draw). A1111's start and sampler
    noise are left as they are: do not hand this generator to ``generate``.

    Raises:
        ValueError: ``a1111_noise`` without ``shape``.
    """
    g = torch.Generator().manual_seed(int(seed))
    if a1111_noise:
        if shape is None:
            raise ValueError("init_generator(a1111_noise=True) needs shape=, the init latents' (1, C, h, w)")
        torch.randn(tuple(shape), generator=g)  # (discarded: the seed's CPU start noise)
    return g


def check_strength(strength: float) -> float:
    """``strength`` as a float.

    Raises:
        ValueError: a denoising strength outside [0, 1].
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"denoising strength must be in [0, 1], got {strength}")
    return float(strength)


def a1111_img2img_steps(steps: int, strength: float, *, requested: int | None = None,
                        fix_steps: bool = False) -> tuple[int, int]:
    """A1111's ``setup_img2img_steps``: ``(total, t_enc)`` — the grid is built for ``total`` steps and
    ``t_enc + 1`` of them run. ``requested``: the ``steps=`` A1111 passes (the hires pass's
    ``hr_second_pass_steps or steps``); with it, or ``fix_steps`` (A1111's setting "With img2img, do exactly
    the amount of steps the slider specifies"), ``total = int(requested / min(strength, 0.999))``
    (0 at strength 0) and ``t_enc = requested - 1``; else ``total = steps``,
    ``t_enc = int(min(strength, 0.999) * steps)``.

    Raises:
        ValueError: ``steps`` < 1 or a strength outside [0, 1].
    """
    strength = check_strength(strength)
    if steps < 1 or (requested is not None and requested < 1):
        raise ValueError(f"steps must be >= 1, got {steps if requested is None else requested}")
    if fix_steps or requested is not None:
        wanted = requested or steps
        total = int(wanted / min(strength, 0.999)) if strength > 0 else 0
        return total, wanted - 1
    return steps, int(min(strength, 0.999) * steps)


def takes_any_step_count(sampler: str, schedule: str | None = None, *, karras: bool = False) -> bool:
    """Whether ``sampler`` (a canonical name) on ``schedule`` (resolved: one of A1111's grids, or ``None`` for the
    sampler's diffusers grid; ``karras``: diffusers' Karras σ) builds a grid of more steps than the model's training
    timesteps, as A1111 does for k-diffusion's samplers (``get_sigmas(n)`` is continuous in t or σ): the samplers of
    :data:`A1111_RULE_SAMPLERS` on a continuous grid (:func:`sdadapt.samplers.sigma_space.any_step_count`: all
    but A1111's ``simple`` and ``ddim`` schedules), and the DPM++ samplers that are k-diffusion's
    (:data:`sdadapt.samplers.dpm_solver.K_DIFFUSION_DPMPP`: DPM++ 2M, 2M SDE, 2M SDE Heun, 3M SDE) on Karras σ or
    such a schedule, the model then called at fractional timesteps as A1111 calls it. The others step the model's
    integer timesteps as diffusers' schedulers do (``DDIMScheduler``, ``DDPMScheduler`` and ``LCMScheduler`` refuse
    more steps than ``num_train_timesteps``; the DPM-Solver family and UniPC would repeat timesteps; PNDM's leading
    grid has none), or A1111's (its DDIM, PLMS, DDIM CFG++, UniPC: ``range(0, T, T // n)`` needs n ≤ T)."""
    from .samplers.dpm_solver import K_DIFFUSION_DPMPP, continuous_grid
    from .samplers.sigma_space import any_step_count

    if sampler in K_DIFFUSION_DPMPP:
        return continuous_grid(karras=karras, schedule=schedule)
    return sampler in A1111_RULE_SAMPLERS and any_step_count(schedule)


def _any_count_samplers() -> str:
    """The samplers (and grids) that take any step count, for the refusals' fixes."""
    from .samplers.dpm_solver import K_DIFFUSION_DPMPP

    return (f"{', '.join(A1111_RULE_SAMPLERS)}, not on the 'simple' or 'ddim' schedule; "
            f"{', '.join(K_DIFFUSION_DPMPP)} with Karras σ or such a schedule")


def check_step_count(sampler: str, schedule: str | None, *, steps: int, num_train_steps: int, karras: bool = False,
                     steps_option: str = "steps", sampler_option: str = "sampler") -> None:
    """A grid of ``steps`` steps (txt2img, plain img2img) for ``sampler`` on ``schedule`` / ``karras``: refused
    above the model's ``num_train_steps`` where the sampler cannot build it (:func:`takes_any_step_count`;
    A1111 runs its k-diffusion samplers at any count, e.g. ``--steps 1200``).

    Raises:
        ValueError: naming the options and the fixes that work (at most ``num_train_steps`` steps, or a sampler and
            grid that take any count).
    """
    if steps <= num_train_steps or takes_any_step_count(sampler, schedule, karras=karras):
        return
    raise ValueError(f"{steps_option} {steps}: at most {num_train_steps}, the model's training timesteps, for "
                     f"{sampler_option} {sampler} ({_grid_reason(sampler, schedule)}; 20-50 steps are usual); or a "
                     f"sampler whose grid takes any step count ({_any_count_samplers()})")


def _grid_reason(sampler: str, schedule: str | None) -> str:
    """Why ``sampler`` on ``schedule`` takes at most the model's timesteps (the refusals' middle part)."""
    from .samplers.sigma_space import any_step_count

    if runs_a1111_timesteps(sampler, schedule):
        return f"A1111's {sampler} steps its timesteps range(0, T, T // steps)"
    if schedule is not None and not any_step_count(schedule):
        return f"A1111's {schedule!r} schedule picks the model's training steps"
    if schedule is None:
        return f"{sampler} steps the model's integer timesteps, as diffusers' scheduler does"
    return (f"sdadapt's {sampler} is diffusers' scheduler and calls the model at integer timesteps on any schedule "
            "(A1111's k-diffusion DPM++ samplers take fractional ones)")


def _most_fixed_steps(num_train_steps: int) -> int:
    """The most steps A1111 can run exactly on a grid of at most ``num_train_steps``: the largest N with
    ``int(N / 0.999) <= T`` (its strength is capped at 0.999)."""
    n = int(num_train_steps)
    while n > 1 and int(n / 0.999) > num_train_steps:
        n -= 1
    return n


def check_fixed_grid(sampler: str, schedule: str | None, *, steps: int, strength: float, num_train_steps: int,
                     strength_option: str = "denoising_strength", steps_option: str = "img2img_steps",
                     sampler_option: str = "sampler", karras: bool = False) -> None:
    """An img2img pass of ``steps`` steps run exactly (A1111's hires pass, "img2img does exactly the steps") on a
    grid of :func:`a1111_img2img_steps` ``int(steps / min(strength, 0.999))`` steps: refused when that grid is
    longer than the model's ``num_train_steps`` and ``sampler`` on ``schedule`` / ``karras`` cannot build it
    (:func:`takes_any_step_count`; A1111's k-diffusion samplers can, at any length).

    Raises:
        ValueError: naming the options (``*_option``) and a fix that works: the least strength whose grid fits, or,
            where none does (``steps`` >= T: even at 0.999 the grid has ``int(steps / 0.999) > T`` steps), the most
            steps that fit and the samplers that take any step count.
    """
    total, _ = a1111_img2img_steps(steps, strength, requested=steps)
    if total <= num_train_steps or takes_any_step_count(sampler, schedule, karras=karras):
        return
    head = (f"{sampler_option} {sampler}: {steps} steps run exactly at {strength_option} {strength:g} need a grid "
            f"of {total} steps (A1111's int(steps / min(strength, 0.999))), more than the model's "
            f"{num_train_steps} timesteps, and {_grid_reason(sampler, schedule)}")
    least = math.ceil(steps / num_train_steps * 10_000) / 10_000  # (steps / least <= T: the grid fits)
    if least <= 0.999 or int(steps / 0.999) <= num_train_steps:
        raise ValueError(f"{head}: use {strength_option} {min(least, 1.0):g} or more, or fewer {steps_option}")
    raise ValueError(f"{head}; no strength helps (A1111 caps it at 0.999, still a grid of {int(steps / 0.999)} "
                     f"steps): use at most {_most_fixed_steps(num_train_steps)} {steps_option}, or a sampler whose "
                     f"grid takes any step count ({_any_count_samplers()})")


def a1111_start_index(total: int, t_enc: int) -> int:
    """Where A1111's img2img grid starts: ``sigmas[total - t_enc - 1:]`` (never below 0)."""
    return max(total - t_enc - 1, 0)


def diffusers_start_index(steps: int, strength: float) -> int:
    """diffusers' ``get_timesteps``: ``t_start`` (scheduler order 1) — the run walks ``timesteps[t_start:]``."""
    strength = check_strength(strength)
    init_timestep = min(int(steps * strength), steps)
    return max(steps - init_timestep, 0)


def start_index(start: Img2ImgStart, num_steps: int, *, rule: str) -> int:
    """The first grid index a sampler with ``num_steps`` steps runs from ``start``: ``start.index`` when given
    (at most ``num_steps − 1`` under A1111's rule, which always runs a step; up to ``num_steps``, no step, under
    diffusers'), else from ``start.strength`` by ``rule``: ``"a1111"``,
    ``a1111_start_index(num_steps, int(min(S, 0.999)·num_steps))``; ``"diffusers"``, :func:`diffusers_start_index`.

    Raises:
        ValueError: an unknown rule or a strength outside [0, 1].
    """
    strength = 1.0 if start.strength is None else start.strength
    if rule == "a1111":
        if start.index is not None:
            return min(max(int(start.index), 0), num_steps - 1)
        return a1111_start_index(*a1111_img2img_steps(num_steps, strength))
    if rule == "diffusers":
        if start.index is not None:
            return min(max(int(start.index), 0), num_steps)
        return diffusers_start_index(num_steps, strength)
    raise ValueError(f"rule must be 'a1111' or 'diffusers', got {rule!r}")


@dataclass(frozen=True)
class Img2ImgStart:
    """An init latent for the sampler that runs next: start at grid index ``index`` from ``init``
    (B, C, h, w) (the A1111 rule: ``index`` given; the diffusers rule: ``strength``); the samplers take it as
    their ``start=`` argument; ``mask`` / ``conditioning``: inpainting (:mod:`sdadapt.inpaint`)."""

    init: Tensor
    index: int | None = None
    strength: float | None = None
    #: inpainting (:mod:`sdadapt.inpaint`): A1111's latent mask ``latmask`` (1 or B, 1 or C, h, w), 1 = repaint,
    #: 0 = keep ``init`` (blended after every model call and after sampling: :func:`sdadapt.inpaint.masked_model`)
    mask: Tensor | None = None
    #: an inpainting model's ``c_concat`` (B, 5, h, w) (:func:`sdadapt.inpaint.image_conditioning`)
    conditioning: Tensor | None = None
    #: A1111's "Noise multiplier for img2img" (``initial_noise_multiplier``): the start noise times it before the
    #: sampler starts from the image (img2img's ``x *= self.initial_noise_multiplier``; not the hires pass's)
    noise_multiplier: float = 1.0
    #: A1111's "Extra noise multiplier for img2img and hires fix" (``img2img_extra_noise``): ``noise·extra`` more on
    #: the first sample (its ``sample_img2img``: ``xi += noise * extra``, on the timestep samplers ``·√ᾱ`` too)
    extra_noise: float = 0.0
    #: A1111's soft inpainting (:class:`sdadapt.soft_inpainting.SoftInpainting`) with ``mask``: its blend in place of
    #: the linear one, and no blend after sampling (:func:`sdadapt.inpaint.masked_model`)
    soft_inpainting: object = None

    def start_noise(self, x_T: Tensor) -> Tensor:
        """The unit start noise ``x_T`` (B, C, h, w) the sampler starts from the image with: times
        :attr:`noise_multiplier` (as A1111 multiplies its float32 noise in place), else as it is."""
        return x_T if self.noise_multiplier == 1.0 else x_T * self.noise_multiplier

    def init_like(self, x_T: Tensor) -> Tensor:
        """``init`` on ``x_T``'s device and dtype.

        Raises:
            ValueError: ``init`` of another shape than the start noise ``x_T`` (B, C, h, w).
        """
        if tuple(self.init.shape) != tuple(x_T.shape):
            raise ValueError(f"img2img: the init latents are {tuple(self.init.shape)}, the sampler's noise is "
                             f"{tuple(x_T.shape)}; encode the init image at the size being generated")
        return self.init.to(device=x_T.device, dtype=x_T.dtype)

    def noised(self, x_T: Tensor, sigma: float) -> Tensor:
        """A1111's first img2img sample ``init + x_T·σ`` (``sample_img2img``'s ``xi = x + noise · sigma_sched[0]``)
        (B, C, h, w), in the samplers' work dtype (``x_T``'s, at least float32); with :attr:`extra_noise`,
        ``+ x_T·extra`` (its ``xi += noise * opts.img2img_extra_noise``)."""
        work = torch.promote_types(x_T.dtype, torch.float32)
        xi = self.init_like(x_T).to(work) + x_T.to(work) * float(sigma)
        return xi if not self.extra_noise else xi + x_T.to(work) * float(self.extra_noise)

    def timestep_noised(self, x_T: Tensor, alpha_cumprod: Tensor, work: torch.dtype) -> Tensor:
        """A1111's first img2img sample on its timestep samplers (``sd_samplers_timesteps.py`` ``sample_img2img``):
        ``init·√ᾱ + x_T·√(1−ᾱ)`` at the start timestep's float32 ``alpha_cumprod`` (a 0-dim tensor), with
        :attr:`extra_noise` ``+ x_T·extra·√ᾱ`` (B, C, h, w) in ``work``."""
        noise = x_T.to(work)
        xi = self.init_like(x_T).to(work) * alpha_cumprod.sqrt() + noise * (1 - alpha_cumprod).sqrt()
        return xi if not self.extra_noise else xi + noise * float(self.extra_noise) * alpha_cumprod.sqrt()


def vp_add_noise_start(start: Img2ImgStart, x_T: Tensor, alphas_cumprod: list[float], *,
                       rule: str) -> tuple[int, Tensor]:
    """img2img on a VP grid whose n model steps have the cumulative products ``alphas_cumprod`` (n floats, ᾱ of
    each step in order): ``(first, x)``, the first step's index (:func:`start_index` by ``rule``) and diffusers'
    ``add_noise`` there, ``√ᾱ·init + √(1 − ᾱ)·x_T`` (B,C,H,W; in float64 (float32 on MPS), returned in ``x_T``'s dtype);
    ``first = n`` (diffusers' rule at strength 0): no step, the init latent. The one rule behind
    :func:`vp_timestep_start` (integer timesteps) and :func:`sdadapt.samplers.dpm_solver.vp_start` (a σ grid)."""
    n = len(alphas_cumprod)
    first = start_index(start, n, rule=rule)
    init = start.init_like(x_T)
    if first >= n:
        return n, init
    a = float(alphas_cumprod[first])
    work = torch.float32 if x_T.device.type == "mps" else torch.float64  # MPS has no float64
    return first, (a ** 0.5 * init.to(work) + (1 - a) ** 0.5 * x_T.to(work)).to(x_T.dtype)


def vp_timestep_start(start: Img2ImgStart, x_T: Tensor, timesteps: list[int],
                      alphas_cumprod: Tensor) -> tuple[int, Tensor]:
    """img2img on integer ``timesteps`` (n, descending; DDPM, LCM, DDIM): :func:`vp_add_noise_start` by diffusers'
    rule (``start.index`` too) with ᾱ = ``alphas_cumprod[t]`` (T,) of each step."""
    abar = alphas_cumprod.detach().double().cpu()
    return vp_add_noise_start(start, x_T, [float(abar[int(t)]) for t in timesteps], rule="diffusers")


def ddim_img2img(fn, x_T: Tensor, start: Img2ImgStart, *, alphas_cumprod: Tensor, num_steps: int,
                 prediction_type: str, eta: float = 0.0, spacing: str = "leading", steps_offset: int = 1,
                 final_alpha_cumprod: float | None = None, clip_sample: float | None = None,
                 generator: torch.Generator | None = None, callback=None) -> Tensor:
    """DDIM from ``start.init`` (B, C, h, w) by diffusers' img2img rule, ``x_T`` (B, C, h, w) the unit noise
    added at the first kept timestep; ``fn(x, t, cond)``: the guided model. Returns x0 (B, C, h, w); the init
    latent itself when no step is left (strength 0)."""
    from .training.diffusion import ddim_step, ddim_timesteps

    T = alphas_cumprod.shape[0]
    steps = ddim_timesteps(num_steps, num_train_steps=T, spacing=spacing, steps_offset=steps_offset).tolist()
    first, x = vp_timestep_start(start, x_T, steps, alphas_cumprod)  # (start.index or its strength; add_noise)
    ratio = T // num_steps
    for i, t in enumerate(steps[first:]):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = fn(x, tt, None)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if eta else None
        x = ddim_step(out, t, t - ratio, x, alphas_cumprod, prediction_type=prediction_type, eta=eta,
                      final_alpha_cumprod=final_alpha_cumprod, noise=noise, clip_sample=clip_sample)
        if callback is not None:
            callback(i, tt, x)
    return x


def upscale_latents(latents: Tensor, size: tuple[int, int], *, upscaler: str = "latent") -> Tensor:
    """A1111's latent upscale: ``latents`` (B, C, h, w) -> (B, C, H, W) for ``size`` = (H, W) latent pixels,
    ``torch.nn.functional.interpolate`` with the mode and antialias of :data:`LATENT_UPSCALERS`.

    Raises:
        ValueError: an unknown upscaler or a size below 1.
    """
    if upscaler not in LATENT_UPSCALERS:
        raise ValueError(f"latent upscaler must be one of {', '.join(LATENT_UPSCALERS)}, got {upscaler!r}")
    if min(size) < 1:
        raise ValueError(f"size must be at least 1 x 1, got {size}")
    mode, antialias = LATENT_UPSCALERS[upscaler]
    return torch.nn.functional.interpolate(latents, size=tuple(size), mode=mode, antialias=antialias)
