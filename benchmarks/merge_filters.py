"""smooth-add's filters: sdadapt's median selection network vs scipy and the sorted-window median it replaced.

supermerger's smoothAdd is ``A + α·gaussian_filter(median_filter(B − C, size=3), sigma=1)``
(scipy.ndimage, mode ``reflect``); sdadapt computes both filters in torch
(``sdadapt.merge.supermerger_modes.median_filter3`` / ``gaussian_filter``). For each shape, in one
process, on random float32 values, one run each (the slow ones take tens of seconds):

* ``median scipy``: ``scipy.ndimage.median_filter(x, size=3)`` (skipped when scipy is missing);
* ``median sorted windows (old)``: the implementation sdadapt shipped before, copied below —
  reflect-pad, ``unfold`` every dim, ``median`` over the ``3^N`` window, slabs of ``2^24`` values;
* ``median network (sdadapt)``: ``median_filter3``, the min/max selection network;
* ``gaussian scipy`` / ``gaussian (sdadapt)``: ``gaussian_filter(sigma=1)`` of the median.

Every result is checked equal to scipy's (the medians bit for bit; the gaussians value for value
after each float64 pass is stored as float32) and the network to the old median.

    python benchmarks/merge_filters.py               # 1280×1280×3×3, 1280×1280, 1280; one thread
    python benchmarks/merge_filters.py --rows 160    # a slice of the first dim, for a quick look

Prints a markdown table; writes ``benchmarks/results/merge_filters.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from sdadapt.merge.supermerger_modes import gaussian_filter, median_filter3

ROOT = Path(__file__).resolve().parents[1]


def sorted_window_median3(x: torch.Tensor) -> torch.Tensor:
    """sdadapt's ``median_filter3`` before the selection network (kept here as the reference)."""
    if x.dim() == 0 or x.numel() == 0:
        return x.clone()
    padded = x
    for dim in range(x.dim()):
        n = x.shape[dim]
        i = torch.arange(-1, n + 1) % (2 * n)
        padded = padded.index_select(dim, torch.where(i >= n, 2 * n - 1 - i, i))
    window = 3 ** x.dim()
    rows = max(1, (1 << 24) // max(1, window * (x.numel() // x.shape[0])))
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], rows):
        stop = min(start + rows, x.shape[0])
        slab = padded.narrow(0, start, stop - start + 2)
        for dim in range(x.dim()):
            slab = slab.unfold(dim, 3, 1)  # (*S_chunk, 3, 3, ...)
        out[start:stop] = slab.reshape(*slab.shape[: x.dim()], window).median(dim=-1).values
    return out


def _timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1280, help="size of the first dim (1280: SD's largest layers)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-old", action="store_true", help="skip the old sorted-window median (the slowest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        from scipy import ndimage
    except ImportError:
        ndimage = None
    shapes = [(args.rows, 1280, 3, 3), (args.rows, 1280), (args.rows,)]
    results: dict[str, dict] = {}
    header = ("| shape | median scipy (s) | median old (s) | median network (s) | old / network | scipy / network "
              "| gaussian scipy (s) | gaussian sdadapt (s) |")
    lines = [header, "|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
        row: dict[str, float | None] = {}
        row["median_network"], ours = _timed(median_filter3, x)
        row["median_old"] = None
        if not args.skip_old:
            row["median_old"], old = _timed(sorted_window_median3, x)
            if not torch.equal(old, ours):
                raise SystemExit(f"{shape}: the network differs from the sorted-window median")
        row["gaussian_sdadapt"], smooth = _timed(gaussian_filter, ours, 1.0)
        row["median_scipy"] = row["gaussian_scipy"] = None
        if ndimage is not None:
            row["median_scipy"], want = _timed(ndimage.median_filter, x.numpy(), 3)
            if not np.array_equal(ours.numpy(), want):
                raise SystemExit(f"{shape}: the network differs from scipy.ndimage.median_filter")
            row["gaussian_scipy"], want_smooth = _timed(ndimage.gaussian_filter, want, 1.0)
            row["gaussian_max_abs_diff"] = float(np.abs(smooth.numpy() - want_smooth).max())
        label = "×".join(map(str, shape))
        results[label] = row

        def cell(v):
            return "–" if v is None else f"{v:.3g}"

        def ratio(a, b):
            return "–" if a is None or b is None else f"{a / b:.1f}×"

        lines.append(f"| {label} | {cell(row['median_scipy'])} | {cell(row['median_old'])} | "
                     f"{cell(row['median_network'])} | {ratio(row['median_old'], row['median_network'])} | "
                     f"{ratio(row['median_scipy'], row['median_network'])} | {cell(row['gaussian_scipy'])} | "
                     f"{cell(row['gaussian_sdadapt'])} |")
        print(lines[-1] if len(results) > 1 else "\n".join(lines), flush=True)
    results_file = ROOT / "benchmarks" / "results" / "merge_filters.json"
    results_file.parent.mkdir(parents=True, exist_ok=True)
    results_file.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": args.threads},
        "results": results,
        "notes": "random float32 values, one run each, all in one process; medians checked bit-equal to scipy "
                 "and to the old implementation",
    }, indent=2) + "\n")
    print(f"\nwrote {results_file.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
