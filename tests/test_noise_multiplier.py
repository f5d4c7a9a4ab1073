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


def test_the_infotext_field_needs_the_image():
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    text = "a castle\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Denoising strength: 0.5, " \
           "Noise multiplier: 0.9"
    options, not_taken = infotext_options(parse_infotext(text))
    assert "noise_multiplier" not in options
    assert any(line.startswith("Noise multiplier: needs the init image") for line in not_taken)
    assert infotext_options(parse_infotext(text), img2img=True)[0]["noise_multiplier"] == 0.9
