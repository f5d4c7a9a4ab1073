"""sdadapt's schedule-free AdamW and SGD (sdadapt.training.schedule_free): a float64 reference written here from
the paper's three sequences, schedulefree's optimisers over 20 steps with train/eval switches,
the multi-tensor and capturable paths equal to the per-parameter one on a CPU, resume, no host sync;
and its wiring: fit's train()/eval() placement (the saved weights are the eval-mode average),
``train --optimizer`` and kohya's ``optimizer_type = "AdamWScheduleFree"``."""

from __future__ import annotations

import importlib

import pytest
import torch
from fit_runs import (
    assert_cuda_graph_run_trains_as_eager,
    spy_on_built_optimizers,
    straight_and_resumed,
    toy_lora_run,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizer_inputs import random_grads as _grads
from optimizer_inputs import random_params as _params
from optimizer_states import assert_same_optimizer_state
from torch import nn
from toy_steps import assert_train_steps_read_nothing_back, toy_lora_step

from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.methods.fit import cuda_graph_clashes, make_optimizer
from sdadapt.methods.optimizers import _CAPTURABLE_OPTIMIZERS
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.host_syncs import HostSyncs
from sdadapt.training.schedule_free import (
    AdamWScheduleFree,
    SGDScheduleFree,
    is_schedule_free,
)
from sdadapt.training.step import StepConfig, TrainState


def _reference(w0, grads, *, lr, betas=None, eps=0.0, weight_decay, warmup_steps, r, weight_lr_power, momentum=None):
    """Schedule-free AdamW (``betas``) or SGD (``momentum``) in float64 from the paper's sequences (x the
    average, z the base iterate, y where gradients are taken): ``(y, x, z)`` after one step per gradient."""
    beta1, beta2 = betas if momentum is None else (momentum, None)
    x = z = w0.double().clone()
    v = torch.zeros_like(x)
    lr_max, weight_sum = -1.0, 0.0
    for t, g in enumerate(grads, start=1):
        g = g.double()
        y = (1 - beta1) * z + beta1 * x
        lr_t = lr * (t / warmup_steps if t <= warmup_steps else 1.0)
        lr_max = max(lr_max, lr_t)
        weight = t**r * lr_max**weight_lr_power
        weight_sum += weight
        c = weight / weight_sum if weight_sum else 0.0
        if beta2 is None:  # SGD
            u = g + weight_decay * y
        else:
            v = beta2 * v + (1 - beta2) * g * g
            u = g / ((v / (1 - beta2**t)).sqrt() + eps) + weight_decay * y
        z = z - lr_t * u
        x = (1 - c) * x + c * z
    return (1 - beta1) * z + beta1 * x, x, z


def _mixed_params(seed: int) -> list[nn.Parameter]:
    """fp32 and bf16 weights, a channels_last conv among them."""
    ps = _params(seed, [(6, 5), (40,), (3, 4, 3, 3)])
    ps[2] = nn.Parameter(ps[2].detach().to(memory_format=torch.channels_last))
    ps.append(nn.Parameter(torch.randn(7, 3, generator=torch.Generator().manual_seed(seed + 7)).bfloat16()))
    return ps


def _run(opt, params, grads, *, switch_at=()) -> None:
    """One step per gradient list (train mode first); eval() then train() after the steps in ``switch_at``."""
    opt.train()
    for i, step_grads in enumerate(grads):
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()
        if i in switch_at:
            opt.eval()
            opt.train()


_OPTIONS = {"lr": 0.02, "betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.05, "warmup_steps": 3, "r": 0.5, "weight_lr_power": 2.0}


# ----------------------------------------------------------------------------------- the math
@settings(max_examples=20, deadline=None)
@given(shapes=st.lists(st.sampled_from([(3,), (4, 5), (2, 3, 2, 2)]), min_size=1, max_size=3),
       steps=st.integers(1, 8), beta1=st.sampled_from([0.5, 0.9, 1.0]), beta2=st.sampled_from([0.9, 0.999]),
       weight_decay=st.sampled_from([0.0, 0.1]), warmup_steps=st.integers(0, 4), r=st.sampled_from([0.0, 1.0]),
       weight_lr_power=st.sampled_from([0.0, 2.0]), foreach=st.booleans(), seed=st.integers(0, 2**16))
def test_schedule_free_adamw_matches_a_float64_reference(shapes, steps, beta1, beta2, weight_decay, warmup_steps, r,
                                                          weight_lr_power, foreach, seed):
    options = {"lr": 0.01, "betas": (beta1, beta2), "eps": 1e-8, "weight_decay": weight_decay, "warmup_steps": warmup_steps, "r": r,
                   "weight_lr_power": weight_lr_power}
    params = _params(seed, shapes)
    start = [p.detach().clone() for p in params]
    grads = _grads(seed, params, steps)
    opt = AdamWScheduleFree(params, foreach=foreach, **options)
    _run(opt, params, grads)
    refs = [_reference(w, [g[i] for g in grads], **options) for i, w in enumerate(start)]
    for p, (y, _, z) in zip(params, refs):
        torch.testing.assert_close(p.detach().double(), y, rtol=1e-5, atol=1e-5)  # train mode: y
        torch.testing.assert_close(opt.state[p]["z"].double(), z, rtol=1e-5, atol=1e-5)
    opt.eval()
    for p, (_, x, _) in zip(params, refs):
        torch.testing.assert_close(p.detach().double(), x, rtol=1e-5, atol=1e-5)  # eval mode: x


def test_schedule_free_adamw_equals_the_schedulefree_package_over_20_steps_with_mode_switches():
    """schedulefree 1.4.1's AdamWScheduleFree: the same weights in both modes, the same z and
    second moments and counters; float32 rounding apart (its ``add_(alpha=)`` fuses a multiply-add
    on a CPU where sdadapt multiplies then adds, so both modes of sdadapt's step round alike)."""
    schedulefree = pytest.importorskip("schedulefree", reason="the schedulefree package (pip install schedulefree)")
    theirs_params, ours_params = _params(3, [(16, 9), (300,), (4, 3, 3, 3)]), _params(3, [(16, 9), (300,), (4, 3, 3, 3)])
    theirs = schedulefree.AdamWScheduleFree(theirs_params, foreach=False, **_OPTIONS)
    ours = AdamWScheduleFree(ours_params, **_OPTIONS)
    grads = _grads(3, ours_params, 20)
    _run(theirs, theirs_params, grads, switch_at=(4, 9, 15))
    _run(ours, ours_params, grads, switch_at=(4, 9, 15))
    for opt in (theirs, ours):
        opt.eval()
    moved = 0.0
    for p, q, start in zip(theirs_params, ours_params, _params(3, [(16, 9), (300,), (4, 3, 3, 3)])):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.state[q]["z"], theirs.state[p]["z"], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.state[q]["exp_avg_sq"], theirs.state[p]["exp_avg_sq"], rtol=1e-6, atol=0)
        moved = max(moved, float((q - start).detach().abs().max()))
    assert moved > 0.05  # (the comparison is not of barely moved weights)
    for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
        assert ours.param_groups[0][key] == theirs.param_groups[0][key], key


@pytest.mark.parametrize("foreach", [False, True])
def test_parameters_and_groups_without_gradients_switch_and_count_as_schedulefree_does(foreach):
    """Two groups; one parameter of the first gets no gradient before step 4, the second group none
    before step 3 (a late-starting adapter, a text encoder trained from a later step): schedulefree
    advances every group's counters at every step and switches only the parameters that have a
    ``z``. Weights in both modes after each switch, ``z`` and the counters equal the package's."""
    schedulefree = pytest.importorskip("schedulefree", reason="the schedulefree package (pip install schedulefree)")
    shapes = [(6, 5), (40,), (3, 4)]
    theirs_params, ours_params = _params(5, shapes), _params(5, shapes)
    grads = _grads(5, ours_params, 8)
    options = {key: value for key, value in _OPTIONS.items() if key != "lr"}

    def groups(params):
        return [{"params": params[:2], "lr": 0.02}, {"params": params[2:], "lr": 0.05}]

    theirs = schedulefree.AdamWScheduleFree(groups(theirs_params), foreach=False, **options)
    ours = AdamWScheduleFree(groups(ours_params), foreach=foreach, **options)
    for opt in (theirs, ours):
        opt.train()
    for step, step_grads in enumerate(grads):
        for opt, params in ((theirs, theirs_params), (ours, ours_params)):
            for i, (p, g) in enumerate(zip(params, step_grads)):
                p.grad = None if (i == 1 and step < 4) or (i == 2 and step < 3) else g.clone()
            opt.step()
        if step in (1, 3, 5):  # (p1 without z at the first two switches; then with)
            for opt in (theirs, ours):
                opt.eval()
            for p, q in zip(theirs_params, ours_params):  # the eval-mode weights x
                torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
            for opt in (theirs, ours):
                opt.train()
    for opt in (theirs, ours):
        opt.eval()
    for p, q in zip(theirs_params, ours_params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.state[q]["z"], theirs.state[p]["z"], rtol=1e-6, atol=1e-6)
    for ours_group, theirs_group in zip(ours.param_groups, theirs.param_groups):
        for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
            assert ours_group[key] == theirs_group[key], key
    ours.train()
    theirs.train()
    for p, q in zip(theirs_params, ours_params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("ours, theirs_name", [(AdamWScheduleFree, "AdamWScheduleFree"), (SGDScheduleFree, "SGDScheduleFree")])
def test_the_defaults_are_the_schedulefree_packages(ours, theirs_name):
    """Every argument both take defaults alike (kohya passes only what optimizer_args give)."""
    import inspect

    schedulefree = pytest.importorskip("schedulefree", reason="the schedulefree package (pip install schedulefree)")
    theirs = inspect.signature(getattr(schedulefree, theirs_name)).parameters
    mine = inspect.signature(ours).parameters
    shared = [name for name in mine if name in theirs and name not in ("params", "foreach")]
    assert {"lr", "weight_decay", "warmup_steps", "r", "weight_lr_power"} <= set(shared)
    for name in shared:
        assert mine[name].default == theirs[name].default, name


_SGD_OPTIONS = {"lr": 0.5, "momentum": 0.8, "weight_decay": 0.05, "warmup_steps": 3, "r": 0.5, "weight_lr_power": 2.0}


@settings(max_examples=10, deadline=None)
@given(steps=st.integers(1, 8), momentum=st.sampled_from([0.5, 0.9]), weight_decay=st.sampled_from([0.0, 0.1]),
       warmup_steps=st.integers(0, 4), foreach=st.booleans(), seed=st.integers(0, 2**16))
def test_schedule_free_sgd_matches_a_float64_reference(steps, momentum, weight_decay, warmup_steps, foreach, seed):
    options = {"lr": 0.1, "momentum": momentum, "weight_decay": weight_decay, "warmup_steps": warmup_steps, "r": 0.0,
                   "weight_lr_power": 2.0}
    params = _params(seed, [(4, 5), (3,)])
    start = [p.detach().clone() for p in params]
    grads = _grads(seed, params, steps)
    opt = SGDScheduleFree(params, foreach=foreach, **options)
    _run(opt, params, grads)
    opt.eval()
    for i, (p, w) in enumerate(zip(params, start)):
        _, x, z = _reference(w, [g[i] for g in grads], **options)
        torch.testing.assert_close(p.detach().double(), x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(opt.state[p]["z"].double(), z, rtol=1e-5, atol=1e-5)
    assert set(opt.state[params[0]]) == {"z"}  # (4 bytes per parameter)


def test_schedule_free_sgd_equals_the_schedulefree_package_over_20_steps_with_mode_switches():
    schedulefree = pytest.importorskip("schedulefree", reason="the schedulefree package (pip install schedulefree)")
    shapes = [(16, 9), (300,)]
    theirs_params, ours_params = _params(8, shapes), _params(8, shapes)
    theirs = schedulefree.SGDScheduleFree(theirs_params, foreach=False, **_SGD_OPTIONS)
    ours = SGDScheduleFree(ours_params, **_SGD_OPTIONS)
    grads = _grads(8, ours_params, 20)
    _run(theirs, theirs_params, grads, switch_at=(4, 9, 15))
    _run(ours, ours_params, grads, switch_at=(4, 9, 15))
    theirs.eval()
    ours.eval()
    for p, q, start in zip(theirs_params, ours_params, _params(8, shapes)):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours.state[q]["z"], theirs.state[p]["z"], rtol=1e-6, atol=1e-6)
        assert float((q - start).detach().abs().max()) > 0.05
    for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
        assert ours.param_groups[0][key] == theirs.param_groups[0][key], key


def test_eval_holds_x_train_holds_y_and_a_step_in_eval_mode_raises():
    params = _params(1, [(5, 4)])
    opt = AdamWScheduleFree(params, **_OPTIONS)
    with pytest.raises(RuntimeError, match=r"call optimizer.train\(\)"):
        opt.step()
    _run(opt, params, _grads(1, params, 4))
    y = params[0].detach().clone()
    opt.eval()
    x, z = params[0].detach().clone(), opt.state[params[0]]["z"]
    torch.testing.assert_close(y, 0.1 * z + 0.9 * x, rtol=1e-5, atol=1e-6)  # y = (1 − β₁) z + β₁ x
    assert not torch.equal(x, y)
    opt.eval()  # (a second eval changes nothing)
    assert torch.equal(params[0], x)
    opt.train()
    torch.testing.assert_close(params[0].detach(), y, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------- the paths agree exactly
_KINDS = {"adamw": (AdamWScheduleFree, _OPTIONS), "sgd": (SGDScheduleFree, _SGD_OPTIONS)}


@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_foreach_is_the_per_parameter_step_bit_for_bit(kind):
    """fp32 (one channels_last) and bf16 weights, mode switches between the steps: the same weights,
    states and stochastic-rounding draws."""
    cls, options = _KINDS[kind]
    grads = _grads(5, _mixed_params(5), 6)
    runs = []
    for foreach in (False, True):
        params = _mixed_params(5)
        opt = cls(params, foreach=foreach, generator=torch.Generator().manual_seed(4), **options)
        _run(opt, params, grads, switch_at=(1, 3))
        opt.eval()
        runs.append((params, opt))
    assert_same_optimizer_state(runs[0][0], runs[0][1], runs[1][0], runs[1][1])
    assert runs[0][0][3].dtype == torch.bfloat16 and runs[0][1].state[runs[0][0][3]]["z"].dtype == torch.float32


@pytest.mark.parametrize("kind", sorted(_KINDS))
@pytest.mark.parametrize("foreach", [False, True])
def test_capturable_with_tensor_lr_and_counters_is_the_python_scalar_step_bit_for_bit(foreach, kind):
    cls, options = _KINDS[kind]
    grads = _grads(6, _mixed_params(6), 7)
    runs = []
    for capturable in (False, True):
        params = _mixed_params(6)
        lr = torch.tensor(options["lr"], dtype=torch.float64) if capturable else options["lr"]
        opt = cls(params, foreach=foreach, capturable=capturable, generator=torch.Generator().manual_seed(2),
                  **{**options, "lr": lr})
        _run(opt, params, grads, switch_at=(2,))
        opt.eval()
        runs.append((params, opt))
    assert_same_optimizer_state(runs[0][0], runs[0][1], runs[1][0], runs[1][1])
    group, captured = runs[0][1].param_groups[0], runs[1][1].param_groups[0]
    assert isinstance(captured["k"], torch.Tensor) and captured["k"].dtype == torch.float64
    for key in ("k", "weight_sum", "lr_max", "scheduled_lr"):
        assert float(captured[key]) == group[key], key


def test_a_capturable_step_updates_its_tensors_in_place_and_reads_nothing_back():
    """What a CUDA graph needs: weights, states and counters keep their storage; no host sync in the
    step nor in the mode switches."""
    params = _mixed_params(3)
    opt = AdamWScheduleFree(params, lr=torch.tensor(1e-3, dtype=torch.float64), warmup_steps=2, weight_decay=0.1,
                            foreach=True, capturable=True)
    grads = _grads(3, params, 4)
    _run(opt, params, grads[:1])
    group = opt.param_groups[0]
    storage = ([(p.data_ptr(), opt.state[p]["z"].data_ptr(), opt.state[p]["exp_avg_sq"].data_ptr()) for p in params],
               [group[key].data_ptr() for key in ("k", "weight_sum", "lr_max", "scheduled_lr")])
    with HostSyncs() as syncs:
        _run(opt, params, grads[1:], switch_at=(1,))
        opt.eval()
    assert syncs.events == [], syncs.report()
    assert storage == ([(p.data_ptr(), opt.state[p]["z"].data_ptr(), opt.state[p]["exp_avg_sq"].data_ptr())
                        for p in params], [group[key].data_ptr() for key in ("k", "weight_sum", "lr_max", "scheduled_lr")])


def test_train_step_with_schedule_free_adamw_makes_no_host_sync():
    def in_train_mode(params):
        opt = AdamWScheduleFree(params, lr=torch.tensor(1e-3, dtype=torch.float64), warmup_steps=5, foreach=True,
                                capturable=True)
        opt.train()
        return opt

    assert_train_steps_read_nothing_back(in_train_mode)


def test_captured_step_records_a_capturable_schedule_free_adamw(fake_cuda_graphs):
    """Graph bookkeeping on a CPU (torch.cuda's graph API replaced by stand-ins): CapturedStep takes a
    capturable AdamWScheduleFree, warms up, captures once, replays with mode switches between the
    steps; the states and the counters a replay reads keep their storage."""
    from sdadapt.training.step_capture import capture_problems

    toy = toy_lora_step()
    params = toy.params
    opt = AdamWScheduleFree(params, lr=torch.tensor(1e-3, dtype=torch.float64), warmup_steps=3, foreach=True,
                            capturable=True)
    assert not any("capturable" in p for p in capture_problems(params, opt, StepConfig()))
    step = toy.captured(opt)
    state = TrainState(seed=0)
    opt.train()
    step(toy.batch, state=state)  # warm-up: the states are made
    group = opt.param_groups[0]
    storage = ([opt.state[p]["z"].data_ptr() for p in params], [group[key].data_ptr() for key in ("k", "weight_sum")])
    for _ in range(3):
        opt.eval()
        opt.train()
        step(toy.batch, state=state)
    assert step.graph_count == 1
    assert storage == ([opt.state[p]["z"].data_ptr() for p in params], [group[key].data_ptr() for key in ("k", "weight_sum")])


@pytest.mark.parametrize("saved_capturable", [False, True])
def test_state_dict_round_trip_restores_the_mode_and_resumes_bit_for_bit(saved_capturable):
    """3 steps, eval (as a save), load into a fresh optimiser of the other mode, train, 3 more ==
    6 steps with the same switch; the loaded optimiser is in eval mode, its states float32."""
    grads = _grads(4, _mixed_params(4), 6)

    def make(params, capturable, generator):
        lr = torch.tensor(_OPTIONS["lr"], dtype=torch.float64) if capturable else _OPTIONS["lr"]
        return AdamWScheduleFree(params, capturable=capturable, generator=generator, **{**_OPTIONS, "lr": lr})

    straight = _mixed_params(4)
    ref = make(straight, saved_capturable, torch.Generator().manual_seed(9))
    _run(ref, straight, grads, switch_at=(2,))
    first = _mixed_params(4)
    opt = make(first, saved_capturable, torch.Generator().manual_seed(9))
    _run(opt, first, grads[:3])
    opt.eval()
    saved = opt.state_dict()
    resumed = make(first, not saved_capturable, opt.generator)
    resumed.load_state_dict(saved)
    assert [g["train_mode"] for g in resumed.param_groups] == [False]
    assert all(resumed.state[p]["z"].dtype == torch.float32 for p in first)
    assert isinstance(resumed.param_groups[0]["k"], torch.Tensor) == (not saved_capturable)
    _run(resumed, first, grads[3:])
    assert all(torch.equal(p, q) for p, q in zip(straight, first))


# ------------------------------------------------------------------------------------------ fit
def _toy_fit(config, *, optimizer_factory=None, monkeypatch=None, **kwargs):
    """fit of a LoRA on the toy; ``optimizer_factory(groups, config)`` replaces make_optimizer."""
    if optimizer_factory is not None:
        monkeypatch.setattr(importlib.import_module("sdadapt.methods.fit"), "make_optimizer", optimizer_factory)
    images, captions = concept_data("cross", 4, seed=0)
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    losses = fit(system, adaptation, images, captions, config=config, **kwargs)
    return losses, adaptation


_FIT = {"steps": 5, "batch_size": 2, "learning_rate": 3e-3, "optimizer": "AdamWScheduleFree",
            "optimizer_args": {"warmup_steps": 2, "betas": (0.9, 0.99)}}
#: (3 steps: one past the 2 warm-up steps, where the LR and the averaging weights stop changing)
_FIT_SHORT = {**_FIT, "steps": 3}


@pytest.fixture(scope="module")
def eager_schedule_free_fit():
    """``_toy_fit(FitConfig(**_FIT_SHORT))`` run once for the module: (losses, adaptation) in eval mode.
    Read only (the tests that use it neither train nor change it)."""
    return _toy_fit(FitConfig(**_FIT_SHORT))


def test_fit_trains_and_leaves_the_eval_mode_weights_as_the_schedulefree_package_does(monkeypatch, tmp_path,
                                                                                         eager_schedule_free_fit):
    """fit with sdadapt's optimiser and with schedulefree's (same placement of train()/eval()): the
    weights fit leaves — and the LoRA file saved from them — are the package's eval-mode ones."""
    schedulefree = pytest.importorskip("schedulefree", reason="the schedulefree package (pip install schedulefree)")
    made = []

    def theirs(groups, config):
        made.append(schedulefree.AdamWScheduleFree(groups, lr=config.learning_rate, foreach=False,
                                                   warmup_steps=2, betas=(0.9, 0.99)))
        return made[-1]

    ours_losses, ours = eager_schedule_free_fit  # (_toy_fit(FitConfig(**_FIT_SHORT)))
    theirs_losses, reference = _toy_fit(FitConfig(**_FIT_SHORT), optimizer_factory=theirs, monkeypatch=monkeypatch)
    assert not made[0].param_groups[0]["train_mode"]  # fit returned in eval mode
    assert ours_losses == pytest.approx(theirs_losses, rel=1e-4)
    for a, b in zip(ours.params, reference.params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    from safetensors.torch import load_file

    saved = load_file(str(ours.save(tmp_path / "ours.safetensors")))
    their_file = load_file(str(reference.save(tmp_path / "theirs.safetensors")))
    assert saved.keys() == their_file.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], their_file[key], rtol=1e-4, atol=1e-6)
    made[0].train()  # the train-mode weights differ: the file holds x, not y
    assert any(not torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(ours.params, reference.params))


def test_fit_calls_eval_before_on_step_saves_and_train_before_the_next_step(monkeypatch, tmp_path):
    modes = []
    real = make_optimizer

    def recording(groups, config):
        opt = real(groups, config)
        original = opt.step

        def step(*args, **kwargs):
            modes.append(("step", opt.param_groups[0]["train_mode"]))
            return original(*args, **kwargs)

        opt.step = step  # (the optimiser's, not a model's forward)
        made.append(opt)
        return opt

    made: list = []

    def on_step(info):
        if info.step == 2:
            info.save_state(tmp_path / "state")
            modes.append(("saved", made[0].param_groups[0]["train_mode"]))
        if info.step == 3:
            with info.averaged():
                modes.append(("averaged", made[0].param_groups[0]["train_mode"]))
        if info.step == 4:
            modes.append(("logged", made[0].param_groups[0]["train_mode"]))

    _toy_fit(FitConfig(**_FIT), optimizer_factory=recording, monkeypatch=monkeypatch, on_step=on_step)
    assert modes == [("step", True), ("step", True), ("saved", False), ("step", True), ("averaged", False),
                     ("step", True), ("logged", True), ("step", True)]
    assert not made[0].param_groups[0]["train_mode"]


def test_fit_validates_with_the_eval_mode_weights_and_trains_on_in_train_mode(monkeypatch):
    """A validation pass (kohya: optimizer_eval_fn before it, optimizer_train_fn after) sees the
    averaged weights x; the next step is taken in train mode; on_step's ``use_weights()`` gives x."""
    validation_module = importlib.import_module("sdadapt.training.validation")
    made: list = []
    real = make_optimizer
    seen: list = []

    def recording(groups, config):
        made.append(real(groups, config))
        original = made[-1].step

        def step(*args, **kwargs):
            seen.append(("step", made[0].param_groups[0]["train_mode"]))
            return original(*args, **kwargs)

        made[-1].step = step  # (the optimiser's, not a model's forward)
        return made[-1]

    real_loss = validation_module.validation_loss

    def validation_loss(*args, **kwargs):
        seen.append(("validated", made[0].param_groups[0]["train_mode"]))
        return real_loss(*args, **kwargs)

    def on_step(info):
        if info.step == 1:
            info.use_weights()
            seen.append(("used", made[0].param_groups[0]["train_mode"]))

    monkeypatch.setattr(validation_module, "validation_loss", validation_loss)
    images, captions = concept_data("cross", 2, seed=3)
    _toy_fit(FitConfig(**{**_FIT, "steps": 3}, validate_every_n_steps=2), optimizer_factory=recording,
             monkeypatch=monkeypatch, validation=(images, captions), on_step=on_step)
    # (a pass after step 2 and after the last step)
    assert seen == [("step", True), ("used", False), ("step", True), ("validated", False), ("step", True),
                    ("validated", False)]


def test_a_stopped_text_encoder_keeps_the_averaged_weights_it_had_at_the_stop():
    """text_encoder_steps=2 of 3: the text encoder's eval-mode weights at the end are, bit for bit,
    those of a 2-step run (its y and z stop with its gradients; its group's counters move on but x
    is read from y and z alone), while the UNet trains on."""
    from sdadapt.methods.finetune import prepare_full
    from sdadapt.toy import load_toy

    runs = []
    for steps, stop in ((3, 2), (2, None)):
        system = load_toy()
        images, captions = concept_data("cross", 4, seed=0)
        fit(system, prepare_full(system, text_encoder=True), images, captions,
            config=FitConfig(steps=steps, batch_size=2, learning_rate=1e-3, seed=0, optimizer="AdamWScheduleFree",
                             text_encoder_steps=stop))
        runs.append(({k: v.clone() for k, v in system.text_encoder.state_dict().items()},
                     {k: v.clone() for k, v in system.unet.state_dict().items()}))
    (te_stopped, unet_longer), (te_short, unet_short) = runs
    assert te_stopped.keys() == te_short.keys() and all(torch.equal(te_stopped[k], te_short[k]) for k in te_stopped)
    assert any(not torch.equal(unet_longer[k], unet_short[k]) for k in unet_longer)


def test_fit_resumes_a_schedule_free_run_bit_for_bit(tmp_path):
    # (4 steps, the state saved after step 2, the warm-up's last: the 2 resumed steps run past it)
    straight, resumed = straight_and_resumed(FitConfig(**{**_FIT, "steps": 4}), tmp_path / "state")
    assert all(torch.equal(a, b) for a, b in zip(straight[1], resumed[1]))


def test_on_a_cpu_a_cuda_graph_schedule_free_run_is_the_eager_run_bit_for_bit(eager_schedule_free_fit):
    eager_losses, eager = eager_schedule_free_fit  # (toy_lora_run(FitConfig(**_FIT_SHORT)): the same run)
    runs = [(eager_losses, [p.detach().clone() for p in eager.params]),
            toy_lora_run(FitConfig(**_FIT_SHORT, cuda_graph=True))]
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("name, cls", [("AdamWScheduleFree", AdamWScheduleFree), ("adamw-schedulefree", AdamWScheduleFree),
                                       ("ADAMW_SCHEDULEFREE", AdamWScheduleFree), ("SGDScheduleFree", SGDScheduleFree),
                                       ("sgd-schedulefree", SGDScheduleFree)])
def test_fit_builds_schedule_free_optimizers_for_their_names(name, cls):
    params = [nn.Parameter(torch.zeros(3))]
    config = FitConfig(optimizer=name, weight_decay=0.1, optimizer_args={"r": 1.0})
    opt = make_optimizer([{"params": params, "lr": 1e-3}], config)
    assert isinstance(opt, cls) and is_schedule_free(opt) and config.schedule_free
    assert opt.param_groups[0]["weight_decay"] == 0.1 and opt.param_groups[0]["r"] == 1.0
    assert config.lr_at(0, 1e-3) == 1e-3 == config.lr_at(500, 1e-3)  # (no schedule, as kohya's dummy scheduler)
    assert "adamw-schedulefree" in _CAPTURABLE_OPTIMIZERS and "sgd-schedulefree" in _CAPTURABLE_OPTIMIZERS
    assert cuda_graph_clashes(fused_backward=False, mixed_precision="bf16", optimizer=name) == []


@pytest.mark.parametrize("options, words", [
    ({"ema_decay": 0.99}, "ema_decay"),
    ({"fused_backward": True}, "fused_backward"),
    ({"optimizer_args": {"warmup_steps": 1.5}}, "warmup_steps of adamw-schedulefree must be a whole number"),
    ({"optimizer_args": {"betas": (0.0, 0.9)}}, "betas"),
    ({"optimizer_args": {"foreach": True}}, "not an argument"),
    ({"optimizer": "SGDScheduleFree", "optimizer_args": {"momentum": 1.0}}, "momentum must be in"),
    ({"optimizer": "SGDScheduleFree", "optimizer_args": {"betas": (0.9, 0.99)}}, "not an argument"),
])
def test_what_schedule_free_adamw_cannot_train_with_is_refused(options, words):
    with pytest.raises(ValueError, match=words):
        FitConfig(**{"optimizer": "AdamWScheduleFree", **options})


# -------------------------------------------------------------------------------- train and kohya
@pytest.mark.parametrize("kohya_name, args, cls, shown", [
    ("AdamWScheduleFree", ["warmup_steps=1", "betas=0.9,0.99"], AdamWScheduleFree,
     "schedulefree.adamw_schedulefree.AdamWScheduleFree(warmup_steps=1,betas=(0.9, 0.99))"),
    ("SGDScheduleFree", ["warmup_steps=1", "momentum=0.8"], SGDScheduleFree,
     "schedulefree.sgd_schedulefree.SGDScheduleFree(warmup_steps=1,momentum=0.8)"),
])
def test_a_kohya_config_with_a_schedule_free_optimizer_trains_two_steps_and_saves_the_eval_weights(
        three_shapes, tmp_path, capsys, monkeypatch, kohya_name, args, cls, shown):
    from safetensors.torch import load_file
    from train_inputs import train_toy_kohya

    made = spy_on_built_optimizers(monkeypatch)
    meta = train_toy_kohya(tmp_path, three_shapes, {
        "output_name": "sf", "learning_rate": 1e-2, "lr_scheduler": "cosine", "lr_warmup_steps": 1,
        "save_precision": "float", "optimizer_type": kohya_name, "optimizer_args": args})
    out = capsys.readouterr()
    assert f"{kohya_name} is schedule-free" in out.out + out.err and "--lr-warmup-steps 1: not used" in out.out + out.err
    path = str(tmp_path / "out" / "sf.safetensors")
    assert meta["ss_optimizer"] == shown
    # (ss_lr_warmup_steps and ss_lr_scheduler: the values given, as kohya's train_network.py:1018-1019 writes
    # args.lr_warmup_steps and args.lr_scheduler, though its dummy scheduler uses neither)
    assert meta["ss_steps"] == "2" and meta["ss_lr_scheduler"] == "cosine" and meta["ss_lr_warmup_steps"] == "1"
    opt = made[0]
    assert isinstance(opt, cls) and not opt.param_groups[0]["train_mode"]
    eval_weights = sorted(p.detach().flatten().tolist() for g in opt.param_groups for p in g["params"])
    saved = load_file(path)
    saved_weights = sorted(t.flatten().tolist() for k, t in saved.items() if not k.endswith(".alpha"))
    assert saved_weights == eval_weights  # the file holds the eval-mode weights x
    opt.train()
    assert sorted(p.detach().flatten().tolist() for g in opt.param_groups for p in g["params"]) != saved_weights


def test_the_train_command_takes_schedule_free_adamw_and_resumes_it_bit_for_bit(three_shapes, tmp_path):
    from train_inputs import lora_train_args, resumed_train_is_the_straight_one

    args = lora_train_args(three_shapes, "--optimizer", "AdamWScheduleFree", "--optimizer-args", "warmup_steps=1",
                           "--lr", "1e-2", "--steps", "2", "-q")
    assert resumed_train_is_the_straight_one(tmp_path, args)


def test_train_refuses_an_ema_with_a_schedule_free_optimizer():
    from sdadapt.jobs import TrainOptions

    with pytest.raises(ValueError, match="schedule-free, so it cannot train with --ema-decay"):
        TrainOptions(images="imgs", optimizer="AdamWScheduleFree", ema_decay=0.999)


def test_train_samples_from_the_eval_mode_weights_and_before_any_step_from_the_start(three_shapes, tmp_path, monkeypatch):
    """--sample-every-n-steps without a save at that step: each sample is drawn in eval mode (the
    averaged weights x, as kohya's optimizer_eval_fn before sample_images); --sample-at-first before
    the optimiser exists (x = y = z: nothing to switch)."""
    from train_inputs import lora_train_args

    from sdadapt import sampling
    from sdadapt.cli import main

    made = spy_on_built_optimizers(monkeypatch)
    modes: list = []
    real_generate = sampling.generate

    def generate(*args, **kwargs):
        modes.append(None if not made else [group["train_mode"] for group in made[0].param_groups])
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate", generate)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\n")
    args = lora_train_args(three_shapes, "--optimizer", "AdamWScheduleFree", "--lr", "1e-2", "--steps", "3",
                           "--sample-prompts", prompts, "--sample-every-n-steps", "1", "--sample-at-first",
                           "--sample-steps", "2", "-q", "-o", tmp_path / "a.safetensors")
    assert main(args) == 0
    assert modes[0] is None and len(modes) == 4
    assert all(mode is not None and not any(mode) for mode in modes[1:]), modes


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_with_cuda_graph_and_schedule_free_adamw_matches_the_eager_run(monkeypatch):
    """On a GPU: a captured run (3 eager steps, then replays) trains as the eager run, with mode switches."""
    assert_cuda_graph_run_trains_as_eager(FitConfig(**{**_FIT, "steps": 8}, step=StepConfig(mixed_precision="bf16")),
                                          monkeypatch, on_step=lambda info: info.use_weights() if info.step % 3 == 0 else None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_capturable_schedule_free_adamw_has_no_host_sync_and_matches_the_float_lr_step():
    runs = []
    for capturable in (False, True):
        params = [nn.Parameter(p.detach().cuda()) for p in _mixed_params(2)]
        lr = torch.tensor(1e-2, dtype=torch.float64, device="cuda") if capturable else 1e-2
        opt = AdamWScheduleFree(params, lr=lr, warmup_steps=2, weight_decay=0.1, foreach=True, capturable=capturable,
                                generator=torch.Generator("cuda").manual_seed(0))
        grads = [[g.cuda() for g in step] for step in _grads(2, params, 5)]
        _run(opt, params, grads[:1])
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if capturable else 0)
        try:
            _run(opt, params, grads[1:], switch_at=(1,))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        opt.eval()
        runs.append([p.detach().float().cpu() for p in params])
    for a, b in zip(*runs):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
