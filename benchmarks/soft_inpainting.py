"""Soft inpainting: what its pixel composite and its blend cost, against A1111's own code.

The composite's mask (:func:`sdadapt.soft_inpainting.difference_mask`: two weighted-percentile filters over the
latent) against A1111's ``apply_adaptive_masks`` arithmetic with its per-pixel ``weighted_histogram_filter`` loop
(transcribed in tests/test_soft_inpainting.py; the two are checked equal first), at the latent sizes of a 512² and a
1024² image; then one blend (:func:`~sdadapt.soft_inpainting.soft_blend` at a call's σ) against the linear blend it
replaces, on a (1, 4, h, w) latent. Medians of ``--steps`` after ``--warmup``, interleaved; float32, CPU.

Usage::

    python benchmarks/soft_inpainting.py    # ~1 min on two cores

Writes ``benchmarks/results/soft_inpainting-cpu.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from sdadapt.inpaint import blend_denoised
from sdadapt.soft_inpainting import (
    SoftInpainting,
    difference_mask,
    scheduled_nmask,
    soft_blend,
)

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent))
from _bench import environment, median_times, write_result

from tests.test_soft_inpainting import (
    _a1111_adaptive_mask,  # (A1111's code, transcribed once)
)


def _latents(side: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(init, samples, nmask)`` at the latent size of a ``side``² image: a soft mask ramping over the middle."""
    g = torch.Generator().manual_seed(seed)
    h = w = side // 8
    init = torch.randn(1, 4, h, w, generator=g)
    ramp = torch.linspace(-1.0, 2.0, w).clamp(0, 1).expand(1, 1, h, w).contiguous()
    samples = init + torch.randn(1, 4, h, w, generator=g) * ramp * 0.5
    return init, samples, ramp


def _row(side: int, setting: SoftInpainting, *, steps: int, warmup: int, device: torch.device) -> dict:
    """One image size's timings (the masks checked equal first)."""
    init, samples, nmask = _latents(side)
    a1111_nmask = nmask[0].expand(4, *nmask.shape[-2:])  # (A1111's (C, h, w))
    ours = difference_mask(init, samples, nmask, setting)
    if not np.array_equal(ours, _a1111_adaptive_mask(setting, a1111_nmask, init, samples)):
        raise SystemExit(f"{side}²: sdadapt's difference mask is not A1111's")
    times = median_times({"A1111 apply_adaptive_masks (loop)": lambda: _a1111_adaptive_mask(
                              setting, a1111_nmask, init, samples),
                          "sdadapt difference_mask": lambda: difference_mask(init, samples, nmask, setting)},
                         steps=steps, warmup=warmup, device=device)
    t = scheduled_nmask(nmask.expand(1, 4, -1, -1).contiguous(), 3.0, setting)
    blends = median_times({"linear blend": lambda: blend_denoised(samples, init, nmask),
                           "soft blend": lambda: soft_blend(init, samples, t, setting)},
                          steps=20 * steps, warmup=warmup, device=device)
    return {"side": side, "latent": list(init.shape), **times, **blends}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "results" / "soft_inpainting-cpu.json"))
    args = parser.parse_args()
    setting = SoftInpainting()
    rows = [_row(side, setting, steps=args.steps, warmup=args.warmup, device=torch.device("cpu"))
            for side in (512, 1024)]
    print(f"{'image':>6}  {'A1111 mask':>11}  {'sdadapt mask':>12}  {'ratio':>6}  {'linear blend':>12}  "
          f"{'soft blend':>10}")
    for row in rows:
        a, b = row["A1111 apply_adaptive_masks (loop)"], row["sdadapt difference_mask"]
        print(f"{row['side']:>5}²  {a * 1e3:>9.1f}ms  {b * 1e3:>10.2f}ms  {a / b:>5.0f}x  "
              f"{row['linear blend'] * 1e6:>10.1f}µs  {row['soft blend'] * 1e6:>8.1f}µs")
    path = write_result(args.out, {"environment": environment(), "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
