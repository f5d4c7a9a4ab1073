"""Tiny random DiffusersSystems for the text-conditioning tests (long prompts, weighted captions): no hub access."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from embedding_models import tiny_clip_text, tiny_tokenizer

__all__ = ["tiny_diffusers_system"]


def tiny_diffusers_system(folder: Path, *, max_token_length: int, sdxl: bool = False, clip_skip: int = 1,
                          pad: str = "eos"):
    """A frozen, eval-mode ``DiffusersSystem`` (ε-prediction) of tiny random parts whose byte-level CLIP
    tokenizers (saved under ``folder``) read 77-token windows.

    SD1 layout: one text encoder of width 32. ``sdxl=True``: two text encoders of width 16 (the
    second with a 32-wide projection, its tokenizer padding with "!") and an SDXL-conditioned UNet.
    ``pad="!"`` makes the first tokenizer pad with "!" instead of its EOS.
    """
    diffusers = pytest.importorskip("diffusers")
    from sdadapt.diffusers_system import DiffusersSystem

    tokenizer = tiny_tokenizer(folder / "tok", max_length=77)
    if pad == "!":
        tokenizer.pad_token = "!"
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                                  layers_per_block=1, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4)
    unet_kw = {"sample_size": 8, "in_channels": 4, "out_channels": 4, "layers_per_block": 1, "block_out_channels": (16, 32),
               "cross_attention_dim": 32, "attention_head_dim": 4, "norm_num_groups": 8}
    text = {"max_length": 77, "projection_dim": 32}
    extra = {}
    if sdxl:
        unet = diffusers.UNet2DConditionModel(
            **unet_kw, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 32)
        second = tiny_tokenizer(folder / "tok2", max_length=77)
        second.pad_token = "!"
        extra = {"text_encoder_2": tiny_clip_text(hidden=16, seed=2, projection=True, **text), "tokenizer_2": second}
        text_encoder = tiny_clip_text(hidden=16, seed=1, **text)
    else:
        unet = diffusers.UNet2DConditionModel(**unet_kw, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                              up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
        text_encoder = tiny_clip_text(hidden=32, seed=1, **text)
    system = DiffusersSystem(unet, vae, text_encoder, tokenizer, {"prediction_type": "epsilon"}, clip_skip=clip_skip,
                             max_token_length=max_token_length, **extra)
    system.requires_grad_(False)
    return system.eval()
