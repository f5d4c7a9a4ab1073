"""LMS on float32 latents and A1111's grids is A1111's run bit for bit: k-diffusion's ``sample_lms``
(sampling.py:261-278 at 4601bf0) with ``linear_multistep_coeff`` (:247-258) — the basis polynomial on the float32 σ,
numerators ``τ − σ_k`` in float64 as NumPy 1.x (A1111's pin, 1.26) promotes a Python float with a float32 scalar,
denominators float32 differences, integrated by ``scipy.integrate.quad`` — transcribed below with the real
``quad``. (Checked against the real k-diffusion with that NumPy-1 promotion: 0 difference; under NumPy 2 its
numerators are float32 and it moves by ~1e-7.) Before: 9e-8 to 2e-7 relative off (exact integration)."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from sampler_stand_ins import rel_err, stand_in
from test_dpm_adaptive_float32 import AC, F32, _get_sigmas
from test_kdiffusion_float32 import _denoiser, _karras, _to_d, _x_T

from sdadapt.img2img import Img2ImgStart
from sdadapt.samplers import sample_latents
from sdadapt.samplers.lms import a1111_lms_coefficients, gauss_kronrod_21, lms_coefficients, lms_sample

integrate = pytest.importorskip("scipy.integrate")


def _kd_linear_multistep_coeff(order, t, i, j):
    def fn(tau):
        prod = 1.
        for k in range(order):
            if j == k:
                continue
            prod *= (float(tau) - float(t[i - k])) / float(t[i - j] - t[i - k])  # (NumPy 1.x: float64 numerator)
        return prod
    return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0]


def _kd_sample_lms(model, x, sigmas, order=4):
    s_in = x.new_ones([x.shape[0]])
    sigmas_cpu = sigmas.detach().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        ds.append(_to_d(x, sigmas[i], model(x, sigmas[i] * s_in)))
        if len(ds) > order:
            ds.pop(0)
        cur_order = min(i + 1, order)
        coeffs = [_kd_linear_multistep_coeff(cur_order, sigmas_cpu, i, j) for j in range(cur_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(ds)))
    return x


def test_gauss_kronrod_21_is_quads_first_pass_on_the_lms_polynomials():
    """QUADPACK's dqk21 summed in its order: ``quad``'s result bit for bit on random Lagrange bases of degree 0-3
    (float32 nodes, as LMS has them), and the exact integral to 1e-12."""
    rng = random.Random(0)
    for _ in range(400):
        order = rng.randint(1, 4)
        t = np.sort(np.array([rng.uniform(0.02, 15.0) for _ in range(order + 1)], dtype=np.float32))[::-1].copy()
        i = order - 1
        got = a1111_lms_coefficients(t.tolist(), i, order)
        want = [_kd_linear_multistep_coeff(order, t, i, j) for j in range(order)]
        assert got == want, (t, got, want)
        exact = lms_coefficients([float(v) for v in t[: i + 1][::-1]], float(t[i]), float(t[i + 1]))
        assert max(abs(a - b) / max(abs(b), 1e-300) for a, b in zip(got, exact)) < 1e-5  # (float32 denominators)
    assert gauss_kronrod_21(lambda x: x ** 3 - 2 * x, -1.0, 2.5) == pytest.approx(2.5 ** 4 / 4 - 2.5 ** 2 - 0.25 + 1,
                                                                               rel=1e-12)


@pytest.mark.parametrize("schedule", ["uniform", "karras"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_float32_lms_on_a1111_grids_is_a1111s_run(schedule, prediction_type, steps):
    x_T = _x_T(steps)
    sigmas = _get_sigmas(steps) if schedule == "uniform" else _karras(steps)
    want = _kd_sample_lms(_denoiser(prediction_type), x_T * sigmas[0], sigmas)
    got = lms_sample(stand_in, x_T, alphas_cumprod=AC, num_steps=steps, prediction_type=prediction_type,
                     schedule=schedule)
    assert got.dtype == F32 and torch.equal(got, want), rel_err(got, want)


def test_lms_img2img_half_latents_and_sample_latents():
    """img2img from index 3 (A1111's ``sigmas[3:]``, ``init + noise·σ``), "LMS Karras" (``schedule="karras"``)
    through :func:`sample_latents`, and half latents (the float32 run, the model fed half inputs) are A1111's too; float64
    latents keep the exact integration (a precise mode)."""
    x_T = _x_T(10)
    init = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(99))
    sigmas = _karras(10)[3:]
    want = _kd_sample_lms(_denoiser("epsilon"), init + x_T * sigmas[0], sigmas)
    got = lms_sample(stand_in, x_T, alphas_cumprod=AC, num_steps=10, schedule="karras",
                     start=Img2ImgStart(init=init, index=3))
    assert torch.equal(got, want), rel_err(got, want)
    want = _kd_sample_lms(_denoiser("epsilon"), x_T * _karras(10)[0], _karras(10))
    got = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler="lms", alphas_cumprod=AC,
                         num_steps=10, schedule="karras")
    assert torch.equal(got, want), rel_err(got, want)
    half = lms_sample(lambda x, t: stand_in(x.float(), t), x_T.half(), alphas_cumprod=AC, num_steps=10,
                      schedule="karras")
    assert half.dtype == torch.float16 and rel_err(half.float(), want) < 5e-3
    x64 = lms_sample(stand_in, x_T.double(), alphas_cumprod=AC, num_steps=10, schedule="karras")
    assert x64.dtype == torch.float64 and 0 < rel_err(x64.float(), want) < 1e-4
