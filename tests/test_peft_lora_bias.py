"""peft's ``lora_bias=True`` (a bias on ``lora_B``, merged as ``bias += lora_B.bias · scale``): read as the layer's
``diff_b`` (the bias delta sdadapt, ComfyUI and A1111 add at the strength) and written back, against real peft both
ways — it was refused as "not peft LoRA keys"."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
from tiny_models import run_unet, tiny_unet_sd1, unet_inputs

import sdadapt
from sdadapt.formats import load_lora, save_peft

_BIASED = ["to_out.0", "proj_in", "ff.net.2", "conv1", "conv_shortcut", "time_emb_proj"]


@pytest.mark.filterwarnings("ignore:Adapter .default.. .* invalid shape")  # (peft 0.21 takes lora_B.bias for a shard)
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_bias_folders_read_and_write_as_peft_merges_them(tmp_path, rslora):
    inputs = unet_inputs(tiny_unet_sd1())
    wrapped = peft.get_peft_model(tiny_unet_sd1(), peft.LoraConfig(r=4, lora_alpha=8, lora_bias=True, use_rslora=rslora,
                                                                    target_modules=_BIASED))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in wrapped.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
        want = run_unet(wrapped, inputs)
        base = run_unet(tiny_unet_sd1(), inputs)
    wrapped.save_pretrained(str(tmp_path / "peft"))
    components, _ = load_lora(tmp_path / "peft")
    state = components["model"]
    assert any(k.endswith(".diff_b") for k in state)
    fresh = tiny_unet_sd1()
    sdadapt.apply_lora(fresh, state)
    with torch.no_grad():
        got = run_unet(fresh, inputs)
    effect = (want - base).abs().max().item()
    assert effect > 1e-2 and (got - want).abs().max().item() < 1e-4
    # written back as a peft folder: peft rebuilds the same model
    save_peft(tmp_path / "back", state, model=tiny_unet_sd1())
    reloaded = peft.PeftModel.from_pretrained(tiny_unet_sd1(), str(tmp_path / "back")).eval()
    with torch.no_grad():
        assert (run_unet(reloaded, inputs) - want).abs().max().item() < 1e-4
