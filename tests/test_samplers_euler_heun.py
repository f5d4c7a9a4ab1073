"""Euler, Euler ancestral, Heun, DPM2 and DPM2 ancestral (sdadapt.samplers) against diffusers'
schedulers step for step, against float64 transcriptions of k-diffusion's samplers, and on the
invariants any sampler must keep.

Tolerances, as a fraction of the result's scale max|x|. diffusers holds σ and timesteps in
float32 and Euler / Euler ancestral also cast the sample to float32 every step; we hold the σ grid
in float64. Measured over 1..60 steps, ε and v, with Karras σ and without: ≤ 2.0e-5 in float32
(Euler at 2 steps: x_1 ≈ x̂0 is the difference of two numbers of size σ_max·|x_T| ≈ 40) and
≤ 4.4e-6 with float64 latents (Euler, float32 inside diffusers); Heun / DPM2 with float64 latents
≤ 2.1e-6. So: 1e-4 where diffusers computes in float32 (float32 latents; Euler and Euler a
always), 1e-5 where it computes in float64 (Heun, DPM2 on float64 latents). An off-by-one σ or
timestep (≥ 0.3% in σ at 60 steps, 2.5% in the stand-in model's t term) or a wrong coefficient
moves the result by orders of magnitude more. The float64 transcriptions of k-diffusion here
share no code with the package and agree to 1e-9.
"""

from __future__ import annotations

import copy
import functools
import inspect

import diffusers
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.samplers import KARRAS_SAMPLERS, canonical_sampler, sample_latents
from sdadapt.samplers.dpm2 import dpm2_ancestral_sample, dpm2_sample
from sdadapt.samplers.euler import euler_ancestral_sample, euler_sample
from sdadapt.samplers.heun import heun_sample
from sdadapt.samplers.sigma_space import ancestral_step, discrete_sigmas
from sdadapt.training import diffusion as D

SD = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SAMPLERS = {
    "euler": (diffusers.EulerDiscreteScheduler, euler_sample),
    "euler_a": (diffusers.EulerAncestralDiscreteScheduler, euler_ancestral_sample),
    "heun": (diffusers.HeunDiscreteScheduler, heun_sample),
    "dpm_2": (diffusers.KDPM2DiscreteScheduler, dpm2_sample),
    "dpm_2_a": (diffusers.KDPM2AncestralDiscreteScheduler, dpm2_ancestral_sample),
}
# diffusers casts euler's and euler_a's sample to float32 each step; KDPM2Ancestral builds its σ, σ_up, σ_down and
# interpolated σ in float32 (set_timesteps), where σ_up's cancellation at 1000 steps moves the float64 result by
# ~1.5e-5 relative, by an amount that follows the CPU's float32 log/exp/pow (8.9e-6 on one machine, 1.46e-5 on another)
FLOAT32_INSIDE = ("euler", "euler_a", "dpm_2_a")


def _ac() -> torch.Tensor:
    return diffusers.EulerDiscreteScheduler(**SD).alphas_cumprod  # SD's scaled-linear ᾱ (float32, as diffusers)


def _stand_in(log: list | None = None):
    """A fixed nonlinear model of x and t (t matters: 2.5% of its second term per step of t)."""
    def model(x, t):
        if log is not None:
            log.append(float(t.reshape(-1)[0]))
        tt = t.to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return 0.3 * torch.tanh(x) + 0.2 * torch.sin(tt / 40) * x.flip(-1)
    return model


@functools.lru_cache(maxsize=None)
def _built_scheduler(name, items):
    return SAMPLERS[name][0](**SD, **dict(items))


# KDPM2's constructor computes β/ᾱ from SD's β parameters and then runs set_timesteps(1000) (~0.5 CPU s);
# set_timesteps(n) rewrites every piece of step state (σ, interpolated σ, timesteps, sample, step index)
# from the config and ᾱ alone. So one instance per class is built with SD's βs, and these keys (read only
# by set_timesteps, step and init_noise_sigma) are set on a copy's config: the same state a constructor
# call with them leaves after set_timesteps(n) (checked attribute by attribute for every combination).
_SET_TIMESTEPS_KEYS = {"prediction_type", "timestep_spacing", "steps_offset", "use_karras_sigmas"}


def _scheduler(name, **config):
    """A fresh copy of the real scheduler for this config."""
    if name in ("dpm_2", "dpm_2_a") and set(config) <= _SET_TIMESTEPS_KEYS:
        sched = copy.deepcopy(_built_scheduler(name, ()))
        sched.register_to_config(**config)
        return sched
    return copy.deepcopy(_built_scheduler(name, tuple(sorted(config.items()))))


def _diffusers_run(name, n, x_T, *, pred, karras=False, seed=0, spacing="linspace", **config):
    """The pipeline's loop over the real scheduler; returns (latents, timesteps the model got)."""
    extra = {"use_karras_sigmas": True} if karras else {}
    sched = _scheduler(name, prediction_type=pred, timestep_spacing=spacing,
                       steps_offset=1 if spacing == "leading" else 0, **extra, **config)
    sched.set_timesteps(n)
    log: list[float] = []
    model, g = _stand_in(log), torch.Generator().manual_seed(seed)
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t.expand(x.shape[0]))
        x = sched.step(out, t, x, **({"generator": g} if takes_generator else {})).prev_sample
    return x, log


def _ours(name, n, x_T, *, pred, karras=False, seed=0, spacing="linspace", **options):
    log: list[float] = []
    extra = {"karras": True} if karras else {}
    x = SAMPLERS[name][1](_stand_in(log), x_T, alphas_cumprod=_ac(), num_steps=n, prediction_type=pred,
                          generator=torch.Generator().manual_seed(seed), spacing=spacing,
                          steps_offset=1 if spacing == "leading" else 0, **extra, **options)
    return x, log


def _assert_matches(name, n, x_T, **kw):
    ref, ref_t = _diffusers_run(name, n, x_T, **kw)
    ours, our_t = _ours(name, n, x_T, **kw)
    assert ours.dtype == x_T.dtype and ours.shape == x_T.shape
    assert len(our_t) == len(ref_t), (name, n, "model calls")
    np.testing.assert_allclose(our_t, ref_t, rtol=0, atol=2e-4, err_msg=f"{name} n={n}: timesteps the model got")
    rel = 1e-4 if x_T.dtype == torch.float32 or name in FLOAT32_INSIDE else 1e-5
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=0, atol=rel * float(ref.abs().max()),
                               msg=lambda m: f"{name} n={n} {kw}: {m}")


@pytest.mark.parametrize("name", list(SAMPLERS))
@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 60), pred=st.sampled_from(["epsilon", "v_prediction"]),
       dtype=st.sampled_from([torch.float32, torch.float64]), karras=st.booleans(),
       spacing=st.sampled_from(["linspace", "linspace", "leading", "trailing"]),
       shape=st.sampled_from([(1, 4, 3, 3), (2, 3, 4, 2), (3, 1, 2, 5)]), seed=st.integers(0, 2**16))
def test_matches_diffusers(name, n, pred, dtype, karras, spacing, shape, seed):
    if name == "dpm_2_a":
        # diffusers forms σ_down = √(σ_next² − σ_up²) in float32: at 2-3 steps (σ_0/σ_1 ≈ 500) that
        # cancellation is off by 0.7% (we hold it in float64; see test_dpm2_ancestral_sigma_down_is_exact)
        n = max(n, 4)
    karras = karras and name in KARRAS_SAMPLERS
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    _assert_matches(name, n, x_T, pred=pred, karras=karras, seed=seed + 1, spacing=spacing)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("n", [1, 2, 25])
def test_matches_diffusers_at_fixed_steps(name, n):
    """A fixed grid (also what kohya's 20-30-step samples use) alongside the random one above."""
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    for pred in ("epsilon", "v_prediction"):
        if name == "dpm_2_a" and n == 2:
            continue  # see test_dpm2_ancestral_sigma_down_is_exact
        _assert_matches(name, n, x_T, pred=pred, karras=False, seed=3)
        if name in KARRAS_SAMPLERS:
            _assert_matches(name, n, x_T, pred=pred, karras=True, seed=3)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_matches_diffusers_at_the_training_step_count(name):
    """1000 steps on a 1000-step schedule: every training σ, Karras σ packed as tightly."""
    x_T = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    _assert_matches(name, 1000, x_T, pred="v_prediction", karras=False, seed=4)
    if name in KARRAS_SAMPLERS:
        _assert_matches(name, 1000, x_T, pred="epsilon", karras=True, seed=4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_half_latents_on_the_cpu(name, dtype):
    """float16/bfloat16 latents run on the CPU (diffusers' schedulers do too), come back in their
    dtype and near the float32 result (the update is carried in float32; the model sees half)."""
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    kw = {"alphas_cumprod": _ac(), "num_steps": 9}
    ref = SAMPLERS[name][1](_stand_in(), x_T, generator=torch.Generator().manual_seed(1), **kw)
    out = SAMPLERS[name][1](_stand_in(), x_T.to(dtype), generator=torch.Generator().manual_seed(1), **kw)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert float((out.float() - ref).abs().max()) <= 0.05 * float(ref.abs().max())


def _zero_snr_run(name, n, x_T, ac):
    """diffusers' loop with ``rescale_betas_zero_snr=True`` (it reads the last ᾱ as 2⁻²⁴), v prediction."""
    sched = SAMPLERS[name][0](**SD, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    sched.set_timesteps(n)
    x, g = x_T * sched.init_noise_sigma, torch.Generator().manual_seed(1)
    for t in sched.timesteps:
        x = sched.step(_stand_in()(sched.scale_model_input(x, t), t.expand(x.shape[0])), t, x, generator=g).prev_sample
    ours = SAMPLERS[name][1](_stand_in(), x_T, alphas_cumprod=ac, num_steps=n, prediction_type="v_prediction",
                             generator=torch.Generator().manual_seed(1))
    return ours, x


def test_zero_terminal_snr_schedule():
    """ᾱ_T = 0 (a model whose scheduler has ``rescale_betas_zero_snr``): σ_max would be ∞ and every σ
    sampler NaN; like diffusers' Euler classes, the last ᾱ is read as 2⁻²⁴ (σ_max ≈ 4096)."""
    ac = diffusers.EulerDiscreteScheduler(**SD, rescale_betas_zero_snr=True).alphas_cumprod.clone()
    ac[-1] = 0.0  # the system's own ᾱ (diffusers stores 2⁻²⁴ in its copy)
    x_T = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in ("euler", "euler_a"):
        for n in (1, 5, 30):
            ours, ref = _zero_snr_run(name, n, x_T, ac)
            torch.testing.assert_close(ours, ref, rtol=0, atol=1e-4 * float(ref.abs().max()))
    for name in ("lms", "heun", "dpm_2", "dpm_2_a", "dpmsolver", "dpmsingle"):
        out = sample_latents(lambda x, t, c: _stand_in()(x, t), x_T, None, sampler=name, alphas_cumprod=ac,
                             num_steps=12, prediction_type="v_prediction", generator=torch.Generator().manual_seed(1))
        assert torch.isfinite(out).all(), name


def test_linspace_grid_is_numpys():
    """The linspace grid is numpy's bit for bit (torch.linspace differs in the last bit): DDIM's
    rounded timesteps (138 of 1..1000 step counts rounded a half-way value the other way) and the
    σ schedulers' float32 ones."""
    for n in range(1, 1001):
        want = np.linspace(0, 999, n)[::-1]
        assert np.array_equal(D.ddim_timesteps(n, spacing="linspace", steps_offset=0).numpy(), want.round()), n
        got = D.timestep_grid(n, 1000, "linspace", 0, round_linspace=False).float().numpy()
        assert np.array_equal(got, want.astype(np.float32)), n
    ddim = diffusers.DDIMScheduler(**SD, timestep_spacing="linspace")
    for n in (27, 31, 47):
        ddim.set_timesteps(n)
        assert torch.equal(D.ddim_timesteps(n, spacing="linspace", steps_offset=0), ddim.timesteps), n


def test_heun_clip_sample_matches_kohya_config():
    """kohya turns clip_sample on for Heun's sample images: x̂0 clamped to ±1."""
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref, _ = _diffusers_run("heun", 12, x_T, pred="epsilon", clip_sample=True, clip_sample_range=1.0)
    ours, _ = _ours("heun", 12, x_T, pred="epsilon", clip_sample=1.0)
    unclipped, _ = _ours("heun", 12, x_T, pred="epsilon")
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5 * float(ref.abs().max()))
    assert (ours - unclipped).abs().max() > 1e-2  # the clamp really acted


def test_dpm2_ancestral_sigma_down_is_exact():
    """σ_down of σ_i → σ_{i+1} is σ_{i+1}²/σ_i exactly; diffusers' float32 √(σ_next² − σ_up²) is not."""
    _, sig = discrete_sigmas(_ac(), 2)
    s, s_next = float(sig[0]), float(sig[1])
    down, up = ancestral_step(s, s_next)
    assert down == pytest.approx(s_next**2 / s, rel=1e-12)
    assert down**2 + up**2 == pytest.approx(s_next**2, rel=1e-12)
    ref = _scheduler("dpm_2_a")  # diffusers.KDPM2AncestralDiscreteScheduler(**SD)
    ref.set_timesteps(2)
    assert abs(float(ref.sigmas_down[0]) / down - 1) > 1e-3  # diffusers' float32 cancellation


@pytest.mark.parametrize("name", ["euler_a", "dpm_2_a"])
def test_ancestral_noise_follows_the_generator(name):
    x_T = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    a, _ = _ours(name, 10, x_T, pred="epsilon", seed=7)
    b, _ = _ours(name, 10, x_T, pred="epsilon", seed=7)
    c, _ = _ours(name, 10, x_T, pred="epsilon", seed=8)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


# ------------------------------------------------- float64 transcriptions of k-diffusion's samplers
def _naive_ac():
    """SD's ᾱ from its betas, in float64 (not diffusers' float32 cumprod)."""
    return np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)


def _naive_grid(n, karras=False):
    """σ grid and timesteps from scratch: σ = √((1−ᾱ)/ᾱ), t on diffusers' float32 linspace."""
    train = np.sqrt((1 - _naive_ac()) / _naive_ac())
    ts = np.linspace(0, 999, n).astype(np.float32).astype(np.float64)[::-1]
    sig = np.interp(ts, np.arange(1000), train)
    if karras:  # k-diffusion get_sigmas_karras, ρ = 7
        ramp = np.linspace(0, 1, n)
        sig = (sig[0] ** (1 / 7) + ramp * (sig[-1] ** (1 / 7) - sig[0] ** (1 / 7))) ** 7
        ts = np.interp(np.log(sig), np.log(train), np.arange(1000))  # t linear in log σ (CompVisDenoiser)
    return list(sig) + [0.0], list(ts), train


def _naive_denoiser(model, train):
    """k-diffusion's CompVisDenoiser for an ε model: x̂0 = x − σ·ε(x/√(σ²+1), t(σ))."""
    def den(x, sigma, t=None):
        t = np.interp(np.log(sigma), np.log(train), np.arange(1000)) if t is None else t
        tt = torch.full((x.shape[0],), float(np.float32(t)), dtype=torch.float32)
        return x - sigma * model(x / np.sqrt(sigma**2 + 1), tt)
    return den


@pytest.mark.parametrize("karras", [False, True])
def test_heun_and_dpm2_match_k_diffusion_transcriptions(karras):
    n = 9
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    sig, ts, train = _naive_grid(n, karras)
    den = _naive_denoiser(_stand_in(), train)
    # sample_heun (s_churn = 0): Euler predictor, trapezoid corrector, Euler onto σ = 0
    x = x_T * sig[0]
    for i in range(n):
        d = (x - den(x, sig[i], ts[i])) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - den(x2, sig[i + 1], ts[i + 1])) / sig[i + 1]
            x = x + (d + d2) / 2 * dt
    heun = heun_sample(_stand_in(), x_T, alphas_cumprod=torch.from_numpy(_naive_ac()), num_steps=n, karras=karras)
    torch.testing.assert_close(heun, x, rtol=1e-9, atol=1e-9)
    # sample_dpm_2: Euler half step to the log-midpoint, full step with its derivative
    main_t = [round(t) for t in ts] if karras else ts  # diffusers' KDPM2 rounds Karras timesteps
    x = x_T * sig[0]
    for i in range(n):
        d = (x - den(x, sig[i], main_t[i])) / sig[i]
        if sig[i + 1] == 0:
            x = x + d * (sig[i + 1] - sig[i])
        else:
            mid = np.exp((np.log(sig[i]) + np.log(sig[i + 1])) / 2)
            x2 = x + d * (mid - sig[i])
            x = x + (x2 - den(x2, mid)) / mid * (sig[i + 1] - sig[i])
    dpm2 = dpm2_sample(_stand_in(), x_T, alphas_cumprod=torch.from_numpy(_naive_ac()), num_steps=n, karras=karras)
    torch.testing.assert_close(dpm2, x, rtol=1e-9, atol=1e-9)


def test_euler_ancestral_matches_k_diffusion_transcription():
    n = 11
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    sig, ts, train = _naive_grid(n)
    den = _naive_denoiser(_stand_in(), train)
    g = torch.Generator().manual_seed(5)
    x = x_T * sig[0]
    for i in range(n):  # sample_euler_ancestral, eta = 1
        up = min(sig[i + 1], np.sqrt(sig[i + 1] ** 2 * (sig[i] ** 2 - sig[i + 1] ** 2) / sig[i] ** 2))
        down = np.sqrt(sig[i + 1] ** 2 - up**2)
        x = x + (x - den(x, sig[i], ts[i])) / sig[i] * (down - sig[i])
        x = x + torch.randn(x.shape, generator=g, dtype=x.dtype) * up
    ours = euler_ancestral_sample(_stand_in(), x_T, alphas_cumprod=torch.from_numpy(_naive_ac()), num_steps=n,
                                  generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(ours, x, rtol=1e-9, atol=1e-9)


# ------------------------------------------------------------------------------------ invariants
@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_exact_denoiser_of_a_point_mass_lands_on_it(name, pred):
    """With the exact model of data concentrated at x*, x̂0 = x* at every σ: every sampler ends on x*."""
    ac = _ac().double()
    target = torch.full((1, 2, 3, 3), 0.7, dtype=torch.float64)

    def exact(x_in, t):
        a = torch.as_tensor(np.interp(t.double().numpy(), np.arange(1000), ac.numpy())).reshape(-1, 1, 1, 1)
        eps = (x_in - a.sqrt() * target) / (1 - a).sqrt()
        return eps if pred == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * target

    noise = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    kw = {"karras": True} if name in KARRAS_SAMPLERS else {}
    out = SAMPLERS[name][1](exact, noise, alphas_cumprod=ac, num_steps=7, prediction_type=pred,
                            generator=torch.Generator().manual_seed(1), **kw)
    torch.testing.assert_close(out, target, atol=1e-6, rtol=0)


def test_registry_aliases_and_guidance():
    assert [canonical_sampler(a) for a in ("k_euler", "K_EULER_A", "k_dpm_2", "k_dpm_2_a", "heun")] == \
        ["euler", "euler_a", "dpm_2", "dpm_2_a", "heun"]
    assert "euler_a" not in KARRAS_SAMPLERS  # diffusers' EulerAncestralDiscreteScheduler has no Karras σ
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="Karras"):
        sample_latents(lambda x, t, c: x, x_T, None, sampler="euler_a", alphas_cumprod=_ac(), num_steps=3, karras=True)
    with pytest.raises(ValueError, match="heun: prediction_type"):
        heun_sample(_stand_in(), x_T, alphas_cumprod=_ac(), num_steps=3, prediction_type="flow")

    def model(x, t, c):  # c: (B,) per-sample condition
        return _stand_in()(x, t) + c.reshape(-1, 1, 1, 1) * 0.1

    cond, uncond = torch.tensor([0.5, -0.2]), torch.zeros(2)
    for name in SAMPLERS:
        alias = name if name == "heun" else "k_" + name
        got = sample_latents(model, x_T, cond, uncond=uncond, guidance_scale=4.0, sampler=alias, alphas_cumprod=_ac(),
                             num_steps=5, generator=torch.Generator().manual_seed(2))

        def cfg(x, t):
            return model(x, t, uncond) + 4.0 * (model(x, t, cond) - model(x, t, uncond))

        want = SAMPLERS[name][1](cfg, x_T, alphas_cumprod=_ac(), num_steps=5,
                                 generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_callback_sees_each_step_and_the_wrapper_is_the_same_euler():
    x_T = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    seen = []
    for name in SAMPLERS:
        seen.clear()
        SAMPLERS[name][1](_stand_in(), x_T, alphas_cumprod=_ac(), num_steps=6,
                          callback=lambda i, t, x: seen.append((i, float(t[0]), x.shape)))
        assert [i for i, _, _ in seen] == list(range(6)) and seen[0][1] == 999.0
    ours = euler_sample(_stand_in(), x_T, alphas_cumprod=_ac(), num_steps=8, spacing="leading", steps_offset=1)
    old = D.euler_sample(lambda x, t, c: _stand_in()(x, t), x_T, None, alphas_cumprod=_ac(), num_steps=8,
                         spacing="leading", steps_offset=1)
    assert torch.equal(ours, old)
