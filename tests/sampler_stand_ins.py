"""What the sampler tests run both sdadapt's samplers and diffusers' schedulers on: SD's training
schedule and one fixed stand-in model."""

from __future__ import annotations

import math

import torch

__all__ = ["SD_BETAS", "assert_guidance_is_the_guided_model", "reference_dpmpp_2m_sde", "stand_in"]

#: Stable Diffusion's training schedule, as a diffusers scheduler config (scaled-linear β, 1000 steps)
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def stand_in(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear 'model' in which t matters a lot (an off-by-one t changes it by ~3%):
    ``0.3·tanh(x) + 0.2·sin(t/7)·flip(x)`` over x (B,C,H,W) at timesteps t (B,)."""
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.3 * torch.tanh(x) + 0.2 * torch.sin(tt / 7) * x.flip(-1)


def reference_dpmpp_2m_sde(x_T: torch.Tensor, ac: torch.Tensor, n: int, noises, *,
                           solver_type: str = "midpoint") -> torch.Tensor:
    """k-diffusion's ``sample_dpmpp_2m_sde(eta=1, s_noise=1, solver_type=...)`` transcribed, on x = x_vp/α
    (σ-space) on diffusers' grid (timesteps round(i·999/n), σ of those, then 0), started where diffusers
    starts (x_vp = x_T), denoiser D = x − σ·ε(x/√(σ²+1), t) with :func:`stand_in`, ``noises[i]`` the
    Gaussian noise of step i::

        x = σ'/σ·e^(−h)·x + (1 − e^(−2h))·D [+ c·(D − D_old)/r] + σ'·√(1 − e^(−2h))·z
        c = ½(1 − e^(−2h))  (midpoint),  ((1 − e^(−2h))/(−2h) + 1)  (heun)
    """
    ts = [round(i * (999 / n)) if i < n else 999 for i in range(n + 1)][::-1][:-1]
    sig = [math.sqrt((1 - float(ac[t])) / float(ac[t])) for t in ts] + [0.0]
    x = x_T * math.sqrt(sig[0] ** 2 + 1)
    old, h_last = None, None
    for i in range(n):
        t = torch.full((x.shape[0],), ts[i], dtype=torch.long)
        den = x - sig[i] * stand_in(x / math.sqrt(sig[i] ** 2 + 1), t)
        if sig[i + 1] == 0:
            x = den
        else:
            h = -math.log(sig[i + 1]) + math.log(sig[i])
            eta_h = h
            x = sig[i + 1] / sig[i] * math.exp(-eta_h) * x + (-math.expm1(-h - eta_h)) * den
            if old is not None:
                r = h_last / h
                if solver_type == "heun":
                    x = x + ((-math.expm1(-h - eta_h)) / (-h - eta_h) + 1) * (1 / r) * (den - old)
                else:
                    x = x + 0.5 * (-math.expm1(-h - eta_h)) * (1 / r) * (den - old)
            x = x + noises[i].double() * sig[i + 1] * math.sqrt(-math.expm1(-2 * eta_h))
            h_last = h
        old = den
    return x


def assert_guidance_is_the_guided_model(sampler: str, direct, *, alphas_cumprod: torch.Tensor, karras: bool,
                                        num_steps: int = 6) -> None:
    """``sample_latents(sampler, uncond=..., guidance_scale=1.5)`` on a conditioned stand-in (a batch of 2
    (4, 4, 4) latents) equals ``direct(guided, x_T, num_steps=, generator=)``, the sampler's own function
    run on the guided model ``uncond + 1.5·(cond − uncond)`` with the same seed (rtol = atol = 1e-6)."""
    from sdadapt.samplers import sample_latents

    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    cond, uncond = torch.full((2, 1), 1.0), torch.full((2, 1), -0.5)

    def model(x, t, c):
        return stand_in(x, t) + 0.1 * c.reshape(-1, 1, 1, 1) * x

    got = sample_latents(model, x_T, cond, sampler=sampler.upper(), alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                         uncond=uncond, guidance_scale=1.5, karras=karras, generator=torch.Generator().manual_seed(4))
    guided = lambda x, t: model(x, t, uncond) + 1.5 * (model(x, t, cond) - model(x, t, uncond))
    want = direct(guided, x_T, num_steps=num_steps, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
