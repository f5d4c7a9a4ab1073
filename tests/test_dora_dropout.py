"""DoRA's training-time dropout as LyCORIS' DoRA (``LoConModule.make_weight`` with ``wd=True``): ``rank_dropout``
drops whole output rows of ΔW for the batch, no rescaling, before the norm; ``dropout`` (on rank activations DoRA
never forms) is refused instead of silently doing nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.adapters import DoRAConfig, LoRAConfig
from sdadapt.adapters.base import LayerGeometry
from sdadapt.adapters.registry import build_adapter
from sdadapt.methods import METHODS
from sdadapt.toy import build_toy


def _module(geometry, p, *, wd_on_out=True, seed=0):
    torch.manual_seed(seed)
    module = build_adapter(DoRAConfig(inner=LoRAConfig(rank=3, alpha=2.0, rank_dropout=p), wd_on_out=wd_on_out),
                           geometry, dtype=torch.float64)
    base = torch.randn(geometry.weight_shape, dtype=torch.float64)
    module.init_from_base(base)
    with torch.no_grad():  # a trained state: ΔW ≠ 0, m ≠ ‖W‖
        for param in module.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return module, base


def _reference(module, base, keep):
    """float64, written out (the module's own alpha/rank scale, held in float32): W' = m ⊙ (W + ΔW·keep_row) / ‖W + ΔW·keep_row‖, the delta W' − W."""
    up = module.inner.lora_up.reshape(base.shape[0], -1)
    down = module.inner.lora_down.reshape(up.shape[1], -1)
    delta = (up @ down).reshape(base.shape) * module.inner.scale.double() * keep.view(-1, *[1] * (base.dim() - 1))
    directed = base + delta
    if module.wd_on_out:
        norm = directed.reshape(base.shape[0], -1).norm(dim=1).view(-1, *[1] * (base.dim() - 1))
    else:
        norm = directed.transpose(0, 1).reshape(base.shape[1], -1).norm(dim=1).view(1, -1, *[1] * (base.dim() - 2))
    return directed * module.dora_scale / norm - base


@settings(max_examples=20, deadline=None)
@given(p=st.sampled_from([0.25, 0.5, 0.9]), conv=st.booleans(), wd_on_out=st.booleans(), seed=st.integers(0, 99))
def test_rank_dropout_drops_output_rows_of_the_delta_for_the_batch(p, conv, wd_on_out, seed):
    geometry = LayerGeometry(6, 5, (3, 3), padding=(1, 1)) if conv else LayerGeometry(6, 5)
    module, base = _module(geometry, p, wd_on_out=wd_on_out, seed=seed)
    x = torch.randn(4, 5, 7, 7, dtype=torch.float64) if conv else torch.randn(4, 5, dtype=torch.float64)
    module.train()
    torch.manual_seed(seed + 1)
    out = module(x, base)
    torch.manual_seed(seed + 1)
    keep = (torch.rand(6) > p).to(torch.float64)  # (LyCORIS: one draw over the output rows, no rescale)
    delta = _reference(module, base, keep)
    expected = F.conv2d(x, delta, padding=1) if conv else x @ delta.T
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    module.eval()  # eval: no dropout, the whole delta
    full = _reference(module, base, torch.ones(6, dtype=torch.float64))
    torch.testing.assert_close(module(x, base), F.conv2d(x, full, padding=1) if conv else x @ full.T,
                               rtol=1e-10, atol=1e-10)


def test_rank_dropout_off_keeps_the_training_output_equal_to_eval():
    module, base = _module(LayerGeometry(6, 5), 0.0)
    x = torch.randn(3, 5, dtype=torch.float64)
    torch.testing.assert_close(module.train()(x, base), module.eval()(x, base), rtol=0, atol=0)


def test_dropout_on_the_rank_activations_is_refused_for_dora():
    with pytest.raises(ValueError, match="rank_dropout"):
        DoRAConfig(inner=LoRAConfig(rank=2, dropout=0.5))
    with pytest.raises(ValueError, match="dropout"):
        METHODS["dora"].prepare(build_toy(seed=0), dropout=0.5)


def test_train_dora_with_rank_dropout_varies_in_training_only():
    """``train dora --network-args rank_dropout=0.5`` through the method: an adapted toy layer's output varies from
    call to call in training (rows of ΔW dropped) and not in eval."""
    adaptation = METHODS["dora"].prepare(build_toy(seed=0), rank_dropout=0.5)
    handle = adaptation.handles["unet"]
    name = next(n for n, m in handle.modules.items() if m.geometry.kernel == ())
    module, layer = handle.modules[name], handle._layers[name]
    assert module.inner.rank_dropout == 0.5
    with torch.no_grad():
        module.inner.lora_up.normal_()
    x = torch.randn(2, module.geometry.in_features)
    layer.train()
    outs = [layer(x) for _ in range(6)]
    assert max((o - outs[0]).abs().max().item() for o in outs) > 1e-3
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)
    adaptation.remove()
