"""Tiny random SD1 and SDXL single-file checkpoints (LDM keys, no sdadapt config metadata) for tests.

They follow the real models' rules that shapes cannot tell (SD1: 8 heads; SDXL: 64-wide heads;
GroupNorm 32; CLIP heads 64 wide) with the real 49408-token CLIP vocabulary, so
:meth:`sdadapt.diffusers_system.DiffusersSystem.from_single_file` reads them exactly as it reads
a downloaded SD1.5 or SDXL file (SDXL: two layers per block, as the real one, which diffusers'
LoRA key conversion assumes). The VAE downsamples by 2 and the UNet by 2: sides are multiples of 4.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

VOCAB = 49408


def _clip(seed: int, *, open_clip: bool, projection: int | None = None):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act="gelu" if open_clip else "quick_gelu", bos_token_id=49406,
        eos_token_id=49407, pad_token_id=1, **({"projection_dim": projection} if projection else {}),
    )
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    return cls(config).eval()


def _vae(seed: int, scaling: float):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
        scaling_factor=scaling,
    ).eval()


def tiny_sd1_parts(seed: int = 0) -> dict:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    return {"unet": unet, "vae": _vae(seed + 1, 0.18215), "text_encoder": _clip(seed + 2, open_clip=False)}


def tiny_sdxl_parts(seed: int = 0) -> dict:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=128, attention_head_dim=(1, 2), use_linear_projection=True,
        transformer_layers_per_block=(1, 2), addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32, norm_num_groups=32,
    ).eval()
    return {"unet": unet, "vae": _vae(seed + 1, 0.13025), "text_encoder": _clip(seed + 2, open_clip=False),
            "text_encoder_2": _clip(seed + 3, open_clip=True, projection=32)}


def write_single_file(parts: dict, path: Path, *, architecture: str, ckpt: bool = False) -> Path:
    """The parts as an LDM single file (``.safetensors``, or a ``.ckpt`` pickle of ``{"state_dict": ...}``)."""
    from sdadapt.formats.files import write_safetensors
    from sdadapt.formats.model_keys import diffusers_to_ldm

    state = {}
    for component, module in parts.items():
        for key, value in module.state_dict().items():
            if key.endswith("position_ids"):
                continue
            if component.startswith("text_encoder") and not key.startswith(("text_model.", "text_projection")):
                key = "text_model." + key
            state[f"{component}.{key}"] = value.detach().clone()
    ldm = diffusers_to_ldm(state, architecture=architecture)
    if ckpt:
        torch.save({"state_dict": ldm, "global_step": 1}, path)
        return path
    write_safetensors(path, ldm, {})
    return path


def tiny_sd1_file(path: Path, **options) -> Path:
    return write_single_file(tiny_sd1_parts(), path, architecture="sd1", **options)


def tiny_sdxl_file(path: Path, **options) -> Path:
    return write_single_file(tiny_sdxl_parts(), path, architecture="sdxl", **options)
