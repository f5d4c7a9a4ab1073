"""A full delta (``diff`` / ``diff_b``) on a GroupNorm / LayerNorm layer — what ComfyUI's LoRA extraction writes for
every 1-D weight (``comfy_extras/nodes_lora_extract.py``) — merges as ComfyUI, Forge and SD.Next apply it
(``W + s·diff``, ``b + s·diff_b``, the same offsets as LyCORIS' ``w_norm`` / ``b_norm``) instead of refusing the
whole file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_unet_sd1

import sdadapt
from sdadapt.formats import load_lora

_NORM = "down_blocks.0.resnets.0.norm1"


@pytest.mark.parametrize("keys", [("diff", "diff_b"), ("diff",), ("diff_b",)])
def test_a_full_delta_on_a_norm_layer_merges_as_comfyui_and_forge(tmp_path, keys):
    unet = tiny_unet_sd1(seed=0)
    norm = unet.get_submodule(_NORM)
    assert isinstance(norm, torch.nn.GroupNorm)
    g = torch.Generator().manual_seed(5)
    channels = norm.weight.shape[0]
    tensors = {k: 0.1 * torch.randn(channels, generator=g) for k in keys}
    conv = "down_blocks.0.resnets.0.conv1"  # (beside a Linear/Conv2d full delta, as an extraction writes both)
    tensors_conv = 0.01 * torch.randn(unet.get_submodule(conv).weight.shape, generator=g)
    file = tmp_path / "extracted.safetensors"
    save_file({**{f"lora_unet_{_NORM.replace('.', '_')}.{k}": v for k, v in tensors.items()},
               f"lora_unet_{conv.replace('.', '_')}.diff": tensors_conv}, str(file))
    weight, bias, conv_weight = norm.weight.detach().clone(), norm.bias.detach().clone(), \
        unet.get_submodule(conv).weight.detach().clone()
    components, _ = load_lora(file)
    applied = sdadapt.apply_lora(unet, components["unet"], scale=0.6)
    zeros = torch.zeros(channels)
    torch.testing.assert_close(norm.weight.detach(), weight + 0.6 * tensors.get("diff", zeros), rtol=0, atol=1e-7)
    torch.testing.assert_close(norm.bias.detach(), bias + 0.6 * tensors.get("diff_b", zeros), rtol=0, atol=1e-7)
    torch.testing.assert_close(unet.get_submodule(conv).weight.detach(), conv_weight + 0.6 * tensors_conv,
                               rtol=0, atol=1e-7)
    applied.undo()
    assert torch.equal(norm.weight.detach(), weight) and torch.equal(norm.bias.detach(), bias)


def test_a_full_delta_that_does_not_fit_the_norm_is_refused_naming_it():
    unet = tiny_unet_sd1(seed=0)
    channels = unet.get_submodule(_NORM).weight.shape[0]
    with pytest.raises(ValueError, match=f"{_NORM}.*does not fit"):
        sdadapt.apply_lora(unet, {f"{_NORM}.diff": torch.ones(channels + 1)})
