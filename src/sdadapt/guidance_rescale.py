"""Guidance rescale ("CFG rescale"): classifier-free guidance's result brought back toward the conditional branch's
spread, against the over-exposure of high guidance scales — Lin et al. 2023, "Common Diffusion Noise Schedules and
Sample Steps are Flawed", section 3.4, for v-prediction and zero-terminal-SNR models above all::

    g' = φ · g · std(c) / std(g) + (1 − φ) · g          per sample: std over every dim but the batch's (Bessel's)

``g``: the guided combination ``u + s·(c − u)``, ``c``: the conditional branch, ``φ``: the rescale (0 off; the paper
and the tools suggest 0.7). :func:`rescale_guidance` is diffusers' ``rescale_noise_cfg`` (the pipelines'
``guidance_rescale``), which also is the combination of A1111's "CFG Rescale" extension
(``CFG_Rescale_webui``'s ``cfg_replace``: its per-sample ``torch.std``).

Which quantity is rescaled is the combination's own: diffusers' pipelines rescale the model output they combine (ε or
v); A1111's extension replaces ``CFGDenoiser.combine_denoised``, so on A1111's σ samplers it rescales x̂0 (the
denoised latents A1111 combines) and on its timestep samplers (DDIM, PLMS, UniPC: ``CFGDenoiserTimesteps``) the ε
they combine. sdadapt's guidance classes rescale where they combine, so a run on a diffusers grid gives diffusers'
numbers and one on A1111's gives the extension's (:mod:`sdadapt.denoised_branches`): :class:`GuidanceRescale` with
``space="combined"``, what a bare φ means.

``space="v"`` is ComfyUI's "RescaleCFG" node (``comfy_extras/nodes_model_advanced.py``; reForge's built-in RescaleCFG
runs it): every branch's x̂0 turned into the v-prediction it implies at σ first, the rescale taken there and the result
turned back — the paper's space for any model (:func:`rescale_denoised_in_v`). It needs the call's σ, which sdadapt's
σ samplers hand over (A1111's grids, by branch); on diffusers' grids it is the outputs' rescale for a v model and
refused for an ε one; :func:`sdadapt.samplers.guidance_rescale_for_run` decides that per run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GUIDANCE_RESCALE_FIELD", "GUIDANCE_RESCALE_FIELDS_READ", "GUIDANCE_RESCALE_SPACES", "RESCALE_CFG_FIELDS",
           "GuidanceRescale", "as_guidance_rescale", "check_guidance_rescale", "rescale_denoised_in_v",
           "rescale_guidance"]

#: where the rescale is taken: ``combined``, the space the guidance combines in (diffusers', A1111's extension);
#: ``v``, the v-prediction each branch implies at σ (ComfyUI's / reForge's RescaleCFG)
GUIDANCE_RESCALE_SPACES = ("combined", "v")

#: the infotext key A1111's "CFG Rescale" extension writes (``p.extra_generation_params["CFG Rescale"]``)
GUIDANCE_RESCALE_FIELD = "CFG Rescale"
#: the keys read back as it: the extension's own, the older ``CFG Rescale φ`` it still reads, SD.Next's ``CFG rescale``
#: (its diffusers pipelines' ``guidance_rescale``)
GUIDANCE_RESCALE_FIELDS_READ = ("CFG Rescale", "CFG Rescale φ", "CFG rescale")
#: reForge's built-in RescaleCFG's fields (``p.extra_generation_params``: enabled, version, multiplier; its first
#: release wrote no version), the ``space="v"`` rescale; its "Alternative" version is another formula
RESCALE_CFG_FIELDS = ("rescale_cfg_enabled", "rescale_cfg_version", "rescale_cfg_multiplier")


def check_guidance_rescale(phi: float) -> float:
    """``phi`` as a float in [0, 1] (the tools' slider range).

    Raises:
        ValueError: ``phi`` outside [0, 1] or not finite, saying what it is.
    """
    phi = float(phi)
    if not (math.isfinite(phi) and 0.0 <= phi <= 1.0):
        raise ValueError(f"guidance rescale is a blend in [0, 1] (diffusers' guidance_rescale, A1111's 'CFG Rescale'; "
                         f"0: off, 0.7 the paper's), got {phi}")
    return phi


def rescale_guidance(guided: Tensor, cond: Tensor, phi: float) -> Tensor:
    """``guided`` (B, ...) rescaled toward ``cond``'s spread (B, ...), blended by ``phi`` (module docstring):
    ``φ·g·std(c)/std(g) + (1 − φ)·g``, each sample's std over all its elements (unbiased), in diffusers' order of
    operations. ``phi`` 0 returns ``guided`` itself. Differentiable in both."""
    if phi == 0.0:
        return guided
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)  # (B, 1, ...)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return phi * rescaled + (1 - phi) * guided


def rescale_denoised_in_v(guided: Tensor, cond: Tensor, phi: float, *, x_in: Tensor, sigma: float | Tensor) -> Tensor:
    """ComfyUI's RescaleCFG on x̂0 (B, C, H, W): the guided ``guided`` and the conditional branch's ``cond`` turned into
    the v each implies at the call (``x_in``: the model's input ``x/√(σ² + 1)``, (B, C, H, W); ``sigma``: the call's σ,
    a float or (B,) / (1,)), :func:`rescale_guidance` there, the result turned back to x̂0::

        v = (x_in − √(σ² + 1)·x̂0) / σ        x̂0' = (x_in − σ·v') / √(σ² + 1)

    (ComfyUI's ``x_orig / (σ² + 1)`` is ``x_in / √(σ² + 1)``.) For a v model the v are its outputs, so this is the
    outputs' rescale read to x̂0. ``phi`` 0 returns ``guided``."""
    if phi == 0.0:
        return guided
    s = torch.as_tensor(sigma, dtype=guided.dtype, device=guided.device)
    s = s.reshape(-1, *([1] * (guided.ndim - 1))) if s.ndim else s  # (B, 1, 1, 1), as ComfyUI views it
    x = x_in.to(guided.dtype)
    root = (s * s + 1.0) ** 0.5
    v_cfg, v_cond = (x - root * guided) / s, (x - root * cond) / s
    return (x - s * rescale_guidance(v_cfg, v_cond, phi)) / root


@dataclass(frozen=True)
class GuidanceRescale:
    """The rescale of a run: ``phi`` in [0, 1] and the ``space`` it is taken in (:data:`GUIDANCE_RESCALE_SPACES`;
    module docstring). ``outputs_are_v``: the model predicts v, so a call that combines its outputs can rescale them
    in v as they are (:func:`sdadapt.samplers.guidance_rescale_for_run` sets it).

    Raises:
        ValueError: ``phi`` outside [0, 1], or an unknown ``space``.
    """

    phi: float
    space: str = "combined"
    outputs_are_v: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "phi", check_guidance_rescale(self.phi))
        if self.space not in GUIDANCE_RESCALE_SPACES:
            raise ValueError(f"guidance rescale space is one of {', '.join(GUIDANCE_RESCALE_SPACES)} (combined: where "
                             f"the guidance combines, diffusers' and A1111's CFG Rescale; v: ComfyUI's / reForge's "
                             f"RescaleCFG), got {self.space!r}")

    def rescale(self, guided: Tensor, cond: Tensor, *, x_in: Tensor | None = None,
                sigma: float | Tensor | None = None) -> Tensor:
        """``guided`` (B, ...) rescaled toward ``cond`` (B, ...): :func:`rescale_guidance` where they are, or for
        ``space="v"`` (they are x̂0 at the call's ``x_in`` and ``sigma``) :func:`rescale_denoised_in_v`; without
        ``x_in`` / ``sigma`` they are model outputs, rescaled as they are when :attr:`outputs_are_v`.

        Raises:
            ValueError: ``space="v"`` on the outputs of a model that does not predict v.
        """
        if self.space == "combined" or (x_in is None and self.outputs_are_v):
            return rescale_guidance(guided, cond, self.phi)
        if x_in is None or sigma is None:
            raise ValueError("a guidance rescale in v (ComfyUI's RescaleCFG) reads each branch's x̂0 at the call's σ; "
                             "this call combines the model outputs (diffusers' grid): give the sampler a schedule "
                             "(A1111's grid), or rescale where it combines (space 'combined')")
        return rescale_denoised_in_v(guided, cond, self.phi, x_in=x_in, sigma=sigma)


def as_guidance_rescale(value: float | GuidanceRescale | None) -> GuidanceRescale | None:
    """``value`` as a :class:`GuidanceRescale` (a number: φ in the ``combined`` space), ``None`` when it is off (None,
    0, φ 0)."""
    if value is None:
        return None
    rescale = value if isinstance(value, GuidanceRescale) else GuidanceRescale(float(value))
    return rescale if rescale.phi else None
