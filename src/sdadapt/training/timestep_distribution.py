"""Non-uniform training timesteps: diffusers' timestep bias and OneTrainer's timestep distributions.

The options are :class:`sdadapt.timestep_tables.TimestepSampling`. Two kinds of draw:

* **weighted** — a (T,) weight per timestep, made once (host, float32 as the other tools do) and kept on the
  device as its cumulative distribution; each step draws ``u ~ U[0, 1)`` (B,) from the step's generator and takes
  the first timestep whose cumulative weight exceeds ``u`` (``searchsorted``): the inverse-CDF draw of
  ``torch.multinomial(weights, B, replacement=True)``, the same distribution, with no host read for any batch size
  (``multinomial`` of one sample checks its input with ``.item()`` in the torch versions sdadapt supports) and
  graph-capturable. diffusers' bias (:func:`bias_weights`) and OneTrainer's ``sigmoid`` / ``cos_map`` /
  ``inverted_parabola`` (:func:`onetrainer_weights`) are drawn so.
* **continuous** — OneTrainer's ``uniform`` (shifted), ``logit_normal``, ``heavy_tail`` and ``beta``: a value in
  ``[low, high]`` drawn as OneTrainer draws it (the same torch ops on the step's generator), shifted, truncated to an
  integer (:func:`continuous_timesteps`).

kohya's ``--min-timestep`` / ``--max-timestep`` (``[low, high)``) combine as each tool's own range does: diffusers'
bias weights are of all T timesteps (``begin`` / ``end`` / the portion count absolute timesteps), and the draw keeps
those in ``[low, high)`` (weights outside set to 0); OneTrainer's range ``[int(T·min_noising_strength),
int(T·max_noising_strength))`` is ``[low, high)``: its distributions are stretched over it (and its shift may carry
the continuous ones beyond ``high``, as in OneTrainer).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..timestep_tables import CONTINUOUS_DISTRIBUTIONS, TimestepSampling

__all__ = [
    "bias_weights",
    "check_timestep_draw",
    "continuous_timesteps",
    "draw_timesteps",
    "inverse_cdf",
    "onetrainer_weights",
    "timestep_weights",
]


def bias_weights(sampling: TimestepSampling, num_steps: int) -> Tensor:
    """diffusers' ``generate_timestep_weights(args, num_timesteps)`` (``examples/text_to_image/
    train_text_to_image_sdxl.py``, commit 58eb52c0, lines 559-597): (T,) float32 weights summing to 1.

    Ones; the first ``int(portion·T)`` (``earlier``), the last ``int(portion·T)`` (``later``, Python's
    ``slice(-n, None)``: with ``n = 0`` that is every timestep, a uniform result) or ``[begin, end)`` (``range``; an
    empty range when ``begin >= end``) multiplied by ``multiplier``; divided by their sum. ``none``: the ones.

    Raises:
        ValueError: ``range`` with ``end > T`` (diffusers' check).
    """
    weights = torch.ones(num_steps)
    count = int(sampling.bias_portion * num_steps)
    if sampling.bias_strategy == "later":
        part = slice(-count, None)
    elif sampling.bias_strategy == "earlier":
        part = slice(0, count)
    elif sampling.bias_strategy == "range":
        if sampling.bias_end > num_steps:
            raise ValueError(f"timestep_bias_end {sampling.bias_end} (--timestep-bias-end): the range strategy's end "
                             f"must be <= the model's {num_steps} training timesteps")
        part = slice(sampling.bias_begin, sampling.bias_end)
    else:
        return weights
    weights[part] *= sampling.bias_multiplier
    return weights / weights.sum()


def onetrainer_weights(sampling: TimestepSampling, count: int) -> Tensor:
    """OneTrainer's weights of its discrete distributions over ``count = high − low`` timesteps (``count``,) float32:
    ``_get_timestep_discrete`` in ``modules/modelSetup/mixin/ModelSetupNoiseMixin.py`` (commit 23df3832).

    With ``l = linspace(0, 1, count)``, shift ``s``, the shifted points ``l' = l/(s − s·l + l)`` and their spacing
    ``d = s/(s + l − l·s)²``:

    * ``cos_map``: ``2/(π − 2π·l' + 2π·l'²) · d``;
    * ``sigmoid``: ``σ(w·(l'' − (b + 0.5))) · d`` with ``l'' = l'/(s − s·l' + l')`` (OneTrainer shifts ``l`` twice
      here; with ``s = 1`` both are ``l``), ``w`` = noising_weight, ``b`` = noising_bias;
    * ``inverted_parabola``: ``max(0, 2 − w·(l' − (b + 0.5))²) · d``.

    Raises:
        ValueError: every weight 0 (an inverted parabola below 0 everywhere), or not one of these distributions.
    """
    s = sampling.shift
    line = torch.linspace(0, 1, count)
    line = line / (s - s * line + line)
    spacing = torch.linspace(0, 1, count)
    spacing = s / (s + spacing - spacing * s).pow(2)
    w, b = sampling.noising_weight, sampling.noising_bias + 0.5
    if sampling.distribution == "cos_map":
        weights = 2.0 / (math.pi - 2.0 * math.pi * line + 2.0 * math.pi * line ** 2.0)
    elif sampling.distribution == "sigmoid":
        twice = line / (s - s * line + line)
        weights = 1 / (1 + torch.exp(-w * (twice - b)))
    elif sampling.distribution == "inverted_parabola":
        weights = torch.clamp(-w * ((line - b) ** 2) + 2, min=0.0)
    else:
        raise ValueError(f"timestep_distribution {sampling.distribution!r} is not one of OneTrainer's weighted ones")
    weights = weights * spacing
    if not bool((weights > 0).any()) or not bool(torch.isfinite(weights).all()):  # (host tensors: made once)
        raise ValueError(f"timestep_distribution {sampling.distribution!r} with noising_weight {w:g} and noising_bias "
                         f"{sampling.noising_bias:g} gives no timestep a finite weight > 0; lower --noising-weight or "
                         "move --noising-bias")
    return weights


def timestep_weights(sampling: TimestepSampling, num_steps: int, *, low: int = 0, high: int | None = None) -> Tensor:
    """The (T,) float32 weights of a weighted draw over ``[low, high)`` (zero outside it), unnormalised.

    Raises:
        ValueError: a continuous distribution (it has no weight vector here), or an empty weighted range.
    """
    high = num_steps if high is None else high
    if not 0 <= low < high <= num_steps:
        raise ValueError(f"timestep range [{low}, {high}) must lie inside [0, {num_steps})")
    if sampling.bias_strategy != "none" or sampling.distribution == "uniform" and sampling.shift == 1:
        weights = bias_weights(sampling, num_steps).clone()
        weights[:low] = 0
        weights[high:] = 0
        return weights
    if sampling.distribution in CONTINUOUS_DISTRIBUTIONS:
        raise ValueError(f"timestep_distribution {sampling.distribution!r} is drawn as a continuous value "
                         "(continuous_timesteps), not from weights")
    weights = torch.zeros(num_steps)
    weights[low:high] = onetrainer_weights(sampling, high - low)
    return weights


@functools.lru_cache(maxsize=16)
def _cdf(sampling: TimestepSampling, num_steps: int, low: int, high: int, device: torch.device) -> Tensor:
    """The (T,) float32 cumulative distribution of :func:`timestep_weights` on ``device``, made once (a host copy at
    the first step only); its last value is exactly 1."""
    weights = timestep_weights(sampling, num_steps, low=low, high=high).double()
    cdf = weights.cumsum(0) / weights.sum()
    cdf[-1] = 1.0
    # (made on the device and filled once: a tensor of its own there, never the host one — ``.to`` may return that)
    return torch.empty(num_steps, dtype=torch.float32, device=device).copy_(cdf)


def continuous_timesteps(sampling: TimestepSampling, batch: int, num_steps: int, *, low: int, high: int,
                         generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """OneTrainer's continuous draw (B,) int64 (``_get_timestep_discrete``'s first branch): ``x = low + n·v``,
    ``n = high − low``, with ``v = u`` (``uniform``), ``σ(N(b, w + 1))`` (``logit_normal``), ``1 − u − w·(cos²(πu/2)
    − 1 + u)`` (``heavy_tail``), ``u^{1/α}`` / ``1 − u^{1/β}`` (``beta`` with β = 1 / α = 1; α = max(1e-4, w),
    β = max(1e-4, b)), ``u ~ U[0, 1)`` float32 from ``generator``; then the shift ``T·s·x/((s − 1)·x + T)`` and the
    integer part, kept in ``[0, T)`` (a value of exactly T, which OneTrainer would pass on, is T − 1)."""
    where = generator.device if generator is not None else device
    d, w, b = sampling.distribution, sampling.noising_weight, sampling.noising_bias
    if d == "logit_normal":
        value = torch.normal(b, w + 1.0, size=(batch,), generator=generator, device=where).sigmoid()
    else:
        u = torch.rand(batch, generator=generator, device=where)
        if d == "uniform":
            value = u
        elif d == "heavy_tail":
            value = 1.0 - u - w * (torch.cos(math.pi / 2.0 * u) ** 2.0 - 1.0 + u)
        elif d == "beta" and abs(max(1e-4, b) - 1.0) < 1e-5:
            value = u.pow(1.0 / max(1e-4, w))
        elif d == "beta":
            value = 1.0 - u.pow(1.0 / max(1e-4, b))
        else:
            raise ValueError(f"timestep_distribution {d!r} is not one of OneTrainer's continuous ones")
    x = value * (high - low) + low
    s = sampling.shift
    x = num_steps * s * x / ((s - 1) * x + num_steps)
    t = x.long().clamp_(0, num_steps - 1)
    return t.to(device) if device is not None else t


def draw_timesteps(sampling: TimestepSampling, batch: int, num_steps: int, *, low: int = 0, high: int | None = None,
                   generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
    """Timesteps (B,) int64 of ``sampling`` over ``[low, high)``, drawn on ``generator``'s device (else ``device``),
    moved to ``device`` when given. Weighted draws: one ``torch.rand`` (B,) and a ``searchsorted`` in the cached
    cumulative weights; continuous ones: :func:`continuous_timesteps`. No host read, capturable."""
    high = num_steps if high is None else high
    if not 0 <= low < high <= num_steps:
        raise ValueError(f"timestep range [{low}, {high}) must lie inside [0, {num_steps})")
    if sampling.bias_strategy == "none" and sampling.distribution in CONTINUOUS_DISTRIBUTIONS:
        return continuous_timesteps(sampling, batch, num_steps, low=low, high=high, generator=generator, device=device)
    where = torch.device(generator.device if generator is not None else (device or "cpu"))
    cdf = _cdf(sampling, int(num_steps), int(low), int(high), where)
    t = inverse_cdf(cdf, torch.rand(batch, generator=generator, device=where))
    return t.to(device) if device is not None else t


def check_timestep_draw(sampling: TimestepSampling | None, num_steps: int, *, low: int = 0,
                        high: int | None = None) -> None:
    """Check ``[low, high)`` (``--min-timestep`` / ``--max-timestep``) and ``sampling``'s table against a model of
    ``num_steps`` = T training timesteps (its scheduler's ``num_train_timesteps``): the range inside ``[0, T)``, the
    weights — sized T, as every draw here makes them (diffusers' ``generate_timestep_weights(args, num_timesteps)``;
    OneTrainer's ``_get_timestep_discrete(num_train_timesteps, ...)`` with ``model.noise_scheduler.config[
    'num_train_timesteps']``, modules/modelSetup/BaseStableDiffusionSetup.py:170-176) — with some timestep of weight
    > 0 in the range. One draw on the CPU (a host check, before training).

    Raises:
        ValueError: naming the option and T: a range outside the model's timesteps, a diffusers ``range`` bias whose
            end is past T, OneTrainer weights all 0.
    """
    high = num_steps if high is None else high
    if not 0 <= low < high <= num_steps:
        raise ValueError(f"--min-timestep {low} / --max-timestep {high}: the model has {num_steps} training timesteps "
                         f"(its scheduler's num_train_timesteps), so need 0 <= min < max <= {num_steps}")
    if sampling is not None and not sampling.is_uniform:
        draw_timesteps(sampling, 1, num_steps, low=low, high=high, generator=torch.Generator().manual_seed(0))


def inverse_cdf(cdf: Tensor, u: Tensor) -> Tensor:
    """The first index whose cumulative weight exceeds ``u``: (B,) int64 of a (T,) ascending ``cdf`` ending in 1 and
    ``u`` (B,) in ``[0, 1)``. A timestep of weight 0 (a flat step of ``cdf``) is never taken, ``u = 0`` included."""
    return torch.searchsorted(cdf, u, right=True).clamp_(max=cdf.numel() - 1)
