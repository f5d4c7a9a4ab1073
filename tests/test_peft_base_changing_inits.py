"""peft folders whose ``init_lora_weights`` changed the base weight (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) are refused
with the way out, instead of read as a plain LoRA of the original model: peft rebuilds that changed base when it
loads such a folder, so its factors alone were 2.7x the adapter's own effect off, with ``convert`` reporting
``max |ΔW| 0``. The folder peft converts for sharing (``path_initial_model_for_weight_conversion``: rank 2r on the
original base) reads exactly; a peft OFT folder names why it is not read."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
from tiny_models import run_unet, tiny_unet_sd1, unet_inputs

import sdadapt
from sdadapt.formats import WeightFileError, load_lora

_TARGETS = ["to_out.0", "ff.net.2", "to_q", "time_emb_proj"]


def _trained(init, seed=3):
    model = tiny_unet_sd1()
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=init,
                                                         target_modules=_TARGETS))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in wrapped.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g) * 0.05)
    return wrapped


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_changing_inits_are_refused_and_their_conversion_reads_exactly(tmp_path, init):
    inputs = unet_inputs(tiny_unet_sd1())
    trained = _trained(init)
    with torch.no_grad():
        want = run_unet(trained, inputs)
    trained.save_pretrained(str(tmp_path / "plain"))
    with pytest.raises(WeightFileError, match="init_lora_weights.*path_initial_model_for_weight_conversion"):
        load_lora(tmp_path / "plain")
    # peft's own conversion: the initial adapter saved first, then the trained one as a LoRA of the original base
    peft.get_peft_model(tiny_unet_sd1(), peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=init,
                                                          target_modules=_TARGETS)).save_pretrained(str(tmp_path / "init"))
    trained.save_pretrained(str(tmp_path / "shared"), path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    components, _ = load_lora(tmp_path / "shared")
    fresh = tiny_unet_sd1()
    with torch.no_grad():
        base = run_unet(fresh, inputs)
    sdadapt.apply_lora(fresh, components["model"])
    with torch.no_grad():
        got = run_unet(fresh, inputs)
    effect = (want - base).abs().max().item()
    assert effect > 1e-2 and (got - want).abs().max().item() < 1e-4 * max(1.0, effect)


def test_a_peft_oft_folder_says_why_it_is_not_read(tmp_path):
    model = tiny_unet_sd1()
    wrapped = peft.get_peft_model(model, peft.OFTConfig(r=0, oft_block_size=4, target_modules=["to_q", "to_k"]))
    wrapped.save_pretrained(str(tmp_path / "oft"))
    with pytest.raises(WeightFileError, match="peft_type 'OFT'.*rotate"):
        load_lora(tmp_path / "oft")


@pytest.mark.parametrize("option", [{"modules_to_save": ["conv_out"]}, {"bias": "lora_only"}])
def test_whole_tensors_beside_the_lora_are_named(tmp_path, option):
    wrapped = peft.get_peft_model(tiny_unet_sd1(), peft.LoraConfig(r=2, target_modules=["to_q"], **option))
    wrapped.save_pretrained(str(tmp_path / "p"))
    with pytest.raises(WeightFileError, match=next(iter(option))):
        load_lora(tmp_path / "p")
