"""(IA)³ hook cost: the old formula (a second matmul against the base weight) vs the new one.

Old (kept here only as the reference): ``y + op(x, W) ⊙ m·w``: the hook recomputes ``op(x, W)``.
New (``sdadapt.adapters.ia3``): on the output axis, when the hook sees the base output
``y = op(x, W) + b`` unchanged, ``y + (y − b) ⊙ m·w``: one elementwise pass, no matmul. The input
axis keeps its matmul, ``op(x ⊙ m·w, W)``, in both (rows ``in``: the same code, a sanity row).

For each SD-like layer shape (SD1.5 widths, batch 1): forward + backward of ``(layer(x) · g).sum()``
with ``x`` requiring grad (as inside a UNet) and the (IA)³ vector trainable. Before timing, old and
new must give the same output and gradients. The variants run interleaved (rotated order per
step); the figure is the median of ``--steps`` after ``--warmup``. CPU, one thread by default
(``--threads``).

Usage::

    OMP_NUM_THREADS=1 python benchmarks/ia3_forward.py            # ~1 min on one core

Writes ``benchmarks/results/ia3_forward-<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import sdadapt
from sdadapt.adapters import IA3Config, IA3Module
from sdadapt.adapters.base import AdapterModule

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import sync  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

#: (label, layer factory, input shape): SD1.5 attention/feed-forward linears and ResNet convs, batch 1
SHAPES = [
    ("to_q 320->320, 64x64 tokens", lambda: nn.Linear(320, 320, bias=False), (1, 4096, 320)),
    ("to_out 320->320 +bias, 64x64", lambda: nn.Linear(320, 320), (1, 4096, 320)),
    ("ff.proj 640->5120, 32x32", lambda: nn.Linear(640, 5120), (1, 1024, 640)),
    ("to_k 768->320, 77 tokens", lambda: nn.Linear(768, 320, bias=False), (1, 77, 768)),
    ("conv 3x3 320->320, 32x32", lambda: nn.Conv2d(320, 320, 3, padding=1), (1, 320, 32, 32)),
    ("proj_in 1x1 640->640, 32x32", lambda: nn.Conv2d(640, 640, 1), (1, 640, 32, 32)),
]


class _OldIA3(IA3Module):
    """The old hook: Δy from ``IA3Module.forward(x, W)`` (a second matmul), the generic path."""

    _delta_added = AdapterModule._delta_added


def _model(factory, *, on_input: bool, old: bool, seed: int) -> tuple[nn.Module, IA3Module]:
    torch.manual_seed(seed)
    model = nn.Sequential(factory())
    handle = sdadapt.inject(model, sdadapt.by_type(nn.Linear, nn.Conv2d), IA3Config(train_on_input=on_input))
    adapter = handle.modules["0"]
    with torch.no_grad():
        adapter.weight.normal_(0, 0.1)
    if old:
        adapter.__class__ = _OldIA3
    return model, adapter


def _step(model: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> None:
    x.grad = None
    for p in model.parameters():
        p.grad = None
    (model(x) * upstream).sum().backward()


def _check_equal(models, x: torch.Tensor, upstream: torch.Tensor, label: str) -> float:
    outs, grads = [], []
    for model, adapter in models:
        xi = x.detach().clone().requires_grad_(True)
        y = model(xi)
        (y * upstream).sum().backward()
        outs.append(y.detach())
        grads.append((xi.grad, adapter.weight.grad.clone()))
        adapter.weight.grad = None
    worst = 0.0
    for a, b in zip(outs[0::2], outs[1::2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{label}: old and new outputs differ")
        worst = max(worst, float((a - b).abs().max()))
    for (gx0, gw0), (gx1, gw1) in zip(grads[0::2], grads[1::2]):
        torch.testing.assert_close(gx0, gx1, rtol=1e-4, atol=1e-4, msg=f"{label}: input gradients differ")
        torch.testing.assert_close(gw0, gw1, rtol=1e-3, atol=1e-3, msg=f"{label}: vector gradients differ")
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    rows = []
    for label, factory, shape in SHAPES:
        for on_input in (False, True):
            variants = {name: _model(factory, on_input=on_input, old=(name == "old"), seed=0) for name in ("old", "new")}
            g = torch.Generator().manual_seed(1)
            x = torch.randn(shape, generator=g).requires_grad_(True)
            with torch.no_grad():
                upstream = torch.randn_like(variants["new"][0](x))
            worst = _check_equal([variants["old"], variants["new"]], x, upstream, label)
            times: dict[str, list[float]] = {"old": [], "new": []}
            names = list(times)
            for i in range(args.warmup + args.steps):
                order = names[i % 2:] + names[:i % 2]
                for name in order:
                    sync(device)
                    start = time.perf_counter()
                    _step(variants[name][0], x, upstream)
                    sync(device)
                    if i >= args.warmup:
                        times[name].append(time.perf_counter() - start)
            old_ms, new_ms = (statistics.median(times[n]) * 1e3 for n in ("old", "new"))
            rows.append({"layer": label, "axis": "in" if on_input else "out", "input_shape": list(shape),
                         "old_ms": round(old_ms, 3), "new_ms": round(new_ms, 3),
                         "speedup": round(old_ms / new_ms, 3), "max_abs_output_diff": worst})
    print(f"{'layer':32} {'axis':4} {'old ms':>9} {'new ms':>9} {'old/new':>8}")
    for row in rows:
        print(f"{row['layer']:32} {row['axis']:4} {row['old_ms']:9.2f} {row['new_ms']:9.2f} {row['speedup']:8.2f}")
    result = {"benchmark": "ia3_forward", "device": device.type, "threads": args.threads, "steps": args.steps,
              "warmup": args.warmup, "torch": torch.__version__, "machine": platform.machine(),
              "processor": platform.processor(), "rows": rows}
    out = args.out or RESULTS / f"ia3_forward-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
