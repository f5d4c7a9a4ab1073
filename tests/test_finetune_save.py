"""Fine-tune / DreamBooth results are whole models other tools load: LDM single files and diffusers
folders for diffusers systems (read back by diffusers' own single-file converter and
``from_pretrained``), toy-system files for the toy (``load_toy`` / ``--model``)."""

from __future__ import annotations

import pytest
import torch

from sdadapt.methods import METHODS
from sdadapt.toy import load_toy


def _tune(system, seed=0):
    adaptation = METHODS["full"].adapt(system, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adaptation.params:
            p.add_(torch.randn(p.shape, generator=generator) * 0.01)
    return adaptation


def test_toy_fine_tune_saves_a_toy_system_file_that_loads_back(tmp_path):
    from sdadapt.jobs import load_system

    system = load_toy()
    adaptation = _tune(system)
    path = adaptation.save(tmp_path / "tuned.safetensors")
    again = load_system(str(path))
    for part in ("unet", "text_encoder", "clip"):
        mine, theirs = getattr(system, part).state_dict(), getattr(again, part).state_dict()
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert torch.equal(mine[key], theirs[key]), f"{part}.{key}"
    with pytest.raises(FileExistsError):
        adaptation.save(path)
    adaptation.remove()


def test_toy_fine_tune_extracts_a_lora_against_the_shipped_toy(tmp_path):
    from sdadapt.loratools import extract_lora
    from sdadapt.toy.system import DEFAULT_WEIGHTS

    system = load_toy()
    adaptation = _tune(system)
    tuned = adaptation.save(tmp_path / "tuned.safetensors")
    adaptation.remove()
    report = extract_lora(DEFAULT_WEIGHTS, tuned, tmp_path / "lora.safetensors", rank=4)
    assert report.layers, "the toy fine-tune's UNet layers are LoRA targets"


@pytest.fixture()
def diffusers_system(tmp_path):
    pytest.importorskip("diffusers")
    from test_cli_train import _tiny_pipeline

    from sdadapt.diffusers_system import DiffusersSystem

    return DiffusersSystem.from_folder(_tiny_pipeline(tmp_path / "sd"))


def test_ldm_checkpoint_reads_back_through_diffusers_single_file_converters(diffusers_system, tmp_path):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import load_file

    system = diffusers_system
    adaptation = _tune(system)
    path = adaptation.save(tmp_path / "tuned.safetensors", metadata={"note": "test"})
    ldm = load_file(path)
    assert any(k.startswith("model.diffusion_model.") for k in ldm)
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in ldm)
    assert any(k.startswith("first_stage_model.") for k in ldm)
    unet = convert_ldm_unet_checkpoint(ldm, system.unet.config)
    for key, value in system.unet.state_dict().items():
        assert torch.equal(unet[key], value), key
    vae = convert_ldm_vae_checkpoint(ldm, system.vae.config)
    for key, value in system.vae.state_dict().items():
        assert torch.equal(vae[key].reshape(value.shape), value), key
    text = {k[len("cond_stage_model.transformer."):]: v for k, v in ldm.items() if k.startswith("cond_stage_model.transformer.")}
    mine = system.text_encoder.state_dict()
    for key, value in mine.items():
        want = key if key.startswith("text_model.") else "text_model." + key
        assert torch.equal(text[want], value), key
    adaptation.remove()


def test_diffusers_folder_reads_back_with_from_pretrained(diffusers_system, tmp_path):
    import diffusers

    system = diffusers_system
    adaptation = _tune(system)
    folder = adaptation.save(tmp_path / "tuned", dtype=torch.float16)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for key, value in system.unet.state_dict().items():
        assert torch.equal(pipe.unet.state_dict()[key], value.to(torch.float16)), key
    for key, value in system.text_encoder.state_dict().items():
        assert torch.equal(pipe.text_encoder.state_dict()[key], value.to(torch.float16)), key
    assert system.unet.dtype == torch.float32, "saving in fp16 must not cast the live model"
    adaptation.remove()


def test_toy_fine_tune_refuses_an_ema_beside_its_weights(tmp_path):
    from sdadapt.methods.finetune import EMAWeights

    system = load_toy()
    adaptation = _tune(system)
    ema = EMAWeights(adaptation.unet_weights(), 0.99, 3)
    with pytest.raises(TypeError, match="cannot store an EMA"):
        adaptation.save(tmp_path / "tuned.safetensors", ema=ema)
    assert not (tmp_path / "tuned.safetensors").exists()
    adaptation.remove()
