"""Sampling with A1111's prompt editing, alternation and ``AND``: conditionings switched per model call.

:func:`plan_prompt` reads a prompt and a negative prompt (:mod:`sdadapt.prompt_schedule`) into a
:class:`PromptPlan`: the distinct texts to encode (each once), and for every ``AND`` sub-prompt its
weight and which text each schedule entry uses. :meth:`PromptPlan.guidance` wraps a denoiser
``model(x, t, cond)`` over the encoded conditionings into :class:`ScheduledGuidance`, a denoiser that
ignores the ``cond`` the sampler passes and counts its calls as A1111's ``CFGDenoiser.step`` does:
call ``k`` uses each schedule's entry :func:`~sdadapt.prompt_schedule.schedule_index` ``(ends, k)``,
and the outputs combine as A1111's ``combine_denoised`` (composable diffusion)::

    out = u + Σ_i (c_i − u) · (w_i · s)        (B, C, H, W), u: the negative's output, c_i: sub-prompt i's

one sub-prompt of weight 1 is the ordinary ``u + s·(c − u)``
(:func:`sdadapt.training.diffusion.guidance_combine`), and with ``s = 1`` it is ``c`` alone (no
negative pass), as sdadapt's plain guidance. The combination is affine (its coefficients sum to 1), so
taking it over ε or v predictions equals A1111 taking it over the denoised latents up to float rounding; on
A1111's grids the samplers ask for it over x̂0 (:meth:`ScheduledGuidance.denoised_by_branch`,
:mod:`sdadapt.denoised_branches`), A1111's bits. Conditionings of
equal shapes run as one batch; others one call each. Sub-prompts of different lengths (``BREAK``
chunks) are padded to the longest of each call by repeating their last token's states, as A1111 pads
them; the negative prompt is not padded (A1111's default runs it on its own then).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .cond_padding import CondPadding, condition_states, with_condition_states
from .denoised_branches import (
    ReadDenoised,
    denoised_of,
    keep_negative,
    scaled_by,
    wants_negative,
)
from .dynamic_thresholding import (
    DynamicThresholding,
    check_dynamic_thresholding_guidance,
)
from .guidance_rescale import GuidanceRescale, as_guidance_rescale
from .prompt_schedule import composable_prompts, prompt_schedule, schedule_index
from .training.diffusion import _cat_conditions, guidance_combine
from .uncond_skip import UncondSkip

if TYPE_CHECKING:
    from .perturbed_attention import PerturbedAttentionGuidance
    from .self_attention_guidance import SelfAttentionGuidance

__all__ = ["PromptPlan", "ScheduledGuidance", "combine_composed", "composed_guidance", "composed_outputs", "plan_prompt",
           "reads_emphasis", "without_emphasis"]


@dataclass(frozen=True)
class _Schedule:
    ends: tuple[int, ...]  # A1111's end_at_step of each entry, rising
    texts: tuple[int, ...]  # index into the plan's texts of each entry

    def at(self, call: int) -> int:
        return self.texts[schedule_index(self.ends, call)]


@dataclass(frozen=True)
class PromptPlan:
    """A prompt and negative prompt in A1111 syntax, read for ``steps`` schedule steps.

    ``texts`` / ``negative_texts``: the distinct texts to encode; ``parts``: ``(schedule, weight)`` per
    ``AND`` sub-prompt; ``negative``: the negative prompt's schedule (no ``AND``: A1111 reads the
    negative prompt with ``get_learned_conditioning``, where ``AND`` is text)."""

    texts: tuple[str, ...]
    parts: tuple[tuple[_Schedule, float], ...]
    negative_texts: tuple[str, ...]
    negative: _Schedule

    @property
    def plain(self) -> bool:
        """True when the plan is one text of weight 1 and one negative text: ordinary guidance."""
        return len(self.texts) == 1 and len(self.parts) == 1 and self.parts[0][1] == 1.0 \
            and len(self.negative_texts) == 1

    def guidance(self, model: Callable[[Tensor, Tensor, object], Tensor], conds: Sequence[object],
                 negative_conds: Sequence[object], scale: float, *, uncond_skip: UncondSkip | None = None,
                 total_steps: int = 1, pad_conds: CondPadding | None = None,
                 guidance_rescale: float | GuidanceRescale = 0.0,
                 perturbed_attention: PerturbedAttentionGuidance | None = None,
                 self_attention_guidance: SelfAttentionGuidance | None = None,
                 dynamic_thresholding: DynamicThresholding | None = None) -> ScheduledGuidance:
        """The denoiser over ``conds`` (one per :attr:`texts`, what the system's conditioning returns
        for them, batch B) and ``negative_conds`` (one per :attr:`negative_texts`); ``uncond_skip`` over a run of
        ``total_steps`` expected calls: A1111's "Skip Early CFG" / NGMS (:mod:`sdadapt.uncond_skip`); ``pad_conds``:
        A1111's "Pad prompt/negative prompt" (:mod:`sdadapt.cond_padding`); ``guidance_rescale``: a
        :class:`sdadapt.guidance_rescale.GuidanceRescale` (or its φ) on each combination (0 off);
        ``perturbed_attention``: PAG (:class:`sdadapt.perturbed_attention.PerturbedAttentionGuidance`) on each call;
        ``self_attention_guidance``: SAG (:class:`sdadapt.self_attention_guidance.SelfAttentionGuidance`) likewise;
        ``dynamic_thresholding``: A1111's / Forge's CFG Scale Fix
        (:class:`sdadapt.dynamic_thresholding.DynamicThresholding`) in place of each combination on x̂0.

        Raises:
            ValueError: conditionings that do not match the plan's texts, or a ``guidance_rescale``,
                ``perturbed_attention`` or ``self_attention_guidance`` with ``AND`` sub-prompts (no tool defines them
                there), or a ``dynamic_thresholding`` with a ``guidance_rescale``.
        """
        if len(conds) != len(self.texts) or len(negative_conds) != len(self.negative_texts):
            raise ValueError(f"the plan has {len(self.texts)} texts and {len(self.negative_texts)} negative texts; "
                             f"got {len(conds)} and {len(negative_conds)} conditionings")
        _one_branch_to_rescale(as_guidance_rescale(guidance_rescale), len(self.parts))
        _one_branch_to_perturb(perturbed_attention, len(self.parts))
        _one_branch_to_perturb(self_attention_guidance, len(self.parts))
        check_dynamic_thresholding_guidance(dynamic_thresholding, rescale=as_guidance_rescale(guidance_rescale))
        return ScheduledGuidance(model, self, list(conds), list(negative_conds), float(scale),
                                 uncond_skip=uncond_skip, total_steps=total_steps, pad_conds=pad_conds,
                                 guidance_rescale=guidance_rescale, perturbed_attention=perturbed_attention,
                                 self_attention_guidance=self_attention_guidance,
                                 dynamic_thresholding=dynamic_thresholding)


def reads_emphasis(system: object) -> bool:
    """Whether ``system`` weighs A1111 emphasis itself (it has ``tokenize_weighted``, as
    :class:`~sdadapt.diffusers_system.DiffusersSystem`); one without it (the toy, a user's own model) gets each
    scheduled text through :func:`without_emphasis` — ``generate``'s rule, and the inversion's, so an inversion
    reconstructs the conditions ``generate`` samples."""
    return hasattr(system, "tokenize_weighted")


def without_emphasis(text: str) -> str:
    r"""``text`` with A1111 emphasis taken out, for a model that reads no prompt weights: ``"a (red:1.3) [cube]"``
    -> ``"a red cube"``, ``"a (cat: 1.2 )"`` -> ``"a cat"`` (A1111's pattern,
    :func:`sdadapt.prompt_weights.parse_prompt_attention` with ``a1111=True``), ``"\(red\)"`` -> ``"(red)"``
    (an escaped bracket is the literal bracket); ``text`` itself when it has none. ``plan_prompt(clean=)`` for such
    a model."""
    from .prompt_weights import parse_prompt_attention

    return "".join(piece for piece, _ in parse_prompt_attention(text, a1111=True))


def _schedule(prompt: str, steps: int, texts: dict[str, int], clean: Callable[[str], str],
              old_scheduling: bool, first_pass_steps: int | None) -> _Schedule:
    entries = prompt_schedule(prompt, steps, old_scheduling=old_scheduling, first_pass_steps=first_pass_steps)
    indices = tuple(texts.setdefault(clean(text), len(texts)) for _, text in entries)
    return _Schedule(tuple(end for end, _ in entries), indices)


def plan_prompt(prompt: str, negative: str = "", *, steps: int,
                clean: Callable[[str], str] | None = None, old_scheduling: bool = False,
                first_pass_steps: int | None = None) -> PromptPlan:
    """Read ``prompt`` (``AND``, prompt editing, alternation) and ``negative`` (prompt editing,
    alternation) for ``steps`` schedule steps (:func:`sdadapt.prompt_schedule.schedule_steps` of the
    sampler's steps). ``clean``: applied to every scheduled text before encoding (the toy's emphasis
    removal, :func:`without_emphasis`); texts equal after it are encoded once. ``old_scheduling``: A1111's "Use old prompt
    editing timelines" (:func:`sdadapt.prompt_schedule.prompt_schedule`). ``first_pass_steps``: the plan of a
    hires fix's second pass after a first pass of that many schedule steps (its timeline continues the first's).

    >>> plan = plan_prompt("a [cat:dog:2] AND a hat:0.5", steps=4)
    >>> plan.texts, [(s.ends, s.texts, w) for s, w in plan.parts]
    (('a cat', 'a dog', ' a hat'), [((2, 4), (0, 1), 1.0), ((4,), (2,), 0.5)])
    """
    clean = clean or (lambda text: text)
    texts: dict[str, int] = {}
    parts = tuple((_schedule(text, steps, texts, clean, old_scheduling, first_pass_steps), weight)
                  for text, weight in composable_prompts(prompt))
    negative_texts: dict[str, int] = {}
    negative_schedule = _schedule(negative, steps, negative_texts, clean, old_scheduling, first_pass_steps)
    return PromptPlan(tuple(texts), parts, tuple(negative_texts), negative_schedule)


def _batched(model: Callable, x: Tensor, t: Tensor, conds: list[object]) -> list[Tensor]:
    """``model`` at ``x`` (B, ...) under each of ``conds``: one call over the batch of all when they
    concatenate (equal shapes), else one call each."""
    both = reduce(lambda a, b: None if a is None else _cat_conditions(a, b), conds[1:], conds[0]) \
        if len(conds) > 1 else conds[0]
    if both is None:
        return [model(x, t, cond) for cond in conds]
    n = len(conds)
    out = model(torch.cat([x] * n), torch.cat([t] * n) if t.ndim else t, both)
    return list(out.chunk(n))


def _same_length(parts: list[tuple[object, float]]) -> list[tuple[object, float]]:
    """The sub-prompts' conditionings of one call padded to the longest by repeating their last token's
    states (A1111's ``reconstruct_multicond_batch``; lengths differ only with ``BREAK`` chunks)."""
    longest = max(condition_states(cond).shape[1] for cond, _ in parts)
    out = []
    for cond, weight in parts:
        states = condition_states(cond)  # (B, L, D)
        if states.shape[1] < longest:
            states = torch.cat([states, states[:, -1:].expand(-1, longest - states.shape[1], -1)], dim=1)
            cond = with_condition_states(cond, states)
        out.append((cond, weight))
    return out


class ScheduledGuidance:
    """A denoiser ``(x, t, _cond) -> prediction`` that picks each call's conditionings from a
    :class:`PromptPlan` by its call count (module docstring). ``calls``: model calls so far. ``uncond_skip``: A1111's
    "Skip Early CFG" / NGMS over a run of ``total_steps`` expected calls (:mod:`sdadapt.uncond_skip`); ``pad_conds``:
    A1111's "Pad prompt/negative prompt" (:mod:`sdadapt.cond_padding`); ``guidance_rescale``: a
    :class:`sdadapt.guidance_rescale.GuidanceRescale` (or its φ; :func:`composed_guidance`); ``perturbed_attention``:
    PAG (:class:`sdadapt.perturbed_attention.PerturbedAttentionGuidance`; :func:`composed_guidance`);
    ``self_attention_guidance``: SAG (:class:`sdadapt.self_attention_guidance.SelfAttentionGuidance`);
    ``dynamic_thresholding``: CFG Scale Fix (:class:`sdadapt.dynamic_thresholding.DynamicThresholding`, its schedules
    over the calls of ``total_steps``)."""

    def __init__(self, model: Callable[[Tensor, Tensor, object], Tensor], plan: PromptPlan, conds: list[object],
                 negative_conds: list[object], scale: float, *, uncond_skip: UncondSkip | None = None,
                 total_steps: int = 1, pad_conds: CondPadding | None = None,
                 guidance_rescale: float | GuidanceRescale = 0.0,
                 perturbed_attention: PerturbedAttentionGuidance | None = None,
                 self_attention_guidance: SelfAttentionGuidance | None = None,
                 dynamic_thresholding: DynamicThresholding | None = None) -> None:
        self.model, self.plan, self.conds, self.negative_conds, self.scale = model, plan, conds, negative_conds, scale
        self.uncond_skip, self.total_steps, self.pad_conds, self.calls = uncond_skip, total_steps, pad_conds, 0
        self.guidance_rescale = as_guidance_rescale(guidance_rescale)
        self.perturbed_attention, self.self_attention_guidance = perturbed_attention, self_attention_guidance
        self.dynamic_thresholding = dynamic_thresholding

    def __call__(self, x: Tensor, t: Tensor, _cond: object = None) -> Tensor:
        return self._call(x, t, None, None)

    def denoised_by_branch(self, read: ReadDenoised, x: Tensor, t: Tensor, _cond: object = None, *,
                           sigma: float | Tensor) -> Tensor:
        """x̂0 (B, C, H, W) of the call: each output read by ``read``, combined on x̂0 (A1111's ``combine_denoised``,
        :mod:`sdadapt.denoised_branches`)."""
        return self._call(x, t, read, sigma)

    def _call(self, x: Tensor, t: Tensor, read: ReadDenoised | None, sigma: float | Tensor | None) -> Tensor:
        call, self.calls = self.calls, self.calls + 1
        parts = [(self.conds[schedule.at(call)], weight) for schedule, weight in self.plan.parts]
        skip = self.uncond_skip is not None and self.uncond_skip.skips(call, self.total_steps, sigma)
        return composed_guidance(self.model, x, t, parts, self.negative_conds[self.plan.negative.at(call)], self.scale,
                                 read=read, sigma=sigma, skip_uncond=skip, pad_conds=self.pad_conds,
                                 guidance_rescale=self.guidance_rescale, perturbed_attention=self.perturbed_attention,
                                 self_attention_guidance=self.self_attention_guidance,
                                 dynamic_thresholding=self.dynamic_thresholding, call=call,
                                 total_steps=self.total_steps)


def _one_branch_to_rescale(rescale: GuidanceRescale | None, parts: int) -> None:
    """Refuse a guidance rescale over ``parts`` > 1 ``AND`` sub-prompts (:meth:`PromptPlan.guidance`)."""
    if rescale is not None and parts > 1:
        raise ValueError(f"guidance rescale brings the guided result to the conditional branch's spread; this prompt "
                         f"has {parts} AND sub-prompts, which no tool defines it for (diffusers has no AND; A1111's "
                         "'CFG Rescale' extension keeps the last sub-prompt's alone): leave out the rescale or the AND")


def _one_branch_to_perturb(term: object | None, parts: int) -> None:
    """Refuse perturbed-attention or self-attention guidance over ``parts`` > 1 ``AND`` sub-prompts."""
    if term is not None and parts > 1:
        what = "perturbed-attention" if type(term).__name__.startswith("Perturbed") else "self-attention"
        raise ValueError(f"{what} guidance degrades one branch of each call; this prompt has {parts} AND "
                         "sub-prompts, which no tool defines it for (diffusers has no AND): leave it out or the AND")


def combine_composed(out_uncond: Tensor, outs: Sequence[tuple[Tensor, float]], scale: float) -> Tensor:
    """A1111's ``combine_denoised`` over model outputs (B, C, H, W): ``u + Σ_i (c_i − u)·(w_i·s)`` in its order;
    one sub-prompt of weight 1 is :func:`~sdadapt.training.diffusion.guidance_combine` ``u + s·(c − u)``.
    ``outs``: ``(c_i, w_i)`` per ``AND`` sub-prompt. Differentiable in every output."""
    if len(outs) == 1 and outs[0][1] == 1.0:
        return guidance_combine(out_uncond, outs[0][0], scale)
    out = out_uncond.clone()
    for out_c, weight in outs:  # A1111's combine_denoised, in its order
        out = out + (out_c - out_uncond) * (weight * scale)
    return out


def composed_outputs(model: Callable[[Tensor, Tensor, object], Tensor], x: Tensor, t: Tensor,
                     parts: Sequence[tuple[object, float]]) -> list[tuple[Tensor, float]]:
    """``(model output (B, C, H, W), weight)`` of each ``AND`` sub-prompt ``(cond, weight)`` at ``x``: padded to one
    length as A1111 pads them, one batch where they concatenate (:class:`ScheduledGuidance`'s calls, without the
    negative)."""
    parts = _same_length(list(parts))
    outs = _batched(model, x, t, [cond for cond, _ in parts])
    return [(out, weight) for out, (_, weight) in zip(outs, parts)]


def composed_guidance(model: Callable[[Tensor, Tensor, object], Tensor], x: Tensor, t: Tensor,
                      parts: Sequence[tuple[object, float]], uncond: object, scale: float, *,
                      read: ReadDenoised | None = None, sigma: float | Tensor | None = None,
                      skip_uncond: bool = False, pad_conds: CondPadding | None = None,
                      guidance_rescale: float | GuidanceRescale | None = None,
                      perturbed_attention: PerturbedAttentionGuidance | None = None,
                      self_attention_guidance: SelfAttentionGuidance | None = None,
                      dynamic_thresholding: DynamicThresholding | None = None, call: int = 0,
                      total_steps: int = 1) -> Tensor:
    """One guided model call of a prompt plan (B, C, H, W): the ``AND`` sub-prompts ``parts`` (``(cond, weight)``)
    and the negative's ``uncond`` at ``x`` (one batch where they concatenate; sub-prompts padded to one length), then
    :func:`combine_composed`. One sub-prompt of weight 1 at scale 1 is the conditional output alone (no negative
    pass). What :class:`ScheduledGuidance` runs at each call, given that call's conditions. ``read``: each output
    read to x̂0 by it first, so the combination runs on x̂0 (:mod:`sdadapt.denoised_branches`; ``sigma``: the call's
    σ; a :class:`~sdadapt.denoised_branches.ReadKeepingNegative` keeps the negative's read output and scales
    ``scale``, and the negative then runs at scale 1 too). ``skip_uncond``: no negative pass — the first
    sub-prompt's output in its place and scale 1, A1111's skipped call (:mod:`sdadapt.uncond_skip`). ``pad_conds``: the sub-prompts and the negative brought to one length first,
    as A1111 pads them whether or not the negative runs (:mod:`sdadapt.cond_padding`). ``guidance_rescale``: a
    :class:`sdadapt.guidance_rescale.GuidanceRescale` (or its φ) on a combination of one sub-prompt, toward its output
    (read, with ``read``: at ``x`` and ``sigma``); a skipped call (no negative) is not rescaled, as the tools run no
    guidance then. ``perturbed_attention``: PAG's term added (:class:`sdadapt.training.diffusion.Guided`'s rule: on the
    outputs before the rescale, on x̂0 after it), the perturbed branch batched with the others where they concatenate.
    ``self_attention_guidance``: SAG's term added after PAG's, from the first branch (the negative's; the prompt's in a
    call without it). ``dynamic_thresholding``: CFG Scale Fix
    (:class:`sdadapt.dynamic_thresholding.DynamicThresholding`) in place of the combination on x̂0 (a ``read`` needed),
    the skipped call's at scale 1 too, its schedules at call ``call`` of ``total_steps``; the negative runs at scale 1
    too, as in A1111.

    Raises:
        ValueError: a ``guidance_rescale`` or ``perturbed_attention`` with more than one ``AND`` sub-prompt
            (:meth:`PromptPlan.guidance`), a ``dynamic_thresholding`` with a ``guidance_rescale`` or without a
            ``read``.
    """
    rescale, pag, sag = as_guidance_rescale(guidance_rescale), perturbed_attention, self_attention_guidance
    dt = dynamic_thresholding
    check_dynamic_thresholding_guidance(dt, rescale=rescale, by_branch=read is not None)
    _one_branch_to_rescale(rescale, len(parts))
    _one_branch_to_perturb(pag, len(parts))
    _one_branch_to_perturb(sag, len(parts))
    parts = _same_length(list(parts))
    if pad_conds is not None:
        conds, uncond = pad_conds.pad([cond for cond, _ in parts], uncond)
        parts = [(cond, weight) for cond, (_, weight) in zip(conds, parts)]
    alone = len(parts) == 1 and parts[0][1] == 1.0 and (
        skip_uncond or scale == 1.0 and not wants_negative(read) and dt is None)
    if alone and pag is None and sag is None:
        return model(x, t, parts[0][0]) if read is None else denoised_of(model, read, x, t, parts[0][0],
                                                                         sigma=sigma)  # (one pass: the prompt's)
    conds = [*([] if skip_uncond or alone else [uncond]), *(cond for cond, _ in parts)]

    def run() -> list[Tensor]:
        return _batched(model, x, t, conds) if pag is None else pag.branch_outputs(
            model, x, t, conds, plain=lambda given: _batched(model, x, t, given))

    raw, mask = (run(), None) if sag is None else sag.outputs(run, x.shape[0])
    outs = list(raw) if read is None else [read(out) for out in raw]
    perturbed = outs.pop() if pag is not None else None

    first_cond, first_raw, first = conds[0], raw[0], outs[0]  # (the branch SAG degrades: the negative, else the prompt)

    def sag_term() -> Tensor:
        if read is None:
            return sag.term_on_outputs(model, x, t, first_cond, first_raw, mask)
        return sag.term_on_denoised(model, read, x, t, first_cond, first, mask, sigma=sigma)

    if alone:  # (without the negative: the prompt's output, PAG's and SAG's terms)
        out = outs[0] if pag is None else pag.guide(outs[0], outs[0], perturbed, t)
        return out if sag is None else out + sag_term()
    keep_negative(read, outs[0])  # (the negative's, or A1111's stand-in for it: the first sub-prompt's)
    frac = 0.0 if dt is None else dt.frac(call=call, total_steps=total_steps, t=t)

    def combine(out_u: Tensor, outs_w: list[tuple[Tensor, float]], s: float) -> Tensor:
        return combine_composed(out_u, outs_w, s) if dt is None else dt.combine(out_u, outs_w, s, frac=frac)

    if skip_uncond:  # (A1111: the first sub-prompt's output as the negative's, at scale 1)
        combined = combine(outs[0], [(out, weight) for out, (_, weight) in zip(outs, parts)], 1.0)
        combined = combined if pag is None else pag.guide(combined, outs[-1], perturbed, t)
        return combined if sag is None else combined + sag_term()
    out_u, *outs = outs
    combined = combine(out_u, [(out, weight) for out, (_, weight) in zip(outs, parts)], scaled_by(read, scale))
    if read is None:  # (diffusers' order: PAG, SAG, then the rescale of the whole)
        combined = combined if pag is None else pag.guide(combined, outs[0], perturbed, t)
        combined = combined if sag is None else combined + sag_term()
    if rescale is not None:
        combined = rescale.rescale(combined, outs[0], **({} if read is None else {"x_in": x, "sigma": sigma}))
    if read is not None:  # (ComfyUI's order: the rescale (its CFG function), then PAG and SAG (post-CFG))
        combined = combined if pag is None else pag.guide(combined, outs[0], perturbed, t)
        combined = combined if sag is None else combined + sag_term()
    return combined
