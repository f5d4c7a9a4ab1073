"""A1111's "Noise multiplier for img2img" (``initial_noise_multiplier``; modules/processing.py
``StableDiffusionProcessingImg2Img.sample``: ``x = self.rng.next()``, ``x *= self.initial_noise_multiplier``, then
``sampler.sample_img2img(self, self.init_latent, x, ...)``, "Noise multiplier" in the infotext when not 1):
``Img2ImgStart.noise_multiplier``, ``generate(noise_multiplier=)``, ``generate --noise-multiplier``."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from sampler_stand_ins import sd_alphas_cumprod, stand_in

from sdadapt.img2img import Img2ImgStart
from sdadapt.samplers import sample_latents


def _model(x, t, c):
    return stand_in(x * (1 + c), t) + 0.3 * c


def _cond(v):
    return torch.full((2, 1, 1, 1), v)


@pytest.mark.parametrize(("sampler", "schedule"), [("euler_a", "karras"), ("ddim", None), ("plms", None),
                                                    ("dpmsolver++", "automatic"), ("unipc_a1111", None),
                                                    ("lms", None)])
@pytest.mark.parametrize("masked", [False, True])
def test_the_start_noise_is_scaled_once(sampler, schedule, masked):
    """The run with ``noise_multiplier`` m is the run without it from the noise times m (A1111's ``x *= m``, the
    same float32 product), once — also through the inpainting blend's second run of ``sample_latents``."""
    x_T = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    init = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    mask = None
    if masked:
        mask = torch.zeros(1, 1, 6, 6)
        mask[..., 1:4, 2:5] = 1.0
    start = Img2ImgStart(init, strength=0.6, mask=mask)
    kw = {"sampler": sampler, "alphas_cumprod": sd_alphas_cumprod(), "num_steps": 8, "uncond": _cond(-0.25),
          "guidance_scale": 4.0, "schedule": schedule}

    def run(noise, start):
        return sample_latents(_model, noise, _cond(0.5), start=start, generator=torch.Generator().manual_seed(5), **kw)

    scaled = run(x_T, replace(start, noise_multiplier=0.85))
    assert torch.equal(scaled, run(x_T * 0.85, start))
    assert not torch.equal(scaled, run(x_T, start))


def test_generate_writes_it_reads_it_back_and_refuses_it_without_an_image(tmp_path, capsys):
    from sdadapt.cli import main

    Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8")).save(tmp_path / "init.png")
    base = ["--prompt", "a red circle", "--init-image", str(tmp_path / "init.png"), "--sampler", "Euler a",
            "--schedule", "automatic", "--steps", "6", "--seed", "2", "--noise", "a1111"]
    assert main(["generate", *base, "--noise-multiplier", "0.8", "-o", str(tmp_path / "m.png")]) == 0
    assert main(["generate", *base, "-o", str(tmp_path / "one.png")]) == 0
    assert main(["generate", "--init-image", str(tmp_path / "init.png"), "--infotext", str(tmp_path / "m.png"), "-o",
                 str(tmp_path / "again.png")]) == 0
    m, one, again = (Image.open(tmp_path / f"{n}.png") for n in ("m", "one", "again"))
    assert ", Noise multiplier: 0.8, " in m.text["parameters"] and "Noise multiplier" not in one.text["parameters"]
    assert not np.array_equal(np.asarray(m), np.asarray(one))
    assert np.array_equal(np.asarray(m), np.asarray(again)) and m.text["parameters"] == again.text["parameters"]
    capsys.readouterr()
    assert main(["generate", "--prompt", "a", "--noise-multiplier", "0.8", "-o", str(tmp_path / "x.png")]) == 2
    assert "--noise-multiplier is A1111's 'Noise multiplier for img2img'" in capsys.readouterr().err
    assert main(["generate", *base, "--noise-multiplier", "-1", "-o", str(tmp_path / "x.png")]) == 2
    # extra noise: written after the schedule's fields, read back; refused without an image to start from
    assert main(["generate", *base, "--extra-noise", "0.3", "-o", str(tmp_path / "extra.png")]) == 0
    assert main(["generate", "--init-image", str(tmp_path / "init.png"), "--infotext", str(tmp_path / "extra.png"),
                 "-o", str(tmp_path / "extra_again.png")]) == 0
    extra, extra_again = Image.open(tmp_path / "extra.png"), Image.open(tmp_path / "extra_again.png")
    assert ", Extra noise: 0.3, " in extra.text["parameters"]
    assert not np.array_equal(np.asarray(extra), np.asarray(one))
    assert np.array_equal(np.asarray(extra), np.asarray(extra_again))
    capsys.readouterr()
    assert main(["generate", "--prompt", "a", "--extra-noise", "0.3", "-o", str(tmp_path / "x.png")]) == 2
    assert "--extra-noise is A1111's 'Extra noise multiplier for img2img and hires fix'" in capsys.readouterr().err
    assert main(["generate", "--prompt", "a", "--init-image", str(tmp_path / "init.png"), "--sampler", "ddim",
                 "--extra-noise", "0.3", "-o", str(tmp_path / "x.png")]) == 2  # (diffusers' DDIM: before any load)
    assert "ddim runs diffusers' img2img here" in capsys.readouterr().err


def test_the_infotext_field_needs_the_image():
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    text = "a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.5, " \
           "Noise multiplier: 0.9"
    options, not_taken = infotext_options(parse_infotext(text))
    assert "noise_multiplier" not in options
    assert any(line.startswith("Noise multiplier: needs the init image") for line in not_taken)
    assert infotext_options(parse_infotext(text), img2img=True)[0]["noise_multiplier"] == 0.9


# ------------------------------------------------------------------------------------------------ extra noise
def test_the_first_sample_with_extra_noise_is_a1111s():
    """A1111's ``sample_img2img`` with "Extra noise" (``img2img_extra_noise``), transcribed: k-diffusion's
    ``xi = x + noise * sigma_sched[0]; xi += noise * extra``; the timestep samplers' ``xi = x * sqrt_ac + noise *
    sqrt_one_minus_ac; xi += noise * extra * sqrt_ac`` (float32 tensors, A1111's ᾱ buffer)."""
    init = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor(3.7153, dtype=torch.float32)
    xi = init + noise * sigma
    xi += noise * 0.35
    assert torch.equal(Img2ImgStart(init, index=0, extra_noise=0.35).noised(noise, float(sigma)), xi)
    a = sd_alphas_cumprod().float()[601]
    xi = init * torch.sqrt(a) + noise * torch.sqrt(1 - a)
    xi += noise * 0.35 * torch.sqrt(a)
    assert torch.equal(Img2ImgStart(init, index=0, extra_noise=0.35).timestep_noised(noise, a, torch.float32), xi)


@pytest.mark.parametrize(("sampler", "schedule"), [("euler", "automatic"), ("plms", None), ("unipc_a1111", None)])
def test_samplers_start_from_it_and_diffusers_img2img_refuses_it(sampler, schedule):
    """The first model call sees the extra-noised sample (the σ samplers through ``c_in``), and a sampler on
    diffusers' img2img rule refuses it (A1111 adds it on its own img2img path only)."""
    from sdadapt.samplers.a1111_timesteps import a1111_timestep_start, a1111_timesteps
    from sdadapt.samplers.schedules import schedule_sigmas
    from sdadapt.samplers.sigma_space import model_input, model_sigmas

    x_T = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(3))
    init = torch.randn(1, 4, 6, 6, generator=torch.Generator().manual_seed(4))
    seen = []

    def model(x, t, c):
        seen.append(x.clone())
        return stand_in(x, t)

    start = Img2ImgStart(init, strength=0.5, extra_noise=0.4)
    sample_latents(model, x_T, None, sampler=sampler, alphas_cumprod=sd_alphas_cumprod(), num_steps=10,
                   schedule=schedule, start=start)
    if sampler == "euler":
        from sdadapt.img2img import a1111_img2img_steps

        total, t_enc = a1111_img2img_steps(10, 0.5)
        grid = schedule_sigmas("uniform", total, model_sigmas(sd_alphas_cumprod(), torch.float32))
        sigma = float(grid[total - t_enc - 1])
        want = model_input(start.noised(x_T, sigma), sigma, x_T.dtype)
    else:
        want, _ = a1111_timestep_start(start, x_T, sd_alphas_cumprod().float(), a1111_timesteps(10), 10, torch.float32)
    assert torch.equal(seen[0], want)
    assert not torch.equal(want, Img2ImgStart(init, strength=0.5).noised(x_T, 1.0) if sampler == "euler" else
                           a1111_timestep_start(replace(start, extra_noise=0.0), x_T, sd_alphas_cumprod().float(),
                                                a1111_timesteps(10), 10, torch.float32)[0])
    with pytest.raises(ValueError, match="extra_noise is A1111's .* dpmsolver\\+\\+ runs diffusers' img2img here"):
        sample_latents(model, x_T, None, sampler="dpmsolver++", alphas_cumprod=sd_alphas_cumprod(), num_steps=10,
                       start=start)
