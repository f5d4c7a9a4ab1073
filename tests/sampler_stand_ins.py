"""What the sampler tests run both sdadapt's samplers and diffusers' schedulers on: SD's training
schedule and one fixed stand-in model."""

from __future__ import annotations

import torch

__all__ = ["SD_BETAS", "assert_guidance_is_the_guided_model", "stand_in"]

#: Stable Diffusion's training schedule, as a diffusers scheduler config (scaled-linear β, 1000 steps)
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def stand_in(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear 'model' in which t matters a lot (an off-by-one t changes it by ~3%):
    ``0.3·tanh(x) + 0.2·sin(t/7)·flip(x)`` over x (B,C,H,W) at timesteps t (B,)."""
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.3 * torch.tanh(x) + 0.2 * torch.sin(tt / 7) * x.flip(-1)


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
