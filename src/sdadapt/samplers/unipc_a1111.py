"""A1111's UniPC (``sd_samplers_timesteps_impl.unipc`` over its ``modules/models/diffusion/uni_pc``: the UniPC
reference code, Zhao et al. 2023, "UniPC: a unified predictor-corrector framework"): ``unipc_a1111`` in
:func:`sdadapt.samplers.sample_latents` and ``generate`` (A1111's label "UniPC"). It is not diffusers'
``UniPCMultistepScheduler`` that ``unipc`` runs: the continuous time of DPM-Solver's discrete VP schedule instead of
integer timesteps, order 3, ``bh1`` and a data-prediction multistep with the corrector after every step but the last.

The schedule (``NoiseScheduleVP('discrete')``): ``log α(t)`` piecewise linear between the points
``(i/T, ½·log ᾱ_{i−1})``, i = 1..T, on A1111's float32 ᾱ (extended linearly beyond them), ``σ(t) = √(1 − α(t)²)``,
``λ(t) = log α − log σ``. ``n`` steps on ``t`` from 1 (img2img: A1111's ``t_start``) to ``1/T``, spaced by
``skip_type`` ("time_uniform", A1111's default; "time_quadratic"; "logSNR"); the model is called at timesteps
``(t − 1/T)·1000`` (fractional), its output read as ε (a v output as A1111's ``CompVisTimestepsVDenoiser``:
:func:`~.a1111_timesteps.ldm_sqrt_tables`, at ``int(timestep)``) and as data ``x̂0 = (x − σ_t·ε)/α_t``. Each step of
order ``k`` (``k − 1`` earlier x̂0 differences ``D_i/r_i`` with ``r_i = (λ_i − λ_prev)/h``, ``h = λ_t − λ_prev``)::

    x_t' = σ_t/σ_prev·x − α_t·(e^{−h} − 1)·x̂0_prev          (−h: data prediction)
    predictor  x_t = x_t' − α_t·B(h)·Σ ρ_p·D,   corrector  x_t = x_t' − α_t·B(h)·(Σ ρ_c·D + ρ_c,last·(x̂0_t − x̂0_prev))

``ρ`` solving ``R ρ = b`` (``R_ij = r_j^i``, ``b_i = i!·φ_{i+1}(−h)/B(h)``; ``ρ_p = ½`` at order 2, ``ρ_c = ½`` at order 1),
``B(h) = −h`` (``bh1``) or ``e^{−h} − 1`` (``bh2``). The first ``order − 1`` steps warm up at orders 1, 2, ...;
``lower_order_final`` lowers the last steps' order to the steps left. ``n`` model calls in all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .a1111_timesteps import (
    _EpsRead,
    a1111_timestep_start,
    a1111_timesteps,
    ldm_sqrt_tables,
    timestep_eps,
)
from .sigma_space import a1111_alphas_cumprod, check_prediction_type
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart

__all__ = ["UNIPC_SKIP_TYPES", "UNIPC_VARIANTS", "VPDiscreteSchedule", "a1111_unipc_sample"]

#: A1111's "UniPC variant" choices taken here (its ``vary_coeff`` is not)
UNIPC_VARIANTS: tuple[str, ...] = ("bh1", "bh2")
#: A1111's "UniPC skip type" choices
UNIPC_SKIP_TYPES: tuple[str, ...] = ("time_uniform", "time_quadratic", "logSNR")


def _interpolate(x: Tensor, xp: Tensor, yp: Tensor) -> Tensor:
    """The piecewise linear ``y(x)`` (x any shape) through the points ``(xp, yp)`` (K,) with ``xp`` rising, extended
    along the first / last segment beyond them; a ``x`` equal to a point takes the segment that point ends (the
    reference's sort of ``[x, xp]`` puts ``x`` first among equals)."""
    k = xp.shape[0]
    flat = x.reshape(-1).contiguous()
    j = torch.searchsorted(xp, flat, right=False).clamp(1, k - 1)
    x0, x1, y0, y1 = xp[j - 1], xp[j], yp[j - 1], yp[j]
    return (y0 + (flat - x0) * (y1 - y0) / (x1 - x0)).reshape(x.shape)


class VPDiscreteSchedule:
    """DPM-Solver's ``NoiseScheduleVP('discrete', alphas_cumprod=ᾱ)`` on the float32 ``alphas_cumprod`` (T,): the
    continuous time ``t ∈ [1/T, 1]`` of a discrete-time model (the module docstring)."""

    def __init__(self, alphas_cumprod: Tensor) -> None:
        ac = alphas_cumprod.detach().float()
        self.total_n = int(ac.shape[0])
        self.log_alpha_array = 0.5 * torch.log(ac)  # (T,)
        self.t_array = torch.linspace(0.0, 1.0, self.total_n + 1)[1:].to(ac.device)  # (T,)

    def log_alpha(self, t: Tensor) -> Tensor:
        """``log α(t)`` (t's shape)."""
        return _interpolate(t, self.t_array.to(t.device), self.log_alpha_array.to(t.device))

    def alpha(self, t: Tensor) -> Tensor:
        return torch.exp(self.log_alpha(t))

    def std(self, t: Tensor) -> Tensor:
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_alpha(t)))

    def lambda_(self, t: Tensor) -> Tensor:
        """``λ(t) = log α − log σ``, the half log-SNR."""
        log_alpha = self.log_alpha(t)
        return log_alpha - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_alpha))

    def inverse_lambda(self, lamb: Tensor) -> Tensor:
        """``t(λ)`` (λ's shape)."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros((1,), device=lamb.device), -2.0 * lamb)
        return _interpolate(log_alpha, torch.flip(self.log_alpha_array.to(lamb.device), [0]),
                            torch.flip(self.t_array.to(lamb.device), [0]))

    def time_steps(self, skip_type: str, t_T: float | Tensor, t_0: float, n: int, device: torch.device) -> Tensor:
        """The ``n + 1`` times (float32) from ``t_T`` down to ``t_0``, spaced by ``skip_type``."""
        if skip_type == "logSNR":
            lambda_T = self.lambda_(torch.as_tensor(t_T).to(device))
            lambda_0 = self.lambda_(torch.as_tensor(t_0).to(device))
            return self.inverse_lambda(torch.linspace(lambda_T.cpu().item(), lambda_0.cpu().item(), n + 1).to(device))
        if skip_type == "time_quadratic":
            return torch.linspace(t_T ** 0.5, t_0 ** 0.5, n + 1).pow(2).to(device)
        return torch.linspace(t_T, t_0, n + 1).to(device)


def a1111_unipc_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                       prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                       callback: StepCallback | None = None, discard_next_to_last_sigma: bool = False,
                       start: Img2ImgStart | None = None, variant: str = "bh1", order: int = 3,
                       skip_type: str = "time_uniform", lower_order_final: bool = True) -> Tensor:
    """A1111's UniPC from unit noise ``x_T`` (B,C,H,W) -> latents (B,C,H,W) (the module's steps). ``model(x, t)``: the
    (guided) model at timesteps t (B,) float32, fractional (each branch's ε read apart where it offers
    ``denoised_by_branch``, :mod:`sdadapt.denoised_branches`; the call's "σ" is the timesteps, as A1111 hands its
    CFGDenoiser); ``alphas_cumprod`` (T,) (float64 best: held in float32 as A1111's buffer); ``num_steps``: A1111's
    ``len(timesteps)`` of its timestep samplers (:func:`~.a1111_timesteps.a1111_timesteps`; with
    ``discard_next_to_last_sigma`` one more), each one model call; ``generator``: not drawn from (no noise);
    ``callback(i, t, x)`` after each step; ``start``: img2img as A1111 runs it (the init latent noised to
    ``timesteps[t_enc]``, the run of ``t_enc`` steps from ``t = timesteps[t_enc − 1]/1000 + 1/1000``). A1111's
    settings: ``variant`` ("UniPC variant", :data:`UNIPC_VARIANTS`), ``order`` ("UniPC order"), ``skip_type``
    ("UniPC skip type", :data:`UNIPC_SKIP_TYPES`), ``lower_order_final`` ("UniPC lower order final").

    Raises:
        ValueError: an unknown prediction type, variant or skip type, an order below 1, fewer steps than the order
            (A1111's assertion "UniPC order must be < sampling steps"), a step count outside [1, T].
    """
    check_prediction_type("unipc_a1111", prediction_type)
    if prediction_type == "sample":
        raise ValueError("A1111's UniPC reads ε or v; for a sample-prediction model use unipc (diffusers' "
                         "UniPCMultistepScheduler)")
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"A1111's UniPC variant must be one of {', '.join(UNIPC_VARIANTS)}, got {variant!r}")
    if skip_type not in UNIPC_SKIP_TYPES:
        raise ValueError(f"A1111's UniPC skip type must be one of {', '.join(UNIPC_SKIP_TYPES)}, got {skip_type!r}")
    if int(order) < 1:
        raise ValueError(f"A1111's UniPC order must be >= 1, got {order}")
    order = int(order)
    ac = a1111_alphas_cumprod(alphas_cumprod.detach().double().cpu())  # (A1111's buffer: float32, ZTSNR's last)
    steps = num_steps + (1 if discard_next_to_last_sigma else 0)
    timesteps = a1111_timesteps(steps, int(ac.shape[0]))
    work = torch.promote_types(x_T.dtype, torch.float32)
    x = x_T.to(work)
    t_start: float | Tensor = 1.0
    if start is not None:  # sample_img2img, then unipc(is_img2img=True): t_start from the last kept timestep
        x, timesteps = a1111_timestep_start(start, x_T, ac, timesteps, num_steps, work)
        t_start = timesteps[-1] / 1000 + 1 / 1000 if len(timesteps) else t_start
    steps = len(timesteps)
    if steps < order:
        raise ValueError(f"A1111's UniPC of order {order} needs at least {order} steps, got {steps} (A1111: 'UniPC "
                         "order must be < sampling steps'); take more steps, a lower order or, for img2img, a higher "
                         "denoising strength")
    schedule = VPDiscreteSchedule(ac.to(x.device))
    tables = ldm_sqrt_tables(alphas_cumprod, prediction_type, x.device)
    one_over_n = 1.0 / schedule.total_n

    def data(x: Tensor, t: Tensor) -> Tensor:
        """x̂0 (B,C,H,W) of the guided model at ``x``, times ``t`` (B,)."""
        t_input = (t - one_over_n) * 1000.0
        eps = timestep_eps(model, x, t_input, _EpsRead(tables, t_input, x, work), x_T.dtype)
        return (x - schedule.std(t)[:, None, None, None] * eps) / schedule.alpha(t)[:, None, None, None]

    def update(x: Tensor, model_prev: list[Tensor], t_prev: list[Tensor], t: Tensor, order: int,
               use_corrector: bool) -> tuple[Tensor, Tensor | None]:
        """One multistep UniPC step of ``order`` to times ``t`` (B,) (the module docstring): ``(x_t, x̂0_t or None)``."""
        lambda_prev_0, lambda_t = schedule.lambda_(t_prev[-1]), schedule.lambda_(t)
        model_prev_0 = model_prev[-1]
        sigma_prev_0, sigma_t = schedule.std(t_prev[-1]), schedule.std(t)
        alpha_t = torch.exp(schedule.log_alpha(t))
        h = lambda_t - lambda_prev_0
        rks, d1s = [], []
        for i in range(1, order):
            rk = ((schedule.lambda_(t_prev[-(i + 1)]) - lambda_prev_0) / h)[0]
            rks.append(rk)
            d1s.append((model_prev[-(i + 1)] - model_prev_0) / rk)
        rks = torch.stack([*rks, torch.ones((), device=x.device)]).float()
        hh = -h[0]  # (data prediction)
        h_phi_1 = torch.expm1(hh)
        h_phi_k = h_phi_1 / hh - 1
        b_h = hh if variant == "bh1" else torch.expm1(hh)
        factorial_i = 1
        rows, b = [], []
        for i in range(1, order + 1):
            rows.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / b_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        r, b = torch.stack(rows), torch.stack(b)
        d1 = torch.stack(d1s, dim=1) if d1s else None  # (B, K, C, H, W)
        x_t_ = (sigma_t / sigma_prev_0)[:, None, None, None] * x \
            - (alpha_t * h_phi_1)[:, None, None, None] * model_prev_0
        scale = (alpha_t * b_h)[:, None, None, None]
        x_t = x_t_
        if d1 is not None:  # predictor
            rhos_p = torch.tensor([0.5], device=x.device) if order == 2 else torch.linalg.solve(r[:-1, :-1], b[:-1])
            x_t = x_t_ - scale * torch.einsum("k,bkchw->bchw", rhos_p, d1)
        else:
            x_t = x_t_ - scale * 0
        if not use_corrector:
            return x_t, None
        rhos_c = torch.tensor([0.5], device=x.device) if order == 1 else torch.linalg.solve(r, b)
        model_t = data(x_t, t)
        corr_res = torch.einsum("k,bkchw->bchw", rhos_c[:-1], d1) if d1 is not None else 0
        return x_t_ - scale * (corr_res + rhos_c[-1] * (model_t - model_prev_0)), model_t

    times = schedule.time_steps(skip_type, t_start, one_over_n, steps, x.device)
    batch = x.shape[0]

    def at(i: int) -> Tensor:
        return times[i].expand(batch)

    model_prev, t_prev = [data(x, at(0))], [at(0)]
    done = 0
    for init_order in range(1, order):  # the first steps at orders 1, 2, ...
        x, model_x = update(x, model_prev, t_prev, at(init_order), init_order, use_corrector=True)
        if callback is not None:
            callback(done, (at(init_order) - one_over_n) * 1000.0, x)
        done += 1
        model_prev.append(model_x if model_x is not None else data(x, at(init_order)))
        t_prev.append(at(init_order))
    for step in range(order, steps + 1):
        step_order = min(order, steps + 1 - step) if lower_order_final else order
        x, model_x = update(x, model_prev, t_prev, at(step), step_order, use_corrector=step != steps)
        if callback is not None:
            callback(done, (at(step) - one_over_n) * 1000.0, x)
        done += 1
        if step < steps:  # (the steps read the last `order` entries)
            model_prev = [*model_prev[1 - order:], model_x if model_x is not None else data(x, at(step))]
            t_prev = [*t_prev[1 - order:], at(step)]
    return x.to(x_T.dtype)
