"""kohya parity of the LR schedule and the logged loss when gradient accumulation A does not divide an
epoch's B batches (each epoch ends with a short step of ``B mod A`` batches).

References:

* accelerate@v1.6.0 (587bc68d; kohya's pin, sd-scripts requirements.txt) ``src/accelerate/scheduler.py:54-82``:
  ``AcceleratedScheduler.step`` steps the wrapped scheduler only when the gradients sync and the optimiser
  was not skipped (fp16), once per process, and a scheduler with ``total_steps`` (``OneCycleLR``) only while
  ``_step_count <= total_steps``. Its ``adjust_scheduler`` branch (``_step_count += 1`` per micro-batch
  between syncs) is off for kohya's ``Accelerator(gradient_accumulation_steps=A)``: the plugin's
  ``to_kwargs`` (``utils/dataclasses.py:71-81``) drops the default ``adjust_scheduler=True`` and
  ``GradientState.adjust_scheduler`` (``state.py:1235-1237``) reads the missing key as False. The tests
  below drive accelerate itself (in this process, its global state put back), so they follow whatever the
  installed accelerate does.
* kohya-ss/sd-scripts@48d368fa ``library/train_util.py:6668-6688`` (``LossRecorder``), fed each batch's loss
  at ``train_network.py:1512-1514``: ``loss/average`` / ``avr_loss``; ``train_network.py:1019``
  (``ss_lr_scheduler``: ``args.lr_scheduler``), ``train_util.py:5270-5271`` (a schedule-free optimiser gets a
  dummy scheduler).
"""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from accelerate_sandbox import accelerate_sandbox
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.training.monitor import LossAverage
from sdadapt.training.step import StepConfig
from sdadapt.training.torch_lr_schedules import TorchSchedule

fit_module = importlib.import_module("sdadapt.methods.fit")  # (the package's ``fit`` is the function)

ONE_CYCLE = {"max_lr": 1e-2, "total_steps": 6, "pct_start": 0.5, "cycle_momentum": False}


# ----------------------------------------------------------------------------- references
def accelerate_lrs(make_scheduler, *, per_epoch: int, accumulation: int, steps: int,
                   skips: tuple[int, ...] = (), with_beta1: bool = False) -> list:
    """kohya's loop (train_network.py:1401-1488: ``with accelerator.accumulate(...)``, ``backward``,
    ``optimizer.step()``, ``lr_scheduler.step()`` per batch, ``global_step += 1`` when the gradients sync)
    through accelerate's real wrappers over a data loader of ``per_epoch`` batches: the LR of each of the
    first ``steps`` optimiser steps (``with_beta1``: ``(lr, betas[0])``). The optimiser steps in ``skips`` get
    inf gradients (an fp16 GradScaler skips them, as accelerate's ``step_was_skipped``)."""
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    with accelerate_sandbox():
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        if skips:
            accelerator.scaler = torch.amp.GradScaler("cpu")  # (accelerate makes one on CUDA only)
        w = torch.nn.Parameter(torch.ones(3))
        optimizer = torch.optim.AdamW([w], lr=1e-3)
        scheduler = make_scheduler(optimizer)
        loader = DataLoader(list(range(per_epoch)), batch_size=1)
        optimizer, scheduler, loader = accelerator.prepare(optimizer, scheduler, loader)
        lrs: list[float] = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while len(lrs) < steps:
                for _ in loader:
                    with accelerator.accumulate(w):
                        poisoned = accelerator.sync_gradients and len(lrs) in skips
                        if accelerator.sync_gradients:  # (the LR — and β1 with `betas` — this optimiser step uses)
                            group = optimizer.param_groups[0]
                            lrs.append((group["lr"], group["betas"][0]) if with_beta1 else group["lr"])
                        accelerator.backward(w.sum() * (math.inf if poisoned else 1.0))
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad()
                    if len(lrs) == steps and accelerator.sync_gradients:
                        break
        return lrs


def ours(config: FitConfig, steps: int, skips: tuple[int, ...] = ()) -> list[float]:
    """sdadapt's LR at each optimiser step: ``lr_at`` of the schedule's position, the steps taken
    (``fit``: ``step − skipped``)."""
    return [config.lr_at(s - sum(1 for k in skips if k < s), config.learning_rate) for s in range(steps)]


class KohyaLossRecorder:
    """kohya's ``LossRecorder`` (train_util.py:6668-6688), written out."""

    def __init__(self):
        self.loss_list: list[float] = []
        self.loss_total = 0.0

    def add(self, *, epoch: int, step: int, loss: float) -> None:
        if epoch == 0:
            self.loss_list.append(loss)
        else:
            while len(self.loss_list) <= step:
                self.loss_list.append(0.0)
            self.loss_total -= self.loss_list[step]
            self.loss_list[step] = loss
        self.loss_total += loss

    @property
    def moving_average(self) -> float:
        return self.loss_total / len(self.loss_list) if self.loss_list else 0


# ----------------------------------------------------------------------------- 1. the LR at every step
def _transformers():
    """transformers.optimization: kohya's named schedules (get_scheduler_fix, train_util.py:5262-5400)."""
    return pytest.importorskip("transformers.optimization")


_SCHEDULES = {
    # kohya's named schedules are LambdaLRs (transformers' get_*_schedule_with_warmup): no total_steps
    "cosine": (lambda o: _transformers().get_cosine_schedule_with_warmup(o, num_warmup_steps=2, num_training_steps=14),
               dict(schedule="cosine", warmup_steps=2)),
    "OneCycleLR": (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, **ONE_CYCLE),
                   dict(warmup_steps=0, torch_schedule=TorchSchedule.parse("OneCycleLR", ONE_CYCLE))),
    "OneCycleLR-3phase": (lambda o: torch.optim.lr_scheduler.OneCycleLR(o, **{**ONE_CYCLE, "three_phase": True,
                                                                               "pct_start": 0.3, "total_steps": 7}),
                          dict(warmup_steps=0, torch_schedule=TorchSchedule.parse(
                              "OneCycleLR", {**ONE_CYCLE, "three_phase": True, "pct_start": 0.3, "total_steps": 7}))),
    "CosineAnnealingLR": (lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4),
                          dict(warmup_steps=0, torch_schedule=TorchSchedule.parse("CosineAnnealingLR", {"T_max": 4}))),
}


@pytest.mark.parametrize("name", list(_SCHEDULES))
@pytest.mark.parametrize("per_epoch, accumulation, skips", [
    (5, 2, ()), (7, 3, ()), (4, 4, ()), (5, 3, (0, 1)), (5, 2, (3, 6)), (3, 2, (2,)),
])
def test_the_lr_of_every_step_is_kohyas_under_accelerate(name, per_epoch, accumulation, skips):
    """14 optimiser steps (several epochs, each ending with a short step unless A divides B), the fp16 scaler
    skipping some: every step's LR is the one accelerate's wrapped scheduler gives kohya's loop — OneCycleLR
    included, which stops at total_steps optimiser steps whatever the accumulation."""
    pytest.importorskip("accelerate")
    make, options = _SCHEDULES[name]
    steps = 14
    config = FitConfig(steps=steps, learning_rate=1e-3, step=StepConfig(accumulation_steps=accumulation), **options)
    real = accelerate_lrs(make, per_epoch=per_epoch, accumulation=accumulation, steps=steps, skips=skips)
    assert ours(config, steps, skips) == pytest.approx(real, rel=1e-12, abs=0)


def test_one_cycle_is_not_cut_short_by_the_accumulation():
    """The bug this fixes: sdadapt stopped OneCycleLR after total_steps // A optimiser steps (as though
    accelerate counted micro-batches); kohya's runs it to total_steps."""
    schedule = TorchSchedule.parse("OneCycleLR", ONE_CYCLE)
    config = FitConfig(steps=8, learning_rate=1e-3, warmup_steps=0, torch_schedule=schedule,
                       step=StepConfig(accumulation_steps=3))
    lrs = [config.lr_at(s, 1e-3) for s in range(8)]
    assert lrs[2] != lrs[3] != lrs[5] and lrs[6] == lrs[7]  # (moving until step 6 = total_steps, then held)


def test_one_cycle_beta1_follows_accelerates_steps_too():
    """cycle_momentum=True: β1 is a function of the same scheduler step as the LR (B=5, A=2, skips)."""
    pytest.importorskip("accelerate")
    args = {**ONE_CYCLE, "cycle_momentum": True}
    schedule = TorchSchedule.parse("OneCycleLR", args)
    skips = (1,)
    real = accelerate_lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, **args), per_epoch=5, accumulation=2,
                          steps=10, skips=skips, with_beta1=True)
    position = [s - sum(1 for k in skips if k < s) for s in range(10)]
    ours = [(schedule.lr(p, 1e-3), schedule.momentum(p)) for p in position]
    assert len(ours) == len(real) and all(len(pair) == 2 for pair in real)  # (pytest >= 9.2's approx takes a flat list)
    assert [v for pair in ours for v in pair] == pytest.approx([v for pair in real for v in pair], rel=1e-12, abs=0)


# ----------------------------------------------------------------------------- fit itself, and its losses
def _fit_records(monkeypatch, *, steps: int, accumulation: int, count: int = 5, **options):
    """A toy LoRA fit over ``count`` images, batch 1: per step (the optimiser's LR, FitProgress), and
    every batch's loss as train_step returned it."""
    from sdadapt.toy import build_toy
    from sdadapt.toy.evaluate import concept_data
    from sdadapt.training.data import Dataset, encode_buckets, records_from_tensors

    system = build_toy(seed=1)
    pixels, _ = concept_data("cross", count, seed=0)
    dataset = Dataset(records_from_tensors(pixels, [f"img{i}" for i in range(count)]))
    encode_buckets(dataset, system.encode_images, images=pixels)
    made, batch_losses = [], []
    real_make, real_step = fit_module.make_optimizer, fit_module.train_step
    monkeypatch.setattr(fit_module, "make_optimizer", lambda *a, **k: made.append(real_make(*a, **k)) or made[-1])

    def recording(model, batch, **kwargs):
        metrics = real_step(model, batch, **kwargs)
        batch_losses.append(float(metrics["loss"]))
        return metrics

    monkeypatch.setattr(fit_module, "train_step", recording)
    seen = []
    config = FitConfig(steps=steps, batch_size=1, learning_rate=1e-3, seed=0,
                       step=StepConfig(accumulation_steps=accumulation, max_grad_norm=None), **options)
    fit(system, METHODS["lora"].adapt(system, seed=1), dataset, config=config,
        on_step=lambda info: seen.append((float(made[0].param_groups[0]["lr"]), info)))
    return seen, batch_losses


def test_fit_trains_one_cycle_on_kohyas_lrs_with_short_steps(monkeypatch):
    """fit with B=5, A=2 (steps of 2, 2, 1 batches) past OneCycleLR's total_steps: the optimiser holds
    accelerate's LR at every step, FitProgress.lr says the same, and each step's batch_losses are its
    batches' own losses (2, 2, 1 of them) whose mean is its loss."""
    pytest.importorskip("accelerate")
    steps = 8
    seen, batch_losses = _fit_records(monkeypatch, steps=steps, accumulation=2, warmup_steps=0,
                                      torch_schedule=TorchSchedule.parse("OneCycleLR", ONE_CYCLE))
    real = accelerate_lrs(lambda o: torch.optim.lr_scheduler.OneCycleLR(o, **ONE_CYCLE), per_epoch=5, accumulation=2,
                          steps=steps)
    assert [lr for lr, _ in seen] == pytest.approx(real, rel=1e-12, abs=0)
    assert [info.lr for _, info in seen] == pytest.approx(real, rel=1e-12, abs=0)
    assert [len(info.batch_losses) for _, info in seen] == [2, 2, 1, 2, 2, 1, 2, 2]
    assert [x for _, info in seen for x in info.batch_losses] == batch_losses  # (each batch's, undivided by A)
    for _, info in seen:
        assert info.loss == sum(info.batch_losses) / len(info.batch_losses)


@settings(max_examples=60, deadline=None)
@given(per_epoch=st.integers(1, 6), accumulation=st.integers(1, 4), epochs=st.integers(1, 4),
       losses=st.lists(st.floats(0.001, 10.0), min_size=30, max_size=30))
def test_loss_average_is_kohyas_loss_recorder(per_epoch, accumulation, epochs, losses):
    """kohya's loop feeds LossRecorder each batch (epoch, its index in the epoch); sdadapt feeds
    LossAverage each optimiser step's batch_losses (micro_batches_of_step's grouping, short steps
    included): after every step the two averages are the same float."""
    from sdadapt.methods.fit import micro_batches_of_step

    total_steps = epochs * -(-per_epoch // accumulation)
    kohya, ours_ = KohyaLossRecorder(), LossAverage(per_epoch=per_epoch)
    kohya_after_step, ours_after_step = [], []
    for step in range(total_steps):
        micros = micro_batches_of_step(step, accumulation=accumulation, per_epoch=per_epoch)
        for micro in micros:
            kohya.add(epoch=micro // per_epoch, step=micro % per_epoch, loss=losses[micro % len(losses)])
        kohya_after_step.append(kohya.moving_average)
        ours_after_step.append(ours_.add([losses[m % len(losses)] for m in micros]))
    assert ours_after_step == kohya_after_step


def test_loss_average_without_epochs_and_bad_input():
    average = LossAverage(per_epoch=0)
    assert average.value == 0.0 and average.add([1.0, 2.0]) == 1.5 and average.add([6.0]) == 3.0
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="per_epoch"):
            LossAverage(per_epoch=bad)


# ----------------------------------------------------------------------------- 3. ss_lr_scheduler
@pytest.mark.parametrize("optimizer, given, schedule, written", [
    # (schedule: what the run's FitConfig holds: constant for the optimisers whose LR is not scheduled)
    ("AdamWScheduleFree", "cosine_with_restarts", "constant", "cosine_with_restarts"),
    ("SGDScheduleFree", "linear", "constant", "linear"),
    ("AdamW", "linear", "linear", "linear"),
    ("Adafactor", "linear", "constant", "adafactor:0.001"),  # (relative_step: kohya rewrites args.lr_scheduler)
])
def test_ss_lr_scheduler_is_kohyas_args_lr_scheduler(optimizer, given, schedule, written):
    """kohya writes ``args.lr_scheduler`` as given (a schedule-free optimiser's too, which its dummy
    scheduler does not use); Adafactor's relative step rewrites it to ``adafactor:<lr>`` first."""
    from sdadapt.jobs import train_optimizer
    from sdadapt.jobs.train import TrainOptions, _optimizer_args

    options = TrainOptions(images=".", optimizer=optimizer, lr_scheduler=given)
    assert train_optimizer.ss_lr_scheduler(options, _optimizer_args(options), learning_rate=1e-3,
                                           schedule=schedule) == written


# ----------------------------------------------------------------------------- 2. what the train command logs
def test_train_logs_kohyas_loss_average_beside_the_step_loss(tmp_path, monkeypatch):
    """3 images at batch 1 with accumulation 2 (steps of 2 and 1 batches): each CSV row's loss is the mean
    of its step's batch losses, and TensorBoard's ``loss/average`` (a value with no CSV column) is kohya's
    LossRecorder average of every batch so far, fed as kohya's loop feeds it."""
    from train_inputs import captioned_pngs, lora_train_args, record_training

    from sdadapt.cli import main

    images = captioned_pngs(tmp_path / "imgs", [(32, 32)] * 3)
    batch_losses, logged = record_training(monkeypatch)
    out = tmp_path / "o.safetensors"
    assert main(lora_train_args(images, "--batch-size", "1", "--gradient-accumulation-steps", "2", "--steps", "4",
                                "--log-with", "csv", "-o", out)) == 0
    kohya, groups = KohyaLossRecorder(), [[0, 1], [2], [3, 4], [5]]
    assert len(batch_losses) == 6 and [s for s, _, _ in logged] == [1, 2, 3, 4]
    for (step, loss, extra), group in zip(logged, groups, strict=True):
        for micro in group:
            kohya.add(epoch=micro // 3, step=micro % 3, loss=batch_losses[micro])
        assert loss == sum(batch_losses[m] for m in group) / len(group)
        assert extra["loss/average"] == kohya.moving_average
    header = (tmp_path / "o-log.csv").read_text().splitlines()[0]
    assert header == "step,epoch,loss,lr,seconds"  # (the CSV keeps its columns)
