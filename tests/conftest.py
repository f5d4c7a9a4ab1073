"""Shared test settings."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine torch's
    thread pool can make each small conv many times slower: run the suite single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeCUDAGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on a CPU (see :func:`fake_cuda_graphs`): the captured
    block ran once, eagerly, when it was "captured"; ``replay()`` only counts."""

    def __init__(self) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1

    def register_generator_state(self, generator: torch.Generator) -> None:
        pass


@pytest.fixture()
def fake_cuda_graphs(monkeypatch):
    """torch.cuda's graph and stream API replaced by stand-ins, and ``CapturedStep`` told its step
    can be captured: its capture bookkeeping (warm-up, one graph per layout, static inputs) runs on
    a CPU, the "capture" running the step eagerly once (leaving ``.grad`` bound, as a real capture)."""
    import contextlib

    from sdadapt.training import step_capture

    stream = type("FakeStream", (), {"wait_stream": lambda self, other: None})
    monkeypatch.setattr(step_capture, "capture_problems", lambda *a: [])
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeCUDAGraph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream())


@pytest.fixture()
def red_circles(tmp_path):
    """A folder of three random 32x32 PNGs captioned "a red circle" (a toy-model training set)."""
    from sdadapt.images import write_png

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        write_png(folder / f"{i}.png", torch.rand(3, 32, 32, generator=g) * 2 - 1)
        (folder / f"{i}.txt").write_text("a red circle")
    return folder
