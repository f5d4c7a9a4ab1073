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
numbers and one on A1111's gives the extension's (:mod:`sdadapt.denoised_branches`). ComfyUI's and reForge's
"RescaleCFG" convert every branch to v first, which differs from both for an ε model (and from A1111's x̂0 for any
model); sdadapt does not offer it (docs/samplers.md).
"""

from __future__ import annotations

import math

from torch import Tensor

__all__ = ["GUIDANCE_RESCALE_FIELD", "GUIDANCE_RESCALE_FIELDS_READ", "check_guidance_rescale", "rescale_guidance"]

#: the infotext key A1111's "CFG Rescale" extension writes (``p.extra_generation_params["CFG Rescale"]``)
GUIDANCE_RESCALE_FIELD = "CFG Rescale"
#: the keys read back as it: the extension's own, the older ``CFG Rescale φ`` it still reads, SD.Next's ``CFG rescale``
#: (its diffusers pipelines' ``guidance_rescale``)
GUIDANCE_RESCALE_FIELDS_READ = ("CFG Rescale", "CFG Rescale φ", "CFG rescale")


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
