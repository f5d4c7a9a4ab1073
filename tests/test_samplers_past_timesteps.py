"""DPM++ 2M / 2M SDE (midpoint, Heun) / 3M SDE on grids longer than the model's 1000 timesteps, as A1111 runs them
(k-diffusion's samplers on ``get_sigmas_karras(n)``, the model at the continuous ``sigma_to_t``), and which step
counts past the timesteps each sampler takes (``sdadapt.img2img.check_step_count``).

The reference is a float64 transcription, written here, of k-diffusion's ``sample_dpmpp_2m`` / ``sample_dpmpp_2m_sde``
(crowsonkb/k-diffusion ``k_diffusion/sampling.py``), ``get_sigmas_karras`` and ``DiscreteSchedule.sigma_to_t``
(``external.py``, ``quantize=False`` as A1111 builds it), with A1111's img2img start ``x = init + noise·σ₀`` on
``sigmas[total − t_enc − 1:]``.
"""

from __future__ import annotations

import math

import pytest
import torch

from sdadapt.img2img import (
    Img2ImgStart,
    a1111_img2img_steps,
    a1111_start_index,
    check_step_count,
)
from sdadapt.samplers.dpm_solver import (
    dpm_grid,
    dpmsolver_pp_3m_sde_sample,
    dpmsolver_pp_sample,
    dpmsolver_pp_sde_heun_sample,
    dpmsolver_pp_sde_sample,
)

T = 1000


def _sd_alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


AC = _sd_alphas_cumprod()
LOG_SIGMAS = (((1 - AC) / AC) ** 0.5).log()


def _eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A toy ε-model that reads its timestep to the fraction: rounding t changes its output."""
    t = t.double().view(-1, 1, 1, 1)
    return 0.4 * torch.tanh(x) * torch.cos(t / 3.7) + 0.05 * torch.sin(t * 1.3)


def _sigma_to_t(sigma: float) -> float:
    """k-diffusion's ``DiscreteSchedule.sigma_to_t`` (unquantized), float64."""
    log_sigma = math.log(sigma)
    dists = log_sigma - LOG_SIGMAS
    low = int(min(int((dists >= 0).long().cumsum(0).argmax()), T - 2))
    lo, hi = float(LOG_SIGMAS[low]), float(LOG_SIGMAS[low + 1])
    w = min(max((lo - log_sigma) / (lo - hi), 0.0), 1.0)
    return (1 - w) * low + w * (low + 1)


def _karras(n: int) -> list[float]:
    """k-diffusion's ``get_sigmas_karras(n, σ_min, σ_max, rho=7)`` with the model's σ ends, then 0."""
    lo, hi = math.exp(float(LOG_SIGMAS[0])), math.exp(float(LOG_SIGMAS[-1]))
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sig = (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    return [*sig.tolist(), 0.0]


def _denoiser(calls: list[float]):
    """k-diffusion's ``CompVisDenoiser`` around :func:`_eps`: the model at ``x/√(σ²+1)`` and ``t(σ)`` (as float32,
    what the UNet gets), ``D = x − σ·ε``."""
    def model(x: torch.Tensor, sigma: float) -> torch.Tensor:
        t = torch.tensor([_sigma_to_t(sigma)], dtype=torch.float32)
        calls.append(float(t))
        return x - sigma * _eps(x / (sigma * sigma + 1) ** 0.5, t)

    return model


def _kdiff_dpmpp_2m(model, x, sigmas):
    old = None
    for i in range(len(sigmas) - 1):
        d = model(x, sigmas[i])
        if sigmas[i + 1] == 0:  # (its first-order step onto 0: exp(-inf) = 0, expm1 = -1)
            x = d
        else:
            t, t_next = -math.log(sigmas[i]), -math.log(sigmas[i + 1])
            h = t_next - t
            if old is not None:
                r = (t + math.log(sigmas[i - 1])) / h
                d_use = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
            else:
                d_use = d
            x = (sigmas[i + 1] / sigmas[i]) * x - math.expm1(-h) * d_use
        old = d
    return x


def _kdiff_dpmpp_2m_sde(model, x, sigmas, noise, solver_type):
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        d = model(x, sigmas[i])
        h = None
        if sigmas[i + 1] == 0:
            x = d
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            x = sigmas[i + 1] / sigmas[i] * math.exp(-h) * x + (-math.expm1(-2 * h)) * d
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-math.expm1(-2 * h)) / (-2 * h) + 1) * (1 / r) * (d - old)
                else:
                    x = x + 0.5 * (-math.expm1(-2 * h)) * (1 / r) * (d - old)
            x = x + noise(x) * sigmas[i + 1] * (-math.expm1(-2 * h)) ** 0.5
        old, h_last = d, h
    return x


def _recorded(calls: list[float]):
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append(float(t[0]))
        return _eps(x, t)

    return model


@pytest.fixture(scope="module")
def hires_start():
    """A1111's hires pass of 1000 exact steps at denoising 0.75: a Karras grid of 1333 steps, its last 1000 run."""
    total, t_enc = a1111_img2img_steps(1000, 0.75, requested=1000)
    g = torch.Generator().manual_seed(3)
    init, noise = torch.randn(1, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(1, 2, 3, 3, generator=g,
                                                                                        dtype=torch.float64)
    return total, a1111_start_index(total, t_enc), init, noise


@pytest.mark.parametrize("sampler", ["2m", "2m_sde", "2m_sde_heun"])
def test_dpmpp_hires_pass_past_the_timesteps_is_k_diffusions_sampler(hires_start, sampler):
    """sdadapt's DPM++ on Karras σ over the 1333-step grid (1000 steps run) equals k-diffusion's sampler on
    ``get_sigmas_karras(1333)[333:]`` from ``init + noise·σ₀``, the model at the unrounded ``t(σ)`` of every step
    (rounding them, or refusing the grid, fails this)."""
    total, index, init, noise = hires_start
    assert (total, index) == (1333, 333)
    ours_t: list[float] = []
    ref_t: list[float] = []
    start = Img2ImgStart(init, index=index)
    sigmas = _karras(total)[index:]
    if sampler == "2m":
        ours = dpmsolver_pp_sample(_recorded(ours_t), noise, alphas_cumprod=AC, num_steps=total, karras=True,
                                   start=start)
        ref = _kdiff_dpmpp_2m(_denoiser(ref_t), init + noise * sigmas[0], sigmas)
    else:
        run = dpmsolver_pp_sde_sample if sampler == "2m_sde" else dpmsolver_pp_sde_heun_sample
        ours = run(_recorded(ours_t), noise, alphas_cumprod=AC, num_steps=total, karras=True, start=start,
                   generator=torch.Generator().manual_seed(11))
        g = torch.Generator().manual_seed(11)  # (the same unit noise per step, drawn in float32 as sdadapt draws it)
        ref = _kdiff_dpmpp_2m_sde(_denoiser(ref_t), init + noise * sigmas[0], sigmas,
                                  lambda x: torch.randn(x.shape, generator=g, dtype=torch.float32).double(),
                                  "heun" if sampler.endswith("heun") else "midpoint")
    assert len(ours_t) == len(ref_t) == 1000
    assert ours_t == ref_t  # (float32 t(σ), fractional: 1000 steps between ~750 and 0)
    assert sum(t != round(t) for t in ours_t) > 900
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9), float((ours - ref).abs().max())


def test_dpmpp_2m_txt2img_past_the_timesteps_is_k_diffusions_sampler():
    """txt2img ``--steps 1200`` on DPM++ 2M Karras: k-diffusion's ``sample_dpmpp_2m`` on ``get_sigmas_karras(1200)``
    (from sdadapt's start, the unit noise as the VP sample: ``x = x_T·√(σ₀² + 1)``, diffusers' init_noise_sigma 1)."""
    x_T = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ours_t: list[float] = []
    ref_t: list[float] = []
    ours = dpmsolver_pp_sample(_recorded(ours_t), x_T, alphas_cumprod=AC, num_steps=1200, karras=True)
    sigmas = _karras(1200)
    ref = _kdiff_dpmpp_2m(_denoiser(ref_t), x_T * (sigmas[0] ** 2 + 1) ** 0.5, sigmas)
    assert ours_t == ref_t and len(ours_t) == 1200
    assert torch.allclose(ours, ref, rtol=1e-9, atol=1e-9), float((ours - ref).abs().max())


def test_dpmpp_3m_sde_on_the_discarded_karras_grid_past_the_timesteps_calls_fractional_timesteps():
    """DPM++ 3M SDE on A1111's Karras schedule (next-to-last σ discarded) at 1100 steps: the model at k-diffusion's
    unrounded ``t(σ)`` of each σ of that grid; up to T steps the grid keeps its rounded integer timesteps."""
    calls: list[float] = []
    x_T = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = dpmsolver_pp_3m_sde_sample(_recorded(calls), x_T, alphas_cumprod=AC, num_steps=1100, schedule="karras",
                                     discard_next_to_last_sigma=True, generator=torch.Generator().manual_seed(1))
    sigmas = _karras(1101)
    sigmas = [*sigmas[:-2], sigmas[-1]]  # A1111's discard_next_to_last_sigma
    expected = [float(torch.tensor(_sigma_to_t(s), dtype=torch.float32)) for s in sigmas[:-1]]
    assert len(calls) == 1100 and calls == pytest.approx(expected, abs=1e-4)
    assert torch.isfinite(out).all()
    timesteps, _ = dpm_grid(AC, 1000, karras=True, past_timesteps=True)
    assert timesteps.dtype == torch.long  # (not past T: diffusers' rounded timesteps, as before)


@pytest.mark.parametrize(("sampler", "schedule", "karras", "runs"), [
    ("euler", None, False, True), ("euler_a", "exponential", False, True), ("lms", "simple", False, False),
    ("dpmsolver++", None, True, True), ("dpmsolver++", "karras", False, True),
    ("dpmsolver++_sde", "exponential", False, True),
    ("dpmsolver++_3m_sde", "kl_optimal", False, True), ("dpmsolver++", None, False, False),
    ("dpmsolver++", "simple", False, False), ("dpmsingle", None, True, False), ("unipc", "karras", False, False),
    ("ddim", None, False, False), ("pndm", None, False, False),
])
def test_steps_past_the_timesteps_per_sampler_and_the_fixes_named(sampler, schedule, karras, runs):
    """txt2img ``--steps 1200``: run where A1111 runs it (k-diffusion's samplers on a continuous grid, the DPM++
    ones included), refused for the samplers on the model's integer timesteps, naming fixes that are accepted."""
    if runs:
        check_step_count(sampler, schedule, karras=karras, steps=1200, num_train_steps=T)
        return
    with pytest.raises(ValueError) as refused:
        check_step_count(sampler, schedule, karras=karras, steps=1200, num_train_steps=T)
    text = str(refused.value)
    assert "steps 1200: at most 1000, the model's training timesteps" in text and sampler in text
    assert "any step count (euler" in text
    check_step_count(sampler, schedule, karras=karras, steps=1000, num_train_steps=T)  # (the first fix)
    check_step_count("dpmsolver++", None, karras=True, steps=1200, num_train_steps=T)  # (a sampler it names)


# ---- review R1 -------------------------------------------------------------------------------------------------

def _kdiff_dpmpp_3m_sde(model, x, sigmas, noise, *, second: str):
    """k-diffusion's ``sample_dpmpp_3m_sde`` (η = 1), float64; ``second="midpoint"``: its order-2 step (the run's
    second) replaced by the 2M SDE's midpoint ``½·(1 − e^(−2h))·d`` — what sdadapt keeps of diffusers there
    (docs/samplers.md, "It still differs from A1111's DPM++ 3M SDE in its order-2 steps")."""
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(sigmas) - 1):
        d = model(x, sigmas[i])
        h = None
        if sigmas[i + 1] == 0:
            x = d
        else:
            h = math.log(sigmas[i]) - math.log(sigmas[i + 1])
            h_eta = 2 * h
            x = math.exp(-h_eta) * x + (-math.expm1(-h_eta)) * d
            phi_2 = math.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (d - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                step = (d - d_1) / (h_1 / h)
                x = x + (0.5 * -math.expm1(-h_eta) if second == "midpoint" else phi_2) * step
            x = x + noise(x) * sigmas[i + 1] * (-math.expm1(-2 * h)) ** 0.5
        d_1, d_2, h_1, h_2 = d, d_1, h, h_1
    return x


def test_dpmpp_3m_sde_past_the_timesteps_is_k_diffusions_but_its_order_2_step():
    """(review R1) The whole 3M SDE run past T (1100 steps, Karras σ): k-diffusion's ``sample_dpmpp_3m_sde`` at the
    unrounded ``t(σ)`` with the same per-step noise, to 1e-9, but for its second step, which stays diffusers'
    midpoint (the documented difference; the run is not k-diffusion's there, so a doc saying "as A1111 runs them"
    holds for the grid and timesteps only)."""
    x_T = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours_t: list[float] = []
    ours = dpmsolver_pp_3m_sde_sample(_recorded(ours_t), x_T, alphas_cumprod=AC, num_steps=1100, karras=True,
                                      generator=torch.Generator().manual_seed(4))
    sigmas = _karras(1100)
    refs = {}
    for second in ("midpoint", "phi2"):
        ref_t: list[float] = []
        g = torch.Generator().manual_seed(4)
        refs[second] = _kdiff_dpmpp_3m_sde(_denoiser(ref_t), x_T * (sigmas[0] ** 2 + 1) ** 0.5, sigmas,
                                           lambda x, g=g: torch.randn(x.shape, generator=g,
                                                                      dtype=torch.float32).double(),
                                           second=second)
        assert ref_t == ours_t
    assert torch.allclose(ours, refs["midpoint"], rtol=1e-9, atol=1e-9), float((ours - refs["midpoint"]).abs().max())
    assert not torch.allclose(ours, refs["phi2"], rtol=1e-9, atol=1e-9)  # (k-diffusion's own φ₂ order-2 step)


class _PastTheCheck(Exception):
    """Raised by the stand-in model once run_generate goes on after its step-count checks."""


class _StandIn:
    alphas_cumprod = torch.zeros(T)
    edm = None  # (a DDPM model: the img2img request is checked on its discrete grid)

    def __getattr__(self, name):
        raise _PastTheCheck(name)


@pytest.mark.parametrize(("options", "refused"), [
    ({"sampler": "dpmsolver++", "karras": True, "steps": 1200}, None),
    ({"sampler": "dpmsolver++", "schedule": "karras", "steps": 1200}, None),
    ({"sampler": "dpmsolver++", "steps": 1200}, r"--steps 1200: at most 1000.*--sampler dpmsolver\+\+"),
    ({"sampler": "dpmsolver++", "karras": True, "steps": 20, "hires_scale": 2.0, "hires_steps": 1200}, None),
    ({"sampler": "euler", "steps": 20, "hires_scale": 2.0, "hires_steps": 1200, "hires_sampler": "ddim"},
     r"--hires-steps 1200: at most 1000.*--hires-sampler ddim"),
    ({"sampler": "ddim", "steps": 20, "hires_scale": 2.0, "hires_steps": 1200, "hires_sampler": "euler"}, None),
    ({"sampler": "ddim", "schedule": "automatic", "steps": 20, "hires_scale": 2.0, "hires_steps": 1200,
      "hires_sampler": "dpmsolver++"}, None),  # (the hires pass on its own "automatic": Karras for DPM++ 2M)
])
def test_run_generate_checks_the_step_counts_on_each_passs_sampler_and_grid(tmp_path, monkeypatch, options, refused):
    """(review R1) run_generate hands check_step_count each pass's own sampler, schedule and ``--karras``: DPM++ 2M
    with ``--karras`` (or the Karras schedule) runs ``--steps`` / ``--hires-steps`` 1200 as A1111 does; on
    diffusers' own grid, or a ``--hires-sampler`` that steps integer timesteps, it is refused by option, right
    after the load."""
    import sdadapt.jobs.generate as job

    monkeypatch.setattr(job, "load_system", lambda *args, **kwargs: _StandIn())
    if refused is None:
        with pytest.raises(_PastTheCheck):
            job.run_generate(prompt="a", out=tmp_path / "x.png", **options)
    else:
        with pytest.raises(ValueError, match=refused):
            job.run_generate(prompt="a", out=tmp_path / "x.png", **options)


def test_sampling_generate_passes_karras_to_the_img2img_grid_check():
    """(review R1) ``sampling.generate``'s img2img of A1111's exact steps (the hires pass) with DPM++ 2M ``--karras``
    builds the 1333-step grid (k-diffusion's, A1111's "DPM++ 2M Karras"); on diffusers' own grid it is refused."""
    from sdadapt.sampling import generate

    request = {"sampler": "dpmsolver++", "steps": 25, "init_latents": torch.zeros(1, 4, 2, 2),
               "denoising_strength": 0.75, "img2img_steps": 1000}
    with pytest.raises(_PastTheCheck):
        generate(_StandIn(), ["a"], karras=True, **request)
    with pytest.raises(ValueError, match="integer timesteps, as diffusers' scheduler does"):
        generate(_StandIn(), ["a"], **request)


def test_the_samplers_past_the_timesteps_are_the_k_diffusion_dpmpp_on_a_continuous_grid_only():
    """(review R1) Past T only the DPM++ samplers that are k-diffusion's run, and only on a continuous grid: the
    noise-prediction DPM-Solver (not A1111's) and the 'simple' schedule stay refused, also with ``karras``."""
    from sdadapt.samplers.dpm_solver import dpmsolver_sample

    x_T = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 1000\]"):
        dpmsolver_sample(_recorded([]), x_T, alphas_cumprod=AC, num_steps=1001, karras=True)
    with pytest.raises(ValueError, match="at most 1000"):
        check_step_count("dpmsolver++", "simple", karras=True, steps=1001, num_train_steps=T)
    with pytest.raises(ValueError, match="at most 1000"):
        check_step_count("dpmsolver", None, karras=True, steps=1001, num_train_steps=T)
