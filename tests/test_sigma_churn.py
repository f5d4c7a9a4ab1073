"""A1111's "Sigma churn", "Sigma tmin", "Sigma tmax", "Sigma noise" (``s_churn``, ``s_tmin``, ``s_tmax``,
``s_noise``: its ``sampler_extra_params`` for ``sample_euler``, ``sample_heun``, ``sample_dpm_2``) on A1111's grids:
k-diffusion 4601bf0's ``sample_euler`` (sampling.py:118-135), ``sample_heun`` (:159-184) and ``sample_dpm_2``
(:188-216) transcribed with their churn (tests/test_kdiffusion_float32.py, tests/test_kdiffusion_float32_dpmpp.py), over A1111's float32 ``CompVisDenoiser`` (tests/
test_kdiffusion_float32.py), against ``sdadapt.samplers.churn`` in the samplers, bit for bit."""

from __future__ import annotations

import math

import pytest
import torch
from sampler_stand_ins import rel_err, stand_in
from test_dpm_adaptive_float32 import AC, _get_sigmas
from test_kdiffusion_float32 import _denoiser, _karras, _kd_euler, _kd_heun, _x_T
from test_kdiffusion_float32_dpmpp import _kd_dpm_2

from sdadapt.samplers import sample_latents
from sdadapt.samplers.churn import SigmaChurn

_REFERENCE = {"euler": _kd_euler, "heun": _kd_heun, "dpm_2": _kd_dpm_2}
#: (s_churn, s_tmin, s_tmax, s_noise): churn everywhere; a σ window; a large churn (γ capped at √2 − 1)
_SETTINGS = [(0.4, 0.0, math.inf, 1.0), (1.0, 0.5, 5.0, 0.9), (40.0, 0.0, math.inf, 1.003)]


@pytest.mark.parametrize("sampler", list(_REFERENCE))
@pytest.mark.parametrize("schedule", ["uniform", "karras"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("settings", _SETTINGS)
def test_churn_is_k_diffusions_as_a1111_runs_it(sampler, schedule, prediction_type, settings):
    steps = 9
    x_T = _x_T(11)
    sigmas = _get_sigmas(steps) if schedule == "uniform" else _karras(steps)
    if sampler == "dpm_2":  # (A1111's DPM2 discards the next-to-last σ of n + 1)
        longer = _get_sigmas(steps + 1) if schedule == "uniform" else _karras(steps + 1)
        sigmas = torch.cat([longer[:-2], longer[-1:]])
    g = torch.Generator().manual_seed(5)
    churn, tmin, tmax, noise_scale = settings
    want = _REFERENCE[sampler](_denoiser(prediction_type), x_T * sigmas[0], sigmas,
                               lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype),
                               s_churn=churn, s_tmin=tmin, s_tmax=tmax, s_noise=noise_scale)
    got = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=sampler, alphas_cumprod=AC,
                         num_steps=steps, prediction_type=prediction_type, schedule=schedule,
                         generator=torch.Generator().manual_seed(5),
                         churn=SigmaChurn(churn=churn, tmin=tmin, tmax=tmax, noise=noise_scale))
    assert torch.equal(got, want), rel_err(got, want)
    plain = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=sampler, alphas_cumprod=AC,
                           num_steps=steps, prediction_type=prediction_type, schedule=schedule)
    assert rel_err(got, plain) > 1e-4


def test_churn_off_and_bad_requests():
    x_T = _x_T(2)
    base = {"alphas_cumprod": AC, "num_steps": 6, "schedule": "uniform"}
    plain = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler="euler", **base)
    off = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler="euler", churn=SigmaChurn(noise=0.5),
                         **base)
    assert torch.equal(off, plain)  # (no churn: the other settings act on nothing)
    with pytest.raises(ValueError, match="sigma churn runs on its grids: give a schedule"):
        sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler="euler", alphas_cumprod=AC, num_steps=6,
                       churn=SigmaChurn(churn=0.5))
    with pytest.raises(ValueError, match="churn .* is for euler, heun, dpm_2, not lms"):
        sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler="lms", churn=SigmaChurn(churn=0.5),
                       **base)
    with pytest.raises(ValueError, match="sigma churn must be a number >= 0"):
        SigmaChurn(churn=-1.0)
    assert SigmaChurn(tmax=0.0).tmax == math.inf  # (A1111: 0 is no limit)
    assert SigmaChurn(churn=0.5, tmax=3.0).infotext_fields() == {"Sigma churn": 0.5, "Sigma tmax": 3.0}


def test_generate_writes_the_settings_reads_them_back_and_refuses_them_where_unused(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from sdadapt.cli import main

    base = ["--prompt", "a red circle", "--sampler", "Heun", "--schedule", "karras", "--steps", "6", "--seed", "2",
            "--noise", "a1111"]
    assert main(["generate", *base, "--sigma-churn", "0.5", "--sigma-noise", "0.95", "--sigma-tmin", "0.1",
                 "-o", str(tmp_path / "c.png")]) == 0
    assert main(["generate", *base, "-o", str(tmp_path / "plain.png")]) == 0
    assert main(["generate", "--infotext", str(tmp_path / "c.png"), "-o", str(tmp_path / "again.png")]) == 0
    c, plain, again = (Image.open(tmp_path / f"{n}.png") for n in ("c", "plain", "again"))
    assert ", Sigma churn: 0.5, Sigma tmin: 0.1, Sigma noise: 0.95, " in c.text["parameters"]
    assert "Sigma" not in plain.text["parameters"]
    assert not np.array_equal(np.asarray(c), np.asarray(plain))
    assert np.array_equal(np.asarray(c), np.asarray(again)) and c.text["parameters"] == again.text["parameters"]
    capsys.readouterr()
    assert main(["generate", "--prompt", "a", "--sampler", "Euler", "--sigma-churn", "0.5", "-o",
                 str(tmp_path / "x.png")]) == 2  # (diffusers' grid)
    assert "--sigma-churn: euler: A1111's sigma churn runs on its grids" in capsys.readouterr().err
    assert main(["generate", "--prompt", "a", "--sampler", "LMS", "--schedule", "automatic", "--sigma-churn", "0.5",
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "lms takes none" in capsys.readouterr().err
    assert main(["generate", "--prompt", "a", "--sigma-churn", "-1", "-o", str(tmp_path / "x.png")]) == 2
