"""DPM-Solver++ 2M, 2M SDE (midpoint and Heun) and 3M SDE on one of A1111's σ grids, as A1111 runs them: k-diffusion's
``sample_dpmpp_2m``, ``sample_dpmpp_2m_sde`` and ``sample_dpmpp_3m_sde`` (k_diffusion/sampling.py:585-700 at 4601bf0)
through its ``CompVisDenoiser`` / ``CompVisVDenoiser``.

They step the σ-scaled sample ``x = x0 + σ·ε`` (the model sees ``x·c_in`` at the unrounded ``t(σ)``) in
``t = −log σ``, ``h = t_{i+1} − t_i``, with the denoised x̂0 = D of the model:

* 2M: ``x' = (σ'/σ)·x − (e^(−h) − 1)·D'``, ``D' = (1 + 1/(2r))·D − 1/(2r)·D_prev``, ``r = h_prev/h``; first order
  (``D' = D``) on the first step and onto σ' = 0.
* 2M SDE (η = 1): ``x' = (σ'/σ)·e^(−h)·x + (1 − e^(−2h))·D`` plus ``½·(1 − e^(−2h))·(D − D_prev)/r`` (midpoint)
  or ``((1 − e^(−2h))/(2h) + 1)·(D − D_prev)/r`` (Heun) from the second step, plus ``σ'·√(1 − e^(−2h))·z``;
  onto σ' = 0 the sample is D.
* 3M SDE (η = 1): the same first-order part with ``φ₂·D1 − φ₃·D2`` from the third step on (``φ₂·D1`` on the
  second), ``φ₂ = (e^(−2h) − 1)/(2h) + 1``, ``φ₃ = φ₂/(2h) − ½``.

The σ, ``t``, ``h``, ``r`` and coefficients are 0-dim tensors in the work dtype, in k-diffusion's order of operations,
so on float32 (and half) latents the run is A1111's bit for bit (A1111's float32 σ table and grid,
:mod:`.sigma_space`); float64 latents run the same in float64. ``z``: A1111's Brownian tree per image under an
:class:`~.a1111_noise.A1111Noise` (its ``create_noise_sampler``: over the whole grid's positive σ, img2img too),
otherwise a unit normal draw from ``generator`` at each step onto σ' > 0, where k-diffusion calls its noise sampler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .a1111_noise import A1111Noise
from .sigma_space import denoise, discrete_start, step_noise, timestep_batch
from .signatures import Denoise, StepCallback

if TYPE_CHECKING:
    from ..img2img import Img2ImgStart
    from .schedules import ScheduleOptions

__all__ = ["DPMPP_SIGMA_FORMS", "dpmpp_on_sigmas"]

#: sdadapt sampler name -> the k-diffusion sampler it is on A1111's grids
DPMPP_SIGMA_FORMS: dict[str, str] = {
    "dpmsolver++": "sample_dpmpp_2m",
    "dpmsolver++_sde": "sample_dpmpp_2m_sde",
    "dpmsolver++_sde_heun": "sample_dpmpp_2m_sde(solver_type='heun')",
    "dpmsolver++_3m_sde": "sample_dpmpp_3m_sde",
}


def dpmpp_on_sigmas(sampler: str, model: Denoise, x_T: Tensor, *, alphas_cumprod: Tensor, num_steps: int,
                    prediction_type: str, generator: torch.Generator | A1111Noise | None,
                    callback: StepCallback | None, schedule: str,
                    schedule_options: ScheduleOptions | None = None, discard_next_to_last_sigma: bool = False,
                    start: Img2ImgStart | None = None, eta: float = 1.0) -> Tensor:
    """``sampler`` (a key of :data:`DPMPP_SIGMA_FORMS`) from unit noise ``x_T`` (B,C,H,W) -> x0 (B,C,H,W) on A1111's
    grid ``schedule`` (:func:`.sigma_space.discrete_start`: its σ, unrounded ``t(σ)``, ``x_T·σ_0``; ``start``:
    A1111's img2img ``sigmas[index:]``, ``init + x_T·σ_index``). ``model(x·c_in, t)``: the (guided) model, float32
    timesteps t (B,); ``callback(i, t, x)`` after each step. See the module for the steps and the noise. ``eta``:
    the SDEs' η (A1111's "Eta for ancestral samplers"; 0: no noise, none drawn, as k-diffusion's ``if eta``).

    Raises:
        ValueError: an unknown sampler, prediction type or schedule, a step count the grid cannot hold, a negative
            ``eta``.
    """
    if eta < 0:
        raise ValueError(f"{sampler}: eta must be >= 0, got {eta}")
    if sampler not in DPMPP_SIGMA_FORMS:
        raise ValueError(f"no k-diffusion form of sampler {sampler!r}: one of {', '.join(DPMPP_SIGMA_FORMS)}")
    times, grid, x = discrete_start(sampler, x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                                    prediction_type=prediction_type, schedule=schedule,
                                    schedule_options=schedule_options,
                                    discard_next_to_last_sigma=discard_next_to_last_sigma)
    positive = [s for s in grid if s > 0]  # (the noise sampler spans the whole grid, img2img too: A1111's)
    if start is not None:  # img2img / hires fix: A1111's sigmas[index:], x = init + noise·σ (sdadapt.img2img)
        from ..img2img import start_index

        index = start_index(start, len(times), rule="a1111")
        times, grid = times[index:], grid[index:]
        x = start.noised(x_T, grid[0])
    from .dpm_solver import require_distinct_steps

    require_distinct_steps(sampler, grid, int(alphas_cumprod.shape[0]))
    work = x.dtype
    sig = torch.tensor(grid, dtype=work)  # (the grid's values are already of the work dtype: exact)
    sde = sampler != "dpmsolver++"
    tree = None
    if sde and isinstance(generator, A1111Noise) and len(positive) > 1:
        from .dpmpp_sde import brownian_noise

        tree = brownian_noise(x_T.float(), min(positive), max(positive), generator.seeds, source=generator.source)

    def noise(i: int) -> Tensor:
        if tree is not None:
            return tree(sig[i].float(), sig[i + 1].float()).to(device=x.device, dtype=work)
        return step_noise(x, generator, work)

    old: Tensor | None = None  # D of the step before (2M's old_denoised, 3M's denoised_1)
    old2: Tensor | None = None  # 3M's denoised_2
    h_1: Tensor | None = None
    h_2: Tensor | None = None
    h: Tensor | None = None
    for i in range(len(times)):
        s, s_next = sig[i], sig[i + 1]
        t = timestep_batch(times[i], x)
        d = denoise(model, x, grid[i], t, prediction_type=prediction_type, dtype=x_T.dtype)
        if sampler == "dpmsolver++":  # sample_dpmpp_2m, sampling.py:585-608
            t_i, t_next = s.log().neg(), s_next.log().neg()
            h = t_next - t_i
            if old is None or grid[i + 1] == 0:
                x = (t_next.neg().exp() / t_i.neg().exp()) * x - (-h).expm1() * d
            else:
                r = (t_i - sig[i - 1].log().neg()) / h  # h_last / h
                d_d = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * old
                x = (t_next.neg().exp() / t_i.neg().exp()) * x - (-h).expm1() * d_d
        elif grid[i + 1] == 0:  # the SDEs' denoising step onto σ = 0
            x = d
        elif sampler == "dpmsolver++_3m_sde":  # sample_dpmpp_3m_sde, sampling.py:656-700
            h = s_next.log().neg() - s.log().neg()
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * d
            if h_2 is not None and old is not None and old2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (d - old) / r0, (old - old2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None and old is not None:
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * ((d - old) / (h_1 / h))
            if eta:
                x = x + noise(i) * s_next * (-2 * h * eta).expm1().neg().sqrt()
        else:  # sample_dpmpp_2m_sde, sampling.py:611-653 (midpoint or Heun)
            h = s_next.log().neg() - s.log().neg()
            eta_h = eta * h
            x = s_next / s * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * d
            if old is not None:
                r = h_1 / h
                if sampler == "dpmsolver++_sde_heun":
                    x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (d - old)
                else:
                    x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (d - old)
            if eta:
                x = x + noise(i) * s_next * (-2 * eta_h).expm1().neg().sqrt()
        old, old2 = d, old
        h_1, h_2 = h, h_1
        if callback is not None:
            callback(i, t, x)
    return x.to(x_T.dtype)
