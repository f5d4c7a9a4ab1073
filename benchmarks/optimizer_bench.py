"""The harness of the optimiser-step benchmarks (``lion_step.py``, ``prodigy_step.py``, ``dadapt_step.py``,
``schedule_free_step.py``).

A step benchmark: a LoRA-shaped parameter set (``--layers`` down/up pairs of ``(rank, width)`` /
``(width, rank)`` matrices: SD1.5's 192 LoRA layers at rank 16 by default, widths 320–1280) with
the same seeded weights and gradients for every variant; each round times one ``step()`` of every
variant in turn (alternating, so machine drift hits all alike) after a warm-up; the median over
rounds, the aten ops one step dispatches (views left out: on a GPU each other op is about one
kernel launch) and its host reads (``HostSyncs``: on a GPU each waits for the queued work); a
Markdown table printed and ``benchmarks/results/<name>-<device>.json`` written.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from aten_ops import AtenOps

from sdadapt.training.host_syncs import HostSyncs

__all__ = ["StepRun", "aten_ops", "host_reads", "lora_parameters", "lora_shapes", "measure_steps",
           "parse_step_args", "report", "step_runs", "timed_medians"]

#: an optimiser of the benchmark made for a list of parameters
Factory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


def aten_ops(step: Callable[[], object]) -> int:
    """The non-view aten ops ``step()`` dispatches."""
    with AtenOps() as counter:
        step()
    return counter.ops


def host_reads(step: Callable[[], object]) -> int:
    """The host reads (device-to-host waits) ``step()`` makes, as ``HostSyncs`` counts them."""
    with HostSyncs() as syncs:
        step()
    return len(syncs.reads())


def lora_shapes(layers: int, rank: int) -> list[tuple[int, int]]:
    """``layers`` down/up pairs ``(rank, width), (width, rank)``, widths 320, 640, 1280, 1280 in equal shares."""
    widths = (320, 640, 1280, 1280)
    shapes: list[tuple[int, int]] = []
    for i in range(layers):
        width = widths[i * len(widths) // layers]
        shapes += [(rank, width), (width, rank)]
    return shapes


def lora_parameters(shapes: Sequence[tuple[int, int]], device: str, *, seed: int = 0) -> list[torch.nn.Parameter]:
    """Standard-normal parameters of ``shapes`` on ``device``, each with a standard-normal ``.grad``
    (all drawn from one generator seeded ``seed``: the same for every variant)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(device)
    return params


def parse_step_args(doc: str) -> argparse.Namespace:
    """The step benchmarks' command line: ``--device``, ``--layers`` (also spelt ``--tensors``),
    ``--rank``, ``--rounds``, ``--warmup``."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", "--tensors", dest="layers", type=int, default=192,
                        help="LoRA layers (two matrices each)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    return parser.parse_args()


class StepRun:
    """One variant: its parameters (with gradients) and its optimiser."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
        self.params = params
        self.optimizer = optimizer


def step_runs(variants: dict[str, Factory], shapes: Sequence[tuple[int, int]], device: str) -> dict[str, StepRun]:
    """Each variant's optimiser over its own copy of ``lora_parameters(shapes, device)``."""
    runs = {}
    for name, make in variants.items():
        params = lora_parameters(shapes, device)
        runs[name] = StepRun(params, make(params))
    return runs


def timed_medians(runs: dict[str, StepRun], args: argparse.Namespace,
                  before: Callable[[StepRun], None] | None = None) -> dict[str, float]:
    """The median seconds of one ``optimizer.step()`` per variant over ``args.rounds`` alternating rounds
    after ``args.warmup``; ``before(run)`` is called ahead of each step, outside the timing."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    cuda = args.device != "cpu"
    for round_ in range(args.warmup + args.rounds):
        for name, run in runs.items():
            if before is not None:
                before(run)
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            run.optimizer.step()
            if cuda:
                torch.cuda.synchronize()
            if round_ >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def measure_steps(variants: dict[str, Factory], args: argparse.Namespace, shapes: Sequence[tuple[int, int]], *,
                  count_host_reads: bool) -> list[dict]:
    """The step benchmark of ``variants`` (``step_runs``, ``timed_medians``): a row per variant with its
    ``variant`` name, ``median_ms`` and ``aten_ops`` per step, and ``host_reads`` if ``count_host_reads``."""
    runs = step_runs(variants, shapes, args.device)
    medians = timed_medians(runs, args)
    rows = []
    for name, run in runs.items():
        row = {"variant": name, "median_ms": medians[name] * 1e3, "aten_ops": aten_ops(run.optimizer.step)}
        if count_host_reads:
            row["host_reads"] = host_reads(run.optimizer.step)
        rows.append(row)
    return rows


def report(name: str, args: argparse.Namespace, shapes: Sequence[tuple[int, int]], rows: list[dict],
           columns: Sequence[tuple[str, str]], *, extra: dict | None = None) -> None:
    """Prints the run's line and a Markdown table (one ``(header, format string)`` per column, the
    format filled from a row's keys) and writes the rows to ``benchmarks/results/<name>-<device>.json``
    (``extra`` entries added to its top level)."""
    elements = sum(a * b for a, b in shapes)
    result = {"device": args.device, "tensors": len(shapes), "elements": elements, "rounds": args.rounds,
              **(extra or {}), "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows}
    print(f"{len(shapes)} tensors, {elements / 1e6:.2f} M elements, {args.device}, median of {args.rounds}\n")
    print("| " + " | ".join(header for header, _ in columns) + " |\n|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(form.format(**row) for _, form in columns) + " |")
    out = Path(__file__).parent / "results" / f"{name}-{args.device.split(':')[0]}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
