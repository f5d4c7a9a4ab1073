"""One schedule-free AdamW step: sdadapt's ``AdamWScheduleFree`` against ``schedulefree.AdamWScheduleFree``
(kohya's ``AdamWScheduleFree``), and the cost of one eval()/train() pair.

The parameters are a LoRA-shaped set (``--layers`` pairs of ``(rank, width)`` / ``(width, rank)``
matrices, SD1.5's 192 LoRA layers by default at rank 16, width 320–1280) with random gradients.
Each round times one ``step()`` of every variant in turn (alternating, so drift hits all alike)
after warm-up; the table gives the median over rounds, the aten ops a step dispatches (views left
out: on a GPU each of the others is about one kernel launch) and those of an eval()+train() pair.

Variants: ``schedulefree`` (its foreach path, its default), ``schedulefree per-param``, sdadapt
``per-param`` (what ``fit`` uses on a CPU), ``foreach`` (on an accelerator), ``foreach+capturable``
(float64 tensor lr, device counters: ``--cuda-graph``). schedulefree divides the gradients in place,
so every variant gets fresh gradient copies each round (outside the timing). The harness is
``benchmarks/optimizer_bench.py``.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/schedule_free_step.py     # ~20 s
    python benchmarks/schedule_free_step.py --device cuda

Prints a Markdown table and writes ``benchmarks/results/schedule_free_step-<device>.json``.
"""

from __future__ import annotations

import optimizer_bench as bench
import torch

from sdadapt.training.schedule_free import AdamWScheduleFree


def variants(device: str, lr: float):
    import schedulefree

    tensor_lr = torch.tensor(lr, dtype=torch.float64, device=device)
    options = {"warmup_steps": 100, "weight_decay": 0.01}
    return {
        "schedulefree": lambda ps: schedulefree.AdamWScheduleFree(ps, lr=lr, **options),
        "schedulefree per-param": lambda ps: schedulefree.AdamWScheduleFree(ps, lr=lr, foreach=False, **options),
        "per-param": lambda ps: AdamWScheduleFree(ps, lr=lr, **options),
        "foreach": lambda ps: AdamWScheduleFree(ps, lr=lr, foreach=True, **options),
        "foreach+capturable": lambda ps: AdamWScheduleFree(ps, lr=tensor_lr, foreach=True, capturable=True, **options),
    }


def main() -> None:
    args = bench.parse_step_args(__doc__)
    shapes = bench.lora_shapes(args.layers, args.rank)
    runs = bench.step_runs(variants(args.device, 1e-4), shapes, args.device)
    grads = {id(run): [p.grad for p in run.params] for run in runs.values()}  # (kept: each step gets a copy)
    for run in runs.values():
        run.optimizer.train()

    def fresh_grads(run: bench.StepRun) -> None:
        for p, grad in zip(run.params, grads[id(run)]):
            p.grad = grad.clone()

    medians = bench.timed_medians(runs, args, before=fresh_grads)
    rows = []
    for name, run in runs.items():
        fresh_grads(run)
        opt = run.optimizer
        rows.append({"variant": name, "median_ms": medians[name] * 1e3, "aten_ops": bench.aten_ops(opt.step),
                     "eval_train_ops": bench.aten_ops(lambda opt=opt: (opt.eval(), opt.train()))})
    bench.report("schedule_free_step", args, shapes, rows,
                 [("variant", "{variant}"), ("step (ms)", "{median_ms:.2f}"), ("aten ops per step", "{aten_ops}"),
                  ("aten ops per eval()+train()", "{eval_train_ops}")])


if __name__ == "__main__":
    main()
