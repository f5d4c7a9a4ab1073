"""Linear multistep on σ (diffusers' ``LMSDiscreteScheduler``, k-diffusion's ``sample_lms``;
kohya's ``lms``/``k_lms``, A1111's "LMS").

The ODE ``dx/dσ = (x − x̂0(x, σ))/σ`` is stepped from σ_i to σ_{i+1} with the integral of the
Lagrange polynomial through the last ``order`` derivatives (order 4, fewer on the first steps).
diffusers integrates each Lagrange basis polynomial numerically (``scipy.integrate.quad``); it is a
product of linear factors, so here it is expanded and integrated exactly (float64, no scipy).

On one of A1111's grids with float32 (or half) latents the coefficients are A1111's instead, bit for bit:
k-diffusion's ``linear_multistep_coeff`` (k_diffusion/sampling.py:247-258 at 4601bf0) evaluates the basis polynomial
on the float32 σ (``sigmas.cpu().numpy()``) — numerators ``τ − σ_k`` in float64, denominators ``σ_j − σ_k`` float32
differences, as NumPy 1.x (A1111 pins 1.26) promotes them — and integrates it with ``scipy.integrate.quad``, whose
first pass, QUADPACK's 21-point Gauss–Kronrod rule (``dqk21``), already meets its tolerance on these cubics:
:func:`gauss_kronrod_21` is that pass, summed in ``dqk21``'s order (equal to ``quad`` on every polynomial
tried; no scipy needed).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from numpy.polynomial import polynomial as P
from torch import Tensor

from .sigma_space import (
    discrete_start,
    sigma_slope,
    timestep_batch,
)
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from .schedules import ScheduleOptions

__all__ = ["a1111_lms_coefficients", "gauss_kronrod_21", "lms_coefficients", "lms_sample"]

#: QUADPACK's ``dqk21`` abscissae (xgk) and Kronrod weights (wgk) on [−1, 1], positive half, its order
_XGK = (0.995657163025808080735527280689003, 0.973906528517171720077964012084452, 0.930157491355708226001207180059508,
        0.865063366688984510732096688423493, 0.780817726586416897063717578345042, 0.679409568299024406234327365114874,
        0.562757134668604683339000099272694, 0.433395394129247190799265943165784, 0.294392862701460198131126603103866,
        0.148874338981631210884826001129720, 0.0)
_WGK = (0.011694638867371874278064396062192, 0.032558162307964727478818972459390, 0.054755896574351996031381300244580,
        0.075039674810919952767043140916190, 0.093125454583697605535065465083366, 0.109387158802297641899210590325805,
        0.123491976262065851077958109831074, 0.134709217311473325928054001771707, 0.142775938577060080797094273138717,
        0.147739104901338491374841515972068, 0.149445554002916905664936468389821)


def gauss_kronrod_21(f: Callable[[float], float], a: float, b: float) -> float:
    """``∫_a^b f`` by QUADPACK's 21-point Gauss–Kronrod rule summed in ``dqk21``'s order (the centre, then the
    pairs at the Gauss abscissae, then the others; ``result = resk·hlgth``): what ``scipy.integrate.quad`` returns
    when its first pass meets the tolerance, as it does for polynomials of degree below 31."""
    centre, half = 0.5 * (a + b), 0.5 * (b - a)
    total = _WGK[10] * f(centre)
    for j in (1, 3, 5, 7, 9, 0, 2, 4, 6, 8):
        step = half * _XGK[j]
        total = total + _WGK[j] * (f(centre - step) + f(centre + step))
    return total * half


def a1111_lms_coefficients(sigmas: list[float], i: int, order: int) -> list[float]:
    """k-diffusion's ``linear_multistep_coeff(order, sigmas, i, j)`` for ``j < order`` as A1111 computes them
    (see the module): the basis polynomial ``Π_{k≠j} (τ − σ_{i−k})/(σ_{i−j} − σ_{i−k})`` on the grid's float32 σ
    (``sigmas``: n + 1 values), numerators in float64, denominators float32 differences, integrated over
    ``[σ_i, σ_{i+1}]`` by :func:`gauss_kronrod_21`. Returns ``order`` floats (j = 0: σ_i's derivative)."""
    t = np.asarray(sigmas, dtype=np.float32)

    def basis(j: int) -> Callable[[float], float]:
        def fn(tau: float) -> float:
            prod = 1.0
            for k in range(order):
                if k != j:
                    prod *= (tau - float(t[i - k])) / float(t[i - j] - t[i - k])
            return prod
        return fn

    return [gauss_kronrod_21(basis(j), float(t[i]), float(t[i + 1])) for j in range(order)]


def lms_coefficients(nodes: list[float], start: float, end: float) -> list[float]:
    """``∫_start^end ℓ_j(τ) dτ`` for each Lagrange basis polynomial ``ℓ_j`` on ``nodes``.

    ``nodes``: the σ of the derivatives the step combines, newest first (σ_i, σ_{i-1}, ...);
    ``start``/``end``: σ_i and σ_{i+1}. ``ℓ_j(τ) = Π_{k≠j} (τ − σ_k)/(σ_j − σ_k)``, expanded
    into its monomial coefficients and integrated exactly in float64. Returns one float per node.
    """
    out = []
    for j, node in enumerate(nodes):
        others = [s for k, s in enumerate(nodes) if k != j]
        denom = float(np.prod([node - s for s in others])) if others else 1.0
        antiderivative = P.polyint(P.polyfromroots(others) if others else np.ones(1))
        out.append(float((P.polyval(end, antiderivative) - P.polyval(start, antiderivative)) / denom))
    return out


def lms_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
               prediction_type: str = "epsilon", generator: torch.Generator | None = None,
               callback: StepCallback | None = None, karras: bool = False,
               order: int = 4, schedule: str | None = None, schedule_options: ScheduleOptions | None = None,
               discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None) -> Tensor:
    """LMS from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W), as diffusers' ``LMSDiscreteScheduler``
    with its defaults (``timestep_spacing="linspace"``, ``steps_offset=0``) steps it.

    ``model(x_in, t)``: the guided model at ``x/√(σ²+1)`` and fractional float32 timesteps t (B,);
    ``alphas_cumprod`` (T,): the training schedule; ``karras``: σ on Karras et al.'s ρ = 7 grid
    (diffusers' ``use_karras_sigmas``); ``order``: the multistep order (diffusers' ``step(order=)``);
    ``schedule``: one of A1111's σ grids instead (:mod:`.schedules`; float32 / half latents: A1111's
    coefficients, :func:`a1111_lms_coefficients`, its run bit for bit).
    ``generator`` is unused (LMS draws no noise). ``callback(i, t, x)`` sees each step's sample.
    ``x`` is carried in at least float32 between steps; the model sees it in ``x_T``'s dtype.

    Raises:
        ValueError: an unknown prediction type, ``num_steps`` outside [1, T], ``order`` < 1.
    """
    del generator
    if order < 1:
        raise ValueError(f"lms: order must be >= 1, got {order}")
    times, grid, x = discrete_start("lms", x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                                    prediction_type=prediction_type, karras=karras, schedule=schedule,
                                    schedule_options=schedule_options,
                                    discard_next_to_last_sigma=discard_next_to_last_sigma, start=start)
    a1111 = schedule is not None and x.dtype == torch.float32
    derivatives: list[Tensor] = []
    for i in range(len(times)):
        s = grid[i]
        t = timestep_batch(times[i], x)
        derivatives = (derivatives + [sigma_slope(model, x, s, t, prediction_type=prediction_type,
                                                  dtype=x_T.dtype)])[-order:]
        if a1111:  # (A1111's numeric coefficients on its float32 grid)
            coeffs = a1111_lms_coefficients(grid, i, min(i + 1, order))
        else:
            nodes = grid[max(i + 1 - order, 0):i + 1][::-1]  # σ of the derivatives used, newest first
            coeffs = lms_coefficients(nodes, s, grid[i + 1])
        x = x + sum(c * d for c, d in zip(coeffs, reversed(derivatives)))
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)
