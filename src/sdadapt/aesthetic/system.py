"""Aesthetic gradients on a whole :class:`~sdadapt.methods.system.System`: conditioning and sampling.

The personalisation needs the *generator's* text encoder to have a text embedding in the same
space as the image embedding. In SD1 the generator's encoder is CLIP-L's text tower, and CLIP's
``text_projection`` (from the full CLIP model, not in SD checkpoints) maps its pooled output
there: pass it as ``projection``. The toy system's generator encoder was trained with the UNet,
not contrastively, so it has no such projection; :func:`toy_text_projection` fits one — the
least-squares linear map from the generator encoder's pooled output to the toy judge CLIP's text
embedding over held-in toy prompts — which plays the role of CLIP's ``text_projection``.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn

from ..errors import InputError
from .personalize import personalize_text_encoder

__all__ = ["toy_text_projection", "aesthetic_conditioning", "aesthetic_sample", "system_projection"]


def _toy_prompts() -> list[str]:
    """Held-in captions of the toy grammar (:func:`sdadapt.toy.shapes.caption`): every colour (and
    none) × shape × the eight patterns of optional size/position/background, their values cycled,
    plus the judge's short forms ``"a {colour} shape"`` — 286 prompts."""
    from ..toy.shapes import (
        BACKGROUNDS,
        COLOURS,
        HELD_OUT_COLOURS,
        HELD_OUT_SHAPES,
        POSITIONS,
        SHAPES,
        SIZES,
    )

    colours = [None] + [c for c in COLOURS if c not in HELD_OUT_COLOURS]
    shapes = [s for s in SHAPES if s not in HELD_OUT_SHAPES]
    sizes, positions, backgrounds = itertools.cycle(SIZES), itertools.cycle(POSITIONS), itertools.cycle(BACKGROUNDS)
    prompts = []
    for colour, shape, (with_size, with_position, with_background) in itertools.product(
        colours, shapes, itertools.product((False, True), repeat=3)
    ):
        words = ["a"] + ([next(sizes)] if with_size else []) + ([colour] if colour else []) + [shape]
        if with_position:
            position = next(positions)
            words += ["in", "the", "center"] if position == "center" else ["on", "the", position]
        if with_background:
            words += ["on", "a", next(backgrounds), "background"]
        prompts.append(" ".join(words))
    return prompts + [f"a {c} shape" for c in colours if c]


@torch.no_grad()
def toy_text_projection(system, *, ridge: float = 1e-2) -> Tensor:
    """The toy analogue of CLIP's ``text_projection``: ``P`` (E, D) minimising
    ``Σ ‖P·pooled(x) − clip_text(x)‖² + ridge·‖P‖²`` over held-in toy prompts ``x``.

    ``pooled`` is the generator text encoder's pooled output (D = 64), ``clip_text`` the judge
    CLIP's unit text embedding (E = 64). Deterministic; a few milliseconds.
    """
    prompts = _toy_prompts()
    ids = system.tokenize(prompts)
    pooled = system.text_encoder(ids)[1].double()  # (N, D)
    target = system.clip.encode_text(ids).double()  # (N, E)
    gram = pooled.T @ pooled + ridge * torch.eye(pooled.shape[1], dtype=torch.float64, device=pooled.device)  # (D, D)
    weight = torch.linalg.solve(gram, pooled.T @ target).T  # (E, D)
    return weight.to(next(system.text_encoder.parameters()).dtype)


def system_projection(system) -> Tensor | nn.Module | None:
    """The projection a system's text encoder needs for aesthetic gradients: the fitted
    :func:`toy_text_projection` for the toy system, ``None`` for one whose encoder projects itself."""
    from ..toy.system import ToySystem

    if isinstance(system, ToySystem):
        return toy_text_projection(system)
    return None


def aesthetic_conditioning(system, prompts: list[str], embedding: Tensor, *, projection: Tensor | nn.Module | None = None,
                           aesthetic_steps: int = 5, lr: float = 1e-4, weight: float = 0.9, slerp: bool = False,
                           text: str | None = None, text_angle: float = 0.1, text_negative: bool = False) -> object:
    """``system.condition`` of ``prompts`` with the text states personalised toward ``embedding``,
    one personalisation per prompt (:func:`~sdadapt.aesthetic.personalize_text_encoder`).

    ``projection`` defaults to :func:`system_projection` (fitted for the toy system). The
    conditioning's text states are ``cond["context"]`` (toy) or ``cond`` itself (SD1/SD2); the
    system's ``clip_skip`` is honoured. ``text``: A1111's "aesthetic text" (the target turned by
    ``text_angle`` toward the phrase's CLIP text features, away with ``text_negative``).

    Raises:
        ValueError: an SDXL system (two text encoders; the original method is SD1-only), or a
            system whose encoder has no projection into the embedding's space and none was given.
    """
    if getattr(system, "text_encoder_2", None) is not None:
        raise InputError("aesthetic gradients personalise one CLIP text encoder (SD1/SD2, the toy model); "
                         "SDXL's two encoders are not supported (neither does the original method)")
    if projection is None:
        projection = system_projection(system)
    clip_skip = int(getattr(system, "clip_skip", 1))
    text_ids = system.tokenize([text]) if text else None
    eos_id = _eos_id(system)
    parts = []
    for prompt in prompts:
        if hasattr(system, "emphasised_prompt"):  # (A1111: the base z emphasised, the personalisation on the ids the
            ids, cond = system.emphasised_prompt(prompt)  # emphasis leaves; the extension's hook gets both so)
        else:
            ids = system.tokenize([prompt])
            cond = system.condition(ids)
        context = cond["context"] if isinstance(cond, dict) else cond
        personal = personalize_text_encoder(system.text_encoder, ids, embedding, steps=aesthetic_steps, lr=lr, weight=weight,
                                            slerp=slerp, projection=projection, clip_skip=clip_skip, base=context,
                                            text_ids=text_ids, text_angle=text_angle, text_negative=text_negative,
                                            eos_id=eos_id)
        parts.append({**cond, "context": personal} if isinstance(cond, dict) else personal)
    if isinstance(parts[0], dict):
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
    return torch.cat(parts)


def _eos_id(system) -> int | None:
    """The ``<eos>`` id of a system's (transformers or sdadapt) CLIP tokenizer, or ``None`` (the toy: its encoder
    knows its own)."""
    from ..clip_tokenizer import CLIPTokenizer, special_token_ids

    tokenizer = getattr(system, "tokenizer", None)
    if not isinstance(tokenizer, CLIPTokenizer) and getattr(tokenizer, "eos_token_id", None) is None:
        return None
    return special_token_ids(tokenizer)[1]


def aesthetic_sample(system, prompts: list[str], embedding: Tensor, *, projection: Tensor | nn.Module | None = None,
                     aesthetic_steps: int = 5, lr: float = 1e-4, weight: float = 0.9, slerp: bool = False,
                     text: str | None = None, text_angle: float = 0.1, text_negative: bool = False,
                     seed: int = 0, steps: int = 25, guidance: float | None = None, negative: str = "",
                     sampler: str = "ddim", karras: bool = False, height: int | None = None,
                     width: int | None = None, schedule: str | None = None, info: dict | None = None) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] for ``prompts`` with aesthetic gradients (``generate --aesthetic``).

    The prompts' conditioning is :func:`aesthetic_conditioning`, passed to
    :func:`sdadapt.sampling.generate` as ``cond=`` (the one sampling path ``generate`` uses); the
    negative/unconditional branch uses the unmodified encoder (as the original does for the
    empty prompt). ``steps``, ``guidance``, ``sampler``, ``karras``, ``height``/``width``,
    ``schedule`` (A1111's "Schedule type") and ``info`` (``dpm_adaptive``'s report) are
    :func:`sdadapt.sampling.generate`'s (``guidance`` default: the system's own default). With
    ``weight=0`` (or ``aesthetic_steps=0``) the images equal plain ``generate`` bit for bit.

    Raises:
        TypeError: ``system.sample`` takes no ``cond=`` override (the toy and Stable Diffusion systems do).
        ValueError: an unknown sampler or ``schedule``, or one the sampler does not take (before the
            text encoder is personalised).
    """
    from .. import samplers
    from ..sampling import generate

    samplers.resolve_schedule(samplers.canonical_sampler(sampler), schedule, karras)  # (refused before the work)

    cond = aesthetic_conditioning(system, prompts, embedding, projection=projection, aesthetic_steps=aesthetic_steps,
                                  lr=lr, weight=weight, slerp=slerp, text=text, text_angle=text_angle,
                                  text_negative=text_negative)
    return generate(system, prompts, negative=negative, seed=seed, steps=steps, guidance=guidance, sampler=sampler,
                    karras=karras, height=height, width=width, cond=cond, schedule=schedule, info=info)
