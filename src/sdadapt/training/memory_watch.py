"""Watching a CUDA device's memory while training: the most each step allocated, what the caching
allocator holds from the driver, and a warning when that nears the device's size.

Why the warning: on Windows, NVIDIA drivers from 536.40 on let CUDA spill into system RAM when the
GPU's memory is full ("sysmem fallback") instead of failing with out-of-memory, and a run that does
so takes tens of seconds a step instead of about one — nothing fails, the run is only slow (kohya_ss
issues 1524, 1730, 2520 and 3296: 39–140 s/it, 1.2 s/it after lowering the network dim). The
allocator's reserved memory reaching the device's size is the sign; past it, memory is being lent
by the host.

Reading costs no device sync: :meth:`MemoryWatch.read` asks the caching allocator's host-side counters
(``torch.cuda.max_memory_allocated``, ``torch.cuda.memory_reserved``) and resets the peak, so each
reading is the peak since the previous one. Memory other processes use on the same GPU is not seen.

Example (any device; on a CPU there is nothing to watch and :func:`memory_watch` returns ``None``)::

    watch = memory_watch(device)
    def on_step(info):
        reading = watch.read() if watch is not None else None
        if reading is not None:
            log(reading.columns())             # {"peak_allocated_mib": ..., "reserved_mib": ...}
            for message in watch.warnings(reading):
                print(message)                  # once per level: near full, then beyond the device
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["MEMORY_COLUMNS", "MemoryReading", "MemoryWatch", "memory_watch"]

#: the run log's memory columns (CSV) -> their TensorBoard tags
MEMORY_COLUMNS: Mapping[str, str] = {"peak_allocated_mib": "memory/peak_allocated_mib",
                                     "reserved_mib": "memory/reserved_mib"}

_MIB = 2**20
_LESS = ("use less memory (gradient checkpointing, a smaller batch or rank, an fp8 base: `sdadapt train` "
         "--gradient-checkpointing, --batch-size, --network-dim, --fp8-base), or set 'CUDA - Sysmem Fallback Policy' "
         "to 'Prefer No Sysmem Fallback' in the NVIDIA Control Panel to get an out-of-memory error instead")


@dataclass(frozen=True)
class MemoryReading:
    """One reading of a CUDA device's memory, in bytes.

    Attributes:
        peak_allocated: the most the run's tensors held at once since the previous reading.
        reserved: what the caching allocator holds from the driver now (tensors and its cache).
        total: the device's memory.
    """

    peak_allocated: int
    reserved: int
    total: int

    @property
    def reserved_fraction(self) -> float:
        """``reserved / total``."""
        return self.reserved / self.total

    def columns(self) -> dict[str, float]:
        """The run log's :data:`MEMORY_COLUMNS`, in MiB."""
        return {"peak_allocated_mib": self.peak_allocated / _MIB, "reserved_mib": self.reserved / _MIB}


class MemoryWatch:
    """Reads one CUDA device's memory after each step (:meth:`read`) and says when it nears or passes
    the device's size (:meth:`warnings`, each level once per watch).

    Args:
        device: a CUDA device (``"cuda"``, ``"cuda:1"``, a ``torch.device``).
        near_full: the reserved fraction of the device's memory at which :meth:`warnings` first speaks
            (0 < near_full <= 1; default 0.95).

    Raises:
        ValueError: ``device`` is not a CUDA device, or ``near_full`` is out of range.
    """

    def __init__(self, device: str | torch.device, *, near_full: float = 0.95) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"MemoryWatch watches a CUDA device, not {device} (memory_watch(device) returns None "
                             "for other devices)")
        if isinstance(near_full, bool) or not (isinstance(near_full, (int, float)) and 0 < near_full <= 1):
            raise ValueError(f"near_full must be a fraction of the device's memory in (0, 1], got {near_full!r}")
        self.device = device
        self.near_full = float(near_full)
        self._total: int | None = None
        self._said: set[str] = set()

    def read(self) -> MemoryReading:
        """The peak allocated since the previous reading (or since the run's start), the reserved
        memory now and the device's size; resets the allocator's peak (no device sync)."""
        if self._total is None:
            self._total = int(torch.cuda.get_device_properties(self.device).total_memory)
        reading = MemoryReading(peak_allocated=int(torch.cuda.max_memory_allocated(self.device)),
                                reserved=int(torch.cuda.memory_reserved(self.device)), total=self._total)
        torch.cuda.reset_peak_memory_stats(self.device)
        return reading

    def warnings(self, reading: MemoryReading) -> list[str]:
        """What ``reading`` should make a user look at, each level said once per watch: the reserved
        memory at ``near_full`` of the device's or more, then beyond the device's size (the driver
        lending system RAM: Windows' sysmem fallback)."""
        out = []
        gib = f"{reading.reserved / 2**30:.1f} GiB of the device's {reading.total / 2**30:.1f} GiB"
        if reading.reserved > reading.total and "beyond" not in self._said:
            self._said.update(("beyond", "near"))
            out.append(f"{self.device}: the run holds {gib} — more than the GPU has, so the driver lends system RAM "
                       "(Windows' sysmem fallback) and every step waits on it: expect steps 10-100x slower. " + _LESS)
        elif reading.reserved_fraction >= self.near_full and "near" not in self._said:
            self._said.add("near")
            out.append(f"{self.device}: the run holds {gib} ({math.floor(100 * reading.reserved_fraction)} %), "
                       "near the GPU's size: on Windows the driver may then lend system RAM instead of failing "
                       "(sysmem fallback), and steps become many times slower. If they do: " + _LESS)
        return out


def memory_watch(device: str | torch.device, *, near_full: float = 0.95) -> MemoryWatch | None:
    """A :class:`MemoryWatch` of ``device`` when it is a CUDA device; ``None`` for any other (a CPU,
    MPS: nothing to read)."""
    if torch.device(device).type != "cuda":
        return None
    return MemoryWatch(device, near_full=near_full)
