"""CPU threads: one toy LoRA training step with 1 thread, 2 threads and oversubscribed, on this machine.

The shipped toy model (``sdadapt.toy.load_toy``: the model ``demo`` and ``train --model toy`` use), LoRA r8 on
every Linear/Conv2d of its UNet (``sdadapt.inject``), :func:`sdadapt.training.train_step` with AdamW on a batch of
``--batch`` random 16×16 latents and the toy text encoder's states of one prompt. Each setting runs in fresh
processes that set ``OMP_NUM_THREADS`` and ``torch.set_num_threads`` before the first step:

* ``1 job × T threads`` for T in ``--threads`` (default 1, 2 and 8: 8 on a 2-core machine is oversubscribed);
* ``2 jobs × T threads``: two such processes at once (two trainings, or a training beside a test run, sharing the
  cores): 2 × 1 fills two cores, 2 × 2 asks for twice as many threads as there are.

Per setting the median ms/step after ``--warmup`` steps of each process; for two jobs, the mean of the two.

    python benchmarks/cpu_threads.py [--steps 30] [--batch 8]

Prints a markdown table (and the load average, which on a shared machine says what else ran) and writes
benchmarks/results/cpu_threads.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def worker(threads: int, steps: int, warmup: int, batch: int) -> None:
    """Run in a child process: print the median ms/step as JSON."""
    import time

    import torch

    torch.set_num_threads(threads)
    import sdadapt
    from sdadapt.toy import load_toy

    system = load_toy()
    sdadapt.inject(system.unet, sdadapt.by_type(torch.nn.Linear, torch.nn.Conv2d), sdadapt.LoRAConfig(rank=8, alpha=4))
    params = [p for p in system.unet.parameters() if p.requires_grad]
    with torch.no_grad():
        cond = system.condition(["a red circle"] * batch)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(batch, 12, 16, 16, generator=g)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    state, config = sdadapt.TrainState(seed=0), sdadapt.StepConfig()
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        sdadapt.train_step(system.denoiser(), {"latents": latents, "cond": cond}, params=params, optimizer=optimizer,
                           state=state, config=config, alphas_cumprod=system.alphas_cumprod)
        if step >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    print(json.dumps({"threads": torch.get_num_threads(), "ms": statistics.median(times)}))


def run_jobs(jobs: int, threads: int, args: argparse.Namespace) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    command = [sys.executable, __file__, "--worker", str(threads), "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--batch", str(args.batch)]
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"worker failed ({proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert all(r["threads"] == threads for r in results), results
    return statistics.mean(r["ms"] for r in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2, 8])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker is not None:
        worker(args.worker, args.steps, args.warmup, args.batch)
        return
    sys.path.insert(0, str(HERE))
    from _bench import environment, write_result

    rows = []
    for jobs, threads in [(1, t) for t in args.threads] + [(2, 1), (2, 2)]:
        ms = run_jobs(jobs, threads, args)
        rows.append({"jobs": jobs, "threads": threads, "ms_per_step": ms})
        print(rows[-1], file=sys.stderr, flush=True)
    load = os.getloadavg()
    print(f"\n{os.cpu_count()} CPUs, load average {load[0]:.1f} at the end (this run's jobs included), batch {args.batch}, "
          f"median of {args.steps} steps\n")
    print("| jobs × threads | ms/step (each job) | steps/s (all jobs) |\n|---|---|---|")
    for row in rows:
        print(f"| {row['jobs']} × {row['threads']} | {row['ms_per_step']:.0f} | "
              f"{row['jobs'] * 1000 / row['ms_per_step']:.1f} |")
    write_result(HERE / "results" / "cpu_threads.json",
                 {"environment": environment(), "load_average": load, "batch": args.batch, "steps": args.steps,
                  "rows": rows})


if __name__ == "__main__":
    main()
