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

A sampler that steps along the negative branch too (A1111's DDIM CFG++: its ``CFGDenoiser.need_last_noise_uncond``
and ``cond_scale_miltiplier``) reads through a :class:`ReadKeepingNegative`: the combining guidance scales by its
``scale_multiplier`` and hands it the call's negative branch, read (:func:`keep_negative`). A call that ran no
negative keeps none and the sampler steps along the call's output, as A1111 puts the conditional output in the
negative's place — except for ``AND`` sub-prompts, whose first one's output is kept in the negative's place.
A read that depends on the model's input (a timestep sampler's v read as ε, ``√ᾱ·v + √(1−ᾱ)·x_in``) offers
``read.at(x_in)``; a wrapper that changes the input the model sees (the timestep samplers' inpainting blend) asks
for it through :func:`read_at`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

__all__ = ["ReadDenoised", "ReadKeepingNegative", "denoised_of", "keep_negative", "read_at", "reading_first",
           "scaled_by", "wants_negative"]

#: ``read(output) -> x̂0``: a sampler's reading of one model output (B,C,H,W) at the call's σ (k-diffusion's
#: ``CompVisDenoiser`` / ``CompVisVDenoiser``: :func:`sdadapt.samplers.sigma_space.denoised`)
ReadDenoised = Callable[[Tensor], Tensor]


def denoised_of(model: Callable[..., Tensor], read: ReadDenoised, *inputs: object, sigma: float | Tensor) -> Tensor:
    """x̂0 (B,C,H,W) of one call of ``model`` on ``inputs`` (``x_in, t`` or ``x_in, t, cond``) at noise level
    ``sigma``: ``model.denoised_by_branch(read, *inputs, sigma=sigma)`` where the model combines its branches on x̂0
    itself (the module docstring), else ``read(model(*inputs))``."""
    by_branch = getattr(model, "denoised_by_branch", None)
    return by_branch(read, *inputs, sigma=sigma) if by_branch is not None else read(model(*inputs))


class ReadKeepingNegative:
    """A sampler's ``read`` (:data:`ReadDenoised`) that also asks the guidance for the call's negative branch, read
    (:attr:`negative`, A1111's ``last_noise_uncond``), and to scale guidance by ``scale_multiplier`` (A1111's
    ``cond_scale_miltiplier``; DDIM CFG++: 1/12.5). The sampler makes one per model call; the innermost guidance
    that combines the call keeps its negative (:func:`keep_negative`), outer ones leave it. ``negative`` stays
    ``None`` after a call that ran no negative (module docstring)."""

    def __init__(self, read: ReadDenoised, *, scale_multiplier: float = 1.0, _kept: list | None = None) -> None:
        self.read, self.scale_multiplier = read, float(scale_multiplier)
        self._kept: list[Tensor | None] = [None] if _kept is None else _kept  # (shared with reading_first's copies)

    def __call__(self, out: Tensor) -> Tensor:
        return self.read(out)

    @property
    def negative(self) -> Tensor | None:
        """The last call's negative branch, read (B,C,H,W), or ``None``."""
        return self._kept[0]

    def keep(self, value: Tensor) -> None:
        if self._kept[0] is None:
            self._kept[0] = value

    def at(self, x_in: Tensor) -> ReadKeepingNegative:
        """This read for a model call at input ``x_in`` (:func:`read_at`), the same negative kept."""
        return ReadKeepingNegative(read_at(self.read, x_in), scale_multiplier=self.scale_multiplier, _kept=self._kept)


def read_at(read: ReadDenoised, x_in: Tensor) -> ReadDenoised:
    """``read`` for a model call at input ``x_in`` (B,C,H,W) other than the sampler's: ``read.at(x_in)`` where the
    read depends on the input (module docstring), else ``read``."""
    at = getattr(read, "at", None)
    return read if at is None else at(x_in)


class _ReadAfter:
    """``read(before(output))`` (:func:`reading_first`), still answering :func:`read_at`."""

    def __init__(self, read: ReadDenoised, before: Callable[[Tensor], Tensor]) -> None:
        self.read, self.before = read, before

    def __call__(self, out: Tensor) -> Tensor:
        return self.read(self.before(out))

    def at(self, x_in: Tensor) -> _ReadAfter:
        return _ReadAfter(read_at(self.read, x_in), self.before)


def reading_first(read: ReadDenoised, before: Callable[[Tensor], Tensor]) -> ReadDenoised:
    """``read`` of ``before(output)``; a :class:`ReadKeepingNegative` stays one (the same negative kept)."""
    if isinstance(read, ReadKeepingNegative):
        return ReadKeepingNegative(_ReadAfter(read.read, before), scale_multiplier=read.scale_multiplier,
                                   _kept=read._kept)
    return _ReadAfter(read, before)


def keep_negative(read: ReadDenoised | None, value: Tensor) -> None:
    """Hand ``value`` (B,C,H,W), a call's negative branch read by ``read`` (or what A1111 puts in its place: a
    skipped call's first ``AND`` sub-prompt), to a :class:`ReadKeepingNegative` that has none yet this call; else
    nothing."""
    if isinstance(read, ReadKeepingNegative):
        read.keep(value)


def wants_negative(read: ReadDenoised | None) -> bool:
    """Whether ``read`` steps along the negative branch (a :class:`ReadKeepingNegative`): guidance then runs the
    negative at scale 1 too, as A1111 does."""
    return isinstance(read, ReadKeepingNegative)


def scaled_by(read: ReadDenoised | None, scale: float) -> float:
    """The guidance scale a combination under ``read`` uses: ``scale · scale_multiplier`` for a
    :class:`ReadKeepingNegative` (A1111's ``cond_scale * self.cond_scale_miltiplier``), else ``scale``."""
    return scale * read.scale_multiplier if isinstance(read, ReadKeepingNegative) else scale
