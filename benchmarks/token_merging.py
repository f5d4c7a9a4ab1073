"""Token merging (A1111's "Token merging ratio"): what it saves where it acts, and that it is tomesd's.

ToMe merges tokens only at the UNet's full latent resolution (A1111's ``max_downsample=1``), so the figure that
matters is one SD1.5 full-resolution transformer block (``Transformer2DModel``: 320 channels, 8 heads of 40, CLIP-L
cross-attention), at 512×512 (64×64 = 4096 tokens) and 768×768 (96×96 = 9216), batch 2 (cond and uncond, as
guidance runs them). For each ratio: the block's forward (no grad) plain, with ``sdadapt.token_merging.TokenMerging``
and, where ``tomesd`` is installed, with ``tomesd.apply_patch(block, use_rand=False)`` — A1111's call (the block is a
diffusers ``ModelMixin``, which tomesd patches as it patches a UNet). Before timing, sdadapt's and tomesd's outputs must be equal.
Variants interleave; the figure is the median of ``--steps`` after ``--warmup``. Random weights (float32, CPU by
default; ``--device cuda``).

Usage::

    python benchmarks/token_merging.py              # ~2 min on two cores

Writes ``benchmarks/results/token_merging-<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from sdadapt.token_merging import TokenMerging

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import environment, sync, write_result

RESULTS = Path(__file__).resolve().parent / "results"


def _block(device: torch.device) -> nn.Module:
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    return Transformer2DModel(num_attention_heads=8, attention_head_dim=40, in_channels=320, num_layers=1,
                              cross_attention_dim=768, norm_num_groups=32).to(device).eval()


def _time(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sides", type=int, nargs="+", default=[64, 96], help="latent sides (64: 512 px)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    try:
        import tomesd
    except ImportError:
        tomesd = None
    block = _block(device)

    def holder(x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return block(x, encoder_hidden_states=ctx).sample

    rows = []
    for side in args.sides:
        g = torch.Generator().manual_seed(side)
        x = torch.randn(2, 320, side, side, generator=g).to(device)
        ctx = torch.randn(2, 77, 768, generator=g).to(device)
        for ratio in args.ratios:
            with torch.no_grad():
                plain_out = holder(x, ctx)
                with TokenMerging(block, ratio=ratio):
                    ours_out = holder(x, ctx)
                if tomesd is not None:
                    tomesd.apply_patch(block, ratio=ratio, use_rand=False)
                    try:
                        theirs_out = holder(x, ctx)
                    finally:
                        tomesd.remove_patch(block)
                    if not torch.equal(ours_out, theirs_out):
                        raise SystemExit(f"sdadapt and tomesd differ at side {side}, ratio {ratio}: "
                                         f"{(ours_out - theirs_out).abs().max().item():.3g}")
            variants = {"plain": None, "sdadapt": "ours", **({"tomesd": "theirs"} if tomesd is not None else {})}
            times: dict[str, list[float]] = {name: [] for name in variants}
            for step in range(args.warmup + args.steps):
                names = list(variants)
                names = names[step % len(names):] + names[:step % len(names)]
                for name in names:
                    with torch.no_grad():
                        if name == "plain":
                            seconds = _time(lambda x=x, ctx=ctx: holder(x, ctx), device)
                        elif name == "sdadapt":
                            with TokenMerging(block, ratio=ratio):
                                seconds = _time(lambda x=x, ctx=ctx: holder(x, ctx), device)
                        else:
                            tomesd.apply_patch(block, ratio=ratio, use_rand=False)
                            try:
                                seconds = _time(lambda x=x, ctx=ctx: holder(x, ctx), device)
                            finally:
                                tomesd.remove_patch(block)
                    if step >= args.warmup:
                        times[name].append(seconds)
            medians = {name: statistics.median(values) for name, values in times.items()}
            row = {"tokens": side * side, "ratio": ratio, **{f"{k}_s": v for k, v in medians.items()},
                   "speedup": medians["plain"] / medians["sdadapt"],
                   "max_change": (ours_out - plain_out).abs().max().item()}
            rows.append(row)
            print(f"{side * side:5d} tokens  ratio {ratio:.2f}  plain {medians['plain'] * 1e3:8.1f} ms  sdadapt "
                  f"{medians['sdadapt'] * 1e3:8.1f} ms" + (f"  tomesd {medians['tomesd'] * 1e3:8.1f} ms"
                                                          if "tomesd" in medians else "")
                  + f"  ×{row['speedup']:.2f}", flush=True)
    out = write_result(args.out or RESULTS / f"token_merging-{device.type}.json",
                       {"environment": {**environment(), "device": str(device)}, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
