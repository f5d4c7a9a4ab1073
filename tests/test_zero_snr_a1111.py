"""A zero-terminal-SNR model (last ᾱ = 0: ``rescale_betas_zero_snr``) on A1111's grids reads that ᾱ as A1111 does,
4.8973451890853435e-08 (``rescale_zero_terminal_snr_abar``, modules/sd_models.py; ComfyUI's value too): σ_max ≈
4518.8, where diffusers' grids keep 2⁻²⁴ (σ_max = 4096). Checked through a k-diffusion run on A1111's table."""

from __future__ import annotations

import pytest
import torch
from sampler_stand_ins import kdiffusion_sigma_to_t, rel_err, sd_alphas_cumprod, stand_in
from test_kdiffusion_float32 import _kd_euler

from sdadapt.samplers import sample_latents
from sdadapt.samplers.sigma_space import A1111_ZERO_SNR_ALPHA_CUMPROD, grid_table, model_sigmas, training_sigmas
from sdadapt.training.diffusion import zero_terminal_snr_alphas_cumprod

F32 = torch.float32


def _ztsnr() -> torch.Tensor:
    ac = zero_terminal_snr_alphas_cumprod(sd_alphas_cumprod())
    assert float(ac[-1]) == 0.0
    return ac


def test_the_tables_read_a_zero_last_alpha_as_their_tool_does():
    ac = _ztsnr()
    a = torch.tensor(A1111_ZERO_SNR_ALPHA_CUMPROD, dtype=F32)
    assert torch.equal(model_sigmas(ac, F32)[-1], ((1 - a) / a) ** 0.5)  # (A1111's float32 buffer)
    assert model_sigmas(ac, F32)[-1].item() == pytest.approx(4518.8, abs=0.1)
    assert model_sigmas(ac, torch.float64)[-1].item() == pytest.approx(4518.8, abs=0.1)
    assert training_sigmas(ac)[-1].item() == pytest.approx(4096.0, abs=1e-3)  # (diffusers' 2⁻²⁴)
    x = torch.zeros(1, 4, 2, 2)
    assert grid_table(ac, x, "karras")[-1].item() == pytest.approx(4518.8, abs=0.1)
    assert grid_table(ac, x, None)[-1].item() == pytest.approx(4096.0, abs=1e-3)
    sd = sd_alphas_cumprod().float()  # (a schedule without a zero: the table as it was)
    assert torch.equal(model_sigmas(sd, F32), ((1 - sd) / sd) ** 0.5)


@pytest.mark.parametrize("schedule", ["karras", "uniform"])
def test_a_ztsnr_v_model_on_a1111s_grid_is_a1111s_run(schedule):
    """Euler on A1111's Karras / Uniform grid of a ZTSNR v-prediction model, float32: k-diffusion's ``sample_euler``
    on A1111's table (last ᾱ 4.897e-8), bit for bit; the grid starts at σ_max ≈ 4518.8 (2⁻²⁴'s 4096 before)."""
    ac = _ztsnr()
    a32 = ac.float().clone()
    a32[-1] = A1111_ZERO_SNR_ALPHA_CUMPROD
    table = ((1 - a32) / a32) ** 0.5
    log_table = table.log()

    def denoise(x, s):  # CompVisVDenoiser on the stand-in
        c = lambda v: v[:, None, None, None]
        c_in = c(1 / (s ** 2 + 1.0) ** 0.5)
        out = stand_in(x * c_in, kdiffusion_sigma_to_t(log_table, s))
        return out * c(-s * 1.0 / (s ** 2 + 1.0) ** 0.5) + x * c(1.0 / (s ** 2 + 1.0))

    n = 9
    if schedule == "karras":
        ramp = torch.linspace(0, 1, n)
        lo, hi = table[0].item() ** (1 / 7.0), table[-1].item() ** (1 / 7.0)
        sigmas = torch.cat([(hi + ramp * (lo - hi)) ** 7.0, torch.zeros(1)])
    else:  # get_sigmas(n): t = linspace(T − 1, 0, n), σ(t) in log σ
        t = torch.linspace(len(table) - 1, 0, n)
        lo_i, hi_i, w = t.floor().long(), t.ceil().long(), t.frac()
        sigmas = torch.cat([((1 - w) * log_table[lo_i] + w * log_table[hi_i]).exp(), torch.zeros(1)])
    assert sigmas[0].item() == pytest.approx(4518.8, abs=0.1)
    x_T = torch.randn(2, 4, 5, 6, generator=torch.Generator().manual_seed(4))
    want = _kd_euler(denoise, x_T * sigmas[0], sigmas)
    got = sample_latents(lambda x, t, c: stand_in(x, t), x_T, None, sampler="euler", alphas_cumprod=ac, num_steps=n,
                         schedule=schedule, prediction_type="v_prediction")
    assert torch.equal(got, want), rel_err(got, want)


def test_inpainting_a_ztsnr_model_on_a1111s_grid_reads_sigma_on_its_table():
    """With an all-keep mask every x̂0 is the init latent, so Euler's first step lands on ``init + (x − init)·σ₁/σ₀``.
    ``sample_latents`` on A1111's grid blends the x̂0 the sampler reads (no σ read back: any table gives it); a sampler
    called on the model's outputs reads σ back from the timesteps, right on the sampler's own table
    (:func:`sdadapt.inpaint.masked_model`'s ``sigma_table``; A1111's σ_max 4518.8 at t = 999) and off on diffusers'
    (4096)."""
    from sdadapt import inpaint
    from sdadapt.samplers.euler import euler_sample
    from sdadapt.samplers.sigma_space import discrete_sigmas

    ac = _ztsnr()
    g = torch.Generator().manual_seed(3)
    init, noise = (torch.randn(1, 4, 4, 4, generator=g, dtype=torch.float64) for _ in range(2))
    _, sig = discrete_sigmas(ac, 7, schedule="exponential", dtype=torch.float64)
    s0, s1 = float(sig[0]), float(sig[1])
    want = init + (noise * s0 - init) * (s1 / s0)

    def first_step(sigma_table, *, on_outputs=False):
        wrapped = inpaint.masked_model(lambda x, t, c: stand_in(x, t.double()), init=init,
                                       latmask=torch.zeros(1, 1, 4, 4), sampler="euler", alphas_cumprod=ac,
                                       prediction_type="v_prediction", linear_timesteps=False, sigma_table=sigma_table)
        seen = []
        run = {"alphas_cumprod": ac, "num_steps": 7, "schedule": "exponential", "prediction_type": "v_prediction",
               "callback": lambda i, t, x: seen.append(x)}
        if on_outputs:
            euler_sample(lambda x, t: wrapped(x, t, None), noise, **run)
        else:
            sample_latents(wrapped, noise, None, sampler="euler", **run)
        return seen[0]

    assert s0 == pytest.approx(4518.8, abs=0.1)
    for table in (model_sigmas(ac), None):
        assert torch.allclose(first_step(table), want, rtol=0, atol=1e-9)
    assert torch.allclose(first_step(model_sigmas(ac), on_outputs=True), want, rtol=0, atol=1e-9)
    assert not torch.allclose(first_step(None, on_outputs=True), want, rtol=0, atol=1e-6)  # (measured: 6e-5 off)
