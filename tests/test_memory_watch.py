"""``sdadapt.training.memory_watch``: each step's peak and the reserved memory of a CUDA device, read
from the caching allocator's counters, and the near-full / beyond-the-device warnings (Windows'
sysmem fallback). On a CPU the allocator is a stand-in patched over ``torch.cuda``'s four functions
the watch calls; the train job's log columns, its lines and its result are checked through the CLI."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch

from sdadapt.cli import main
from sdadapt.training import memory_watch as watch_module
from sdadapt.training.memory_watch import (
    MEMORY_COLUMNS,
    MemoryReading,
    MemoryWatch,
    memory_watch,
)

GIB = 2**30


class StandInAllocator:
    """The counters the watch reads: ``allocated`` now, its peak since the last reset, ``reserved``;
    ``properties`` counts the device-property queries, ``resets`` the peak resets."""

    def __init__(self, monkeypatch, total: int) -> None:
        self.total, self.allocated, self.peak, self.reserved = total, 0, 0, 0
        self.properties = self.resets = 0
        self.devices: list[object] = []
        monkeypatch.setattr(torch.cuda, "get_device_properties", self._properties)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self._seen(device, self.peak))
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self._seen(device, self.reserved))
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self._reset)

    def _seen(self, device, value):
        self.devices.append(device)
        return value

    def _properties(self, device):
        self.properties += 1
        return SimpleNamespace(total_memory=self.total)

    def _reset(self, device=None):
        self.resets += 1
        self.peak = self.allocated

    def step(self, peak: int, after: int, reserved: int) -> None:
        """A step that allocated up to ``peak`` bytes and ends holding ``after``."""
        self.peak, self.allocated, self.reserved = max(self.peak, peak), after, reserved


def test_each_reading_is_the_peak_since_the_last_one(monkeypatch):
    allocator = StandInAllocator(monkeypatch, total=24 * GIB)
    watch = MemoryWatch("cuda:1")
    allocator.step(peak=5 * GIB, after=2 * GIB, reserved=6 * GIB)
    first = watch.read()
    assert first == MemoryReading(peak_allocated=5 * GIB, reserved=6 * GIB, total=24 * GIB)
    allocator.step(peak=3 * GIB, after=2 * GIB, reserved=6 * GIB)  # a smaller step: its own peak, not the first's
    second = watch.read()
    assert second.peak_allocated == 3 * GIB and allocator.resets == 2
    assert allocator.properties == 1  # (the device's size is asked once)
    assert all(torch.device(d) == torch.device("cuda:1") for d in allocator.devices)
    assert second.columns() == {"peak_allocated_mib": 3 * 1024.0, "reserved_mib": 6 * 1024.0}
    assert set(second.columns()) == set(MEMORY_COLUMNS) and second.reserved_fraction == 0.25


def test_warnings_come_once_per_level(monkeypatch):
    StandInAllocator(monkeypatch, total=8 * GIB)
    watch = MemoryWatch("cuda")
    below = MemoryReading(peak_allocated=GIB, reserved=int(7.5 * GIB), total=8 * GIB)  # 93.75 %
    near = MemoryReading(peak_allocated=GIB, reserved=int(7.8 * GIB), total=8 * GIB)  # 97.5 %
    beyond = MemoryReading(peak_allocated=GIB, reserved=9 * GIB, total=8 * GIB)
    assert watch.warnings(below) == []
    said = watch.warnings(near)
    assert len(said) == 1 and "7.8 GiB of the device's 8.0 GiB (97 %)" in said[0] and "Sysmem Fallback" in said[0]
    assert watch.warnings(near) == []
    said = watch.warnings(beyond)
    assert len(said) == 1 and "more than the GPU has" in said[0] and "--gradient-checkpointing" in said[0]
    assert watch.warnings(beyond) == [] and watch.warnings(near) == []
    straight = MemoryWatch("cuda", near_full=0.5)  # straight past the device: one message, not two
    assert len(straight.warnings(beyond)) == 1 and straight.warnings(near) == []
    assert len(MemoryWatch("cuda", near_full=0.9).warnings(below)) == 1  # (the level is the option)


@pytest.mark.parametrize("near_full", [0, -0.5, 1.01, True, "0.9", float("nan")])
def test_a_bad_level_is_refused(near_full):
    with pytest.raises(ValueError, match="near_full must be a fraction"):
        MemoryWatch("cuda", near_full=near_full)


def test_other_devices_have_nothing_to_watch():
    assert memory_watch("cpu") is None and memory_watch(torch.device("meta")) is None
    with pytest.raises(ValueError, match=r"not cpu \(memory_watch\(device\) returns None"):
        MemoryWatch("cpu")


def test_train_logs_the_columns_says_the_warning_and_reports_the_peak(red_circles, tmp_path, monkeypatch, capsys):
    """The job on a CUDA device (here the CPU run with the stand-in allocator and a watch of "cuda"):
    each step's row has the two columns, the near-full line comes once, at the step that crossed it,
    and the summary gives the run's largest readings."""
    allocator = StandInAllocator(monkeypatch, total=4 * GIB)
    readings = iter([(GIB, int(3.0 * GIB)), (2 * GIB, int(3.9 * GIB)), (GIB, int(3.95 * GIB))])  # 75 %, 97.5 %, 98.75 %
    real_read = MemoryWatch.read

    def read(self):
        peak, reserved = next(readings)
        allocator.step(peak=peak, after=0, reserved=reserved)
        return real_read(self)

    monkeypatch.setattr(MemoryWatch, "read", read)
    monkeypatch.setattr(watch_module, "memory_watch", lambda device: MemoryWatch("cuda"))
    out = tmp_path / "l.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--batch-size", "2", "--no-prior", "--steps", "3",
                 "--log-with", "csv", "-o", str(out)]) == 0
    with open(tmp_path / "l-log.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [(float(r["peak_allocated_mib"]), float(r["reserved_mib"])) for r in rows] == [
        (1024.0, 3 * 1024.0), (2048.0, 3.9 * 1024), (1024.0, 3.95 * 1024)]
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert text.count("near the GPU's size") == 1 and "step 2: cuda: the run holds 3.9 GiB" in text
    assert "GPU memory: 2.00 GiB peak allocated, 3.95 GiB reserved at most" in text
    assert allocator.resets == 3


def test_a_cpu_run_has_no_memory_columns(red_circles, tmp_path):
    out = tmp_path / "l.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--batch-size", "2", "--no-prior", "--steps", "1",
                 "--log-with", "csv", "-q", "-o", str(out)]) == 0
    with open(tmp_path / "l-log.csv", newline="", encoding="utf-8") as handle:
        header = next(csv.reader(handle))
    assert not set(MEMORY_COLUMNS) & set(header)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_the_reading_is_the_allocators():
    watch = MemoryWatch("cuda")
    watch.read()
    x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")  # 64 MiB
    del x
    reading = watch.read()
    assert reading.peak_allocated >= 64 * 2**20 and reading.reserved >= 64 * 2**20
    assert reading.total == torch.cuda.get_device_properties(0).total_memory
    assert watch.read().peak_allocated < reading.peak_allocated  # (reset: the tensor is gone)


def test_the_docs_example_runs(capsys):
    from docs_pages import run_block_with

    namespace = run_block_with("train.md", "memory_watch(device)")
    watching = torch.cuda.is_available()
    assert (namespace["watch"] is not None) == watching
    out = capsys.readouterr().out
    assert ("watching" if watching else "nothing to watch on cpu") in out
    if watching:  # (three readings, each with both columns)
        assert out.count("peak_allocated_mib") == 3
