"""Euler, Euler a, Heun and DPM++ 2S a on float32 latents and A1111's grids run k-diffusion as A1111 calls it, bit for bit:
A1111's float32 σ table and grids (``get_sigmas``, ``get_sigmas_karras``), the model at ``x·c_in`` and the float32
``sigma_to_t`` of its ``CompVisDenoiser`` / ``CompVisVDenoiser``, float32 ancestral steps. The references are
k-diffusion 4601bf0 transcribed below (``sample_euler`` sampling.py:118-135, ``sample_euler_ancestral`` :139-155,
``sample_heun`` :159-184, ``sample_dpmpp_2s_ancestral`` :509-540, ``get_sigmas_karras`` :17-23, ``get_ancestral_step`` :51-58; the wrappers:
tests/test_dpm_adaptive_float32.py); each was checked against the real k-diffusion code (0 difference).
Float64 latents keep float64 (last test). docs/samplers.md lists the measured gaps of the other samplers."""

from __future__ import annotations

import itertools

import pytest
import torch
from sampler_stand_ins import rel_err, stand_in
from test_dpm_adaptive_float32 import AC, F32, SIGMAS, _get_sigmas, _sigma_to_t

from sdadapt.samplers.dpmpp_2s_a import dpmpp_2s_ancestral_sample
from sdadapt.samplers.euler import euler_ancestral_sample, euler_sample
from sdadapt.samplers.heun import heun_sample
from sdadapt.samplers.sigma_space import ancestral_step, model_input, sigma_to_t


def _karras(n: int) -> torch.Tensor:
    """``get_sigmas_karras(n, sigmas[0].item(), sigmas[-1].item())`` (A1111's Karras), float32, with 0."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = SIGMAS[0].item() ** (1 / 7.0), SIGMAS[-1].item() ** (1 / 7.0)
    return torch.cat([(hi + ramp * (lo - hi)) ** 7.0, torch.zeros(1)])


def _denoiser(prediction_type: str):
    """A1111's ``CompVisDenoiser`` (external.py:90-110) / ``CompVisVDenoiser`` (:141-167) of :func:`stand_in`:
    σ (B,) float32, scalings as (B,1,1,1) tensors."""
    def model(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        c = lambda v: v[:, None, None, None]
        c_in = c(1 / (s ** 2 + 1.0 ** 2) ** 0.5)
        out = stand_in(x * c_in, _sigma_to_t(s))
        if prediction_type == "epsilon":
            return x + out * c(-s)
        return out * c(-s * 1.0 / (s ** 2 + 1.0 ** 2) ** 0.5) + x * c(1.0 ** 2 / (s ** 2 + 1.0 ** 2))
    return model


def _to_d(x, sigma, den):
    return (x - den) / sigma


def _ancestral(sigma_from, sigma_to, eta=1.0):
    up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


def _churn(x, sigmas, i, noise, s_churn=0., s_tmin=0., s_tmax=float('inf'), s_noise=1.):
    """The churn that opens each step of ``sample_euler`` / ``sample_heun`` / ``sample_dpm_2`` (sampling.py:123-127):
    ``(x, sigma_hat)``; ``noise(x)`` is k-diffusion's ``randn_like``, drawn every step (``None``: no draws, s_churn 0)."""
    gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.
    eps = noise(x) * s_noise if noise is not None else None
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
    return x, sigma_hat


def _kd_euler(model, x, sigmas, noise=None, **churn):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, **churn)
        d = _to_d(x, sigma_hat, model(x, sigma_hat * s_in))
        x = x + d * (sigmas[i + 1] - sigma_hat)
    return x


def _kd_euler_ancestral(model, x, sigmas, noise, eta=1.0):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i] * s_in)
        down, up = _ancestral(sigmas[i], sigmas[i + 1], eta)
        x = x + _to_d(x, sigmas[i], den) * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(x) * 1.0 * up
    return x


def _kd_heun(model, x, sigmas, noise=None, **churn):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, **churn)
        d = _to_d(x, sigma_hat, model(x, sigma_hat * s_in))
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in))
            x = x + (d + d_2) / 2 * dt
    return x


def _kd_dpmpp_2s_ancestral(model, x, sigmas, noise, eta=1.0):
    s_in = x.new_ones([x.shape[0]])
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i] * s_in)
        down, up = _ancestral(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + _to_d(x, sigmas[i], den) * (down - sigmas[i])
        else:
            t, t_next = t_fn(sigmas[i]), t_fn(down)
            h = t_next - t
            s = t + 1 / 2 * h
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * (1 / 2)).expm1() * den
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * model(x_2, sigma_fn(s) * s_in)
        if sigmas[i + 1] > 0:
            x = x + noise(x) * 1.0 * up
    return x


def _x_T(seed: int) -> torch.Tensor:
    return torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(seed), dtype=F32)


def _run_reference(sampler: str, model, x_T: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    if sampler == "euler":
        return _kd_euler(model, x_T * sigmas[0], sigmas)
    if sampler == "heun":
        return _kd_heun(model, x_T * sigmas[0], sigmas)
    g = torch.Generator().manual_seed(7)
    ancestral = _kd_euler_ancestral if sampler == "euler_a" else _kd_dpmpp_2s_ancestral
    return ancestral(model, x_T * sigmas[0], sigmas, lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype))


SAMPLERS = {"euler": euler_sample, "euler_a": euler_ancestral_sample, "heun": heun_sample,
            "dpmpp_2s_a": dpmpp_2s_ancestral_sample}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("schedule", ["uniform", "karras"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_float32_latents_on_a1111_grids_are_k_diffusions_run(sampler, schedule, prediction_type, steps):
    """Bit for bit (before: 3e-7 to 6e-6 relative off: float64 grid, t(σ), c_in, ancestral steps, 2S's times)."""
    x_T = _x_T(steps)
    sigmas = _get_sigmas(steps) if schedule == "uniform" else _karras(steps)
    want = _run_reference(sampler, _denoiser(prediction_type), x_T, sigmas)
    got = SAMPLERS[sampler](stand_in, x_T, alphas_cumprod=AC, num_steps=steps, prediction_type=prediction_type,
                            schedule=schedule, generator=torch.Generator().manual_seed(7))
    assert got.dtype == F32 and torch.equal(got, want), rel_err(got, want)


def test_shared_pieces_are_k_diffusions_in_float32_and_float64_in_float64():
    """The pieces themselves: float32 ``t(σ)`` against the float32 table, ``x·c_in``, ancestral steps on float32
    0-dim tensors; on float64 inputs they stay float64 (a precise mode)."""
    sig = _get_sigmas(13)[:-1]
    assert sigma_to_t(sig, SIGMAS).dtype == F32 and torch.equal(sigma_to_t(sig, SIGMAS), _sigma_to_t(sig))
    x = _x_T(1)
    for s in sig.tolist():
        st = torch.tensor(s)
        assert torch.equal(model_input(x, s, F32), x * (1 / (st ** 2 + 1) ** 0.5))
    for a, b in itertools.pairwise(sig):
        want = tuple(float(v) for v in _ancestral(a, b))
        assert ancestral_step(float(a), float(b), dtype=F32) == want
    sig64 = sig.double()
    table64 = ((1 - AC) / AC).sqrt()
    t64 = sigma_to_t(sig64, table64)
    assert t64.dtype == torch.float64 and rel_err(t64, _sigma_to_t(sig).double()) < 1e-5
    _, up = ancestral_step(float(sig64[2]), float(sig64[3]))
    exact = (float(sig64[3]) ** 2 * (float(sig64[2]) ** 2 - float(sig64[3]) ** 2) / float(sig64[2]) ** 2) ** 0.5
    assert up == exact


def test_float64_latents_stay_float64():
    """Float64 latents: the float64 table and arithmetic, near the float32 run but not it."""
    x_T = _x_T(2)
    got64 = euler_sample(stand_in, x_T.double(), alphas_cumprod=AC, num_steps=10, schedule="karras")
    got32 = euler_sample(stand_in, x_T, alphas_cumprod=AC, num_steps=10, schedule="karras")
    assert got64.dtype == torch.float64
    assert 0 < rel_err(got32, got64) < 1e-4  # (float32 ᾱ: 1 − ᾱ near t = 0 carries ~1e-5 relative error)
