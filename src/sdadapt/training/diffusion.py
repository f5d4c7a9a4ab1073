"""Diffusion math as pure functions: schedules, noising, targets, SNR weights, losses, samplers.

Notation (DDPM/DDIM, as in diffusers): ``ᾱ_t = alphas_cumprod[t]``, ``x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε``,
``SNR(t) = ᾱ_t / (1-ᾱ_t)``, ``v = √ᾱ_t·ε - √(1-ᾱ_t)·x0``, ``σ_t = √((1-ᾱ_t)/ᾱ_t)`` (Euler / k-diffusion).

Every sampler takes any callable ``model(x (B,C,H,W), t (B,), cond) -> prediction (B,C,H,W)``, where
the prediction is ε, v or x0 per ``prediction_type``. ``alphas_cumprod`` is a (T,) tensor; its dtype is
the dtype the math runs in (pass ``.double()`` for references).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor
from torch.nn import functional as F

from ..cond_padding import CondPadding
from ..denoised_branches import denoised_of, keep_negative, scaled_by, wants_negative
from ..dynamic_thresholding import check_dynamic_thresholding_guidance
from ..guidance_rescale import GuidanceRescale, as_guidance_rescale
from ..uncond_skip import UncondSkip

if TYPE_CHECKING:
    from ..dynamic_thresholding import DynamicThresholding
    from ..perturbed_attention import PerturbedAttentionGuidance
    from ..self_attention_guidance import SelfAttentionGuidance

__all__ = [
    "Guided",
    "PREDICTION_TYPES",
    "noise_schedule",
    "rescale_zero_terminal_snr",
    "a1111_zero_terminal_snr_alphas_cumprod",
    "zero_terminal_snr_alphas_cumprod",
    "alphas_cumprod_of",
    "scheduler_alphas_cumprod",
    "add_noise",
    "target_for",
    "predicted_x0",
    "predicted_noise",
    "snr",
    "sigmas_of",
    "min_snr_weight",
    "debiased_weight",
    "p2_weight",
    "noise_like_scale",
    "v_pred_like_weight",
    "offset_noise",
    "adaptive_offset_strength",
    "pyramid_noise",
    "perturbed_noise",
    "huber_c_for",
    "diffusion_loss",
    "region_loss_mask",
    "sample_timesteps",
    "ddim_timesteps",
    "timestep_grid",
    "numpy_linspace",
    "numpy_arange",
    "ddim_step",
    "ddim_sample",
    "ddim_invert",
    "guided",
    "guidance_combine",
    "euler_sample",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
Model = Callable[[Tensor, Tensor, object], Tensor]


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


# ----------------------------------------------------------------------------------- schedules
def noise_schedule(
    name: str = "scaled_linear",
    *,
    num_steps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
) -> Tensor:
    """Betas ``(num_steps,)`` float64 of a named schedule (diffusers' ``beta_schedule`` names).

    * ``"scaled_linear"`` (SD1/SD2/SDXL): ``β = linspace(√β_start, √β_end, T)²``
    * ``"linear"``: ``β = linspace(β_start, β_end, T)``
    * ``"cosine"`` (``"squaredcos_cap_v2"``): ``β_i = min(1 - ᾱ((i+1)/T)/ᾱ(i/T), 0.999)``,
      ``ᾱ(s) = cos²((s + 0.008)/1.008 · π/2)``

    ``zero_terminal_snr`` applies :func:`rescale_zero_terminal_snr` (Lin et al. 2023).
    """
    if num_steps < 2:
        raise ValueError(f"num_steps must be >= 2, got {num_steps}")
    if name == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2
    elif name == "linear":
        betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    elif name in ("cosine", "squaredcos_cap_v2"):

        def alpha_bar(s: float) -> float:
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), 0.999) for i in range(num_steps)],
            dtype=torch.float64,
        )
    else:
        raise ValueError(f"unknown schedule {name!r}; use 'scaled_linear', 'linear' or 'cosine'")
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale ``√ᾱ`` so the last step has SNR 0 and the first is unchanged (T,) -> (T,):
    the betas of :func:`zero_terminal_snr_alphas_cumprod` of these betas' ᾱ (computed in float64,
    returned in ``betas``' dtype)."""
    ab = zero_terminal_snr_alphas_cumprod(alphas_cumprod_of(betas.double()))
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return (1 - alphas).to(betas.dtype)


def zero_terminal_snr_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """ᾱ of the schedule rescaled to zero terminal SNR (Lin et al. 2023, kohya's ``--zero_terminal_snr``)
    (T,) -> (T,): ``√ᾱ' = (√ᾱ - √ᾱ_T)·√ᾱ_0/(√ᾱ_0 - √ᾱ_T)``, so ``ᾱ'_0 = ᾱ_0`` and ``ᾱ'_T = 0``
    (SNR 0: the last step's input is pure noise). The same schedule as
    :func:`rescale_zero_terminal_snr` on the betas; computed in float64 on the host (MPS has no
    float64), returned in the input's dtype and device. Rescaling a schedule that already ends at 0
    changes nothing.
    """
    sqrt_ab = alphas_cumprod.detach().to("cpu", torch.float64).sqrt()
    first, last = sqrt_ab[0], sqrt_ab[-1]
    if not first > last:
        raise ValueError(f"alphas_cumprod must decrease from its first to its last step to be rescaled to zero terminal "
                         f"SNR; got ᾱ_0 = {float(first) ** 2:.6g}, ᾱ_T = {float(last) ** 2:.6g}")
    rescaled = (sqrt_ab - last) * first / (first - last)
    return (rescaled**2).to(alphas_cumprod.dtype).to(alphas_cumprod.device)


def a1111_zero_terminal_snr_alphas_cumprod(alphas_cumprod: Tensor) -> Tensor:
    """ᾱ (T,) -> (T,) float32 rescaled to zero terminal SNR as A1111 rescales it (``rescale_zero_terminal_snr_abar``,
    modules/sd_models.py: its "Zero Terminal SNR" noise schedule and checkpoints marked ``ztsnr``): the formula of
    :func:`zero_terminal_snr_alphas_cumprod` in float32 on the float32 ᾱ (LDM's buffer), step by step as A1111
    writes it, the last entry 0 (A1111 stores 4.897e-08 there, which the σ tables read a 0 as:
    :data:`sdadapt.samplers.sigma_space.A1111_ZERO_SNR_ALPHA_CUMPROD`). It differs from the float64 rescale by up to
    1.1e-5 relative on SD's schedule (667 of the 999 other entries).

    Raises:
        ValueError: ᾱ that does not decrease from its first to its last step.
    """
    sqrt_ab = alphas_cumprod.detach().to(torch.float32).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    if not first > last:
        raise ValueError(f"alphas_cumprod must decrease from its first to its last step to be rescaled to zero terminal "
                         f"SNR; got ᾱ_0 = {float(first) ** 2:.6g}, ᾱ_T = {float(last) ** 2:.6g}")
    sqrt_ab -= last
    sqrt_ab *= first / (first - last)
    rescaled = sqrt_ab**2
    rescaled[-1] = 0.0
    return rescaled


def alphas_cumprod_of(betas: Tensor) -> Tensor:
    """``ᾱ_t = Π_{s≤t} (1 - β_s)`` (T,) -> (T,)."""
    return torch.cumprod(1 - betas, 0)


def scheduler_alphas_cumprod(scheduler_config: dict) -> Tensor:
    """ᾱ (T,) float32 of a diffusers scheduler config (``beta_schedule``, ``num_train_timesteps``,
    ``beta_start``, ``beta_end``, ``rescale_betas_zero_snr``; diffusers' defaults for missing keys:
    ``scaled_linear``, 1000, 0.00085, 0.012; ``squaredcos_cap_v2`` is :func:`noise_schedule`'s ``cosine``),
    computed in float64 as :func:`noise_schedule` does (LDM's float32 buffer, A1111's ᾱ); under
    ``rescale_betas_zero_snr`` rescaled from it as A1111 does (:func:`a1111_zero_terminal_snr_alphas_cumprod`)."""
    beta_schedule = scheduler_config.get("beta_schedule", "scaled_linear")
    betas = noise_schedule(
        {"squaredcos_cap_v2": "cosine"}.get(beta_schedule, beta_schedule),
        num_steps=scheduler_config.get("num_train_timesteps", 1000),
        beta_start=scheduler_config.get("beta_start", 0.00085),
        beta_end=scheduler_config.get("beta_end", 0.012),
    )
    alphas_cumprod = alphas_cumprod_of(betas).float()
    if scheduler_config.get("rescale_betas_zero_snr", False):
        return a1111_zero_terminal_snr_alphas_cumprod(alphas_cumprod)
    return alphas_cumprod


def _at(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` shaped (B, 1, 1, ...) to broadcast against ``like`` (B, ...)."""
    out = values.to(like.device)[t.to(like.device).long()]
    return out.reshape(-1, *([1] * (like.ndim - 1)))


# ------------------------------------------------------------------------ noising and targets
def add_noise(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """``x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε`` for x0, ε (B, ...) and integer t (B,). Computes in the dtype
    of ``alphas_cumprod`` (or x0's if wider) and returns x0's dtype."""
    a = _at(alphas_cumprod, t, x0)
    out = a.sqrt() * x0 + (1 - a).sqrt() * noise
    return out.to(x0.dtype)


def target_for(prediction_type: str, x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """The regression target: ε, ``v = √ᾱ_t·ε - √(1-ᾱ_t)·x0`` or x0 (B, ...)."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return x0
    a = _at(alphas_cumprod, t, x0)
    return (a.sqrt() * noise - (1 - a).sqrt() * x0).to(x0.dtype)


def predicted_x0(prediction_type: str, x_t: Tensor, output: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x0 implied by a model output at x_t: ε → ``(x_t - √(1-ᾱ)ε)/√ᾱ``; v → ``√ᾱ x_t - √(1-ᾱ) v``."""
    _check_prediction_type(prediction_type)
    if prediction_type == "sample":
        return output
    a = _at(alphas_cumprod, t, x_t)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * output) / a.sqrt()
    return a.sqrt() * x_t - (1 - a).sqrt() * output


def predicted_noise(prediction_type: str, x_t: Tensor, output: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """ε implied by a model output: v → ``√ᾱ v + √(1-ᾱ) x_t``; x0 → ``(x_t - √ᾱ x0)/√(1-ᾱ)``."""
    _check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return output
    a = _at(alphas_cumprod, t, x_t)
    if prediction_type == "v_prediction":
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    return (x_t - a.sqrt() * output) / (1 - a).sqrt()


# ------------------------------------------------------------------------------ loss weights
def snr(t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """``SNR(t) = ᾱ_t / (1 - ᾱ_t)`` (B,); ``inf`` where ᾱ_t = 1, 0 at a zero-terminal-SNR end."""
    a = alphas_cumprod.to(t.device)[t.long()]
    return a / (1 - a)


def sigmas_of(alphas_cumprod: Tensor) -> Tensor:
    """``σ_t = √((1-ᾱ_t)/ᾱ_t)`` (T,), the k-diffusion noise level of each DDPM step."""
    return ((1 - alphas_cumprod) / alphas_cumprod).sqrt()


_TINY_SNR = 1e-8  # SNR(T) = 0 under zero-terminal SNR; the weights below take their limit there


def min_snr_weight(snr_t: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ weight (Hang et al. 2023) expressed for the loss on each target (B,) -> (B,).

    ε-loss: ``min(SNR, γ)/SNR``; v-loss: ``min(SNR, γ)/(SNR + 1)``; x0-loss: ``min(SNR, γ)``.
    These make all three equal ``min(SNR, γ)·‖x0 - x̂0‖²``, as in diffusers' training examples.
    """
    _check_prediction_type(prediction_type)
    clipped = torch.minimum(snr_t, torch.full_like(snr_t, gamma))
    if prediction_type == "epsilon":
        return clipped.clamp_min(_TINY_SNR) / snr_t.clamp_min(_TINY_SNR)
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    return clipped


def debiased_weight(snr_t: Tensor, prediction_type: str = "epsilon") -> Tensor:
    """Debiased estimation (Yu et al. 2024, kohya's ``--debiased_estimation_loss``) (B,) -> (B,):
    ``1/√SNR`` for ε (``1/(SNR+1)`` for v), SNR clamped to ``[1e-8, 1000]`` like kohya."""
    s = snr_t.clamp(_TINY_SNR, 1000.0)
    return 1 / (s + 1) if prediction_type == "v_prediction" else 1 / s.sqrt()


def p2_weight(snr_t: Tensor, *, gamma: float = 1.0, k: float = 1.0) -> Tensor:
    """Perception-prioritized weight (Choi et al. 2022): ``1/(k + SNR)^γ`` (B,) -> (B,)."""
    return (k + snr_t) ** -gamma


def noise_like_scale(snr_t: Tensor) -> Tensor:
    """kohya's ``get_snr_scale`` (B,) -> (B,): ``s = SNR'/(SNR' + 1)`` with ``SNR' = min(SNR, 1000)``.

    For the same prediction, ``‖ε - ε̂‖² = SNR·‖x0 - x̂0‖²`` and ``‖v - v̂‖² = (SNR + 1)·‖x0 - x̂0‖²``,
    so ``s·‖v - v̂‖²`` is the ε-prediction loss (kohya's ``--scale_v_pred_loss_like_noise_pred``) and
    ``‖ε - ε̂‖²/s`` the v-prediction one (``--v_pred_like_loss``). In ``[0, 1000/1001]``; 0 where SNR = 0.
    """
    s = torch.minimum(snr_t, torch.full_like(snr_t, 1000.0))
    return s / (s + 1)


def v_pred_like_weight(snr_t: Tensor, strength: float) -> Tensor:
    """kohya's ``--v_pred_like_loss`` as a weight (B,) -> (B,): ``1 + strength / s`` with ``s`` from
    :func:`noise_like_scale` — ``loss + strength·loss/s`` adds ``strength`` × a v-prediction-like loss
    to an ε loss. Infinite where SNR = 0 (a zero-terminal-SNR schedule's last step), as kohya's."""
    return 1 + strength / noise_like_scale(snr_t)


# ------------------------------------------------------------------------------- noise helpers
def offset_noise(noise: Tensor, strength: float | Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """``ε + strength·n``, n ~ N(0, 1) of shape (B, C, 1, 1): learns overall brightness (Guttenberg).

    ``strength``: a float, or a tensor broadcasting against (B, C, 1, 1) — kohya's random strength
    (1,) or :func:`adaptive_offset_strength`'s (B, C, 1, 1); the result keeps ``noise``'s dtype."""
    b, c = noise.shape[:2]
    shift = torch.randn((b, c, *([1] * (noise.ndim - 2))), generator=generator, device=noise.device, dtype=noise.dtype)
    if isinstance(strength, Tensor):
        strength = strength.to(noise.dtype)
    return noise + strength * shift


def adaptive_offset_strength(latents: Tensor, offset: float | Tensor, *, scale: float) -> Tensor:
    """kohya's ``--adaptive_noise_scale``: the noise-offset strength of each latent channel
    (B, C, H, W) -> (B, C, 1, 1), ``max(0, offset + scale·|mean_{h,w} x0|)``.

    ``offset`` is the noise offset (a float, or kohya's random strength, a (1,) tensor); computed in
    float32 (at least), so a brighter or darker latent gets a larger offset."""
    wide = latents.to(torch.promote_types(latents.dtype, torch.float32))  # bf16/fp16 latents: averaged in float32
    mean = wide.mean(dim=tuple(range(2, latents.ndim)), keepdim=True).abs()  # (B, C, 1, 1)
    return (offset + scale * mean).clamp_min(0.0)


def pyramid_noise(
    noise: Tensor, *, iterations: int = 6, discount: float = 0.4, generator: torch.Generator | None = None
) -> Tensor:
    """Multi-resolution ("pyramid") noise, kohya's ``multires_noise``: add bilinearly upsampled noise
    at scales ``r^i`` (r ~ U[2, 4)) with weight ``discount^i``, then renormalise to unit std (B,C,H,W)."""
    b, c, h, w = noise.shape
    out = noise.clone()
    uniform = _host_uniform(generator)
    for i in range(iterations):
        r = uniform() * 2 + 2
        hn, wn = max(1, int(h / r**i)), max(1, int(w / r**i))
        coarse = torch.randn((b, c, hn, wn), generator=generator, device=noise.device, dtype=noise.dtype)
        out = out + F.interpolate(coarse, size=(h, w), mode="bilinear") * discount**i
        if hn == 1 or wn == 1:
            break
    return out / out.std()


def _host_uniform(generator: torch.Generator | None) -> Callable[[], float]:
    """A source of U[0, 1) Python floats for what must be decided on the host (pyramid noise's
    scales set tensor shapes). A CPU generator (or ``None``: the global CPU RNG) draws them itself.
    An accelerator's generator cannot be read without making the host wait, so the draws come from
    a CPU generator seeded by its seed and offset — host-side numbers that advance with every draw
    made on the device: reproducible from (and resumed with) the generator's state, no sync."""
    if generator is None or generator.device.type == "cpu":
        return lambda: float(torch.rand((), generator=generator))
    try:
        seed, offset = generator.initial_seed(), generator.get_offset()
    except (RuntimeError, AttributeError, NotImplementedError):  # no offset to read: one draw read back (a sync)
        return lambda: float(torch.rand((), generator=generator, device=generator.device))
    host = torch.Generator().manual_seed((seed ^ (offset * 0x9E3779B97F4A7C15)) % (1 << 63))
    return lambda: float(torch.rand((), generator=host))


def perturbed_noise(noise: Tensor, gamma: float | Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """Input perturbation (Ning et al. 2023): the model input uses ``ε + γ·ε'`` while the target keeps ε.

    ``gamma``: a float, or a (1,) device tensor (kohya's ``--ip_noise_gamma_random_strength``:
    ``γ = u·gamma``, ``u ~ U[0, 1)`` drawn before ε', one per batch)."""
    return noise + gamma * torch.randn(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)


def huber_c_for(
    t: Tensor, *, huber_c: float, schedule: str = "constant", alphas_cumprod: Tensor | None = None, scale: float = 1.0
) -> Tensor:
    """Per-sample Huber ``c`` (B,), kohya's ``--huber_schedule`` and ``--huber_scale`` (s):
    ``constant``: ``c·s``; ``exponential``: ``exp(-α t)·s`` with ``α = -ln(c)/T``; ``snr``:
    ``(1-c)/(1+σ_t)² + c`` (kohya does not scale this one). At a zero-terminal-SNR end (ᾱ_T = 0,
    σ_T = ∞) ``snr`` gives c. float32 on ``t``'s device, as kohya computes it (no float64 there: MPS has none)."""
    if schedule == "constant":
        return torch.full(t.shape, huber_c * scale, dtype=torch.float32, device=t.device)
    if alphas_cumprod is None:
        raise ValueError(f"huber schedule {schedule!r} needs alphas_cumprod")
    if schedule == "exponential":
        alpha = -math.log(huber_c) / alphas_cumprod.shape[0]
        return torch.exp(-alpha * t.float()) * scale
    if schedule == "snr":
        sigma = sigmas_of(alphas_cumprod.to(device=t.device, dtype=torch.float32)[t.long()])
        return (1 - huber_c) / (1 + sigma) ** 2 + huber_c
    raise ValueError(f"unknown huber schedule {schedule!r}; use 'constant', 'exponential' or 'snr'")


def diffusion_loss(
    prediction: Tensor,
    target: Tensor,
    *,
    weights: Tensor | None = None,
    kind: str = "l2",
    huber_c: float | Tensor = 0.1,
    mask: Tensor | None = None,
) -> Tensor:
    """Mean over the batch of ``w_b · mean_{c,h,w} m_{b,h,w}·ℓ(pred - target)`` (0-dim).

    ``kind``: ``"l2"`` (squared error), ``"huber"`` (kohya's pseudo-Huber ``2c(√(d² + c²) - c)``),
    ``"smooth_l1"`` (``2(√(d² + c²) - c)``), ``"l1"``. ``huber_c`` is a float or (B,) per sample.
    ``weights`` (B,) multiply each sample's mean loss. ``mask`` (B, 1, H, W) in [0, 1], the
    prediction's spatial size: kohya's masked loss (``apply_masked_loss``) — each element's loss
    times its pixel's mask value, still averaged over every element (masked-out ones count as 0).
    :func:`region_loss_mask` turns a 0/1 region into weights (above 1) that make it each sample's
    mean over its region only (Custom Diffusion's masked loss).
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    d = prediction - target
    if kind in ("huber", "smooth_l1"):
        # a float becomes a device tensor by a fill kernel, not a host-to-device copy (which would
        # make the host wait for the GPU, and cannot be captured in a CUDA graph)
        c = (huber_c.to(dtype=d.dtype, device=d.device) if isinstance(huber_c, Tensor)
             else torch.full((), huber_c, dtype=d.dtype, device=d.device))
        if c.ndim == 1:
            c = c.reshape(-1, *([1] * (d.ndim - 1)))
        per = torch.sqrt(d * d + c * c) - c
        per = 2 * c * per if kind == "huber" else 2 * per
    elif kind == "l2":
        per = d * d
    elif kind == "l1":
        per = d.abs()
    else:
        raise ValueError(f"unknown loss {kind!r}; use 'l2', 'huber', 'smooth_l1' or 'l1'")
    if mask is not None:
        if mask.ndim != per.ndim or mask.shape[0] != per.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != per.shape[2:]:
            raise ValueError(f"mask {tuple(mask.shape)} must be (B, 1, *spatial) of the prediction {tuple(per.shape)}: "
                             "resize it to the latents' size (F.interpolate(mask, size, mode='area'), as kohya's)")
        per = per * mask.to(per.dtype)  # (B, C, H, W) · (B, 1, H, W)
    per_sample = per.flatten(1).mean(1)  # (B,)
    if weights is not None:
        per_sample = per_sample * weights.to(per_sample)
    return per_sample.mean()


def region_loss_mask(mask: Tensor) -> Tensor:
    """A 0/1 region mask (B, 1, H, W) -> the per-sample loss weights (B, 1, H, W) with which
    :func:`diffusion_loss`'s masked mean becomes the mean over each sample's region only:

        mean_{c,h,w}(m'·ℓ) = Σ_{c,h,w} m·ℓ / (C · Σ_{h,w} m),   m' = m · H·W / Σ_{h,w} m

    (Custom Diffusion's masked loss, diffusers' ``(loss * mask).sum([1, 2, 3]) / mask.sum([1, 2, 3])``
    divided by C). A sample whose region is empty gets zero weights (its loss counts as 0; diffusers'
    would be 0/0). float32 at least."""
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"mask {tuple(mask.shape)} must be (B, 1, H, W)")
    wide = mask.to(torch.promote_types(mask.dtype, torch.float32))
    total = wide.sum(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
    area = mask.shape[2] * mask.shape[3]
    return wide * area / torch.where(total > 0, total, torch.ones_like(total))  # (an empty region: 0 / 1)


def sample_timesteps(
    batch: int,
    num_steps: int,
    *,
    generator: torch.Generator | None = None,
    low: int = 0,
    high: int | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniform integer timesteps in ``[low, high)`` (B,) int64 (``high`` defaults to ``num_steps``), drawn
    on ``generator``'s device (without one: on ``device``, from its default generator), then moved to
    ``device`` when given."""
    high = num_steps if high is None else high
    if not 0 <= low < high <= num_steps:
        raise ValueError(f"timestep range [{low}, {high}) must lie inside [0, {num_steps})")
    # drawn where the generator lives (else on ``device``): no host-made tensor copied to the device
    t = torch.randint(low, high, (batch,), generator=generator,
                      device=generator.device if generator is not None else device)
    return t.to(device) if device is not None else t


# ------------------------------------------------------------------------------------ samplers
def ddim_timesteps(num_inference_steps: int, *, num_train_steps: int = 1000, spacing: str = "leading", steps_offset: int = 1) -> Tensor:
    """Descending inference timesteps (n,) int64, diffusers' ``timestep_spacing`` rules.

    ``leading`` (SD's DDIM config): ``arange(n)·(T//n) + steps_offset``; ``trailing``:
    ``round(arange(T, 0, -T/n)) - 1``; ``linspace``: ``round(linspace(0, T-1, n))``.
    """
    return timestep_grid(num_inference_steps, num_train_steps, spacing, steps_offset, round_linspace=True).long()


def timestep_grid(n: int, T: int, spacing: str, steps_offset: int, *, round_linspace: bool) -> Tensor:
    """Descending float64 timesteps (n,) of ``n`` inference steps over ``T`` training steps by diffusers'
    ``timestep_spacing`` (see :func:`ddim_timesteps`); the σ schedulers (Euler...) keep linspace unrounded."""
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
    if spacing == "leading":
        steps = torch.arange(n, dtype=torch.float64) * (T // n) + steps_offset
    elif spacing == "trailing":
        steps = numpy_arange(T, 0, -T / n).round().flip(0) - 1
    elif spacing == "linspace":
        steps = numpy_linspace(T - 1, n)
        steps = steps.round() if round_linspace else steps
    else:
        raise ValueError(f"unknown spacing {spacing!r}; use 'leading', 'trailing' or 'linspace'")
    return steps.flip(0)


def numpy_arange(start: float, stop: float, step: float) -> Tensor:
    """``np.arange(start, stop, step)`` (n,) float64 bit for bit: numpy fills ``start + i·δ`` with
    ``δ = (start + step) − start`` (``torch.arange`` uses ``step`` itself, which differs in the last
    bit for 50 of the step counts 1–1000 of ``arange(1000, 0, -1000/n)``), so half-way timesteps
    round as diffusers rounds them."""
    length = max(math.ceil((stop - start) / step), 0)
    out = start + torch.arange(length, dtype=torch.float64) * ((start + step) - start)
    if length > 1:
        out[1] = start + step
    return out


def numpy_linspace(stop: float, num: int) -> Tensor:
    """``np.linspace(0, stop, num)`` (num,) float64 bit for bit (``i·(stop/(num−1))``, the last = stop;
    ``torch.linspace`` differs in the last bit), so half-way timesteps round as diffusers rounds them."""
    if num == 1:
        return torch.zeros(1, dtype=torch.float64)
    out = torch.arange(num, dtype=torch.float64) * (stop / (num - 1))
    out[-1] = stop
    return out


def ddim_step(
    output: Tensor,
    t: int,
    t_prev: int,
    x_t: Tensor,
    alphas_cumprod: Tensor,
    *,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    final_alpha_cumprod: float | None = None,
    noise: Tensor | None = None,
    clip_sample: float | None = None,
) -> Tensor:
    """One DDIM update x_t -> x_{t_prev} (Song et al. 2021, eq. 12) (B,C,H,W).

    ``x_prev = √ᾱ_prev·x̂0 + √(1-ᾱ_prev-s²)·ε̂ + s·z`` with ``s = η·√((1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev))``.
    ``t_prev < 0`` uses ``final_alpha_cumprod`` (default ᾱ_0, diffusers' ``set_alpha_to_one=False``).
    With ``t_prev > t`` (and η = 0) this is the DDIM inversion step. ``clip_sample=r`` clamps x̂0
    to [-r, r] (diffusers' ``clip_sample``/``clip_sample_range``; ε̂ is not recomputed, as there) —
    pixel-space models need it, since early x̂0 = (x - √(1-ᾱ)ε̂)/√ᾱ amplifies ε̂'s error by 1/√ᾱ.
    """
    ac = alphas_cumprod
    a_t = ac[t].to(x_t.device)
    if t_prev >= 0:
        a_prev = ac[t_prev].to(x_t.device)
    else:
        a_prev = torch.as_tensor(ac[0] if final_alpha_cumprod is None else final_alpha_cumprod, dtype=ac.dtype, device=x_t.device)
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    x0 = predicted_x0(prediction_type, x_t, output, tt, ac)
    eps = predicted_noise(prediction_type, x_t, output, tt, ac)
    if clip_sample is not None:
        x0 = x0.clamp(-clip_sample, clip_sample)
    std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).clamp_min(0).sqrt() if eta else a_t.new_zeros(())
    x_prev = a_prev.sqrt() * x0 + (1 - a_prev - std**2).clamp_min(0).sqrt() * eps
    if eta:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs `noise` (B,C,H,W)")
        x_prev = x_prev + std * noise
    return x_prev.to(x_t.dtype)


def _cat_conditions(a: object, b: object) -> object | None:
    """Batch two conditions along dim 0: tensors, or dicts of tensors/None with the same keys."""
    if isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape[1:] == b.shape[1:]:
        return torch.cat([a, b])
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        out = {}
        for key in a:
            if a[key] is None and b[key] is None:
                out[key] = None
            elif isinstance(a[key], Tensor) and isinstance(b[key], Tensor) and a[key].shape[1:] == b[key].shape[1:]:
                out[key] = torch.cat([a[key], b[key]])
            else:
                return None
        return out
    return None


def guidance_combine(out_uncond: Tensor, out_cond: Tensor, scale: Tensor | float) -> Tensor:
    """Classifier-free guidance over model outputs: ``u + s·(c − u)`` (B, C, H, W); ``scale`` a float
    or a broadcastable tensor, e.g. (B, 1, 1, 1). The one formula every sampler and method uses."""
    return out_uncond + scale * (out_cond - out_uncond)


class Guided:
    """Classifier-free guidance over ``model(x, t, cond)``: ``u + s·(c − u)`` (:func:`guidance_combine`); tensor
    conditions (or dicts of tensors with the same keys) run as one batch of 2B, anything else as two calls. With no
    ``uncond`` or at scale 1 the model on ``cond`` alone. Called ``(x, t, _cond)`` (the ``cond`` it was made with is
    used); :meth:`denoised_by_branch` combines the two halves on x̂0 (:mod:`sdadapt.denoised_branches`).
    ``uncond_skip``: A1111's "Skip Early CFG" / NGMS (:class:`sdadapt.uncond_skip.UncondSkip`) over a run of
    ``total_steps`` expected calls: a skipped call runs the model on ``cond`` alone. ``calls``: calls so far (the run's
    count, which a refiner handoff sets). ``pad_conds``: ``cond`` and ``uncond`` brought to one length first, A1111's
    "Pad prompt/negative prompt" (:class:`sdadapt.cond_padding.CondPadding`, with its ``empty`` states).
    ``guidance_rescale``: a :class:`sdadapt.guidance_rescale.GuidanceRescale` (or its φ: in the space it combines in,
    the outputs or what the sampler reads by branch — diffusers' ``guidance_rescale`` / A1111's "CFG Rescale") taken
    on every combination; 0 off. ``perturbed_attention``: a :class:`sdadapt.perturbed_attention.PerturbedAttentionGuidance`
    hooked on ``model``'s UNet: every call adds ``p·(c − c̃)``, its perturbed branch batched with the others where the
    conditions concatenate — on the outputs before the rescale (diffusers' PAG pipelines), on x̂0 after it by branch
    (ComfyUI's / Forge's), and on the conditional output alone in a call without the negative.
    ``self_attention_guidance``: a :class:`sdadapt.self_attention_guidance.SelfAttentionGuidance` on ``model``'s UNet:
    every call adds its term from the negative branch (the conditional one in a call without it) — diffusers' SAG
    pipeline on the outputs, ComfyUI's / Forge's on x̂0 by branch — after PAG's. ``dynamic_thresholding``: a
    :class:`sdadapt.dynamic_thresholding.DynamicThresholding` in place of every combination on x̂0 by branch (A1111's
    and Forge's "CFG Scale Fix"; its schedules over ``calls`` of ``total_steps``), the negative run at scale 1 too;
    a call that combines the outputs refuses it.

    Raises:
        ValueError: ``dynamic_thresholding`` with a ``guidance_rescale`` (each replaces the combination).
    """

    def __init__(self, model: Model, cond: object, uncond: object | None, guidance_scale: float, *,
                 uncond_skip: UncondSkip | None = None, total_steps: int = 1, pad_conds: CondPadding | None = None,
                 guidance_rescale: float | GuidanceRescale = 0.0,
                 perturbed_attention: PerturbedAttentionGuidance | None = None,
                 self_attention_guidance: SelfAttentionGuidance | None = None,
                 dynamic_thresholding: DynamicThresholding | None = None) -> None:
        if pad_conds is not None and uncond is not None:  # (A1111 pads before it runs either: at scale 1 too)
            (cond,), uncond = pad_conds.pad([cond], uncond)
        self.model, self.cond, self.uncond, self.scale = model, cond, uncond, guidance_scale
        self.uncond_skip, self.total_steps, self.calls = uncond_skip, total_steps, 0
        self.guidance_rescale = as_guidance_rescale(guidance_rescale)
        self.perturbed_attention, self.self_attention_guidance = perturbed_attention, self_attention_guidance
        check_dynamic_thresholding_guidance(dynamic_thresholding, rescale=self.guidance_rescale)
        self.dynamic_thresholding = dynamic_thresholding

    def _plain(self, x: Tensor, t: Tensor, conds: list[object]) -> list[Tensor]:
        """The outputs under ``conds`` (the cond alone, or uncond and cond): one batch where they concatenate."""
        if len(conds) == 2:
            both = _cat_conditions(*conds)
            if both is not None:
                return list(self.model(torch.cat([x, x]), torch.cat([t, t]), both).chunk(2))
        return [self.model(x, t, cond) for cond in conds]

    def _outputs(self, x: Tensor, t: Tensor, conds: list[object]) -> list[Tensor]:
        """The outputs under ``conds``, then, with PAG, under the cond perturbed."""
        if self.perturbed_attention is None:
            return self._plain(x, t, conds)
        return self.perturbed_attention.branch_outputs(self.model, x, t, conds,
                                                       plain=lambda given: self._plain(x, t, given))

    def _branches(self, x: Tensor, t: Tensor, conds: list[object]) -> tuple[list[Tensor], Tensor | None]:
        """:meth:`_outputs`, and with SAG the attention mask of the first branch (:class:`SelfAttentionGuidance`)."""
        if self.self_attention_guidance is None:
            return self._outputs(x, t, conds), None
        return self.self_attention_guidance.outputs(lambda: self._outputs(x, t, conds), x.shape[0])

    def _extra(self) -> bool:
        return self.perturbed_attention is not None or self.self_attention_guidance is not None

    def _cond_alone(self, sigma: float | Tensor | None, read: Callable[[Tensor], Tensor] | None = None) -> bool:
        call, self.calls = self.calls, self.calls + 1
        skip = self.uncond_skip is not None and self.uncond_skip.skips(call, self.total_steps, sigma)
        # (at scale 1 the cond alone, unless the sampler steps along the negative too (DDIM CFG++) or dynamic
        # thresholding renormalises it to the mimic scale's spread, as A1111 runs both branches)
        return skip or self.uncond is None or (self.scale == 1.0 and not wants_negative(read)
                                               and self.dynamic_thresholding is None)

    def __call__(self, x: Tensor, t: Tensor, _cond: object = None) -> Tensor:
        """The guided output (B,C,H,W) at ``x`` (B,C,H,W), timesteps ``t`` (B,)."""
        pag, sag = self.perturbed_attention, self.self_attention_guidance
        check_dynamic_thresholding_guidance(self.dynamic_thresholding, by_branch=False)
        if self._cond_alone(None):
            if not self._extra():
                return self.model(x, t, self.cond)
            (out_c, *perturbed), mask = self._branches(x, t, [self.cond])
            out = out_c if pag is None else pag.guide(out_c, out_c, perturbed[0], t)
            return out if sag is None else out + sag.term_on_outputs(self.model, x, t, self.cond, out_c, mask)
        (out_u, out_c, *perturbed), mask = self._branches(x, t, [self.uncond, self.cond])
        combined = guidance_combine(out_u, out_c, self.scale)
        if pag is not None:  # (diffusers' PAG pipelines: the PAG term, then the rescale of the whole)
            combined = pag.guide(combined, out_c, perturbed[0], t)
        if sag is not None:  # (diffusers' SAG pipeline: from the negative branch)
            combined = combined + sag.term_on_outputs(self.model, x, t, self.uncond, out_u, mask)
        return combined if self.guidance_rescale is None else self.guidance_rescale.rescale(combined, out_c)

    def denoised_by_branch(self, read: Callable[[Tensor], Tensor], x: Tensor, t: Tensor, _cond: object = None, *,
                           sigma: float | Tensor) -> Tensor:
        """x̂0 (B,C,H,W): each half's output read by ``read``, combined on x̂0 as A1111's ``combine_denoised``
        (the negative half kept for a :class:`~sdadapt.denoised_branches.ReadKeepingNegative`, its scale multiplier
        applied)."""
        pag, sag = self.perturbed_attention, self.self_attention_guidance
        if self._cond_alone(sigma, read):  # (no negative kept: the output itself stands in, as in A1111)
            if not self._extra():
                return denoised_of(self.model, read, x, t, self.cond, sigma=sigma)
            (out_c, *perturbed), mask = self._branches(x, t, [self.cond])
            positive = read(out_c)
            out = positive if pag is None else pag.guide(positive, positive, read(perturbed[0]), t)
            return out if sag is None else out + sag.term_on_denoised(self.model, read, x, t, self.cond, positive, mask,
                                                                      sigma=sigma)
        (out_u, out_c, *perturbed), mask = self._branches(x, t, [self.uncond, self.cond])
        negative, positive = read(out_u), read(out_c)
        keep_negative(read, negative)
        dt = self.dynamic_thresholding
        combined = guidance_combine(negative, positive, scaled_by(read, self.scale)) if dt is None else dt.combine(
            negative, [(positive, 1.0)], self.scale,
            frac=dt.frac(call=self.calls - 1, total_steps=self.total_steps, t=t))
        if self.guidance_rescale is not None:
            combined = self.guidance_rescale.rescale(combined, positive, x_in=x, sigma=sigma)
        if pag is not None:  # (ComfyUI's order: its CFG function (RescaleCFG), then the post-CFG ones)
            combined = pag.guide(combined, positive, read(perturbed[0]), t)
        if sag is not None:
            combined = combined + sag.term_on_denoised(self.model, read, x, t, self.uncond, negative, mask, sigma=sigma)
        return combined


def guided(model: Model, cond: object, uncond: object | None, guidance_scale: float, *,
           uncond_skip: UncondSkip | None = None, total_steps: int = 1, pad_conds: CondPadding | None = None,
           guidance_rescale: float | GuidanceRescale = 0.0,
           perturbed_attention: PerturbedAttentionGuidance | None = None,
           self_attention_guidance: SelfAttentionGuidance | None = None,
           dynamic_thresholding: DynamicThresholding | None = None) -> Guided:
    """Classifier-free guidance ``u + s·(c − u)`` over ``model``: a :class:`Guided` (called ``(x, t, _cond)``);
    ``guidance_rescale``: its :class:`sdadapt.guidance_rescale.GuidanceRescale` (or φ) on each combination (0 off);
    ``perturbed_attention``: PAG (:class:`sdadapt.perturbed_attention.PerturbedAttentionGuidance`) on each call;
    ``self_attention_guidance``: SAG (:class:`sdadapt.self_attention_guidance.SelfAttentionGuidance`) on each call;
    ``dynamic_thresholding``: CFG Scale Fix (:class:`sdadapt.dynamic_thresholding.DynamicThresholding`) in place of
    each combination on x̂0."""
    return Guided(model, cond, uncond, guidance_scale, uncond_skip=uncond_skip, total_steps=total_steps,
                  pad_conds=pad_conds, guidance_rescale=guidance_rescale, perturbed_attention=perturbed_attention,
                  self_attention_guidance=self_attention_guidance, dynamic_thresholding=dynamic_thresholding)


def ddim_sample(
    model: Model,
    x_T: Tensor,
    cond: object,
    *,
    alphas_cumprod: Tensor,
    num_steps: int = 50,
    uncond: object | None = None,
    guidance_scale: float = 1.0,
    prediction_type: str = "epsilon",
    eta: float = 0.0,
    spacing: str = "leading",
    steps_offset: int = 1,
    final_alpha_cumprod: float | None = None,
    clip_sample: float | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """DDIM sampling from x_T (B,C,H,W) (unit-variance noise) to x0, with optional CFG.

    ``callback(i, t, x)`` sees each intermediate. Matches diffusers' ``DDIMScheduler`` with the
    same ``timestep_spacing``/``steps_offset`` and ``set_alpha_to_one=False``, ``clip_sample=False``
    (pass ``final_alpha_cumprod=1.0`` for ``set_alpha_to_one=True``: the last step returns x̂0).
    """
    T = alphas_cumprod.shape[0]
    steps = ddim_timesteps(num_steps, num_train_steps=T, spacing=spacing, steps_offset=steps_offset)
    ratio = T // num_steps
    fn = guided(model, cond, uncond, guidance_scale)
    x = x_T
    for i, t in enumerate(steps.tolist()):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = fn(x, tt, cond)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) if eta else None
        x = ddim_step(
            out, t, t - ratio, x, alphas_cumprod,
            prediction_type=prediction_type, eta=eta, final_alpha_cumprod=final_alpha_cumprod, noise=noise,
            clip_sample=clip_sample,
        )
        if callback is not None:
            callback(i, tt, x)
    return x


def ddim_invert(
    model: Model,
    x0: Tensor,
    cond: object,
    *,
    alphas_cumprod: Tensor,
    num_steps: int = 50,
    uncond: object | None = None,
    guidance_scale: float = 1.0,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    steps_offset: int = 1,
) -> list[Tensor]:
    """Deterministic DDIM inversion x0 -> x_T (as in null-text inversion, Mokady et al. 2023).

    Returns ``[x0, x_{t_1}, ..., x_{t_n}]`` (n+1 tensors (B,C,H,W)), ascending in t: each step runs
    the model at the current latent with the *next* (higher) timestep and applies the DDIM update
    toward it; a v or x0 prediction is converted to ε with the ᾱ of the current latent's level (the
    lower timestep; ᾱ_0 before the first), as diffusers' ``DDIMInverseScheduler.step``. Reversing these
    steps with :func:`ddim_sample` (same steps) reconstructs x0 up to the model's local linearity.
    """
    T = alphas_cumprod.shape[0]
    steps = ddim_timesteps(num_steps, num_train_steps=T, spacing=spacing, steps_offset=steps_offset).flip(0)
    ratio = T // num_steps
    fn = guided(model, cond, uncond, guidance_scale)
    latents = [x0]
    x = x0
    for t in steps.tolist():
        t_from = t - ratio  # the lower timestep we come from; < 0 at the first step
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        out = fn(x, tt, cond)
        # v / x0 -> ε with the ᾱ of the latent's own level (t_from), as diffusers' DDIMInverseScheduler.step
        eps = predicted_noise(prediction_type, x, out, torch.full_like(tt, max(t_from, 0)), alphas_cumprod)
        a_from = alphas_cumprod[t_from] if t_from >= 0 else alphas_cumprod[0]
        a_to = alphas_cumprod[t]
        x0_hat = (x - (1 - a_from).sqrt() * eps) / a_from.sqrt()
        x = (a_to.sqrt() * x0_hat + (1 - a_to).sqrt() * eps).to(x0.dtype)
        latents.append(x)
    return latents


def euler_sample(
    model: Model,
    x_T: Tensor,
    cond: object,
    *,
    alphas_cumprod: Tensor,
    num_steps: int = 30,
    uncond: object | None = None,
    guidance_scale: float = 1.0,
    prediction_type: str = "epsilon",
    spacing: str = "linspace",
    steps_offset: int = 0,
    callback: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Euler sampler on σ (k-diffusion / diffusers ``EulerDiscreteScheduler``) from unit noise x_T
    (B,C,H,W) -> x0 (B,C,H,W), with classifier-free guidance: :func:`sdadapt.samplers.euler.euler_sample`
    (the one Euler) on ``guided(model, cond, uncond, guidance_scale)``.

    ``x ← x_T·σ_init``; per step: model input ``x/√(σ²+1)`` at (float) timestep t, ``x̂0`` from
    the prediction, ``d = (x - x̂0)/σ``, ``x ← x + d·(σ_next - σ)``; σ interpolated in t, σ_last = 0.
    """
    # imported here: the samplers import this module
    from ..samplers.euler import euler_sample as euler

    fn = guided(model, cond, uncond, guidance_scale)
    return euler(lambda x, t: fn(x, t, cond), x_T, alphas_cumprod=alphas_cumprod, num_steps=num_steps,
                 prediction_type=prediction_type, callback=callback, spacing=spacing, steps_offset=steps_offset)

