"""The System protocol: the shipped systems implement it, bad systems get clear errors, and saving
an adaptation takes the base-model family from the system (not a hard-coded "sd1")."""

from __future__ import annotations

import pytest
import torch

from sdadapt.formats.files import read_safetensors_header
from sdadapt.methods import METHODS, System, check_system
from sdadapt.toy import build_toy


def test_toy_system_is_a_system():
    system = build_toy(seed=0)
    assert isinstance(system, System)
    check_system(system)
    assert system.base_model == "sd1"


def test_system_models_lists_the_unet_and_each_text_encoder_in_order():
    """``text_encoders`` / ``system_models``: the networks a system has, by name, skipping a missing
    second encoder and attributes that are not modules (an SDXL system has both encoders)."""
    from types import SimpleNamespace

    from torch import nn

    from sdadapt.methods.system import TEXT_ENCODERS, system_models, text_encoders

    unet, te1, te2 = nn.Linear(2, 2), nn.Linear(2, 3), nn.Linear(3, 2)
    sd1 = SimpleNamespace(unet=unet, text_encoder=te1, text_encoder_2=None)
    sdxl = SimpleNamespace(text_encoder_2=te2, unet=unet, text_encoder=te1)
    assert TEXT_ENCODERS == ("text_encoder", "text_encoder_2")
    assert text_encoders(sd1) == [("text_encoder", te1)]
    assert system_models(sdxl) == [("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)]
    assert system_models(SimpleNamespace(unet="not a module", text_encoder=te1)) == [("text_encoder", te1)]
    toy = build_toy()
    assert [name for name, _ in system_models(toy)] == ["unet", "text_encoder"]


def test_check_system_names_what_is_missing():
    class Half:
        unet = torch.nn.Linear(1, 1)

        def tokenize(self, prompts):
            return torch.zeros(len(prompts), 1)

    with pytest.raises(TypeError, match=r"lacks text_encoder, image_size, prediction_type, base_model"):
        check_system(Half())
    with pytest.raises(TypeError, match="not a sdadapt System"):
        METHODS["lora"].adapt(Half())


def test_check_system_refuses_unknown_base_model_and_prediction_type():
    system = build_toy(seed=0)
    system.base_model = "sd3"
    with pytest.raises(ValueError, match="base_model must be one of"):
        check_system(system)
    system.base_model = "sd1"
    system.prediction_type = "flow"
    with pytest.raises(ValueError, match="prediction_type must be"):
        check_system(system)


@pytest.mark.parametrize(("base_model", "version", "v2"), [("sd1", "sd_v1", "False"), ("sd2", "sd_v2", "True")])
def test_adapter_file_metadata_comes_from_the_system(tmp_path, base_model, version, v2):
    system = build_toy(seed=0)
    system.base_model = base_model
    adaptation = METHODS["lora"].adapt(system, seed=0)
    path = adaptation.save(tmp_path / "a.safetensors")
    adaptation.remove()
    _, metadata = read_safetensors_header(path)
    assert metadata["ss_base_model_version"] == version
    assert metadata["ss_v2"] == v2


def test_diffusers_folder_system_detects_its_base_model(tmp_path):
    pytest.importorskip("diffusers")
    from test_cli_train import _tiny_pipeline

    from sdadapt.diffusers_system import DiffusersSystem

    system = DiffusersSystem.from_folder(_tiny_pipeline(tmp_path / "sd"))
    check_system(system)
    assert isinstance(system, System)
    assert system.base_model == "sd1"  # CLIP-L-style text encoder (quick_gelu)
    system.text_encoder.config.hidden_act = "gelu"  # OpenCLIP-H as converted for SD2
    rebuilt = DiffusersSystem(system.unet, system.vae, system.text_encoder, system.tokenizer,
                              {"prediction_type": "v_prediction"})
    assert rebuilt.base_model == "sd2-v"
