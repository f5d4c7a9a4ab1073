"""CLIP inversion against the pipelines its vectors must feed (diffusers' unCLIP and image-variation).

Reference: huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951 (the installed 0.42.1 has
the same functions; the tests call them):

* ``pipelines/stable_diffusion/pipeline_stable_unclip_img2img.py:203-256`` ``_encode_image``: the
  (pre-noise) ``image_embeds`` -> ``noise_image_embeddings`` -> CFG ``cat([zeros_like, embeds])``
  passed as ``class_labels``; ``:578-622`` ``noise_image_embeddings`` (normaliser scale, the
  ``image_noising_scheduler``'s ``add_noise``, unscale, ``[· ‖ get_timestep_embedding(level)]``).
* ``pipelines/stable_diffusion/convert_from_ckpt.py:1050-1092``: an unCLIP folder holds that
  normaliser (``image_normalizer/``, the CLIP stats) and scheduler (``image_noising_scheduler/``).
* ``pipelines/stable_diffusion/pipeline_stable_diffusion_image_variation.py:144-167``
  ``_encode_image``: ``image_embeds.unsqueeze(1)`` as ``encoder_hidden_states``, negative
  ``zeros_like``.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from sdadapt.inversion import (
    ImageVectors,
    image_conditioning,
    image_variation_conditioning,
    load_image_vectors,
    sample_image_vectors,
    save_image_vectors,
    unclip_image_conditioning,
)
from sdadapt.inversion.clip import generate_with_vectors
from sdadapt.training import diffusion

diffusers = pytest.importorskip("diffusers")
AC = diffusion.alphas_cumprod_of(diffusion.noise_schedule("scaled_linear")).float()
D = 16  # image-embedding width: projection_class_embeddings_input_dim = 2D


def _unclip_unet():
    from tiny_models import _unet

    return _unet(0, class_embed_type="projection", projection_class_embeddings_input_dim=2 * D)


def _text(prompts):  # prompts -> (B, 5, 32): distinct states per prompt
    return torch.stack([torch.full((5, 32), float(len(p) + 1)) for p in prompts])


class _Img2Img:
    """Just enough of StableUnCLIPImg2ImgPipeline to run its own _encode_image / noise_image_embeddings."""

    _encode_image = diffusers.StableUnCLIPImg2ImgPipeline._encode_image
    noise_image_embeddings = diffusers.StableUnCLIPImg2ImgPipeline.noise_image_embeddings

    def __init__(self, normalizer, scheduler):
        self.image_normalizer, self.image_noising_scheduler = normalizer, scheduler
        self.image_encoder = nn.Linear(1, 1)  # (only its dtype is read when image_embeds is given)


def _normalizer(seed=0):
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    g = torch.Generator().manual_seed(seed)
    normalizer = StableUnCLIPImageNormalizer(embedding_dim=D)
    with torch.no_grad():
        normalizer.mean.copy_(torch.randn(1, D, generator=g))
        normalizer.std.copy_(torch.rand(1, D, generator=g) + 0.5)
    return normalizer


def _recording(cond):
    """The conditioning with its model replaced by one that records what would reach the UNet."""
    seen = []

    def model(x, t, c):
        seen.append({k: (None if v is None else v.clone()) for k, v in c.items()})
        return torch.zeros_like(x)

    return dataclasses.replace(cond, model=model), seen


@pytest.mark.parametrize("level", [0, 300])
def test_unclip_sampling_feeds_class_labels_as_the_img2img_pipeline(level):
    """sample_image_vectors' UNet input (uncond ‖ cond) == the pipeline's _encode_image(image_embeds=v)
    with CFG, for one image (the pipeline draws the augmentation noise from the same generator seed)."""
    normalizer = _normalizer()
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    cond = unclip_image_conditioning(_unclip_unet(), text=_text, noise_level=level, image_normalizer=normalizer)
    cond, seen = _recording(cond)
    v = torch.randn(1, D, generator=torch.Generator().manual_seed(3)) * 2
    sample_image_vectors(cond, v, torch.randn(1, 4, 8, 8), alphas_cumprod=AC, prompts=["a photo"], negative="", steps=1)
    with torch.no_grad():
        want = _Img2Img(normalizer, scheduler)._encode_image(
            image=None, device="cpu", batch_size=1, num_images_per_prompt=1, do_classifier_free_guidance=True,
            noise_level=level, generator=torch.Generator().manual_seed(0), image_embeds=v.clone())  # (2, 2D)
    assert len(seen) == 1 and seen[0]["image"].shape == want.shape == (2, 2 * D)
    torch.testing.assert_close(seen[0]["image"], want, atol=1e-5, rtol=1e-5)
    # text: the uncond half is the negative prompt's states, the cond half the prompt's (pipeline: cat([neg, pos]))
    torch.testing.assert_close(seen[0]["context"], torch.cat([_text([""]), _text(["a photo"])]))


def test_unclip_folder_normaliser_and_noising_schedule_are_used(tmp_path):
    """A system loaded from a diffusers unCLIP folder (``source``) noises as the pipeline loaded from
    that folder does: its image_normalizer/ stats and image_noising_scheduler/ schedule (a
    non-default one here, so that neither can pass for the identity / cosine fallbacks)."""
    from diffusers.pipelines.stable_diffusion.stable_unclip_image_normalizer import StableUnCLIPImageNormalizer

    _normalizer(1).save_pretrained(tmp_path / "image_normalizer")
    diffusers.DDPMScheduler(num_train_timesteps=500, beta_schedule="scaled_linear", beta_start=0.001,
                            beta_end=0.03).save_pretrained(tmp_path / "image_noising_scheduler")
    normalizer = StableUnCLIPImageNormalizer.from_pretrained(tmp_path / "image_normalizer")
    scheduler = diffusers.DDPMScheduler.from_pretrained(tmp_path / "image_noising_scheduler")
    system = SimpleNamespace(unet=_unclip_unet(), source=tmp_path, tokenize=lambda p: p, condition=_text)
    cond = image_conditioning(system, noise_level=300)
    torch.testing.assert_close(cond.noise_alphas_cumprod, scheduler.alphas_cumprod, atol=1e-6, rtol=1e-5)
    v = torch.randn(2, 1, D, generator=torch.Generator().manual_seed(4)) * 2
    got = cond.image_input(v, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, D, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = _Img2Img(normalizer, scheduler).noise_image_embeddings(v[:, 0].clone(), 300, noise=noise)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="noise_level must be in"):  # the folder's 500-step schedule bounds the level
        image_conditioning(system, noise_level=600)


def test_generate_uses_the_files_noise_level(tmp_path):
    """generate_with_vectors samples at the level the vectors were learnt (and saved) at."""
    unet = _unclip_unet()
    system = SimpleNamespace(unet=unet, tokenize=lambda p: p, condition=_text, alphas_cumprod=AC, prediction_type="epsilon",
                             image_size=16, encode_images=lambda im: torch.nn.functional.pixel_unshuffle(im, 2)[:, :4],
                             decode_latents=lambda x: x)
    v = torch.randn(1, D, generator=torch.Generator().manual_seed(6)) * 3
    back = load_image_vectors(save_image_vectors(tmp_path / "v.safetensors", ImageVectors(v, site="class-labels", noise_level=700)))
    assert back.noise_level == 700
    got = generate_with_vectors(system, back, prompt="x", count=1, steps=2, guidance=3.0, seed=3)
    g = torch.Generator().manual_seed(3)  # the seed draws x_T, then the augmentation noise
    x_T = torch.randn(1, 4, 8, 8, generator=g)
    cond = unclip_image_conditioning(unet, text=_text, noise_level=700)
    want = sample_image_vectors(cond, v, x_T, alphas_cumprod=AC, prompts=["x"], steps=2, guidance=3.0, generator=g)
    assert torch.equal(got, want)
    fixed = sample_image_vectors(cond, v, x_T, alphas_cumprod=AC, prompts=["x"], steps=2, guidance=3.0)
    assert not torch.equal(got, fixed)  # (the augmentation noise follows the seed, not a fixed 0)


def test_image_variation_feeds_tokens_and_zero_negative_as_the_pipeline():
    """cond: the vectors as encoder_hidden_states (B, K, D) (pipeline: image_embeds.unsqueeze(1));
    uncond: zeros. K zero tokens give the UNet exactly what the pipeline's one zero token does."""
    from tiny_models import _unet

    unet = _unet(0, cross_attention_dim=D)
    cond, seen = _recording(image_variation_conditioning(unet))
    v = torch.randn(3, D, generator=torch.Generator().manual_seed(7))
    sample_image_vectors(cond, v, torch.randn(2, 4, 8, 8), alphas_cumprod=AC, steps=1)
    image = seen[0]["image"]  # (2B, K, D): uncond then cond
    assert torch.equal(image[2:], v[None].expand(2, 3, D)) and torch.equal(image[:2], torch.zeros(2, 3, D))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    with torch.no_grad():
        one = unet(x, t, encoder_hidden_states=torch.zeros(2, 1, D)).sample
        many = unet(x, t, encoder_hidden_states=torch.zeros(2, 3, D)).sample
    torch.testing.assert_close(many, one, atol=1e-5, rtol=1e-5)


def test_learning_uses_the_shared_step_with_min_snr_and_the_models_prediction_type(monkeypatch):
    """learn_image_vectors trains through train_step (min-SNR-γ 5 by default, the given prediction
    type) on the vectors alone."""
    import sdadapt.inversion.clip as clip

    configs = []

    def spy(model, batch, *, params, config, **kw):
        configs.append((config, params))
        return real(model, batch, params=params, config=config, **kw)

    real = clip.train_step
    monkeypatch.setattr(clip, "train_step", spy)
    cond = dataclasses.replace(image_variation_conditioning(SimpleNamespace(config=SimpleNamespace(cross_attention_dim=D))),
                               model=lambda x, t, c: x * c["image"].mean(), modules=())
    vectors, _ = clip.learn_image_vectors(cond, torch.randn(2, 4, 8, 8), alphas_cumprod=AC, prediction_type="v_prediction",
                                          init=torch.ones(1, D), steps=2, batch_size=2)
    (config, params), _ = configs
    assert config.min_snr_gamma == 5.0 and config.prediction_type == "v_prediction"
    assert len(params) == 1 and params[0].shape == (1, D) and not torch.equal(vectors, torch.ones(1, D))


def test_clip_invert_starts_at_the_images_mean_embedding():
    """init="images": the mean of the model's own image embeddings (toy CLIP: what toy-image was trained on)."""
    from sdadapt.inversion.clip import clip_invert
    from sdadapt.toy import DEFAULT_WEIGHTS, load_toy
    from sdadapt.toy.evaluate import concept_data

    if not DEFAULT_WEIGHTS.is_file():
        pytest.skip("toy weights not built")
    toy = load_toy()
    images, _ = concept_data("purple", 3, seed=1)
    learnt = clip_invert(toy, images, steps=1, learning_rate=1e-30, batch_size=1)  # (a step too small to move it)
    with torch.no_grad():
        want = toy.clip.encode_image(images).double().mean(0, keepdim=True)
    torch.testing.assert_close(learnt.vectors.double(), want, atol=1e-6, rtol=0)
    assert learnt.info["init"] == "images"
