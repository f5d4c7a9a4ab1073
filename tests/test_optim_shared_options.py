"""The constructor pieces every sdadapt optimiser shares (folded into one place each):
``_step_options`` (stochastic_rounding / foreach / capturable as bools in every param group),
``_growth_rate`` (the D-Adaptation / Prodigy growth bound, checked), ``DAdaptAdam._finish``
(``d ← max(d, min(d̂, d · growth_rate))`` of both D-Adapted Adams) and ``_ScheduleFree.__init__``
(the group layout schedulefree's optimisers carry)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from sdadapt.training.dadapt import DAdaptAdam, DAdaptAdamPreprint, DAdaptLion
from sdadapt.training.lion import Lion
from sdadapt.training.optim import Adafactor, AdamW
from sdadapt.training.prodigy import Prodigy
from sdadapt.training.schedule_free import AdamWScheduleFree, SGDScheduleFree

OPTIMISERS = {
    "AdamW": lambda p, **kw: AdamW(p, lr=1e-3, **kw),
    "Adafactor": lambda p, **kw: Adafactor(p, lr=1e-3, **kw),
    "Lion": lambda p, **kw: Lion(p, lr=1e-4, **kw),
    "DAdaptAdam": lambda p, **kw: DAdaptAdam(p, **kw),
    "DAdaptAdamPreprint": lambda p, **kw: DAdaptAdamPreprint(p, **kw),
    "DAdaptLion": lambda p, **kw: DAdaptLion(p, **kw),
    "Prodigy": lambda p, **kw: Prodigy(p, **kw),
    "AdamWScheduleFree": lambda p, **kw: AdamWScheduleFree(p, **kw),
    "SGDScheduleFree": lambda p, **kw: SGDScheduleFree(p, **kw),
}


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(3, 2)), torch.nn.Parameter(torch.zeros(4))]


@pytest.mark.parametrize("name", list(OPTIMISERS))
@pytest.mark.parametrize("flags", [(0, 1, 0), (1, 0, 0), (0, 0, 1)])
def test_every_optimiser_keeps_the_three_step_options_as_given_bools(name, flags):
    rounding, foreach, capturable = flags
    generator = torch.Generator().manual_seed(0)
    opt = OPTIMISERS[name](_params(), stochastic_rounding=rounding, foreach=foreach, capturable=capturable,
                           generator=generator)
    group = opt.param_groups[0]
    got = (group["stochastic_rounding"], group["foreach"], group["capturable"])
    assert got == (bool(rounding), bool(foreach), bool(capturable))
    assert all(type(v) is bool for v in got), got  # (ints coerced: the steps test them with `if`)
    assert opt.generator is generator


@pytest.mark.parametrize("cls", [DAdaptAdam, DAdaptAdamPreprint, Prodigy])
@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan])
def test_growth_rate_must_be_positive_and_the_error_names_the_optimiser(cls, bad):
    with pytest.raises(ValueError, match=rf"^{cls.__name__}: growth_rate must be > 0 .*got {bad!r}"):
        cls(_params(), growth_rate=bad)


@pytest.mark.parametrize("cls", [DAdaptAdam, DAdaptAdamPreprint, Prodigy])
def test_growth_rate_is_stored_as_a_float(cls):
    value = cls(_params(), growth_rate=2).param_groups[0]["growth_rate"]
    assert type(value) is float and value == 2.0
    assert cls(_params()).param_groups[0]["growth_rate"] == math.inf


def _d_history(cls, growth_rate: float, steps: int = 8) -> list[float]:
    """The estimate ``d`` after each of ``steps`` steps on a fixed quadratic (float64 sums)."""
    torch.manual_seed(0)
    target = torch.randn(6, 5)
    w = torch.nn.Parameter(torch.zeros(6, 5))
    opt = cls([w], lr=1.0, growth_rate=growth_rate, d0=1e-6)
    history = [float(opt.param_groups[0]["d"])]
    for _ in range(steps):
        opt.zero_grad()
        ((w - target) ** 2).sum().backward()
        opt.step()
        history.append(float(opt.param_groups[0]["d"]))
    return history


@pytest.mark.parametrize("cls", [DAdaptAdam, DAdaptAdamPreprint])
def test_both_dadapt_adams_bound_the_estimates_growth_per_step(cls):
    """``d ← max(d, min(d̂, d · growth_rate))`` (dadaptation 3.2, ``dadapt_adam.py`` /
    ``experimental/dadapt_adam_preprint.py``): unbounded, d grows more than 1.5x in some step
    here; bounded by 1.5, it never grows more, never shrinks, and the bound binds (exactly) there."""
    free = _d_history(cls, math.inf)
    bounded = _d_history(cls, 1.5)
    assert any(b > 1.5 * a for a, b in pairwise(free)), free  # (the bound has something to do)
    assert all(a <= b <= a * 1.5 for a, b in pairwise(bounded)), bounded
    assert any(b == a * 1.5 for a, b in pairwise(bounded)), bounded


@pytest.mark.parametrize("cls", [AdamWScheduleFree, SGDScheduleFree])
def test_schedule_free_groups_carry_the_shared_layout(cls):
    """The options and counters both schedule-free optimisers' groups carry, in eval mode first."""
    opt = cls(_params(), weight_decay=0.5, warmup_steps=7, r=0.25, weight_lr_power=3.0)
    group = opt.param_groups[0]
    assert {k: group[k] for k in ("weight_decay", "warmup_steps", "r", "weight_lr_power", "train_mode")} == {
        "weight_decay": 0.5, "warmup_steps": 7, "r": 0.25, "weight_lr_power": 3.0, "train_mode": False}
    assert {k: group[k] for k in ("k", "weight_sum", "lr_max", "scheduled_lr")} == {
        "k": 0, "weight_sum": 0.0, "lr_max": -1.0, "scheduled_lr": 0.0}


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "SGDScheduleFree"])
def test_schedule_free_groups_hold_every_key_of_schedulefrees_with_its_values(name):
    """Every key schedulefree 1.4's own optimiser puts in a group (what kohya and schedulefree's
    tools read from ``param_groups``) is in ours, with the same value for the same arguments."""
    schedulefree = pytest.importorskip("schedulefree")
    kwargs = {"lr": 0.5, "weight_decay": 0.5, "warmup_steps": 7, "r": 0.25, "weight_lr_power": 3.0}
    theirs = getattr(schedulefree, name)(_params(), foreach=False, **kwargs).param_groups[0]
    ours = OPTIMISERS[name](_params(), **kwargs).param_groups[0]
    missing = set(theirs) - set(ours)
    assert not missing, missing
    for key in set(theirs) - {"params", "betas"}:
        assert ours[key] == theirs[key], (key, ours[key], theirs[key])
    if "betas" in theirs:
        assert tuple(ours["betas"]) == tuple(theirs["betas"])
