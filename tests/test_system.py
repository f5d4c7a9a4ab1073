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
