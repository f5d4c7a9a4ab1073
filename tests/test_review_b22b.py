"""Review (b22, second pass) of 9d857cb: the float32 A1111 path beyond what tests/test_kdiffusion_float32.py pins
(Uniform and Karras from the first step). Here every other A1111 schedule, img2img starts and half latents, each
against A1111's code transcribed in float32 (modules/sd_schedulers.py of A1111 1.10 — ``normal_scheduler``,
``simple_scheduler``, ``ddim_scheduler``, ``beta_scheduler``, ``get_align_your_steps_sigmas``, ``kl_optimal`` —
k-diffusion 4601bf0 ``get_sigmas_exponential`` / ``_polyexponential`` sampling.py:26-36, and
``KDiffusionSampler.sample_img2img``: ``sigmas[steps - t_enc - 1:]``, ``xi = x + noise · sigma_sched[0]``).
All bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sampler_stand_ins import rel_err, stand_in
from test_dpm_adaptive_float32 import (
    AC,
    F32,
    LOG_SIGMAS,
    SIGMAS,
    _get_sigmas,
    _sigma_to_t,
)
from test_kdiffusion_float32 import (
    SAMPLERS,
    _denoiser,
    _karras,
    _kd_dpmpp_2s_ancestral,
    _kd_euler,
    _kd_euler_ancestral,
    _kd_heun,
    _run_reference,
    _x_T,
)

from sdadapt.img2img import Img2ImgStart
from sdadapt.samplers.schedules import ScheduleOptions, schedule_sigmas
from sdadapt.samplers.sigma_space import discrete_start, grid_table, model_sigmas

S_MIN, S_MAX = SIGMAS[0].item(), SIGMAS[-1].item()  # (A1111: model_wrap.sigmas[0].item(), [-1].item())


def _t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ``DiscreteSchedule.t_to_sigma`` (external.py:79-83) on the float32 table."""
    t = t.float()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * LOG_SIGMAS[low] + w * LOG_SIGMAS[high]).exp()


def _a1111_grid(name: str, n: int) -> torch.Tensor:
    """A1111's ``get_sigmas`` for schedule ``name`` and ``n`` steps at its default settings (float32, CPU)."""
    if name == "exponential":
        return torch.cat([torch.linspace(math.log(S_MAX), math.log(S_MIN), n).exp(), torch.zeros(1)])
    if name == "polyexponential":
        ramp = torch.linspace(1, 0, n) ** 1.0
        return torch.cat([torch.exp(ramp * (math.log(S_MAX) - math.log(S_MIN)) + math.log(S_MIN)), torch.zeros(1)])
    if name in ("normal", "sgm_uniform"):
        start, end = _sigma_to_t(torch.tensor([S_MAX]))[0], _sigma_to_t(torch.tensor([S_MIN]))[0]
        ts = torch.linspace(start, end, n + 1)[:-1] if name == "sgm_uniform" else torch.linspace(start, end, n)
        return torch.FloatTensor([_t_to_sigma(ts[i]) for i in range(len(ts))] + [0.0])
    if name == "simple":
        ss = len(SIGMAS) / n
        return torch.FloatTensor([float(SIGMAS[-(1 + int(x * ss))]) for x in range(n)] + [0.0])
    if name == "ddim":
        c, x, sigs = len(SIGMAS) // n, 1, []
        while x < len(SIGMAS):
            sigs.append(float(SIGMAS[x]))
            x += c
        return torch.FloatTensor(sigs[::-1] + [0.0])
    if name == "beta":
        stats = pytest.importorskip("scipy.stats")
        ts = [stats.beta.ppf(x, 0.6, 0.6) for x in 1 - np.linspace(0, 1, n)]
        return torch.FloatTensor([S_MIN + x * (S_MAX - S_MIN) for x in ts] + [0.0])
    if name == "align_your_steps":
        sigs = [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029]
        if n == len(sigs):
            return torch.FloatTensor(sigs + [0.0])
        xs, ys = np.linspace(0, 1, len(sigs)), np.log(sigs[::-1])
        return torch.FloatTensor(np.append(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1].copy(), [0.0]))
    if name == "kl_optimal":
        i = torch.arange(n + 1)
        return torch.tan(i / n * torch.arctan(torch.tensor(S_MIN)) + (1.0 - i / n) * torch.arctan(torch.tensor(S_MAX)))
    if name == "uniform":
        return _get_sigmas(n)
    if name == "karras":
        return _karras(n)
    raise AssertionError(name)


def _reference_from(sampler: str, model, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ``sampler`` from the first sample ``x`` itself (img2img's ``xi``), noise as in
    :func:`_run_reference`."""
    if sampler in ("euler", "heun"):
        return (_kd_euler if sampler == "euler" else _kd_heun)(model, x, sigmas)
    g = torch.Generator().manual_seed(7)
    ancestral = _kd_euler_ancestral if sampler == "euler_a" else _kd_dpmpp_2s_ancestral
    return ancestral(model, x, sigmas, lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype))


OTHER_SCHEDULES = ["exponential", "polyexponential", "normal", "sgm_uniform", "simple", "ddim", "beta",
                   "align_your_steps", "kl_optimal"]


@pytest.mark.parametrize("schedule", OTHER_SCHEDULES)
@pytest.mark.parametrize("steps", [5, 11])
def test_every_a1111_schedule_is_a1111s_float32_grid_and_run(schedule, steps):
    """The float32 grid of each schedule on A1111's float32 table, and Euler / Euler a / Heun / DPM++ 2S a on it
    (Heun's last step on KL Optimal's σ_min end included), are A1111's."""
    want = _a1111_grid(schedule, steps)
    got = schedule_sigmas(schedule, steps, model_sigmas(AC, F32))
    assert got.dtype == F32 and torch.equal(got, want), (got, want)
    x_T = _x_T(steps)
    for name, sample in SAMPLERS.items():
        ref = _run_reference(name, _denoiser("epsilon"), x_T, want)
        out = sample(stand_in, x_T, alphas_cumprod=AC, num_steps=steps, schedule=schedule,
                     generator=torch.Generator().manual_seed(7))
        assert torch.equal(out, ref), (name, rel_err(out, ref))


def _karras_between(n: int, lo: float, hi: float, rho: float) -> torch.Tensor:
    ramp = torch.linspace(0, 1, n)
    return torch.cat([(hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho, torch.zeros(1)])


def _normal_between(n: int, lo: float, hi: float) -> torch.Tensor:
    start, end = _sigma_to_t(torch.tensor([hi]))[0], _sigma_to_t(torch.tensor([lo]))[0]
    ts = torch.linspace(start, end, n)
    return torch.FloatTensor([_t_to_sigma(ts[i]) for i in range(n)] + [0.0])


@pytest.mark.parametrize(("schedule", "options", "want"), [
    ("karras", ScheduleOptions(old_karras_sigmas=True), lambda: _karras_between(9, 0.1, 10.0, 7.0)),
    ("karras", ScheduleOptions(rho=5.0, sigma_min=0.05), lambda: _karras_between(9, 0.05, S_MAX, 5.0)),
    ("exponential", ScheduleOptions(sigma_max=10.0),
     lambda: torch.cat([torch.linspace(math.log(10.0), math.log(S_MIN), 9).exp(), torch.zeros(1)])),
    ("normal", ScheduleOptions(sigma_min=0.1, sigma_max=8.0), lambda: _normal_between(9, 0.1, 8.0)),
])
def test_a1111_schedule_settings_on_the_float32_table(schedule, options, want):
    """A1111's settings (old Karras σ, ρ, σ min / max: ``KDiffusionSampler.get_sigmas``) compared with the float32
    table's ``.item()`` ends and applied in float32 (Normal's t(σ) the float32 ``sigma_to_t``)."""
    got = schedule_sigmas(schedule, 9, model_sigmas(AC, F32), options=options)
    assert got.dtype == F32 and torch.equal(got, want())


@pytest.mark.parametrize("schedule", ["uniform", "karras", "kl_optimal"])
@pytest.mark.parametrize(("steps", "index"), [(10, 3), (7, 6)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_float32_img2img_starts_as_a1111(schedule, steps, index, prediction_type):
    """img2img from grid index ``index`` (the last one too): k-diffusion on ``sigmas[index:]`` from
    ``init + noise·σ[index]``, in float32."""
    init = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(99))
    sigmas = _a1111_grid(schedule, steps)[index:]
    x_T = _x_T(steps)
    for name, sample in SAMPLERS.items():
        ref = _reference_from(name, _denoiser(prediction_type), init + x_T * sigmas[0], sigmas)
        out = sample(stand_in, x_T, alphas_cumprod=AC, num_steps=steps, prediction_type=prediction_type,
                     schedule=schedule, generator=torch.Generator().manual_seed(7),
                     start=Img2ImgStart(init=init, index=index))
        assert out.dtype == F32 and torch.equal(out, ref), (name, rel_err(out, ref))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_latents_step_on_a1111s_float32_grid(dtype):
    """Half latents: A1111 keeps ᾱ in float32 (sd_models.py keeps ``alphas_cumprod`` out of ``model.half()``) and
    samples float32 x, so the table, the grid and t(σ) are the float32 ones of float32 latents, not half ones."""
    x_T = _x_T(3)
    assert grid_table(AC, x_T.to(dtype), "karras").dtype == F32
    assert grid_table(AC, x_T.double(), "karras").dtype == torch.float64
    assert grid_table(AC, x_T.to(dtype), None).dtype == torch.float64  # (diffusers' grids: float64)
    times32, grid32, x32 = discrete_start("euler", x_T, alphas_cumprod=AC, num_steps=9, prediction_type="epsilon",
                                          schedule="exponential")
    times16, grid16, x16 = discrete_start("euler", x_T.to(dtype), alphas_cumprod=AC, num_steps=9,
                                          prediction_type="epsilon", schedule="exponential")
    assert (times16, grid16) == (times32, grid32) and grid32 == _a1111_grid("exponential", 9).tolist()
    assert x16.dtype == F32 and torch.equal(x16, x_T.to(dtype).float() * grid32[0])


@pytest.mark.parametrize("sampler", ["euler", "heun", "dpmpp_2s_a"])
@pytest.mark.parametrize("schedule", ["Karras", "Automatic"])
def test_sample_latents_karras_on_float32_latents_is_a1111s(sampler, schedule):
    """A1111's "Euler Karras", "Heun Karras", "DPM++ 2S a" (its Automatic schedule: Karras) through
    :func:`sdadapt.samplers.sample_latents`, as generate calls them: k-diffusion's run on A1111's float32 Karras
    grid, as the sampler functions themselves give it (measured off by 1.5e-6 to 3.9e-5 relative, 8-30 steps)."""
    from sdadapt.samplers import sample_latents

    if schedule == "Automatic" and sampler != "dpmpp_2s_a":
        pytest.skip("A1111's Automatic is Uniform there")
    x_T = _x_T(20)
    ref = _run_reference(sampler, _denoiser("epsilon"), x_T, _karras(20))
    out = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=sampler, alphas_cumprod=AC, num_steps=20,
                         schedule=schedule, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out, ref), rel_err(out, ref)
