"""Hypertile (A1111's built-in "Hypertile U-Net"): what it saves where it acts.

A1111's Hypertile tiles the self-attention of its tabled layers; at depth 0 (the UNet's full latent resolution) the
tiles are at least ``max(128, tile)/8`` = 32 latent pixels on a side with its default max tile 256. The figure: one
SD1.5 full-resolution transformer block (``Transformer2DModel``: 320 channels, 8 heads of 40, CLIP-L cross-attention),
batch 2, at 768×768 (96×96 latent) and 1024×1024 (128×128), plain and under ``sdadapt.hypertile.Hypertile`` with
A1111's defaults (swap size 1 here, so every call draws the same, largest tile count and the timing is of one
tiling). The block sits where A1111's table names it (``down_blocks.0.attentions.0``). Variants interleave; the
figure is the median of ``--steps`` after ``--warmup``. Random weights, float32, CPU by default.

Usage::

    python benchmarks/hypertile.py              # ~2 min on two cores

Writes ``benchmarks/results/hypertile-<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from sdadapt.hypertile import Hypertile, HypertileSettings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import environment, sync, write_result

RESULTS = Path(__file__).resolve().parent / "results"


class _Level(nn.Module):
    """``down_blocks.0.attentions.0`` holding the block, as a diffusers UNet names it (A1111's depth-0 entry)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleList([nn.Module()])
        self.down_blocks[0].attentions = nn.ModuleList([block])

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        return self.down_blocks[0].attentions[0](x, encoder_hidden_states=ctx).sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sides", type=int, nargs="+", default=[768, 1024], help="image sides in pixels")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    from diffusers import Transformer2DModel

    torch.manual_seed(0)
    block = Transformer2DModel(num_attention_heads=8, attention_head_dim=40, in_channels=320, num_layers=1,
                               cross_attention_dim=768, norm_num_groups=32).to(device).eval()
    level = _Level(block)
    rows = []
    for side in args.sides:
        g = torch.Generator().manual_seed(side)
        x = torch.randn(2, 320, side // 8, side // 8, generator=g).to(device)
        ctx = torch.randn(2, 77, 768, generator=g).to(device)
        times: dict[str, list[float]] = {"plain": [], "hypertile": []}
        tiles = Hypertile(level)
        try:
            for step in range(args.warmup + args.steps):
                for name in (("plain", "hypertile") if step % 2 == 0 else ("hypertile", "plain")):
                    tiles.configure(side, side, unet=HypertileSettings(enabled=name == "hypertile", swap_size=1))
                    with torch.no_grad():
                        sync(device)
                        start = time.perf_counter()
                        level(x, ctx)
                        sync(device)
                    if step >= args.warmup:
                        times[name].append(time.perf_counter() - start)
        finally:
            tiles.remove()
        medians = {name: statistics.median(values) for name, values in times.items()}
        row = {"side": side, "tokens": (side // 8) ** 2, **{f"{k}_s": v for k, v in medians.items()},
               "speedup": medians["plain"] / medians["hypertile"]}
        rows.append(row)
        print(f"{side}x{side} ({row['tokens']} tokens)  plain {medians['plain'] * 1e3:8.1f} ms  hypertile "
              f"{medians['hypertile'] * 1e3:8.1f} ms  ×{row['speedup']:.2f}", flush=True)
    out = write_result(args.out or RESULTS / f"hypertile-{device.type}.json",
                       {"environment": {**environment(), "device": str(device)}, "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
