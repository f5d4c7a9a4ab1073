"""``generate --count N --grid``: the grid A1111 saves beside a batch's images (``processing.process_images``:
``images.image_grid(output_images, p.batch_size)`` with its default rows, the first image's infotext)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["batch_grid_rows", "write_batch_grid"]


def batch_grid_rows(count: int) -> int:
    """A1111's rows for a grid of ``count`` images at its default settings ("Grid row count" -1, "Prevent empty
    spots in grid" off): ``round(sqrt(count))``, at most ``count``."""
    return min(round(math.sqrt(count)), count)


def write_batch_grid(result: Mapping, out: str | os.PathLike, *, given: Mapping[str, object]) -> Path:
    """The grid of a run's images (``result``: :func:`~sdadapt.jobs.generate.run_generate`'s, its ``pixels``) written
    to ``out`` (in its suffix's format, at ``given``'s JPEG/WebP settings): :func:`batch_grid_rows` rows, each cell
    the largest image's size on white (:func:`sdadapt.labelled_grid.cells_grid`), the first image's infotext — as
    A1111 saves a batch's grid. Atomic.

    Raises:
        ValueError: fewer than two images (A1111 saves no grid of one: "Only if multiple images").
    """
    from ..labelled_grid import cells_grid
    from .generate_runs import write_grid

    pictures = list(result["pixels"])
    if len(pictures) < 2:
        raise ValueError(f"a grid needs two images or more, got {len(pictures)} (A1111 saves none of one)")
    return write_grid(out, cells_grid(pictures, rows=batch_grid_rows(len(pictures))),
                      parameters=result["infotexts"][0], given=given)
