"""sdadapt's D-Adaptation Adam and Lion (kohya's ``DAdaptAdam`` / ``DAdaptLion``): a float64
reference written here, dadaptation 3.2 itself, the per-parameter / multi-tensor / capturable paths,
saved states, fit and the train command, and no host read in a step. ``DAdaptAdamPreprint`` (kohya's
``DAdaptation``) is tested as DAdaptAdam is, against ``dadaptation.experimental``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from aten_ops import AtenOps
from fit_runs import assert_cuda_graph_run_trains_as_eager
from fit_runs import toy_lora_run as _toy_fit
from hypothesis import given, settings
from hypothesis import strategies as st
from optimizer_states import assert_same_optimizer_state, load_saved_state
from step_size_runs import (
    assert_cuda_capturable_step_matches,
    assert_resumed_run_is_straight,
    assert_steps_read_nothing_back,
    capturable_and_plain_runs,
    foreach_and_per_parameter_runs,
    gradients,
    weights,
)
from step_size_runs import estimated_d as _d
from step_size_runs import params_of as _params
from step_size_runs import run as _run
from torch import nn

from sdadapt.methods import FitConfig
from sdadapt.methods.fit import cuda_graph_clashes, make_optimizer
from sdadapt.training.dadapt import DAdaptAdam, DAdaptAdamPreprint, DAdaptLion

try:
    import dadaptation
    import dadaptation.experimental
except ImportError:  # (the interop extra installs it)
    dadaptation = None
NEEDS_DADAPTATION = pytest.mark.skipif(dadaptation is None,
                                       reason="dadaptation is not installed (pip install sdadapt[interop])")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPES = [(6, 5), (7,), (3, 2, 3, 3), (4, 3)]
#: the optimizer_args kohya users train DAdaptAdam with (kohya's docs, GUI presets), and its other options
ADAM_OPTIONS = [
    {},
    {"decouple": True, "weight_decay": 0.01, "use_bias_correction": True, "betas": (0.9, 0.99)},
    {"decouple": True, "weight_decay": 0.1},
    {"weight_decay": 0.1, "growth_rate": 1.02, "d0": 1e-4},
    {"betas": (0.0, 0.99), "eps": 1e-6, "use_bias_correction": True},
]
LION_OPTIONS = [{}, {"weight_decay": 0.1}, {"betas": (0.95, 0.98), "weight_decay": 1.0, "d0": 1e-5}]
PREPRINT_OPTIONS = [{}, {"decouple": True, "weight_decay": 0.01, "betas": (0.9, 0.99)}, {"weight_decay": 0.1, "growth_rate": 1.02},
                    {"betas": (0.0, 0.99), "eps": 1e-6, "d0": 1e-4}]


def _weights(seed: int = 0, shapes=SHAPES) -> list[torch.Tensor]:
    return weights(shapes, seed)


def _gradients(steps: int, shapes=SHAPES, seed: int = 1) -> list[list[torch.Tensor]]:
    return gradients(steps, shapes, seed)


# ------------------------------------------------------------------------ float64 references
def reference_dadapt_adam(weights, grads, *, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                          decouple=False, use_bias_correction=False, d0=1e-6, growth_rate=math.inf):
    """D-Adapted Adam (Defazio & Mishchenko 2023, Algorithm 4 with dadaptation 3.2's bias correction,
    decoupled decay and growth limit) in float64, one tensor at a time: (weights, d)."""
    beta1, beta2 = betas
    rb = math.sqrt(beta2)
    w = [x.double().clone() for x in weights]
    m, v, s = ([torch.zeros_like(x) for x in w] for _ in range(3))
    d, n, k = d0, 0.0, 0
    for step in grads:
        g = [gi.double() + (weight_decay * wi if not decouple else 0.0) for gi, wi in zip(step, w)]
        bias = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if use_bias_correction else 1.0
        eta = d * lr * bias
        numerator, l1 = 0.0, 0.0
        for i in range(len(w)):
            numerator += eta * float((g[i] * s[i] / (v[i].sqrt() + eps)).sum())
            m[i] = beta1 * m[i] + eta * (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2
            s[i] = rb * s[i] + eta * (1 - rb) * g[i]
            l1 += float(s[i].abs().sum())
        if l1 == 0:
            continue
        n = rb * n + (1 - rb) * numerator
        d = max(d, min(n / ((1 - rb) * l1), d * growth_rate))
        for i in range(len(w)):
            if decouple and weight_decay:
                w[i] = w[i] - weight_decay * eta * w[i]
            w[i] = w[i] - m[i] / (v[i].sqrt() + eps)
        k += 1
    return w, d


def reference_dadapt_adam_preprint(weights, grads, *, lr=1.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                                   decouple=False, d0=1e-6, growth_rate=math.inf):
    """D-Adapted Adam as the paper's first version (dadaptation.experimental.DAdaptAdamPreprint) in
    float64: (weights, d)."""
    beta1, beta2 = betas
    w = [x.double().clone() for x in weights]
    m, v, s = ([torch.zeros_like(x) for x in w] for _ in range(3))
    d, gamma = d0, 0.0
    for step in grads:
        g = [gi.double() + (weight_decay * wi if not decouple else 0.0) for gi, wi in zip(step, w)]
        eta = d * lr
        g_sq, s_sq, l1 = 0.0, 0.0, 0.0
        for i in range(len(w)):
            m[i] = beta1 * m[i] + eta * (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + (1 - beta2) * g[i] ** 2
            denom = v[i].sqrt() + eps
            g_sq += float((g[i] ** 2 / denom).sum())
            s[i] = beta2 * s[i] + eta * (1 - beta2) * g[i]
            s_sq += float((s[i] ** 2 / denom).sum())
            l1 += float(s[i].abs().sum())
        if l1 == 0:
            continue
        gamma = beta2 * gamma + eta ** 2 * (1 - beta2) * g_sq
        d = max(d, min((s_sq / (1 - beta2) - gamma) / l1, d * growth_rate))
        for i in range(len(w)):
            if decouple and weight_decay:
                w[i] = w[i] - weight_decay * eta * w[i]
            w[i] = w[i] - m[i] / (v[i].sqrt() + eps)
    return w, d


def reference_dadapt_lion(weights, grads, *, lr=1.0, betas=(0.9, 0.99), weight_decay=0.0, d0=1e-6):
    """D-Adapted Lion (dadaptation 3.2's DAdaptLion) in float64: (weights, d)."""
    beta1, beta2 = betas
    rb = math.sqrt(beta2)
    w = [x.double().clone() for x in weights]
    m, s = ([torch.zeros_like(x) for x in w] for _ in range(2))
    d, n = d0, 0.0
    for step in grads:
        g = [gi.double() for gi in step]
        eta = d * lr
        numerator, l1 = 0.0, 0.0
        for i in range(len(w)):
            u = torch.sign(beta1 * m[i] + (1 - beta1) * g[i])
            w[i] = w[i] * (1 - eta * weight_decay) - eta * u
            m[i] = beta2 * m[i] + eta * (1 - beta2) * g[i]
            numerator += eta * float((u * s[i]).sum())
            s[i] = rb * s[i] + eta * (1 - rb) * u
            l1 += float(s[i].abs().sum())
        if l1 == 0:
            continue
        n = rb * n + (1 - rb) * numerator
        d = max(d, n / ((1 - rb) * l1))
    return w, d


_shapes = st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), min_size=1, max_size=3)
_adam_options = st.fixed_dictionaries({}, optional={
    "betas": st.sampled_from([(0.9, 0.999), (0.9, 0.99), (0.0, 0.99)]),
    "weight_decay": st.sampled_from([0.0, 0.01, 0.3]),
    "decouple": st.booleans(),
    "use_bias_correction": st.booleans(),
    "growth_rate": st.sampled_from([math.inf, 1.05]),
    "lr": st.sampled_from([1.0, 0.5]),
})
_lion_options = st.fixed_dictionaries({}, optional={
    "betas": st.sampled_from([(0.9, 0.99), (0.0, 0.9), (0.95, 0.98)]),
    "weight_decay": st.sampled_from([0.0, 0.1, 1.0]),
    "lr": st.sampled_from([1.0, 0.5]),
})


def _check_against(reference, weights, grads, params, optimizer):
    want, want_d = reference
    assert _d(optimizer) == pytest.approx(want_d, rel=1e-4)
    for p, q in zip(params, want):
        torch.testing.assert_close(p.detach().double(), q, rtol=1e-4, atol=1e-4 * (1 + float(q.abs().max())))


@settings(max_examples=60, deadline=None)
@given(shapes=_shapes, steps=st.integers(1, 8), options=_adam_options, seed=st.integers(0, 2**16),
       foreach=st.booleans())
def test_dadapt_adam_follows_the_float64_reference(shapes, steps, options, seed, foreach):
    weights, grads = _weights(seed, shapes), _gradients(steps, shapes, seed + 1)
    params = _params(weights)
    optimizer = DAdaptAdam(params, foreach=foreach, **options)
    _run(optimizer, params, grads)
    _check_against(reference_dadapt_adam(weights, grads, **options), weights, grads, params, optimizer)


@settings(max_examples=40, deadline=None)
@given(shapes=_shapes, steps=st.integers(1, 8), options=_adam_options, seed=st.integers(0, 2**16),
       foreach=st.booleans())
def test_dadapt_adam_preprint_follows_the_float64_reference(shapes, steps, options, seed, foreach):
    options = {k: v for k, v in options.items() if k != "use_bias_correction"}
    weights, grads = _weights(seed, shapes), _gradients(steps, shapes, seed + 1)
    params = _params(weights)
    optimizer = DAdaptAdamPreprint(params, foreach=foreach, **options)
    _run(optimizer, params, grads)
    _check_against(reference_dadapt_adam_preprint(weights, grads, **options), weights, grads, params, optimizer)


@settings(max_examples=60, deadline=None)
@given(shapes=_shapes, steps=st.integers(1, 8), options=_lion_options, seed=st.integers(0, 2**16),
       foreach=st.booleans())
def test_dadapt_lion_follows_the_float64_reference(shapes, steps, options, seed, foreach):
    """(Large weights: a sign step of ~d is then far from flipping a float32 comparison of the two.)"""
    weights, grads = _weights(seed, shapes), _gradients(steps, shapes, seed + 1)
    params = _params(weights)
    optimizer = DAdaptLion(params, foreach=foreach, **options)
    _run(optimizer, params, grads)
    _check_against(reference_dadapt_lion(weights, grads, **options), weights, grads, params, optimizer)


_REFERENCES = {DAdaptAdam: reference_dadapt_adam, DAdaptLion: reference_dadapt_lion,
               DAdaptAdamPreprint: reference_dadapt_adam_preprint}
_ESTIMATE = {DAdaptAdam: "numerator_weighted", DAdaptLion: "numerator_weighted", DAdaptAdamPreprint: "gsq_weighted"}


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("cls", [DAdaptAdam, DAdaptLion, DAdaptAdamPreprint])
def test_no_gradient_signal_moves_the_weights_as_dadaptation(cls, capturable, foreach):
    """Σ‖s‖₁ = 0: dadaptation's Adams return before the weight pass, so even decoupled weight decay
    leaves the weights; its Lion has shrunk them by ``1 − d0·lr·λ`` already (decay comes first)."""
    weights = _weights()
    params = _params(weights)
    options = {"weight_decay": 0.1} if cls is DAdaptLion else {"weight_decay": 0.1, "decouple": True}
    lr = torch.tensor(1.0, dtype=torch.float64) if capturable else 1.0
    optimizer = cls(params, lr=lr, d0=1e-2, capturable=capturable, foreach=foreach, **options)
    _run(optimizer, params, [[torch.zeros(s) for s in SHAPES]])
    shrink = 1 - 1e-2 * 0.1 if cls is DAdaptLion else 1.0
    for p, w in zip(params, weights):
        torch.testing.assert_close(p.detach(), w * shrink, rtol=1e-7, atol=0)
    if dadaptation is not None:
        theirs = _params(weights)
        reference = {DAdaptAdam: dadaptation.DAdaptAdam, DAdaptLion: dadaptation.DAdaptLion,
                     DAdaptAdamPreprint: dadaptation.experimental.DAdaptAdamPreprint}[cls](theirs, d0=1e-2, **options)
        _run(reference, theirs, [[torch.zeros(s) for s in SHAPES]])
        assert all(torch.equal(p, q) for p, q in zip(params, theirs))


@pytest.mark.parametrize("cls", [DAdaptAdam, DAdaptLion, DAdaptAdamPreprint])
def test_no_gradient_signal_leaves_the_estimate(cls):
    """Σ‖s‖₁ = 0 (all-zero gradients): dadaptation returns before storing the estimate — so does the
    on-device step: d, n and k stay, and the next real steps are first steps."""
    weights = _weights()
    params = _params(weights)
    optimizer = cls(params)
    _run(optimizer, params, [[torch.zeros(s) for s in SHAPES]])
    group = optimizer.param_groups[0]
    assert float(group["k"]) == 0 and float(group["d"]) == 1e-6 and float(group[_ESTIMATE[cls]]) == 0
    grads = _gradients(4)
    _run(optimizer, params, grads)
    assert float(group["k"]) == 4 and _d(optimizer) == pytest.approx(_REFERENCES[cls](weights, grads)[1], rel=1e-4)


# ---------------------------------------------------------------------------- dadaptation
def _ids(options: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _match_dadaptation(theirs_cls, ours_cls, options, lr, steps=20):
    weights, grads = _weights(), _gradients(steps)
    theirs = _params(weights)
    reference = theirs_cls(theirs, lr=lr, **options)
    _run(reference, theirs, grads)
    ours = _params(weights)
    optimizer = ours_cls(ours, lr=lr, **options)
    _run(optimizer, ours, grads)
    return reference, theirs, optimizer, ours


@NEEDS_DADAPTATION
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("options", ADAM_OPTIONS, ids=_ids)
@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_dadapt_adam_matches_dadaptation_over_twenty_steps(options, lr, capsys):
    """Same weights and d as dadaptation.DAdaptAdam after 20 steps. Not bit for bit: dadaptation adds
    ``alpha·x`` with a Python-float alpha (a fused multiply-add on CPU) where sdadapt multiplies by a
    device scalar, then adds (measured ≤ 4e-7 relative over these cases)."""
    reference, theirs, optimizer, ours = _match_dadaptation(dadaptation.DAdaptAdam, DAdaptAdam, options, lr)
    assert reference.param_groups[0]["d"] > 1.1e-6 * (options.get("d0", 1e-6) / 1e-6)  # the estimate grew
    assert _d(optimizer) == pytest.approx(reference.param_groups[0]["d"], rel=2e-6)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-6 * float(q.abs().max()))


@NEEDS_DADAPTATION
@pytest.mark.parametrize("options", LION_OPTIONS, ids=_ids)
@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_dadapt_lion_matches_dadaptation_over_twenty_steps(options, lr):
    reference, theirs, optimizer, ours = _match_dadaptation(dadaptation.DAdaptLion, DAdaptLion, options, lr)
    assert reference.param_groups[0]["d"] > 1.1 * options.get("d0", 1e-6)
    assert _d(optimizer) == pytest.approx(reference.param_groups[0]["d"], rel=2e-6)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-6 * float(q.abs().max()))


@NEEDS_DADAPTATION
def test_dadapt_adam_layer_scale_matches_dadaptation():
    """A group's ``layer_scale`` (dadaptation's per-layer LR factor: the groups share one LR) scales
    its step and its share of the estimate as in dadaptation."""
    weights, grads = _weights(), _gradients(20)
    runs = []
    for cls in (dadaptation.DAdaptAdam, DAdaptAdam):
        params = _params(weights)
        optimizer = cls([{"params": params[:2], "layer_scale": 2.0}, {"params": params[2:]}], lr=1.0)
        _run(optimizer, params, grads)
        runs.append((params, optimizer))
    (theirs, reference), (ours, optimizer) = runs
    assert _d(optimizer) == pytest.approx(reference.param_groups[0]["d"], rel=2e-6)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-6 * float(q.abs().max()))


@NEEDS_DADAPTATION
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("options", PREPRINT_OPTIONS, ids=_ids)
@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_dadapt_adam_preprint_matches_dadaptation_over_twenty_steps(options, lr, capsys):
    """kohya's ``DAdaptation``: dadaptation.experimental.DAdaptAdamPreprint (measured ≤ 6e-7 relative)."""
    reference, theirs, optimizer, ours = _match_dadaptation(dadaptation.experimental.DAdaptAdamPreprint,
                                                            DAdaptAdamPreprint, options, lr)
    assert reference.param_groups[0]["d"] > 1.1 * options.get("d0", 1e-6)
    assert _d(optimizer) == pytest.approx(reference.param_groups[0]["d"], rel=2e-6)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-6 * float(q.abs().max()))


@NEEDS_DADAPTATION
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("pair", [("DAdaptAdam", DAdaptAdam, ADAM_OPTIONS[1]), ("DAdaptLion", DAdaptLion, LION_OPTIONS[1])],
                         ids=lambda p: p[0])
def test_a_dadaptation_state_resumes_in_sdadapts_optimiser(pair):
    """dadaptation's state_dict (Python-float estimate, per-parameter ``step``) loads, and the run
    goes on as dadaptation's."""
    name, ours_cls, options = pair
    weights, grads = _weights(), _gradients(12)
    theirs = _params(weights)
    reference = getattr(dadaptation, name)(theirs, lr=1.0, **options)
    _run(reference, theirs, grads[:6])
    ours = _params([p.detach() for p in theirs])
    optimizer = ours_cls(ours, lr=1.0, **options)
    optimizer.load_state_dict(reference.state_dict())
    assert float(optimizer.param_groups[0]["k"]) == 6 and _d(optimizer) == reference.param_groups[0]["d"]
    _run(reference, theirs, grads[6:])
    _run(optimizer, ours, grads[6:])
    assert _d(optimizer) == pytest.approx(reference.param_groups[0]["d"], rel=2e-6)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=2e-6, atol=2e-6 * float(q.abs().max()))


# ---------------------------------------------------------------------- the step's paths
_CASES = ([(DAdaptAdam, o) for o in ADAM_OPTIONS[:4]] + [(DAdaptLion, o) for o in LION_OPTIONS[:2]]
          + [(DAdaptAdamPreprint, o) for o in PREPRINT_OPTIONS[:2]])


def _case_id(case) -> str:
    return f"{case[0].__name__}-{_ids(case[1])}"


def _same_estimate(oa, ob) -> bool:
    return all(torch.equal(oa.param_groups[0][k], ob.param_groups[0][k]) for k in ("d", _ESTIMATE[type(oa)], "k"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", _CASES, ids=_case_id)
def test_the_multi_tensor_step_is_the_per_parameter_step_bit_for_bit(case, dtype):
    cls, options = case
    (pa, oa), (pb, ob) = foreach_and_per_parameter_runs(
        lambda params, foreach: cls(params, foreach=foreach, generator=torch.Generator().manual_seed(5), **options),
        _weights(), _gradients(6), dtype)
    assert_same_optimizer_state(pa, oa, pb, ob)
    assert _same_estimate(oa, ob)


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("case", _CASES, ids=_case_id)
def test_the_capturable_step_is_the_plain_step_bit_for_bit_on_cpu(case, foreach):
    """A float64 tensor lr (what fit makes for a captured run) changed in place between steps, against
    Python floats: every other scalar is a device tensor in both modes."""
    cls, options = case
    (pa, oa), (pb, ob) = capturable_and_plain_runs(
        lambda params, lr, capturable: cls(params, lr=lr, foreach=foreach, capturable=capturable, **options),
        _weights(), _gradients(8))
    assert_same_optimizer_state(pa, oa, pb, ob)
    assert isinstance(ob.param_groups[0]["lr"], torch.Tensor) and _same_estimate(oa, ob)


@pytest.mark.parametrize("cls", [DAdaptAdam, DAdaptLion, DAdaptAdamPreprint])
def test_a_group_whose_lr_is_zero_is_frozen_in_both_modes(cls):
    """LR 0 leaves a group as it is — skipped with a float LR, masked on the device with a tensor one —
    and out of the estimate: the other group trains as it would alone."""
    weights, grads = _weights(), _gradients(5)
    options = {"weight_decay": 0.1, "d0": 1e-2, **({} if cls is DAdaptLion else {"decouple": True})}
    alone = _params(weights[2:])
    reference = cls(alone, **options)
    _run(reference, alone, [g[2:] for g in grads])
    for capturable in (False, True):
        params = _params(weights)
        lr = (lambda x: torch.tensor(x, dtype=torch.float64)) if capturable else float
        optimizer = cls([{"params": params[:2], "lr": lr(0.0)}, {"params": params[2:], "lr": lr(1.0)}],
                        lr=lr(1.0), capturable=capturable, **options)
        _run(optimizer, params, grads)
        assert all(torch.equal(p, w) for p, w in zip(params[:2], weights[:2]))  # (the second one not zero: decay shows)
        assert all(torch.equal(p, q) for p, q in zip(params[2:], alone))
        assert _d(optimizer) == _d(reference)


def test_what_one_estimate_cannot_share_is_refused():
    params = _params(_weights())
    for cls in (DAdaptAdam, DAdaptLion):
        with pytest.raises(ValueError, match="same or 0"):
            cls([{"params": params[:2], "lr": 1.0}, {"params": params[2:], "lr": 0.5}])
        with pytest.raises(ValueError, match="same betas"):
            cls([{"params": params[:2]}, {"params": params[2:], "betas": (0.5, 0.9)}])
        optimizer = cls([{"params": params[:2]}, {"params": params[2:]}])
        optimizer.param_groups[1]["lr"] = 0.5
        with pytest.raises(ValueError, match="same or 0"):
            optimizer.step()
        with pytest.raises(ValueError, match="fsdp_in_use"):
            cls(params, fsdp_in_use=True)
        with pytest.raises(ValueError, match="capturable=True"):
            cls(params, lr=torch.tensor(1.0))
    with pytest.raises(ValueError, match="same growth_rate"):
        DAdaptAdam([{"params": params[:2]}, {"params": params[2:], "growth_rate": 1.02}])


# ---------------------------------------------------------------------------- saved states
@pytest.mark.parametrize("case", [(DAdaptAdam, ADAM_OPTIONS[1]), (DAdaptLion, LION_OPTIONS[1]),
                                  (DAdaptAdamPreprint, PREPRINT_OPTIONS[1])], ids=_case_id)
def test_a_state_dict_resumes_bit_for_bit(case):
    """Saved after 4 steps, loaded into a fresh capturable optimiser: the next 4 steps are the
    straight run's; the estimate tensors loaded in place (a graph reads them), float32 states kept."""
    cls, options = case
    weights, grads = _weights(), _gradients(8)
    straight = _params(weights, torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    reference = cls(straight, generator=gen, **options)
    _run(reference, straight, grads[:4])
    resumed = [nn.Parameter(p.detach().clone()) for p in straight]
    optimizer = cls(resumed, generator=torch.Generator().manual_seed(0), capturable=True,
                    lr=torch.tensor(1.0, dtype=torch.float64), **options)
    d = optimizer.param_groups[0]["d"]
    load_saved_state(reference, optimizer)
    optimizer.generator.set_state(gen.get_state())
    assert optimizer.param_groups[0]["d"] is d and float(d) == _d(reference)
    assert all(t.dtype == torch.float32 for s in optimizer.state.values() for t in s.values())
    assert_resumed_run_is_straight(reference, straight, optimizer, resumed, grads[4:])


@pytest.mark.parametrize("cls", [DAdaptAdam, DAdaptLion, DAdaptAdamPreprint])
def test_a_captured_multi_tensor_state_resumes_in_a_plain_optimiser_keeping_its_mode(cls):
    """Saved from a capturable multi-tensor optimiser (tensor lr), loaded into a plain per-parameter
    one, which keeps its own mode (float lr, foreach and capturable off) and steps on bit for bit;
    and the other way round (a CPU run resumed on a GPU keeps its multi-tensor step)."""
    weights, grads = _weights(), _gradients(8)
    straight = _params(weights)
    reference = cls(straight, lr=torch.tensor(1.0, dtype=torch.float64), foreach=True, capturable=True)
    _run(reference, straight, grads[:4])
    resumed = [nn.Parameter(p.detach().clone()) for p in straight]
    optimizer = cls(resumed)
    load_saved_state(reference, optimizer)
    group = optimizer.param_groups[0]
    assert group["foreach"] is False and group["capturable"] is False and group["lr"] == 1.0
    assert not isinstance(group["lr"], torch.Tensor)
    assert_resumed_run_is_straight(reference, straight, optimizer, resumed, grads[4:])
    back = cls(_params(weights), foreach=True)
    back.load_state_dict(optimizer.state_dict())
    assert back.param_groups[0]["foreach"] is True


#: the resume tests save after step 3 (warm-up: step 1 at LR 0 is skipped; DAdaptAdam's and the
#: preprint's d move at step 3) and resume step 4
_FIT = FitConfig(steps=4, batch_size=2, learning_rate=1.0, warmup_steps=1, schedule="cosine", optimizer="DAdaptAdam",
                 optimizer_args=(("decouple", True), ("weight_decay", 0.01), ("use_bias_correction", True),
                                 ("betas", (0.9, 0.99))))
_FIT_LION = dataclasses.replace(_FIT, optimizer="DAdaptLion", optimizer_args=(("weight_decay", 0.1),))
_FIT_PREPRINT = dataclasses.replace(_FIT, optimizer="DAdaptation", optimizer_args=(("decouple", True),
                                                                                  ("weight_decay", 0.01)))


@pytest.fixture(scope="module")
def straight_fit(tmp_path_factory):
    """``straight_fit(config)``: ``(run, state folder)`` of ``toy_lora_run(config)`` saving its training state
    after step 3, made once per config in a module (the resume tests and the CPU CUDA-graph test read it)."""
    made: dict = {}

    def straight(config):
        if repr(config) not in made:
            folder = tmp_path_factory.mktemp("straight") / "s"
            save = lambda info: info.save_state(folder) if info.step == 3 else None  # noqa: E731
            made[repr(config)] = _toy_fit(config, on_step=save), folder
        return made[repr(config)]

    return straight


@pytest.mark.parametrize("config", [_FIT, _FIT_LION, _FIT_PREPRINT], ids=["DAdaptAdam", "DAdaptLion", "DAdaptation"])
def test_fit_resumes_a_dadapt_run_bit_for_bit(straight_fit, config):
    straight, folder = straight_fit(config)
    resumed = _toy_fit(config, resume=folder)
    assert resumed[0] == straight[0][3:]
    assert all(torch.equal(a, b) for a, b in zip(straight[1], resumed[1]))


# ---------------------------------------------------------------------------- host syncs
@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("case", [(DAdaptAdam, ADAM_OPTIONS[1]), (DAdaptLion, LION_OPTIONS[1]),
                                  (DAdaptAdamPreprint, PREPRINT_OPTIONS[1])], ids=_case_id)
def test_a_dadapt_step_reads_nothing_back(case, capturable):
    """dadaptation reads two values per tensor and step (``.item()``); sdadapt's step none."""
    cls, options = case
    params = _params(_weights())
    lr = torch.tensor(1.0, dtype=torch.float64) if capturable else 1.0
    optimizer = cls(params, lr=lr, foreach=capturable, capturable=capturable, **options)
    assert_steps_read_nothing_back(optimizer, params, _gradients(3))


@NEEDS_DADAPTATION
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name, per_tensor", [("DAdaptAdam", 2), ("DAdaptLion", 2), ("DAdaptAdamPreprint", 3)])
def test_dadaptation_reads_values_per_tensor_and_step(name, per_tensor):
    """What docs/optim.md says of dadaptation: 2 host reads (``.item()``) per tensor and step, the
    preprint's 3 (counted as the aten op every ``.item()`` is: on a GPU each waits for the queue)."""
    params = _params(_weights())
    optimizer = getattr(dadaptation.experimental if name.endswith("Preprint") else dadaptation, name)(params, lr=1.0)
    _run(optimizer, params, _gradients(1))
    with AtenOps() as ops:
        _run(optimizer, params, _gradients(1, seed=2))
    assert ops.counts["_local_scalar_dense"] == per_tensor * len(params)


# ---------------------------------------------------------------------------- bf16 weights
def test_bf16_weights_keep_updates_below_half_an_ulp_by_stochastic_rounding():
    """DAdaptLion's first steps move every weight by d·lr = 1e-6: round-to-nearest keeps bf16 weights
    of 1.0 as they were, stochastic rounding moves their mean by the float32 update."""
    n = 400_000
    grads = [[torch.ones(n)]] * 2
    float32 = [nn.Parameter(torch.ones(n))]
    _run(DAdaptLion(float32), float32, grads)
    step = float(1 - float32[0].mean(dtype=torch.float64))
    assert 1e-7 < step < 1e-4
    nearest = [nn.Parameter(torch.ones(n, dtype=torch.bfloat16))]
    _run(DAdaptLion(nearest, stochastic_rounding=False), nearest, grads)
    assert torch.all(nearest[0] == 1)
    rounded = [nn.Parameter(torch.ones(n, dtype=torch.bfloat16))]
    optimizer = DAdaptLion(rounded, generator=torch.Generator().manual_seed(0))
    _run(optimizer, rounded, grads)
    assert float(1 - rounded[0].double().mean()) == pytest.approx(step, rel=0.1)
    assert all(t.dtype == torch.float32 for t in optimizer.state[rounded[0]].values())


# ------------------------------------------------------------------------------ fit wiring
def test_fit_builds_dadapt_and_refuses_what_it_cannot_train_with():
    params = _params(_weights())
    built = make_optimizer([{"params": params, "lr": 1.0}], _FIT)
    assert isinstance(built, DAdaptAdam) and built.param_groups[0]["decouple"] is True
    assert built.param_groups[0]["weight_decay"] == 0.01 and built.param_groups[0]["betas"] == (0.9, 0.99)
    assert isinstance(make_optimizer([{"params": params, "lr": 1.0}], _FIT_LION), DAdaptLion)
    assert isinstance(make_optimizer([{"params": params, "lr": 1.0}], FitConfig(optimizer="dadapt-lion")), DAdaptLion)
    for name in ("DAdaptation", "DAdaptAdamPreprint", "dadapt-adam-preprint"):  # (kohya: DAdaptation is the preprint)
        assert type(make_optimizer([{"params": params, "lr": 1.0}], FitConfig(optimizer=name))) is DAdaptAdamPreprint
    with pytest.raises(ValueError, match="same or 0"):
        make_optimizer([{"params": params[:2], "lr": 1.0}, {"params": params[2:], "lr": 0.5}], _FIT)
    with pytest.raises(ValueError, match="fused_backward"):
        FitConfig(optimizer="DAdaptLion", fused_backward=True)
    assert cuda_graph_clashes(fused_backward=False, mixed_precision="bf16", optimizer="DAdaptAdam") == []
    with pytest.raises(ValueError, match="d_coef is not an argument of the dadapt-adam optimizer"):
        FitConfig(optimizer="DAdaptAdam", optimizer_args=(("d_coef", 2.0),))
    assert FitConfig(optimizer="DAdaptAdam", optimizer_args=(("log_every", 10),)).optimizer_args == (("log_every", 10),)
    # kohya's other D-Adaptation names: dadaptation's own classes, as kohya builds them (no sdadapt implementation)
    dadaptation = pytest.importorskip("dadaptation")
    import dadaptation.experimental

    for name, cls in (("DAdaptAdaGrad", dadaptation.DAdaptAdaGrad), ("DAdaptAdan", dadaptation.DAdaptAdan),
                      ("DAdaptAdanIP", dadaptation.experimental.DAdaptAdanIP), ("DAdaptSGD", dadaptation.DAdaptSGD)):
        assert type(make_optimizer([{"params": params[:1]}], FitConfig(optimizer=name, learning_rate=1.0))) is cls
        with pytest.raises(ValueError, match="fused_backward"):  # (one step size estimated over every parameter)
            FitConfig(optimizer=name, fused_backward=True)


def test_on_a_cpu_a_cuda_graph_dadapt_run_is_the_eager_run_bit_for_bit(straight_fit):
    eager, _ = straight_fit(_FIT)
    captured = _toy_fit(dataclasses.replace(_FIT, cuda_graph=True))
    assert eager[0] == captured[0] and all(torch.equal(a, b) for a, b in zip(eager[1], captured[1]))


# ------------------------------------------------------------------------- train command
#: the smallest toy runs that still train: one 8-px image a step (the optimiser's name, metadata and notes
#: and a resume that is the straight run do not depend on the image size or the batch)
SMALL = ["--resolution", "8", "--batch-size", "1"]
SMALL_KOHYA = {"resolution": "8,8", "bucket_reso_steps": 4, "min_bucket_reso": 4, "max_bucket_reso": 16}
@pytest.mark.parametrize("optimizer_type, lr, warned, ss_optimizer", [
    ("DAdaptAdam", 1.0, False, ("dadaptation.dadapt_adam.DAdaptAdam(decouple=True,weight_decay=0.01,"
                                "use_bias_correction=True,betas=(0.9, 0.99))")),
    ("DAdaptLion", 1e-4, True, "dadaptation.dadapt_lion.DAdaptLion(weight_decay=0.1)"),
    ("DAdaptation", 1.0, False, "dadaptation.experimental.dadapt_adam_preprint.DAdaptAdamPreprint(weight_decay=0.1)")])
def test_a_kohya_config_with_dadapt_trains_two_steps_on_the_toy(three_shapes, tmp_path, capsys, optimizer_type, lr,
                                                                 warned, ss_optimizer):
    from train_inputs import train_toy_kohya

    args = (["decouple=True", "weight_decay=0.01", "use_bias_correction=True", "betas=0.9,0.99"]
            if optimizer_type == "DAdaptAdam" else ["weight_decay=0.1"])
    meta = train_toy_kohya(tmp_path, three_shapes, {"optimizer_type": optimizer_type, "learning_rate": lr,
                                                    "lr_scheduler": "constant", "optimizer_args": args, **SMALL_KOHYA})
    assert meta["ss_optimizer"] == ss_optimizer and meta["ss_steps"] == "2"
    out = capsys.readouterr()
    report = out.out + out.err
    name = "DAdaptAdamPreprint" if optimizer_type == "DAdaptation" else optimizer_type
    assert f"{name} estimates its own step size" in report
    assert (f"is low for {name}" in report) == warned


def test_the_train_command_takes_kohyas_dadaptation_and_resumes_it_bit_for_bit(three_shapes, tmp_path):
    """kohya's name (the preprint) through run.json and the state folder: the resumed file is the straight one."""
    from train_inputs import lora_train_args, resumed_train_is_the_straight_one

    args = lora_train_args(three_shapes, "--optimizer", "DAdaptation", "--optimizer-args", "decouple=True",
                           "weight_decay=0.01", "--lr", "1", "--steps", "3", "-q", *SMALL)
    assert resumed_train_is_the_straight_one(tmp_path, args)


@pytest.mark.parametrize("optimizer", ["DAdaptAdam", "DAdaptSGD"])  # (sdadapt's, and dadaptation's own class)
def test_the_train_command_refuses_different_lrs_for_a_dadapt_optimizer(three_shapes, tmp_path, capsys, optimizer):
    from train_inputs import lora_train_args

    from sdadapt.cli import main

    if optimizer == "DAdaptSGD":
        pytest.importorskip("dadaptation")
    args = lora_train_args(three_shapes, "--optimizer", optimizer, "--lr", "1", "--steps", "1",
                           "--text-encoder-lr", "0.5")
    assert main([*args, "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "the same or 0" in err and "--text-encoder-lr 0.5" in err
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------- CUDA
@CUDA
@pytest.mark.parametrize("config", [_FIT, _FIT_LION, _FIT_PREPRINT], ids=["DAdaptAdam", "DAdaptLion", "DAdaptation"])
def test_cuda_fit_with_cuda_graph_and_dadapt_matches_the_eager_run(config, monkeypatch):
    """On a GPU: a captured run (3 eager steps, then replays; the estimate on the device) trains as
    the eager run."""
    from sdadapt.training.step import StepConfig

    assert_cuda_graph_run_trains_as_eager(dataclasses.replace(config, steps=8, step=StepConfig(mixed_precision="bf16")),
                                          monkeypatch)


@CUDA
@pytest.mark.parametrize("case", [(DAdaptAdam, ADAM_OPTIONS[1]), (DAdaptLion, LION_OPTIONS[1]),
                                  (DAdaptAdamPreprint, PREPRINT_OPTIONS[1])], ids=_case_id)
def test_cuda_capturable_dadapt_has_no_host_sync_and_matches_the_float_lr_step(case):
    cls, options = case
    assert_cuda_capturable_step_matches(
        lambda params, lr, capturable: cls(params, lr=lr, foreach=True, capturable=capturable, **options),
        _weights(), _gradients(6))
