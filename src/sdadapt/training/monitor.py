"""Watching a training run: a CSV log of every step (always) and TensorBoard scalars (when installed).

The CSV has one row per optimiser step: ``step, epoch, loss, lr, seconds`` (seconds since the
run started), then the run's extra columns (e.g. :data:`MAX_NORM_COLUMNS`, kohya's max-norm
statistics with ``--scale-weight-norms``); a resumed run appends to it, under the header the file
has (a column the resumed run adds is added to it, the older rows left empty there). TensorBoard
event files go to a folder (``tensorboard --logdir FOLDER``) through ``torch.utils.tensorboard``,
which needs the ``tensorboard`` package.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections.abc import Mapping
from pathlib import Path

__all__ = ["MAX_NORM_COLUMNS", "RunLog", "tensorboard_available"]

#: kohya's max-norm statistics (``FitProgress.max_norm``, ``--scale-weight-norms``): CSV column ->
#: the TensorBoard tag kohya's train_network.py logs it under
MAX_NORM_COLUMNS: Mapping[str, str] = {"keys_scaled": "max_norm/keys_scaled", "average_key_norm": "norm/avg_key_norm",
                                       "max_key_norm": "max_norm/max_key_norm"}


def tensorboard_available() -> bool:
    """Whether ``torch.utils.tensorboard`` can write event files here."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except Exception:  # ImportError, or tensorboard's own import errors
        return False
    return True


class RunLog:
    """``log.step(step, epoch, loss, lr, extra)`` writes a CSV row (flushed) and, if on, TensorBoard scalars.

    Args:
        csv_path: the CSV file (created with a header, or appended to when ``append``).
        tensorboard: a folder for TensorBoard events, or ``None``.
        append: continue an existing CSV (a resumed run) under its header; columns of ``extra``
            it lacks are added at its end (the file rewritten atomically, the older rows empty
            there), its own extra columns kept (empty in rows that do not give them).
        after_step: with ``append``, rows of later steps (the part of the old run the resumed
            one repeats) are removed first.
        extra: columns after :attr:`FIELDS`, ``{column: TensorBoard tag}`` (e.g.
            :data:`MAX_NORM_COLUMNS`); their values come with each :meth:`step`.

    Attributes:
        columns: the CSV header the rows follow.

    Raises:
        ValueError: with ``append``, the existing file does not start with a run log's header
            (:attr:`FIELDS`): it is some other file; naming it.
    """

    FIELDS = ("step", "epoch", "loss", "lr", "seconds")

    def __init__(self, csv_path: str | os.PathLike, *, tensorboard: str | os.PathLike | None = None,
                 append: bool = False, after_step: int | None = None, extra: Mapping[str, str] | None = None) -> None:
        self.csv_path = Path(csv_path)
        self._tags = dict(extra or {})
        wanted = (*self.FIELDS, *(c for c in self._tags if c not in self.FIELDS))
        exists = self.csv_path.is_file() and self.csv_path.stat().st_size > 0
        self.columns: tuple[str, ...] = wanted
        if append and exists:
            self.columns = self._continue(wanted, after_step)
        self._file = open(self.csv_path, "a" if append else "w", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if not (append and exists):
            self._writer.writerow(self.columns)
            self._file.flush()
        self._start = time.perf_counter()
        self._tb = None
        if tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(tensorboard))

    def _continue(self, wanted: tuple[str, ...], after_step: int | None) -> tuple[str, ...]:
        """The header of the existing CSV with ``wanted``'s missing columns added; the file rewritten
        (atomically) when columns are added or rows after ``after_step`` removed."""
        with open(self.csv_path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
        header = tuple(rows[0]) if rows else ()
        if header[:len(self.FIELDS)] != self.FIELDS:
            raise ValueError(f"{self.csv_path}: not a training log (its header is {', '.join(header) or 'empty'}, a "
                             f"run log's starts with {', '.join(self.FIELDS)}); move it away or write the log elsewhere")
        columns = (*header, *(c for c in wanted if c not in header))
        body = rows[1:]
        if after_step is not None:
            body = [r for r in body if r and r[0].isdigit() and int(r[0]) <= after_step]
        if columns != header or len(body) != len(rows) - 1:
            from ..formats.files import atomic_write

            text = io.StringIO(newline="")
            writer = csv.writer(text)
            writer.writerow(columns)
            writer.writerows([*r, *[""] * (len(columns) - len(r))] for r in body)
            atomic_write(self.csv_path, lambda tmp: Path(tmp).write_text(text.getvalue(), encoding="utf-8", newline=""))
        return columns

    def step(self, step: int, epoch: int, loss: float, lr: float, extra: Mapping[str, float] | None = None) -> None:
        """One row: the step's values, and ``extra``'s under their columns (a column without a value
        this step: empty). TensorBoard gets ``loss``, ``lr`` and each ``extra`` value under its tag."""
        extra = extra or {}
        values = {"step": step, "epoch": epoch, "loss": f"{loss:.6g}", "lr": f"{lr:.6g}",
                  "seconds": f"{time.perf_counter() - self._start:.2f}",
                  **{name: f"{float(value):.6g}" for name, value in extra.items()}}
        self._writer.writerow([values.get(column, "") for column in self.columns])
        self._file.flush()
        if self._tb is not None:
            self._tb.add_scalar("loss", loss, step)
            self._tb.add_scalar("lr", lr, step)
            for name, value in extra.items():
                self._tb.add_scalar(self._tags.get(name, name), float(value), step)

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
