"""kohya's ``--save_last_n_steps`` / ``--save_last_n_epochs``: which periodic saves a run removes.

kohya sd-scripts (``library/train_util.py``, ``get_remove_step_no`` / ``get_remove_epoch_no``)
removes one older save after each periodic save:

* a save at step ``s`` (every ``k`` steps, keeping ``N`` steps) removes the save at
  ``r = (s − N − 1) − ((s − N − 1) mod k)`` when ``r ≥ 0``: the saves of the last ``N`` steps stay
  (``k = 10, N = 30``: the save at step 50 removes step 10's; 20, 30, 40, 50 stay);
* a save at epoch ``e`` (every ``k`` epochs, keeping ``N`` saves) removes the save at epoch
  ``e − k·N`` when it is ``≥ 0``: the last ``N`` epoch saves stay.

Here every save at or below that bound is removed, not only the one at it (the same files in a
run that saved at each point; also the right ones after a save was skipped or a run resumed with
another ``k``). Only the saves a run lineage wrote are candidates (:class:`PeriodicSave` s the
caller tracks; a resumed run reads them back from its state folder) and the final output never is.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["PeriodicSave", "epoch_removal_bound", "remove_save", "saves_to_remove", "step_removal_bound"]


@dataclass(frozen=True)
class PeriodicSave:
    """One periodic save: ``kind`` ``"step"`` (``number`` = the optimiser step) or ``"epoch"``
    (``number`` = the epoch), and the path it was written to."""

    kind: str
    number: int
    path: Path

    def record(self) -> dict[str, object]:
        """As stored in a run's ``run.json`` (:meth:`from_record` reads it back); the path absolute, so
        a run resumed from another working folder finds the file."""
        return {"kind": self.kind, "number": self.number, "path": os.path.abspath(self.path)}

    @classmethod
    def from_record(cls, entry: object) -> PeriodicSave:
        """A :meth:`record` back; ``ValueError`` for anything else (an edited or damaged ``run.json``),
        also for a path that is not absolute or not named as a periodic save of its kind and number
        (``NAME-step000012.safetensors``, ``NAME-epoch0003``): rotation removes these paths, so an
        edited record cannot point it at another file."""
        if (not isinstance(entry, dict) or entry.get("kind") not in ("step", "epoch")
                or not isinstance(entry.get("number"), int) or not isinstance(entry.get("path"), str)):
            raise ValueError(f"not a periodic-save entry: {entry!r}")
        save = cls(str(entry["kind"]), int(entry["number"]), Path(entry["path"]))
        tag = f"-step{save.number:06d}" if save.kind == "step" else f"-epoch{save.number:04d}"
        if not save.path.is_absolute() or not save.path.stem.endswith(tag):
            raise ValueError(f"not a periodic-save entry: {entry!r} (the path of a {save.kind} {save.number} save "
                             f"is absolute and its name ends in {tag})")
        return save


def step_removal_bound(step: int, *, every: int, keep_steps: int) -> int | None:
    """After a save at ``step`` (saves every ``every`` steps, ``--save_last_n_steps keep_steps``):
    step saves at or below the returned step go (kohya's ``get_remove_step_no``); ``None``: none."""
    if every < 1 or keep_steps < 1:
        raise ValueError(f"every and keep_steps must be >= 1, got {every} and {keep_steps}")
    bound = step - keep_steps - 1
    bound -= bound % every
    return bound if bound >= 0 else None


def epoch_removal_bound(epoch: int, *, every: int, keep_saves: int) -> int | None:
    """After a save at ``epoch`` (every ``every`` epochs, ``--save_last_n_epochs keep_saves``): epoch
    saves at or below the returned epoch go (kohya's ``get_remove_epoch_no``); ``None``: none."""
    if every < 1 or keep_saves < 1:
        raise ValueError(f"every and keep_saves must be >= 1, got {every} and {keep_saves}")
    bound = epoch - every * keep_saves
    return bound if bound >= 0 else None


def saves_to_remove(saves: Iterable[PeriodicSave], now: PeriodicSave, *, every_n_steps: int | None,
                    every_n_epochs: int | None, last_n_steps: int | None, last_n_epochs: int | None,
                    protected: Iterable[Path] = ()) -> list[PeriodicSave]:
    """The earlier ``saves`` of ``now``'s kind that fall out of the kept window once ``now`` is
    written (never ``now`` itself, never a path in ``protected`` — the final output), oldest first.
    A kind without its ``last_n`` (or its ``every_n``) keeps everything."""
    if now.kind == "step":
        bound = (step_removal_bound(now.number, every=every_n_steps, keep_steps=last_n_steps)
                 if last_n_steps and every_n_steps else None)
    else:
        bound = (epoch_removal_bound(now.number, every=every_n_epochs, keep_saves=last_n_epochs)
                 if last_n_epochs and every_n_epochs else None)
    if bound is None:
        return []
    keep = {Path(os.path.abspath(p)) for p in (*protected, now.path)}
    return sorted((s for s in saves if s.kind == now.kind and s.number <= bound and Path(os.path.abspath(s.path)) not in keep),
                  key=lambda s: s.number)


def remove_save(path: Path) -> bool:
    """Remove one output of a periodic save; ``False`` when it is gone already (removed by hand).

    A file is unlinked (atomic); a folder (a diffusers save) is first moved into a new empty folder
    ``NAME.removing-XXXX`` beside it (a fresh name: nothing else there is touched) and then deleted,
    so an interrupted removal never leaves a half-deleted folder under the save's own name."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        aside = Path(tempfile.mkdtemp(prefix=f"{path.name}.removing-", dir=path.parent))
        os.replace(path, aside / path.name)
        shutil.rmtree(aside)
        return True
    if path.exists() or path.is_symlink():
        path.unlink()
        return True
    return False
