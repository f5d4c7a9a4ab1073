"""``generate --count N --grid``: the grid A1111 saves beside a batch's images (``processing.process_images``:
``images.image_grid(output_images, p.batch_size)`` with its default rows, the first image's infotext)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = ["batch_grid_rows", "write_batch_grid"]


def batch_grid_rows(count: int) -> int:
    """A1111's rows for a grid of ``count`` images at its default settings ("Grid row count" -1, "Prevent empty
    spots in grid" off): ``round(sqrt(count))``, at most ``count``."""
    return min(round(math.sqrt(count)), count)


def write_batch_grid(files: Sequence[str | os.PathLike], out: str | os.PathLike) -> Path:
    """The grid of the PNG ``files`` (a run's images) written to ``out``: :func:`batch_grid_rows` rows, each cell the
    largest image's size on white (:func:`sdadapt.labelled_grid.cells_grid`), the first image's infotext — as
    A1111 saves a batch's grid. Atomic.

    Raises:
        ValueError: fewer than two images (A1111 saves no grid of one: "Only if multiple images").
    """
    from ..labelled_grid import cells_grid
    from .generate_runs import read_written, write_grid

    if len(files) < 2:
        raise ValueError(f"a grid needs two images or more, got {len(files)} (A1111 saves none of one)")
    pictures, parameters = read_written(files)
    return write_grid(out, cells_grid(pictures, rows=batch_grid_rows(len(pictures))), parameters=parameters)
