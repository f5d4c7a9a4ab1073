"""A1111's "SGM noise multiplier" (generate --sgm-noise-multiplier, ``ScheduleOptions(sgm_noise_multiplier=True)``):
a txt2img run of its σ samplers starts from ``x_T·√(1 + σ_0²)`` — A1111's ``KDiffusionSampler.sample`` expression on
the grid's float32 σ_0, checked bit for bit — and nothing else changes; img2img starts are untouched; the samplers it
does not apply to are refused; the field is written and read back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdadapt import samplers
from sdadapt.sampler_tables import SGM_SAMPLERS
from sdadapt.samplers.schedules import ScheduleOptions, schedule_sigmas
from sdadapt.samplers.sigma_space import discrete_start, model_sigmas
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)

BETAS = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
ALPHAS_CUMPROD = torch.cumprod(1 - BETAS, 0)
SGM = ScheduleOptions(sgm_noise_multiplier=True)


@pytest.mark.parametrize("schedule", ["uniform", "karras", "exponential", "sgm_uniform"])
def test_the_first_sample_is_a1111s_expression(schedule):
    """discrete_start's txt2img sample = A1111's ``x * torch.sqrt(1.0 + sigmas[0] ** 2.0)`` on its float32 grid, bit
    for bit; the grid itself is the one without the setting."""
    x_T = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(1))
    times, grid, x = discrete_start("euler", x_T, alphas_cumprod=ALPHAS_CUMPROD, num_steps=9, prediction_type="epsilon",
                                    schedule=schedule, schedule_options=SGM)
    plain_times, plain_grid, plain_x = discrete_start("euler", x_T, alphas_cumprod=ALPHAS_CUMPROD, num_steps=9,
                                                      prediction_type="epsilon", schedule=schedule)
    sigmas = schedule_sigmas(schedule, 9, model_sigmas(ALPHAS_CUMPROD, torch.float32))  # (A1111's get_sigmas)
    assert (times, grid) == (plain_times, plain_grid) and float(sigmas[0]) == grid[0]
    assert torch.equal(x, x_T * torch.sqrt(1.0 + sigmas[0] ** 2.0))
    assert torch.equal(plain_x, x_T * sigmas[0])


def _first_inputs(name, options, start=None):
    seen = []

    def model(x, t, _cond):
        seen.append(x.clone())
        return 0.1 * x

    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    samplers.sample_latents(model, x_T, None, sampler=name, alphas_cumprod=ALPHAS_CUMPROD, num_steps=4,
                            schedule="automatic", schedule_options=options, start=start,
                            generator=torch.Generator().manual_seed(0))
    return seen


@pytest.mark.parametrize("name", SGM_SAMPLERS)
def test_every_sgm_sampler_starts_from_the_scaled_noise(name):
    """Each of A1111's σ samplers here: its first model input is the plain run's times √(1 + σ_0²)/σ_0 (the model
    sees x·c_in), the rest of the run its own."""
    plain, scaled = _first_inputs(name, None), _first_inputs(name, SGM)
    from sdadapt.sampler_tables import resolve_schedule

    resolved = resolve_schedule(name, "automatic", False)
    grid = (schedule_sigmas(resolved, 4, model_sigmas(ALPHAS_CUMPROD, torch.float32),
                            discard_next_to_last_sigma=name in ("dpm_2", "dpm_2_a", "dpmsolver++_3m_sde"))
            if name != "lcm" else None)
    if name == "lcm":  # (A1111's LCM grid: its own 50-entry table)
        from sdadapt.samplers.lcm import lcm_a1111_sigmas, lcm_sigma_table

        grid = lcm_a1111_sigmas(lcm_sigma_table(ALPHAS_CUMPROD, torch.float32), 4, "automatic", skip=20)
    s0 = float(grid[0])
    assert torch.allclose(scaled[0], plain[0] * ((1 + s0 * s0) ** 0.5 / s0), rtol=1e-6, atol=0)
    assert not torch.equal(scaled[-1], plain[-1])


def test_img2img_starts_are_untouched_and_other_samplers_refused():
    from sdadapt.img2img import Img2ImgStart

    init = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    start = Img2ImgStart(init, index=1)
    assert all(torch.equal(a, b) for a, b in zip(_first_inputs("euler", None, start),
                                                 _first_inputs("euler", SGM, start)))
    for name in ("ddim", "plms", "unipc_a1111", "dpm_fast", "dpm_adaptive", "dpmsolver", "unipc"):
        with pytest.raises(ValueError, match="SGM noise multiplier"):
            _first_inputs(name, SGM)
    assert torch.equal(_first_inputs("ddim", SGM, Img2ImgStart(init, index=1))[0],
                       _first_inputs("ddim", None, Img2ImgStart(init, index=1))[0])  # (a hires / img2img pass)


def test_generate_writes_the_field_and_infotext_reads_it_back(plain_sd, tmp_path):  # noqa: F811
    """generate --sgm-noise-multiplier --schedule automatic: another image than without, "SGM noise multiplier: True"
    after the schedule fields, and --infotext of it makes the same image; refused without a schedule and with an init
    image."""
    from sdadapt.cli import main
    from sdadapt.images import read_png_text
    from sdadapt.jobs.generate import run_generate

    common = {"model": str(plain_sd), "prompt": "a photo", "steps": 3, "sampler": "euler", "seed": 4,
              "schedule": "karras", "noise": "a1111", "overwrite": True}
    plain = run_generate(out=str(tmp_path / "a.png"), **common)
    sgm = run_generate(out=str(tmp_path / "b.png"), sgm_noise_multiplier=True, **common)
    assert not np.array_equal(plain["pixels"][0], sgm["pixels"][0])
    text = read_png_text(tmp_path / "b.png")["parameters"]
    assert "Schedule type: Karras" in text and ", SGM noise multiplier: True, Version" in text
    assert "SGM noise multiplier" not in read_png_text(tmp_path / "a.png")["parameters"]
    assert main(["generate", "--model", str(plain_sd), "--infotext", str(tmp_path / "b.png"), "--quiet",
                 "--out", str(tmp_path / "c.png")]) == 0
    assert np.array_equal(np.asarray(__import__("PIL.Image").Image.open(tmp_path / "c.png")), sgm["pixels"][0])
    with pytest.raises(ValueError, match="add --schedule"):
        run_generate(out=str(tmp_path / "d.png"), sgm_noise_multiplier=True, **{**common, "schedule": None})
    with pytest.raises(ValueError, match="txt2img"):
        run_generate(out=str(tmp_path / "d.png"), sgm_noise_multiplier=True, init_image=str(tmp_path / "a.png"),
                     **common)
