"""Review of the inpainting conv_in adapter (commit 1173144): a DoRA delta made for a 4-channel conv_in is refused on
an inpainting model's 9-channel conv_in by every application path, naming the layer and the reason (DoRA's delta
reads the base weight, which has 9 input channels: A1111's pad of ΔW does not define it)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdadapt import apply_lora, load_adapter


def _inpainting_conv_in() -> nn.Module:
    model = nn.Module()
    model.add_module("conv_in", nn.Conv2d(9, 6, 3, padding=1))
    return model


def _dora_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"conv_in.lora_down.weight": torch.randn(2, 4, 3, 3, generator=g),
            "conv_in.lora_up.weight": torch.randn(6, 2, 1, 1, generator=g),
            "conv_in.alpha": torch.tensor(1.0), "conv_in.dora_scale": torch.rand(6, 1, 1, 1, generator=g) + 0.5}


@pytest.mark.parametrize("apply", [apply_lora, load_adapter])
def test_a_dora_conv_in_delta_on_an_inpainting_conv_in_is_refused_naming_why(apply):
    model = _inpainting_conv_in()
    before = model.conv_in.weight.detach().clone()
    with pytest.raises(ValueError, match=r"conv_in: a DoRA delta made for a 4-channel conv_in .*DoRA reads the base weight"):
        apply(model, _dora_state())
    assert torch.equal(model.conv_in.weight, before)
    assert not any(".sdadapt" in name for name, _ in model.named_modules())


def test_channel_pad_adapter_refuses_an_adapter_it_cannot_pad():
    """ChannelPadAdapter pads an additive delta of fewer input channels: a DoRA module (its merge reads the base
    weight) or one already as wide as the layer is refused at construction."""
    from sdadapt.adapters.base import geometry_of
    from sdadapt.adapters.input_pad import ChannelPadAdapter
    from sdadapt.adapters.registry import adapter_from_file_tensors

    layer = geometry_of(nn.Conv2d(9, 6, 3, padding=1))
    narrow = geometry_of(nn.Conv2d(4, 6, 3, padding=1))
    state = {k.removeprefix("conv_in."): v for k, v in _dora_state().items()}
    plain = {k: v for k, v in state.items() if k != "dora_scale"}
    ChannelPadAdapter(adapter_from_file_tensors(narrow, plain), layer)  # (the case it is for)
    with pytest.raises(ValueError, match="pads an additive adapter"):
        ChannelPadAdapter(adapter_from_file_tensors(narrow, state), layer)
    wide = dict(plain, **{"lora_down.weight": torch.randn(2, 9, 3, 3)})
    with pytest.raises(ValueError, match="pads an additive adapter"):
        ChannelPadAdapter(adapter_from_file_tensors(layer, wide), layer)
