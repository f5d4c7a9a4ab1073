"""img2img and hires fix in ``generate``: A1111's truncated σ grid (sample_img2img, transcribed here),
diffusers' strength rule for DDIM (against StableDiffusionImg2ImgPipeline), the latent upscalers and the CLI."""

from __future__ import annotations

import diffusers
import pytest
import torch

from sdadapt import samplers
from sdadapt.cli import main
from sdadapt.img2img import (
    LATENT_UPSCALERS,
    Img2ImgStart,
    a1111_img2img_steps,
    upscale_latents,
)
from sdadapt.samplers.sigma_space import discrete_sigmas, training_sigmas
from sdadapt.sampling import generate

BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0).float()


def _a1111_schedule(sigmas_of, steps, strength, requested=None):
    """A1111's setup_img2img_steps + sample_img2img (img2img_fix_steps off), transcribed:
    ``(sigma_sched, t_enc)``."""
    if requested is not None:
        total = int(requested / min(strength, 0.999)) if strength > 0 else 0
        t_enc = requested - 1
    else:
        total = steps
        t_enc = int(min(strength, 0.999) * steps)
    sigmas = sigmas_of(total)
    return sigmas[total - t_enc - 1:], t_enc


def _recording(calls):
    def model(x, t, cond):
        calls.append((float(t.flatten()[0]), x.double().clone()))
        return 0.1 * x
    return model


def _run(sampler, init, noise, *, steps, strength, requested=None, model=None):
    calls = []
    total, t_enc = a1111_img2img_steps(steps, strength, requested=requested)
    from sdadapt.img2img import a1111_start_index

    out = samplers.sample_latents(model or _recording(calls), noise, None, sampler=sampler,
                                  alphas_cumprod=ALPHAS_CUMPROD, num_steps=total,
                                  generator=torch.Generator().manual_seed(1),
                                  start=Img2ImgStart(init, index=a1111_start_index(total, t_enc)))
    return out, calls


@pytest.mark.parametrize("sampler", ["euler", "lms", "heun"])
@pytest.mark.parametrize("strength,requested", [(0.3, None), (0.75, None), (1.0, None), (0.5, 4)])
def test_the_truncated_grid_is_a1111s_sample_img2img(sampler, strength, requested):
    steps = 10
    g = torch.Generator().manual_seed(0)
    init, noise = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    _, calls = _run(sampler, init, noise, steps=steps, strength=strength, requested=requested)
    train = training_sigmas(ALPHAS_CUMPROD)
    sched, t_enc = _a1111_schedule(lambda n: discrete_sigmas(ALPHAS_CUMPROD, n)[1], steps, strength, requested)
    # the first model call: x = init + noise·σ_sched[0], seen as x/√(σ²+1), at t(σ_sched[0])
    s0 = float(sched[0])
    t0, x0 = calls[0]
    assert x0 == pytest.approx(((init.double() + noise.double() * s0) / (s0 * s0 + 1) ** 0.5), abs=1e-5)
    assert float(samplers.sigma_space.t_to_sigma(torch.tensor([t0], dtype=torch.float64), train)[0]) == \
        pytest.approx(s0, rel=1e-4)
    steps_run = len(sched) - 1
    assert steps_run == t_enc + 1
    expected_calls = steps_run if sampler != "heun" else 2 * steps_run - 1  # (heun: one call on the last step)
    assert len(calls) == expected_calls
    if sampler != "heun":  # every σ of the tail, in order
        seen = samplers.sigma_space.t_to_sigma(torch.tensor([t for t, _ in calls], dtype=torch.float64), train)
        assert torch.allclose(seen, sched[:-1].double(), rtol=1e-4)


def test_a1111_steps_transcription_examples():
    assert a1111_img2img_steps(20, 0.75) == (20, 15)
    assert a1111_img2img_steps(20, 1.0) == (20, 19)  # (0.999 · 20)
    assert a1111_img2img_steps(20, 0.7, requested=10) == (14, 9)  # hires: int(10 / 0.7), 10 steps run
    assert a1111_img2img_steps(20, 0.0) == (20, 0)
    with pytest.raises(ValueError, match="strength"):
        a1111_img2img_steps(20, 1.5)


def test_strength_one_from_a_zero_image_is_txt2img():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 4, 4, generator=g)
    out, _ = _run("euler", torch.zeros_like(noise), noise, steps=8, strength=1.0)
    plain = samplers.sample_latents(lambda x, t, c: 0.1 * x, noise, None, sampler="euler",
                                    alphas_cumprod=ALPHAS_CUMPROD, num_steps=8)
    assert torch.equal(out, plain)


@pytest.mark.parametrize("strength", [0.001, 0.4, 0.9])
def test_an_oracle_model_gets_the_init_latent_back(strength):
    """ε-prediction that knows the noise added: a deterministic sampler started at the right σ lands on init."""
    g = torch.Generator().manual_seed(0)
    init, noise = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)
    train = training_sigmas(ALPHAS_CUMPROD)

    def oracle(x, t, cond):
        s = float(samplers.sigma_space.t_to_sigma(t.double()[:1], train)[0])
        return ((x.double() * (s * s + 1) ** 0.5 - init.double()) / s).float()

    out, _ = _run("euler", init, noise, steps=10, strength=strength, model=oracle)
    assert torch.allclose(out, init, atol=1e-4)


def test_ddim_strength_zero_returns_the_init_latent():
    init = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = samplers.sample_latents(lambda x, t, c: x, torch.randn_like(init), None, sampler="ddim",
                                  alphas_cumprod=ALPHAS_CUMPROD, num_steps=10, start=Img2ImgStart(init, strength=0.0))
    assert torch.equal(out, init)


def test_every_sampler_starts_from_an_image_and_another_name_is_refused():
    from sdadapt.img2img import IMG2IMG_SAMPLERS, check_img2img_sampler

    assert sorted(IMG2IMG_SAMPLERS) == sorted(samplers.SAMPLERS)  # (A1111's PLMS too, since plms is A1111's)
    with pytest.raises(ValueError, match="'euler_cfgpp' cannot start from an image"):
        check_img2img_sampler("euler_cfgpp")


@pytest.mark.parametrize("name", list(LATENT_UPSCALERS))
def test_latent_upscalers_are_a1111s_interpolate(name):
    x = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(0))
    mode, antialias = {"latent": ("bilinear", False), "latent-antialiased": ("bilinear", True),
                       "latent-bicubic": ("bicubic", False), "latent-bicubic-antialiased": ("bicubic", True),
                       "latent-nearest": ("nearest", False), "latent-nearest-exact": ("nearest-exact", False)}[name]
    expected = torch.nn.functional.interpolate(x, size=(10, 12), mode=mode, antialias=antialias)
    assert torch.equal(upscale_latents(x, (10, 12), upscaler=name), expected)


# ---- the tiny Stable Diffusion pipeline -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from tests.test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"), prediction_type="epsilon")


@pytest.mark.parametrize("sampler,steps,strength", [("ddim", 10, 0.6), ("dpmsolver++", 10, 0.66),
                                                    ("dpmsolver++", 20, 0.5)])
def test_img2img_equals_diffusers_img2img_pipeline(tiny_sd, sampler, steps, strength):
    """sdadapt's img2img on the tiny pipeline = StableDiffusionImg2ImgPipeline with the scheduler sdadapt mimics,
    the same init latents (given as a 4-channel image: diffusers takes them as they are) and seeded generator;
    within 1e-4 absolute (measured 4.3e-6 ddim, 6.2e-6 / 5.2e-6 dpmsolver++ on latents of max 6-9)."""
    from sdadapt.jobs.models import load_system

    system = load_system(str(tiny_sd), device=torch.device("cpu"))
    init = torch.randn(1, *system.latent_shape(system.image_size, system.image_size),
                       generator=torch.Generator().manual_seed(3))
    ours = generate(system, ["a photo"], seed=5, steps=steps, guidance=3.0, sampler=sampler, init_latents=init,
                    denoising_strength=strength, output="latents")
    betas = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "epsilon"}
    if sampler == "ddim":
        scheduler = diffusers.DDIMScheduler(**betas, steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    else:
        scheduler = diffusers.DPMSolverMultistepScheduler(**betas, algorithm_type="dpmsolver++")
    pipe = diffusers.StableDiffusionImg2ImgPipeline(
        vae=system.vae, text_encoder=system.text_encoder, tokenizer=system.tokenizer, unet=system.unet,
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a photo", image=init, strength=strength, num_inference_steps=steps, guidance_scale=3.0,
                  negative_prompt="", generator=torch.Generator().manual_seed(5), output_type="latent").images
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()


def test_hires_second_pass_starts_from_the_upscaled_latents_plus_the_seeds_noise(tiny_sd, monkeypatch):
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image
    from sdadapt.jobs.models import load_system

    system = load_system(str(tiny_sd), device=torch.device("cpu"))
    seen = []
    real = samplers.sample_latents

    def spy(model, x_T, cond, **kw):
        start = kw.get("start")
        seen.append((x_T.clone(), None if start is None else start.init.clone(), start and start.index, kw["num_steps"]))
        return real(model, x_T, cond, **kw)

    monkeypatch.setattr(samplers, "sample_latents", spy)
    options = {"seed": 7, "steps": 6, "guidance": 2.0, "sampler": "euler", "negative": ""}
    image = sample_image(system, ["a photo"], options, hires=HiresRequest((48, 32), steps=4, denoising=0.5))
    assert image.shape == (1, 3, 48, 32)
    (noise1, init1, _, steps1), (noise2, init2, index2, steps2) = seen
    assert init1 is None and steps1 == 6
    first = real(system.denoiser(), noise1, system.condition(system.tokenize(["a photo"])),
                 sampler="euler", alphas_cumprod=system.alphas_cumprod, num_steps=6,
                 uncond=system.condition(system.tokenize([""])), guidance_scale=2.0)
    f = system.vae_factor
    assert torch.allclose(init2, upscale_latents(first, (48 // f, 32 // f)), atol=1e-5)
    # A1111's hires pass: steps=4 at 0.5 -> a grid of int(4 / 0.5) = 8, the last 4 steps run
    assert steps2 == 8 and index2 == 8 - 3 - 1
    assert torch.equal(noise2, torch.randn(1, 4, 48 // f, 32 // f, generator=torch.Generator().manual_seed(7)))


def test_cli_img2img_and_hires_write_images_of_the_right_size(tiny_sd, tmp_path):
    from sdadapt.images import decode_png

    base = ["generate", "--model", str(tiny_sd), "--prompt", "a photo", "--steps", "3", "--sampler", "euler",
            "--quiet"]
    assert main([*base, "--out", str(tmp_path / "a.png"), "--width", "24", "--height", "16"]) == 0
    assert main([*base, "--out", str(tmp_path / "b.png"), "--init-image", str(tmp_path / "a.png"),
                 "--denoising-strength", "0.5"]) == 0
    assert decode_png((tmp_path / "b.png").read_bytes()).shape[:2] == (32, 32)  # (the model's size: stretched)
    assert main([*base, "--out", str(tmp_path / "c.png"), "--width", "16", "--height", "16", "--hires-scale", "1.5",
                 "--hires-upscaler", "pixel-lanczos"]) == 0
    assert decode_png((tmp_path / "c.png").read_bytes()).shape[:2] == (24, 24)
    with pytest.raises(SystemExit):
        main([*base, "--out", str(tmp_path / "d.png"), "--hires-upscaler", "esrgan"])


def test_hires_with_a1111_noise_draws_a_fresh_image_rng_at_the_hires_size(tiny_sd, monkeypatch):
    """A1111 (processing.py sample_hr_pass) makes a new ImageRNG for the hires latents: its first draw is the
    seed's start noise at the hires shape; the prompt plan is re-planned for the hires pass's steps."""
    from sdadapt.jobs.generate_hires import HiresRequest, sample_image
    from sdadapt.jobs.models import load_system
    from sdadapt.prompt_guidance import plan_prompt
    from sdadapt.samplers.a1111_noise import A1111Seeds

    system = load_system(str(tiny_sd), device=torch.device("cpu"))
    seen, real = [], samplers.sample_latents

    def spy(model, x_T, cond, **kw):
        seen.append((x_T.clone(), kw["num_steps"]))
        return real(model, x_T, cond, **kw)

    monkeypatch.setattr(samplers, "sample_latents", spy)
    plans = []

    def plan_for(steps):
        plans.append(steps)
        return plan_prompt("a [cat:dog:0.5]", "", steps=steps)

    seeds = A1111Seeds(source="cpu")
    options = {"seed": 11, "steps": 4, "guidance": 2.0, "sampler": "euler_a", "negative": "", "noise": seeds,
               "plan": plan_prompt("a [cat:dog:0.5]", "", steps=4)}
    image = sample_image(system, ["a photo"], options, hires=HiresRequest((64, 64), steps=3, denoising=0.6),
                         plan_for=plan_for)
    assert image.shape == (1, 3, 64, 64) and plans == [3]
    f = system.vae_factor
    expected = seeds.for_batch(11, 1).start_noise((1, 4, 64 // f, 64 // f))
    assert torch.equal(seen[1][0].cpu(), expected.to(seen[1][0].dtype))
    assert seen[1][1] == int(3 / 0.6)


def test_the_img2img_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", "init_latents=")
    assert scope["again"].shape == (1, 3, 32, 32) and scope["bigger"].shape == (1, 12, 32, 32)


@pytest.mark.parametrize("strength", [0.0, 0.05, 0.33, 0.66, 0.999, 1.0])
@pytest.mark.parametrize("steps", [7, 10, 25])
def test_ddim_keeps_diffusers_get_timesteps(steps, strength):
    """The timesteps DDIM img2img walks are the installed StableDiffusionImg2ImgPipeline.get_timesteps's."""
    from types import SimpleNamespace

    from sdadapt.img2img import diffusers_start_index
    from sdadapt.training.diffusion import ddim_timesteps

    scheduler = diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                        steps_offset=1, set_alpha_to_one=False, clip_sample=False)
    scheduler.set_timesteps(steps)
    theirs, count = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=scheduler), steps, strength, "cpu")
    ours = ddim_timesteps(steps)[diffusers_start_index(steps, strength):]
    assert ours.tolist() == theirs.tolist() and len(ours) == count


def test_cli_init_image_is_stretched_with_lanczos_encoded_and_sampled_as_generate(tiny_sd, tmp_path, monkeypatch):
    """``--init-image``: A1111's "Just resize" (stretch, Lanczos), the VAE mean, then generate's img2img."""
    import numpy as np
    from PIL import Image

    from sdadapt.images import decode_png, write_png
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.models import load_system

    import sdadapt.sampling

    source = torch.rand(3, 20, 44, generator=torch.Generator().manual_seed(0)) * 2 - 1
    write_png(tmp_path / "init.png", source)
    passed, real = [], sdadapt.sampling.generate

    def spy(*args, **kwargs):
        passed.append(kwargs.get("init_latents"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sdadapt.sampling, "generate", spy)
    run_generate(model=str(tiny_sd), prompt="a photo", out=tmp_path / "out.png", steps=4, sampler="euler", seed=3,
                 guidance=2.0, init_image=tmp_path / "init.png", denoising_strength=0.5)
    system = load_system(str(tiny_sd))
    size = system.image_size
    pil = Image.open(tmp_path / "init.png").convert("RGB").resize((size, size), resample=Image.LANCZOS)  # (A1111's)
    stretched = torch.from_numpy(np.asarray(pil).astype(np.float32) / 255.0).permute(2, 0, 1) * 2 - 1
    expected = generate(system, ["a photo"], steps=4, sampler="euler", seed=3, guidance=2.0,
                        init_latents=system.encode_images(stretched[None]), denoising_strength=0.5)[0]
    assert torch.equal(passed[0], system.encode_images(stretched[None]))
    written = torch.from_numpy(decode_png((tmp_path / "out.png").read_bytes()).copy()).permute(2, 0, 1)[:3]
    assert (written.int() - ((expected + 1) * 127.5).round().int()).abs().max() <= 1  # (8-bit rounding)


def test_img2img_option_errors_name_the_option(tmp_path):
    from sdadapt.jobs import run_generate

    with pytest.raises(FileNotFoundError, match="--init-image"):
        run_generate(prompt="x", out=tmp_path / "a.png", init_image=tmp_path / "missing.png")
    (tmp_path / "i.png").write_bytes(b"")  # (the options are checked before the image is read)
    with pytest.raises(ValueError, match="--denoising-strength"):
        run_generate(prompt="x", out=tmp_path / "a.png", init_image=tmp_path / "i.png", denoising_strength=1.5)
    with pytest.raises(ValueError, match="leave it out with --init-image"):
        run_generate(prompt="x", out=tmp_path / "a.png", init_image=tmp_path / "i.png", hires_scale=2)
    with pytest.raises(ValueError, match="--sampler"):
        run_generate(prompt="x", out=tmp_path / "a.png", sampler="Euler CFG++", hires_scale=2)
    with pytest.raises(ValueError, match="init latents are"):
        generate(__import__("sdadapt.toy.system", fromlist=["load_toy"]).load_toy(), ["a red circle"], steps=2,
                 sampler="euler", init_latents=torch.zeros(1, 12, 8, 8))


def test_hires_size_follows_a1111s_rules():
    from sdadapt.jobs.generate_hires import hires_size

    assert hires_size(512, 768, scale=1.5, hires_height=None, hires_width=None) == (768, 1152)  # int(size · scale)
    assert hires_size(512, 768, scale=None, hires_height=None, hires_width=1024) == (682, 1024)  # x · h // w
    assert hires_size(512, 768, scale=None, hires_height=1024, hires_width=None) == (1024, 1536)
    assert hires_size(512, 768, scale=None, hires_height=640, hires_width=640) == (640, 640)


def test_an_a1111_start_index_past_the_grid_still_runs_the_last_step():
    """A1111's rule always runs a step: an index at or past the grid's end is read as its last step (one model call
    at the last σ above 0), never as an empty run that hands back ``init + 0·noise``."""
    init = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    last = discrete_sigmas(ALPHAS_CUMPROD, 10)[1][-2]
    for index in (9, 10, 50):
        calls = []
        samplers.sample_latents(_recording(calls), noise, None, sampler="euler", alphas_cumprod=ALPHAS_CUMPROD,
                                num_steps=10, start=Img2ImgStart(init, index=index))
        assert len(calls) == 1
        s = float(last)
        assert torch.allclose(calls[0][1], ((init.double() + noise.double() * s) / (s * s + 1) ** 0.5), atol=1e-5)


def test_ddim_honours_an_explicit_start_index_as_the_other_diffusers_rule_samplers_do():
    from sdadapt.img2img import diffusers_start_index

    g = torch.Generator().manual_seed(0)
    init, noise = torch.randn(1, 4, 4, 4, generator=g), torch.randn(1, 4, 4, 4, generator=g)

    def model(x, t, c):
        return 0.1 * x

    for sampler in ("ddim", "ddpm", "unipc"):
        by_strength = samplers.sample_latents(model, noise, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD,
                                              num_steps=10, start=Img2ImgStart(init, strength=0.5),
                                              generator=torch.Generator().manual_seed(1))
        by_index = samplers.sample_latents(model, noise, None, sampler=sampler, alphas_cumprod=ALPHAS_CUMPROD,
                                           num_steps=10, start=Img2ImgStart(init, index=diffusers_start_index(10, 0.5)),
                                           generator=torch.Generator().manual_seed(1))
        assert torch.allclose(by_index, by_strength, atol=1e-6), sampler


def test_strength_zero_with_fixed_steps_is_refused_on_an_a1111_rule_sampler():
    """A1111's fix-steps rule at strength 0 builds a grid of 0 steps (``int(N / S) if S > 0 else 0``): refused."""
    from sdadapt.sampling import _img2img_request

    init = torch.zeros(1, 4, 4, 4)
    with pytest.raises(ValueError, match="denoising strength 0 with a fixed step count"):
        _img2img_request("euler", init, 1, 4, 0.0, 4)
    start, total = _img2img_request("euler", init, 1, 4, 0.0, None)  # (plain img2img: t_enc 0, the last step)
    assert total == 4 and start.index == 3
