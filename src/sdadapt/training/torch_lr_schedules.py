"""kohya's ``--lr_scheduler_type``: the ``torch.optim.lr_scheduler`` classes as pure functions of the step.

kohya sd-scripts (``library/train_util.py`` ``get_scheduler_fix``) builds any class named by
``--lr_scheduler_type`` (a bare name is looked up in ``torch.optim.lr_scheduler``) with
``--lr_scheduler_args`` (``KEY=VALUE``, values through ``ast.literal_eval``) and accelerate steps it
once after every optimiser step of a one-process run (with ``N`` processes accelerate steps it ``N`` times per
optimiser step; a data-parallel sdadapt run steps it once, as one process with the global batch).
sdadapt loads no class: :class:`TorchSchedule` replays the class's own update rule, so every
group's LR at optimiser step ``s`` is the LR the real scheduler holds after ``s`` calls of
``.step()`` — bit for bit, including the float drift of the
recursive ("chainable") forms torch's ``.step()`` uses (``CosineAnnealingLR``, ``PolynomialLR``,
``LinearLR``, ``ExponentialLR`` ... multiply the previous LR; their closed forms differ from it by a
few ulps after hundreds of steps). The values are a pure function of the step (computed once per
``(schedule, base LR)`` from step 0 and kept), so a resumed run and a CUDA-graph loop follow the
same curve. Each group's curve starts from that group's own LR (torch's ``base_lrs``: kohya's
text-encoder and UNet LRs each get their own).

================================  =====================================================================
``StepLR``                        ``base · γ^⌊s / step_size⌋``
``MultiStepLR``                   ``base · γ^(milestones passed)``
``ConstantLR``                    ``base · factor`` before ``total_iters``, then ``base``
``LinearLR``                      ``base · (start + (end − start) · min(s, total_iters) / total_iters)``
``ExponentialLR``                 ``base · γ^s``
``PolynomialLR``                  ``base · (1 − min(s, total_iters) / total_iters)^power``
``CosineAnnealingLR``             ``η + (base − η) · ½ (1 + cos(π s / T_max))`` (keeps cycling past ``T_max``)
``CosineAnnealingWarmRestarts``   the same over ``T_i`` steps, restarting with ``T_i ← T_i · T_mult``
``OneCycleLR``                    warm-up from ``max_lr / div_factor`` to ``max_lr``, anneal to
                                  ``max_lr / (div_factor · final_div_factor)`` (``cos`` or ``linear``;
                                  ``three_phase``); β1 / momentum the other way (below)
================================  =====================================================================

(The formulas are the closed forms; the values are the recursive ones torch produces.)

``OneCycleLR`` sets every group's LR from ``max_lr`` (the groups' own LRs are not used; the fit loop keeps a
group of LR 0 at 0, as kohya leaves such a group out of the optimiser) and stops
after ``total_steps`` optimiser steps: accelerate's ``AcceleratedScheduler.step`` steps a scheduler
with ``total_steps`` only while its ``_step_count <= total_steps`` (accelerate@v1.6.0, kohya's pin,
``scheduler.py:78-80``), and that count is the scheduler's own steps whatever the gradient
accumulation: the ``adjust_scheduler`` branch that would add the micro-batches between optimiser
steps (``scheduler.py:61-64``) is off in kohya's ``Accelerator(gradient_accumulation_steps=A)``
(``GradientAccumulationPlugin.to_kwargs`` leaves out its default ``adjust_scheduler=True``,
``utils/dataclasses.py:71-81``, and ``GradientState.adjust_scheduler`` reads a missing key as
``False``, ``state.py:1235-1237``). So the LR at optimiser step ``s`` is torch's after ``min(s, total_steps)``
calls of ``.step()`` (the last one, at ``total_steps``, torch's value one step past the anneal's end),
with any accumulation and an epoch's short last step alike. By default
(``cycle_momentum=True``) it also moves every group's ``β1`` (``betas[0]``; SGD's ``momentum``)
from ``max_momentum`` down to ``base_momentum`` while the LR rises and back while it falls:
:meth:`TorchSchedule.momentum` (the fit loop sets it before each step, as torch's ``.step()`` does).

Refused, with the reason (:data:`REFUSED_TORCH_SCHEDULES`): ``LambdaLR`` and ``MultiplicativeLR``
(they need a Python function, which ``lr_scheduler_args`` cannot give), ``SequentialLR`` and
``ChainedScheduler`` (they take scheduler objects), ``ReduceLROnPlateau`` (kohya calls ``.step()``
without the metric it needs and fails), ``CyclicLR``. A class of another module (``module.Class``, imported as
kohya imports it) is :class:`~sdadapt.training.imported_lr_schedule.ImportedSchedule`'s.
"""

from __future__ import annotations

import array
import difflib
import math
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REFUSED_TORCH_SCHEDULES", "TORCH_SCHEDULES", "TORCH_SCHEDULE_MODULE", "TorchSchedule"]

#: where kohya looks up a bare ``lr_scheduler_type`` name (the only module sdadapt takes one from)
TORCH_SCHEDULE_MODULE = "torch.optim.lr_scheduler"

#: the classes and their arguments: ``{name: {argument: default}}`` (``...``: required), as torch 2.x
_ARGUMENTS: dict[str, dict[str, Any]] = {
    "StepLR": {"step_size": ..., "gamma": 0.1},
    "MultiStepLR": {"milestones": ..., "gamma": 0.1},
    "ConstantLR": {"factor": 1.0 / 3, "total_iters": 5},
    "LinearLR": {"start_factor": 1.0 / 3, "end_factor": 1.0, "total_iters": 5},
    "ExponentialLR": {"gamma": ...},
    "PolynomialLR": {"total_iters": 5, "power": 1.0},
    "CosineAnnealingLR": {"T_max": ..., "eta_min": 0.0},
    "CosineAnnealingWarmRestarts": {"T_0": ..., "T_mult": 1, "eta_min": 0.0},
    "OneCycleLR": {"max_lr": ..., "total_steps": None, "epochs": None, "steps_per_epoch": None, "pct_start": 0.3,
                   "anneal_strategy": "cos", "cycle_momentum": True, "base_momentum": 0.85, "max_momentum": 0.95,
                   "div_factor": 25.0, "final_div_factor": 1e4, "three_phase": False},
}
#: the ``torch.optim.lr_scheduler`` classes :class:`TorchSchedule` runs
TORCH_SCHEDULES = tuple(_ARGUMENTS)

#: classes refused, with the reason
REFUSED_TORCH_SCHEDULES = {
    "LambdaLR": "it multiplies the LR by a Python function (lr_lambda), which lr_scheduler_args cannot give (kohya "
                "reads them with ast.literal_eval)",
    "MultiplicativeLR": "it multiplies the LR by a Python function (lr_lambda), which lr_scheduler_args cannot give "
                        "(kohya reads them with ast.literal_eval)",
    "SequentialLR": "it chains scheduler objects, which lr_scheduler_args cannot give",
    "ChainedScheduler": "it chains scheduler objects, which lr_scheduler_args cannot give",
    "ReduceLROnPlateau": "it steps on a metric (the validation loss), and kohya calls .step() without one (it fails "
                         "there)",
    "CyclicLR": ("not replayed here: it is stepped as an installed class is (ImportedSchedule.parse("
                 "'torch.optim.lr_scheduler.CyclicLR', ...); the train command does so), its LR alone: give it "
                 "cycle_momentum=False (its default cycles beta1 / momentum too)"),
    "LRScheduler": "the base class schedules nothing",
}


def _number(name: str, value: Any, *, whole: bool = False) -> None:
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite {'whole number' if whole else 'number'}, got {value!r}")


def _check_step(step: Any) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a whole number >= 0, got {step!r}")


def _one_cycle_total(o: dict[str, Any]) -> int:
    """``OneCycleLR``'s steps: ``total_steps``, else ``epochs · steps_per_epoch`` (torch's)."""
    return o["total_steps"] if o["total_steps"] is not None else o["epochs"] * o["steps_per_epoch"]


@dataclass(frozen=True)
class TorchSchedule:
    """One ``torch.optim.lr_scheduler`` class with its arguments, as a function of the step.

    Attributes:
        name: the class name (``"CosineAnnealingLR"``; one of :data:`TORCH_SCHEDULES`).
        args: the arguments given (``(("T_max", 100), ("eta_min", 1e-6))``; lists as tuples).

    Build it with :meth:`parse`, which checks the arguments as torch's constructor does.
    """

    name: str
    args: tuple[tuple[str, Any], ...] = ()
    #: each group's curve, by its LR: kept as long as the schedule (a run asks for all its groups' at every step)
    _curves: dict[float, _Curve] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __reduce__(self) -> tuple:
        """A copy or a pickle is the class and its arguments (the curves are a cache, rebuilt on use)."""
        return (type(self), (self.name, self.args))

    @classmethod
    def parse(cls, type_name: str, args: Mapping[str, Any] | None = None) -> TorchSchedule:
        """kohya's ``lr_scheduler_type`` and ``lr_scheduler_args`` -> a schedule.

        ``type_name``: a class of ``torch.optim.lr_scheduler``, bare (``"StepLR"``) or by its path
        (``"torch.optim.lr_scheduler.StepLR"``); ``args``: its keyword arguments (values as
        ``ast.literal_eval`` reads them; ``last_epoch`` is not taken: ``--resume`` continues a run).

        Raises:
            ValueError: a class outside ``torch.optim.lr_scheduler``
                (:class:`~sdadapt.training.imported_lr_schedule.ImportedSchedule`'s), one of
                :data:`REFUSED_TORCH_SCHEDULES` (with the reason), an unknown class (naming the
                closest), an unknown or missing argument, or a value torch refuses or that would
                fail during the run (``T_max=0``, a ``OneCycleLR`` phase of no length ...).
        """
        if not isinstance(type_name, str) or not type_name.strip():
            raise ValueError(f"lr_scheduler_type must be a class name such as 'CosineAnnealingLR', got {type_name!r}")
        module, _, name = type_name.strip().rpartition(".")
        if module and module != TORCH_SCHEDULE_MODULE:
            raise ValueError(f"lr_scheduler_type {type_name!r}: TorchSchedule runs the classes of {TORCH_SCHEDULE_MODULE} "
                             f"({', '.join(TORCH_SCHEDULES)}); a class of another module is "
                             "sdadapt.training.imported_lr_schedule.ImportedSchedule's")
        if name in REFUSED_TORCH_SCHEDULES:
            raise ValueError(f"lr_scheduler_type {name}: {REFUSED_TORCH_SCHEDULES[name]}")
        if name not in _ARGUMENTS:
            close = difflib.get_close_matches(name, TORCH_SCHEDULES, n=1)
            raise ValueError(f"lr_scheduler_type {type_name!r}: not a class sdadapt runs"
                             + (f"; did you mean {close[0]}?" if close else "")
                             + f" (it runs {', '.join(TORCH_SCHEDULES)} of {TORCH_SCHEDULE_MODULE})")
        given = dict(args or {})
        if "last_epoch" in given:
            raise ValueError(f"lr_scheduler_args last_epoch: not taken ({name} starts at the run's first step; "
                             "--resume OUT-state continues a run on the same curve)")
        known = _ARGUMENTS[name]
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"lr_scheduler_args {', '.join(unknown)}: not an argument of {name} (it takes "
                             f"{', '.join(known)})")
        missing = [key for key, default in known.items() if default is ... and key not in given]
        if missing:
            raise ValueError(f"lr_scheduler_type {name} needs lr_scheduler_args {', '.join(m + '=...' for m in missing)} "
                             "(torch's required arguments)")
        schedule = cls(name, tuple((key, tuple(v) if isinstance(v, list) else v) for key, v in sorted(given.items())))
        schedule._check()
        return schedule

    @property
    def options(self) -> dict[str, Any]:
        """Every argument of the class: the ones given over torch's defaults."""
        return {**_ARGUMENTS[self.name], **dict(self.args)}

    def _check(self) -> None:
        """torch's constructor checks, and the values that would fail during a run."""
        o, name = self.options, self.name
        where = f"lr_scheduler_type {name}: lr_scheduler_args"
        if name == "StepLR":
            _number(f"{where} step_size", o["step_size"], whole=True)
            if o["step_size"] < 1:
                raise ValueError(f"{where} step_size must be >= 1 (the steps between decays), got {o['step_size']}")
            _number(f"{where} gamma", o["gamma"])
        elif name == "MultiStepLR":
            milestones = o["milestones"]
            if not isinstance(milestones, tuple):
                raise ValueError(f"{where} milestones must be a list of steps, e.g. milestones=[100,200], got {milestones!r}")
            for m in milestones:
                _number(f"{where} milestones", m, whole=True)
            _number(f"{where} gamma", o["gamma"])
        elif name == "ConstantLR":
            _number(f"{where} factor", o["factor"])
            _number(f"{where} total_iters", o["total_iters"], whole=True)
            if not 0 < o["factor"] <= 1:  # (torch takes 0, then divides by it at total_iters)
                raise ValueError(f"{where} factor must be in (0, 1] (torch divides by it at total_iters), got {o['factor']}")
        elif name == "LinearLR":
            for key in ("start_factor", "end_factor"):
                _number(f"{where} {key}", o[key])
            _number(f"{where} total_iters", o["total_iters"], whole=True)
            if not 0 < o["start_factor"] <= 1 or not 0 <= o["end_factor"] <= 1:
                raise ValueError(f"{where}: start_factor must be in (0, 1] and end_factor in [0, 1] (torch's), got "
                                 f"{o['start_factor']} and {o['end_factor']}")
        elif name == "ExponentialLR":
            _number(f"{where} gamma", o["gamma"])
        elif name == "PolynomialLR":
            _number(f"{where} total_iters", o["total_iters"], whole=True)
            _number(f"{where} power", o["power"])
            if o["total_iters"] < 1 or o["power"] < 0:
                raise ValueError(f"{where}: total_iters must be >= 1 and power >= 0, got {o['total_iters']} and {o['power']}")
        elif name == "CosineAnnealingLR":
            _number(f"{where} T_max", o["T_max"])
            _number(f"{where} eta_min", o["eta_min"])
            if not o["T_max"] > 0:  # (torch divides by it at the first step)
                raise ValueError(f"{where} T_max must be > 0 (the steps of half a cosine wave), got {o['T_max']}")
        elif name == "CosineAnnealingWarmRestarts":
            _number(f"{where} T_0", o["T_0"], whole=True)
            _number(f"{where} T_mult", o["T_mult"], whole=True)
            _number(f"{where} eta_min", o["eta_min"])
            if o["T_0"] < 1 or o["T_mult"] < 1:
                raise ValueError(f"{where}: T_0 and T_mult must be whole numbers >= 1 (torch's), got {o['T_0']} and "
                                 f"{o['T_mult']}")
        elif name == "OneCycleLR":
            self._check_one_cycle(o, where)

    @staticmethod
    def _check_one_cycle(o: dict[str, Any], where: str) -> None:
        if isinstance(o["max_lr"], tuple):
            raise ValueError(f"{where} max_lr: give one number (a list is one LR per parameter group, whose order is "
                             "kohya's and not sdadapt's)")
        _number(f"{where} max_lr", o["max_lr"])
        if o["total_steps"] is None:
            if o["epochs"] is None or o["steps_per_epoch"] is None:
                raise ValueError(f"{where}: OneCycleLR needs total_steps=N (or epochs=E and steps_per_epoch=S), as torch")
            for key in ("epochs", "steps_per_epoch"):
                _number(f"{where} {key}", o[key], whole=True)
                if o[key] < 1:
                    raise ValueError(f"{where} {key} must be >= 1, got {o[key]}")
        else:
            _number(f"{where} total_steps", o["total_steps"], whole=True)
            if o["total_steps"] < 1:
                raise ValueError(f"{where} total_steps must be >= 1, got {o['total_steps']}")
        if isinstance(o["pct_start"], bool) or not isinstance(o["pct_start"], float) or not 0 <= o["pct_start"] <= 1:
            raise ValueError(f"{where} pct_start must be a float in [0, 1] (torch's; write 0.3, not 0), got {o['pct_start']!r}")
        if o["anneal_strategy"] not in ("cos", "linear"):
            raise ValueError(f"{where} anneal_strategy must be 'cos' or 'linear', got {o['anneal_strategy']!r}")
        for key in ("div_factor", "final_div_factor"):
            _number(f"{where} {key}", o[key])
            if not o[key] > 0:
                raise ValueError(f"{where} {key} must be > 0, got {o[key]}")
        total = _one_cycle_total(o)
        ends = [0.0, float(o["pct_start"] * total) - 1]
        ends += [float(2 * o["pct_start"] * total) - 2] if o["three_phase"] else []
        if any(b == a for a, b in zip(ends, [*ends[1:], total - 1])):
            raise ValueError(f"{where}: pct_start={o['pct_start']} with {total} steps gives a phase of no length (torch "
                             "divides by its length and fails during the run); give another pct_start or total_steps")
        if not isinstance(o["cycle_momentum"], bool):
            raise ValueError(f"{where} cycle_momentum must be True or False, got {o['cycle_momentum']!r}")
        for key in ("base_momentum", "max_momentum"):
            if isinstance(o[key], tuple):
                raise ValueError(f"{where} {key}: give one number (a list is one value per parameter group, whose "
                                 "order is kohya's and not sdadapt's)")
            _number(f"{where} {key}", o[key])

    # ------------------------------------------------------------------ the curve

    def lr(self, step: int, base_lr: float, *, reference_lr: float | None = None) -> float:
        """The LR of a parameter group whose own LR is ``base_lr`` at optimiser step ``step``
        (0-based): what the real scheduler sets after ``step`` calls of ``.step()`` (``OneCycleLR``:
        after ``min(step, total_steps)``, where accelerate stops stepping it — the module's docstring).
        ``reference_lr`` (the optimiser's own LR) is not read: torch's classes start from each group's.

        Raises:
            ValueError: ``step < 0``.
        """
        if self.name == "OneCycleLR":  # (_one_cycle_step checks the step)
            return _one_cycle(self.options, self._one_cycle_step(step))[0]
        _check_step(step)
        curve = self._curves.get(float(base_lr))
        if curve is None:
            curve = self._curves[float(base_lr)] = _Curve(_RECURSIONS[self.name](self.options, float(base_lr)))
        return curve.at(step)

    @property
    def cycles_momentum(self) -> bool:
        """Whether the schedule also sets β1 / momentum (``OneCycleLR`` with ``cycle_momentum``)."""
        return self.name == "OneCycleLR" and bool(self.options["cycle_momentum"])

    def momentum(self, step: int) -> float | None:
        """The β1 (AdamW's ``betas[0]``, SGD's ``momentum``) of every group at optimiser step
        ``step``, as torch's ``OneCycleLR`` sets it; ``None`` when the schedule does not set it
        (:attr:`cycles_momentum`)."""
        if not self.cycles_momentum:
            return None
        return _one_cycle(self.options, self._one_cycle_step(step))[1]

    def _one_cycle_step(self, step: int) -> int:
        """The calls of ``.step()`` accelerate has made by optimiser step ``step``: it stops at ``total_steps``."""
        _check_step(step)
        return min(step, _one_cycle_total(self.options))

    def closed_form(self, step: int, base_lr: float) -> float:
        """The closed form of the schedule at ``step`` (torch's ``_get_closed_form_lr``; the
        table above): equal to :meth:`lr` up to the recursion's rounding (and, for
        ``CosineAnnealingLR`` past ``T_max``, its cycling — torch's ``.step()`` keeps cycling)."""
        o, s, base = self.options, step, float(base_lr)
        if self.name == "StepLR":
            return base * o["gamma"] ** (s // o["step_size"])
        if self.name == "MultiStepLR":
            return base * o["gamma"] ** sum(1 for m in o["milestones"] if m <= s)
        if self.name == "ConstantLR":
            return base * (o["factor"] + (s >= o["total_iters"]) * (1 - o["factor"]))
        if self.name == "LinearLR":
            span = o["total_iters"]
            return base * (o["start_factor"] + (o["end_factor"] - o["start_factor"]) * min(span, s) / span) if span \
                else base * o["start_factor"]
        if self.name == "ExponentialLR":
            return base * o["gamma"] ** s
        if self.name == "PolynomialLR":
            return base * (1.0 - min(o["total_iters"], s) / o["total_iters"]) ** o["power"]
        if self.name == "CosineAnnealingLR":
            return o["eta_min"] + (base - o["eta_min"]) * (1 + math.cos(math.pi * s / o["T_max"])) / 2
        if self.name == "CosineAnnealingWarmRestarts":
            t_cur, t_i = s, o["T_0"]
            while t_cur >= t_i:
                t_cur, t_i = t_cur - t_i, t_i * o["T_mult"]
            return o["eta_min"] + (base - o["eta_min"]) * (1 + math.cos(math.pi * t_cur / t_i)) / 2
        return self.lr(s, base)


class _Curve:
    """The values of one schedule for one base LR, extended on demand (a pure function of the step)."""

    def __init__(self, values: Iterator[float]) -> None:
        self._values, self._known = values, array.array("d")  # (8 bytes a step: a 1M-step run holds 8 MB)

    def at(self, step: int) -> float:
        while len(self._known) <= step:
            self._known.append(next(self._values))
        return self._known[step]


# Each generator yields the LR after 0, 1, 2 ... calls of .step(): torch's get_lr, operation for operation
# (last_epoch e; the constructor's own step is e = 0).

def _step_lr(o: dict[str, Any], lr: float) -> Iterator[float]:
    yield lr
    for e in _from_one():
        if e % o["step_size"] == 0:
            lr = lr * o["gamma"]
        yield lr


def _multi_step_lr(o: dict[str, Any], lr: float) -> Iterator[float]:
    milestones = Counter(o["milestones"])
    if 0 in milestones:  # (torch's get_lr at the constructor's step)
        lr = lr * o["gamma"] ** milestones[0]
    yield lr
    for e in _from_one():
        if e in milestones:
            lr = lr * o["gamma"] ** milestones[e]
        yield lr


def _constant_lr(o: dict[str, Any], lr: float) -> Iterator[float]:
    lr = lr * o["factor"]
    yield lr
    for e in _from_one():
        if e == o["total_iters"]:
            lr = lr * (1.0 / o["factor"])
        yield lr


def _linear_lr(o: dict[str, Any], lr: float) -> Iterator[float]:
    start, end, total = o["start_factor"], o["end_factor"], o["total_iters"]
    lr = lr * start
    yield lr
    for e in _from_one():
        if e <= total:
            lr = lr * (1.0 + (end - start) / (total * start + (e - 1) * (end - start)))
        yield lr


def _exponential_lr(o: dict[str, Any], lr: float) -> Iterator[float]:
    yield lr
    while True:
        lr = lr * o["gamma"]
        yield lr


def _polynomial_lr(o: dict[str, Any], lr: float) -> Iterator[float]:
    total, power = o["total_iters"], o["power"]
    yield lr
    for e in _from_one():
        if e <= total:
            lr = lr * ((1.0 - e / total) / (1.0 - (e - 1) / total)) ** power
        yield lr


def _cosine_annealing_lr(o: dict[str, Any], lr: float) -> Iterator[float]:
    base, eta, t_max = lr, o["eta_min"], o["T_max"]
    yield lr
    for e in _from_one():
        if (e - 1 - t_max) % (2 * t_max) == 0:
            lr = lr + (base - eta) * (1 - math.cos(math.pi / t_max)) / 2
        else:
            lr = (1 + math.cos(math.pi * e / t_max)) / (1 + math.cos(math.pi * (e - 1) / t_max)) * (lr - eta) + eta
        yield lr


def _cosine_annealing_warm_restarts(o: dict[str, Any], base: float) -> Iterator[float]:
    eta, t_cur, t_i = o["eta_min"], 0, o["T_0"]
    while True:
        yield eta + (base - eta) * (1 + math.cos(math.pi * t_cur / t_i)) / 2
        t_cur += 1
        if t_cur >= t_i:
            t_cur, t_i = t_cur % t_i, t_i * o["T_mult"]


def _from_one() -> Iterator[int]:
    e = 0
    while True:
        e += 1
        yield e


def _one_cycle(o: dict[str, Any], step: int) -> tuple[float, float]:
    """torch's ``OneCycleLR.get_lr`` at ``last_epoch = step``: ``(lr, momentum)`` (a closed form)."""
    total = _one_cycle_total(o)
    initial = o["max_lr"] / o["div_factor"]
    values = {"initial_lr": initial, "max_lr": o["max_lr"], "min_lr": initial / o["final_div_factor"],
              "base_momentum": o["base_momentum"], "max_momentum": o["max_momentum"]}
    pct_start = o["pct_start"]
    if o["three_phase"]:
        phases = [(float(pct_start * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                  (float(2 * pct_start * total) - 2, "max_lr", "initial_lr", "base_momentum", "max_momentum"),
                  (total - 1, "initial_lr", "min_lr", "max_momentum", "max_momentum")]
    else:
        phases = [(float(pct_start * total) - 1, "initial_lr", "max_lr", "max_momentum", "base_momentum"),
                  (total - 1, "max_lr", "min_lr", "base_momentum", "max_momentum")]
    anneal = _cos_anneal if o["anneal_strategy"] == "cos" else _linear_anneal
    start_step = 0.0
    for i, (end_step, lr_from, lr_to, m_from, m_to) in enumerate(phases):
        if step <= end_step or i == len(phases) - 1:
            pct = (step - start_step) / (end_step - start_step)
            return anneal(values[lr_from], values[lr_to], pct), anneal(values[m_from], values[m_to], pct)
        start_step = end_step
    raise AssertionError("unreachable: the last phase always matches")  # pragma: no cover


def _cos_anneal(start: float, end: float, pct: float) -> float:
    return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)


def _linear_anneal(start: float, end: float, pct: float) -> float:
    return (end - start) * pct + start


_RECURSIONS = {
    "StepLR": _step_lr,
    "MultiStepLR": _multi_step_lr,
    "ConstantLR": _constant_lr,
    "LinearLR": _linear_lr,
    "ExponentialLR": _exponential_lr,
    "PolynomialLR": _polynomial_lr,
    "CosineAnnealingLR": _cosine_annealing_lr,
    "CosineAnnealingWarmRestarts": _cosine_annealing_warm_restarts,
}
