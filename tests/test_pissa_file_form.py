"""A PiSSA adapter (``LoRAConfig(init="pissa")``) trains over the residual base (W − s·up₀·down₀), so its factors alone
are not its change to the original model: its state was right only on the residual, and every file made from it
was wrong on the original base (0.81 off in peft on a tiny UNet). Its state is now the file form peft's
``path_initial_model_for_weight_conversion`` writes — ``[up, −up₀]``, ``[down; down₀]``, rank 2r, the same scale —
a plain LoRA of the original model, and it loads back into the same adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import sdadapt
from sdadapt.adapters import LoRAConfig


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1))


def _run(net, x):
    with torch.no_grad():
        h = net[1](net[0](x))
        return net[2](h.reshape(2, 6, 1, 1).expand(2, 6, 3, 3).contiguous())


@pytest.mark.parametrize("alpha", [1.0, 4.0])
def test_the_state_is_the_change_to_the_original_model(alpha):
    net = _net()
    original = copy.deepcopy(net)
    handle = sdadapt.inject(net, sdadapt.targets.by_type(nn.Linear, nn.Conv2d), LoRAConfig(rank=2, alpha=alpha, init="pissa"))
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_run(net, x), _run(original, x), rtol=1e-5, atol=1e-5)  # (PiSSA starts as identity)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # "trained"
        for param in handle.parameters():
            param.add_(torch.randn(param.shape, generator=g) * 0.1)
    want = _run(net, x)
    state = handle.state_dict()
    assert state["0.lora_down.weight"].shape == (4, 8) and state["0.lora_up.weight"].shape == (6, 4)
    assert state["0.alpha"].item() == 2 * alpha  # (rank 2r at the same scale)
    target = copy.deepcopy(original)
    sdadapt.apply_lora(target, state)  # a plain LoRA of the original model
    assert (want - _run(original, x)).abs().max() > 1e-2
    torch.testing.assert_close(_run(target, x), want, rtol=1e-5, atol=1e-5)
    # the state loads back into the same adapter (its trained half), and a state of another adapter is refused
    trained = {k: v.clone() for k, v in state.items()}
    with torch.no_grad():
        for param in handle.parameters():
            param.zero_()
    handle.load_state_dict(trained)
    assert all(torch.equal(handle.state_dict()[k], v) for k, v in trained.items())
    other = {k: torch.randn(v.shape, generator=g) if v.dim() else v for k, v in trained.items()}
    with pytest.raises(ValueError, match="PiSSA"):
        handle.load_state_dict(other)
    handle.remove()
    torch.testing.assert_close(_run(net, x), _run(original, x), rtol=0, atol=0)


def test_a_refused_state_leaves_every_layer_as_it_was():
    """Two PiSSA layers, a state whose second layer is another adapter's: refused, and the first layer (already
    checked) keeps its own factors, not the state's."""
    net = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4))
    handle = sdadapt.inject(net, sdadapt.targets.by_type(nn.Linear), LoRAConfig(rank=2, init="pissa"))
    own = {k: v.clone() for k, v in handle.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    state = {k: v.clone() for k, v in own.items()}
    state["0.lora_down.weight"][:2] += torch.randn(2, 8, generator=g)  # (layer 0: a valid change of its trained half)
    state["1.lora_down.weight"] = torch.randn(state["1.lora_down.weight"].shape, generator=g)  # (layer 1: not its own)
    with pytest.raises(ValueError, match="PiSSA"):
        handle.load_state_dict(state)
    assert all(torch.equal(handle.state_dict()[k], v) for k, v in own.items())
