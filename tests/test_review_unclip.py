"""Review of the SD 2.1 unCLIP file reading (sdadapt.formats.unclip, sdadapt.unclip): the cases the first tests left
open. References: kornia ``geometry.resize(antialias=True)`` as diffusers transcribes it
(pipelines/stable_video_diffusion/pipeline_stable_video_diffusion.py ``_resize_with_antialiasing``: it blurs every
time, with σ 0.001 — a 3-tap identity kernel — along a side that grows, where kornia skips the blur when no side
shrinks: the same pixels), stablediffusion ldm/modules/encoders/modules.py ``FrozenOpenCLIPImageEmbedder.preprocess``."""

from __future__ import annotations

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from sdadapt.formats.unclip import ldm_clip_pixels

_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


@pytest.mark.parametrize("height, width", [(160, 12), (12, 150), (30, 20), (200, 200)])
def test_ldm_pixels_when_one_side_shrinks_a_lot_and_the_other_grows(height, width):
    """(160, 12) -> 40: the height shrinks 4x (σ 1.5, a kernel of 6 made odd: 7) while the width grows; (30, 20): both
    grow (no blur); (200, 200): 5x down both ways (σ 2, kernel 9)."""
    from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import (
        _resize_with_antialiasing,
    )

    images = torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(height + width)) * 2 - 1
    want = ((_resize_with_antialiasing(images, (40, 40)) + 1) / 2 - _MEAN) / _STD
    torch.testing.assert_close(ldm_clip_pixels(images, size=40), want, rtol=0, atol=2e-6)


def test_ldm_pixels_at_the_size_already_only_normalise():
    images = torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
    torch.testing.assert_close(ldm_clip_pixels(images, size=24), ((images + 1) / 2 - _MEAN) / _STD, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------- what a file says
def _state(width=2 * 16, marker=None, dims=2):
    label = torch.zeros(8, width) if dims == 2 else torch.zeros(8, width, 1)
    state = {"model.diffusion_model.label_emb.0.0.weight": label, "cond_stage_model.model.ln_final.weight": torch.ones(4)}
    if marker is not None:
        state["embedder.model.ln_final.weight"] = torch.ones(marker)
    return state


def test_unclip_info_reads_the_variant_and_refuses_a_corrupt_label_emb():
    from sdadapt.formats.files import WeightFileError
    from sdadapt.formats.unclip import unclip_info

    assert unclip_info(_state(2 * 768)).variant == "l" and unclip_info(_state(2 * 1024)).variant == "h"
    # A1111's marker decides over the width (a tiny test model: D 16, the marker says L)
    assert unclip_info(_state(32, marker=768)).variant == "l" and unclip_info(_state(2 * 768, marker=1024)).variant == "h"
    info = unclip_info(_state(32))
    assert (info.dim, info.noise_alphas_cumprod, info.has_encoder) == (16, None, False)
    with pytest.raises(WeightFileError, match="takes 33 inputs.*2D, even"):
        unclip_info(_state(33))
    with pytest.raises(WeightFileError, match="is a Linear weight"):
        unclip_info(_state(32, dims=3))
    assert unclip_info({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(8, 32)}) is None  # (no SD2 text)


def _tower(width, *, positions=257, patch=14, layers=2, dim=24):
    return {"vision_model.embeddings.patch_embedding.weight": torch.zeros(width, 3, patch, patch),
            "vision_model.embeddings.position_embedding.weight": torch.zeros(positions, width),
            "visual_projection.weight": torch.zeros(dim, width),
            **{f"vision_model.encoder.layers.{n}.mlp.fc1.weight": torch.zeros(4 * width, width) for n in range(layers)}}


@pytest.mark.parametrize("width, heads", [(1280, 16), (1024, 16), (768, 12), (512, 8)])
def test_image_encoder_config_heads_and_sizes(width, heads):
    """ViT-H-14 has 16 heads of 80 (open_clip model_configs/ViT-H-14.json: width 1280, head_width 80), ViT-L/14 16 of
    64, ViT-B 12 of 64; others 64-wide heads."""
    from sdadapt.formats.unclip import image_encoder_config

    config = image_encoder_config(_tower(width, layers=3), variant="h")
    assert config["num_attention_heads"] == heads and config["num_hidden_layers"] == 3
    assert (config["image_size"], config["patch_size"], config["projection_dim"]) == (224, 14, 24)
    assert config["intermediate_size"] == 4 * width and config["hidden_act"] == "gelu"
    assert image_encoder_config(_tower(width), variant="l")["hidden_act"] == "quick_gelu"


def test_image_encoder_config_refuses_what_no_clip_tower_has():
    from sdadapt.formats.files import WeightFileError
    from sdadapt.formats.unclip import image_encoder_config

    with pytest.raises(WeightFileError, match="258 positions are not 1 \\+ a square grid"):
        image_encoder_config(_tower(64, positions=258), variant="h")
    tower = _tower(64)
    del tower["visual_projection.weight"]
    with pytest.raises(WeightFileError, match="lacks 'visual_projection.weight'"):
        image_encoder_config(tower, variant="h")
    with pytest.raises(ValueError, match="variant must be 'h' or 'l'"):
        image_encoder_config(_tower(64), variant="g")


def test_clip_stats_files_karlos_pair_or_a_normaliser(tmp_path):
    from safetensors.torch import save_file

    from sdadapt.formats.files import WeightFileError
    from sdadapt.formats.unclip import read_clip_stats

    mean, std = torch.randn(1, 8), torch.rand(1, 8) + 0.5
    torch.save((mean[0], std[0]), tmp_path / "ViT-L-14_stats.th")
    got = read_clip_stats(tmp_path / "ViT-L-14_stats.th", dim=8)
    assert torch.equal(got[0], mean) and torch.equal(got[1], std) and got[0].shape == (1, 8)
    save_file({"a": mean, "b": std}, tmp_path / "other.safetensors")
    with pytest.raises(WeightFileError, match="not CLIP stats"):
        read_clip_stats(tmp_path / "other.safetensors")
    with pytest.raises(WeightFileError, match="width 8, this model's image embedding is 16"):
        read_clip_stats(tmp_path / "ViT-L-14_stats.th", dim=16)
    save_file({"mean": mean, "std": torch.zeros(1, 8)}, tmp_path / "zero.safetensors")
    with pytest.raises(WeightFileError, match="std has values <= 0"):
        read_clip_stats(tmp_path / "zero.safetensors")
    folder = tmp_path / "pipe" / "image_normalizer"
    folder.mkdir(parents=True)
    save_file({"mean": mean, "std": std}, folder / "diffusion_pytorch_model.safetensors")
    assert torch.equal(read_clip_stats(tmp_path / "pipe")[1], std)


def test_noise_augmentor_buffers_are_ldms_float64_register_schedule():
    """A float32 cosine schedule is written as LDM's float64 buffers (stablediffusion ldm/modules/diffusionmodules/
    upscaling.py register_schedule: to_torch of float64 numpy), not as buffers of the rounded float32 values."""
    import math

    import numpy as np

    from sdadapt.formats.unclip import (
        ldm_cosine_alphas_cumprod,
        noise_augmentor_buffers,
    )

    bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = np.array([min(1 - bar((i + 1) / 1000) / bar(i / 1000), 0.999) for i in range(1000)])
    ac = np.cumprod(1.0 - betas)
    out = noise_augmentor_buffers(ldm_cosine_alphas_cumprod().float())
    assert torch.equal(out["noise_augmentor.alphas_cumprod"], torch.tensor(ac, dtype=torch.float32))
    assert torch.equal(out["noise_augmentor.betas"], torch.tensor(1 - ac / np.append(1.0, ac[:-1]), dtype=torch.float32))
    assert torch.equal(out["noise_augmentor.sqrt_recipm1_alphas_cumprod"],
                       torch.tensor(np.sqrt(1 / ac - 1), dtype=torch.float32))


# ------------------------------------------------------------------------------- the parts on a model
def test_parts_from_a_file_follow_the_ldm_configs():
    """H: identity normaliser (no clip_stats_path in v2-1-stable-unclip-h-inference.yaml), L: none without karlo's
    stats (noise levels > 0 and writing a folder refused); the file's own schedule kept; A1111's marker of width D."""
    from sdadapt.formats.unclip import UnclipFile
    from sdadapt.unclip import (
        COSINE_SCHEDULER_CONFIG,
        unclip_image_input,
        unclip_parts_from_file,
    )

    schedule = torch.linspace(0.99, 0.1, 50)
    h = unclip_parts_from_file(UnclipFile("h", 8, schedule, False), None)
    assert torch.equal(h.normalizer[0], torch.zeros(1, 8)) and torch.equal(h.normalizer[1], torch.ones(1, 8))
    assert h.noise_alphas_cumprod is schedule and h._scheduler_config()["num_train_timesteps"] == 50
    assert "trained_betas" in h._scheduler_config()
    tensors = h.ldm_tensors()
    assert tensors["embedder.model.ln_final.weight"].shape == (8,)
    assert torch.equal(tensors["noise_augmentor.alphas_cumprod"], schedule)
    l_parts = unclip_parts_from_file(UnclipFile("l", 8, None, False), None)
    assert l_parts.normalizer is None and l_parts._scheduler_config() == COSINE_SCHEDULER_CONFIG
    with pytest.raises(ValueError, match="--clip-stats"):
        unclip_image_input(l_parts, torch.zeros(2, 8), noise_level=10)
    assert unclip_image_input(l_parts, torch.zeros(2, 8), noise_level=0).shape == (2, 16)
    with pytest.raises(ValueError, match="--clip-stats"):
        l_parts.write_folder(__import__("pathlib").Path("unused"))


def test_a_transformers_position_ids_buffer_is_dropped_by_name_going_to_ldm():
    from sdadapt.formats.key_source import PlanBuilder
    from sdadapt.formats.unclip import plan_clip_vision

    builder = PlanBuilder()
    plan_clip_vision({"image_encoder.vision_model.embeddings.position_ids": (1, 257),
                      "image_encoder.vision_model.embeddings.class_embedding": (64,),
                      "image_encoder.vision_model.odd": (3,)}, builder, to="ldm", source_prefix="image_encoder.",
                     target_prefix="embedder.model.visual.")
    assert list(builder.plan) == ["embedder.model.visual.class_embedding"]
    assert builder.dropped == ["image_encoder.vision_model.embeddings.position_ids"]
    assert builder.unmatched == ["image_encoder.vision_model.odd"] and "position_ids buffer" in builder.notes[0]


def test_a_folders_parts_take_the_given_clip_stats_and_write_its_processor(tmp_path):
    from sdadapt.unclip import UnclipParts, unclip_parts_from_folder

    mean, std = torch.randn(768), torch.rand(768) + 0.5  # (an L folder: ViT-L/14's width; H refuses stats)
    torch.save((mean, std), tmp_path / "stats.th")
    (tmp_path / "folder").mkdir()
    parts = unclip_parts_from_folder(tmp_path / "folder", dim=768, clip_stats=tmp_path / "stats.th")
    assert torch.equal(parts.normalizer[0], mean[None]) and torch.equal(parts.normalizer[1], std[None])
    out = tmp_path / "out"
    out.mkdir()
    UnclipParts(dim=768, normalizer=parts.normalizer, noise_alphas_cumprod=parts.noise_alphas_cumprod, image_encoder=None,
                processor_config={"crop_size": {"height": 100, "width": 100}}).write_folder(out)
    import json

    written = json.loads((out / "feature_extractor" / "preprocessor_config.json").read_text())
    assert written["crop_size"] == {"height": 100, "width": 100} and written["image_processor_type"] == "CLIPImageProcessor"


def test_img2img_unclip_image_is_the_init_images_embedding_at_level_0_seeded(tmp_path):
    """A1111's unclip_image_conditioning: the embedder on the init image, then the noise augmentor at level 0 (its
    √(1 − ᾱ₀) noise drawn here from the run's seed)."""
    from types import SimpleNamespace

    from sdadapt.images import write_png
    from sdadapt.unclip import UnclipParts, img2img_unclip_image, unclip_image_input

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)))

        def forward(self, pixel_values):
            return SimpleNamespace(image_embeds=pixel_values.mean(dim=(2, 3)) @ self.w)

    parts = UnclipParts(dim=8, normalizer=(torch.zeros(1, 8), torch.ones(1, 8)),
                        noise_alphas_cumprod=torch.linspace(0.9, 0.1, 10), image_encoder=Encoder())
    write_png(tmp_path / "init.png", torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    got = img2img_unclip_image(SimpleNamespace(unclip=parts), tmp_path / "init.png", height=16, width=16, seed=7)
    from sdadapt.resize_modes import init_image_pixels

    embeds = parts.encode_image(init_image_pixels(tmp_path / "init.png", (16, 16), mode="just")[None])
    want = unclip_image_input(parts, embeds, noise_level=0, generator=torch.Generator().manual_seed(7))
    assert got.shape == (1, 16) and torch.equal(got, want)
    other = unclip_image_input(parts, embeds, noise_level=0, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(got, other)
    assert img2img_unclip_image(SimpleNamespace(unclip=None), tmp_path / "init.png", height=16, width=16) is None
