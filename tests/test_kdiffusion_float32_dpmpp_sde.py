"""DPM++ SDE (``dpmpp_sde``) on A1111's grids runs k-diffusion's ``sample_dpmpp_sde`` as A1111 calls it, bit for bit on
float32 and half latents: A1111's float32 σ table, grid and ``t(σ)``, the model at ``x·c_in`` (its ``CompVisDenoiser``
/ ``CompVisVDenoiser``: tests/test_kdiffusion_float32.py's ``_denoiser``), and the step's 0-dim float32 arithmetic —
``t = −log σ``, ``h``, ``s``, ``get_ancestral_step``, the ``sigma_fn`` / ``t_fn`` round trips, the Brownian tree
queried at ``sigma_fn(t)``, ``sigma_fn(s)``, ``sigma_fn(t_next)``. The reference is ``sample_dpmpp_sde`` of k-diffusion
4601bf0 (k_diffusion/sampling.py:543-582) transcribed below, fed the same noise; the transcription was checked against
the real k-diffusion code (eps and v, Uniform, Karras, KL Optimal and Exponential, 1 / 7 / 20 steps, img2img starts,
the real ``BrownianTreeNoiseSampler`` with one seed or one per image, half-dtype model inputs: 66 runs, 0 difference). Float64 latents run the same form in float64 (a precise mode).
Measured before: 4.3e-5 to 3.9e-4 relative off (diffusers' ``DPMSolverSDEScheduler`` steps on A1111's grids)."""

from __future__ import annotations

import warnings

import pytest
import test_kdiffusion_float32 as kd32
import torch
from sampler_stand_ins import kdiffusion_sigma_to_t, rel_err, stand_in
from test_kdiffusion_float32 import (
    AC,
    F32,
    _ancestral,
    _denoiser,
    _get_sigmas,
    _karras,
    _to_d,
    _x_T,
)

from sdadapt.img2img import Img2ImgStart
from sdadapt.samplers import dpmpp_sde
from sdadapt.samplers.a1111_noise import A1111Noise
from sdadapt.samplers.dpmpp_sde import brownian_noise, dpmpp_sde_sample
from sdadapt.samplers.schedules import schedule_sigmas
from sdadapt.samplers.sigma_space import model_sigmas

pytest.importorskip("torchsde")


def _kd_dpmpp_sde(model, x, sigmas, noise_sampler, eta=1.0, s_noise=1.0, r=1 / 2):
    """k-diffusion 4601bf0 ``sample_dpmpp_sde`` (sampling.py:543-582) with a given ``noise_sampler``."""
    s_in = x.new_ones([x.shape[0]])
    sigma_fn = lambda t: t.neg().exp()  # (as k-diffusion writes them)
    t_fn = lambda sigma: sigma.log().neg()
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:  # Euler method
            d = _to_d(x, sigmas[i], denoised)
            dt = sigmas[i + 1] - sigmas[i]
            x = x + d * dt
        else:  # DPM-Solver++
            t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            fac = 1 / (2 * r)
            # Step 1
            sd, su = _ancestral(sigma_fn(t), sigma_fn(s), eta)
            s_ = t_fn(sd)
            x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise_sampler(sigma_fn(t), sigma_fn(s)) * s_noise * su
            denoised_2 = model(x_2, sigma_fn(s) * s_in)
            # Step 2
            sd, su = _ancestral(sigma_fn(t), sigma_fn(t_next), eta)
            t_next_ = t_fn(sd)
            denoised_d = (1 - fac) * denoised + fac * denoised_2
            x = (sigma_fn(t_next_) / sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
            x = x + noise_sampler(sigma_fn(t), sigma_fn(t_next)) * s_noise * su
    return x


def _keyed_noise(like: torch.Tensor):
    """A stand-in noise sampler: unit noise shaped like ``like`` (B,C,H,W), drawn from a seed of the queried σ pair's
    exact values (a query one ulp off, or swapped, draws other noise)."""
    def noise(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        seed = hash((float(sigma), float(sigma_next))) % 2**62
        return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed), dtype=like.dtype)
    return noise


@pytest.fixture
def keyed_tree(monkeypatch):
    """Replaces ``dpmpp_sde._BrownianNoise`` with :func:`_keyed_noise`; returns how the trees were built:
    ``[(σ_min, σ_max, dtype), ...]``."""
    made = []

    def tree(like, sigma_min, sigma_max, seed, source=None):
        made.append((sigma_min, sigma_max, like.dtype))
        return _keyed_noise(like)

    monkeypatch.setattr(dpmpp_sde, "_BrownianNoise", tree)
    return made


def _grid(schedule: str, steps: int) -> torch.Tensor:
    """A1111's float32 grid (k-diffusion's ``get_sigmas`` / ``get_sigmas_karras``; other schedules as
    tests/test_review_b22b.py pins them)."""
    if schedule == "uniform":
        return _get_sigmas(steps)
    if schedule == "karras":
        return _karras(steps)
    return schedule_sigmas(schedule, steps, model_sigmas(AC, F32))


def _ends(sigmas: torch.Tensor) -> tuple[float, float]:
    """k-diffusion's tree ends: ``sigmas[sigmas > 0].min(), sigmas.max()``."""
    return float(sigmas[sigmas > 0].min()), float(sigmas.max())


@pytest.mark.parametrize("schedule", ["uniform", "karras"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 7, 20])
def test_float32_latents_on_a1111_grids_are_k_diffusions_run(schedule, prediction_type, steps, keyed_tree):
    """Bit for bit (before: 4.3e-5 to 3.9e-4 relative off); the tree spans the grid's positive σ, float32."""
    x_T = _x_T(steps)
    sigmas = _grid(schedule, steps)
    want = _kd_dpmpp_sde(_denoiser(prediction_type), x_T * sigmas[0], sigmas, _keyed_noise(x_T))
    seen = []
    got = dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=AC, num_steps=steps, prediction_type=prediction_type,
                           schedule=schedule, noise_sampler_seed=3, callback=lambda i, t, x: seen.append(i))
    assert got.dtype == F32 and torch.equal(got, want), rel_err(got, want)
    assert seen == list(range(steps))
    assert keyed_tree == ([] if steps == 1 else [(*_ends(sigmas), F32)])  # (one step onto σ = 0: no tree)


@pytest.mark.parametrize(("schedule", "steps"), [("kl_optimal", 1), ("kl_optimal", 6), ("exponential", 9)])
def test_other_a1111_grids_and_a_last_step_above_zero(schedule, steps, keyed_tree):
    """KL Optimal ends at σ_min > 0: every step, the last too (one step alone: before, a crash), is a two-stage step."""
    x_T = _x_T(steps)
    sigmas = _grid(schedule, steps)
    want = _kd_dpmpp_sde(_denoiser("epsilon"), x_T * sigmas[0], sigmas, _keyed_noise(x_T))
    got = dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=AC, num_steps=steps, schedule=schedule, noise_sampler_seed=3)
    assert torch.equal(got, want), rel_err(got, want)
    assert keyed_tree == [(*_ends(sigmas), F32)]


@pytest.mark.parametrize(("schedule", "prediction_type"), [("karras", "epsilon"), ("uniform", "v_prediction")])
def test_the_real_brownian_tree_on_both_sides(schedule, prediction_type):
    """The real tree: one for the batch (``noise_sampler_seed``), and one per image with A1111's noise (its seeds,
    its CPU source inside the trees), k-diffusion's ``BrownianTreeNoiseSampler(x, σ_min, σ_max, seed)``."""
    steps = 7
    x_T = _x_T(steps)
    sigmas = _grid(schedule, steps)
    x = x_T * sigmas[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torchsde's "Should have ta>=t0" at the float32 ends)
        want = _kd_dpmpp_sde(_denoiser(prediction_type), x, sigmas, brownian_noise(x, *_ends(sigmas), 1234))
        per_image = _kd_dpmpp_sde(_denoiser(prediction_type), x, sigmas,
                                  brownian_noise(x, *_ends(sigmas), (5, 6), source="cpu"))
    got = dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=AC, num_steps=steps, prediction_type=prediction_type,
                           schedule=schedule, noise_sampler_seed=1234)
    assert torch.equal(got, want), rel_err(got, want)
    got = dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=AC, num_steps=steps, prediction_type=prediction_type,
                           schedule=schedule, generator=A1111Noise([5, 6], source="cpu"))
    assert torch.equal(got, per_image), rel_err(got, per_image)


@pytest.mark.parametrize("schedule", ["uniform", "karras", "kl_optimal"])
@pytest.mark.parametrize(("steps", "index"), [(10, 3), (7, 6)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_float32_img2img_starts_as_a1111(schedule, steps, index, prediction_type, keyed_tree):
    """A1111's ``sample_img2img``: k-diffusion on ``sigmas[index:]`` from ``init + noise·σ[index]``, the tree built on
    the untruncated ``sigmas`` (``create_noise_sampler(x, sigmas, p)``)."""
    init = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(99))
    sigmas = _grid(schedule, steps)
    x_T = _x_T(steps)
    want = _kd_dpmpp_sde(_denoiser(prediction_type), init + x_T * sigmas[index], sigmas[index:], _keyed_noise(x_T))
    got = dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=AC, num_steps=steps, prediction_type=prediction_type,
                           schedule=schedule, noise_sampler_seed=3, start=Img2ImgStart(init=init, index=index))
    assert got.dtype == F32 and torch.equal(got, want), rel_err(got, want)
    lands_on_zero = schedule != "kl_optimal" and index == steps - 1  # (one Euler step: no tree)
    assert keyed_tree == ([] if lands_on_zero else [(*_ends(sigmas), F32)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_latents_run_a1111s_float32_sampler(dtype, keyed_tree, monkeypatch):
    """Half latents: A1111 samples float32 x (its tree float32 too) and the model gets ``x·c_in`` in the model's
    dtype (its output upcast, as A1111's ``apply_model`` returns it with ``unet_needs_upcast``); the result comes back
    in the latents' dtype."""
    x_T = _x_T(8).to(dtype)
    sigmas = _karras(8)

    def half_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return stand_in(x.to(dtype), t).float()

    monkeypatch.setattr(kd32, "stand_in", half_model)  # (the reference denoiser's model)
    want = _kd_dpmpp_sde(_denoiser("epsilon"), x_T.float() * sigmas[0], sigmas, _keyed_noise(x_T.float()))
    seen = []

    def model(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append(x_in.dtype)
        return stand_in(x_in, t).float()

    got = dpmpp_sde_sample(model, x_T, alphas_cumprod=AC, num_steps=8, schedule="karras", noise_sampler_seed=3)
    assert got.dtype == dtype and torch.equal(got, want.to(dtype)) and set(seen) == {dtype}
    assert keyed_tree == [(*_ends(sigmas), F32)]


def test_float64_latents_run_the_same_form_in_float64(keyed_tree):
    """Float64 latents: k-diffusion's form on the float64 table and grid (a precise mode), a float64 tree: the float64
    transcription (its ``t(σ)`` handed to the model in float32, as sdadapt hands timesteps)."""
    table = ((1 - AC) / AC) ** 0.5  # (float64 ᾱ)
    ramp = torch.linspace(0, 1, 12, dtype=torch.float64)
    lo, hi = table[0].item() ** (1 / 7.0), table[-1].item() ** (1 / 7.0)
    sigmas = torch.cat([(hi + ramp * (lo - hi)) ** 7.0, torch.zeros(1, dtype=torch.float64)])
    x_T = _x_T(12).double()

    def model64(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        c_in = (1 / (s ** 2 + 1) ** 0.5)[:, None, None, None]
        return x - s[:, None, None, None] * stand_in(x * c_in, kdiffusion_sigma_to_t(table.log(), s).float())

    want = _kd_dpmpp_sde(model64, x_T * sigmas[0], sigmas, _keyed_noise(x_T))
    got = dpmpp_sde_sample(stand_in, x_T, alphas_cumprod=AC, num_steps=12, schedule="karras", noise_sampler_seed=3)
    assert got.dtype == torch.float64 and rel_err(got, want) < 1e-12, rel_err(got, want)
    assert keyed_tree == [(*_ends(sigmas), torch.float64)]
