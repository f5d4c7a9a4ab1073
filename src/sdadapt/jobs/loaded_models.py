"""Models loaded once for several ``generate`` runs (a prompts file's lines), each run handed its own copy.

A run changes the system it is given — LoRAs merged into the weights, embeddings injected into the text encoder and
tokenizer, hypernetworks and Custom Diffusion applied, the aesthetic gradient's steps on the text encoder — and
never undoes them (its system is its own). So the system loaded first is kept as it was loaded, on the CPU, and
each later run gets a copy of it on the run's device: the whole object graph copied (``copy.deepcopy``), the
weights moved in one pass. Nothing a run does can reach the next one, and the copy costs a memory copy of the
weights where a load reads, converts and builds them again.
"""

from __future__ import annotations

import collections
import copy
import gc
import os
from collections.abc import Callable

import torch

from .models import load_system

__all__ = ["LoadedModels", "system_copy"]


def system_copy(system: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """A copy of ``system`` (a loaded model: :class:`~sdadapt.toy.system.ToySystem`,
    :class:`~sdadapt.diffusers_system.DiffusersSystem`) with its parameters and buffers on ``device``: everything it
    holds copied (tokenizers, settings, tensors kept as plain attributes on their own devices), its weights moved
    straight to ``device`` (no copy of them made on their old device first); tied weights stay tied.
    """
    memo: dict[int, object] = {}
    for parameter in system.parameters():
        memo[id(parameter)] = torch.nn.Parameter(parameter.detach().to(device, copy=True),
                                                 requires_grad=parameter.requires_grad)
    for buffer in system.buffers():
        memo[id(buffer)] = buffer.detach().to(device, copy=True)
    return copy.deepcopy(system, memo)


class LoadedModels:
    """A cache of loaded models for a sequence of runs (:func:`sdadapt.jobs.generate.run_generate`'s ``loaded``).

    :meth:`load` loads a model the first time it is asked for with those options — that run gets the loaded system
    itself, and a copy of it as loaded is kept on the CPU — and hands every later request a fresh copy of the kept
    one on the asked device (:func:`system_copy`). At most ``keep`` models are kept (default 2: a model and its
    refiner), the one used longest ago dropped for a new one (as A1111 keeps one checkpoint loaded). Memory: one
    extra copy of each kept model's weights in CPU memory.
    """

    def __init__(self, *, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be 1 or more, got {keep}")
        self._keep = keep
        self._kept: collections.OrderedDict[tuple, torch.nn.Module] = collections.OrderedDict()

    def load(self, model: str | os.PathLike, *, device: str = "cpu", log: Callable[[str], None] | None = None,
             **options: object) -> torch.nn.Module:
        """:func:`sdadapt.jobs.models.load_system` (same arguments), loaded once per model and options."""
        key = (str(model), str(device), tuple(sorted((name, None if value is None else str(value))
                                                     for name, value in options.items())))
        kept = self._kept.get(key)
        if kept is None:
            while len(self._kept) >= self._keep:  # (dropped before the load: one model less in memory meanwhile)
                self._kept.popitem(last=False)
            gc.collect()
            system = load_system(str(model), device=device, log=log, **options)
            self._kept[key] = system_copy(system, "cpu")
            return system
        self._kept.move_to_end(key)
        gc.collect()  # (the run before's copy, if it is still waiting in a reference cycle, freed before this one)
        return system_copy(kept, device)
