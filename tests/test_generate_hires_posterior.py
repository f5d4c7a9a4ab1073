"""``--vae-encode sample`` in the hires pass of an inpainting model (9-channel UNet) whose conditioning
:func:`sdadapt.jobs.generate_hires.sample_image` encodes itself:

* below mask weight 1 (A1111's "Inpainting conditioning mask strength") the weighted upscaled image's posterior
  sample is drawn after that pass's start noise, as diffusers' ``StableDiffusionInpaintPipeline`` called on the
  upscaled image draws its masked image's (``prepare_latents``: the image's ε, the start noise;
  ``prepare_mask_latents``: the masked image's ε; then the scheduler's noise) — checked against the real pipeline,
  its masked image replaced by A1111's weighted one (diffusers binarises masks), and the same pipeline unpatched at
  weight 1;
* a latent upscaler's pass and a cropped pass (no one pipeline call): the draw order, the start noise the same at
  every weight;
* A1111's noise: the conditioning's ε follows the upscaled pixels' on their generator, a cropped pass's grey too.
"""

from __future__ import annotations

import warnings

import diffusers
import pytest
import torch

from sdadapt import inpaint, samplers
from sdadapt.img2img import init_generator
from sdadapt.jobs import generate_hires
from sdadapt.jobs.generate_hires import HiresRequest, crop_hires_latents, sample_image
from tests.test_inpaint import inpainting_sd, inpainting_system  # noqa: F401  (module fixtures)

REAL_SAMPLE_LATENTS = samplers.sample_latents
SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}
RUN = {"seed": 6, "steps": 3, "guidance": 3.0, "negative": ""}


def _spy(monkeypatch):
    """Each sampler run's (x_T, its img2img conditioning or None), in order."""
    seen = []

    def spy(model, x_T, cond, **kw):
        start = kw.get("start")
        conditioning = None if start is None or start.conditioning is None else start.conditioning.clone()
        seen.append((x_T.clone(), conditioning))
        return REAL_SAMPLE_LATENTS(model, x_T, cond, **kw)

    monkeypatch.setattr(samplers, "sample_latents", spy)
    return seen


def _upscaled(monkeypatch):
    """The pixel-lanczos pass's upscaled pixels (B, 3, H', W') in [-1, 1], as sample_image encodes them."""
    made = []
    real = generate_hires.lanczos_upscale_pixels

    def spy(decoded, size, **kw):
        out = real(decoded, size, **kw)
        made.append(out.clone())
        return out

    monkeypatch.setattr(generate_hires, "lanczos_upscale_pixels", spy)
    return made


def _weighted(system, image, weight, generator):
    """A naive c_concat of A1111's weighted hires image: lerp(x, x·0, w) = x·(1 − w) under a mask of ones, encoded
    by a posterior sample from ``generator`` (``None``: the mean)."""
    latents = (system.encode_images(image * (1.0 - weight)) if generator is None
               else system.encode_images(image * (1.0 - weight), generator=generator))
    return torch.cat([torch.ones(len(latents), 1, *latents.shape[-2:]), latents], dim=1)


def _grey(system, shape_hw, generator):
    grey, ones = inpaint.txt2img_masked_image(1, *shape_hw)
    return inpaint.image_conditioning(ones, system.encode_images(grey, generator=generator))


def _hires(system, **kw):
    side = 2 * system.image_size
    return HiresRequest(size=(side, side), steps=3, denoising=0.75, **kw)


# ------------------------------------------------------------------------- one pipeline call: pixel-lanczos
@pytest.mark.parametrize("weight", [0.5, 1.0])
@pytest.mark.parametrize("sampler,scheduler", [
    ("ddim", lambda: diffusers.DDIMScheduler(**SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False)),
    ("dpmsolver++_sde", lambda: diffusers.DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="sde-dpmsolver++"))])
def test_a_pixel_hires_pass_is_diffusers_inpaint_pipeline_on_the_upscaled_image(
        inpainting_system, monkeypatch, weight, sampler, scheduler):  # noqa: F811
    """The pixel-lanczos hires pass of an inpainting model under --vae-encode sample (hires steps 3 at 0.75: A1111's
    grid of int(3 / 0.75) = 4 of which 3 run) = StableDiffusionInpaintPipeline(image=the upscaled pixels, white mask,
    strength=0.75, 4 steps, generator=manual_seed(seed)) within 2e-5 — at weight 1 as it is (its masked image is all
    0, the grey), below 1 with ``prepare_mask_latents`` handed A1111's weighted image instead (what sdadapt weighs:
    the pixels in [0, 1], times 1 − w). SDE-DPM-Solver++ draws noise every step, so any other order shows; the mean
    encoding misses by far."""
    system = inpainting_system
    seen = _spy(monkeypatch)
    upscaled = _upscaled(monkeypatch)
    options = dict(RUN, sampler=sampler, vae_encode="sample")
    ours = sample_image(system, ["a photo"], options, hires=_hires(system, upscaler="pixel-lanczos"),
                        inpainting_mask_weight=weight, vae_encode="sample")
    pixels = upscaled[-1]
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=system.vae, text_encoder=system.text_encoder, tokenizer=system.tokenizer, unet=system.unet,
        scheduler=scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if weight < 1.0:
        real = pipe.prepare_mask_latents
        a1111 = (pixels + 1.0) / 2.0 * (1.0 - weight)  # (A1111 weighs its decoded_samples, in [0, 1])

        def prepare_mask_latents(mask, masked_image, *args, **kw):
            assert not masked_image.any()  # (diffusers' own: the image under a white mask, all 0)
            return real(mask, a1111.to(masked_image), *args, **kw)

        pipe.prepare_mask_latents = prepare_mask_latents
    side = pixels.shape[-1]
    with warnings.catch_warnings():  # (a tensor in [-1, 1] is taken as it is, with a FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        theirs = pipe("a photo", image=pixels, mask_image=torch.ones(1, 1, side, side), strength=0.75,
                      num_inference_steps=4, guidance_scale=3.0, negative_prompt="", height=side, width=side,
                      generator=torch.Generator().manual_seed(RUN["seed"]), output_type="latent").images
    theirs = system.decode_latents(theirs)
    err = float((ours - theirs).abs().max())
    assert err < 2e-5, err  # (measured: 1.7e-6 to 2.3e-6)
    assert seen[-1][1] is not None or weight == 1.0  # (below 1 the conditioning is sample_image's own)
    mean = sample_image(system, ["a photo"], dict(RUN, sampler=sampler), hires=_hires(system, upscaler="pixel-lanczos"),
                        inpainting_mask_weight=weight)
    assert float((mean - theirs).abs().max()) > 100 * max(err, 1e-6)


# ------------------------------------------------------------------------------ draw orders: sdadapt's noise
def test_a_latent_hires_pass_below_weight_1_draws_start_noise_then_the_weighted_images_sample(
        inpainting_system, monkeypatch):  # noqa: F811
    """Latent upscaler, mask weight 0.5: the hires pass's generator is the seed's afresh; its first draw is the
    start noise, its next the weighted decoded image's ε (diffusers' inpaint order, no image ε: the init is the
    upscaled latents); the mean run's conditioning is the mean's, on the same start noise."""
    from sdadapt import img2img

    system = inpainting_system
    runs = {}
    real = img2img.upscale_latents
    for method in ("mean", "sample"):
        seen = _spy(monkeypatch)
        ups = []

        def upscale_spy(*args, _ups=ups, **kw):
            _ups.append(real(*args, **kw))
            return _ups[-1]

        monkeypatch.setattr(img2img, "upscale_latents", upscale_spy)
        sample_image(system, ["a photo"], dict(RUN, sampler="euler_a", vae_encode=method),
                     hires=_hires(system, upscaler="latent"), inpainting_mask_weight=0.5, vae_encode=method)
        runs[method] = (seen[-1], system.decode_latents(ups[-1], clamp=False))
        monkeypatch.undo()
    (x_T, cond), image = runs["sample"]
    g = torch.Generator().manual_seed(RUN["seed"])
    assert torch.equal(x_T, torch.randn(x_T.shape, generator=g))
    assert torch.equal(cond, _weighted(system, image, 0.5, g))
    (mean_x_T, mean_cond), mean_image = runs["mean"]
    assert torch.equal(mean_cond, _weighted(system, mean_image, 0.5, None))
    assert torch.equal(mean_x_T, x_T)  # (the same start noise: the seed's first draw)
    assert not torch.allclose(cond, _weighted(system, image, 0.5, None))


def test_a_cropped_pixel_pass_draws_the_cropped_start_noise_then_the_uncropped_weighted_sample(
        inpainting_system, monkeypatch):  # noqa: F811
    """--hires-width and --hires-height out of the first pass's proportion (enlarged to 64 x 64, cropped to 64 x 56):
    the pixels' ε (64 x 64), the start noise at the cropped size — the same tensor at weight 0.5 as at weight 1,
    where the system draws it itself — then the weighted image's ε at 64 x 64, cut as the latents."""
    system = inpainting_system
    side = 2 * system.image_size
    request = HiresRequest(size=(side, side - 8), steps=3, denoising=0.75, upscaler="pixel-lanczos",
                           upscale_to=(side, side))
    noises, conds = {}, {}
    for weight in (0.5, 1.0):
        seen = _spy(monkeypatch)
        upscaled = _upscaled(monkeypatch)
        sample_image(system, ["a photo"], dict(RUN, sampler="euler_a", vae_encode="sample"), hires=request,
                     inpainting_mask_weight=weight, vae_encode="sample")
        noises[weight], conds[weight] = seen[-1]
        pixels = upscaled[-1]
        monkeypatch.undo()
    x_T = noises[0.5]
    f = system.vae_factor
    assert tuple(x_T.shape[-2:]) == (side // f, (side - 8) // f)
    assert torch.equal(x_T, noises[1.0])
    g = torch.Generator().manual_seed(RUN["seed"])
    system.encode_images(pixels, generator=g)  # (the upscaled pixels' ε, uncropped, first)
    assert torch.equal(x_T, torch.randn(x_T.shape, generator=g))
    whole = _weighted(system, (pixels + 1.0) / 2.0, 0.5, g)
    assert torch.equal(conds[0.5], crop_hires_latents(whole, upscale_to=(side, side), size=request.size, factor=f))


# ------------------------------------------------------------------------------ draw orders: A1111's noise
@pytest.mark.parametrize("weight", [0.5, 1.0])
def test_with_a1111s_noise_a_cropped_pixel_pass_draws_its_conditioning_after_the_pixels(
        inpainting_system, monkeypatch, weight):  # noqa: F811
    """--noise a1111-cpu, a cropped pixel-lanczos pass: the conditioning's ε (the weighted image's below 1, the grey's
    at the cropped size at 1) is the draw after the upscaled pixels' on their generator, init_generator(seed, a1111)
    of the uncropped shape — A1111's order (images_tensor_to_samples, then img2img_image_conditioning) — not a draw
    partly repeating the pixels' ε (a generator of the cropped shape); the start noise stays A1111's."""
    from sdadapt.samplers.a1111_noise import A1111Seeds

    system = inpainting_system
    side = 2 * system.image_size
    request = HiresRequest(size=(side, side - 8), steps=3, denoising=0.75, upscaler="pixel-lanczos",
                           upscale_to=(side, side))
    seen = _spy(monkeypatch)
    upscaled = _upscaled(monkeypatch)
    sample_image(system, ["a photo"], dict(RUN, sampler="euler_a", vae_encode="sample", noise=A1111Seeds(source="cpu")),
                 hires=request, inpainting_mask_weight=weight, vae_encode="sample")
    x_T, cond = seen[-1]
    pixels = upscaled[-1]
    f = system.vae_factor
    whole = (1, *system.latent_shape(side, side))
    g = init_generator(RUN["seed"], a1111_noise=True, shape=whole)
    system.encode_images(pixels, generator=g)  # (the pixels' ε)
    if weight < 1.0:
        expected = crop_hires_latents(_weighted(system, (pixels + 1.0) / 2.0, weight, g), upscale_to=(side, side),
                                      size=request.size, factor=f)
    else:
        expected = _grey(system, request.size, g)
    assert torch.equal(cond, expected)
    cropped = tuple(x_T.shape)
    assert torch.equal(x_T, torch.randn(cropped, generator=torch.Generator().manual_seed(RUN["seed"])))  # (A1111's)
    if weight == 1.0:  # (the grey the system drew itself before: its generator of the cropped shape)
        before = init_generator(RUN["seed"], a1111_noise=True, shape=cropped)
        torch.randn(cropped, generator=before)
        assert not torch.allclose(cond, _grey(system, request.size, before))


def test_with_a1111s_noise_a_latent_pass_below_weight_1_draws_where_its_grey_would(
        inpainting_system, monkeypatch):  # noqa: F811
    """--noise a1111-cpu, latent upscaler, weight 0.5: no pixels are encoded; the weighted image's ε comes from
    init_generator(seed, a1111) past one more draw of the pass's latent shape — where the system draws the same
    pass's grey at weight 1 (DiffusersSystem._conditioning_generator) — checked against that grey's own draw."""
    from sdadapt.samplers.a1111_noise import A1111Seeds

    system = inpainting_system
    grey_cond = {}
    real = type(system).encode_images
    for weight in (0.5, 1.0):
        seen = _spy(monkeypatch)
        made = []

        def encode_spy(self, images, *, generator=None, _made=made):
            if generator is not None:
                _made.append(generator.get_state())
            return real(self, images, generator=generator)

        monkeypatch.setattr(type(system), "encode_images", encode_spy)
        sample_image(system, ["a photo"], dict(RUN, sampler="euler", vae_encode="sample",
                                               noise=A1111Seeds(source="cpu")),
                     hires=_hires(system, upscaler="latent"), inpainting_mask_weight=weight, vae_encode="sample")
        grey_cond[weight] = (made, seen[-1])
        monkeypatch.undo()
    (made_05, (x_T, _)), (made_1, _) = grey_cond[0.5], grey_cond[1.0]
    assert len(made_05) == len(made_1) == 2  # (the first pass's grey, the hires pass's conditioning)
    assert torch.equal(made_05[1], made_1[1])  # (the state each hires conditioning's ε is drawn from)
    g = init_generator(RUN["seed"], a1111_noise=True, shape=tuple(x_T.shape))
    torch.randn(tuple(x_T.shape), generator=g)
    assert torch.equal(made_05[1], g.get_state())


def test_hires_image_conditioning_is_the_mean_without_a_generator_and_a_sample_from_one(
        inpainting_system):  # noqa: F811
    """hires_image_conditioning(pixels=, weight=0.25): without a generator the posterior mean of x·(1 − w) (as
    before), with one the sample drawn from it (the naive c_concat's, from a generator of the same seed)."""
    system = inpainting_system
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    mean, _ = generate_hires.hires_image_conditioning(system, None, weight=0.25, pixels=image)
    assert torch.equal(mean, _weighted(system, image, 0.25, None))
    g = torch.Generator().manual_seed(9)
    drawn, _ = generate_hires.hires_image_conditioning(system, None, weight=0.25, pixels=image,
                                                       generator=torch.Generator().manual_seed(9))
    assert torch.equal(drawn, _weighted(system, image, 0.25, g))
    assert not torch.allclose(drawn, mean)
