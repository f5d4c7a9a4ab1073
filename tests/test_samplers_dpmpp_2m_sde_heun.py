"""``dpmsolver++_sde_heun`` (A1111's "DPM++ 2M SDE Heun"): diffusers'
``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_type="heun")`` step for step with
the same generator, a float64 transcription of k-diffusion's ``sample_dpmpp_2m_sde(solver_type="heun")``
with the same Gaussian noise, and its registry names / A1111 labels."""

from __future__ import annotations

import functools
import warnings

import pytest
import torch
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
    SAMPLERS,
    SCHEDULE_SAMPLERS,
    canonical_sampler,
    sample_latents,
)
from sdadapt.samplers.dpm_solver import (
    dpmsolver_pp_sde_heun_sample,
    dpmsolver_pp_sde_sample,
)
from sdadapt.samplers.labels import (
    A1111_MISSING,
    sampler_from_label,
    sampler_schedule_from_label,
)

diffusers = pytest.importorskip("diffusers")


def _diffusers_run(x_T, n, *, seed, karras, prediction_type):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sched = diffusers.DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="sde-dpmsolver++", solver_type="heun",
                                                      use_karras_sigmas=karras, prediction_type=prediction_type)
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    x = x_T * sched.init_noise_sigma
    for t in sched.timesteps:
        x = sched.step(stand_in(sched.scale_model_input(x, t), t.expand(x.shape[0])), t, x, generator=g).prev_sample
    return x, sched, g


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 14, 15, 30])
@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("prediction_type, dtype", [("epsilon", torch.float32), ("v_prediction", torch.float64)])
def test_matches_diffusers_with_the_same_generator(n, karras, prediction_type, dtype):
    x_T = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(n), dtype=dtype)
    want, sched, g_ref = _diffusers_run(x_T, n, seed=n + 1, karras=karras, prediction_type=prediction_type)
    g = torch.Generator().manual_seed(n + 1)
    seen = []
    got = dpmsolver_pp_sde_heun_sample(stand_in, x_T, alphas_cumprod=sched.alphas_cumprod, num_steps=n,
                                       prediction_type=prediction_type, karras=karras, generator=g,
                                       callback=lambda i, t, x: seen.append(t[0].item()))
    assert got.dtype == dtype
    assert rel_err(got, want) <= 2e-5, rel_err(got, want)
    assert torch.equal(g.get_state(), g_ref.get_state())  # one float32 draw per step, as diffusers
    assert seen == sched.timesteps.tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 15, 25])
def test_float64_reference(n):
    ac = sd_alphas_cumprod()
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    got = dpmsolver_pp_sde_heun_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n,
                                       generator=torch.Generator().manual_seed(9))
    g = torch.Generator().manual_seed(9)
    noises = [torch.randn(x_T.shape, generator=g, dtype=torch.float32) for _ in range(n)]  # float32 draws
    want = reference_dpmpp_2m_sde(x_T, ac, n, noises, solver_type="heun")
    assert rel_err(got, want) <= 1e-10, rel_err(got, want)


def test_heun_is_not_the_midpoint_form_but_equal_while_no_second_order_step():
    """Up to 2 steps (first step order 1, last onto σ = 0 order 1) the two forms are the same; from 3 steps the
    order-2 correction differs (φ₂ ≈ ½ only as h → 0)."""
    ac = sd_alphas_cumprod()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    for n, same in ((1, True), (2, True), (3, False), (10, False)):
        heun = dpmsolver_pp_sde_heun_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n,
                                            generator=torch.Generator().manual_seed(1))
        mid = dpmsolver_pp_sde_sample(stand_in, x_T, alphas_cumprod=ac, num_steps=n,
                                      generator=torch.Generator().manual_seed(1))
        assert (rel_err(heun, mid) <= 1e-12) == same, (n, rel_err(heun, mid))


def test_registered_names_aliases_and_labels():
    name = "dpmsolver++_sde_heun"
    assert name in SAMPLERS and name in KARRAS_SAMPLERS and name in SCHEDULE_SAMPLERS
    for alias in ("DPMPP_2M_SDE_HEUN", "dpm++_2m_sde_heun", "k_dpmpp_2m_sde_heun"):
        assert canonical_sampler(alias) == name
    assert sampler_from_label("DPM++ 2M SDE Heun") == (name, False)
    assert sampler_from_label("DPM++ 2M SDE Heun Karras") == (name, True) == sampler_from_label("k_dpmpp_2m_sde_heun_ka")
    # A1111 1.6-1.8's Exponential label and its alias
    assert sampler_schedule_from_label("DPM++ 2M SDE Heun Exponential") == (name, "exponential")
    assert sampler_schedule_from_label("k_dpmpp_2m_sde_heun_exp") == (name, "exponential")
    assert "dpm++ 2m sde heun" not in A1111_MISSING


@pytest.mark.parametrize("karras", [False, True])
def test_sample_latents_guidance(karras):
    ac = sd_alphas_cumprod().float()
    options = {"karras": True} if karras else {}
    assert_guidance_is_the_guided_model("dpmsolver++_sde_heun",
                                        functools.partial(dpmsolver_pp_sde_heun_sample, alphas_cumprod=ac, **options),
                                        alphas_cumprod=ac, karras=karras)


def test_a1111_automatic_is_the_exponential_grid():
    """A1111 ≥ 1.9 runs "DPM++ 2M SDE Heun" on the Exponential grid under "Automatic"."""
    ac = sd_alphas_cumprod()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    run = functools.partial(sample_latents, lambda x, t, c: stand_in(x, t), x_T, None, sampler="DPM++_2M_SDE_HEUN",
                            alphas_cumprod=ac, num_steps=8)
    auto = run(schedule="Automatic", generator=torch.Generator().manual_seed(2))
    assert torch.equal(auto, run(schedule="exponential", generator=torch.Generator().manual_seed(2)))
    assert rel_err(auto, run(generator=torch.Generator().manual_seed(2))) > 1e-3
