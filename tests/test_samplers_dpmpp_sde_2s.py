"""DPM++ SDE (``dpmpp_sde``) against diffusers' ``DPMSolverSDEScheduler`` step for step, Brownian tree
included (same seed), and DPM++ 2S ancestral (``dpmpp_2s_a``, no diffusers class) against a float64
transcription of k-diffusion's ``sample_dpmpp_2s_ancestral`` written here, its deterministic (η = 0)
form's convergence order on a linear-Gaussian model with a closed-form ODE solution, and both through
the registry, the A1111 labels, ``sample_latents`` and a tiny SD UNet.

Tolerances, relative to the result's scale (max |ours − reference| / max |reference|):

* ``dpmpp_sde`` vs diffusers: 2e-5 (float32 and float64 samples). diffusers keeps σ in float32 and
  computes every coefficient there, and hands the UNet float64 timesteps where sdadapt hands float32;
  measured ≤ 1.1e-6 over n = 1…60, ε and v, Karras or not (docs/samplers.md). The Brownian tree is
  queried at float32 σ: one σ a float32 step off moves the noise of that interval by up to ~1%, and a
  timestep off by one moves the stand-in model by ~3% (both checked below to exceed the tolerance).
* ``dpmpp_2s_a`` vs the float64 transcription: 1e-10 (same maths, other arrangement).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sampler_stand_ins import (
    SD_BETAS,
    assert_guidance_is_the_guided_model,
    rel_err,
    sd_alphas_cumprod,
    stand_in,
)

from sdadapt.samplers import (
    KARRAS_SAMPLERS,
    SAMPLER_ALIASES,
    SAMPLERS,
    canonical_sampler,
    sample_latents,
)
from sdadapt.samplers.dpmpp_2s_a import dpmpp_2s_ancestral_sample
from sdadapt.samplers.dpmpp_sde import brownian_tree_seed, dpmpp_sde_sample
from sdadapt.samplers.labels import A1111_MISSING, sampler_from_label

diffusers = pytest.importorskip("diffusers")
#: the dpmpp_sde tests need torchsde (the interop extra); dpmpp_2s_a's do not
needs_torchsde = pytest.mark.skipif(importlib.util.find_spec("torchsde") is None, reason="torchsde not installed")


# ---------------------------------------------------------------- dpmpp_sde against diffusers


def _diffusers_sde(x_T, n, *, tree_seed, karras=False, prediction_type="epsilon", model=stand_in, log=None):
    """diffusers' loop over ``DPMSolverSDEScheduler(noise_sampler_seed=tree_seed)``; returns (result, scheduler)."""
    sched = diffusers.DPMSolverSDEScheduler(**SD_BETAS, use_karras_sigmas=karras, prediction_type=prediction_type,
                                            noise_sampler_seed=tree_seed)
    sched.set_timesteps(n)
    x = x_T * sched.init_noise_sigma
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchsde's "Should have tb<=t1" at the clamped interval ends
        for t in sched.timesteps:
            if log is not None:
                log.append(float(t))
            x = sched.step(model(sched.scale_model_input(x, t), t.expand(x.shape[0])), t, x).prev_sample
    return x, sched


@needs_torchsde
# (10 examples: each of the 2-valued options is met in both values with odds 1 − 2·2⁻¹⁰; the Brownian tree makes an
# example ~0.4 s. The fixed-case tests below add ε/float32/no-Karras, both Karras and v on a UNet.)
@settings(max_examples=10, deadline=None)
@given(karras=st.booleans(), prediction_type=st.sampled_from(["epsilon", "v_prediction"]), n=st.integers(1, 60),
       batch=st.integers(1, 2), dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_dpmpp_sde_matches_diffusers_with_the_same_seed(karras, prediction_type, n, batch, dtype, seed):
    """A seeded generator gives the start noise, then the tree's seed (``torch.randint(0, 2⁶³−1)``, as
    diffusers draws it without ``noise_sampler_seed``); diffusers built with that seed gives our result,
    and the model sees diffusers' interleaved timesteps."""
    g = torch.Generator().manual_seed(seed)
    x_T = torch.randn(batch, 4, 3, 3, generator=g, dtype=dtype)
    after_start = g.get_state()
    tree_seed = int(torch.randint(0, 2**63 - 1, [], generator=g))
    ref_log: list[float] = []
    ref, sched = _diffusers_sde(x_T, n, tree_seed=tree_seed, karras=karras, prediction_type=prediction_type,
                                log=ref_log)
    g2 = torch.Generator()
    g2.set_state(after_start)
    log: list[float] = []
    seen: list[int] = []

    def model(x, t):
        log.append(float(t[0]))
        assert t.shape == (batch,) and t.dtype == torch.float32
        return stand_in(x, t)

    out = dpmpp_sde_sample(model, x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=n,
                           prediction_type=prediction_type, karras=karras, generator=g2,
                           callback=lambda i, t, x: seen.append(i))
    assert out.dtype == dtype and out.shape == x_T.shape
    assert rel_err(out, ref) <= 2e-5, rel_err(out, ref)
    assert torch.equal(g2.get_state(), g.get_state())  # exactly the one draw of the seed
    assert len(log) == 2 * n - 1 and np.allclose(log, ref_log, rtol=0, atol=1e-4)
    assert seen == list(range(n))


@needs_torchsde
@pytest.mark.parametrize("spacing, offset", [("leading", 1), ("trailing", 0)])
def test_dpmpp_sde_other_spacings_match_diffusers(spacing, offset):
    x_T = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(2))
    for n in (3, 10, 25):
        sched = diffusers.DPMSolverSDEScheduler(**SD_BETAS, timestep_spacing=spacing, steps_offset=offset,
                                                noise_sampler_seed=5)
        sched.set_timesteps(n)
        x = x_T * sched.init_noise_sigma
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for t in sched.timesteps:
                x = sched.step(stand_in(sched.scale_model_input(x, t), t.expand(1)), t, x).prev_sample
        out = dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=n, spacing=spacing,
                               steps_offset=offset, noise_sampler_seed=5)
        assert rel_err(out, x) <= 2e-5, (n, rel_err(out, x))


@needs_torchsde
def test_dpmpp_sde_seed_rules():
    """The same generator seed twice: bit-equal; another seed: other noise; an explicit
    ``noise_sampler_seed`` is diffusers' config value and draws nothing from the generator."""
    ac = sd_alphas_cumprod().float()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    run = lambda **kw: dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=8, **kw)
    a, b = run(generator=torch.Generator().manual_seed(5)), run(generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and rel_err(run(generator=torch.Generator().manual_seed(6)), a) > 1e-3
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    ref, sched = _diffusers_sde(x_T, 8, tree_seed=123)
    fixed = dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=8, generator=g,
                             noise_sampler_seed=123)
    assert torch.equal(g.get_state(), state)
    assert rel_err(fixed, ref) <= 2e-5
    assert brownian_tree_seed(torch.Generator().manual_seed(5)) == int(
        torch.randint(0, 2**63 - 1, [], generator=torch.Generator().manual_seed(5)))


@needs_torchsde
def test_dpmpp_sde_tolerance_catches_a_shifted_timestep_or_sigma():
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    for karras in (False, True):
        ref, sched = _diffusers_sde(x_T, 10, tree_seed=4, karras=karras)
        ac = sched.alphas_cumprod
        shifted = dpmpp_sde_sample(lambda x, t: stand_in(x, t - 1), x_T, alphas_cumprod=ac, num_steps=10,
                                   karras=karras, noise_sampler_seed=4)
        assert rel_err(shifted, ref) > 1e-3
        # σ from float64 ᾱ (the other σ samplers' way): the tree is queried a float32 step off at some σ
        other = dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=sd_alphas_cumprod(), num_steps=25, karras=karras,
                                 noise_sampler_seed=4)
        ref25, _ = _diffusers_sde(x_T, 25, tree_seed=4, karras=karras)
        assert rel_err(other, ref25) > 2e-5


@needs_torchsde
def test_dpmpp_sde_noise_is_brownian():
    """The point of the tree: the image hardly moves with the step count for one seed, unlike
    independent draws per step (``dpmsolver++_sde``)."""
    ac = sd_alphas_cumprod().float()
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    runs = {n: dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, karras=True, noise_sampler_seed=9)
            for n in (20, 40)}
    other_seed = dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=40, karras=True, noise_sampler_seed=10)
    assert rel_err(runs[20], runs[40]) < 0.25 * rel_err(other_seed, runs[40])


def test_dpmpp_sde_without_torchsde_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchsde", None)
    with pytest.raises(ImportError, match=r"dpmpp_sde.*pip install torchsde"):
        dpmpp_sde_sample(stand_in, torch.zeros(1, 1, 2, 2), alphas_cumprod=sd_alphas_cumprod(), num_steps=3,
                         generator=torch.Generator())


# ---------------------------------------------------------------- dpmpp_2s_a against k-diffusion


def _grid(ac: torch.Tensor, n: int, karras: bool):
    """The σ grid written out: t = linspace(0, 999, n) reversed (held as float32), σ linear in t between
    training σ; Karras: ρ = 7 between the last and first of those, t(σ) by log-σ interpolation. σ_n = 0."""
    train = np.sqrt((1 - ac.numpy()) / ac.numpy())
    ts = np.linspace(0, 999, n)[::-1].astype(np.float32).astype(np.float64)
    sig = np.interp(ts, np.arange(1000), train)
    if karras:
        ramp = np.linspace(0, 1, n)
        lo, hi = sig[-1] ** (1 / 7), sig[0] ** (1 / 7)
        sig = (hi + ramp * (lo - hi)) ** 7
        ts = _t_of_sigma(sig, train)
    return list(ts), [*sig, 0.0], train


def _t_of_sigma(sig, train):
    """k-diffusion's ``DiscreteSchedule.sigma_to_t``: linear in log σ between training steps."""
    return np.interp(np.log(sig), np.log(train), np.arange(1000))


def reference_dpmpp_2s_a(model, x_T, ac, n, noises, *, karras=False, eta=1.0, s_noise=1.0, prediction="epsilon"):
    """k-diffusion's ``sample_dpmpp_2s_ancestral`` transcribed in float64: denoiser D(x, σ) from the model at
    x/√(σ²+1) and t(σ) (float32, as the UNet gets it); ``get_ancestral_step`` with η; the i-th noise
    while σ_{i+1} > 0."""
    ts, sig, train = _grid(ac, n, karras)
    x = x_T * sig[0]

    def D(x, s, t):
        out = model(x / math.sqrt(s * s + 1), torch.full((x.shape[0],), t, dtype=torch.float32))
        if prediction == "epsilon":
            return x - s * out
        return x / (s * s + 1) - s / math.sqrt(s * s + 1) * out

    k = 0
    for i in range(n):
        den = D(x, sig[i], ts[i])
        s_to = sig[i + 1]
        up = min(s_to, eta * math.sqrt(s_to**2 * (sig[i] ** 2 - s_to**2) / sig[i] ** 2)) if eta else 0.0
        down = math.sqrt(s_to**2 - up**2)
        if down == 0:
            x = x + (x - den) / sig[i] * (down - sig[i])
        else:
            t, t_next = -math.log(sig[i]), -math.log(down)
            h = t_next - t
            s = t + 0.5 * h
            x_2 = (math.exp(-s) / math.exp(-t)) * x - math.expm1(-h * 0.5) * den
            den_2 = D(x_2, math.exp(-s), float(_t_of_sigma(np.array([math.exp(-s)]), train)[0]))
            x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * den_2
        if sig[i + 1] > 0:
            x = x + noises[k] * s_noise * up
            k += 1
    return x


def _noises(seed, shape, count, dtype):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(count)]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 15, 30])
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2s_a_is_k_diffusions_function(n, karras):
    ac = sd_alphas_cumprod()
    x_T = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    for pred in ("epsilon", "v_prediction"):
        calls: list[float] = []

        def logged(x, t, calls=calls):
            calls.append(float(t[0]))
            return stand_in(x, t)

        g = torch.Generator().manual_seed(9)
        got = dpmpp_2s_ancestral_sample(logged, x_T,
                                        alphas_cumprod=ac, num_steps=n, karras=karras, prediction_type=pred,
                                        generator=g)
        want = reference_dpmpp_2s_a(stand_in, x_T, ac, n, _noises(9, x_T.shape, n, torch.float64), karras=karras,
                                    prediction=pred)
        assert rel_err(got, want) <= 1e-10, (pred, rel_err(got, want))
        assert len(calls) == 2 * n - 1
        drawn = torch.Generator().manual_seed(9)  # k-diffusion's n − 1 draws (none after the last step)
        _ = [torch.randn(x_T.shape, generator=drawn, dtype=x_T.dtype) for _ in range(n - 1)]
        assert torch.equal(g.get_state(), drawn.get_state())
    # η = 0: the deterministic DPM-Solver++(2S); s_noise = 0 at η = 1 is not it (it still steps to σ_down);
    # η = 1.5: σ_up capped at σ_{i+1} on the long steps (σ_down = 0 there: an Euler step onto x̂0, then noise)
    for eta, s_noise in ((0.0, 1.0), (1.0, 0.0), (0.5, 1.0), (1.5, 1.0)):
        got = dpmpp_2s_ancestral_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, karras=karras, eta=eta,
                                        s_noise=s_noise, generator=torch.Generator().manual_seed(9))
        want = reference_dpmpp_2s_a(stand_in, x_T, ac, n, _noises(9, x_T.shape, n, torch.float64), karras=karras,
                                    eta=eta, s_noise=s_noise)
        assert rel_err(got, want) <= 1e-10, (eta, s_noise, rel_err(got, want))
    if n >= 3:
        det = dpmpp_2s_ancestral_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, karras=karras, eta=0.0)
        quiet = dpmpp_2s_ancestral_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, karras=karras, s_noise=0.0)
        assert rel_err(quiet, det) > 1e-3


def test_dpmpp_2s_a_reference_catches_a_wrong_midpoint():
    """The 1e-10 comparison has room to spare: a model a timestep off (~3% on the stand-in) is far outside it."""
    ac = sd_alphas_cumprod()
    x_T = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = reference_dpmpp_2s_a(stand_in, x_T, ac, 10, _noises(9, x_T.shape, 10, torch.float64))
    got = dpmpp_2s_ancestral_sample(lambda x, t: stand_in(x, t + 1), x_T, alphas_cumprod=ac, num_steps=10,
                                    generator=torch.Generator().manual_seed(9))
    assert rel_err(got, want) > 1e-4


def test_deterministic_2s_is_second_order_on_a_linear_gaussian_model():
    """Data x0 ~ N(0, c²): the exact denoiser is D(x, σ) = c²/(c²+σ²)·x and the probability-flow ODE
    dx/dσ = (x − D)/σ has x(σ) = x(σ_0)·√((c²+σ²)/(c²+σ_0²)). With η = 0 the error at σ_{n−1} (before
    the final Euler step onto x̂0) shrinks ~4× per doubling of n: second order."""
    ac = sd_alphas_cumprod()
    train = np.sqrt((1 - ac.numpy()) / ac.numpy())
    c = 0.5

    def model(x_in, t):  # ε̂ of the exact denoiser at σ(t) (the inverse of the log-σ interpolation)
        s = float(np.exp(np.interp(float(t[0]), np.arange(1000), np.log(train))))
        x = x_in * math.sqrt(s * s + 1)
        return s * x / (c * c + s * s)

    x_T = torch.randn(1, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errors = []
    for n in (8, 16, 32, 64):
        _, sig, _ = _grid(ac, n, True)
        at: dict[int, torch.Tensor] = {}
        dpmpp_2s_ancestral_sample(model, x_T, alphas_cumprod=ac, num_steps=n, karras=True, eta=0.0,
                                  callback=lambda i, t, x, at=at: at.__setitem__(i, x.clone()))
        exact = x_T * sig[0] * math.sqrt((c * c + sig[n - 1] ** 2) / (c * c + sig[0] ** 2))
        errors.append(rel_err(at[n - 2], exact))
    ratios = [a / b for a, b in itertools.pairwise(errors)]
    assert all(3.3 < r < 4.7 for r in ratios[1:]), (errors, ratios)


def test_dpmpp_2s_a_refuses_bad_options():
    with pytest.raises(ValueError, match="dpmpp_2s_a: eta and s_noise must be >= 0"):
        dpmpp_2s_ancestral_sample(stand_in, torch.zeros(1, 1, 2, 2), alphas_cumprod=sd_alphas_cumprod(), num_steps=3, eta=-1)
    with pytest.raises(ValueError, match="dpmpp_2s_a: prediction_type"):
        dpmpp_2s_ancestral_sample(stand_in, torch.zeros(1, 1, 2, 2), alphas_cumprod=sd_alphas_cumprod(), num_steps=3,
                                  prediction_type="flow")


# ---------------------------------------------------------------- registry, labels, entry point


def test_registered_names_aliases_and_labels():
    for name in ("dpmpp_sde", "dpmpp_2s_a"):
        assert name in SAMPLERS and name in KARRAS_SAMPLERS
    assert canonical_sampler("K_DPMPP_SDE") == "dpmpp_sde" == SAMPLER_ALIASES["dpm++_sde"]
    assert canonical_sampler("k_dpmpp_2s_ancestral") == "dpmpp_2s_a" == canonical_sampler("dpm++_2s_a")
    assert sampler_from_label("DPM++ SDE") == ("dpmpp_sde", False)
    assert sampler_from_label("DPM++ SDE Karras") == ("dpmpp_sde", True)
    assert sampler_from_label("DPM++ 2S a") == ("dpmpp_2s_a", False)
    assert sampler_from_label("dpm++ 2s a karras") == ("dpmpp_2s_a", True)
    assert sampler_from_label("k_dpmpp_2s_a") == ("dpmpp_2s_a", False)
    # A1111's aliases of "DPM++ SDE Karras", "DPM++ 2S a Karras", "DPM++ 3M SDE Karras"
    assert sampler_from_label("k_dpmpp_2s_a_ka") == ("dpmpp_2s_a", True)
    assert sampler_from_label("K_DPMPP_SDE_KA") == ("dpmpp_sde", True)
    assert sampler_from_label("k_dpmpp_3m_sde_ka") == ("dpmsolver++_3m_sde", True)
    assert "dpm++ sde" not in A1111_MISSING and "dpm++ 2s a" not in A1111_MISSING


@needs_torchsde
@pytest.mark.parametrize("name, karras", [("dpmpp_sde", False), ("dpmpp_sde", True), ("dpmpp_2s_a", True)])
def test_sample_latents_guidance(name, karras):
    ac = sd_alphas_cumprod().float()
    fn = dpmpp_sde_sample if name == "dpmpp_sde" else dpmpp_2s_ancestral_sample
    assert_guidance_is_the_guided_model(name, functools.partial(fn, alphas_cumprod=ac, karras=karras), alphas_cumprod=ac,
                                        karras=karras)


def test_half_inputs_keep_their_dtype():
    ac = sd_alphas_cumprod().float()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    for fn in (dpmpp_sde_sample, dpmpp_2s_ancestral_sample):
        if fn is dpmpp_sde_sample and importlib.util.find_spec("torchsde") is None:
            continue
        h = fn(stand_in, x_T.to(torch.bfloat16), alphas_cumprod=ac, num_steps=6,
               generator=torch.Generator().manual_seed(3))
        assert h.dtype == torch.bfloat16 and torch.isfinite(h).all()


# ---------------------------------------------------------------- end to end on a tiny SD UNet


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny random SD1-layout DiffusersSystem, v-prediction (tests/test_cli_train.py's folder)."""
    from test_cli_train import _tiny_pipeline

    from sdadapt.diffusers_system import DiffusersSystem

    return DiffusersSystem.from_folder(_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipe"))


def _ours_on(system, name, karras, steps, seed, alphas_cumprod=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *system.latent_shape(32, 32), generator=g)
    ac = system.alphas_cumprod if alphas_cumprod is None else alphas_cumprod
    with torch.no_grad():
        return sample_latents(system.denoiser(), x, system.condition(system.tokenize(["a photo"])), sampler=name,
                              alphas_cumprod=ac, num_steps=steps,
                              uncond=system.condition(system.tokenize([""])), guidance_scale=4.0, karras=karras,
                              prediction_type=system.prediction_type, generator=g)


def _guided_unet(system):
    both = torch.cat([system.condition(system.tokenize([""])), system.condition(system.tokenize(["a photo"]))])

    def model(x_in, t):
        out_u, out_c = system.unet(torch.cat([x_in, x_in]), t[0], both).sample.chunk(2)
        return out_u + 4.0 * (out_c - out_u)
    return model


@needs_torchsde
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_sde_on_a_tiny_unet_is_the_diffusers_pipeline_loop(tiny_sd, karras):
    """What StableDiffusionPipeline does with ``generator=torch.Generator().manual_seed(3)`` and a
    ``DPMSolverSDEScheduler(noise_sampler_seed=s)``, s drawn from that generator after the start noise:
    v prediction, CFG 4, 4 steps, float32: 3e-5 of the scale on diffusers' own ᾱ. The system's ᾱ (the
    float64 product, rounded) differ from the class's float32 cumulative product by up to 1e-6, which moves
    some float32 σ by a step and so the Brownian query points: ~5e-4 then (2e-3 allowed; documented)."""
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(1, *tiny_sd.latent_shape(32, 32), generator=g)
    tree_seed = int(torch.randint(0, 2**63 - 1, [], generator=g))
    with torch.no_grad():
        want, sched = _diffusers_sde(latents, 4, tree_seed=tree_seed, karras=karras, prediction_type="v_prediction",
                                     model=_guided_unet(tiny_sd))
    got = _ours_on(tiny_sd, "dpmpp_sde", karras, 4, 3, alphas_cumprod=sched.alphas_cumprod)
    assert rel_err(got, want) < 3e-5, rel_err(got, want)
    assert rel_err(_ours_on(tiny_sd, "dpmpp_sde", karras, 4, 3), want) < 2e-3


def test_dpmpp_2s_a_on_a_tiny_unet_is_the_transcription(tiny_sd):
    """The float32 UNet through ``sample_latents`` against the float64 transcription driving the same
    guided UNet (float32 inside), the ancestral noise from the generator after the start noise."""
    got = _ours_on(tiny_sd, "dpmpp_2s_a", True, 4, 3)
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(1, *tiny_sd.latent_shape(32, 32), generator=g)
    noises = [torch.randn(x_T.shape, generator=g) for _ in range(3)]
    unet = _guided_unet(tiny_sd)
    with torch.no_grad():
        want = reference_dpmpp_2s_a(lambda x, t: unet(x.float(), t).double(), x_T.double(),
                                    tiny_sd.alphas_cumprod.double(), 4, [z.double() for z in noises], karras=True,
                                    prediction="v_prediction")
    assert rel_err(got, want) < 3e-5, rel_err(got, want)
