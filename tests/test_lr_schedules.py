"""kohya's other LR schedules: cosine_with_min_lr, warmup_stable_decay, inverse_sqrt, piecewise_constant.

Each is checked three ways: ``FitConfig.lr_at`` with ``train``'s mapping of kohya's options
(:func:`sdadapt.jobs.train_schedule.schedule_fit_args`) against the real transformers / diffusers
scheduler that kohya's ``get_scheduler_fix`` builds from the same options (the mapping written
out below from sd-scripts library/train_util.py at commit 48d368fa, 2026-02-16), against a float64
formula written here (cosine_with_min_lr, warmup_stable_decay), and end to end: a kohya TOML with
each trains 2 steps on the toy model, logs those LRs, writes ``ss_lr_scheduler`` as kohya does and
resumes onto the same schedule.
"""

from __future__ import annotations

import ast
import csv
import json
import math

import pytest
import torch
from safetensors import safe_open

from sdadapt.cli import main
from sdadapt.jobs import TrainOptions
from sdadapt.jobs.train_schedule import (
    check_schedule_options,
    recorded_shares,
    schedule_fit_args,
    schedule_notes,
)
from sdadapt.methods import FitConfig
from sdadapt.training.lr_schedules import StepRules

# float tolerance: both sides compute in Python floats (float64); only the operation order differs
REL, ABS = 1e-12, 1e-18


def _kohya_scheduler(optimizer, *, name: str, total: int, warmup=0, decay=0, num_cycles: int = 1, timescale=None,
                     min_lr_ratio=None, args=()):
    """kohya's get_scheduler_fix for these schedules: its step counts (a float is a share, ``int(x·N)``),
    its arguments, and transformers' / diffusers' real schedule functions."""
    from diffusers.optimization import get_piecewise_constant_schedule
    from transformers.optimization import TYPE_TO_SCHEDULER_FUNCTION, SchedulerType

    kwargs = {}
    for arg in args:
        key, value = arg.split("=")
        kwargs[key] = ast.literal_eval(value)
    warmup_steps = int(warmup * total) if isinstance(warmup, float) else warmup
    decay_steps = int(decay * total) if isinstance(decay, float) else decay
    if name == "piecewise_constant":
        return get_piecewise_constant_schedule(optimizer, **kwargs)
    function = TYPE_TO_SCHEDULER_FUNCTION[SchedulerType(name)]
    if name == "inverse_sqrt":
        return function(optimizer, num_warmup_steps=warmup_steps, timescale=timescale, **kwargs)
    if name == "cosine_with_min_lr":
        return function(optimizer, num_warmup_steps=warmup_steps, num_training_steps=total, num_cycles=num_cycles / 2,
                        min_lr_rate=min_lr_ratio, **kwargs)
    assert name == "warmup_stable_decay"
    return function(optimizer, num_warmup_steps=warmup_steps, num_stable_steps=total - warmup_steps - decay_steps,
                    num_decay_steps=decay_steps, num_cycles=num_cycles / 2,
                    min_lr_ratio=min_lr_ratio if min_lr_ratio is not None else 0.0, **kwargs)


#: (lr_scheduler, steps, lr_warmup_steps, lr_decay_steps, num_cycles, timescale, min_lr_ratio, lr_scheduler_args)
CASES = [
    ("cosine_with_min_lr", 30, 5, 0, 1, None, 0.1, ()),
    ("cosine_with_min_lr", 40, 0.15, 0, 3, None, 0.25, ()),                  # a warm-up share, 3 half-waves
    ("cosine_with_min_lr", 25, 0, 0, 1, None, None, ("min_lr=2e-4",)),        # the end LR as min_lr (a share of 1e-3)
    ("warmup_stable_decay", 30, 4, 10, 1, None, None, ()),
    ("warmup_stable_decay", 37, 0.1, 0.3, 2, None, 0.2, ("decay_type='linear'",)),
    ("warmup_stable_decay", 30, 6, 8, 1, None, 0.05, ("warmup_type='cosine'", "decay_type='1-sqrt'")),
    ("warmup_stable_decay", 20, 3, 0, 1, None, None, ()),                     # kohya's default: no decay
    ("inverse_sqrt", 40, 8, 0, 1, None, None, ()),
    ("inverse_sqrt", 40, 5, 0, 1, 20, None, ()),
    ("inverse_sqrt", 30, 0, 0, 1, None, None, ()),                            # timescale 10000
    ("piecewise_constant", 30, 0, 0, 1, None, None, ("step_rules='1:10,0.1:20,0.01:25,0.005'",)),
    ("piecewise_constant", 20, 0, 0, 1, None, None, ("step_rules='0.5:12,2:4,0.25'",)),  # rules out of order
]


@pytest.mark.parametrize("name, total, warmup, decay, cycles, timescale, ratio, args", CASES)
def test_lr_at_with_kohyas_mapping_equals_the_scheduler_kohya_builds(name, total, warmup, decay, cycles, timescale,
                                                                     ratio, args):
    import inspect

    taken = inspect.signature(pytest.importorskip("transformers.optimization").get_wsd_schedule).parameters
    if any(arg.split("=")[0] not in taken for arg in args if name == "warmup_stable_decay"):
        pytest.skip("this transformers' get_wsd_schedule (the reference kohya builds) lacks warmup_type / decay_type")
    lr, text_lr = 1e-3, 3e-4
    options = TrainOptions(images=".", learning_rate=lr, lr_scheduler=name, lr_warmup_steps=warmup, lr_decay_steps=decay,
                           lr_scheduler_num_cycles=cycles, lr_scheduler_timescale=timescale,
                           lr_scheduler_min_lr_ratio=ratio, lr_scheduler_args=args)
    config = FitConfig(steps=total, learning_rate=lr, text_encoder_lr=text_lr, **schedule_fit_args(options, total=total))
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))]},
                                 {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": text_lr}], lr=lr)
    scheduler = _kohya_scheduler(optimizer, name=name, total=total, warmup=warmup, decay=decay, num_cycles=cycles,
                                 timescale=timescale, min_lr_ratio=ratio, args=args)
    for step in range(total + 1):
        unet, text = (group["lr"] for group in optimizer.param_groups)
        assert config.lr_at(step, lr) == pytest.approx(unet, rel=REL, abs=ABS), step
        assert config.lr_at(step, text_lr) == pytest.approx(text, rel=REL, abs=ABS), step  # one factor for every group
        optimizer.step()
        scheduler.step()


def _cosine_with_min_lr64(step: int, *, warmup: int, total: int, cycles: int, ratio: float) -> float:
    if step < warmup:
        return step / max(1, warmup)
    p = (step - warmup) / max(1, total - warmup)
    return ratio + (1 - ratio) * 0.5 * (1 + math.cos(math.pi * cycles * p))


def _wsd64(step: int, *, warmup: int, total: int, decay: int, ratio: float, cycles: int, up: str, down: str) -> float:
    stable = total - warmup - decay
    if step < warmup:
        q = step / max(1, warmup)
        shape = {"linear": q, "cosine": (1 - math.cos(math.pi * q)) / 2, "1-sqrt": 1 - math.sqrt(1 - q)}[up]
        return ratio + (1 - ratio) * shape
    if step < warmup + stable:
        return 1.0
    if step < total:
        q = (step - warmup - stable) / max(1, decay)
        shape = {"linear": 1 - q, "cosine": (1 + math.cos(math.pi * cycles * q)) / 2, "1-sqrt": 1 - math.sqrt(q)}[down]
        return ratio + (1 - ratio) * shape
    return ratio


@pytest.mark.parametrize("warmup, total, cycles, ratio", [(0, 20, 1, 0.0), (5, 30, 1, 0.1), (3, 17, 2, 0.3), (7, 7, 1, 0.5)])
def test_cosine_with_min_lr_matches_a_float64_formula(warmup, total, cycles, ratio):
    config = FitConfig(steps=total, learning_rate=2e-3, warmup_steps=warmup, schedule="cosine_with_min_lr",
                       num_cycles=cycles, min_lr_ratio=ratio)
    for step in range(total + 1):
        want = 2e-3 * _cosine_with_min_lr64(step, warmup=warmup, total=total, cycles=cycles, ratio=ratio)
        assert config.lr_at(step, 2e-3) == pytest.approx(want, rel=REL, abs=ABS), step
    if warmup < total:  # (the end: the min LR after an odd number of half-waves; W = T never decays, as transformers')
        assert config.lr_at(total, 2e-3) == pytest.approx(2e-3 * (ratio if cycles % 2 else 1.0), rel=REL)


@pytest.mark.parametrize("warmup, decay, total, ratio, cycles, up, down", [
    (4, 10, 30, 0.0, 1, "linear", "cosine"), (3, 5, 12, 0.2, 1, "cosine", "linear"),
    (5, 9, 20, 0.1, 3, "1-sqrt", "cosine"), (0, 20, 20, 0.0, 1, "linear", "1-sqrt"), (6, 0, 10, 0.3, 1, "linear", "cosine")])
def test_warmup_stable_decay_matches_a_float64_formula(warmup, decay, total, ratio, cycles, up, down):
    config = FitConfig(steps=total, learning_rate=1e-3, warmup_steps=warmup, schedule="warmup_stable_decay",
                       decay_steps=decay, min_lr_ratio=ratio, num_cycles=cycles, warmup_type=up, decay_type=down)
    for step in range(total + 2):
        want = 1e-3 * _wsd64(step, warmup=warmup, total=total, decay=decay, ratio=ratio, cycles=cycles, up=up, down=down)
        assert config.lr_at(step, 1e-3) == pytest.approx(want, rel=REL, abs=ABS), step
    if warmup:
        assert config.lr_at(0, 1e-3) == pytest.approx(1e-3 * ratio, abs=ABS)  # (the warm-up starts at the end LR's share)
    if decay < total - warmup:  # (a stable phase: the full LR right after the warm-up)
        assert config.lr_at(warmup, 1e-3) == 1e-3


def test_piecewise_constant_reads_step_numbers_where_each_factor_stops_and_has_no_warmup():
    rules = StepRules.parse("1:10, 0.1:20,0.01")
    assert rules == StepRules(((10, 1.0), (20, 0.1)), 0.01)
    assert [rules.factor(s) for s in (0, 9, 10, 19, 20, 1000)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert StepRules.parse("0.5:3,0.2:3,0.1").rules == ((3, 0.2),)  # a step given twice: the later factor (diffusers')
    config = FitConfig(steps=30, learning_rate=1e-3, warmup_steps=20, schedule="piecewise_constant", step_rules="1:10,0.1")
    assert config.lr_at(0, 1e-3) == 1e-3 and config.lr_at(10, 1e-3) == pytest.approx(1e-4)
    for text, words in [("1:10,0.1:x,0.01", "'x' is not a step number"), ("1:10,0.1:20", "must be a factor alone"),
                        ("1:10,0.1 20,0.01", "is not FACTOR:STEP"), ("-1:10,0.1", "factor -1.0 must be"),
                        ("1:-5,0.1", "step -5 is negative"), ("", "must be text")]:
        with pytest.raises(ValueError, match=words):
            StepRules.parse(text)


@pytest.mark.parametrize("settings, words", [
    ({"schedule": "cosine_with_min_lr"}, "needs min_lr_ratio"),
    ({"schedule": "cosine_with_min_lr", "min_lr_ratio": 1.5}, r"min_lr_ratio must be a number in \[0, 1\]"),
    ({"schedule": "warmup_stable_decay", "min_lr_ratio": "0.1"}, r"min_lr_ratio must be a number in \[0, 1\]"),
    ({"schedule": "warmup_stable_decay", "decay_steps": 15}, "do not fit into 20 steps"),
    ({"schedule": "warmup_stable_decay", "decay_steps": -1}, "decay_steps must be a whole number"),
    ({"schedule": "warmup_stable_decay", "decay_type": "exp"}, "decay_type must be one of linear, cosine, 1-sqrt"),
    ({"schedule": "inverse_sqrt", "lr_timescale": 0}, "lr_timescale must be a whole number >= 1"),
    ({"schedule": "piecewise_constant"}, "needs step_rules"),
    ({"schedule": "piecewise_constant", "step_rules": "1:5,x"}, "'x' is not a number"),
])
def test_fit_config_checks_each_schedules_settings(settings, words):
    with pytest.raises(ValueError, match=words):
        FitConfig(steps=20, warmup_steps=6, **settings)


@pytest.mark.parametrize("options, words", [
    ({"lr_scheduler": "cosine_with_min_lr"}, "needs the LR it ends at"),
    ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_min_lr_ratio": 0.1, "lr_scheduler_args": ("min_lr=1e-5",)},
     "give one"),
    ({"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_args": ("min_lr=0.1",)}, "must not be above --learning-rate"),
    ({"lr_scheduler": "piecewise_constant"}, "needs its rules"),
    ({"lr_scheduler": "piecewise_constant", "lr_scheduler_args": ("step_rules=1:10;0.1",)}, "must be a factor alone"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_decay_steps": 0.5, "lr_warmup_steps": 0.6}, "add up to 1 at most"),
    ({"lr_scheduler": "warmup_stable_decay", "steps": 10, "lr_decay_steps": 8, "lr_warmup_steps": 4}, "do not fit"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_scheduler_args": ("decay_type=exp",)}, "must be one of linear"),
    ({"lr_scheduler": "warmup_stable_decay", "lr_scheduler_args": ("min_lr_ratio=0.1",)}, "--lr-scheduler-min-lr-ratio"),
    ({"lr_scheduler": "inverse_sqrt", "lr_scheduler_args": ("timescale=5",)}, "--lr-scheduler-timescale"),
    ({"lr_scheduler": "inverse_sqrt", "lr_scheduler_timescale": 0}, "--lr-scheduler-timescale must be"),
    ({"lr_scheduler": "cosine", "lr_scheduler_args": ("step_rules=1:10,0.1",)}, "not an argument of --lr-scheduler cosine"),
    ({"lr_scheduler": "cosine", "lr_scheduler_args": ("last_epoch=3",)}, "--resume"),
    ({"lr_decay_steps": -1}, "--lr-decay-steps must be >= 0"),
    ({"lr_decay_steps": 2.5}, "--lr-decay-steps 2.5: a count must be a whole number"),  # (kohya's int_or_float refuses it)
    ({"lr_warmup_steps": 10.5}, "--lr-warmup-steps 10.5: a count must be a whole number"),
    ({"lr_scheduler_min_lr_ratio": 2.0}, r"--lr-scheduler-min-lr-ratio must be a number in \[0, 1\]"),
])
def test_train_options_are_checked_before_the_model_loads(options, words):
    with pytest.raises(ValueError, match=words):
        TrainOptions(images=".", learning_rate=1e-3, **options)


def test_unquoted_text_arguments_are_read_and_unused_options_noted():
    options = TrainOptions(images=".", learning_rate=1e-3, lr_scheduler="warmup_stable_decay", lr_decay_steps=0.25,
                           lr_scheduler_args=("warmup_type=cosine", "decay_type='1-sqrt'"))
    fit = schedule_fit_args(options, total=40)
    assert (fit["warmup_type"], fit["decay_type"], fit["decay_steps"], fit["warmup_steps"]) == ("cosine", "1-sqrt", 10, 4)
    check_schedule_options(options)
    notes = schedule_notes(TrainOptions(images=".", lr_scheduler="piecewise_constant", lr_warmup_steps=5,
                                        lr_decay_steps=3, lr_scheduler_timescale=4, lr_scheduler_min_lr_ratio=0.1,
                                        lr_scheduler_num_cycles=2, lr_scheduler_args=("step_rules=1:3,0.5",)))
    assert len(notes) == 5 and all("not used by --lr-scheduler piecewise_constant" in n for n in notes), notes
    assert any("never decays" in n for n in schedule_notes(TrainOptions(images=".", lr_scheduler="warmup_stable_decay")))
    # kohya's share of the steps is rounded down (int(x · N)), for the warm-up as for the decay
    assert schedule_fit_args(TrainOptions(images=".", lr_scheduler="cosine", lr_warmup_steps=0.29), total=100)[
        "warmup_steps"] == 28
    assert schedule_fit_args(TrainOptions(images=".", lr_scheduler="warmup_stable_decay", lr_decay_steps=0.29),
                             total=100)["decay_steps"] == 28
    # kohya passes piecewise_constant no warm-up: a given one is noted above and trains as none (ss_lr_warmup_steps 0)
    assert schedule_fit_args(TrainOptions(images=".", lr_scheduler="piecewise_constant", lr_warmup_steps=5,
                                          lr_scheduler_args=("step_rules=1:3,0.5",)), total=10)["warmup_steps"] == 0


# ------------------------------------------------------------------------------ end to end
#: a kohya TOML's schedule lines for each schedule, and the FitConfig settings they mean (4 steps)
TOMLS = {
    "cosine_with_min_lr": ("lr_warmup_steps = 1\nlr_scheduler_min_lr_ratio = 0.2\n",
                           {"warmup_steps": 1, "min_lr_ratio": 0.2}),
    "warmup_stable_decay": ("lr_warmup_steps = 1\nlr_decay_steps = 0.5\nlr_scheduler_args = [\"decay_type='linear'\"]\n",
                            {"warmup_steps": 1, "decay_steps": 2, "decay_type": "linear"}),
    "inverse_sqrt": ("lr_warmup_steps = 1\nlr_scheduler_timescale = 2\n", {"warmup_steps": 1, "lr_timescale": 2}),
    "piecewise_constant": ("lr_scheduler_args = [\"step_rules='1:1,0.5:3,0.25'\"]\n",
                           {"warmup_steps": 0, "step_rules": "1:1,0.5:3,0.25"}),
}


def _kohya_toml(tmp_path, images, name: str, steps: int, extra: str = "", *, lines: str | None = None) -> str:
    """A kohya TOML training ``steps`` steps of --lr-scheduler ``name`` with its :data:`TOMLS` lines
    (or ``lines``), saving the state every 2 steps."""
    config = tmp_path / f"{name}.toml"
    config.write_text(f"pretrained_model_name_or_path = 'toy'\ntrain_data_dir = '{images}'\noutput_dir = '{tmp_path}'\n"
                      f"output_name = 'out'\nlearning_rate = 1e-3\nmax_train_steps = {steps}\nresolution = '32,32'\n"
                      f"train_batch_size = 1\nseed = 3\nsave_every_n_steps = 2\nlr_scheduler = '{name}'\n"
                      + (TOMLS[name][0] if lines is None else lines) + extra, encoding="utf-8")
    return str(config)


def _logged_rates(tmp_path) -> list[float]:
    with open(tmp_path / "out-log.csv") as handle:
        return [float(row["lr"]) for row in csv.DictReader(handle)]


@pytest.mark.parametrize("name", sorted(TOMLS))
def test_a_kohya_toml_trains_two_steps_and_resumes_onto_the_same_schedule(three_shapes, tmp_path, name):
    """A 4-step kohya TOML run saving its state at step 2, and that state resumed for the last 2 steps:
    the log's LRs are the schedule's at every step, the resumed run's LRs and weights are the
    uninterrupted run's, and the metadata names the schedule as kohya writes it (``ss_lr_scheduler``)."""
    want = FitConfig(steps=4, learning_rate=1e-3, schedule=name, **TOMLS[name][1])
    run = tmp_path / "run"
    run.mkdir()
    assert main(["train", "lora", "--config", _kohya_toml(run, three_shapes, name, 4)]) == 0
    whole = _logged_rates(run)
    assert whole == pytest.approx([want.lr_at(s, 1e-3) for s in range(4)], rel=1e-6)
    state = run / "out-state"
    assert json.loads((state / "run.json").read_text())["step"] == 2
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    assert main(["train", "lora", "--config", _kohya_toml(resumed, three_shapes, name, 4), "--resume", str(state)]) == 0
    assert _logged_rates(resumed) == pytest.approx(whole[2:], rel=1e-6)
    with safe_open(str(run / "out.safetensors"), "pt") as a, safe_open(str(resumed / "out.safetensors"), "pt") as b:
        assert a.metadata()["ss_lr_scheduler"] == b.metadata()["ss_lr_scheduler"] == name
        for key in a.keys():  # noqa: SIM118 (safetensors' handle: keys() lists the tensors)
            torch.testing.assert_close(b.get_tensor(key), a.get_tensor(key), rtol=0, atol=0)


def test_a_state_saved_before_warmup_shares_were_rounded_down_resumes_with_its_own_warmup(three_shapes, tmp_path):
    """A warm-up share of 0.45 of 4 steps was 2 steps (rounded to the nearest) before it became
    kohya's ``int(0.45 · 4)`` = 1: a state whose ``run.json`` predates that (no ``step_shares``)
    resumes with the 2 warm-up steps it started with, and its new saves stay so; a new run's record
    says ``floor``."""
    run = tmp_path / "run"
    run.mkdir()

    def config(folder):
        return _kohya_toml(folder, three_shapes, "cosine", 4, lines="lr_warmup_steps = 0.45\n")

    assert main(["train", "lora", "--config", config(run), "--quiet"]) == 0
    record_file = run / "out-state" / "run.json"
    record = json.loads(record_file.read_text())
    assert record["step_shares"] == "floor"
    new = FitConfig(steps=4, learning_rate=1e-3, schedule="cosine", warmup_steps=1)
    assert _logged_rates(run) == pytest.approx([new.lr_at(s, 1e-3) for s in range(4)], rel=1e-6)
    del record["step_shares"]  # (a record written before: no entry)
    record_file.write_text(json.dumps(record))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    assert main(["train", "lora", "--config", config(resumed),
                 "--resume", str(run / "out-state"), "--save-state-on-train-end"]) == 0
    old = FitConfig(steps=4, learning_rate=1e-3, schedule="cosine", warmup_steps=2)
    assert old.lr_at(3, 1e-3) != new.lr_at(3, 1e-3)
    assert _logged_rates(resumed) == pytest.approx([old.lr_at(s, 1e-3) for s in (2, 3)], rel=1e-6)
    record = json.loads(record_file.read_text())  # (the resumed run's end state, written into the folder it resumed)
    assert record["step"] == 4 and "step_shares" not in record
    with pytest.raises(ValueError, match="step_shares 'round' is not 'floor' or 'nearest'; the file was edited"):
        recorded_shares({**record, "step_shares": "round"})


@pytest.mark.parametrize("lines, key", [("lr_warmup_steps = 1.0\n", "lr_warmup_steps"),  # (the GUI's 100 % warm-up)
                                        ("lr_warmup_steps = 2\nlr_decay_steps = 2.0\n", "lr_decay_steps")])
def test_a_kohya_toml_float_of_one_or_more_is_refused_as_kohya_reads_it_as_a_share(three_shapes, tmp_path, capsys, lines,
                                                                                    key):
    """kohya reads a TOML float as a share of the steps whatever its size (``int(1.0 · N)``: all N
    steps), where sdadapt's count would be 1 step: refused, naming both readings; an integer, or the
    same value as a flag (sdadapt's count), trains."""
    config = _kohya_toml(tmp_path, three_shapes, "warmup_stable_decay", 4, lines=lines)
    assert main(["train", "lora", "--config", config, "--quiet"]) == 2
    error = capsys.readouterr().err
    assert f"{key} = " in error and "share of the steps" in error and "an integer" in error, error
    flag = "--" + key.replace("_", "-")
    assert main(["train", "lora", "--config", config, flag, "1", "--quiet", "--overwrite"]) == 0


def test_min_lr_is_a_share_of_the_optimisers_lr_not_of_unet_lr_as_kohya():
    """kohya builds the optimiser with ``lr=--learning_rate`` (``--unet_lr`` sets the UNet group's),
    and transformers makes ``min_lr`` a share of ``optimizer.defaults['lr']``: with ``--unet-lr``
    the UNet ends at ``unet_lr · min_lr / learning_rate``. Without any LR option the run's own
    (the method's default) is the optimiser's."""
    lr, unet_lr, total = 1e-3, 4e-4, 12
    options = TrainOptions(images=".", learning_rate=lr, unet_lr=unet_lr, lr_scheduler="cosine_with_min_lr",
                           lr_warmup_steps=2, lr_scheduler_args=("min_lr=2e-4",))
    config = FitConfig(steps=total, learning_rate=unet_lr, **schedule_fit_args(options, total=total))
    optimizer = torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": unet_lr}], lr=lr)
    scheduler = _kohya_scheduler(optimizer, name="cosine_with_min_lr", total=total, warmup=2,
                                 args=("min_lr=2e-4",))
    for step in range(total + 1):
        assert config.lr_at(step, unet_lr) == pytest.approx(optimizer.param_groups[0]["lr"], rel=REL, abs=ABS), step
        optimizer.step()
        scheduler.step()
    assert config.lr_at(total, unet_lr) == pytest.approx(unet_lr * 0.2, rel=REL)
    no_rate = TrainOptions(images=".", lr_scheduler="cosine_with_min_lr", lr_scheduler_args=("min_lr=1e-5",))
    check_schedule_options(no_rate)
    fit = schedule_fit_args(no_rate, total=total, learning_rate=1e-4)  # (the method's default LR)
    assert fit["min_lr_ratio"] == pytest.approx(0.1)
    assert FitConfig(steps=total, learning_rate=1e-4, **fit).lr_at(total, 1e-4) == pytest.approx(1e-5, rel=REL)
