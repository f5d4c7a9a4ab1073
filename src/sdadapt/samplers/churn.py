"""k-diffusion's churn on Euler, Heun and DPM2 as A1111 runs them (Karras et al. 2022, "Elucidating the design space
of diffusion-based generative models", Algorithm 2): A1111's settings "Sigma churn", "Sigma tmin", "Sigma tmax" and
"Sigma noise" (``s_churn``, ``s_tmin``, ``s_tmax``, ``s_noise``: ``sampler_extra_params`` of ``sample_euler``,
``sample_heun``, ``sample_dpm_2``).

Before each step's model call, at σ_i of a run of ``n`` steps (k-diffusion 4601bf0, ``sample_euler``)::

    γ = min(s_churn / n, √2 − 1) if s_tmin ≤ σ_i ≤ s_tmax else 0
    ε = randn_like(x)·s_noise                      (drawn on every step)
    σ̂ = σ_i·(γ + 1);  x ← x + ε·√(σ̂² − σ_i²) if γ > 0

and the step then runs from σ̂ (the model called at σ̂, ``dt = σ_{i+1} − σ̂``; DPM2's midpoint between σ̂ and
σ_{i+1}). All in the latents' float32, as A1111 computes it. On A1111's grids only (a ``schedule``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampler_tables import CHURN_SAMPLERS
from .sigma_space import grid_table, sigma_to_t, step_noise, timestep_batch

__all__ = ["CHURN_SAMPLERS", "SigmaChurn", "check_churn", "churned", "churned_timestep"]


@dataclass(frozen=True)
class SigmaChurn:
    """A1111's "Sigma churn" (``churn``, 0: off), "Sigma tmin", "Sigma tmax" (σ range it applies in; A1111's 0 for
    tmax is ∞) and "Sigma noise" (the churn noise's scale).

    Raises:
        ValueError: a negative or non-finite churn, tmin or noise, a tmax below 0.
    """

    churn: float = 0.0
    tmin: float = 0.0
    tmax: float = math.inf
    noise: float = 1.0

    def __post_init__(self) -> None:
        for name in ("churn", "tmin", "noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"sigma {name} must be a number >= 0 (A1111's 'Sigma {name}'), got {value}")
        if not self.tmax >= 0:
            raise ValueError(f"sigma tmax must be >= 0 (A1111's 'Sigma tmax'; 0: no limit), got {self.tmax}")
        if self.tmax == 0:
            object.__setattr__(self, "tmax", math.inf)  # (A1111: `s_tmax or self.s_tmax`, 0 = inf)

    @property
    def active(self) -> bool:
        """Whether a step can churn (``churn`` > 0; the other settings act only then)."""
        return self.churn > 0

    def infotext_fields(self) -> dict[str, float]:
        """A1111's fields for the settings not at their defaults (``Sampler.initialize``, in its order)."""
        fields = {"Sigma churn": self.churn, "Sigma tmin": self.tmin, "Sigma tmax": self.tmax, "Sigma noise": self.noise}
        defaults = {"Sigma churn": 0.0, "Sigma tmin": 0.0, "Sigma tmax": math.inf, "Sigma noise": 1.0}
        return {key: float(value) for key, value in fields.items() if value != defaults[key]}


def churned(x: Tensor, sigma: float, steps: int, churn: SigmaChurn, generator: torch.Generator | None,
            ) -> tuple[Tensor, float, bool]:
    """One step's churn (the module's formulas) of the sample ``x`` (B,C,H,W) at ``sigma`` in a run of ``steps``:
    ``(x, σ̂, churned)``, the noise drawn from ``generator`` (an :class:`~.a1111_noise.A1111Noise`: A1111's
    ``randn_like``) in ``x``'s dtype."""
    s = torch.tensor(sigma, dtype=x.dtype)
    inside = bool(s >= churn.tmin) and bool(s <= churn.tmax)  # (k-diffusion's chained compare, in x's dtype)
    gamma = min(churn.churn / steps, 2 ** 0.5 - 1) if inside else 0.0
    eps = step_noise(x, generator, x.dtype) * churn.noise
    sigma_hat = s * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat ** 2 - s ** 2) ** 0.5
    return x, float(sigma_hat), gamma > 0


def check_churn(name: str, churn: SigmaChurn | None, schedule: str | None) -> bool:
    """Whether sampler ``name`` (one of :data:`CHURN_SAMPLERS`) churns (``churn`` active); refused off A1111's grids.

    Raises:
        ValueError: an active ``churn`` without a ``schedule`` (diffusers' grid).
    """
    if churn is None or not churn.active:
        return False
    if schedule is None:
        raise ValueError(f"{name}: A1111's sigma churn runs on its grids: give a schedule (schedule='automatic' is "
                         "A1111's default)")
    return True


def churned_timestep(sigma_hat: float, alphas_cumprod: Tensor, x_T: Tensor, schedule: str | None,
                     like: Tensor) -> Tensor:
    """The timesteps (B,) of the model call at ``sigma_hat`` on A1111's grid: ``t(σ̂)`` on its σ table, as its
    ``CompVisDenoiser`` reads it (:func:`.sigma_space.sigma_to_t`)."""
    table = grid_table(alphas_cumprod, x_T, schedule)
    return timestep_batch(float(sigma_to_t(torch.tensor([sigma_hat], dtype=table.dtype), table)[0]), like)
