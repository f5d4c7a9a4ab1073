"""``generate --prompts-file``: what a line costs before it samples — the model loaded again (what one run per line,
e.g. a shell loop over the lines, pays) against ``LoadedModels`` (loaded once, each line a copy of it as loaded).

A random fp16 SD1.5-shape single-file checkpoint (``convert_checkpoint.make_input``), loaded by
``sdadapt.jobs.models.load_system`` on the CPU: the median of ``--repeats`` loads against the median of as many
copies (``sdadapt.jobs.loaded_models.system_copy``, the kept CPU copy to the run's device). Both give the same
weights (checked). Prints a table and writes ``benchmarks/results/prompt_lines-sd15-cpu.json``.

    python benchmarks/prompt_lines.py [--repeats 3] [--folder /tmp/sdadapt-bench]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1] / "tests")]

from _bench import environment, write_result
from convert_checkpoint import make_input

from sdadapt.jobs.loaded_models import system_copy
from sdadapt.jobs.models import load_system


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, value = [], None
    for _ in range(repeats):
        value = None  # (the one before freed first: one model held at a time, as in a run)
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--folder", default="/tmp/sdadapt-bench")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "prompt_lines-sd15-cpu.json"))
    args = parser.parse_args()
    folder = Path(args.folder)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = make_input(folder, small=False)
    load_s, loaded = _timed(lambda: load_system(str(checkpoint), device="cpu"), args.repeats)
    kept = system_copy(loaded, "cpu")
    del loaded
    copy_s, copied = _timed(lambda: system_copy(kept, "cpu"), args.repeats)
    fresh = load_system(str(checkpoint), device="cpu").state_dict()
    same = all(torch.equal(value, fresh[key]) for key, value in copied.state_dict().items())
    parameters = sum(p.numel() for p in kept.parameters())
    rows = [("load the model again (one run per line)", load_s), ("copy of the kept model (LoadedModels)", copy_s)]
    print(f"SD1.5-shape checkpoint, {parameters / 1e6:.0f}M parameters, CPU, {torch.get_num_threads()} threads; "
          f"median of {args.repeats}")
    for name, seconds in rows:
        print(f"  {name:<44} {seconds:7.2f} s")
    print(f"  ratio {load_s / copy_s:.1f}x; same weights: {same}")
    result = {"benchmark": "prompt_lines", "environment": environment(), "parameters": parameters,
              "repeats": args.repeats, "load_seconds": load_s, "copy_seconds": copy_s,
              "ratio": load_s / copy_s, "same_weights": same}
    print(f"wrote {write_result(args.out, result)}")


if __name__ == "__main__":
    main()
