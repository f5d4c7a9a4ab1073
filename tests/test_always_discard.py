"""A1111's "Always discard next-to-last sigma" (``ScheduleOptions.always_discard_next_to_last_sigma``, ``generate
--always-discard-next-to-last-sigma``): the same run as ``sample_latents(discard_next_to_last_sigma=True)``, nothing
for the samplers that discard anyway; "Discard penultimate sigma: True" written where it changed a pass (A1111's
``get_sigmas`` / ``get_timesteps``) and read back; refused without one of A1111's grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdadapt.samplers import sample_latents
from sdadapt.samplers.schedules import ScheduleOptions
from sdadapt.toy.system import build_toy


@pytest.fixture(scope="module")
def toy():
    return build_toy()


def _run(toy, sampler, schedule, **options):
    cond = toy.condition(toy.tokenize(["a red circle"]))
    uncond = toy.condition(toy.tokenize([""]))
    x_T = torch.randn(1, 12, 16, 16, generator=torch.Generator().manual_seed(1))
    return sample_latents(toy.denoiser(), x_T, cond, uncond=uncond, guidance_scale=4.0, sampler=sampler,
                          alphas_cumprod=toy.alphas_cumprod, num_steps=6, schedule=schedule,
                          generator=torch.Generator().manual_seed(2), **options)


@pytest.mark.parametrize("sampler, schedule", [("euler", "karras"), ("euler_a", "automatic"), ("heun", "exponential"),
                                               ("ddim", "automatic"), ("plms", "automatic")])
def test_the_setting_is_the_samplers_discard_option(toy, sampler, schedule):
    setting = _run(toy, sampler, schedule, schedule_options=ScheduleOptions(always_discard_next_to_last_sigma=True))
    assert torch.equal(setting, _run(toy, sampler, schedule, discard_next_to_last_sigma=True))
    assert not torch.equal(setting, _run(toy, sampler, schedule))


@pytest.mark.parametrize("sampler", ["dpm_2", "dpmsolver++_3m_sde"])
def test_samplers_that_discard_anyway_are_unchanged(toy, sampler):
    setting = _run(toy, sampler, "karras", schedule_options=ScheduleOptions(always_discard_next_to_last_sigma=True))
    assert torch.equal(setting, _run(toy, sampler, "karras"))


def test_without_one_of_a1111s_grids_it_is_refused(toy):
    with pytest.raises(ValueError, match="always discard next-to-last sigma\\) shape one of A1111's schedules"):
        _run(toy, "euler", None, schedule_options=ScheduleOptions(always_discard_next_to_last_sigma=True))


def _png(path):
    from PIL import Image

    image = Image.open(path)
    return np.asarray(image), image.text["parameters"]


def test_generate_writes_discard_penultimate_sigma_where_it_changed_a_pass_and_reads_it_back(tmp_path):
    pytest.importorskip("PIL")
    from sdadapt.jobs import run_generate
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    run = {"prompt": "a red circle", "steps": 5, "seed": 3, "sampler": "Euler", "schedule": "karras",
           "sigma_max": 10.0}
    run_generate(out=tmp_path / "d.png", always_discard_next_to_last_sigma=True, **run)
    run_generate(out=tmp_path / "p.png", **run)
    (discarded, text), (plain, _) = _png(tmp_path / "d.png"), _png(tmp_path / "p.png")
    assert not np.array_equal(discarded, plain)
    assert ", Discard penultimate sigma: True, Schedule max sigma: 10, " in text  # (get_sigmas' order)
    options, not_taken = infotext_options(parse_infotext(text))
    assert options["always_discard_next_to_last_sigma"] is True and not any("Discard" in line for line in not_taken)
    run_generate(out=tmp_path / "again.png", **{**run, "always_discard_next_to_last_sigma": True})
    assert np.array_equal(_png(tmp_path / "again.png")[0], discarded)
    dpm2 = {**run, "sampler": "DPM2"}  # (discards by itself: A1111 writes nothing, the image is the same)
    run_generate(out=tmp_path / "dpm2_d.png", always_discard_next_to_last_sigma=True, **dpm2)
    run_generate(out=tmp_path / "dpm2_p.png", **dpm2)
    (a, a_text), (b, _) = _png(tmp_path / "dpm2_d.png"), _png(tmp_path / "dpm2_p.png")
    assert np.array_equal(a, b) and "Discard penultimate sigma" not in a_text
    with pytest.raises(ValueError, match="--always-discard-next-to-last-sigma and --sgm-noise-multiplier shape a "
                                         "run on one of A1111.s"):
        run_generate(out=tmp_path / "x.png", prompt="a", always_discard_next_to_last_sigma=True)
