"""FreeU: what it costs per UNet call (the paper's "free lunch": an FFT of each changed skip, no extra call).

One SD1.5 UNet (``UNet2DConditionModel`` at the public config, random weights), one guided call's batch of 2 at
``--side`` pixels, four variants interleaved: plain; sdadapt's ``FreeU`` hooks in ComfyUI's / Forge's v2 and in
diffusers' version; diffusers' own ``enable_freeu``. The diffusers-version outputs are compared before timing (they
must agree to 1e-4). The figure is the median of ``--steps`` after ``--warmup``. float32, CPU by default.

Usage::

    python benchmarks/freeu.py              # ~2 min on two cores

Writes ``benchmarks/results/freeu-<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sdadapt.freeu import FreeU

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import UNET_CONFIGS, environment, median_times, unet_call_args, write_result

RESULTS = Path(__file__).resolve().parent / "results"
FACTORS = {"b1": 1.5, "b2": 1.6, "s1": 0.9, "s2": 0.2}  # (the paper's SD1.5 setting)


def main() -> None:
    args, device = unet_call_args(__doc__)
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIGS["sd15"]).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, args.side // 8, args.side // 8, generator=g).to(device)
    t = torch.tensor([500, 500], device=device)
    ctx = torch.randn(2, 77, 768, generator=g).to(device)

    def call():
        return unet(x, t, ctx).sample

    def with_hooks(version):
        def run():
            with FreeU(unet, version=version, **FACTORS):
                return call()
        return run

    def diffusers_own():
        unet.enable_freeu(**FACTORS)
        try:
            return call()
        finally:
            unet.disable_freeu()

    variants = {"plain": call, "v2": with_hooks("v2"), "diffusers_version": with_hooks("diffusers"),
                "enable_freeu": diffusers_own}
    with torch.no_grad():
        gap = (variants["diffusers_version"]() - diffusers_own()).abs().max().item()
    if gap > 1e-4:
        raise SystemExit(f"sdadapt's diffusers-version FreeU is {gap} from enable_freeu: not timing different things")
    print(f"sdadapt (diffusers' version) vs enable_freeu {gap:.2e}")
    medians = median_times(variants, steps=args.steps, warmup=args.warmup, device=device)
    for name, value in medians.items():
        print(f"{name:18s} {value * 1e3:9.1f} ms  ×{value / medians['plain']:.3f} of plain", flush=True)
    out = write_result(args.out or RESULTS / f"freeu-{device.type}.json",
                       {"environment": {**environment(), "device": str(device)}, "side": args.side, "gap": gap,
                        **{f"{k}_s": v for k, v in medians.items()}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
