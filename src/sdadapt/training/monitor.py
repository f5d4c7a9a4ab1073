"""Watching a training run: a CSV log of every step (always) and TensorBoard scalars (when installed).

The CSV has one row per optimiser step: ``step, epoch, loss, lr, seconds`` (seconds since the
run started); a resumed run appends to it. TensorBoard event files go to a folder
(``tensorboard --logdir FOLDER``) through ``torch.utils.tensorboard``, which needs the
``tensorboard`` package.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

__all__ = ["RunLog", "tensorboard_available"]


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write event files here."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception:  # ImportError, or tensorboard's own import errors
        return False
    return True


class RunLog:
    """``log.step(step, epoch, loss, lr)`` writes a CSV row (flushed) and, if on, TensorBoard scalars.

    Args:
        csv_path: the CSV file (created with a header, or appended to when ``append``).
        tensorboard: a folder for TensorBoard events, or ``None``.
        append: continue an existing CSV (a resumed run); its header is kept.
        after_step: with ``append``, rows of later steps (the part of the old run the resumed
            one repeats) are removed first.
    """

    FIELDS = ("step", "epoch", "loss", "lr", "seconds")

    def __init__(self, csv_path: str | os.PathLike, *, tensorboard: str | os.PathLike | None = None,
                 append: bool = False, after_step: int | None = None) -> None:
        self.csv_path = Path(csv_path)
        exists = self.csv_path.is_file() and self.csv_path.stat().st_size > 0
        if append and exists and after_step is not None:
            with open(self.csv_path, newline="", encoding="utf-8") as handle:
                rows = list(csv.reader(handle))
            kept = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= after_step]
            with open(self.csv_path, "w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows(kept)
        self._file = open(self.csv_path, "a" if append else "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if not (append and exists):
            self._writer.writerow(self.FIELDS)
        self._start = time.perf_counter()
        self._tb = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard))

    def step(self, step: int, epoch: int, loss: float, lr: float) -> None:
        self._writer.writerow([step, epoch, f"{loss:.6g}", f"{lr:.6g}", f"{time.perf_counter() - self._start:.2f}"])
        self._file.flush()
        if self._tb is not None:
            self._tb.add_scalar("loss", loss, step)
            self._tb.add_scalar("lr", lr, step)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
