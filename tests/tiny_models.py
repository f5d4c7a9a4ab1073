"""Tiny random models for tests (no downloads): diffusers UNets in SD1 and SDXL layouts, CLIP."""

from __future__ import annotations

import pytest
import torch


_SD_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=8,
    norm_num_groups=8,
    use_linear_projection=False,
)


def _unet(seed: int, **changes):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    return diffusers.UNet2DConditionModel(**{**_SD_UNET, **changes}).eval()


def tiny_unet_sd1(seed: int = 0):
    """SD1-style UNet2DConditionModel: conv proj_in/proj_out, cross-attention dim 32."""
    return _unet(seed)


def tiny_unet_sd2(seed: int = 0):
    """SD2-style: Linear proj_in/proj_out (use_linear_projection), per-block head dims."""
    return _unet(seed, attention_head_dim=(4, 8), use_linear_projection=True)


def tiny_unet_sdxl(seed: int = 0):
    """SDXL-style UNet: linear projections, text_time add-embedding, no attention in block 0."""
    return _unet(
        seed,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(4, 8),
        use_linear_projection=True,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 32,
    )


def unet_inputs(unet, *, batch: int = 2, seed: int = 1, sdxl: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500][:batch] + [1] * max(0, batch - 2))
    ctx = torch.randn(batch, 5, 32, generator=g)
    kwargs = {}
    if sdxl:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, 32, generator=g),
            "time_ids": torch.randn(batch, 6, generator=g),
        }
    return (x, t, ctx), kwargs


def run_unet(unet, inputs) -> torch.Tensor:
    args, kwargs = inputs
    with torch.no_grad():
        return unet(*args, **kwargs).sample


def tiny_clip(seed: int = 0, *, with_projection: bool = False):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=99,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        projection_dim=16,
    )
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(config).eval()


class ConvDenoiser(torch.nn.Module):
    """The smallest denoiser a training step takes, ``model(x_t, t, cond)``: one 1x1 convolution of
    4-channel latents, (B, 4, H, W) -> (B, 4, H, W); ``t`` and ``cond`` unused."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 1)

    def forward(self, x, t, cond):
        return self.conv(x)
