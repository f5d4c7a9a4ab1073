"""``--vae-encode sample``: the init image encoded by a VAE posterior sample drawn from the seed's generator before
the start noise, as diffusers' img2img pipelines draw it (``pipeline_stable_diffusion_img2img.py`` /
``pipeline_stable_diffusion_xl_img2img.py`` ``prepare_latents``: ``retrieve_latents(vae.encode(image),
generator=generator)``, then ``randn_tensor(shape, generator=generator)``), checked against those pipelines on tiny
random models; the mean path unchanged; the job's per-seed draws, A1111's noise, the hires pass and the refusals."""

from __future__ import annotations

import warnings

import diffusers
import pytest
import tiny_sd_fixtures
import torch

from sdadapt import samplers
from sdadapt.img2img import init_generator
from sdadapt.sampling import generate

REAL_SAMPLE_LATENTS = samplers.sample_latents
BETAS = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}


system, tiny_sd = tiny_sd_fixtures.system, tiny_sd_fixtures.tiny_sd  # (module-scoped: the tiny SD folder, loaded)


def _pixels(size: int, seed: int = 11) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_posterior_sample_is_diffusers_retrieve_latents_bit_for_bit_and_the_mean_is_unchanged(system):
    """encode_images(generator=g) = diffusers' retrieve_latents(vae.encode(x), generator=g) · scaling, bit for bit,
    and leaves g where diffusers leaves it; without a generator the posterior mean · scaling as ever."""
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (
        retrieve_latents,
    )

    x = _pixels(32)
    ours_g, theirs_g = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    ours = system.encode_images(x, generator=ours_g)
    with torch.no_grad():
        theirs = system.vae.config.scaling_factor * retrieve_latents(system.vae.encode(x), generator=theirs_g)
        mean = system.vae.encode(x).latent_dist.mean * system.vae.config.scaling_factor
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.randn(4, generator=ours_g), torch.randn(4, generator=theirs_g))  # (the same state after)
    assert torch.equal(system.encode_images(x), mean)
    assert (ours - mean).abs().max() > 1e-3  # (the sample is not the mean)


@pytest.mark.parametrize("sampler,steps,strength", [("ddim", 10, 0.6), ("dpmsolver++", 10, 0.66)])
def test_img2img_from_pixels_equals_diffusers_img2img_pipeline(system, sampler, steps, strength):
    """sdadapt's img2img of pixels with ``init_generator(seed)`` (the posterior sample, then the start noise from
    the same generator) = StableDiffusionImg2ImgPipeline(image=pixels, generator=manual_seed(seed)) within 1e-4
    (the sampler's float arithmetic, as tests/test_img2img.py; measured 4.3e-6 on latents of max 7-9; the encoding
    itself is bit for bit, above). The mean encoding misses by 8-12: the comparison sees the sample and its order."""
    x = _pixels(system.image_size)
    g = init_generator(5)
    init = system.encode_images(x, generator=g)
    ours = generate(system, ["a photo"], seed=5, steps=steps, guidance=3.0, sampler=sampler, init_latents=init,
                    denoising_strength=strength, output="latents", generator=g)
    mean = generate(system, ["a photo"], seed=5, steps=steps, guidance=3.0, sampler=sampler,
                    init_latents=system.encode_images(x), denoising_strength=strength, output="latents")
    if sampler == "ddim":
        scheduler = diffusers.DDIMScheduler(**BETAS, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    else:
        scheduler = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++")
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        vae=system.vae, text_encoder=system.text_encoder, tokenizer=system.tokenizer, unet=system.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():  # (diffusers takes a tensor in [-1, 1] as it is, with a FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        theirs = pipe("a photo", image=x, strength=strength, num_inference_steps=steps, guidance_scale=3.0,
                      negative_prompt="", generator=torch.Generator().manual_seed(5), output_type="latent").images
    err = (ours - theirs).abs().max()
    assert err < 1e-4, err
    assert (mean - theirs).abs().max() > 100 * max(float(err), 1e-6)


def test_sdxl_img2img_from_pixels_equals_diffusers_xl_img2img_pipeline(tmp_path):
    """The same on a tiny SDXL model against StableDiffusionXLImg2ImgPipeline (DDIM, 32 x 32), within 1e-4
    (measured 2.9e-6 on latents of max 4; the mean encoding misses by 6)."""
    from tiny_checkpoints import tiny_sdxl_file

    from sdadapt.jobs.models import load_system

    xl = load_system(str(tiny_sdxl_file(tmp_path / "xl.safetensors")), device="cpu")
    x = _pixels(32, seed=4)
    g = init_generator(7)
    ours = generate(xl, ["a photo"], seed=7, steps=8, guidance=3.0, sampler="ddim", height=32, width=32,
                    init_latents=xl.encode_images(x, generator=g), denoising_strength=0.5, output="latents",
                    generator=g)
    mean = generate(xl, ["a photo"], seed=7, steps=8, guidance=3.0, sampler="ddim", height=32, width=32,
                    init_latents=xl.encode_images(x), denoising_strength=0.5, output="latents")
    scheduler = diffusers.DDIMScheduler(**BETAS, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    pipe = diffusers.StableDiffusionXLImg2ImgPipeline(
        vae=xl.vae, text_encoder=xl.text_encoder, text_encoder_2=xl.text_encoder_2, tokenizer=xl.tokenizer,
        tokenizer_2=xl.tokenizer_2, unet=xl.unet, scheduler=scheduler, requires_aesthetics_score=False,
        force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        theirs = pipe("a photo", image=x, strength=0.5, num_inference_steps=8, guidance_scale=3.0, height=32,
                      width=32, generator=torch.Generator().manual_seed(7), output_type="latent").images
    err = (ours - theirs).abs().max()
    assert err < 1e-4, err
    assert (mean - theirs).abs().max() > 100 * max(float(err), 1e-6)


def _spy(monkeypatch):
    seen = []
    real = REAL_SAMPLE_LATENTS

    def spy(model, x_T, cond, **kw):
        start = kw.get("start")
        seen.append((x_T.clone(), None if start is None else start.init.clone()))
        return real(model, x_T, cond, **kw)

    monkeypatch.setattr(samplers, "sample_latents", spy)
    return seen


def _init_png(path, size):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(path)
    return path


@pytest.mark.parametrize("noise", [None, "a1111-cpu"])
def test_the_job_draws_each_images_sample_from_its_seed_before_its_start_noise(tiny_sd, system, tmp_path, monkeypatch,
                                                                               noise):
    """generate --vae-encode sample, 2 images: image i's init latents are the posterior sample drawn from
    manual_seed(seed + i) and its start noise that generator's next draw (sdadapt's noise); with A1111's noise the
    start noise is A1111's, as with the mean, and the sample comes after one discarded draw (never that noise)."""
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.generate_hires import init_latents_from_image

    size = system.image_size
    image = _init_png(tmp_path / "init.png", size)
    runs = {}
    for method in ("mean", "sample"):
        seen = _spy(monkeypatch)
        run_generate(model=str(tiny_sd), prompt="a photo", out=str(tmp_path / f"{method}.png"), seed=9, count=2, steps=4,
                     sampler="euler", init_image=str(image), denoising_strength=0.5, vae_encode=method,
                     device="cpu", **({} if noise is None else {"noise": noise}))
        runs[method] = seen
    shape = (1, *system.latent_shape(size, size))
    mean = init_latents_from_image(system, image, height=size, width=size)
    for i, ((x_mean, init_mean), (x_sample, init_sample)) in enumerate(zip(runs["mean"], runs["sample"])):
        assert torch.equal(init_mean, mean)
        g = init_generator(9 + i, a1111_noise=noise is not None, shape=shape)
        assert torch.equal(init_sample, init_latents_from_image(system, image, height=size, width=size, generator=g))
        if noise is None:
            assert torch.equal(x_mean, torch.randn(shape, generator=torch.Generator().manual_seed(9 + i)))
            assert torch.equal(x_sample, torch.randn(shape, generator=g))  # (after the posterior's draw)
        else:
            assert torch.equal(x_sample, x_mean)  # (A1111's start noise as it was)
            direct = init_latents_from_image(system, image, height=size, width=size,
                                             generator=torch.Generator().manual_seed(9 + i))
            assert not torch.allclose(init_sample, direct)  # (the discarded draw: not the seed's first)
    assert not torch.allclose(runs["sample"][0][1], runs["sample"][1][1])  # (each seed its own sample)


def test_the_pixel_hires_pass_samples_from_the_seed_then_draws_its_noise(system, monkeypatch):
    """sample_image(vae_encode="sample") with pixel-lanczos: the hires pass's init latents are the upscaled pixels'
    posterior sample from manual_seed(seed), its start noise that generator's next draw; a latent upscaler (and
    the mean) leave the hires pass as it was."""
    from sdadapt.jobs.generate_hires import (
        HiresRequest,
        lanczos_upscale_pixels,
        sample_image,
    )

    options = {"seed": 7, "steps": 4, "guidance": 2.0, "sampler": "euler", "negative": "", "height": 16,
               "width": 16}
    runs = {}
    for method in ("mean", "sample"):
        seen = _spy(monkeypatch)
        sample_image(system, ["a photo"], dict(options), hires=HiresRequest((32, 32), steps=3, denoising=0.5,
                                                                            upscaler="pixel-lanczos"),
                     vae_encode=method)
        runs[method] = seen
    (x1, _), (x2_mean, init2_mean) = runs["mean"]
    (x1_s, _), (x2, init2) = runs["sample"]
    assert torch.equal(x1, x1_s)  # (the first pass draws nothing more)
    first = samplers.sample_latents(system.denoiser(), x1, system.condition(system.tokenize(["a photo"])),
                                    sampler="euler", alphas_cumprod=system.alphas_cumprod, num_steps=4,
                                    uncond=system.condition(system.tokenize([""])), guidance_scale=2.0)
    pixels = lanczos_upscale_pixels(system.decode_latents(first), (32, 32))
    g = torch.Generator().manual_seed(7)
    expected = system.encode_images(pixels, generator=g)
    assert torch.allclose(init2, expected, atol=1e-5)
    assert torch.allclose(init2_mean, system.encode_images(pixels), atol=1e-5)
    assert not torch.allclose(init2, init2_mean, atol=1e-3)
    assert torch.equal(x2, torch.randn(x2.shape, generator=g))
    assert torch.equal(x2_mean, torch.randn(x2.shape, generator=torch.Generator().manual_seed(7)))


def test_a_spent_first_pass_generator_does_not_reach_the_hires_pass(system, monkeypatch):
    """img2img --vae-encode sample hands generate the seed's generator; a latent hires pass after it draws its
    start noise from the seed afresh, as with the mean."""
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image

    seen = _spy(monkeypatch)
    g = init_generator(3)
    init = system.encode_images(_pixels(16), generator=g)
    options = {"seed": 3, "steps": 4, "guidance": 2.0, "sampler": "euler", "negative": "", "height": 16,
               "width": 16, "generator": g}
    sample_image(system, ["a photo"], options, init_latents=init, denoising_strength=0.5,
                 hires=HiresRequest((32, 32), steps=3, denoising=0.5), vae_encode="sample")
    (x1, _), (x2, _) = seen
    replay = init_generator(3)
    system.encode_images(_pixels(16), generator=replay)
    assert torch.equal(x1, torch.randn(x1.shape, generator=replay))
    assert torch.equal(x2, torch.randn(x2.shape, generator=torch.Generator().manual_seed(3)))


def test_refusals_name_the_option(tiny_sd, system, tmp_path):
    from sdadapt.img2img import check_vae_encode
    from sdadapt.jobs import run_generate
    from sdadapt.samplers.a1111_noise import A1111Seeds

    with pytest.raises(ValueError, match="--vae-encode must be one of mean, sample"):
        check_vae_encode("argmax")
    with pytest.raises(ValueError, match="--vae-encode sample .* needs --init-image"):
        run_generate(model=str(tiny_sd), prompt="a photo", out=str(tmp_path / "o.png"), steps=2, vae_encode="sample",
                     device="cpu")
    with pytest.raises(ValueError, match="--vae-encode must be one of"):
        run_generate(model=str(tiny_sd), prompt="a photo", out=str(tmp_path / "o.png"), steps=2, vae_encode="Full",
                     device="cpu")
    with pytest.raises(ValueError, match="generator= .* noise="):
        generate(system, ["a photo"], steps=2, noise=A1111Seeds(), generator=torch.Generator())
    with pytest.raises(ValueError, match="needs shape="):
        init_generator(1, a1111_noise=True)


def test_cli_takes_vae_encode(tmp_path):
    from sdadapt.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--model", "m", "--prompt", "p", "--out", str(tmp_path / "o.png"), "--vae-encode", "full"])


def test_the_example_in_docs_samplers_md_runs_and_is_the_sampled_img2img(system):
    from docs_pages import run_block_with

    pixels = _pixels(32)
    scope = run_block_with("samplers.md", "init_generator", {"system": system, "pixels": pixels, "generate": generate})
    g = init_generator(5)
    expected = generate(system, ["a photo"], seed=5, init_latents=system.encode_images(pixels, generator=g),
                        denoising_strength=0.6, generator=g)
    assert torch.equal(scope["image"], expected)


def test_inpainting_samples_the_encoded_init_image_of_each_seed(tiny_sd, system, tmp_path, monkeypatch):
    """generate --mask --vae-encode sample: the init latents are the posterior sample of the (filled) pixels the
    inpaint tab encodes, from the seed's generator, whose next draw is the start noise; the mean run keeps the
    inpaint tab's mean latents."""
    import numpy as np
    from PIL import Image

    from sdadapt.jobs import run_generate
    from sdadapt.jobs.generate_inpaint import inpaint_inputs

    size = system.image_size
    image = _init_png(tmp_path / "init.png", size)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4: size // 2, size // 4: size // 2] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    runs = {}
    for method in ("mean", "sample"):
        seen = _spy(monkeypatch)
        run_generate(model=str(tiny_sd), prompt="a photo", out=str(tmp_path / f"{method}.png"), seed=4, steps=4,
                     sampler="euler", init_image=str(image), mask=str(tmp_path / "mask.png"),
                     denoising_strength=0.5, vae_encode=method, device="cpu")
        runs[method] = seen
    inputs = inpaint_inputs(system, image, tmp_path / "mask.png", height=size, width=size)
    (x_mean, init_mean), (x_sample, init_sample) = runs["mean"][0], runs["sample"][0]  # (the masked run's outer call)
    assert torch.equal(init_mean, inputs.init)
    g = init_generator(4)
    assert torch.equal(init_sample, system.encode_images(inputs.pixels[None], generator=g).float())
    assert torch.equal(x_sample, torch.randn(x_sample.shape, generator=g))
    assert torch.equal(x_mean, torch.randn(x_mean.shape, generator=torch.Generator().manual_seed(4)))
