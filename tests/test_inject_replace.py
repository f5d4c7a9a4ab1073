"""``AdapterHandle.replace``: another module in an injected layer's place (its hook and slot), the
base untouched, ``remove`` still restoring the model bit for bit."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import sdadapt
from sdadapt.targets import by_regex


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4))


def test_replace_swaps_the_module_the_hook_runs_and_remove_restores():
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 6)
    base = model(x)
    handle = sdadapt.inject(model, by_regex(r"^0$"), sdadapt.LoRAConfig(rank=2, alpha=2))
    old = handle.modules["0"]
    # the replacement: a module inject builds for the same layer shape, on a second model
    new = sdadapt.inject(_model(), by_regex(r"^0$"), sdadapt.LoRAConfig(rank=2, alpha=2)).modules["0"]
    with torch.no_grad():
        for p in new.parameters():
            p.normal_()
    assert handle.replace("0", new) is old
    assert handle.modules["0"] is new and model[0].sdadapt[handle.name] is new
    # the forward is the base plus the NEW module's delta, once (the old hook is gone)
    h = model[0](x)
    expected = nn.functional.linear(x, model[0].weight, model[0].bias) + new.delta_weight().to(x).matmul(x.T).T
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-5)
    assert set(before) <= set(model.state_dict())  # base keys unchanged (the adapter adds its own)
    handle.remove()
    assert torch.equal(model(x), base)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()) and set(model.state_dict()) == set(before)


def test_replace_refuses_a_merged_module_an_unknown_layer_and_a_removed_handle():
    model = _model()
    handle = sdadapt.inject(model, by_regex(r"^0$"), sdadapt.LoRAConfig(rank=2))
    other = handle.modules["0"]
    with pytest.raises(KeyError, match="no module on '2'"):
        handle.replace("2", other)
    handle.merge()
    with pytest.raises(RuntimeError, match="unmerge"):
        handle.replace("0", other)
    handle.unmerge()
    handle.remove()
    with pytest.raises(RuntimeError, match="removed"):
        handle.replace("0", other)
