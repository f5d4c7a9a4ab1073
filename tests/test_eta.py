"""A1111's "Eta for ancestral samplers" (``eta=``, ``generate --eta``): k-diffusion 4601bf0's ``eta`` of
``sample_euler_ancestral``, ``sample_dpm_2_ancestral``, ``sample_dpmpp_sde``, ``sample_dpmpp_2m_sde`` and
``sample_dpmpp_3m_sde`` (transcribed here and in tests/test_kdiffusion_float32_dpmpp*.py, with ``eta``), bit for bit on
A1111's grids; each was also checked against the real k-diffusion (7 samplers × 2 grids × ε/v × η 0, 0.5, 0.67, 1:
0 difference). η = 1 is the samplers as before; η = 0 of the 2M / 3M SDEs draws no noise (k-diffusion's ``if eta``),
Euler a and DPM2 a still draw it, times 0."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sampler_stand_ins import rel_err, stand_in
from test_dpm_adaptive_float32 import AC, F32
from test_kdiffusion_float32 import _denoiser, _karras, _kd_euler_ancestral, _x_T
from test_kdiffusion_float32_dpmpp import (
    _a1111_grid,
    _kd_dpm_2_ancestral,
    _kd_dpmpp_2m_sde,
    _kd_dpmpp_3m_sde,
)
from test_kdiffusion_float32_dpmpp_sde import _kd_dpmpp_sde, _keyed_noise, keyed_tree  # noqa: F401

from sdadapt.cli import main
from sdadapt.samplers import _SAMPLERS, sample_latents
from sdadapt.samplers.dpmpp_sde import dpmpp_sde_sample

ETAS = [0.0, 0.5, 0.67, 1.0]


def _draws(seed: int = 7):
    g = torch.Generator().manual_seed(seed)
    return lambda like, *_: torch.randn(like.shape, generator=g, dtype=like.dtype)


REFERENCES = {  # sdadapt name -> (transcription with eta, A1111 discards the next-to-last σ)
    "euler_a": (lambda m, x, s, n, eta: _kd_euler_ancestral(m, x, s, n, eta), False),
    "dpm_2_a": (lambda m, x, s, n, eta: _kd_dpm_2_ancestral(m, x, s, n, eta), True),
    "dpmsolver++_sde": (lambda m, x, s, n, eta: _kd_dpmpp_2m_sde(m, x, s, n, eta=eta), False),
    "dpmsolver++_sde_heun": (lambda m, x, s, n, eta: _kd_dpmpp_2m_sde(m, x, s, n, solver_type="heun", eta=eta), False),
    "dpmsolver++_3m_sde": (lambda m, x, s, n, eta: _kd_dpmpp_3m_sde(m, x, s, n, eta=eta), True),
}


@pytest.mark.parametrize("sampler", list(REFERENCES))
@pytest.mark.parametrize("eta", ETAS)
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eta_is_k_diffusions(sampler, eta, prediction_type):
    fn, discard = REFERENCES[sampler]
    steps, x_T = 8, _x_T(31)
    sigmas = _a1111_grid("karras", steps, discard)
    want = fn(_denoiser(prediction_type), x_T * sigmas[0], sigmas, _draws(), eta)
    got = _SAMPLERS[sampler](stand_in, x_T, alphas_cumprod=AC, num_steps=steps, prediction_type=prediction_type,
                             schedule="karras", discard_next_to_last_sigma=discard,
                             generator=torch.Generator().manual_seed(7), eta=eta)
    assert got.dtype == F32 and torch.equal(got, want), rel_err(got, want)


@pytest.mark.parametrize("eta", ETAS)
def test_dpmpp_sde_eta_is_k_diffusions(eta, keyed_tree):
    steps, x_T = 7, _x_T(33)
    sigmas = _karras(steps)
    want = _kd_dpmpp_sde(_denoiser("epsilon"), x_T * sigmas[0], sigmas, _keyed_noise(x_T), eta=eta)
    got = dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=AC, num_steps=steps, schedule="karras",
                           noise_sampler_seed=3, eta=eta)
    assert torch.equal(got, want), rel_err(got, want)


def test_sde_eta_0_draws_no_noise_and_eta_is_checked():
    """η = 0 of the 2M SDE is DPM++ 2M's first-order update without noise: the generator is never drawn from."""
    x_T, g = _x_T(35), torch.Generator().manual_seed(5)
    state = g.get_state()
    _SAMPLERS["dpmsolver++_sde"](stand_in, x_T, alphas_cumprod=AC, num_steps=6, schedule="karras", generator=g, eta=0.0)
    assert torch.equal(g.get_state(), state)
    for name, seeded in (("dpmsolver++_sde", {}), ("dpmpp_sde", {"noise_sampler_seed": 1})):
        with pytest.raises(ValueError, match="eta.*give a schedule"):
            sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=name, alphas_cumprod=AC, num_steps=4,
                           eta=0.5, generator=torch.Generator().manual_seed(1), **seeded)
    for name in ("euler_a", "dpm_2_a", "dpmsolver++_3m_sde"):
        with pytest.raises(ValueError, match="eta must be >= 0"):
            _SAMPLERS[name](stand_in, x_T, alphas_cumprod=AC, num_steps=4, schedule="karras", eta=-0.1)


def test_generate_takes_eta_writes_it_and_reads_it_back(tmp_path, capsys):
    first, again, plain = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "plain.png"
    args = ["--prompt", "a red circle", "--sampler", "Euler a", "--steps", "5", "--seed", "3"]
    assert main(["generate", *args, "--eta", "0.5", "-o", str(first)]) == 0
    assert main(["generate", *args, "-o", str(plain)]) == 0
    assert main(["generate", "--infotext", str(first), "-o", str(again)]) == 0
    a, b = Image.open(first), Image.open(again)
    assert ", Eta: 0.5, Version: " in a.text["parameters"] and "Eta" not in Image.open(plain).text["parameters"]
    assert np.array_equal(np.asarray(a), np.asarray(b)) and a.text["parameters"] == b.text["parameters"]
    assert not np.array_equal(np.asarray(a), np.asarray(Image.open(plain)))
    assert main(["generate", *args, "--eta", "1", "-o", str(tmp_path / "one.png")]) == 0  # (the default: unwritten)
    one = Image.open(tmp_path / "one.png")
    assert np.array_equal(np.asarray(one), np.asarray(Image.open(plain))) and "Eta" not in one.text["parameters"]
    capsys.readouterr()
    assert main(["generate", "--prompt", "a", "--sampler", "euler", "--eta", "0.5", "-o", str(tmp_path / "x.png")]) == 2
    assert "--eta: euler takes no η" in capsys.readouterr().err
