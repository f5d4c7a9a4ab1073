"""The optimiser ``python -m sdadapt train`` builds: kohya's defaults, and what a resumed run had.

kohya's ``get_optimizer`` (library/train_util.py) trains ``--optimizer_type Adafactor`` with
``transformers.optimization.Adafactor`` and ``relative_step=True`` unless ``--optimizer_args`` say
otherwise; the LR is then unused (``learning_rate`` becomes ``None``, the schedule becomes
``adafactor:<lr>``, transformers' ``AdafactorSchedule``, which only reports the step size and
refuses a warm-up). ``train`` does the same (:func:`fit_optimizer_args`,
:func:`uses_relative_step`), says so in the run report (:func:`relative_step_notes`) and writes
kohya's ``ss_optimizer`` / ``ss_lr_scheduler`` (:func:`ss_optimizer`, :func:`ss_lr_scheduler`).

Runs recorded before (``run.json`` without ``optimizer_defaults``) trained Adafactor with sdadapt's
own defaults (``relative_step=False``, ``scale_parameter=False``, conv weights factored as
``(O, I·k·k)``, weight decay 0.01, the LR schedule); ``--resume`` of such a run keeps them
(:data:`LEGACY_DEFAULTS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..training.optimizer_args import (
    OptimizerArgs,
    format_optimizer_args,
    kohya_constructor_args,
    kohya_optimizer_args,
)

if TYPE_CHECKING:
    from .train import TrainOptions

__all__ = [
    "KOHYA_DEFAULTS",
    "LEGACY_DEFAULTS",
    "LEGACY_WEIGHT_DECAY",
    "fit_optimizer_args",
    "fit_weight_decay",
    "recorded_defaults",
    "relative_step_notes",
    "ss_lr_scheduler",
    "ss_optimizer",
    "uses_relative_step",
]

#: ``run.json``'s ``optimizer_defaults`` of runs whose optimiser gets kohya's defaults
KOHYA_DEFAULTS = "kohya"
#: what a ``run.json`` without ``optimizer_defaults`` trained with: sdadapt's own optimiser defaults
LEGACY_DEFAULTS = "sdadapt-0"
#: ``--weight-decay``'s default for every optimiser before it became the optimiser's own
LEGACY_WEIGHT_DECAY = 1e-2


def _canonical(options: TrainOptions) -> str:
    from ..methods.fit import _OPTIMIZER_ALIASES

    return _OPTIMIZER_ALIASES[options.optimizer.lower()]


def recorded_defaults(record: Mapping[str, Any] | None) -> str:
    """The optimiser defaults a run trains with: :data:`KOHYA_DEFAULTS` for a new run (``record``
    ``None``), else those of the resumed run's ``run.json`` (:data:`LEGACY_DEFAULTS` when it names none).

    Raises:
        ValueError: an ``optimizer_defaults`` entry this version does not know (an edited file).
    """
    if record is None:
        return KOHYA_DEFAULTS
    defaults = record.get("optimizer_defaults", LEGACY_DEFAULTS)
    if defaults not in (KOHYA_DEFAULTS, LEGACY_DEFAULTS):
        raise ValueError(f"run.json's optimizer_defaults {defaults!r} is not {KOHYA_DEFAULTS!r} or {LEGACY_DEFAULTS!r}; "
                         "the file was edited — resume from an intact state folder")
    return defaults


def fit_optimizer_args(options: TrainOptions, given: OptimizerArgs, defaults: str = KOHYA_DEFAULTS) -> OptimizerArgs:
    """The optimiser keywords ``FitConfig.optimizer_args`` gets: ``given`` (``--optimizer-args``,
    checked) with kohya's defaults (:func:`~sdadapt.training.optimizer_args.kohya_constructor_args`;
    Adafactor: ``relative_step=True``, transformers' ``scale_parameter=True`` and factoring), or
    ``given`` alone for a resumed :data:`LEGACY_DEFAULTS` run."""
    if defaults == LEGACY_DEFAULTS:
        return tuple(given)
    return kohya_constructor_args(_canonical(options), tuple(given))


def fit_weight_decay(options: TrainOptions, defaults: str = KOHYA_DEFAULTS) -> float | None:
    """``FitConfig.weight_decay``: ``--weight-decay``, else ``None`` (the optimiser's own: 0.01 for
    AdamW, 0 for Adafactor) — or 0.01 for a resumed :data:`LEGACY_DEFAULTS` run, as it trained."""
    if options.weight_decay is None and defaults == LEGACY_DEFAULTS:
        return LEGACY_WEIGHT_DECAY
    return options.weight_decay


def uses_relative_step(options: TrainOptions, given: OptimizerArgs, defaults: str = KOHYA_DEFAULTS) -> bool:
    """Whether the optimiser takes its own step size (Adafactor's ``relative_step``), so that the LR,
    the schedule and the warm-up are unused (as kohya's)."""
    if _canonical(options) != "adafactor":
        return False
    return bool(dict(fit_optimizer_args(options, given, defaults)).get("relative_step", False))


def relative_step_notes(options: TrainOptions, given: OptimizerArgs, *, learning_rate: float,
                        defaults: str = KOHYA_DEFAULTS) -> list[str]:
    """Run-report lines for Adafactor: what its relative step leaves unused (kohya logs the same),
    and a resumed run that keeps the old defaults."""
    if _canonical(options) != "adafactor":
        return []
    if defaults == LEGACY_DEFAULTS:
        return [("--resume of a run recorded before Adafactor took kohya's defaults: it trains on as it started "
                 "(relative_step=False, scale_parameter=False, conv weights factored as (O, I·k·k), weight decay "
                 f"{fit_weight_decay(options, defaults)}, the LR schedule)")]
    if not uses_relative_step(options, given, defaults):
        return []
    keys = dict(given)
    why = ("kohya's default: --optimizer-args without relative_step" if "relative_step" not in keys else
           "warmup_init=True turns relative_step=False back on, as kohya's" if not keys["relative_step"] else
           "--optimizer-args relative_step=True")
    scaled = " × max(ε₂, RMS(w))" if dict(fit_optimizer_args(options, given, defaults)).get("scale_parameter") else ""
    notes = [(f"Adafactor with relative_step ({why}): its own step size min(1e-2, 1/√t){scaled}; the learning rate "
              f"{learning_rate:g} is unused (kohya's initial_lr of its adafactor schedule; the log's lr column shows it) "
              "and the schedule is kohya's adafactor one")]
    unused = [f"{flag} {value}" for flag, value in (
        ("--lr-scheduler", options.lr_scheduler if options.lr_scheduler != "cosine" else None),  # (not the default)
        ("--lr-warmup-steps", options.lr_warmup_steps or None),
        ("--unet-lr", options.unet_lr), ("--text-encoder-lr", options.text_encoder_lr or None),
        # the per-parameter LR factors (kohya's groups' LRs, which relative_step ignores too); 0 still freezes
        *((name, options.method_options.get(name)) for name in _LR_FACTOR_OPTIONS))
        if value is not None]
    if unused:
        notes.append(f"{', '.join(unused)}: not used with Adafactor's relative step (kohya ignores them too: its "
                     "step size replaces every group's LR, so LoRA+ ratios and block LRs change nothing, while a "
                     "weight of 0 still leaves its parameters out; pass --optimizer-args relative_step=False to train "
                     "with the LR)")
    return notes


#: method options that set per-parameter LR factors (unused under Adafactor's relative step, except 0: frozen)
_LR_FACTOR_OPTIONS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "down_lr_weight",
                      "mid_lr_weight", "up_lr_weight", "block_lr", "neg_lr_weight")


def ss_optimizer(options: TrainOptions, given: OptimizerArgs, defaults: str = KOHYA_DEFAULTS) -> str:
    """kohya's ``ss_optimizer``: the name, and the arguments kohya's ``get_optimizer`` built it with
    (Adafactor: ``relative_step=True`` added as kohya adds it), e.g. ``adafactor(relative_step=True)``."""
    args = tuple(given) if defaults == LEGACY_DEFAULTS else kohya_optimizer_args(_canonical(options), tuple(given))
    return options.optimizer + (f"({format_optimizer_args(args)})" if args else "")


def ss_lr_scheduler(options: TrainOptions, given: OptimizerArgs, *, learning_rate: float, schedule: str,
                    defaults: str = KOHYA_DEFAULTS) -> str:
    """kohya's ``ss_lr_scheduler``: ``adafactor:<lr>`` under Adafactor's relative step, else ``schedule``."""
    if uses_relative_step(options, given, defaults):
        return f"adafactor:{learning_rate}"
    return schedule
