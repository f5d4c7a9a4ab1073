"""A tiny random CLIP image encoder as diffusers' unCLIP and image-variation folders hold one:
``image_encoder/`` (``CLIPVisionModelWithProjection``, 16-px images, 4-px patches) and
``feature_extractor/`` (``CLIPImageProcessor``, shortest side 16, centre crop 16).

The weights come from torch's global RNG: seed it before calling when a test needs fixed weights."""

from __future__ import annotations

import os

__all__ = ["save_clip_image_encoder", "save_clip_image_processor"]


def save_clip_image_encoder(root: str | os.PathLike, *, projection_dim: int) -> None:
    """Write ``root/image_encoder`` (image_embeds of width ``projection_dim``)."""
    import transformers

    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37, projection_dim=projection_dim,
                                           num_hidden_layers=2, num_attention_heads=4, image_size=16, patch_size=4)
    transformers.CLIPVisionModelWithProjection(config).eval().save_pretrained(os.path.join(root, "image_encoder"))


def save_clip_image_processor(root: str | os.PathLike) -> None:
    """Write ``root/feature_extractor`` (16-px images: resize the shortest side to 16, crop 16 x 16)."""
    import transformers

    transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(
        os.path.join(root, "feature_extractor"))
