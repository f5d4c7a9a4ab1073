"""``dpm_fast`` and ``dpm_adaptive`` (A1111's "DPM fast" / "DPM adaptive", k-diffusion's ``sample_dpm_fast`` /
``sample_dpm_adaptive``; no diffusers class): on float64 latents (sdadapt's float64 precise mode) against
``sampler_stand_ins.KDiffusionDPMSolver`` in float64 (same noise; float32 latents against k-diffusion's float32
times: test_dpm_adaptive_float32.py), convergence on a Gaussian model whose ODE solution is known, the model-call
counts, and the registry / labels / refusals."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
from sampler_stand_ins import (
    KDiffusionDPMSolver,
    assert_guidance_is_the_guided_model,
    rel_err,
    sd_alphas_cumprod,
    stand_in,
)

from sdadapt.samplers import (
    SAMPLERS,
    SCHEDULE_SAMPLERS,
    canonical_sampler,
    resolve_schedule,
    sample_latents,
)
from sdadapt.samplers.dpm_fast_adaptive import (
    dpm_adaptive_sample,
    dpm_fast_orders,
    dpm_fast_sample,
)
from sdadapt.samplers.labels import A1111_MISSING, sampler_from_label
from sdadapt.samplers.sigma_space import training_sigmas


def _a1111_eps(ac: torch.Tensor, model=stand_in):
    """ε(x, σ) of CompVisDenoiser on the stand-in ε model: the model at x/√(σ²+1) and t(σ) (log-σ interpolation,
    float32-held); the ε model's ε̂ is the sampler's ε (x − D)/σ exactly."""
    log_train = training_sigmas(ac).log()

    def eps(x, sigma):
        d = math.log(sigma) - log_train
        low = min(int((d >= 0).cumsum(0).argmax()), len(log_train) - 2)
        w = min(max(float((log_train[low] - math.log(sigma)) / (log_train[low] - log_train[low + 1])), 0.0), 1.0)
        t = torch.full((x.shape[0],), (1 - w) * low + w * (low + 1), dtype=torch.float32).double()
        return model(x / math.sqrt(sigma * sigma + 1), t)
    return eps


def _noises(seed: int, shape, count: int):
    """The reference's noise sampler: the next of ``count`` unit noises of ``shape`` drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    noises = iter([torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)])
    return lambda like: next(noises)


def _ends(ac):
    train = training_sigmas(ac)
    return -math.log(float(train[-1])), -math.log(float(train[0])), float(train[-1])


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 6, 10, 25])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_dpm_fast_is_k_diffusions_function(nfe, eta):
    ac = sd_alphas_cumprod()
    x_T = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(nfe), dtype=torch.float64)
    calls = []
    got = dpm_fast_sample(lambda x, t: (calls.append(t), stand_in(x, t))[1], x_T, alphas_cumprod=ac, num_steps=nfe,
                          eta=eta, generator=torch.Generator().manual_seed(7))
    t0, t1, s_max = _ends(ac)
    ref = KDiffusionDPMSolver(_a1111_eps(ac), _noises(7, x_T.shape, 100))
    want = ref.fast(x_T * s_max, t0, t1, nfe, eta=eta)
    assert len(calls) == ref.calls == nfe  # exactly n model calls
    assert rel_err(got, want) < 1e-10, rel_err(got, want)
    assert sum(dpm_fast_orders(nfe)) == nfe


@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("eta, rtol, pid", [(0.0, 0.05, (0.0, 1.0, 0.0)), (1.0, 0.05, (0.0, 1.0, 0.0)),
                                            (0.0, 0.01, (0.0, 1.0, 0.0)), (0.0, 0.05, (0.3, 0.7, 0.2))])
def test_dpm_adaptive_is_k_diffusions_function(order, eta, rtol, pid):
    """(the last case: a PID controller with P and D terms, k-diffusion's b₂ and b₃ nonzero)"""
    ac = sd_alphas_cumprod()
    pcoeff, icoeff, dcoeff = pid
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(order), dtype=torch.float64)
    calls, info = [], {}
    got = dpm_adaptive_sample(lambda x, t: (calls.append(t), stand_in(x, t))[1], x_T, alphas_cumprod=ac, order=order,
                              rtol=rtol, eta=eta, pcoeff=pcoeff, icoeff=icoeff, dcoeff=dcoeff,
                              generator=torch.Generator().manual_seed(5), info=info)
    t0, t1, s_max = _ends(ac)
    ref = KDiffusionDPMSolver(_a1111_eps(ac), _noises(5, x_T.shape, 2000))
    want, want_info = ref.adaptive(x_T * s_max, t0, t1, order=order, rtol=rtol, eta=eta, pcoeff=pcoeff, icoeff=icoeff,
                                   dcoeff=dcoeff)
    assert info == want_info and info["nfe"] == len(calls) == ref.calls
    assert info["n_accept"] > 3
    assert rel_err(got, want) < 1e-9, rel_err(got, want)


def test_transcription_catches_a_wrong_third_order_weight():
    """The tolerance above is tight enough: a 3-step with r₂ = 0.7 (not ⅔) is off by far more."""
    ac = sd_alphas_cumprod()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t0, t1, s_max = _ends(ac)
    ref = KDiffusionDPMSolver(_a1111_eps(ac), lambda like: 0.0)  # (η = 0: the noise is multiplied by 0)
    want = ref.fast(x_T * s_max, t0, t1, 9)
    bad = KDiffusionDPMSolver(_a1111_eps(ac), lambda like: 0.0)
    bad.step_3 = functools.partial(KDiffusionDPMSolver.step_3, bad, r2=0.7)
    assert rel_err(bad.fast(x_T * s_max, t0, t1, 9), want) > 1e-6


# ------------------------------------------------- convergence on an exactly solvable model
def _gaussian(ac: torch.Tensor, c: float):
    """Data x0 ~ N(0, c²): D(x, σ) = c²/(c²+σ²)·x, ε̂ = σ·x/(c²+σ²) at the scaled input; the probability-flow
    ODE has x(σ) = x(σ₀)·√((c²+σ²)/(c²+σ₀²)). The model reads σ back from t (the log-σ interpolation)."""
    train = np.sqrt((1 - ac.numpy()) / ac.numpy())

    def model(x_in, t):
        s = float(np.exp(np.interp(float(t[0]), np.arange(len(train)), np.log(train))))
        return s * (x_in * math.sqrt(s * s + 1)) / (c * c + s * s)
    return model, float(train[0]), float(train[-1])


def test_dpm_fast_converges_at_third_order_on_a_gaussian_model():
    """With η = 0 and m = 4, 8, 16, 32 steps (h halving), nfe = 3(m−1) + 2 (third-order steps, a second-order
    last step) converges ~8-12× per halving: third order; nfe = 3(m−1) + 1 ends on a first-order step, whose
    O(h²) local error leaves ~4× (second order): k-diffusion's split, kept."""
    ac, c = sd_alphas_cumprod(), 0.5
    model, s_min, s_max = _gaussian(ac, c)
    x_T = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = x_T * s_max * math.sqrt((c * c + s_min**2) / (c * c + s_max**2))

    def ratios(extra):
        errors = [rel_err(dpm_fast_sample(model, x_T, alphas_cumprod=ac, num_steps=3 * (m - 1) + extra, eta=0.0),
                           exact) for m in (4, 8, 16, 32)]
        return [a / b for a, b in itertools.pairwise(errors)], errors

    third, errors = ratios(2)
    assert all(r > 7.0 for r in third), (errors, third)
    second, errors = ratios(1)
    assert all(3.0 < r < 5.5 for r in second[1:]), (errors, second)


def test_dpm_adaptive_tolerance_buys_accuracy():
    """A tighter rtol/atol costs model calls and brings the result closer to the exact ODE solution."""
    ac, c = sd_alphas_cumprod(), 0.5
    model, s_min, s_max = _gaussian(ac, c)
    x_T = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = x_T * s_max * math.sqrt((c * c + s_min**2) / (c * c + s_max**2))
    results = []
    for tol in (0.05, 0.0005, 0.000005):
        info = {}
        out = dpm_adaptive_sample(model, x_T, alphas_cumprod=ac, rtol=tol, atol=tol / 6, eta=0.0, info=info)
        results.append((info["nfe"], rel_err(out, exact)))
    assert results[0][0] < results[1][0] < results[2][0], results
    assert results[0][1] > results[1][1] > results[2][1], results
    assert results[2][1] < 1e-4, results  # (measured: 27 calls 2.5e-2, 54 7.4e-4, 168 1.1e-5)


# ------------------------------------------------- registry, labels, refusals, entry point
def test_registered_names_aliases_labels_and_refusals():
    assert {"dpm_fast", "dpm_adaptive"} <= set(SAMPLERS)
    assert not {"dpm_fast", "dpm_adaptive"} & set(SCHEDULE_SAMPLERS)
    assert canonical_sampler("k_dpm_fast") == "dpm_fast" and canonical_sampler("K_DPM_AD") == "dpm_adaptive"
    assert sampler_from_label("DPM fast") == ("dpm_fast", False)
    assert sampler_from_label("dpm adaptive") == ("dpm_adaptive", False)
    assert "dpm fast" not in A1111_MISSING and "dpm adaptive" not in A1111_MISSING
    with pytest.raises(ValueError, match="no Karras noise levels"):
        sampler_from_label("DPM fast Karras")
    with pytest.raises(ValueError, match="takes no schedule: DPM adaptive chooses its own steps"):
        resolve_schedule("dpm_adaptive", "karras")
    x_T = torch.randn(1, 4, 4, 4)
    with pytest.raises(ValueError, match="order must be 2 or 3"):
        dpm_adaptive_sample(stand_in, x_T, alphas_cumprod=sd_alphas_cumprod(), order=1)
    with pytest.raises(ValueError, match="num_steps .* must be >= 1"):
        dpm_fast_sample(stand_in, x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=0)
    with pytest.raises(RuntimeError, match="error estimate is nan"):
        dpm_adaptive_sample(lambda x, t: x * float("nan"), x_T, alphas_cumprod=sd_alphas_cumprod())


@pytest.mark.parametrize("name", ["dpm_fast", "dpm_adaptive"])
def test_sample_latents_guidance_and_options(name):
    ac = sd_alphas_cumprod().float()
    fn = dpm_fast_sample if name == "dpm_fast" else dpm_adaptive_sample
    assert_guidance_is_the_guided_model(name, functools.partial(fn, alphas_cumprod=ac), alphas_cumprod=ac,
                                        karras=False)
    info = {}
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler="DPM_ADAPTIVE", alphas_cumprod=ac,
                         num_steps=1, eta=0.0, info=info)
    assert torch.isfinite(out).all() and info["nfe"] == 3 * info["steps"] > 0


def test_half_inputs_keep_their_dtype():
    ac = sd_alphas_cumprod().float()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    a = dpm_fast_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=10, generator=torch.Generator().manual_seed(1))
    h = dpm_fast_sample(stand_in, x_T.to(torch.bfloat16), alphas_cumprod=ac, num_steps=10,
                        generator=torch.Generator().manual_seed(1))
    assert h.dtype == torch.bfloat16 and torch.isfinite(h).all() and rel_err(h, a) < 0.05


def test_generate_says_dpm_adaptives_model_calls(tmp_path):
    """The toy model end to end: ``generate`` reports each image's steps and model calls (its own count)."""
    from sdadapt.jobs import run_generate

    lines: list[str] = []
    run_generate(prompt="a red circle", out=tmp_path / "a.png", sampler="DPM adaptive", count=2, log=lines.append)
    said = [line for line in lines if "dpm_adaptive took" in line]
    assert [line.split(":")[0] for line in said] == ["a-00.png", "a-01.png"], lines
    assert all(int(line.split(", ")[-1].split()[0]) > 0 for line in said)
    assert (tmp_path / "a-00.png").is_file()
    run_generate(prompt="a red circle", out=tmp_path / "b.png", sampler="DPM fast", steps=7, log=lines.append)
    assert (tmp_path / "b.png").is_file()
