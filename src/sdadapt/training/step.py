"""The training step every method uses — short enough to read in one screen.

    state = TrainState(seed=0)
    for batch in loader:                      # {"latents": (B,C,H,W), "cond": ..., ["loss_weight": (B,)]}
        metrics = train_step(unet_fn, batch, params=params, optimizer=opt, state=state,
                             config=StepConfig(min_snr_gamma=5), alphas_cumprod=ac)

``model`` is any callable ``model(noisy_latents, timesteps, cond) -> prediction``; wrap a
diffusers UNet as ``lambda x, t, c: unet(x, t, c).sample``. Speed comes from doing less: pass
cached latents/text states, give the optimiser only the trainable parameters, and keep metrics
as tensors (no host sync per step; call ``.item()`` when you log).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import diffusion, edm, timestep_distribution
from ..adapters.weight_casts import batched_weight_casts
from ..formats.files import StagedOutputs, atomic_write, read_safetensors, staged_outputs, write_safetensors
from ..timestep_tables import TimestepSampling
from .attention import SDPA_BACKENDS, sdpa_backends
from .engine_backward import backward_keeping_modes
from .fused_lora import fused_lora_linear
from .half_weights import found_inf, loss_scaler
from .norm_precision import half_precision_norms
from .optim import FusedBackward, restore_capturable_mode

if TYPE_CHECKING:
    from ..samplers.edm import EDMSchedule

__all__ = [
    "StepConfig",
    "TrainState",
    "EMA",
    "train_step",
    "prepare_batch",
    "step_loss",
    "step_backward",
    "timestep_bounds",
    "clip_and_step",
    "fused_backward_clashes",
    "save_training_state",
    "load_training_state",
]


@dataclass(frozen=True, kw_only=True)
class StepConfig:
    """What one step does (defaults: plain epsilon MSE, uniform timesteps, clip 1.0)."""

    prediction_type: str = "epsilon"
    loss: str = "l2"  # "l2" | "huber" | "smooth_l1" | "l1"
    huber_c: float = 0.1
    huber_schedule: str = "constant"  # "constant" | "exponential" | "snr" (kohya's)
    huber_scale: float = 1.0  # kohya's --huber_scale: multiplies c of the constant and exponential schedules
    min_snr_gamma: float | None = None
    debiased_estimation: bool = False
    p2_gamma: float | None = None  # P2 weight 1/(1 + SNR)^γ
    scale_v_pred_loss_like_noise_pred: bool = False  # kohya's: v loss × SNR'/(SNR' + 1), SNR' = min(SNR, 1000) (v-prediction only)
    v_pred_like_loss: float = 0.0  # kohya's: ε loss × (1 + X·(SNR' + 1)/SNR'), adds X × a v-like loss (not v-prediction)
    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False  # kohya's: the offset strength ~ U[0, noise_offset), one draw per batch
    adaptive_noise_scale: float | None = None  # kohya's: offset += scale·|channel mean of x0|, clamped at 0
    input_perturbation: float = 0.0
    input_perturbation_random_strength: bool = False  # kohya's ip_noise_gamma_random_strength: γ ~ U[0, γ), one draw per batch
    pyramid_noise_iterations: int = 0
    pyramid_noise_discount: float = 0.4
    timestep_range: tuple[int, int] | None = None  # [low, high) of training timesteps
    # diffusers' timestep bias or OneTrainer's timestep distribution (training.timestep_distribution); None: uniform
    timestep_sampling: TimestepSampling | None = None
    max_grad_norm: float | None = 1.0
    accumulation_steps: int = 1
    mixed_precision: str | None = None  # None | "bf16" | "fp16"
    channels_last: bool = False  # feed NHWC latents (use with model.to(memory_format=torch.channels_last))
    # GroupNorm/LayerNorm read and write the half dtype (float32 statistics inside the kernels) instead of CUDA
    # autocast's float32 copies: ~5 fewer kernels per norm and half the norms' traffic (training.norm_precision)
    half_precision_norms: bool = False
    sdpa_backends: tuple[str, ...] | None = None  # attention kernels to try in order (training.attention); None: torch's choice
    # ((call signature, order), ...): a listed kind of attention call tries its own order instead (a dict works too;
    # training.attention.fastest_sdpa_backends_per_call measures one)
    sdpa_backends_per_call: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    # each linear LoRA the step can serve runs as one autograd function, its delta accumulated into the base GEMM's
    # output: 2 fewer kernels per layer, one rounding fewer (training.fused_lora)
    fused_lora_linear: bool = False
    # an EDM-formulation model's schedule (the system's ``edm``, Playground v2.5): σ-grid noising, c_in / c_noise /
    # c_skip / c_out preconditioning and the x0 target, as diffusers' EDM training (training.edm); None: DDPM
    edm: EDMSchedule | None = None

    def __post_init__(self) -> None:
        if self.mixed_precision not in (None, "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be None, 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {self.accumulation_steps}")
        if not 0 < self.huber_scale < math.inf:
            raise ValueError(f"huber_scale must be a finite number > 0 (it multiplies huber_c), got {self.huber_scale}")
        if self.adaptive_noise_scale is not None and not math.isfinite(self.adaptive_noise_scale):
            raise ValueError(f"adaptive_noise_scale must be a finite number or None, got {self.adaptive_noise_scale}")
        if self.adaptive_noise_scale and not self.noise_offset:  # kohya: "adaptive_noise_scale requires noise_offset"
            raise ValueError(f"adaptive_noise_scale={self.adaptive_noise_scale} adds to the noise offset, so it needs "
                             f"noise_offset > 0 (e.g. noise_offset=0.05)")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {self.prediction_type!r}")
        if self.scale_v_pred_loss_like_noise_pred and self.prediction_type != "v_prediction":  # kohya refuses it too
            raise ValueError(f"scale_v_pred_loss_like_noise_pred scales a v-prediction loss, so it needs "
                             f"prediction_type='v_prediction' (got {self.prediction_type!r})")
        if not 0 <= self.v_pred_like_loss < math.inf:
            raise ValueError(f"v_pred_like_loss must be a finite number >= 0 (0: off), got {self.v_pred_like_loss}")
        if self.v_pred_like_loss and self.prediction_type == "v_prediction":  # kohya refuses it too
            raise ValueError(f"v_pred_like_loss={self.v_pred_like_loss} adds a v-prediction-like loss to an epsilon "
                             "loss, so it cannot go with prediction_type='v_prediction'")
        if self.half_precision_norms and self.mixed_precision is None:
            raise ValueError("half_precision_norms keeps GroupNorm/LayerNorm in autocast's dtype, so it needs "
                             "mixed_precision='bf16' or 'fp16'")
        if self.sdpa_backends is not None:
            object.__setattr__(self, "sdpa_backends", tuple(self.sdpa_backends))  # a list from JSON/TOML
            unknown = [name for name in self.sdpa_backends if name not in SDPA_BACKENDS]
            if unknown or not self.sdpa_backends:
                raise ValueError(f"sdpa_backends must be a non-empty sequence of {', '.join(SDPA_BACKENDS)} (or None), "
                                 f"got {self.sdpa_backends!r}")
        if self.sdpa_backends_per_call is not None:  # a dict, or pairs from JSON/TOML: sorted pairs of tuples
            pairs = (self.sdpa_backends_per_call.items() if isinstance(self.sdpa_backends_per_call, Mapping)
                     else self.sdpa_backends_per_call)
            object.__setattr__(self, "sdpa_backends_per_call", tuple(sorted((str(k), tuple(v)) for k, v in pairs)))
            bad = [k for k, order in self.sdpa_backends_per_call if not order or set(order) - set(SDPA_BACKENDS)]
            if bad:
                raise ValueError(f"sdpa_backends_per_call: each call's order must be a non-empty sequence of "
                                 f"{', '.join(SDPA_BACKENDS)}; not so for {bad[:3]}")
        if self.edm is not None:
            clashes = edm.edm_step_clashes(self)
            if clashes:
                raise ValueError("an EDM-formulation model (Playground v2.5) trains on σ and an x0 target, so these options "
                                 "have no meaning for it: " + "; ".join(clashes))


class EMA:
    """Exponential moving average of parameters: diffusers' ``EMAModel`` with its defaults
    (``min_decay=0``, ``update_after_step=0``, no ``use_ema_warmup``).

    At the n-th update (``updates`` counts them, diffusers' ``optimization_step``) the shadow
    ``s ← s − (1 − d_n)·(s − p)`` with ``d_n = get_decay(n)``: ``d_1 = 0`` (the first update copies
    the weights) and ``d_n = min(decay, n / (9 + n))`` after it, i.e. ``(1 + k)/(10 + k)`` at
    ``k = n − 1``. (CompVis ``LitEma`` uses ``(1 + n)/(10 + n)`` from the first update: one update
    ahead of this.) Shadows are float32 copies (diffusers keeps the parameters' dtype).
    """

    def __init__(self, params: Iterable[nn.Parameter], *, decay: float = 0.9999) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], e.g. 0.9999; got {decay}")
        self.params = list(params)
        self.decay = decay
        self.shadow = [p.detach().float().clone() for p in self.params]
        self.updates = 0

    def decay_at(self, update: int) -> float:
        """The decay of the ``update``-th update (1-based): diffusers' ``EMAModel.get_decay``."""
        k = update - 1  # diffusers: step = max(0, optimization_step - update_after_step - 1)
        return 0.0 if k <= 0 else min(self.decay, (1 + k) / (10 + k))

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = self.decay_at(self.updates)
        for shadow, param in zip(self.shadow, self.params):
            shadow.lerp_(param.detach().float(), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, params: Iterable[nn.Parameter] | None = None) -> None:
        for shadow, param in zip(self.shadow, params or self.params):
            param.copy_(shadow.to(param.dtype))


class TrainState:
    """Step counters, the step's random generator, the fp16 loss scaler and the EMA.

    ``step`` counts every optimiser step (kohya's ``global_step``: saves, samples and the run's end
    follow it), including those the fp16 loss scaler skipped (inf/nan gradients: the optimiser did not
    run); ``skipped_steps`` counts those — ``0``, then a 0-dim int64 tensor on the gradients' device once
    a scaler has run (added to there: no host read per step). The LR schedule's position is
    ``step − skipped_steps``, the steps actually taken, as accelerate's (kohya's) scheduler skips its
    step after a skipped optimiser step (:meth:`~sdadapt.methods.FitConfig.lr_at`; ``fit`` reads the
    count with the step's loss).
    """

    def __init__(self, *, seed: int = 0, device: torch.device | str = "cpu", ema: EMA | None = None) -> None:
        self.step = 0  # optimiser steps (kohya's global_step), skipped ones included
        self.skipped_steps: int | Tensor = 0  # of those, the ones the fp16 loss scaler skipped
        self.micro_step = 0  # batches seen
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.scaler: torch.amp.GradScaler | None = None
        self.ema = ema


def _random_strength(maximum: float, latents: Tensor, generator: torch.Generator | None) -> Tensor:
    """kohya's random strength of a noise option: (1,) ``U[0, maximum)``, drawn in float32 as kohya's
    on the latents' device (no host sync) and scaled in at least float32."""
    u = torch.rand((1,), generator=generator, device=latents.device)
    return u.to(torch.promote_types(latents.dtype, torch.float32)) * maximum


def _noise_and_timesteps(latents: Tensor, config: StepConfig, state: TrainState, num_steps: int):
    g = state.generator
    if g is not None and g.device.type != latents.device.type:
        raise ValueError(f"the TrainState's generator is on {g.device} but the latents are on {latents.device}: "
                         f"make the state on the training device, TrainState(seed=..., device={str(latents.device)!r})")
    noise = torch.randn(latents.shape, generator=g, device=latents.device, dtype=latents.dtype)
    if config.noise_offset:  # kohya's order: ε, then the random strength, then the offset's own draw
        strength: float | Tensor = config.noise_offset
        if config.noise_offset_random_strength:
            strength = _random_strength(config.noise_offset, latents, g)
        if config.adaptive_noise_scale is not None:
            strength = diffusion.adaptive_offset_strength(latents, strength, scale=config.adaptive_noise_scale)
        noise = diffusion.offset_noise(noise, strength, generator=g)
    if config.pyramid_noise_iterations:
        noise = diffusion.pyramid_noise(
            noise, iterations=config.pyramid_noise_iterations, discount=config.pyramid_noise_discount, generator=g
        )
    low, high = timestep_bounds(config, num_steps)
    if config.timestep_sampling is None or config.timestep_sampling.is_uniform:
        t = diffusion.sample_timesteps(latents.shape[0], num_steps, generator=g, low=low, high=high, device=latents.device)
    else:  # (the weights made once, kept on the device: no host read, capturable)
        t = timestep_distribution.draw_timesteps(config.timestep_sampling, latents.shape[0], num_steps, low=low, high=high,
                                                 generator=g, device=latents.device)
    # input perturbation: the model sees noise + γ·ε', the target keeps the unperturbed noise
    noisy_input = noise
    if config.input_perturbation:
        gamma: float | Tensor = config.input_perturbation
        if config.input_perturbation_random_strength:  # kohya's order: the (1,) strength, then ε'
            gamma = _random_strength(config.input_perturbation, latents, g)
        noisy_input = diffusion.perturbed_noise(noise, gamma, generator=g)
    return noise, noisy_input, t


def timestep_bounds(config: StepConfig, num_steps: int) -> tuple[int, int]:
    """``[low, high)`` the step draws its timesteps from (uniform) for a schedule of ``num_steps``: ``config``'s
    ``timestep_range`` (kohya's ``--min-timestep`` / ``--max-timestep``), else all of them; with ``config.edm`` σ-grid
    indices, kohya's range mapped onto the grid by :func:`~sdadapt.training.edm.edm_index_range` (timestep 0 the least
    noise: index ``num_steps − 1``). The validation loss's fixed timesteps come from the same bounds."""
    if config.timestep_range is None:
        return 0, num_steps
    if config.edm is not None:
        return edm.edm_index_range(config.timestep_range, num_steps)
    low, high = config.timestep_range
    if not 0 <= low < high <= num_steps:  # (host ints: a clear error at the first step, not the draw's)
        raise ValueError(f"timestep_range ({low}, {high}) (--min-timestep / --max-timestep): the model has {num_steps} "
                         f"training timesteps (alphas_cumprod's length, its scheduler's num_train_timesteps), so need "
                         f"0 <= min < max <= {num_steps}")
    return config.timestep_range


def _times(weights: Tensor | None, factor: Tensor) -> Tensor:
    """``weights * factor``, ``None`` weights standing for float32 ones (:func:`prepare_batch`): the
    factor itself, in float32 or wider as ``ones * factor`` would be (a bf16/fp16 ᾱ gives low-precision
    factors; the later products stay in float32, as before)."""
    if weights is None:
        return factor.to(torch.promote_types(torch.float32, factor.dtype))  # (float32/64: the factor, no op)
    return weights * factor


def prepare_batch(
    batch: Mapping[str, object],
    *,
    state: TrainState,
    config: StepConfig,
    alphas_cumprod: Tensor,
    encode_latents: Callable[[Tensor], Tensor] | None = None,
    prior: tuple[Mapping[str, object], float] | None = None,
) -> dict[str, Tensor | object]:
    """Everything before the model: ``{"x_t", "t", "cond", "target", "weights" (B,), "huber_c"}``
    (+ ``"loss_mask"`` (B, 1, h, w) when the batch carries one: kohya's masked loss, :func:`step_loss`).

    Draws noise and timesteps from ``state.generator`` (always, so runs stay reproducible even when
    the batch fixes ``"noise"``/``"timesteps"``), noises the latents, builds the target for
    ``config.prediction_type`` and the per-sample loss weights (batch ``"loss_weight"`` × min-SNR ×
    debiased × P2; kohya's ``scale_v_pred_loss_like_noise_pred`` and ``v_pred_like_loss`` in kohya's
    order, between min-SNR and debiased — :func:`~sdadapt.training.diffusion.noise_like_scale`).

    With ``config.edm`` (an EDM model, :mod:`~sdadapt.training.edm`) the timesteps are indices of the σ grid
    (0: σ_max), ``"x_t"`` is the UNet's input ``c_in·x_σ``, ``"t"`` its ``c_noise``, ``"target"`` the clean latents,
    and ``"edm_skip"`` / ``"edm_out"`` turn the UNet output into the denoised latent (:func:`step_loss`).

    ``prior=(class_batch, weight)``: DreamBooth's prior preservation as a second forward — the class
    batch prepared the same way (its draws after the batch's) under ``"prior"``, ``weight`` under
    ``"prior_weight"``; :func:`step_loss` adds ``weight`` × its loss.
    """
    latents = batch.get("latents")
    if latents is None and encode_latents is not None and isinstance(batch.get("images"), Tensor):
        with torch.no_grad():
            latents = encode_latents(batch["images"])  # type: ignore[arg-type]
    if not isinstance(latents, Tensor):
        raise TypeError(
            "batch['latents'] must be a (B, C, H, W) tensor of clean latents (x0); or pass "
            "batch['images'] with encode_latents=vae_encode (e.g. lambda im: vae.encode(im).latent_dist.sample() * 0.18215)"
        )
    noise, noisy_input, t = _noise_and_timesteps(latents, config, state, alphas_cumprod.shape[0])
    if batch.get("noise") is not None:  # fixed noise/timesteps (tests, data-parallel sharding, methods)
        noise = noisy_input = batch["noise"]  # type: ignore[assignment]
    if batch.get("timesteps") is not None:
        t = batch["timesteps"]  # type: ignore[assignment]
    preconditioned: dict[str, Tensor] = {}
    if config.edm is not None:  # (EDM: t indexes the σ grid; the model gets c_in·x_σ at c_noise, training.edm)
        preconditioned = edm.edm_inputs(latents, noisy_input, t, schedule=config.edm,
                                        num_train_timesteps=alphas_cumprod.shape[0])
        x_t, model_t, target = preconditioned.pop("x_t"), preconditioned.pop("t"), preconditioned.pop("target")
    else:
        x_t, model_t = diffusion.add_noise(latents, noisy_input, t, alphas_cumprod), t
        target = diffusion.target_for(config.prediction_type, latents, noise, t, alphas_cumprod)
    if config.channels_last and x_t.ndim == 4:
        x_t = x_t.contiguous(memory_format=torch.channels_last)

    # (B,) per-sample weights; None stands for all ones until a factor comes (1 * w is w exactly: no fill and
    # multiply on the device per step for nothing)
    given: Tensor | None = batch.get("loss_weight")  # type: ignore[assignment]
    weights = None if given is None else given.float()
    if (config.min_snr_gamma is not None or config.debiased_estimation or config.p2_gamma is not None
            or config.scale_v_pred_loss_like_noise_pred or config.v_pred_like_loss):
        snr = diffusion.snr(t, alphas_cumprod)
        if config.min_snr_gamma is not None:
            weights = _times(weights, diffusion.min_snr_weight(snr, config.min_snr_gamma, config.prediction_type))
        if config.scale_v_pred_loss_like_noise_pred:
            weights = _times(weights, diffusion.noise_like_scale(snr))
        if config.v_pred_like_loss:
            weights = _times(weights, diffusion.v_pred_like_weight(snr, config.v_pred_like_loss))
        if config.debiased_estimation:
            weights = _times(weights, diffusion.debiased_weight(snr, config.prediction_type))
        if config.p2_gamma is not None:
            weights = _times(weights, diffusion.p2_weight(snr, gamma=config.p2_gamma))
    if weights is None:
        weights = torch.ones(latents.shape[0], device=latents.device)
    elif given is None and weights.shape != (latents.shape[0],):
        # (one timestep for the whole batch gives 0-dim factors: (B,) as ones * w was; a view, no copy)
        weights = weights.expand(torch.broadcast_shapes((latents.shape[0],), weights.shape))
    huber_c: float | Tensor = config.huber_c * config.huber_scale  # (the constant schedule: a float, no tensor made)
    if config.loss in ("huber", "smooth_l1") and config.huber_schedule != "constant":
        huber_c = diffusion.huber_c_for(t, huber_c=config.huber_c, schedule=config.huber_schedule, alphas_cumprod=alphas_cumprod,
                                        scale=config.huber_scale)
    prepared = {"x_t": x_t, "t": model_t, "cond": batch.get("cond"), "target": target, "weights": weights.float(),
                "huber_c": huber_c, "latents": latents, **preconditioned}
    if batch.get("loss_mask") is not None:  # (B, 1, h, w) in [0, 1]: kohya's masked loss
        prepared["loss_mask"] = batch["loss_mask"]
    if prior is not None:
        prepared["prior"] = prepare_batch(prior[0], state=state, config=config, alphas_cumprod=alphas_cumprod,
                                          encode_latents=encode_latents)
        prepared["prior_weight"] = float(prior[1])
    return prepared


#: ``extra_loss(prepared, prediction) -> 0-dim tensor`` added to the diffusion loss (e.g. DreamArtist's
#: reconstruction loss, textual inversion's norm penalty); ``prepared`` is :func:`prepare_batch`'s dict
ExtraLoss = Callable[[Mapping[str, object], Tensor], Tensor]


@contextmanager
def _kernel_choices(config: StepConfig, device_type: str) -> Iterator[None]:
    """The step's kernel choices on ``device_type``: the attention-kernel order (``config.sdpa_backends``,
    ``sdpa_backends_per_call``; :func:`~sdadapt.training.attention.sdpa_backends`), the half-precision
    norms (``config.half_precision_norms``; :func:`~sdadapt.training.norm_precision.half_precision_norms`) and
    the fused LoRA linear layers (``config.fused_lora_linear``;
    :func:`~sdadapt.training.fused_lora.fused_lora_linear`)."""
    with (sdpa_backends(config.sdpa_backends, dict(config.sdpa_backends_per_call or ())),
          half_precision_norms(config.half_precision_norms, device_type),
          fused_lora_linear(config.fused_lora_linear)):
        yield


def step_backward(loss: Tensor, config: StepConfig) -> None:
    """``loss.backward()`` (``loss`` 0-dim) under the step's kernel choices, those :func:`step_loss` runs
    the forward under (``StepConfig.sdpa_backends``, ``sdpa_backends_per_call``, ``half_precision_norms``,
    ``fused_lora_linear``).

    A block the model checkpoints through its own code (diffusers' ``enable_gradient_checkpointing()``)
    recomputes inside backward and must choose there what its forward chose, or torch refuses the
    recompute ("different metadata"). ``Tensor.backward`` is itself dispatched through the active torch
    function modes, which leave the stack while they handle a call, so wrapping ``loss.backward()`` in
    them does not reach the recompute: with kernel choices configured the backward starts from
    autograd's engine, inside them (:func:`~sdadapt.training.engine_backward.backward_keeping_modes`);
    without, it is ``loss.backward()``. Call this instead of ``loss.backward()`` when you run
    :func:`step_loss` yourself."""
    if not (config.half_precision_norms or config.sdpa_backends is not None or config.sdpa_backends_per_call
            or config.fused_lora_linear):
        loss.backward()
        return
    with _kernel_choices(config, loss.device.type):
        backward_keeping_modes((loss,))


def step_loss(model: Callable[[Tensor, Tensor, object], Tensor], prepared: Mapping[str, object], config: StepConfig,
              extra_loss: ExtraLoss | None = None, *, autocast_cache: bool = True,
              batch_casts: Sequence[Tensor] = ()) -> Tensor:
    """Forward under the configured autocast (an EDM model's output mixed into its denoised latent,
    :func:`~sdadapt.training.edm.edm_denoised`) and the weighted loss (0-dim, float32), plus
    ``prior_weight`` × the class batch's loss when ``prepared`` holds a ``"prior"``
    (:func:`prepare_batch`'s ``prior=``), plus ``extra_loss(prepared, prediction)`` when given (times
    ``prepared["share"]`` when there: a data-parallel rank's share of an uneven global batch,
    :func:`~sdadapt.training.data_parallel.shard_prepared`). ``autocast_cache=False`` turns off autocast's
    cache of low-precision weight copies (what PyTorch asks for under CUDA-graph capture; same numbers).
    ``batch_casts``: the trained parameters; the adapter weights among them get their autocast copies
    from one cast (:func:`~sdadapt.adapters.weight_casts.batched_weight_casts`; same numbers, fewer kernels).
    ``config.half_precision_norms``: the norms run in autocast's dtype (:mod:`~sdadapt.training.norm_precision`)."""
    x_t: Tensor = prepared["x_t"]  # type: ignore[assignment]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.mixed_precision or "")
    autocast = (torch.autocast(x_t.device.type, dtype=dtype, cache_enabled=autocast_cache)
                if dtype is not None else nullcontext())
    with (autocast, batched_weight_casts(batch_casts, x_t.device.type),
          _kernel_choices(config, x_t.device.type)):
        prediction = model(x_t, prepared["t"], prepared["cond"])  # type: ignore[arg-type]
    if "edm_out" in prepared:  # (EDM: the denoised latent c_skip·x_σ + c_out·F is what the loss sees, training.edm)
        prediction = edm.edm_denoised(prepared, prediction)
    loss = diffusion.diffusion_loss(
        prediction.float(), prepared["target"].float(), weights=prepared["weights"],  # type: ignore[union-attr]
        kind=config.loss, huber_c=prepared["huber_c"], mask=prepared.get("loss_mask"),  # type: ignore[arg-type]
    )
    prior: Mapping[str, object] | None = prepared.get("prior")  # type: ignore[assignment]
    share = prepared.get("share")  # (data parallel, an uneven split: this rank's factor, shard_prepared; as its weights')
    if prior is not None:  # the class batch's second forward, then extra_loss, added to the loss as one term
        extra = prepared["prior_weight"] * step_loss(model, prior, config, autocast_cache=autocast_cache,  # type: ignore[operator]
                                                     batch_casts=batch_casts)
        if extra_loss is not None:
            term = extra_loss(prepared, prediction.float())
            extra = extra + (term if share is None else term * share)
        return loss + extra
    if extra_loss is not None:
        term = extra_loss(prepared, prediction.float())
        loss = loss + (term if share is None else term * share)
    return loss


def fused_backward_clashes(config: StepConfig) -> list[str]:
    """What in ``config`` an optimiser fused into backward cannot work with (empty: nothing): it steps
    each parameter as soon as its gradient arrives, so nothing that needs every gradient at once."""
    return [what for what, clash in (
        ("gradient clipping (StepConfig.max_grad_norm; --max-grad-norm 0 turns it off)", config.max_grad_norm is not None),
        ("gradient accumulation (StepConfig.accumulation_steps > 1)", config.accumulation_steps != 1),
        ("fp16 mixed precision with its GradScaler (use bf16)", config.mixed_precision == "fp16"),
    ) if clash]


def clip_and_step(params: list[nn.Parameter], optimizer: torch.optim.Optimizer, state: TrainState, config: StepConfig) -> Tensor:
    """Unscale (fp16), clip, optimiser step (the caller zeroes the gradients); returns the pre-clip grad
    norm (nan if unclipped). A step the fp16 scaler skips adds 1 to ``state.skipped_steps`` (on the device)."""
    if state.scaler:
        state.scaler.unscale_(optimizer)
        if state.scaler.is_enabled():  # (a disabled scaler finds nothing and never skips)
            state.skipped_steps = found_inf(state.scaler, optimizer).long() + state.skipped_steps
    if config.max_grad_norm is not None:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
    else:  # (made only here: a fill on the device per step otherwise overwritten)
        grad_norm = torch.full((), float("nan"), device=params[0].device)
    if state.scaler:
        state.scaler.step(optimizer)
        state.scaler.update()
    else:
        optimizer.step()
    return grad_norm


def train_step(
    model: Callable[[Tensor, Tensor, object], Tensor],
    batch: Mapping[str, object],
    *,
    params: list[nn.Parameter],
    optimizer: torch.optim.Optimizer | FusedBackward,
    state: TrainState,
    config: StepConfig,
    alphas_cumprod: Tensor,
    lr_scheduler: object | None = None,
    encode_latents: Callable[[Tensor], Tensor] | None = None,
    extra_loss: ExtraLoss | None = None,
    prior: tuple[Mapping[str, object], float] | None = None,
    after_update: Callable[[], Mapping[str, Tensor]] | None = None,
    shard: Callable[[dict[str, object]], dict[str, object]] | None = None,
    before_update: Callable[[], None] | None = None,
) -> dict[str, Tensor]:
    """One micro-batch: noise, forward, weighted loss, backward; every ``accumulation_steps``
    micro-batches also unscale, clip, optimiser step, zero grads, EMA and LR-scheduler step (the
    scheduler not after a step the fp16 scaler skipped, as accelerate's: :class:`TrainState`).

    Args:
        model: ``model(x_t (B,C,H,W), t (B,), cond) -> prediction (B,C,H,W)``.
        batch: ``{"latents": x0 (B,C,H,W), "cond": anything the model takes,
            "loss_weight": optional (B,) per-sample weights (e.g. DreamBooth prior weight),
            "loss_mask": optional (B, 1, h, w) per-pixel loss weights in [0, 1] at the latents' size
            (kohya's masked loss, e.g. an image's alpha channel: :mod:`sdadapt.training.loss_masks`),
            "noise": optional fixed ε (B,C,H,W), "timesteps": optional fixed t (B,)}``.
            The step's generator is advanced the same way either way, so runs stay reproducible.
        params: the trainable parameters (clipping and EMA act on these).
        optimizer: a torch optimiser over ``params``, or the :class:`~sdadapt.training.optim.FusedBackward`
            handle of :func:`~sdadapt.training.optim.fuse_optimizer_into_backward` (the update then
            happens inside ``backward()``; needs ``max_grad_norm=None``, no accumulation, no fp16).
        alphas_cumprod: (T,) of the noise schedule, on the latents' device.
        encode_latents: used (under ``no_grad``) when the batch carries ``"images"`` instead of
            cached ``"latents"``. Text conditioning: put what your ``model`` takes in ``"cond"``
            (cached hidden states, or token ids when ``model`` runs a trainable text encoder —
            it then runs inside the same autocast region, as textual inversion needs).
        prior: ``(class_batch, weight)``: DreamBooth's prior preservation as a second forward
            (:func:`prepare_batch`), ``weight`` × its loss added.
        extra_loss: ``extra_loss(prepared, prediction) -> 0-dim`` added to the loss before backward
            (``prepared`` also holds the clean ``"latents"``), e.g. a reconstruction or norm term.
        after_update: called (under ``no_grad``) right after each optimiser step, before the EMA
            update — e.g. the max-norm pass (:func:`~sdadapt.training.max_norm.scale_weight_norms_`);
            the 0-dim tensors it returns join the metrics of the micro-batch that stepped.
        shard: data parallel (:mod:`~sdadapt.training.data_parallel`): the prepared global batch (noise
            and timesteps drawn for all of it) -> this rank's rows of it
            (:func:`~sdadapt.training.data_parallel.shard_prepared`), before the forward.
        before_update: called after the last accumulated backward, before unscaling, clipping and the
            optimiser step — data parallel's gradient all-reduce
            (:func:`~sdadapt.training.data_parallel.average_gradients`). Not with a fused optimiser.

    Returns:
        ``{"loss": 0-dim tensor (unscaled, this micro-batch), "stepped": bool tensor,
        "grad_norm": 0-dim tensor (nan when not stepped)}`` (+ ``after_update``'s) — tensors, no host sync.
    """
    fused = isinstance(optimizer, FusedBackward)
    clashes = fused_backward_clashes(config) if fused else []
    if clashes:
        raise ValueError("an optimiser fused into backward steps each parameter as its gradient arrives, so it cannot "
                         "work with " + "; ".join(clashes) + ": use StepConfig(max_grad_norm=None, accumulation_steps=1) "
                         "and bf16 instead of fp16")
    prepared = prepare_batch(batch, state=state, config=config, alphas_cumprod=alphas_cumprod, encode_latents=encode_latents,
                             prior=prior)
    if shard is not None:
        prepared = shard(prepared)
    loss = step_loss(model, prepared, config, extra_loss, batch_casts=params)
    if config.mixed_precision == "fp16" and state.scaler is None:
        state.scaler = loss_scaler(params, loss.device.type)  # (fp16 weights: a scaler that unscales fp16 gradients)
    scaled = loss / config.accumulation_steps
    step_backward(state.scaler.scale(scaled) if state.scaler else scaled, config)
    state.micro_step += 1

    grad_norm: Tensor | None = None
    skipped_before = state.skipped_steps
    stepped = state.micro_step % config.accumulation_steps == 0
    after: Mapping[str, Tensor] = {}
    if stepped:
        if before_update is not None and not fused:
            before_update()
        if not fused:
            grad_norm = clip_and_step(params, optimizer, state, config)  # type: ignore[arg-type]
            optimizer.zero_grad(set_to_none=True)  # type: ignore[union-attr]
        if after_update is not None:  # (fused: the optimiser stepped inside backward)
            with torch.no_grad():
                after = after_update()
        state.step += 1
        if state.ema is not None:
            state.ema.update()
        if lr_scheduler is not None and not (state.scaler and _skipped_now(state, skipped_before)):
            lr_scheduler.step()  # type: ignore[attr-defined]  (not after a skipped fp16 step, as accelerate's)
    if grad_norm is None:  # not stepped (accumulating) or fused: nan, made only then
        grad_norm = torch.full((), float("nan"), device=loss.device)
    return {"loss": loss.detach(), "stepped": torch.tensor(stepped), "grad_norm": grad_norm.detach(), **after}


def _skipped_now(state: TrainState, before: int | Tensor) -> bool:
    """Whether the scaler skipped this step (a host read: only for a given ``lr_scheduler``, which
    steps on the host; torch's ``GradScaler.step`` has just read the same flag)."""
    return bool(state.skipped_steps != before)  # (an int, or a 0-dim tensor once a scaler has run)


# ------------------------------------------------------------------------------ resumable state
def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, object]] = {}
    for index, entry in sd["state"].items():
        for name, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{name}"] = value
            else:
                scalars.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_training_state(
    folder: str | os.PathLike,
    *,
    named_params: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    config: StepConfig | None = None,
    extra: Mapping[str, Any] | None = None,
    stage: StagedOutputs | None = None,
) -> None:
    """Write ``state.safetensors`` (weights, optimiser tensors, EMA, RNG states) + ``state.json``
    (``extra``: more JSON entries for it, e.g. the caller's ``batches_per_epoch``). ``stage``: a
    :func:`~sdadapt.formats.files.staged_outputs` block of the caller's that more files of the state join (a
    training run's ``run.json``): all appear together when it ends.

    Both files are written as temporaries and renamed into place together
    (:func:`~sdadapt.formats.files.staged_outputs`): a crash or Ctrl-C while saving leaves the
    previous complete state as it was; both files record the step, so a folder mixing two saves
    (only a kill during the renames themselves) is refused by :func:`load_training_state`.
    """
    target = Path(folder)  # (a missing folder is made by the first write, and removed again if the save fails)
    tensors: dict[str, Tensor] = {f"param.{k}": v.detach() for k, v in named_params.items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    tensors.update(opt_tensors)
    if state.ema is not None:
        tensors.update({f"ema.{i}": s for i, s in enumerate(state.ema.shadow)})
    tensors["rng.step_generator"] = state.generator.get_state()
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    if state.scaler is not None:
        scaler_sd = state.scaler.state_dict()
    else:
        scaler_sd = None
    meta = {
        "format": "sdadapt-training-state/1",
        "step": state.step,
        "skipped_steps": int(state.skipped_steps),  # (the fp16 scaler's skipped steps: the LR schedule's position)
        "micro_step": state.micro_step,
        "ema_updates": state.ema.updates if state.ema else None,
        "optimizer": opt_meta,
        "scaler": scaler_sd,
        "config": asdict(config) if config else None,
        **dict(extra or {}),
    }
    with staged_outputs() if stage is None else nullcontext(stage) as staged:  # (renamed together, or none)
        write_safetensors(target / "state.safetensors", tensors, {"step": str(state.step)}, stage=staged)
        atomic_write(target / "state.json", lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1, default=float)),
                     stage=staged)


def load_training_state(
    folder: str | os.PathLike,
    *,
    named_params: Mapping[str, Tensor],
    optimizer: torch.optim.Optimizer,
    state: TrainState,
) -> dict:
    """Restore what :func:`save_training_state` wrote, in place; returns the JSON record.

    ``optimizer`` keeps the ``capturable`` mode it was built with (a state saved with or without
    CUDA-graph capture resumes either way: :func:`~sdadapt.training.optim.restore_capturable_mode`).

    Raises:
        ValueError: the folder is incomplete, from another step, or its parameters do not match.
    """
    target = Path(folder)
    meta_file, tensor_file = target / "state.json", target / "state.safetensors"
    if not meta_file.is_file() or not tensor_file.is_file():
        raise ValueError(f"{target}: not a training state (needs state.json and state.safetensors)")
    meta = json.loads(meta_file.read_text())
    tensors, file_meta = read_safetensors(tensor_file)
    if file_meta.get("step") != str(meta["step"]):
        raise ValueError(f"{target}: state.safetensors (step {file_meta.get('step')}) and state.json (step {meta['step']}) disagree; the save was interrupted")
    missing = [k for k in named_params if f"param.{k}" not in tensors]
    if missing:
        raise ValueError(f"{target}: parameters {missing[:5]} are not in the saved state")
    saved_ema = meta.get("ema_updates") is not None
    if saved_ema != (state.ema is not None) or (saved_ema and any(f"ema.{i}" not in tensors
                                                                  for i in range(len(state.ema.shadow)))):
        raise ValueError(f"{target}: the state was saved {'with' if saved_ema else 'without'} an EMA of the weights and "
                         f"this run has {'one' if state.ema is not None else 'none'}: resume "
                         + ("with the EMA decay it trained with (--ema-decay / FitConfig.ema_decay), whose averages it "
                            "holds" if saved_ema else "without --ema-decay (FitConfig.ema_decay), or start a new run"))
    with torch.no_grad():
        for name, param in named_params.items():
            param.copy_(tensors[f"param.{name}"])
    opt_state: dict[int, dict[str, object]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            opt_state.setdefault(int(index), {})[name] = value
    for index, scalars in meta["optimizer"]["scalars"].items():
        opt_state.setdefault(int(index), {}).update(scalars)
    built = [(group.get("capturable"), group["lr"]) for group in optimizer.param_groups]
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["optimizer"]["param_groups"]})
    restore_capturable_mode(optimizer, built, host_step=lambda step: step.to("cpu"))  # (torch keeps counts on the host)
    state.step, state.micro_step = meta["step"], meta["micro_step"]
    state.skipped_steps = int(meta.get("skipped_steps", 0))  # (a state saved before it was counted: none)
    state.generator.set_state(tensors["rng.step_generator"])
    torch.set_rng_state(tensors["rng.torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    if state.ema is not None:
        for i, shadow in enumerate(state.ema.shadow):
            shadow.copy_(tensors[f"ema.{i}"])
        state.ema.updates = meta["ema_updates"] or 0
    if meta["scaler"] is not None:
        state.scaler = loss_scaler(named_params.values(), next(iter(named_params.values())).device.type)
        state.scaler.load_state_dict(meta["scaler"])
    return meta
