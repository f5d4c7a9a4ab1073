"""The stochastic DPM-Solver++ 2M (``dpmsolver++_sde``) and the latent-consistency sampler (``lcm``)
against the real diffusers schedulers step for step (same CPU generator for the noise), and against
float64 transcriptions written here of k-diffusion's ``sample_dpmpp_2m_sde`` and of the LCM paper's
multistep sampling.

Tolerances, relative to the result's scale (max |ours − diffusers| / max |diffusers|): 2e-5 in
float32 and 1e-5 in float64. diffusers keeps σ/ᾱ in float32 even for float64 samples and runs the
DPM-Solver update in float32, so its float64 result carries float32 rounding (measured ≤ 2e-6 over
n = 1…60, ε and v, Karras or not; docs/samplers.md). The stand-in model depends strongly on t
(``sin(t/7)``), so a timestep off by one moves the result by far more (checked below), as does a
noise draw at another point (the generator's state is compared too). Against the float64
references: 1e-10 (same maths, different arrangement).
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sampler_stand_ins import (
    SD_BETAS,
    assert_guidance_is_the_guided_model,
    reference_dpmpp_2m_sde,
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
from sdadapt.samplers.dpm_solver import dpmsolver_pp_sample, dpmsolver_pp_sde_sample
from sdadapt.samplers.labels import A1111_MISSING, sampler_from_label
from sdadapt.samplers.lcm import lcm_boundary_scalings, lcm_sample, lcm_timesteps

diffusers = pytest.importorskip("diffusers")

TOL = {torch.float32: 2e-5, torch.float64: 1e-5}


def _scheduler(name: str, *, karras: bool = False, prediction_type: str = "epsilon", **extra):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "lcm":
            return diffusers.LCMScheduler(**SD_BETAS, prediction_type=prediction_type, **extra)
        return diffusers.DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="sde-dpmsolver++",
                                                     use_karras_sigmas=karras, prediction_type=prediction_type,
                                                     **extra)


def _diffusers_run(name, x_T, n, *, seed, karras=False, prediction_type="epsilon", model=stand_in):
    """diffusers' loop; returns (result, scheduler, the generator after it)."""
    sched = _scheduler(name, karras=karras, prediction_type=prediction_type)
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        out = model(sched.scale_model_input(x, t), t.expand(x.shape[0]))
        x = sched.step(out, t, x, generator=g).prev_sample
    return x, sched, g


def _ours(name, x_T, n, *, seed, karras=False, prediction_type="epsilon", model=stand_in, ac=None, callback=None):
    g = torch.Generator().manual_seed(seed)
    ac = sd_alphas_cumprod().float() if ac is None else ac
    if name == "lcm":
        out = lcm_sample(model, x_T, alphas_cumprod=ac, num_steps=n, prediction_type=prediction_type, generator=g,
                         callback=callback)
    else:
        out = dpmsolver_pp_sde_sample(model, x_T, alphas_cumprod=ac, num_steps=n, prediction_type=prediction_type,
                                      karras=karras, generator=g, callback=callback)
    return out, g


# ---------------------------------------------------------------- against diffusers


@settings(max_examples=120, deadline=None)
@given(name=st.sampled_from(["dpmsolver++_sde", "lcm"]), karras=st.booleans(),
       prediction_type=st.sampled_from(["epsilon", "v_prediction"]), n=st.integers(1, 60),
       batch=st.integers(1, 2), hw=st.sampled_from([(4, 4), (3, 5)]),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_matches_diffusers_with_the_same_generator(name, karras, prediction_type, n, batch, hw, dtype, seed):
    if name == "lcm":
        karras, n = False, min(n, 50)  # LCMScheduler has no Karras σ; its steps are a subset of 50
    x_T = torch.randn(batch, 4, *hw, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    ref, sched, g_ref = _diffusers_run(name, x_T, n, seed=seed + 1, karras=karras, prediction_type=prediction_type)
    seen = []
    out, g = _ours(name, x_T, n, seed=seed + 1, karras=karras, prediction_type=prediction_type,
                   ac=sched.alphas_cumprod, callback=lambda i, t, x: seen.append((i, t.clone())))
    assert out.dtype == dtype and out.shape == x_T.shape
    assert rel_err(out, ref) <= TOL[dtype], rel_err(out, ref)
    assert torch.equal(g.get_state(), g_ref.get_state())  # the same number of draws of the same size and dtype
    assert [i for i, _ in seen] == list(range(n))
    assert all(t.dtype == torch.long and t.shape == (batch,) for _, t in seen)
    assert torch.equal(torch.stack([t[0] for _, t in seen]), sched.timesteps)


def test_noise_is_drawn_where_diffusers_draws_it():
    """A generator shared by the start noise and the sampler (what ``generate`` does): the same result as
    diffusers' loop given that generator; one seed twice is bit-equal, another seed differs."""
    for name in ("dpmsolver++_sde", "lcm"):
        g = torch.Generator().manual_seed(11)
        x_T = torch.randn(1, 4, 4, 4, generator=g)
        sched = _scheduler(name)
        sched.set_timesteps(6)
        x = x_T.clone()
        for t in sched.timesteps:
            x = sched.step(stand_in(x, t.expand(1)), t, x, generator=g).prev_sample
        g2 = torch.Generator().manual_seed(11)
        x_T2 = torch.randn(1, 4, 4, 4, generator=g2)
        fn = lcm_sample if name == "lcm" else dpmsolver_pp_sde_sample
        got = fn(stand_in, x_T2, alphas_cumprod=sched.alphas_cumprod, num_steps=6, generator=g2)
        assert rel_err(got, x) <= 2e-5, name
        a, _ = _ours(name, x_T, 6, seed=1)
        b, _ = _ours(name, x_T, 6, seed=1)
        c, _ = _ours(name, x_T, 6, seed=2)
        assert torch.equal(a, b) and rel_err(c, a) > 1e-3, name


@pytest.mark.parametrize("name", ["dpmsolver++_sde", "lcm"])
def test_tolerance_catches_an_off_by_one_timestep(name):
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    for karras in (False, True) if name != "lcm" else (False,):
        ref, _, _ = _diffusers_run(name, x_T, 8, seed=4, karras=karras)
        shifted, _ = _ours(name, x_T, 8, seed=4, karras=karras, model=lambda x, t: stand_in(x, t - 1))
        assert rel_err(shifted, ref) > 1e-3


def test_sde_steps_near_the_training_count():
    """999 steps and 1000 Karras steps match diffusers (1e-4: a thousand steps, each with diffusers' float32
    σ; measured 1.2e-5); 1000 linspace steps repeat timestep 500 (NaN in diffusers): refused with the fix named."""
    x_T = torch.randn(1, 2, 2, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for n, karras in ((999, False), (1000, True)):
        ref, sched, _ = _diffusers_run("dpmsolver++_sde", x_T, n, seed=2, karras=karras)
        out, _ = _ours("dpmsolver++_sde", x_T, n, seed=2, karras=karras, ac=sched.alphas_cumprod)
        assert rel_err(out, ref) <= 1e-4, (n, karras)
    with pytest.raises(ValueError, match=r"dpmsolver\+\+_sde: 1000 steps repeat a timestep.*at most 999"):
        _ours("dpmsolver++_sde", x_T, 1000, seed=2)


def test_zero_terminal_snr_schedules():
    """ᾱ_T = 0 (``rescale_betas_zero_snr``), v prediction: the SDE reads the last ᾱ as 2⁻²⁴ as diffusers'
    class does; LCM uses ᾱ_999 = 0 as it is (the x̂0 of v prediction is finite there)."""
    x_T = torch.randn(1, 4, 3, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    for name, n, karras in (("dpmsolver++_sde", 6, False), ("dpmsolver++_sde", 6, True), ("lcm", 4, False)):
        sched = _scheduler(name, karras=karras, prediction_type="v_prediction", rescale_betas_zero_snr=True)
        sched.set_timesteps(n)
        g = torch.Generator().manual_seed(1)
        x = x_T.clone()
        for t in sched.timesteps:
            x = sched.step(stand_in(x, t.expand(1)), t, x, generator=g).prev_sample
        ac = sched.alphas_cumprod.clone()
        ac[-1] = 0.0  # the system's own ᾱ (diffusers' multistep class stores 2⁻²⁴ in its copy)
        out, _ = _ours(name, x_T, n, seed=1, karras=karras, prediction_type="v_prediction", ac=ac)
        assert torch.isfinite(out).all() and rel_err(out, x) <= 1e-5, (name, karras)
    # ε prediction on that schedule: LCM's first x̂0 divides by √ᾱ_999 = 0, NaN in diffusers and here (documented)
    sched = _scheduler("lcm", rescale_betas_zero_snr=True)
    out, _ = _ours("lcm", x_T, 4, seed=1, ac=sched.alphas_cumprod)
    assert sched.alphas_cumprod[-1] == 0 and torch.isnan(out).all()


def test_lcm_timesteps_are_diffusers():
    assert lcm_timesteps(1000, 4) == [999, 759, 499, 259]  # the LCM-LoRA examples' 4 steps
    assert lcm_timesteps(1000, 1) == [999]
    for n in range(1, 51):
        sched = _scheduler("lcm")
        sched.set_timesteps(n)
        assert lcm_timesteps(1000, n) == sched.timesteps.tolist(), n
    # numpy's floor(linspace(0, 50, n, endpoint=False)), written out, on a 1000-step schedule
    for n in (3, 7, 30, 49):
        idx = np.floor(np.linspace(0, 50, num=n, endpoint=False)).astype(np.int64)
        assert lcm_timesteps(1000, n) == (np.arange(50, 0, -1) * 20 - 1)[idx].tolist()


def test_lcm_refuses_steps_outside_its_schedule():
    x_T = torch.zeros(1, 1, 2, 2)
    ac = sd_alphas_cumprod()
    for n in (0, 51):
        with pytest.raises(ValueError, match=r"lcm: num_steps must be in \[1, 50\]"):
            lcm_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n)
    sched = _scheduler("lcm")
    with pytest.raises(ValueError):
        sched.set_timesteps(51)  # diffusers refuses it too
    with pytest.raises(ValueError, match=r"original_inference_steps must be in \[1, 40\]"):
        lcm_sample(stand_in, x_T, alphas_cumprod=ac[:40], num_steps=4)
    with pytest.raises(ValueError, match="lcm: prediction_type"):
        lcm_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=4, prediction_type="flow")


def test_lcm_boundary_scalings_are_diffusers():
    sched = _scheduler("lcm")
    for t in (0, 1, 19, 259, 999):
        want = sched.get_scalings_for_boundary_condition_discrete(torch.tensor(t))
        got = lcm_boundary_scalings(t)
        assert got == pytest.approx([float(w) for w in want], rel=1e-6)
    assert lcm_boundary_scalings(0) == (1.0, 0.0)  # the boundary condition: f(x, 0) = x


# ---------------------------------------------------------------- float64 references


def _noises(seed: int, shape, count: int, dtype) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g, dtype=dtype) for _ in range(count)]


def reference_lcm(x_T: torch.Tensor, ac: torch.Tensor, n: int, noises) -> torch.Tensor:
    """Multistep latent-consistency sampling (Luo et al. 2023, Algorithm 1 with the distilled skipping
    schedule): f(x, t) = c_skip(t)·x + c_out(t)·x̂0(x, t), c_skip = 0.25/((10t)² + 0.25),
    c_out = 10t/√((10t)² + 0.25); between steps x = √ᾱ_next·f + √(1−ᾱ_next)·z."""
    origin = [999 - 20 * j for j in range(50)]
    ts = [origin[int(i * 50 / n)] for i in range(n)]  # exact in float64 for n ≤ 50
    x = x_T.clone()
    for i, t in enumerate(ts):
        eps = stand_in(x, torch.full((x.shape[0],), t, dtype=torch.long))
        x0 = (x - math.sqrt(1 - float(ac[t])) * eps) / math.sqrt(float(ac[t]))
        s = 10.0 * t
        f = 0.25 / (s * s + 0.25) * x + s / math.sqrt(s * s + 0.25) * x0
        if i == n - 1:
            return f
        a_next = float(ac[ts[i + 1]])
        x = math.sqrt(a_next) * f + math.sqrt(1 - a_next) * noises[i]
    return x


@pytest.mark.parametrize("n", [1, 2, 3, 7, 15, 25, 50])
def test_float64_references(n):
    ac = sd_alphas_cumprod()
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    got = dpmsolver_pp_sde_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n,
                                  generator=torch.Generator().manual_seed(9))
    want = reference_dpmpp_2m_sde(x_T, ac, n, _noises(9, x_T.shape, n, torch.float32))  # float32 draws
    assert rel_err(got, want) <= 1e-10, rel_err(got, want)
    got = lcm_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n, generator=torch.Generator().manual_seed(9))
    want = reference_lcm(x_T, ac, n, _noises(9, x_T.shape, n, torch.float64))  # draws in the sample's dtype
    assert rel_err(got, want) <= 1e-10, rel_err(got, want)


def test_sde_without_noise_is_not_dpmpp_2m_but_close_in_one_step():
    """One step lands on σ = 0: x̂0 of the start, the same as DPM++ 2M (the noise is multiplied by 0);
    with more steps the stochastic sampler differs."""
    ac = sd_alphas_cumprod()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    one = dpmsolver_pp_sde_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=1, generator=torch.Generator())
    assert rel_err(one, dpmsolver_pp_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=1)) <= 1e-12
    many = dpmsolver_pp_sde_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=10,
                                   generator=torch.Generator().manual_seed(0))
    assert rel_err(many, dpmsolver_pp_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=10)) > 1e-3


# ---------------------------------------------------------------- registry, labels, entry point


def test_registered_names_aliases_and_labels():
    assert "dpmsolver++_sde" in SAMPLERS and "dpmsolver++_sde" in KARRAS_SAMPLERS
    assert "lcm" in SAMPLERS and "lcm" not in KARRAS_SAMPLERS  # LCMScheduler has no use_karras_sigmas
    assert canonical_sampler("DPMPP_2M_SDE") == "dpmsolver++_sde" == SAMPLER_ALIASES["dpm++_2m_sde"]
    assert canonical_sampler("LCM") == "lcm"
    assert sampler_from_label("DPM++ 2M SDE") == ("dpmsolver++_sde", False)
    assert sampler_from_label("DPM++ 2M SDE Karras") == ("dpmsolver++_sde", True)
    assert sampler_from_label("k_dpmpp_2m_sde_ka") == ("dpmsolver++_sde", True)  # A1111 keeps the Karras label
    assert sampler_from_label("LCM") == ("lcm", False) == sampler_from_label("k_lcm")
    assert "dpm++ 2m sde" not in A1111_MISSING and "lcm" not in A1111_MISSING
    with pytest.raises(ValueError, match="no Karras noise levels"):
        sampler_from_label("LCM Karras")
    with pytest.raises(ValueError, match="no sampler here matches"):
        sampler_from_label("Euler CFG++")


@pytest.mark.parametrize("name, karras", [("dpmsolver++_sde", False), ("dpmsolver++_sde", True), ("lcm", False)])
def test_sample_latents_guidance(name, karras):
    ac = sd_alphas_cumprod().float()
    fn = lcm_sample if name == "lcm" else dpmsolver_pp_sde_sample
    options = {"karras": True} if karras else {}
    assert_guidance_is_the_guided_model(name, functools.partial(fn, alphas_cumprod=ac, **options), alphas_cumprod=ac,
                                        karras=karras)


def test_half_inputs_keep_their_dtype():
    ac = sd_alphas_cumprod().float()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    for fn in (dpmsolver_pp_sde_sample, lcm_sample):
        a = fn(stand_in, x_T, alphas_cumprod=ac, num_steps=6, generator=torch.Generator().manual_seed(3))
        h = fn(stand_in, x_T.to(torch.bfloat16), alphas_cumprod=ac, num_steps=6,
               generator=torch.Generator().manual_seed(3))
        assert h.dtype == torch.bfloat16 and torch.isfinite(h).all()
        if fn is dpmsolver_pp_sde_sample:  # float32 noise, as diffusers: the same draws as the float32 run
            assert rel_err(h, a) < 0.05


# ---------------------------------------------------------------- end to end on a tiny SD UNet


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A tiny random SD1-layout DiffusersSystem, v-prediction (tests/test_cli_train.py's folder)."""
    from test_cli_train import _tiny_pipeline

    from sdadapt.diffusers_system import DiffusersSystem

    return DiffusersSystem.from_folder(_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipe"))


def _pipeline_loop(system, scheduler, steps: int, *, seed: int, scale: float, prompt: str) -> torch.Tensor:
    """What StableDiffusionPipeline does with ``generator=torch.Generator().manual_seed(seed)``: start noise
    and the scheduler's noise from one generator, CFG on the [uncond, cond] batch."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, *system.latent_shape(32, 32), generator=g)
    both = torch.cat([system.condition(system.tokenize([""])), system.condition(system.tokenize([prompt]))])
    scheduler.set_timesteps(steps)
    latents = latents * scheduler.init_noise_sigma
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            out_u, out_c = system.unet(x_in, t, both).sample.chunk(2)
            latents = scheduler.step(out_u + scale * (out_c - out_u), t, latents, generator=g).prev_sample
    return latents


@pytest.mark.parametrize("name, karras", [("dpmsolver++_sde", False), ("dpmsolver++_sde", True), ("lcm", False)])
def test_the_system_samples_as_a_diffusers_pipeline(tiny_sd, name, karras):
    """sdadapt's sampling path (start noise, then the sampler's noise, from one seeded CPU generator, through
    ``sample_latents``) against diffusers' loop on a tiny float32 UNet, v prediction, CFG 4, 4 steps:
    3e-5 of the scale (docs/samplers.md has the measured numbers)."""
    scheduler = _scheduler(name, karras=karras, prediction_type="v_prediction")
    want = _pipeline_loop(tiny_sd, scheduler, 4, seed=3, scale=4.0, prompt="a photo")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, *tiny_sd.latent_shape(32, 32), generator=g)
    with torch.no_grad():
        got = sample_latents(tiny_sd.denoiser(), x, tiny_sd.condition(tiny_sd.tokenize(["a photo"])), sampler=name,
                             alphas_cumprod=tiny_sd.alphas_cumprod, num_steps=4,
                             uncond=tiny_sd.condition(tiny_sd.tokenize([""])), guidance_scale=4.0, karras=karras,
                             prediction_type=tiny_sd.prediction_type, generator=g)
    assert got.shape == want.shape
    assert rel_err(got, want) < 3e-5
