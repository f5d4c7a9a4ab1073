"""kohya's ``--lr_scheduler_type module.Class``: any installed scheduler class, run as a function of the step.

kohya sd-scripts (``get_scheduler_fix`` in library/train_util.py) imports the module of a dotted
``--lr_scheduler_type``, builds ``Class(optimizer, **lr_scheduler_args)`` (values through
``ast.literal_eval``) and accelerate steps what it returns once after every optimiser step. GUIs write
such configs: LoRA Easy Training Scripts' ``CosineAnnealingWarmRestarts`` and ``RexAnnealingWarmRestarts``
(``lr_scheduler_type = "LoraEasyCustomOptimizer.RexAnnealingWarmRestarts.RexAnnealingWarmRestarts"`` with
``first_cycle_max_steps``, ``warmup_steps``, ``min_lr``, ``gamma``, ``d`` in ``lr_scheduler_args``), or a
function returning a scheduler (``transformers.get_cosine_schedule_with_warmup``).

:class:`ImportedSchedule` builds the real class, on an optimiser of its own with one parameter group at
the group's base LR (the optimiser's own LR, ``defaults["lr"]``, kohya's ``learning_rate``), and steps it as
accelerate steps kohya's: the LR at optimiser step ``s`` is that
group's LR after ``s`` calls of ``.step()`` (each after an ``optimizer.step()``), and a scheduler
with a ``total_steps`` attribute (``OneCycleLR``-like) is stepped only while its ``_step_count`` is at
most ``total_steps`` (accelerate's ``AcceleratedScheduler.step``). Each group gets its own run from its
own LR (torch's ``base_lrs``), as :class:`~sdadapt.training.torch_lr_schedules.TorchSchedule` does for the
torch classes, so the values are a pure function of ``(step, base LR)``: a resumed run and a CUDA-graph
loop follow the same curve, and ``fit`` computes every group's curve before its first step.

The LR is all that is replayed. A scheduler that also moves the momentum, ``betas`` or weight decay of
its groups (``CyclicLR``'s and ``OneCycleLR``'s ``cycle_momentum``) is refused, naming the key and the step
it first does so (before a run trains: ``fit`` computes the curves first): the optimiser it runs on has ``momentum``, ``betas`` and ``weight_decay`` in its
groups so that such a move shows. (torch's own ``OneCycleLR`` by name is
:class:`~sdadapt.training.torch_lr_schedules.TorchSchedule`'s, momentum included.)
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .imported_classes import imported_schedule_class
from .torch_lr_schedules import _Curve

__all__ = ["ImportedSchedule"]

#: the group keys besides the LR the probe optimiser carries, and their values: a scheduler moving one is refused
_FIXED_KEYS = {"momentum": 0.9, "betas": (0.9, 0.999), "weight_decay": 0.0123}  # (no 0: a scaled 0 stays 0)


class _ProbeOptimizer(torch.optim.Optimizer):
    """An optimiser over one empty tensor whose ``step`` changes nothing: what the scheduler moves is its group.
    The group's LR is ``lr``; the optimiser's (``defaults["lr"]``, which transformers' polynomial and
    cosine-with-min-LR schedules read) is ``reference_lr``, kohya's ``learning_rate`` the optimiser is built with."""

    def __init__(self, lr: float, reference_lr: float) -> None:
        super().__init__([{"params": [torch.zeros(0, requires_grad=True)], "lr": lr}],
                         {"lr": reference_lr, **_FIXED_KEYS})

    def step(self, closure: Any = None) -> None:
        """Nothing to update (the scheduler counts the call)."""


@dataclass(frozen=True)
class ImportedSchedule:
    """One installed scheduler class with its arguments, as a function of the step.

    Attributes:
        name: the dotted path as given (``"LoraEasyCustomOptimizer.RexAnnealingWarmRestarts.RexAnnealingWarmRestarts"``).
        args: the arguments, each ``(key, repr of the value)`` (the values are Python literals, as kohya's
            ``ast.literal_eval`` reads them; :attr:`options` gives them back).

    Build it with :meth:`parse`, which imports the class and builds it once.
    """

    name: str
    args: tuple[tuple[str, str], ...] = ()
    #: each group's curve, by (its LR, the optimiser's LR): kept as long as the schedule (a run's groups all at once)
    _curves: dict[tuple[float, float], _Curve] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __reduce__(self) -> tuple:
        """A copy or a pickle is the class and its arguments (the curves are a cache, rebuilt on use)."""
        return (type(self), (self.name, self.args))

    @classmethod
    def parse(cls, type_name: str, args: Mapping[str, Any] | None = None, *,
              learning_rate: float = 1e-3) -> ImportedSchedule:
        """kohya's dotted ``lr_scheduler_type`` and its ``lr_scheduler_args`` -> a schedule.

        The module is imported and the class built once on a probe optimiser at ``learning_rate`` (kohya's
        ``--learning_rate``, what its optimiser is built with) and stepped once, so a missing package, an
        unknown or missing argument or a value the class refuses stops the run before a model loads.

        Raises:
            InputError: the module is not installed or has no such callable.
            ValueError: ``last_epoch`` given (``--resume`` continues a run), a value that is not a Python
                literal, or what the class raises when built or stepped (its message).
        """
        if not isinstance(type_name, str) or "." not in type_name.strip():
            raise ValueError(f"lr_scheduler_type must be a dotted module.Class path, got {type_name!r}")
        given = dict(args or {})
        if "last_epoch" in given:
            raise ValueError(f"lr_scheduler_args last_epoch: not taken ({type_name} starts at the run's first step; "
                             "--resume OUT-state continues a run on the same curve)")
        pairs = []
        for key, value in sorted(given.items()):
            text = repr(value)
            try:
                same = ast.literal_eval(text) == value
            except (ValueError, SyntaxError):
                same = False
            if not same:
                raise ValueError(f"lr_scheduler_args {key}={value!r}: not a Python literal (kohya reads each value "
                                 "with ast.literal_eval)")
            pairs.append((key, text))
        schedule = cls(type_name.strip(), tuple(pairs))
        imported_schedule_class(schedule.name)
        schedule.lr(1, learning_rate)
        schedule._curves.clear()  # (the probe's: a run builds its own)
        return schedule

    @property
    def options(self) -> dict[str, Any]:
        """The arguments given, as the class gets them."""
        return {key: ast.literal_eval(text) for key, text in self.args}

    @property
    def cycles_momentum(self) -> bool:
        """Always ``False``: only the LR is replayed (a class moving the momentum is refused)."""
        return False

    def momentum(self, step: int) -> float | None:
        """``None``: see :attr:`cycles_momentum`."""
        return None

    def lr(self, step: int, base_lr: float, *, reference_lr: float | None = None) -> float:
        """A group's LR at optimiser step ``step`` (0-based) when its own LR is ``base_lr``: the class's
        after ``step`` calls of ``.step()``. ``reference_lr``: the optimiser's LR (kohya's ``--learning_rate``,
        ``optimizer.defaults["lr"]``; default ``base_lr``), which some classes read.

        Raises:
            ValueError: the class fails when built or stepped, or moves a group's momentum, ``betas`` or
                weight decay (naming the step and the key).
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be a whole number >= 0, got {step!r}")
        key = (float(base_lr), float(base_lr if reference_lr is None else reference_lr))
        curve = self._curves.get(key)
        if curve is None:
            curve = self._curves[key] = _Curve(_stepped(self, *key))
        try:
            return curve.at(step)
        except BaseException:
            del self._curves[key]  # (not a spent curve for the next call)
            raise


def _stepped(schedule: ImportedSchedule, base_lr: float, reference_lr: float) -> Iterator[float]:
    """The LR of a probe optimiser's group after 0, 1, 2 ... of accelerate's ``scheduler.step()`` calls."""
    where = f"lr_scheduler_type {schedule.name}"
    optimizer = _ProbeOptimizer(base_lr, reference_lr)
    try:
        scheduler = imported_schedule_class(schedule.name)(optimizer, **schedule.options)
    except Exception as exc:  # noqa: BLE001 - its own checks (a missing or unknown argument, a bad value), reported
        raise ValueError(f"{where}: building it with lr_scheduler_args {schedule.options} failed: "
                         f"{type(exc).__name__}: {exc}") from None
    if not callable(getattr(scheduler, "step", None)):
        raise ValueError(f"{where}: what it returns has no step() (kohya steps it after every optimiser step)")  # noqa: TRY004
    group = optimizer.param_groups[0]
    step = 0
    while True:
        for key, value in _FIXED_KEYS.items():
            if group.get(key) != value:
                raise ValueError(f"{where}: it sets the optimiser's {key} ({value!r} -> {group.get(key)!r} at step "
                                 f"{step}); sdadapt replays the LR alone: give the class its LR-only form (torch's "
                                 "CyclicLR: cycle_momentum=False; torch's OneCycleLR by name is replayed with its "
                                 "momentum)")
        lr = group["lr"]
        yield float(lr.item() if isinstance(lr, torch.Tensor) else lr)
        step += 1
        try:
            # (accelerate's AcceleratedScheduler.step: one with total_steps is stepped only while _step_count <= it)
            if hasattr(scheduler, "total_steps") and not scheduler._step_count <= scheduler.total_steps:
                continue
            optimizer.step()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # (torch's "step() before optimizer.step()" is not for a probe)
                scheduler.step()
        except Exception as exc:  # noqa: BLE001 - whatever the class raises, reported with the step
            hint = ("; it uses optimizer._step_count, which older torch versions set and this one does not (kohya fails "
                    "the same way: a version of the class made for this torch fixes it)"
                    if "_step_count" in str(exc) else "")
            raise ValueError(f"{where}: stepping it failed at step {step}: {type(exc).__name__}: {exc}{hint}") from None
