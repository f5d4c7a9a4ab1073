"""The training step of an EDM-formulation model (Playground v2.5), as diffusers trains it.

diffusers' ``examples/dreambooth/train_dreambooth_lora_sdxl.py`` (``--do_edm_style_training``, on by itself for a
model whose scheduler is an EDM class, lines 1117-1125; cited at commit 58eb52c0 of huggingface/diffusers) is the
one trainer of these models. Per batch it

1. noises on the σ grid of ``EDMEulerScheduler.__init__`` (``schedulers/scheduling_edm_euler.py`` 105-124): the
   ``T + 1`` Karras values ``σ_i = (σ_max^{1/ρ} + i/T·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ`` (``i/T`` in float64, σ
   rounded to float32; ``exponential``: ``exp(linspace(ln σ_min, ln σ_max, T + 1))`` reversed), ``i = 0`` being
   σ_max; an index ``i`` uniform in ``[0, T)`` per image (the script's 1702-1712: ``randint(0, T)`` into
   ``scheduler.timesteps``, which are ``c_noise`` of that grid), ``x_σ = x0 + ε·σ_i`` (``add_noise``, 536-581);
2. feeds the UNet ``c_in·x_σ`` (``precondition_inputs``) at timestep ``c_noise = ¼·ln σ_i`` (the scheduler's
   ``timesteps[i]``), script 1716-1725;
3. mixes its output ``F`` into the denoised latent ``D = c_skip·x_σ + c_out·F`` (``precondition_outputs``),
   script 1776-1781;
4. regresses ``D`` on the clean latents ``x0`` (ε and v models alike: script 1797-1806), unweighted — diffusers
   weights by ``σ⁻²`` only for EDM-style training of a *non*-EDM (Euler) model, never for an EDM scheduler
   (script 1789-1794, "numerical problems", PR #7126) — with ``F.mse_loss`` (the mean over every element).

The latents are the VAE's normalised ones, ``(z − latents_mean)·scaling_factor/latents_std`` (script 1687-1694),
which :meth:`sdadapt.diffusers_system.DiffusersSystem.encode_images` already gives an EDM model. The step
(:func:`sdadapt.training.step.prepare_batch` / :func:`~sdadapt.training.step.step_loss`) takes this branch when
``StepConfig.edm`` holds the system's :class:`~sdadapt.samplers.edm.EDMSchedule`; the coefficients are
:func:`sdadapt.samplers.edm.edm_precondition`'s, the sampler's.

Options of the DDPM step with no EDM form are refused by name (:func:`edm_step_clashes`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..samplers.edm import EDMSchedule
    from .step import StepConfig

__all__ = ["EDM_GUIDANCE", "edm_default_guidance", "edm_denoised", "edm_index_range", "edm_inputs", "edm_own_sampler",
           "edm_step_clashes", "edm_training_sigmas"]

#: the guidance scale Playground v2.5's model card gives per diffusers EDM scheduler ("Notes": "guidance_scale=3.0 is a
#: good default" for ``EDMDPMSolverMultistepScheduler``, its pipeline's own, and 5.0 for ``EDMEulerScheduler``; card
#: of ``playgroundai/playground-v2.5-1024px-aesthetic`` at its commit aba2c6d), used when no guidance is given
EDM_GUIDANCE = {"EDMDPMSolverMultistepScheduler": 3.0, "EDMEulerScheduler": 5.0}


def edm_training_sigmas(schedule: EDMSchedule, num_train_timesteps: int) -> Tensor:
    """The (T + 1,) float32 σ grid ``EDMEulerScheduler(**config).sigmas`` without its appended last value (descending,
    σ_max first, σ_min last; see the module docstring), T = ``num_train_timesteps``. Indices ``[0, T)`` are drawn.

    Raises:
        ValueError: ``num_train_timesteps`` < 1.
    """
    if num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be >= 1 (the scheduler config's), got {num_train_timesteps}")
    if schedule.sigma_schedule == "karras":
        ramp = torch.arange(num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
        low, high = schedule.sigma_min ** (1 / schedule.rho), schedule.sigma_max ** (1 / schedule.rho)
        sigmas = (high + ramp * (low - high)) ** schedule.rho
    else:  # ("exponential": diffusers' _compute_exponential_sigmas, a float32 linspace of T + 1 values)
        sigmas = torch.linspace(math.log(schedule.sigma_min), math.log(schedule.sigma_max),
                                num_train_timesteps + 1).exp().flip(0)
    return sigmas.to(torch.float32)


@functools.lru_cache(maxsize=8)
def _grid(schedule: EDMSchedule, num_train_timesteps: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(σ grid, its c_noise) on ``device``, made once per schedule and device (no host copy per step). c_noise is
    taken over the whole grid, as the scheduler's ``timesteps`` are (the same float32 values bit for bit)."""
    sigmas = edm_training_sigmas(schedule, num_train_timesteps)
    return sigmas.to(device), (0.25 * torch.log(sigmas)).to(device)


def edm_inputs(latents: Tensor, noise: Tensor, index: Tensor, *, schedule: EDMSchedule,
               num_train_timesteps: int) -> dict[str, Tensor]:
    """Everything before the UNet for clean latents ``x0`` (B, C, H, W), noise ``ε`` (B, C, H, W) and σ-grid indices
    (B,) int in ``[0, T)`` (0: σ_max):

    * ``"x_t"``: the UNet input ``c_in·x_σ`` (B, C, H, W), ``x_σ = x0 + ε·σ`` (latents' dtype);
    * ``"t"``: the UNet timestep ``c_noise = ¼·ln σ`` (B,) float32;
    * ``"target"``: ``x0``;
    * ``"edm_skip"``: ``c_skip·x_σ`` (B, C, H, W) and ``"edm_out"``: ``c_out`` (B, 1, 1, 1), float32 (at least):
      :func:`edm_denoised` makes the denoised latent of the UNet output with them.

    Computed in float32 at least (the grid's dtype; diffusers casts σ to the latents' dtype, float32 here).

    Raises:
        ValueError: shapes that do not fit (the indices' values are not read: no host sync).
    """
    from ..samplers.edm import edm_precondition

    if noise.shape != latents.shape or index.shape != latents.shape[:1]:
        raise ValueError(f"EDM step: latents {tuple(latents.shape)}, noise {tuple(noise.shape)} and σ indices "
                         f"{tuple(index.shape)} must be (B, C, H, W), (B, C, H, W) and (B,)")
    sigmas, c_noise = _grid(schedule, int(num_train_timesteps), latents.device)
    index = index.to(latents.device).long()
    wide = torch.promote_types(latents.dtype, torch.float32)
    sigma = sigmas[index].to(wide).reshape(-1, *([1] * (latents.ndim - 1)))  # (B, 1, 1, 1)
    noisy = latents.to(wide) + noise.to(wide) * sigma
    c_skip, c_out, c_in, _ = edm_precondition(sigma, sigma_data=schedule.sigma_data,
                                              prediction_type=schedule.prediction_type)
    return {"x_t": (noisy * c_in).to(latents.dtype), "t": c_noise[index], "target": latents,
            "edm_skip": c_skip * noisy, "edm_out": c_out}


def edm_denoised(prepared: Mapping[str, object], output: Tensor) -> Tensor:
    """The denoised latent ``D = c_skip·x_σ + c_out·F`` (B, C, H, W), float32 at least, of the UNet output ``F``
    (B, C, H, W) and :func:`edm_inputs`' ``"edm_skip"`` / ``"edm_out"`` (in ``prepared``)."""
    skip: Tensor = prepared["edm_skip"]  # type: ignore[index]
    out: Tensor = prepared["edm_out"]  # type: ignore[index]
    return skip + out * output.to(skip.dtype)


def edm_step_clashes(config: StepConfig) -> list[str]:
    """What in ``config`` has no EDM form (empty: nothing), each named as the option and the ``train`` flag, with why.

    The SNR-based weights (min-SNR, debiased estimation, P2, kohya's v-prediction-like scalings) and Huber's
    ``snr`` / ``exponential`` schedules read the DDPM ᾱ_t of an integer timestep, which an EDM model does not
    have (diffusers refuses min-SNR with EDM training: ``train_dreambooth_lora_sdxl.py`` 990-991); input
    perturbation is defined by an ε target (the input's noise differs from the target's) and the EDM target is
    x0. ``timestep_range`` (kohya's ``--min-timestep`` / ``--max-timestep``) has an EDM form: :func:`edm_index_range`.
    The noise offset, pyramid noise and the adaptive offset stay: they change ε, and ``x0 + σ·ε`` is the DDPM
    ``x_t/√ᾱ_t`` with the same ε, so they mean what they mean there.
    """
    clashes = []
    for given, what in (
        (config.min_snr_gamma is not None, f"min_snr_gamma={config.min_snr_gamma} (--min-snr-gamma): min-SNR weights by "
         "the DDPM SNR, and diffusers refuses it with EDM training; leave --min-snr-gamma out (or give 0; from Python "
         "StepConfig(min_snr_gamma=None))"),
        (config.debiased_estimation, "debiased_estimation (--debiased-estimation-loss): its weight 1/√SNR is of the DDPM "
         "schedule"),
        (config.p2_gamma is not None, f"p2_gamma={config.p2_gamma}: the P2 weight 1/(1 + SNR)^γ is of the DDPM schedule"),
        (config.scale_v_pred_loss_like_noise_pred, "scale_v_pred_loss_like_noise_pred "
         "(--scale-v-pred-loss-like-noise-pred): an EDM model's loss is on x0, not on v"),
        (bool(config.v_pred_like_loss), f"v_pred_like_loss={config.v_pred_like_loss} (--v-pred-like-loss): an EDM "
         "model's loss is on x0, not on ε"),
        (config.loss in ("huber", "smooth_l1") and config.huber_schedule != "constant",
         f"huber_schedule={config.huber_schedule!r} (--huber-schedule): it reads the DDPM timestep; use 'constant'"),
        (bool(config.input_perturbation), f"input_perturbation={config.input_perturbation} (--ip-noise-gamma): it "
         "perturbs the input's noise against an ε target, and the EDM target is x0"),
        (config.timestep_sampling is not None and not config.timestep_sampling.is_uniform,
         f"timestep_sampling ({config.timestep_sampling.describe() if config.timestep_sampling else ''}; "
         "--timestep-bias-strategy / --timestep-distribution / --timestep-shift): they shape the draw of the DDPM "
         "timesteps, and diffusers' EDM training (train_dreambooth_lora_sdxl.py) draws its σ-grid index uniformly, "
         "with no bias option; --min-timestep / --max-timestep restrict the σ grid"),
    ):
        if given:
            clashes.append(what)
    return clashes


def edm_index_range(timestep_range: tuple[int, int], num_train_timesteps: int) -> tuple[int, int]:
    """The σ-grid indices ``[T − high, T − low)`` an EDM step draws from for kohya's training-timestep range
    ``[low, high)`` (``--min-timestep`` / ``--max-timestep``; T = ``num_train_timesteps``).

    kohya draws ``randint(min_timestep, max_timestep)`` of the DDPM timesteps, timestep 0 the least noise and T − 1 the
    most (``library/train_util.py`` ``get_noise_noisy_latents_and_timesteps``). diffusers' EDM training draws an index
    ``randint(0, T)`` of the scheduler's σ grid, index 0 being σ_max (the most noise) and T − 1 the smallest σ drawn
    (σ_min, index T, never is; :func:`edm_training_sigmas`); the scheduler's ``timesteps`` there, ``c_noise = ¼·ln σ``,
    also grow with the noise. So kohya's timestep ``t`` is index ``T − 1 − t``: "timestep 0" is the least-noise end of
    the grid, as in every other model, ``[0, T)`` is diffusers' own draw (the same indices, the same draws), and
    ``--max-timestep 500`` trains the half of the grid with the least noise.

    Raises:
        ValueError: not ``0 <= low < high <= T``.
    """
    low, high = (int(v) for v in timestep_range)
    if not 0 <= low < high <= num_train_timesteps:
        raise ValueError(f"timestep_range {timestep_range} (--min-timestep / --max-timestep): need 0 <= min < max <= "
                         f"{num_train_timesteps} (the EDM model's num_train_timesteps)")
    return num_train_timesteps - high, num_train_timesteps - low


def edm_own_sampler(scheduler_config: Mapping[str, object] | None) -> str:
    """The :data:`sdadapt.samplers.edm.EDM_SAMPLERS` name of an EDM model's own scheduler (its config's ``_class_name``
    and ``algorithm_type``): what its diffusers pipeline samples with, e.g. DreamBooth's class images
    (``train_dreambooth_lora_sdxl.py`` makes them with the model's pipeline). ``dpmsolver++`` (Playground v2.5's
    ``EDMDPMSolverMultistepScheduler``) when the config names no EDM scheduler."""
    from ..samplers.edm import EDM_SAMPLERS

    config = dict(scheduler_config or {})
    kind = (config.get("_class_name"), config.get("algorithm_type", "dpmsolver++"))
    for name, (cls, algorithm) in EDM_SAMPLERS.items():
        if cls == kind[0] and algorithm in (None, kind[1]):
            return name
    return "dpmsolver++"


def edm_default_guidance(sampler: str) -> float:
    """The classifier-free guidance scale an EDM-formulation model (Playground v2.5) samples with by ``sampler`` (an
    :data:`sdadapt.samplers.edm.EDM_SAMPLERS` name, A1111-style spellings read) when none is given: its model card's
    default for the diffusers scheduler the sampler is (:data:`EDM_GUIDANCE`) — 3.0 for ``dpmsolver++`` /
    ``dpmsolver++_sde``, 5.0 for ``euler`` — where sdadapt's SD default is 7.5.

    Raises:
        ValueError: a sampler with no EDM form (named, with the EDM samplers).
    """
    from ..samplers import canonical_sampler
    from ..samplers.edm import EDM_SAMPLERS

    name = canonical_sampler(sampler)
    if name not in EDM_SAMPLERS:
        raise ValueError(f"sampler {sampler!r} has no EDM form; an EDM model samples with {', '.join(EDM_SAMPLERS)}")
    return EDM_GUIDANCE[EDM_SAMPLERS[name][0]]
