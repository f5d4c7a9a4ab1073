"""A1111's Refiner with any checkpoint (generate --refiner MODEL, MODEL not the SDXL refiner): the handoff between two
models of one latent space, the run's networks on the refiner too (A1111's act on whatever model is loaded); an
invariant (the model's own files as its refiner change nothing, LoRA option and tag, hypernetwork and embedding
included) and the handoff against the library's own path; the pairs refused."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.test_hires_checkpoint import _networks, other_sd  # noqa: F401  (module fixture: a second tiny SD)
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)

RUN = {"steps": 4, "sampler": "euler", "seed": 2, "overwrite": True}


def test_the_models_own_files_as_its_refiner_change_nothing(plain_sd, tmp_path):  # noqa: F811
    """--refiner the same weights under another path, switching half way: the image is the run without a refiner —
    with a LoRA option, a LoRA prompt tag, a hypernetwork and an embedding, each of which must act on the refiner's
    calls too for that to hold; the log says each was applied there."""
    from sdadapt.jobs.generate import run_generate

    lora, hypernetwork, embedding = _networks(plain_sd, tmp_path)
    shutil.copy(lora, tmp_path / "tagged.safetensors")
    same = tmp_path / "same_sd"
    shutil.copytree(plain_sd, same)
    common = dict(RUN, model=str(plain_sd), prompt="a zorg house <lora:tagged:0.5>", lora_dir=str(tmp_path),
                  loras=[f"{lora}:0.8"], hypernetworks=[f"{hypernetwork}:0.6"], embeddings=[str(embedding)])
    alone = run_generate(out=str(tmp_path / "a.png"), **common)
    said = []
    refined = run_generate(out=str(tmp_path / "b.png"), refiner=str(same), refiner_switch_at=0.5, log=said.append,
                           **common)
    assert np.array_equal(alone["pixels"][0], refined["pixels"][0])
    assert any(line.startswith(f"applied {lora} at 0.8 on the refiner") for line in said)
    assert any("(<lora:tagged:0.5>) on the refiner" in line for line in said)
    assert refined["hypernetworks"][0]["refiner_layers"] == refined["hypernetworks"][0]["layers"]
    assert "Refiner: same_sd, Refiner switch at: 0.5" in refined["infotexts"][0]


def test_another_model_takes_the_calls_below_the_cut(plain_sd, other_sd, tmp_path):  # noqa: F811
    """A different SD checkpoint as the refiner: the image is the library's handoff run (the base's calls above the
    cut, the refiner's below, decoded by the refiner's VAE), and not the base's alone."""
    from sdadapt.images import to_uint8
    from sdadapt.jobs.generate import run_generate
    from sdadapt.jobs.generate_refiner import sample_base_then_refiner
    from sdadapt.jobs.models import load_system

    result = run_generate(out=str(tmp_path / "r.png"), model=str(plain_sd), prompt="a photo", refiner=str(other_sd),
                          refiner_switch_at=0.5, **RUN)
    base, refiner = load_system(str(plain_sd)), load_system(str(other_sd))
    said = []
    images = sample_base_then_refiner(base, refiner, ["a photo"], switch_at=0.5, steps=4, sampler="euler", seed=2,
                                      log=said.append)
    assert said == ["refiner: 2 model calls on the base, 2 on the refiner (switch at 0.5: timesteps below 500)"]
    assert np.abs(to_uint8(images[0]).astype(int) - result["pixels"][0].astype(int)).max() <= 1
    alone = run_generate(out=str(tmp_path / "a.png"), model=str(plain_sd), prompt="a photo", **RUN)
    assert not np.array_equal(alone["pixels"][0], result["pixels"][0])


def _standin(*, channels=4, in_channels=4, scaling=0.18215, refiner=False, sdxl=False, class_embed=None, edm=None):
    acp = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0).float()
    return SimpleNamespace(is_refiner=refiner, is_sdxl=sdxl, vae=SimpleNamespace(config=SimpleNamespace(
        latent_channels=channels)), unet=SimpleNamespace(config=SimpleNamespace(in_channels=in_channels,
                                                                                class_embed_type=class_embed)),
        scaling_factor=scaling, vae_factor=8, prediction_type="epsilon", alphas_cumprod=acp, edm=edm)


def test_pairs_a_model_refiner_cannot_take_are_refused():
    from sdadapt.jobs.generate_refiner import check_refiner_pair

    check_refiner_pair(_standin(), _standin())  # (SD 1.5 -> another SD 1.5)
    for base, refiner, match in (
            (_standin(), _standin(scaling=0.13025), "latent space"),  # (SD 1.5 -> SDXL: another VAE)
            (_standin(), _standin(in_channels=9), "image conditioning"),  # (an inpainting model)
            (_standin(), _standin(class_embed="projection"), "image conditioning"),  # (unCLIP)
            (_standin(), _standin(edm=object()), "EDM model"),
            (_standin(refiner=True, sdxl=True, scaling=0.13025), _standin(scaling=0.13025, sdxl=True),
             "--model is the SDXL refiner"),
            (SimpleNamespace(), _standin(), "toy model")):
        with pytest.raises(ValueError, match=match):
            check_refiner_pair(base, refiner)


def test_a_model_refiner_with_switched_loras_and_the_refiner_options_is_refused(plain_sd, other_sd,  # noqa: F811
                                                                                tmp_path):
    from sdadapt.jobs.generate import run_generate

    lora, _, _ = _networks(plain_sd, tmp_path)
    common = dict(RUN, model=str(plain_sd), out=str(tmp_path / "o.png"), refiner=str(other_sd), lora_dir=str(tmp_path))
    with pytest.raises(ValueError, match="hires prompt with tags of its own"):
        run_generate(prompt="a house", hires_scale=1.5, hires_prompt="a house <lora:style:0.5>", **common)
    with pytest.raises(ValueError, match="--refiner-empty-negative zeros: .* is not the SDXL refiner"):
        run_generate(prompt="a house", refiner_empty_negative="zeros", **common)
    assert not (tmp_path / "o.png").exists()
    assert lora.exists()
