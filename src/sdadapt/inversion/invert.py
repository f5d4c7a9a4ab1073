"""Invert one real image, keep the result in a file, regenerate or edit from it.

Model level (any ``model(x, t, cond)``, conditions as tensors or dicts of tensors):
:func:`invert_latents` -> :class:`Inversion` -> :func:`sample_inversion`. System level (a
:class:`~sdadapt.methods.system.System`: the toy model, a diffusers folder, your own):
:func:`invert_image` / :func:`regenerate_image`, which add the VAE (``encode_images`` /
``decode_latents``) and the prompts (``tokenize`` + ``condition``).

Methods (``method=``): ``"null-text"`` (Mokady et al. 2023: per-step optimised null embeddings),
``"negative-prompt"`` (Miyake et al. 2023: the prompt's own embedding as the null embedding, no
optimisation) and ``"ddim"`` (plain DDIM inversion: the empty prompt's embedding at every step —
the baseline that drifts under strong guidance).

An inversion file (:func:`save_inversion`, safetensors, strings-only metadata, written
atomically) holds everything the sampler needs besides the model: ``x_T``, the per-step null
embeddings, the source condition, the unconditional template, the timesteps and ``alphas_cumprod``
(so regeneration never depends on re-running the text encoder), plus the guidance and scheduler
settings as metadata. Regeneration is deterministic: the same model and file give the same bits.

An EDM-formulation model (Playground v2.5: the system's ``edm``) is inverted and regenerated through
its deterministic sampler's ODE, the Euler step of diffusers' ``EDMEulerScheduler``
(:class:`~.core.EDMSteps`): the same loops, ``x_T`` the latent at σ_max, ``timesteps`` the σ of the
sampling steps, the schedule in the file's ``edm`` metadata (format ``sdadapt-inversion/2``, without the DDPM
``alphas_cumprod`` / scheduler settings). Per-step values of more null-condition entries (SDXL's pooled
``text_embeds``, ``extra_keys``) make format ``sdadapt-inversion/3``.

Prompts are read as ``generate`` reads them, prompt plans included (A1111's prompt editing, alternation, ``AND``:
:func:`invert_image`); a plan's per-step source conditions (:attr:`Inversion.cond_plan`) make format
``sdadapt-inversion/4``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..formats.files import WeightFileError, read_safetensors, write_safetensors
from ..samplers.edm import EDMSchedule
from .core import (
    _NO_ONE_CONDITION,
    Composed,
    ConditionPlan,
    Model,
    Progress,
    condition_embedding,
    default_embedding_key,
    inversion_steps,
    negative_prompt_embeddings,
    null_text_optimize,
    null_text_optimize_entries,
    per_step,
    plan_pivot,
    sample_with_embeddings,
)

__all__ = [
    "INVERSION_METHODS",
    "Inversion",
    "invert_latents",
    "sample_inversion",
    "invert_image",
    "regenerate_image",
    "save_inversion",
    "load_inversion",
]

INVERSION_METHODS = ("null-text", "negative-prompt", "ddim")
_FORMAT = "sdadapt-inversion/1"
#: an EDM model's inversion (σ timesteps, the ``edm`` schedule): a reader of /1 files only would run it as DDIM
_FORMAT_EDM = "sdadapt-inversion/2"
#: an inversion with per-step values of more than one entry of the null condition (``null_keys``, e.g. SDXL's pooled
#: ``text_embeds``; DDIM, or EDM with the ``edm`` metadata): a reader of /1 or /2 files would drop them unnoticed
_FORMAT_ENTRIES = "sdadapt-inversion/3"
#: an inversion of a prompt plan (A1111's prompt editing, alternation, ``AND``): per-step source conditions
#: (``cond_plan.<j>[.<key>]`` tensors, ``cond_plan`` metadata); a reader of /1-/3 files would reconstruct the one
#: ``cond`` at every step unnoticed. ``edm`` and ``null_keys`` as in /2 and /3 where they apply.
_FORMAT_PLAN = "sdadapt-inversion/4"
#: SDXL's pooled text embedding in a condition dict: negative-prompt inversion takes it from the prompt too
POOLED_KEY = "text_embeds"
#: the :class:`~sdadapt.samplers.edm.EDMSchedule` fields the Euler step reads (what must match to regenerate)
_EDM_FIELDS = ("sigma_min", "sigma_max", "sigma_data", "sigma_schedule", "rho", "prediction_type", "final_sigmas_type")


@dataclass(frozen=True)
class Inversion:
    """One inverted image: what :func:`sample_inversion` needs besides the model.

    Attributes:
        method: ``"null-text"``, ``"negative-prompt"`` or ``"ddim"``.
        x_T: (B, C, h, w) the latent at the noisiest timestep (the end of the pivot; EDM: at σ_max,
            not divided by diffusers' ``init_noise_sigma``).
        null_embeddings: (n, B, *E) float32, row ``i`` the null embedding of sampling step ``i``.
        timesteps: (n,) int64, the sampling timesteps, descending (EDM: float32 σ_0 … σ_{n−1}).
        cond: the source prompt's condition (a tensor (B, *E) or a dict of tensors).
        uncond: the unconditional condition its ``embedding_key`` part is replaced in, per step.
        alphas_cumprod: (T,) the noise schedule the inversion ran with (EDM: (0,), nothing of it is used).
        guidance: the classifier-free guidance scale the null embeddings are made for.
        embedding_key: ``None`` (tensor conditions) or the dict entry holding the text embedding.
        prediction_type, spacing, steps_offset: the scheduler settings (diffusers' names).
        prompt: the source prompt (informational).
        info: extra string metadata (model, source image, timings).
        edm: the EDM schedule of an EDM-formulation model (its Euler step ran), else ``None``.
        null_extra: per-step values (n, B, *E_k) float32 of other entries ``k`` of a dict ``uncond`` made with
            the null embeddings (``extra_keys`` of :func:`invert_latents`, e.g. SDXL's pooled ``text_embeds``; an
            entry a negative prompt plan changes from step to step).
        cond_plan: a prompt plan's source conditions per sampling step (:class:`~.core.ConditionPlan`; ``cond`` is
            then its first condition), ``None`` for one condition at every step.
    """

    method: str
    x_T: Tensor
    null_embeddings: Tensor
    timesteps: Tensor
    cond: Any
    uncond: Any
    alphas_cumprod: Tensor
    guidance: float
    embedding_key: str | None = None
    prediction_type: str = "epsilon"
    spacing: str = "leading"
    steps_offset: int = 1
    prompt: str = ""
    info: Mapping[str, str] = field(default_factory=dict)
    edm: EDMSchedule | None = None
    null_extra: Mapping[str, Tensor] = field(default_factory=dict)
    cond_plan: ConditionPlan | None = None

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def source_conditions(self) -> list[object]:
        """The source prompt's condition at each sampling step (``n`` values: a condition, or a
        :class:`~.core.Composed` for ``AND``)."""
        return self.cond_plan.per_step() if self.cond_plan is not None else [self.cond] * self.num_steps


def _check_method(method: str) -> None:
    if method not in INVERSION_METHODS:
        raise ValueError(f"unknown inversion method {method!r}; use one of {', '.join(INVERSION_METHODS)}")


def invert_latents(
    model: Model,
    x0: Tensor,
    cond: object,
    uncond: object,
    *,
    alphas_cumprod: Tensor | None = None,
    method: str = "null-text",
    guidance: float | None = None,
    num_steps: int = 50,
    embedding_key: str | None = None,
    prediction_type: str = "epsilon",
    spacing: str = "leading",
    steps_offset: int = 1,
    init: str = "null",
    inner_steps: int = 10,
    learning_rate: float = 1e-2,
    lr_decay: float = 1e-2,
    epsilon: float = 1e-5,
    epsilon_slope: float = 2e-5,
    prompt: str = "",
    edm: EDMSchedule | None = None,
    progress: Progress | None = None,
    extra_keys: Sequence[str] = (),
) -> Inversion:
    """Invert clean latents ``x0`` (B, C, h, w) made from the prompt whose condition is ``cond``.

    ``edm``: an EDM-formulation model (a system's ``edm``): the pivot and the steps are
    :class:`~.core.EDMSteps`' (``EDMEulerScheduler``'s Euler step; ``alphas_cumprod``, ``spacing`` and
    ``steps_offset`` unused, ``prediction_type`` the schedule's); else DDIM on ``alphas_cumprod``.

    ``guidance``: the classifier-free guidance scale the null embeddings are made for; ``None``: the paper's 7.5, or
    with ``edm`` the EDM model's model card scale for the ``EDMEulerScheduler`` the inversion and its reconstruction
    run (Playground v2.5: 5; :func:`sdadapt.training.edm.edm_default_guidance` of ``euler``, what
    :func:`sdadapt.sampling.default_guidance` answers for the model's ``euler``). Saved in the inversion.

    Runs the guidance-1 DDIM pivot (:func:`~.core.ddim_pivot`), then builds the null embeddings
    by ``method``; ``init="negative-prompt"`` starts null-text optimisation from the conditional
    embedding instead of the empty prompt's. ``embedding_key`` defaults to
    :func:`~.core.default_embedding_key` of ``uncond``. The other options are
    :func:`~.core.null_text_optimize`'s. ``progress(done, total, label)`` reports ``"invert"``
    (the pivot, once at the end) and ``"null-text"`` steps.

    A prompt plan (A1111's prompt editing, alternation, ``AND``; :func:`invert_image` reads one from the text):
    ``cond`` a list of ``num_steps`` per-step values (a condition, or a :class:`~.core.Composed` for ``AND``; one
    :class:`~.core.Composed` is that value at every step),
    ``uncond`` one condition or a list of ``num_steps`` (a negative prompt plan). The pivot inverts step ``i`` with
    step ``i``'s guidance-1 output (:func:`~.core.plan_pivot`), null-text optimises ``∅_i`` against step ``i``'s
    conditions, negative-prompt inversion's ``∅_i`` is step ``i``'s prompt condition (refused for ``AND``: no one
    condition makes the guided step the conditional one; so is null-text's ``init="negative-prompt"``), ddim's is
    step ``i``'s negative; the per-step conditions are kept in :attr:`Inversion.cond_plan`, entries of the null
    condition a negative plan changes per step in :attr:`Inversion.null_extra`.

    ``extra_keys``: other entries of a dict ``uncond`` that get a per-step value too
    (:attr:`Inversion.null_extra`): null-text optimises them with the embedding in one Adam
    (:func:`~.core.null_text_optimize_entries`; SDXL's pooled ``("text_embeds",)``, as Null-SDXL), negative-prompt
    takes the prompt's, ddim keeps ``uncond``'s. Negative-prompt inversion always takes SDXL's pooled
    ``text_embeds`` from the prompt (Miyake et al.: the null condition *is* the prompt's, so the guided step is
    the conditional one), and so does null-text's ``init="negative-prompt"`` where the pooled entry is not optimised
    (kept fixed in :attr:`Inversion.uncond`); both take the prompt's other fixed entries into
    :attr:`Inversion.uncond` too (the SDXL refiner's ``time_ids``, with the prompt's aesthetic score, not the
    negative one).
    """
    _check_method(method)
    if init not in ("null", "negative-prompt"):
        raise ValueError(f"init must be 'null' or 'negative-prompt', got {init!r}")
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    planned = isinstance(cond, (list, Composed))  # (one Composed: the plan of it at every step)
    conds, unconds = per_step(cond, num_steps, "conditions"), per_step(uncond, num_steps, "unconditional conditions")
    composed = any(isinstance(c, Composed) for c in conds)
    if composed and (method == "negative-prompt" or (method == "null-text" and init == "negative-prompt")):
        what = "negative-prompt inversion" if method == "negative-prompt" else "null-text's init 'negative-prompt'"
        raise ValueError(f"{what}: " + _NO_ONE_CONDITION)
    cond0, uncond0 = conds[0], unconds[0]
    key = default_embedding_key(uncond0) if embedding_key is None else embedding_key
    if guidance is None:  # (an EDM model's card scale for the Euler step it runs, else the paper's)
        from ..training.edm import edm_default_guidance

        guidance = 7.5 if edm is None else edm_default_guidance("euler")
    if edm is not None:  # (the schedule's; the DDPM settings mean nothing there: what a file of it reads back)
        prediction_type, spacing, steps_offset, alphas_cumprod = edm.prediction_type, "leading", 1, None
    extras = tuple(extra_keys)
    if (method == "negative-prompt" and isinstance(cond0, dict) and isinstance(cond0.get(POOLED_KEY), Tensor)
            and key != POOLED_KEY and POOLED_KEY not in extras):
        extras += (POOLED_KEY,)
    if ((method == "negative-prompt" or (method == "null-text" and init == "negative-prompt"))
            and isinstance(cond0, dict) and isinstance(uncond0, dict)):
        # (NPI's null condition is the prompt's, and null-text's init starts from it: the entries not made per step
        # are the prompt's — the pooled text_embeds where it is not per step, the refiner's time_ids, whose negative
        # aesthetic score would otherwise stay in the null branch and the guided step not be the conditional one)
        unconds = [{**u, **{k: c[k] for k in u if k in c and k != key and k not in extras}}
                   for u, c in zip(unconds, conds)]
        if not isinstance(uncond, list):
            uncond = unconds[0]
    uncond0 = unconds[0]
    if extras and (not isinstance(uncond0, dict) or key in extras or len(set(extras)) != len(extras)):
        raise ValueError(f"extra_keys={tuple(extra_keys)} must name other entries of a dict condition than "
                         f"embedding_key={key!r}, each once")
    rule = inversion_steps(num_steps, alphas_cumprod=alphas_cumprod, edm=edm, prediction_type=prediction_type,
                           spacing=spacing, steps_offset=steps_offset)
    # (one value where one was given: bit-identical to the single-condition path)
    uncond_arg = unconds if isinstance(uncond, list) else uncond0
    with torch.no_grad():
        pivot = plan_pivot(rule, model, x0, conds if planned else cond, uncond_arg)
    if progress is not None:
        progress(num_steps, num_steps, "invert")
    null_extra: dict[str, Tensor] = {}
    if method in ("negative-prompt", "ddim"):
        source = (conds if planned else cond) if method == "negative-prompt" else uncond_arg
        nulls = negative_prompt_embeddings(source, num_steps, embedding_key=key)
        null_extra = {k: negative_prompt_embeddings(source, num_steps, embedding_key=k) for k in extras}
    elif extras:
        start = {k: condition_embedding(cond0, k) for k in (key, *extras)} if init == "negative-prompt" else None
        found = null_text_optimize_entries(
            model, pivot, conds if planned else cond, uncond_arg, keys=(key, *extras), alphas_cumprod=alphas_cumprod,
            guidance=guidance,
            inner_steps=inner_steps, learning_rate=learning_rate, lr_decay=lr_decay, epsilon=epsilon,
            epsilon_slope=epsilon_slope, init=start, prediction_type=prediction_type, spacing=spacing,
            steps_offset=steps_offset, edm=edm, progress=progress,
        )
        nulls, null_extra = found.pop(key), found  # type: ignore[assignment]
    else:
        start = condition_embedding(cond0, key) if init == "negative-prompt" else None
        nulls = null_text_optimize(
            model, pivot, conds if planned else cond, uncond_arg, alphas_cumprod=alphas_cumprod, guidance=guidance,
            embedding_key=key,
            inner_steps=inner_steps, learning_rate=learning_rate, lr_decay=lr_decay, epsilon=epsilon,
            epsilon_slope=epsilon_slope, init=start, prediction_type=prediction_type, spacing=spacing,
            steps_offset=steps_offset, edm=edm, progress=progress,
        )
    if isinstance(uncond0, dict):  # (entries of the null condition a negative plan changes per step: kept per step)
        for k, value in uncond0.items():
            if (k != key and k not in null_extra and isinstance(value, Tensor)
                    and any(not torch.equal(u[k], value) for u in unconds)):  # type: ignore[index]
                null_extra[k] = torch.stack([u[k].detach() for u in unconds])  # type: ignore[index]
    cond_plan = ConditionPlan.from_steps(conds) if planned else None
    if cond_plan is not None and len(cond_plan.conds) == 1 and all(r == ((0, 1.0),) for r in cond_plan.steps):
        cond_plan = None  # (one condition at every step: the plain inversion)
    info = {}
    if method == "null-text":
        info["options"] = json.dumps({"init": init, "inner_steps": inner_steps, "learning_rate": learning_rate,
                                      "lr_decay": lr_decay, "epsilon": epsilon, "epsilon_slope": epsilon_slope})
    return Inversion(
        method=method,
        x_T=pivot[-1].detach(),
        null_embeddings=nulls,
        timesteps=rule.timesteps.clone(),
        cond=_detach(cond0 if cond_plan is None else cond_plan.conds[0]),
        uncond=_detach(uncond0),
        alphas_cumprod=torch.zeros(0) if alphas_cumprod is None else alphas_cumprod.detach(),
        guidance=float(guidance),
        embedding_key=key,
        prediction_type=prediction_type,
        spacing=spacing,
        steps_offset=steps_offset,
        prompt=prompt,
        info=info,
        edm=edm,
        null_extra=null_extra,
        cond_plan=None if cond_plan is None else ConditionPlan(tuple(_detach(c) for c in cond_plan.conds),
                                                               cond_plan.steps),
    )


def _detach(cond: object) -> object:
    if isinstance(cond, Tensor):
        return cond.detach()
    if isinstance(cond, dict):
        return {k: v.detach() if isinstance(v, Tensor) else v for k, v in cond.items()}
    raise TypeError(f"a condition must be a tensor or a dict of tensors, got {type(cond).__name__}")


def _to(cond: object, device: torch.device) -> object:
    if isinstance(cond, Tensor):
        return cond.to(device)
    if isinstance(cond, Composed):
        return Composed(tuple((_to(c, device), w) for c, w in cond.parts))
    return {k: v.to(device) if isinstance(v, Tensor) else v for k, v in cond.items()}  # type: ignore[union-attr]


def _plan_to(plan: ConditionPlan, device: torch.device) -> list[object]:
    """A plan's per-step values on ``device`` (each distinct condition moved once)."""
    return ConditionPlan(tuple(_to(c, device) for c in plan.conds), plan.steps).per_step()


def sample_inversion(
    model: Model,
    inversion: Inversion,
    *,
    cond: object | None = None,
    source_steps: int = 0,
    guidance: float | None = None,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
) -> Tensor:
    """Regenerate latents (B, C, h, w) from an inversion: its reconstruction, or an edit.

    Args:
        cond: an edit's condition (default: the source prompt's — the reconstruction); for an edit prompt plan a
            :class:`~.core.ConditionPlan` or a list of ``n`` per-step values (step ``i`` uses its value ``i``).
        source_steps: prompt switching for edits: the first ``source_steps`` sampling steps keep
            the source condition (the layout settles there; a source plan's per-step conditions), the rest
            use ``cond``.
        guidance: override the scale (the null embeddings are made for ``inversion.guidance``).
        device: where to run (default: the inversion's tensors' device).
    """
    n = inversion.num_steps
    if not 0 <= source_steps <= n:
        raise ValueError(f"source_steps must be in [0, {n}], got {source_steps}")
    dev = torch.device(device) if device is not None else inversion.x_T.device
    source = [_to(inversion.cond, dev)] * n if inversion.cond_plan is None else _plan_to(inversion.cond_plan, dev)
    if cond is None:
        target = source
    elif isinstance(cond, ConditionPlan):
        if cond.num_steps != n:
            raise ValueError(f"the edit's condition plan has {cond.num_steps} steps, the inversion {n}")
        target = _plan_to(cond, dev)
    else:
        target = [_to(c, dev) for c in cond] if isinstance(cond, list) else [cond] * n
        if len(target) != n:
            raise ValueError(f"got {len(target)} per-step edit conditions for the inversion's {n} steps")
    conds = source[:source_steps] + target[source_steps:]
    label = "reconstruct" if cond is None else "edit"
    return sample_with_embeddings(
        model, inversion.x_T.to(dev), conds, _to(inversion.uncond, dev), inversion.null_embeddings.to(dev),
        alphas_cumprod=inversion.alphas_cumprod.to(dev), guidance=inversion.guidance if guidance is None else guidance,
        embedding_key=inversion.embedding_key, prediction_type=inversion.prediction_type, spacing=inversion.spacing,
        steps_offset=inversion.steps_offset, edm=inversion.edm, progress=progress, label=label,
        extra_embeddings={k: v.to(dev) for k, v in inversion.null_extra.items()},
    )


# ----------------------------------------------------------------------------- system level
def _prompt_condition(system, prompt: str) -> object:
    """``prompt``'s condition as the system samples it (``system.prompt_condition``: ``DiffusersSystem``'s A1111
    emphasis, ``BREAK`` and long-prompt chunks, ``generate``'s reading); ``condition(tokenize([prompt]))`` for a
    system without that reader (the toy: :func:`_read_plan` has taken A1111 emphasis out of ``prompt`` already)."""
    read = getattr(system, "prompt_condition", None)
    return system.condition(system.tokenize([prompt])) if read is None else read(prompt)


def _read_plan(system, prompt: str, negative: str, num_steps: int) -> tuple[object, object]:
    """``(cond, uncond)`` of ``prompt`` / ``negative`` as ``generate`` samples them over ``num_steps`` sampling steps
    of one model call each (DDIM, the EDM Euler step: A1111's schedule steps are the steps): read by
    :func:`sdadapt.prompt_guidance.plan_prompt` (prompt editing, alternation, ``AND``), each text conditioned once as
    ``generate`` conditions a plan's texts (``system.plan_conditions``; else :func:`_prompt_condition` per text, and
    the one negative as :func:`invert_image` reads it). Step ``i`` takes each schedule's entry for model call ``i``
    (A1111's ``reconstruct_cond_batch``, :meth:`sdadapt.prompt_guidance.ScheduledGuidance.__call__`). Each is one
    condition where the plan has one (a plan of one text of weight 1 and one negative text: the plain reading of
    that text, as ``generate`` samples it — ``[red:red:0.5]`` is ``red``), else a list of ``num_steps``. A system
    that reads no A1111 emphasis (no ``tokenize_weighted``: the toy) gets each scheduled text without it
    (:func:`sdadapt.prompt_guidance.without_emphasis`: ``(red:1.3)`` is ``red``), as ``generate`` gives it."""
    from ..prompt_guidance import plan_prompt, reads_emphasis, without_emphasis

    # (a model that reads no prompt weights, the toy: emphasis taken out of each scheduled text, as generate does)
    plan = plan_prompt(prompt, negative, steps=num_steps, clean=None if reads_emphasis(system) else without_emphasis)
    if plan.plain:  # (the one text, read as before: generate samples plan.texts[0] so too)
        cond = _prompt_condition(system, plan.texts[0])
        negative_condition = getattr(system, "negative_condition", None)
        uncond = (_prompt_condition(system, plan.negative_texts[0]) if negative_condition is None
                  else negative_condition(plan.negative_texts[0], cond))
        return cond, uncond
    read = getattr(system, "plan_conditions", None)
    if read is not None:
        texts, negatives = read(plan)
    else:  # (the toy: each text as _prompt_condition reads it)
        texts = [_prompt_condition(system, text) for text in plan.texts]
        negative_condition = getattr(system, "negative_condition", None)
        negatives = [_prompt_condition(system, text) if negative_condition is None or len(plan.negative_texts) > 1
                     else negative_condition(text, texts[0]) for text in plan.negative_texts]
    conds: list[object] = []
    for i in range(num_steps):
        parts = tuple((texts[schedule.at(i)], weight) for schedule, weight in plan.parts)
        conds.append(parts[0][0] if len(parts) == 1 and parts[0][1] == 1.0 else Composed(parts))
    unconds = [negatives[plan.negative.at(i)] for i in range(num_steps)]
    plain_prompt = len(plan.texts) == 1 and len(plan.parts) == 1 and plan.parts[0][1] == 1.0
    return (conds[0] if plain_prompt else conds), (unconds[0] if len(plan.negative_texts) == 1 else unconds)


def _as_batch(image: Tensor, size: int) -> Tensor:
    x = image if image.ndim == 4 else image[None]
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] != 1:
        raise ValueError(f"expected one RGB image (3, H, W) or (1, 3, H, W) in [-1, 1], got {tuple(image.shape)}")
    if x.shape[-2:] != (size, size):
        raise ValueError(
            f"the image is {x.shape[-1]}x{x.shape[-2]}, the model works at {size}x{size}: resize it first "
            "(sdadapt.images.read_image(path, size=system.image_size) resizes the shorter side and centre-crops)"
        )
    return x


def invert_image(
    system,
    image: Tensor,
    prompt: str,
    *,
    method: str = "null-text",
    guidance: float | None = None,
    num_steps: int = 50,
    negative: str = "",
    init: str = "null",
    inner_steps: int = 10,
    learning_rate: float = 1e-2,
    lr_decay: float = 1e-2,
    epsilon: float = 1e-5,
    epsilon_slope: float = 2e-5,
    spacing: str = "leading",
    steps_offset: int = 1,
    progress: Progress | None = None,
    extra_keys: Sequence[str] = (),
) -> Inversion:
    """Invert one image (3, H, W) or (1, 3, H, W) in [-1, 1] at the system's size, with its caption.

    ``system`` is any :class:`~sdadapt.methods.system.System` (``encode_images``, ``tokenize``,
    ``condition``, ``denoiser``, ``alphas_cumprod``, ``prediction_type``, ``image_size``); one with an
    ``edm`` schedule (Playground v2.5) is inverted through ``EDMEulerScheduler``'s ODE (its
    ``encode_images`` applies the VAE latents' mean / std, as diffusers' SDXL img2img pipeline).
    ``negative`` is the prompt of the starting null embedding (default ``""``, the paper's), conditioned as
    the system samples it (``system.negative_condition`` where it has one: SDXL's empty negative is zeros,
    text states and pooled ``text_embeds``, as diffusers' SDXL pipeline under ``force_zeros_for_empty_prompt``);
    ``extra_keys=("text_embeds",)`` also optimises SDXL's pooled null embedding; the other options are
    :func:`invert_latents`' (``guidance`` ``None``: 7.5, an EDM model's card scale for Euler, 5).

    ``prompt`` and ``negative`` are read as ``generate`` reads them, prompt plans included: A1111's prompt editing
    (``[a:b:0.4]``, ``[a:0.4]``, ``[a::0.4]``), alternation (``[a|b]``) and ``AND`` (``a cat AND a hat:0.5``) give
    each of the ``num_steps`` sampling steps its own conditions (:func:`_read_plan`; the schedule counts the
    inversion's steps, one model call each, as ``generate --sampler ddim`` / an EDM model's ``euler`` counts them),
    which the inversion and its reconstruction run step by step (:func:`invert_latents`). A plan of one text
    (``[cat:cat:0.5]``) is the plain prompt, bit-identical.

    Raises:
        ValueError: an unknown method, or an image not of the system's size; ``AND`` with method
            ``negative-prompt`` or ``init="negative-prompt"``.
    """
    _check_method(method)
    device = system.alphas_cumprod.device
    x = _as_batch(image, system.image_size).to(device)
    with torch.no_grad():
        x0 = system.encode_images(x)
        cond, uncond = _read_plan(system, prompt, negative, num_steps)
    return invert_latents(
        system.denoiser(), x0, cond, uncond, alphas_cumprod=system.alphas_cumprod, method=method, guidance=guidance,
        num_steps=num_steps, prediction_type=system.prediction_type, spacing=spacing, steps_offset=steps_offset,
        init=init, inner_steps=inner_steps, learning_rate=learning_rate, lr_decay=lr_decay, epsilon=epsilon,
        epsilon_slope=epsilon_slope, prompt=prompt, edm=getattr(system, "edm", None), progress=progress,
        extra_keys=extra_keys,
    )


@torch.no_grad()
def regenerate_image(
    system,
    inversion: Inversion,
    *,
    prompt: str | None = None,
    source_steps: int = 0,
    progress: Progress | None = None,
) -> Tensor:
    """The image (1, 3, H, W) in [-1, 1] regenerated from ``inversion``: the reconstruction, or
    with ``prompt`` the edit (same ``x_T`` and null embeddings, the new prompt's condition). The reconstruction
    runs the inversion's per-step conditions (a prompt plan's, :attr:`Inversion.cond_plan`); an edit ``prompt``
    is read as :func:`invert_image` reads the prompt (prompt editing, alternation, ``AND`` over the inversion's
    steps, counted from its first step), ``source_steps`` taking the source's conditions of the steps it keeps.

    Raises:
        ValueError: the inversion was made on a model with another noise schedule or prediction type
            (an EDM model's inversion on a discrete-time one, or the other way round).
    """
    device = system.alphas_cumprod.device
    ac = system.alphas_cumprod
    made_on = f" ({inversion.info['model']})" if "model" in inversion.info else ""
    edm = getattr(system, "edm", None)
    if (inversion.edm is None) != (edm is None):
        kinds = ("an EDM-formulation model (Playground v2.5)", "a discrete-time (DDPM) model")
        made, this = kinds if inversion.edm is not None else kinds[::-1]
        raise ValueError(f"this inversion was made on {made}, the system is {this}: regenerate it with the model it "
                         f"was made on{made_on}")
    if edm is not None:
        theirs, ours = (tuple(getattr(s, f) for f in _EDM_FIELDS) for s in (inversion.edm, edm))
        if theirs != ours:
            raise ValueError(f"this inversion was made with another EDM schedule ({dict(zip(_EDM_FIELDS, theirs))}, "
                             f"the system's {dict(zip(_EDM_FIELDS, ours))}): regenerate it with the model it was made "
                             f"on{made_on}")
    elif inversion.alphas_cumprod.shape != ac.shape or not torch.allclose(inversion.alphas_cumprod.to(ac), ac, rtol=1e-5, atol=1e-7):
        raise ValueError(f"this inversion was made with another noise schedule: regenerate it with the model it was made on{made_on}")
    if inversion.prediction_type != system.prediction_type:
        raise ValueError(f"this inversion was made for a {inversion.prediction_type} model, the system predicts "
                         f"{system.prediction_type}: use the model it was made on")
    cond = None
    if prompt is not None:
        cond, _ = _read_plan(system, prompt, "", inversion.num_steps)  # (the edit's own negative: none, the nulls')
    latents = sample_inversion(system.denoiser(), inversion, cond=cond, source_steps=source_steps, device=device,
                               progress=progress)
    return system.decode_latents(latents)


# ------------------------------------------------------------------------------------ files
def _flatten(prefix: str, cond: object, tensors: dict[str, Tensor]) -> str:
    """Put a condition's tensors under ``prefix`` / ``prefix.<key>``; return its layout as JSON."""
    if isinstance(cond, Tensor):
        tensors[prefix] = cond
        return json.dumps({"kind": "tensor"})
    layout = {"kind": "dict", "keys": [], "none": []}
    for key, value in cond.items():  # type: ignore[union-attr]
        if value is None:
            layout["none"].append(key)
        elif isinstance(value, Tensor):
            tensors[f"{prefix}.{key}"] = value
            layout["keys"].append(key)
        else:
            raise TypeError(f"condition entry {key!r} is a {type(value).__name__}; an inversion file holds tensors only")
    return json.dumps(layout)


def _unflatten(prefix: str, layout: str, tensors: Mapping[str, Tensor], file: Path) -> object:
    spec = json.loads(layout)
    try:
        if spec["kind"] == "tensor":
            return tensors[prefix]
        out: dict[str, Tensor | None] = {key: tensors[f"{prefix}.{key}"] for key in spec["keys"]}
        out.update({key: None for key in spec["none"]})
        return out
    except KeyError as exc:
        raise WeightFileError(f"{file}: inversion file lacks tensor {exc}; the file is damaged") from None


def save_inversion(path: str | os.PathLike, inversion: Inversion, *, metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``inversion`` as safetensors (float tensors as they are, strings-only metadata), atomically.

    DDIM (format ``sdadapt-inversion/1``): tensors ``x_T``, ``null_embeddings``, ``timesteps`` (int64),
    ``alphas_cumprod``, ``cond[.<key>]``, ``uncond[.<key>]``; metadata ``format``, ``method``, ``guidance``,
    ``embedding_key``, ``prediction_type``, ``spacing``, ``steps_offset``, ``prompt``, the conditions' layouts,
    ``inversion.info`` and ``metadata``. An EDM model's inversion (format ``sdadapt-inversion/2``): ``timesteps``
    the float32 σ, metadata ``edm`` (the schedule as JSON, its ``prediction_type`` included) instead of the DDPM
    ``alphas_cumprod`` / ``prediction_type`` / ``spacing`` / ``steps_offset``. With per-step values of other
    null-condition entries (:attr:`Inversion.null_extra`): format ``sdadapt-inversion/3`` (DDIM, or EDM when
    ``edm`` is there), tensors ``null_embeddings.<key>``, metadata ``null_keys`` (a JSON list). A prompt plan's
    inversion (:attr:`Inversion.cond_plan`): format ``sdadapt-inversion/4`` (with ``edm`` / ``null_keys`` where they
    apply), tensors ``cond_plan.<j>[.<key>]`` (its distinct conditions), metadata ``cond_plan`` (JSON: ``layouts``
    of those conditions, ``steps`` the ``[j, weight]`` ``AND`` parts of each sampling step).
    """
    edm = inversion.edm is not None
    extra = dict(inversion.null_extra)
    tensors: dict[str, Tensor] = {
        "x_T": inversion.x_T,
        "null_embeddings": inversion.null_embeddings,
        "timesteps": inversion.timesteps.float() if edm else inversion.timesteps.long(),
        **({} if edm else {"alphas_cumprod": inversion.alphas_cumprod}),
        **{f"null_embeddings.{key}": value for key, value in extra.items()},
    }
    ddpm = {} if edm else {"prediction_type": inversion.prediction_type, "spacing": inversion.spacing,
                           "steps_offset": str(int(inversion.steps_offset))}
    plan = {}
    if inversion.cond_plan is not None:
        layouts = [json.loads(_flatten(f"cond_plan.{j}", c, tensors)) for j, c in enumerate(inversion.cond_plan.conds)]
        steps = [[[j, w] for j, w in row] for row in inversion.cond_plan.steps]
        plan = {"cond_plan": json.dumps({"layouts": layouts, "steps": steps})}
    meta = {
        **{str(k): str(v) for k, v in inversion.info.items()},
        **dict(metadata or {}),
        "format": _FORMAT_PLAN if plan else (_FORMAT_ENTRIES if extra else (_FORMAT_EDM if edm else _FORMAT)),
        "method": inversion.method,
        "guidance": repr(float(inversion.guidance)),
        "embedding_key": "" if inversion.embedding_key is None else inversion.embedding_key,
        **ddpm,
        "prompt": inversion.prompt,
        "cond_layout": _flatten("cond", inversion.cond, tensors),
        "uncond_layout": _flatten("uncond", inversion.uncond, tensors),
        **({"edm": json.dumps(dataclasses.asdict(inversion.edm), sort_keys=True)} if edm else {}),
        **({"null_keys": json.dumps(list(extra))} if extra else {}),
        **plan,
    }
    return write_safetensors(path, tensors, meta)


_RESERVED = {"format", "method", "guidance", "embedding_key", "prediction_type", "spacing", "steps_offset", "prompt",
             "cond_layout", "uncond_layout", "edm", "null_keys", "cond_plan"}


def _file_edm(file: Path, meta: Mapping[str, str], timesteps: Tensor) -> EDMSchedule | None:
    """The EDM schedule of a ``sdadapt-inversion/2`` file (checked against its σ), ``None`` for /1 (and a /3 or /4
    file without ``edm``)."""
    if meta.get("format") == _FORMAT or (meta.get("format") in (_FORMAT_ENTRIES, _FORMAT_PLAN) and "edm" not in meta):
        return None
    try:
        schedule = EDMSchedule.from_config(json.loads(meta["edm"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightFileError(f"{file}: an EDM inversion file needs its 'edm' schedule metadata ({exc}); the file is "
                              "damaged") from None
    want = inversion_steps(timesteps.shape[0], edm=schedule).timesteps
    if timesteps.shape != want.shape or not torch.equal(timesteps.float().cpu(), want):
        raise WeightFileError(f"{file}: its σ timesteps are not the {timesteps.shape[0]}-step grid of its EDM schedule; "
                              "the file is damaged")
    return schedule


def load_inversion(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> Inversion:
    """Read a file written by :func:`save_inversion` (tensors on ``device``).

    Raises:
        WeightFileError: not an inversion file, or a damaged one (the message names the file).
    """
    file = Path(path)
    tensors, meta = read_safetensors(file)
    if meta.get("format") not in (_FORMAT, _FORMAT_EDM, _FORMAT_ENTRIES, _FORMAT_PLAN):
        raise WeightFileError(f"{file}: not an sdadapt inversion file (metadata format {meta.get('format')!r}); "
                              "write one with save_inversion / `python -m sdadapt invert`")
    missing = [k for k in ("x_T", "null_embeddings", "timesteps") if k not in tensors]
    if missing:
        raise WeightFileError(f"{file}: inversion file lacks {', '.join(missing)}; the file is damaged")
    tensors = {k: v.to(device) for k, v in tensors.items()}
    n = tensors["timesteps"].shape[0]
    if tensors["null_embeddings"].shape[0] != n:
        raise WeightFileError(f"{file}: {tensors['null_embeddings'].shape[0]} null embeddings for "
                              f"{n} timesteps; the file is damaged")
    edm = _file_edm(file, meta, tensors["timesteps"])
    try:
        guidance = float(meta["guidance"])
        # (an EDM file: no DDPM settings; those of the previous version's /2 files, written but unused, are ignored)
        steps_offset = int(meta["steps_offset"]) if edm is None else 1
        null_keys = (json.loads(meta.get("null_keys", "null")) if meta["format"] == _FORMAT_ENTRIES
                     else json.loads(meta.get("null_keys", "[]")) if meta["format"] == _FORMAT_PLAN else [])
    except (KeyError, ValueError) as exc:
        raise WeightFileError(f"{file}: bad inversion metadata ({exc})") from None
    if edm is None and "alphas_cumprod" not in tensors:
        raise WeightFileError(f"{file}: inversion file lacks alphas_cumprod; the file is damaged")
    if not isinstance(null_keys, list) or not all(isinstance(k, str) for k in null_keys) or \
            (meta["format"] == _FORMAT_ENTRIES and not null_keys):
        # (save_inversion writes /3 only with per-step values of other null entries, named in null_keys)
        found = "no 'null_keys' metadata" if "null_keys" not in meta else f"null_keys {meta['null_keys']!r}"
        raise WeightFileError(f"{file}: bad inversion metadata ({found}): a "
                              f"{_FORMAT_ENTRIES} file names its per-step null-condition entries in 'null_keys', a "
                              "non-empty JSON list (e.g. [\"text_embeds\"]); the file is damaged")
    null_extra = {}
    for key in null_keys:
        value = tensors.get(f"null_embeddings.{key}")
        if value is None or value.shape[:1] != (n,):
            raise WeightFileError(f"{file}: inversion file lacks tensor 'null_embeddings.{key}' with a row for each of "
                                  f"its {n} steps; the file is damaged")
        null_extra[key] = value
    cond_plan = _file_plan(file, meta, tensors, n) if meta["format"] == _FORMAT_PLAN else None
    return Inversion(
        method=meta.get("method", "null-text"),
        x_T=tensors["x_T"],
        null_embeddings=tensors["null_embeddings"],
        timesteps=tensors["timesteps"],
        cond=_unflatten("cond", meta.get("cond_layout", '{"kind": "tensor"}'), tensors, file),
        uncond=_unflatten("uncond", meta.get("uncond_layout", '{"kind": "tensor"}'), tensors, file),
        alphas_cumprod=tensors["alphas_cumprod"] if edm is None else torch.zeros(0, device=device),
        guidance=guidance,
        embedding_key=meta.get("embedding_key") or None,
        prediction_type=meta.get("prediction_type", "epsilon") if edm is None else edm.prediction_type,
        spacing=meta.get("spacing", "leading") if edm is None else "leading",
        steps_offset=steps_offset,
        prompt=meta.get("prompt", ""),
        info={k: v for k, v in meta.items() if k not in _RESERVED},
        edm=edm,
        null_extra=null_extra,
        cond_plan=cond_plan,
    )


def _file_plan(file: Path, meta: Mapping[str, str], tensors: Mapping[str, Tensor], n: int) -> ConditionPlan:
    """The :class:`~.core.ConditionPlan` of a ``sdadapt-inversion/4`` file (its ``cond_plan`` metadata and
    ``cond_plan.<j>`` tensors), checked: one row per step, each naming stored conditions."""
    damaged = (f"{file}: a {_FORMAT_PLAN} file keeps its prompt plan in 'cond_plan' metadata (JSON: 'layouts', one "
               f"per condition, and 'steps', {n} rows of [index, weight] parts) and cond_plan.<j> tensors")
    try:
        spec = json.loads(meta["cond_plan"])
        layouts, rows = spec["layouts"], spec["steps"]
        conds = tuple(_unflatten(f"cond_plan.{j}", json.dumps(layout), tensors, file) for j, layout in enumerate(layouts))
        steps = tuple(tuple((int(j), float(w)) for j, w in row) for row in rows)
        plan = ConditionPlan(conds, steps)
    except (KeyError, ValueError, TypeError) as exc:
        raise WeightFileError(f"{damaged} ({exc!r}); the file is damaged") from None
    if plan.num_steps != n:
        raise WeightFileError(f"{damaged}: its plan has {plan.num_steps} steps for {n} timesteps; the file is damaged")
    return plan
