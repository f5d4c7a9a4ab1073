"""An incremental, atomic safetensors writer: the header from a plan, then each tensor as it comes.

The layout (:func:`sdadapt.formats.header.safetensors_layout`, shared with
:func:`sdadapt.formats.files.write_safetensors`) is the one ``safetensors.torch.save_file`` produces:
8-byte little-endian header length, a compact JSON header (``__metadata__`` first, then the
tensors), padded with spaces to a multiple of 8, then the tensors' bytes back to back, ordered by
dtype (widest first, safetensors' own rule) and then by name. Because every offset is known from
the plan, tensors may arrive in **any order**: each is written at its offset (a seek), so the
caller can produce them in whatever order suits its reads. Memory: one tensor at a time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..formats.files import WeightFileError, atomic_write, check_output_file
from ..formats.header import DTYPE_NAMES as _DTYPE_NAMES
from ..formats.header import safetensors_layout

__all__ = ["write_streaming", "safetensors_layout", "planned_size", "check_disk_space", "DTYPE_NAMES"]

#: torch dtype -> safetensors dtype name
DTYPE_NAMES = _DTYPE_NAMES

_DISK_MARGIN = 16 << 20  # leave this much free beyond the planned file


def planned_size(plan: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None = None) -> int:
    """Bytes the file for ``plan`` will take."""
    head, offsets = safetensors_layout(plan, metadata)
    return len(head) + max((end for _, end in offsets.values()), default=0)


def check_disk_space(path: str | os.PathLike, size: int) -> None:
    """Raise :class:`~sdadapt.formats.files.DiskSpaceError` (an ``OSError``) when ``path``'s folder has
    less than ``size`` + 16 MiB free (:func:`~sdadapt.formats.files.check_output_file`, the one check)."""
    check_output_file(path, overwrite=True, needed_bytes=size, margin_bytes=_DISK_MARGIN, suffix=None)


def write_streaming(
    path: str | os.PathLike,
    plan: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Tensor]],
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write a ``.safetensors`` file incrementally, holding one tensor at a time.

    Args:
        path: output file; written to a temporary file in the same folder, fsynced, renamed.
        plan: ``{key: (dtype, shape)}`` of every tensor the file will hold.
        tensors: ``(key, tensor)`` pairs, any order, each key exactly once; each is checked against
            the plan, moved to CPU and written at its offset, then dropped.
        metadata: string ``__metadata__`` entries.
        overwrite: replace an existing ``path``.
        progress: ``progress(done, total)`` after each tensor.

    Returns:
        ``path``.

    Raises:
        OutputExistsError: ``path`` exists and ``overwrite`` is false — checked first and again,
            atomically, when the finished file is moved into place.
        DiskSpaceError: not enough free disk space for the planned file (checked before writing).
        OutputError: the folder is missing or read-only, or a write failed (nothing is left behind).
        WeightFileError: a tensor not in the plan, repeated, with another dtype/shape, or a planned
            tensor that never arrives (no file is left behind).
    """
    target = Path(path)
    check_output_file(target, overwrite=overwrite, suffix=None)
    head, offsets = safetensors_layout(plan, metadata)
    total_bytes = len(head) + max((end for _, end in offsets.values()), default=0)
    check_disk_space(target, total_bytes)
    total = len(plan)

    def write(tmp: str) -> None:
        done: set[str] = set()
        with open(tmp, "wb") as handle:
            handle.write(head)
            position = len(head)
            for key, value in tensors:
                if key not in plan:
                    raise WeightFileError(f"{target}: tensor {key!r} is not in the plan")
                if key in done:
                    raise WeightFileError(f"{target}: tensor {key!r} arrived twice")
                dtype, shape = plan[key]
                if value.dtype != dtype or tuple(value.shape) != tuple(shape):
                    raise WeightFileError(
                        f"{target}: tensor {key!r} is {value.dtype} {tuple(value.shape)}, "
                        f"the plan says {dtype} {tuple(shape)}"
                    )
                start, end = offsets[key]
                if end > start:
                    data = value.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
                    at = len(head) + start
                    if position != at:
                        handle.seek(at)
                    handle.write(memoryview(data.numpy()))
                    position = len(head) + end
                    del data
                del value
                done.add(key)
                if progress is not None:
                    progress(len(done), total)
            if len(done) != total:
                missing = sorted(set(plan) - done)
                raise WeightFileError(
                    f"{target}: {len(missing)} planned tensor(s) never arrived, e.g. {missing[:5]}"
                )
            handle.truncate(total_bytes)

    return atomic_write(target, write, overwrite=overwrite)
