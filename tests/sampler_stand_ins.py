"""What the sampler tests run both sdadapt's samplers and diffusers' schedulers on: SD's training
schedule and one fixed stand-in model."""

from __future__ import annotations

import torch

__all__ = ["SD_BETAS", "stand_in"]

#: Stable Diffusion's training schedule, as a diffusers scheduler config (scaled-linear β, 1000 steps)
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def stand_in(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed nonlinear 'model' in which t matters a lot (an off-by-one t changes it by ~3%):
    ``0.3·tanh(x) + 0.2·sin(t/7)·flip(x)`` over x (B,C,H,W) at timesteps t (B,)."""
    tt = t.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))
    return 0.3 * torch.tanh(x) + 0.2 * torch.sin(tt / 7) * x.flip(-1)
