"""Review of merge-lora (commits 1173144, 8eb03ad): a plain model's 4-channel ``conv_in`` delta on an inpainting
checkpoint's 9-channel ``conv_in`` is baked as ``apply_lora`` / ``generate --lora`` apply it.

A1111's Lora extension (extensions-builtin/Lora/networks.py ``network_apply_weights``) zero-pads such a delta's
input channels 4 -> 9; sdadapt's ``apply_lora`` and ``load_adapter`` do (sdadapt.adapters.input_pad), and
merge-lora's contract is ``apply_lora`` in turn (sdadapt.loratools.bake's module doc). Reference here: float64
``W + pad(alpha / r · up @ down)`` on the latent channels, the mask and masked-image channels unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_checkpoints import tiny_sd1_file

from sdadapt.loratools.bake import merge_loras_into_checkpoint

KEY = "model.diffusion_model.input_blocks.0.0.weight"


def test_merge_lora_pads_a_4_channel_conv_in_delta_on_an_inpainting_checkpoint(tmp_path):
    state = load_file(tiny_sd1_file(tmp_path / "sd1.safetensors"))
    g = torch.Generator().manual_seed(0)
    weight = state[KEY]  # (out, 4, 3, 3) -> an inpainting conv_in (out, 9, 3, 3)
    state[KEY] = torch.cat([weight, torch.randn(weight.shape[0], 5, *weight.shape[2:], generator=g)], dim=1)
    save_file(state, str(tmp_path / "inpainting.safetensors"))
    down, up = torch.randn(2, 4, 3, 3, generator=g), torch.randn(weight.shape[0], 2, 1, 1, generator=g)
    save_file({"lora_unet_conv_in.lora_down.weight": down, "lora_unet_conv_in.lora_up.weight": up,
               "lora_unet_conv_in.alpha": torch.tensor(1.0)}, str(tmp_path / "locon.safetensors"))
    merge_loras_into_checkpoint(tmp_path / "inpainting.safetensors", [tmp_path / "locon.safetensors"],
                                tmp_path / "out.safetensors", strengths=0.75)
    got = load_file(tmp_path / "out.safetensors")
    delta = (up.double().flatten(1) @ down.double().flatten(1)).reshape(weight.shape[0], 4, 3, 3) * (1.0 / 2) * 0.75
    want = state[KEY].double() + F.pad(delta, (0, 0, 0, 0, 0, 5))
    torch.testing.assert_close(got[KEY].double(), want, rtol=1e-6, atol=1e-6)
    assert torch.equal(got[KEY][:, 4:], state[KEY][:, 4:])  # (mask and masked-image channels: untouched)
    assert all(torch.equal(got[k], v) for k, v in state.items() if k != KEY)



def test_merge_lora_scales_a_full_delta_bias_by_the_strength(tmp_path):
    """LyCORIS ``full`` (``diff`` + ``diff_b``) baked at strength s: ``W + s·diff`` and ``b + s·diff_b``, as
    ``apply_lora`` (and A1111's network_full.py, ``bias = ex_bias * multiplier``) give."""
    state = load_file(tiny_sd1_file(tmp_path / "sd1.safetensors"))
    key = "model.diffusion_model.input_blocks.1.1.proj_in"
    weight, bias = state[f"{key}.weight"], state[f"{key}.bias"]
    g = torch.Generator().manual_seed(4)
    diff, diff_b = torch.randn(weight.shape, generator=g), torch.randn(bias.shape, generator=g)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.diff": diff,
               "lora_unet_down_blocks_0_attentions_0_proj_in.diff_b": diff_b}, str(tmp_path / "full.safetensors"))
    merge_loras_into_checkpoint(tmp_path / "sd1.safetensors", [tmp_path / "full.safetensors"], tmp_path / "out.safetensors",
                                strengths=0.5)
    got = load_file(tmp_path / "out.safetensors")
    torch.testing.assert_close(got[f"{key}.weight"].double(), weight.double() + 0.5 * diff.double())
    torch.testing.assert_close(got[f"{key}.bias"].double(), bias.double() + 0.5 * diff_b.double())


def test_merge_lora_keeps_what_the_model_is_not_the_bases_title_or_hashes(tmp_path):
    """The baked checkpoint holds other bytes than its base: the base's ``modelspec.title``, hashes and training keys
    describe the base (kohya's merge_lora.py writes fresh ModelSpec); the fields that say what model it is stay, as a
    merge keeps them (sdadapt.merge.model_metadata.INHERITED_FIELDS)."""
    from safetensors import safe_open

    from sdadapt.merge.model_metadata import INHERITED_FIELDS

    state = load_file(tiny_sd1_file(tmp_path / "sd1.safetensors"))
    base_meta = {"modelspec.title": "Base Model", "modelspec.hash_sha256": "0xdeadbeef", "sshs_model_hash": "ab",
                 "modelspec.architecture": "stable-diffusion-v1", "modelspec.prediction_type": "epsilon",
                 "modelspec.resolution": "512x512", "ss_steps": "100", "format": "pt"}
    save_file(state, str(tmp_path / "base.safetensors"), base_meta)
    g = torch.Generator().manual_seed(5)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.diff": 0.01 * torch.randn(
        state["model.diffusion_model.input_blocks.1.1.proj_in.weight"].shape, generator=g)},
        str(tmp_path / "full.safetensors"))
    merge_loras_into_checkpoint(tmp_path / "base.safetensors", [tmp_path / "full.safetensors"],
                                tmp_path / "out.safetensors")
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert {k: v for k, v in meta.items() if k != "sdadapt.merge_lora"} == {
        k: v for k, v in base_meta.items() if k in INHERITED_FIELDS}
    assert "full.safetensors" in meta["sdadapt.merge_lora"]
