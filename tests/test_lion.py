"""sdadapt's Lion (sdadapt.training.lion): a float64 reference written here, lion-pytorch bit for bit,
the multi-tensor and capturable paths equal to the per-parameter one on a CPU, bf16 weights and
momentum rounded stochastically without bias, resume, no host sync; and Lion wired through fit,
``train --optimizer`` and kohya's ``optimizer_type`` / ``use_lion_optimizer``."""

from __future__ import annotations

import pytest
import torch
from aten_ops import AtenOps
from fit_runs import (
    assert_cuda_graph_run_trains_as_eager,
    straight_and_resumed,
    toy_lora_run,
    usual_and_fused_full_finetune,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizer_inputs import random_grads as _grads
from optimizer_inputs import random_params as _params
from optimizer_states import assert_same_optimizer_state
from torch import nn
from toy_steps import assert_train_steps_read_nothing_back, toy_lora_step

from sdadapt.methods import FitConfig
from sdadapt.methods.fit import cuda_graph_clashes, make_optimizer
from sdadapt.methods.optimizers import _CAPTURABLE_OPTIMIZERS
from sdadapt.training.host_syncs import HostSyncs
from sdadapt.training.lion import Lion
from sdadapt.training.optim import set_lr
from sdadapt.training.step import StepConfig, TrainState
from sdadapt.training.step_capture import capture_problems


def _reference_lion(w, grads, *, lrs, betas, weight_decay):
    """Lion in float64, written from the paper's Algorithm 2 with lion-pytorch's LR-scaled decay:
    returns the weight and momentum after one step per gradient (lrs[i] at step i)."""
    w, m = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    beta1, beta2 = betas
    for g, lr in zip(grads, lrs):
        g = g.double()
        c = beta1 * m + (1 - beta1) * g
        w = w * (1 - lr * weight_decay) - lr * torch.sign(c)
        m = beta2 * m + (1 - beta2) * g
    return w, m


def _run(opt, params, grads, lrs=None) -> None:
    for i, step_grads in enumerate(grads):
        if lrs is not None:
            set_lr(opt, lrs[i])
        for p, gr in zip(params, step_grads):
            p.grad = gr.clone()
        opt.step()


_SHAPES = st.lists(st.tuples(st.integers(1, 5), st.integers(1, 7)), min_size=1, max_size=3)


@settings(max_examples=25, deadline=None)
@given(shapes=_SHAPES, steps=st.integers(1, 6), beta1=st.sampled_from([0.0, 0.9, 0.95]),
       beta2=st.sampled_from([0.9, 0.99, 1.0]), weight_decay=st.sampled_from([0.0, 0.1, 1.0]),
       lr=st.sampled_from([1e-4, 3e-3, 0.05]), foreach=st.booleans(), seed=st.integers(0, 2**16))
def test_lion_matches_a_float64_reference(shapes, steps, beta1, beta2, weight_decay, lr, foreach, seed):
    params = _params(seed, shapes)
    start = [p.detach().clone() for p in params]
    grads = _grads(seed, params, steps)
    lrs = [lr * (1 + i) / steps for i in range(steps)]  # a schedule: lr changes per step
    opt = Lion(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, foreach=foreach)
    _run(opt, params, grads, lrs)
    for i, (p, w0) in enumerate(zip(params, start)):
        w, m = _reference_lion(w0, [g[i] for g in grads], lrs=lrs, betas=(beta1, beta2), weight_decay=weight_decay)
        torch.testing.assert_close(p.detach().double(), w, rtol=0, atol=1e-6 * (1 + w.abs().max().item()))
        torch.testing.assert_close(opt.state[p]["exp_avg"].double(), m, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("foreach", [False, True])
def test_lion_equals_lion_pytorch_bit_for_bit(foreach):
    lion_pytorch = pytest.importorskip("lion_pytorch", reason="lion-pytorch is not installed (pip install sdadapt[interop])")
    shapes = [(8, 3, 3, 3), (16,), (5, 9)]
    ours, theirs = _params(0, shapes), _params(0, shapes)
    groups = lambda ps: [{"params": ps[:2], "lr": 3e-4}, {"params": ps[2:], "lr": 1e-3, "weight_decay": 0.5}]
    a = Lion(groups(ours), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1, foreach=foreach)
    b = lion_pytorch.Lion(groups(theirs), lr=1e-4, betas=(0.9, 0.99), weight_decay=0.1)
    grads = _grads(0, ours, 20)
    _run(a, ours, grads)
    _run(b, theirs, grads)
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q) and torch.equal(a.state[p]["exp_avg"], b.state[q]["exp_avg"])


def _mixed_params(seed: int) -> list[nn.Parameter]:
    """bf16 and fp32 weights, one channels_last conv, a 1-D bias."""
    ps = _params(seed, [(6, 4, 3, 3), (7,), (5, 9)], torch.bfloat16) + _params(seed + 1, [(4, 3, 3, 3), (3,)])
    ps[3].data = ps[3].data.to(memory_format=torch.channels_last)
    return ps


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_foreach_is_the_per_parameter_step_bit_for_bit(state_dtype):
    runs = []
    for foreach in (False, True):
        params = _mixed_params(1)
        opt = Lion([{"params": params[:3]}, {"params": params[3:], "lr": 1e-3}], lr=2e-3, weight_decay=0.1,
                   state_dtype=state_dtype, foreach=foreach, generator=torch.Generator().manual_seed(5))
        _run(opt, params, _grads(1, params, 5))
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    assert_same_optimizer_state(pa, oa, pb, ob)


@pytest.mark.parametrize("state_dtype,foreach", [(torch.float32, False), (torch.bfloat16, True)])
def test_capturable_with_a_tensor_lr_is_the_python_scalar_step_bit_for_bit(state_dtype, foreach):
    runs = []
    lrs = [1e-3, 7e-4, 3.3e-4, 1e-4]
    for capturable in (False, True):
        params = _mixed_params(2)
        lr = torch.tensor(lrs[0]) if capturable else lrs[0]
        opt = Lion(params, lr=lr, weight_decay=0.3, state_dtype=state_dtype, foreach=foreach, capturable=capturable,
                   generator=torch.Generator().manual_seed(7))
        _run(opt, params, _grads(2, params, 4), lrs)
        if capturable:
            assert opt.param_groups[0]["lr"] is lr  # filled in place by set_lr, as a captured graph reads it
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    assert_same_optimizer_state(pa, oa, pb, ob)


# lrs where 1 − lr·λ (λ = 0.1) rounds to another float32 than 1 − float32(lr)·λ does
_DECAY_ROUNDING_LRS = [1.5795231397522488e-05, 0.00018209218258280818, 0.0005999207595829855, 0.0010284781296932691]


def test_make_optimizer_builds_a_capturable_lion_whose_decay_rounds_as_the_float_lr(monkeypatch):
    """fit's capturable Lion (tensor lrs the schedule fills): float64 lrs, so the decay factor
    1 − lr·λ computed on the device rounds as the eager step's Python float does, at lrs where a
    float32 lr would move it by an ulp."""
    import importlib

    monkeypatch.setattr(importlib.import_module("sdadapt.methods.optimizers"), "_graph_capturable", lambda groups: True)
    runs = []
    for cuda_graph in (False, True):
        params = _params(3, [(64, 33), (17,)])
        config = FitConfig(optimizer="lion", learning_rate=1e-3, cuda_graph=cuda_graph,
                           optimizer_args=(("weight_decay", 0.1),))
        opt = make_optimizer([{"params": params, "lr": 1e-3}], config)
        assert opt.param_groups[0]["capturable"] is cuda_graph
        if cuda_graph:
            assert opt.param_groups[0]["lr"].dtype == torch.float64
        _run(opt, params, _grads(3, params, len(_DECAY_ROUNDING_LRS)), _DECAY_ROUNDING_LRS)
        runs.append((params, opt))
    (pa, oa), (pb, ob) = runs
    assert_same_optimizer_state(pa, oa, pb, ob)


@pytest.mark.parametrize("state_dtype, capturable", [(torch.float32, False), (torch.float32, True),
                                                    (torch.bfloat16, False)])
def test_the_multi_tensor_step_dispatches_as_many_ops_for_3_parameters_as_for_30(state_dtype, capturable):
    counts = []
    for n in (3, 30):
        params = _params(n, [(4, 5)] * n)
        opt = Lion(params, lr=torch.tensor(1e-3) if capturable else 1e-3, weight_decay=0.1, state_dtype=state_dtype,
                   foreach=True, capturable=capturable)
        _run(opt, params, _grads(n, params, 1))
        for p, g in zip(params, _grads(n + 1, params, 1)[0]):
            p.grad = g
        with AtenOps() as count:
            opt.step()
        counts.append(count.ops)
    assert counts[0] == counts[1] <= 25, counts


def test_a_step_updates_its_tensors_in_place_and_reads_nothing_back():
    """What a CUDA graph needs: the weights and momenta keep their storage, and no host sync."""
    params = _mixed_params(3)
    opt = Lion(params, lr=torch.tensor(1e-3), weight_decay=0.1, state_dtype=torch.bfloat16, foreach=True,
               capturable=True)
    grads = _grads(3, params, 3)
    _run(opt, params, grads[:1])
    storage = [(p.data_ptr(), opt.state[p]["exp_avg"].data_ptr()) for p in params]
    with HostSyncs() as syncs:
        _run(opt, params, grads[1:])
    assert syncs.events == []
    assert storage == [(p.data_ptr(), opt.state[p]["exp_avg"].data_ptr()) for p in params]


def test_train_step_with_lion_makes_no_host_sync():
    assert_train_steps_read_nothing_back(
        lambda params: Lion(params, lr=torch.tensor(1e-3), weight_decay=0.1, foreach=True, capturable=True))


# ------------------------------------------------------------------------- stochastic rounding
def test_bf16_weights_move_by_steps_below_half_an_ulp_on_average():
    """1.0 in bf16 has neighbours 1 − 2⁻⁸ and 1 + 2⁻⁷: a Lion step of 1e-4 (1/39 of the lower
    spacing) is lost by round-to-nearest and kept, on average, by stochastic rounding. n = 2¹⁷
    weights, 10 steps: each weight's rounding error has std ≤ 2⁻⁸/2 per step, so the mean's
    std is ≤ √10 · 2⁻⁹ / √n ≈ 1.7e-5; the bound is 6 of those."""
    n, steps, lr = 1 << 17, 10, 1e-4
    for stochastic in (False, True):
        w = nn.Parameter(torch.ones(n, dtype=torch.bfloat16))
        opt = Lion([w], lr=lr, stochastic_rounding=stochastic, generator=torch.Generator().manual_seed(0))
        for _ in range(steps):
            w.grad = torch.ones(n, dtype=torch.bfloat16)  # sign(c) = +1: w ← w − lr
            opt.step()
        mean = w.double().mean().item()
        if stochastic:
            assert abs(mean - (1 - steps * lr)) < 6 * (steps**0.5) * 2**-9 / n**0.5
        else:
            assert mean == 1.0


def test_a_bf16_momentum_follows_the_float_average_without_bias():
    """m ← β₂ m + (1 − β₂) g with g = 1 from m = 0: E[m_t] = 1 − β₂ᵗ. With β₂ = 0.999 the increment
    (1 − m)/1000 falls below half a bf16 ulp once m > 0.5 (ulp 2⁻⁸ above 0.5), so round-to-nearest
    freezes there (checked below); stochastic rounding tracks the average. Per element the accumulated
    rounding noise has variance ≤ Σₖ β₂^{2k} (2⁻⁸)²/4 ≈ 1.9e-3 (std 0.044), so the mean of n = 4096
    has std ≤ 6.9e-4; the bound is 6 of those."""
    n, steps, beta2 = 4096, 1000, 0.999
    w = nn.Parameter(torch.zeros(n))
    opt = Lion([w], lr=0.0, betas=(0.9, beta2), state_dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    for _ in range(steps):
        w.grad = torch.ones(n)
        opt.step()
    m = opt.state[w]["exp_avg"]
    assert m.dtype == torch.bfloat16
    assert abs(m.double().mean().item() - (1 - beta2**steps)) < 6 * 6.9e-4
    nearest = torch.zeros((), dtype=torch.bfloat16)
    for _ in range(steps):
        nearest = (beta2 * nearest.float() + (1 - beta2)).bfloat16()
    assert nearest.item() < 1 - beta2**steps - 0.05  # what round-to-nearest would have kept


# ------------------------------------------------------------------------------- state / resume
@pytest.mark.parametrize("saved_capturable", [False, True])
def test_state_dict_round_trip_resumes_bit_for_bit_in_either_mode(saved_capturable):
    """3 steps, save, load into a fresh optimiser (the other mode too), 3 more == 6 straight; a bf16
    momentum stays bf16 on float32 weights and float32 on bf16 ones (torch would cast to the weight)."""
    grads = _grads(4, _mixed_params(4), 6)

    def make(params, capturable, state_dtype, generator):  # (the bf16 weights' rounding draws continue from it)
        return Lion(params, lr=torch.tensor(1e-3) if capturable else 1e-3, weight_decay=0.1, state_dtype=state_dtype,
                    capturable=capturable, generator=generator)

    for state_dtype in (torch.float32, torch.bfloat16):
        straight = _mixed_params(4)
        ref = make(straight, saved_capturable, state_dtype, torch.Generator().manual_seed(9))
        _run(ref, straight, grads)
        first = _mixed_params(4)
        opt = make(first, saved_capturable, state_dtype, torch.Generator().manual_seed(9))
        _run(opt, first, grads[:3])
        saved = opt.state_dict()
        resumed = make(first, not saved_capturable, state_dtype, opt.generator)
        resumed.load_state_dict(saved)
        assert all(resumed.state[p]["exp_avg"].dtype == state_dtype for p in first)
        assert isinstance(resumed.param_groups[0]["lr"], torch.Tensor) == (not saved_capturable)
        _run(resumed, first, grads[3:])
        for p, q in zip(straight, first):
            assert torch.equal(p, q)


def test_fit_resumes_a_lion_run_bit_for_bit(tmp_path):
    config = FitConfig(steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=1, schedule="cosine",
                       optimizer="Lion", optimizer_args={"weight_decay": 0.1, "betas": (0.95, 0.98)})
    straight, resumed = straight_and_resumed(config, tmp_path / "state")
    assert all(torch.equal(a, b) for a, b in zip(straight[1], resumed[1]))


def test_a_fused_backward_full_finetune_with_lion_is_the_usual_loop_bit_for_bit():
    """One Lion per block stepped inside backward (--fused-backward-pass) == one Lion after backward:
    Lion is per-parameter, and float32 momenta draw no random numbers."""
    usual, fused = usual_and_fused_full_finetune(FitConfig(
        steps=3, batch_size=2, learning_rate=1e-3, optimizer="lion", optimizer_args={"weight_decay": 0.1},
        step=StepConfig(max_grad_norm=None)))
    assert all(torch.equal(a, b) for a, b in zip(usual, fused))


# ------------------------------------------------------------------------------------ wiring
@pytest.mark.parametrize("name, state_dtype", [("lion", torch.float32), ("LION", torch.float32),
                                               ("Lion8bit", torch.bfloat16), ("PagedLion8bit", torch.bfloat16),
                                               ("lion-bf16", torch.bfloat16)])
def test_fit_builds_lion_for_its_names(name, state_dtype):
    p = nn.Parameter(torch.zeros(4096))  # (bitsandbytes' min_8bit_size: a smaller tensor keeps a float32 momentum)
    config = FitConfig(optimizer=name, learning_rate=2e-4, optimizer_args=(("betas", (0.8, 0.9)),))
    opt = make_optimizer([{"params": [p]}], config)
    assert isinstance(opt, Lion) and opt.param_groups[0]["betas"] == (0.8, 0.9)
    assert opt.param_groups[0]["weight_decay"] == 0.0 and opt.param_groups[0]["lr"] == 2e-4  # lion-pytorch's decay
    p.grad = torch.ones(4096)
    opt.step()
    assert opt.state[p]["exp_avg"].dtype == state_dtype


@pytest.mark.parametrize("args, words", [
    ({"betas": (1.5, 0.9)}, "betas must be two numbers in"), ({"eps": 1e-8}, "eps is not an argument of the lion"),
    ({"weight_decay": -1.0}, "weight_decay must be >= 0"), ({"decoupled_weight_decay": True}, "it takes betas"),
])
def test_lion_arguments_are_checked_when_the_config_is_made(args, words):
    with pytest.raises(ValueError, match=words):
        FitConfig(optimizer="lion", optimizer_args=args)


def test_lion_can_be_captured_and_sgd_cannot():
    assert "lion" in _CAPTURABLE_OPTIMIZERS and "lion-bf16" in _CAPTURABLE_OPTIMIZERS
    assert cuda_graph_clashes(fused_backward=False, mixed_precision="bf16", optimizer="Lion8bit") == []
    FitConfig(optimizer="lion", cuda_graph=True)
    params = [nn.Parameter(torch.zeros(4))]
    assert not any("capturable" in p for p in capture_problems(params, Lion(params, capturable=True), StepConfig()))
    assert any("not capturable" in p for p in capture_problems(params, Lion(params), StepConfig()))


def test_on_a_cpu_a_cuda_graph_lion_run_is_the_eager_run_bit_for_bit():
    runs = [toy_lora_run(FitConfig(steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=1, optimizer="lion-bf16",
                                   cuda_graph=cuda_graph)) for cuda_graph in (False, True)]
    assert runs[0][0] == runs[1][0] and all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


def test_captured_step_records_a_capturable_lion(fake_cuda_graphs):
    """Graph bookkeeping on a CPU (torch.cuda's graph API replaced by stand-ins): CapturedStep takes a
    capturable Lion, warms up, captures once, replays; the LR schedule reaches the graph through the
    tensor lr (set_lr fills it in place), and the momenta a replay writes keep their storage."""
    toy = toy_lora_step()
    params = toy.params
    lr = torch.tensor(1e-3)
    opt = Lion(params, lr=lr, weight_decay=0.1, state_dtype=torch.bfloat16, foreach=True, capturable=True)
    step = toy.captured(opt)
    state = TrainState(seed=0)
    step(toy.batch, state=state)  # warm-up: the momenta are made
    momenta = [opt.state[p]["exp_avg"].data_ptr() for p in params]
    for i in range(3):
        step.set_lr(1e-3 / (i + 2))
        step(toy.batch, state=state)
    assert step.graph_count == 1 and opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(1e-3 / 4)
    assert momenta == [opt.state[p]["exp_avg"].data_ptr() for p in params]


@pytest.mark.parametrize("table, shown", [
    ({"optimizer_type": "Lion", "optimizer_args": ["weight_decay=0.1", "betas=0.9,0.98"]},
     "lion_pytorch.lion_pytorch.Lion(weight_decay=0.1,betas=(0.9, 0.98))"),
    ({"use_lion_optimizer": True}, "lion_pytorch.lion_pytorch.Lion"),
])
def test_a_kohya_config_with_lion_trains_two_steps_on_the_toy(three_shapes, tmp_path, capsys, table, shown):
    from train_inputs import train_toy_kohya

    meta = train_toy_kohya(tmp_path, three_shapes, table)
    assert meta["ss_optimizer"] == shown and meta["ss_steps"] == "2"


@pytest.mark.parametrize("table, words", [
    ({"use_lion_optimizer": True, "optimizer_type": "AdamW"}, "use_lion_optimizer with optimizer_type = 'AdamW'"),
    ({"use_lion_optimizer": True, "use_8bit_adam": True}, "use_lion_optimizer with use_8bit_adam"),
])
def test_kohyas_lion_flag_beside_another_optimizer_is_refused(tmp_path, table, words):
    from train_inputs import read_kohya_table

    config = tmp_path / "c.toml"
    with pytest.raises(ValueError, match=words):
        read_kohya_table(config, table)
    assert read_kohya_table(config, {"use_lion_optimizer": True, "optimizer_type": "lion"})[0]["optimizer"] == "Lion"


def test_the_train_command_takes_lion_and_resumes_it_bit_for_bit(three_shapes, tmp_path):
    from train_inputs import lora_train_args, resumed_train_is_the_straight_one

    args = lora_train_args(three_shapes, "--optimizer", "lion-bf16", "--optimizer-args", "weight_decay=0.5", "--lr",
                           "1e-3", "--steps", "2", "-q")
    assert resumed_train_is_the_straight_one(tmp_path, args)


# ------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optimizer", ["lion", "lion-bf16"])
def test_cuda_fit_with_cuda_graph_and_lion_matches_the_eager_run(optimizer, monkeypatch):
    """On a GPU: a captured Lion run (3 eager steps, then replays) trains as the eager run."""
    assert_cuda_graph_run_trains_as_eager(FitConfig(steps=8, batch_size=2, learning_rate=1e-3, warmup_steps=2,
                                                    schedule="cosine", optimizer=optimizer,
                                                    step=StepConfig(mixed_precision="bf16")), monkeypatch)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_capturable_lion_has_no_host_sync_and_matches_the_float_lr_step():
    runs = []
    for capturable in (False, True):
        torch.manual_seed(0)  # (the bf16 weights' stochastic rounding draws from the global generator: the same draws)
        params = [nn.Parameter(p.detach().cuda()) for p in _mixed_params(5)]
        lr = torch.tensor(1e-3, device="cuda") if capturable else 1e-3
        opt = Lion(params, lr=lr, weight_decay=0.1, foreach=True, capturable=capturable)
        grads = [[g.cuda() for g in gs] for gs in _grads(5, params, 4)]
        _run(opt, params, grads[:1])
        with HostSyncs() as syncs:
            _run(opt, params, grads[1:])
        if capturable:
            assert syncs.events == []
        runs.append(params)
    for p, q in zip(*runs):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
