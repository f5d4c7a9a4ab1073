"""The LR schedule ``python -m sdadapt train`` runs: kohya's schedule options mapped as kohya maps them.

kohya's ``get_scheduler_fix`` (sd-scripts library/train_util.py) turns ``--lr_scheduler`` and its
options into a transformers / diffusers schedule function call; this module does the same mapping
onto :class:`sdadapt.methods.FitConfig` (:func:`schedule_fit_args`), checks it before the model
loads (:func:`check_schedule_options`) and lists options the chosen schedule does not read
(:func:`schedule_notes`):

=======================  ===========================================================================
``lr_warmup_steps``      every schedule but ``constant`` and ``piecewise_constant`` (a count, or
                         below 1 a share of the steps: ``int(share · steps)``, kohya's; a run
                         recorded before rounds a warm-up share to the nearest step, as it started)
``lr_decay_steps``       ``warmup_stable_decay``: its decay steps (count or share, as the warm-up);
                         the stable phase is ``steps − warm-up − decay``
``lr_scheduler_num_cycles``  ``cosine_with_restarts`` (restarts); ``cosine_with_min_lr`` and
                         ``warmup_stable_decay`` (half-waves of the cosine: kohya passes ``N / 2``)
``lr_scheduler_power``   ``polynomial``
``lr_scheduler_min_lr_ratio``  ``cosine_with_min_lr`` (needed, or ``min_lr=`` in the args) and
                         ``warmup_stable_decay`` (default 0)
``lr_scheduler_timescale``  ``inverse_sqrt`` (default: the warm-up steps, or 10000 without one)
``lr_scheduler_args``    ``cosine``: ``num_cycles`` (waves, default 0.5); ``polynomial``: ``lr_end``;
                         ``cosine_with_min_lr``: ``min_lr`` (an LR,
                         made a share of ``--learning-rate`` as transformers does with the
                         optimiser's LR); ``warmup_stable_decay``: ``warmup_type``, ``decay_type``
                         (``linear``, ``cosine``, ``1-sqrt``); ``piecewise_constant``: ``step_rules``
``lr_scheduler_type``    a ``torch.optim.lr_scheduler`` class (``CosineAnnealingLR``, ...) or an
                         installed ``module.Class`` that replaces ``lr_scheduler``;
                         ``lr_scheduler_args`` are then its arguments and no warm-up is taken
                         (kohya refuses one): :func:`torch_schedule`,
                         :mod:`sdadapt.training.torch_lr_schedules`,
                         :mod:`sdadapt.training.imported_lr_schedule`
=======================  ===========================================================================
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..training.imported_lr_schedule import ImportedSchedule
from ..training.lr_schedules import WSD_SHAPES, StepRules, check_extra_schedule
from ..training.torch_lr_schedules import TORCH_SCHEDULE_MODULE, TorchSchedule
from .run_versions import recorded_version

if TYPE_CHECKING:
    from .train import TrainOptions

__all__ = ["FLOOR_SHARES", "LEGACY_SHARES", "check_schedule_options", "lr_scheduler_kwargs", "recorded_shares",
           "schedule_fit_args", "schedule_notes", "step_count", "torch_schedule"]

#: ``run.json``'s ``step_shares`` of runs whose warm-up / decay share of the steps is rounded down (kohya's ``int(x·N)``)
FLOOR_SHARES = "floor"
#: what a ``run.json`` without ``step_shares`` trained with: a warm-up share rounded to the nearest step
LEGACY_SHARES = "nearest"

#: the lr_scheduler_args keys each schedule takes (those of the schedule functions kohya passes them to
#: that sdadapt runs; the others have their own options)
LR_SCHEDULER_ARG_KEYS = {"cosine": ("num_cycles",), "polynomial": ("lr_end",), "cosine_with_min_lr": ("min_lr",),
                         "warmup_stable_decay": ("warmup_type", "decay_type"), "piecewise_constant": ("step_rules",)}
#: lr_scheduler_args keys whose value is text (read unquoted too; kohya needs them quoted: ast.literal_eval)
_TEXT_KEYS = ("warmup_type", "decay_type", "step_rules")
#: keys kohya passes itself (a second one there is a duplicate-argument error): the option that gives each
_OWN_OPTIONS = {
    "power": "the polynomial exponent as --lr-scheduler-power (lr_scheduler_power in a TOML; kohya passes both and "
             "fails with a duplicate argument)",
    "num_cycles": "the cycles as --lr-scheduler-num-cycles N (lr_scheduler_num_cycles)",
    "min_lr_rate": "the end LR's share as --lr-scheduler-min-lr-ratio R (lr_scheduler_min_lr_ratio)",
    "min_lr_ratio": "the end LR's share as --lr-scheduler-min-lr-ratio R (lr_scheduler_min_lr_ratio)",
    "timescale": "the inverse_sqrt timescale as --lr-scheduler-timescale N (lr_scheduler_timescale)",
    "num_warmup_steps": "the warm-up as --lr-warmup-steps N (lr_warmup_steps)",
    "num_decay_steps": "the decay steps as --lr-decay-steps N (lr_decay_steps)",
    "num_training_steps": "the steps as --steps / --epochs (the schedule spans the run)",
    "num_stable_steps": "--lr-decay-steps N (the stable phase is the steps left after the warm-up and the decay)",
    "last_epoch": "--resume OUT-state to continue a run (the schedule continues from its step)",
}
#: the schedules that read lr_scheduler_num_cycles, lr_decay_steps, lr_scheduler_min_lr_ratio, lr_scheduler_timescale
_CYCLES = ("cosine_with_restarts", "cosine_with_min_lr", "warmup_stable_decay")
_MIN_LR_RATIO = ("cosine_with_min_lr", "warmup_stable_decay")


def step_count(value: float, total: int, *, shares: str = FLOOR_SHARES) -> int:
    """kohya's step count of ``lr_warmup_steps`` / ``lr_decay_steps``: below 1 a share of the
    ``total`` steps, ``int(value · total)`` (rounded down, as kohya's; :data:`LEGACY_SHARES`: to the
    nearest step, ``round(value · total)``, as runs recorded before trained); else ``int(value)``."""
    if value >= 1:
        return int(value)
    return round(value * total) if shares == LEGACY_SHARES else int(value * total)


def recorded_shares(record: Mapping[str, Any] | None) -> str:
    """How a run rounds a share of the steps: :data:`FLOOR_SHARES` for a new run (``record``
    ``None``), else the resumed run's ``run.json`` ``step_shares`` (:data:`LEGACY_SHARES` when it has
    none: the run started before shares were rounded down, and keeps its warm-up).

    Raises:
        ValueError: a ``step_shares`` entry this version does not know (an edited file).
    """
    return recorded_version(record, "step_shares", new=FLOOR_SHARES, legacy=LEGACY_SHARES)


def lr_scheduler_kwargs(options: TrainOptions) -> dict[str, Any]:
    """kohya's ``--lr_scheduler_args`` (``KEY=VALUE`` strings; the field is made a tuple) -> the
    schedule's keyword arguments (:data:`LR_SCHEDULER_ARG_KEYS`): ``num_cycles`` (``cosine``: the
    waves, transformers' default 0.5; kohya passes no cycles of its own to ``cosine``), ``lr_end``
    (``polynomial``, diffusers' default 1e-7) and ``min_lr`` (``cosine_with_min_lr``) as numbers, the
    others as text.
    Values are read with ``ast.literal_eval``, as kohya's; the text ones also unquoted. kohya hands
    them to the schedule function, which takes only its own keys (others are a ``TypeError``
    there): refused here, naming the fix."""
    from ..training.optimizer_args import parse_optimizer_args
    from .train import _key_value_items

    if options.lr_scheduler_type:  # (the args are the torch class's: torch_schedule)
        return {}
    items = _key_value_items(options, "lr_scheduler_args")
    text = {key.strip(): value.strip() for key, equals, value in (item.partition("=") for item in items)
            if key.strip() in _TEXT_KEYS and equals}
    pairs = list(parse_optimizer_args([i for i in items if i.partition("=")[0].strip() not in text],
                                      where="--lr-scheduler-args"))
    for key, raw in text.items():
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        pairs.append((key, value))
    allowed = LR_SCHEDULER_ARG_KEYS.get(options.lr_scheduler, ())
    out: dict[str, Any] = {}
    for key, value in pairs:
        # (cosine's num_cycles is the args' to give; the schedules without cycles take none, below)
        if key in _OWN_OPTIONS and key not in allowed and (key != "num_cycles" or options.lr_scheduler in _CYCLES):
            raise ValueError(f"--lr-scheduler-args {key}=...: give {_OWN_OPTIONS[key]}")
        if key not in allowed:
            raise ValueError(f"--lr-scheduler-args {key}: not an argument of --lr-scheduler {options.lr_scheduler} here; "
                             "the schedules take " + "; ".join(f"{name}: {', '.join(keys)}"
                                                               for name, keys in LR_SCHEDULER_ARG_KEYS.items())
                             + " (the warm-up, decay steps, cycles, power, min-LR ratio and timescale have their own options)")
        if key in _TEXT_KEYS:
            if not isinstance(value, str):
                raise ValueError(f"--lr-scheduler-args {key}={value!r}: must be text")
            if key != "step_rules" and value not in WSD_SHAPES:
                raise ValueError(f"--lr-scheduler-args {key}={value!r}: must be one of {', '.join(WSD_SHAPES)}")
            out[key] = value
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"--lr-scheduler-args {key}={value!r}: must be a finite number >= 0")
        out[key] = float(value)
    # the schedules' reference LR: --learning-rate (kohya's optimiser LR; --unet-lr does not change it), else --unet-lr
    name = "learning_rate" if options.learning_rate is not None else "unet_lr"
    rate = getattr(options, name)
    if "lr_end" in out and rate is not None and not out["lr_end"] < rate:
        raise ValueError(f"--lr-scheduler-args lr_end={out['lr_end']} must be below --{name.replace('_', '-')} "
                         f"{rate} (the polynomial schedule decays from it to lr_end)")
    if "min_lr" in out:
        if options.lr_scheduler_min_lr_ratio is not None:
            raise ValueError("--lr-scheduler-args min_lr and --lr-scheduler-min-lr-ratio both give the LR "
                             "cosine_with_min_lr ends at: give one (transformers refuses both)")
        if rate is not None and not out["min_lr"] <= rate:
            raise ValueError(f"--lr-scheduler-args min_lr={out['min_lr']} must not be above --{name.replace('_', '-')} "
                             f"{rate} (cosine_with_min_lr decays from it to min_lr)")
    if "step_rules" in out:
        StepRules.parse(out["step_rules"])
    return out


#: the text arguments of the torch classes (read unquoted too; kohya needs them quoted: ast.literal_eval)
_TORCH_TEXT_KEYS = ("anneal_strategy",)
#: torch classes TorchSchedule does not replay that run stepped as an installed class (ImportedSchedule: the LR alone)
_STEPPED_TORCH_SCHEDULES = ("CyclicLR",)


def torch_schedule(options: TrainOptions) -> TorchSchedule | ImportedSchedule | None:
    """kohya's ``--lr_scheduler_type`` with ``--lr_scheduler_args`` as its arguments (values read
    with ``ast.literal_eval``, as kohya's; ``anneal_strategy`` also unquoted for a torch class), or
    ``None`` without one: a class of ``torch.optim.lr_scheduler`` (a bare name or its path) replayed by
    :class:`TorchSchedule`, any other ``module.Class`` imported and stepped by :class:`ImportedSchedule`.

    Raises:
        ValueError: what :meth:`TorchSchedule.parse` refuses (a refused class, a bad argument) or
            :meth:`ImportedSchedule.parse` does (a module not installed, the class's own refusal).
    """
    if not options.lr_scheduler_type:
        return None
    from ..training.optimizer_args import parse_optimizer_args
    from .train import _key_value_items

    items = _key_value_items(options, "lr_scheduler_args")
    type_name = str(options.lr_scheduler_type).strip()
    module, _, name = type_name.rpartition(".")
    stepped = name in _STEPPED_TORCH_SCHEDULES and module in ("", TORCH_SCHEDULE_MODULE)
    if stepped or module and module != TORCH_SCHEDULE_MODULE:  # (kohya imports the module)
        rate = options.learning_rate if options.learning_rate is not None else options.unet_lr
        return ImportedSchedule.parse(f"{TORCH_SCHEDULE_MODULE}.{name}" if stepped else type_name,
                                      _kohya_scheduler_kwargs(items),
                                      **({} if rate is None else {"learning_rate": float(rate)}))
    quoted = []
    for item in items:
        key, equals, value = item.partition("=")
        if key.strip() in _TORCH_TEXT_KEYS and equals and value.strip() and value.strip()[0] not in "'\"":
            item = f"{key.strip()}={value.strip()!r}"
        quoted.append(item)
    args = dict(parse_optimizer_args(quoted, where="--lr-scheduler-args"))
    return TorchSchedule.parse(str(options.lr_scheduler_type), args)


def _kohya_scheduler_kwargs(items: list[str]) -> dict[str, Any]:
    """kohya's ``get_scheduler_fix`` reading of ``--lr_scheduler_args``: ``key, value = arg.split("=")``, the value
    through ``ast.literal_eval`` as it is (a list stays a list) — for a class sdadapt hands them to as they are."""
    kwargs: dict[str, Any] = {}
    for item in items:
        parts = str(item).split("=")
        if len(parts) != 2 or not parts[0].strip():
            raise ValueError(f"--lr-scheduler-args: {item!r} is not KEY=VALUE with one '=' (kohya splits each at '=')")
        key, text = parts[0].strip(), parts[1].strip()
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueError(f"--lr-scheduler-args: {item!r}: the value {text!r} is not a Python literal (kohya reads "
                             "it with ast.literal_eval: quote text, e.g. mode='cos')") from None
    return kwargs


def _min_lr_ratio(options: TrainOptions, kwargs: dict[str, Any], learning_rate: float | None = None) -> float | None:
    """``lr_scheduler_min_lr_ratio``, or ``min_lr`` of the args as a share of the optimiser's LR
    (``--learning-rate``, else ``--unet-lr``, else the run's ``learning_rate``)."""
    if "min_lr" in kwargs:
        rate = options.learning_rate if options.learning_rate is not None else options.unet_lr
        rate = learning_rate if rate is None else rate
        return None if rate is None else kwargs["min_lr"] / rate
    return options.lr_scheduler_min_lr_ratio


def check_schedule_options(options: TrainOptions) -> None:
    """The schedule options checked before the model loads: their types and ranges, the args the
    schedule needs (``cosine_with_min_lr``'s end LR, ``piecewise_constant``'s ``step_rules``) and,
    with ``--steps`` given, ``warmup_stable_decay``'s warm-up and decay fitting into them.

    Raises:
        ValueError: naming the option and the fix.
    """
    from .train_optimizer import uses_schedule_free

    if options.lr_scheduler_type and not uses_schedule_free(options):  # (kohya's dummy scheduler: never built)
        torch_schedule(options)
        warmup = options.lr_warmup_steps
        if warmup:  # (kohya's wrap_check_needless_num_warmup_steps)
            raise ValueError(f"--lr-scheduler-type {options.lr_scheduler_type} takes no warm-up: leave --lr-warmup-steps "
                             f"out or 0 (kohya refuses it too), got {warmup}")
    power = options.lr_scheduler_power
    if isinstance(power, bool) or not isinstance(power, (int, float)) or not 0 <= power < math.inf:
        raise ValueError(f"--lr-scheduler-power must be a finite number >= 0 (the polynomial schedule's exponent; 1: "
                         f"linear decay), got {power!r}")
    decay = options.lr_decay_steps
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0 <= decay < math.inf:
        raise ValueError(f"--lr-decay-steps must be >= 0 (warmup_stable_decay's decay steps: a count, or a fraction "
                         f"of the steps below 1), got {decay!r}")
    for name in ("lr_warmup_steps", "lr_decay_steps"):  # (kohya's int_or_float: 1 or more is a count, "1.5" refused)
        value = getattr(options, name)
        if value is not None and 1 <= value < math.inf and value != int(value):
            raise ValueError(f"--{name.replace('_', '-')} {value}: a count must be a whole number of steps (below 1 it is "
                             f"a share of the steps), e.g. {int(value)}")
    scale = options.lr_scheduler_timescale
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or scale < 1):
        raise ValueError(f"--lr-scheduler-timescale must be a whole number >= 1 (inverse_sqrt's timescale), got {scale!r}")
    ratio = options.lr_scheduler_min_lr_ratio
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1):
        raise ValueError(f"--lr-scheduler-min-lr-ratio must be a number in [0, 1] (the LR the schedule ends at, as a "
                         f"share of the base LR), got {ratio!r}")
    kwargs = lr_scheduler_kwargs(options)
    schedule = options.lr_scheduler
    if schedule == "cosine_with_min_lr" and _min_lr_ratio(options, kwargs) is None and "min_lr" not in kwargs:
        raise ValueError("--lr-scheduler cosine_with_min_lr needs the LR it ends at: --lr-scheduler-min-lr-ratio R "
                         "(lr_scheduler_min_lr_ratio, e.g. 0.1) or --lr-scheduler-args min_lr=X (kohya and transformers "
                         "refuse it without one)")
    if schedule == "piecewise_constant" and "step_rules" not in kwargs:
        raise ValueError("--lr-scheduler piecewise_constant needs its rules: --lr-scheduler-args "
                         "step_rules=1:100,0.1:200,0.01 (factor 1 before step 100, 0.1 before step 200, then 0.01; in a "
                         "kohya TOML lr_scheduler_args = [\"step_rules='1:100,0.1:200,0.01'\"])")
    warmup = options.lr_warmup_steps
    if schedule == "warmup_stable_decay" and warmup is not None and warmup < 1 and 0 < decay < 1 and warmup + decay > 1:
        raise ValueError(f"--lr-scheduler warmup_stable_decay: --lr-warmup-steps {warmup} and --lr-decay-steps {decay} "
                         "are more than all the steps together; give shares that add up to 1 at most")
    if schedule == "warmup_stable_decay" and options.steps is not None and options.epochs is None:
        total = options.steps
        check_extra_schedule(schedule, total_steps=total,
                             warmup_steps=min(20, total // 10) if warmup is None else step_count(warmup, total),
                             decay_steps=step_count(decay, total))


def schedule_fit_args(options: TrainOptions, *, total: int, relative_step: bool = False,
                      shares: str = FLOOR_SHARES, learning_rate: float | None = None) -> dict[str, Any]:
    """The :class:`~sdadapt.methods.FitConfig` keyword arguments of the schedule for a run of
    ``total`` optimiser steps: ``schedule``, ``warmup_steps`` (``--lr-warmup-steps``; sdadapt's
    default ``min(20, total // 10)`` when not given; 0 for ``piecewise_constant``, which kohya
    gives no warm-up, and under Adafactor's ``relative_step``, whose step size is its own),
    ``num_cycles``, ``lr_power``, ``lr_end``, ``schedule_base_lr`` (``--learning-rate``), and
    ``min_lr_ratio``, ``decay_steps``, ``lr_timescale``, ``step_rules``, ``warmup_type``,
    ``decay_type`` (:mod:`sdadapt.training.lr_schedules`). ``shares``: how a share of the steps is
    rounded (:func:`recorded_shares`); ``learning_rate``: the run's LR when the options give no
    ``--learning-rate`` or ``--unet-lr`` (the method's default: ``min_lr`` is a share of it)."""
    kwargs = lr_scheduler_kwargs(options)
    warmup = options.lr_warmup_steps
    warmup_steps = min(20, total // 10) if warmup is None else step_count(warmup, total, shares=shares)
    schedule = None if relative_step else torch_schedule(options)
    if relative_step or options.lr_scheduler == "piecewise_constant" or schedule is not None:
        warmup_steps = 0
    return {"torch_schedule": schedule, "schedule": "constant" if relative_step else options.lr_scheduler, "warmup_steps": warmup_steps,
            "num_cycles": options.lr_scheduler_num_cycles, "lr_power": float(options.lr_scheduler_power),
            "lr_end": kwargs.get("lr_end", 1e-7), "schedule_base_lr": options.learning_rate,
            "min_lr_ratio": _min_lr_ratio(options, kwargs, learning_rate), "decay_steps": step_count(options.lr_decay_steps, total, shares=shares),
            "lr_timescale": options.lr_scheduler_timescale, "step_rules": kwargs.get("step_rules"),
            "warmup_type": kwargs.get("warmup_type", "linear"), "decay_type": kwargs.get("decay_type", "cosine"),
            **_cosine_waves(kwargs if not relative_step and schedule is None and options.lr_scheduler == "cosine" else {})}


def _cosine_waves(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``cosine`` with ``--lr-scheduler-args num_cycles=c`` (kohya hands it to transformers'
    ``get_cosine_schedule_with_warmup``: ``max(0, ½ (1 + cos(2π c p)))`` after the warm-up) -> the
    same factor as :func:`~sdadapt.training.lr_schedules.cosine_with_min_lr_factor` with ``2c``
    half-waves ending at 0; no ``num_cycles``: nothing (``cosine``, one half-wave)."""
    if "num_cycles" not in kwargs:
        return {}
    return {"schedule": "cosine_with_min_lr", "num_cycles": 2 * kwargs["num_cycles"], "min_lr_ratio": 0.0}


def schedule_notes(options: TrainOptions) -> list[str]:
    """The schedule options given that ``--lr-scheduler`` does not read (kohya configs carry them)."""
    from .train_optimizer import uses_schedule_free

    if options.lr_scheduler_type and uses_schedule_free(options):  # (train_optimizer.schedule_free_notes says it)
        return []
    if options.lr_scheduler_type:
        unused = [f"--{name.replace('_', '-')} {value}" for name, value in (
            ("lr_scheduler", options.lr_scheduler if options.lr_scheduler not in ("cosine", "constant") else None),
            ("lr_scheduler_num_cycles", options.lr_scheduler_num_cycles if options.lr_scheduler_num_cycles != 1 else None),
            ("lr_scheduler_power", options.lr_scheduler_power if options.lr_scheduler_power != 1.0 else None),
            ("lr_decay_steps", options.lr_decay_steps or None),
            ("lr_scheduler_timescale", options.lr_scheduler_timescale),
            ("lr_scheduler_min_lr_ratio", options.lr_scheduler_min_lr_ratio)) if value is not None]
        return [(f"{', '.join(unused)}: not used with --lr-scheduler-type {options.lr_scheduler_type} (kohya builds that "
                 "class from --lr-scheduler-args alone)")] if unused else []
    schedule = options.lr_scheduler
    notes = []
    if options.lr_scheduler_num_cycles != 1 and schedule not in _CYCLES:
        notes.append(f"--lr-scheduler-num-cycles {options.lr_scheduler_num_cycles}: not used by --lr-scheduler "
                     f"{schedule} (only {', '.join(_CYCLES)} have cycles)")
    if options.lr_scheduler_power != 1.0 and schedule != "polynomial":
        notes.append(f"--lr-scheduler-power {options.lr_scheduler_power}: not used by --lr-scheduler {schedule} "
                     "(only polynomial has a power)")
    if options.lr_decay_steps and schedule != "warmup_stable_decay":
        notes.append(f"--lr-decay-steps {options.lr_decay_steps}: not used by --lr-scheduler {schedule} "
                     "(only warmup_stable_decay has decay steps)")
    if schedule == "warmup_stable_decay" and not options.lr_decay_steps:
        notes.append("--lr-scheduler warmup_stable_decay without --lr-decay-steps: the LR holds after the warm-up and "
                     "never decays (kohya's default lr_decay_steps 0)")
    if options.lr_scheduler_timescale is not None and schedule != "inverse_sqrt":
        notes.append(f"--lr-scheduler-timescale {options.lr_scheduler_timescale}: not used by --lr-scheduler {schedule} "
                     "(only inverse_sqrt has a timescale)")
    if options.lr_scheduler_min_lr_ratio is not None and schedule not in _MIN_LR_RATIO:
        notes.append(f"--lr-scheduler-min-lr-ratio {options.lr_scheduler_min_lr_ratio}: not used by --lr-scheduler "
                     f"{schedule} (only {' and '.join(_MIN_LR_RATIO)} end at a share of the LR)")
    if schedule == "piecewise_constant" and options.lr_warmup_steps:
        notes.append(f"--lr-warmup-steps {options.lr_warmup_steps}: not used by --lr-scheduler piecewise_constant "
                     "(kohya gives it no warm-up: its step_rules are the whole schedule)")
    return notes
