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
from .run_versions import recorded_version

if TYPE_CHECKING:
    from .train import TrainOptions

__all__ = [
    "KOHYA_DEFAULTS",
    "LEGACY_DEFAULTS",
    "LEGACY_WEIGHT_DECAY",
    "fit_optimizer_args",
    "fit_weight_decay",
    "kohya_class_name",
    "prodigy_clashes",
    "prodigy_notes",
    "recorded_defaults",
    "relative_step_notes",
    "schedule_free_clashes",
    "schedule_free_notes",
    "ss_lr_scheduler",
    "ss_optimizer",
    "uses_relative_step",
    "uses_schedule_free",
]

#: ``run.json``'s ``optimizer_defaults`` of runs whose optimiser gets kohya's defaults
KOHYA_DEFAULTS = "kohya"
#: what a ``run.json`` without ``optimizer_defaults`` trained with: sdadapt's own optimiser defaults
LEGACY_DEFAULTS = "sdadapt-0"
#: ``--weight-decay``'s default for every optimiser before it became the optimiser's own
LEGACY_WEIGHT_DECAY = 1e-2


def _canonical(options: TrainOptions) -> str:
    from ..methods.optimizers import canonical_optimizer

    return canonical_optimizer(options.optimizer)


def recorded_defaults(record: Mapping[str, Any] | None) -> str:
    """The optimiser defaults a run trains with: :data:`KOHYA_DEFAULTS` for a new run (``record``
    ``None``), else those of the resumed run's ``run.json`` (:data:`LEGACY_DEFAULTS` when it names none).

    Raises:
        ValueError: an ``optimizer_defaults`` entry this version does not know (an edited file).
    """
    return recorded_version(record, "optimizer_defaults", new=KOHYA_DEFAULTS, legacy=LEGACY_DEFAULTS)


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
        ("--text-encoder-2-lr", None if isinstance(options.text_encoder_2_lr, str) else options.text_encoder_2_lr or None),
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


#: kohya's ``ss_optimizer`` name of each optimiser: the module path and name of the class kohya's
#: ``get_optimizer`` (library/train_util.py) builds for that ``optimizer_type`` (it writes
#: ``optimizer_class.__module__ + "." + optimizer_class.__name__``), keyed by the name as given
#: (lower case: kohya's aliases build different classes, e.g. PagedAdamW8bit) — the one table of them
_KOHYA_CLASS_NAMES = {
    "adamw": "torch.optim.adamw.AdamW",
    "adamw8bit": "bitsandbytes.optim.adamw.AdamW8bit", "pagedadamw8bit": "bitsandbytes.optim.adamw.PagedAdamW8bit",
    # (bitsandbytes' paged 32-bit AdamW: float32 AdamW whose state pages to the host under memory pressure; the update
    # is AdamW's)
    "pagedadamw": "bitsandbytes.optim.adamw.PagedAdamW", "pagedadamw32bit": "bitsandbytes.optim.adamw.PagedAdamW32bit",
    "adafactor": "transformers.optimization.Adafactor",
    "lion": "lion_pytorch.lion_pytorch.Lion",
    "lion8bit": "bitsandbytes.optim.lion.Lion8bit", "pagedlion8bit": "bitsandbytes.optim.lion.PagedLion8bit",
    "sgd-nesterov": "torch.optim.sgd.SGD",  # (kohya's SGDNesterov: nesterov=True, not among the arguments shown)
    "adamw-schedulefree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
    "sgd-schedulefree": "schedulefree.sgd_schedulefree.SGDScheduleFree",
    "prodigy": "prodigyopt.prodigy.Prodigy", "dadapt-adam": "dadaptation.dadapt_adam.DAdaptAdam",
    "dadapt-lion": "dadaptation.dadapt_lion.DAdaptLion",
    "dadapt-adam-preprint": "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint",
    # sdadapt's own optimisers, which no kohya optimizer_type builds: the same formula on sdadapt's class
    "adamw-bf16": "sdadapt.training.optim.AdamW", "lion-bf16": "sdadapt.training.lion.Lion",
}


def kohya_class_name(optimizer: str) -> str:
    """kohya's ``ss_optimizer`` name (without the arguments) of ``optimizer`` (``--optimizer`` /
    ``optimizer_type`` as given, any alias): e.g. ``"AdamW8bit"`` → ``"bitsandbytes.optim.adamw.AdamW8bit"``,
    ``"SGDNesterov"`` → ``"torch.optim.sgd.SGD"``; ``adamw-bf16`` / ``lion-bf16`` (sdadapt's own, no
    kohya class): sdadapt's class, ``"sdadapt.training.optim.AdamW"`` / ``"sdadapt.training.lion.Lion"``.

    An imported optimizer class (kohya's ``module.Class`` / ``torch.optim`` name): where the class is defined, as
    kohya writes it (``"RAdam"`` → ``"torch.optim.radam.RAdam"``).

    Raises:
        ValueError: a name ``--optimizer`` does not take.
    """
    from ..methods.optimizers import OPTIMIZERS, canonical_optimizer, imported_optimizer_class

    name = canonical_optimizer(optimizer)
    if name not in OPTIMIZERS:
        found = imported_optimizer_class(name)
        return f"{found.__module__}.{found.__name__}"
    return _KOHYA_CLASS_NAMES.get(optimizer.lower()) or _KOHYA_CLASS_NAMES[name]


#: the optimisers estimating one step size for every group (the LRs multiply it), as the notes name
#: them, with what kohya's warning about a low LR advises to tune instead
_ESTIMATING = {"prodigy": ("Prodigy", "prodigyopt", "tune d_coef in --optimizer-args instead"),
               "dadapt-adam": ("DAdaptAdam", "dadaptation", "lower it only if training is unstable"),
               "dadapt-lion": ("DAdaptLion", "dadaptation", "lower it only if training is unstable"),
               "dadapt-adam-preprint": ("DAdaptAdamPreprint", "dadaptation", "lower it only if training is unstable")}


def ss_optimizer(options: TrainOptions, given: OptimizerArgs, defaults: str = KOHYA_DEFAULTS) -> str:
    """kohya's ``ss_optimizer``: the class kohya's ``get_optimizer`` builds for this optimiser
    (:func:`kohya_class_name`) and the arguments it builds it with (Adafactor: ``relative_step=True``
    added as kohya adds it; SGDNesterov: ``momentum=0.9``), e.g.
    ``transformers.optimization.Adafactor(relative_step=True)``,
    ``prodigyopt.prodigy.Prodigy(decouple=True,d_coef=2)``, ``torch.optim.adamw.AdamW`` (no arguments)."""
    args = tuple(given) if defaults == LEGACY_DEFAULTS else kohya_optimizer_args(_canonical(options), tuple(given))
    name = kohya_class_name(options.optimizer)
    return name + (f"({format_optimizer_args(args)})" if args else "")


def prodigy_clashes(options: TrainOptions) -> list[str]:
    """What in ``options`` gives Prodigy's parameter groups different learning rates, which it
    cannot train with (one estimated step size for all; prodigyopt raises at the first step, so
    kohya's run fails there): a ``--text-encoder-lr`` / ``--text-encoder-2-lr`` other than the UNet's (or 0),
    LoRA+ ratios.
    The same for D-Adaptation (``dadapt-adam``, ``dadapt-lion``, ``dadapt-adam-preprint``: dadaptation raises
    the same way) and for prodigyopt's / dadaptation's own classes given as ``module.Class`` or by kohya's other
    D-Adaptation names (its AdaGrad, Adan and AdanIP would take the first group's LR for all, which kohya only warns of)."""
    from ..methods.optimizers import estimates_step_size

    if not estimates_step_size(_canonical(options)):
        return []
    clashes = []
    unet = options.unet_lr if options.unet_lr is not None else options.learning_rate
    second = options.learning_rate if isinstance(options.text_encoder_2_lr, str) else options.text_encoder_2_lr
    frozen = options.method_options.get("text_encoder") is False  # (no text-encoder group: its rates are unused)
    for flag, rate in (("--text-encoder-lr", options.text_encoder_lr), ("--text-encoder-2-lr", second)):
        if rate not in (None, 0) and (unet is None or rate != unet) and not frozen:
            clashes.append(f"{flag} {rate:g} (give the text encoder the UNet's learning rate, or 0 to freeze it)")
    clashes += [f"{name} {options.method_options[name]}" for name in _LR_FACTOR_OPTIONS[:3]
                if options.method_options.get(name) not in (None, 1, 1.0)]
    return clashes


def prodigy_notes(options: TrainOptions, *, learning_rate: float) -> list[str]:
    """Run-report lines for Prodigy: its learning rate multiplies the step size it estimates (``d``),
    and kohya's warning when that multiplier is ``≤ 0.1`` (D-Adaptation / Prodigy want about 1.0).
    The same for D-Adaptation's DAdaptAdam, DAdaptLion and DAdaptAdamPreprint (kohya's ``DAdaptation``)."""
    from ..methods.optimizers import estimates_step_size

    canonical = _canonical(options)
    if not estimates_step_size(canonical):
        return []
    # (an imported class — kohya's DAdaptAdaGrad ..., prodigyopt.Prodigy — its package's own advice, as sdadapt's twin)
    name, package, instead = _ESTIMATING.get(canonical) or (
        canonical.rpartition(".")[2], canonical.partition(".")[0],
        _ESTIMATING["prodigy" if canonical.startswith("prodigyopt.") else "dadapt-adam"][2])
    notes = [(f"{name} estimates its own step size d (starting at d0, 1e-6 unless --optimizer-args say d0=...); "
              f"the learning rate {learning_rate:g} multiplies it (the step is d × lr; kohya and {package} advise "
              "1.0), and the schedule scales that product")]
    if learning_rate <= 0.1:  # (kohya's get_optimizer warns at the same bound)
        notes.append(f"learning rate {learning_rate:g} is low for {name}: kohya warns at 0.1 and below and recommends "
                     f"--learning-rate 1.0 ({instead})")
    return notes


def uses_schedule_free(options: TrainOptions) -> bool:
    """Whether the optimiser is schedule-free (kohya's ``AdamWScheduleFree``, ``SGDScheduleFree``): no LR schedule, and
    the weights saved and sampled are its eval-mode average."""
    from ..methods.optimizers import schedule_free_optimizer

    return schedule_free_optimizer(_canonical(options))


def schedule_free_clashes(options: TrainOptions) -> list[str]:
    """What in ``options`` a schedule-free optimiser cannot train with (kohya offers neither with it):
    an EMA (the optimiser's eval-mode weights are already an average) and the fused backward pass."""
    if not uses_schedule_free(options):
        return []
    return [what for what, clash in (
        (f"--ema-decay {options.ema_decay} (its eval-mode weights are already an average of the steps)",
         options.ema_decay is not None),
        ("--fused-backward-pass (one optimiser per block, each with its own averaging weights)", options.fused_backward_pass),
    ) if clash]


def schedule_free_notes(options: TrainOptions, given: OptimizerArgs) -> list[str]:
    """Run-report lines for a schedule-free optimiser: the LR schedule kohya leaves unused, and which
    weights the samples and saves hold (``given``: ``--optimizer-args``, checked)."""
    if not uses_schedule_free(options):
        return []
    from ..methods.optimizers import OPTIMIZERS

    warmup = dict(given).get("warmup_steps", 0)
    own = _canonical(options) in OPTIMIZERS  # (an imported class: its own arguments, RAdamScheduleFree has no warm-up)
    warm_up = (f" with the optimiser's own warm-up (--optimizer-args warmup_steps=N{f', here {warmup}' if warmup else ''})"
               if own else "")
    notes = [(f"{options.optimizer} is schedule-free: a constant learning rate{warm_up}; samples, saves and the state "
              "hold its eval-mode weights (the average of the steps), as kohya's optimizer_eval_fn")]
    unused = [f"{flag} {value}" for flag, value in (
        ("--lr-scheduler", options.lr_scheduler if options.lr_scheduler != "cosine" else None),  # (not the default)
        ("--lr-scheduler-type", options.lr_scheduler_type or None),  # (kohya does not import it)
        ("--lr-warmup-steps", options.lr_warmup_steps or None)) if value is not None]
    if unused:
        notes.append(f"{', '.join(unused)}: not used with a schedule-free optimizer (kohya ignores them too: its "
                     "scheduler is a dummy one); give the warm-up as --optimizer-args warmup_steps=N")
    return notes


def ss_lr_scheduler(options: TrainOptions, given: OptimizerArgs, *, learning_rate: float, schedule: str,
                    defaults: str = KOHYA_DEFAULTS) -> str:
    """kohya's ``ss_lr_scheduler``: ``adafactor:<lr>`` under Adafactor's relative step (kohya rewrites
    ``args.lr_scheduler`` so, sd-scripts@48d368fa ``library/train_util.py:5079``); with a schedule-free
    optimiser the ``--lr-scheduler`` given, which it does not use (kohya writes ``args.lr_scheduler``,
    ``train_network.py:1019``, though ``get_scheduler_fix`` hands such an optimiser a dummy scheduler,
    ``train_util.py:5270-5271``); else ``schedule``."""
    if uses_relative_step(options, given, defaults):
        return f"adafactor:{learning_rate}"
    if uses_schedule_free(options):
        return options.lr_scheduler
    return schedule
