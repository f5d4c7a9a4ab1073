"""Null-text and negative-prompt inversion as pure functions over any ``model(x, t, cond)``.

Notation as in :mod:`sdadapt.training.diffusion`: ``ᾱ_t = alphas_cumprod[t]``, DDIM timesteps
``t_1 > t_2 > … > t_n`` (sampling order, ``ddim_timesteps``), ``t_prev = t − T//n``. A *condition*
is whatever the model takes — a tensor (a diffusers UNet's ``encoder_hidden_states`` (1, L, D))
or a dict of tensors (the toy system's ``{"context", "image_embeds"}``); the *embedding* that
null-text inversion optimises is the condition itself, or its entry ``embedding_key`` for a dict.

* **Pivot** (Mokady et al. 2023, §3.2): DDIM inversion with guidance 1 (the source prompt's
  conditional prediction only), ``z*_0 = encode(image) → z*_{t_1} … → z*_{t_n}`` —
  :func:`sdadapt.training.diffusion.ddim_invert`.
* **Null-text optimisation** (§3.3): for sampling step ``i`` (``t = t_{n-i}`` descending), starting
  from ``z̄_{t_n} = z*_{t_n}``, minimise over the unconditional embedding ``∅_i`` the
  :func:`null_text_objective` ``‖ DDIM_{t→t_prev}(z̄_t; ε_u(∅_i) + s·(ε_c − ε_u(∅_i))) − z*_{t_prev} ‖²``
  with Adam (``lr·(1 − lr_decay·i)``), at most ``inner_steps`` iterations, stopping early when the
  loss falls below ``epsilon + i·epsilon_slope``; then advance ``z̄`` with the optimised ``∅_i``,
  which also starts step ``i+1``. Returns the ``n`` embeddings.
* **Negative-prompt inversion** (Miyake et al. 2023): no optimisation — every ``∅_i`` is the
  source prompt's own conditional embedding, so the guided step collapses to the conditional
  step and retraces the pivot (up to the model's local non-linearity).

A prompt plan (A1111's prompt editing ``[a:b:0.4]``, alternation ``[a|b]``, ``AND`` with ``:weight``;
:mod:`sdadapt.prompt_guidance`) gives each sampling step its own condition: the loops take ``cond`` (and
``uncond``) as a list of ``n`` per-step values, a step's value being a condition or a :class:`Composed` (``AND``'s
sub-prompts, guided as A1111's ``combine_denoised``: ``u + Σ_j (c_j − u)·(w_j·s)``). The pivot runs each step
at guidance 1 as ``generate --guidance 1`` samples it (the conditional output; with ``AND``, the combination at
``s = 1``), null-text optimises step ``i``'s ``∅_i`` against step ``i``'s conditions, and
:func:`sample_with_embeddings` samples step ``i`` with them (:class:`ConditionPlan`: a plan's distinct
conditions and which step uses which).

The step rule is chosen by the model's formulation (:func:`inversion_steps`): :class:`DDIMSteps`
(discrete DDPM timesteps, DDIM with η = 0) or, for an EDM-formulation model (Playground v2.5,
``edm=`` an :class:`~sdadapt.samplers.edm.EDMSchedule`), :class:`EDMSteps` — the Euler step of
diffusers' ``EDMEulerScheduler`` on its σ grid, run with σ increasing for the pivot. The loops
(:func:`null_text_optimize`, :func:`sample_with_embeddings`) are the same for both.

Everything here is a function of tensors and the model; :mod:`.invert` adds systems, files and
images on top.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ..prompt_guidance import combine_composed, composed_guidance, composed_outputs
from ..samplers.edm import EDMSchedule, edm_precondition, edm_sigmas
from ..training import diffusion

__all__ = [
    "Progress",
    "Composed",
    "ConditionPlan",
    "DDIMSteps",
    "EDMSteps",
    "inversion_steps",
    "condition_embedding",
    "with_embedding",
    "default_embedding_key",
    "prev_timestep",
    "per_step",
    "guided_model",
    "plan_pivot",
    "guided_ddim_step",
    "null_text_objective",
    "ddim_pivot",
    "null_text_optimize",
    "null_text_optimize_entries",
    "negative_prompt_embeddings",
    "sample_with_embeddings",
    "psnr",
]

Model = Callable[[Tensor, Tensor, Any], Tensor]
#: ``progress(done, total, label)``
Progress = Callable[[int, int, str], None]


# ------------------------------------------------------------------------- conditions
def default_embedding_key(cond: object) -> str | None:
    """Which part of a condition null-text inversion optimises: ``None`` for a tensor condition,
    ``"context"`` / ``"encoder_hidden_states"`` for a dict that has one."""
    if isinstance(cond, Tensor):
        return None
    if isinstance(cond, dict):
        for key in ("context", "encoder_hidden_states"):
            if isinstance(cond.get(key), Tensor):
                return key
        raise ValueError(
            f"cannot tell which entry of the condition dict (keys {sorted(cond)}) is the text embedding; "
            "pass embedding_key='<key>'"
        )
    raise TypeError(f"a condition must be a tensor or a dict of tensors, got {type(cond).__name__}")


def condition_embedding(cond: object, key: str | None) -> Tensor:
    """The optimised part of a condition: ``cond`` itself (``key=None``) or ``cond[key]``."""
    if key is None:
        if not isinstance(cond, Tensor):
            raise TypeError(f"embedding_key=None needs a tensor condition, got {type(cond).__name__}; pass embedding_key")
        return cond
    if not isinstance(cond, dict):
        raise TypeError(f"embedding_key={key!r} needs a dict condition, got {type(cond).__name__}")
    if not isinstance(cond.get(key), Tensor):
        raise ValueError(f"the condition has no tensor entry {key!r}; entries: {sorted(cond)}")
    return cond[key]


def with_embedding(cond: object, key: str | None, embedding: Tensor) -> object:
    """``cond`` with its optimised part replaced by ``embedding`` (a new dict; inputs untouched)."""
    return embedding if key is None else {**cond, key: embedding}  # type: ignore[dict-item]


@dataclass(frozen=True)
class Composed:
    """``AND`` (composable diffusion) at one sampling step: ``parts``, ``(condition, weight)`` per sub-prompt
    (batch B each). Guided as A1111's ``combine_denoised``, ``u + Σ_j (c_j − u)·(w_j·s)``
    (:func:`sdadapt.prompt_guidance.composed_guidance`, what ``generate`` runs)."""

    parts: tuple[tuple[object, float], ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("Composed needs at least one (condition, weight) sub-prompt")


@dataclass(frozen=True)
class ConditionPlan:
    """A prompt plan's conditions per sampling step: ``conds`` the distinct conditions (one per text, batch B),
    ``steps[i]`` the ``(index into conds, weight)`` of each ``AND`` sub-prompt at sampling step ``i`` (descending t).

    :meth:`at` is step ``i``'s value for the loops: the condition itself (one sub-prompt of weight 1), else a
    :class:`Composed`."""

    conds: tuple[object, ...]
    steps: tuple[tuple[tuple[int, float], ...], ...]

    def __post_init__(self) -> None:
        for i, parts in enumerate(self.steps):
            if not parts or any(not 0 <= j < len(self.conds) for j, _ in parts):
                raise ValueError(f"ConditionPlan step {i}: {parts} must name one or more of its {len(self.conds)} "
                                 "conditions")

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def at(self, i: int) -> object:
        """Sampling step ``i``'s condition, or :class:`Composed` for several sub-prompts or a weight other than 1."""
        parts = self.steps[i]
        if len(parts) == 1 and parts[0][1] == 1.0:
            return self.conds[parts[0][0]]
        return Composed(tuple((self.conds[j], float(w)) for j, w in parts))

    def per_step(self) -> list[object]:
        """``[at(0), …, at(n − 1)]``."""
        return [self.at(i) for i in range(self.num_steps)]

    @classmethod
    def from_steps(cls, steps: Sequence[object]) -> ConditionPlan:
        """The plan of per-step values (each a condition or a :class:`Composed`); conditions that are the same
        object are kept once."""
        conds: list[object] = []
        index: dict[int, int] = {}

        def number(cond: object) -> int:
            if id(cond) not in index:
                index[id(cond)] = len(conds)
                conds.append(cond)
            return index[id(cond)]

        rows = tuple(tuple((number(c), float(w)) for c, w in step.parts) if isinstance(step, Composed)
                     else ((number(step), 1.0),) for step in steps)
        return cls(tuple(conds), rows)


def per_step(value: object, num_steps: int, what: str) -> list[object]:
    """``value`` as ``num_steps`` per-step values: a list of that length as it is, anything else repeated.

    Raises:
        ValueError: a list of another length.
    """
    if isinstance(value, list):
        if len(value) != num_steps:
            raise ValueError(f"got {len(value)} per-step {what} for {num_steps} steps")
        return value
    return [value] * num_steps


def guided_model(model: Model, cond: object, uncond: object, guidance: float) -> Model:
    """``model`` guided at scale ``guidance``: ``u + s·(c − u)`` for a condition ``cond``
    (:func:`~sdadapt.training.diffusion.guided`: one batch of 2B), A1111's ``AND`` combination for a
    :class:`Composed` (:func:`sdadapt.prompt_guidance.composed_guidance`, ``generate``'s call). The returned
    model ignores the ``cond`` it is given."""
    if isinstance(cond, Composed):
        return lambda x, t, _c: composed_guidance(model, x, t, cond.parts, uncond, guidance)
    return diffusion.guided(model, cond, uncond, guidance)


def _cond_outputs(rule: Any, model: Model, x: Tensor, i: int, cond: object) -> Tensor | list[tuple[Tensor, float]]:
    """Step ``i``'s conditional output(s): (B, C, H, W), or ``(output, weight)`` per sub-prompt of a :class:`Composed`."""
    if isinstance(cond, Composed):
        return rule.model_output(lambda x_, t_, _c: composed_outputs(model, x_, t_, cond.parts), x, i, None)
    return rule.model_output(model, x, i, cond)


def _combine(out_uncond: Tensor, out_cond: Tensor | Sequence[tuple[Tensor, float]], guidance: float) -> Tensor:
    if isinstance(out_cond, Tensor):
        return diffusion.guidance_combine(out_uncond, out_cond, guidance)
    return combine_composed(out_uncond, out_cond, guidance)


def plan_pivot(rule: DDIMSteps | EDMSteps, model: Model, x0: Tensor, cond: object, uncond: object = None) -> list[Tensor]:
    """The guidance-1 pivot of per-step conditions (``cond``, ``uncond``: one value or a list of ``n``): step ``i``
    inverted with step ``i``'s conditional output (a :class:`Composed` step: A1111's combination at ``s = 1``,
    its negative ``uncond[i]`` included, as ``generate --guidance 1`` samples it). One plain ``cond``: exactly
    ``rule.pivot(model, x0, cond)``."""
    if not isinstance(cond, (list, Composed)):
        return rule.pivot(model, x0, cond)
    n = rule.num_steps
    pairs = list(zip(per_step(cond, n, "conditions"), per_step(uncond, n, "unconditional conditions")))
    return rule.pivot(lambda x, t, pair: guided_model(model, pair[0], pair[1], 1.0)(x, t, None), x0, pairs)


def prev_timestep(t: int, num_steps: int, num_train_steps: int) -> int:
    """DDIM's previous timestep ``t − T//n`` (negative at the last step: ᾱ_0 is used there)."""
    return t - num_train_steps // num_steps


# ------------------------------------------------------------------------------ the step
def guided_ddim_step(
    out_uncond: Tensor,
    out_cond: Tensor,
    x_t: Tensor,
    t: int,
    t_prev: int,
    alphas_cumprod: Tensor,
    *,
    guidance: float,
    prediction_type: str = "epsilon",
    final_alpha_cumprod: float | None = None,
) -> Tensor:
    """One guided DDIM step (η = 0) ``x_t → x_{t_prev}`` (B, C, H, W).

    With ``o = u + s·(c − u)`` (ε, v or x0 per ``prediction_type``), ``x̂0`` and ``ε̂`` implied by
    ``o`` at ``x_t``: ``x_prev = √ᾱ_prev·x̂0 + √(1 − ᾱ_prev)·ε̂``; for ε-prediction
    ``x̂0 = (x_t − √(1 − ᾱ_t)·o)/√ᾱ_t``, ``ε̂ = o``. ``t_prev < 0`` uses ``final_alpha_cumprod``
    (default ᾱ_0). Differentiable in both outputs.
    """
    out = diffusion.guidance_combine(out_uncond, out_cond, guidance)  # (B, C, H, W)
    return diffusion.ddim_step(out, t, t_prev, x_t, alphas_cumprod, prediction_type=prediction_type,
                               final_alpha_cumprod=final_alpha_cumprod)


# ------------------------------------------------------------------------- the step rules
class DDIMSteps:
    """DDIM (η = 0) on a discrete schedule: ``n`` sampling steps at ``t_i`` (descending,
    :func:`~sdadapt.training.diffusion.ddim_timesteps`), each ``t_i → t_i − T//n`` (ᾱ_0 after the
    last); the pivot is :func:`~sdadapt.training.diffusion.ddim_invert`.

    Attributes:
        timesteps: (n,) int64, the model's timestep at each sampling step, descending.
    """

    def __init__(self, alphas_cumprod: Tensor, num_steps: int, *, prediction_type: str = "epsilon",
                 spacing: str = "leading", steps_offset: int = 1) -> None:
        self.alphas_cumprod, self.num_steps = alphas_cumprod, num_steps
        self.prediction_type, self.spacing, self.steps_offset = prediction_type, spacing, steps_offset
        self.timesteps = diffusion.ddim_timesteps(num_steps, num_train_steps=alphas_cumprod.shape[0], spacing=spacing,
                                                  steps_offset=steps_offset)
        self._t = self.timesteps.tolist()

    def model_output(self, model: Model, x: Tensor, i: int, cond: object) -> Tensor:
        """``model(x_t, t_i, cond)`` (B, C, H, W) at sampling step ``i``."""
        return model(x, torch.full((x.shape[0],), self._t[i], device=x.device, dtype=torch.long), cond)

    def step(self, out: Tensor, x: Tensor, i: int) -> Tensor:
        """Sampling step ``i``, ``x_{t_i} → x_{t_i − T//n}`` (B, C, H, W), from the (guided) output ``out``."""
        t = self._t[i]
        return diffusion.ddim_step(out, t, prev_timestep(t, self.num_steps, self.alphas_cumprod.shape[0]), x,
                                   self.alphas_cumprod, prediction_type=self.prediction_type)

    def pivot(self, model: Model, x0: Tensor, cond: object) -> list[Tensor]:
        """``[x0, …, x_{t_1}]`` (n + 1 of (B, C, H, W), noisiest last): guidance-1 DDIM inversion. ``cond``: one
        condition, or a list of ``n`` (sampling step ``i``'s ``cond[i]``, handed to ``model`` at the step that
        inverts it)."""
        if isinstance(cond, list):
            if len(cond) != self.num_steps:
                raise ValueError(f"got {len(cond)} per-step conditions for {self.num_steps} steps")
            # (ddim_invert inverts sampling step n − 1 first, step 0 last: one model call each)
            order = iter(range(self.num_steps - 1, -1, -1))
            stepwise = model
            model = lambda x, t, _c: stepwise(x, t, cond[next(order)])
        return diffusion.ddim_invert(model, x0, cond, alphas_cumprod=self.alphas_cumprod, num_steps=self.num_steps,
                                     prediction_type=self.prediction_type, spacing=self.spacing,
                                     steps_offset=self.steps_offset)


class EDMSteps:
    """The Euler step of an EDM-formulation model (Playground v2.5) on diffusers' ``EDMEulerScheduler`` grid.

    ``σ_0 > … > σ_{n−1}``, ``σ_n`` (0, or σ_{n−1} for ``final_sigmas_type`` ``sigma_min``):
    :func:`~sdadapt.samplers.edm.edm_sigmas` ``sampler="euler"``. The model (the UNet ``F``) is called on
    ``c_in(σ)·x`` at ``c_noise(σ)``; ``D = c_skip(σ)·x + c_out(σ)·F``
    (:func:`~sdadapt.samplers.edm.edm_precondition`), the ODE's ``ε̂(x; σ) = (x − D(x; σ))/σ``.

    * Sampling step ``i`` is the scheduler's ``step`` (``s_churn`` 0), ``x ← x + ε̂(x; σ_i)·(σ_{i+1} − σ_i)``,
      the arithmetic of :func:`~sdadapt.samplers.edm.edm_euler_sample`.
    * The pivot runs that Euler step with σ increasing, ``σ_{i+1} → σ_i``:
      ``x ← x + ε̂(x̃; σ_i)·(σ_i − σ_{i+1})`` with ``x̃ = x·c_in(σ_{i+1})/c_in(σ_i)``, so the UNet is
      given the current latent's own input ``c_in(σ_{i+1})·x`` at the level it goes to, ``c_noise(σ_i)``.
      That is DDIM inversion transcribed: diffusers' ``DDIMInverseScheduler.step`` takes the UNet's
      output for the current latent (variance-preserving, ``x/√(1 + σ²)``: ``c_in`` with σ_data 1) at
      the next, higher timestep, and steps ``x/√ᾱ`` by ``ε̂·Δσ``. ``c_in(0) = 1/σ_data``: the first step
      from the clean latent needs no model call at σ = 0, where ``c_noise = ¼·ln σ`` does not exist.
      (Evaluating ``ε̂`` at the unscaled current latent instead underestimates it by the growth of
      ``x`` across the step: on a Gaussian's exact denoiser its 10-step round trip is ~50x worse.)

    Attributes:
        sigmas: (n + 1,) float32, the grid. timesteps: (n,) float32, ``sigmas[:-1]`` (what a file stores).
    """

    def __init__(self, schedule: EDMSchedule, num_steps: int) -> None:
        self.schedule, self.num_steps = schedule, num_steps
        self.sigmas = edm_sigmas(schedule, num_steps, sampler="euler")  # (n + 1,) float32
        self.timesteps = self.sigmas[:-1].clone()
        self._pre = [edm_precondition(s, sigma_data=schedule.sigma_data, prediction_type=schedule.prediction_type)
                     for s in self.timesteps]  # (c_skip, c_out, c_in, c_noise), 0-dim each
        self._c_in = 1 / (self.sigmas ** 2 + schedule.sigma_data ** 2) ** 0.5  # (n + 1,): c_in(0) = 1/σ_data

    def model_output(self, model: Model, x: Tensor, i: int, cond: object) -> Tensor:
        """The UNet output ``F`` (B, C, H, W) on ``c_in(σ_i)·x`` at ``c_noise(σ_i)``."""
        _, _, c_in, c_noise = self._pre[i]
        return model(x * c_in.to(x.device), c_noise.to(x.device).expand(x.shape[0]), cond)

    def derivative(self, out: Tensor, x: Tensor, i: int) -> Tensor:
        """``ε̂ = (x − D)/σ_i`` (B, C, H, W), ``D = c_skip(σ_i)·x + c_out(σ_i)·out`` (diffusers'
        ``precondition_outputs``, then the scheduler's "ODE derivative")."""
        c_skip, c_out, _, _ = self._pre[i]
        denoised = c_skip.to(x.device) * x + c_out.to(x.device) * out
        return (x - denoised) / self.sigmas[i].to(x.device)

    def step(self, out: Tensor, x: Tensor, i: int) -> Tensor:
        """Sampling step ``i``, ``σ_i → σ_{i+1}`` (B, C, H, W) float32 (the scheduler's upcast), from the
        (guided) UNet output ``out`` at σ_i."""
        x = x.to(torch.float32)
        return x + self.derivative(out, x, i) * (self.sigmas[i + 1] - self.sigmas[i]).to(x.device)

    def invert_step(self, model: Model, x: Tensor, i: int, cond: object) -> Tensor:
        """The inverse of sampling step ``i`` to first order: ``x`` at σ_{i+1} → σ_i (B, C, H, W) float32."""
        x = x.to(torch.float32)
        scaled = x * (self._c_in[i + 1] / self._c_in[i]).to(x.device)  # x̃: its UNet input at σ_i is x's at σ_{i+1}
        out = self.model_output(model, scaled, i, cond)
        return x + self.derivative(out, scaled, i) * (self.sigmas[i] - self.sigmas[i + 1]).to(x.device)

    def pivot(self, model: Model, x0: Tensor, cond: object) -> list[Tensor]:
        """``[x0 (at σ_n), x at σ_{n−1}, …, x at σ_0 = σ_max]`` (n + 1 of (B, C, H, W), float32). ``cond``: one
        condition, or a list of ``n`` (sampling step ``i``'s ``cond[i]``)."""
        conds = per_step(cond, self.num_steps, "conditions")
        out = [x0.to(torch.float32)]
        for i in range(self.num_steps - 1, -1, -1):
            out.append(self.invert_step(model, out[-1], i, conds[i]))
        return out


def inversion_steps(num_steps: int, *, alphas_cumprod: Tensor | None = None, edm: EDMSchedule | None = None,
                    prediction_type: str = "epsilon", spacing: str = "leading",
                    steps_offset: int = 1) -> DDIMSteps | EDMSteps:
    """The step rule of a model: :class:`EDMSteps` for an EDM-formulation one (``edm``, a system's
    ``edm``; its own ``prediction_type`` counts), else :class:`DDIMSteps` on ``alphas_cumprod``.

    Raises:
        ValueError: ``num_steps`` < 1, or neither ``alphas_cumprod`` nor ``edm`` given.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if edm is not None:
        return EDMSteps(edm, num_steps)
    if alphas_cumprod is None:
        raise ValueError("inversion needs the model's noise schedule: alphas_cumprod= (a discrete-time model) or "
                         "edm= (an EDM-formulation model's EDMSchedule, e.g. system.edm)")
    return DDIMSteps(alphas_cumprod, num_steps, prediction_type=prediction_type, spacing=spacing,
                     steps_offset=steps_offset)


class _DDIMPair:
    """One DDIM step ``t → t_prev`` as a one-step rule (step index 0): what :func:`null_text_objective` runs
    when it is given timesteps rather than a step rule."""

    def __init__(self, t: int, t_prev: int, alphas_cumprod: Tensor, prediction_type: str,
                 final_alpha_cumprod: float | None) -> None:
        self.t, self.t_prev, self.alphas_cumprod = t, t_prev, alphas_cumprod
        self.prediction_type, self.final_alpha_cumprod = prediction_type, final_alpha_cumprod

    def model_output(self, model: Model, x: Tensor, i: int, cond: object) -> Tensor:
        return model(x, torch.full((x.shape[0],), self.t, device=x.device, dtype=torch.long), cond)

    def step(self, out: Tensor, x: Tensor, i: int) -> Tensor:
        return diffusion.ddim_step(out, self.t, self.t_prev, x, self.alphas_cumprod,
                                   prediction_type=self.prediction_type, final_alpha_cumprod=self.final_alpha_cumprod)


def null_text_objective(
    model: Model,
    x_t: Tensor,
    t: int | None,
    t_prev: int | None,
    target: Tensor,
    *,
    out_cond: Tensor | Sequence[tuple[Tensor, float]],
    uncond: object,
    alphas_cumprod: Tensor | None = None,
    guidance: float,
    prediction_type: str = "epsilon",
    final_alpha_cumprod: float | None = None,
    rule: DDIMSteps | EDMSteps | None = None,
    step: int | None = None,
) -> Tensor:
    """Null-text inversion's per-step loss (0-dim): ``mean ‖ step(x_t; u(∅) + s·(c − u(∅))) − z*_{next} ‖²``
    — the loss :func:`null_text_optimize` minimises (it calls this function).

    The step is either the DDIM step ``t → t_prev`` on ``alphas_cumprod`` (η = 0; ``t_prev < 0`` uses
    ``final_alpha_cumprod``, default ᾱ_0), or, with ``rule`` (an :func:`inversion_steps` rule: DDIM or an
    EDM model's Euler step) and ``t = t_prev = None``, that rule's sampling step ``step``.

    Args:
        x_t: (B, C, H, W) the current latent of the guided trajectory.
        target: (B, C, H, W) the pivot latent the step should reach (``z*_{t_prev}``).
        out_cond: (B, C, H, W) the model output for the source prompt at ``x_t`` (computed once); for ``AND``
            (a :class:`Composed` step) ``(output, weight)`` per sub-prompt, combined as A1111's ``combine_denoised``.
        uncond: the unconditional condition carrying ``∅`` (gradients flow into its tensors).

    Raises:
        ValueError: neither ``t``/``t_prev`` + ``alphas_cumprod`` nor ``rule`` + ``step`` given, or both.
    """
    if rule is None:
        if t is None or t_prev is None or alphas_cumprod is None or step is not None:
            raise ValueError("null_text_objective needs t, t_prev and alphas_cumprod= (one DDIM step), or "
                             "t=None, t_prev=None with rule= and step= (a sampling step of an inversion_steps rule)")
        rule, step = _DDIMPair(t, t_prev, alphas_cumprod, prediction_type, final_alpha_cumprod), 0
    elif step is None or t is not None or t_prev is not None:
        raise ValueError("null_text_objective with rule= takes the sampling step as step= (and t=None, t_prev=None)")
    out_uncond = rule.model_output(model, x_t, step, uncond)  # (B, C, H, W)
    x_next = rule.step(_combine(out_uncond, out_cond, guidance), x_t, step)
    return F.mse_loss(x_next.float(), target.float())


# ----------------------------------------------------------------------------- inversions
def ddim_pivot(
    model: Model,
    x0: Tensor,
    cond: object,
    *,
    alphas_cumprod: Tensor | None = None,
    num_steps: int,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    steps_offset: int = 1,
    edm: EDMSchedule | None = None,
    uncond: object = None,
) -> list[Tensor]:
    """The pivot trajectory: DDIM inversion at guidance 1, ``[z*_0, z*_{t_1'}, …, z*_{t_n}]``
    (n+1 latents (B, C, H, W), ascending t) — :func:`sdadapt.training.diffusion.ddim_invert`;
    with ``edm`` (an EDM-formulation model) the Euler ODE inversion of :class:`EDMSteps`, ending at σ_max.
    ``cond``: one condition or a list of ``n`` per-step values (a prompt plan, :func:`plan_pivot`; ``uncond``, one
    or per step, is read at ``AND`` steps only)."""
    rule = inversion_steps(num_steps, alphas_cumprod=alphas_cumprod, edm=edm, prediction_type=prediction_type,
                           spacing=spacing, steps_offset=steps_offset)
    with torch.no_grad():
        return plan_pivot(rule, model, x0, cond, uncond)


def null_text_optimize(
    model: Model,
    pivot: list[Tensor],
    cond: object,
    uncond: object,
    *,
    alphas_cumprod: Tensor | None = None,
    guidance: float = 7.5,
    embedding_key: str | None = None,
    inner_steps: int = 10,
    learning_rate: float = 1e-2,
    lr_decay: float = 1e-2,
    epsilon: float = 1e-5,
    epsilon_slope: float = 2e-5,
    init: Tensor | None = None,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    steps_offset: int = 1,
    edm: EDMSchedule | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Per-timestep unconditional embeddings that make guided DDIM retrace ``pivot``.

    The step is :func:`inversion_steps`' (``edm``: an EDM-formulation model's Euler step, the
    objective the same ``‖ step(z̄; ∅_i) − z*_{next} ‖²`` on its σ grid); the loss is
    :func:`null_text_objective`. :func:`null_text_optimize_entries` optimises several entries of a
    dict condition at once (SDXL's text states and pooled ``text_embeds``).

    Args:
        pivot: the :func:`ddim_pivot` latents ``[z*_0, …, z*_{t_n}]`` (n+1 of (B, C, H, W)).
        cond: the source prompt's condition (its output is computed once per step, no grad).
        uncond: the unconditional condition; its ``embedding_key`` part ``∅`` (B, *E) is optimised.
        init: the starting ``∅`` (B, *E) (default: ``uncond``'s own — the empty prompt, as the
            paper; pass the conditional embedding to start from negative-prompt inversion).
        inner_steps, learning_rate, lr_decay, epsilon, epsilon_slope: Adam with
            ``lr = learning_rate·(1 − lr_decay·i)`` at step ``i``, at most ``inner_steps``
            iterations, stopping after one whose loss is ``< epsilon + i·epsilon_slope``
            (the paper: 10, 1e-2, 1/100, 1e-5, 2e-5).

    Returns:
        (n, B, *E) float32: row ``i`` is the null embedding of sampling step ``i`` (descending t).
    """
    return null_text_optimize_entries(
        model, pivot, cond, uncond, keys=(embedding_key,), alphas_cumprod=alphas_cumprod, guidance=guidance,
        inner_steps=inner_steps, learning_rate=learning_rate, lr_decay=lr_decay, epsilon=epsilon,
        epsilon_slope=epsilon_slope, init=None if init is None else {embedding_key: init},
        prediction_type=prediction_type, spacing=spacing, steps_offset=steps_offset, edm=edm, progress=progress,
    )[embedding_key]


def null_text_optimize_entries(
    model: Model,
    pivot: list[Tensor],
    cond: object,
    uncond: object,
    *,
    keys: Sequence[str | None],
    alphas_cumprod: Tensor | None = None,
    guidance: float = 7.5,
    inner_steps: int = 10,
    learning_rate: float = 1e-2,
    lr_decay: float = 1e-2,
    epsilon: float = 1e-5,
    epsilon_slope: float = 2e-5,
    init: Mapping[str | None, Tensor] | None = None,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    steps_offset: int = 1,
    edm: EDMSchedule | None = None,
    progress: Progress | None = None,
) -> dict[str | None, Tensor]:
    """:func:`null_text_optimize` over several entries of the unconditional condition at once: one Adam
    over all of them per step (Null-SDXL's ``NullInversion.null_optimization`` optimises SDXL's
    unconditional text states and pooled embedding together, ugiugi0823/Null-SDXL null-sdxl.ipynb).

    ``cond`` / ``uncond``: one value, or a list of ``n`` per-step values (a prompt plan): step ``i``'s ``∅_i`` is
    optimised against step ``i``'s condition (a :class:`Composed` one through A1111's ``AND`` combination), its
    other entries taken from ``uncond[i]``; the starting value is ``uncond[0]``'s.

    Args:
        keys: the entries ``∅^k`` (B, *E_k) of ``uncond`` to optimise, e.g. ``("context", "text_embeds")``;
            ``(None,)`` for a tensor condition.
        init: starting values per key (default: ``uncond``'s own).
        The rest: :func:`null_text_optimize`'s.

    Returns:
        ``{key: (n, B, *E_k) float32}``, row ``i`` the entry's value at sampling step ``i``.

    Raises:
        ValueError: no keys, a repeated key, ``None`` beside other keys, a missing entry, a bad option.
    """
    keys = tuple(keys)
    if not keys or len(set(keys)) != len(keys) or (None in keys and len(keys) > 1):
        raise ValueError(f"keys must name distinct entries of the unconditional condition (or be (None,) for a "
                         f"tensor condition), got {keys}")
    n = len(pivot) - 1
    if n < 1:
        raise ValueError("the pivot trajectory needs at least 2 latents (z*_0 and z*_T)")
    if inner_steps < 1 or not learning_rate > 0:
        raise ValueError(f"inner_steps must be >= 1 and learning_rate > 0, got {inner_steps} and {learning_rate}")
    if not 0 <= lr_decay * (n - 1) < 1:
        raise ValueError(f"lr_decay={lr_decay} makes the learning rate reach 0 within {n} steps; use lr_decay < 1/{n - 1}")
    rule = inversion_steps(n, alphas_cumprod=alphas_cumprod, edm=edm, prediction_type=prediction_type, spacing=spacing,
                           steps_offset=steps_offset)
    conds, unconds = per_step(cond, n, "conditions"), per_step(uncond, n, "unconditional conditions")
    bases = [condition_embedding(unconds[0], key) for key in keys]
    for i, u in enumerate(unconds):
        for key, base in zip(keys, bases):
            if condition_embedding(u, key).shape != base.shape:
                raise ValueError(f"the unconditional condition of step {i} has {key or 'its embedding'} of shape "
                                 f"{tuple(condition_embedding(u, key).shape)}, step 0's {tuple(base.shape)}: one "
                                 "null embedding per step needs one shape (a negative prompt plan whose texts "
                                 "differ in length, BREAK or over 75 tokens in one branch?)")
    starts = dict(init or {})
    unknown = set(starts) - set(keys)
    if unknown:
        raise ValueError(f"init has entries {sorted(map(str, unknown))} that are not optimised (keys {keys})")
    embeddings = [starts.get(key, base).detach().float().clone() for key, base in zip(keys, bases)]  # (B, *E_k)
    for key, base, e in zip(keys, bases, embeddings):
        if e.shape != base.shape:
            what = "" if key is None else f" {key!r}"
            raise ValueError(f"init{what} has shape {tuple(e.shape)}, the unconditional embedding {tuple(base.shape)}")

    def condition(values: list[Tensor], i: int) -> object:
        out = unconds[i]
        for key, base, value in zip(keys, bases, values):
            out = with_embedding(out, key, value.to(base.dtype))
        return out

    out: list[list[Tensor]] = []
    x = pivot[-1]
    for i in range(n):
        target = pivot[n - i - 1]  # z*_{t_prev}
        with torch.no_grad():
            out_cond = _cond_outputs(rule, model, x, i, conds[i])
        embeddings = [e.detach().clone().requires_grad_(True) for e in embeddings]
        optimizer = torch.optim.Adam(embeddings, lr=learning_rate * (1.0 - lr_decay * i))
        threshold = epsilon + i * epsilon_slope
        with torch.enable_grad():
            for _ in range(inner_steps):
                loss = null_text_objective(model, x, None, None, target, out_cond=out_cond, guidance=guidance,
                                           uncond=condition(embeddings, i), rule=rule, step=i)
                grads = torch.autograd.grad(loss, embeddings)  # never touches the model's .grad
                for e, grad in zip(embeddings, grads):
                    e.grad = grad
                optimizer.step()
                if loss.item() < threshold:
                    break
        embeddings = [e.detach() for e in embeddings]
        out.append([e.clone() for e in embeddings])
        with torch.no_grad():
            out_uncond = rule.model_output(model, x, i, condition(embeddings, i))
            x = rule.step(_combine(out_uncond, out_cond, guidance), x, i)
        if progress is not None:
            progress(i + 1, n, "null-text")
    return {key: torch.stack([row[j] for row in out]) for j, key in enumerate(keys)}


def negative_prompt_embeddings(cond: object, num_steps: int, *, embedding_key: str | None = None) -> Tensor:
    """Negative-prompt inversion's null embeddings: the conditional embedding (B, *E), repeated
    ``num_steps`` times -> (n, B, *E) float32; for a list of ``num_steps`` per-step conditions (a prompt plan)
    row ``i`` is step ``i``'s.

    Raises:
        ValueError: a :class:`Composed` step (``AND``: several sub-prompts, no one condition whose embedding makes
            the guided step the conditional one), per-step embeddings of different shapes.
    """
    if any(isinstance(c, Composed) for c in (cond if isinstance(cond, list) else [cond])):
        raise ValueError(_NO_ONE_CONDITION)
    if not isinstance(cond, list):
        e = condition_embedding(cond, embedding_key).detach().float()
        return e[None].expand(num_steps, *e.shape).clone()
    if len(cond) != num_steps:
        raise ValueError(f"got {len(cond)} per-step conditions for {num_steps} steps")
    rows = [condition_embedding(c, embedding_key).detach().float() for c in cond]
    if len({tuple(r.shape) for r in rows}) > 1:
        raise ValueError(f"the per-step embeddings differ in shape ({sorted({tuple(r.shape) for r in rows})}): one "
                         "null embedding per step needs one shape (a prompt plan whose texts differ in length: BREAK "
                         "or over 75 tokens in one branch); give every branch the same number of 75-token chunks")
    return torch.stack(rows)


_NO_ONE_CONDITION = ("negative-prompt inversion puts the prompt's own condition in the null branch, so that the guided "
                     "step is the conditional one; a prompt with AND has several sub-prompt conditions, combined over "
                     "the model's outputs (A1111's composable diffusion), and no one condition does that: use "
                     "method null-text (with init 'null') or ddim for an AND prompt")


@torch.no_grad()
def sample_with_embeddings(
    model: Model,
    x_T: Tensor,
    cond: object | list[object],
    uncond: object,
    embeddings: Tensor,
    *,
    alphas_cumprod: Tensor | None = None,
    guidance: float,
    embedding_key: str | None = None,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    steps_offset: int = 1,
    edm: EDMSchedule | None = None,
    progress: Progress | None = None,
    label: str = "sample",
    extra_embeddings: Mapping[str, Tensor] | None = None,
) -> Tensor:
    """Guided DDIM from ``x_T`` (B, C, H, W) with a per-step null embedding ``embeddings[i]``.

    ``cond`` is one condition, or a list of ``n`` (one per step: a prompt plan, prompt switching for edits), a step's
    value a condition or a :class:`Composed` (``AND``: A1111's combination, ``generate``'s call,
    :func:`guided_model`).
    Each step evaluates ``u`` and ``c`` as one batch of 2B (as :func:`~sdadapt.training.diffusion.guided`);
    the last step uses ᾱ_0 (as the pivot). ``edm``: an EDM-formulation model, whose ``x_T`` is the
    latent at σ_max, sampled by :class:`EDMSteps` (``EDMEulerScheduler``'s steps). ``extra_embeddings``:
    per-step values (n, B, *E_k) of other entries ``k`` of a dict ``uncond`` (:func:`null_text_optimize_entries`'
    output, e.g. SDXL's pooled ``text_embeds``). Returns x_0 (B, C, H, W).
    """
    n = embeddings.shape[0]
    rule = inversion_steps(n, alphas_cumprod=alphas_cumprod, edm=edm, prediction_type=prediction_type, spacing=spacing,
                           steps_offset=steps_offset)
    conds = cond if isinstance(cond, list) else [cond] * n
    if len(conds) != n:
        raise ValueError(f"got {len(conds)} per-step conditions for {n} steps")
    dtype = condition_embedding(uncond, embedding_key).dtype
    extras = dict(extra_embeddings or {})
    for key, value in extras.items():
        if key == embedding_key or value.shape[:1] != (n,):
            raise ValueError(f"extra_embeddings[{key!r}] must be another entry than embedding_key with one row per "
                             f"step ({n}), got shape {tuple(value.shape)}")
    extra_dtypes = {key: condition_embedding(uncond, key).dtype for key in extras}
    x = x_T
    for i in range(n):
        u = with_embedding(uncond, embedding_key, embeddings[i].to(device=x.device, dtype=dtype))
        for key, value in extras.items():
            u = with_embedding(u, key, value[i].to(device=x.device, dtype=extra_dtypes[key]))
        out = rule.model_output(guided_model(model, conds[i], u, guidance), x, i, conds[i])
        x = rule.step(out, x, i)
        if progress is not None:
            progress(i + 1, n, label)
    return x


def psnr(image: Tensor, reference: Tensor, *, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, ``10·log10(range² / mean (a − b)²)`` over all elements
    (images in [-1, 1]: ``data_range`` 2). ``inf`` for identical images."""
    if image.shape != reference.shape:
        raise ValueError(f"images differ in shape: {tuple(image.shape)} vs {tuple(reference.shape)}")
    mse = float(((image.double() - reference.double()) ** 2).mean())
    return float("inf") if mse == 0 else 10.0 * torch.log10(torch.tensor(data_range**2 / mse)).item()
