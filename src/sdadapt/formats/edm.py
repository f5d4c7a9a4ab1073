"""Playground v2.5 and other EDM-formulation SDXL models: how their files and folders say so.

Playground v2.5 (``playgroundai/playground-v2.5-1024px-aesthetic``) has SDXL base's layout (UNet, CLIP-L +
OpenCLIP-bigG, VAE) but was trained in the EDM formulation (Karras et al. 2022): continuous noise levels
σ ∈ [0.002, 80], the UNet fed ``c_in·x`` and ``c_noise = ¼·ln σ`` and its output mixed into the denoised
latent by ``c_skip`` / ``c_out`` (σ_data 0.5), and a VAE latent space with per-channel mean and std. How the
tools tell it:

* **single file** (LDM keys): the SDXL keys plus two top-level tensors ``edm_mean`` and ``edm_std``, the VAE
  latents' per-channel mean and std. ComfyUI reads their presence as "EDM" (``comfy/supported_models.py``
  ``SDXL.model_type``: ``'edm_mean' in state_dict`` -> ``ModelType.EDM``, σ_data 0.5, σ 0.002–80 from
  ``comfy/model_detection.py``); diffusers' single-file loader as the ``playground-v2-5`` model type
  (``loaders/single_file_utils.py`` ``CHECKPOINT_KEY_NAMES`` / ``infer_diffusers_model_type``), its legacy VAE
  config taking ``latents_mean`` / ``latents_std`` from those tensors and the scaling factor 0.5
  (``create_vae_diffusers_config_from_ldm``, ``PLAYGROUND_VAE_SCALING_FACTOR``).
* **diffusers folder**: ``scheduler/scheduler_config.json`` names an EDM scheduler class
  (``EDMDPMSolverMultistepScheduler``, or ``EDMEulerScheduler``) and ``vae/config.json`` carries
  ``latents_mean`` / ``latents_std`` and ``scaling_factor`` 0.5; the pipeline is ``StableDiffusionXLPipeline``.

Nothing here imports diffusers; configs are plain dicts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from .files import WeightFileError

__all__ = [
    "COSXL_SIGMA_RANGE",
    "EDM_SCHEDULERS",
    "EDM_STAT_KEYS",
    "EDM_V_SIGMA_DATA",
    "PLAYGROUND_SCALING_FACTOR",
    "PLAYGROUND_SCHEDULER",
    "edm_stat_tensors",
    "edm_stats",
    "edm_v_scheduler",
    "has_edm_stats",
    "is_edm_scheduler",
    "vae_latent_stats",
]

#: the single-file tensors of an EDM SDXL model (the VAE latents' per-channel mean and std)
EDM_STAT_KEYS = ("edm_mean", "edm_std")
#: the VAE scaling factor of Playground v2.5 (diffusers ``single_file_utils.PLAYGROUND_VAE_SCALING_FACTOR``,
#: ComfyUI ``latent_formats.SDXL_Playground_2_5.scale_factor``)
PLAYGROUND_SCALING_FACTOR = 0.5
#: the diffusers scheduler classes of the EDM formulation (``schedulers/scheduling_edm_*.py``)
EDM_SCHEDULERS = ("EDMDPMSolverMultistepScheduler", "EDMEulerScheduler")
#: the scheduler config diffusers gives a Playground v2.5 single file (``single_file_utils.py``
#: ``create_scheduler_from_ldm``, its ``edm_dpm_solver_multistep`` entry; also the published folder's
#: ``scheduler/scheduler_config.json``)
PLAYGROUND_SCHEDULER = {
    "_class_name": "EDMDPMSolverMultistepScheduler",
    "algorithm_type": "dpmsolver++",
    "dynamic_thresholding_ratio": 0.995,
    "euler_at_final": False,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "rho": 7.0,
    "sample_max_value": 1.0,
    "sigma_data": 0.5,
    "sigma_max": 80.0,
    "sigma_min": 0.002,
    "solver_order": 2,
    "solver_type": "midpoint",
    "thresholding": False,
}


#: ComfyUI's EDM v-prediction formulation (CosXL: ``ModelType.V_PREDICTION_EDM``, comfy/model_base.py): its σ_data
#: (``ModelSamplingContinuousEDM``'s default, comfy/model_sampling.py) — the file gives σ_min / σ_max only
EDM_V_SIGMA_DATA = 1.0
#: ComfyUI's ``ModelSamplingContinuousEDM`` σ range where the file gives none (σ_min; CosXL's files give both)
COSXL_SIGMA_RANGE = (0.002, 120.0)


def edm_v_scheduler(sigma_min: float, sigma_max: float) -> dict:
    """The diffusers scheduler config of an EDM v-prediction model (CosXL) with the file's σ range: diffusers'
    ``EDMEulerScheduler`` at σ_data 1 and ``prediction_type="v_prediction"``, whose preconditioning is ComfyUI's
    ``V_PREDICTION`` on ``ModelSamplingContinuousEDM`` (``c_skip = σ_d²/(σ²+σ_d²)``, ``c_out = −σ·σ_d/√(σ²+σ_d²)``,
    ``c_in = 1/√(σ²+σ_d²)``, ``c_noise = ¼·ln σ``) and whose Karras grid is ComfyUI's ``karras`` scheduler's."""
    return {"_class_name": "EDMEulerScheduler", "num_train_timesteps": 1000, "sigma_min": float(sigma_min),
            "sigma_max": float(sigma_max), "sigma_data": EDM_V_SIGMA_DATA, "sigma_schedule": "karras", "rho": 7.0,
            "prediction_type": "v_prediction", "final_sigmas_type": "zero"}


def has_edm_stats(keys: Iterable[str]) -> bool:
    """An EDM (Playground v2.5) single file: both ``edm_mean`` and ``edm_std`` among ``keys`` (a ``.ckpt``'s
    ``state_dict.`` level allowed), ComfyUI's and diffusers' test."""
    names = {k.removeprefix("state_dict.") for k in keys}
    return all(k in names for k in EDM_STAT_KEYS)


def is_edm_scheduler(config: Mapping | None) -> bool:
    """A diffusers scheduler config (``scheduler_config.json`` as a dict) of an EDM scheduler class."""
    return config is not None and str(config.get("_class_name", "")) in EDM_SCHEDULERS


def edm_stats(state: Mapping[str, Tensor], *, source: object = "<state>") -> tuple[list[float], list[float]]:
    """``(latents_mean, latents_std)`` as lists of floats (one per latent channel) from a single file's
    ``edm_mean`` / ``edm_std`` tensors (any shape holding C values, e.g. (1, C, 1, 1)): what diffusers'
    VAE config holds as ``latents_mean`` / ``latents_std``.

    Raises:
        WeightFileError: one of the two missing, their sizes differing, a non-finite value or a std ≤ 0
            (``source`` named).
    """
    missing = [k for k in EDM_STAT_KEYS if k not in state]
    if missing:
        raise WeightFileError(f"{source}: an EDM checkpoint needs both edm_mean and edm_std (the VAE latents' "
                              f"per-channel mean and std); {' and '.join(missing)} missing")
    mean = [float(v) for v in state["edm_mean"].detach().double().flatten().tolist()]
    std = [float(v) for v in state["edm_std"].detach().double().flatten().tolist()]
    if len(mean) != len(std) or not mean:
        raise WeightFileError(f"{source}: edm_mean holds {len(mean)} values and edm_std {len(std)}; both must hold "
                              "one per latent channel")
    if not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise WeightFileError(f"{source}: edm_mean / edm_std must be finite and edm_std positive (got mean {mean}, "
                              f"std {std})")
    return mean, std


def edm_stat_tensors(mean: Iterable[float], std: Iterable[float]) -> dict[str, Tensor]:
    """``{"edm_mean", "edm_std"}`` float32 tensors (1, C, 1, 1), the form the single file stores them in
    (ComfyUI's ``latents_mean.view(1, 4, 1, 1)``)."""
    mean, std = [float(v) for v in mean], [float(v) for v in std]
    return {"edm_mean": torch.tensor(mean, dtype=torch.float32).view(1, len(mean), 1, 1),
            "edm_std": torch.tensor(std, dtype=torch.float32).view(1, len(std), 1, 1)}


def vae_latent_stats(config: object) -> tuple[list[float], list[float]] | None:
    """A diffusers VAE config's ``latents_mean`` / ``latents_std`` (both set: diffusers' pipelines use them,
    ``pipeline_stable_diffusion_xl.py``'s decode: ``latents * std / scaling_factor + mean``), else ``None``."""
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    mean, std = get("latents_mean", None), get("latents_std", None)
    if mean is None or std is None:
        return None
    return [float(v) for v in mean], [float(v) for v in std]
