"""``dpm_fast`` / ``dpm_adaptive`` on float32 latents run k-diffusion as A1111 calls it, bit for bit: its times,
grid, ``atol`` / ``rtol`` and step coefficients are float32 (``sample_dpm_*`` start from ``torch.tensor(sigma)``),
and the model wrapper (A1111's ``CompVisDenoiser``) holds float32 σ. The reference is
``sampler_stand_ins.KDiffusionDPMSolver(time_dtype=torch.float32)`` on a float32 transcription of the denoiser
below; both were checked against the real k-diffusion 4601bf0 (all step counts and outputs identical).
The adaptive controller amplifies any rounding difference (one flipped accept changes every later step), so the
step counts test the dtypes themselves: float64 times change them (last test)."""

from __future__ import annotations

import pytest
import torch
from sampler_stand_ins import (
    KDiffusionDPMSolver,
    kdiffusion_sigma_to_t,
    sd_alphas_cumprod,
    stand_in,
)

from sdadapt.img2img import Img2ImgStart
from sdadapt.samplers.dpm_fast_adaptive import dpm_adaptive_sample, dpm_fast_sample

F32 = torch.float32
AC = sd_alphas_cumprod()  # (LDM's float64 ᾱ; A1111 holds it as float32)
#: A1111's ``model_wrap.sigmas`` (k_diffusion/external.py:94: ``((1 − ᾱ)/ᾱ)**0.5`` of the float32 buffer)
SIGMAS = ((1 - AC.float()) / AC.float()) ** 0.5
LOG_SIGMAS = SIGMAS.log()

ADAPTIVE_CASES = [  # (order, eta, rtol, (pcoeff, icoeff, dcoeff))
    (order, eta, rtol, pid) for order in (2, 3)
    for eta, rtol, pid in [(0.0, 0.05, (0.0, 1.0, 0.0)), (1.0, 0.05, (0.0, 1.0, 0.0)), (0.0, 0.01, (0.0, 1.0, 0.0)),
                           (0.0, 0.05, (0.3, 0.7, 0.2)), (0.5, 0.02, (0.1, 0.9, 0.05))]]


def _sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """k-diffusion's ``sigma_to_t`` on the float32 table."""
    return kdiffusion_sigma_to_t(LOG_SIGMAS, sigma)


def _get_sigmas(n: int) -> torch.Tensor:
    """``DiscreteSchedule.get_sigmas(n)`` (external.py:59-63, ``t_to_sigma`` :79-83): A1111's grid, float32, with 0."""
    t = torch.linspace(len(SIGMAS) - 1, 0, n)
    low_idx, high_idx, w = t.floor().long(), t.ceil().long(), t.frac()
    sig = ((1 - w) * LOG_SIGMAS[low_idx] + w * LOG_SIGMAS[high_idx]).exp()
    return torch.cat([sig, sig.new_zeros([1])])


def _eps_of(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """``DPMSolver.eps`` on ``DiscreteEpsDDPMDenoiser.forward`` (external.py:90-110) of :func:`stand_in`:
    ``D = x + ε̂(x·c_in, t(σ))·(−σ)``, ``c_in = 1/(σ² + 1)**0.5``, σ (B,) in x's dtype; ε = (x − D)/σ."""
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype)
    c_out, c_in = -s[:, None, None, None], (1 / (s ** 2 + 1) ** 0.5)[:, None, None, None]
    return (x - (x + stand_in(x * c_in, _sigma_to_t(s)) * c_out)) / sigma


def _v_eps_of(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """The same on ``DiscreteVDDPMDenoiser.forward`` (external.py:141-167, A1111's ``CompVisVDenoiser``) of
    :func:`stand_in` as a v model: ``D = v̂(x·c_in, t(σ))·c_out + x·c_skip``, ``c_skip = 1/(σ² + 1)``,
    ``c_out = −σ/(σ² + 1)**0.5``."""
    s = torch.full((x.shape[0],), sigma, dtype=x.dtype)
    c_skip, c_out, c_in = (c[:, None, None, None] for c in (1.0 ** 2 / (s ** 2 + 1.0 ** 2),
                                                              -s * 1.0 / (s ** 2 + 1.0 ** 2) ** 0.5,
                                                              1 / (s ** 2 + 1.0 ** 2) ** 0.5))
    return (x - (stand_in(x * c_in, _sigma_to_t(s)) * c_out + x * c_skip)) / sigma


def _reference(seed: int, eps_of=_eps_of) -> KDiffusionDPMSolver:
    g = torch.Generator().manual_seed(seed)
    return KDiffusionDPMSolver(eps_of, lambda like: torch.randn(like.shape, generator=g, dtype=like.dtype),
                               time_dtype=F32)


def _x_T(seed: int, shape=(1, 4, 4, 4)) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F32)


@pytest.mark.parametrize(("order", "eta", "rtol", "pid"), ADAPTIVE_CASES)
@pytest.mark.parametrize("seed", [1, 2])
def test_dpm_adaptive_on_float32_latents_is_k_diffusions_run(order, eta, rtol, pid, seed):
    """A1111's txt2img: ``x·sigmas[0]`` from σ_max = ``sigmas[-1]``, down to σ_min = ``sigmas[0]``; the same tries,
    accepts and rejects, and the same bits."""
    pcoeff, icoeff, dcoeff = pid
    options = {"order": order, "rtol": rtol, "eta": eta, "pcoeff": pcoeff, "icoeff": icoeff, "dcoeff": dcoeff}
    x_T, info = _x_T(seed), {}
    got = dpm_adaptive_sample(stand_in, x_T, alphas_cumprod=AC, generator=torch.Generator().manual_seed(5), info=info,
                              **options)
    ref = _reference(5)
    want, want_info = ref.adaptive(x_T * _get_sigmas(20)[0], ref.t_of(SIGMAS[-1].item()), ref.t_of(SIGMAS[0].item()),
                                   **options)
    assert info == want_info and info["nfe"] == ref.calls
    assert got.dtype == F32 and torch.equal(got, want)


@pytest.mark.parametrize("nfe", [1, 2, 3, 4, 5, 10, 25])
@pytest.mark.parametrize("eta", [0.0, 1.0, 0.5])
def test_dpm_fast_on_float32_latents_is_k_diffusions_run(nfe, eta):
    """The float32 ``linspace`` grid and coefficients: bit for bit (float64 ones were ~1e-4 off)."""
    x_T = _x_T(nfe, (2, 4, 3, 5))
    got = dpm_fast_sample(stand_in, x_T, alphas_cumprod=AC, num_steps=nfe, eta=eta,
                          generator=torch.Generator().manual_seed(7))
    ref = _reference(7)
    want = ref.fast(x_T * _get_sigmas(nfe)[0], ref.t_of(SIGMAS[-1].item()), ref.t_of(SIGMAS[0].item()), nfe, eta=eta)
    assert torch.equal(got, want)


@pytest.mark.parametrize(("order", "eta"), [(2, 1.0), (3, 0.0), (3, 1.0)])
def test_v_prediction_on_float32_latents_is_a1111s_v_denoiser(order, eta):
    """A v model (SD 2.x 768): A1111's ``CompVisVDenoiser`` rounding, bit for bit, both samplers."""
    x_T, info = _x_T(order), {}
    got = dpm_adaptive_sample(stand_in, x_T, alphas_cumprod=AC, order=order, eta=eta, prediction_type="v_prediction",
                              generator=torch.Generator().manual_seed(5), info=info)
    ref = _reference(5, _v_eps_of)
    t_start, t_end = ref.t_of(SIGMAS[-1].item()), ref.t_of(SIGMAS[0].item())
    want, want_info = ref.adaptive(x_T * _get_sigmas(20)[0], t_start, t_end, order=order, eta=eta)
    assert info == want_info and torch.equal(got, want)
    got = dpm_fast_sample(stand_in, x_T, alphas_cumprod=AC, num_steps=8, eta=eta, prediction_type="v_prediction",
                          generator=torch.Generator().manual_seed(5))
    ref = _reference(5, _v_eps_of)
    assert torch.equal(got, ref.fast(x_T * _get_sigmas(20)[0], t_start, t_end, 8, eta=eta))


@pytest.mark.parametrize("sampler", ["dpm_fast", "dpm_adaptive"])
@pytest.mark.parametrize("index", [1, 4, 9])  # (σ at 1 and 4 of the 12-step grid: float32 ≠ float64 rounded)
def test_img2img_on_float32_latents_is_a1111s_sample_img2img(sampler, index):
    """A1111's ``sample_img2img``: ``sigma_sched = sigmas[index:]`` of its float32 grid, σ_max = ``sigma_sched[0]``,
    σ_min = ``sigma_sched[-2]``, n = ``len(sigma_sched) − 1``, ``xi = init + noise·sigma_sched[0]``."""
    steps, eta = 12, 1.0
    init, noise = _x_T(11) * 0.5, _x_T(12)
    sched = _get_sigmas(steps)[index:]
    xi = init + noise * sched[0]
    ref = _reference(3)
    t_start, t_end = ref.t_of(sched[0].item()), ref.t_of(sched[-2].item())
    start = Img2ImgStart(init=init, index=index)
    g = torch.Generator().manual_seed(3)
    if sampler == "dpm_fast":
        want = ref.fast(xi, t_start, t_end, len(sched) - 1, eta=eta)
        got = dpm_fast_sample(stand_in, noise, alphas_cumprod=AC, num_steps=steps, eta=eta, generator=g, start=start)
    else:
        want, _ = ref.adaptive(xi, t_start, t_end, eta=eta)
        got = dpm_adaptive_sample(stand_in, noise, alphas_cumprod=AC, num_steps=steps, eta=eta, generator=g,
                                  start=start)
    assert torch.equal(got, want)


def test_float64_times_would_change_the_step_counts():
    """Why the dtypes matter: the same float32 run with float64 times and σ (the transcription's precise mode, what
    sdadapt did before) takes other steps in some of the cases above — the controller sees rounding."""
    differ = []
    for order, eta, rtol, pid in ADAPTIVE_CASES:
        options = {"order": order, "rtol": rtol, "eta": eta, "pcoeff": pid[0], "icoeff": pid[1], "dcoeff": pid[2]}
        infos = []
        for dtype in (F32, torch.float64):
            g = torch.Generator().manual_seed(5)
            ref = KDiffusionDPMSolver(_eps_of, lambda like, g=g: torch.randn(like.shape, generator=g, dtype=F32),
                                      time_dtype=dtype)
            sigmas = SIGMAS if dtype == F32 else ((1 - AC) / AC) ** 0.5
            infos.append(ref.adaptive(_x_T(1) * sigmas[-1].item(), ref.t_of(sigmas[-1].item()),
                                      ref.t_of(sigmas[0].item()), **options)[1])
        differ.append(infos[0] != infos[1])
    assert 0 < sum(differ) < len(differ), differ
