"""DPM2, DPM2 a, DPM++ 2M, 2M SDE, 2M SDE Heun and 3M SDE on float32 latents and A1111's grids run k-diffusion as A1111
calls it, bit for bit: the σ table, grids, ``t(σ)`` and ``x·c_in`` of tests/test_kdiffusion_float32.py, and the
samplers' own float32 arithmetic. The references are k-diffusion 4601bf0 transcribed below (``sample_dpm_2``
sampling.py:188-216, ``sample_dpm_2_ancestral`` :219-244, ``sample_dpmpp_2m`` :585-608, ``sample_dpmpp_2m_sde``
:611-653, ``sample_dpmpp_3m_sde`` :656-700); each was checked against the real k-diffusion code (0 difference, every
case of this file). Before, they were off A1111 by (max relative, 8 steps, ε / v, Uniform / Karras): DPM2 4e-4 to 2e-3,
DPM2 a 6e-4 to 3e-3 (σ_i timesteps rounded, as diffusers' KDPM2), DPM++ 2M 3e-3 to 9e-3, 2M SDE 2e-3 to 2e-2,
2M SDE Heun 2e-3 to 3e-2, 3M SDE 5e-2 to 2e-1 (diffusers' multistep update at rounded timesteps)."""

from __future__ import annotations

import pytest
import torch
from sampler_stand_ins import rel_err, stand_in
from test_dpm_adaptive_float32 import AC, F32, _get_sigmas, _sigma_to_t
from test_kdiffusion_float32 import _ancestral, _churn, _denoiser, _karras, _to_d, _x_T

from sdadapt.img2img import Img2ImgStart
from sdadapt.samplers import _SAMPLERS, sample_latents
from sdadapt.samplers.a1111_noise import A1111Noise


def _kd_dpm_2(model, x, sigmas, noise, **churn):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        x, sigma_hat = _churn(x, sigmas, i, noise, **churn)  # (eps = randn_like(x) every step, unused at s_churn 0)
        d = _to_d(x, sigma_hat, model(x, sigma_hat * s_in))
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = sigma_hat.log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigma_hat)
            d_2 = _to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in))
            x = x + d_2 * (sigmas[i + 1] - sigma_hat)
    return x


def _kd_dpm_2_ancestral(model, x, sigmas, noise, eta=1.0):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = _ancestral(sigmas[i], sigmas[i + 1], eta)
        d = _to_d(x, sigmas[i], den)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = _to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise(x) * 1.0 * sigma_up
    return x


def _kd_dpmpp_2m(model, x, sigmas, noise):
    s_in = x.new_ones([x.shape[0]])
    sigma_fn, t_fn = (lambda t: t.neg().exp()), (lambda sigma: sigma.log().neg())
    old_denoised = None
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i] * s_in)
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * den
        else:
            h_last = t - t_fn(sigmas[i - 1])
            r = h_last / h
            denoised_d = (1 + 1 / (2 * r)) * den - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = den
    return x


def _kd_dpmpp_2m_sde(model, x, sigmas, noise, solver_type="midpoint", eta=1.0, s_noise=1.0):
    s_in = x.new_ones([x.shape[0]])
    old_denoised, h_last, h = None, None, None
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = den
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * den
            if old_denoised is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (den - old_denoised)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (den - old_denoised)
            if eta:
                x = x + noise(x, sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        old_denoised = den
        h_last = h
    return x


def _kd_dpmpp_3m_sde(model, x, sigmas, noise, eta=1.0, s_noise=1.0):
    s_in = x.new_ones([x.shape[0]])
    denoised_1, denoised_2 = None, None
    h, h_1, h_2 = None, None, None
    for i in range(len(sigmas) - 1):
        den = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = den
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * den
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (den - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (den - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if eta:
                z = noise(x, sigmas[i], sigmas[i + 1])
                x = x + z * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
        denoised_1, denoised_2 = den, denoised_1
        h_1, h_2 = h, h_1
    return x


#: sdadapt name -> (transcription, A1111 discards the next-to-last σ for it, noise sampler takes (σ, σ'))
REFERENCES = {
    "dpm_2": (_kd_dpm_2, True, False),
    "dpm_2_a": (_kd_dpm_2_ancestral, True, False),
    "dpmsolver++": (_kd_dpmpp_2m, False, False),
    "dpmsolver++_sde": (_kd_dpmpp_2m_sde, False, True),
    "dpmsolver++_sde_heun": (lambda m, x, s, n: _kd_dpmpp_2m_sde(m, x, s, n, solver_type="heun"), False, True),
    "dpmsolver++_3m_sde": (_kd_dpmpp_3m_sde, True, True),
}


def _a1111_grid(schedule: str, n: int, discard: bool) -> torch.Tensor:
    """A1111's ``get_sigmas`` for Uniform / Karras, float32 with 0; ``discard``: n + 1 σ, the next-to-last dropped."""
    make = _get_sigmas if schedule == "uniform" else _karras
    if not discard:
        return make(n)
    s = make(n + 1)
    return torch.cat([s[:-2], s[-1:]])


def _reference(sampler: str, prediction_type: str, x: torch.Tensor, sigmas: torch.Tensor, seed: int = 7):
    fn, _, takes_sigmas = REFERENCES[sampler]
    g = torch.Generator().manual_seed(seed)
    draw = lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype)
    noise = (lambda like, s, s_next: draw(like)) if takes_sigmas else draw
    return fn(_denoiser(prediction_type), x, sigmas, noise)


def _ours(sampler: str, x_T: torch.Tensor, n: int, schedule: str, prediction_type: str = "epsilon", seed: int = 7,
          **kw) -> torch.Tensor:
    discard = kw.pop("discard", REFERENCES[sampler][1])
    return _SAMPLERS[sampler](stand_in, x_T, alphas_cumprod=AC, num_steps=n, prediction_type=prediction_type,
                              schedule=schedule, discard_next_to_last_sigma=discard,
                              generator=torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize("sampler", list(REFERENCES))
@pytest.mark.parametrize("schedule", ["uniform", "karras"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 7, 20])
def test_float32_latents_on_a1111_grids_are_k_diffusions_run(sampler, schedule, prediction_type, steps):
    """Bit for bit, on A1111's grid for the sampler (DPM2, DPM2 a, DPM++ 3M SDE: the next-to-last σ discarded)."""
    x_T = _x_T(steps)
    sigmas = _a1111_grid(schedule, steps, REFERENCES[sampler][1])
    want = _reference(sampler, prediction_type, x_T * sigmas[0], sigmas)
    got = _ours(sampler, x_T, steps, schedule, prediction_type)
    assert got.dtype == F32 and torch.equal(got, want), rel_err(got, want)


@pytest.mark.parametrize("sampler", ["dpm_2", "dpm_2_a", "dpmsolver++_3m_sde"])
def test_always_discard_off_is_k_diffusion_on_the_plain_grid(sampler):
    """A1111's "Always discard next-to-last sigma" unset for the samplers it discards for by default: the plain grid,
    through :func:`sample_latents` as generate calls it (``schedule="karras"`` stays A1111's float32 grid)."""
    x_T = _x_T(9)
    sigmas = _a1111_grid("karras", 9, False)
    want = _reference(sampler, "epsilon", x_T * sigmas[0], sigmas)
    got = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=sampler, alphas_cumprod=AC, num_steps=9,
                         schedule="karras", discard_next_to_last_sigma=False,
                         generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, want), rel_err(got, want)


@pytest.mark.parametrize("sampler", ["dpmsolver++", "dpmsolver++_sde", "dpmsolver++_sde_heun"])
@pytest.mark.parametrize("schedule", ["Karras", "karras"])
def test_sample_latents_dpmpp_karras_is_a1111s(sampler, schedule):
    """A1111's "DPM++ 2M Karras", "DPM++ 2M SDE Karras", "DPM++ 2M SDE Heun Karras" through :func:`sample_latents`:
    k-diffusion's run on the float32 Karras grid, not diffusers' ``karras=True`` (rounded timesteps)."""
    x_T = _x_T(20)
    want = _reference(sampler, "epsilon", x_T * _karras(20)[0], _karras(20))
    got = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=sampler, alphas_cumprod=AC, num_steps=20,
                         schedule=schedule, generator=torch.Generator().manual_seed(7))
    assert torch.equal(got, want), rel_err(got, want)
    diffusers = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler=sampler, alphas_cumprod=AC,
                               num_steps=20, karras=True, generator=torch.Generator().manual_seed(7))
    assert 1e-5 < rel_err(diffusers, want) < 5e-2  # (the other grid arithmetic: near, not it)


@pytest.mark.parametrize("sampler", list(REFERENCES))
@pytest.mark.parametrize(("steps", "index"), [(10, 3), (7, 6)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_float32_img2img_starts_as_a1111(sampler, steps, index, prediction_type):
    """img2img from grid index ``index`` (the last one too): k-diffusion on ``sigmas[index:]`` from
    ``init + noise·σ[index]`` (A1111's ``sample_img2img``), in float32."""
    init = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(99))
    x_T = _x_T(steps)
    sigmas = _a1111_grid("karras", steps, REFERENCES[sampler][1])[index:]
    want = _reference(sampler, prediction_type, init + x_T * sigmas[0], sigmas)
    got = _ours(sampler, x_T, steps, "karras", prediction_type, start=Img2ImgStart(init=init, index=index))
    assert got.dtype == F32 and torch.equal(got, want), rel_err(got, want)


@pytest.mark.parametrize("sampler", list(REFERENCES))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_latents_run_the_float32_arithmetic(sampler, dtype):
    """Half latents (A1111 samples float32 x whatever the UNet's dtype): the float32 run from the float32 start
    ``x_T·σ_0``, the model fed ``x·c_in`` rounded to the latents' dtype (a model returning float32), the result cast
    back to that dtype."""
    x_T = _x_T(6).to(dtype)
    sigmas = _a1111_grid("uniform", 6, REFERENCES[sampler][1])
    seen = []

    def model(x, t):
        seen.append(x.dtype)
        return stand_in(x.float(), t)

    def half_input(x, s):  # (_denoiser's ε branch, its input rounded as the UNet gets it)
        c_in = (1 / (s ** 2 + 1.0 ** 2) ** 0.5)[:, None, None, None]
        return x + stand_in((x * c_in).to(dtype).float(), _sigma_to_t(s)) * (-s)[:, None, None, None]

    fn, discard, takes_sigmas = REFERENCES[sampler]
    g = torch.Generator().manual_seed(7)
    draw = lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype)
    noise = (lambda like, s, s_next: draw(like)) if takes_sigmas else draw
    want = fn(half_input, x_T.float() * sigmas[0], sigmas, noise)
    got = _SAMPLERS[sampler](model, x_T, alphas_cumprod=AC, num_steps=6, schedule="uniform",
                             discard_next_to_last_sigma=discard, generator=torch.Generator().manual_seed(7))
    assert got.dtype == dtype and set(seen) == {dtype}
    assert torch.equal(got, want.to(dtype)), rel_err(got.float(), want)


@pytest.mark.parametrize("sampler", ["dpmsolver++_sde", "dpmsolver++_sde_heun", "dpmsolver++_3m_sde"])
def test_a1111_noise_draws_from_the_whole_grids_brownian_trees(sampler):
    """Under A1111's noise the SDE samplers take their noise from A1111's per-image Brownian trees over the whole
    grid's positive σ (``create_noise_sampler(x, sigmas, p)``: img2img too), queried at ``(σ_i, σ_{i+1})``."""
    pytest.importorskip("torchsde")
    from sdadapt.samplers.dpmpp_sde import brownian_noise

    seeds = [5, 6]
    discard = REFERENCES[sampler][1]
    full = _a1111_grid("karras", 10, discard)
    fn = REFERENCES[sampler][0] if sampler != "dpmsolver++_sde_heun" else (
        lambda m, x, s, n: _kd_dpmpp_2m_sde(m, x, s, n, solver_type="heun"))
    init = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(3))
    for index in (0, 4):
        noise = A1111Noise(seeds, source="cpu")
        x_T = noise.start_noise((2, 4, 5, 6))
        positive = full[full > 0]
        tree = brownian_noise(x_T, float(positive.min()), float(positive.max()), tuple(seeds), source="cpu")
        sigmas = full[index:]
        x = x_T * sigmas[0] if index == 0 else init + x_T * sigmas[0]
        want = fn(_denoiser("epsilon"), x, sigmas, lambda like, s, s_next: tree(s, s_next))
        start = None if index == 0 else Img2ImgStart(init=init, index=index)
        got = _SAMPLERS[sampler](stand_in, x_T, alphas_cumprod=AC, num_steps=10, schedule="karras",
                                 discard_next_to_last_sigma=discard, generator=noise, start=start)
        assert torch.equal(got, want), (index, rel_err(got, want))


def test_float64_latents_run_the_same_form_in_float64():
    """Float64 latents: k-diffusion's form in float64 (the float64 table, unrounded t(σ), float64 noise draws): near
    the float32 run (the deterministic ones), and the float64 transcription's own result (1e-12)."""
    x_T = _x_T(8)
    table64 = ((1 - AC) / AC).sqrt()
    from sdadapt.samplers.schedules import schedule_sigmas

    sigmas = schedule_sigmas("exponential", 8, table64)
    for sampler in ("dpm_2", "dpmsolver++", "dpmsolver++_sde", "dpmsolver++_3m_sde"):
        discard = REFERENCES[sampler][1]
        grid = torch.cat([schedule_sigmas("exponential", 9, table64)[:-2], sigmas[-1:]]) if discard else sigmas
        got64 = _ours(sampler, x_T.double(), 8, "exponential")
        got32 = _ours(sampler, x_T, 8, "exponential")
        assert got64.dtype == torch.float64
        if not REFERENCES[sampler][2]:  # (the SDEs draw float64 noise there: another stream)
            assert 0 < rel_err(got32, got64) < 1e-3, sampler
        fn, _, takes_sigmas = REFERENCES[sampler]
        g = torch.Generator().manual_seed(7)
        draw = lambda like, g=g: torch.randn(like.shape, generator=g, dtype=like.dtype)
        noise = (lambda like, s, s_next: draw(like)) if takes_sigmas else draw
        want = fn(_float64_denoiser(table64), x_T.double() * grid[0], grid, noise)
        assert rel_err(got64, want) < 1e-12, (sampler, rel_err(got64, want))


def _float64_denoiser(table64: torch.Tensor):
    """The CompVisDenoiser of :func:`stand_in` on the float64 table; the timestep held in float32 as the model gets
    it."""
    from sdadapt.samplers.sigma_space import sigma_to_t

    def model(x, s):
        t = sigma_to_t(s, table64).float()
        c_in = (1 / (s ** 2 + 1) ** 0.5)[:, None, None, None]
        return x + stand_in((x * c_in), t).double() * (-s)[:, None, None, None]
    return model
