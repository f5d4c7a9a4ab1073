"""The training step's timestep distribution as options (torch-free: the ``train`` command's ``--help`` reads it).

Two tools' ways of drawing a training timestep other than kohya's uniform ``randint(min_timestep, max_timestep)``:

* diffusers' **timestep bias** (``examples/text_to_image/train_text_to_image_sdxl.py``, ``--timestep_bias_*`` options
  and ``generate_timestep_weights``): ``earlier`` / ``later`` multiply the weight of the first / last
  ``int(portion·T)`` timesteps by ``multiplier``, ``range`` those of ``[begin, end)``;
* OneTrainer's **timestep distribution** (``modules/util/enum/TimestepDistribution.py`` and
  ``modules/modelSetup/mixin/ModelSetupNoiseMixin.py`` ``_get_timestep_discrete``) with its ``noising_weight``,
  ``noising_bias`` and ``timestep_shift``.

:class:`TimestepSampling` holds them; :mod:`sdadapt.training.timestep_distribution` turns it into the draw.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = [
    "BIAS_STRATEGIES",
    "CONTINUOUS_DISTRIBUTIONS",
    "DISTRIBUTIONS",
    "HEAVY_TAIL_WEIGHTS",
    "WEIGHTED_DISTRIBUTIONS",
    "TimestepSampling",
]

#: diffusers' ``--timestep_bias_strategy`` choices (``none``: no bias)
BIAS_STRATEGIES = ("none", "earlier", "later", "range")
#: OneTrainer's ``TimestepDistribution`` names, lower-case (``uniform`` with ``timestep_shift`` 1: kohya's draw)
DISTRIBUTIONS = ("uniform", "sigmoid", "logit_normal", "heavy_tail", "cos_map", "inverted_parabola", "beta")
#: OneTrainer's distributions given as a weight per timestep (its ``torch.multinomial`` branch)
WEIGHTED_DISTRIBUTIONS = ("sigmoid", "cos_map", "inverted_parabola")
#: OneTrainer's distributions drawn as a continuous value, then truncated to an integer timestep
CONTINUOUS_DISTRIBUTIONS = ("uniform", "logit_normal", "heavy_tail", "beta")
#: the heavy-tail weights whose map ``u ↦ 1 − u − w·(cos²(πu/2) − 1 + u)`` stays a decreasing map of [0, 1] onto itself
#: (SD3, Esser et al. 2024, §3.1 "mode sampling with heavy tails": ``s ∈ [−1, 2/(π − 2)]``)
HEAVY_TAIL_WEIGHTS = (-1.0, 2.0 / (math.pi - 2.0))


@dataclass(frozen=True)
class TimestepSampling:
    """How the step draws its timesteps (the defaults: kohya's uniform draw, bit for bit as without it).

    ``bias_*``: diffusers' ``--timestep_bias_strategy`` / ``_multiplier`` / ``_begin`` / ``_end`` / ``_portion`` (its
    defaults ``none``, 1.0, 0, 1000, 0.25). ``distribution``, ``noising_weight``, ``noising_bias``, ``shift``:
    OneTrainer's ``timestep_distribution``, ``noising_weight``, ``noising_bias``, ``timestep_shift`` (its defaults
    ``UNIFORM``, 0, 0, 1). A bias and a non-uniform distribution are two answers to one question: give one.

    Raises:
        ValueError: an unknown name, a value with no meaning, or both kinds given (each names its option).
    """

    bias_strategy: str = "none"
    bias_multiplier: float = 1.0
    bias_begin: int = 0
    bias_end: int = 1000
    bias_portion: float = 0.25
    distribution: str = "uniform"
    noising_weight: float = 0.0
    noising_bias: float = 0.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "distribution", str(self.distribution).lower())
        object.__setattr__(self, "bias_strategy", str(self.bias_strategy).lower())
        if self.bias_strategy not in BIAS_STRATEGIES:
            raise ValueError(f"timestep_bias_strategy (--timestep-bias-strategy) must be one of "
                             f"{', '.join(BIAS_STRATEGIES)}, got {self.bias_strategy!r}")
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"timestep_distribution (--timestep-distribution) must be one of {', '.join(DISTRIBUTIONS)} "
                             f"(OneTrainer's names), got {self.distribution!r}")
        for name, value in (("timestep_bias_multiplier", self.bias_multiplier), ("timestep_bias_portion", self.bias_portion),
                            ("noising_weight", self.noising_weight), ("noising_bias", self.noising_bias),
                            ("timestep_shift", self.shift)):
            if not math.isfinite(value):
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a finite number, got {value}")
        if self.bias_strategy != "none":
            if self.bias_multiplier <= 0:  # (diffusers means to refuse it too; its generate_timestep_weights *returns*
                # the ValueError, and the training loop then fails on ValueError.to)
                raise ValueError(f"timestep_bias_multiplier {self.bias_multiplier} (--timestep-bias-multiplier): a "
                                 "multiplier <= 0 would stop training some timesteps; it must be > 0 (1: no bias). "
                                 "For no bias give --timestep-bias-strategy none")
            if self.bias_strategy in ("earlier", "later") and not 0 <= self.bias_portion <= 1:
                raise ValueError(f"timestep_bias_portion {self.bias_portion} (--timestep-bias-portion): the share of the "
                                 "timesteps biased, in [0, 1] (e.g. 0.25)")
            if self.bias_strategy == "range" and self.bias_begin < 0:  # (diffusers' two checks)
                raise ValueError(f"timestep_bias_begin {self.bias_begin} (--timestep-bias-begin): the range strategy "
                                 "needs a first timestep >= 0")
            if self.distribution != "uniform" or self.shift != 1:
                raise ValueError(f"timestep_bias_strategy {self.bias_strategy!r} (diffusers') and timestep_distribution "
                                 f"{self.distribution!r} / timestep_shift {self.shift:g} (OneTrainer's) both shape the "
                                 "timestep draw; give one of them")
        if not self.shift > 0:
            raise ValueError(f"timestep_shift {self.shift} (--timestep-shift): OneTrainer's shift must be > 0 (1: none)")
        if self.distribution == "logit_normal" and not self.noising_weight > -1:
            raise ValueError(f"noising_weight {self.noising_weight} (--noising-weight): the logit-normal distribution's "
                             "scale is noising_weight + 1 (OneTrainer's), so it must be > -1")
        if self.distribution == "heavy_tail" and not HEAVY_TAIL_WEIGHTS[0] <= self.noising_weight <= HEAVY_TAIL_WEIGHTS[1]:
            raise ValueError(f"noising_weight {self.noising_weight} (--noising-weight): the heavy-tail distribution is a "
                             f"density on the timesteps for weights in [{HEAVY_TAIL_WEIGHTS[0]:g}, "
                             f"{HEAVY_TAIL_WEIGHTS[1]:.4f}] (SD3's mode sampling); outside it draws timesteps < 0 or > T")
        if self.distribution == "beta" and abs(max(1e-4, self.noising_bias) - 1) >= 1e-5 \
                and abs(max(1e-4, self.noising_weight) - 1) >= 1e-5:
            raise ValueError(f"timestep_distribution 'beta' with noising_weight (α) {self.noising_weight:g} and "
                             f"noising_bias (β) {self.noising_bias:g}: only α = 1 or β = 1 (closed-form inverse CDF) is "
                             "drawn from the step's generator; OneTrainer's other case draws from torch's global random "
                             "state, which --resume could not continue. Give --noising-bias 1 (B-TTDM's choice) or "
                             "--noising-weight 1")

    @property
    def is_uniform(self) -> bool:
        """Kohya's uniform draw ``randint(low, high)``: no bias, OneTrainer's ``uniform`` unshifted."""
        return self.bias_strategy == "none" and self.distribution == "uniform" and self.shift == 1

    def describe(self) -> str:
        """A short text of what is drawn (the run report; the resume record)."""
        if self.bias_strategy != "none":
            where = (f"[{self.bias_begin}, {self.bias_end})" if self.bias_strategy == "range"
                     else f"portion {self.bias_portion:g}")
            return f"diffusers bias {self.bias_strategy} x{self.bias_multiplier:g} ({where})"
        return (f"OneTrainer {self.distribution} (noising_weight {self.noising_weight:g}, noising_bias "
                f"{self.noising_bias:g}, shift {self.shift:g})")
