"""``generate``'s LoRA Block Weight step range: ``<lora:NAME:M:start=N>``, ``stop=N``, ``step=A-B`` — the tag's
UNet part merged only for the sampler model calls the extension has it on.

hako-mikan's *sd-webui-lora-block-weight* (``scripts/lora_block_weight.py``) reads the options in ``loradealer``
(``start=`` / ``stop=`` by ``syntaxdealer``; ``step=A-B`` by ``stepsdealer``: ``A`` is the start, ``B`` the stop,
a ``step=`` without ``-`` is ignored; each ``int()``-ed) and switches the network's multipliers in
``denoiser_callback`` (A1111's ``on_cfg_denoiser``: before every model call of ``CFGDenoiser.forward``), by
``params.sampling_step`` — A1111's ``state.sampling_step``: 0 when the sampler starts (``launch_sampling``), then
``i`` from the k-diffusion callback of step ``i``, which comes right after that step's first model call
(``KDiffusionSampler.callback_state``). So a model call of step ``i`` sees ``i`` if it is not the step's first call
(Heun, DPM2, DPM++ 2S a, DPM++ SDE's second call), else ``max(i − 1, 0)`` (:func:`a1111_sampling_step`). That
holds for k-diffusion's DPM fast too (``DPMSolver.dpm_solver_fast`` calls ``info_callback`` with ``i`` right after
the ``eps`` call that opens step ``i``, before its order − 1 other calls) and for A1111's Restart
(``restart_sampler``'s ``heun_step`` calls back with ``step_id`` after its first call; every Heun step counts, the
restart segments' too). k-diffusion's DPM adaptive calls back after *all* the calls of a try, with
``i = info['steps'] − 1`` (tries, rejected ones too), so every call of try ``k`` sees ``max(k − 1, 0)``
(:data:`END_REPORTING_SAMPLERS`; ``steps_done`` counts tries there: :func:`sdadapt.samplers.sample_latents`). The
extension's rule (A1111's own path, ``elif self.active``), per model call, ``c`` its ``sampling_step``::

    start pending and c == 0:  off          (the tag's te / unet multipliers set to 0)
    start pending and c > start − 2:  on, start done
    stop pending and c > stop − 2:  off, stop done

so each switch is sticky and the later one wins (:func:`unet_on`): on a one-call sampler ``start=N`` (N ≥ 2) leaves
the LoRA out of the first N steps (``start=0`` and ``start=1``: on from the first step) and ``stop=N`` (N ≥ 2) keeps it
for the first N steps only (``stop=0`` and ``stop=1``: never on). A pass counts from 0 (img2img's shortened schedule
too). A1111's UniPC (``sd_samplers_timesteps_impl.UniPCCFG``) calls the model once before its first step and reports
each step after the next step's corrector call, so its k-th model call sees ``max(k − 2, 0)``
(:data:`LATE_REPORTING_SAMPLERS`); sdadapt's ``unipc`` (diffusers' UniPC, one call per step at the same grid points)
is counted so. ``unipc_a1111`` is A1111's UniPC itself, its calls and callbacks made as A1111's: the plain rule
counts it so already.

The hires pass (A1111's ``sample_hr_pass``): the extension's ``starts`` / ``stops`` are filled once per batch
(A1111 ≥ 1.5, the built-in ``networks``: ``after_extra_networks_activate``, which ``sample_hr_pass`` does not
call; before: ``process_batch`` → ``loradealer``) and a switch is deleted when it fires, so the first pass spends them; before the
hires sampler A1111 activates the networks again (``extra_networks.activate(p, hr_extra_network_data)``:
``load_networks`` sets every tag's multipliers back to the tag's) and ``launch_sampling`` sets the counter back to 0.
So the hires pass has every tag's UNet part on from its first call, but for a switch the first pass did not reach: a
start still pending keeps the part off until the hires counter passes it, a stop still pending turns it off there
(:meth:`StepSwitchedLoRAs.next_pass`: each tag's range less its spent switches).

The text encoders keep the tag's multiplier: A1111 encodes the prompts (every prompt-editing text) before the
sampler starts, when the multiplier is still the tag's, so only the UNet part is switched. sdadapt merges into the
weights (the extension changes multipliers that A1111's ``network_apply_weights`` reads): the UNet part is merged at
the first call it is on and undone (:meth:`sdadapt.apply.AppliedDelta.undo`: the bits before) at the first call it is
off, and undone when the pass ends; a part that is on for no call is never merged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from ..a1111_sampling_step import (
    END_REPORTING_SAMPLERS,
    LATE_REPORTING_SAMPLERS,
    a1111_sampling_step,
)
from ..errors import InputError

if TYPE_CHECKING:
    from ..prompt_schedule import ExtraNetworkTag

__all__ = ["END_REPORTING_SAMPLERS", "LATE_REPORTING_SAMPLERS", "UNSTEPPED_SAMPLERS", "StepRange",
           "StepSwitchedLoRAs", "a1111_sampling_step", "check_step_range_sampler", "spent", "tag_step_range", "unet_on"]

#: samplers on which the extension's counter is undefined, so step ranges are refused: kohya's ``pndm`` (diffusers'
#: PNDM: three Runge-Kutta warm-up steps of four model calls, then one call a step) has no A1111 counterpart — A1111's
#: PLMS (``sd_samplers_timesteps_impl.plms``) is another method (one two-call first step, no warm-up), so there is no
#: A1111 ``state.sampling_step`` to follow
UNSTEPPED_SAMPLERS = frozenset({"pndm"})

@dataclass(frozen=True)
class StepRange:
    """A tag's ``start`` / ``stop`` as the extension reads them (``None``: not given)."""

    start: int | None = None
    stop: int | None = None


def _integer(tag: ExtraNetworkTag, option: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise InputError(f"prompt tag {tag.text}: {option}{text} is not a whole number of steps (the extension "
                         "int()s it); write e.g. start=5") from None


def tag_step_range(tag: ExtraNetworkTag) -> StepRange | None:
    """The ``start=`` / ``stop=`` / ``step=A-B`` of a ``<lora:>`` tag (``None``: none given); ``step=A-B`` takes the
    place of both (the extension's ``stepsdealer``).

    Raises:
        InputError: a value that is not a whole number, or a ``step=`` that is not ``A-B`` (the extension ignores
            one without ``-`` and fails on more than one), naming the tag.
    """
    start, stop = tag.named.get("start"), tag.named.get("stop")
    step = tag.named.get("step")
    if step is not None:
        parts = step.split("-")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise InputError(f"prompt tag {tag.text}: step={step} is not a range of steps; write step=A-B (the "
                             "LoRA from step A until step B), or start=A / stop=B")
        start, stop = parts
    if start is None and stop is None:
        return None
    return StepRange(None if start is None else _integer(tag, "start=", start),
                     None if stop is None else _integer(tag, "stop=", stop))


def unet_on(step_range: StepRange, sampling_step: int) -> bool:
    """Whether the extension has the tag's network on at a model call that sees ``sampling_step`` (module
    docstring): each option switches at the first call with ``sampling_step > N − 2`` (i.e. at ``max(N − 1, 0)``:
    ``sampling_step`` starts at 0 and never falls), the later switch wins, a stop at the same call as the start
    wins (it runs after it); before both, a pending start has it off."""
    start, stop = step_range.start, step_range.stop
    at_start = None if start is None else max(start - 1, 0)
    at_stop = None if stop is None else max(stop - 1, 0)
    started = at_start is not None and sampling_step >= at_start
    stopped = at_stop is not None and sampling_step >= at_stop
    if started and stopped:
        return at_start > at_stop
    if stopped:
        return False
    return started or start is None


def spent(step_range: StepRange, sampling_steps: Sequence[int]) -> StepRange:
    """``step_range`` less the switches a pass whose model calls saw ``sampling_steps`` fired (the extension deletes
    a start / stop when it fires, at the first call with ``sampling_step > N − 2``): what is left for the hires pass,
    which starts with the network on (``StepRange()``: on for every call)."""
    reached = max(sampling_steps, default=None)

    def left(option: int | None) -> int | None:
        return None if option is None or (reached is not None and reached >= max(option - 1, 0)) else option

    return StepRange(left(step_range.start), left(step_range.stop))


def check_step_range_sampler(sampler: str, tag: str) -> None:
    """Refuse a step range on a sampler of :data:`UNSTEPPED_SAMPLERS` (``sampler``: canonical name).

    Raises:
        InputError: naming the tag, the sampler and what to do.
    """
    if sampler in UNSTEPPED_SAMPLERS:
        raise InputError(f"prompt tag {tag}: start= / stop= / step= count A1111's sampling steps, and A1111 has no "
                         f"{sampler} sampler (diffusers' PNDM: Runge-Kutta warm-up steps of four model calls; A1111's "
                         "PLMS is another method), so the extension's step counter is undefined for it; use another "
                         "sampler (e.g. ddim or euler), or leave the step range out")


class StepSwitchedLoRAs:
    """``before_model_call(steps_done, calls)`` (:func:`sdadapt.samplers.sample_latents`) that merges each tag's
    UNet part for the model calls it is on.

    ``parts``: per tag, its :class:`StepRange` and its UNet groups ``[(module, state, scale)]``
    (:func:`sdadapt.jobs.generate_lbw.lbw_groups`). ``sampler``: the pass's sampler (canonical name; the counter of
    :func:`a1111_sampling_step`). When the set that is on changes, every merged part is undone in reverse order and
    the new set merged in tag order, so an undo always restores the bits its merge saw. :meth:`next_pass`: the hires
    pass (module docstring); :meth:`release` undoes them all and starts the next image's first pass (at the end of
    each image, also after an error).
    """

    def __init__(self, parts: Sequence[tuple[StepRange, Sequence[tuple[nn.Module, Mapping[str, Tensor], float]]]],
                 *, sampler: str | None = None) -> None:
        self.parts = [(step_range, list(groups)) for step_range, groups in parts]
        self.sampler = sampler
        self._first = (list(self.parts), sampler)
        self._seen: list[int] = []  # (the counter at each model call of this pass)
        self._on: tuple[int, ...] = ()
        self._handles: list = []

    def __call__(self, steps_done: int, calls: int) -> None:
        step = a1111_sampling_step(steps_done, calls, sampler=self.sampler)
        self._seen.append(step)
        on = tuple(i for i, (step_range, _) in enumerate(self.parts) if unet_on(step_range, step))
        if on == self._on:
            return
        self._undo()
        from ..apply import apply_lora

        for index in on:
            for module, state, scale in self.parts[index][1]:
                self._handles.append(apply_lora(module, state, scale=scale))
        self._on = on

    def next_pass(self, *, sampler: str | None = None) -> None:
        """The hires pass, run with ``sampler``: the merged parts undone, each tag's range less the switches this
        pass fired (:func:`spent`), the counter from 0 (A1111 re-activates the networks at the tags' multipliers and
        ``launch_sampling`` resets the counter)."""
        self._undo()
        self.parts = [(spent(step_range, self._seen), groups) for step_range, groups in self.parts]
        self.sampler = sampler
        self._seen = []

    def _undo(self) -> None:
        for handle in reversed(self._handles):
            handle.undo()
        self._handles.clear()
        self._on = ()

    def release(self) -> None:
        """Undo every merged part (the weights before the pass, bit for bit) and go back to the first pass's ranges
        and sampler (the next image: the extension reads the ranges again per batch); idempotent."""
        self._undo()
        self.parts, self.sampler = list(self._first[0]), self._first[1]
        self._seen = []
