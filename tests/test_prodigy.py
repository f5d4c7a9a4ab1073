"""sdadapt's Prodigy (``sdadapt.training.prodigy``): a float64 reference of prodigyopt 1.1.2's equations
written here, prodigyopt itself with the options kohya users set, the multi-tensor and capturable
paths against the per-parameter one, saved states (``state_dict``, ``fit`` resume, prodigyopt's),
no host sync in a step, bf16 weights with stochastic rounding, and its wiring into ``fit``,
``train --optimizer prodigy`` and kohya configs."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from fit_runs import assert_cuda_graph_run_trains_as_eager
from fit_runs import toy_lora_run as _toy_fit
from hypothesis import example, given, settings
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
from toy_steps import toy_lora_step

from sdadapt.methods import FitConfig
from sdadapt.methods.fit import cuda_graph_clashes, make_optimizer
from sdadapt.training.host_syncs import HostSyncs
from sdadapt.training.prodigy import Prodigy
from sdadapt.training.step import StepConfig, TrainState

try:
    import prodigyopt
except ImportError:  # (the interop extra installs it)
    prodigyopt = None
NEEDS_PRODIGYOPT = pytest.mark.skipif(prodigyopt is None, reason="prodigyopt is not installed (pip install sdadapt[interop])")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SHAPES = [(6, 5), (7,), (3, 2, 3, 3), (4, 3)]
#: the optimizer_args kohya users train Prodigy with (kohya's docs, GUI presets), and prodigyopt's other options
KOHYA_OPTIONS = [
    {},
    {"decouple": True, "weight_decay": 0.01, "d_coef": 2.0, "use_bias_correction": True, "safeguard_warmup": True,
     "betas": (0.9, 0.99)},
    {"decouple": True, "weight_decay": 0.5, "betas": (0.9, 0.99), "use_bias_correction": False},
    {"decouple": False, "weight_decay": 0.1, "d_coef": 0.5},
    {"betas": (0.9, 0.999), "beta3": 0.9, "growth_rate": 1.02, "d0": 1e-4},
    {"betas": (0.0, 0.99), "weight_decay": 0.01},
    {"slice_p": 3, "safeguard_warmup": True, "eps": 1e-6},
]


def _weights(seed: int = 0, shapes=SHAPES, *, zero_first: bool = True) -> list[torch.Tensor]:
    return weights(shapes, seed, zero_first=zero_first)


def _gradients(steps: int, shapes=SHAPES, seed: int = 1) -> list[list[torch.Tensor]]:
    return gradients(steps, shapes, seed)


# ------------------------------------------------------------------------ float64 reference
def reference_prodigy(weights: list[torch.Tensor], grads: list[list[torch.Tensor]], *, lr: float = 1.0,
                      betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0, decouple=True,
                      use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0,
                      growth_rate=math.inf, slice_p=1) -> tuple[list[torch.Tensor], float]:
    """Prodigy's Adam variant (Mishchenko & Defazio 2023, Algorithm 3 with prodigyopt 1.1.2's
    bias correction, safeguard and slicing) in float64, one tensor at a time: (weights, d)."""
    beta1, beta2 = betas
    beta3 = math.sqrt(beta2) if beta3 is None else beta3
    w = [x.double().clone() for x in weights]
    w0 = [x.reshape(-1)[::slice_p].clone() for x in w]
    m = [torch.zeros_like(x) for x in w]
    v = [torch.zeros_like(x) for x in w]
    s = [torch.zeros_like(x) for x in w0]
    d, d_max, r, k = d0, d0, 0.0, 0
    for step in grads:
        g = [gi.double() + (weight_decay * wi if not decouple else 0.0) for gi, wi in zip(step, w)]
        bias = math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)) if use_bias_correction else 1.0
        eta = d * lr * bias
        numerator, denominator = 0.0, 0.0
        for i in range(len(w)):
            sg = g[i].reshape(-1)[::slice_p]
            numerator += (d / d0) * eta * float(sg @ (w0[i] - w[i].reshape(-1)[::slice_p]))
            m[i] = beta1 * m[i] + d * (1 - beta1) * g[i]
            v[i] = beta2 * v[i] + d * d * (1 - beta2) * g[i] ** 2
            s[i] = beta3 * s[i] + (d / d0) * (d if safeguard_warmup else eta) * sg
            denominator += float(s[i].abs().sum())
        if denominator == 0:
            continue
        r = beta3 * r + numerator
        d_hat = d_coef * r / denominator
        if d == d0:
            d = max(d, d_hat)
        d_max = max(d_max, d_hat)
        d_new = min(d_max, d * growth_rate)
        for i in range(len(w)):
            if decouple and weight_decay:
                w[i] = w[i] - weight_decay * eta * w[i]
            denom = v[i].sqrt() + d_new * eps
            w[i] = w[i] - (eta * m[i] / denom if beta1 > 0 else eta * d_new * g[i] / denom)
        d, k = d_new, k + 1
    return w, d


_shapes = st.lists(st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple), min_size=1, max_size=3)
_options = st.fixed_dictionaries({}, optional={
    "betas": st.sampled_from([(0.9, 0.999), (0.9, 0.99), (0.0, 0.99)]),
    "weight_decay": st.sampled_from([0.0, 0.01, 0.3]),
    "decouple": st.booleans(),
    "use_bias_correction": st.booleans(),
    "safeguard_warmup": st.booleans(),
    "d_coef": st.sampled_from([0.5, 1.0, 2.0]),
    "growth_rate": st.sampled_from([math.inf, 1.05]),
    "slice_p": st.integers(1, 3),
    "lr": st.sampled_from([1.0, 0.5]),
})


@settings(max_examples=100, deadline=None)
@given(shapes=_shapes, steps=st.integers(1, 8), options=_options, seed=st.integers(0, 2**16))
@example(shapes=[(1,), (1,)], steps=3, seed=261,  # (weights of 1e-3: d off by 1.1e-4, float32's rounding)
         options={"betas": (0.9, 0.999), "lr": 0.5, "use_bias_correction": True, "slice_p": 1, "d_coef": 2.0})
def test_prodigy_follows_the_float64_reference(shapes, steps, options, seed):
    """float32 arithmetic against float64: the weights' changes agree to 1e-4 of their size (the
    estimate feeds each step's rounding into the next), plus the float32 rounding of the weights
    themselves (an ulp per step: a first step of ~1e-6 is below a float32 ulp of 1.0's 100th)."""
    # weights of size 1e-5: the first steps (~d0·lr ≥ 5e-7) are resolved in float32 — its ulp at 1.0
    # (6e-8) would put a % error into the first ⟨g, w₀ − w⟩ of any float32 run (prodigyopt's too), and
    # its ulp at 1e-3 (1.2e-10) still 2e-4 (shapes=[(1,), (1,)], seed=261, lr=0.5: d off by 1.1e-4,
    # prodigyopt's float32 run as much); at 1e-5 (9e-13) it is 2e-6 of a step
    weights = [w * 1e-5 for w in _weights(seed, shapes, zero_first=False)]
    grads = _gradients(steps, shapes, seed + 1)
    want, want_d = reference_prodigy(weights, grads, **options)
    params = _params(weights)
    optimizer = Prodigy(params, **options)
    _run(optimizer, params, grads)
    assert _d(optimizer) == pytest.approx(want_d, rel=1e-4)
    for p, w, start in zip(params, want, weights):
        change, want_change = p.detach().double() - start.double(), w - start.double()
        scale = float(want_change.abs().max()) + 1e-12
        ulps = steps * 2**-23 * float(w.abs().max())
        torch.testing.assert_close(change, want_change, rtol=1e-4, atol=1e-4 * scale + 2 * ulps)


def test_no_gradient_signal_changes_nothing_but_the_moments():
    """Σ‖s‖₁ = 0 (all-zero gradients): prodigyopt returns before the estimate and the weights — so
    does the on-device step: same weights, d, k and r; the next real step is a first step."""
    params = _params([w * 1e-3 for w in _weights(zero_first=False)])  # (small: see the reference test)
    before = [p.detach().clone() for p in params]
    optimizer = Prodigy(params, weight_decay=0.1)
    _run(optimizer, params, [[torch.zeros(s) for s in SHAPES]])
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    group = optimizer.param_groups[0]
    assert float(group["k"]) == 0 and float(group["d"]) == 1e-6 and float(group["d_numerator"]) == 0
    grads = _gradients(3)
    _run(optimizer, params, grads)
    _, want_d = reference_prodigy(before, grads, weight_decay=0.1)
    assert float(group["k"]) == 3 and _d(optimizer) == pytest.approx(want_d, rel=1e-4)


# ----------------------------------------------------------------------------- prodigyopt
@NEEDS_PRODIGYOPT
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("options", KOHYA_OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
@pytest.mark.parametrize("lr", [1.0, 0.5])
def test_prodigy_matches_prodigyopt_over_twenty_steps(options, lr, capsys):
    """Same weights and d as prodigyopt.Prodigy after 20 steps (a zero-initialised tensor among them).
    Not bit for bit: prodigyopt adds ``alpha·x`` with a Python-float alpha (a fused multiply-add in
    torch's vectorised CPU kernels) where sdadapt multiplies by a device scalar, then adds (an alpha
    cannot be a tensor): an ulp per operation, which the estimate's feedback carries on (measured
    ≤ 3e-6 of the largest weight, 1e-6 of d; tested at 1e-5)."""
    weights, grads = _weights(), _gradients(20)
    theirs = _params(weights)
    reference = prodigyopt.Prodigy(theirs, lr=lr, **options)
    _run(reference, theirs, grads)
    ours = _params(weights)
    optimizer = Prodigy(ours, lr=lr, **options)
    _run(optimizer, ours, grads)
    assert reference.param_groups[0]["d"] > 2e-6  # the estimate grew
    assert _d(optimizer) == pytest.approx(reference.param_groups[0]["d"], rel=1e-5)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5 * float(q.abs().max()))


@NEEDS_PRODIGYOPT
@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("foreach", [False, True])
def test_per_group_options_match_prodigyopt(foreach):
    """prodigyopt reads ``weight_decay``, ``eps``, ``slice_p`` and ``safeguard_warmup`` per group:
    two groups with different ones train as prodigyopt's (and the estimate sums over both)."""
    weights, grads = _weights(), _gradients(20)
    groups = [{"weight_decay": 0.3, "eps": 1e-6, "slice_p": 3, "safeguard_warmup": True},
              {"weight_decay": 0.0, "eps": 1e-8, "slice_p": 1, "safeguard_warmup": False}]
    theirs, ours = _params(weights), _params(weights)
    reference = prodigyopt.Prodigy([{"params": theirs[:2], **groups[0]}, {"params": theirs[2:], **groups[1]}],
                                   lr=1.0, d_coef=2.0, use_bias_correction=True)
    optimizer = Prodigy([{"params": ours[:2], **groups[0]}, {"params": ours[2:], **groups[1]}], lr=1.0, d_coef=2.0,
                        use_bias_correction=True, foreach=foreach)  # (η ≠ d: safeguard_warmup changes s)
    _run(reference, theirs, grads)
    _run(optimizer, ours, grads)
    assert reference.param_groups[0]["d"] > 2e-6
    assert _d(optimizer) == pytest.approx(reference.param_groups[0]["d"], rel=1e-5)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5 * float(q.abs().max()))


@NEEDS_PRODIGYOPT
@pytest.mark.filterwarnings("ignore")
def test_a_prodigyopt_state_resumes_in_sdadapts_prodigy():
    """prodigyopt's state_dict (Python-float estimate, per-parameter ``step``, a 0-dim w₀ for the zero
    tensor) loads into sdadapt's Prodigy, which then steps on as prodigyopt does."""
    options = KOHYA_OPTIONS[1]
    weights, grads = _weights(), _gradients(12)
    theirs = _params(weights)
    reference = prodigyopt.Prodigy(theirs, lr=1.0, **options)
    _run(reference, theirs, grads[:6])
    assert reference.state[theirs[0]]["p0"].dim() == 0
    ours = _params([p.detach() for p in theirs])
    optimizer = Prodigy(ours, lr=1.0, **options)
    optimizer.load_state_dict(reference.state_dict())
    assert optimizer.state[ours[0]]["p0"].shape == (SHAPES[0][0] * SHAPES[0][1],)
    assert float(optimizer.param_groups[0]["k"]) == 6
    _run(reference, theirs, grads[6:])
    _run(optimizer, ours, grads[6:])
    assert _d(optimizer) == pytest.approx(reference.param_groups[0]["d"], rel=1e-5)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-5 * float(q.abs().max()))


# ---------------------------------------------------------------------- the step's paths
_PATH_OPTIONS = [{}, KOHYA_OPTIONS[1], KOHYA_OPTIONS[3], KOHYA_OPTIONS[5], KOHYA_OPTIONS[6]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", _PATH_OPTIONS, ids=lambda o: ",".join(o) or "defaults")
def test_the_multi_tensor_step_is_the_per_parameter_step_bit_for_bit(options, dtype):
    """Same elementwise ops and the same per-tensor sums (float32 dot and L1 norm per tensor), the
    stochastic rounding of bf16 weights in one pass with the same draws (on CPU)."""
    (pa, oa), (pb, ob) = foreach_and_per_parameter_runs(
        lambda params, foreach: Prodigy(params, foreach=foreach, generator=torch.Generator().manual_seed(5), **options),
        _weights(), _gradients(6), dtype)
    assert_same_optimizer_state(pa, oa, pb, ob)
    assert all(torch.equal(oa.param_groups[0][k], ob.param_groups[0][k]) for k in ("d", "d_max", "d_numerator", "k"))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("options", _PATH_OPTIONS[:3], ids=lambda o: ",".join(o) or "defaults")
def test_the_capturable_step_is_the_plain_step_bit_for_bit_on_cpu(options, foreach):
    """A float64 tensor lr (what fit makes for a captured run) changed in place between steps, against
    Python floats: every other scalar is a device tensor in both modes. The LRs are exact in float64."""
    (pa, oa), (pb, ob) = capturable_and_plain_runs(
        lambda params, lr, capturable: Prodigy(params, lr=lr, foreach=foreach, capturable=capturable, **options),
        _weights(), _gradients(8))
    assert_same_optimizer_state(pa, oa, pb, ob)
    assert isinstance(ob.param_groups[0]["lr"], torch.Tensor)
    assert all(torch.equal(oa.param_groups[0][k], ob.param_groups[0][k]) for k in ("d", "d_max", "d_numerator", "k"))


def test_a_group_whose_lr_is_zero_is_frozen_in_both_modes():
    """LR 0 leaves a group as it is — skipped with a float LR, masked on the device with a tensor one
    (the graph cannot branch) — and out of the estimate: the other group trains as it would alone."""
    weights, grads = _weights(), _gradients(5)
    alone = _params(weights[1:])
    reference = Prodigy(alone, weight_decay=0.1)
    _run(reference, alone, [g[1:] for g in grads])
    for capturable in (False, True):
        params = _params(weights)
        lr = (lambda x: torch.tensor(x, dtype=torch.float64)) if capturable else float
        optimizer = Prodigy([{"params": params[:1], "lr": lr(0.0)}, {"params": params[1:], "lr": lr(1.0)}],
                            lr=lr(1.0), weight_decay=0.1, capturable=capturable)
        _run(optimizer, params, grads)
        assert torch.equal(params[0], weights[0])
        assert all(torch.equal(p, q) for p, q in zip(params[1:], alone))
        assert _d(optimizer) == _d(reference)


@pytest.mark.parametrize("foreach", [False, True])
def test_a_group_paused_at_lr_zero_resumes_where_it_stopped_in_both_modes(foreach):
    """A group trained, set to LR 0 for some steps (in place: a captured graph keeps its tensor), then
    trained again: masked on the device, its moments and ``s`` must stay as they were — as the float-LR
    step, which skips the group — not decay meanwhile, so both modes end bit for bit the same."""
    weights, grads = _weights(), _gradients(9)
    runs = []
    for capturable in (False, True):
        params = _params(weights)
        lr = (lambda x: torch.tensor(x, dtype=torch.float64)) if capturable else float
        optimizer = Prodigy([{"params": params[:2], "lr": lr(1.0)}, {"params": params[2:], "lr": lr(1.0)}],
                            lr=lr(1.0), foreach=foreach, capturable=capturable, **KOHYA_OPTIONS[1])
        group = optimizer.param_groups[0]
        _run(optimizer, params, grads[:3])
        moments = [optimizer.state[p]["exp_avg_sq"].clone() for p in params[:2]]
        group["lr"] = group["lr"].fill_(0.0) if capturable else 0.0
        _run(optimizer, params, grads[3:6])
        assert all(torch.equal(optimizer.state[p]["exp_avg_sq"], m) for p, m in zip(params[:2], moments))
        group["lr"] = group["lr"].fill_(1.0) if capturable else 1.0
        _run(optimizer, params, grads[6:])
        runs.append((params, optimizer))
    (pa, oa), (pb, ob) = runs
    assert_same_optimizer_state(pa, oa, pb, ob)
    assert all(torch.equal(oa.param_groups[0][k], ob.param_groups[0][k]) for k in ("d", "d_max", "d_numerator", "k"))


def test_groups_with_different_learning_rates_are_refused():
    params = _params(_weights())
    with pytest.raises(ValueError, match="same or 0"):
        Prodigy([{"params": params[:2], "lr": 1.0}, {"params": params[2:], "lr": 0.5}])
    with pytest.raises(ValueError, match="same betas"):
        Prodigy([{"params": params[:2]}, {"params": params[2:], "betas": (0.9, 0.99)}])
    optimizer = Prodigy([{"params": params[:2]}, {"params": params[2:]}])
    optimizer.param_groups[1]["lr"] = 0.5  # (a schedule that would scale the groups apart)
    with pytest.raises(ValueError, match="same or 0"):
        optimizer.step()
    with pytest.raises(ValueError, match="fsdp_in_use"):
        Prodigy(params, fsdp_in_use=True)
    with pytest.raises(ValueError, match="capturable=True"):
        Prodigy(params, lr=torch.tensor(1.0))


# ---------------------------------------------------------------------------- saved states
def test_a_state_dict_resumes_bit_for_bit():
    """Saved after 4 steps (torch.save), loaded into a fresh optimiser: the next 4 steps are the
    straight run's; the estimate tensors loaded in place (a graph reads them) and float32 states kept."""
    weights, grads = _weights(), _gradients(8)
    straight = _params(weights, torch.bfloat16)
    gen = torch.Generator().manual_seed(3)
    reference = Prodigy(straight, generator=gen, **KOHYA_OPTIONS[1])
    _run(reference, straight, grads[:4])
    resumed = [nn.Parameter(p.detach().clone()) for p in straight]
    optimizer = Prodigy(resumed, generator=torch.Generator().manual_seed(0), capturable=True,
                        lr=torch.tensor(1.0, dtype=torch.float64), **KOHYA_OPTIONS[1])
    d = optimizer.param_groups[0]["d"]
    load_saved_state(reference, optimizer)
    optimizer.generator.set_state(gen.get_state())
    assert optimizer.param_groups[0]["d"] is d and optimizer.param_groups[1:] == [] and float(d) == _d(reference)
    assert all(t.dtype == torch.float32 for s in optimizer.state.values() for t in s.values())
    assert_resumed_run_is_straight(reference, straight, optimizer, resumed, grads[4:])


def test_a_captured_multi_tensor_state_resumes_in_a_plain_optimiser_keeping_its_mode():
    """The other way round: saved from a capturable multi-tensor Prodigy (tensor lr), loaded into a
    plain per-parameter one, which keeps its own mode (float lr, foreach and capturable off, as
    sdadapt's Adafactor) and steps on bit for bit."""
    weights, grads = _weights(), _gradients(8)
    straight = _params(weights)
    reference = Prodigy(straight, lr=torch.tensor(1.0, dtype=torch.float64), foreach=True, capturable=True,
                        **KOHYA_OPTIONS[1])
    _run(reference, straight, grads[:4])
    resumed = [nn.Parameter(p.detach().clone()) for p in straight]
    optimizer = Prodigy(resumed, **KOHYA_OPTIONS[1])
    load_saved_state(reference, optimizer)
    group = optimizer.param_groups[0]
    assert group["foreach"] is False and group["capturable"] is False and group["lr"] == 1.0
    assert not isinstance(group["lr"], torch.Tensor)
    assert_resumed_run_is_straight(reference, straight, optimizer, resumed, grads[4:])


#: the resume test saves after step 3 (warm-up: step 1 at LR 0 is skipped) and resumes step 4
_FIT = FitConfig(steps=4, batch_size=2, learning_rate=1.0, warmup_steps=1, schedule="cosine", optimizer="Prodigy",
                 optimizer_args=(("d_coef", 2), ("use_bias_correction", True), ("safeguard_warmup", True),
                                 ("weight_decay", 0.01), ("betas", (0.9, 0.99))))


@pytest.fixture(scope="module")
def straight_fit(tmp_path_factory):
    """``(run, state folder)`` of ``toy_lora_run(_FIT)`` saving its training state after step 3, made once
    per module (the resume test and the CPU CUDA-graph test read it)."""
    folder = tmp_path_factory.mktemp("straight") / "s"
    return _toy_fit(_FIT, on_step=lambda info: info.save_state(folder) if info.step == 3 else None), folder


def test_fit_resumes_a_prodigy_run_bit_for_bit(straight_fit):
    """The estimate goes through state.json (float64 numbers, exact) and the states through
    state.safetensors: the resumed run ends where the straight one does."""
    straight, folder = straight_fit
    resumed = _toy_fit(_FIT, resume=folder)
    assert resumed[0] == straight[0][3:]
    assert all(torch.equal(a, b) for a, b in zip(straight[1], resumed[1]))


# ---------------------------------------------------------------------------- host syncs
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("capturable", [False, True])
def test_a_prodigy_step_reads_nothing_back(capturable, foreach):
    """prodigyopt reads two values per tensor and step (``.item()``); sdadapt's step none."""
    params = _params(_weights())
    lr = torch.tensor(1.0, dtype=torch.float64) if capturable else 1.0
    optimizer = Prodigy(params, lr=lr, foreach=foreach, capturable=capturable, **KOHYA_OPTIONS[1])
    assert_steps_read_nothing_back(optimizer, params, _gradients(3))


@NEEDS_PRODIGYOPT
@pytest.mark.filterwarnings("ignore")
def test_prodigyopt_reads_two_values_per_tensor_and_step():
    """What docs/optim.md says of prodigyopt: 2 host reads per tensor and step."""
    params = _params(_weights())
    optimizer = prodigyopt.Prodigy(params, lr=1.0)
    _run(optimizer, params, _gradients(1))
    with HostSyncs() as syncs:
        _run(optimizer, params, _gradients(1, seed=2))
    assert len(syncs.reads()) == 2 * len(params)


# ---------------------------------------------------------------------------- bf16 weights
def test_bf16_weights_keep_updates_below_half_an_ulp_by_stochastic_rounding():
    """The first steps move weights by ~1e-6 (d = d0): round-to-nearest keeps every bf16 weight of 1.0
    as it was, stochastic rounding moves their mean by the float32 update (unbiased). States float32."""
    n = 400_000
    grads = [[torch.ones(n)]] * 2
    float32 = [nn.Parameter(torch.ones(n))]
    _run(Prodigy(float32), float32, grads)
    step = float(1 - float32[0].mean(dtype=torch.float64))
    assert 1e-7 < step < 1e-4  # far below half a bf16 ulp at 1.0 (2⁻⁸)
    nearest = [nn.Parameter(torch.ones(n, dtype=torch.bfloat16))]
    _run(Prodigy(nearest, stochastic_rounding=False), nearest, grads)
    assert torch.all(nearest[0] == 1)
    rounded = [nn.Parameter(torch.ones(n, dtype=torch.bfloat16))]
    optimizer = Prodigy(rounded, generator=torch.Generator().manual_seed(0))
    _run(optimizer, rounded, grads)
    moved = float(1 - rounded[0].double().mean())
    assert moved == pytest.approx(step, rel=0.1)
    assert all(t.dtype == torch.float32 for t in optimizer.state[rounded[0]].values())


# ------------------------------------------------------------------------------ fit wiring
def test_fit_builds_prodigy_and_refuses_what_it_cannot_train_with():
    assert FitConfig(optimizer="PRODIGY").optimizer == "PRODIGY"
    params = _params(_weights())
    built = make_optimizer([{"params": params, "lr": 1.0}], dataclasses.replace(_FIT))
    assert isinstance(built, Prodigy) and built.param_groups[0]["d_coef"] == 2.0
    assert built.param_groups[0]["weight_decay"] == 0.01 and built.param_groups[0]["betas"] == (0.9, 0.99)
    with pytest.raises(ValueError, match="same or 0"):  # text_encoder_lr beside learning_rate
        make_optimizer([{"params": params[:2], "lr": 1.0}, {"params": params[2:], "lr": 0.5}], _FIT)
    with pytest.raises(ValueError, match="fused_backward"):
        FitConfig(optimizer="prodigy", fused_backward=True)
    assert cuda_graph_clashes(fused_backward=False, mixed_precision="bf16", optimizer="Prodigy") == []
    with pytest.raises(ValueError, match="momentum is not an argument of the prodigy optimizer"):
        FitConfig(optimizer="prodigy", optimizer_args=(("momentum", 0.9),))


def test_on_a_cpu_a_cuda_graph_prodigy_run_is_the_eager_run_bit_for_bit(straight_fit):
    eager, _ = straight_fit
    captured = _toy_fit(dataclasses.replace(_FIT, cuda_graph=True))
    assert eager[0] == captured[0] and all(torch.equal(a, b) for a, b in zip(eager[1], captured[1]))


def test_captured_step_records_a_capturable_prodigy(replaying_cuda_graphs):
    """Graph bookkeeping on a CPU (torch.cuda's graph API replaced by stand-ins whose replays run the
    captured code again): CapturedStep takes a capturable Prodigy, warms up, captures once, replays;
    the schedule reaches it through the tensor lr, and the estimate and states a replay writes keep
    their storage (the step count k, advanced in place, counts every replay)."""
    toy = toy_lora_step()
    params = toy.params
    lr = torch.tensor(1.0, dtype=torch.float64)
    opt = Prodigy(params, lr=lr, foreach=True, capturable=True, **KOHYA_OPTIONS[1])
    step = toy.captured(opt)
    state = TrainState(seed=0)
    step(toy.batch, state=state)  # warm-up: the states are made
    memory = [opt.state[p]["exp_avg"].data_ptr() for p in params] + [opt.param_groups[0]["d"].data_ptr()]
    for i in range(3):
        step.set_lr(1.0 / (i + 2))
        step(toy.batch, state=state)
    assert step.graph_count == 1 and opt.param_groups[0]["lr"] is lr and float(lr) == pytest.approx(0.25)
    assert memory == [opt.state[p]["exp_avg"].data_ptr() for p in params] + [opt.param_groups[0]["d"].data_ptr()]
    assert float(opt.param_groups[0]["k"]) == 4


# ------------------------------------------------------------------------- train command
#: the smallest toy runs that still train: one 8-px image a step (the optimiser's name, metadata and notes
#: and a resume that is the straight run do not depend on the image size or the batch)
SMALL = ["--resolution", "8", "--batch-size", "1"]
SMALL_KOHYA = {"resolution": "8,8", "bucket_reso_steps": 4, "min_bucket_reso": 4, "max_bucket_reso": 16}
@pytest.mark.parametrize("lr, warned", [(1.0, False), (1e-4, True)])
def test_a_kohya_config_with_prodigy_trains_two_steps_on_the_toy(three_shapes, tmp_path, capsys, lr, warned):
    from train_inputs import train_toy_kohya

    meta = train_toy_kohya(tmp_path, three_shapes, {
        "optimizer_type": "Prodigy", "learning_rate": lr, "lr_scheduler": "constant",
        "optimizer_args": ["decouple=True", "weight_decay=0.01", "d_coef=2", "use_bias_correction=True",
                           "safeguard_warmup=True", "betas=0.9,0.99"], **SMALL_KOHYA})
    assert meta["ss_optimizer"] == ("prodigyopt.prodigy.Prodigy(decouple=True,weight_decay=0.01,d_coef=2,"
                                    "use_bias_correction=True,safeguard_warmup=True,betas=(0.9, 0.99))")
    assert meta["ss_steps"] == "2"
    out = capsys.readouterr()
    report = out.out + out.err
    assert "Prodigy estimates its own step size" in report
    assert ("is low for Prodigy" in report) == warned


def test_the_train_command_takes_prodigy_and_resumes_it_bit_for_bit(three_shapes, tmp_path):
    from train_inputs import lora_train_args, resumed_train_is_the_straight_one

    args = lora_train_args(three_shapes, "--optimizer", "prodigy", "--optimizer-args", "d_coef=2",
                           "use_bias_correction=True", "--lr", "1", "--steps", "3", "-q", *SMALL)
    assert resumed_train_is_the_straight_one(tmp_path, args)


@pytest.mark.parametrize("extra, named", [(("--text-encoder-lr", "0.5"), "--text-encoder-lr 0.5"),
                                           (("--loraplus-lr-ratio", "16"), "loraplus_lr_ratio 16")])
def test_the_train_command_refuses_learning_rates_prodigy_cannot_share(three_shapes, tmp_path, capsys, extra, named):
    """Refused before the model loads (kohya's run fails at its first step: prodigyopt raises)."""
    from train_inputs import lora_train_args

    from sdadapt.cli import main

    args = lora_train_args(three_shapes, "--optimizer", "Prodigy", "--lr", "1", "--steps", "1", *extra)
    assert main([*args, "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "the same or 0" in err and named in err
    assert not (tmp_path / "x.safetensors").exists()


def test_the_run_report_warns_at_kohyas_bound_and_equal_or_zero_text_encoder_lrs_pass():
    """kohya's get_optimizer warns at ``lr <= 0.1`` (the bound itself included); a text encoder LR
    equal to the UNet's, or 0 (frozen), gives Prodigy one LR and is not refused."""
    from sdadapt.jobs import TrainOptions
    from sdadapt.jobs.train_optimizer import prodigy_clashes, prodigy_notes

    options = TrainOptions(optimizer="Prodigy", images="x", learning_rate=1.0)
    assert "is low for Prodigy" in prodigy_notes(options, learning_rate=0.1)[-1]
    assert len(prodigy_notes(options, learning_rate=0.11)) == 1
    for te_lr in (1.0, 0.0):
        assert prodigy_clashes(dataclasses.replace(options, text_encoder_lr=te_lr)) == []
    with pytest.raises(ValueError, match="--text-encoder-lr 1"):  # (the UNet's is --unet-lr 0.5)
        dataclasses.replace(options, unet_lr=0.5, text_encoder_lr=1.0)


# ------------------------------------------------------------------------------------- CUDA
@CUDA
def test_cuda_fit_with_cuda_graph_and_prodigy_matches_the_eager_run(monkeypatch):
    """On a GPU: a captured Prodigy run (3 eager steps, then replays; the estimate on the device)
    trains as the eager run."""
    assert_cuda_graph_run_trains_as_eager(dataclasses.replace(_FIT, steps=8, step=StepConfig(mixed_precision="bf16")),
                                          monkeypatch)


@CUDA
def test_cuda_capturable_prodigy_has_no_host_sync_and_matches_the_float_lr_step():
    assert_cuda_capturable_step_matches(
        lambda params, lr, capturable: Prodigy(params, lr=lr, foreach=True, capturable=capturable, **KOHYA_OPTIONS[1]),
        _weights(), _gradients(6))


def test_a_state_saved_after_d_has_grown_resumes_bit_for_bit():
    """The resume tests above save before ``d`` leaves ``d0`` (random gradients, kohya's options): a load that
    dropped the estimate (``d``, ``d_max``) would pass them. On a tiny quadratic (gradient ``w − c``), ``d``
    grows many-fold in 6 steps; saved then, the next 4 steps of a fresh optimiser are the straight run's, ``d``
    too. Those 4 steps push away from ``c`` (gradient ``c − w``): ``d̂`` falls and ``d`` stays at ``d_max``, the
    largest estimate so far (prodigyopt's ``d = min(d_max, d·growth_rate)``), so ``d_max`` must resume too."""
    target = torch.linspace(-2.0, 3.0, 12).reshape(3, 4)

    def steps(optimizer, param, count, sign):
        for _ in range(count):
            param.grad = (param.detach() - target) * sign
            optimizer.step()

    straight = nn.Parameter(torch.zeros(3, 4))
    reference = Prodigy([straight])
    steps(reference, straight, 6, 1.0)
    grown = _d(reference)
    assert grown > 50 * 1e-6  # (d0 1e-6: measured 8.9e-5 after 6 steps)
    resumed = nn.Parameter(straight.detach().clone())
    optimizer = Prodigy([resumed])
    load_saved_state(reference, optimizer)
    steps(reference, straight, 4, -1.0)
    steps(optimizer, resumed, 4, -1.0)
    assert torch.equal(straight, resumed) and _d(optimizer) == _d(reference) == grown
