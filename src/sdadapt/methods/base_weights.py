"""kohya's ``--base_weights``: LoRA files merged into the base model before a LoRA-family run.

kohya ``train_network.py``: for each file ``i`` of ``base_weights`` it builds the file's network
(``create_network_from_weights(multiplier_i, file, ..., for_inference=True)``) and merges it into
the text encoder(s) and the UNet (``merge_to``: ``W ← W + multiplier_i · ΔW`` for every module of
the file), with ``multiplier_i = base_weights_multiplier[i]``, or 1.0 where that list is shorter.
Only then is the trained network built and injected, so it trains on (and its file holds only the
change from) the merged model.

Here each file is read as ``--network-weights`` files are (any family sdadapt reads; a file made
for another base model is refused) and merged with :func:`sdadapt.apply.apply_lora` (the one delta
path: ``ΔW`` in float32, or float64 for float64 weights, cast once). :meth:`BaseWeights.undo`
restores the original weights bit for bit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..apply import AppliedDelta, apply_lora
from ..errors import InputError, WeightFileError
from ..plurals import plural

__all__ = ["BaseWeights", "base_weights_multipliers", "merge_base_weights"]


@dataclass
class BaseWeights:
    """What :func:`merge_base_weights` merged, and how to take it out again.

    Attributes:
        files: the files merged, in order.
        multipliers: each file's multiplier.
        layers: layers changed per file (all components).
    """

    files: list[Path] = field(default_factory=list)
    multipliers: list[float] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    _applied: list[AppliedDelta] = field(default_factory=list, repr=False)

    def notes(self) -> list[str]:
        """One line per file, for the run report."""
        return [f"--base-weights {file}: merged into the base model at multiplier {m:g} ({plural(n, 'layer')})"
                for file, m, n in zip(self.files, self.multipliers, self.layers)]

    def undo(self) -> None:
        """Restore every merged weight bit for bit (newest merge first); idempotent."""
        for applied in reversed(self._applied):
            applied.undo()
        self._applied.clear()


def base_weights_multipliers(count: int, multipliers: Sequence[float] | None) -> list[float]:
    """kohya's rule: file ``i`` merges at ``multipliers[i]``, or 1.0 where the list is shorter.

    Raises:
        InputError: more multipliers than files, or a multiplier that is not finite.
    """
    given = [float(m) for m in (multipliers or ())]
    if len(given) > count:
        raise InputError(f"--base-weights-multiplier has {len(given)} values for {count} --base-weights file(s): give "
                         "one multiplier per file (missing ones are 1.0)")
    bad = [m for m in given if not math.isfinite(m)]
    if bad:
        raise InputError(f"--base-weights-multiplier {bad[0]}: give finite numbers (1.0 merges a file at full strength)")
    return given + [1.0] * (count - len(given))


def merge_base_weights(system, files: Sequence[str | os.PathLike], *,
                       multipliers: Sequence[float] | None = None) -> BaseWeights:
    """Merge LoRA ``files`` into ``system``'s UNet and text encoder(s) in place: ``W ← W + m_i · ΔW_i``.

    Args:
        system: the model (:class:`~sdadapt.methods.system.System`): ``unet``, ``text_encoder``
            (and SDXL's ``text_encoder_2``) are changed in place.
        files: kohya/LyCORIS/diffusers LoRA files of any family, merged in order.
        multipliers: per file (kohya's ``base_weights_multiplier``; missing ones are 1.0).

    Returns:
        the merge, with ``undo()``; a failure part-way undoes the files already merged.

    Raises:
        FileNotFoundError, WeightFileError: a file that is missing, not a LoRA file, made for another
            base model, or whose layers do not fit the model.
        InputError: bad multipliers.
    """
    from .network_weights import read_network_weights

    paths = [Path(f) for f in files]
    scales = base_weights_multipliers(len(paths), multipliers)
    merged = BaseWeights()
    try:
        for path, scale in zip(paths, scales):
            weights = read_network_weights(path, system=system, flag="--base-weights")
            layers = 0
            for component, state in weights.components.items():
                try:
                    applied = apply_lora(getattr(system, component), state, scale=scale)
                except (KeyError, ValueError) as exc:  # LayerNotFoundError is a KeyError: the file is for another model
                    raise WeightFileError(f"--base-weights {path}: {component}: {exc}") from None
                merged._applied.append(applied)
                layers += len(applied.names)
            merged.files.append(path)
            merged.multipliers.append(scale)
            merged.layers.append(layers)
    except BaseException:
        merged.undo()
        raise
    return merged
