"""The optimisers ``fit`` trains with: their names and kohya's spellings (``OPTIMIZERS``, the
aliases, the kohya names refused with a reason), which of them CUDA graphs can capture
(:func:`cuda_graph_clashes`) and how each is built over a run's parameter groups
(:func:`make_optimizer`). :mod:`sdadapt.methods.fit` re-exports the public names; ``train`` and
its kohya mapping read the tables from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

# the optimiser names (kohya's spellings are accepted case-insensitively by make_optimizer): their one home is
# sdadapt.method_tables (torch-free, for the command line's parser), re-exported here
from ..method_tables import OPTIMIZERS
from ..training.imported_classes import imported_optimizer_class

if TYPE_CHECKING:
    from .fit import FitConfig

__all__ = ["OPTIMIZERS", "canonical_optimizer", "cuda_graph_clashes", "estimates_step_size", "imported_optimizer_class",
           "make_optimizer", "schedule_free_optimizer"]

_OPTIMIZER_ALIASES = {"adamw": "adamw", "adamw8bit": "adamw8bit", "adamw_8bit": "adamw8bit", "adamw-8bit": "adamw8bit",
                      "pagedadamw8bit": "adamw8bit", "pagedadamw": "adamw", "pagedadamw32bit": "adamw",
                      "adamw-bf16": "adamw-bf16", "adamw_bf16": "adamw-bf16",
                      "adamwbf16": "adamw-bf16", "adafactor": "adafactor", "lion": "lion", "lion-bf16": "lion-bf16",
                      "lion_bf16": "lion-bf16", "lionbf16": "lion-bf16", "lion8bit": "lion-bf16",
                      "pagedlion8bit": "lion-bf16", "sgd-nesterov": "sgd-nesterov", "sgd_nesterov": "sgd-nesterov",
                      "sgdnesterov": "sgd-nesterov", "prodigy": "prodigy", "dadapt-adam": "dadapt-adam",
                      "dadapt_adam": "dadapt-adam", "dadaptadam": "dadapt-adam", "dadapt-lion": "dadapt-lion",
                      "dadapt_lion": "dadapt-lion", "dadaptlion": "dadapt-lion",
                      "dadapt-adam-preprint": "dadapt-adam-preprint", "dadaptadampreprint": "dadapt-adam-preprint",
                      "dadaptation": "dadapt-adam-preprint",
                      "adamw-schedulefree": "adamw-schedulefree", "adamwschedulefree": "adamw-schedulefree",
                      "adamw_schedulefree": "adamw-schedulefree", "sgd-schedulefree": "sgd-schedulefree",
                      "sgdschedulefree": "sgd-schedulefree", "sgd_schedulefree": "sgd-schedulefree"}
#: the schedule-free optimisers: train()/eval() mode switches, no LR schedule (kohya's *ScheduleFree)
_SCHEDULE_FREE_OPTIMIZERS = ("adamw-schedulefree", "sgd-schedulefree")
#: the optimisers that estimate one step size for all parameter groups (their LRs multiply it)
_STEP_SIZE_ESTIMATING = ("prodigy", "dadapt-adam", "dadapt-lion", "dadapt-adam-preprint")
#: kohya optimiser names refused, with the reason and what to use (lower case)
_REFUSED_OPTIMIZERS = {"sgdnesterov8bit": (
    "SGDNesterov8bit is bitsandbytes' SGD with an 8-bit momentum, which sdadapt does not have; use SGDNesterov "
    "(the same update, a float32 momentum: 4 bytes per parameter) or Lion8bit (sdadapt's Lion with a bfloat16 "
    "momentum: 2 bytes per parameter)")}
#: kohya optimiser names sdadapt has no implementation of, built as kohya builds them: the package's own class
#: (the imported-class path, :func:`imported_optimizer_class`; the package must be installed, as for kohya)
_KOHYA_IMPORTED = {"dadaptadagrad": "dadaptation.DAdaptAdaGrad", "dadaptadan": "dadaptation.DAdaptAdan",
                   "dadaptadanip": "dadaptation.experimental.DAdaptAdanIP", "dadaptsgd": "dadaptation.DAdaptSGD",
                   "radamschedulefree": "schedulefree.RAdamScheduleFree"}
#: bitsandbytes' ``min_8bit_size``: its 8-bit optimisers keep the state of smaller tensors in float32
BNB_MIN_8BIT_SIZE = 4096
#: the optimisers ``FitConfig.cuda_graph`` can capture (built ``capturable=True``)
_CAPTURABLE_OPTIMIZERS = ("adamw", "adamw8bit", "adamw-bf16", "adafactor", "lion", "lion-bf16", "prodigy",
                          "dadapt-adam", "dadapt-lion", "dadapt-adam-preprint", "adamw-schedulefree",
                          "sgd-schedulefree")


def canonical_optimizer(given: str, *, option: str = "optimizer") -> str:
    """An optimiser name as given (``--optimizer``, kohya's ``optimizer_type``, ``FitConfig.optimizer``) -> its name in
    :data:`OPTIMIZERS` (any kohya spelling, any case), or — kohya's "any optimizer" path — the class as written, case
    kept: ``"module.Class"`` (``"came_pytorch.CAME"``) or the name of a ``torch.optim`` class (``"RAdam"``), which
    :func:`imported_optimizer_class` imports.

    Raises:
        ValueError: a kohya name sdadapt refuses (with the reason and what to use), or a name that is none of these;
            the message starts with ``option`` (``"--optimizer"`` on the command line).
    """
    key = str(given).strip().lower()
    if key in _OPTIMIZER_ALIASES:
        return _OPTIMIZER_ALIASES[key]
    if key in _KOHYA_IMPORTED:  # (kohya's DAdaptAdaGrad, RAdamScheduleFree ...: the package's class, as kohya's)
        return _KOHYA_IMPORTED[key]
    if key in _REFUSED_OPTIMIZERS:
        raise ValueError(f"{option} {given!r}: {_REFUSED_OPTIMIZERS[key]}")
    name = str(given).strip()
    if ("." in name and all(name.split("."))) or isinstance(getattr(torch.optim, name, None), type):
        return name
    raise ValueError(f"{option} must be one of {', '.join(OPTIMIZERS)} (kohya spellings such as AdamW8bit work), a "
                     f"torch.optim class such as RAdam, or an installed optimizer class as module.Class (kohya's "
                     f"optimizer_type, e.g. came_pytorch.CAME); got {given!r}")


def estimates_step_size(name: str) -> bool:
    """Whether the optimiser ``name`` (:func:`canonical_optimizer`'s) estimates one step size for every parameter group
    (the groups' LRs multiply it and must be equal or 0): Prodigy and D-Adaptation, sdadapt's or the packages' own
    classes (kohya's ``DAdaptAdaGrad`` ..., ``prodigyopt.Prodigy``)."""
    return name in _STEP_SIZE_ESTIMATING or name.startswith(("dadaptation.", "prodigyopt."))


def schedule_free_optimizer(name: str) -> bool:
    """Whether the optimiser ``name`` (:func:`canonical_optimizer`'s) is schedule-free: ``adamw-schedulefree``,
    ``sgd-schedulefree``, or an imported class whose name ends in ``ScheduleFree`` (kohya's
    ``is_schedulefree_optimizer``: ``optimizer_type.lower().endswith("schedulefree")``)."""
    return name in _SCHEDULE_FREE_OPTIMIZERS or (name not in OPTIMIZERS and name.lower().endswith("schedulefree"))


def cuda_graph_clashes(*, fused_backward: bool, mixed_precision: str | None, optimizer: str,
                       compile_backend: str | None = None) -> list[str]:
    """What in a run's options keeps its steps from being captured in CUDA graphs
    (:attr:`FitConfig.cuda_graph`; ``train --cuda-graph`` checks the same before loading the model),
    each named with its ``train`` flag; empty: nothing."""
    name = _OPTIMIZER_ALIASES.get(optimizer.lower(), optimizer)
    return [what for what, clash in (  # (an imported optimizer class: not capturable, as any name not listed)
        ("fused_backward (--fused-backward-pass: its optimisers step from Python hooks)", fused_backward),
        ("fp16 mixed precision (its loss scaler reads a value back each step; use bf16)", mixed_precision == "fp16"),
        (f"optimizer {optimizer!r} (use {', '.join(_CAPTURABLE_OPTIMIZERS)})", name not in _CAPTURABLE_OPTIMIZERS),
        ("the cudagraphs compile backend (a graph captured inside another; use inductor)", compile_backend == "cudagraphs"),
    ) if clash]


def _graph_capturable(groups: list[dict[str, Any]]) -> bool:
    """Whether ``make_optimizer`` builds the optimiser over ``groups`` ``capturable`` when
    ``cuda_graph`` asks for it: all their parameters are on CUDA devices (off CUDA the steps run eagerly)."""
    return all(p.device.type == "cuda" for group in groups for p in group["params"])


def make_optimizer(groups: list[dict[str, Any]], config: FitConfig) -> torch.optim.Optimizer:
    """The optimiser ``config.optimizer`` over parameter ``groups`` (``{"params": [...], "lr": ...}``).

    ``adamw`` is ``torch.optim.AdamW``, except over bf16 parameters (``--full-bf16``): there it is
    sdadapt's :class:`~sdadapt.training.optim.AdamW` with float32 states, which writes the weights
    back with stochastic rounding (round-to-nearest loses every update below half a bf16 ulp); and
    over fp16 parameters (``--full-fp16``), where torch's would keep fp16 moments (``(1 − β₂)·g²``
    of a gradient below ~5e-3 flushes to 0 and ``ε = 1e-8`` is 0 in fp16: a step dividing by 0), sdadapt's
    AdamW with float32 states too, writing the weights back rounded to nearest as kohya's.
    sdadapt's optimisers (all the others) always round bf16 weights stochastically. sdadapt's AdamW
    (and Adafactor) takes its multi-tensor step (``foreach=True``: the same result, far fewer kernel launches) on
    an accelerator, as torch's optimisers do, and its per-parameter step on CPU, where a launch
    costs nothing and the batched passes' buffers (~0.55–0.7 GB per 2²⁴-element chunk; a larger
    tensor is cut into chunk-sized pieces) would only add memory.

    ``config.optimizer_args`` go to the constructor as they are (their ``weight_decay`` replaces
    ``config.weight_decay``; neither given: the optimiser's default, 0.01 for AdamW, 0 for Adafactor); Adafactor with ``relative_step=True`` gets ``lr=None`` (its step size
    is then its own, the LR and schedule unused, as in kohya).

    ``lion`` / ``lion-bf16`` are sdadapt's :class:`~sdadapt.training.lion.Lion` (float32 / bf16
    momentum; multi-tensor on an accelerator, capturable as AdamW). ``sgd-nesterov`` is
    ``torch.optim.SGD(nesterov=True)`` with momentum 0.9 unless the arguments give one (kohya's
    default); it refuses bf16 parameters (torch's SGD writes them with round-to-nearest, which drops
    every update below half a bf16 ulp: train in float32 or use lion / adamw, which round stochastically),
    and fp16 parameters (its momentum is then fp16 too, and the update rounded to nearest).

    ``prodigy`` is sdadapt's :class:`~sdadapt.training.prodigy.Prodigy` (prodigyopt's algorithm, the
    step-size estimate kept on the device; multi-tensor on an accelerator, capturable): the groups'
    LRs multiply the estimated step size and must be equal or 0 (``ValueError`` otherwise).
    ``dadapt-adam`` / ``dadapt-lion`` are sdadapt's :class:`~sdadapt.training.dadapt.DAdaptAdam` /
    :class:`~sdadapt.training.dadapt.DAdaptLion` (dadaptation 3.2's algorithms), built as ``prodigy``;
    ``dadapt-adam-preprint`` (kohya's ``DAdaptation``) :class:`~sdadapt.training.dadapt.DAdaptAdamPreprint`.

    An imported optimiser class (:func:`canonical_optimizer`: ``module.Class`` or a ``torch.optim`` name) is built as
    kohya builds it, ``Class(groups, lr=config.learning_rate, **optimizer_args)`` (and ``weight_decay`` when given):
    eagerly, its own dtype handling (torch's write bf16 weights back rounded to nearest), never captured.

    Raises:
        InputError: ``sgd-nesterov`` over bf16 or fp16 parameters."""
    from ..training.optimizer_args import SGD_NESTEROV_MOMENTUM, optimizer_kwargs

    name = canonical_optimizer(config.optimizer)
    decay = {} if config.weight_decay is None else {"weight_decay": config.weight_decay}
    options = {**decay, **optimizer_kwargs(config.optimizer_args)}
    if name not in OPTIMIZERS:  # (its arguments as kohya passes them: literal_eval's values, ints kept)
        built = imported_optimizer_class(name)(groups, lr=config.learning_rate, **{**decay, **dict(config.optimizer_args)})
        if callable(getattr(built, "train", None)):  # (kohya's get_optimizer: a schedule-free class starts in train mode)
            built.train()
        return built
    bf16 = any(p.dtype == torch.bfloat16 for group in groups for p in group["params"])
    fp16 = any(p.dtype == torch.float16 for group in groups for p in group["params"])  # (--full-fp16)
    foreach = any(p.device.type != "cpu" for group in groups for p in group["params"])
    # config.cuda_graph on CUDA: capturable, each group's lr a 0-dim tensor on its parameters' device
    # (filled in place by the schedule; a captured graph reads it). Off CUDA the steps run eagerly.
    capturable = config.cuda_graph and _graph_capturable(groups)
    if capturable:  # (float64 for Adafactor, Prodigy and Lion: their step sizes / Lion's decay 1 − lr·λ are computed in float64 from the LR, as from a Python float)
        groups = [{**group, "lr": torch.tensor(float(group.get("lr", config.learning_rate)),
                                               dtype=torch.float64 if name in ("adafactor", "lion", "lion-bf16", *_STEP_SIZE_ESTIMATING,
                                                                               *_SCHEDULE_FREE_OPTIMIZERS) else None,
                                               device=group["params"][0].device)} for group in groups]
    extra: dict[str, Any] = {"capturable": True} if capturable else {}
    if name == "adamw" and not bf16 and not fp16:
        return torch.optim.AdamW(groups, lr=config.learning_rate, **options, **extra)
    if name in _SCHEDULE_FREE_OPTIMIZERS:
        from ..training.schedule_free import AdamWScheduleFree, SGDScheduleFree

        free = AdamWScheduleFree if name == "adamw-schedulefree" else SGDScheduleFree
        return free(groups, lr=config.learning_rate, foreach=foreach, **options, **extra)
    if name == "prodigy":
        from ..training.prodigy import Prodigy

        return Prodigy(groups, lr=config.learning_rate, foreach=foreach, **options, **extra)
    if name in ("dadapt-adam", "dadapt-lion", "dadapt-adam-preprint"):
        from ..training.dadapt import DAdaptAdam, DAdaptAdamPreprint, DAdaptLion

        dadapt = {"dadapt-adam": DAdaptAdam, "dadapt-lion": DAdaptLion, "dadapt-adam-preprint": DAdaptAdamPreprint}[name]
        return dadapt(groups, lr=config.learning_rate, foreach=foreach, **options, **extra)
    if name == "sgd-nesterov":
        if bf16:
            from ..errors import InputError

            raise InputError("optimizer sgd-nesterov over bf16 weights (--full-bf16): torch's SGD writes them back "
                             "with round-to-nearest, which drops every update smaller than half a bf16 step; train "
                             "the weights in float32 (leave out --full-bf16) or use lion / adamw, which round "
                             "bf16 weights stochastically")
        if fp16:
            from ..errors import InputError

            raise InputError("optimizer sgd-nesterov over fp16 weights (--full-fp16): torch's SGD keeps its momentum in "
                             "fp16 and writes the weights back with round-to-nearest, which drops every update smaller "
                             "than half an fp16 step; train the weights in float32 (leave out --full-fp16) or use "
                             "adamw / lion, which update in float32")
        return torch.optim.SGD(groups, lr=config.learning_rate, nesterov=True, foreach=foreach,
                               **{"momentum": SGD_NESTEROV_MOMENTUM, **options})
    if name in ("lion", "lion-bf16"):
        from ..training.lion import Lion

        if name == "lion-bf16":  # (kohya's Lion8bit: bitsandbytes keeps tensors under 4096 elements in float32)
            options = {"min_8bit_size": BNB_MIN_8BIT_SIZE, **options}
        return Lion(groups, lr=config.learning_rate, state_dtype=torch.float32 if name == "lion" else torch.bfloat16,
                    foreach=foreach, **options, **extra)
    from ..training.optim import Adafactor, AdamW

    if name == "adamw":
        return AdamW(groups, lr=config.learning_rate, state_dtype=torch.float32, foreach=foreach, **options, **extra)
    if name == "adafactor":
        return Adafactor(groups, lr=None if options.get("relative_step") else config.learning_rate, foreach=foreach,
                         **options, **extra)
    if name == "adamw8bit":  # (bitsandbytes' AdamW8bit, kohya's: tensors under 4096 elements keep float32 moments)
        return AdamW(groups, lr=config.learning_rate, state_dtype="int8", foreach=foreach,
                     **{"min_8bit_size": BNB_MIN_8BIT_SIZE, **options}, **extra)
    return AdamW(groups, lr=config.learning_rate, state_dtype=torch.bfloat16, foreach=foreach, **options, **extra)
