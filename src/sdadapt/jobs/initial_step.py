"""kohya's ``initial_step`` / ``initial_epoch`` / ``skip_until_initial_step`` for ``python -m sdadapt train``.

kohya's train_network.py: ``initial_step`` (or ``initial_epoch`` N: ``(N - 1) ·
ceil(len(train_dataloader) / gradient_accumulation_steps)`` steps) must be below ``max_train_steps``;
the LR scheduler is not moved ("lr scheduler will start from 0 without --resume"); with
``skip_until_initial_step`` the data loader skips the batches before that step, otherwise nothing
is skipped. sdadapt's run (:attr:`sdadapt.methods.FitConfig.initial_step`) counts its steps from
there (steps ``k + 1 … N`` trained: saved names, ``ss_steps``, the log, save / sample cadence),
starts the LR schedule and the noise at their beginning, and takes its data from step ``k + 1``'s
batches (skip) or from the first ones. (kohya's own counter differs: without the skip it starts at
0 and only the epoch number moves — on purpose, sd-scripts PR #1359 — and the whole epochs from the
one ``k`` falls in train; with it, at ``k`` minus the skipped whole epochs' steps, and with gradient
accumulation kohya skips too many epochs, sd-scripts issue #2407: docs/train.md has the counts.)

The resolved start is recorded in ``run.json`` (``initial_step``); ``--resume`` continues it, and
refuses another one (kohya's ``initial_step`` with ``--resume`` replaces the state's step, which
sdadapt's resume — the same draws from where the state stopped — does not do).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .train import TrainOptions

__all__ = ["check_initial_step_options", "initial_step_notes", "initial_step_record", "resolve_initial_step"]


def check_initial_step_options(options: TrainOptions) -> None:
    """``--initial-step`` ≥ 0 and ``--initial-epoch`` ≥ 1 (integers), before anything loads.

    Raises:
        ValueError: naming the option and the fix.
    """
    for name, low in (("initial_step", 0), ("initial_epoch", 1)):
        value = getattr(options, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {low} (kohya's {name}), got {value!r}")


def resolve_initial_step(options: TrainOptions, record: Mapping[str, Any] | None, *, batches_per_epoch: int,
                         total: int) -> tuple[int, bool]:
    """The run's start ``(step k, skip the data before it)``: ``--initial-step``, else
    ``--initial-epoch`` N as kohya counts it (``(N - 1) · ceil(batches_per_epoch / accumulation)``),
    else 0; a resumed run's (``record``: its ``run.json``) from its record.

    Raises:
        ValueError: ``k ≥ total`` (kohya asserts ``max_train_steps > initial_step``), or, resuming,
            a start other than the recorded one.
    """
    accumulation = options.gradient_accumulation_steps
    given = options.initial_step
    if given is None and options.initial_epoch is not None:
        given = (options.initial_epoch - 1) * math.ceil(batches_per_epoch / accumulation)
    asked = (given or 0, bool(options.skip_until_initial_step) and bool(given))
    if record is not None:
        saved = record.get("initial_step") or {}
        kept = (int(saved.get("step", 0)), bool(saved.get("skip", False)))
        given_any = options.initial_step is not None or options.initial_epoch is not None or options.skip_until_initial_step
        if given_any and asked != kept:
            raise ValueError(f"--resume {options.resume}: the run started at step {kept[0]}"
                             f"{' skipping the data before it' if kept[1] else ''}; --initial-step / --initial-epoch / "
                             "--skip-until-initial-step cannot move a resumed run (it continues where its state stopped, "
                             "with the same draws): leave them out, or give the ones the run started with")
        return kept
    if asked[0] >= total:
        flag = "--initial-step" if options.initial_step is not None else f"--initial-epoch {options.initial_epoch}: step"
        raise ValueError(f"{flag} {asked[0]} is not below the run's {total} steps (kohya's: max_train_steps must be "
                         "greater than initial_step); raise --steps or start earlier")
    return asked


def initial_step_record(step: int, skip: bool) -> dict[str, Any]:
    """``run.json``'s ``initial_step`` entry (only for a run that started past step 0)."""
    return {"initial_step": {"step": step, "skip": skip}} if step else {}


def initial_step_notes(options: TrainOptions, step: int, skip: bool, *, total: int) -> list[str]:
    """Run-report lines: where the run starts and what that means (or that the skip is unused)."""
    if not step:
        if options.skip_until_initial_step:
            return ["--skip-until-initial-step: not used without --initial-step or --initial-epoch (nothing to skip)"]
        return []
    data = (f"the data continues at step {step + 1}'s batches (those before are skipped)" if skip else
            "the data starts at the first batches (--skip-until-initial-step continues at step "
            f"{step + 1}'s instead)")
    return [(f"starts at step {step} of {total} (kohya's initial_step): trains steps {step + 1}-{total}, counted from "
             f"{step} in the saved names, metadata and log; the LR schedule starts at its beginning and the optimiser "
             f"fresh, as kohya's; {data}")]
