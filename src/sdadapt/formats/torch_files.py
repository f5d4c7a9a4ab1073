"""Writing ``torch.save`` files (``.pt`` / ``.bin``) that every loader of them accepts.

A1111, Forge and SD.Next load a ``.pt`` embedding or hypernetwork only after their safe-unpickle check
(``modules/safe.py`` ``check_zip_filenames``), which allows exactly the records torch <= 2.1 wrote::

    ^([^/]+)/((data/\\d+)|version|byteorder|.data/serialization_id|(data\\.pkl))$

Newer torch adds ``.format_version`` and ``.storage_alignment`` records, and those UIs then refuse the file
("The file may be malicious ..."). :func:`torch_save_bytes` writes what torch 2.1 writes: the same pickle and
tensor records, without those two (``torch.load`` reads their absence as format 1 and 64-byte alignment, which
is what the file has), every record's data 64-byte aligned (``torch.load(mmap=True)`` needs that) and the
archive's folder named after the file, as ``torch.save(obj, "name.pt")`` names it.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zipfile
from pathlib import Path

import torch

from .files import StagedOutputs, atomic_write

__all__ = ["A1111_ZIP_NAMES", "save_torch_file", "torch_save_bytes"]

A1111_ZIP_NAMES = re.compile(r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$")
"""A1111's ``modules/safe.py`` ``allowed_zip_names_re``: the only records its safe unpickler lets a ``.pt`` hold."""

_ALIGNMENT = 64  # (torch's default storage alignment; with no .storage_alignment record torch.load assumes it)
_PADDING_ID = 0x4246  # (the "FB" extra field torch pads its local headers with)
_DROPPED = (".format_version", ".storage_alignment")


def torch_save_bytes(obj: object, *, name: str = "archive") -> bytes:
    """``torch.save(obj)`` as torch 2.1 writes it (module docstring), in memory.

    Args:
        obj: what to save (tensors on the CPU: the file loads wherever it was saved from).
        name: the archive's folder (``torch.save`` uses the file's stem); a name that is not plain ASCII
            letters, digits, ``._-`` becomes ``archive``, torch's own name for a file object.
    """
    raw = io.BytesIO()
    torch.save(obj, raw)
    folder = name if re.fullmatch(r"[A-Za-z0-9._-]+", name) else "archive"
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(raw.getvalue())) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            _, _, record = info.filename.partition("/")
            if record in _DROPPED:
                continue
            entry = zipfile.ZipInfo(f"{folder}/{record}", date_time=(1980, 1, 1, 0, 0, 0))
            entry.compress_type = zipfile.ZIP_STORED
            # local header: 30 bytes + name + extra; pad the extra so the record's data starts 64-byte aligned
            start = out.tell() + 30 + len(entry.filename.encode()) + 4
            pad = -start % _ALIGNMENT
            entry.extra = struct.pack("<HH", _PADDING_ID, pad) + b"Z" * pad
            target.writestr(entry, source.read(info))
    return out.getvalue()


def save_torch_file(path: str | os.PathLike, obj: object, *, overwrite: bool = True,
                    stage: StagedOutputs | None = None) -> Path:
    """Write ``obj`` to ``path`` with :func:`torch_save_bytes` (the archive folder named after the file's stem),
    atomically (:func:`~sdadapt.formats.files.atomic_write`: ``overwrite`` and ``stage`` as there).

    Raises:
        OutputExistsError / OutputError / DiskSpaceError: see :func:`~sdadapt.formats.files.atomic_write`.
    """
    target = Path(path)
    data = torch_save_bytes(obj, name=target.stem)
    return atomic_write(target, lambda tmp: _write_bytes(tmp, data), overwrite=overwrite, stage=stage)


def _write_bytes(tmp: str, data: bytes) -> None:
    """The file's bytes into the temporary ``tmp`` (one function: the crash-safety tests fail it mid-write)."""
    with open(tmp, "wb") as handle:
        handle.write(data)
