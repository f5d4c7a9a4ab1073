"""CLIP inversion's start from the model's own CLIP image encoder (diffusers unCLIP / image-variation folders).

Reference: huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951
* ``pipelines/stable_diffusion/pipeline_stable_unclip_img2img.py:228-239`` ``_encode_image``: a
  non-tensor image goes through ``self.feature_extractor(images=image, return_tensors="pt").pixel_values``,
  then ``self.image_encoder(image).image_embeds`` (no normalisation) -> ``noise_image_embeddings``.
* ``pipelines/stable_diffusion/pipeline_stable_diffusion_image_variation.py:144-152`` ``_encode_image``:
  the same encoding, then ``.unsqueeze(1)`` as ``encoder_hidden_states``.
The tests call those functions themselves (on a stand-in ``self``), with the encoder in float64.
The preprocessing is checked against transformers' ``CLIPImageProcessor`` (5.x; its PIL backend, which
resizes with Pillow: python-pillow/Pillow@4e5f09f533dbd0d87d39951f48b62f4d1a421cba
``src/libImaging/Resample.c:806-860``, two 8-bit passes).
"""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tiny_clip_vision import save_clip_image_encoder, save_clip_image_processor

from sdadapt.inversion import clip_image_encoder, clip_invert, clip_pixel_values, image_conditioning
from sdadapt.training import diffusion

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

AC = diffusion.alphas_cumprod_of(diffusion.noise_schedule("scaled_linear")).float()
D = 16  # image-embedding width (projection_dim; the unCLIP UNet takes 2D)
LAMBDALABS_STYLE = {"crop_size": 16, "do_center_crop": True, "do_normalize": True, "do_resize": True,
                    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
                    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 16}


def _processor(**config):
    return transformers.CLIPImageProcessor(**config)


def _u8_images(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def _as_tensor(u8):  # (H, W, 3) uint8 -> (1, 3, H, W) in [-1, 1], as sdadapt reads a PNG
    return torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 127.5 - 1


# ------------------------------------------------------------------------------ preprocessing
@pytest.mark.parametrize("config", [
    {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}},  # SD 2.1 unCLIP's layout (224 there)
    {"size": 32, "crop_size": 32},  # lambdalabs' legacy CLIPFeatureExtractor layout
    {"size": {"shortest_edge": 24}, "crop_size": {"height": 33, "width": 27}},  # crop larger than the image: zero pad
    {"size": {"height": 16, "width": 20}, "crop_size": {"height": 16, "width": 16}},  # an exact (h, w) resize
    {"size": {"shortest_edge": 32}, "crop_size": {"height": 32, "width": 32}, "resample": 2,
     "image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.3, 0.25], "rescale_factor": 1 / 200},
])
def test_pixel_values_match_clip_image_processor(config):
    """clip_pixel_values(image in [-1, 1]) vs CLIPImageProcessor(PIL image of the same 8-bit pixels).
    Tolerance (measured): identical where no resize is needed; with a resize, at most 1/255 (one 8-bit
    level, Pillow's fixed-point filter weights) on under 5 % of the values."""
    processor = _processor(**config)
    for u8 in _u8_images([(32, 32), (48, 40), (17, 23), (40, 100), (64, 64)], seed=0):
        want = processor(images=Image.fromarray(u8), return_tensors="pt").pixel_values  # (1, 3, h, w)
        got = clip_pixel_values(_as_tensor(u8), config=processor.to_dict())
        assert got.dtype == torch.float32 and got.shape == want.shape
        std = torch.tensor(processor.image_std).reshape(1, 3, 1, 1)
        levels = (got - want).abs() * std / processor.rescale_factor  # in 8-bit levels
        if u8.shape[:2] == (32, 32) and config["size"] in (32, {"shortest_edge": 32}):
            assert torch.equal(got, want)
        assert levels.max() <= 1 + 1e-3 and (levels > 0.5).double().mean() < 0.05


def test_pixel_values_defaults_are_clip_image_processor_defaults():
    """No config: CLIPImageProcessor's defaults (224, bicubic, CLIP mean/std), as diffusers'
    convert_from_ckpt builds an unCLIP folder's processor (``CLIPImageProcessor()``)."""
    u8 = _u8_images([(224, 224)], seed=1)[0]
    want = _processor()(images=Image.fromarray(u8), return_tensors="pt").pixel_values
    assert torch.equal(clip_pixel_values(_as_tensor(u8)), want)
    with pytest.raises(ValueError, match="bicubic"):
        clip_pixel_values(_as_tensor(u8), config={"resample": 1})
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        clip_pixel_values(torch.zeros(3, 8, 8))


# ------------------------------------------------------------------------------ the encoder
def _tiny_encoder_folder(root, *, preprocessor=None, seed=0):
    """image_encoder/ (a tiny random CLIPVisionModelWithProjection, 16-px images, D=16) and
    feature_extractor/ (shortest side 16, crop 16) as a diffusers unCLIP folder holds them."""
    torch.manual_seed(seed)
    save_clip_image_encoder(root, projection_dim=D)
    if preprocessor is None:
        save_clip_image_processor(root)
    else:
        (root / "feature_extractor").mkdir(parents=True)
        (root / "feature_extractor" / "preprocessor_config.json").write_text(json.dumps(preprocessor))
    return root


def _pipeline_embeds(root, pil_images, pipeline):
    """The pipeline's own _encode_image (encoder in float64) on PIL images: the pre-noise embeddings (N, D)."""
    encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder").double().eval()
    processor = transformers.CLIPImageProcessor.from_pretrained(root / "feature_extractor")
    if pipeline == "unclip":
        fake = SimpleNamespace(image_encoder=encoder, feature_extractor=processor,
                               noise_image_embeddings=lambda image_embeds, noise_level, generator: image_embeds)
        with torch.no_grad():
            return diffusers.StableUnCLIPImg2ImgPipeline._encode_image(
                fake, image=pil_images, device="cpu", batch_size=1, num_images_per_prompt=1,
                do_classifier_free_guidance=False, noise_level=0, generator=None, image_embeds=None)
    fake = SimpleNamespace(image_encoder=encoder, feature_extractor=processor)
    with torch.no_grad():
        return diffusers.StableDiffusionImageVariationPipeline._encode_image(
            fake, pil_images, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)[:, 0]


def _unclip_system(root):
    from tiny_models import _unet

    unet = _unet(0, class_embed_type="projection", projection_class_embeddings_input_dim=2 * D)
    return SimpleNamespace(unet=unet, source=str(root), tokenize=lambda p: p, alphas_cumprod=AC, prediction_type="epsilon",
                           condition=lambda prompts: torch.stack([torch.full((5, 32), float(len(p) + 1)) for p in prompts]),
                           encode_images=lambda im: torch.nn.functional.pixel_unshuffle(im, 2)[:, :4])


def test_clip_invert_starts_at_the_unclip_pipelines_mean_image_embedding(tmp_path):
    """On a diffusers unCLIP folder, init="auto" is the mean of what StableUnCLIPImg2ImgPipeline._encode_image
    computes from the same images (before its normaliser and noising: no renormalisation there)."""
    root = _tiny_encoder_folder(tmp_path / "unclip")
    u8 = _u8_images([(16, 16)] * 3, seed=2)  # the system's size == the crop: no resize, so pixels are identical
    images = torch.cat([_as_tensor(a) for a in u8])
    learnt = clip_invert(_unclip_system(root), images, steps=1, learning_rate=1e-30, batch_size=1)
    want = _pipeline_embeds(root, [Image.fromarray(a) for a in u8], "unclip").mean(0, keepdim=True)  # (1, D) float64
    assert learnt.info["init"] == "images" and learnt.vectors.shape == (1, D)
    torch.testing.assert_close(learnt.vectors.double(), want, atol=2e-6, rtol=1e-5)
    # without image_encoder/ the start stays zeros (init="auto"), and init="images" says why
    bare = _unclip_system(tmp_path / "bare")
    assert clip_invert(bare, images, steps=1, learning_rate=1e-30, batch_size=1).info["init"] == "zeros"
    with pytest.raises(ValueError, match="image encoder"):
        clip_invert(bare, images, init="images", steps=1)


def test_image_variation_encoder_matches_its_pipeline_on_resized_images(tmp_path):
    """clip_image_encoder of a lambdalabs-style folder (legacy int size / crop_size) vs
    StableDiffusionImageVariationPipeline._encode_image on images that need a resize and a crop.
    Tolerance: the resize differs from Pillow's by at most one 8-bit level on a few pixels."""
    root = _tiny_encoder_folder(tmp_path / "variation", preprocessor=LAMBDALABS_STYLE, seed=1)
    u8 = _u8_images([(24, 20), (40, 40), (13, 29)], seed=3)
    encode = clip_image_encoder(root)
    got = torch.cat([encode(_as_tensor(a)) for a in u8])
    want = _pipeline_embeds(root, [Image.fromarray(a) for a in u8], "variation")
    assert got.dtype == torch.float32 and got.shape == (3, D)
    torch.testing.assert_close(got.double(), want, atol=2e-3, rtol=0)
    # (the exact pipeline pixels give the pipeline's embeddings to float32 rounding)
    processor = transformers.CLIPImageProcessor.from_pretrained(root / "feature_extractor")
    pixels = processor(images=[Image.fromarray(a) for a in u8], return_tensors="pt").pixel_values
    encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(root / "image_encoder").double()
    with torch.no_grad():
        torch.testing.assert_close(encoder(pixels.double()).image_embeds, want, atol=0, rtol=0)


def test_encoder_is_lazy_and_refuses_what_it_cannot_do(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no image_encoder/"):
        clip_image_encoder(tmp_path)
    root = _tiny_encoder_folder(tmp_path / "m")
    encode = clip_image_encoder(root)  # nothing loaded yet
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        encode(torch.zeros(1, 3, 16, 16))
    monkeypatch.undo()
    first = encode(torch.zeros(1, 3, 16, 16))
    assert torch.equal(encode(torch.zeros(1, 3, 16, 16)), first)


# ------------------------------------------------------------------------------ no normaliser
def test_noise_level_without_an_image_normaliser_is_refused(tmp_path):
    """LDM's noise_augmentor keeps data_mean/data_std in non-persistent buffers
    (Stability-AI/stablediffusion@3b2e28a137ed526fdf00e454ae72f88f0a0516be
    ldm/modules/encoders/modules.py, CLIPEmbeddingNoiseAugmentation), so a single-file unCLIP
    checkpoint has no normaliser: identity stats at noise_level > 0 would be wrong."""
    checkpoint = tmp_path / "unclip.safetensors"
    checkpoint.write_bytes(b"")
    system = _unclip_system(checkpoint)
    with pytest.raises(ValueError, match="image_normalizer/"):
        image_conditioning(system, noise_level=100)
    with pytest.raises(ValueError, match="no image normaliser"):
        image_conditioning(_unclip_system(tmp_path), noise_level=1)  # a folder without image_normalizer/
    assert image_conditioning(system, noise_level=0).normalizer is None  # level 0: the pipelines' default, allowed
    system.image_normalizer = (torch.zeros(1, D), torch.full((1, D), 2.0))  # the user's stats: used
    assert image_conditioning(system, noise_level=100).normalizer[1][0, 0] == 2.0
