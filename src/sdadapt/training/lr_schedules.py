"""kohya's other LR schedules as pure functions of the step: the factor the base LR is multiplied by.

kohya sd-scripts (``library/train_util.py`` ``get_scheduler_fix``) hands ``--lr_scheduler`` to
transformers' / diffusers' schedule functions, which wrap a ``LambdaLR``: every parameter group's
LR is its base LR times one factor ``f(step)``. :func:`sdadapt.training.optim.lr_at` has the
classic ones (constant, warm-up, linear, cosine, cosine with restarts, polynomial); this module has
the others kohya runs:

=======================  ============================================================================
``cosine_with_min_lr``   transformers' ``get_cosine_with_min_lr_schedule_with_warmup``
``warmup_stable_decay``  transformers' ``get_wsd_schedule``
``inverse_sqrt``         transformers' ``get_inverse_sqrt_schedule``
``piecewise_constant``   diffusers' ``get_piecewise_constant_schedule`` (``step_rules``)
=======================  ============================================================================

Each is a pure function of the step (a resumed run picks up the schedule where it stopped, and a
CUDA-graph loop fills its tensor LRs from it); :class:`sdadapt.methods.FitConfig` calls them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

# the schedules this module computes (the others are sdadapt.training.optim.lr_at's): their one home is
# sdadapt.method_tables (torch-free, for the command line's parser), re-exported here
from ..method_tables import EXTRA_SCHEDULES

__all__ = ["EXTRA_SCHEDULES", "WSD_SHAPES", "StepRules", "check_extra_schedule", "cosine_with_min_lr_factor",
           "extra_schedule_factor", "inverse_sqrt_factor", "warmup_stable_decay_factor"]

#: the warm-up / decay shapes of ``warmup_stable_decay`` (transformers' ``warmup_type`` / ``decay_type``)
WSD_SHAPES = ("linear", "cosine", "1-sqrt")


def cosine_with_min_lr_factor(step: int, *, warmup_steps: int, total_steps: int, half_waves: int = 1,
                              min_lr_ratio: float) -> float:
    """The factor of ``cosine_with_min_lr`` at optimiser step ``step`` (0-based).

    With ``W = warmup_steps``, ``T = total_steps``, ``r = min_lr_ratio``, ``n = half_waves`` and
    ``p = (s − W) / max(1, T − W)`` (clamped to 1 past the end)::

        s < W:   f = s / max(1, W)
        else:    f = max(0, r + (1 − r) · ½ (1 + cos(π n p)))

    ``n`` is kohya's ``lr_scheduler_num_cycles`` (kohya passes ``num_cycles / 2`` to transformers,
    whose cosine is ``cos(2π · num_cycles · p)``): 1 is one half-wave from the base LR down to
    ``r`` times it.
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    factor = 0.5 * (1.0 + math.cos(math.pi * half_waves * progress))
    return max(0.0, factor * (1.0 - min_lr_ratio) + min_lr_ratio)


def warmup_stable_decay_factor(step: int, *, warmup_steps: int, stable_steps: int, decay_steps: int,
                               min_lr_ratio: float = 0.0, half_waves: int = 1, warmup_type: str = "linear",
                               decay_type: str = "cosine") -> float:
    """The factor of ``warmup_stable_decay`` (WSD) at optimiser step ``step`` (0-based).

    With ``W, S, D`` the warm-up, stable and decay steps and ``r = min_lr_ratio``::

        s < W:            q = s / max(1, W),            f = max(0, r + (1 − r) · up(q))
        s < W + S:        f = 1
        s < W + S + D:    q = (s − W − S) / max(1, D),  f = max(0, r + (1 − r) · down(q))
        afterwards:       f = r

    ``up``: ``linear`` ``q``, ``cosine`` ``½ (1 − cos(π q))``, ``1-sqrt`` ``1 − √(1 − q)``;
    ``down``: ``linear`` ``1 − q``, ``cosine`` ``½ (1 + cos(π n q))`` (``n = half_waves``,
    kohya's ``lr_scheduler_num_cycles``), ``1-sqrt`` ``1 − √q``. kohya sets ``S = T − W − D``.
    """
    if warmup_type not in WSD_SHAPES or decay_type not in WSD_SHAPES:
        raise ValueError(f"warmup_type and decay_type must be one of {', '.join(WSD_SHAPES)}, got "
                         f"{warmup_type!r} and {decay_type!r}")
    if step < warmup_steps:
        q = step / max(1, warmup_steps)
        up = q if warmup_type == "linear" else 0.5 * (1.0 - math.cos(math.pi * q)) if warmup_type == "cosine" \
            else 1.0 - math.sqrt(1.0 - q)
        return max(0.0, up * (1.0 - min_lr_ratio) + min_lr_ratio)
    if step < warmup_steps + stable_steps:
        return 1.0
    if step < warmup_steps + stable_steps + decay_steps:
        q = (step - warmup_steps - stable_steps) / max(1, decay_steps)
        down = 1.0 - q if decay_type == "linear" else 0.5 * (1.0 + math.cos(math.pi * half_waves * q)) \
            if decay_type == "cosine" else 1.0 - math.sqrt(q)
        return max(0.0, down * (1.0 - min_lr_ratio) + min_lr_ratio)
    return float(min_lr_ratio)


def inverse_sqrt_factor(step: int, *, warmup_steps: int, timescale: int | None = None) -> float:
    """The factor of ``inverse_sqrt`` at optimiser step ``step`` (0-based).

    With ``W = warmup_steps`` and ``τ = timescale`` (default ``W``, or 10 000 when ``W = 0``, as
    transformers')::

        s < W:   f = s / max(1, W)
        else:    f = 1 / √((s + τ − W) / τ)

    (1 at the end of the warm-up when ``τ = W``; it never reaches 0, and needs no step count.)
    """
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    tau = timescale if timescale is not None else (warmup_steps or 10_000)
    return 1.0 / math.sqrt((step + tau - warmup_steps) / tau)


@dataclass(frozen=True)
class StepRules:
    """diffusers' ``piecewise_constant`` rules: ``"1:10,0.1:20,0.01:30,0.005"`` is factor 1 before
    step 10, 0.1 before step 20, 0.01 before step 30 and 0.005 from then on (the step numbers are
    where each factor stops, counted from the run's start, not lengths — diffusers' code, whose
    docstring says otherwise).

    Attributes:
        rules: ``((stop_step, factor), ...)`` sorted by step (a step given twice: the later factor,
            as diffusers' dict).
        last: the factor from the last stop on.
    """

    rules: tuple[tuple[int, float], ...]
    last: float

    @classmethod
    def parse(cls, text: str) -> StepRules:
        """Read ``"FACTOR:STEP,FACTOR:STEP,...,FACTOR"`` (kohya's ``lr_scheduler_args = ["step_rules=..."]``).

        Raises:
            ValueError: not that form, a step that is not a whole number >= 0, or a factor that is
                not a finite number >= 0 — naming the rule.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"step_rules must be text such as '1:10,0.1:20,0.01' (factor:stop-step, ..., last "
                             f"factor), got {text!r}")
        parts = [part.strip() for part in text.split(",")]
        rules: dict[int, float] = {}
        for part in parts[:-1]:
            value, colon, steps = part.partition(":")
            if not colon:
                raise ValueError(f"step_rules {text!r}: {part!r} is not FACTOR:STEP (every rule but the last names "
                                 "the step its factor stops at, e.g. 0.1:20)")
            rules[_whole(steps, text)] = _factor(value, text)
        if ":" in parts[-1]:
            raise ValueError(f"step_rules {text!r}: the last rule {parts[-1]!r} must be a factor alone (the factor "
                             "after the last step), e.g. '1:10,0.1'")
        return cls(tuple(sorted(rules.items())), _factor(parts[-1], text))

    def factor(self, step: int) -> float:
        """The factor at optimiser step ``step`` (0-based): the first rule whose stop is above it."""
        for stop, value in self.rules:
            if step < stop:
                return value
        return self.last


@functools.lru_cache(maxsize=8)
def _parsed_rules(text: str) -> StepRules:
    """:meth:`StepRules.parse`, once per rules text (the loop asks every step, for every group)."""
    return StepRules.parse(text)


def _whole(text: str, rules: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"step_rules {rules!r}: {text.strip()!r} is not a step number (a whole number)") from None
    if value < 0:
        raise ValueError(f"step_rules {rules!r}: step {value} is negative")
    return value


def _factor(text: str, rules: str) -> float:
    try:
        value = float(text.strip())
    except ValueError:
        raise ValueError(f"step_rules {rules!r}: {text.strip()!r} is not a number (the LR factor)") from None
    if not 0.0 <= value < math.inf:
        raise ValueError(f"step_rules {rules!r}: factor {value} must be a finite number >= 0")
    return value




def check_extra_schedule(schedule: str, *, total_steps: int, warmup_steps: int, decay_steps: int = 0,
                         min_lr_ratio: float | None = None, lr_timescale: int | None = None,
                         step_rules: str | None = None, warmup_type: str = "linear", decay_type: str = "cosine") -> None:
    """Check the settings one of :data:`EXTRA_SCHEDULES` reads (the others are not looked at).

    Raises:
        ValueError: ``cosine_with_min_lr`` without ``min_lr_ratio``; a ``min_lr_ratio`` outside
            ``[0, 1]``; ``warmup_stable_decay`` with ``decay_steps < 0``, ``warmup_steps +
            decay_steps > total_steps`` or an unknown shape; ``inverse_sqrt`` with a
            ``lr_timescale`` below 1; ``piecewise_constant`` without (valid) ``step_rules`` — each
            naming the setting and kohya's option.
    """
    if schedule not in EXTRA_SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(EXTRA_SCHEDULES)} here, got {schedule!r}")
    if schedule in ("cosine_with_min_lr", "warmup_stable_decay") and min_lr_ratio is not None and (
            isinstance(min_lr_ratio, bool) or not isinstance(min_lr_ratio, (int, float)) or not 0.0 <= min_lr_ratio <= 1.0):
        raise ValueError(f"min_lr_ratio must be a number in [0, 1] (the LR the {schedule} schedule ends at, as a share "
                         f"of the base LR; kohya's lr_scheduler_min_lr_ratio), got {min_lr_ratio!r}")
    if schedule == "cosine_with_min_lr" and min_lr_ratio is None:
        raise ValueError("schedule cosine_with_min_lr needs min_lr_ratio (the LR it ends at, as a share of the base "
                         "LR, e.g. 0.1: kohya's lr_scheduler_min_lr_ratio, or lr_scheduler_args = ['min_lr=...'])")
    if schedule == "warmup_stable_decay":
        if isinstance(decay_steps, bool) or not isinstance(decay_steps, int) or decay_steps < 0:
            raise ValueError(f"decay_steps must be a whole number >= 0 (the warmup_stable_decay schedule's decay "
                             f"steps; kohya's lr_decay_steps), got {decay_steps!r}")
        if warmup_steps + decay_steps > total_steps:
            raise ValueError(f"warmup_stable_decay: {warmup_steps} warm-up and {decay_steps} decay steps do not fit "
                             f"into {total_steps} steps (kohya's stable phase is steps - warm-up - decay); give fewer "
                             "(lr_warmup_steps / lr_decay_steps, or fractions of the steps below 1)")
        for name, value in (("warmup_type", warmup_type), ("decay_type", decay_type)):
            if value not in WSD_SHAPES:
                raise ValueError(f"{name} must be one of {', '.join(WSD_SHAPES)} (transformers' WSD shapes), got {value!r}")
    if schedule == "inverse_sqrt" and lr_timescale is not None and (
            isinstance(lr_timescale, bool) or not isinstance(lr_timescale, int) or lr_timescale < 1):
        raise ValueError(f"lr_timescale must be a whole number >= 1 (the inverse_sqrt schedule's timescale; kohya's "
                         f"lr_scheduler_timescale; leave it out for the warm-up steps, or 10000), got {lr_timescale!r}")
    if schedule == "piecewise_constant":
        if step_rules is None:
            raise ValueError("schedule piecewise_constant needs step_rules, e.g. '1:100,0.1:200,0.01' (factor 1 before "
                             "step 100, 0.1 before step 200, 0.01 after; kohya: lr_scheduler_args = "
                             "[\"step_rules='1:100,0.1:200,0.01'\"])")
        StepRules.parse(step_rules)


def extra_schedule_factor(schedule: str, step: int, *, total_steps: int, warmup_steps: int, num_cycles: int = 1,
                          decay_steps: int = 0, min_lr_ratio: float | None = None, lr_timescale: int | None = None,
                          step_rules: str | None = None, warmup_type: str = "linear",
                          decay_type: str = "cosine") -> float:
    """The LR factor of one of :data:`EXTRA_SCHEDULES` at optimiser step ``step`` (0-based), with
    kohya's mapping of its options (checked by :func:`check_extra_schedule`): ``num_cycles`` is
    kohya's ``lr_scheduler_num_cycles`` (the half-waves of the cosine), the WSD stable phase is
    ``total_steps − warmup_steps − decay_steps``, ``piecewise_constant`` takes no warm-up (kohya
    passes it none) and ``warmup_stable_decay``'s ``min_lr_ratio`` defaults to 0."""
    if schedule == "cosine_with_min_lr":
        return cosine_with_min_lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps,
                                         half_waves=num_cycles, min_lr_ratio=float(min_lr_ratio or 0.0))
    if schedule == "warmup_stable_decay":
        return warmup_stable_decay_factor(step, warmup_steps=warmup_steps,
                                          stable_steps=total_steps - warmup_steps - decay_steps, decay_steps=decay_steps,
                                          min_lr_ratio=float(min_lr_ratio or 0.0), half_waves=num_cycles,
                                          warmup_type=warmup_type, decay_type=decay_type)
    if schedule == "inverse_sqrt":
        return inverse_sqrt_factor(step, warmup_steps=warmup_steps, timescale=lr_timescale)
    if schedule == "piecewise_constant":
        if step_rules is None:
            raise ValueError("schedule piecewise_constant needs step_rules, e.g. '1:100,0.1:200,0.01'")
        return _parsed_rules(step_rules).factor(step)
    raise ValueError(f"schedule must be one of {', '.join(EXTRA_SCHEDULES)} here, got {schedule!r}")
