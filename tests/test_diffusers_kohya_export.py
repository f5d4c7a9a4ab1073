"""The kohya file diffusers' SDXL DreamBooth LoRA script writes with ``--output_kohya_format``
(train_dreambooth_lora_sdxl.py: ``convert_all_state_dict_to_peft`` then ``convert_state_dict_to_kohya``): its UNet keys
keep peft's ``<layer>_lora.down.weight`` and its DoRA magnitudes come out as ``<prefix>.<rest>.lora_magnitude_vector``;
sdadapt read neither ("not kohya LoRA keys") and reads both now, as the factors that were written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import sdadapt

pytest.importorskip("diffusers")
pytest.importorskip("peft")


def _components(dora: bool) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    layers = {"unet": ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
                       "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0"],
              "text_encoder": ["text_model.encoder.layers.0.self_attn.k_proj"],
              "text_encoder_2": ["text_model.encoder.layers.1.self_attn.v_proj"]}
    out: dict[str, dict[str, torch.Tensor]] = {}
    for component, paths in layers.items():
        state = out.setdefault(component, {})
        for path in paths:
            state[f"{path}.lora_down.weight"] = torch.randn(4, 32, generator=g)
            state[f"{path}.lora_up.weight"] = torch.randn(16, 4, generator=g)
            state[f"{path}.alpha"] = torch.tensor(4.0)  # (alpha = rank: the script's, the only one its file keeps)
            if dora:
                state[f"{path}.dora_scale"] = torch.rand(16, 1, generator=g) + 0.5
    return out


@pytest.mark.parametrize("dora", [False, True])
def test_the_scripts_kohya_export_reads_as_what_was_written(tmp_path, dora):
    from diffusers.utils.state_dict_utils import (
        convert_all_state_dict_to_peft,
        convert_state_dict_to_diffusers,
        convert_state_dict_to_kohya,
    )

    written = _components(dora)
    sdadapt.save_lora(tmp_path / "peft.safetensors", written, format="diffusers")
    peft_layers = load_file(tmp_path / "peft.safetensors")  # (peft's keys, as get_peft_model_state_dict gives them)
    saved = {}  # the script: convert_state_dict_to_diffusers per model, then save_lora_weights' component prefixes
    for component in written:
        mine = {k[len(component) + 1:]: v for k, v in peft_layers.items() if k.startswith(component + ".")}
        saved.update({f"{component}.{k}": v for k, v in convert_state_dict_to_diffusers(mine).items()})
    peft_state = convert_all_state_dict_to_peft(saved)
    kohya_state = {k: v.contiguous() for k, v in convert_state_dict_to_kohya(peft_state).items()}
    assert any(k.endswith("_lora.down.weight") for k in kohya_state)  # (the form the script really writes)
    if dora:
        assert any(k.endswith(".lora_magnitude_vector") for k in kohya_state)
    save_file(kohya_state, tmp_path / "kohya.safetensors")
    read, _ = sdadapt.load_lora(tmp_path / "kohya.safetensors")
    assert read.keys() == written.keys()
    for component, state in written.items():
        for key, tensor in state.items():
            if key.endswith(".alpha") and key not in read[component]:
                continue  # (the export keeps no UNet alpha: alpha = rank, the default)
            assert torch.equal(read[component][key].reshape(tensor.shape).to(tensor.dtype), tensor), (component, key)
