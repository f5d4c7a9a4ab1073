"""Activations kept for backward vs the share of UNet blocks checkpointed
(``enable_checkpointing(unet, UNET_BLOCKS, fraction=F)``, ``train --gradient-checkpointing-fraction F``).

One training forward + backward of a diffusers UNet in SD1.5's block layout (``--channels``, default
64,128,256,256 as benchmarks/finetune_memory.py; ``--latent`` 64 = 512-px images), batch 1, per
fraction. "Kept" is the bytes of the distinct storages autograd saves for backward during the forward
(``torch.autograd.graph.saved_tensors_hooks``): the activation memory checkpointing trades for
recompute, measured exactly instead of through the process's peak RSS (which the optimiser's
transients can dominate). Time: that forward + backward, on whatever CPU this runs on (noisy).

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/checkpoint_fraction.py     # ~1.5 min on one core
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch


def kept_bytes_and_seconds(unet, inputs, fraction: float | None) -> tuple[int, float, int]:
    """(bytes autograd keeps for backward, seconds of forward + backward, blocks checkpointed) with
    ``fraction`` of the blocks checkpointed (``None``: none)."""
    from sdadapt.training.grad_checkpointing import UNET_BLOCKS, enable_checkpointing

    handle = enable_checkpointing(unet, UNET_BLOCKS, fraction=fraction) if fraction else None
    count = 0 if handle is None else len(handle.modules)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    try:
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = unet(*inputs).sample
        out.square().mean().backward()
        seconds = time.perf_counter() - start
    finally:
        unet.zero_grad(set_to_none=True)
        if handle is not None:
            handle.remove()
    return sum(seen.values()), seconds, count


def main() -> None:

    sys.path.insert(0, str(Path(__file__).parent))
    from _bench import sd15_layout_unet

    from sdadapt.training.grad_checkpointing import blocks_by_activation_memory

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs=4, default=[64, 128, 256, 256])
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 1.0])
    args = parser.parse_args()
    torch.manual_seed(0)
    unet = sd15_layout_unet(args.channels, args.latent).train()
    inputs = (torch.randn(1, 4, args.latent, args.latent), torch.tensor([500]), torch.randn(1, 77, 768))
    blocks = blocks_by_activation_memory(unet)
    rows = [(None, *kept_bytes_and_seconds(unet, inputs, None))]
    rows += [(f, *kept_bytes_and_seconds(unet, inputs, f)) for f in args.fractions]
    print(f"UNet: SD1.5 layout, channels {args.channels}, latents {args.latent}x{args.latent}, batch 1; "
          f"{len(blocks)} blocks, first {blocks[:2]}\n")
    print("| checkpointed | blocks | kept for backward | fwd+bwd s |")
    print("|---|---:|---:|---:|")
    for fraction, kept, seconds, count in rows:
        label = "none" if fraction is None else f"fraction {fraction:g}"
        print(f"| {label} | {count} | {kept / 2**20:.0f} MiB | {seconds:.2f} |")


if __name__ == "__main__":
    main()
