"""A1111's timestep samplers (v1.6+: ``modules/sd_samplers_timesteps.py`` and ``sd_samplers_timesteps_impl``): its own
DDIM, PLMS and DDIM CFG++ — ``ddim`` with a ``schedule`` (``"automatic"``, the only one they take), ``plms`` and
``ddim_cfgpp`` in :func:`sdadapt.samplers.sample_latents` and ``generate`` (as ``lcm`` with a schedule is A1111's LCM).
Without a schedule ``ddim`` is diffusers' ``DDIMScheduler`` (another timestep grid and last step); ``pndm`` is
diffusers' ``PNDMScheduler`` (Runge-Kutta warm-up, other timesteps), not A1111's PLMS.

A1111's run of ``n`` steps on a model of ``T`` training steps: timesteps ``range(0, T, T // n) + 1`` clipped to
``T − 1`` (``n + 1`` of them with "Always discard next-to-last sigma"), the sample starting at the unit noise itself,
and ``len − 1`` steps from the last timestep down to the second (the first is only the last step's ``ᾱ_prev``),
each in float32 with the ᾱ of the float32 table. DDIM::

    x̂0 = (x − √(1−ᾱ_t)·ε̂)/√ᾱ_t,   x ← √ᾱ_prev·x̂0 + √(1 − ᾱ_prev − σ_t²)·ε̂ + σ_t·z

``σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1 − ᾱ_t/ᾱ_prev))`` in float64 as A1111's numpy / torch mix computes it ("Eta DDIM",
default 0), and ``z`` drawn on every step, also at η = 0 (A1111's ``randn_like``). DDIM CFG++ (Chung et al. 2024,
"CFG++: manifold-constrained classifier free guidance"): guidance at ``scale / 12.5`` and the step's direction
along the negative's ε, ``√(1 − ᾱ_prev − σ_t²)·ε̂_uncond``. PLMS: the step above without noise on
``ε' = (ε̂ + ε̂(x_prev, t_prev))/2`` first (a second model call), then Adams-Bashforth on the last 2, 3, 4 ε̂
(``(3ε̂ − ε̂₋₁)/2``, ``(23ε̂ − 16ε̂₋₁ + 5ε̂₋₂)/12``, ``(55ε̂ − 59ε̂₋₁ + 37ε̂₋₂ − 9ε̂₋₃)/24``).

The guided model's output is ε (A1111's ``CFGDenoiserTimesteps`` combines the ε outputs; a v-prediction model's v
is read as ε at the call's timestep: ``√ᾱ·v + √(1−ᾱ)·x``, its ``CompVisTimestepsVDenoiser``). img2img
(``sample_img2img``): ``t_enc`` from A1111's rule, the init latent noised to ``timesteps[t_enc]``
(``√ᾱ·init + √(1−ᾱ)·noise``) and the run over ``timesteps[:t_enc]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from ..denoised_branches import ReadKeepingNegative, denoised_of
from .sigma_space import a1111_alphas_cumprod, check_prediction_type, step_noise
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart

__all__ = ["CFG_PP_SCALE_MULTIPLIER", "a1111_ddim_cfgpp_sample", "a1111_ddim_sample", "a1111_plms_sample",
           "a1111_timestep_start", "a1111_timesteps", "ldm_sqrt_tables", "timestep_eps"]

#: DDIM CFG++'s guidance multiplier (A1111's ``model.cond_scale_miltiplier = 1 / 12.5``: CFG 0..12.5 -> 0..1)
CFG_PP_SCALE_MULTIPLIER = 1 / 12.5


def a1111_timesteps(num_steps: int, num_train_steps: int = 1000) -> Tensor:
    """A1111's timesteps of its timestep samplers (``get_timesteps``): ``range(0, T, T // n) + 1`` clipped to
    ``T − 1``, int64 (rising).

    Raises:
        ValueError: ``num_steps`` outside [1, T].
    """
    if not 1 <= num_steps <= num_train_steps:
        raise ValueError(f"A1111's timestep samplers: steps must be in [1, {num_train_steps}], got {num_steps}")
    return (torch.arange(0, num_train_steps, num_train_steps // num_steps) + 1).clamp(0, num_train_steps - 1)


def ldm_sqrt_tables(alphas_cumprod: Tensor, prediction_type: str,
                    device: torch.device | str = "cpu") -> tuple[Tensor, Tensor] | None:
    """LDM's float32 buffers ``sqrt_alphas_cumprod`` and ``sqrt_one_minus_alphas_cumprod`` (T,) on ``device`` — the
    float32 of the float64 roots of ``alphas_cumprod`` (T,) — that A1111's ``CompVisTimestepsVDenoiser`` reads a v
    output as ε with; ``None`` for an ε model (nothing to read)."""
    if prediction_type == "epsilon":
        return None
    ac64 = alphas_cumprod.detach().double().cpu()
    return ac64.sqrt().float().to(device), (1 - ac64).sqrt().float().to(device)


def a1111_timestep_start(start: Img2ImgStart, x_T: Tensor, alphas_cumprod: Tensor, timesteps: Tensor, steps: int,
                         work: torch.dtype) -> tuple[Tensor, Tensor]:
    """img2img on A1111's ``timesteps`` (``steps`` asked for) as its timestep samplers' ``sample_img2img``:
    ``(x, timesteps[:t_enc])`` — ``t_enc`` by A1111's rule on ``steps`` (``setup_img2img_steps``, before
    ``get_timesteps`` adds the discarded next-to-last one to the grid: pass the count asked for, not the grid's),
    ``x`` (B,C,H,W) the init noised to ``timesteps[t_enc]`` on the float32 ``alphas_cumprod`` (T,)
    (:meth:`sdadapt.img2img.Img2ImgStart.timestep_noised`)."""
    from ..img2img import start_index

    t_enc = steps - 1 - start_index(start, steps, rule="a1111")
    x = start.timestep_noised(x_T, alphas_cumprod[timesteps[min(t_enc, len(timesteps) - 1)]], work)
    return x, timesteps[:t_enc]


class _EpsRead:
    """One model output (B,C,H,W) read as ε at the call's input ``x_in`` and timesteps ``t`` (B,): an ε output as
    it is (in ``dtype``), a v output as A1111's ``CompVisTimestepsVDenoiser`` reads it, ``√ᾱ_t·v + √(1−ᾱ_t)·x_in`` on
    LDM's float32 buffers ``sqrt_alphas_cumprod`` / ``sqrt_one_minus_alphas_cumprod`` (square roots of the float64
    ᾱ). :meth:`at` reads at another input (:func:`sdadapt.denoised_branches.read_at`)."""

    def __init__(self, tables: tuple[Tensor, Tensor] | None, t: Tensor, x_in: Tensor, dtype: torch.dtype) -> None:
        self.tables, self.t, self.x_in, self.dtype = tables, t, x_in, dtype

    def __call__(self, out: Tensor) -> Tensor:
        if self.tables is None:
            return out.to(self.dtype)
        sqrt_ac, sqrt_one_minus_ac = self.tables
        index = self.t.to(torch.int)
        return sqrt_ac[index][:, None, None, None] * out + sqrt_one_minus_ac[index][:, None, None, None] * self.x_in

    def at(self, x_in: Tensor) -> _EpsRead:
        return _EpsRead(self.tables, self.t, x_in, self.dtype)


def timestep_eps(model: Denoise, x: Tensor, t: Tensor, read: object, model_dtype: torch.dtype) -> Tensor:
    """The guided ε (B,C,H,W) of a timestep sampler's model call at the sample ``x`` (work dtype) and timesteps ``t``
    (B,): the model at ``x`` in ``model_dtype``, each branch read as ε by ``read`` and guided on ε; A1111 hands its
    CFGDenoiser the timesteps as "sigma" (its NGMS compares them)."""
    return denoised_of(model, read, x.to(model_dtype), t, sigma=t)


class _Run:
    """What one run of a timestep sampler reads (A1111's ``_prepare_sampling_parameters`` and ``sample`` /
    ``sample_img2img``): the start ``x``, the timesteps, ᾱ and ᾱ_prev, √(1−ᾱ), the ε reading, and per step the
    model's ε (:meth:`eps`) and the coefficients (:meth:`coefficients`)."""

    def __init__(self, name: str, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int, prediction_type: str,
                 discard_next_to_last_sigma: bool, start: Img2ImgStart | None) -> None:
        check_prediction_type(name, prediction_type)
        if prediction_type == "sample":
            raise ValueError(f"A1111's {name} reads ε or v; for a sample-prediction model use ddim (diffusers' "
                             "DDIMScheduler)")
        ac = a1111_alphas_cumprod(alphas_cumprod.detach().double().cpu())  # (A1111's buffer: float32, ZTSNR's last)
        steps = num_steps + (1 if discard_next_to_last_sigma else 0)
        timesteps = a1111_timesteps(steps, int(ac.shape[0]))
        self.work = torch.promote_types(x_T.dtype, torch.float32)
        self.model_dtype = x_T.dtype
        x = x_T.to(self.work)
        if start is not None:  # (t_enc from the steps asked for: A1111 adds the discarded one to the grid only)
            x, timesteps = a1111_timestep_start(start, x_T, ac, timesteps, num_steps, self.work)
        self.x, self.timesteps = x, timesteps
        self.alphas = ac[timesteps]
        self.alphas_prev = ac[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].double()
        self.sqrt_one_minus = (1 - self.alphas).sqrt()
        self.tables = ldm_sqrt_tables(alphas_cumprod, prediction_type, x.device)
        self.ones = torch.ones(x.shape[0], 1, 1, 1, dtype=self.work, device=x.device)  # (A1111's s_x)

    @property
    def steps(self) -> int:
        return len(self.timesteps) - 1

    def t(self, index: int) -> Tensor:
        """The call's timesteps (B,) float32 of integer values, as A1111 passes them."""
        return torch.full((self.x.shape[0],), float(self.timesteps[index]), dtype=torch.float32,
                          device=self.x.device)

    def read(self, x: Tensor, t: Tensor) -> _EpsRead:
        return _EpsRead(self.tables, t, x, self.work)

    def eps(self, model: Denoise, x: Tensor, t: Tensor, read: object | None = None) -> Tensor:
        """:func:`timestep_eps` of this run (``read``: :meth:`read`'s, or one wrapping it)."""
        return timestep_eps(model, x, t, self.read(x, t) if read is None else read, self.model_dtype)

    def coefficients(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(ᾱ_t, ᾱ_prev, √(1−ᾱ_t))`` (B,1,1,1) of step ``index``, as A1111 makes them (``.item() * s_x``)."""
        return (self.alphas[index].item() * self.ones, self.alphas_prev[index].item() * self.ones,
                self.sqrt_one_minus[index].item() * self.ones)

    def eta_sigmas(self, eta: float) -> Tensor:
        """Eta DDIM's σ_t (len,) float64 in A1111's numpy / torch mix and its rounding: numpy / tensor is torch's
        ``reciprocal() *``; numpy's sqrt."""
        if eta < 0:
            raise ValueError(f"A1111's DDIM: eta must be >= 0, got {eta}")
        product = (1 - self.alphas).reciprocal() * (1 - self.alphas_prev) * (1 - self.alphas.double() / self.alphas_prev)
        return eta * torch.from_numpy(np.sqrt(product.numpy()))


def a1111_ddim_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                      prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                      callback: StepCallback | None = None, eta: float = 0.0,
                      discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None) -> Tensor:
    """A1111's DDIM from unit noise ``x_T`` (B,C,H,W) -> latents (B,C,H,W) (the module's steps). ``model(x, t)``: the
    (guided) model at the sample and the timesteps t (B,) float32 of integer values, as A1111 passes them (each
    branch's ε apart where it offers ``denoised_by_branch``, :mod:`sdadapt.denoised_branches`: a v model's CFG then is
    A1111's bit for bit; the call's "σ" is the timesteps, as A1111 hands its CFGDenoiser);
    ``alphas_cumprod`` (T,) (float64 best: ᾱ is held in float32, as A1111's buffer, and a v output read on the
    float32 roots of the float64 ᾱ, as LDM's); ``generator``: the per-step noise (an
    :class:`~.a1111_noise.A1111Noise`: A1111's ``randn_like``); ``eta``: A1111's "Eta DDIM"; ``callback(i, t, x)``
    after each step; ``discard_next_to_last_sigma``: A1111's setting (one more timestep); ``start``: img2img by
    A1111's rule.

    Raises:
        ValueError: an unknown prediction type, a step count outside [1, T], a negative ``eta``.
    """
    return _ddim("ddim", model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                 prediction_type=prediction_type, generator=generator, callback=callback, eta=eta,
                 discard_next_to_last_sigma=discard_next_to_last_sigma, start=start, cfg_pp=False)


def a1111_ddim_cfgpp_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                            prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                            callback: StepCallback | None = None, eta: float = 0.0,
                            discard_next_to_last_sigma: bool = False, start: Img2ImgStart | None = None) -> Tensor:
    """A1111's DDIM CFG++ (``sd_samplers_timesteps_impl.ddim_cfgpp``) from ``x_T`` (B,C,H,W) -> latents (B,C,H,W):
    :func:`a1111_ddim_sample` with the guidance at ``scale ·`` :data:`CFG_PP_SCALE_MULTIPLIER` and each step's
    direction along the negative's ε. The guided model (:func:`sdadapt.training.diffusion.guided`, a prompt plan's
    guidance) hands the negative over through a :class:`~sdadapt.denoised_branches.ReadKeepingNegative` and then runs
    it at CFG 1 too, as A1111; a call that ran no negative (skipped, unguided, a model with no guidance of sdadapt's)
    steps along its own output, as A1111's stand-in negative.

    Raises:
        ValueError: as :func:`a1111_ddim_sample`.
    """
    return _ddim("ddim_cfgpp", model, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                 prediction_type=prediction_type, generator=generator, callback=callback, eta=eta,
                 discard_next_to_last_sigma=discard_next_to_last_sigma, start=start, cfg_pp=True)


def _ddim(name: str, model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int, prediction_type: str,
          generator: torch.Generator | None, callback: StepCallback | None, eta: float,
          discard_next_to_last_sigma: bool, start: Img2ImgStart | None, cfg_pp: bool) -> Tensor:
    run = _Run(name, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps, prediction_type=prediction_type,
               discard_next_to_last_sigma=discard_next_to_last_sigma, start=start)
    sigmas = run.eta_sigmas(eta)
    x = run.x
    for i in range(run.steps):
        index = run.steps - i
        t = run.t(index)
        read = ReadKeepingNegative(run.read(x, t), scale_multiplier=CFG_PP_SCALE_MULTIPLIER) if cfg_pp else None
        e_t = run.eps(model, x, t, read)
        a_t, a_prev, sqrt_one_minus_at = run.coefficients(index)
        sigma_t = sigmas[index].item() * run.ones
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        direction = e_t if read is None or read.negative is None else read.negative  # (CFG++: the negative's ε)
        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * direction
        noise = sigma_t * step_noise(x, generator, run.work)
        x = a_prev.sqrt() * pred_x0 + dir_xt + noise
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)


def a1111_plms_sample(model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                      prediction_type: str = "epsilon", generator: torch.Generator | None = None,
                      callback: StepCallback | None = None, discard_next_to_last_sigma: bool = False,
                      start: Img2ImgStart | None = None) -> Tensor:
    """A1111's PLMS (``sd_samplers_timesteps_impl.plms``) from ``x_T`` (B,C,H,W) -> latents (B,C,H,W) (the module's
    steps): the first step a pseudo improved Euler (two model calls, the second at the step's ``x_prev`` and the
    next timestep), then pseudo linear multistep of order 2, 3, 4 over the last ε; no noise (``generator`` is not
    drawn from). The other arguments as :func:`a1111_ddim_sample`'s.

    Raises:
        ValueError: an unknown prediction type, a step count outside [1, T].
    """
    run = _Run("plms", x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps, prediction_type=prediction_type,
               discard_next_to_last_sigma=discard_next_to_last_sigma, start=start)
    x = run.x
    old_eps: list[Tensor] = []

    def x_prev_of(e_t: Tensor, index: int) -> Tensor:
        a_t, a_prev, sqrt_one_minus_at = run.coefficients(index)
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        return a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t

    for i in range(run.steps):
        index = run.steps - i
        t = run.t(index)
        e_t = run.eps(model, x, t)
        if not old_eps:  # pseudo improved Euler (2nd order)
            x_prev = x_prev_of(e_t, index)
            e_t_next = run.eps(model, x_prev, run.t(max(index - 1, 0)))
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:  # 2nd order pseudo linear multistep (Adams-Bashforth)
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:  # 3rd order
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:  # 4th order
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x = x_prev_of(e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)
