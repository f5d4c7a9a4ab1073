"""What the sampler tests run both sdadapt's samplers and diffusers' schedulers on: SD's training
schedule and one fixed stand-in model."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = [
    "SD_BETAS",
    "KDiffusionDPMSolver",
    "assert_guidance_is_the_guided_model",
    "get_ancestral_step",
    "reference_dpmpp_2m_sde",
    "rel_err",
    "sd_alphas_cumprod",
    "stand_in",
]

#: Stable Diffusion's training schedule, as a diffusers scheduler config (scaled-linear β, 1000 steps)
SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def sd_alphas_cumprod() -> torch.Tensor:
    """(1000,) SD's training ᾱ (:data:`SD_BETAS`: scaled-linear β) computed in float64, not diffusers' float32."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a − b| / max |b|`` in float64 (``b``'s scale at least 1e-30): how far ``a`` is from the reference ``b``."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def kdiffusion_sigma_to_t(log_sigmas: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """k-diffusion 4601bf0 ``DiscreteSchedule.sigma_to_t`` (external.py:65-77, ``quantize=False``): the fractional
    timestep of ``sigma`` on the table ``log_sigmas`` (T,), interpolated in log σ, computed in the table's dtype
    (float32 as A1111 runs it, float64 for a precise reference); shaped as ``sigma``."""
    log_sigma = sigma.log()
    dists = log_sigma - log_sigmas[:, None]
    low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = ((low - log_sigma) / (low - high)).clamp(0, 1)
    return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)


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


def get_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """k-diffusion 4601bf0 ``get_ancestral_step`` on floats: (σ_down, σ_up) of the step σ_from → σ_to."""
    if not eta:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - up ** 2) ** 0.5, up


class KDiffusionDPMSolver:
    """k-diffusion 4601bf0 ``k_diffusion/sampling.py`` ``DPMSolver`` (``dpm_solver_fast``, ``dpm_solver_adaptive``,
    ``PIDStepSizeController``; sampling.py:304-478) transcribed on 0-dim ``time_dtype`` times (t = −log σ).

    ``time_dtype=torch.float32`` is k-diffusion as A1111 calls it: ``sample_dpm_fast`` / ``sample_dpm_adaptive``
    (sampling.py:490, 502) start from ``t(torch.tensor(sigma))`` (float32), ``ts`` is a float32 ``linspace``
    (:394), ``atol`` / ``rtol`` float32 tensors (:435-436), and every h, σ(t), coefficient is a float32 0-dim
    tensor (expressions kept in k-diffusion's order, so the rounding is its); pass ``t_start`` / ``t_end`` from
    :meth:`t_of` of the float32 σ. ``torch.float64`` (the default): the same in float64, a precise reference.

    ``eps_of(x, σ)``: the ε its ``eps`` returns, ``(x − model(x, σ))/σ`` (σ a float; counted in :attr:`calls`);
    ``noise(like)``: its ``noise_sampler``, unit noise of ``like``'s shape (drawn after every fast step and
    every accepted adaptive step, η = 0 too); ``info_callback(d)``: its ``info_callback``, with ``d["i"]`` only
    (after the step's first ε in ``fast``, after every try in ``adaptive``).
    """

    def __init__(self, eps_of: Callable[[torch.Tensor, float], torch.Tensor],
                 noise: Callable[[torch.Tensor], torch.Tensor | float],
                 info_callback: Callable[[dict], None] | None = None, *, time_dtype: torch.dtype = torch.float64):
        self.eps_of, self.noise, self.info_callback, self.calls = eps_of, noise, info_callback, 0
        self.time_dtype = time_dtype

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return t.neg().exp()

    def t_of(self, sigma: float) -> torch.Tensor:
        """``DPMSolver.t(torch.tensor(sigma))``: what ``sample_dpm_*`` hand the solver (in ``time_dtype``)."""
        return -torch.tensor(sigma, dtype=self.time_dtype).log()

    def _time(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=self.time_dtype)

    def eps(self, cache: dict, key: str, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, dict]:
        if key in cache:
            return cache[key], cache
        self.calls += 1
        eps = self.eps_of(x, float(self.sigma(t)))
        return eps, {key: eps, **cache}

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        eps, cache = self.eps(cache, "eps", x, t)
        return x - self.sigma(t_next) * h.expm1() * eps, cache

    def step_2(self, x, t, t_next, r1=1 / 2, cache=None):
        h = t_next - t
        eps, cache = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, cache = self.eps(cache, "eps_r1", u1, s1)
        return (x - self.sigma(t_next) * h.expm1() * eps
                - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)), cache

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps, cache = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, cache = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - self.sigma(s2) * (r2 * h).expm1() * eps
              - self.sigma(s2) * (r2 / r1) * ((r2 * h).expm1() / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2, cache = self.eps(cache, "eps_r2", u2, s2)
        return (x - self.sigma(t_next) * h.expm1() * eps
                - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)), cache

    def _ancestral(self, t, t_next, t_end, eta):
        """(t_next_, su) of sampling.py:404-409 / 446-451."""
        if not eta:
            return t_next, 0.0
        sd, _ = get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
        t_next_ = torch.minimum(t_end, -sd.log())
        return t_next_, (self.sigma(t_next) ** 2 - self.sigma(t_next_) ** 2) ** 0.5

    def fast(self, x, t_start, t_end, nfe, eta=0.0, s_noise=1.0):
        t_start, t_end = self._time(t_start), self._time(t_end)
        m = math.floor(nfe / 3) + 1
        ts = torch.linspace(float(t_start), float(t_end), m + 1, dtype=self.time_dtype)
        orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
        for i in range(len(orders)):
            cache: dict = {}
            t, t_next = ts[i], ts[i + 1]
            t_next_, su = self._ancestral(t, t_next, t_end, eta)
            _, cache = self.eps(cache, "eps", x, t)  # (k-diffusion's denoised for the info callback; cached)
            if self.info_callback is not None:
                self.info_callback({"i": i})
            if orders[i] == 1:
                x, cache = self.step_1(x, t, t_next_, cache)
            elif orders[i] == 2:
                x, cache = self.step_2(x, t, t_next_, cache=cache)
            else:
                x, cache = self.step_3(x, t, t_next_, cache)
            x = x + su * s_noise * self.noise(x)
        return x

    def adaptive(self, x, t_start, t_end, order=3, rtol=0.05, atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0,
                 dcoeff=0.0, accept_safety=0.81, eta=0.0, s_noise=1.0):
        t_start, t_end = self._time(t_start), self._time(t_end)
        atol, rtol = torch.tensor(atol, dtype=self.time_dtype), torch.tensor(rtol, dtype=self.time_dtype)
        pid_order = 1.5 if eta else order
        h = h_init
        b1, b2, b3 = (pcoeff + icoeff + dcoeff) / pid_order, -(pcoeff + 2 * dcoeff) / pid_order, dcoeff / pid_order
        errs: list[float] = []
        s, x_prev = t_start, x
        info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
        while s < t_end - 1e-5:
            cache: dict = {}
            t = torch.minimum(t_end, s + h)
            t_, su = self._ancestral(s, t, t_end, eta)
            _, cache = self.eps(cache, "eps", x, s)
            if order == 2:
                x_low, cache = self.step_1(x, s, t_, cache)
                x_high, cache = self.step_2(x, s, t_, cache=cache)
            else:
                x_low, cache = self.step_2(x, s, t_, r1=1 / 3, cache=cache)
                x_high, cache = self.step_3(x, s, t_, cache)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = float(torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5)
            inv = 1 / (error + 1e-8)  # (PIDStepSizeController.propose_step)
            if not errs:
                errs = [inv, inv, inv]
            errs[0] = inv
            factor = 1 + math.atan(errs[0] ** b1 * errs[1] ** b2 * errs[2] ** b3 - 1)
            accept = factor >= accept_safety
            if accept:
                errs[2], errs[1] = errs[1], errs[0]
            h *= factor
            if accept:
                x_prev = x_low
                x = x_high + su * s_noise * self.noise(x_high)
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            if self.info_callback is not None:
                self.info_callback({"i": info["steps"] - 1})
        return x, info


def assert_guidance_is_the_guided_model(sampler: str, direct, *, alphas_cumprod: torch.Tensor, karras: bool,
                                        num_steps: int = 6) -> None:
    """``sample_latents(sampler, uncond=..., guidance_scale=1.5)`` on a conditioned stand-in (a batch of 2
    (4, 4, 4) latents) equals ``direct(guided, x_T, num_steps=, generator=)``, the sampler's own function
    run on the guided model ``uncond + 1.5·(cond − uncond)`` with the same seed (rtol = atol = 1e-6); for the
    samplers only A1111 runs (``KDIFFUSION_ONLY``) the guided model combines the two outputs' x̂0 instead, as A1111's
    CFGDenoiser (``denoised_by_branch``, sdadapt.denoised_branches), and the runs are equal bit for bit."""
    from sdadapt.samplers import KDIFFUSION_ONLY, sample_latents

    x_T = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    cond, uncond = torch.full((2, 1), 1.0), torch.full((2, 1), -0.5)

    def model(x, t, c):
        return stand_in(x, t) + 0.1 * c.reshape(-1, 1, 1, 1) * x

    got = sample_latents(model, x_T, cond, sampler=sampler.upper(), alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                         uncond=uncond, guidance_scale=1.5, karras=karras, generator=torch.Generator().manual_seed(4))
    guided = lambda x, t: model(x, t, uncond) + 1.5 * (model(x, t, cond) - model(x, t, uncond))
    if sampler in KDIFFUSION_ONLY:
        class OnX0:
            def __call__(self, x, t):
                raise AssertionError("an A1111-only sampler combined the model outputs")

            def denoised_by_branch(self, read, x, t, *, sigma):
                den_u, den_c = read(model(x, t, uncond)), read(model(x, t, cond))
                return den_u + 1.5 * (den_c - den_u)

        want = direct(OnX0(), x_T, num_steps=num_steps, generator=torch.Generator().manual_seed(4))
        assert torch.equal(got, want), rel_err(got, want)
        return
    want = direct(guided, x_T, num_steps=num_steps, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
