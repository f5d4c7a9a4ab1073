"""Euler noise inversion: the start noise that brings an image back, found by running Euler up the σ grid (A1111's
"img2img alternative test" script, scripts/img2imgalt.py; briansemrau's sigma adjustment, A1111 issue #736).

The script replaces img2img's start noise. From the init latents ``x`` it walks the model's discrete σ grid upwards
— ``get_sigmas(n)`` flipped: ``0, σ_min, …, σ_max`` — with one guided model call per step on the *decode* prompt
and negative at the *decode* CFG scale, guidance combined on x̂0 (uncond and cond in one batch, A1111's order)::

    d = (x − x̂0(x, σ_i)) / σ_i          x ← x + d · (σ_i − σ_{i−1})

and divides the result by its standard deviation (the whole batch's, Bessel-corrected) to unit noise. With the
sigma adjustment the model is called at ``σ_{i−1}`` (its timestep at ``σ_1`` for the first call), ``d`` divided by
``σ_{i−1}`` (``2·σ_1`` for the first) and the result by ``σ_max`` instead. x̂0 is k-diffusion's
``x + out · c_out`` of the batch's output: ``c_out = −σ`` for an ε model, ``−σ/√(σ²+1)`` for a v model — the
script drops the v model's ``c_skip`` (it unpacks ``get_scalings(σ)[1:]``), and that is transcribed too. The
inverted noise is then blended with the seed's start noise by "Randomness" ``r``
(:func:`blend_noise`), and img2img runs from ``init + (noise − init/σ_max) · σ_start`` — at strength 1, the blend
times ``σ_max``: :func:`img2img_alt_noise` is the noise handed over (:class:`GivenStartSeeds` for A1111's noise).

:class:`Img2ImgAlternative` holds the script's settings; ``generate --img2img-alt`` runs it
(:func:`sdadapt.jobs.generate.run_generate`, ``img2img_alt=``); docs/null-text-inversion.md, "Euler noise
inversion".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..samplers.a1111_noise import A1111Noise, A1111Seeds
from ..samplers.sigma_space import model_input, sigma_to_t, t_to_sigma

__all__ = ["IMG2IMG_ALT_FIELDS", "GivenStartNoise", "GivenStartSeeds", "Img2ImgAlternative", "blend_noise",
           "euler_inversion_sigmas", "euler_noise_inversion", "img2img_alt_noise", "sigma_max_of"]

#: the script's infotext fields, in the order it adds them to ``p.extra_generation_params``
IMG2IMG_ALT_FIELDS: tuple[str, ...] = ("Decode prompt", "Decode negative prompt", "Decode CFG scale", "Decode steps",
                                       "Randomness", "Sigma Adjustment")


@dataclass(frozen=True)
class Img2ImgAlternative:
    """A1111's "img2img alternative test" settings.

    Args:
        decode_prompt, decode_negative: the "Original prompt" / "Original negative prompt" the image is inverted
            with (encoded as they are: emphasis read, prompt-editing brackets and ``<lora:>`` tags read as words,
            as A1111's ``get_learned_conditioning`` reads them).
        decode_steps: "Decode steps" (A1111's default 50): the σ grid of the inversion.
        decode_guidance: "Decode CFG scale" (default 1; the script says 2 or lower).
        randomness: "Randomness" in [0, 1]: how much of the seed's own start noise is blended in.
        sigma_adjustment: "Sigma adjustment for finding noise for image".

    Raises:
        ValueError: steps below 1, a randomness outside [0, 1], a negative or non-finite CFG scale.
    """

    decode_prompt: str
    decode_negative: str = ""
    decode_steps: int = 50
    decode_guidance: float = 1.0
    randomness: float = 0.0
    sigma_adjustment: bool = False

    def __post_init__(self) -> None:
        if int(self.decode_steps) < 1:
            raise ValueError(f"--decode-steps must be >= 1 (A1111's 'Decode steps'), got {self.decode_steps}")
        if not 0.0 <= float(self.randomness) <= 1.0:
            raise ValueError(f"--randomness must be in [0, 1] (A1111's 'Randomness'), got {self.randomness}")
        if not (math.isfinite(float(self.decode_guidance)) and float(self.decode_guidance) >= 0.0):
            raise ValueError(f"--decode-guidance must be a number >= 0 (A1111's 'Decode CFG scale'), got "
                             f"{self.decode_guidance}")

    def infotext_fields(self) -> dict[str, object]:
        """The script's fields as it writes them (:data:`IMG2IMG_ALT_FIELDS`), every one, false and 0 too."""
        return dict(zip(IMG2IMG_ALT_FIELDS, (self.decode_prompt, self.decode_negative, float(self.decode_guidance),
                                             int(self.decode_steps), float(self.randomness),
                                             bool(self.sigma_adjustment))))


def euler_inversion_sigmas(train_sigmas: Tensor, steps: int) -> Tensor:
    """The inversion's σ grid (steps + 1,) ascending: k-diffusion's ``get_sigmas(steps)`` — ``t_to_sigma`` of
    ``linspace(T − 1, 0, steps)``, then a 0 — flipped, on ``train_sigmas``' table (T,) in its dtype (A1111's
    float32 ``CompVisDenoiser.sigmas``: :func:`sdadapt.samplers.sigma_space.model_sigmas`)."""
    t = torch.linspace(len(train_sigmas) - 1, 0, int(steps), dtype=train_sigmas.dtype, device=train_sigmas.device)
    sigmas = t_to_sigma(t, train_sigmas)
    return torch.cat([sigmas, sigmas.new_zeros(1)]).flip(0)


def _batched(uncond: object, cond: object) -> object | None:
    """``cat([uncond, cond])`` of two conditions (tensors, or dicts of tensors, SDXL's), or ``None`` where their
    shapes differ (a long prompt's chunks against a short negative: run apart)."""
    if isinstance(cond, dict) and isinstance(uncond, dict):
        if set(cond) != set(uncond) or any(cond[k].shape != uncond[k].shape for k in cond):
            return None
        return {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    if isinstance(cond, Tensor) and isinstance(uncond, Tensor) and cond.shape == uncond.shape:
        return torch.cat([uncond, cond])
    return None


@torch.no_grad()
def euler_noise_inversion(model: Callable[[Tensor, Tensor, object], Tensor], init_latents: Tensor, cond: object,
                          uncond: object, *, guidance: float, steps: int, train_sigmas: Tensor,
                          prediction_type: str = "epsilon", sigma_adjustment: bool = False,
                          dtype: torch.dtype | None = None,
                          progress: Callable[[int, int], None] | None = None) -> Tensor:
    """The unit start noise (B, C, h, w) float32 that A1111's img2img alternative test finds for ``init_latents``
    (B, C, h, w) (module docstring): Euler up :func:`euler_inversion_sigmas` ``(train_sigmas, steps)``.

    Args:
        model: the raw network, ``model(x_in, t, cond) -> ε or v`` (``DiffusersSystem.denoiser()``), called on the
            batch ``[uncond, cond]`` (two calls where the conditions' shapes differ).
        cond, uncond: the decode prompt's and negative's conditions, batch B (a tensor, or SDXL's dict).
        guidance: the decode CFG scale, combined on x̂0.
        train_sigmas: the model's σ table (T,) as the samplers read it (A1111's float32 one).
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (the script's v reading, without ``c_skip``).
        sigma_adjustment: briansemrau's variant.
        dtype: the dtype the model is called in (default the latents'; x stays float32 between steps).
        progress: ``progress(i, steps)`` after each step.

    Raises:
        ValueError: another ``prediction_type``; ``steps`` below 1.
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"the img2img alternative test reads ε or v models (k-diffusion's CompVisDenoiser / "
                         f"CompVisVDenoiser), got prediction_type {prediction_type!r}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    table = train_sigmas.to(torch.float32) if train_sigmas.dtype == torch.float64 else train_sigmas
    sigmas = euler_inversion_sigmas(table, steps)  # (steps + 1,) 0 … σ_max
    x = init_latents.float()
    run_dtype = x.dtype if dtype is None else dtype
    both = _batched(uncond, cond)
    for i in range(1, len(sigmas)):
        at = sigmas[i - 1] if sigma_adjustment else sigmas[i]  # (the σ the model's input is scaled for)
        timestep = sigma_to_t((sigmas[1] if sigma_adjustment and i == 1 else at).reshape(1), table).to(x.device)
        x_in = torch.cat([x, x])  # (2B, C, h, w): uncond rows, then cond rows
        scaled = model_input(x_in, at.to(x.device), run_dtype)
        t = timestep.expand(x_in.shape[0]).to(torch.float32)
        if both is not None:
            out = model(scaled, t, both).float()
        else:
            half = x.shape[0]
            out = torch.cat([model(scaled[:half], t[:half], uncond).float(),
                             model(scaled[half:], t[half:], cond).float()])
        s = at.to(device=x.device, dtype=x.dtype)
        c_out = -s if prediction_type == "epsilon" else -s / (s ** 2 + 1) ** 0.5
        denoised_uncond, denoised_cond = (x_in + out * c_out).chunk(2)
        denoised = denoised_uncond + (denoised_cond - denoised_uncond) * float(guidance)
        if sigma_adjustment:
            d = (x - denoised) / (2 * sigmas[i] if i == 1 else sigmas[i - 1]).to(x.device)
        else:
            d = (x - denoised) / sigmas[i].to(x.device)
        x = x + d * (sigmas[i] - sigmas[i - 1]).to(x.device)
        if progress is not None:
            progress(i, len(sigmas) - 1)
    return x / sigmas[-1].to(x.device) if sigma_adjustment else x / x.std()


def blend_noise(inverted: Tensor, random: Tensor, randomness: float) -> Tensor:
    """The script's ``((1 − r)·inverted + r·random) / √(r² + (1 − r)²)`` (B, C, h, w): the inverted noise with the
    seed's own start noise ``random`` blended in by "Randomness" ``r``, rescaled to unit variance for independent
    noises."""
    r = float(randomness)
    return ((1 - r) * inverted + r * random.to(inverted)) / ((r ** 2 + (1 - r) ** 2) ** 0.5)


def img2img_alt_noise(noise: Tensor, init_latents: Tensor, sigma_max: float | Tensor) -> Tensor:
    """The start noise the script hands img2img, ``noise − init/σ_max`` (B, C, h, w), so that img2img's first sample
    ``init + that · σ_start`` is ``noise · σ_max`` at strength 1 (``σ_max``: ``get_sigmas(steps)[0]``)."""
    return noise - init_latents.to(noise) / sigma_max


def sigma_max_of(train_sigmas: Tensor) -> Tensor:
    """``get_sigmas(n)[0]`` (a 0-dim tensor in the table's dtype): ``t_to_sigma(T − 1)``, ``exp(log σ_max)``."""
    return t_to_sigma(torch.tensor([len(train_sigmas) - 1.0], dtype=train_sigmas.dtype), train_sigmas.cpu())[0]


class GivenStartNoise:
    """A batch's A1111 noise (:class:`~sdadapt.samplers.a1111_noise.A1111Noise`) whose start noise the script set:
    :meth:`start_noise` gives ``start``; the samplers' first :meth:`next_noise` is the RNG's own first draw (A1111's
    ``ImageRNG.next`` first time: the seed's start noise, variation and resize included — the script never drew
    it), later ones the RNG's."""

    def __init__(self, noise: A1111Noise, start: Tensor) -> None:
        self.noise, self.start, self._first = noise, start, True
        self._shape: tuple[int, ...] | None = None

    def start_noise(self, shape: Sequence[int]) -> Tensor:
        """``start`` (B, C, h, w) float32 CPU.

        Raises:
            ValueError: ``shape`` is not the given noise's.
        """
        if tuple(int(d) for d in shape) != tuple(self.start.shape):
            raise ValueError(f"the img2img alternative test's start noise is {tuple(self.start.shape)}, the run's "
                             f"start noise is {tuple(shape)}")
        self._shape = tuple(int(d) for d in shape)
        return self.start.detach().to(device="cpu", dtype=torch.float32).clone()

    def next_noise(self, like: Tensor | None = None) -> Tensor:
        """The samplers' next draw (B, C, h, w) float32 CPU (class docstring)."""
        if self._first:
            self._first = False
            return self.noise.start_noise(self._shape if like is None else tuple(like.shape))
        return self.noise.next_noise(like)

    def __getattr__(self, name: str) -> object:  # (seeds, source, ...: the batch's RNG's)
        if name in ("noise", "start", "_first", "_shape"):
            raise AttributeError(name)
        return getattr(self.noise, name)


@dataclass(frozen=True, eq=False)
class GivenStartSeeds:
    """A run's :class:`~sdadapt.samplers.a1111_noise.A1111Seeds` with the start noise the script set:
    :meth:`for_batch` gives a :class:`GivenStartNoise` of ``start`` (B, C, h, w); its other attributes are the
    seeds'. Compared by identity (a tensor field has no one truth value)."""

    seeds: A1111Seeds
    start: Tensor

    def for_batch(self, seed: int, batch: int) -> GivenStartNoise:
        """The batch's noise, its start noise ``start`` (a batch of ``start``'s size)."""
        return GivenStartNoise(self.seeds.for_batch(seed, batch), self.start)

    def __getattr__(self, name: str) -> object:
        if name in ("seeds", "start") or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.seeds, name)
