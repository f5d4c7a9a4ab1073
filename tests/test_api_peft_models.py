"""A model peft has wrapped is refused by name (it was adapted silently wrong: ``inject`` skipped the wrapped layers,
``save_kohya`` wrote ``base_model.model.`` names, ``apply_lora`` said "cannot adapt a Linear")."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_clip, tiny_unet_sd1

import sdadapt
from sdadapt.adapters import LoRAConfig

peft = pytest.importorskip("peft")


def test_a_model_with_peft_layers_is_refused_naming_a_layer_and_the_way_out():
    unet = tiny_unet_sd1()
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    unet.add_adapter(peft.LoraConfig(r=4, target_modules=["to_q", "to_k"]))
    for call in (lambda: sdadapt.inject(unet, "unet-attention", LoRAConfig(rank=2)),
                 lambda: sdadapt.apply_lora(unet, {}),
                 lambda: sdadapt.select(unet, "unet-attention")):
        with pytest.raises(ValueError, match=r"holds peft adapter layers \(e\.g\. .*to_q: peft\.tuners\.lora.*fuse_lora"):
            call()
    unet.unload_lora()  # (a way out the message names: then sdadapt adapts the plain model, every layer)
    assert unet.state_dict().keys() == before.keys()
    handle = sdadapt.inject(unet, "unet-attention", LoRAConfig(rank=2))
    assert {name.rsplit(".", 1)[-1] for name in handle.modules} >= {"to_q", "to_k", "to_v"}
    handle.remove()


def test_a_peft_model_is_refused_naming_merge_and_unload():
    model = peft.get_peft_model(tiny_clip(), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match=r"got a peft PeftModel; pass the plain model: merge its adapters"):
        sdadapt.inject(model, "text-encoder", LoRAConfig(rank=2))
    assert torch.is_tensor(next(model.parameters()))


def test_a_kohya_files_raw_keys_name_load_lora():
    model = torch.nn.Module()
    model.to_q = torch.nn.Linear(4, 4)
    state = {"lora_unet_to_q.lora_down.weight": torch.zeros(2, 4), "lora_unet_to_q.lora_up.weight": torch.zeros(4, 2)}
    for call in (sdadapt.apply_lora, sdadapt.load_adapter):
        with pytest.raises(ValueError, match=r"a kohya / LyCORIS file's keys .* sdadapt\.load_lora\(path\)"):
            call(model, state)


def test_a_front_end_finds_a_peft_folders_component_with_its_own_pipeline(tmp_path):
    """``sdadapt.formats.peft_component``: public, any object with unet / text_encoder modules (a pipeline)."""
    from types import SimpleNamespace

    from sdadapt.formats import load_lora, peft_component, save_peft

    pipe = SimpleNamespace(unet=tiny_unet_sd1(), text_encoder=tiny_clip())
    for name, target in (("text_encoder", "text-encoder"), ("unet", "unet-attention")):
        handle = sdadapt.inject(getattr(pipe, name), target, LoRAConfig(rank=2))
        save_peft(tmp_path / name, handle.state_dict(), model=getattr(pipe, name))
        handle.remove()
        components, _ = load_lora(tmp_path / name)
        assert peft_component(pipe, components["model"], source=str(tmp_path / name)) == name
