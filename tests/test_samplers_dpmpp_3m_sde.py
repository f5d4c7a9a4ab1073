"""DPM++ 3M SDE (``dpmsolver++_3m_sde``) against diffusers' ``DPMSolverMultistepScheduler(solver_order=3,
algorithm_type="sde-dpmsolver++")`` step for step (same CPU generator for the noise).

diffusers 0.42.1's third-order SDE update weighs D2 by ``(1 − e^(−2h) − 2h)/(2h)² − ½`` = c₃ − 1, where
k-diffusion's ``sample_dpmpp_3m_sde`` (A1111's "DPM++ 3M SDE") has ``c₃ = −φ₃ = ½ − (e^(−2h) − 1 + 2h)/(2h)²``,
the SDE counterpart of diffusers' own deterministic DPM++ 3M weight ``½ − (e^(−h) − 1 + h)/h²``. c₃ − 1
tends to −1 as h → 0 (an O(1) weight on D2 = O(h²): the steps are first order); c₃ gives second order
(checked below on a model whose exact solution is known). The sampler uses c₃, so it is compared with the
diffusers class whose third-order update adds the missing ``α_t·D2`` (``_Fixed`` below, its D2
recomputed here from diffusers' own quantities); steps of order 1 and 2 (every step of a run of ≤ 4
steps) are the unmodified class's.

Tolerance 2e-5 of the result's scale (diffusers computes the update in float32; measured ≤ 2.9e-6 over
n = 1…60, ε and v, Karras or not, float32 and float64 samples: docs/samplers.md).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sampler_stand_ins import SD_BETAS, rel_err, stand_in

from sdadapt.samplers import (
    KARRAS_SAMPLERS,
    SAMPLERS,
    canonical_sampler,
    sample_latents,
)
from sdadapt.samplers.dpm_solver import (
    dpmsolver_pp_3m_sde_sample,
    dpmsolver_pp_sde_sample,
)
from sdadapt.samplers.labels import A1111_MISSING, sampler_from_label

diffusers = pytest.importorskip("diffusers")


class _Fixed(diffusers.DPMSolverMultistepScheduler):
    """diffusers' class with the third-order SDE step's D2 weight raised by 1 (to k-diffusion's −φ₃)."""

    def multistep_dpm_solver_third_order_update(self, model_output_list, *args, sample=None, noise=None, **kw):
        x = super().multistep_dpm_solver_third_order_update(model_output_list, *args, sample=sample, noise=noise,
                                                            **kw)
        sig = [self.sigmas[self.step_index + 1 - k] for k in range(4)]  # σ_t, σ_s0, σ_s1, σ_s2
        lam = [torch.log(a) - torch.log(s) for a, s in (self._sigma_to_alpha_sigma_t(v) for v in sig)]
        alpha_t = self._sigma_to_alpha_sigma_t(sig[0])[0]
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        h, h0, h1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
        r0, r1 = h0 / h, h1 / h
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        return x + alpha_t * (d1_0 - d1_1) / (r0 + r1)


def _diffusers_run(cls, x_T, n, *, seed, karras=False, prediction_type="epsilon", model=stand_in):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = cls(**SD_BETAS, solver_order=3, algorithm_type="sde-dpmsolver++", use_karras_sigmas=karras,
                    prediction_type=prediction_type)
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(model(sched.scale_model_input(x, t), t.expand(x.shape[0])), t, x, generator=g).prev_sample
    return x, sched, g


@settings(max_examples=60, deadline=None)
@given(karras=st.booleans(), prediction_type=st.sampled_from(["epsilon", "v_prediction"]), n=st.integers(1, 60),
       batch=st.integers(1, 2), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_matches_diffusers_with_k_diffusions_third_order_weight(karras, prediction_type, n, batch, dtype, seed):
    x_T = torch.randn(batch, 4, 3, 3, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    ref, sched, g_ref = _diffusers_run(_Fixed, x_T, n, seed=seed + 1, karras=karras, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(seed + 1)
    seen = []
    out = dpmsolver_pp_3m_sde_sample(stand_in, x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=n,
                                     prediction_type=prediction_type, karras=karras, generator=g,
                                     callback=lambda i, t, x: seen.append(t[0].clone()))
    assert out.dtype == dtype and out.shape == x_T.shape
    assert rel_err(out, ref) <= 2e-5, rel_err(out, ref)
    assert torch.equal(g.get_state(), g_ref.get_state())
    assert torch.equal(torch.stack(seen), sched.timesteps)


def test_short_runs_are_the_unmodified_class_and_longer_ones_are_not():
    """≤ 4 steps have no third-order step: diffusers' class as it is. From 5 steps on, its D2 weight
    (off by 1) moves the result by far more than the tolerance: the test above would catch a sampler
    that copied it."""
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for n in (1, 2, 3, 4, 5, 20):
        raw, sched, _ = _diffusers_run(diffusers.DPMSolverMultistepScheduler, x_T, n, seed=7)
        ours = dpmsolver_pp_3m_sde_sample(stand_in, x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=n,
                                          generator=torch.Generator().manual_seed(7))
        assert (rel_err(ours, raw) <= 2e-5) == (n <= 4), (n, rel_err(ours, raw))


def test_the_third_order_weight_is_k_diffusions_convention():
    """c₃ = ∫₀ʰ 2e^(−2u)·(h−u)²/2 du / h² by quadrature (the SDE kernel against (λ − λ_i)²/(2h²)); the same
    convention with the ODE kernel e^(−u) gives diffusers' deterministic DPM-Solver++ 3M weight
    ½ − (e^(−h) − 1 + h)/h². (D2 as both libraries compute it is ≈ h²·x̂0''/2, so this is half the Taylor
    weight of x̂0's quadratic term: the steps are second order, not third; see the next test.)"""
    for h in (0.01, 0.1, 0.3, 1.0, 2.5):
        u = np.linspace(0.0, h, 200001)
        sde = np.trapezoid(2 * np.exp(-2 * u) * (h - u) ** 2 / 2, u) / h**2
        ode = np.trapezoid(np.exp(-u) * (h - u) ** 2 / 2, u) / h**2
        c3 = 0.5 - (math.expm1(-2 * h) + 2 * h) / (2 * h) ** 2
        assert c3 == pytest.approx(sde, rel=1e-7)
        assert 0.5 - (math.expm1(-h) + h) / h**2 == pytest.approx(ode, rel=1e-7)
        assert (1 - math.exp(-2 * h) - 2 * h) / (2 * h) ** 2 - 0.5 == pytest.approx(c3 - 1, abs=1e-12)


def test_third_order_steps_converge_at_order_two():
    """The noise-free 3M SDE update (``_sde_first_order`` with z = 0 plus ``_sde_third_order_terms``) on a
    data prediction x̂0(λ) = e^(0.9λ) given exactly, λ uniform in [−1, 1], the first two steps exact: the
    mean SDE solution is ``x' = (σ'_t/σ_t)e^(−h)x + α'∫2e^(−2(λ'−λ))x̂0(λ)dλ`` in closed form. The error shrinks
    ~4× per doubling of the steps (diffusers' c₃ − 1: ~2×, first order; 2c₃: ~8×)."""
    from sdadapt.samplers.dpm_solver import _sde_first_order, _sde_third_order_terms
    from sdadapt.samplers.sigma_space import vp_alpha_sigma

    a = 0.9

    def error(n):
        lams = [-1 + 2 * i / n for i in range(n + 1)]
        sig = [math.exp(-lam) for lam in lams]

        def exact(x, i):  # from λ_i to λ_{i+1}
            alpha_n, st_n, _ = vp_alpha_sigma(sig[i + 1])
            st = vp_alpha_sigma(sig[i])[1]
            lo, hi = lams[i], lams[i + 1]
            integral = 2 * math.exp(-2 * hi) * (math.exp((2 + a) * hi) - math.exp((2 + a) * lo)) / (2 + a)
            return (st_n / st) * math.exp(-(hi - lo)) * x + alpha_n * integral

        x_start = torch.tensor([0.3], dtype=torch.float64)
        x, zero = exact(exact(x_start, 0), 1), torch.zeros(1, dtype=torch.float64)
        for i in range(2, n):
            m = tuple(torch.tensor([math.exp(a * lams[k])], dtype=torch.float64) for k in (i - 2, i - 1, i))
            x = _sde_first_order(x, m[2], zero, sig[i], sig[i + 1]) + _sde_third_order_terms(
                m, (lams[i - 2], lams[i - 1], lams[i], lams[i + 1]), sig[i + 1])
        want = x_start
        for i in range(n):
            want = exact(want, i)
        return float((x - want).abs())

    errors = [error(n) for n in (20, 40, 80)]
    ratios = [errors[0] / errors[1], errors[1] / errors[2]]
    assert all(3.5 < r < 5.0 for r in ratios), (errors, ratios)


def test_two_steps_are_dpmpp_2m_sde():
    ac = _Fixed(**SD_BETAS).alphas_cumprod
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    for n in (1, 2, 3):  # orders 1 | 1, 1 | 1, 2, 1 (the third is the last: first order)
        a = dpmsolver_pp_3m_sde_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n,
                                       generator=torch.Generator().manual_seed(3))
        b = dpmsolver_pp_sde_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n,
                                    generator=torch.Generator().manual_seed(3))
        assert torch.equal(a, b)


def test_refuses_the_repeated_timestep_grid():
    with pytest.raises(ValueError, match=r"dpmsolver\+\+_3m_sde: 1000 steps repeat a timestep"):
        dpmsolver_pp_3m_sde_sample(stand_in, torch.zeros(1, 1, 2, 2), alphas_cumprod=_Fixed(**SD_BETAS).alphas_cumprod,
                                   num_steps=1000)


def test_registered_names_aliases_and_labels():
    assert "dpmsolver++_3m_sde" in SAMPLERS and "dpmsolver++_3m_sde" in KARRAS_SAMPLERS
    for name in ("dpm++_3m_sde", "DPMPP_3M_SDE", "k_dpmpp_3m_sde"):
        assert canonical_sampler(name) == "dpmsolver++_3m_sde"
    assert sampler_from_label("DPM++ 3M SDE") == ("dpmsolver++_3m_sde", False)
    assert sampler_from_label("DPM++ 3M SDE Karras") == ("dpmsolver++_3m_sde", True)
    assert "dpm++ 3m sde" not in A1111_MISSING


def test_sample_latents_guidance():
    ac = _Fixed(**SD_BETAS).alphas_cumprod
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    cond, uncond = torch.full((2, 1), 1.0), torch.full((2, 1), -0.5)

    def model(x, t, c):
        return stand_in(x, t) + 0.1 * c.reshape(-1, 1, 1, 1) * x

    got = sample_latents(model, x_T, cond, sampler="DPM++_3M_SDE", alphas_cumprod=ac, num_steps=8, uncond=uncond,
                         guidance_scale=1.5, karras=True, generator=torch.Generator().manual_seed(4))
    guided = lambda x, t: model(x, t, uncond) + 1.5 * (model(x, t, cond) - model(x, t, uncond))
    want = dpmsolver_pp_3m_sde_sample(guided, x_T, alphas_cumprod=ac, num_steps=8, karras=True,
                                      generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
