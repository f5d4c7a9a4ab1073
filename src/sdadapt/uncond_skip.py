"""A1111's settings that skip the negative prompt's model pass on some calls: "Skip Early CFG" and "Negative Guidance
minimum sigma" (NGMS, with "NGMS all steps").

A1111 (v1.10, modules/sd_samplers_cfg_denoiser.py ``CFGDenoiser.forward``) decides on every guided call ``k``
(0-based, counted over the sampler run: ``CFGDenoiser.step``) of a run of ``total_steps`` expected calls
(``CFGDenoiser.total_steps``, :func:`sdadapt.sampler_tables.a1111_total_steps`)::

    skip_early_cond ≠ 0 and k / total_steps <= skip_early_cond          -> skip   ("Skip Early CFG")
    elif (k odd or s_min_uncond_all) and s_min_uncond > 0 and σ < s_min_uncond -> skip   ("NGMS", "NGMS all steps")

(σ: the call's noise level, ``sigma[0]`` in float32). On a skipped call the negative prompt is not run: its place is
taken by the first ``AND`` sub-prompt's output and the scale is 1, so the call's result is
``c_0 + Σ_j (c_j − c_0)·w_j`` — one sub-prompt: its output alone. The guidance classes take an :class:`UncondSkip`
(:class:`sdadapt.training.diffusion.Guided`, :class:`sdadapt.prompt_guidance.ScheduledGuidance`). NGMS needs each
call's σ: sdadapt has it where the samplers read x̂0 by branch (A1111's grids, :mod:`sdadapt.denoised_branches`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["NGMS_FIELD", "SKIP_EARLY_FIELD", "UncondSkip"]

#: A1111's infotext keys of the two rules (``p.extra_generation_params``)
SKIP_EARLY_FIELD = "Skip Early CFG"
NGMS_FIELD = "NGMS"


@dataclass(frozen=True)
class UncondSkip:
    """A1111's "Skip Early CFG" (``skip_early``, its ``skip_early_cond``: the fraction of the run's first calls that
    skip the negative prompt; 0 off) and "Negative Guidance minimum sigma" (``ngms``, its ``s_min_uncond``: odd calls
    below that σ skip it, every call with ``ngms_all_steps``; 0 off). ``seen(key)``: called with
    :data:`SKIP_EARLY_FIELD` or :data:`NGMS_FIELD` on every skipped call (A1111 writes the setting into the infotext
    when it skips).

    Raises:
        ValueError: ``skip_early`` outside [0, 1] or ``ngms`` negative (or not finite).
    """

    ngms: float = 0.0
    ngms_all_steps: bool = False
    skip_early: float = 0.0
    seen: Callable[[str], None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.skip_early) and 0.0 <= self.skip_early <= 1.0):
            raise ValueError(f"skip early CFG is a fraction of the run's model calls in [0, 1] (A1111's 'Skip Early "
                             f"CFG' setting; 0: off), got {self.skip_early}")
        if not (math.isfinite(self.ngms) and self.ngms >= 0.0):
            raise ValueError(f"NGMS is a noise level σ >= 0 (A1111's 'Negative Guidance minimum sigma'; 0: off), got "
                             f"{self.ngms}")

    @property
    def is_off(self) -> bool:
        """Whether no call can skip (both rules at 0)."""
        return self.skip_early == 0.0 and self.ngms == 0.0

    def skips(self, call: int, total_steps: int, sigma: float | Tensor | None) -> bool:
        """Whether guided call ``call`` (0-based) of a run of ``total_steps`` expected calls at noise level ``sigma``
        (a float, or a tensor whose first entry is the call's σ; ``None``: not known) skips the negative prompt (the
        module docstring); tells :attr:`seen` which rule did.

        Raises:
            ValueError: NGMS would need ``sigma`` and it is ``None`` (a sampler that reads no x̂0 by branch).
        """
        if self.skip_early != 0.0 and call / max(int(total_steps), 1) <= self.skip_early:
            return self._seen(SKIP_EARLY_FIELD)
        if (call % 2 or self.ngms_all_steps) and self.ngms > 0.0:
            if sigma is None:
                raise ValueError("NGMS (A1111's 'Negative Guidance minimum sigma') compares each model call's σ, "
                                 "which sdadapt reads on A1111's grids only: give the sampler a schedule "
                                 "(schedule='automatic' / --schedule automatic is A1111's default), or leave NGMS out")
            s = torch.as_tensor(sigma).detach().flatten()[0].to(torch.float32).cpu()
            if bool(s < torch.tensor(self.ngms, dtype=torch.float32)):  # (A1111: sigma[0] < s_min_uncond, float32)
                return self._seen(NGMS_FIELD)
        return False

    def _seen(self, key: str) -> bool:
        if self.seen is not None:
            self.seen(key)
        return True

    def fields(self, fired: set[str] | frozenset[str]) -> dict[str, object]:
        """A1111's infotext fields of the rules in ``fired`` (the keys :attr:`seen` got): ``Skip Early CFG: x``,
        ``NGMS: x`` (and ``NGMS all steps: True``), in A1111's order."""
        out: dict[str, object] = {}
        if SKIP_EARLY_FIELD in fired:
            out[SKIP_EARLY_FIELD] = float(self.skip_early)
        if NGMS_FIELD in fired:
            out[NGMS_FIELD] = float(self.ngms)
            if self.ngms_all_steps:
                out["NGMS all steps"] = True
        return out
