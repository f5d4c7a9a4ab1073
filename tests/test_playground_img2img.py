"""Playground v2.5 (EDM) img2img, inpainting and the hires fix's second pass — against the real diffusers.

- D huggingface/diffusers 0.42.1 (the installed package, imported and run):
  pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl_img2img.py (``get_timesteps`` with strength and
  ``set_begin_index``; ``prepare_latents``: ``(μ − latents_mean)·scaling_factor / latents_std`` then
  ``scheduler.add_noise`` at the first kept timestep), pipeline_stable_diffusion_xl_inpaint.py (``prepare_latents``:
  pure noise · ``init_noise_sigma`` at strength 1; the 4-channel loop's blend ``(1 − m)·add_noise(init, noise,
  t_next) + m·x`` after every step, the init itself after the last), schedulers/scheduling_edm_euler.py and
  scheduling_edm_dpmsolver_multistep.py (``add_noise``: ``x0 + noise·σ`` at ``begin_index`` / ``step_index``).
The tiny Playground-like model: tests/test_playground_edm.py's ``playground_files``. Images 16 x 16 (latents 8 x 8).
"""

from __future__ import annotations

import functools

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

SAMPLERS = ["dpmsolver++", "dpmsolver++_sde", "euler"]
STRENGTHS = [0.3, 0.75, 1.0]
STEPS = 8
TOL = 1e-5


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from test_playground_edm import playground_files

    return playground_files(tmp_path_factory.mktemp("pg_img2img"))[0]


@pytest.fixture(scope="module")
def system(model_file):
    from sdadapt.diffusers_system import DiffusersSystem

    return DiffusersSystem.from_single_file(model_file)


def _scheduler(system, sampler):
    cls = diffusers.EDMEulerScheduler if sampler == "euler" else diffusers.EDMDPMSolverMultistepScheduler
    extra = {"algorithm_type": "sde-dpmsolver++"} if sampler == "dpmsolver++_sde" else {}
    return cls.from_config({**system.scheduler_config, **extra})


def _pipeline(system, sampler, cls):
    parts = dict(vae=system.vae, text_encoder=system.text_encoder, text_encoder_2=system.text_encoder_2,
                 tokenizer=system.tokenizer, tokenizer_2=system.tokenizer_2, unet=system.unet,
                 scheduler=_scheduler(system, sampler))
    extra = {} if cls is diffusers.StableDiffusionXLPipeline else {"requires_aesthetics_score": False}
    pipe = cls(**parts, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _init(system, seed=11):
    """(1, 4, 8, 8) init latents of the scale Playground's normalised latents have."""
    return torch.randn(1, *system.latent_shape(16, 16), generator=torch.Generator().manual_seed(seed))


def _ours(system, sampler, strength, **kw):
    from sdadapt.sampling import generate

    return generate(system, ["a red cube"], negative="blurry", seed=3, steps=STEPS, guidance=4.0, sampler=sampler,
                    height=16, width=16, denoising_strength=strength, output="latents", **kw)


@pytest.fixture(scope="module")
def img2img_of(system):
    """``img2img_of(sampler, strength)``: ``_ours`` from :func:`_init`'s latents, each run once per module (the
    img2img test checks it against D's pipeline; the inpainting test reuses it as its unmasked run)."""
    return functools.cache(lambda sampler, strength: _ours(system, sampler, strength, init_latents=_init(system)))


def _theirs(pipe, strength, **kw):
    return pipe("a red cube", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=4.0, height=16,
                width=16, strength=strength, generator=torch.Generator().manual_seed(3), output_type="latent",
                **kw).images


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_img2img_is_diffusers_xl_img2img_with_its_edm_scheduler(system, img2img_of, sampler, strength):
    """generate(init_latents=, denoising_strength=) = D's StableDiffusionXLImg2ImgPipeline on the same latents
    (``image`` with 4 channels: used as the init latents) — every sampler by diffusers' strength rule (Euler too,
    which takes A1111's on the discrete models: 8 steps at 0.75 run 6 here, A1111's rule 7), the SDE's noise drawn
    after the start noise from the seed's generator. A run from the txt2img start (x_T·√(σ_max²+1), A1111's
    init + x_T·σ or the whole grid) would differ by far more."""
    init = _init(system)
    ours = img2img_of(sampler, strength)
    theirs = _theirs(_pipeline(system, sampler, diffusers.StableDiffusionXLImg2ImgPipeline), strength, image=init)
    assert (ours - theirs).abs().max() <= TOL, (ours - theirs).abs().max()
    assert (ours - init).abs().max() > 1e-3  # (the steps ran)


def test_img2img_from_pixels_and_to_pixels_is_diffusers(system, monkeypatch):
    """The whole img2img path in pixels: our encode (the posterior mean, normalised by latents_mean / latents_std),
    sampling and decode = D's pipeline given the image, its VAE encode read at the posterior mean
    (``retrieve_latents(..., sample_mode="argmax")``: D otherwise draws the posterior sample from the seed's generator
    before the start noise; sdadapt encodes the mean, as its img2img of the other models does)."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as module

    monkeypatch.setattr(module, "retrieve_latents", functools.partial(module.retrieve_latents, sample_mode="argmax"))
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(4))  # [0, 1]
    ours = _ours(system, "dpmsolver++", 0.6, init_latents=system.encode_images(image * 2 - 1))
    pipe = _pipeline(system, "dpmsolver++", diffusers.StableDiffusionXLImg2ImgPipeline)
    assert (ours - _theirs(pipe, 0.6, image=image)).abs().max() <= TOL
    pixels = system.decode_latents(ours) / 2 + 0.5
    theirs = pipe("a red cube", negative_prompt="blurry", num_inference_steps=STEPS, guidance_scale=4.0, height=16,
                  width=16, strength=0.6, image=image, generator=torch.Generator().manual_seed(3),
                  output_type="pt").images
    assert (pixels - theirs).abs().max() <= TOL, (pixels - theirs).abs().max()


def _latent_mask():
    """A (1, 1, 8, 8) 0/1 latent mask (1 = repaint) and the 16 x 16 pixel mask D's mask processor brings back to it
    (its nearest-neighbour resize to the latent size)."""
    latmask = torch.zeros(1, 1, 8, 8)
    latmask[..., 2:6, 1:5] = 1
    latmask[..., 7, 6:] = 1
    return latmask, latmask.repeat_interleave(2, -1).repeat_interleave(2, -2)


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_inpainting_is_diffusers_xl_inpaint_with_its_edm_scheduler(system, img2img_of, sampler, strength):
    """generate(init_latents=, inpaint_mask=) = D's StableDiffusionXLInpaintPipeline (4-channel UNet) on the same
    latents and mask: pure noise at strength 1, the blend with the init noised to the next σ after every step; outside
    the mask the result is the init latent itself (the last blend's)."""
    init = _init(system)
    latmask, pixel_mask = _latent_mask()
    ours = _ours(system, sampler, strength, init_latents=init, inpaint_mask=latmask)
    pipe = _pipeline(system, sampler, diffusers.StableDiffusionXLInpaintPipeline)
    theirs = _theirs(pipe, strength, image=init, mask_image=pixel_mask)
    assert (ours - theirs).abs().max() <= TOL, (ours - theirs).abs().max()
    keep = latmask.expand_as(ours) == 0
    assert torch.equal(ours[keep], init[keep])
    if strength > 0.5:  # (the per-step blend reaches the repainted part; at 0.3 the tiny UNet moves it ~5e-5)
        plain = img2img_of(sampler, strength)  # (the img2img run of the same init, seed and strength)
        assert (plain - ours)[~keep].abs().max() > 0.1


def test_edm_start_and_blend_rules():
    """The two rules on a hand grid, in float64 (D's formulas written out): img2img starts at t_start =
    n − int(n·S) from init + σ·x_T (an index given: that index), strength 0 returns the init; inpainting starts at
    strength 1 from x_T·√(σ_max² + 1) and blends after step i with init + σ_{i+1}·x_T (init after the last)."""
    from sdadapt.img2img import Img2ImgStart
    from sdadapt.samplers.edm import EDMSchedule, edm_inpaint_blend, edm_start

    schedule = EDMSchedule()
    sigmas = torch.tensor([80.0, 20.0, 5.0, 1.0, 0.0])
    x_T, init = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for strength, first in ((1.0, 0), (0.75, 1), (0.3, 3), (0.2, 4), (0.0, 4)):
        got_first, x = edm_start(Img2ImgStart(init, strength=strength), x_T, sigmas, schedule=schedule)
        assert got_first == first
        want = init.double() if first == 4 else init.double() + float(sigmas[first]) * x_T.double()
        assert torch.allclose(x.double(), want, atol=1e-6)
    assert edm_start(Img2ImgStart(init, index=2), x_T, sigmas, schedule=schedule)[0] == 2
    mask = (torch.rand(1, 1, 3, 3) > 0.5).float()
    first, x = edm_start(Img2ImgStart(init, strength=1.0, mask=mask), x_T, sigmas, schedule=schedule)
    assert first == 0 and torch.allclose(x.double(), x_T.double() * (80.0 ** 2 + 1) ** 0.5, rtol=1e-6)
    first, x = edm_start(Img2ImgStart(init, strength=0.75, mask=mask), x_T, sigmas, schedule=schedule)
    assert first == 1 and torch.allclose(x, init + 20.0 * x_T)
    blend = edm_inpaint_blend(Img2ImgStart(init, strength=0.75, mask=mask), x_T, sigmas)
    y = torch.randn_like(x_T)
    for i in range(4):
        proper = init.double() + (float(sigmas[i + 1]) * x_T.double() if i < 3 else 0.0)
        want = (1 - mask.double()) * proper + mask.double() * y.double()
        assert torch.allclose(blend(i, y).double(), want, atol=1e-6), i
    assert edm_inpaint_blend(Img2ImgStart(init, strength=0.75), x_T, sigmas) is None
    conditioned = Img2ImgStart(init, strength=0.75, mask=mask, conditioning=torch.zeros(2, 5, 3, 3))
    assert edm_inpaint_blend(conditioned, x_T, sigmas) is None  # (a 9-channel UNet: D blends for 4 channels only)


@pytest.mark.parametrize("sampler, upscaler", [("dpmsolver++", "latent"), ("euler", "latent-nearest")])
def test_hires_second_pass_is_diffusers_xl_img2img_on_the_upscaled_latents(system, monkeypatch, sampler, upscaler):
    """First pass 16 x 16 (= D's txt2img pipeline), hires 32 x 32 at 0.75 with 6 steps (A1111's hires rule: a grid
    of int(6 / 0.75) = 8, its last 6): the second pass = D's XL img2img pipeline on the upscaled latents, 8 steps at
    strength 0.75 (t_start 2), conditioned on the hires size."""
    from generate_recorder import record_generate

    from sdadapt.jobs.generate_hires import HiresRequest, sample_image

    calls = record_generate(monkeypatch)
    options = {"seed": 5, "steps": STEPS, "guidance": 3.0, "sampler": sampler, "negative": "", "height": 16,
               "width": 16}
    image = sample_image(system, ["a photo"], options, hires=HiresRequest((32, 32), steps=6, denoising=0.75,
                                                                          upscaler=upscaler))
    assert image.shape == (1, 3, 32, 32)
    (_, first), (second_kw, ours) = calls
    txt2img = _pipeline(system, sampler, diffusers.StableDiffusionXLPipeline)
    base = txt2img("a photo", num_inference_steps=STEPS, guidance_scale=3.0, height=16, width=16,
                   generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert (first - base).abs().max() <= TOL
    init = second_kw["init_latents"]
    assert init.shape[-2:] == (16, 16)
    pipe = _pipeline(system, sampler, diffusers.StableDiffusionXLImg2ImgPipeline)
    theirs = pipe("a photo", image=init, strength=0.75, num_inference_steps=8, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert (ours - theirs).abs().max() <= TOL, (ours - theirs).abs().max()


def test_edm_img2img_still_refuses_what_the_edm_samplers_do_not_run(system):
    """A start does not lift the EDM refusals: A1111's schedules and a sampler with no EDM scheduler."""
    from sdadapt.sampling import generate

    init = _init(system)
    with pytest.raises(ValueError, match="leave out a schedule"):
        generate(system, ["a"], steps=2, height=16, width=16, sampler="euler", schedule="exponential",
                 init_latents=init)
    with pytest.raises(ValueError, match="sampler 'heun' has no EDM form"):
        generate(system, ["a"], steps=2, height=16, width=16, sampler="heun", init_latents=init,
                 inpaint_mask=torch.ones(1, 1, 8, 8))


def test_generate_cli_runs_edm_img2img_and_inpainting_and_says_so(system, model_file, tmp_path):
    """``generate --init-image`` on a Playground file: the PNG is D's XL img2img pipeline (Euler) on the init image's
    latents (sdadapt's encode, checked against D's above), decoded, to the 8-bit level — so the job takes diffusers'
    strength rule (Euler at 0.5 of 4 steps runs 2; A1111's rule would run 3); with ``--mask`` too; both runs write
    A1111's infotext fields (read back by the A1111 parser transcription of tests/test_infotext.py)."""
    import numpy as np
    from PIL import Image
    from test_infotext import a1111_parse

    from sdadapt.cli import main
    from sdadapt.images import read_png_text, to_uint8
    from sdadapt.jobs.generate_hires import init_latents_from_image

    Image.fromarray((np.random.RandomState(0).rand(16, 16, 3) * 255).astype("uint8")).save(tmp_path / "init.png")
    mask = np.zeros((16, 16), "uint8")
    mask[4:12, 2:10] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    common = ["generate", "--model", str(model_file), "--prompt", "a cube", "--negative", "blurry", "--steps", "4",
              "--width", "16", "--height", "16", "--sampler", "euler", "--seed", "2", "--cfg", "4", "-q"]
    runs = {"img2img": ["--init-image", tmp_path / "init.png", "--denoising-strength", "0.5"],
            "inpaint": ["--init-image", tmp_path / "init.png", "--mask", tmp_path / "mask.png",
                        "--denoising-strength", "0.75"]}
    fields = {}
    for name, extra in runs.items():
        out = tmp_path / f"{name}.png"
        assert main([*common, *map(str, extra), "-o", str(out)]) == 0
        fields[name] = a1111_parse(read_png_text(out)["parameters"])
    init = init_latents_from_image(system, tmp_path / "init.png", height=16, width=16)
    pipe = _pipeline(system, "euler", diffusers.StableDiffusionXLImg2ImgPipeline)
    theirs = pipe("a cube", negative_prompt="blurry", image=init, strength=0.5, num_inference_steps=4,
                  guidance_scale=4.0, generator=torch.Generator().manual_seed(2), output_type="pt").images[0]
    written = np.asarray(Image.open(tmp_path / "img2img.png").convert("RGB")).astype(int)
    assert np.abs(written - to_uint8(theirs * 2 - 1).astype(int)).max() <= 1
    assert fields["img2img"]["Denoising strength"] == "0.5" and fields["img2img"]["Sampler"] == "Euler"
    assert fields["inpaint"]["Denoising strength"] == "0.75" and fields["inpaint"]["Mask blur"] == "4"
