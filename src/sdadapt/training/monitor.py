"""Watching a training run: a CSV log of every step (always) and TensorBoard scalars (when installed).

The CSV has one row per optimiser step: ``step, epoch, loss, lr, seconds`` (seconds since the
run started), then the run's extra columns (e.g. :data:`MAX_NORM_COLUMNS`, kohya's max-norm
statistics with ``--scale-weight-norms``); a resumed run appends to it, under the header the file
has (a column the resumed run adds is added to it, the older rows left empty there). TensorBoard
event files go to a folder (``tensorboard --logdir FOLDER``) through ``torch.utils.tensorboard``,
which needs the ``tensorboard`` package.

sdadapt logs one row per optimiser step, its ``loss`` the mean of the step's batch losses; kohya's
``train_network.py`` logs every batch (``loss/current``, and ``loss/average``: the mean of the last
epoch's batch losses, its progress bar's ``avr_loss``). :class:`LossAverage` is that average,
which the train command writes to TensorBoard as ``loss/average``.
"""

from __future__ import annotations

import csv
import io
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = ["MAX_NORM_COLUMNS", "LossAverage", "RunLog", "tensorboard_available"]

#: kohya's max-norm statistics (``FitProgress.max_norm``, ``--scale-weight-norms``): CSV column ->
#: the TensorBoard tag kohya's train_network.py logs it under
MAX_NORM_COLUMNS: Mapping[str, str] = {"keys_scaled": "max_norm/keys_scaled", "average_key_norm": "norm/avg_key_norm",
                                       "max_key_norm": "max_norm/max_key_norm"}


class LossAverage:
    """kohya's ``loss/average`` (``avr_loss``): the mean of the last ``per_epoch`` batch losses.

    kohya's ``LossRecorder`` (sd-scripts@48d368fa ``library/train_util.py:6668-6688``, fed each batch's
    loss at ``train_network.py:1512-1514``) appends during epoch 0 and afterwards replaces the loss at
    the batch's position in its epoch, keeping one running total (``total -= old; total += new``): for
    a run from epoch 0 that is a window over the last ``per_epoch`` batches, which this keeps with the
    same additions in the same order (bit for bit the same floats). Its value at an epoch's last batch
    is kohya's ``loss/epoch_average``. ``per_epoch = 0`` (no epochs): the mean of every loss so far.

    One difference, on purpose: a resumed run (or one started at ``initial_step`` mid-epoch) starts
    empty here, the mean of the batches it has trained. kohya's recorder, fresh too, is fed that
    epoch's batches as indices ``1, 2, …`` (its loop enumerates ``skip_first_batches(dl, r - 1)`` and
    skips the first, ``train_network.py:1410-1419``) and, past epoch 0, pads slot 0 with a zero: its
    average reads half the first loss right after the resume and low until the epoch ends, a
    bookkeeping artefact rather than the training's loss.

    Raises:
        ValueError: ``per_epoch < 0``.
    """

    def __init__(self, *, per_epoch: int) -> None:
        if isinstance(per_epoch, bool) or not isinstance(per_epoch, int) or per_epoch < 0:
            raise ValueError(f"LossAverage needs per_epoch, the batches of an epoch, as an integer >= 0 (0: no "
                             f"epochs), got {per_epoch!r}")
        self._window: deque[float] = deque()
        self._size = per_epoch
        self._total = 0.0

    def add(self, losses: Iterable[float]) -> float:
        """Take the next batches' losses, in order (e.g. :attr:`~sdadapt.methods.FitProgress.batch_losses`);
        returns :attr:`value`."""
        for loss in losses:
            loss = float(loss)
            if self._size and len(self._window) == self._size:
                self._total -= self._window.popleft()
            self._window.append(loss)
            self._total += loss
        return self.value

    @property
    def value(self) -> float:
        """The mean of the losses in the window (0.0 before the first, as kohya's)."""
        return self._total / len(self._window) if self._window else 0.0


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
        this step: empty). TensorBoard gets ``loss``, ``lr`` and each ``extra`` value under its tag
        (a name that is no column, e.g. ``loss/average``, goes to TensorBoard alone)."""
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
