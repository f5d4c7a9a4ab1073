"""kohya's own LoKr (sd-scripts ``networks/lokr.py``, branch feat-support-lokr-loha) treats a 1x1 convolution as a
Linear layer: a full ``lokr_w2`` is stored ``(b, d)`` where LyCORIS stores ``(b, d, 1, 1)``. kohya's merge and ComfyUI
reshape ``kron(w1, w2)`` onto the weight; such files load here too (were refused: "do not fit the base layer")."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toy_adapter_files import random_adapter_file

import sdadapt
from sdadapt.formats.files import read_safetensors, write_safetensors
from sdadapt.methods import METHODS
from sdadapt.toy import load_toy


def _linear_form(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kohya's form: every 1x1 conv's full lokr_w2 as (b, d)."""
    return {k: v.flatten(1) if k.endswith(".lokr_w2") and v.ndim == 4 and v.shape[2:] == (1, 1) else v
            for k, v in tensors.items()}


def test_apply_lora_takes_a_two_dimensional_w2_on_a_1x1_conv_as_kron_reshaped_onto_the_weight():
    torch.manual_seed(0)
    model = nn.Module()
    model.conv = nn.Conv2d(32, 64, 1)
    w1, w2 = torch.randn(8, 4, dtype=torch.float64), torch.randn(8, 8, dtype=torch.float64)
    x = torch.randn(2, 32, 3, 3)
    base, weight = model.conv(x).detach(), model.conv.weight.detach().double().clone()
    sdadapt.apply_lora(model, {"conv.lokr_w1": w1.float(), "conv.lokr_w2": w2.float()})
    # float64 reference: kohya's make_kron (torch.kron(w1, w2)) reshaped to the weight, scale 1 (both factors full)
    delta = torch.kron(w1, w2).reshape(64, 32, 1, 1)
    reference = F.conv2d(x.double(), weight + delta, model.conv.bias.double())
    with torch.no_grad():
        out = model.conv(x)
    assert not torch.allclose(out, base)
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def toy():
    return load_toy()


def test_a_kohya_form_file_starts_a_run_and_applies_as_the_lycoris_form(toy, tmp_path):
    lycoris = tmp_path / "lycoris.safetensors"
    random_adapter_file(toy, lycoris, "lokr", rank=8)
    state, metadata = read_safetensors(lycoris)
    kohya = tmp_path / "kohya.safetensors"
    reshaped = _linear_form(state)
    changed = [k for k in state if reshaped[k].shape != state[k].shape]
    assert changed  # the toy's proj_in / proj_out / conv_shortcut 1x1 convs have full w2 at rank 8
    write_safetensors(kohya, reshaped, metadata)
    started = []
    for file in (lycoris, kohya):
        adaptation = METHODS["lokr"].adapt(toy, seed=3, rank=8, network_weights=str(file))
        try:
            started.append({(component, name, key): value.detach().clone()
                            for component, handle in adaptation.handles.items()
                            for name, module in handle.modules.items() for key, value in module.file_tensors().items()})
        finally:
            adaptation.remove()
    assert started[0].keys() == started[1].keys()
    assert all(torch.equal(started[0][k], started[1][k]) for k in started[0])  # the same adapters, bit for bit
    before = {k: v.clone() for k, v in toy.unet.state_dict().items()}
    merged = []
    for file in (lycoris, kohya):
        applied = sdadapt.apply_lora(toy.unet, sdadapt.load_lora(file)[0]["unet"])
        try:
            merged.append({k: v.clone() for k, v in toy.unet.state_dict().items()})
        finally:
            applied.undo()
    assert any(not torch.equal(before[k], merged[1][k]) for k in before)
    assert all(torch.equal(merged[0][k], merged[1][k]) for k in before)
