"""One D-Adaptation step: sdadapt's ``DAdaptAdam`` / ``DAdaptLion`` against ``dadaptation`` 3.2's
(kohya's ``DAdaptAdam`` / ``DAdaptLion``), and ``DAdaptAdamPreprint`` (kohya's ``DAdaptation``)
against ``dadaptation.experimental``'s.

The parameters and the method are ``benchmarks/optimizer_bench.py``'s, as for ``prodigy_step.py``
(LoRA-shaped tensors, SD1.5's 192 LoRA layers at rank 16 by default; alternating rounds in one
process, the median; aten ops per step without views; host reads per step by ``HostSyncs``), with
the options kohya users set: DAdaptAdam ``decouple=True, weight_decay=0.01, use_bias_correction=True, betas=0.9,0.99``;
DAdaptLion ``weight_decay=0.1``; DAdaptAdamPreprint ``decouple=True, weight_decay=0.01, betas=0.9,0.99``.

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/dadapt_step.py     # ~1 min
    python benchmarks/dadapt_step.py --device cuda

Prints a Markdown table and writes ``benchmarks/results/dadapt_step-<device>.json``.
"""

from __future__ import annotations

from collections.abc import Callable

import optimizer_bench as bench
import torch

from sdadapt.training.dadapt import DAdaptAdam, DAdaptAdamPreprint, DAdaptLion

_ADAM = {"decouple": True, "weight_decay": 0.01, "use_bias_correction": True, "betas": (0.9, 0.99)}
_LION = {"weight_decay": 0.1}
_PREPRINT = {"decouple": True, "weight_decay": 0.01, "betas": (0.9, 0.99)}


def variants(device: str) -> dict[str, Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]]:
    import dadaptation
    import dadaptation.experimental

    def lr() -> torch.Tensor:
        return torch.tensor(1.0, dtype=torch.float64, device=device)

    return {
        "dadaptation.DAdaptAdam": lambda ps: dadaptation.DAdaptAdam(ps, lr=1.0, **_ADAM),
        "DAdaptAdam per-param": lambda ps: DAdaptAdam(ps, lr=1.0, **_ADAM),
        "DAdaptAdam foreach": lambda ps: DAdaptAdam(ps, lr=1.0, foreach=True, **_ADAM),
        "DAdaptAdam foreach+capturable": lambda ps: DAdaptAdam(ps, lr=lr(), foreach=True, capturable=True, **_ADAM),
        "dadaptation.DAdaptAdamPreprint": lambda ps: dadaptation.experimental.DAdaptAdamPreprint(ps, lr=1.0, **_PREPRINT),
        "DAdaptAdamPreprint per-param": lambda ps: DAdaptAdamPreprint(ps, lr=1.0, **_PREPRINT),
        "DAdaptAdamPreprint foreach": lambda ps: DAdaptAdamPreprint(ps, lr=1.0, foreach=True, **_PREPRINT),
        "dadaptation.DAdaptLion": lambda ps: dadaptation.DAdaptLion(ps, lr=1.0, **_LION),
        "DAdaptLion per-param": lambda ps: DAdaptLion(ps, lr=1.0, **_LION),
        "DAdaptLion foreach": lambda ps: DAdaptLion(ps, lr=1.0, foreach=True, **_LION),
        "DAdaptLion foreach+capturable": lambda ps: DAdaptLion(ps, lr=lr(), foreach=True, capturable=True, **_LION),
    }


def _listed(options: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}


def main() -> None:
    args = bench.parse_step_args(__doc__)
    shapes = bench.lora_shapes(args.layers, args.rank)
    rows = bench.measure_steps(variants(args.device), args, shapes, count_host_reads=True)
    for row in rows:  # (against dadaptation's class of the same algorithm)
        base = next(r for r in rows if r["variant"] == "dadaptation." + row["variant"].split()[0].split(".")[-1])
        row["vs_dadaptation"] = row["median_ms"] / base["median_ms"]
    options = {"DAdaptAdam": _listed(_ADAM), "DAdaptLion": _LION, "DAdaptAdamPreprint": _listed(_PREPRINT)}
    bench.report("dadapt_step", args, shapes, rows,
                 [("variant", "{variant}"), ("step (ms)", "{median_ms:.2f}"),
                  ("× dadaptation", "{vs_dadaptation:.2f}"), ("aten ops", "{aten_ops}"), ("host reads", "{host_reads}")],
                 extra={"options": options})


if __name__ == "__main__":
    main()
