"""DPM-Solver-Fast and DPM-Solver-12/23 adaptive (Lu et al. 2022), as k-diffusion's ``DPMSolver`` class runs
them (``sample_dpm_fast``, ``sample_dpm_adaptive``; A1111's "DPM fast", "DPM adaptive"). diffusers has no
scheduler for either; this is k-diffusion's code transcribed, on the noise prediction
``ε(x, σ) = (x − x̂0(x, σ))/σ`` of the σ-scaled sample x, in ``t = −log σ`` between A1111's ends
σ_max and σ_min (the model's σ of t = T − 1 and t = 0). Both end **at σ_min**, not at 0 (no final denoising
step; what k-diffusion returns).

Steps from t to t' (``h = t' − t``, ``σ(t) = e^(−t)``):

* order 1: ``x' = x − σ(t')·(e^h − 1)·ε(x, t)``;
* order 2 (r₁): ``u₁ = x − σ(s₁)(e^(r₁h) − 1)·ε``, ``s₁ = t + r₁h``;
  ``x' = x − σ(t')(e^h − 1)·ε − σ(t')/(2r₁)·(e^h − 1)·(ε(u₁, s₁) − ε)``;
* order 3 (r₁ = ⅓, r₂ = ⅔): u₁ as above, ``u₂ = x − σ(s₂)(e^(r₂h) − 1)·ε − σ(s₂)(r₂/r₁)((e^(r₂h) − 1)/(r₂h) − 1)·(ε₁ − ε)``,
  ``x' = x − σ(t')(e^h − 1)·ε − σ(t')/r₂·((e^h − 1)/h − 1)·(ε(u₂, s₂) − ε)``.

**Fast** with n model calls: ``m = ⌊n/3⌋ + 1`` steps evenly spaced in t, orders ``3, …, 3, 2, 1`` (n divisible by
3) or ``3, …, 3, n mod 3``: exactly n calls. **Adaptive** (order 3: DPM-Solver-23, 2: -12): from t = −log σ_max,
each try compares the order-(k−1) and order-k results over ``[s, min(s + h, t_end)]``, error
``‖(x_low − x_high)/δ‖/√N``, ``δ = max(atol, rtol·max(|x_low|, |x_prev|))`` over the whole batch; k-diffusion's
PID controller (``PIDStepSizeController``: ``h ← h·(1 + atan(f − 1))``, ``f = e₀^b₁·e₁^b₂·e₂^b₃`` of the inverse
errors, accept when the factor ≥ ``accept_safety``) sets h; ``order`` model calls per try, until t_end − 1e-5.

With ``eta`` > 0 each step aims at σ_down of the ancestral split σ(t) → σ(t') (capped at t_end) and adds
``s_noise·√(σ(t')² − σ_down²)·z``; k-diffusion's ``randn_like`` draws z after every fast step (η = 0 too: the
noise is then multiplied by 0) and after every accepted adaptive step: here from ``generator``, in that
order. A1111 runs both with its "Eta for ancestral samplers" (1 by default); k-diffusion's default is 0.

**Dtypes.** On float32 (and half) latents everything runs as A1111 runs k-diffusion 4601bf0, bit for bit: the σ
table is A1111's float32 one (``((1 − ᾱ)/ᾱ)**0.5`` of float32 ᾱ, on the latents' device), t_start / t_end are
``−log`` of its ends as float32 0-dim tensors (``t(torch.tensor(sigma))``), the fast grid a float32 ``linspace``,
every h, σ(t) and coefficient a float32 0-dim tensor in k-diffusion's order of operations, ``atol`` / ``rtol``
float32 tensors, and the model sees ``x·c_in`` at the timesteps of the denoiser's float32 ``sigma_to_t``. The
adaptive controller turns any rounding difference into other steps (with float64 times and σ, 5 of 8 SD test
cases took other tries than k-diffusion's: 190 for 184, 125 for 151, ...). Float64 latents keep all of it in
float64 (a precise mode; k-diffusion's times stay float32 there).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .sigma_space import (
    ancestral_step,
    check_prediction_type,
    denoise,
    model_sigmas,
    sigma_to_t,
    step_noise,
    t_to_sigma,
    work_dtype,
)
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart

__all__ = ["DPMSolverInfo", "dpm_adaptive_sample", "dpm_fast_orders", "dpm_fast_sample"]

#: what :func:`dpm_adaptive_sample` reports in ``info``: steps tried, model calls, accepted, rejected
DPMSolverInfo = dict[str, int]


def dpm_fast_orders(nfe: int) -> list[int]:
    """The solver order of each step of DPM-Solver-Fast with ``nfe`` model calls (k-diffusion's
    ``dpm_solver_fast``): ``[3]·(m−2) + [2, 1]`` when 3 divides nfe, else ``[3]·(m−1) + [nfe mod 3]``,
    ``m = ⌊nfe/3⌋ + 1``; they sum to nfe."""
    m = nfe // 3 + 1
    return [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]


class _Solver:
    """k-diffusion's ``DPMSolver`` on a (guided) ``model(x_in, t)`` as A1111 wraps it: ε at (x, t = −log σ) and
    the three step rules, written as k-diffusion writes them (sampling.py:343-386) on 0-dim times ``t`` in
    ``time_dtype``: each coefficient is computed as a 0-dim tensor, then multiplied into the latents."""

    def __init__(self, model: Denoise, alphas_cumprod: Tensor, prediction_type: str, x_T: Tensor):
        self.model, self.prediction_type, self.dtype = model, prediction_type, x_T.dtype
        #: times, σ table, coefficients, atol / rtol: float32 for float32 (and half) latents, as k-diffusion holds
        #: them whatever the latents (``t(torch.tensor(sigma))``, sampling.py:490, 502); float64 latents keep them
        #: in float64, a precise mode k-diffusion has not
        self.time_dtype = work_dtype(x_T)
        #: (T,) A1111's σ table and its log, on the latents' device (A1111's model_wrap buffers)
        self.sigmas = model_sigmas(alphas_cumprod, self.time_dtype, x_T.device)
        self.log_sigmas = self.sigmas.log()
        self.calls = 0

    @staticmethod
    def sigma(t: Tensor) -> Tensor:
        return t.neg().exp()

    @staticmethod
    def t(sigma: Tensor) -> Tensor:
        return -sigma.log()

    def model_steps(self, sigma: Tensor) -> Tensor:
        """The model's float32 timesteps (B,) at noise levels ``sigma`` (B,) (A1111: the denoiser's ``sigma_to_t``)."""
        return sigma_to_t(sigma, self.sigmas.to(sigma.device)).float()

    def eps(self, x: Tensor, t: Tensor) -> Tensor:
        """``DPMSolver.eps`` on A1111's ``CompVisDenoiser`` / ``CompVisVDenoiser`` (external.py:90-110, 141-167):
        σ (B,) in x's dtype, the model at ``x·c_in``, ``c_in = 1/(σ² + 1)**0.5``, timesteps of σ against the σ table,
        then ``(x − x̂0)/σ(t)`` (B,C,H,W) (:func:`~.sigma_space.denoised`: the wrappers' rounding)."""
        sigma = self.sigma(t) * x.new_ones([x.shape[0]])
        s = sigma.reshape(-1, *([1] * (x.dim() - 1)))
        x0 = denoise(self.model, x, s, self.model_steps(sigma), prediction_type=self.prediction_type, dtype=self.dtype)
        self.calls += 1
        return (x - x0) / self.sigma(t)

    def step_1(self, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor) -> Tensor:
        h = t_next - t
        return x - self.sigma(t_next) * h.expm1() * eps

    def step_2(self, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor, r1: float = 0.5,
               cache: dict | None = None) -> Tensor:
        h = t_next - t
        s1 = t + r1 * h
        eps_r1 = self._eps_r1(x, s1, r1 * h, eps, cache)
        return (x - self.sigma(t_next) * h.expm1() * eps
                - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps))

    def step_3(self, x: Tensor, t: Tensor, t_next: Tensor, eps: Tensor, cache: dict | None = None) -> Tensor:
        r1, r2 = 1 / 3, 2 / 3
        h = t_next - t
        s1, s2 = t + r1 * h, t + r2 * h
        eps_r1 = self._eps_r1(x, s1, r1 * h, eps, cache)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(u2, s2)
        return (x - self.sigma(t_next) * h.expm1() * eps
                - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps))

    def _eps_r1(self, x: Tensor, s1: Tensor, r1h: Tensor, eps: Tensor, cache: dict | None) -> Tensor:
        """ε at ``u₁ = x − σ(s₁)(e^(r₁h) − 1)·ε``; k-diffusion's ``eps_cache['eps_r1']`` reuses it within a step
        (the adaptive order-3 try: its order-2 step with r₁ = ⅓ and its order-3 step share it)."""
        if cache is not None and "eps_r1" in cache:
            return cache["eps_r1"]
        eps_r1 = self.eps(x - self.sigma(s1) * r1h.expm1() * eps, s1)
        if cache is not None:
            cache["eps_r1"] = eps_r1
        return eps_r1

    def callback_steps(self, t: Tensor, x: Tensor) -> Tensor:
        """The model timesteps (B,) of σ(t) on x's device (what the step callbacks get)."""
        return self.model_steps(self.sigma(t).reshape(1)).expand(x.shape[0]).to(x.device)


def _ends(solver: _Solver, sampler: str, eta: float, s_noise: float) -> tuple[Tensor, Tensor]:
    """``(t_start, t_end)`` 0-dim CPU: ``t(torch.tensor(σ))`` of A1111's σ_max and σ_min (``.item()`` of
    :func:`~.sigma_space.model_sigmas`' ends; k_diffusion/sampling.py:490, 502), in the time dtype."""
    if eta < 0 or s_noise < 0:
        raise ValueError(f"{sampler}: eta and s_noise must be >= 0, got eta={eta}, s_noise={s_noise}")
    ends = solver.t(solver.sigmas[[-1, 0]].cpu())
    return ends[0], ends[1]


def _img2img_ends(solver: _Solver, start: Img2ImgStart, num_steps: int, x_T: Tensor, *, sampler: str,
                  eta: float) -> tuple[Tensor, Tensor, int, Tensor]:
    """A1111's ``sample_img2img`` for DPM fast / adaptive: ``sigma_sched`` = its uniform grid of ``num_steps``
    (``model_wrap.get_sigmas``, A1111's grid for both, computed in the time dtype as A1111 does in float32:
    k_diffusion/external.py:59-63, 79-83) from ``start``'s index on; ``(t_start, t_end, n, x)`` with
    ``σ_max = sigma_sched[0]``, ``σ_min = sigma_sched[−2]`` (the last σ is 0), ``n = len(sigma_sched) − 1`` model
    calls (DPM fast) and ``x = init + x_T·σ_max`` (B,C,H,W) in the work dtype.

    At ``t_enc = 0`` (a strength below ``1 / num_steps``) ``sigma_sched`` is ``[σ, 0]``: A1111 hands k-diffusion
    ``σ_min = σ_max``, where ``DPMSolver.dpm_solver_fast`` / ``dpm_solver_adaptive`` take the interval as a
    reverse one: with ``eta > 0`` (A1111's default ``eta_ancestral`` 1) they raise "eta must be 0 for reverse
    sampling"; with ``eta = 0`` they return ``x`` as it came (the noised init, no model call to speak of).

    Raises:
        ValueError: ``t_enc = 0`` with ``eta > 0``, as k-diffusion (naming the strength that runs a step).
    """
    from ..img2img import start_index

    ts = torch.linspace(solver.sigmas.shape[0] - 1, 0, int(num_steps), dtype=solver.time_dtype,
                        device=solver.sigmas.device)
    grid = t_to_sigma(ts, solver.sigmas)  # (without the appended 0; on the device, as A1111's)
    sched = grid[start_index(start, len(grid), rule="a1111"):]
    if len(sched) == 1 and eta:
        raise ValueError(f"{sampler}: img2img runs no step of this {num_steps}-step grid (t_enc = 0: a denoising "
                         f"strength below 1/{num_steps}, or a single fixed step); A1111 hands k-diffusion σ_min = "
                         "σ_max, which it refuses with eta > 0 ('eta must be 0 for reverse sampling'): raise the "
                         "strength or the steps (--steps, --img2img-steps, --hires-steps), choose another sampler, "
                         "or pass eta=0 from Python")
    x = start.noised(x_T, float(sched[0]))
    return solver.t(sched[0]), solver.t(sched[-1]), len(sched), x


def _ancestral_target(t: Tensor, t_next: Tensor, t_end: Tensor, eta: float) -> tuple[Tensor, Tensor | float]:
    """``(t', σ_up)``: k-diffusion's ``sd, su = get_ancestral_step(σ(t), σ(t_next), η)``, ``t' = min(t_end, t(sd))``,
    ``su = √(σ(t_next)² − σ(t')²)`` on the 0-dim times (sampling.py:404-409, 446-451); η = 0: ``(t_next, 0)``."""
    if not eta:
        return t_next, 0.0
    down, _ = ancestral_step(_Solver.sigma(t), _Solver.sigma(t_next), eta)
    target = torch.minimum(t_end, _Solver.t(torch.as_tensor(down, dtype=t.dtype)))  # (σ_down = 0: t_end)
    return target, (_Solver.sigma(t_next) ** 2 - _Solver.sigma(target) ** 2) ** 0.5


def dpm_fast_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                    prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                    callback: StepCallback | None = None, eta: float = 1.0, s_noise: float = 1.0,
                    start: Img2ImgStart | None = None) -> Tensor:
    """DPM-Solver-Fast with ``num_steps`` model calls (k-diffusion's ``sample_dpm_fast(n=num_steps)``, A1111's
    "DPM fast") from unit noise ``x_T`` (B,C,H,W) -> the sample at σ_min (B,C,H,W) (see the module).

    ``model(x_in, t)``: the (guided) model at ``x/√(σ²+1)`` and float32 timesteps ``t(σ)`` (B,) (log-σ
    interpolation, unrounded); ``alphas_cumprod`` (T,): the training schedule (σ_min, σ_max its ends);
    ``eta`` (A1111's default 1; k-diffusion's 0), ``s_noise``: the ancestral noise, z drawn from ``generator``
    after every step. ``callback(i, t, x)``: after each step, t the model timesteps of its start. ``start``: img2img by
    A1111's rule: between ``sigma_sched[0]`` and ``sigma_sched[−2]`` of A1111's uniform grid of ``num_steps`` from
    ``start``'s index on, with ``len(sigma_sched) − 1`` model calls (A1111's ``n``), from ``init + x_T·σ_max``.

    Raises:
        ValueError: an unknown prediction type, ``num_steps`` < 1, a negative ``eta`` or ``s_noise``.
    """
    check_prediction_type("dpm_fast", prediction_type)
    if int(num_steps) < 1:
        raise ValueError(f"dpm_fast: num_steps (model calls) must be >= 1, got {num_steps}")
    solver = _Solver(model, alphas_cumprod, prediction_type, x_T)
    t_start, t_end = _ends(solver, "dpm_fast", eta, s_noise)
    nfe = int(num_steps)
    x = x_T.to(work_dtype(x_T)) * float(solver.log_sigmas[-1].exp())  # (A1111: x·get_sigmas(n)[0] = e^(log σ_max))
    if start is not None:  # img2img (sdadapt.img2img): A1111's sigma_sched ends and n
        t_start, t_end, nfe, x = _img2img_ends(solver, start, num_steps, x_T, sampler="dpm_fast", eta=eta)
    orders = dpm_fast_orders(nfe)
    ts = torch.linspace(float(t_start), float(t_end), len(orders) + 1, dtype=solver.time_dtype,
                        device=x.device)  # (sampling.py:394)
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        target, up = _ancestral_target(t, t_next, t_end, eta)
        eps = solver.eps(x, t)
        if order == 1:
            x = solver.step_1(x, t, target, eps)
        elif order == 2:
            x = solver.step_2(x, t, target, eps)
        else:
            x = solver.step_3(x, t, target, eps)
        x = x + up * s_noise * step_noise(x, generator, x.dtype)  # drawn every step (float32: A1111 samples float32 x)
        if callback is not None:
            callback(i, solver.callback_steps(t, x), x)
    return x.to(x_T.dtype)


class _PIDController:
    """k-diffusion's ``PIDStepSizeController``."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float,
                 eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.errs: list[float] = []

    def propose_step(self, error: float) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error, inv_error, inv_error]
        self.errs[0] = inv_error
        factor = self.errs[0] ** self.b1 * self.errs[1] ** self.b2 * self.errs[2] ** self.b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errs[2] = self.errs[1]
            self.errs[1] = self.errs[0]
        self.h *= factor
        return accept


def dpm_adaptive_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int | None = None,
                        prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                        callback: StepCallback | None = None, order: int = 3, rtol: float = 0.05,
                        atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0, icoeff: float = 1.0,
                        dcoeff: float = 0.0, accept_safety: float = 0.81, eta: float = 1.0, s_noise: float = 1.0,
                        info: DPMSolverInfo | None = None, max_tries: int = 10_000,
                        start: Img2ImgStart | None = None, tried: Callable[[int], None] | None = None) -> Tensor:
    """DPM-Solver-23 (``order=3``) or -12 (``order=2``) with adaptive steps (k-diffusion's ``sample_dpm_adaptive``,
    A1111's "DPM adaptive") from unit noise ``x_T`` (B,C,H,W) -> the sample at σ_min (B,C,H,W) (see the module).

    ``num_steps`` is unused without ``start``: the step count is the controller's (A1111 passes none either). ``rtol``, ``atol``,
    ``h_init``, ``pcoeff``, ``icoeff``, ``dcoeff``, ``accept_safety``, ``eta``, ``s_noise``: k-diffusion's
    (``eta`` A1111's default 1; with η > 0 the controller's order is 1.5). ``info``: a dict filled with
    k-diffusion's ``{"steps", "nfe", "n_accept", "n_reject"}`` (nfe: the model calls). ``callback(i, t, x)``
    after each accepted step; ``tried(k)`` after each try ``k`` (0, 1, …; rejected ones too), where k-diffusion calls
    its ``info_callback`` (``i = info['steps'] − 1``: A1111's step counter). ``model``, ``alphas_cumprod``,
    ``generator`` as :func:`dpm_fast_sample`. ``start``:
    img2img by A1111's rule, between ``sigma_sched[0]`` and ``sigma_sched[−2]`` as :func:`dpm_fast_sample` (here
    ``num_steps`` is the grid's step count A1111's rule needs).

    Raises:
        ValueError: an unknown prediction type, ``order`` not 2 or 3, negative options.
        RuntimeError: the error estimate is not finite (a NaN model output), or ``max_tries`` tries did not reach
            σ_min (k-diffusion would loop on).
    """
    check_prediction_type("dpm_adaptive", prediction_type)
    if order not in (2, 3):
        raise ValueError(f"dpm_adaptive: order must be 2 or 3, got {order}")
    if rtol < 0 or atol < 0 or h_init == 0:
        raise ValueError(f"dpm_adaptive: rtol and atol must be >= 0 and h_init non-zero, got {rtol}, {atol}, {h_init}")
    solver = _Solver(model, alphas_cumprod, prediction_type, x_T)
    t_start, t_end = _ends(solver, "dpm_adaptive", eta, s_noise)
    x = x_T.to(work_dtype(x_T)) * float(solver.log_sigmas[-1].exp())  # (A1111: x·get_sigmas(n)[0] = e^(log σ_max))
    if start is not None:  # img2img (sdadapt.img2img): A1111's sigma_sched ends
        if num_steps is None or int(num_steps) < 1:
            raise ValueError("dpm_adaptive: img2img needs num_steps (the grid A1111's rule cuts), got "
                             f"{num_steps}")
        t_start, t_end, _, x = _img2img_ends(solver, start, int(num_steps), x_T, sampler="dpm_adaptive",
                                          eta=eta)
    x_prev = x
    pid = _PIDController(abs(h_init), pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
    stats = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
    atol_t, rtol_t = (torch.tensor(v, dtype=solver.time_dtype, device=x.device) for v in (atol, rtol))  # (:435)
    s = t_start
    while s < t_end - 1e-5:
        if stats["steps"] >= max_tries:
            raise RuntimeError(f"dpm_adaptive: {max_tries} tries did not reach σ_min (at σ = "
                               f"{float(solver.sigma(s)):.4g}); raise rtol/atol")
        t = torch.minimum(t_end, s + pid.h)
        target, up = _ancestral_target(s, t, t_end, eta)
        cache: dict = {}
        eps = solver.eps(x, s)
        if order == 2:
            x_low = solver.step_1(x, s, target, eps)
            x_high = solver.step_2(x, s, target, eps, cache=cache)
        else:
            x_low = solver.step_2(x, s, target, eps, r1=1 / 3, cache=cache)
            x_high = solver.step_3(x, s, target, eps, cache=cache)
        delta = torch.maximum(atol_t, rtol_t * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(torch.linalg.vector_norm((x_low - x_high).detach() / delta.detach()) / x.numel() ** 0.5)
        if not math.isfinite(error):
            raise RuntimeError(f"dpm_adaptive: the error estimate is {error} at σ = {float(solver.sigma(s)):.4g} "
                               "(a non-finite model output?)")
        if pid.propose_step(error):
            x_prev = x_low
            x = x_high + up * s_noise * step_noise(x_high, generator, x_high.dtype)
            if callback is not None:
                callback(stats["n_accept"], solver.callback_steps(s, x), x)
            s = t
            stats["n_accept"] += 1
        else:
            stats["n_reject"] += 1
        stats["nfe"] += order
        stats["steps"] += 1
        if tried is not None:
            tried(stats["steps"] - 1)
    if info is not None:
        info.update(stats)
    return x.to(x_T.dtype)

