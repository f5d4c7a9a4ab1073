"""A1111's "Pad prompt/negative prompt" and its "(v0)": the prompt's and the negative prompt's text states brought to
one length so that one model call takes both (A1111 v1.10 modules/sd_samplers_cfg_denoiser.py ``pad_cond_uncond``,
``pad_cond_uncond_v0``; infotext "Pad conds: True" / "Pad conds v0: True").

A prompt of more than 75 tokens (or with ``BREAK``) has more 77-token chunks than a short negative prompt; A1111 then
runs the two in separate model calls (its default, as sdadapt) unless one of these settings is on:

* "Pad prompt/negative prompt": the shorter side gets whole copies of the model's states of the empty prompt
  (``cond_stage_model_empty_prompt``, (1, 77, D)) appended, ``(L_prompt − L_negative) // 77`` of them — the prompt's
  side (every ``AND`` sub-prompt) when the negative is longer;
* "(v0)" (A1111's DDIM padding before v1.6): the negative alone — its last token's states repeated up to the prompt's
  length, or cut to it.

Both change the image (the attention sees other keys), which is why A1111 writes them into the infotext. With
SDXL's conditionings only the cross-attention states are padded (the pooled vector and time ids stay).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["PAD_CONDS_FIELD", "PAD_CONDS_V0_FIELD", "CondPadding", "condition_states", "with_condition_states"]

#: A1111's infotext keys (``sd_samplers_common.add_infotext``)
PAD_CONDS_FIELD = "Pad conds"
PAD_CONDS_V0_FIELD = "Pad conds v0"


@dataclass(frozen=True)
class CondPadding:
    """A1111's "Pad prompt/negative prompt" (``v0=False``: pad the shorter side with ``empty``, the model's states of
    the empty prompt (1, 77, D); ``None``: the system that samples fills it in, :meth:`for_model`) or its "(v0)"
    (``v0=True``: the negative's last token repeated, or cut). ``seen(key)``: called with :data:`PAD_CONDS_FIELD` /
    :data:`PAD_CONDS_V0_FIELD` on every call it padded.

    Raises:
        ValueError: an ``empty`` that is not (1, L, D).
    """

    v0: bool = False
    empty: Tensor | None = None
    seen: Callable[[str], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.empty is not None and (self.empty.dim() != 3 or self.empty.shape[0] != 1):
            raise ValueError("A1111's 'Pad prompt/negative prompt' pads with the model's states of the empty prompt: "
                             f"give empty= as (1, 77, D), got {tuple(self.empty.shape)}")

    def for_model(self, empty_states: Callable[[], Tensor]) -> CondPadding:
        """This padding with ``empty`` from ``empty_states()`` (the sampling model's states of ``""``, (1, 77, D)) where
        it pads with them and has none yet; else itself."""
        if self.v0 or self.empty is not None:
            return self
        return CondPadding(v0=False, empty=empty_states(), seen=self.seen)

    def pad(self, conds: list[object], uncond: object) -> tuple[list[object], object]:
        """The sub-prompts' conditionings ``conds`` (each (B, L, D), or a dict with its states under ``"context"``;
        one length L, :func:`sdadapt.prompt_guidance.composed_guidance` makes it so) and the negative's ``uncond``
        (B, L', D) brought to one length as A1111 brings them; unchanged where L = L'."""
        length, other = condition_states(conds[0]).shape[1], condition_states(uncond).shape[1]
        if length == other:
            return conds, uncond
        if self.v0:
            states = condition_states(uncond)
            if other < length:
                states = torch.cat([states, states[:, -1:].repeat(1, length - other, 1)], dim=1)
            else:
                states = states[:, :length]
            self._seen(PAD_CONDS_V0_FIELD)
            return conds, with_condition_states(uncond, states)
        empty = self.empty  # (1, 77, D)
        if empty is None:
            raise ValueError("A1111's 'Pad prompt/negative prompt' pads with the model's states of the empty prompt: "
                             "give CondPadding(empty=...) ((1, 77, D)), or sample through a system, which fills it in")
        repeats = (length - other) // empty.shape[1]  # (A1111's floor division: whole chunks)
        if repeats < 0:
            conds = [with_condition_states(c, _padded(condition_states(c), -repeats, empty)) for c in conds]
        elif repeats > 0:
            uncond = with_condition_states(uncond, _padded(condition_states(uncond), repeats, empty))
        else:
            return conds, uncond
        self._seen(PAD_CONDS_FIELD)
        return conds, uncond

    def _seen(self, key: str) -> None:
        if self.seen is not None:
            self.seen(key)


def condition_states(cond: object) -> Tensor:
    """The text states (B, L, D) of a conditioning: the tensor, or an SDXL dict's ``"context"``."""
    return cond["context"] if isinstance(cond, dict) else cond


def with_condition_states(cond: object, states: Tensor) -> object:
    """``cond`` with its text states replaced by ``states`` (B, L', D) (an SDXL dict: its other entries kept)."""
    return {**cond, "context": states} if isinstance(cond, dict) else states


def _padded(states: Tensor, repeats: int, empty: Tensor) -> Tensor:
    """A1111's ``pad_cond``: ``states`` (B, L, D) with ``repeats`` copies of ``empty`` (1, 77, D) appended."""
    return torch.cat([states, empty.to(states).repeat(states.shape[0], repeats, 1)], dim=1)
