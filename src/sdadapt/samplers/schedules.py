"""AUTOMATIC1111's "Schedule type" (A1111 ≥ 1.9, ``modules/sd_schedulers.py``): the σ grid of a sampling
run as its own choice, apart from the sampler's update rule.

Every schedule here is a function of the step count n and the model's training noise levels
``σ_t = √((1 − ᾱ_t)/ᾱ_t)`` (T,), ascending, ``σ_min = σ_0``, ``σ_max = σ_{T−1}`` (A1111's
``model_wrap.sigmas``), and returns the σ a sampler steps through, descending, its last the value
the run ends on (0, or σ_min for "KL Optimal"). A1111's code, transcribed, in the table's dtype (on A1111's
float32 table, :func:`.sigma_space.model_sigmas`, in float32 as A1111 computes them; on a float64 one in float64):

* ``uniform`` (k-diffusion's ``get_sigmas(n)``): ``t = linspace(T−1, 0, n)``, σ interpolated in log σ
  between the integer timesteps (``t_to_sigma``), then 0. ``normal``: the same (A1111's
  ``normal_scheduler`` with ``sgm=False`` is ``get_sigmas`` written out).
* ``karras``: ``(σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ``, ρ = 7, then 0.
* ``exponential``: ``exp(linspace(log σ_max, log σ_min, n))``, then 0. ``polyexponential``:
  ``exp(ramp^ρ·(log σ_max − log σ_min) + log σ_min)``, ``ramp = linspace(1, 0, n)``, ρ = 1 (A1111's default:
  the exponential grid).
* ``sgm_uniform``: ``t = linspace(T−1, 0, n+1)[:-1]``, σ(t) in log σ, then 0.
* ``kl_optimal``: ``tan(i/n·atan σ_min + (1 − i/n)·atan σ_max)``, i = 0..n: n + 1 values ending on σ_min
  (no 0: the last step lands on σ_min, as in A1111).
* ``align_your_steps``: NVIDIA's published 10-step tables (11 σ) for SD 1.5 and SDXL, interpolated
  log-linearly to n values when n ≠ 11 (A1111's ``loglinear_interp``; so 10 steps are the table
  interpolated to 10 σ, as A1111 does), then 0. ``align_your_steps`` is the SD 1.5 table,
  ``align_your_steps_sdxl`` the SDXL one (A1111 picks by the model; ``generate`` does too).
* ``simple``: ``σ_{T−1−⌊i·T/n⌋}``, i = 0..n−1, then 0.
* ``ddim``: ``σ_1, σ_{1+k}, σ_{1+2k}, …`` (k = max(⌊T/n⌋, 1), all below T), reversed, then 0: ⌈(T−1)/k⌉
  steps, which is not always n (A1111 runs what it gets).
* ``beta``: ``σ_min + F⁻¹(1 − i/(n−1))·(σ_max − σ_min)`` (n = 1: σ_max), F the Beta(0.6, 0.6) CDF (A1111's defaults,
  ``scipy.stats.beta.ppf``; diffusers' ``use_beta_sigmas``), then 0. Needs scipy.

``automatic`` is A1111's "Automatic": the schedule A1111 ≥ 1.9 picks for the sampler
(:data:`A1111_AUTOMATIC`; its ``samplers_k_diffusion`` option ``scheduler``), else ``uniform``.

``discard_next_to_last_sigma`` is A1111's sampler option of that name (DPM2, DPM2 a, DPM++ 3M SDE:
:data:`DISCARD_NEXT_TO_LAST_SIGMA`): ``KDiffusionSampler.get_sigmas`` builds the schedule for n + 1 steps and
drops its next-to-last value (``torch.cat([sigmas[:-2], sigmas[-1:]])``), so the run still has n steps but its
last one jumps from the second-smallest σ of the longer grid straight to the end (0, or σ_min for KL Optimal).
A1111's development branch also lists "Karras Exponential" (a blend); it is not taken here.

A1111's settings "sigma min", "sigma max", "sigma rho", "Beta schedule alpha/beta" and "Use old karras scheduler
sigmas (0.1 to 10)" are :class:`ScheduleOptions`, applied as ``KDiffusionSampler.get_sigmas`` applies them: the
bounds start at the model's σ_min, σ_max (``old_karras_sigmas``: 0.1 and 10); ``sigma_min``/``sigma_max`` replace
them when neither 0 nor the model's value; ``rho`` replaces Karras' 7 / Polyexponential's 1 when neither 0 nor that
default (the other schedules have no ρ). The bounds reach the schedules A1111 gives them to: Karras, Exponential,
Polyexponential, KL Optimal, Beta, and Normal and SGM Uniform (as timesteps ``t(σ_max) … t(σ_min)``); Uniform,
Simple, DDIM and Align Your Steps ignore them, as in A1111. The samplers take them as ``schedule_options=`` and
pass them on to :func:`schedule_sigmas` (``options=``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..sampler_tables import (  # (the names, torch-free: their one home, re-exported here)
    A1111_AUTOMATIC,
    DISCARD_NEXT_TO_LAST_SIGMA,
    SCHEDULE_LABELS,
    SCHEDULES,
    canonical_schedule,
)
from .sigma_space import karras_sigmas, sigma_to_t, t_to_sigma

__all__ = ["A1111_AUTOMATIC", "ALIGN_YOUR_STEPS", "DISCARD_NEXT_TO_LAST_SIGMA", "SCHEDULES", "SCHEDULE_LABELS",
           "ScheduleOptions", "beta_ppf", "canonical_schedule", "schedule_sigmas"]

#: NVIDIA's Align Your Steps 10-step σ (11 values, the last σ_min), as A1111 lists them
ALIGN_YOUR_STEPS: dict[str, tuple[float, ...]] = {
    "sd15": (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029),
    "sdxl": (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029),
}
@dataclass(frozen=True)
class ScheduleOptions:
    """A1111's schedule settings (see the module): ``sigma_min``, ``sigma_max``, ``rho`` (0: the default),
    ``beta_alpha``, ``beta_beta`` (the Beta schedule's, 0.6 each), ``old_karras_sigmas`` (A1111's
    ``use_old_karras_scheduler_sigmas``: bounds 0.1 and 10), ``always_discard_next_to_last_sigma`` (A1111's "Always
    discard next-to-last sigma": every sampler on its grids runs n + 1 steps less the next-to-last σ, or its timestep
    samplers one step more, as :func:`sdadapt.samplers.sample_latents`'s ``discard_next_to_last_sigma=True``),
    ``sgm_noise_multiplier`` (A1111's "SGM noise multiplier": a txt2img run of its σ samplers starts from
    ``x_T·√(1 + σ_0²)``, not ``x_T·σ_0`` — the official SDXL code's start — :func:`.sigma_space.first_sample`).

    Raises:
        ValueError: a negative σ or ρ, a Beta parameter <= 0.
    """

    sigma_min: float = 0.0
    sigma_max: float = 0.0
    rho: float = 0.0
    beta_alpha: float = 0.6
    beta_beta: float = 0.6
    old_karras_sigmas: bool = False
    always_discard_next_to_last_sigma: bool = False
    sgm_noise_multiplier: bool = False

    def __post_init__(self) -> None:
        if self.sigma_min < 0 or self.sigma_max < 0 or self.rho < 0:
            raise ValueError(f"sigma_min, sigma_max and rho must be >= 0 (0: A1111's default), got "
                             f"{self.sigma_min}, {self.sigma_max}, {self.rho}")
        if self.beta_alpha <= 0 or self.beta_beta <= 0:
            raise ValueError(f"beta_alpha and beta_beta must be > 0, got {self.beta_alpha}, {self.beta_beta}")

    @property
    def is_default(self) -> bool:
        """Whether every setting is A1111's default (the grids are then the plain schedules')."""
        return self == ScheduleOptions()

    def takes_rho(self, schedule: str) -> bool:
        """Whether ``rho`` replaces ``schedule``'s own ρ (Karras' 7, Polyexponential's 1; A1111's ``default_rho``;
        the other schedules have none): set, and not that default."""
        default = _DEFAULT_RHO.get(schedule)
        return default is not None and self.rho != 0 and self.rho != default

    def infotext_fields(self, schedule: str, train_sigmas: Tensor) -> dict[str, float]:
        """A1111's infotext fields of these settings on ``schedule``'s grid (``KDiffusionSampler.get_sigmas``):
        "Schedule min sigma" / "Schedule max sigma" where set and not the model's own (training σ (T,) ascending,
        float32 as A1111 holds them), "Schedule rho" where :meth:`takes_rho`, "Beta schedule alpha/beta" on Beta."""
        m_min, m_max = float(train_sigmas[0]), float(train_sigmas[-1])
        out: dict[str, float] = {}
        if self.sigma_min != 0 and self.sigma_min != m_min:
            out["Schedule min sigma"] = float(self.sigma_min)
        if self.sigma_max != 0 and self.sigma_max != m_max:
            out["Schedule max sigma"] = float(self.sigma_max)
        if self.takes_rho(schedule):
            out["Schedule rho"] = float(self.rho)
        if schedule == "beta":
            out["Beta schedule alpha"], out["Beta schedule beta"] = float(self.beta_alpha), float(self.beta_beta)
        return out

    def bounds(self, train_sigmas: Tensor) -> tuple[float, float]:
        """(σ_min, σ_max) A1111 gives a schedule on the training σ (T,) ascending."""
        m_min, m_max = float(train_sigmas[0]), float(train_sigmas[-1])
        lo, hi = (0.1, 10.0) if self.old_karras_sigmas else (m_min, m_max)
        if self.sigma_min != 0 and self.sigma_min != m_min:
            lo = float(self.sigma_min)
        if self.sigma_max != 0 and self.sigma_max != m_max:
            hi = float(self.sigma_max)
        return lo, hi


#: the schedules with a ρ of their own (A1111's ``Scheduler.default_rho``)
_DEFAULT_RHO: dict[str, float] = {"karras": 7.0, "polyexponential": 1.0}


def _loglinear_interp(values: tuple[float, ...], num: int) -> Tensor:
    """A1111's ``loglinear_interp``: the decreasing ``values`` resampled to ``num`` points, linear in log."""
    ys = torch.tensor(values[::-1], dtype=torch.float64).log()
    xs = torch.linspace(0, 1, len(values), dtype=torch.float64)
    new_xs = torch.linspace(0, 1, num, dtype=torch.float64)
    idx = torch.searchsorted(xs, new_xs, right=True).clamp(1, len(values) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    new_ys = y0 + (new_xs - x0) / (x1 - x0) * (y1 - y0)
    return new_ys.exp().flip(0)


def beta_ppf(q: Tensor, alpha: float, beta: float) -> Tensor:
    """The Beta(α, β) inverse CDF at probabilities ``q`` (n,) float64 (``scipy.stats.beta.ppf``).

    Raises:
        ImportError: scipy is not installed (the message names the package).
    """
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - scipy ships with the interop extra
        raise ImportError("the 'beta' schedule needs scipy (scipy.stats.beta.ppf, as A1111 and diffusers use it): "
                          "pip install scipy, or pick another schedule") from None
    return torch.tensor(stats.beta.ppf(q.double().numpy(), alpha, beta), dtype=torch.float64)


def schedule_sigmas(name: str, num_steps: int, train_sigmas: Tensor, *, sdxl: bool = False, rho: float | None = None,
                    beta_alpha: float = 0.6, beta_beta: float = 0.6,
                    discard_next_to_last_sigma: bool = False, options: ScheduleOptions | None = None) -> Tensor:
    """The σ grid (m+1,) CPU, descending, of A1111's schedule ``name`` for ``num_steps`` steps on the
    training σ ``train_sigmas`` (T,) ascending (see the module): m = n except for ``ddim``; the last value
    is 0 except for ``kl_optimal`` (σ_min). ``automatic`` is refused here (it depends on the sampler:
    :data:`A1111_AUTOMATIC`). ``sdxl``: Align Your Steps' SDXL table (else SD 1.5's). ``rho``: Karras' ρ
    (7) or Polyexponential's (1). ``beta_alpha``/``beta_beta``: the Beta schedule's (0.6, 0.6).
    ``discard_next_to_last_sigma``: A1111's option of that name (:data:`DISCARD_NEXT_TO_LAST_SIGMA`): the grid
    for ``num_steps + 1`` steps without its next-to-last value (still m + 1 values, m = n but for ``ddim``).
    ``options``: A1111's schedule settings (:class:`ScheduleOptions`, applied as the module says; they take the
    place of ``rho``/``beta_alpha``/``beta_beta``); ``None``: none. A float32 ``train_sigmas`` (A1111's table,
    :func:`.sigma_space.model_sigmas`) gives a float32 grid computed as A1111 computes it (the torch schedules in
    float32; Beta, Align Your Steps: float64 rounded to float32, as A1111's ``torch.FloatTensor``); otherwise
    float64.

    Raises:
        ValueError: an unknown schedule, ``automatic``, ``num_steps`` < 1.
    """
    key = canonical_schedule(name)
    if key == "automatic":
        raise ValueError("schedule 'automatic' depends on the sampler; resolve it with A1111_AUTOMATIC first")
    n = int(num_steps)
    if n < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if discard_next_to_last_sigma:  # A1111's KDiffusionSampler.get_sigmas: steps + 1, then drop sigmas[-2]
        longer = schedule_sigmas(key, n + 1, train_sigmas, sdxl=sdxl, rho=rho, beta_alpha=beta_alpha,
                                 beta_beta=beta_beta, options=options)
        return torch.cat([longer[:-2], longer[-1:]])
    train = train_sigmas.detach().cpu()
    # (A1111's float32 table: its float32 grids; a float16 one, ᾱ downcast: float32 grids on its float16 values, logs)
    dt = torch.float32 if train.dtype in (torch.float32, torch.float16) else torch.float64
    train = train if train.dtype == torch.float16 else train.to(dt)
    T = int(train.shape[0])
    s_min, s_max = float(train[0]), float(train[-1])
    t_max, t_min = float(T - 1), 0.0
    if options is not None and not options.is_default:  # A1111's settings (KDiffusionSampler.get_sigmas)
        if options.takes_rho(key):
            rho = float(options.rho)
        beta_alpha, beta_beta = options.beta_alpha, options.beta_beta
        if (s_min, s_max) != options.bounds(train):
            s_min, s_max = options.bounds(train)
            t_max, t_min = (float(t) for t in sigma_to_t(torch.tensor([s_max, s_min], dtype=dt), train))
    if train.dtype == torch.float16:  # (A1111's normal / sgm_uniform read t(σ_max), t(σ_min): off T − 1 and 0 there)
        t_max, t_min = (float(t) for t in sigma_to_t(torch.tensor([s_max, s_min], dtype=dt), train))
    zero = torch.zeros(1, dtype=dt)
    if key == "uniform" or (key == "normal" and (t_max, t_min) == (T - 1, 0.0)):
        sig = t_to_sigma(torch.linspace(T - 1, 0, n, dtype=dt), train)
    elif key == "normal":  # A1111's normal_scheduler: t(σ_max) … t(σ_min)
        sig = t_to_sigma(torch.linspace(t_max, t_min, n, dtype=dt), train)
    elif key == "sgm_uniform":
        sig = t_to_sigma(torch.linspace(t_max, t_min, n + 1, dtype=dt)[:-1], train)
    elif key == "karras":
        sig = karras_sigmas(s_min, s_max, n, rho=7.0 if rho is None else float(rho), dtype=dt)
    elif key == "exponential":
        sig = torch.linspace(math.log(s_max), math.log(s_min), n, dtype=dt).exp()
    elif key == "polyexponential":
        ramp = torch.linspace(1, 0, n, dtype=dt) ** (1.0 if rho is None else float(rho))
        sig = (ramp * (math.log(s_max) - math.log(s_min)) + math.log(s_min)).exp()
    elif key == "kl_optimal":
        i = torch.arange(n + 1, dtype=dt)
        return torch.tan(i / n * math.atan(s_min) + (1.0 - i / n) * math.atan(s_max)).to(dt)
    elif key in ("align_your_steps", "align_your_steps_sdxl"):
        table = ALIGN_YOUR_STEPS["sdxl" if sdxl or key == "align_your_steps_sdxl" else "sd15"]
        sig = torch.tensor(table, dtype=torch.float64) if n == len(table) else _loglinear_interp(table, n)
    elif key == "simple":
        step = T / n
        sig = train[[T - 1 - int(i * step) for i in range(n)]]
    elif key == "ddim":
        k = max(T // n, 1)
        sig = train[list(range(1, T, k))].flip(0)
    else:  # beta
        q = 1 - torch.linspace(0, 1, n, dtype=torch.float64)  # (A1111: np.linspace)
        sig = s_min + beta_ppf(q, beta_alpha, beta_beta) * (s_max - s_min)
    return torch.cat([sig.to(dt), zero])
