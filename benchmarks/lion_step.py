"""One Lion optimiser step: sdadapt's ``Lion`` against ``lion_pytorch.Lion`` (kohya's ``Lion``).

The parameters are a LoRA-shaped set (``--layers`` pairs of ``(rank, width)`` / ``(width, rank)``
matrices, SD1.5's 192 LoRA layers by default at rank 16, width 320–1280) with random gradients.
Each round times one ``step()`` of every variant in turn (alternating, so drift hits all alike) after
warm-up; the table gives the median over rounds and the aten ops a step dispatches (views left
out: on a GPU each of the others is about one kernel launch). The harness is
``benchmarks/optimizer_bench.py``.

Variants: ``lion_pytorch`` (one parameter at a time), sdadapt ``per-param``, ``foreach``
(multi-tensor), ``per-param+bf16`` / ``foreach+bf16`` (bf16 momentum, stochastically rounded: on a
CPU the rounding's random draws dominate), ``foreach+capturable`` (tensor lr).

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/lion_step.py     # ~20 s
    python benchmarks/lion_step.py --device cuda

Prints a Markdown table and writes ``benchmarks/results/lion_step-<device>.json``.
"""

from __future__ import annotations

import optimizer_bench as bench
import torch

from sdadapt.training.lion import Lion


def variants(device: str, lr: float):
    from lion_pytorch import Lion as LionPytorch

    tensor_lr = torch.tensor(lr, device=device)
    return {
        "lion_pytorch": lambda ps: LionPytorch(ps, lr=lr, weight_decay=0.1),
        "per-param": lambda ps: Lion(ps, lr=lr, weight_decay=0.1),
        "foreach": lambda ps: Lion(ps, lr=lr, weight_decay=0.1, foreach=True),
        "per-param+bf16": lambda ps: Lion(ps, lr=lr, weight_decay=0.1, state_dtype=torch.bfloat16),
        "foreach+bf16": lambda ps: Lion(ps, lr=lr, weight_decay=0.1, foreach=True, state_dtype=torch.bfloat16),
        "foreach+capturable": lambda ps: Lion(ps, lr=tensor_lr, weight_decay=0.1, foreach=True, capturable=True),
    }


def main() -> None:
    args = bench.parse_step_args(__doc__)
    shapes = bench.lora_shapes(args.layers, args.rank)
    rows = bench.measure_steps(variants(args.device, 1e-4), args, shapes, count_host_reads=False)
    bench.report("lion_step", args, shapes, rows,
                 [("variant", "{variant}"), ("step (ms)", "{median_ms:.2f}"), ("aten ops", "{aten_ops}")])


if __name__ == "__main__":
    main()
