"""``Adafactor(capturable=True)``: the step CUDA graphs can record (step counts, β₂ₜ and the step size
as device tensors, a tensor ``lr``), and ``fit(cuda_graph=True)`` / ``train --cuda-graph`` with it;
``Adafactor(foreach=True)``: the same step in multi-tensor ops.

On a CPU the capturable and the multi-tensor steps must be the per-parameter eager step bit for bit
(weights, every state tensor, the stochastic-rounding stream), which the eager step's own tests
(tests/test_optim.py) tie to a float64 reference and to transformers' Adafactor. The CUDA test (skipped here; ``benchmarks/gpu_check.sh`` runs it) compares
captured with eager ``fit`` runs on the GPU.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib

import pytest
import torch
from aten_ops import AtenOps
from fit_runs import (
    assert_cuda_graph_run_trains_as_eager,
    spy_on_built_optimizers,
    spy_on_captured_steps,
)
from fit_runs import toy_lora_run as _fit
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizer_states import assert_same_optimizer_state

from sdadapt.methods import METHODS, FitConfig, cuda_graph_clashes, fit
from sdadapt.methods.fit import make_optimizer
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.host_syncs import HostSyncs
from sdadapt.training.optim import Adafactor, set_lr
from sdadapt.training.step import StepConfig

CONFIGS = {  # every per-step scalar the capturable step computes on the device
    "lr": dict(lr=1e-2),
    "lr beta1 decay": dict(lr=1e-2, beta1=0.9, weight_decay=0.05),
    "lr scaled clip": dict(lr=3e-2, scale_parameter=True, weight_decay=0.1, clip_threshold=0.3, decay_rate=-0.5),
    "relative": dict(relative_step=True),
    "relative scaled decay": dict(relative_step=True, scale_parameter=True, weight_decay=0.01),
    "relative warmup beta1": dict(relative_step=True, warmup_init=True, beta1=0.5, scale_parameter=True),
    "last two dims": dict(lr=1e-2, factor_conv_as_matrix=False, beta1=0.9),
}


def _grads(shapes, steps: int, dtype: torch.dtype, seed: int) -> list[list[torch.Tensor]]:
    """Per step, one gradient per shape, with rows of very different scale (factoring and clipping matter)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        out.append([(torch.randn(s, generator=gen) * torch.logspace(-2, 1, s[0])[(...,) + (None,) * (len(s) - 1)])
                    .to(dtype) for s in shapes])
    return out


def _train(shapes, config: dict, *, capturable: bool, foreach: bool = False, dtype=torch.float32, steps: int = 10,
           lrs=None, seed: int = 0, channels_last: bool = False, skip=None):
    """``steps`` Adafactor steps from weights drawn with ``seed``; ``lrs``: the LR set before each step
    (through :func:`set_lr`: a float in place of a float, filled into a tensor lr); ``channels_last``:
    4-D weights and gradients in that layout; ``skip``: ``(step, parameter index)`` pairs without a
    gradient (their counts fall behind). Returns (params, optimiser)."""
    gen = torch.Generator().manual_seed(seed)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    params = [torch.randn(s, generator=gen).to(dtype).contiguous(memory_format=layout if len(s) == 4 else
                                                                  torch.contiguous_format).requires_grad_()
              for s in shapes]
    config = dict(config)
    lr = config.pop("lr", None)
    if capturable and lr is not None:
        lr = torch.tensor(lr, dtype=torch.float64)
    opt = Adafactor(params, lr=lr, capturable=capturable, foreach=foreach,
                    generator=torch.Generator().manual_seed(seed + 1), **config)
    for i, grads in enumerate(_grads(shapes, steps, dtype, seed + 2)):
        if lrs is not None:
            set_lr(opt, lrs[i])
        for j, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if skip and (i, j) in skip else g.contiguous(memory_format=layout if g.dim() == 4 else
                                                                       torch.contiguous_format)
        opt.step()
    return params, opt


_SHAPES = [(12, 20), (6, 4, 3, 3), (9,), (5, 1, 4), (1,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_capturable_steps_are_the_eager_steps_bit_for_bit(name, dtype):
    """Factored (2-D, conv, batched last-two-dims) and unfactored (1-D) parameters, 10 steps; bf16
    weights stochastically rounded from a fixed generator: the same draws in both modes."""
    eager = _train(_SHAPES, CONFIGS[name], capturable=False, dtype=dtype)
    captured = _train(_SHAPES, CONFIGS[name], capturable=True, dtype=dtype)
    assert_same_optimizer_state(eager[0], eager[1], captured[0], captured[1], step_as_number=True)
    step = captured[1].state[captured[0][0]]["step"]
    assert isinstance(step, torch.Tensor) and step.dtype == torch.float32 and step.dim() == 0 and float(step) == 10
    assert eager[1].state[eager[0][0]]["step"] == 10


@settings(max_examples=12, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 6), min_size=1, max_size=4).map(tuple), min_size=1, max_size=4),
       name=st.sampled_from(sorted(CONFIGS)), bf16=st.booleans(), foreach=st.booleans())
def test_capturable_equals_eager_for_any_shapes(shapes, name, bf16, foreach):
    dtype = torch.bfloat16 if bf16 else torch.float32
    eager = _train(shapes, CONFIGS[name], capturable=False, dtype=dtype, steps=4)
    captured = _train(shapes, CONFIGS[name], capturable=True, foreach=foreach, dtype=dtype, steps=4)
    assert_same_optimizer_state(eager[0], eager[1], captured[0], captured[1], step_as_number=True)


# ------------------------------------------------------------------------------------ foreach
@pytest.mark.parametrize("capturable", [False, True], ids=["eager", "capturable"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_multi_tensor_step_is_the_per_parameter_step_bit_for_bit(name, dtype, capturable):
    """channels_last convs, and two parameters that skip a step each (so the group's step counts, and
    with them β₂ₜ and ρ, differ between its parameters)."""
    skip = {(2, 1), (5, 2)}
    one = _train(_SHAPES, CONFIGS[name], capturable=capturable, dtype=dtype, channels_last=True, skip=skip)
    many = _train(_SHAPES, CONFIGS[name], capturable=capturable, foreach=True, dtype=dtype, channels_last=True, skip=skip)
    assert_same_optimizer_state(one[0], one[1], many[0], many[1])
    assert one[1].state[one[0][1]]["step"] == 9 or float(one[1].state[one[0][1]]["step"]) == 9


def test_the_multi_tensor_step_decays_by_each_parameters_own_warm_up_step_size():
    """Warm-up step sizes ``1e-6·t`` as Python floats (not capturable, no RMS scale) that differ within
    the group once a parameter skips a step: the weight decay ``λρ`` is each parameter's own."""
    config = {"relative_step": True, "warmup_init": True, "weight_decay": 0.5}
    skip = {(1, 0), (2, 0), (4, 3)}
    one = _train(_SHAPES, config, capturable=False, skip=skip)
    many = _train(_SHAPES, config, capturable=False, foreach=True, skip=skip)
    assert_same_optimizer_state(one[0], one[1], many[0], many[1])
    assert [one[1].state[p]["step"] for p in one[0]] == [8, 10, 10, 9, 10]


def test_the_multi_tensor_step_splits_into_chunks_as_adamws(monkeypatch):
    """Chunks of at most _FOREACH_CHUNK_ELEMENTS (one parameter larger than a chunk alone): the same
    bits as one chunk, and bf16 weights keep their rounding draws across chunks."""
    from sdadapt.training import optim

    whole = _train(_SHAPES, CONFIGS["lr beta1 decay"], capturable=True, foreach=True, dtype=torch.bfloat16)
    monkeypatch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", 100)
    chunked = _train(_SHAPES, CONFIGS["lr beta1 decay"], capturable=True, foreach=True, dtype=torch.bfloat16)
    assert_same_optimizer_state(whole[0], whole[1], chunked[0], chunked[1])


def _ops_per_step(params: int, *, foreach: bool, capturable: bool) -> int:
    """Non-view aten ops of one step (after the first) over ``params`` (12, 20) matrices and as many
    (9,) vectors with kohya's relative step and parameter scale, bf16 weights."""
    shapes = [(12, 20)] * params + [(9,)] * params
    ps = [torch.zeros(s, dtype=torch.bfloat16, requires_grad=True) for s in shapes]
    for p in ps:
        p.grad = torch.ones_like(p)
    opt = Adafactor(ps, relative_step=True, scale_parameter=True, foreach=foreach, capturable=capturable)
    opt.step()
    with AtenOps() as ops:
        opt.step()
    return ops.ops


@pytest.mark.parametrize("capturable", [False, True], ids=["eager", "capturable"])
def test_the_multi_tensor_step_dispatches_a_fixed_number_of_ops_plus_three_means_per_matrix(capturable):
    """The per-parameter step costs ~30 ops per parameter; the multi-tensor one a fixed number per
    chunk plus the three means of each factored parameter's second moment."""
    small, large = (_ops_per_step(n, foreach=True, capturable=capturable) for n in (4, 8))
    assert large - small == 4 * 3
    per_parameter = _ops_per_step(8, foreach=False, capturable=capturable)
    assert per_parameter > 4 * large


def test_a_tensor_lr_changed_between_steps_is_read_by_the_step():
    """A schedule through set_lr: filled into the tensor lr in place, the same updates as float LRs."""
    lrs = [1e-2 * (i + 1) / 10 for i in range(10)]
    eager = _train(_SHAPES, dict(lr=1.0, beta1=0.9, weight_decay=0.05, scale_parameter=True), capturable=False, lrs=lrs)
    captured = _train(_SHAPES, dict(lr=1.0, beta1=0.9, weight_decay=0.05, scale_parameter=True), capturable=True, lrs=lrs)
    assert_same_optimizer_state(eager[0], eager[1], captured[0], captured[1], step_as_number=True)
    assert isinstance(captured[1].param_groups[0]["lr"], torch.Tensor)


def test_the_relative_step_ignores_a_tensor_lr_per_group():
    """fit builds relative-step groups with (unused) tensor LRs that the schedule fills: the step size
    stays min(1e-2, 1/√t)."""
    p, q = torch.ones(4, 4, requires_grad=True), torch.ones(4, 4, requires_grad=True)
    plain = Adafactor([p], relative_step=True)
    tensor_lr = Adafactor([{"params": [q], "lr": torch.tensor(5.0, dtype=torch.float64)}], relative_step=True,
                          capturable=True)
    for _ in range(3):
        p.grad = q.grad = torch.full((4, 4), 0.5)
        set_lr(tensor_lr, 7.0)
        plain.step()
        tensor_lr.step()
    assert torch.equal(p, q)


@pytest.mark.parametrize("config", [{"relative_step": True, "warmup_init": False, "decay_rate": -0.8},
                                    {"relative_step": True, "warmup_init": True, "decay_rate": -0.5},
                                    {"relative_step": True, "warmup_init": False, "decay_rate": -0.3}],
                         ids=["-0.8", "-0.5 warmup", "-0.3"])
def test_the_capturable_scalars_round_as_the_python_floats(config):
    """β₂ₜ, 1 − β₂ₜ and the relative step size from the device's float64 pow/sqrt (not always Python's
    to the last float64 bit: torch's CPU ``pow`` and ``sqrt`` differ from ``math``'s at hundreds to
    thousands of counts below 300 000: −0.3's pow at 110 of the first 100 000, 1/√t at 839) round to the same
    float32 values for the first 100 000 steps (``1/√t`` only from step 10 001: below it the clamp at
    1e-2 or the warm-up ``1e-6·t`` decides). The Adafactor docstring's 300 000 was measured the same
    way once (~5 s per decay rate)."""
    config = {**config, "lr": None}
    n = 100_000
    counts = torch.arange(1, n + 1, dtype=torch.float32)
    # all n counts as one (n,) "count": the same elementwise float64 math as n 0-dim counts stacked (checked on the
    # first 1 000 below), without making and stacking 100 000 0-dim tensors (~1.7 s CPU per decay rate)
    (device,) = Adafactor._device_scalars(config, [counts])
    host = torch.tensor([Adafactor._host_scalars(config, t) for t in range(1, n + 1)], dtype=torch.float64)  # (n, 3)
    for column, values in enumerate(device):
        assert torch.equal(values.float(), host[:, column].float()), column
    stacked = Adafactor._device_scalars(config, list(counts[:1000].unbind(0)))
    for column, values in enumerate(zip(*stacked)):
        assert torch.equal(torch.stack(values), device[column][:1000]), column


def test_a_tensor_lr_needs_the_capturable_mode():
    with pytest.raises(ValueError, match="capturable=True"):
        Adafactor([torch.zeros(2, requires_grad=True)], lr=torch.tensor(1e-3))
    with pytest.raises(ValueError, match="one value"):
        Adafactor([torch.zeros(2, requires_grad=True)], lr=torch.ones(2), capturable=True)


# --------------------------------------------------------------------------- state round trip
@pytest.mark.parametrize("saved,loaded", [(False, True), (True, False), (True, True)],
                         ids=["eager->capturable", "capturable->eager", "capturable->capturable"])
@pytest.mark.parametrize("name", ["lr beta1 decay", "relative warmup beta1"])
def test_a_state_saved_in_one_mode_resumes_in_the_other_bit_for_bit(name, saved, loaded):
    """5 steps, state_dict, a fresh optimiser of the other mode loads it, 5 more steps: the
    uninterrupted run's weights and states; step counts and a tensor lr kept in the loader's mode."""
    shapes, config = _SHAPES, CONFIGS[name]
    straight = _train(shapes, config, capturable=saved, steps=10)
    first = _train(shapes, config, capturable=saved, steps=5)
    sd = copy.deepcopy(first[1].state_dict())
    params = [p.detach().clone().requires_grad_() for p in first[0]]
    lr = config.get("lr")
    tensor_lr = torch.tensor(123.0, dtype=torch.float64) if loaded and lr is not None else None
    kwargs = {k: v for k, v in config.items() if k != "lr"}
    resumed = Adafactor(params, lr=tensor_lr if tensor_lr is not None else lr, capturable=loaded, foreach=loaded,
                        generator=torch.Generator(), **kwargs)  # (foreach: as on a GPU, kept over the saved one)
    resumed.load_state_dict(sd)
    resumed.generator.set_state(first[1].generator.get_state())
    step = resumed.state[params[0]]["step"]
    assert isinstance(step, torch.Tensor) if loaded else isinstance(step, int)
    assert resumed.param_groups[0]["capturable"] is loaded and resumed.param_groups[0]["foreach"] is loaded
    if tensor_lr is not None:
        assert resumed.param_groups[0]["lr"] is tensor_lr and float(tensor_lr) == lr
    for grads in _grads(shapes, 10, torch.float32, 2)[5:]:
        for p, g in zip(params, grads):
            p.grad = g
        resumed.step()
    assert_same_optimizer_state(straight[0], straight[1], params, resumed, step_as_number=True)


# --------------------------------------------------------------------------------- host syncs
@pytest.mark.parametrize("foreach", [False, True], ids=["per-parameter", "foreach"])
@pytest.mark.parametrize("name", ["lr beta1 decay", "relative scaled decay", "relative warmup beta1"])
def test_a_capturable_step_makes_no_host_sync(name, foreach):
    """Nothing read back to the host and no host data copied to the device, first step (state made)
    included — the recorder of tests/test_host_syncs.py."""
    shapes = [(12, 20), (6, 4, 3, 3), (9,)]
    dtype = torch.float32 if "warmup" in name else torch.bfloat16  # (warm-up steps, ~1e-6, rarely move a bf16 weight)
    params = [torch.randn(s).to(dtype).requires_grad_() for s in shapes]
    config = dict(CONFIGS[name])
    lr = config.pop("lr", None)
    opt = Adafactor(params, lr=None if lr is None else torch.tensor(lr, dtype=torch.float64), capturable=True,
                    foreach=foreach, **config)
    before = [p.detach().clone() for p in params]
    grads = _grads(shapes, 3, dtype, 0)  # made before the recording: device tensors to it
    with HostSyncs() as syncs:
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
    assert [str(e) for e in syncs.events] == []
    assert all(not torch.equal(p, q) for p, q in zip(params, before))  # it trained


# ------------------------------------------------------------------------------------------- fit
_BASE = FitConfig(steps=4, batch_size=2, learning_rate=3e-3, warmup_steps=2, schedule="cosine", optimizer="adafactor",
                  step=StepConfig(min_snr_gamma=5.0))
_FIT_ARGS = {"fixed lr": (("weight_decay", 0.01), ("beta1", 0.9)),
             "relative step": (("relative_step", True), ("scale_parameter", True), ("warmup_init", True))}


def _built_optimizers(monkeypatch) -> list[torch.optim.Optimizer]:
    """Every optimiser fit's make_optimizer builds from now on, with the capturable mode it takes on CUDA."""
    monkeypatch.setattr(importlib.import_module("sdadapt.methods.optimizers"), "_graph_capturable", lambda groups: True)
    return spy_on_built_optimizers(monkeypatch)


def test_adafactor_is_no_longer_a_cuda_graph_clash():
    assert cuda_graph_clashes(fused_backward=False, mixed_precision=None, optimizer="Adafactor") == []
    assert dataclasses.replace(_BASE, cuda_graph=True).cuda_graph


def test_make_optimizer_builds_a_capturable_adafactor_with_float64_tensor_lrs(monkeypatch):
    monkeypatch.setattr(importlib.import_module("sdadapt.methods.optimizers"), "_graph_capturable", lambda groups: True)
    groups = [{"params": [torch.zeros(3, 3, requires_grad=True)], "lr": 1e-3},
              {"params": [torch.zeros(3, requires_grad=True)], "lr": 2e-4}]
    for args in _FIT_ARGS.values():
        opt = make_optimizer(groups, dataclasses.replace(_BASE, cuda_graph=True, optimizer_args=args))
        assert isinstance(opt, Adafactor)
        assert [(g["capturable"], g["lr"].dtype, float(g["lr"])) for g in opt.param_groups] == [
            (True, torch.float64, 1e-3), (True, torch.float64, 2e-4)]
    assert make_optimizer(groups, _BASE).param_groups[0]["capturable"] is False  # without cuda_graph


@pytest.mark.parametrize("args", list(_FIT_ARGS))
def test_fit_with_a_capturable_adafactor_is_the_eager_run_bit_for_bit(args, monkeypatch):
    """fit(cuda_graph=True) with the optimiser built as on CUDA (capturable, the warm-up + cosine
    schedule filled into its tensor LRs each step); on a CPU CapturedStep steps eagerly."""
    config = dataclasses.replace(_BASE, optimizer_args=_FIT_ARGS[args])
    eager = _fit(config)
    built = _built_optimizers(monkeypatch)
    captured = _fit(dataclasses.replace(config, cuda_graph=True))
    assert len(built) == 1 and all(g["capturable"] and isinstance(g["lr"], torch.Tensor) for g in built[0].param_groups)
    assert eager[0] == captured[0]
    for a, b in zip(eager[1], captured[1]):
        assert torch.equal(a, b)


def test_fit_captures_a_capturable_adafactor_step(fake_cuda_graphs, monkeypatch):
    """Graph bookkeeping on a CPU (torch.cuda's graph API faked, conftest): 3 warm-up steps and the
    capture (the fake runs the step once, eagerly) train as 4 eager steps do, and the layout was
    captured once."""
    config = dataclasses.replace(_BASE, steps=4, optimizer_args=_FIT_ARGS["relative step"])
    eager = _fit(config)
    built = _built_optimizers(monkeypatch)
    made = spy_on_captured_steps(monkeypatch)
    captured = _fit(dataclasses.replace(config, cuda_graph=True))
    assert built and built[0].param_groups[0]["capturable"]
    assert len(made) == 1 and made[0].graph_count == 1
    assert eager[0] == captured[0]
    for a, b in zip(eager[1], captured[1]):
        assert torch.equal(a, b)


@pytest.mark.parametrize("saved_capturable", [False, True], ids=["eager->captured", "captured->eager"])
def test_fit_resumes_an_adafactor_run_across_modes_bit_for_bit(saved_capturable, tmp_path, monkeypatch):
    """A state saved at step 2 (the warm-up's last) of a run in one mode (training.step's save: step counts
    as JSON numbers or 0-dim tensors, tensor LRs as numbers) resumes in the other to the 4-step run's weights
    (the resumed steps 3 and 4 read the moments, the counts and the cosine part of the schedule)."""
    optimizers_module = importlib.import_module("sdadapt.methods.optimizers")
    config = dataclasses.replace(_BASE, optimizer_args=_FIT_ARGS["fixed lr"])
    images, captions = concept_data("cross", 4, seed=0)

    def run(capturable: bool, **kwargs):
        monkeypatch.setattr(optimizers_module, "_graph_capturable", lambda groups: capturable)
        system = build_toy(seed=1)
        adaptation = METHODS["lora"].adapt(system, seed=1)
        fit(system, adaptation, images, captions, config=dataclasses.replace(config, cuda_graph=True), **kwargs)
        return adaptation.params

    straight = run(saved_capturable, on_step=lambda info: info.save_state(tmp_path / "state") if info.step == 2 else None)
    resumed = run(not saved_capturable, resume=tmp_path / "state")
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_the_train_command_takes_cuda_graph_with_kohyas_adafactor(red_circles, tmp_path, monkeypatch):
    """train --optimizer Adafactor (kohya's defaults: relative step, parameter scale) --cuda-graph is no
    longer refused: every step goes through CapturedStep, and on a CPU it is the run without the flag."""
    import sdadapt
    from sdadapt.cli import main

    made = spy_on_captured_steps(monkeypatch)
    common = ["train", "lora", "--images", str(red_circles), "--batch-size", "2", "--no-prior", "--steps", "3", "-q",
              "--optimizer", "Adafactor", "--device", "cpu"]  # (eager there, also on a machine with CUDA)
    assert main([*common, "-o", str(tmp_path / "plain.safetensors")]) == 0
    assert main([*common, "--cuda-graph", "-o", str(tmp_path / "graph.safetensors")]) == 0
    assert len(made) == 1 and made[0].calls == 3
    a, b = sdadapt.load_lora(tmp_path / "plain.safetensors")[0], sdadapt.load_lora(tmp_path / "graph.safetensors")[0]
    assert all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])


# ------------------------------------------------------------------------------------------ CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("args", list(_FIT_ARGS))
def test_cuda_fit_with_cuda_graph_and_adafactor_matches_the_eager_run(args, monkeypatch):
    """On a GPU: the captured run (3 eager steps, capture, replays; the schedule filled into the tensor
    LRs) trains like the eager run — losses and weights to bf16-backward tolerance — and did capture."""
    made = spy_on_captured_steps(monkeypatch)
    assert_cuda_graph_run_trains_as_eager(dataclasses.replace(_BASE, steps=10, optimizer_args=_FIT_ARGS[args],
                                                              step=StepConfig(min_snr_gamma=5.0, mixed_precision="bf16")),
                                          monkeypatch)
    assert made and made[-1].graph_count == 1 and made[-1].calls == 10


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("foreach", [False, True], ids=["per-parameter", "foreach"])
def test_cuda_capturable_adafactor_replays_its_steps_in_a_graph(foreach):
    """The optimiser step alone recorded in a CUDA graph and replayed 6 times (relative step,
    parameter scale, β₁, weight decay; float32 weights, so no rounding draws) equals 6 eager
    capturable steps — the same kernels — and moved the weights."""
    shapes = [(64, 32), (16, 8, 3, 3), (32,)]
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(s, device="cuda").requires_grad_() for s in shapes]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt = Adafactor(params, relative_step=True, scale_parameter=True, beta1=0.9, weight_decay=0.01,
                        capturable=True, foreach=foreach)
        gen = torch.Generator("cuda").manual_seed(5)
        grads = [[torch.randn(s, device="cuda", generator=gen) for s in shapes] for _ in range(9)]
        for p, g in zip(params, grads[0]):
            p.grad.copy_(g)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for i in range(3):  # warm-up: state made, eager steps
                for p, g in zip(params, grads[i]):
                    p.grad.copy_(g)
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        if graphed:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                opt.step()
        for i in range(3, 9):
            for p, g in zip(params, grads[i]):
                p.grad.copy_(g)
            graph.replay() if graphed else opt.step()
        torch.cuda.synchronize()
        results.append(([p.detach().cpu() for p in params], float(opt.state[params[0]]["step"])))
    (eager, eager_steps), (replayed, replayed_steps) = results
    assert eager_steps == replayed_steps == 9
    torch.manual_seed(0)
    start = [torch.randn(s, device="cuda").cpu() for s in shapes]  # the weights both runs began from
    for a, b, w0 in zip(eager, replayed, start):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
        assert (b - w0).abs().max() > 1e-4  # the replays trained


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("foreach", [False, True], ids=["per-parameter", "foreach"])
def test_cuda_capturable_adafactor_steps_without_a_host_sync(foreach):
    """torch's own sync detector (``set_sync_debug_mode("error")``) over capturable steps on a GPU —
    bf16 weights (stochastic rounding from a CUDA generator), relative step, RMS scale, β₁, decay, a
    parameter skipping a step — and the recorder of tests/test_host_syncs.py."""
    shapes = [(64, 32), (16, 8, 3, 3), (32,)]
    params = [torch.randn(s, device="cuda").to(torch.bfloat16).requires_grad_() for s in shapes]
    opt = Adafactor(params, relative_step=True, scale_parameter=True, beta1=0.9, weight_decay=0.01, capturable=True,
                    foreach=foreach, generator=torch.Generator("cuda").manual_seed(1))
    grads = [[torch.randn(s, device="cuda").to(torch.bfloat16) for s in shapes] for _ in range(4)]
    for p, g in zip(params, grads[0]):
        p.grad = g
    opt.step()  # (the state is made)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with HostSyncs() as syncs:
            for i, step_grads in enumerate(grads[1:]):
                for j, (p, g) in enumerate(zip(params, step_grads)):
                    p.grad = None if (i, j) == (1, 2) else g
                opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert syncs.events == []
    assert [float(opt.state[p]["step"]) for p in params] == [4.0, 4.0, 3.0]
