"""Training leftovers in an LDM checkpoint — the VAE's loss module (``first_stage_model.loss.*``, from a careless VAE
bake) and an old textual-inversion ``embedding_manager.*`` — are dropped with a note, as diffusers' single-file loader
ignores them (A1111 filters ``loss`` keys), instead of refusing the whole checkpoint; keys inside the UNet that no
rule maps are still refused (an SD3 / Flux file is not read as Stable Diffusion)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_checkpoints import tiny_sd1_file

from sdadapt.diffusers_system import DiffusersSystem


def test_training_leftovers_are_dropped_and_the_model_is_the_same(tmp_path):
    clean = tiny_sd1_file(tmp_path / "clean.safetensors")
    state = load_file(clean)
    extra = {"first_stage_model.loss.logvar": torch.zeros(()),
             "first_stage_model.loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
             "embedding_manager.embedding_parameters.0": torch.randn(1, 64)}
    save_file({**state, **extra}, str(tmp_path / "baked.safetensors"))
    ours, reference = DiffusersSystem.from_single_file(tmp_path / "baked.safetensors"), DiffusersSystem.from_single_file(clean)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(reference, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    save_file({**state, "model.diffusion_model.joint_blocks.0.x.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(Exception, match="joint_blocks"):
        DiffusersSystem.from_single_file(tmp_path / "other.safetensors")
