"""DPM-Solver samplers (``dpmsolver++``, ``dpmsolver``, ``dpmsingle``) and UniPC (``unipc``), with
their Karras σ, against the
real diffusers schedulers step for step, and against float64 transcriptions of the papers' /
k-diffusion's formulas written here.

Tolerances: against diffusers, max |ours − diffusers| ≤ 1e-4 · max |diffusers|, in float32 and
float64 alike, because diffusers keeps its σ grid in float32 and runs the multistep update in
float32 even for float64 samples; the worst case measured is DPM-Solver (ε form) with v-prediction
in one step (≈3e-5: one step from σ_max ≈ 14.6 to σ_min cancels ~300×), everything else agrees to
≈1e-6 (UniPC too). The stand-in model depends strongly on t (``sin(t/7)``), so a timestep off by one, or a σ
of the neighbouring training step, moves the result by far more than 1e-4 (checked below). Against
the float64 references the tolerance is 1e-10: same maths, different arrangement.
"""

from __future__ import annotations

import math
import re
import warnings

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
from sdadapt.samplers.dpm_solver import (
    dpm_grid,
    dpmsingle_sample,
    dpmsolver_pp_sample,
    dpmsolver_sample,
    singlestep_orders,
)
from sdadapt.samplers.unipc import unipc_sample

diffusers = pytest.importorskip("diffusers")

#: name -> (our function, diffusers class name, the config kohya's get_my_scheduler adds)
CASES = {
    "dpmsolver++": (dpmsolver_pp_sample, "DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    # diffusers refuses final_sigmas_type="zero" (its default) for algorithm_type="dpmsolver"
    "dpmsolver": (dpmsolver_sample, "DPMSolverMultistepScheduler",
                  {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsingle": (dpmsingle_sample, "DPMSolverSinglestepScheduler", {}),
    "unipc": (unipc_sample, "UniPCMultistepScheduler", {}),
}


def _scheduler(name: str, *, karras: bool, prediction_type: str):
    _, cls_name, extra = CASES[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # algorithm_type="dpmsolver" is deprecated in diffusers
        return getattr(diffusers, cls_name)(**SD_BETAS, **extra, use_karras_sigmas=karras,
                                            prediction_type=prediction_type)


def _diffusers_run(name: str, x_T: torch.Tensor, n: int, *, karras: bool, prediction_type: str, model=stand_in):
    sched = _scheduler(name, karras=karras, prediction_type=prediction_type)
    sched.set_timesteps(n)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t.expand(x.shape[0]))
        x = sched.step(out, t, x).prev_sample
    return x, sched


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


# ---------------------------------------------------------------- grids


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_grid_is_diffusers(name, karras):
    for n in [*range(1, 61), 99, 250, 500, 999, 1000]:
        sched = _scheduler(name, karras=karras, prediction_type="epsilon")
        sched.set_timesteps(n)
        final = "sigma_min" if name == "dpmsolver" else "zero"
        ts, sig = dpm_grid(sched.alphas_cumprod, n, karras=karras, final_sigma=final)
        assert torch.equal(ts, sched.timesteps), (n, ts, sched.timesteps)
        assert sig.dtype == torch.float64 and sig.shape == (n + 1,)
        torch.testing.assert_close(sig, sched.sigmas.double(), rtol=2e-7, atol=0)


def test_singlestep_orders_are_diffusers():
    for n in range(1, 61):
        sched = _scheduler("dpmsingle", karras=False, prediction_type="epsilon")
        sched.set_timesteps(n)  # forces lower_order_final=True under final_sigmas_type="zero"
        assert singlestep_orders(n) == sched.order_list, n


def test_grid_rejects_bad_arguments():
    ac = _scheduler("dpmsolver++", karras=False, prediction_type="epsilon").alphas_cumprod
    with pytest.raises(ValueError, match="num_steps"):
        dpm_grid(ac, 0)
    with pytest.raises(ValueError, match="num_steps"):
        dpm_grid(ac, 1001)
    with pytest.raises(ValueError, match="final_sigma"):
        dpm_grid(ac, 10, final_sigma="last")


# ---------------------------------------------------------------- against diffusers


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(sorted(CASES)), karras=st.booleans(),
       prediction_type=st.sampled_from(["epsilon", "v_prediction"]), n=st.integers(1, 60),
       batch=st.integers(1, 2), hw=st.sampled_from([(4, 4), (3, 5)]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_matches_diffusers(name, karras, prediction_type, n, batch, hw, dtype, seed):
    x_T = torch.randn(batch, 4, *hw, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    ref, sched = _diffusers_run(name, x_T, n, karras=karras, prediction_type=prediction_type)
    fn = CASES[name][0]
    seen = []
    out = fn(stand_in, x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=n, prediction_type=prediction_type,
             karras=karras, callback=lambda i, t, x: seen.append((i, t.clone())))
    assert out.dtype == dtype and out.shape == x_T.shape
    assert _rel_err(out, ref) <= 1e-4
    assert [i for i, _ in seen] == list(range(n))
    assert all(t.dtype == torch.long and t.shape == (batch,) for _, t in seen)
    assert torch.equal(torch.stack([t[0] for _, t in seen]), sched.timesteps)


@pytest.mark.parametrize("name", sorted(CASES))
def test_steps_near_the_training_count(name):
    """999 and 1000 steps (Karras) match diffusers; 1000 linspace steps repeat timestep 500, where
    diffusers' multistep update divides by a zero λ-step (NaN): ours refuses with the fix named."""
    x_T = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for n, karras in ((999, False), (1000, True)):
        ref, sched = _diffusers_run(name, x_T, n, karras=karras, prediction_type="epsilon")
        out = CASES[name][0](stand_in, x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=n, karras=karras)
        assert _rel_err(out, ref) <= 1e-4, (n, karras)
    ac = _sd_alphas_cumprod()
    if name == "dpmsingle":  # its repeated step is a first-order one: finite, as in diffusers
        ref, _ = _diffusers_run(name, x_T, 1000, karras=False, prediction_type="epsilon")
        assert _rel_err(CASES[name][0](stand_in, x_T, alphas_cumprod=ac, num_steps=1000), ref) <= 1e-4
        # on a 101-step schedule the repeated timestep falls on an order-2 step: refused too
        with pytest.raises(ValueError, match="dpmsingle: 101 steps repeat a timestep.*at most 100"):
            dpmsingle_sample(stand_in, x_T, alphas_cumprod=ac[:101], num_steps=101)
    else:
        with pytest.raises(ValueError, match=f"{re.escape(name)}: 1000 steps repeat a timestep.*at most 999"):
            CASES[name][0](stand_in, x_T, alphas_cumprod=ac, num_steps=1000)


@pytest.mark.parametrize("name", ["dpmsolver++", "unipc"])
def test_zero_terminal_snr_schedule(name):
    """ᾱ_T = 0 (``rescale_betas_zero_snr``): the last ᾱ is read as 2⁻²⁴, as diffusers' classes do."""
    x_T = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for n, karras in ((1, False), (6, False), (25, False), (6, True)):
        _, cls_name, extra = CASES[name]
        sched = getattr(diffusers, cls_name)(**SD_BETAS, **extra, use_karras_sigmas=karras,
                                            prediction_type="v_prediction", rescale_betas_zero_snr=True)
        sched.set_timesteps(n)
        x = x_T.clone()
        for t in sched.timesteps:
            x = sched.step(stand_in(x, t.expand(x.shape[0])), t, x).prev_sample
        ac = sched.alphas_cumprod.clone()
        ac[-1] = 0.0  # the system's own ᾱ (diffusers stores 2⁻²⁴ in its copy)
        out = CASES[name][0](stand_in, x_T, alphas_cumprod=ac, num_steps=n, karras=karras,
                             prediction_type="v_prediction")
        assert _rel_err(out, x) <= 1e-4, (n, karras)


@pytest.mark.parametrize("name", sorted(CASES))
def test_tolerance_catches_an_off_by_one_timestep(name):
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    for karras in (False, True):
        ref, sched = _diffusers_run(name, x_T, 20, karras=karras, prediction_type="epsilon")
        shifted = CASES[name][0](lambda x, t: stand_in(x, t - 1), x_T, alphas_cumprod=sched.alphas_cumprod,
                                 num_steps=20, karras=karras)
        assert _rel_err(shifted, ref) > 1e-3


# ---------------------------------------------------------------- float64 references


def _sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _ref_grid(ac: torch.Tensor, n: int, final: str) -> tuple[list[int], list[float]]:
    """numpy-style linspace timesteps (i·(999/n), rounded half to even), σ of those steps."""
    ts = [round(i * (999 / n)) if i < n else 999 for i in range(n + 1)][::-1][:-1]
    sig = [math.sqrt((1 - float(ac[t])) / float(ac[t])) for t in ts]
    sig.append(0.0 if final == "zero" else math.sqrt((1 - float(ac[0])) / float(ac[0])))
    return ts, sig


def _eps_model(x_vp, t, sigma):
    return stand_in(x_vp, torch.full((x_vp.shape[0],), t, dtype=torch.long))


def reference_dpmpp_2m(x_T: torch.Tensor, ac: torch.Tensor, n: int) -> torch.Tensor:
    """k-diffusion's ``sample_dpmpp_2m`` on x = x_vp/α (σ-space), started where diffusers starts
    (x_vp = x_T, i.e. x = x_T·√(σ_max²+1)), denoiser D = x − σ·ε(x/√(σ²+1), t)."""
    ts, sig = _ref_grid(ac, n, "zero")
    x = x_T * math.sqrt(sig[0] ** 2 + 1)
    old = None
    for i in range(n):
        eps = _eps_model(x / math.sqrt(sig[i] ** 2 + 1), ts[i], sig[i])
        den = x - sig[i] * eps
        t_fn = lambda s: -math.log(s)
        if sig[i + 1] == 0:
            x = den
        else:
            h = t_fn(sig[i + 1]) - t_fn(sig[i])
            if old is None:
                x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * den
            else:
                r = (t_fn(sig[i]) - t_fn(sig[i - 1])) / h
                den_d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old
                x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * den_d
        old = den
    return x


def reference_dpm_solver_2m(x_T: torch.Tensor, ac: torch.Tensor, n: int) -> torch.Tensor:
    """DPM-Solver (Lu et al. 2022) multistep order 2 on ε, written as DDIM with the extrapolated
    noise ``ε + (ε − ε_prev)/(2r)``: ``x' = α'·(x − σ_t·ε̃)/α + σ'_t·ε̃`` (VP sample); the last step
    is order 1 under 15 steps (diffusers' ``lower_order_final``), and lands on σ(t=0)."""
    ts, sig = _ref_grid(ac, n, "sigma_min")
    abar = [1 / (s * s + 1) for s in sig]
    lam = [-math.log(s) for s in sig]
    x = x_T.clone()
    old = None
    for i in range(n):
        eps = _eps_model(x, ts[i], sig[i])
        e = eps
        if old is not None and not (i == n - 1 and n < 15):
            r = (lam[i] - lam[i - 1]) / (lam[i + 1] - lam[i])
            e = eps + (eps - old) / (2 * r)
        a, a_n = math.sqrt(abar[i]), math.sqrt(abar[i + 1])
        x = a_n * (x - math.sqrt(1 - abar[i]) * e) / a + math.sqrt(1 - abar[i + 1]) * e
        old = eps
    return x


def reference_dpmpp_2s(x_T: torch.Tensor, ac: torch.Tensor, n: int) -> torch.Tensor:
    """Singlestep DPM-Solver++(2) on x = x_vp/α: pairs (σ_i → σ_{i+1} by DDIM, then σ_i → σ_{i+2}
    with ``D = D_i + (D_{i+1} − D_i)/(2r)``, ``r = (λ_{i+1} − λ_i)/(λ_{i+2} − λ_i)``), a last
    lone step by DDIM (diffusers' order list)."""
    ts, sig = _ref_grid(ac, n, "zero")
    orders = [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    orders[-1] = 1
    lam = lambda s: -math.log(s) if s > 0 else math.inf

    def ddim(x, den, s, s_next):  # σ-space DDIM: x' = den + (s'/s)(x − den)
        return den + (s_next / s) * (x - den)

    x = x_T * math.sqrt(sig[0] ** 2 + 1)
    start = x
    d_start = None
    for i in range(n):
        den = x - sig[i] * _eps_model(x / math.sqrt(sig[i] ** 2 + 1), ts[i], sig[i])
        if orders[i] == 1:
            start, d_start = x, den
            x = ddim(x, den, sig[i], sig[i + 1])
        else:
            r = (lam(sig[i]) - lam(sig[i - 1])) / (lam(sig[i + 1]) - lam(sig[i - 1]))
            x = ddim(start, d_start + (den - d_start) / (2 * r), sig[i - 1], sig[i + 1])
    return x


def _phi(k: int, z: float) -> float:
    """φ_k(z) = ∫₀¹ e^((1−θ)z)·θ^(k−1)/(k−1)! dθ by Simpson's rule on 4001 points (float64)."""
    theta = torch.linspace(0, 1, 4001, dtype=torch.float64)
    f = torch.exp((1 - theta) * z) * theta ** (k - 1) / math.factorial(k - 1)
    w = torch.ones_like(theta)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return float((f * w).sum() / (3 * (theta.shape[0] - 1)))


def reference_unipc(x_T: torch.Tensor, ac: torch.Tensor, n: int) -> torch.Tensor:
    """UniPC (Zhao et al. 2023) with B(h) = e^h − 1 on the data prediction, orders as diffusers
    (predictor order min(2, steps left, steps done + 1), ρ = ½ for UniP-2 and UniC-1), the
    corrector's ρ from ``R ρ = b``, ``R_ij = r_j^(i−1)``, ``b_i = i!·z·φ_(i+1)(z)/B``, ``z = −h``,
    with φ by quadrature and ``torch.linalg.solve``: written from the paper, not from diffusers."""
    ts, sig = _ref_grid(ac, n, "zero")
    alpha = [1 / math.sqrt(s * s + 1) for s in sig]
    sigt = [s * a for s, a in zip(sig, alpha)]
    lam = [-math.log(s) if s > 0 else math.inf for s in sig]
    x, ms, last_x, last_order = x_T.clone(), [], None, 1
    for i in range(n):
        m = (x - sigt[i] * _eps_model(x, ts[i], sig[i])) / alpha[i]
        if i > 0:
            h = lam[i] - lam[i - 1]
            z, B = -h, math.expm1(-h)
            if last_order == 1:
                rho, D = [0.5], [m - ms[-1]]
            else:
                r1 = (lam[i - 2] - lam[i - 1]) / h
                R = torch.tensor([[1.0, 1.0], [r1, 1.0]], dtype=torch.float64)
                b = torch.tensor([math.factorial(k) * z * _phi(k + 1, z) / B for k in (1, 2)], dtype=torch.float64)
                rho = torch.linalg.solve(R, b).tolist()
                D = [(ms[-2] - ms[-1]) / r1, m - ms[-1]]
            x = (sigt[i] / sigt[i - 1]) * last_x - alpha[i] * z * _phi(1, z) * ms[-1] \
                - alpha[i] * B * sum(r * d for r, d in zip(rho, D))
        order = min(2, n - i, i + 1)
        last_x, last_order = x, order
        if sig[i + 1] == 0:
            x_new = m
        else:
            h = lam[i + 1] - lam[i]
            z, B = -h, math.expm1(-h)
            x_new = (sigt[i + 1] / sigt[i]) * x - alpha[i + 1] * z * _phi(1, z) * m
            if order == 2:
                x_new = x_new - alpha[i + 1] * B * 0.5 * (ms[-1] - m) / ((lam[i - 1] - lam[i]) / h)
        ms.append(m)
        x = x_new
    return x


@pytest.mark.parametrize("n", [1, 2, 3, 7, 14, 15, 16, 25])
def test_float64_references(n):
    ac = _sd_alphas_cumprod()
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    for fn, ref in [(dpmsolver_pp_sample, reference_dpmpp_2m), (dpmsolver_sample, reference_dpm_solver_2m),
                    (dpmsingle_sample, reference_dpmpp_2s), (unipc_sample, reference_unipc)]:
        got = fn(stand_in, x_T, alphas_cumprod=ac, num_steps=n)
        want = ref(x_T, ac, n)
        assert _rel_err(got, want) <= 1e-10, (fn.__name__, n, _rel_err(got, want))


@pytest.mark.parametrize("karras", [False, True])
def test_unipc_predictor_alone_is_dpmpp_2m(karras):
    """With bh2 and ρ = ½ the UniP-2 predictor is DPM-Solver++ 2M; the corrector changes the result."""
    ac = _sd_alphas_cumprod()
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    for n in (1, 2, 5, 20):
        p = unipc_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, karras=karras, corrector=False)
        q = dpmsolver_pp_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, karras=karras)
        assert _rel_err(p, q) <= 1e-12
        if n > 2:  # (with 2 steps the corrected sample only feeds the final x̂0, made before it)
            c = unipc_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, karras=karras)
            assert _rel_err(c, q) > 1e-4


# ---------------------------------------------------------------- registry and entry point


def test_registered_names():
    for name in ("dpmsolver", "dpmsolver++", "dpmsingle", "unipc"):
        assert name in SAMPLERS and name in KARRAS_SAMPLERS
        assert canonical_sampler(name.upper()) == name
    assert canonical_sampler("dpm++_2m") == "dpmsolver++"
    assert canonical_sampler("DPMPP_2M") == "dpmsolver++"


def test_sample_latents_guidance_and_karras():
    ac = _sd_alphas_cumprod().float()
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    cond, uncond = torch.full((2, 1), 1.0), torch.full((2, 1), -0.5)

    def model(x, t, c):  # conditioned stand-in; runs once on the 2B batch (uncond, cond)
        return stand_in(x, t) + 0.1 * c.reshape(-1, 1, 1, 1) * x

    got = sample_latents(model, x_T, cond, sampler="dpm++_2m", alphas_cumprod=ac, num_steps=12, uncond=uncond,
                         guidance_scale=5.0, karras=True)
    guided = lambda x, t: model(x, t, uncond) + 5.0 * (model(x, t, cond) - model(x, t, uncond))
    want = dpmsolver_pp_sample(guided, x_T, alphas_cumprod=ac, num_steps=12, karras=True)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    plain = sample_latents(model, x_T, cond, sampler="dpmsolver++", alphas_cumprod=ac, num_steps=12,
                           uncond=uncond, guidance_scale=5.0)
    assert _rel_err(plain, got) > 1e-3  # Karras σ are a different path


def test_deterministic_and_dtype_kept_on_half_inputs():
    ac = _sd_alphas_cumprod().float()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    for fn in (dpmsolver_pp_sample, dpmsolver_sample, dpmsingle_sample, unipc_sample):
        a = fn(stand_in, x_T, alphas_cumprod=ac, num_steps=9)
        b = fn(stand_in, x_T, alphas_cumprod=ac, num_steps=9)
        assert torch.equal(a, b)
        h = fn(stand_in, x_T.to(torch.bfloat16), alphas_cumprod=ac, num_steps=9)
        assert h.dtype == torch.bfloat16 and torch.isfinite(h).all()
        assert _rel_err(h, a) < 0.05
