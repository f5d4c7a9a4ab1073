"""A diffusers folder sdadapt writes holds its text encoders under the names every hub folder has
(``text_model.…``; SDXL's ``text_projection.weight`` beside them): transformers 5 saves a ``CLIPTextModel`` without
``text_model.``, which transformers 4 (kohya's, A1111's pins) loads as a randomly initialised encoder with only a
warning, and which diffusers' ``convert_diffusers_to_original_stable_diffusion.py`` writes under the wrong LDM names."""

from __future__ import annotations

import pytest
import torch
from tiny_systems import tiny_diffusers_system

from sdadapt.formats.files import read_safetensors

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("sdxl", [False, True])
def test_text_encoder_files_use_the_hub_names_and_load_back_exactly(tmp_path, sdxl):
    system = tiny_diffusers_system(tmp_path / "tok", max_token_length=75, sdxl=sdxl)
    folder = system.save_model(tmp_path / "folder")
    encoders = ("text_encoder", "text_encoder_2") if sdxl else ("text_encoder",)
    for name in encoders:
        state, _ = read_safetensors(folder / name / "model.safetensors")
        assert state and all(k.startswith("text_model.") or k == "text_projection.weight" for k in state), sorted(state)[:3]
        module = getattr(system, name)
        loaded = type(module).from_pretrained(folder / name).eval()
        ids = torch.tensor([[49406 % module.config.vocab_size, 5, 7, 9]])
        with torch.no_grad():
            assert torch.equal(loaded(ids)[0], module(ids)[0])
        assert ("text_projection.weight" in state) == (name == "text_encoder_2")
