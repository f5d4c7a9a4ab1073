"""``generate`` follow-ups of ``--vae-encode sample`` and emphasis:

* an inpainting model (9-channel UNet) under ``--vae-encode sample`` draws, from the seed's generator, the init
  image's posterior ε, the start noise, the masked image's ε, then the sampler noise — diffusers' inpaint pipelines'
  order (``pipeline_stable_diffusion_inpaint.py`` / ``pipeline_stable_diffusion_xl_inpaint.py``, diffusers 0.42:
  ``prepare_latents`` → ``_encode_vae_image(image, generator)`` then ``randn_tensor``; ``prepare_mask_latents`` →
  ``_encode_vae_image(masked_image, generator)``; the scheduler's ``step(..., generator)``), checked against the real
  pipelines on tiny random models; ``generate(start_noise=)`` that makes it possible;
* the infotext's ``VAE encode: sample`` and its reading back as ``--vae-encode sample``;
* the emphasis mean restore on states of mean 0 (A1111's ``z * (original_mean / new_mean)`` has no guard).
"""

from __future__ import annotations

import re
import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from sdadapt import inpaint, samplers
from sdadapt.img2img import init_generator
from sdadapt.jobs.generate_inpaint import sampled_encodings
from sdadapt.sampling import generate
from tests.test_inpaint import _plain_sd_folder, inpainting_sd, inpainting_system  # noqa: F401  (module fixtures)

REAL_SAMPLE_LATENTS = samplers.sample_latents
SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}


def _scheduler(sampler):
    if sampler == "ddim":
        return diffusers.DDIMScheduler(**SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    return diffusers.DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="sde-dpmsolver++")


def _image_and_mask(size, seed=2):
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    mask_u8 = torch.zeros(size, size)
    mask_u8[4:20, 8:30] = 255.0
    return image, inpaint.conditioning_mask(mask_u8)  # ((1, 3, H, W) in [-1, 1], (1, 1, H, W) of 0 / 1)


def _theirs(pipe, image, pixel_mask, *, seed, strength, steps, **size):
    with warnings.catch_warnings():  # (a tensor in [-1, 1] is taken as it is, with a FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return pipe("a photo", image=image, mask_image=pixel_mask, strength=strength, num_inference_steps=steps,
                    guidance_scale=3.0, generator=torch.Generator().manual_seed(seed), output_type="latent",
                    **size).images


@pytest.mark.parametrize("sampler,strength", [("ddim", 0.6), ("dpmsolver++_sde", 0.7)])
def test_an_inpainting_models_sampled_run_equals_diffusers_inpaint_pipeline_from_pixels(
        inpainting_system, sampler, strength):  # noqa: F811
    """StableDiffusionInpaintPipeline(image=pixels, mask_image=mask, generator=manual_seed(seed)) on a 9-channel
    UNet encodes both images itself, each by a posterior sample from the generator (the image's, then the start
    noise, then the masked image's, then the scheduler's noise: SDE-DPM-Solver++ draws one every step). sdadapt's
    ``sampled_encodings`` + ``generate(**options)`` gives its latents within 1e-4 (the float arithmetic of the
    sampler, as tests/test_inpaint.py; measured in the report). The mean encoding, and the old order (the masked
    image's ε before the start noise), miss by far more."""
    system = inpainting_system
    size = system.image_size
    image, pixel_mask = _image_and_mask(size)
    masked = (inpaint.masked_image(image, pixel_mask, 1.0), pixel_mask)
    run = {"seed": 7, "steps": 5, "guidance": 3.0, "sampler": sampler, "denoising_strength": strength,
           "output": "latents"}
    init, options, _ = sampled_encodings(system, image, seed=7, a1111_noise=False, masked=masked)
    assert set(options) == {"generator", "start_noise", "inpaint_conditioning"}
    ours = generate(system, ["a photo"], init_latents=init, **options, **run)
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=system.vae, text_encoder=system.text_encoder, tokenizer=system.tokenizer, unet=system.unet,
        scheduler=_scheduler(sampler), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = _theirs(pipe, image, pixel_mask, seed=7, strength=strength, steps=5, negative_prompt="")
    err = float((ours - theirs).abs().max())
    assert err < 1e-4, err
    mean = generate(system, ["a photo"], init_latents=system.encode_images(image),
                    inpaint_conditioning=system.inpainting_conditioning(*masked), **run)
    g = init_generator(7)  # (the order before: the masked image's ε right after the image's, then the start noise)
    before = system.encode_images(image, generator=g)
    conditioning = system.inpainting_conditioning(*masked, generator=g)
    old = generate(system, ["a photo"], init_latents=before, inpaint_conditioning=conditioning, generator=g, **run)
    for other in (mean, old):
        assert float((other - theirs).abs().max()) > 100 * max(err, 1e-6)


def test_an_sdxl_inpainting_models_sampled_run_equals_diffusers_xl_inpaint_pipeline(tmp_path):
    """The same on a tiny SDXL 9-channel UNet against StableDiffusionXLInpaintPipeline (DDIM, 32 x 32)."""
    from tiny_checkpoints import tiny_sdxl_parts, write_single_file

    from sdadapt.jobs.models import load_system

    parts = tiny_sdxl_parts()
    torch.manual_seed(4)
    parts["unet"] = diffusers.UNet2DConditionModel.from_config({**parts["unet"].config, "in_channels": 9}).eval()
    system = load_system(str(write_single_file(parts, tmp_path / "xl_inpaint.safetensors", architecture="sdxl")),
                         device="cpu")
    size = 32
    image, pixel_mask = _image_and_mask(size, seed=3)
    masked = (inpaint.masked_image(image, pixel_mask, 1.0), pixel_mask)
    init, options, _ = sampled_encodings(system, image, seed=5, a1111_noise=False, masked=masked)
    ours = generate(system, ["a photo"], seed=5, steps=3, guidance=3.0, sampler="ddim", height=size, width=size,
                    init_latents=init, denoising_strength=0.75, output="latents", **options)
    pipe = diffusers.StableDiffusionXLInpaintPipeline(
        vae=system.vae, text_encoder=system.text_encoder, text_encoder_2=system.text_encoder_2,
        tokenizer=system.tokenizer, tokenizer_2=system.tokenizer_2, unet=system.unet, scheduler=_scheduler("ddim"),
        requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
    pipe.set_progress_bar_config(disable=True)
    # (no negative_prompt: diffusers zeros a None one, force_zeros_for_empty_prompt, as sdadapt zeros an empty one)
    theirs = _theirs(pipe, image, pixel_mask, seed=5, strength=0.75, steps=3, height=size, width=size)
    err = float((ours - theirs).abs().max())
    assert err < 1e-4, err
    mean = generate(system, ["a photo"], seed=5, steps=3, guidance=3.0, sampler="ddim", height=size, width=size,
                    init_latents=system.encode_images(image), denoising_strength=0.75, output="latents",
                    inpaint_conditioning=system.inpainting_conditioning(*masked))
    assert float((mean - theirs).abs().max()) > 100 * max(err, 1e-6)


def _spy(monkeypatch):
    seen = []

    def spy(model, x_T, cond, **kw):
        start = kw.get("start")
        conditioning = None if start.conditioning is None else start.conditioning.clone()
        seen.append((x_T.clone(), start.init.clone(), conditioning))
        return REAL_SAMPLE_LATENTS(model, x_T, cond, **kw)

    monkeypatch.setattr(samplers, "sample_latents", spy)
    return seen


def _files(tmp_path, size):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(tmp_path / "init.png")
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4: size // 2, size // 4: size // 2] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    return tmp_path / "init.png", tmp_path / "mask.png"


def _parameters(png):
    with Image.open(png) as opened:
        return opened.info["parameters"]


@pytest.mark.parametrize("with_mask", [True, False])
def test_the_job_on_an_inpainting_model_draws_image_noise_then_masked_image(
        inpainting_sd, inpainting_system, tmp_path, monkeypatch, with_mask):  # noqa: F811
    """generate --vae-encode sample on an inpainting model, 2 images (--mask, and img2img without one: A1111's mask
    of ones): image i's init latents, start noise and conditioning are manual_seed(seed + i)'s image ε, next draw,
    masked image's ε, in that order; the mean run keeps the mean latents, the mean conditioning and the seed's first
    draw; the PNG says "VAE encode: sample" for the sampled run only."""
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.generate_inpaint import img2img_pixels, inpaint_inputs

    system = inpainting_system
    size = system.image_size
    image, mask = _files(tmp_path, size)
    runs = {}
    for method in ("mean", "sample"):
        seen = _spy(monkeypatch)
        run_generate(model=str(inpainting_sd), prompt="a photo", out=str(tmp_path / f"{method}.png"), seed=4, count=2,
                     steps=3, sampler="euler", init_image=str(image), denoising_strength=0.5, vae_encode=method,
                     device="cpu", **({"mask": str(mask)} if with_mask else {}))
        runs[method] = seen
    if with_mask:
        inputs = inpaint_inputs(system, image, mask, height=size, width=size)
        pixels, masked, mean_cond = inputs.pixels[None], inputs.masked, inputs.conditioning
    else:
        pixels, masked = img2img_pixels(system, image, height=size, width=size)
        mean_cond = system.inpainting_conditioning(*masked)
    calls = 2 if with_mask else 1  # (a masked run: the outer sample_latents call, then its inner one)
    assert len(runs["mean"]) == len(runs["sample"]) == 2 * calls
    for i in range(2):
        (x_mean, init_mean, cond_mean) = runs["mean"][calls * i]
        (x_sample, init_sample, cond_sample) = runs["sample"][calls * i]
        assert torch.equal(x_mean, torch.randn(x_mean.shape, generator=torch.Generator().manual_seed(4 + i)))
        assert torch.equal(cond_mean, mean_cond)
        assert torch.equal(init_mean, system.encode_images(pixels))
        g = init_generator(4 + i)
        assert torch.equal(init_sample, system.encode_images(pixels, generator=g))
        assert torch.equal(x_sample, torch.randn(x_sample.shape, generator=g))
        assert torch.equal(cond_sample, system.inpainting_conditioning(*masked, generator=g))
        assert not torch.allclose(cond_sample, cond_mean)
    assert "VAE encode: sample" in _parameters(_png(tmp_path, "sample"))
    assert "VAE encode" not in _parameters(_png(tmp_path, "mean"))


def _png(tmp_path, stem):
    return min(tmp_path.glob(f"{stem}*.png"))


def test_with_a1111s_noise_the_masked_image_follows_the_image_on_the_posterior_generator(
        inpainting_sd, inpainting_system, tmp_path, monkeypatch):  # noqa: F811
    """--noise a1111-cpu: the start noise stays A1111's (the mean run's); the image's ε and then the masked image's
    ε come from the generator of init_generator(a1111_noise=True) (A1111's order: init's images_tensor_to_samples,
    then img2img_image_conditioning, both from its global RNG)."""
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.generate_inpaint import inpaint_inputs

    system = inpainting_system
    size = system.image_size
    image, mask = _files(tmp_path, size)
    runs = {}
    for method in ("mean", "sample"):
        seen = _spy(monkeypatch)
        run_generate(model=str(inpainting_sd), prompt="a photo", out=str(tmp_path / f"{method}.png"), seed=6, steps=3,
                     sampler="euler", init_image=str(image), mask=str(mask), denoising_strength=0.5,
                     vae_encode=method, noise="a1111-cpu", device="cpu")
        runs[method] = seen[0]
    inputs = inpaint_inputs(system, image, mask, height=size, width=size)
    (x_mean, _, _), (x_sample, init_sample, cond_sample) = runs["mean"], runs["sample"]
    assert torch.equal(x_sample, x_mean)
    g = init_generator(6, a1111_noise=True, shape=(1, *system.latent_shape(size, size)))
    assert torch.equal(init_sample, system.encode_images(inputs.pixels[None], generator=g))
    assert torch.equal(cond_sample, system.inpainting_conditioning(*inputs.masked, generator=g))


def test_a_plain_models_sampled_encoding_leaves_the_start_noise_to_generate(inpainting_system):  # noqa: F811
    """Without ``masked`` (a plain model) the start noise is not drawn here: the options are the generator alone,
    after the image's ε (diffusers' img2img order, as before)."""
    image, _ = _image_and_mask(inpainting_system.image_size)
    init, options, start = sampled_encodings(inpainting_system, image, seed=3, a1111_noise=False)
    g = init_generator(3)
    assert torch.equal(init, inpainting_system.encode_images(image, generator=g))
    assert set(options) == {"generator"} and start is options["generator"]
    assert torch.equal(torch.randn(8, generator=options["generator"]), torch.randn(8, generator=g))
    _, options, start = sampled_encodings(inpainting_system, image, seed=3, a1111_noise=True)
    assert options == {} and start is None


# ------------------------------------------------------------------------------------------------ start_noise=
def test_start_noise_is_the_generators_first_draw_handed_over(inpainting_system):  # noqa: F811
    """generate(start_noise=x, generator=g) with x the first draw of g = generate(seed) bit for bit — on an
    ancestral sampler (its noise drawn from g after x) through DiffusersSystem.sample, and through the System
    protocol (the toy, whose sample takes no start_noise=); a wrong shape and A1111's noise are refused."""
    from sdadapt.samplers.a1111_noise import A1111Seeds
    from sdadapt.toy import load_toy

    system = inpainting_system
    for model, options in ((system, {"guidance": 3.0}), (load_toy(), {})):
        shape = (1, *model.encode_images(torch.zeros(1, 3, model.image_size, model.image_size)).shape[1:])
        g = torch.Generator().manual_seed(9)
        x = torch.randn(shape, generator=g)
        ours = generate(model, ["a photo"], seed=123, steps=4, sampler="euler_a", output="latents", start_noise=x,
                        generator=g, **options)
        plain = generate(model, ["a photo"], seed=9, steps=4, sampler="euler_a", output="latents", **options)
        assert torch.equal(ours, plain)
        other = generate(model, ["a photo"], seed=9, steps=4, sampler="euler_a", output="latents",
                         start_noise=x * 0.5, **options)
        assert not torch.allclose(other, plain)
        with pytest.raises(ValueError, match=r"start_noise is \(1, 4, 2, 2\)"):
            generate(model, ["a photo"], seed=9, steps=2, sampler="euler", start_noise=torch.zeros(1, 4, 2, 2),
                     **options)
    with pytest.raises(ValueError, match="start_noise= .* noise="):
        generate(system, ["a photo"], steps=2, noise=A1111Seeds(), start_noise=torch.zeros(1, 4, 2, 2))


# ----------------------------------------------------------------------------------------------------- infotext
#: A1111's field pattern (modules/infotext_utils.py ``re_param_code`` at 036500223de0), transcribed
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def test_the_infotext_names_a_sampled_encoding_and_it_reads_back_as_the_option():
    """InfotextRun(vae_encode="sample") writes "VAE encode: sample" after the inpaint fields and before the
    networks' hashes (A1111's reader takes it as a field of its own; it is not A1111's "VAE Encoder", its
    Full/TAESD setting); the value parses back as --vae-encode sample; the mean writes nothing."""
    from sdadapt.cli import build_parser
    from sdadapt.jobs.infotext import VAE_ENCODE_FIELD, InfotextRun

    mask = {"blur": 4.0, "applied": True, "fill": "fill"}
    text = InfotextRun(prompt="a cat", seed=3, width=64, height=64, denoising_strength=0.5, mask=mask,
                       vae_encode="sample", version="v").for_image(0)
    fields = dict(RE_PARAM.findall(text.splitlines()[-1]))
    assert fields[VAE_ENCODE_FIELD] == "sample" and "VAE Encoder" not in fields
    keys = list(fields)
    assert keys.index("Masked content") + 1 == keys.index(VAE_ENCODE_FIELD) == keys.index("Version") - 1
    args = build_parser().parse_args(["generate", "--prompt", "x", "--init-image", "a.png", "-o", "x.png",
                                      "--vae-encode", fields[VAE_ENCODE_FIELD]])
    assert args.vae_encode == "sample"
    plain = InfotextRun(prompt="a cat", seed=3, width=64, height=64, denoising_strength=0.5, mask=mask,
                        version="v").for_image(0)
    assert VAE_ENCODE_FIELD not in dict(RE_PARAM.findall(plain.splitlines()[-1]))
    assert plain == text.replace(", VAE encode: sample", "")


# ---------------------------------------------------------------------------------------------- emphasis guard
def _restore_mean_f64(weighted, plain):
    """A1111's ``z * (original_mean / new_mean)`` per prompt in float64, a ratio that is not finite left at 1."""
    ratio = plain.double().mean(dim=(-2, -1), keepdim=True) / weighted.double().mean(dim=(-2, -1), keepdim=True)
    return weighted.double() * torch.where(torch.isfinite(ratio), ratio, torch.ones_like(ratio))


def test_the_mean_restore_leaves_a_prompt_of_weighted_mean_0_unscaled():
    """Prompt 0 all 0, prompt 1 of mean exactly 0 (±1 columns), prompt 2 ordinary: 0 and 1 keep their weighted
    states (A1111 would give NaN: 0/0), 2 is rescaled to its mean; all finite."""
    from sdadapt.diffusers_system import _restore_mean, _weigh_states

    g = torch.Generator().manual_seed(0)
    plain = torch.randn(3, 5, 8, generator=g)
    plain[0] = 0.0
    plain[1] = torch.tensor([1.0, -1.0]).repeat(5, 4)
    weights = torch.ones(3, 5)
    weights[:, 2] = 1.5
    weights[1] = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0])  # (a ±1 row of weight 1: still mean 0 after weighing)
    weighted = _weigh_states(plain, weights)
    assert float(weighted[1].mean()) == 0.0
    out = _restore_mean(weighted, plain)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], weighted[0]) and torch.equal(out[1], weighted[1])
    assert torch.allclose(out.double(), _restore_mean_f64(weighted, plain), rtol=1e-6, atol=1e-7)
    assert torch.allclose(out[2].mean(), plain[2].mean(), atol=1e-6)
    naive = weighted[:2].double() * (plain[:2].double().mean(dim=(-2, -1), keepdim=True)
                                     / weighted[:2].double().mean(dim=(-2, -1), keepdim=True))
    assert torch.isnan(naive).all()  # (A1111's unguarded division)


def test_an_emphasised_prompt_on_a_text_encoder_of_zero_states_stays_finite(inpainting_system):  # noqa: F811
    """A text encoder whose final LayerNorm gives all-0 states: the emphasised prompt's conditioning is the
    weighted states, 0, not NaN (and equals the plain prompt's)."""
    system = inpainting_system
    encoder = system.text_encoder
    norm = getattr(encoder, "text_model", encoder).final_layer_norm  # (transformers 5: no text_model level)
    saved = {k: v.clone() for k, v in norm.state_dict().items()}
    try:
        with torch.no_grad():
            norm.weight.zero_()
            norm.bias.zero_()
        emphasised = system.prompt_condition("(a:1.5) photo")
        plain = system.prompt_condition("a photo")
    finally:
        norm.load_state_dict(saved)
    assert torch.isfinite(emphasised).all()
    assert torch.equal(emphasised, plain) and not emphasised.any()


def test_an_inpainting_models_latent_noise_fill_is_the_start_noise_handed_over(
        inpainting_sd, inpainting_system, tmp_path, monkeypatch):  # noqa: F811
    """--inpainting-fill latent-noise --vae-encode sample on an inpainting model: the masked area starts from the
    start noise that generate is handed (the generator's draw after the image's ε, before the masked image's), as
    A1111's fill and the plain model's (tests/test_review_b21.py)."""
    from sdadapt.jobs import run_generate

    size = inpainting_system.image_size
    image, _ = _files(tmp_path, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[: size // 2] = 255  # (the top half repainted; no blur: the latent mask is 0 / 1)
    Image.fromarray(mask, "L").save(tmp_path / "half.png")
    seen = _spy(monkeypatch)
    run_generate(model=str(inpainting_sd), prompt="a photo", out=str(tmp_path / "out.png"), seed=4, steps=3,
                 sampler="euler", init_image=str(image), mask=str(tmp_path / "half.png"), mask_blur=0,
                 inpainting_fill="latent-noise", denoising_strength=0.5, vae_encode="sample", device="cpu")
    x_start, init, _ = seen[0]
    top = slice(0, init.shape[-2] // 2 - 1)
    assert torch.equal(init[..., top, :], x_start[..., top, :].to(init))
    g = init_generator(4)
    inpainting_system.encode_images(torch.zeros(1, 3, size, size), generator=g)
    assert torch.equal(x_start, torch.randn(x_start.shape, generator=g))  # (the image's ε, then this)
