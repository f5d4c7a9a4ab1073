"""kohya's ``SGDNesterov`` as ``FitConfig(optimizer="sgd-nesterov")``: torch's SGD with Nesterov
momentum (0.9 unless given, as kohya's ``get_optimizer``) checked against a float64 reference written
here; bf16 weights, CUDA-graph capture and kohya's bitsandbytes-only ``SGDNesterov8bit`` refused with
their reasons; ``optimizer_type = "SGDNesterov"`` in a kohya TOML trains on the toy."""

from __future__ import annotations

import pytest
import torch
from fit_runs import straight_and_resumed
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from sdadapt.errors import InputError
from sdadapt.methods import FitConfig
from sdadapt.methods.fit import make_optimizer
from sdadapt.training.optimizer_args import kohya_optimizer_args


def _reference_nesterov(w, grads, *, lr, momentum, weight_decay):
    """SGD with Nesterov momentum in float64 (Sutskever et al. 2013 in torch's form): the buffer starts
    at the first gradient, ``b ← μ b + g``, the step ``w ← w − lr (g + μ b)``; the weight decay is an
    L2 term ``g ← g + λ w``."""
    w, b = w.double().clone(), None
    for g in grads:
        g = g.double() + weight_decay * w
        b = g.clone() if b is None else momentum * b + g
        w = w - lr * (g + momentum * b)
    return w


@settings(max_examples=20, deadline=None)
@given(shape=st.tuples(st.integers(1, 6), st.integers(1, 6)), steps=st.integers(1, 6),
       momentum=st.sampled_from([None, 0.5, 0.9, 0.99]), weight_decay=st.sampled_from([None, 0.0, 0.01, 0.3]),
       lr=st.sampled_from([1e-3, 0.05]), seed=st.integers(0, 2**16))
def test_sgd_nesterov_matches_a_float64_reference(shape, steps, momentum, weight_decay, lr, seed):
    g = torch.Generator().manual_seed(seed)
    p = nn.Parameter(torch.randn(shape, generator=g))
    start = p.detach().clone()
    grads = [torch.randn(shape, generator=g) for _ in range(steps)]
    args = {} if momentum is None else {"momentum": momentum}
    config = FitConfig(optimizer="SGDNesterov", learning_rate=lr, weight_decay=weight_decay, optimizer_args=args)
    opt = make_optimizer([{"params": [p]}], config)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["nesterov"]
    for grad in grads:
        p.grad = grad.clone()
        opt.step()
    want = _reference_nesterov(start, grads, lr=lr, momentum=0.9 if momentum is None else momentum,
                               weight_decay=weight_decay or 0.0)
    torch.testing.assert_close(p.detach().double(), want, rtol=1e-5, atol=1e-5)


def test_kohyas_momentum_default_is_what_ss_optimizer_shows():
    assert kohya_optimizer_args("sgd-nesterov", ()) == (("momentum", 0.9),)
    assert kohya_optimizer_args("sgd-nesterov", (("momentum", 0.5), ("weight_decay", 0.1))) == (
        ("momentum", 0.5), ("weight_decay", 0.1))


@pytest.mark.parametrize("args, words", [({"dampening": 0.1}, "zero dampening"), ({"momentum": 0.0}, "momentum"),
                                         ({"betas": (0.9, 0.99)}, "it takes momentum, dampening, weight_decay")])
def test_arguments_sgd_nesterov_cannot_take_are_refused_when_the_config_is_made(args, words):
    with pytest.raises(ValueError, match=words):
        FitConfig(optimizer="sgd-nesterov", optimizer_args=args)


def test_bf16_weights_are_refused_with_the_reason():
    p = nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(InputError, match="round-to-nearest.*--full-bf16"):
        make_optimizer([{"params": [p]}], FitConfig(optimizer="sgd-nesterov"))
    from sdadapt.jobs import TrainOptions

    with pytest.raises(ValueError, match="--full-bf16 with --optimizer sgd-nesterov"):  # (before the model loads)
        TrainOptions(images=".", optimizer="SGDNesterov", full_bf16=True, mixed_precision="bf16")


def test_torchs_sgd_is_not_captured():
    with pytest.raises(ValueError, match="optimizer 'SGDNesterov'"):
        FitConfig(optimizer="SGDNesterov", cuda_graph=True)


def test_sgd_nesterov_8bit_is_refused_naming_what_to_use(tmp_path):
    from sdadapt.jobs import TrainOptions

    for make in (lambda: FitConfig(optimizer="SGDNesterov8bit"),
                 lambda: TrainOptions(images=tmp_path, optimizer="SGDNesterov8bit")):
        with pytest.raises(ValueError, match="8-bit momentum.*use SGDNesterov"):
            make()


def test_fit_resumes_an_sgd_nesterov_run_bit_for_bit(tmp_path):
    config = FitConfig(steps=4, batch_size=2, learning_rate=1e-2, warmup_steps=1, optimizer="sgd-nesterov",
                       optimizer_args={"weight_decay": 0.01})
    straight, resumed = straight_and_resumed(config, tmp_path / "state")
    assert all(torch.equal(a, b) for a, b in zip(straight[1], resumed[1]))


def test_a_kohya_config_with_sgd_nesterov_trains_two_steps_on_the_toy(three_shapes, tmp_path):
    from train_inputs import train_toy_kohya

    meta = train_toy_kohya(tmp_path, three_shapes, {"optimizer_type": "SGDNesterov", "learning_rate": 1e-2})
    assert meta["ss_optimizer"] == "torch.optim.sgd.SGD(momentum=0.9)"


def test_an_sgd_nesterov_step_makes_no_host_sync():
    from step_size_runs import assert_steps_read_nothing_back

    params = [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]
    opt = make_optimizer([{"params": params}], FitConfig(optimizer="sgd-nesterov", weight_decay=0.1))
    assert_steps_read_nothing_back(opt, params, [[torch.full_like(p, float(i + 1)) for p in params] for i in range(3)])
