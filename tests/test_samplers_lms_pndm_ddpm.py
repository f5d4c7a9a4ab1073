"""LMS (``lms``/``k_lms``, Karras σ too), PNDM (``pndm``, with its Runge–Kutta warm-up) and DDPM
(``ddpm``, ancestral) against the real diffusers schedulers built as kohya's ``get_my_scheduler``
builds them (class defaults + SD's betas), step for step, and against float64 transcriptions of
the papers' formulas written here.

Tolerances. Against diffusers as it runs (float32 ᾱ, float32 σ grid, float32 LMS integrand):
max |ours − diffusers| ≤ tol · max(1, max |diffusers|) with tol = 1e-5 in float64 and 1e-4 in
float32; the worst measured is ≈3e-6 in both (2×4×8×8 latents, n up to 60: in float64 that is
diffusers' float32 σ grid and coefficients). Where diffusers can be made to compute in float64
(DDPM and PNDM read ``alphas_cumprod`` as given; LMS's σ grid can be handed to it in float64) the
agreement is machine precision, so those checks use 1e-10. The stand-in model depends strongly on t
(``sin(t/7)``): a timestep off by one moves the result far beyond these tolerances (checked below).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sampler_stand_ins import SD_BETAS, stand_in

from sdadapt.samplers import (
    KARRAS_SAMPLERS,
    SAMPLERS,
    canonical_sampler,
    sample_latents,
)
from sdadapt.samplers.ddpm import ddpm_sample
from sdadapt.samplers.lms import lms_coefficients, lms_sample
from sdadapt.samplers.pndm import pndm_sample, pndm_timesteps

diffusers = pytest.importorskip("diffusers")

TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def _scheduler(cls_name: str, **config):
    return getattr(diffusers, cls_name)(**SD_BETAS, **config)


def _diffusers_run(sched, x_T: torch.Tensor, n: int, *, seed: int | None = None, float64_alphas: bool = False,
                   sigmas: torch.Tensor | None = None, timesteps: torch.Tensor | None = None, model=stand_in):
    """The pipeline loop over a diffusers scheduler; returns (x0, the timesteps the model saw)."""
    sched.set_timesteps(n)
    if float64_alphas:  # DDPM/PNDM index alphas_cumprod as given: make their arithmetic float64
        sched.alphas_cumprod = sched.alphas_cumprod.double()
        sched.final_alpha_cumprod = sched.alphas_cumprod[0]
        sched.one = torch.tensor(1.0, dtype=torch.float64)
    if sigmas is not None:
        sched.sigmas = sigmas
    if timesteps is not None:
        sched.timesteps = timesteps
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    x = x_T * sched.init_noise_sigma
    seen = []
    for t in sched.timesteps:
        seen.append(float(t))
        out = model(sched.scale_model_input(x, t), t.expand(x.shape[0]))
        kwargs = {"generator": gen} if seed is not None else {}
        x = sched.step(out, t, x, **kwargs).prev_sample
    return x, seen


def _err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours − ref| / max(1, max |ref|)."""
    return float((ours.double() - ref.double()).abs().max() / max(1.0, float(ref.double().abs().max())))


def _noise(shape, dtype, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


shapes = st.tuples(st.integers(1, 2), st.integers(1, 4), st.integers(2, 6), st.integers(2, 6))
dtypes = st.sampled_from([torch.float32, torch.float64])


# ------------------------------------------------------------------------------------ registry
def test_registered_names_and_aliases():
    assert {"ddpm", "pndm", "lms"} <= set(SAMPLERS)
    assert canonical_sampler("k_lms") == "lms" and canonical_sampler("K_LMS") == "lms"
    assert "lms" in KARRAS_SAMPLERS and "pndm" not in KARRAS_SAMPLERS and "ddpm" not in KARRAS_SAMPLERS
    x = _noise((1, 2, 3, 3), torch.float32)
    ac = _scheduler("DDPMScheduler").alphas_cumprod
    with pytest.raises(ValueError, match="Karras"):
        sample_latents(lambda x, t, c: stand_in(x, t), x, None, sampler="pndm", alphas_cumprod=ac, num_steps=5,
                       karras=True)


@pytest.mark.parametrize("name,fn,extra", [("k_lms", lms_sample, {"karras": True}), ("pndm", pndm_sample, {}),
                                           ("ddpm", ddpm_sample, {})])
def test_sample_latents_dispatches_with_guidance(name, fn, extra):
    x = _noise((1, 2, 4, 4), torch.float64)
    ac = _scheduler("DDPMScheduler").alphas_cumprod.double()
    cond, uncond, scale = torch.ones(1, 1, dtype=torch.float64), torch.full((1, 1), -0.5, dtype=torch.float64), 3.0

    def model(x, t, c):
        return stand_in(x, t) + 0.1 * c.reshape(-1, 1, 1, 1) * x

    got = sample_latents(model, x, cond, uncond=uncond, guidance_scale=scale, sampler=name, alphas_cumprod=ac,
                         num_steps=6, generator=torch.Generator().manual_seed(3), karras=bool(extra))

    def guided(x, t):
        u, c = model(x, t, uncond), model(x, t, cond)
        return u + scale * (c - u)

    want = fn(guided, x, alphas_cumprod=ac, num_steps=6, generator=torch.Generator().manual_seed(3), **extra)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fn", [lms_sample, pndm_sample, ddpm_sample])
def test_half_latents_on_the_cpu(fn, dtype):
    """float16/bfloat16 latents run on the CPU, come back in their dtype and near the float32 result."""
    x_T = _noise((1, 4, 4, 4), torch.float32)
    ac = _scheduler("DDPMScheduler").alphas_cumprod
    ref = fn(stand_in, x_T, alphas_cumprod=ac, num_steps=9, generator=torch.Generator().manual_seed(1))
    out = fn(stand_in, x_T.to(dtype), alphas_cumprod=ac, num_steps=9, generator=torch.Generator().manual_seed(1))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert _err(out, ref) <= 0.05


# ----------------------------------------------------------------------------------------- LMS
@settings(max_examples=30, deadline=None)
@given(order=st.integers(1, 4), data=st.data())
def test_lms_coefficients_match_scipy_quad(order, data):
    integrate = pytest.importorskip("scipy.integrate")
    # newest first: on a descending σ grid the newest node is the smallest, and the step ends below it
    nodes = sorted(data.draw(st.lists(st.floats(0.02, 15.0), min_size=order, max_size=order, unique=True)))
    if min(np.diff(nodes), default=1.0) < 1e-3:
        return
    start, end = nodes[0], nodes[0] * data.draw(st.floats(0.0, 0.99))
    ours = lms_coefficients(nodes, start, end)
    for j in range(order):
        def basis(tau, j=j):
            prod = 1.0
            for k in range(order):
                if k != j:
                    prod *= (tau - nodes[k]) / (nodes[j] - nodes[k])
            return prod
        ref = integrate.quad(basis, start, end, epsabs=0, epsrel=1e-13)[0]
        assert abs(ours[j] - ref) <= 1e-10 * max(1.0, abs(ref))


@settings(max_examples=30, deadline=None)
@given(order=st.integers(1, 4), seed=st.integers(0, 10**6))
def test_lms_coefficients_integrate_polynomials_exactly(order, seed):
    rng = np.random.default_rng(seed)
    nodes = list(np.sort(rng.uniform(0.1, 10.0, order)))
    start, end = nodes[0], nodes[0] - rng.uniform(0.01, 0.1)
    coeffs = lms_coefficients(nodes, start, end)
    # (close nodes make large coefficients of both signs and an ill-conditioned basis: the bound scales with
    # Σ|c_j|; 80 000 draws stay below 1.2e-9 of it, a wrong coefficient is off by O(1))
    assert abs(sum(coeffs) - (end - start)) < 1e-8 * max(1.0, sum(abs(c) for c in coeffs))  # Σ ℓ_j = 1
    poly = rng.normal(size=order)  # degree order-1: the Lagrange interpolant is the polynomial itself
    exact = np.polynomial.polynomial.polyval(end, np.polynomial.polynomial.polyint(poly)) - \
        np.polynomial.polynomial.polyval(start, np.polynomial.polynomial.polyint(poly))
    approx = sum(c * np.polynomial.polynomial.polyval(s, poly) for c, s in zip(coeffs, nodes))
    terms = [abs(c * np.polynomial.polynomial.polyval(s, poly)) for c, s in zip(coeffs, nodes)]
    assert abs(approx - exact) < 1e-7 * max(1.0, abs(exact), sum(terms))  # (80 000 draws: below 6.9e-9)


@settings(max_examples=10, deadline=None)  # diffusers' quad per coefficient is slow: keep n moderate
@given(n=st.integers(1, 40), prediction_type=st.sampled_from(["epsilon", "v_prediction"]), karras=st.booleans(),
       dtype=dtypes, shape=shapes)
def test_lms_matches_diffusers(n, prediction_type, karras, dtype, shape):
    x_T = _noise(shape, dtype)
    sched = _scheduler("LMSDiscreteScheduler", prediction_type=prediction_type, use_karras_sigmas=karras)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, seen = _diffusers_run(sched, x_T, n)
    got_t: list[float] = []
    ours = lms_sample(stand_in, x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=n,
                      prediction_type=prediction_type, karras=karras,
                      callback=lambda i, t, x: got_t.append(float(t[0])))
    assert ours.dtype == dtype and ours.shape == x_T.shape
    # the same float32 timesteps reach the model (Karras t(σ): diffusers interpolates float32 log σ)
    assert got_t == seen if not karras else np.allclose(got_t, seen, rtol=0, atol=1e-3)
    assert _err(ours, ref) <= TOL[dtype]


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lms_step_is_diffusers_in_float64(karras, prediction_type):
    """diffusers' stepping on our σ grid held in float64 (its quad then integrates in float64);
    the grid itself is diffusers' to float32 rounding."""
    from sdadapt.samplers.sigma_space import discrete_sigmas

    x_T = _noise((1, 3, 4, 4), torch.float64)
    for n in (2, 5, 23):
        sched = _scheduler("LMSDiscreteScheduler", prediction_type=prediction_type, use_karras_sigmas=karras)
        sched.set_timesteps(n)
        timesteps, sigmas = discrete_sigmas(sched.alphas_cumprod, n, karras=karras)
        torch.testing.assert_close(sigmas.float(), sched.sigmas, rtol=2e-6, atol=0)
        torch.testing.assert_close(timesteps.float(), sched.timesteps, rtol=0, atol=1e-3)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Karras t(σ): diffusers interpolates float32 log σ; hand it the float64 ones too
            ref, _ = _diffusers_run(sched, x_T, n, sigmas=sigmas, timesteps=timesteps.float())
        ours = lms_sample(stand_in, x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=n,
                          prediction_type=prediction_type, karras=karras)
        assert _err(ours, ref) <= 1e-10


def _naive_lms(model, x_T, alphas_cumprod, n, prediction_type, order=4):
    """k-diffusion's ``sample_lms`` in float64: σ linear in t on linspace(0, T−1, n) (float32
    timesteps, as diffusers holds them), Lagrange weights integrated by 4-point Gauss–Legendre
    (exact for cubics)."""
    ac = alphas_cumprod.double().numpy()
    train = np.sqrt((1 - ac) / ac)
    ts = np.linspace(0, len(ac) - 1, n)[::-1].astype(np.float32).astype(np.float64)
    sig = np.append(np.interp(ts, np.arange(len(ac)), train), 0.0)
    gx, gw = np.polynomial.legendre.leggauss(4)
    x = x_T.double() * sig[0]
    ds = []
    for i in range(n):
        s = sig[i]
        out = model(x / np.sqrt(s * s + 1), torch.full((x.shape[0],), ts[i], dtype=torch.float64))
        if prediction_type == "epsilon":
            x0 = x - s * out
        else:  # v: x0 = α·x_vp − σ_vp·v with x_vp = x/√(σ²+1), α = 1/√(σ²+1), σ_vp = σ/√(σ²+1)
            x0 = x / (s * s + 1) - s / np.sqrt(s * s + 1) * out
        ds.append((x - x0) / s)
        ds = ds[-order:]
        cur = len(ds)
        a, b = s, sig[i + 1]
        taus = (b - a) / 2 * gx + (a + b) / 2
        for j in range(cur):
            def ell(tau, j=j, i=i, cur=cur):
                return np.prod([(tau - sig[i - k]) / (sig[i - j] - sig[i - k]) for k in range(cur) if k != j], axis=0)
            x = x + float(np.sum(gw * ell(taus)) * (b - a) / 2) * ds[-1 - j]
    return x


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lms_matches_float64_reference(prediction_type):
    ac = _scheduler("LMSDiscreteScheduler").alphas_cumprod.double()
    x_T = _noise((2, 2, 3, 3), torch.float64, seed=1)
    for n in (1, 3, 4, 17):
        ours = lms_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, prediction_type=prediction_type)
        assert _err(ours, _naive_lms(stand_in, x_T, ac, n, prediction_type)) <= 1e-10


def test_lms_tolerance_catches_an_off_by_one_timestep():
    sched = _scheduler("LMSDiscreteScheduler")
    x_T = _noise((1, 2, 4, 4), torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref, _ = _diffusers_run(sched, x_T, 20)
    shifted = lms_sample(lambda x, t: stand_in(x, t + 1), x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=20)
    assert _err(shifted, ref) > 20 * TOL[torch.float32]


# ---------------------------------------------------------------------------------------- PNDM
def test_pndm_timesteps_are_diffusers():
    sched = _scheduler("PNDMScheduler")
    for n in [*range(4, 61), 99, 333, 999, 1000]:
        sched.set_timesteps(n)
        prk, plms = pndm_timesteps(n)
        assert prk == sched.prk_timesteps.tolist() and plms == sched.plms_timesteps.tolist(), n
        assert prk + plms == sched.timesteps.tolist()
    for n in (0, 1, 2, 3, 1001):
        with pytest.raises(ValueError, match="pndm"):
            pndm_timesteps(n)


@settings(max_examples=14, deadline=None)
@given(n=st.integers(4, 60), prediction_type=st.sampled_from(["epsilon", "v_prediction"]), dtype=dtypes,
       shape=shapes)
def test_pndm_matches_diffusers(n, prediction_type, dtype, shape):
    x_T = _noise(shape, dtype)
    sched = _scheduler("PNDMScheduler", prediction_type=prediction_type)
    ref, seen = _diffusers_run(sched, x_T, n)
    got_t: list[float] = []
    ours = pndm_sample(stand_in, x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=n,
                       prediction_type=prediction_type, callback=lambda i, t, x: got_t.append(float(t[0])))
    assert ours.dtype == dtype and got_t == seen and len(seen) == n + 9
    assert _err(ours, ref) <= TOL[dtype]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_pndm_is_diffusers_in_float64(prediction_type):
    x_T = _noise((2, 2, 3, 3), torch.float64, seed=2)
    ac = _scheduler("PNDMScheduler").alphas_cumprod.double()
    for n in (4, 7, 9, 50):  # 9: r = 111 is odd, the half step rounds
        ref, _ = _diffusers_run(_scheduler("PNDMScheduler", prediction_type=prediction_type), x_T, n,
                                float64_alphas=True)
        ours = pndm_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, prediction_type=prediction_type)
        assert _err(ours, ref) <= 1e-10


def _naive_pndm(model, x_T, alphas_cumprod, n):
    """Liu et al. (2022) Algorithm 2 with the PRK warm-up, ε-prediction, float64: the transfer
    φ(x, ε, t, t') = √(ᾱ'/ᾱ)·x − (ᾱ' − ᾱ)/(√ᾱ·(√((1−ᾱ')ᾱ) + √((1−ᾱ)ᾱ')))·ε (eq. 11), RK4
    weights on ε over half steps, then 4-step Adams–Bashforth on ε; ᾱ_{t<0} = ᾱ_0."""
    ac = alphas_cumprod.double()
    T = len(ac)
    r = T // n
    h = r // 2

    def abar(t):
        return float(ac[t]) if t >= 0 else float(ac[0])

    def phi(x, e, t, t2):
        a, a2 = abar(t), abar(t2)
        return (a2 / a) ** 0.5 * x - (a2 - a) / (a**0.5 * (((1 - a2) * a) ** 0.5 + ((1 - a) * a2) ** 0.5)) * e

    def eps(x, t):
        return model(x, torch.full((x.shape[0],), t, dtype=torch.long))

    x = x_T.double()
    t = (n - 1) * r
    es = []
    for _ in range(3):  # pseudo Runge-Kutta: t -> t - r; the half step is t - r + h (diffusers' rounding)
        mid = t - r + h
        e1 = eps(x, t)
        x1 = phi(x, e1, t, t - h)
        e2 = eps(x1, mid)
        x2 = phi(x, e2, t, mid)
        e3 = eps(x2, mid)
        x3 = phi(x, e3, t, mid - h)
        e4 = eps(x3, t - r)
        x = phi(x, (e1 + 2 * e2 + 2 * e3 + e4) / 6, t, t - r)
        es.append(e1)
        t -= r
    while t >= 0:
        es.append(eps(x, t))
        x = phi(x, (55 * es[-1] - 59 * es[-2] + 37 * es[-3] - 9 * es[-4]) / 24, t, t - r)
        t -= r
    return x


def test_pndm_matches_float64_paper_reference():
    ac = _scheduler("PNDMScheduler").alphas_cumprod.double()
    x_T = _noise((1, 3, 4, 4), torch.float64, seed=4)
    for n in (4, 6, 9, 25):
        ours = pndm_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n)
        assert _err(ours, _naive_pndm(stand_in, x_T, ac, n)) <= 1e-10


def test_pndm_rejects_sample_prediction_and_few_steps():
    ac = _scheduler("PNDMScheduler").alphas_cumprod
    x = _noise((1, 1, 2, 2), torch.float32)
    with pytest.raises(ValueError, match="prediction_type"):
        pndm_sample(stand_in, x, alphas_cumprod=ac, num_steps=10, prediction_type="sample")
    with pytest.raises(ValueError, match=r"\[4, 1000\]"):
        pndm_sample(stand_in, x, alphas_cumprod=ac, num_steps=3)


# ---------------------------------------------------------------------------------------- DDPM
@settings(max_examples=14, deadline=None)
@given(n=st.integers(1, 60), prediction_type=st.sampled_from(["epsilon", "v_prediction", "sample"]), dtype=dtypes,
       shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_ddpm_matches_diffusers_with_the_same_seed(n, prediction_type, dtype, shape, seed):
    x_T = _noise(shape, dtype)
    sched = _scheduler("DDPMScheduler", prediction_type=prediction_type)
    assert sched.config.clip_sample and sched.config.variance_type == "fixed_small"
    ref, seen = _diffusers_run(sched, x_T, n, seed=seed)
    got_t: list[float] = []
    ours = ddpm_sample(stand_in, x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=n,
                       prediction_type=prediction_type, generator=torch.Generator().manual_seed(seed),
                       callback=lambda i, t, x: got_t.append(float(t[0])))
    assert ours.dtype == dtype and got_t == seen
    assert _err(ours, ref) <= TOL[dtype]


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_is_diffusers_in_float64(prediction_type):
    x_T = _noise((2, 2, 3, 3), torch.float64, seed=5)
    ac = _scheduler("DDPMScheduler").alphas_cumprod.double()
    for n in (1, 2, 9, 50):
        ref, _ = _diffusers_run(_scheduler("DDPMScheduler", prediction_type=prediction_type), x_T, n, seed=11,
                                float64_alphas=True)
        ours = ddpm_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, prediction_type=prediction_type,
                           generator=torch.Generator().manual_seed(11))
        assert _err(ours, ref) <= 1e-10


def test_pndm_and_ddpm_at_the_training_step_count():
    """1000 steps on a 1000-step schedule (r = 1: PNDM's half step rounds to 0) match diffusers."""
    x_T = _noise((1, 2, 2, 2), torch.float64, seed=8)
    ac = _scheduler("DDPMScheduler").alphas_cumprod.double()
    for n in (999, 1000):
        ref, _ = _diffusers_run(_scheduler("PNDMScheduler"), x_T, n, float64_alphas=True)
        assert _err(pndm_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n), ref) <= 1e-10
        ref, _ = _diffusers_run(_scheduler("DDPMScheduler"), x_T, n, seed=3, float64_alphas=True)
        ours = ddpm_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, generator=torch.Generator().manual_seed(3))
        assert _err(ours, ref) <= 1e-10


def _naive_ddpm(model, x_T, alphas_cumprod, n, seed):
    """DDIM's η = 1 step (Song et al. 2021, eq. 12) with ε re-read from the clipped x̂0 — the
    DDPM posterior written another way — on the leading grid t_i = i·(T//n), float64."""
    ac = alphas_cumprod.double()
    r = len(ac) // n
    g = torch.Generator().manual_seed(seed)
    x = x_T.double()
    for t in range(n)[::-1]:
        t *= r
        a = float(ac[t])
        a_prev = float(ac[t - r]) if t - r >= 0 else 1.0
        eps = model(x, torch.full((x.shape[0],), t, dtype=torch.long))
        x0 = ((x - (1 - a) ** 0.5 * eps) / a**0.5).clamp(-1, 1)
        eps = (x - a**0.5 * x0) / (1 - a) ** 0.5
        var = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
        x = a_prev**0.5 * x0 + (1 - a_prev - var) ** 0.5 * eps
        if t > 0:
            x = x + var**0.5 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    return x


def test_ddpm_matches_float64_reference():
    ac = _scheduler("DDPMScheduler").alphas_cumprod.double()
    x_T = _noise((1, 3, 4, 4), torch.float64, seed=6)
    for n in (1, 3, 20):
        ours = ddpm_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, generator=torch.Generator().manual_seed(7))
        assert _err(ours, _naive_ddpm(stand_in, x_T, ac, n, 7)) <= 1e-10


def test_ddpm_seeds_reproduce_and_differ():
    ac = _scheduler("DDPMScheduler").alphas_cumprod
    x_T = _noise((2, 2, 4, 4), torch.float32)

    def run(seed):
        return ddpm_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=8, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert _err(run(1), run(2)) > 1e-2
