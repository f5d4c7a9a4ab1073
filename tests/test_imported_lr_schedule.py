"""kohya's ``--lr_scheduler_type module.Class`` (sd-scripts library/train_util.py ``get_scheduler_fix``): the module
imported, ``Class(optimizer, **lr_scheduler_args)`` built and stepped once after every optimiser step (accelerate).

The spec is the class itself driven as kohya's loop drives it: one optimiser holding the groups (kohya's text-encoder
and UNet LRs), ``optimizer.step()`` then ``scheduler.step()``; every group's LR must equal sdadapt's exactly (``==``).
The classes below stand for a user's installed module (tests/ is on the path, as a user's own module would be):
a warm-up + cosine-with-restarts class shaped as LoRA Easy Training Scripts' ``CosineAnnealingWarmupRestarts`` is
(its arguments), a function returning a scheduler (``transformers.get_*_schedule_with_warmup``-like), one with
``total_steps`` (which accelerate stops stepping), one that moves β1.
"""

from __future__ import annotations

import math
import warnings
from typing import ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from sdadapt.errors import InputError
from sdadapt.jobs import TrainOptions
from sdadapt.jobs.train_schedule import check_schedule_options, schedule_fit_args
from sdadapt.methods import FitConfig
from sdadapt.training.imported_lr_schedule import ImportedSchedule
from sdadapt.training.torch_lr_schedules import TorchSchedule
from tests.test_lr_scheduler_type import straight_and_resumed_rates

HERE = __name__


class WarmupCosineRestarts(LRScheduler):
    """Cycles of ``first_cycle_max_steps`` steps (times ``cycle_multiplier`` after each restart): a linear warm-up
    from ``min_lr`` over ``warmup_steps``, then a cosine down to ``min_lr``; each cycle's peak is the group's LR
    times ``gamma`` per restart."""

    def __init__(self, optimizer, *, first_cycle_max_steps: int, warmup_steps: int = 0, min_lr: float = 1e-6,
                 gamma: float = 1.0, cycle_multiplier: float = 1.0, last_epoch: int = -1) -> None:
        if warmup_steps >= first_cycle_max_steps:
            raise ValueError("warmup_steps must be smaller than first_cycle_max_steps")
        self.first, self.warmup, self.min_lr = first_cycle_max_steps, warmup_steps, min_lr
        self.gamma, self.multiplier = gamma, cycle_multiplier
        super().__init__(optimizer, last_epoch)

    def get_lr(self):
        step, length, cycle = self.last_epoch, self.first, 0
        while step >= length:
            step, length, cycle = step - length, max(int(length * self.multiplier), self.warmup + 1), cycle + 1
        out = []
        for base in self.base_lrs:
            peak = base * self.gamma ** cycle
            if step < self.warmup:
                out.append(self.min_lr + (peak - self.min_lr) * step / self.warmup)
            else:
                progress = (step - self.warmup) / (length - self.warmup)
                out.append(self.min_lr + (peak - self.min_lr) * (1 + math.cos(math.pi * progress)) / 2)
        return out


def warmup_then_constant(optimizer, warmup_steps: int):
    """A function returning a scheduler, as transformers' ``get_constant_schedule_with_warmup``."""
    return LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup_steps + 1)))


class HalvingWithTotal(LRScheduler):
    """Halves the LR every step; has ``total_steps``, so accelerate steps it only while ``_step_count <= total``."""

    def __init__(self, optimizer, total_steps: int) -> None:
        self.total_steps = total_steps
        super().__init__(optimizer)

    def get_lr(self):
        return [base * 0.5 ** self.last_epoch for base in self.base_lrs]


class MovesBeta1(LRScheduler):
    """Keeps the LR and lowers β1 from step ``at``: what sdadapt does not replay."""

    def __init__(self, optimizer, at: int = 3) -> None:
        self.at = at
        super().__init__(optimizer)

    def get_lr(self):
        if self.last_epoch >= self.at:
            for group in self.optimizer.param_groups:
                if "betas" in group:
                    group["betas"] = (0.8, group["betas"][1])
        return list(self.base_lrs)


class ScalesWeightDecay(LRScheduler):
    """Keeps the LR and halves each group's weight decay every step (a weight-decay schedule): a move that a
    probe with no weight decay (0 · ½ = 0) would not show."""

    def get_lr(self):
        if self.last_epoch > 0:
            for group in self.optimizer.param_groups:
                group["weight_decay"] = group["weight_decay"] * 0.5
        return list(self.base_lrs)


def _kohya_lrs(make, steps: int, bases=(1e-4, 3e-5), *, total_stop: bool = True,
               learning_rate: float = 1e-3) -> list[list[float]]:
    """Each group's LR at optimiser steps 0 .. steps-1 in kohya's loop (one process): a real optimiser with both
    groups built at ``learning_rate`` (kohya's ``lr=args.learning_rate``), ``optimizer.step()`` then accelerate's
    ``scheduler.step()`` (not past ``total_steps``)."""
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": b} for b in bases]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate)
    scheduler = make(optimizer)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            seen.append([float(g["lr"]) for g in optimizer.param_groups])
            optimizer.step()
            if not (total_stop and hasattr(scheduler, "total_steps")) or scheduler._step_count <= scheduler.total_steps:
                scheduler.step()
    return seen


def _ours(schedule, steps: int, bases=(1e-4, 3e-5)) -> list[list[float]]:
    return [[schedule.lr(s, b) for b in bases] for s in range(steps)]


@settings(max_examples=15, deadline=None)
@given(first=st.integers(2, 40), warmup_share=st.floats(0, 0.9), gamma=st.floats(0.3, 1.0),
       multiplier=st.sampled_from([1.0, 1.5, 2.0]), min_lr=st.sampled_from([0.0, 1e-6, 1e-5]),
       bases=st.tuples(st.floats(1e-5, 1e-2), st.floats(1e-5, 1e-2)))
def test_an_installed_class_gives_each_group_its_lr_in_kohyas_loop_bit_for_bit(first, warmup_share, gamma, multiplier,
                                                                               min_lr, bases):
    args = {"first_cycle_max_steps": first, "warmup_steps": int(first * warmup_share), "gamma": gamma,
            "cycle_multiplier": multiplier, "min_lr": min_lr}
    schedule = ImportedSchedule.parse(f"{HERE}.WarmupCosineRestarts", args)
    real = _kohya_lrs(lambda o: WarmupCosineRestarts(o, **args), 150, bases)
    assert _ours(schedule, 150, bases) == real


def test_a_function_returning_a_scheduler_is_built_and_stepped_as_kohya_does():
    schedule = ImportedSchedule.parse(f"{HERE}.warmup_then_constant", {"warmup_steps": 7})
    assert _ours(schedule, 20) == _kohya_lrs(lambda o: warmup_then_constant(o, 7), 20)


def test_transformers_schedule_functions_are_taken_by_their_path():
    """``lr_scheduler_type = "transformers.get_cosine_schedule_with_warmup"``: the real library's function."""
    transformers = pytest.importorskip("transformers")
    args = {"num_warmup_steps": 4, "num_training_steps": 30, "num_cycles": 1.5}
    schedule = ImportedSchedule.parse("transformers.get_cosine_schedule_with_warmup", args)
    real = _kohya_lrs(lambda o: transformers.get_cosine_schedule_with_warmup(o, **args), 40)
    assert _ours(schedule, 40) == real and len({row[0] for row in real}) > 20


@pytest.mark.parametrize("name, args", [
    ("StepLR", {"step_size": 7, "gamma": 0.7}), ("MultiStepLR", {"milestones": [3, 9, 9], "gamma": 0.5}),
    ("ConstantLR", {"factor": 0.4, "total_iters": 11}), ("LinearLR", {"start_factor": 0.2, "total_iters": 30}),
    ("ExponentialLR", {"gamma": 0.97}), ("PolynomialLR", {"total_iters": 50, "power": 2.0}),
    ("CosineAnnealingLR", {"T_max": 37, "eta_min": 1e-6}), ("CosineAnnealingWarmRestarts", {"T_0": 10, "T_mult": 2}),
    ("OneCycleLR", {"max_lr": 1e-3, "total_steps": 60, "cycle_momentum": False}),
])
def test_torchs_classes_stepped_are_the_replayed_curves(name, args):
    """Two paths to one curve: the real torch class stepped on the probe optimiser, and TorchSchedule's replay of
    its update rule (OneCycleLR's stop at total_steps included)."""
    stepped = ImportedSchedule.parse(f"torch.optim.lr_scheduler.{name}", args)
    assert _ours(stepped, 200) == _ours(TorchSchedule.parse(name, args), 200)


def test_a_class_with_total_steps_stops_where_accelerate_stops_stepping_it():
    schedule = ImportedSchedule.parse(f"{HERE}.HalvingWithTotal", {"total_steps": 5})
    real = _kohya_lrs(lambda o: HalvingWithTotal(o, total_steps=5), 12)
    assert _ours(schedule, 12) == real
    assert real != _kohya_lrs(lambda o: HalvingWithTotal(o, total_steps=5), 12, total_stop=False)  # (the stop matters)


@pytest.mark.parametrize("name, args, error, words", [
    ("no_such_package_xyz.Schedule", {}, InputError, "cannot import no_such_package_xyz"),
    (f"{HERE}.NoSuchClass", {}, InputError, "has no 'NoSuchClass'"),
    (f"{HERE}.HERE", {}, InputError, "has nothing callable named 'HERE'"),
    (f"{HERE}.WarmupCosineRestarts", {}, ValueError, "first_cycle_max_steps"),
    (f"{HERE}.WarmupCosineRestarts", {"first_cycle_max_steps": 4, "warmup_steps": 4}, ValueError,
     "warmup_steps must be smaller"),
    (f"{HERE}.WarmupCosineRestarts", {"first_cycle_max_steps": 4, "last_epoch": 3}, ValueError, "--resume"),
    (f"{HERE}.WarmupCosineRestarts", {"first_cycle_max_steps": 4, "gamma": object()}, ValueError, "not a Python literal"),
    (f"{HERE}.MovesBeta1", {"at": 1}, ValueError, "sets the optimiser's betas"),
    (f"{HERE}.ScalesWeightDecay", {}, ValueError, "sets the optimiser's weight_decay"),
    (f"{HERE}._no_step", {}, ValueError, "has no step()"),
])
def test_what_cannot_be_run_is_refused_when_parsed(name, args, error, words):
    with pytest.raises(error) as info:
        ImportedSchedule.parse(name, args)
    assert words in str(info.value)


def _no_step(optimizer):
    return object()


def test_torch_schedule_points_a_foreign_module_to_the_imported_path():
    with pytest.raises(ValueError, match="ImportedSchedule's"):
        TorchSchedule.parse(f"{HERE}.WarmupCosineRestarts", {"first_cycle_max_steps": 4})


def _toy_fit(schedule, monkeypatch, steps: int = 5):
    """A toy LoRA fit under ``schedule``: (its first group's LR at each step, the trained parameters)."""
    from fit_runs import optimizers_made

    from sdadapt.methods import fit, prepare_lora
    from sdadapt.toy import build_toy

    made = optimizers_made(monkeypatch)
    system = build_toy(seed=1)
    adaptation = prepare_lora(system, rank=2)
    seen: list[float] = []
    config = FitConfig(steps=steps, batch_size=2, learning_rate=1e-3, warmup_steps=0, optimizer="adamw", seed=2,
                       torch_schedule=schedule)
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    try:
        fit(system, adaptation, images, ["a red circle"] * 2, config=config,
            on_step=lambda p: seen.append(float(made[0].param_groups[0]["lr"])))
    finally:
        monkeypatch.undo()
    return seen, [p.detach().clone() for p in adaptation.params]


def test_fit_follows_the_class_and_a_stepped_torch_class_trains_as_the_replayed_one(monkeypatch):
    args = {"first_cycle_max_steps": 3, "warmup_steps": 1, "gamma": 0.5, "min_lr": 1e-5}
    seen, _ = _toy_fit(ImportedSchedule.parse(f"{HERE}.WarmupCosineRestarts", args), monkeypatch)
    assert seen == [row[0] for row in _kohya_lrs(lambda o: WarmupCosineRestarts(o, **args), 5, (1e-3,))]
    cosine = {"T_max": 3, "eta_min": 1e-5}
    stepped = _toy_fit(ImportedSchedule.parse("torch.optim.lr_scheduler.CosineAnnealingLR", cosine), monkeypatch)
    replayed = _toy_fit(TorchSchedule.parse("CosineAnnealingLR", cosine), monkeypatch)
    assert stepped[0] == replayed[0] and len(set(stepped[0])) > 2
    assert all(torch.equal(a, b) for a, b in zip(stepped[1], replayed[1]))


def test_a_class_moving_beta1_later_stops_fit_before_its_first_step(monkeypatch):
    """Refused at parse only when its first step moves β1; one moving it at step 3 is found when fit computes
    every group's curve, before any training (the weights stay as they were)."""
    from sdadapt.methods import fit, prepare_lora
    from sdadapt.toy import build_toy

    schedule = ImportedSchedule.parse(f"{HERE}.MovesBeta1", {"at": 3})
    system = build_toy(seed=1)
    adaptation = prepare_lora(system, rank=2)
    before = [p.detach().clone() for p in adaptation.params]
    config = FitConfig(steps=5, batch_size=2, learning_rate=1e-3, warmup_steps=0, torch_schedule=schedule)
    with pytest.raises(ValueError, match=r"sets the optimiser's betas .* at step 3"):
        fit(system, adaptation, torch.rand(2, 3, 32, 32) * 2 - 1, ["a red circle"] * 2, config=config)
    assert all(torch.equal(p, b) for p, b in zip(adaptation.params, before))
    short = FitConfig(steps=3, batch_size=2, learning_rate=1e-3, warmup_steps=0, torch_schedule=schedule)
    fit(system, adaptation, torch.rand(2, 3, 32, 32) * 2 - 1, ["a red circle"] * 2, config=short)  # (never reaches it)


def test_options_import_the_class_and_refuse_a_warmup_or_a_missing_package():
    options = TrainOptions(model="toy", images="x", lr_scheduler_type=f"{HERE}.WarmupCosineRestarts",
                           lr_scheduler_args=("first_cycle_max_steps=4", "warmup_steps=1", "min_lr=1e-6", "gamma=0.85"))
    check_schedule_options(options)
    schedule = schedule_fit_args(options, total=8)["torch_schedule"]
    assert schedule == ImportedSchedule.parse(f"{HERE}.WarmupCosineRestarts", {
        "first_cycle_max_steps": 4, "warmup_steps": 1, "min_lr": 1e-6, "gamma": 0.85})
    assert isinstance(schedule.options["first_cycle_max_steps"], int)  # (literal_eval's int, as kohya passes it)
    with pytest.raises(ValueError, match="takes no warm-up"):
        check_schedule_options(TrainOptions(model="toy", images="x", lr_scheduler_type=f"{HERE}.warmup_then_constant",
                                            lr_scheduler_args=("warmup_steps=2",), lr_warmup_steps=5))
    with pytest.raises(InputError, match="cannot import LoraEasyCustomOptimizer"):
        check_schedule_options(TrainOptions(
            model="toy", images="x", lr_scheduler_args=("first_cycle_max_steps=4",),
            lr_scheduler_type="LoraEasyCustomOptimizer.RexAnnealingWarmRestarts.RexAnnealingWarmRestarts"))


def test_a_kohya_toml_naming_an_installed_class_trains_on_its_curve_and_resumes_onto_it(three_shapes, tmp_path):
    """4 steps of a kohya TOML as LoRA Easy Training Scripts writes one: the logged LRs are the class's in kohya's
    loop; the state saved at step 2, resumed, logs the last 2 and ends at the same weights."""
    args = {"first_cycle_max_steps": 3, "warmup_steps": 1, "min_lr": 1e-5, "gamma": 0.5}
    real = [row[0] for row in _kohya_lrs(lambda o: WarmupCosineRestarts(o, **args), 4, (1e-3,))]
    straight, resumed, _ = straight_and_resumed_rates(three_shapes, tmp_path, scheduler=(
        f"lr_scheduler = 'cosine'\nlr_scheduler_type = '{HERE}.WarmupCosineRestarts'\n"
        "lr_scheduler_args = ['first_cycle_max_steps=3', 'warmup_steps=1', 'min_lr=1e-5', 'gamma=0.5']\n"))
    assert straight == pytest.approx(real, rel=1e-6)
    assert resumed == pytest.approx(real[2:], rel=1e-6)


class CountsItsBuilds(LRScheduler):
    """StepLR-like; counts its instances (a curve rebuilt from step 0 shows as one more)."""

    built = 0

    def __init__(self, optimizer, every: int = 3) -> None:
        type(self).built += 1
        self.every = every
        super().__init__(optimizer)

    def get_lr(self):
        return [base * 0.5 ** (self.last_epoch // self.every) for base in self.base_lrs]


class OldTorchCounter(LRScheduler):
    """Steps ``optimizer._step_count`` as classes written for older torch do (this torch's optimisers have none)."""

    def get_lr(self):
        if self.last_epoch > 0:
            self.optimizer._step_count += 1
        return list(self.base_lrs)


class NoneTotal(LRScheduler):
    """Has ``total_steps = None``: accelerate's ``_step_count <= total_steps`` fails on it (TypeError)."""

    def __init__(self, optimizer) -> None:
        self.total_steps = None
        super().__init__(optimizer)

    def get_lr(self):
        return list(self.base_lrs)


class KeepsItsArgs(LRScheduler):
    seen: ClassVar[list] = []

    def __init__(self, optimizer, milestones=(), label="") -> None:
        type(self).seen.append((milestones, label))
        super().__init__(optimizer)

    def get_lr(self):
        return list(self.base_lrs)


def test_a_class_reading_the_optimizers_own_lr_gets_kohyas_learning_rate():
    """transformers' polynomial schedule reads ``optimizer.defaults["lr"]`` (kohya builds the optimiser at
    ``learning_rate``): a text-encoder group at another LR follows kohya's curve, and an ``lr_end`` between the two
    LRs runs as in kohya (the probe at the group's own LR refused it)."""
    transformers = pytest.importorskip("transformers")
    args = {"num_warmup_steps": 2, "num_training_steps": 10, "lr_end": 5e-4, "power": 2.0}
    schedule = ImportedSchedule.parse("transformers.get_polynomial_decay_schedule_with_warmup", args,
                                      learning_rate=1e-3)
    config = FitConfig(steps=12, learning_rate=1e-3, warmup_steps=0, torch_schedule=schedule)
    real = _kohya_lrs(lambda o: transformers.get_polynomial_decay_schedule_with_warmup(o, **args), 12, (1e-3, 3e-4))
    assert [[config.lr_at(s, b) for b in (1e-3, 3e-4)] for s in range(12)] == real
    assert len({row[1] for row in real}) > 5


def test_a_runs_groups_build_their_curves_once_however_many_they_are():
    """70 groups of distinct LRs (block LR weights × LoRA+ × the text encoders) asked at every step: each curve is
    built once and extended, for the imported classes and torch's replayed ones alike (a 64-entry cache rebuilt
    every curve from step 0 at every step)."""
    bases = [1e-4 * (1 + k / 100) for k in range(70)]
    schedule = ImportedSchedule.parse(f"{HERE}.CountsItsBuilds", {"every": 3})
    before = CountsItsBuilds.built
    config = FitConfig(steps=40, learning_rate=1e-4, warmup_steps=0, torch_schedule=schedule)
    seen = [[config.lr_at(s, b) for b in bases] for s in range(40)]
    assert CountsItsBuilds.built - before == 70
    assert seen == _kohya_lrs(lambda o: CountsItsBuilds(o, every=3), 40, bases, learning_rate=1e-4)
    import sdadapt.training.torch_lr_schedules as replayed

    made = []
    real = replayed._RECURSIONS["StepLR"]
    try:
        replayed._RECURSIONS["StepLR"] = lambda o, lr: made.append(lr) or real(o, lr)
        step = FitConfig(steps=40, learning_rate=1e-4, warmup_steps=0,
                         torch_schedule=TorchSchedule.parse("StepLR", {"step_size": 3}))
        for s in range(40):
            for b in bases:
                step.lr_at(s, b)
    finally:
        replayed._RECURSIONS["StepLR"] = real
    assert len(made) == 70


def test_a_failing_step_names_the_class_and_is_not_cached_spent():
    """The probe optimiser's step is inside the report too (a class made for older torch fails there, as in kohya on
    this torch); a second parse reports the same, not a spent curve's StopIteration; accelerate's TypeError on a
    ``total_steps`` of None is reported by step."""
    for _ in range(2):
        with pytest.raises(ValueError, match=r"OldTorchCounter: stepping it failed at step 1: AttributeError.*"
                                             r"older torch versions set"):
            ImportedSchedule.parse(f"{HERE}.OldTorchCounter")
    with pytest.raises(ValueError, match=r"NoneTotal: stepping it failed at step 1: TypeError"):
        ImportedSchedule.parse(f"{HERE}.NoneTotal")


def test_the_args_reach_the_class_as_kohya_reads_them_and_a_schedule_free_run_never_imports_it():
    from sdadapt.jobs.train_optimizer import schedule_free_notes

    KeepsItsArgs.seen.clear()
    options = TrainOptions(model="toy", images="x", lr_scheduler_type=f"{HERE}.KeepsItsArgs",
                           lr_scheduler_args=("milestones=[2, 4]", "label='a b'"))
    schedule_fit_args(options, total=8)["torch_schedule"].lr(3, 1e-3)
    assert KeepsItsArgs.seen and all(seen == ([2, 4], "a b") for seen in KeepsItsArgs.seen)
    with pytest.raises(ValueError, match="one '='"):
        check_schedule_options(TrainOptions(model="toy", images="x", lr_scheduler_type=f"{HERE}.KeepsItsArgs",
                                            lr_scheduler_args=("label=a=b",)))
    free = TrainOptions(model="toy", images="x", optimizer="adamw-schedulefree",
                        lr_scheduler_type="no_such_package_xyz.Schedule")
    check_schedule_options(free)  # (kohya hands a schedule-free optimiser its dummy scheduler: nothing imported)
    assert any("--lr-scheduler-type no_such_package_xyz.Schedule" in note for note in schedule_free_notes(free, ()))


def test_torchs_cyclic_lr_is_stepped_as_an_installed_class_with_its_lr_alone():
    """CyclicLR has no replay in TorchSchedule; the train options step the real class (its LR only): equal to it in
    kohya's loop with cycle_momentum=False, and its default (cycling beta1 too) refused by name and fix."""
    args = ("base_lr=1e-4", "max_lr=1e-3", "step_size_up=3", "mode='triangular2'", "cycle_momentum=False")
    schedule = schedule_fit_args(TrainOptions(model="toy", images="x", lr_scheduler_type="CyclicLR",
                                              lr_scheduler_args=args), total=30)["torch_schedule"]
    kwargs = {"base_lr": 1e-4, "max_lr": 1e-3, "step_size_up": 3, "mode": "triangular2", "cycle_momentum": False}
    real = _kohya_lrs(lambda o: torch.optim.lr_scheduler.CyclicLR(o, **kwargs), 30)
    assert _ours(schedule, 30) == real and len({row[0] for row in real}) > 5
    with pytest.raises(ValueError, match=r"CyclicLR: it sets the optimiser's betas .*cycle_momentum=False"):
        check_schedule_options(TrainOptions(model="toy", images="x", lr_scheduler_type="CyclicLR",
                                            lr_scheduler_args=args[:3]))
    with pytest.raises(ValueError, match="cycle_momentum=False"):
        TorchSchedule.parse("CyclicLR", {"base_lr": 1e-4, "max_lr": 1e-3})


def test_a_used_schedule_copies_and_pickles_as_its_class_and_arguments():
    """The curves a run built are a cache (generators inside): a deep copy or a pickle of a FitConfig holding the
    schedule is the class and its arguments, equal, on the same curve."""
    import copy
    import pickle

    for schedule in (TorchSchedule.parse("StepLR", {"step_size": 3}),
                     ImportedSchedule.parse(f"{HERE}.WarmupCosineRestarts", {"first_cycle_max_steps": 4})):
        config = FitConfig(steps=8, learning_rate=1e-3, warmup_steps=0, torch_schedule=schedule)
        before = [config.lr_at(s, 1e-3) for s in range(8)]
        for other in (copy.deepcopy(config), pickle.loads(pickle.dumps(config))):
            assert other.torch_schedule == schedule and [other.lr_at(s, 1e-3) for s in range(8)] == before
