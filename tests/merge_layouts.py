"""Checkpoint key layouts for merge tests and benchmarks: real SD key names and shapes, random values.

Shapes come from diffusers / transformers models built on the ``meta`` device (no memory, no
downloads) and are converted to LDM names with :func:`sdadapt.formats.model_keys.key_plan`.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path

import torch

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, max_position_embeddings=77, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, projection_dim=1280, hidden_act="gelu")
TINY_SD1_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 16),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4,
)
TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4,
)
TINY_CLIP = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 max_position_embeddings=8, projection_dim=16)


def diffusers_shapes(
    unet: Mapping, *, vae: Mapping | None = None, clips: tuple[tuple[Mapping, bool], ...] = ()
) -> dict[str, tuple[int, ...]]:
    """``{diffusers flat key: shape}`` for the given configs; ``clips`` = ((config, with_projection), ...)."""
    import diffusers
    import transformers

    shapes: dict[str, tuple[int, ...]] = {}
    with torch.device("meta"):
        for k, v in diffusers.UNet2DConditionModel(**unet).state_dict().items():
            shapes[f"unet.{k}"] = tuple(v.shape)
        if vae is not None:
            for k, v in diffusers.AutoencoderKL(**vae).state_dict().items():
                shapes[f"vae.{k}"] = tuple(v.shape)
        for index, (config, projection) in enumerate(clips):
            cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
            model = cls(transformers.CLIPTextConfig(**config))
            name = "text_encoder" if index == 0 else "text_encoder_2"
            for k, v in model.state_dict().items():
                if not k.startswith("text_model.") and k != "text_projection.weight":
                    k = f"text_model.{k}"
                shapes[f"{name}.{k}"] = tuple(v.shape)
    return shapes


def ldm_shapes(diffusers: Mapping[str, tuple[int, ...]], *, architecture: str) -> dict[str, tuple[int, ...]]:
    """LDM names for a diffusers layout (through the shared key map)."""
    from sdadapt.formats.model_keys import key_plan

    plan, report = key_plan(diffusers, to="ldm", architecture=architecture)
    assert report.ok, report.problems()
    return {k: tuple(s.shape) for k, s in plan.items()}


@functools.lru_cache(maxsize=None)
def layout(name: str, naming: str = "ldm") -> dict[str, tuple[int, ...]]:
    """Named layouts: ``tiny-sd1`` (tiny UNet, CLIP, VAE), ``sd1-unet`` (real SD1.5 UNet + tiny CLIP/VAE), ``sdxl-unet`` (real SDXL UNet +
    tiny CLIPs/VAE), ``sd15`` and ``sdxl`` (every part full size)."""
    if name == "tiny-sd1":
        arch, shapes = "sd1", diffusers_shapes(TINY_SD1_UNET, vae=TINY_VAE, clips=((TINY_CLIP, False),))
    elif name == "sd1-unet":
        arch, shapes = "sd1", diffusers_shapes(SD15_UNET, vae=TINY_VAE, clips=((TINY_CLIP, False),))
    elif name == "sdxl-unet":
        arch, shapes = "sdxl", diffusers_shapes(SDXL_UNET, vae=TINY_VAE, clips=((TINY_CLIP, False), (TINY_CLIP, True)))
    elif name == "sd15":
        arch, shapes = "sd1", diffusers_shapes(SD15_UNET, vae=SD_VAE, clips=((CLIP_L, False),))
    elif name == "sdxl":
        arch, shapes = "sdxl", diffusers_shapes(SDXL_UNET, vae=SD_VAE, clips=((CLIP_L, False), (CLIP_BIGG, True)))
    else:
        raise ValueError(name)
    return dict(shapes) if naming == "diffusers" else ldm_shapes(shapes, architecture=arch)


def random_tensor(key: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Deterministic random values for one key (independent of the other keys)."""
    from sdadapt.merge.operators import key_seed

    g = torch.Generator().manual_seed(key_seed(seed, key))
    return (torch.randn(shape, generator=g) * 0.05).to(dtype)


def write_random_checkpoint(
    path: str | Path, shapes: Mapping[str, tuple[int, ...]], *, seed: int, dtype: torch.dtype = torch.float16,
    extra: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Stream a random checkpoint with ``shapes`` to ``path`` (one tensor in memory at a time)."""
    from sdadapt.merge.writer import write_streaming

    extra = dict(extra or {})
    plan = {k: (dtype, tuple(s)) for k, s in shapes.items() if k not in extra}
    plan.update({k: (v.dtype, tuple(v.shape)) for k, v in extra.items()})

    def tensors():
        for key, (dt, shape) in plan.items():
            yield key, extra[key] if key in extra else random_tensor(key, shape, dt, seed)

    return write_streaming(path, plan, tensors(), overwrite=True)
