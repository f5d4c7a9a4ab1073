"""``AdapterHandle.bake()``: merge for good and remove (peft's ``merge_and_unload``); ``remove()`` after ``merge()``
restores the base, as documented (an integrator's audit found the two confused)."""

from __future__ import annotations

import pytest
import torch
from tiny_models import run_unet, tiny_unet_sd1, unet_inputs

import sdadapt
from sdadapt.adapters import DoRAConfig, LoKrConfig, LoRAConfig


def _randomised(handle, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in handle.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("config", [LoRAConfig(rank=4, alpha=2.0), DoRAConfig(LoRAConfig(rank=2)),
                                    LoKrConfig(rank=2, factor=2)], ids=["lora", "dora", "lokr"])
def test_bake_keeps_the_adapted_outputs_in_the_plain_model(config):
    pytest.importorskip("diffusers")
    unet = tiny_unet_sd1()
    keys = list(unet.state_dict())
    inputs = unet_inputs(unet)
    base = run_unet(unet, inputs)
    handle = sdadapt.inject(unet, "unet-attention", config)
    _randomised(handle, 1)
    state = {k: v.detach().clone() for k, v in handle.state_dict().items()}
    adapted = run_unet(unet, inputs)
    handle.bake()
    assert list(unet.state_dict()) == keys and not any("sdadapt" in n for n, _ in unet.named_modules())
    baked = run_unet(unet, inputs)
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(baked, adapted, rtol=1e-4, atol=1e-5)
    # the same weights as merging the saved state with apply_lora (the file path) into a fresh copy
    fresh = tiny_unet_sd1()
    sdadapt.apply_lora(fresh, state)
    for key, value in fresh.state_dict().items():
        torch.testing.assert_close(unet.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_remove_after_merge_restores_the_base_and_bake_refuses_under_another_merge():
    pytest.importorskip("diffusers")
    unet = tiny_unet_sd1()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    first = sdadapt.inject(unet, "unet-attention", LoRAConfig(rank=2), name="a")
    second = sdadapt.inject(unet, "unet-attention", LoRAConfig(rank=2), name="b")
    _randomised(first, 2)
    _randomised(second, 3)
    second.merge()
    with pytest.raises(RuntimeError, match=r"also has 'b' merged; unmerge\(\) it before baking this one"):
        first.bake()
    second.remove()  # (merge() then remove(): the base comes back)
    first.remove()
    assert all(torch.equal(before[k], v) for k, v in unet.state_dict().items())
