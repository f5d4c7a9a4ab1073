"""One Prodigy step: sdadapt's ``Prodigy`` against ``prodigyopt.Prodigy`` (kohya's ``Prodigy``).

The parameters are LoRA-shaped (``--layers`` pairs of ``(rank, width)`` / ``(width, rank)`` matrices:
SD1.5's 192 LoRA layers at rank 16 by default, widths 320–1280) with fixed random gradients, the
options kohya users set (``decouple``, ``weight_decay=0.01``, ``d_coef=2``, ``use_bias_correction``,
``safeguard_warmup``, ``betas=0.9,0.99``). All variants live in one process; each round times one
``step()`` of every variant in turn (alternating, so machine drift hits all alike) after a warm-up,
and the table gives the median over rounds, the aten ops one step dispatches (views left out: on a
GPU each is about one kernel launch) and its host reads (``HostSyncs``: on a GPU each one waits for
the queued work). The harness is ``benchmarks/optimizer_bench.py``.

Variants: ``prodigyopt``, sdadapt ``per-param``, ``foreach`` (multi-tensor), ``foreach+capturable``
(a float64 tensor lr, as ``fit`` makes for ``--cuda-graph``).

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/prodigy_step.py     # ~30 s
    python benchmarks/prodigy_step.py --device cuda

Prints a Markdown table and writes ``benchmarks/results/prodigy_step-<device>.json``.
"""

from __future__ import annotations

from collections.abc import Callable

import optimizer_bench as bench
import torch

from sdadapt.training.prodigy import Prodigy

#: kohya users' optimizer_args
_OPTIONS = {"decouple": True, "weight_decay": 0.01, "d_coef": 2.0, "use_bias_correction": True, "safeguard_warmup": True,
            "betas": (0.9, 0.99)}


def variants(device: str) -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    import prodigyopt

    tensor_lr = torch.tensor(1.0, dtype=torch.float64, device=device)
    return {
        "prodigyopt": lambda ps: prodigyopt.Prodigy(ps, lr=1.0, **_OPTIONS),
        "per-param": lambda ps: Prodigy(ps, lr=1.0, **_OPTIONS),
        "foreach": lambda ps: Prodigy(ps, lr=1.0, foreach=True, **_OPTIONS),
        "foreach+capturable": lambda ps: Prodigy(ps, lr=tensor_lr, foreach=True, capturable=True, **_OPTIONS),
    }


def main() -> None:
    args = bench.parse_step_args(__doc__)
    shapes = bench.lora_shapes(args.layers, args.rank)
    rows = bench.measure_steps(variants(args.device), args, shapes, count_host_reads=True)
    base = rows[0]["median_ms"]
    for row in rows:
        row["vs_prodigyopt"] = row["median_ms"] / base
    bench.report("prodigy_step", args, shapes, rows,
                 [("variant", "{variant}"), ("step (ms)", "{median_ms:.2f}"), ("× prodigyopt", "{vs_prodigyopt:.2f}"),
                  ("aten ops", "{aten_ops}"), ("host reads", "{host_reads}")],
                 extra={"options": {k: list(v) if isinstance(v, tuple) else v for k, v in _OPTIONS.items()}})


if __name__ == "__main__":
    main()
