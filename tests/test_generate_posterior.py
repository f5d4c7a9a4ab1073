"""``--vae-encode sample`` where an inpainting model's conditioning encodes an image of its own, the infotext of
sampled runs, and the ``ddpm`` sampler against diffusers' inpaint pipeline:

* txt2img on an inpainting model (9-channel UNet): the grey masked image's posterior sample is drawn after the start
  noise and before the sampler noise — diffusers' ``StableDiffusionInpaintPipeline`` at ``strength=1`` with a white
  mask (its masked image is all 0: ``prepare_latents`` draws the start noise, ``prepare_mask_latents`` encodes the
  masked image with the generator, then the scheduler's noise), checked against the real pipeline on a tiny random
  model;
* the hires pass of such a model (its conditioning at the hires size, A1111's ``sample_hr_pass``): the same draw
  after that pass's start noise;
* the infotext of a sampled run with ``--noise`` names the noise, so that it reads back unambiguously;
* ``ddpm``: diffusers' SD pipelines rewrite a scheduler's ``steps_offset`` to 1 in their constructor; sdadapt's
  ``ddpm`` is ``DDPMScheduler``'s defaults as kohya hands them (assigned after construction).
"""

from __future__ import annotations

import re
import warnings

import diffusers
import pytest
import torch
from PIL import Image

from sdadapt import inpaint, samplers
from sdadapt.img2img import init_generator
from sdadapt.sampling import generate
from tests.test_inpaint import _plain_sd_folder, inpainting_sd, inpainting_system  # noqa: F401  (module fixtures)

REAL_SAMPLE_LATENTS = samplers.sample_latents
SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}


def _pipe(system, scheduler, *, assign=False):
    """StableDiffusionInpaintPipeline on the system's parts; ``assign``: the scheduler set after construction (as
    kohya sets its sample scheduler: the constructor rewrites an old config's ``steps_offset`` to 1)."""
    pipe = diffusers.StableDiffusionInpaintPipeline(
        vae=system.vae, text_encoder=system.text_encoder, tokenizer=system.tokenizer, unet=system.unet,
        scheduler=scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if assign:
        pipe.scheduler = scheduler()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(pipe, image, mask, *, seed, strength, steps):
    with warnings.catch_warnings():  # (a tensor in [-1, 1] is taken as it is, with a FutureWarning)
        warnings.simplefilter("ignore", FutureWarning)
        return pipe("a photo", image=image, mask_image=mask, strength=strength, num_inference_steps=steps,
                    guidance_scale=3.0, negative_prompt="", generator=torch.Generator().manual_seed(seed),
                    output_type="latent").images


def _ddim():
    return diffusers.DDIMScheduler(**SCHEDULE, steps_offset=1, set_alpha_to_one=False, clip_sample=False)


def _sde():
    return diffusers.DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="sde-dpmsolver++")


# ------------------------------------------------------------------------------------ txt2img, inpainting model
@pytest.mark.parametrize("sampler,scheduler", [("ddim", _ddim), ("dpmsolver++_sde", _sde)])
def test_txt2img_on_an_inpainting_model_samples_its_grey_as_diffusers_inpaint_pipeline_at_strength_1(
        inpainting_system, sampler, scheduler):  # noqa: F811
    """generate(vae_encode="sample") with no init image on a 9-channel UNet = StableDiffusionInpaintPipeline(image=any,
    mask_image=ones, strength=1.0, generator=manual_seed(seed)) within 1e-4: the start noise, then the grey's ε, then
    the sampler noise (SDE-DPM-Solver++ draws one every step, so a wrong order shows). The mean grey misses by far."""
    system = inpainting_system
    size = system.image_size
    run = {"seed": 11, "steps": 5, "guidance": 3.0, "sampler": sampler, "output": "latents"}
    ours = generate(system, ["a photo"], vae_encode="sample", **run)
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2 - 1  # (masked away: any)
    theirs = _theirs(_pipe(system, scheduler), image, torch.ones(1, 1, size, size), seed=11, strength=1.0, steps=5)
    err = float((ours - theirs).abs().max())
    assert err < 1e-4, err
    mean = generate(system, ["a photo"], **run)
    assert float((mean - theirs).abs().max()) > 100 * max(err, 1e-6)
    assert torch.equal(mean, generate(system, ["a photo"], vae_encode="mean", **run))


def _spy(monkeypatch):
    seen = []

    def spy(model, x_T, cond, **kw):
        start = kw.get("start")
        seen.append((x_T.clone(), None if start is None else start.init.clone(), kw.get("generator")))
        return REAL_SAMPLE_LATENTS(model, x_T, cond, **kw)

    monkeypatch.setattr(samplers, "sample_latents", spy)
    return seen


def _conditioning_spy(system, monkeypatch):
    """The c_concat each inpainting_conditioning call returns, in order."""
    made = []
    real = type(system).inpainting_conditioning

    def spy(self, images, mask, *, generator=None):
        out = real(self, images, mask, generator=generator)
        made.append((out.clone(), generator is not None))
        return out

    monkeypatch.setattr(type(system), "inpainting_conditioning", spy)
    return made


def test_the_draws_come_in_order_start_noise_grey_sampler_noise(inpainting_system, monkeypatch):  # noqa: F811
    """The grey's ε is the seed generator's draw right after the start noise (its second draw), and the sampler noise
    comes after it; with A1111's noise the start noise is A1111's and the ε comes from init_generator(seed, a1111)
    after one draw of its shape (where a pixel hires pass's image ε is drawn: A1111 encodes the image first)."""
    from sdadapt.samplers.a1111_noise import A1111Seeds

    system = inpainting_system
    size = system.image_size
    made = _conditioning_spy(system, monkeypatch)
    seen = _spy(monkeypatch)
    generate(system, ["a photo"], seed=3, steps=2, guidance=3.0, sampler="euler_a", vae_encode="sample")
    g = torch.Generator().manual_seed(3)
    shape = seen[0][0].shape
    assert torch.equal(seen[0][0], torch.randn(shape, generator=g))
    grey, ones = inpaint.txt2img_masked_image(1, size, size)
    assert torch.equal(made[0][0], _encode(system, grey, ones, g))  # (the draw after the start noise)
    assert not torch.allclose(made[0][0], system.inpainting_conditioning(grey, ones))
    made.clear()
    seen.clear()
    generate(system, ["a photo"], seed=3, steps=2, guidance=3.0, sampler="euler", vae_encode="sample",
             noise=A1111Seeds(source="cpu"))
    a1111 = init_generator(3, a1111_noise=True, shape=tuple(shape))
    torch.randn(shape, generator=a1111)  # (the place of an image's ε, drawn first: a pixel hires pass draws it there)
    assert torch.equal(made[0][0], _encode(system, grey, ones, a1111))
    assert torch.equal(seen[0][0], torch.randn(shape, generator=torch.Generator().manual_seed(3)))  # (A1111's CPU)


def _encode(system, grey, ones, g):
    from sdadapt.inpaint import image_conditioning

    return image_conditioning(ones, system.encode_images(grey, generator=g))


# ------------------------------------------------------------------------------------------ the job, hires pass
@pytest.mark.parametrize("upscaler", ["latent", "pixel-lanczos"])
def test_the_jobs_hires_pass_on_an_inpainting_model_samples_its_grey_after_its_start_noise(
        inpainting_sd, inpainting_system, tmp_path, monkeypatch, upscaler):  # noqa: F811
    """generate --vae-encode sample --hires-scale 2 on an inpainting model, no init image: each pass's grey
    conditioning is the seed generator's draw right after that pass's start noise — the first pass: start noise,
    grey; the hires pass afresh from the seed: (pixel-lanczos: the upscaled image's ε,) start noise, grey. The mean
    run's conditionings are the mean's. The PNG says VAE encode: sample."""
    from sdadapt.jobs import run_generate

    system = inpainting_system
    size = system.image_size
    runs = {}
    for method in ("mean", "sample"):
        made = _conditioning_spy(system, monkeypatch)
        seen = _spy(monkeypatch)
        run_generate(model=str(inpainting_sd), prompt="a photo", out=str(tmp_path / f"{method}.png"), seed=4,
                     steps=2, sampler="euler", hires_scale=2.0, hires_upscaler=upscaler, hires_denoising=0.5,
                     vae_encode=method, device="cpu")
        runs[method] = (made, seen)
        monkeypatch.undo()
    (made_mean, _), (made, seen) = runs["mean"], runs["sample"]
    assert [m[1] for m in made_mean] == [False, False] and [m[1] for m in made] == [True, True]
    for (cond, _), (x_T, _, _), side in zip(made, seen, (size, 2 * size)):
        g = torch.Generator().manual_seed(4)
        if side != size and upscaler == "pixel-lanczos":
            torch.randn(x_T.shape, generator=g)  # (the upscaled pixels' posterior ε, drawn first)
        assert torch.equal(x_T, torch.randn(x_T.shape, generator=g))
        grey, ones = inpaint.txt2img_masked_image(1, side, side)
        assert torch.equal(cond, _encode(system, grey, ones, g))
    with Image.open(tmp_path / "sample.png") as png:
        assert "VAE encode: sample" in png.info["parameters"]


def test_a_plain_model_refuses_sample_without_an_image_to_encode(tmp_path_factory, tmp_path):
    """A plain model's txt2img (and its latent hires pass) encodes nothing: --vae-encode sample is refused once the
    model is loaded, naming the model and the fix."""
    from sdadapt.jobs import run_generate

    folder = _plain_sd_folder(tmp_path_factory)
    with pytest.raises(ValueError, match=r"is no inpainting model, so it needs --init-image"):
        run_generate(model=str(folder), prompt="a photo", out=str(tmp_path / "o.png"), steps=2,
                     vae_encode="sample", hires_scale=2.0, device="cpu")


# ---------------------------------------------------------------------------------------------------- infotext
#: A1111's field pattern (modules/infotext_utils.py ``re_param_code`` at 036500223de0), transcribed
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def _fields(run) -> dict:
    return dict(RE_PARAM.findall(run.for_image(0).splitlines()[-1]))


def test_a_sampled_runs_infotext_tells_its_noise_apart():
    """--vae-encode sample: without --noise "RNG: CPU" and no Noise field; with --noise a1111-cpu "RNG: CPU" and
    "Noise: a1111-cpu"; with --noise a1111 no RNG (A1111's GPU) and "Noise: a1111" — three texts for three runs, each
    field reading back as its option. A mean run writes no Noise field, --noise or not (its numbers are A1111's)."""
    from sdadapt.cli import build_parser
    from sdadapt.jobs.infotext import NOISE_FIELD, VAE_ENCODE_FIELD, InfotextRun

    def run(noise, vae_encode="sample"):
        return _fields(InfotextRun(prompt="a cat", seed=3, width=64, height=64, sampler="euler", noise=noise,
                                   denoising_strength=0.5, vae_encode=vae_encode, version="v"))

    plain, cpu, gpu = run(None), run("a1111-cpu"), run("a1111")
    assert plain.get("RNG") == "CPU" and NOISE_FIELD not in plain
    assert cpu.get("RNG") == "CPU" and cpu[NOISE_FIELD] == "a1111-cpu"
    assert "RNG" not in gpu and gpu[NOISE_FIELD] == "a1111"
    assert len({tuple(sorted(f.items())) for f in (plain, cpu, gpu)}) == 3
    keys = list(cpu)
    assert keys.index(VAE_ENCODE_FIELD) + 1 == keys.index(NOISE_FIELD)
    args = build_parser().parse_args(["generate", "--prompt", "x", "-o", "x.png", "--vae-encode",
                                      cpu[VAE_ENCODE_FIELD], "--noise", cpu[NOISE_FIELD]])
    assert (args.vae_encode, args.noise) == ("sample", "a1111-cpu")
    for noise in (None, "a1111-cpu", "a1111"):
        assert NOISE_FIELD not in run(noise, "mean") and VAE_ENCODE_FIELD not in run(noise, "mean")


# -------------------------------------------------------------------------------------------------------- ddpm
def test_ddpm_is_ddpm_schedulers_defaults_as_kohya_hands_them_not_the_inpaint_constructors_rewrite(
        inpainting_system):  # noqa: F811
    """sdadapt's ddpm (steps_offset 0: timesteps 800, 600, ..., 0 for 5 steps) on an inpainting model under
    --vae-encode sample = StableDiffusionInpaintPipeline with DDPMScheduler's defaults assigned after construction
    (kohya's ``pipeline.scheduler = get_my_scheduler(...)``) within 1e-4. Handed to the constructor, the same
    scheduler is rewritten to steps_offset 1 (timesteps 801, ..., 1: the pipeline's "outdated config" fix) and the
    latents differ — the mismatch seen before, which is the pipeline's, not the sampler's."""
    from sdadapt.jobs.generate_inpaint import sampled_encodings

    system = inpainting_system
    size = system.image_size
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask_u8 = torch.zeros(size, size)
    mask_u8[4:20, 8:30] = 255.0
    pixel_mask = inpaint.conditioning_mask(mask_u8)
    masked = (inpaint.masked_image(image, pixel_mask, 1.0), pixel_mask)
    init, options, _ = sampled_encodings(system, image, seed=7, a1111_noise=False, masked=masked)
    ours = generate(system, ["a photo"], init_latents=init, **options, seed=7, steps=5, guidance=3.0, sampler="ddpm",
                    denoising_strength=0.6, output="latents")

    def ddpm():
        return diffusers.DDPMScheduler(**SCHEDULE)

    assigned = _pipe(system, ddpm, assign=True)
    assert assigned.scheduler.config.steps_offset == 0
    theirs = _theirs(assigned, image, pixel_mask, seed=7, strength=0.6, steps=5)
    err = float((ours - theirs).abs().max())
    assert err < 1e-4, err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rewritten = _pipe(system, ddpm)
    assert rewritten.scheduler.config.steps_offset == 1
    rewritten.scheduler.set_timesteps(5)
    assert rewritten.scheduler.timesteps.tolist() == [801, 601, 401, 201, 1]
    other = _theirs(rewritten, image, pixel_mask, seed=7, strength=0.6, steps=5)
    assert float((ours - other).abs().max()) > 100 * max(err, 1e-6)


def test_with_a1111s_noise_the_pixel_hires_grey_follows_the_upscaled_pixels(
        inpainting_sd, inpainting_system, tmp_path, monkeypatch):  # noqa: F811
    """--noise a1111-cpu, pixel-lanczos hires on an inpainting model: the hires grey's ε is the draw after the
    upscaled pixels' on init_generator(seed, a1111) (A1111's order: images_tensor_to_samples of the pixels, then their
    conditioning), not the pixels' own ε again; the start noise stays A1111's."""
    from sdadapt.jobs import run_generate

    system = inpainting_system
    made = _conditioning_spy(system, monkeypatch)
    pixel_eps = []
    real_encode = type(system).encode_images

    def encode_spy(self, images, *, generator=None):
        if generator is not None and images.any():  # (the hires pass's pixels: not a grey of all 0)
            pixel_eps.append(generator.get_state())
        return real_encode(self, images, generator=generator)

    monkeypatch.setattr(type(system), "encode_images", encode_spy)
    run_generate(model=str(inpainting_sd), prompt="a photo", out=str(tmp_path / "o.png"), seed=4, steps=2,
                 sampler="euler", hires_scale=2.0, hires_upscaler="pixel-lanczos", hires_denoising=0.5,
                 vae_encode="sample", noise="a1111-cpu", device="cpu")
    side = 2 * system.image_size
    shape = (1, *system.latent_shape(side, side))
    g = init_generator(4, a1111_noise=True, shape=shape)
    assert len(pixel_eps) == 1 and torch.equal(pixel_eps[0], g.get_state())  # (the pixels' ε: drawn first)
    torch.randn(shape, generator=g)
    grey, ones = inpaint.txt2img_masked_image(1, side, side)
    assert torch.equal(made[-1][0], _encode(system, grey, ones, g))
    same = init_generator(4, a1111_noise=True, shape=shape)
    assert not torch.equal(made[-1][0], _encode(system, grey, ones, same))
