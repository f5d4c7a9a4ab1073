"""x̂0 by branch: how a guided model lets a sampler on one of A1111's grids combine guidance on x̂0.

A1111 samples through k-diffusion's ``CFGDenoiser``: each branch of a model call — classifier-free guidance's
uncond and cond, the ``AND`` sub-prompts — is read to x̂0 by its ``CompVisDenoiser`` first, and the guidance
combination (and the inpainting blend) runs on those x̂0. sdadapt's guided models combine the model outputs (as
diffusers' pipelines do); the same numbers up to float rounding, as the combination is affine. For A1111's
rounding a model (or a guided wrapper, ``model(x_in, t[, cond])``) may also offer
``model.denoised_by_branch(read, x_in, t[, cond], *, sigma)``: x̂0 of the call, each branch's output read by the
sampler's ``read`` and then combined on x̂0; ``sigma``: the call's noise level (a float, or a tensor whose first
entry is it), for what A1111 decides by it (:mod:`sdadapt.uncond_skip`'s NGMS). :func:`denoised_of` is the one place
that asks for it.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["ReadDenoised", "denoised_of"]

#: ``read(output) -> x̂0``: a sampler's reading of one model output (B,C,H,W) at the call's σ (k-diffusion's
#: ``CompVisDenoiser`` / ``CompVisVDenoiser``: :func:`sdadapt.samplers.sigma_space.denoised`)
ReadDenoised = Callable[[Tensor], Tensor]


def denoised_of(model: Callable[..., Tensor], read: ReadDenoised, *inputs: object, sigma: float | Tensor) -> Tensor:
    """x̂0 (B,C,H,W) of one call of ``model`` on ``inputs`` (``x_in, t`` or ``x_in, t, cond``) at noise level
    ``sigma``: ``model.denoised_by_branch(read, *inputs, sigma=sigma)`` where the model combines its branches on x̂0
    itself (the module docstring), else ``read(model(*inputs))``."""
    by_branch = getattr(model, "denoised_by_branch", None)
    return by_branch(read, *inputs, sigma=sigma) if by_branch is not None else read(model(*inputs))
