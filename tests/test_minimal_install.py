"""What a minimal install (torch, safetensors, numpy: no Pillow, transformers, diffusers) meets, the optional
packages made missing here by a None in ``sys.modules`` (their import then fails, as without them): one clear line
naming what to install, or the real error about the input first, or a path that needs nothing more."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import save_file

from sdadapt.cli import main


def test_upscale_and_outpainting_mk2_without_pillow_say_how_to_install_it(tmp_path, monkeypatch, capsys):
    from sdadapt.images import write_png

    write_png(tmp_path / "in.png", torch.zeros(3, 16, 16))
    monkeypatch.setitem(sys.modules, "PIL", None)
    assert main(["upscale", str(tmp_path / "in.png"), "--upscaler", "none", "--scale-by", "2",
                 "-o", str(tmp_path / "up.png")]) != 0
    err = capsys.readouterr().err
    assert "upscale reads, resizes and writes images with Pillow: pip install 'sdadapt[images]'" in err
    assert main(["generate", "--model", "toy", "--prompt", "a red circle", "--steps", "1", "--init-image",
                 str(tmp_path / "in.png"), "--outpaint-mk2", "16", "--outpaint-directions", "left", "-q",
                 "-o", str(tmp_path / "mk2.png")]) != 0
    assert "--outpaint-mk2 grows and blends the image with Pillow: pip install 'sdadapt[images]'" in \
        capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]


def test_a_text_encoder_lora_converts_to_peft_without_transformers(tmp_path, monkeypatch):
    """The text encoder's layer names take transformers 5's spelling (no ``text_model.``) when transformers is not
    there to ask — writing the folder needs nothing else from it."""
    from sdadapt.formats import peft_names

    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 8), f"{name}.lora_up.weight": torch.randn(8, 2),
               f"{name}.alpha": torch.tensor(1.0)}, str(tmp_path / "te.safetensors"))
    monkeypatch.setitem(sys.modules, "transformers", None)
    peft_names.clip_text_model_has_text_model.cache_clear()
    try:
        assert peft_names.clip_text_model_has_text_model() is False
        assert main(["convert", str(tmp_path / "te.safetensors"), "--to", "peft", "--component", "text_encoder",
                     "-q", "-o", str(tmp_path / "peft_te")]) == 0
    finally:
        peft_names.clip_text_model_has_text_model.cache_clear()
    text = (tmp_path / "peft_te" / "adapter_config.json").read_text()
    assert "encoder.layers.0.self_attn.q_proj" in text and "text_model." not in text


def test_a_model_file_that_is_no_checkpoint_is_told_so_before_the_missing_extra(tmp_path, monkeypatch):
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.formats.files import WeightFileError

    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 8), f"{name}.lora_up.weight": torch.randn(8, 2)},
              str(tmp_path / "lora.safetensors"))
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(WeightFileError, match="not a Stable Diffusion single-file checkpoint"):
        DiffusersSystem.from_single_file(tmp_path / "lora.safetensors")


def test_a_peft_text_encoder_folder_converts_to_kohya_as_a_text_encoder(tmp_path):
    """A peft folder holds one model, named only by its layers: a CLIP text encoder's (``encoder.layers.N``) is the
    text encoder without ``--component`` — it was taken for a UNet and written as ``lora_unet_encoder_layers_...``
    keys that apply to nothing; a UNet's stays the UNet; a folder whose names tell nothing asks for the flag."""
    from safetensors.torch import load_file

    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{name}.lora_down.weight": torch.randn(2, 8), f"{name}.lora_up.weight": torch.randn(8, 2),
               f"{name}.alpha": torch.tensor(1.0)}, str(tmp_path / "te.safetensors"))
    assert main(["convert", str(tmp_path / "te.safetensors"), "--to", "peft", "--component", "text_encoder", "-q",
                 "-o", str(tmp_path / "peft_te")]) == 0
    assert main(["convert", str(tmp_path / "peft_te"), "--to", "kohya", "--base-model", "sd1", "-q",
                 "-o", str(tmp_path / "back.safetensors")]) == 0
    keys = set(load_file(str(tmp_path / "back.safetensors")))
    assert f"{name}.lora_down.weight" in keys and not any(k.startswith("lora_unet_") for k in keys)
    from sdadapt.errors import InputError
    from sdadapt.loratools.convert import _adapted_component

    unet = {"down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(1)}
    assert _adapted_component(unet, "u") == "unet"
    with pytest.raises(InputError, match="give --component"):
        _adapted_component({"layer.lora_A.weight": torch.zeros(1)}, "x")
