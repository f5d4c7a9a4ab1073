"""UniPC (Zhao et al. 2023) as diffusers' ``UniPCMultistepScheduler`` runs it with its defaults:
order 2, data prediction (``predict_x0``), ``B(h) = e^h − 1`` (``bh2``), ``lower_order_final``,
the corrector after every step, final σ 0, on DPM-Solver's grid (:func:`.dpm_solver.dpm_grid`).

Per step i (VP sample x at σ_i, data predictions m_j, ``λ = −log σ``, ``h = λ_{i+1} − λ_i``):

* UniC (i > 0): the model's m_i at the predicted x_i corrects it, from the previous start
  ``x_{i−1}``:
  ``x_i ← (σ_i/σ_{i−1})·x_{i−1} − α_i·φ·(m_{i−1} + Σ_k ρ_k·D_k + ρ_c·(m_i − m_{i−1}))``
  with ``φ = e^(−h) − 1`` over the interval before, ``ρ`` from the order-p linear system
  (``ρ = ½`` for order 1); the model is *not* re-run on the corrected sample.
* UniP: ``x_{i+1} = (σ_{i+1}/σ_i)·x_i − α_{i+1}·φ·(m_i + ½·D_1)``,
  ``D_1 = (m_{i−1} − m_i)/r``, ``r = (λ_{i−1} − λ_i)/h`` (order 2; order 1 drops D_1): with
  ``bh2`` this predictor is DPM-Solver++ 2M.

A1111's "UniPC" is its own port of the reference code (``bh1``, order 3 by default), not this one.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .dpm_solver import dpm_grid, require_distinct_steps, vp_start
from .sigma_space import (
    check_prediction_type,
    timestep_batch,
    vp_alpha_sigma,
    vp_data_prediction,
    work_dtype,
)
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from .schedules import ScheduleOptions

__all__ = ["unipc_sample"]

def _phi_coefficients(hh: float) -> tuple[float, float, float]:
    """``(e^hh − 1, b_1, b_2)`` of diffusers' ``bh2`` UniPC with ``hh = −h``: ``B(h) = e^hh − 1``,
    ``b_k = k!·φ_{k+1}(hh)·hh / B(h)`` where ``φ_2·hh = (e^hh − 1)/hh − 1`` and
    ``φ_3·hh = φ_2·hh/hh − ½``."""
    phi1 = math.expm1(hh)
    k2 = phi1 / hh - 1.0
    k3 = k2 / hh - 0.5
    return phi1, k2 / phi1, 2.0 * k3 / phi1


def unipc_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                 prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                 callback: StepCallback | None = None, karras: bool = False,
                 corrector: bool = True, schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
                 discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None) -> Tensor:
    """UniPC-2 (bh2) from unit noise x_T (B,C,H,W) -> x0 latents (B,C,H,W), as diffusers'
    ``UniPCMultistepScheduler()`` (``use_karras_sigmas`` with ``karras=True``).

    ``model(x_t, t)``: the (guided) model at the VP sample x_t (B,C,H,W) and int64 timesteps t (B,);
    ``alphas_cumprod`` (T,); ``callback(i, t, x)`` sees each step's predicted sample;
    ``corrector=False``: the predictor alone (diffusers' ``disable_corrector`` on every step; equals
    DPM-Solver++ 2M); ``schedule``: one of A1111's σ grids (:func:`.dpm_solver.dpm_grid`). Deterministic
    (``generator`` unused). ``start``: img2img from grid index ``first`` (:func:`.dpm_solver.vp_start`;
    diffusers' ``set_begin_index``): the order warms up again from there (``lower_order_nums`` counts from 0),
    the final orders still count to the grid's end.

    Raises:
        ValueError: an unknown prediction type, ``num_steps`` outside [1, T], or ``num_steps = T``
        without Karras σ (the linspace grid repeats a timestep there).
    """
    check_prediction_type("unipc", prediction_type)
    timesteps, sigmas = dpm_grid(alphas_cumprod, num_steps, karras=karras, final_sigma="zero", schedule=schedule,
                                 schedule_options=schedule_options,
                                 discard_next_to_last_sigma=discard_next_to_last_sigma)
    n = int(timesteps.shape[0])
    sig = sigmas.tolist()
    require_distinct_steps("unipc", sig, int(alphas_cumprod.shape[0]))
    coef = [vp_alpha_sigma(s) for s in sig]  # (α_t, σ_t, λ_t) per grid point
    out_dtype = x_T.dtype
    work = work_dtype(x_T)
    x = (x_T * 1.0).to(work)  # init_noise_sigma = 1
    first = 0
    if start is not None:  # img2img (sdadapt.img2img)
        first, x = vp_start(start, x_T, sig, rule="diffusers")
        x = x.to(work)
    m_prev: Tensor | None = None  # m_{i−1}
    m_prev2: Tensor | None = None  # m_{i−2}
    last_x: Tensor | None = None  # the corrected x_{i−1} the last predictor started from
    last_order = 1
    for i in range(first, n):
        t = timestep_batch(int(timesteps[i]), x, torch.long)
        a_i, st_i, lam_i = coef[i]
        m = vp_data_prediction(model(x.to(out_dtype), t), x, a_i, st_i, prediction_type)
        if corrector and last_x is not None:
            _, st_p, lam_p = coef[i - 1]
            h = lam_i - lam_p
            phi1, b1, b2 = _phi_coefficients(-h)
            if last_order == 1:
                corr = 0.5 * (m - m_prev)
            else:
                rk = (coef[i - 2][2] - lam_p) / h
                rho0 = (b1 - b2) / (1.0 - rk)
                corr = (rho0 / rk) * (m_prev2 - m_prev) + (b1 - rho0) * (m - m_prev)
            x = (st_i / st_p) * last_x - (a_i * phi1) * m_prev - (a_i * phi1) * corr
        order = min(2, n - i, i - first + 1)
        a_n, st_n, lam_n = coef[i + 1]
        phi1 = math.expm1(-(lam_n - lam_i))  # −1 when σ_{i+1} = 0 (λ = +inf)
        last_x, last_order = x, order
        pred = m
        if order == 2:  # D_1 = (m_{i−1} − m_i)/r, r = (λ_{i−1} − λ_i)/h
            pred = m + (0.5 * (lam_n - lam_i) / (coef[i - 1][2] - lam_i)) * (m_prev - m)
        x = (st_n / st_i) * x - (a_n * phi1) * pred
        m_prev2, m_prev = m_prev, m
        if callback is not None:
            callback(i, t, x.to(out_dtype))
    return x.to(out_dtype)
