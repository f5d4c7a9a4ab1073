"""img2img and the hires fix on a tiny SDXL system: the second pass equals diffusers' StableDiffusionXLImg2ImgPipeline
(DDIM) at the hires size, so its ``time_ids`` are that size's ``(H, W, 0, 0, H, W)``."""

from __future__ import annotations

import diffusers
import pytest
import torch


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from tiny_checkpoints import tiny_sdxl_file

    from sdadapt.jobs.models import load_system

    return load_system(str(tiny_sdxl_file(tmp_path_factory.mktemp("xl_img2img") / "xl.safetensors")), device="cpu")


def _pipeline(system):
    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=system.vae, text_encoder=system.text_encoder, text_encoder_2=system.text_encoder_2,
        tokenizer=system.tokenizer, tokenizer_2=system.tokenizer_2, unet=system.unet, scheduler=scheduler,
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_hires_pass_equals_diffusers_xl_img2img_at_the_hires_size(sdxl, monkeypatch):
    """First pass 16 x 16, hires 32 x 32 (the tiny model's own size is 256): the second pass (DDIM, 8 fixed steps at
    0.5: the last 8 of a 16-step grid, A1111's hires rule) on the upscaled latents = the XL img2img pipeline on them
    (16 steps at strength 0.5: the same 8), whose time_ids are (32, 32, 0, 0, 32, 32); within
    1e-4 on the latents (measured 3.8e-6 on latents of max ~17). The same pipeline told another original size
    differs by far more (2.5e-2): the comparison sees the time_ids."""
    from generate_recorder import record_generate
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image

    calls = record_generate(monkeypatch)
    options = {"seed": 5, "steps": 8, "guidance": 3.0, "sampler": "ddim", "negative": "", "height": 16, "width": 16}
    image = sample_image(sdxl, ["a photo"], options, hires=HiresRequest((32, 32), denoising=0.5))
    assert image.shape == (1, 3, 32, 32)
    (first_kw, first), (second_kw, ours) = calls
    assert first.shape[-2:] == (16 // sdxl.vae_factor,) * 2 and ours.shape[-2:] == (32 // sdxl.vae_factor,) * 2
    init = second_kw["init_latents"]
    pipe = _pipeline(sdxl)
    theirs = pipe("a photo", image=init, strength=0.5, num_inference_steps=16, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    other = pipe("a photo", image=init, strength=0.5, num_inference_steps=16, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(5), output_type="latent", original_size=(64, 64),
                 target_size=(64, 64)).images
    assert (other - theirs).abs().max() > 100 * (ours - theirs).abs().max()
