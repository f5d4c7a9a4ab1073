"""Versioned ``run.json`` entries: which behaviour a resumed run keeps.

A behaviour ``python -m sdadapt train`` changed is recorded in ``run.json`` under a key naming the
version a run trained with; a run resumed from an older record keeps the older behaviour.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["recorded_version"]


def recorded_version(record: Mapping[str, Any] | None, key: str, *, new: str, legacy: str,
                     between: tuple[str, ...] = ()) -> str:
    """The version of ``key``'s behaviour a run trains with: ``new`` for a new run (``record``
    ``None``), else the resumed run's ``run.json`` entry (``legacy`` when it has none: the run
    started before the entry was written; ``between``: the versions written after ``legacy`` and
    before ``new``, newest first, which a resumed run keeps too).

    Raises:
        ValueError: an entry that is none of them (an edited file).
    """
    if record is None:
        return new
    version = record.get(key, legacy)
    known = (new, *between, legacy)
    if version not in known:
        listing = ", ".join(repr(v) for v in known[:-1]) + f" or {known[-1]!r}"
        raise ValueError(f"run.json's {key} {version!r} is not {listing}; the file was edited — resume "
                         "from an intact state folder")
    return version
