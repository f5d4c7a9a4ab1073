"""The GPU check rehearsed on a CPU (issue 16): what ``benchmarks/gpu_check.sh`` runs the day a GPU
is lent must run first time, though that code cannot run here.

* The script's test lists name every CUDA-only test, and ``-k cuda`` selects each of them.
* Its benchmark command lines parse (options renamed, variants moved between modes).
* ``emulated_cuda``: torch's CUDA API stood in for on the CPU — ``device="cuda"`` tensors, generators
  and modules land on the CPU, graphs record by running their body once and replay by running it
  again on the static inputs (as ``replaying_cuda_graphs``), streams and syncs do nothing. The CUDA
  branches of the benchmark (capturable optimisers, the strict :class:`CapturedStep`, channels_last)
  and the CUDA tests' own bookkeeping then run as on the GPU; what it cannot show is what the
  kernels do (speed, bf16 reductions, sync debug mode). It runs on a CPU build of torch and on a CUDA build
  without a driver (a contributor's machine): there ``torch.accelerator`` and the Triton checks answer as on
  a CPU build, since asking the device would initialise CUDA ("Found no NVIDIA driver").
"""

from __future__ import annotations

import ast
import contextlib
import re
from pathlib import Path

import pytest
import torch

from sdadapt.training.engine_backward import BackwardKeepingMode

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


# ------------------------------------------------------------------------------ the script's lists
def _script_array(name: str) -> list[str]:
    """The entries of the bash array ``NAME=(...)`` in gpu_check.sh."""
    match = re.search(rf"^{name}=\((.*?)\)", SCRIPT.read_text(), re.S | re.M)
    assert match, f"gpu_check.sh has no {name}=(...) array"
    return match.group(1).split()


def _skips_without_cuda(node: ast.expr) -> bool:
    """Whether ``node`` is ``pytest.mark.skipif(not torch.cuda.is_available(), ...)``."""
    return (isinstance(node, ast.Call) and ast.unparse(node.func).endswith("skipif") and bool(node.args)
            and "cuda.is_available" in ast.unparse(node.args[0]))


def cuda_only_tests(path: Path) -> list[str]:
    """Node ids (``file::function[param]`` for a CUDA-only parameter) of the tests in ``path`` that skip
    without CUDA: a ``skipif(not torch.cuda.is_available())`` decorator (or a module-level name bound
    to one), or a ``pytest.param(..., marks=skipif(...))`` parameter."""
    tree = ast.parse(path.read_text())
    aliases = {target.id for node in tree.body if isinstance(node, ast.Assign) and _skips_without_cuda(node.value)
               for target in node.targets if isinstance(target, ast.Name)}
    found = []
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test"):
            continue
        decorators = [ast.unparse(d) for d in node.decorator_list]
        if any(_skips_without_cuda(d) for d in node.decorator_list) or any(d.lstrip("@") in aliases for d in decorators):
            found.append(f"{path.name}::{node.name}")
            continue
        for call in ast.walk(ast.Module(body=node.decorator_list, type_ignores=[])):
            if (isinstance(call, ast.Call) and ast.unparse(call.func).endswith("param") and call.args
                    and any(k.arg == "marks" and _skips_without_cuda(k.value) for k in call.keywords)):
                found.append(f"{path.name}::{node.name}[{ast.literal_eval(call.args[0])}]")
    return found


def test_the_script_runs_every_cuda_only_test():
    """A CUDA test the GPU check leaves out never runs anywhere: every test that skips without CUDA
    is in one of the script's lists and its id contains "cuda" (what ``pytest -k cuda`` selects)."""
    listed = _script_array("CORE_TESTS") + _script_array("MORE_TESTS")
    assert all((ROOT / f).is_file() for f in listed), [f for f in listed if not (ROOT / f).is_file()]
    assert len(set(listed)) == len(listed)
    tests = [t for path in sorted((ROOT / "tests").glob("test_*.py")) for t in cuda_only_tests(path)]
    assert len(tests) > 30  # (the scan finds them: 33 functions when this was written)
    missed = [t for t in tests if f"tests/{t.split('::')[0]}" not in listed]
    unselected = [t for t in tests if "cuda" not in t.lower()]
    assert missed == [] and unselected == [], (missed, unselected)


def test_the_scan_sees_each_way_of_marking_a_test_cuda_only(tmp_path):
    path = tmp_path / "test_marks.py"
    path.write_text(
        "import pytest, torch\n"
        "GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason='x')\n"
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='x')\ndef test_a(): pass\n"
        "@GPU\ndef test_b(): pass\n"
        "@pytest.mark.parametrize('d', ['cpu', pytest.param('cuda', marks=pytest.mark.skipif(\n"
        "    not torch.cuda.is_available(), reason='x'))])\ndef test_c(d): pass\n"
        "@pytest.mark.skipif(True, reason='x')\ndef test_d(): pass\n"
        "def test_e(): pass\n")
    assert cuda_only_tests(path) == ["test_marks.py::test_a", "test_marks.py::test_b", "test_marks.py::test_c[cuda]"]


# ------------------------------------------------------------------------ the benchmark command lines
def _bench_lines() -> list[tuple[str, list[str]]]:
    """``(name, arguments)`` of each ``bench NAME SECONDS ARGS...`` line of the script (continuations joined)."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    return [(m.group(1), m.group(2).split()) for m in re.finditer(r"^bench (\w+) \d+ (.*)$", text, re.M)]


def _branches() -> list[tuple[list[str], dict[str, str]]]:
    """``(BENCH's arguments, {variable: value})`` of the script's dry-run and GPU branches: each
    ``BENCH=(python3 benchmarks/train_step.py ...)`` line and the ``NAME=value`` words of the next."""
    found = re.findall(r"BENCH=\(python3 benchmarks/train_step.py (.*?)\)\n(.*)\n", SCRIPT.read_text())
    return [(prefix.split(), dict(word.split("=", 1) for word in assignments.split())) for prefix, assignments in found]


def test_the_scripts_benchmark_lines_parse_and_name_each_modes_own_variants():
    import train_step

    lines = _bench_lines()
    assert [name for name, _ in lines] == ["lora", "compiled", "full", "lora_more"]  # (the goal rows first)
    branches = _branches()
    assert len(branches) == 2 and branches[0][1].keys() == branches[1][1].keys()  # the dry run's and the GPU's
    assert branches[1][1]["LARGE"] == "8" and "sd15" in branches[1][0]  # (the rows issue 16 asks for)
    for prefix, values in branches:
        for name, words in lines:
            args = [re.sub(r"\$(\w+)", lambda m: values[m.group(1)], word) for word in words]  # (KeyError: unset)
            device = ["--device", "cuda"] if "--device" not in prefix else []  # (sd15 refuses a CPU)
            parsed = train_step.parse_args(prefix + device + ["--out", f"/tmp/{name}.json"] + args)
            assert parsed.variants, name
            for mode in parsed.modes:  # each variant named runs in a mode of the line
                assert set(parsed.variants) <= set().union(*(train_step.VARIANTS[m] for m in parsed.modes))
                assert train_step.variants_of(mode, parsed, torch.device("cuda"))
    named = {(mode, v) for _, words in lines for parsed in [train_step.parse_args(
        ["--device", "cuda", "--config", "sd15"] + [re.sub(r"\$(\w+)", lambda m: branches[1][1][m.group(1)], w) for w in words])]
        for mode in parsed.modes for v in parsed.variants}
    assert named == {(m, v) for m in ("lora", "full") for v in train_step.VARIANTS[m]}  # every LoRA and full FT variant runs


def test_the_goals_mode_runs_the_goal_rows_and_their_tests():
    """``gpu_check.sh --goals`` (a short re-check): its bench lines parse on the GPU branch and name issue
    16's goal variants; its test files exist."""
    import train_step

    text = SCRIPT.read_text().replace("\\\n", " ")
    lines = [(m.group(1), m.group(2).split()) for m in re.finditer(r"^\s+bench (goals_\w+) \d+ (.*)$", text, re.MULTILINE)]
    assert [name for name, _ in lines] == ["goals_lora", "goals_full", "goals_more"]
    compiled = re.search(r"^\s+bench compiled_only (\d+) (.*)$", text, re.MULTILINE)  # (--compiled: one row, a long limit)
    parsed = train_step.parse_args(["--device", "cuda", "--config", "sd15"] + compiled.group(2).replace("$LARGE", "8").split())
    assert "sdadapt-compiled-captured" in parsed.variants and int(compiled.group(1)) >= 400 and parsed.batch == [8]
    assert "sdadapt-regional-captured" in parsed.variants
    values = _branches()[1][1]
    named = set()
    for _, words in lines:
        args = [re.sub(r"\$(\w+)", lambda m: values[m.group(1)], word) for word in words]
        parsed = train_step.parse_args(["--device", "cuda", "--config", "sd15"] + args)
        named |= {(mode, v) for mode in parsed.modes for v in train_step.variants_of(mode, parsed, torch.device("cuda"))}
    assert {("lora", "peft-unet"), ("lora", "sdadapt-captured"), ("lora", "sdadapt-captured-nchw"), ("full", "reference"),
            ("full", "sdadapt-lean-captured"), ("full", "sdadapt-fast-captured"), ("lora", "sdadapt-captured-halfnorms"),
            ("lora", "sdadapt-captured-nchw-halfnorms"), ("full", "sdadapt-fast-captured-halfnorms"),
            ("lora", "sdadapt-captured-qkv-halfnorms"), ("full", "sdadapt-lean-captured-halfnorms"),
            ("lora", "sdadapt-captured-nchw-percall-halfnorms"), ("lora", "sdadapt-captured-fused-halfnorms"),
            ("lora", "sdadapt-captured-nchw-percall-fused-halfnorms")} == named
    tests = re.search(r'step "cuda tests \(goal paths\)" \d+ (.*)', text).group(1).split()
    files = [t for t in tests if t.startswith("tests/")]
    assert len(files) >= 5 and all((ROOT / f).is_file() for f in files)


# ------------------------------------------------------------------------------------ emulated CUDA
def _on_cpu(device: object) -> object:
    if isinstance(device, torch.device):
        return torch.device("cpu") if device.type == "cuda" else device
    if isinstance(device, str) and device.startswith("cuda"):
        return "cpu"
    return device


class _CudaOnCpu(BackwardKeepingMode):
    """``device="cuda"`` (keyword or ``.to``'s argument) means the CPU; ``.cuda()``, ``pin_memory()``
    and ``record_stream`` do nothing; in the Python code backward runs too (hooks, recomputes)."""

    def handle(self, func, args, kwargs):
        kwargs = dict(kwargs)
        if "device" in kwargs:
            kwargs["device"] = _on_cpu(kwargs["device"])
        name = getattr(func, "__name__", "")
        if name in ("cuda", "pin_memory"):
            return args[0]
        if name == "record_stream":
            return None
        if name == "to":
            args = tuple(_on_cpu(a) for a in args)
        return func(*args, **kwargs)


class _Stream:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass

    def synchronize(self) -> None:
        pass


class _Graph:
    """A recorded body (``step_capture._record``), replayed by running it again into its outputs."""

    def __init__(self, *args, **kwargs) -> None:
        self.replays, self.body, self.outputs = 0, None, {}

    def register_generator_state(self, generator) -> None:
        pass

    def replay(self) -> None:
        self.replays += 1
        if self.replays > 1:  # (the first replay stands for the capture's own run)
            for key, value in self.body().items():
                self.outputs[key].copy_(value)


_CpuGenerator = torch.Generator
_CAPTURING = [False]  # inside an emulated capture


class _Generator(_CpuGenerator):
    def __new__(cls, device="cpu"):
        if _CAPTURING[0]:  # (CUDA refuses a CUDA one — the issue-16 crash; here every generator is a CPU one)
            raise RuntimeError("Cannot construct a new CUDAGeneratorImpl during CUDA graph capture (emulated)")
        return _CpuGenerator.__new__(cls, _on_cpu(device))

    def __init__(self, device="cpu") -> None:
        pass


def _rng_state(*args, **kwargs) -> torch.Tensor:
    """``torch.cuda.get_rng_state()``: refused inside a capture, as CUDA refuses reading the seed."""
    if _CAPTURING[0]:
        raise RuntimeError("Cannot call CUDAGeneratorImpl::current_seed during CUDA graph capture (emulated)")
    return torch.zeros(16, dtype=torch.uint8)


@pytest.fixture()
def emulated_cuda(monkeypatch):
    """torch's CUDA API on a CPU (see the module docstring)."""
    from torch._dynamo.trace_rules import get_torch_obj_rule_map
    from torch.optim import adam as torch_adam

    from sdadapt.training import step_capture
    from sdadapt.training.host_syncs import HostSyncs

    get_torch_obj_rule_map()  # (dynamo's cached map of torch's functions: made of the real ones, not the stand-ins)

    def returning(value):
        return lambda *args, **kwargs: value  # (one function per name: dynamo refuses one object under two names)

    for name, value in {"is_available": returning(True), "device_count": returning(1), "current_device": returning(0),
                        "synchronize": returning(None), "set_sync_debug_mode": returning(None),
                        "manual_seed": returning(None), "get_device_name": returning("emulated"),
                        "reset_peak_memory_stats": returning(None), "max_memory_allocated": returning(0),
                        "memory_allocated": returning(0), "max_memory_reserved": returning(0),
                        "empty_cache": returning(None), "is_bf16_supported": returning(True), "CUDAGraph": _Graph,
                        "get_rng_state": _rng_state, "set_rng_state": returning(None),
                        "is_current_stream_capturing": lambda: _CAPTURING[0],
                        "graph": lambda *a, **k: contextlib.nullcontext(), "Stream": _Stream,
                        "stream": lambda s: contextlib.nullcontext(), "current_stream": lambda *a: _Stream()}.items():
        monkeypatch.setattr(torch.cuda, name, value)
    monkeypatch.setattr(torch, "Generator", _Generator)
    # (torch.accelerator as on a CPU build, whose answer is None: on a CUDA build without a driver it would
    # initialise CUDA — torch.optim's capture health check asks it — and fail "Found no NVIDIA driver")
    monkeypatch.setattr(torch.accelerator, "current_accelerator", returning(None))
    # (and no Triton package, as on a CPU build: with one, compiling asks the CUDA device's properties)
    import torch.utils._triton as triton_checks

    cached_checks = [f for f in vars(triton_checks).values() if hasattr(f, "cache_clear")]
    monkeypatch.setattr(triton_checks, "has_triton_package", returning(False))
    for check in cached_checks:
        check.cache_clear()
    monkeypatch.setattr(torch_adam, "_get_capturable_supported_devices", lambda *a, **k: ["cpu", "cuda"])
    real_problems = step_capture.capture_problems
    monkeypatch.setattr(step_capture, "capture_problems",
                        lambda *a: [p for p in real_problems(*a) if "CUDA device" not in p])

    def record(graph, body, stream=None):
        """The capture: ``body`` run once, refusing what CUDA refuses while capturing (a generator made,
        a host sync: a read or a blocking copy)."""
        _CAPTURING[0] = True
        try:
            with HostSyncs() as syncs:
                graph.body, graph.outputs = body, body()
        finally:
            _CAPTURING[0] = False
        if syncs.events:
            raise RuntimeError("operation not permitted when stream is capturing (emulated): " + syncs.report())
        return graph.outputs

    monkeypatch.setattr(step_capture, "_record", record)
    try:
        with _CudaOnCpu():
            yield
    finally:
        for check in cached_checks:  # (their answers under the stand-ins are not the process's)
            check.cache_clear()


# --------------------------------------------------------------------------- the CUDA code, emulated
@pytest.mark.parametrize("mode", ["lora", "full", "ti"])
def test_the_cuda_graph_test_runs_on_emulated_cuda(emulated_cuda, mode):
    """tests/test_train.py's CUDA comparison of captured and eager steps, its bookkeeping run here."""
    from test_train import test_cuda_graph_step_matches_eager_steps

    test_cuda_graph_step_matches_eager_steps(mode)


def test_the_host_sync_test_runs_on_emulated_cuda(emulated_cuda):
    """tests/test_train.py's CUDA host-sync test: an eager fused step beside a captured one (it once
    shared the parameters, so train_step's ``zero_grad(set_to_none=True)`` dropped the gradients the
    captured step owns: CaptureError on the GPU)."""
    from test_train import test_cuda_step_has_no_host_sync

    test_cuda_step_has_no_host_sync()


def test_a_capture_that_reads_the_rng_state_says_what_to_do(emulated_cuda):
    """A forward that reads the CUDA RNG state (what ``torch.utils.checkpoint(..., preserve_rng_state=True)``
    does with CUDA tensors: a model's own gradient checkpointing) trains in the eager warm-up and is refused
    at the capture with a ``CaptureError`` naming sdadapt's checkpointing and ``preserve_rng_state=False``
    (CUDA's own error is kept as its cause)."""
    import sdadapt
    from sdadapt.targets import by_type
    from sdadapt.toy import ToyUNet
    from sdadapt.training.step import StepConfig, TrainState
    from sdadapt.training.step_capture import CaptureError, CapturedStep

    torch.manual_seed(0)
    unet = ToyUNet()
    params = list(sdadapt.inject(unet, by_type(torch.nn.Linear), sdadapt.LoRAConfig(rank=4, init="gaussian")).parameters())

    def model(x, t, c):
        torch.cuda.get_rng_state()  # (torch.utils.checkpoint's get_device_states)
        return unet(x, t, c)

    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-3), capturable=True)
    step = CapturedStep(model, params=params, optimizer=opt, config=StepConfig(), warmup_steps=1,
                        alphas_cumprod=torch.linspace(0.99, 0.01, 100))
    batch = {"latents": torch.randn(2, unet.config["in_channels"], 8, 8),
             "cond": torch.randn(2, 6, unet.config["context_dim"])}
    state = TrainState(seed=0)
    assert torch.isfinite(step(batch, state=state)["loss"])  # (the warm-up: eager)
    with pytest.raises(CaptureError, match="enable_checkpointing.*preserve_rng_state=False") as caught:
        step(batch, state=state)
    assert "current_seed" in str(caught.value.__cause__)


@pytest.fixture()
def captured_steps(monkeypatch):
    """Every :class:`CapturedStep` made from now on (appended to the list this returns)."""
    from sdadapt.training import step_capture

    made = []

    class Recorded(step_capture.CapturedStep):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(step_capture, "CapturedStep", Recorded)
    return made


@pytest.mark.parametrize("mode, variant", [("lora", "sdadapt-captured"), ("lora", "sdadapt-captured-nchw"),
                                           ("lora", "sdadapt-captured-qkv"), ("lora", "sdadapt-compiled-captured"),
                                           ("full", "sdadapt-lean-captured"), ("full", "sdadapt-fast-captured"),
                                           ("full", "sdadapt-small-captured"), ("lora", "sdadapt-captured-halfnorms"),
                                           ("lora", "sdadapt-captured-nchw-halfnorms"), ("full", "sdadapt-fast-captured-halfnorms"),
                                           ("lora", "sdadapt-captured-qkv-halfnorms"), ("lora", "sdadapt-regional-captured"),
                                           ("full", "sdadapt-lean-captured-halfnorms"),
                                           ("lora", "sdadapt-captured-nchw-percall-halfnorms"),
                                           ("lora", "sdadapt-captured-fused-halfnorms"),
                                           ("lora", "sdadapt-captured-nchw-percall-fused-halfnorms")])
def test_the_benchmarks_captured_rows_capture_on_emulated_cuda(emulated_cuda, captured_steps, mode, variant):
    """The GPU branch of benchmarks/train_step.py (capturable torch / sdadapt AdamW with a tensor LR,
    channels_last, the strict CapturedStep; the lean row's checkpointed transformer blocks, int8
    states and stochastic rounding of bf16 weights) on the tiny models: after the warm-up the step is
    captured once and replayed, reads nothing back to the host and trains — what the dry run, whose
    CPU step falls back to eager, never reaches."""
    import argparse

    import train_step

    from sdadapt.training.host_syncs import HostSyncs

    device = torch.device("cuda")
    models = train_step.Models(train_step.CONFIGS["tiny"], seed=0)
    batch = train_step.make_batch(train_step.CONFIGS["tiny"], 2, device, seed=1)
    step, unet, _ = train_step.build_ours(mode, variant, models, device, torch.bfloat16, batch,
                                          argparse.Namespace(compile_backend="eager"))
    (captured,) = captured_steps
    assert captured.problems == [] and captured.config.channels_last == ("-nchw" not in variant)
    assert captured.config.half_precision_norms == variant.endswith("-halfnorms")
    assert captured.config.fused_lora_linear == (mode == "lora" and "-fused" in variant)
    trained = [p.detach().clone() for p in captured.params]
    losses = [step() for _ in range(captured.warmup_steps + 1)]  # warm-up, then the capture
    assert captured.graph_count == 1
    with HostSyncs() as syncs:
        losses += [step() for _ in range(2)]
    assert syncs.events == [], syncs.report()
    (graph,) = [entry.graph for entry in captured._graphs.values()]
    assert graph.replays == 3 and torch.isfinite(torch.stack(losses)).all()
    assert len(set(float(v) for v in losses[-3:])) == 3  # each replay drew new noise
    assert sum(not torch.equal(p, q) for p, q in zip(captured.params, trained)) > len(trained) / 2, variant


def test_the_benchmarks_gpu_copies_equal_its_cpu_copies(emulated_cuda):
    """On a GPU ``Models.copy`` copies from host models cast once per dtype: the same values and dtypes as
    the CPU path's cast of the float32 originals, a fresh copy each time (a row training its copy leaves
    the next row's alone), the cast made once."""
    import train_step

    models = train_step.Models(train_step.CONFIGS["tiny"], seed=0)
    for dtype, unet_dtype in ((torch.bfloat16, None), (torch.bfloat16, torch.float32), (torch.float16, None)):
        theirs = models.copy(torch.device("cpu"), dtype, unet_dtype=unet_dtype)
        ours = models.copy(torch.device("cuda"), dtype, unet_dtype=unet_dtype)
        for a, b in zip([theirs[0], theirs[1], *theirs[2]], [ours[0], ours[1], *ours[2]]):
            sa, sb = a.state_dict(), b.state_dict()
            assert list(sa) == list(sb)
            for key in sa:
                assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
        with torch.no_grad():
            next(ours[0].parameters()).add_(1.0)
        again = models.copy(torch.device("cuda"), dtype, unet_dtype=unet_dtype)[0]
        assert torch.equal(next(again.parameters()), next(theirs[0].parameters()))
    assert set(models._cast) == {torch.bfloat16, torch.float16}


def test_the_busy_fraction_counts_each_kernel_once():
    """A profiled CUDA step lists the kernels and the CPU ops that launched them, both with a self
    device time: the busy time is the kernels' alone (summing both counted it twice)."""
    from types import SimpleNamespace

    import train_step
    from torch.autograd import DeviceType

    events = [SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=30.0),  # aten::mm, its kernels' time
              SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=20.0),  # the gemm kernel
              SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=10.0),  # a copy on the device
              SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=0.0)]  # host-only op
    assert train_step.kernel_time_us(events) == 30.0


def test_a_benchmark_cut_by_its_time_limit_keeps_the_rows_it_finished(tmp_path, monkeypatch):
    """gpu_check.sh runs each benchmark under `timeout`: the JSON and markdown are rewritten after
    every row, so a run killed during its third variant leaves the first two (the first H200 run lost
    all twelve LoRA rows to a 200 s limit)."""
    import json

    import train_step

    real, calls = train_step.measure, []

    def dying(mode, variants, *args, on_variant, **kwargs):  # measures two variants, then is "killed"
        def counted(variant, measured):
            calls.append(variant)
            on_variant(variant, measured)
            if len(calls) == 2:
                raise KeyboardInterrupt

        return real(mode, variants, *args, on_variant=counted, **kwargs)

    monkeypatch.setattr(train_step, "measure", dying)
    out, table = tmp_path / "lora.json", tmp_path / "lora.md"
    with pytest.raises(KeyboardInterrupt):
        train_step.main(["--config", "tiny", "--device", "cpu", "--steps", "1", "--warmup", "0", "--modes", "lora",
                         "--batch", "1", "--variants", "peft-unet", "sdadapt", "sdadapt-captured-nchw", "--no-flops",
                         "--out", str(out), "--markdown", str(table)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == calls == ["peft-unet", "sdadapt"]
    assert all(r["ms_per_step"] > 0 for r in rows)
    assert "| lora | 1 | sdadapt |" in table.read_text() and "sdadapt-captured-nchw" not in table.read_text()


def test_the_benchmarks_cuda_measurement_runs_on_emulated_cuda(emulated_cuda, tmp_path):
    """``measure``'s CUDA branch (one variant after the other: build, warm-up, timed steps with the
    steady peak taken over their second half, the profile) and the files it writes after each row —
    the code that must work the first time on the lent GPU, where the CPU dry run never goes."""
    import json

    import train_step

    out, table = tmp_path / "lora.json", tmp_path / "lora.md"
    assert train_step.main(["--config", "tiny", "--device", "cuda", "--steps", "2", "--warmup", "1", "--modes", "lora",
                            "--batch", "1", "--variants", "peft-unet", "sdadapt-captured", "--no-flops",
                            "--compile-backend", "eager", "--peak-tflops", "1", "--out", str(out),
                            "--markdown", str(table)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["peft-unet", "sdadapt-captured"]
    assert all(r["ms_per_step"] > 0 and r["steady_mem_mib"] == 0 == r["built_mem_mib"] for r in rows)
    assert all(r["reserved_mem_mib"] == 0 == r["left_mem_mib"] for r in rows)
    assert "| steady peak (MiB) | built (MiB) | peak reserved (MiB) |" in table.read_text()
    assert "| lora | 1 | sdadapt-captured |" in table.read_text()


def test_profile_kernel_families_name_what_the_truncated_table_hides():
    """The benchmark's profile groups CUDA kernels by what their full names say (the table cuts them at
    60 characters, where ATen's elementwise kernels read alike): family and elementwise path, per step."""
    from types import SimpleNamespace

    import train_step
    from torch.autograd import DeviceType

    copy = ("void at::native::elementwise_kernel<128, 4, at::native::gpu_kernel_impl_nocast<at::native::"
            "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::"
            "{lambda(c10::BFloat16)#1}>")
    cast = ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda(at::TensorIteratorBase&)"
            "::{lambda()#3}::operator()() const::{lambda(float)#1}, std::array<char*, 2ul>, 4>")
    silu = "void at::native::vectorized_elementwise_kernel<8, at::native::(anonymous namespace)::silu_kernel(...)>"
    attention = "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0"
    events = [SimpleNamespace(key=copy, device_type=DeviceType.CUDA, self_device_time_total=20_000.0, count=552),
              SimpleNamespace(key=cast, device_type=DeviceType.CUDA, self_device_time_total=6_000.0, count=1000),
              SimpleNamespace(key=silu, device_type=DeviceType.CUDA, self_device_time_total=1_000.0, count=200),
              SimpleNamespace(key=attention, device_type=DeviceType.CUDA, self_device_time_total=16_000.0, count=20),
              SimpleNamespace(key="aten::copy_", device_type=DeviceType.CPU, self_device_time_total=26_000.0, count=9)]
    rows = {row["family"]: row for row in train_step.kernel_families(events, steps=2)}
    assert list(rows) == ["copy/cast (strided)", "attention", "copy/cast (unrolled)", "silu (contiguous)"]
    assert rows["copy/cast (strided)"] == {"family": "copy/cast (strided)", "calls": 276, "ms": 10.0}
    assert rows["attention"]["calls"] == 10 and rows["silu (contiguous)"]["ms"] == 0.5
    assert train_step.kernel_family("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT") == "matmul/conv"


def test_the_benchmarks_cuda_rows_say_which_call_made_their_peak(emulated_cuda, monkeypatch):
    """A CUDA row's ``call_peaks_mem``: each warm-up call's peak, the first timed call's (a captured
    row's capture) and the timed calls' up to the second half, whose own peak is the steady one; the
    row's peak is the largest of all. (Calls with made-up peaks, read through a stand-in allocator.)"""
    import argparse

    import train_step

    mib = 2**20
    made = [50, 60, 70, 500, 80, 90, 75, 75, 74, 73, 72, 71, 70]  # MiB: 3 warm-up calls, the capture, 4 + 5 more
    allocator = {"peak": 0.0, "calls": 0}

    def step():
        allocator["peak"] = max(allocator["peak"], made[allocator["calls"]] * mib)
        allocator["calls"] += 1
        return torch.tensor(1.0)

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: allocator["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a, **k: allocator.update(peak=0.0))
    monkeypatch.setattr(train_step, "_build", lambda *a, **k: (step,))
    args = argparse.Namespace(warmup=3, steps=10, profile=0)
    out = train_step.measure("lora", ("sdadapt-captured",), None, torch.device("cuda"), torch.bfloat16, None, args)
    row = out["sdadapt-captured"]
    assert allocator["calls"] == 13
    assert row["call_peaks_mem"] == [50, 60, 70, 500, 90]  # (timed calls 2-5: 80, 90, 75, 75)
    assert row["steady_mem"] == 74 and row["mem"] == 500  # (the second half: timed calls 6-10)
    table_row = {"mode": "lora", "batch": 1, "variant": "sdadapt-captured", "ms_per_step": 1.0, "images_per_s": 1.0,
                 "peak_mem_mib": 500, "steady_mem_mib": 74, "call_peaks_mib": row["call_peaks_mem"],
                 "tflops": float("nan")}
    table = train_step.markdown_table({"config": "sd15", "device_name": "stand-in", "torch": "x", "warmup": 3,
                                       "mixed_precision": "bf16", "rows": [table_row]})
    assert "| lora | 1 | sdadapt-captured | 50, 60, 70 | 500 | 90 | 74 |" in table  # (the capture's peak stands out)
