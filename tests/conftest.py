"""Shared test settings."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# the benchmarks' modules (train_step, norm_casts, aten_ops: the aten-op counter) import as top-level modules,
# as they do when a benchmark runs (last on the path: nothing installed is shadowed by their short names)
sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))

# bytecode caches, kept out of the tree: with PYTHONDONTWRITEBYTECODE set (as on the CI machine) each xdist worker and
# each subprocess a test starts compiled sdadapt's modules (and pytest the test files) again — ~1.5 s a CLI subprocess;
# tests/test_cli_inspect_many.py took 29 s instead of 9. They go under the temp folder (PYTHONPYCACHEPREFIX) instead.
# The folder is this user's own (made 0700, used only when this user owns it): nobody else's .pyc files get in.
_PYCACHE = Path(tempfile.gettempdir()) / f"sdadapt-tests-pycache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
if sys.dont_write_bytecode:
    try:
        _PYCACHE.mkdir(mode=0o700, exist_ok=True)
        _OWN = not hasattr(os, "getuid") or _PYCACHE.stat().st_uid == os.getuid()
    except OSError:  # (a read-only temp folder: no caches, as the environment asked)
        _OWN = False
    if _OWN:
        sys.dont_write_bytecode = False
        sys.pycache_prefix = str(_PYCACHE)
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = sys.pycache_prefix

# the same for the subprocesses tests start (examples, the CLI, torchrun): on a busy 2-core machine a child
# with torch's default thread pool ran a tiny example ~10x slower than with one thread (4 min against 22 s)
os.environ["OMP_NUM_THREADS"] = "1"
os.environ["MKL_NUM_THREADS"] = "1"


def pytest_runtest_logreport(report) -> None:
    """``SDADAPT_INSTAFAIL=1`` (benchmarks/gpu_check.sh sets it): each failure's traceback is written
    to stderr as it happens, not only in the summary at the end — a step cut by its time limit still
    shows why the tests that ran failed."""
    if os.environ.get("SDADAPT_INSTAFAIL") == "1" and report.failed:
        import sys

        sys.__stderr__.write(f"\n---- FAILED {report.nodeid} ({report.when})\n{report.longreprtext}\n")
        sys.__stderr__.flush()


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
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, stream=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream())


class ReplayingCUDAGraph(FakeCUDAGraph):
    """A stand-in graph whose replays compute (see :func:`replaying_cuda_graphs`): the capture ran the
    captured code once — the step the first replay after a capture stands for — and each later
    replay runs it again and writes its outputs into the captured output tensors."""

    body = None
    outputs: dict = {}

    def replay(self) -> None:
        self.replays += 1
        if self.replays > 1:
            for key, value in self.body().items():
                self.outputs[key].copy_(value)


@pytest.fixture()
def replaying_cuda_graphs(fake_cuda_graphs, monkeypatch):
    """:func:`fake_cuda_graphs` whose replays run the captured code again on the static inputs, writing
    into the same output tensors: on a CPU, the memory a real replay reads and writes — faithful for
    code that adds into gradients existing before the capture (``CapturedStep`` owns them), as a
    recorded in-place add replays as an add."""
    from sdadapt.training import step_capture

    def record(graph, body, stream=None):
        graph.body, graph.outputs = body, body()
        return graph.outputs

    monkeypatch.setattr(torch.cuda, "CUDAGraph", ReplayingCUDAGraph)
    monkeypatch.setattr(step_capture, "_record", record)


@pytest.fixture()
def prepared_batches(monkeypatch):
    """``record(module, *keys)``: from then on each call of ``module.prepare_batch`` (``sdadapt.training.step``'s
    or ``step_capture``'s: the eager and the captured step) appends a tuple of clones of those entries of
    what it returns (``"x_t"``, ``"weights"`` ...) to the list ``record`` returns."""

    def record(module, *keys: str) -> list[tuple[torch.Tensor, ...]]:
        real, seen = module.prepare_batch, []

        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            seen.append(tuple(out[key].clone() for key in keys))
            return out

        monkeypatch.setattr(module, "prepare_batch", spy)
        return seen

    return record


@pytest.fixture()
def train_step_batches(monkeypatch):
    """The batches ``fit`` (``sdadapt.methods.fit``) hands to ``train_step``: a list that gets each one as its
    step starts."""
    import importlib

    fit_module = importlib.import_module("sdadapt.methods.fit")
    seen: list[dict] = []
    real = fit_module.train_step

    def spy(model, batch, **kwargs):
        seen.append(batch)
        return real(model, batch, **kwargs)

    monkeypatch.setattr(fit_module, "train_step", spy)
    return seen


@pytest.fixture()
def train_fit_calls(monkeypatch):
    """What ``python -m sdadapt train`` (``sdadapt.jobs.train``) calls ``fit`` with: a list that gets, at each
    call, a namespace of its ``system``, ``adaptation``, ``dataset`` (fit's ``images``) and ``config``."""
    import importlib
    import inspect
    from types import SimpleNamespace

    jobs = importlib.import_module("sdadapt.jobs.train")
    calls: list[SimpleNamespace] = []
    real = jobs.fit
    signature = inspect.signature(real)

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        calls.append(SimpleNamespace(system=bound["system"], adaptation=bound["adaptation"], dataset=bound["images"],
                                     config=bound["config"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "fit", spy)
    return calls


@pytest.fixture()
def cross_captions(tmp_path):
    """A folder of the toy's four "cross" concept images captioned "a red cross" (a toy-model training set)."""
    from sdadapt.images import write_png
    from sdadapt.toy.evaluate import concept_data

    folder = tmp_path / "imgs"
    folder.mkdir()
    images, _ = concept_data("cross", 4, seed=0)
    for i, image in enumerate(images):
        write_png(folder / f"i{i}.png", image)
        (folder / f"i{i}.txt").write_text("a red cross")
    return folder


@pytest.fixture()
def red_circles(tmp_path):
    """A folder of three random 32x32 PNGs captioned "a red circle" (a toy-model training set)."""
    from train_inputs import captioned_pngs

    return captioned_pngs(tmp_path / "imgs", [(32, 32)] * 3)


@pytest.fixture()
def three_shapes(tmp_path):
    """Three random PNGs of three shapes (32x40, 40x32, 32x32: two buckets at resolution 32, step 4)
    captioned "a red circle"."""
    from train_inputs import captioned_pngs

    return captioned_pngs(tmp_path / "imgs", [(32, 40), (40, 32), (32, 32)])


@pytest.fixture()
def tensorboard_scalars(monkeypatch):
    """A stand-in ``torch.utils.tensorboard`` whose ``SummaryWriter`` records every ``add_scalar`` call;
    returns the list of ``(tag, value, step)`` it fills."""
    import sys
    import types

    scalars: list[tuple] = []

    class Writer:
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            pass

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = Writer
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    return scalars
