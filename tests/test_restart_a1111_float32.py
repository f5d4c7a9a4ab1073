"""``restart`` on float32 latents is A1111's "Restart" bit for bit: ``restart_sampler`` of A1111's
``modules/sd_samplers_extra.py`` (lines 7-74 at 598aef823083397a58257be58bcfea01f1c8849a) on k-diffusion 4601bf0's
``get_sigmas_karras`` (sampling.py:17-23), ``to_d`` (:46-48) and A1111's ``CompVisDenoiser`` / ``CompVisVDenoiser``
(:func:`test_kdiffusion_float32._denoiser`), transcribed below in float32 with A1111's ``randn_like`` drawn from a
seeded generator. The transcription was run against the real code (A1111's function on the real k-diffusion
wrappers of the stand-in model, every case below: 0 difference). Before, float64 σ, grids and re-noise put sdadapt
7e-7 to 8.2e-5 relative off it (8-50 steps, eps and v, img2img starts). Float64 latents keep float64 (last test)."""

from __future__ import annotations

import itertools

import pytest
import torch
from sampler_stand_ins import kdiffusion_sigma_to_t, rel_err, stand_in
from test_dpm_adaptive_float32 import AC, F32, _get_sigmas, _sigma_to_t
from test_kdiffusion_float32 import _denoiser, _karras, _x_T

from sdadapt.img2img import Img2ImgStart
from sdadapt.samplers import sample_latents
from sdadapt.samplers.restart import restart_sample, restart_steps
from sdadapt.samplers.schedules import schedule_sigmas
from sdadapt.samplers.sigma_space import model_sigmas


def get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0, dtype=F32):
    """k-diffusion's ``get_sigmas_karras`` (sampling.py:17-23 at 4601bf0; its ramp is float32: ``dtype`` float64
    only for the float64 precise mode's reference)."""
    ramp = torch.linspace(0, 1, n, dtype=dtype)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def a1111_restart_sampler(model, x, sigmas, randn_like, s_noise=1.0, restart_list=None):
    """A1111's ``restart_sampler`` (sd_samplers_extra.py:7-74 at 598aef8) transcribed: σ stay 0-dim tensors of the
    grid's dtype, the restart segments are ``get_sigmas_karras`` of the ``.item()`` ends, ``randn_like`` is A1111's
    (``k_diffusion.sampling.torch.randn_like``, its TorchHijack). Returns ``(x, model σ in call order)``."""
    s_in = x.new_ones([x.shape[0]])
    seen = []

    def denoise(x, sigma):
        seen.append(float(sigma))
        return model(x, sigma * s_in)

    def heun_step(x, old_sigma, new_sigma):
        d = (x - denoise(x, old_sigma)) / old_sigma
        dt = new_sigma - old_sigma
        if new_sigma == 0:
            return x + d * dt
        x_2 = x + d * dt
        d_2 = (x_2 - denoise(x_2, new_sigma)) / new_sigma
        return x + (d + d_2) / 2 * dt

    steps = sigmas.shape[0] - 1
    if restart_list is None:
        if steps >= 20:
            restart_steps, restart_times = 9, 1
            if steps >= 36:
                restart_steps, restart_times = steps // 4, 2
            sigmas = get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item(),
                                       dtype=sigmas.dtype)
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
        else:
            restart_list = {}
    restart_list = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restart_list.items()}
    step_list = []
    for i in range(len(sigmas) - 1):
        step_list.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restart_list:
            restart_steps, restart_times, restart_max = restart_list[i + 1]
            min_idx, max_idx = i + 1, int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                sigma_restart = get_sigmas_karras(restart_steps, sigmas[min_idx].item(), sigmas[max_idx].item(),
                                                  dtype=sigmas.dtype)[:-1]
                for _ in range(restart_times):
                    step_list.extend(itertools.pairwise(sigma_restart))
    last_sigma = None
    for old_sigma, new_sigma in step_list:
        if last_sigma is None:
            last_sigma = old_sigma
        elif last_sigma < old_sigma:
            x = x + randn_like(x) * s_noise * (old_sigma ** 2 - last_sigma ** 2) ** 0.5
        x = heun_step(x, old_sigma, new_sigma)
        last_sigma = new_sigma
    return x, seen


def _seeded(seed: int = 7, dtype: torch.dtype = F32):
    """A1111's ``randn_like`` as a seeded draw in ``dtype`` (sdadapt: ``generator=torch.Generator().manual_seed(seed)``,
    drawn in the work dtype: float32 for float32 and half latents, as A1111's float32 sample)."""
    g = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=g, dtype=dtype)


def _grid(schedule: str, n: int) -> torch.Tensor:
    """A1111's ``get_sigmas`` for Restart: its Automatic (Karras) or Uniform, float32."""
    return _karras(n) if schedule == "karras" else _get_sigmas(n)


def _sdadapt(x_T, n, schedule, prediction_type, seen=None, model=stand_in, **kw):
    """``restart_sample`` with the generator the transcription's ``randn_like`` mirrors; ``seen``: the model's t."""
    def recorded(x, t):
        if seen is not None:
            seen.append(float(t[0]))
        return model(x, t)

    return restart_sample(recorded, x_T, alphas_cumprod=AC, num_steps=n, prediction_type=prediction_type,
                          schedule=schedule, generator=torch.Generator().manual_seed(7), **kw)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("schedule", ["karras", "uniform"])
@pytest.mark.parametrize("steps", [8, 20, 36])
def test_float32_restart_is_a1111s_restart_sampler(prediction_type, schedule, steps):
    """8 steps: plain Heun; 20: the main grid rebuilt as 11 Karras σ plus one 9-step restart; 36: 18 + two 9-step
    restarts. Before: 7e-7 (8 steps, Uniform) to 8.2e-5 (36 steps) relative off."""
    x_T = _x_T(steps)
    sigmas = _grid(schedule, steps)
    want, _ = a1111_restart_sampler(_denoiser(prediction_type), x_T * sigmas[0], sigmas, _seeded())
    got = _sdadapt(x_T, steps, schedule, prediction_type)
    assert got.dtype == F32 and torch.equal(got, want), rel_err(got, want)


@pytest.mark.parametrize("schedule", ["karras", "uniform"])
@pytest.mark.parametrize(("steps", "index"), [(30, 4), (24, 3), (12, 5)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_float32_img2img_restart_is_a1111s(schedule, steps, index, prediction_type):
    """img2img (A1111's ``sample_img2img``): ``restart_sampler`` on ``sigma_sched = sigmas[index:]`` from
    ``init + noise·sigma_sched[0]`` — the given grid's σ, which on Uniform is not the rebuilt Karras grid's first
    σ (≠ in the last bit)."""
    init = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(99))
    sigmas = _grid(schedule, steps)[index:]
    x_T = _x_T(steps)
    want, _ = a1111_restart_sampler(_denoiser(prediction_type), init + x_T * sigmas[0], sigmas, _seeded())
    got = _sdadapt(x_T, steps, schedule, prediction_type, start=Img2ImgStart(init=init, index=index))
    assert got.dtype == F32 and torch.equal(got, want), rel_err(got, want)


def test_float32_restart_list_and_s_noise_are_a1111s():
    """A given ``restart_list`` (two restarts, one three times) and ``s_noise`` 0.8: ``noise·s_noise·√(σ'² − σ²)``
    in A1111's order on float32 σ."""
    x_T = _x_T(5)
    restart_list = {0.5: (4, 3, 5.0), 3.0: (3, 1, 8.0)}
    sigmas = _grid("karras", 12)
    want, _ = a1111_restart_sampler(_denoiser("epsilon"), x_T * sigmas[0], sigmas, _seeded(), s_noise=0.8,
                                    restart_list={k: list(v) for k, v in restart_list.items()})
    got = _sdadapt(x_T, 12, "karras", "epsilon", s_noise=0.8, restart_list=restart_list)
    assert torch.equal(got, want), rel_err(got, want)


def test_restart_pairs_are_float32_on_a_float32_grid():
    """The (σ, σ') pairs of a float32 grid are float32 values (the rebuilt Karras grid and the segments computed in
    float32), the ones A1111 steps through; a float64 grid's are float64 ones, close to them but not them."""
    sigmas = _grid("karras", 36)
    pairs = restart_steps(sigmas)
    assert all(torch.tensor(s, dtype=F32).item() == s for pair in pairs for s in pair)
    _, want = a1111_restart_sampler(lambda x, s: x * 0, torch.zeros(1, 1, 1, 1), sigmas, lambda like: like * 0)
    assert [s for s, s_next in pairs for s in ((s, s_next) if s_next > 0 else (s,))] == want  # A1111's model σ
    pairs64 = restart_steps(sigmas.double())
    assert pairs64 != pairs and max(abs(a - b) for p, q in zip(pairs, pairs64, strict=True)
                                    for a, b in zip(p, q, strict=True)) < 1e-5
    # a key halfway between two grid σ (a tie in exact arithmetic, the first σ by argmin) is read as A1111 reads
    # it: ``sigmas - key`` in float32, where the key rounds nearer the second σ
    grid = _grid("karras", 12)
    key = (grid[1].item() + grid[2].item()) / 2
    restart_list = {key: (4, 1, 14.0)}
    pairs = restart_steps(grid, restart_list)
    _, want = a1111_restart_sampler(lambda x, s: x * 0, torch.zeros(1, 1, 1, 1), grid, lambda like: like * 0,
                                    restart_list={key: [4, 1, 14.0]})
    assert [s for s, s_next in pairs for s in ((s, s_next) if s_next > 0 else (s,))] == want
    assert pairs[2][0] > pairs[1][1] == grid[2].item()  # (the restart after the step onto σ_2, not σ_1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("steps", [8, 20])
def test_half_latents_run_a1111s_float32_grid(dtype, steps):
    """Half latents: A1111 keeps ᾱ, the grid and the sample in float32, so the model gets the float32 run's
    timesteps t(σ) (not half ones) on half inputs ``(x·c_in).half()`` and the sample steps in float32: the
    transcription with that model (its output read in float32). The restart noise is drawn in float32, as A1111
    draws it (``randn_like`` of its float32 sample)."""
    x_T = _x_T(steps).to(dtype)
    t_half, t_32 = [], []
    got = _sdadapt(x_T, steps, "karras", "epsilon", seen=t_half, model=lambda x, t: stand_in(x, t).float())
    _sdadapt(x_T.float(), steps, "karras", "epsilon", seen=t_32)
    assert t_half == t_32 and len(t_half) == 2 * steps - 1

    def half_model(x, s):  # CompVisDenoiser with the model on the caller's dtype
        c_in = (1 / (s ** 2 + 1.0 ** 2) ** 0.5)[:, None, None, None]
        return x + stand_in((x * c_in).to(dtype), _sigma_to_t(s)).float() * -s[:, None, None, None]

    sigmas = _grid("karras", steps)
    want, _ = a1111_restart_sampler(half_model, x_T.float() * sigmas[0], sigmas, _seeded())
    assert got.dtype == dtype and torch.equal(got, want.to(dtype)), rel_err(got, want)


@pytest.mark.parametrize("schedule", ["Automatic", "Karras", "Uniform"])
def test_sample_latents_restart_on_float32_latents_is_a1111s(schedule):
    """``--sampler Restart`` as generate calls it (:func:`sdadapt.samplers.sample_latents`; A1111's Automatic for
    Restart: Karras — which ``sample_latents`` hands on as ``karras=True``, Restart's own float32 Karras grid)."""
    x_T = _x_T(21)
    sigmas = _grid("uniform" if schedule == "Uniform" else "karras", 21)
    want, _ = a1111_restart_sampler(_denoiser("epsilon"), x_T * sigmas[0], sigmas, _seeded())
    got = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler="Restart", alphas_cumprod=AC,
                         num_steps=21, schedule=schedule, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, want), rel_err(got, want)


def test_float64_latents_stay_float64():
    """Float64 latents: the float64 table, grids, t(σ) and re-noise (a precise mode), near the float32 run, not it."""
    x_T = _x_T(3)
    got64 = _sdadapt(x_T.double(), 20, "karras", "epsilon")
    assert got64.dtype == torch.float64
    grid64 = schedule_sigmas("karras", 20, model_sigmas(AC))
    want, _ = a1111_restart_sampler(_denoiser64, x_T.double() * grid64[0], grid64, _seeded(dtype=torch.float64))
    assert rel_err(got64, want) < 1e-12
    plain32, plain64 = (_sdadapt(x, 20, "karras", "epsilon", restart_list={}) for x in (x_T, x_T.double()))
    assert 0 < rel_err(plain32, plain64) < 1e-4  # (no restart: the same noise-free run in both)


def _denoiser64(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``CompVisDenoiser`` in float64 on the float64 table (the precise mode's reference; the model gets t(σ) as
    float32 timesteps, as sdadapt hands every model)."""
    t = kdiffusion_sigma_to_t(model_sigmas(AC).log(), s).float().double()
    return x + stand_in(x * (1 / (s ** 2 + 1) ** 0.5)[:, None, None, None], t) * -s[:, None, None, None]
