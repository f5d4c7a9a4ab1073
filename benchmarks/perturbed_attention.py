"""Perturbed-attention guidance: what one guided UNet call costs with it, three ways.

One SD1.5 UNet (``UNet2DConditionModel`` at the public config, random weights), one image at ``--side`` pixels, one
guided call (prompt, negative, CLIP-L states of 77 tokens), four variants interleaved:

- ``cfg``: classifier-free guidance alone, one batch of 2 (the baseline);
- ``sdadapt``: ``Guided(..., perturbed_attention=PerturbedAttentionGuidance(unet))``, one batch ``[u, c, c̃]`` of 3,
  the middle block's self-attention output replaced by a hook for the last row;
- ``diffusers``: diffusers' own ``PAGCFGIdentitySelfAttnProcessor2_0`` on the same layers (its pipelines' way: the
  perturbed row skips the attention product), one batch of 3, then its formula;
- ``separate``: Forge's / ComfyUI's way, the batch of 2 and then the perturbed branch as its own call of 1.

The sdadapt and diffusers results are compared before timing (they must agree to 1e-4). The figure is the median
of ``--steps`` after ``--warmup``. float32, CPU by default.

Usage::

    python benchmarks/perturbed_attention.py              # ~2 min on two cores

Writes ``benchmarks/results/perturbed_attention-<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from sdadapt.perturbed_attention import PerturbedAttentionGuidance
from sdadapt.training.diffusion import guidance_combine, guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import UNET_CONFIGS, environment, sync, write_result

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--side", type=int, default=512, help="image side in pixels")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIGS["sd15"]).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, args.side // 8, args.side // 8, generator=g).to(device)
    t = torch.tensor([500], device=device)
    cond, uncond = (torch.randn(1, 77, 768, generator=g).to(device) for _ in range(2))
    scale, pag_scale = 7.5, 3.0

    def model(x_in, t_in, states):
        return unet(x_in, t_in, states).sample

    pag = PerturbedAttentionGuidance(unet, scale=pag_scale)
    original = dict(unet.attn_processors)
    perturbed_names = {f"{name}.processor" for name in pag.names}

    def cfg():
        return guided(model, cond, uncond, scale)(x, t)

    def ours():
        return guided(model, cond, uncond, scale, perturbed_attention=pag)(x, t)

    def theirs():
        unet.set_attn_processor({name: PAGCFGIdentitySelfAttnProcessor2_0() if name in perturbed_names else proc
                                 for name, proc in original.items()})
        try:
            out_u, out_c, out_p = model(torch.cat([x] * 3), torch.cat([t] * 3), torch.cat([uncond, cond, cond])).chunk(3)
        finally:
            unet.set_attn_processor(dict(original))  # (diffusers pops from the dict it is given)
        return out_u + scale * (out_c - out_u) + pag_scale * (out_c - out_p)

    def separate():
        out_u, out_c = model(torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uncond, cond])).chunk(2)
        with pag.perturbing():
            out_p = model(x, t, cond)
        return pag.guide(guidance_combine(out_u, out_c, scale), out_c, out_p, t)

    variants = {"cfg": cfg, "sdadapt": ours, "diffusers": theirs, "separate": separate}
    with torch.no_grad():
        gap = (ours() - theirs()).abs().max().item()
        apart = (ours() - separate()).abs().max().item()
        moved = (ours() - cfg()).abs().max().item()
    if gap > 1e-4:
        raise SystemExit(f"sdadapt's PAG is {gap} from diffusers' processor: not timing different things")
    print(f"sdadapt vs diffusers {gap:.2e}, vs separate call {apart:.2e}; PAG moves the output by {moved:.2f}")
    times: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants)
    for step in range(args.warmup + args.steps):
        for name in (order if step % 2 == 0 else order[::-1]):
            with torch.no_grad():
                sync(device)
                start = time.perf_counter()
                variants[name]()
                sync(device)
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    pag.remove()
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, value in medians.items():
        print(f"{name:10s} {value * 1e3:9.1f} ms  ×{value / medians['cfg']:.2f} of cfg", flush=True)
    out = write_result(args.out or RESULTS / f"perturbed_attention-{device.type}.json",
                       {"environment": {**environment(), "device": str(device)}, "side": args.side,
                        "gap_vs_diffusers": gap, "gap_vs_separate": apart,
                        **{f"{k}_s": v for k, v in medians.items()}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
