"""A1111's "Schedule type" (``sdadapt.samplers.schedules``, ``sample_latents(schedule=...)``,
``generate --schedule``): each grid against a float64 transcription of A1111's ``modules/sd_schedulers.py`` /
k-diffusion's ``get_sigmas_*`` written here, Exponential and Beta against diffusers' ``use_exponential_sigmas``
/ ``use_beta_sigmas``, the samplers on a schedule against transcriptions of k-diffusion's loops, and the
option's resolution, refusals and wiring."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from sampler_stand_ins import SD_BETAS, stand_in

from sdadapt import samplers
from sdadapt.samplers import SCHEDULE_SAMPLERS, resolve_schedule, sample_latents
from sdadapt.samplers.dpm_solver import dpm_grid
from sdadapt.samplers.lcm import lcm_sigma_table
from sdadapt.samplers.schedules import SCHEDULES, canonical_schedule, schedule_sigmas
from sdadapt.samplers.sigma_space import discrete_sigmas, training_sigmas

stats = pytest.importorskip("scipy.stats")


def _sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def _rel_err(a, b) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


# ------------------------------------------------- A1111's schedules, transcribed (numpy, float64)
class KDiffusionSchedule:
    """k-diffusion's ``DiscreteSchedule`` (``CompVisDenoiser``, quantize off) on the training σ (ascending)."""

    def __init__(self, sigmas: np.ndarray):
        self.sigmas = sigmas
        self.log_sigmas = np.log(sigmas)

    def sigma_to_t(self, sigma: float) -> float:
        log_sigma = math.log(sigma)
        dists = log_sigma - self.log_sigmas
        low_idx = min(int(np.cumsum(dists >= 0).argmax()), len(self.sigmas) - 2)
        low, high = self.log_sigmas[low_idx], self.log_sigmas[low_idx + 1]
        w = min(max((low - log_sigma) / (low - high), 0.0), 1.0)
        return (1 - w) * low_idx + w * (low_idx + 1)

    def t_to_sigma(self, t: float) -> float:
        lo, hi, w = math.floor(t), math.ceil(t), t - math.floor(t)
        return math.exp((1 - w) * self.log_sigmas[lo] + w * self.log_sigmas[hi])

    def get_sigmas(self, n: int) -> list[float]:
        return [self.t_to_sigma(t) for t in np.linspace(len(self.sigmas) - 1, 0, n)] + [0.0]


def a1111_schedule(name: str, n: int, model: KDiffusionSchedule, *, sdxl: bool = False) -> list[float]:
    """A1111's ``sd_schedulers.py`` (and k-diffusion's ``get_sigmas_karras/exponential/polyexponential``) with
    σ_min, σ_max the model's, its default ρ and Beta (0.6, 0.6)."""
    s_min, s_max = float(model.sigmas[0]), float(model.sigmas[-1])
    if name == "uniform":
        return model.get_sigmas(n)
    if name == "karras":
        ramp = np.linspace(0, 1, n)
        return list((s_max ** (1 / 7) + ramp * (s_min ** (1 / 7) - s_max ** (1 / 7))) ** 7) + [0.0]
    if name == "exponential":
        return list(np.exp(np.linspace(math.log(s_max), math.log(s_min), n))) + [0.0]
    if name == "polyexponential":
        ramp = np.linspace(1, 0, n) ** 1.0
        return list(np.exp(ramp * (math.log(s_max) - math.log(s_min)) + math.log(s_min))) + [0.0]
    if name == "sgm_uniform":
        start, end = model.sigma_to_t(s_max), model.sigma_to_t(s_min)
        return [model.t_to_sigma(t) for t in np.linspace(start, end, n + 1)[:-1]] + [0.0]
    if name == "normal":
        start, end = model.sigma_to_t(s_max), model.sigma_to_t(s_min)
        return [model.t_to_sigma(t) for t in np.linspace(start, end, n)] + [0.0]
    if name == "kl_optimal":
        a_min, a_max = math.atan(s_min), math.atan(s_max)
        return [math.tan(i / n * a_min + (1.0 - i / n) * a_max) for i in range(n + 1)]
    if name.startswith("align_your_steps"):
        table = ([14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029] if sdxl else
                 [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029])
        if n != len(table):
            xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
            return list(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1]) + [0.0]
        return table + [0.0]
    if name == "simple":
        ss = len(model.sigmas) / n
        return [float(model.sigmas[-(1 + int(x * ss))]) for x in range(n)] + [0.0]
    if name == "ddim":
        ss, sigs, x = max(len(model.sigmas) // n, 1), [], 1
        while x < len(model.sigmas):
            sigs.append(float(model.sigmas[x]))
            x += ss
        return sigs[::-1] + [0.0]
    if name == "beta":
        ts = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
        return [s_min + x * (s_max - s_min) for x in ts] + [0.0]
    raise AssertionError(name)


CONCRETE = [s for s in SCHEDULES if s != "automatic"]


@pytest.mark.parametrize("name", CONCRETE)
@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 30, 333])
def test_schedules_are_a1111s_formulas(name, n):
    train = training_sigmas(_sd_alphas_cumprod())
    model = KDiffusionSchedule(train.numpy())
    got = schedule_sigmas(name, n, train)
    want = a1111_schedule(name, n, model, sdxl=name.endswith("sdxl"))
    assert got.dtype == torch.float64 and got.shape == (len(want),)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert (got[:-1] > 0).all() and (got[:-1].diff() < 0).all()  # descending (AYS: also its 0.029 end)


def test_schedule_shapes_and_ends():
    """What each grid is for: the ends A1111 puts there, the step count (``ddim``'s is its own), AYS's table."""
    train = training_sigmas(_sd_alphas_cumprod())
    s_min, s_max = float(train[0]), float(train[-1])
    for name in ("karras", "exponential", "polyexponential", "beta", "uniform", "normal", "sgm_uniform"):
        grid = schedule_sigmas(name, 20, train)
        assert grid.shape == (21,) and float(grid[-1]) == 0.0 and math.isclose(float(grid[0]), s_max, rel_tol=1e-12)
    assert math.isclose(float(schedule_sigmas("kl_optimal", 20, train)[-1]), s_min, rel_tol=1e-12)  # ends on σ_min
    assert schedule_sigmas("ddim", 30, train).shape == (32,)  # k = 33: t = 1, 34, ..., 991: 31 steps
    assert schedule_sigmas("ddim", 7, train).shape == (9,)  # k = 142: t = 1, 143, ..., 995: 8 steps for 7
    assert schedule_sigmas("align_your_steps", 11, train)[:-1].tolist() == [14.615, 6.475, 3.861, 2.697, 1.886, 1.396,
                                                                            0.963, 0.652, 0.399, 0.152, 0.029]
    assert float(schedule_sigmas("align_your_steps_sdxl", 11, train)[1]) == 6.315
    with pytest.raises(ValueError, match="depends on the sampler"):
        schedule_sigmas("automatic", 5, train)


def test_names_and_labels():
    assert canonical_schedule("SGM Uniform") == "sgm_uniform" == canonical_schedule("SGMUniform")
    assert canonical_schedule("Align Your Steps") == "align_your_steps"
    assert canonical_schedule("KL Optimal") == "kl_optimal" == canonical_schedule("kl-optimal")
    with pytest.raises(ValueError, match="unknown schedule 'Karras Exponential'.*'SGM Uniform'"):
        canonical_schedule("Karras Exponential")


# ------------------------------------------------- against diffusers' use_exponential_sigmas / use_beta_sigmas
@pytest.mark.parametrize("option", ["exponential", "beta"])
@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "LMSDiscreteScheduler", "DPMSolverMultistepScheduler",
                                 "UniPCMultistepScheduler", "DPMSolverSinglestepScheduler"])
def test_exponential_and_beta_are_diffusers_grids(cls, option):
    """σ equal to diffusers' (float32) from 2 steps up (at 1 step diffusers' discrete classes take σ_min as
    both ends, their one timestep being t = 0; A1111 and sdadapt take the model's σ_max). Timesteps: the
    discrete classes' unrounded t(σ); DPM-Solver/UniPC: sdadapt rounds t(σ) as for Karras σ, diffusers
    truncates (its int64 cast), so they are the same or sdadapt's is one more."""
    diffusers = pytest.importorskip("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in (2, 3, 7, 20, 50):
            sched = getattr(diffusers, cls)(**SD_BETAS, **{f"use_{option}_sigmas": True})
            sched.set_timesteps(n)
            if cls.startswith(("Euler", "LMS")):
                t, sig = discrete_sigmas(sched.alphas_cumprod, n, schedule=option)
                assert (t - sched.timesteps.double()).abs().max() < 1e-4
            else:
                t, sig = dpm_grid(sched.alphas_cumprod, n, schedule=option)
                assert ((t - sched.timesteps) >= 0).all() and ((t - sched.timesteps) <= 1).all()
            assert _rel_err(sig, sched.sigmas) < 1e-7, (n, _rel_err(sig, sched.sigmas))  # (measured ≤ 4.6e-8)


def test_euler_on_the_exponential_grid_is_diffusers_loop():
    diffusers = pytest.importorskip("diffusers")
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    for n in (2, 5, 20):
        sched = diffusers.EulerDiscreteScheduler(**SD_BETAS, use_exponential_sigmas=True)
        sched.set_timesteps(n)
        x = x_T * sched.init_noise_sigma
        for t in sched.timesteps:
            x = sched.step(stand_in(sched.scale_model_input(x, t), t.expand(2)), t, x).prev_sample
        got = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler="euler",
                             alphas_cumprod=sched.alphas_cumprod, num_steps=n, schedule="Exponential")
        assert _rel_err(got, x) < 2e-5, _rel_err(got, x)


# ------------------------------------------------- the samplers on a schedule: k-diffusion's loops, transcribed
def _kd_denoiser(model: KDiffusionSchedule):
    """CompVisDenoiser on the stand-in ε model: D(x, σ) = x − σ·ε(x/√(σ²+1), t(σ)), t unrounded, held in float32
    (as A1111's float32 σ and the UNet's timestep embedding hold it; sdadapt passes float32 timesteps)."""
    def denoise(x, sigma):
        t = torch.full((x.shape[0],), model.sigma_to_t(sigma), dtype=torch.float32).double()
        return x - sigma * stand_in(x / math.sqrt(sigma**2 + 1), t)
    return denoise


def kd_sample_euler(denoise, x, sigmas):
    for i in range(len(sigmas) - 1):
        d = (x - denoise(x, sigmas[i])) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def kd_sample_heun(denoise, x, sigmas):
    for i in range(len(sigmas) - 1):
        d = (x - denoise(x, sigmas[i])) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(x_2, sigmas[i + 1])) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def kd_sample_dpmpp_2m(denoise, x, sigmas):
    """k-diffusion's ``sample_dpmpp_2m`` (sampling.py:585-608 at 4601bf0), in float64."""
    old = None
    for i in range(len(sigmas) - 1):
        den = denoise(x, sigmas[i])
        t, t_next = -math.log(sigmas[i]), (-math.log(sigmas[i + 1]) if sigmas[i + 1] > 0 else math.inf)
        h = t_next - t
        if old is None or sigmas[i + 1] == 0:
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * den
        else:
            r = (t - (-math.log(sigmas[i - 1]))) / h
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * ((1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old)
        old = den
    return x


@pytest.mark.parametrize("sampler, loop", [("euler", kd_sample_euler), ("heun", kd_sample_heun)])
@pytest.mark.parametrize("schedule", ["uniform", "sgm_uniform", "kl_optimal", "ddim", "align_your_steps", "beta"])
def test_sigma_samplers_on_a_schedule_are_k_diffusion(sampler, loop, schedule):
    """sdadapt's sampler on A1111's grid is k-diffusion's function on that grid (float64, 1e-10): the model at
    unrounded t(σ) (log-σ interpolation), the steps the grid has (``ddim``: its own count), a last σ above 0
    (``kl_optimal``) stepped as any other."""
    ac = _sd_alphas_cumprod()
    model = KDiffusionSchedule(training_sigmas(ac).numpy())
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for n in (1, 4, 9):
        sig = a1111_schedule(schedule, n, model)
        steps = []
        got = sample_latents(lambda x, t, c: stand_in(x, t.double()), x_T, None, sampler=sampler, alphas_cumprod=ac,
                             num_steps=n, schedule=schedule, callback=lambda i, t, x, seen=steps: seen.append(i))
        want = loop(_kd_denoiser(model), x_T * sig[0], sig)
        assert steps == list(range(len(sig) - 1))
        assert _rel_err(got, want) < 1e-10, (n, _rel_err(got, want))


@pytest.mark.parametrize("sampler", ["euler", "dpm_2", "dpmpp_sde"])
def test_a_schedule_ignores_the_timestep_spacing(sampler):
    """On a schedule the start is x_T·σ_0 whatever ``spacing`` says (diffusers' ``leading`` √(σ_max² + 1) is its own
    grid's)."""
    pytest.importorskip("torchsde") if sampler == "dpmpp_sde" else None
    ac = _sd_alphas_cumprod().float()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    run = lambda **kw: sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=sampler, alphas_cumprod=ac,
                                      num_steps=5, schedule="exponential", generator=torch.Generator().manual_seed(1),
                                      **kw)
    assert torch.equal(run(spacing="leading", steps_offset=1), run())


@pytest.mark.parametrize("schedule", ["exponential", "kl_optimal", "simple"])
def test_dpmpp_2m_on_a_schedule_is_k_diffusions(schedule):
    """``dpmsolver++`` on a schedule (float64 latents): k-diffusion's ``sample_dpmpp_2m`` on the same σ, the model at
    the unrounded t(σ) (float32, as passed to the model), as A1111 runs it, 1e-10: second order up to a last step onto σ_min (``kl_optimal``), whose
    σ-scaled sample is returned as k-diffusion returns it. (Before: diffusers' update at rounded timesteps, first order
    onto σ_min below 15 steps, the VP sample; float32 latents: tests/test_kdiffusion_float32_dpmpp.py, bit for bit.)"""
    ac = _sd_alphas_cumprod()
    model = KDiffusionSchedule(training_sigmas(ac).numpy())
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)

    for n in (2, 6, 16):
        sig = a1111_schedule(schedule, n, model)
        got = sample_latents(lambda x, t, c: stand_in(x, t.double()), x_T, None, sampler="dpmsolver++",
                             alphas_cumprod=ac, num_steps=n, schedule=schedule)
        want = kd_sample_dpmpp_2m(_kd_denoiser(model), x_T * sig[0], sig)
        assert _rel_err(got, want) < 1e-10, (n, _rel_err(got, want))


# ------------------------------------------------- A1111's discard_next_to_last_sigma (DPM2, DPM2 a, DPM++ 3M SDE)
#: A1111 ≥ 1.9's ``samplers_k_diffusion``: the labels whose options have ``discard_next_to_last_sigma: True``
A1111_DISCARD_LABELS = ("DPM2", "DPM2 a", "DPM++ 3M SDE")


def a1111_get_sigmas(name: str, n: int, model: KDiffusionSchedule, *, discard: bool) -> list[float]:
    """A1111's ``KDiffusionSampler.get_sigmas`` (modules/sd_samplers_kdiffusion.py) for a resolved schedule:
    ``steps += 1`` when discarding, the schedule's function for ``steps``, then ``cat([sigmas[:-2], sigmas[-1:]])``."""
    sigmas = a1111_schedule(name, n + 1 if discard else n, model)
    return sigmas[:-2] + sigmas[-1:] if discard else sigmas


def test_the_discard_samplers_are_a1111s():
    from sdadapt.samplers.labels import sampler_from_label

    assert set(samplers.DISCARD_NEXT_TO_LAST_SIGMA) == {sampler_from_label(label)[0] for label in A1111_DISCARD_LABELS}


@pytest.mark.parametrize("name", ["uniform", "karras", "exponential", "kl_optimal", "ddim", "align_your_steps", "beta"])
@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_discarded_grids_are_a1111s_get_sigmas(name, n):
    train = training_sigmas(_sd_alphas_cumprod())
    model = KDiffusionSchedule(train.numpy())
    got = schedule_sigmas(name, n, train, discard_next_to_last_sigma=True)
    want = a1111_get_sigmas(name, n, model, discard=True)
    assert got.shape == (len(want),)
    assert torch.allclose(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    assert (got[:-1].diff() < 0).all() and float(got[-1]) == float(schedule_sigmas(name, n, train)[-1])
    if name != "ddim":  # n steps still (ddim: its own count for n + 1, less one)
        assert got.shape == (n + 1,)
    if n > 1:  # (one step: σ_0 then the end, either way)
        assert not torch.equal(got, schedule_sigmas(name, n, train))


def kd_sample_dpm_2(denoise, x, sigmas):
    """k-diffusion's ``sample_dpm_2`` (s_churn = 0): ``denoise(x, σ, mid)``, ``mid`` for the log-midpoint call."""
    for i in range(len(sigmas) - 1):
        d = (x - denoise(x, sigmas[i], False)) / sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            mid = math.exp(0.5 * (math.log(sigmas[i]) + math.log(sigmas[i + 1])))
            x_2 = x + d * (mid - sigmas[i])
            d_2 = (x_2 - denoise(x_2, mid, True)) / mid
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
    return x


@pytest.mark.parametrize("schedule", ["Automatic", "exponential", "kl_optimal", "ddim"])
def test_dpm2_on_a_schedule_runs_a1111s_discarded_grid(schedule):
    """``dpm_2`` with a schedule is k-diffusion's ``sample_dpm_2`` on A1111's grid for DPM2 (n + 1 σ, the
    next-to-last dropped; "Automatic": Karras), n steps, the model at the unrounded t(σ) held in float32 (before:
    t(σ_i) rounded, diffusers' KDPM2 rule, 4e-4 to 3e-3 off A1111): float64, 1e-10."""
    ac = _sd_alphas_cumprod()
    model = KDiffusionSchedule(training_sigmas(ac).numpy())
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def denoise(x, sigma, mid):
        t = torch.full((x.shape[0],), model.sigma_to_t(sigma), dtype=torch.float32).double()
        return x - sigma * stand_in(x / math.sqrt(sigma**2 + 1), t.double())

    resolved = "karras" if schedule == "Automatic" else schedule
    for n in (1, 3, 8):
        sig = a1111_get_sigmas(resolved, n, model, discard=True)
        steps = []
        got = sample_latents(lambda x, t, c: stand_in(x, t.double()), x_T, None, sampler="dpm_2", alphas_cumprod=ac,
                             num_steps=n, schedule=schedule, callback=lambda i, t, x, seen=steps: seen.append(i))
        want = kd_sample_dpm_2(denoise, x_T * sig[0], sig)
        assert steps == list(range(len(sig) - 1))
        assert len(steps) == (n if schedule != "ddim" else len(steps))
        assert _rel_err(got, want) < 1e-10, (n, _rel_err(got, want))


@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_a", "dpmsolver++_3m_sde"])
@pytest.mark.parametrize("schedule", ["Automatic", "karras", "uniform", "beta"])
def test_the_discard_samplers_step_a1111s_sigmas(sampler, schedule):
    """The σ each step starts from (the model's timestep t(σ_i), unrounded, as A1111 calls the model) is A1111's
    discarded grid's, for n steps (float32 latents: A1111's float32 table, so within 1e-2 of the float64 t(σ); rounding moves it up to 0.5)."""
    ac = _sd_alphas_cumprod()
    model = KDiffusionSchedule(training_sigmas(ac).numpy())
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(7))
    resolved = resolve_schedule(samplers.canonical_sampler(sampler), schedule)
    for n in (2, 9):
        seen = []
        out = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=sampler, alphas_cumprod=ac.float(),
                             num_steps=n, schedule=schedule, generator=torch.Generator().manual_seed(1),
                             callback=lambda i, t, x, seen=seen: seen.append(float(t[0])))
        sig = a1111_get_sigmas(resolved, n, model, discard=True)
        assert torch.isfinite(out).all() and len(seen) == n
        assert seen == pytest.approx([model.sigma_to_t(s) for s in sig[:-1]], abs=1e-2), (n, seen)


def test_without_a_schedule_the_discard_samplers_are_unchanged():
    """No ``schedule``: diffusers' grids (plain and ``karras=True``), bit for bit the sampler functions run without
    the option; ``discard_next_to_last_sigma`` on the grid builders is unused without a schedule."""
    from sdadapt.samplers.dpm2 import dpm2_ancestral_sample, dpm2_sample
    from sdadapt.samplers.dpm_solver import dpmsolver_pp_3m_sde_sample

    ac = _sd_alphas_cumprod().float()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(8))
    for name, fn in (("dpm_2", dpm2_sample), ("dpm_2_a", dpm2_ancestral_sample),
                     ("dpmsolver++_3m_sde", dpmsolver_pp_3m_sde_sample)):
        for karras in (False, True):
            got = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=name, alphas_cumprod=ac,
                                 num_steps=6, karras=karras, generator=torch.Generator().manual_seed(2))
            want = fn(lambda x, t: stand_in(x, t), x_T, alphas_cumprod=ac, num_steps=6, karras=karras,
                      generator=torch.Generator().manual_seed(2))
            assert torch.equal(got, want), (name, karras)
    for karras in (False, True):
        assert all(torch.equal(a, b) for a, b in zip(discrete_sigmas(ac, 6, karras=karras),
                                                     discrete_sigmas(ac, 6, karras=karras,
                                                                     discard_next_to_last_sigma=True)))
        assert all(torch.equal(a, b) for a, b in zip(dpm_grid(ac, 6, karras=karras),
                                                     dpm_grid(ac, 6, karras=karras, discard_next_to_last_sigma=True)))


def test_always_discard_is_a1111s_setting():
    """``discard_next_to_last_sigma=True`` (A1111's "Always discard next-to-last sigma"): Euler is k-diffusion's
    ``sample_euler`` on the discarded grid (1e-10); ``False`` puts DPM2 back on the plain grid (``sample_dpm_2``
    there); ``True`` needs a schedule; on A1111's own DDIM (``ddim`` with a schedule) one more timestep."""
    ac = _sd_alphas_cumprod()
    model = KDiffusionSchedule(training_sigmas(ac).numpy())
    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    run = lambda sampler, **kw: sample_latents(lambda x, t, c: stand_in(x, t.double()), x_T, None, sampler=sampler,
                                               alphas_cumprod=ac, num_steps=6, **kw)
    sig = a1111_get_sigmas("uniform", 6, model, discard=True)
    want = kd_sample_euler(_kd_denoiser(model), x_T * sig[0], sig)
    assert _rel_err(run("euler", schedule="Automatic", discard_next_to_last_sigma=True), want) < 1e-10
    assert _rel_err(run("euler", schedule="Automatic"), want) > 1e-4  # (Euler: A1111 does not discard by itself)

    def denoise(x, sigma, mid):  # (float64 latents: "karras" undiscarded is karras=True, KDPM2's rounded t(σ_i))
        t = model.sigma_to_t(sigma)
        t = torch.full((x.shape[0],), t, dtype=torch.float32).double() if mid else torch.full((x.shape[0],), round(t))
        return x - sigma * stand_in(x / math.sqrt(sigma**2 + 1), t.double())

    sig = a1111_get_sigmas("karras", 6, model, discard=False)
    plain = kd_sample_dpm_2(denoise, x_T * sig[0], sig)
    assert _rel_err(run("dpm_2", schedule="Automatic", discard_next_to_last_sigma=False), plain) < 1e-10
    with pytest.raises(ValueError, match="discard_next_to_last_sigma=True .* give a schedule"):
        run("dpm_2", karras=True, discard_next_to_last_sigma=True)
    # (ddim with a schedule is A1111's own DDIM, whose get_timesteps takes the setting too: one timestep more)
    from sdadapt.samplers.a1111_timesteps import a1111_ddim_sample

    own = a1111_ddim_sample(lambda x, t: stand_in(x, t.double()), x_T, alphas_cumprod=ac, num_steps=6,
                            discard_next_to_last_sigma=True)
    assert torch.equal(run("ddim", schedule="Automatic", discard_next_to_last_sigma=True), own)
    assert not torch.equal(run("ddim", schedule="Automatic"), own)


@pytest.mark.parametrize("name", SCHEDULE_SAMPLERS)
def test_every_schedule_sampler_takes_always_discard(name):
    """Every σ sampler with ``discard_next_to_last_sigma=True``: n steps on the discarded grid (finite, its own
    result); the three A1111 discards for are the same with ``None`` (their default) and ``True``."""
    pytest.importorskip("torchsde") if name == "dpmpp_sde" else None
    ac = _sd_alphas_cumprod().float()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    outs = {}
    for discard in (None, True, False):
        steps = []
        outs[discard] = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=name, alphas_cumprod=ac,
                                       num_steps=7, schedule="exponential", discard_next_to_last_sigma=discard,
                                       generator=torch.Generator().manual_seed(1),
                                       callback=lambda i, t, x, seen=steps: seen.append(i))
        assert torch.isfinite(outs[discard]).all() and steps == list(range(7)), (discard, steps)
    assert _rel_err(outs[True], outs[False]) > 1e-4
    assert torch.equal(outs[None], outs[True] if name in samplers.DISCARD_NEXT_TO_LAST_SIGMA else outs[False])


# ------------------------------------------------- resolution, refusals, every sampler on every grid
def test_resolution_automatic_karras_and_refusals():
    assert resolve_schedule("euler", None) is None
    assert resolve_schedule("dpmsolver++", "Automatic") == "karras"  # A1111 ≥ 1.9's pick for DPM++ 2M
    assert resolve_schedule("dpmsolver++_3m_sde", "automatic") == "exponential"
    assert resolve_schedule("dpm_2_a", "automatic") == "karras"
    assert resolve_schedule("euler_a", "automatic") == "uniform"
    assert resolve_schedule("heun", "SGM Uniform") == "sgm_uniform"
    for name in ("ddim", "dpm_fast", "dpm_adaptive"):  # A1111's "Automatic": their own steps
        assert resolve_schedule(name, "Automatic") is None
    assert resolve_schedule("lcm", "Automatic") == "uniform"  # A1111's LCM: its denoiser's get_sigmas
    for name in ("ddim", "ddpm", "pndm"):
        with pytest.raises(ValueError, match=f"sampler '{name}' takes no schedule: .*"):
            resolve_schedule(name, "exponential")
    with pytest.raises(ValueError, match="karras and schedule 'beta'"):
        resolve_schedule("euler", "beta", karras=True)
    assert resolve_schedule("euler", "karras", karras=True) == "karras"
    assert set(SCHEDULE_SAMPLERS) == set(samplers.SAMPLERS) - {"ddim", "ddpm", "pndm", "dpm_fast", "dpm_adaptive",
                                                               "plms", "ddim_cfgpp", "unipc_a1111"}


#: A1111 ≥ 1.9's ``samplers_k_diffusion`` (modules/sd_samplers_kdiffusion.py): label -> its option ``scheduler``
#: (None: no option, "Automatic" is k-diffusion's ``get_sigmas``, the Uniform grid)
A1111_SCHEDULER_OPTION = {"DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2M SDE": "exponential",
                          "DPM++ 2M SDE Heun": "exponential", "DPM++ 2S a": "karras", "DPM++ 3M SDE": "exponential",
                          "Euler a": None, "Euler": None, "LMS": None, "Heun": None, "DPM2": "karras",
                          "DPM2 a": "karras", "DPM fast": None, "DPM adaptive": None, "Restart": "karras"}


@pytest.mark.parametrize("label, option", A1111_SCHEDULER_OPTION.items())
def test_automatic_is_a1111s_per_sampler_option(label, option):
    from sdadapt.samplers.labels import sampler_from_label

    name, _ = sampler_from_label(label)
    want = None if name in ("dpm_fast", "dpm_adaptive") else option or "uniform"  # (those two: their own steps)
    assert resolve_schedule(name, "Automatic") == want, label


def test_schedule_karras_is_the_karras_option():
    """``schedule="karras"`` is ``karras=True``, but on DPM2, DPM2 a and DPM++ 3M SDE, where it is A1111's grid
    (n + 1 Karras σ, the next-to-last dropped) and ``karras=True`` alone diffusers' (n Karras σ); and on Euler, Heun,
    LMS, DPM++ 2S a, DPM++ SDE, DPM++ 2M, 2M SDE and 2M SDE Heun with float32 latents, where it is A1111's float32
    Karras grid and k-diffusion's run (k-diffusion's bits: tests/test_review_b22b.py, tests/test_kdiffusion_float32_
    dpmpp.py, tests/test_kdiffusion_float32_dpmpp_sde.py) — the same grid as ``karras=True``'s float64 one within
    float32 rounding (DPM++ SDE: diffusers' step arithmetic, 2e-4; the DPM-Solver++ ones: unrounded timesteps where
    diffusers rounds, up to 1e-2) — while on float64 latents it is ``karras=True``."""
    ac = _sd_alphas_cumprod().float()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    for name in samplers.KARRAS_SAMPLERS:
        def run(name=name, x_T=x_T, **kw):
            return sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=name, alphas_cumprod=ac,
                                  num_steps=5, generator=torch.Generator().manual_seed(1), **kw)

        if name in samplers.DISCARD_NEXT_TO_LAST_SIGMA:
            assert _rel_err(run(schedule="Karras"), run(karras=True)) > 1e-4, name
            assert torch.equal(run(schedule="Karras"), run(schedule="Karras", karras=True)), name
            if name != "dpmsolver++_3m_sde":  # (A1111's pick for DPM2, DPM2 a: Karras; for DPM++ 3M SDE: Exponential)
                assert torch.equal(run(schedule="Karras"), run(schedule="Automatic")), name
        elif name in samplers._A1111_FLOAT32:
            a1111, diffusers = run(schedule="Karras"), run(karras=True)
            bound = 1e-4 if name in ("euler", "heun", "lms", "dpmpp_2s_a") else 1e-3 if name == "dpmpp_sde" else 3e-2
            assert not torch.equal(a1111, diffusers) and _rel_err(a1111, diffusers) < bound, name
            assert torch.equal(a1111, run(schedule="Karras", discard_next_to_last_sigma=False)), name
            x64 = x_T.double()
            assert torch.equal(run(x_T=x64, schedule="Karras"), run(x_T=x64, karras=True)), name
        else:
            assert torch.equal(run(schedule="Karras"), run(karras=True)), name


@pytest.mark.parametrize("name", SCHEDULE_SAMPLERS)
def test_every_schedule_sampler_runs_every_schedule(name):
    """Finite results, one callback per step of the grid (``ddim``'s count its own), and each grid gives its
    own result."""
    pytest.importorskip("torchsde") if name == "dpmpp_sde" else None
    ac = _sd_alphas_cumprod().float()
    x_T = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    results = {}
    for schedule in CONCRETE:
        if schedule == "align_your_steps_sdxl":
            continue
        steps = []
        out = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=name, alphas_cumprod=ac, num_steps=7,
                             schedule=schedule, generator=torch.Generator().manual_seed(1),
                             callback=lambda i, t, x, seen=steps: seen.append(i))
        assert torch.isfinite(out).all(), schedule
        table = lcm_sigma_table(ac) if name == "lcm" else training_sigmas(ac)  # (A1111's LCM: its 50 σ)
        expected = len(schedule_sigmas(schedule, 7, table,
                                       discard_next_to_last_sigma=name in samplers.DISCARD_NEXT_TO_LAST_SIGMA)) - 1
        assert steps == list(range(expected)), (schedule, steps)
        results[schedule] = out
    assert _rel_err(results["exponential"], results["karras"]) > 1e-4
    assert _rel_err(results["beta"], results["uniform"]) > 1e-4


# ------------------------------------------------- the command
def test_generate_command_takes_a_schedule(tmp_path, monkeypatch, capsys):
    import sdadapt.jobs
    from sdadapt.cli import main

    seen = []
    monkeypatch.setattr(sdadapt.jobs, "run_generate", lambda **kw: seen.append(kw) or {"files": []})
    out = str(tmp_path / "a.png")
    assert main(["generate", "--prompt", "x", "-o", out, "--sampler", "Euler a", "--schedule", "Align Your Steps"]) == 0
    assert (seen[-1]["sampler"], seen[-1]["schedule"]) == ("Euler a", "Align Your Steps")
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "-o", out, "--schedule", "Karras Exponential"])
    assert "argument --schedule: unknown schedule 'Karras Exponential'" in capsys.readouterr().err


def test_run_generate_with_a_schedule_end_to_end(tmp_path):
    """The toy model through ``run_generate``: a label's " Exponential" is the Exponential grid (the same image
    as ``schedule="exponential"``), another schedule another image, and the refusals say which option."""
    from PIL import Image

    from sdadapt.jobs import run_generate

    def image(name, **kw):
        run_generate(prompt="a red circle", out=tmp_path / name, steps=4, seed=1, **kw)
        return np.asarray(Image.open(tmp_path / name)).astype(np.int16)

    label = image("label.png", sampler="DPM++ 3M SDE Exponential")
    named = image("named.png", sampler="dpmsolver++_3m_sde", schedule="exponential")
    other = image("other.png", sampler="dpmsolver++_3m_sde", schedule="KL Optimal")
    assert np.array_equal(label, named) and not np.array_equal(label, other)
    # (ddim given any schedule is A1111's DDIM, which A1111 runs on its timesteps whatever the type: taken)
    with pytest.raises(ValueError, match="--schedule: sampler 'ddpm' takes no schedule"):
        run_generate(prompt="x", out=tmp_path / "d.png", sampler="ddpm", schedule="beta")
    with pytest.raises(ValueError, match="--schedule 'beta' and the sampler label's 'exponential' grid disagree"):
        run_generate(prompt="x", out=tmp_path / "d.png", sampler="DPM++ 3M SDE Exponential", schedule="beta")


def test_a_tiny_sd_model_samples_on_a_schedule(tmp_path):
    """``generate`` on a tiny random SD1 UNet (DiffusersSystem): ``schedule=`` reaches the sampler (the latents of
    ``sample_latents`` on that grid, decoded), ``"Karras"`` is ``karras=True``'s grid (DPM2: A1111's other grid; Heun on
    float32 latents: in float32, A1111's arithmetic), and no schedule is the diffusers grid."""
    from test_cli_train import _tiny_pipeline

    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.sampling import generate

    system = DiffusersSystem.from_folder(_tiny_pipeline(tmp_path / "pipe"))
    run = lambda **kw: generate(system, ["a photo"], seed=3, steps=4, guidance=3.0, height=32, width=32, **kw)
    exp = run(sampler="euler", schedule="Exponential")
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, *system.latent_shape(32, 32), generator=g)
    with torch.no_grad():
        latents = sample_latents(system.denoiser(), x, system.condition(system.tokenize(["a photo"])), sampler="euler",
                                 alphas_cumprod=system.alphas_cumprod, num_steps=4,
                                 uncond=system.condition(system.tokenize([""])), guidance_scale=3.0,
                                 prediction_type=system.prediction_type, generator=g, schedule="exponential")
        want = system.decode_latents(latents)
    assert _rel_err(exp, want) < 1e-5
    # Heun Karras on float32 latents: A1111's float32 Karras grid, within float32 rounding of karras=True's float64 one
    heun_a1111, heun_diffusers = run(sampler="heun", schedule="karras"), run(sampler="heun", karras=True)
    assert not torch.equal(heun_a1111, heun_diffusers) and _rel_err(heun_a1111, heun_diffusers) < 1e-4
    # DPM2 on a schedule: A1111's grid (n + 1 Karras σ, the next-to-last dropped), not diffusers' Karras σ
    assert _rel_err(run(sampler="dpm_2", schedule="karras"), run(sampler="dpm_2", karras=True)) > 1e-4
    assert _rel_err(run(sampler="euler"), exp) > 1e-4
