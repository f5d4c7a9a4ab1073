"""kohya's ``--lr_scheduler_type``: torch.optim.lr_scheduler classes as pure functions of the step.

The spec is the real torch scheduler: kohya's ``get_scheduler_fix`` (sd-scripts library/train_util.py)
builds the class with ``lr_scheduler_args`` and accelerate steps it once after each optimiser step
(one process). Each class is driven step by step on a dummy optimiser with two parameter groups of
different LRs (kohya's text-encoder and UNet groups), and every LR of several hundred steps must
equal sdadapt's exactly (``==``: the recursive forms' float drift included).
"""

from __future__ import annotations

import csv
import json
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from sdadapt.cli import main
from sdadapt.jobs import TrainOptions
from sdadapt.jobs.train_schedule import (
    check_schedule_options,
    schedule_fit_args,
    schedule_notes,
)
from sdadapt.methods import FitConfig
from sdadapt.training.step import StepConfig
from sdadapt.training.torch_lr_schedules import TORCH_SCHEDULES, TorchSchedule

STEPS = 300
BASES = (1e-4, 3e-5)


def _torch_lrs(name: str, args: dict, *, steps: int = STEPS, bases=BASES) -> list[list[float]]:
    """The LR of each group at optimiser steps 0 .. steps-1 under the real torch scheduler."""
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": b} for b in bases]
    optimizer = torch.optim.SGD(groups, momentum=0.9)
    scheduler = getattr(torch.optim.lr_scheduler, name)(optimizer, **args)
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(steps):
            seen.append([g["lr"] for g in optimizer.param_groups])
            optimizer.step()
            scheduler.step()
    return seen


def _ours(name: str, args: dict, *, steps: int = STEPS, bases=BASES) -> list[list[float]]:
    schedule = TorchSchedule.parse(name, args)
    return [[schedule.lr(s, b) for b in bases] for s in range(steps)]


_gamma = st.floats(0.5, 1.0)
_factor = st.floats(0.05, 1.0)
ARGS = {
    "StepLR": st.fixed_dictionaries({"step_size": st.integers(1, 60), "gamma": _gamma}),
    "MultiStepLR": st.fixed_dictionaries({"milestones": st.lists(st.integers(0, 320), max_size=5), "gamma": _gamma}),
    "ConstantLR": st.fixed_dictionaries({"factor": _factor, "total_iters": st.integers(0, 320)}),
    "LinearLR": st.fixed_dictionaries({"start_factor": _factor, "end_factor": st.floats(0.0, 1.0),
                                       "total_iters": st.integers(0, 320)}),
    "ExponentialLR": st.fixed_dictionaries({"gamma": st.floats(0.9, 1.0)}),
    "PolynomialLR": st.fixed_dictionaries({"total_iters": st.integers(1, 320), "power": st.floats(0.0, 4.0)}),
    "CosineAnnealingLR": st.fixed_dictionaries({"T_max": st.integers(1, 200), "eta_min": st.sampled_from([0.0, 1e-6, 2e-5])}),
    "CosineAnnealingWarmRestarts": st.fixed_dictionaries({"T_0": st.integers(1, 80), "T_mult": st.integers(1, 3),
                                                          "eta_min": st.sampled_from([0.0, 1e-6])}),
    "OneCycleLR": st.fixed_dictionaries({"max_lr": st.floats(1e-5, 1e-2), "total_steps": st.integers(STEPS, 2 * STEPS),
                                         "pct_start": st.floats(0.05, 0.6), "anneal_strategy": st.sampled_from(["cos", "linear"]),
                                         "three_phase": st.booleans(), "div_factor": st.floats(2.0, 50.0),
                                         "final_div_factor": st.floats(10.0, 1e4), "cycle_momentum": st.booleans(),
                                         "base_momentum": st.floats(0.5, 0.9), "max_momentum": st.floats(0.9, 0.99)}),
}


def test_every_class_has_a_strategy():
    assert set(ARGS) == set(TORCH_SCHEDULES)


@pytest.mark.parametrize("name", TORCH_SCHEDULES)
@settings(max_examples=12, deadline=None)
@given(data=st.data())
def test_each_groups_lr_is_torchs_bit_for_bit_at_every_step(name, data):
    args = data.draw(ARGS[name])
    assert _ours(name, args) == _torch_lrs(name, args)


def test_the_recursive_cosine_drifts_from_its_closed_form_and_ours_follows_the_recursion():
    """torch's ``CosineAnnealingLR.step()`` multiplies the last LR by a ratio of cosines: after a few
    hundred steps it is not the closed form to the last bit (what kohya users get is the recursion)."""
    args = {"T_max": 37, "eta_min": 1e-6}
    real = [row[0] for row in _torch_lrs("CosineAnnealingLR", args, steps=600)]
    schedule = TorchSchedule.parse("CosineAnnealingLR", args)
    closed = [schedule.closed_form(s, BASES[0]) for s in range(600)]
    assert [schedule.lr(s, BASES[0]) for s in range(600)] == real
    assert closed != real and closed == pytest.approx(real, rel=1e-9, abs=1e-18)


def test_a_dotted_path_into_torch_is_the_bare_name():
    args = {"step_size": 3, "gamma": 0.5}
    assert TorchSchedule.parse("torch.optim.lr_scheduler.StepLR", args) == TorchSchedule.parse("StepLR", args)


@settings(max_examples=10, deadline=None)
@given(args=ARGS["OneCycleLR"].map(lambda a: {**a, "cycle_momentum": True}), adam=st.booleans())
def test_one_cycle_moves_beta1_or_momentum_as_torch_does(args, adam):
    """torch's OneCycleLR writes each group's ``betas[0]`` (AdamW) or ``momentum`` (SGD) at every step."""
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": b} for b in BASES]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999)) if adam else torch.optim.SGD(groups, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, **args)
    schedule = TorchSchedule.parse("OneCycleLR", args)
    assert schedule.cycles_momentum
    for step in range(STEPS):
        for group in optimizer.param_groups:
            real = group["betas"][0] if adam else group["momentum"]
            assert schedule.momentum(step) == real
            assert group["betas"][1] == 0.999 if adam else True
        optimizer.step()
        scheduler.step()
    assert TorchSchedule.parse("OneCycleLR", {**args, "cycle_momentum": False}).momentum(3) is None


def test_fit_sets_each_groups_lr_and_beta1_as_torchs_one_cycle(monkeypatch):
    """The loop itself: a 5-step toy run under OneCycleLR holds torch's LR and β1 at every step."""
    from fit_runs import optimizers_made

    from sdadapt.methods import fit, prepare_lora
    from sdadapt.toy import build_toy

    made = optimizers_made(monkeypatch)
    args = {"max_lr": 2e-3, "total_steps": 5, "pct_start": 0.4}
    seen: list[tuple[float, float]] = []
    system = build_toy(seed=1)
    adaptation = prepare_lora(system, rank=2)
    config = FitConfig(steps=5, batch_size=2, learning_rate=1e-3, warmup_steps=0, optimizer="adamw",
                       torch_schedule=TorchSchedule.parse("OneCycleLR", args))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    fit(system, adaptation, images, ["a red circle"] * 2, config=config,
        on_step=lambda p: seen.append((made[0].param_groups[0]["lr"], made[0].param_groups[0]["betas"][0])))
    optimizer = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, **args)
    want = []
    for _ in range(5):
        want.append((optimizer.param_groups[0]["lr"], optimizer.param_groups[0]["betas"][0]))
        optimizer.step()
        scheduler.step()
    assert [(float(lr), beta) for lr, beta in seen] == want
    with pytest.raises(ValueError, match="CUDA-graph"):
        FitConfig(steps=5, warmup_steps=0, cuda_graph=True, torch_schedule=TorchSchedule.parse("OneCycleLR", args))
    with pytest.raises(ValueError, match="Adafactor does not have"):
        FitConfig(steps=5, warmup_steps=0, optimizer="adafactor", torch_schedule=TorchSchedule.parse("OneCycleLR", args))


@pytest.mark.parametrize("accumulation", [1, 2, 3])
def test_one_cycle_stops_where_accelerate_stops_stepping_it(accumulation):
    """accelerate's ``AcceleratedScheduler.step`` (accelerate@v1.6.0 scheduler.py:54-82) steps a scheduler
    with ``total_steps`` only while ``_step_count <= total_steps``; its ``adjust_scheduler`` branch (adding
    the micro-batches between optimiser steps to ``_step_count``) is off for kohya's
    ``Accelerator(gradient_accumulation_steps=A)`` (state.py:1235-1237 reads the plugin's kwargs, from
    which utils/dataclasses.py:71-81 drops the default True), so the accumulation changes nothing:
    written out here on the real class (tests/test_parity_short_steps.py drives accelerate itself)."""
    total, steps = 40, 60
    args = {"max_lr": 1e-3, "total_steps": total, "cycle_momentum": False}
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, **args)
    real = []
    for _ in range(steps):
        real.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        if scheduler._step_count <= scheduler.total_steps:
            scheduler.step()
    schedule = TorchSchedule.parse("OneCycleLR", args)
    assert [schedule.lr(s, 1e-4) for s in range(steps)] == real
    config = FitConfig(steps=steps, learning_rate=1e-4, warmup_steps=0, torch_schedule=schedule,
                       step=StepConfig(accumulation_steps=accumulation))
    assert [config.lr_at(s, 1e-4) for s in range(steps)] == real


@pytest.mark.parametrize("name, args, words", [
    ("LambdaLR", {}, "Python function (lr_lambda)"),
    ("ReduceLROnPlateau", {}, "without one"),
    ("SequentialLR", {}, "scheduler objects"),
    ("transformers.optimization.AdafactorSchedule", {}, "ImportedSchedule's"),
    ("mymodule.MySchedule", {}, "ImportedSchedule's"),
    ("CosineAnealingLR", {"T_max": 3}, "did you mean CosineAnnealingLR"),
    ("CosineAnnealingLR", {}, "needs lr_scheduler_args T_max=..."),
    ("CosineAnnealingLR", {"T_max": 3, "eta": 0.1}, "eta: not an argument of CosineAnnealingLR"),
    ("CosineAnnealingLR", {"T_max": 0}, "T_max must be > 0"),
    ("StepLR", {"step_size": 3, "last_epoch": 5}, "--resume"),
    ("MultiStepLR", {"milestones": 100}, "milestones must be a list"),
    ("OneCycleLR", {"max_lr": 1e-3, "total_steps": 100, "cycle_momentum": 1}, "must be True or False"),
    ("OneCycleLR", {"max_lr": (1e-3, 1e-4), "total_steps": 100}, "give one number"),
    ("OneCycleLR", {"max_lr": 1e-3, "total_steps": 100, "base_momentum": [0.8, 0.9]}, "give one number"),
    ("OneCycleLR", {"max_lr": 1e-3, "total_steps": 10, "pct_start": 0.1, "cycle_momentum": False}, "no length"),
])
def test_what_cannot_be_run_is_refused_with_the_reason(name, args, words):
    with pytest.raises(ValueError, match=None) as info:
        TorchSchedule.parse(name, args)
    assert words in str(info.value)


def test_options_map_the_args_to_the_class_and_refuse_a_warmup():
    options = TrainOptions(model="toy", images="x", lr_scheduler_type="CosineAnnealingLR",
                           lr_scheduler_args=("T_max=10", "eta_min=1e-6"), lr_scheduler="cosine_with_restarts")
    check_schedule_options(options)
    fit = schedule_fit_args(options, total=20)
    assert fit["torch_schedule"] == TorchSchedule.parse("CosineAnnealingLR", {"T_max": 10, "eta_min": 1e-6})
    assert fit["warmup_steps"] == 0  # (sdadapt's default warm-up is not added: kohya takes none)
    assert any("--lr-scheduler cosine_with_restarts" in note for note in schedule_notes(options))
    unquoted = TrainOptions(model="toy", images="x", lr_scheduler_type="OneCycleLR",
                            lr_scheduler_args=("max_lr=1e-3", "total_steps=20", "anneal_strategy=linear"))
    assert dict(schedule_fit_args(unquoted, total=20)["torch_schedule"].args)["anneal_strategy"] == "linear"
    listed = TrainOptions(model="toy", images="x", lr_scheduler_type="MultiStepLR",
                          lr_scheduler_args=("milestones=[3,5]", "gamma=0.5"))
    assert schedule_fit_args(listed, total=8)["torch_schedule"] == TorchSchedule.parse("MultiStepLR", {"milestones": [3, 5],
                                                                                                      "gamma": 0.5})
    with pytest.raises(ValueError, match="takes no warm-up"):
        check_schedule_options(TrainOptions(model="toy", images="x", lr_scheduler_type="StepLR",
                                            lr_scheduler_args=("step_size=2",), lr_warmup_steps=5))
    with pytest.raises(ValueError, match="takes no warm-up"):
        FitConfig(steps=5, warmup_steps=2, torch_schedule=TorchSchedule.parse("StepLR", {"step_size": 2}))


def _kohya_toml(folder, images, steps: int, *, scheduler: str = "lr_scheduler = 'constant'\n"
                "lr_scheduler_type = 'torch.optim.lr_scheduler.CosineAnnealingLR'\n"
                "lr_scheduler_args = ['T_max=3', 'eta_min=1e-5']\n") -> str:
    """A kohya TOML of ``steps`` toy LoRA steps saving its state every 2, with the ``scheduler`` lines."""
    config = folder / "k.toml"
    config.write_text(f"pretrained_model_name_or_path = 'toy'\ntrain_data_dir = '{images}'\noutput_dir = '{folder}'\n"
                      f"output_name = 'out'\nlearning_rate = 1e-3\nmax_train_steps = {steps}\nresolution = '32,32'\n"
                      f"train_batch_size = 1\nseed = 3\nsave_every_n_steps = 2\n{scheduler}", encoding="utf-8")
    return str(config)


def _logged_rates(folder) -> list[float]:
    with open(folder / "out-log.csv") as handle:
        return [float(row["lr"]) for row in csv.DictReader(handle)]


def straight_and_resumed_rates(images, folder, **toml) -> tuple[list[float], list[float], dict[str, str]]:
    """4 steps of a kohya TOML (:func:`_kohya_toml`), then the same resumed from its state saved at step 2: (the LRs
    logged straight, those logged resumed, the straight file's metadata); both must end at the same weights."""
    run, resumed = folder / "run", folder / "resumed"
    run.mkdir()
    resumed.mkdir()
    assert main(["train", "lora", "--config", _kohya_toml(run, images, 4, **toml), "--quiet"]) == 0
    state = run / "out-state"
    assert json.loads((state / "run.json").read_text())["step"] == 2
    assert main(["train", "lora", "--config", _kohya_toml(resumed, images, 4, **toml), "--resume", str(state),
                 "--quiet"]) == 0
    with safe_open(str(run / "out.safetensors"), "pt") as a, safe_open(str(resumed / "out.safetensors"), "pt") as b:
        for key in a.keys():  # noqa: SIM118 (safetensors' handle: keys() lists the tensors)
            torch.testing.assert_close(b.get_tensor(key), a.get_tensor(key), rtol=0, atol=0)
        metadata = a.metadata()
    return _logged_rates(run), _logged_rates(resumed), metadata


def test_a_kohya_toml_trains_on_torchs_curve_and_resumes_onto_it(three_shapes, tmp_path):
    """4 steps of a kohya TOML with lr_scheduler_type: the logged LRs are torch's; the state saved at
    step 2, resumed, logs the same last 2 LRs and ends at the same weights; ``ss_lr_scheduler`` is
    kohya's (its lr_scheduler, which lr_scheduler_type replaces)."""
    real = [row[0] for row in _torch_lrs("CosineAnnealingLR", {"T_max": 3, "eta_min": 1e-5}, steps=4, bases=(1e-3,))]
    straight, resumed, metadata = straight_and_resumed_rates(three_shapes, tmp_path)
    assert straight == pytest.approx(real, rel=1e-6)
    assert resumed == pytest.approx(real[2:], rel=1e-6)
    assert metadata["ss_lr_scheduler"] == "constant"


def test_one_cycle_leaves_a_group_whose_lr_is_0_frozen():
    """OneCycleLR sets every group's LR from max_lr; kohya leaves a group of LR 0 (a block LR weight
    of 0) out of the optimiser, so the schedule never reaches it: its parameters must not move."""
    from sdadapt.methods import fit, prepare_lora
    from sdadapt.toy import build_toy

    system = build_toy(seed=1)
    adaptation = prepare_lora(system, rank=2)
    params = list(adaptation.params)
    adaptation.lr_scales = [0.0] * 2 + [1.0] * (len(params) - 2)
    before = [p.detach().clone() for p in params]
    config = FitConfig(steps=3, batch_size=2, learning_rate=1e-3, warmup_steps=0, optimizer="adamw",
                       torch_schedule=TorchSchedule.parse("OneCycleLR", {"max_lr": 1e-2, "total_steps": 3,
                                                                         "pct_start": 0.4}))
    fit(system, adaptation, torch.rand(2, 3, 32, 32) * 2 - 1, ["a red circle"] * 2, config=config)
    assert all(torch.equal(p, b) for p, b in zip(params[:2], before[:2]))
    assert any(not torch.equal(p, b) for p, b in zip(params[2:], before[2:]))


def test_a_repeated_milestone_decays_once_per_listing():
    """torch's MultiStepLR keeps its milestones in a Counter: a step listed twice multiplies by γ²
    (the random lists above rarely repeat one); a milestone 0 decays at the constructor's step."""
    args = {"milestones": [0, 4, 4, 9, 9, 9], "gamma": 0.5}
    assert _ours("MultiStepLR", args, steps=15) == _torch_lrs("MultiStepLR", args, steps=15)


def test_fit_starts_each_groups_curve_from_its_own_lr(monkeypatch):
    """Groups of different LRs (LoRA+ / block LR weights scale them): each follows torch's curve from
    its own LR, as torch's ``base_lrs`` (a group of LR 0 stays 0)."""
    from fit_runs import optimizers_made

    from sdadapt.methods import fit, prepare_lora
    from sdadapt.toy import build_toy

    made = optimizers_made(monkeypatch)
    system = build_toy(seed=1)
    adaptation = prepare_lora(system, rank=2)
    count = len(adaptation.params)
    adaptation.lr_scales = [0.0] + [0.25] * (count // 2) + [1.0] * (count - 1 - count // 2)
    args = {"T_max": 3, "eta_min": 1e-5}
    seen: list[dict[float, float]] = []
    config = FitConfig(steps=5, batch_size=2, learning_rate=1e-3, warmup_steps=0, optimizer="adamw",
                       torch_schedule=TorchSchedule.parse("CosineAnnealingLR", args))
    fit(system, adaptation, torch.rand(2, 3, 32, 32) * 2 - 1, ["a red circle"] * 2, config=config,
        on_step=lambda p: seen.append({g["lr_scale"]: float(g["lr"]) for g in made[0].param_groups}))
    real = _torch_lrs("CosineAnnealingLR", args, steps=5, bases=(0.25e-3, 1e-3))
    assert [[row[0.25], row[1.0]] for row in seen] == real
    assert all(row[0.0] == 0.0 for row in seen)
