"""LR schedules and the run's step arithmetic against float64 transcriptions of what kohya runs.

kohya sd-scripts (kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb) builds every named
schedule in ``library/train_util.py`` ``get_scheduler_fix`` (lines 5265-5399): warm-up and decay
counts ``int(x · N)`` for a float, else the count (5275-5280); ``constant`` refuses a warm-up
(5294-5297, 5329-5330); the classic schedules are **transformers'** functions (``from
transformers.optimization import SchedulerType, TYPE_TO_SCHEDULER_FUNCTION``, line 47; only
``piecewise_constant`` is diffusers', 5321-5324), called with ``num_cycles`` for
``cosine_with_restarts`` (5346-5353) and ``power`` for ``polynomial`` (5355-5358), nothing more
for ``linear`` / ``cosine`` (5371-5377). Each is a ``LambdaLR``: every group's LR is its own base LR
times one factor ``f(last_epoch)``. The factors are written out here from transformers'
``src/transformers/optimization.py`` (huggingface/transformers@005edacb6b5dabbf0843e92c6623de9e07ca6241,
the 4.5x series kohya pins — ``requirements.txt``: transformers==4.54.1; the lambdas are unchanged in
the installed 5.x) and diffusers' ``get_piecewise_constant_schedule``
(huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951 ``src/diffusers/optimization.py``
lines 98-117), in Python floats (float64), and compared at every optimiser step of the run, the
edges included (step 0, the end of the warm-up, the last step, and past it where sdadapt says what
it does instead).

When the scheduler steps: kohya calls ``lr_scheduler.step()`` after every micro-batch inside
``accelerator.accumulate`` (train_network.py lines 1424-1460); accelerate's ``AcceleratedScheduler.step``
(accelerate 1.15 ``scheduler.py`` lines 54-82; kohya pins 1.6, the same code) only bumps
``_step_count`` between optimiser steps and steps the schedule once per optimiser step (one
process), so the LR of optimiser step ``j`` (0-based) is ``base · f(j)`` whatever the accumulation.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdadapt.jobs import TrainOptions
from sdadapt.jobs.train_schedule import schedule_fit_args, step_count
from sdadapt.methods import FitConfig
from sdadapt.training.lr_schedules import (
    StepRules,
    extra_schedule_factor,
    inverse_sqrt_factor,
    warmup_stable_decay_factor,
)
from sdadapt.training.optim import lr_at
from sdadapt.training.step import StepConfig

# both sides are Python floats; only the operation order differs (sdadapt's warm-up: base·s/W, LambdaLR's: base·(s/W))
REL, ABS = 1e-12, 1e-18


# ---------------------------------------------------------------- transcriptions (float64)
def _kohya_count(value, total: int) -> int:
    """train_util.py:5275-5280: ``int(x · N)`` for a float (a share), else the count."""
    return int(value * total) if isinstance(value, float) else value


def _warmup64(s: int, w: int) -> float:
    """Every transformers warm-up: ``float(s) / float(max(1, W))`` (optimization.py, each ``*_lr_lambda``)."""
    return float(s) / float(max(1, w))


def _factor64(name: str, s: int, *, w: int, t: int, cycles: int = 1, power: float = 1.0, lr_end: float = 1e-7,
              lr_init: float = 1.0) -> float:
    """transformers' lambdas as kohya calls them (``cosine``: num_cycles 0.5, the default kohya leaves)."""
    if name == "constant_with_warmup":  # _get_constant_schedule_with_warmup_lr_lambda
        return _warmup64(s, w) if s < w else 1.0
    if s < w:
        return _warmup64(s, w)
    if name == "linear":  # _get_linear_schedule_with_warmup_lr_lambda
        return max(0.0, float(t - s) / float(max(1, t - w)))
    progress = float(s - w) / float(max(1, t - w))
    if name == "cosine":  # _get_cosine_schedule_with_warmup_lr_lambda, num_cycles = 0.5
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    if name == "cosine_with_restarts":  # _get_cosine_with_hard_restarts_schedule_with_warmup_lr_lambda
        if progress >= 1.0:
            return 0.0
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((float(cycles) * progress) % 1.0))))
    assert name == "polynomial"  # _get_polynomial_decay_schedule_with_warmup_lr_lambda (lr_init: the optimiser's LR)
    if s > t:
        return lr_end / lr_init
    pct_remaining = 1 - (s - w) / (t - w)
    return ((lr_init - lr_end) * pct_remaining ** power + lr_end) / lr_init


def _inverse_sqrt64(s: int, *, w: int, timescale: int | None) -> float:
    """get_inverse_sqrt_schedule: timescale ``W or 10_000`` when not given; ``1/√((s + τ − W)/τ)``."""
    if timescale is None:
        timescale = w or 10_000
    if s < w:
        return _warmup64(s, w)
    shift = timescale - w
    return 1.0 / math.sqrt((s + shift) / timescale)


def _piecewise64(s: int, rules: str) -> float:
    """diffusers' get_piecewise_constant_schedule: a dict (a step given twice: the later factor),
    sorted at every call; the first stop above the step, else the last factor."""
    rules_dict = {}
    parts = rules.split(",")
    for rule in parts[:-1]:
        value, steps = rule.split(":")
        rules_dict[int(steps)] = float(value)
    last = float(parts[-1])
    for stop in sorted(rules_dict):
        if s < stop:
            return rules_dict[stop]
    return last


# ---------------------------------------------------------------- the classic schedules
#: (lr_scheduler, steps, lr_warmup_steps (count, or share below 1), num_cycles, power, lr_end)
CLASSIC = [
    ("constant_with_warmup", 12, 4, 1, 1.0, None),
    ("constant_with_warmup", 9, 0.5, 1, 1.0, None),     # a share: int(0.5 · 9) = 4
    ("linear", 10, 0, 1, 1.0, None),
    ("linear", 23, 0.29, 1, 1.0, None),                 # int(0.29 · 23) = 6
    ("linear", 5, 5, 1, 1.0, None),                     # warm-up as long as the run
    ("cosine", 1, 0, 1, 1.0, None),                     # one step
    ("cosine", 17, 3, 1, 1.0, None),
    ("cosine", 40, 0.1, 1, 1.0, None),
    ("cosine_with_restarts", 30, 2, 3, 1.0, None),
    ("cosine_with_restarts", 31, 0.2, 4, 1.0, None),
    ("polynomial", 20, 3, 1, 1.0, None),                # lr_end: transformers' 1e-7
    ("polynomial", 25, 0.2, 1, 2.0, 1e-4),
    ("polynomial", 13, 0, 1, 0.5, 3e-4),
    ("polynomial", 8, 2, 1, 0.0, 1e-4),                  # power 0: the full LR to the last step (0⁰ = 1 at step T)
]


@pytest.mark.parametrize("name, total, warmup, cycles, power, lr_end", CLASSIC)
def test_the_classic_schedules_are_transformers_lambdas_with_kohyas_mapping(name, total, warmup, cycles, power, lr_end):
    """``train``'s mapping (``schedule_fit_args``) and ``FitConfig.lr_at`` for two groups of other
    LRs (UNet, text encoder: one factor for both, the polynomial's computed from the optimiser's LR
    ``--learning-rate``) at every optimiser step, including the last one and the step after it."""
    lr, text_lr = 1e-3, 3e-4
    options = TrainOptions(images=".", learning_rate=lr, lr_scheduler=name, lr_warmup_steps=warmup,
                           lr_scheduler_num_cycles=cycles, lr_scheduler_power=power,
                           lr_scheduler_args=() if lr_end is None else (f"lr_end={lr_end}",))
    config = FitConfig(steps=total, learning_rate=lr, text_encoder_lr=text_lr,
                       **schedule_fit_args(options, total=total))
    w = _kohya_count(warmup, total)
    assert config.warmup_steps == w
    for s in range(total + 1):
        f = _factor64(name, s, w=w, t=total, cycles=cycles, power=power, lr_end=1e-7 if lr_end is None else lr_end,
                      lr_init=lr)
        assert config.lr_at(s, lr) == pytest.approx(lr * f, rel=REL, abs=ABS), s
        assert config.lr_at(s, text_lr) == pytest.approx(text_lr * f, rel=REL, abs=ABS), s


def test_the_edges_of_the_classic_schedules():
    """Step 0 of a warm-up is LR 0; the warm-up's last step is ``(W − 1)/W``; the first step after it
    the full LR; the last step of a decay is one step short of the end value; and past the run
    ``lr_at`` holds the end value (``fit`` never goes there: transformers' cosine would rise again,
    ``cos`` of a progress above 1)."""
    w, t, base = 4, 12, 2e-3
    for name in ("linear", "cosine", "cosine_with_restarts", "polynomial"):
        assert lr_at(0, base_lr=base, schedule=name, warmup_steps=w, total_steps=t) == 0.0
        assert lr_at(w - 1, base_lr=base, schedule=name, warmup_steps=w, total_steps=t) == pytest.approx(base * 3 / 4)
        assert lr_at(w, base_lr=base, schedule=name, warmup_steps=w, total_steps=t) == base
    assert lr_at(t - 1, base_lr=base, schedule="linear", warmup_steps=w, total_steps=t) == pytest.approx(base / 8)
    assert lr_at(t - 1, base_lr=base, schedule="cosine", warmup_steps=w, total_steps=t) == pytest.approx(
        base * 0.5 * (1 + math.cos(math.pi * 7 / 8)), rel=REL)
    for name in ("linear", "cosine", "cosine_with_restarts", "polynomial"):
        assert [lr_at(s, base_lr=base, schedule=name, warmup_steps=w, total_steps=t) for s in (t, t + 1, 3 * t)] == [
            0.0, 0.0, 0.0], name
    assert _factor64("cosine", t + 4, w=w, t=t) > 0.0  # (transformers' own cosine past the end: it rises)
    # cosine_with_restarts: each of the N cycles restarts at the full LR
    starts = [w + k * (t - w) // 2 for k in range(2)]
    assert [lr_at(s, base_lr=base, schedule="cosine_with_restarts", warmup_steps=w, total_steps=t, num_cycles=2)
            for s in starts] == [base, base]


def test_constant_with_a_warmup_warms_up_where_kohya_refuses_it():
    """kohya's ``constant`` refuses a warm-up (train_util.py:5329-5330, ``wrap_check_needless_num_warmup_steps``);
    sdadapt's ``constant`` with one (given, or sdadapt's default ``min(20, steps // 10)`` outside a
    kohya config, which fills kohya's 0) trains as ``constant_with_warmup`` (documented in train.md)."""
    options = TrainOptions(images=".", learning_rate=1e-3, lr_scheduler="constant")
    fit = schedule_fit_args(options, total=50)
    assert fit["warmup_steps"] == 5  # (sdadapt's default: min(20, 50 // 10))
    config = FitConfig(steps=50, learning_rate=1e-3, **fit)
    assert [config.lr_at(s, 1e-3) for s in range(50)] == pytest.approx(
        [1e-3 * _factor64("constant_with_warmup", s, w=5, t=50) for s in range(50)], rel=REL, abs=ABS)
    zero = schedule_fit_args(TrainOptions(images=".", lr_scheduler="constant", lr_warmup_steps=0), total=50)
    assert {FitConfig(steps=50, learning_rate=1e-3, **zero).lr_at(s, 1e-3) for s in range(50)} == {1e-3}


# ---------------------------------------------------------------- inverse_sqrt, piecewise_constant, WSD
@pytest.mark.parametrize("warmup, timescale, total",
                         [(0, None, 30), (6, None, 30), (5, 20, 40), (0, 3, 12), (9, 1, 15)])
def test_inverse_sqrt_is_transformers_lambda(warmup, timescale, total):
    options = TrainOptions(images=".", learning_rate=1e-3, lr_scheduler="inverse_sqrt", lr_warmup_steps=warmup,
                           lr_scheduler_timescale=timescale)
    config = FitConfig(steps=total, learning_rate=1e-3, **schedule_fit_args(options, total=total))
    for s in range(total + 3):  # (no step count: it goes on past the run)
        want = _inverse_sqrt64(s, w=warmup, timescale=timescale)
        assert inverse_sqrt_factor(s, warmup_steps=warmup, timescale=timescale) == pytest.approx(want, rel=REL), s
        assert config.lr_at(s, 1e-3) == pytest.approx(1e-3 * want, rel=REL, abs=ABS), s
    # the warm-up's end: 1/√(τ/τ)
    assert inverse_sqrt_factor(warmup, warmup_steps=warmup, timescale=timescale) == 1.0


@pytest.mark.parametrize("rules", ["1:10,0.1:20,0.01:30,0.005", "0.5:12,2:4,0.25", "0.3:5,0.7:5,0.9:2,0.1",
                                   "1:0,0.5", "2.5"])
def test_piecewise_constant_is_diffusers_rules_function(rules):
    """Unsorted rules, a step given twice (the later factor), a stop at 0, no rule at all."""
    parsed = StepRules.parse(rules)
    config = FitConfig(steps=40, learning_rate=1e-3, warmup_steps=0, schedule="piecewise_constant", step_rules=rules)
    for s in range(42):
        assert parsed.factor(s) == _piecewise64(s, rules), s
        assert config.lr_at(s, 1e-3) == 1e-3 * _piecewise64(s, rules), s


def test_piecewise_constant_boundaries():
    rules = StepRules.parse("1:3,0.5:6,0.25")
    assert [rules.factor(s) for s in range(8)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]


def test_warmup_stable_decay_edges():
    """The stable phase starts at step W (the full LR), the decay at ``T − D`` (still the full LR:
    progress 0), the decay's last step is one step short of the end value; past ``W + S + D`` the
    factor is ``min_lr_ratio`` (transformers' ``return min_lr_ratio``)."""
    w, d, t, r = 3, 4, 12, 0.1
    factor = [extra_schedule_factor("warmup_stable_decay", s, total_steps=t, warmup_steps=w, decay_steps=d,
                                    min_lr_ratio=r) for s in range(t + 2)]
    assert factor[0] == pytest.approx(r) and factor[w] == 1.0 and factor[t - d] == pytest.approx(1.0)
    assert factor[t - 1] == pytest.approx(r + (1 - r) * 0.5 * (1 + math.cos(math.pi * 3 / 4)), rel=REL)
    assert factor[t] == factor[t + 1] == r
    # a run shorter than W + S + D (a public call with its own stable steps): the end value after the phases
    assert warmup_stable_decay_factor(9, warmup_steps=2, stable_steps=3, decay_steps=2, min_lr_ratio=0.3) == 0.3
    assert warmup_stable_decay_factor(6, warmup_steps=2, stable_steps=3, decay_steps=2, min_lr_ratio=0.0,
                                      decay_type="linear") == pytest.approx(0.5)


# ---------------------------------------------------------------- step arithmetic
@pytest.mark.parametrize("total", [1, 3, 7, 10, 23, 100, 1000, 1601])
def test_a_share_of_the_steps_is_kohyas_int_of_share_times_steps(total):
    """train_util.py:5276: ``int(x · N)`` — rounded down, float error included (0.29 · 100 = 28.999…: 28)."""
    for share in (0.0, 0.01, 0.05, 0.1, 0.15, 0.29, 0.3, 1 / 3, 0.5, 0.7, 0.99):
        assert step_count(share, total) == _kohya_count(share, total), (share, total)
    for count in (1, 2, 5, 20, 99):
        assert step_count(float(count), total) == count  # (a count: from 1 on, as kohya's int_or_float)


@pytest.mark.parametrize("accumulation", [2, 3])
def test_the_schedule_steps_once_per_optimiser_step_whatever_the_accumulation(monkeypatch, accumulation):
    """The loop: a toy run of 4 optimiser steps of ``accumulation`` micro-batches each holds at step
    ``j`` the LR of kohya's loop written out here — ``lr_scheduler.step()`` after every micro-batch,
    accelerate's ``AcceleratedScheduler`` bumping ``_step_count`` between optimiser steps and
    stepping the ``LambdaLR`` at each optimiser step — for both a warm-up and a decay."""
    from fit_runs import optimizers_made

    from sdadapt.methods import fit, prepare_lora
    from sdadapt.toy import build_toy

    made = optimizers_made(monkeypatch)
    steps, warmup, lr = 4, 2, 1e-3
    seen: list[float] = []
    config = FitConfig(steps=steps, batch_size=2, learning_rate=lr, warmup_steps=warmup, schedule="cosine",
                       optimizer="adamw", step=StepConfig(accumulation_steps=accumulation))
    system = build_toy(seed=1)
    fit(system, prepare_lora(system, rank=2), torch.rand(2, 3, 32, 32) * 2 - 1, ["a red circle"] * 2, config=config,
        on_step=lambda p: seen.append(float(made[0].param_groups[0]["lr"])))
    # kohya's loop (train_network.py:1424-1460) with accelerate's scheduler wrapper, on a LambdaLR of
    # transformers' cosine
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: _factor64("cosine", e, w=warmup, t=steps))
    want = []
    for micro in range(steps * accumulation):
        if micro % accumulation == 0:
            want.append(optimizer.param_groups[0]["lr"])  # (the LR this optimiser step's update uses)
        if (micro + 1) % accumulation:  # accelerate: no sync yet -> _step_count += 1 only
            scheduler._step_count += 1
            continue
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx(want, rel=REL, abs=ABS)
    assert len(seen) == steps



def test_a_kohya_toml_with_max_train_epochs_trains_kohyas_steps_on_kohyas_schedule(three_shapes, tmp_path):
    """train_network.py:800-802 (``max_train_epochs · ⌈batches / accumulation⌉`` steps) and 978-979
    (the epochs), 1693-1697 (an epoch save after each epoch but the last), with the schedule sized
    for those steps (a warm-up share of them): 3 images at one size, batch 2 — 2 batches an epoch —,
    3 epochs: 6 steps, epoch saves after steps 2 and 4, the logged LRs transformers' linear with
    ``int(0.25 · 6)`` = 1 warm-up step. (An accumulation that does not divide the batches ends each epoch
    with a short step, as kohya: tests/test_epoch_end_accumulation_reference.py.)"""
    import csv

    from sdadapt.cli import main

    config = tmp_path / "epochs.toml"
    config.write_text(f"pretrained_model_name_or_path = 'toy'\ntrain_data_dir = '{three_shapes}'\n"
                      f"output_dir = '{tmp_path}'\noutput_name = 'out'\nlearning_rate = 1e-3\nmax_train_epochs = 3\n"
                      "resolution = '32,32'\ntrain_batch_size = 2\nseed = 3\nsave_every_n_epochs = 1\n"
                      "lr_scheduler = 'linear'\nlr_warmup_steps = 0.25\n", encoding="utf-8")
    assert main(["train", "lora", "--config", str(config), "--quiet"]) == 0
    with open(tmp_path / "out-log.csv") as handle:
        rows = list(csv.DictReader(handle))
    batches, epochs, accumulation = 2, 3, 1
    steps = epochs * math.ceil(batches / accumulation)
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    assert [int(r["epoch"]) for r in rows] == [1, 1, 2, 2, 3, 3]
    warmup = _kohya_count(0.25, steps)
    assert [float(r["lr"]) for r in rows] == pytest.approx(
        [1e-3 * _factor64("linear", s, w=warmup, t=steps) for s in range(steps)], rel=1e-6, abs=1e-12)
    saved = sorted(p.name for p in tmp_path.glob("out-*.safetensors"))
    assert saved == ["out-epoch0001.safetensors", "out-epoch0002.safetensors"]  # (the last epoch's: the output)
