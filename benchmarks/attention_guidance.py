"""Perturbed-attention and self-attention guidance: what one guided UNet call costs with each, done sdadapt's way and
the reference tools' ways.

One SD1.5 UNet (``UNet2DConditionModel`` at the public config, random weights), one image at ``--side`` pixels, one
guided call (prompt, negative, CLIP-L states of 77 tokens, diffusers' DDIM ᾱ), six variants interleaved:

- ``cfg``: classifier-free guidance alone, one batch of 2 (the baseline);
- ``pag``: ``Guided(..., perturbed_attention=PerturbedAttentionGuidance(unet))``, one batch ``[u, c, c̃]`` of 3,
  the middle block's self-attention output replaced by a hook for the last row;
- ``pag_diffusers``: diffusers' own ``PAGCFGIdentitySelfAttnProcessor2_0`` on the same layers (its pipelines' way: the
  perturbed row skips the attention product), one batch of 3, then its formula;
- ``pag_separate``: Forge's / ComfyUI's way, the batch of 2 and then the perturbed branch as its own call of 1;
- ``sag``: ``Guided(..., self_attention_guidance=SelfAttentionGuidance(unet, ...))``: the batch of 2 (the middle
  layer's input kept by a hook, its attention map recomputed for the negative's row), then the degraded call of 1;
- ``sag_diffusers``: diffusers' SAG pipeline's way: its ``CrossAttnStoreProcessor`` on the middle layer (the map
  stored for both rows) and its own ``sag_masking``, then the degraded call.

Each sdadapt result is compared with its reference before timing (they must agree to 1e-4). The figure is the
median of ``--steps`` after ``--warmup``. float32, CPU by default.

Usage::

    python benchmarks/attention_guidance.py              # ~3 min on two cores

Writes ``benchmarks/results/attention_guidance-<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from sdadapt.perturbed_attention import PerturbedAttentionGuidance
from sdadapt.self_attention_guidance import SAG_LAYER, SelfAttentionGuidance
from sdadapt.training.diffusion import guidance_combine, guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import UNET_CONFIGS, environment, median_times, unet_call_args, write_result

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    args, device = unet_call_args(__doc__)
    from types import SimpleNamespace

    from diffusers import DDIMScheduler, UNet2DConditionModel
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0
    from diffusers.pipelines.deprecated.stable_diffusion_sag.pipeline_stable_diffusion_sag import (
        CrossAttnStoreProcessor,
        StableDiffusionSAGPipeline,
    )

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

    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sag = SelfAttentionGuidance(unet, scale=0.75, blur_sigma=1.0, alphas_cumprod=scheduler.alphas_cumprod)
    store = CrossAttnStoreProcessor()
    pipe = SimpleNamespace(unet=unet, scheduler=scheduler)  # (what the pipeline's SAG methods read of self)

    def sag_ours():
        return guided(model, cond, uncond, scale, self_attention_guidance=sag)(x, t)

    def sag_theirs():
        unet.set_attn_processor({name: store if name == f"{SAG_LAYER}.processor" else proc
                                 for name, proc in original.items()})
        map_size = None

        def get_map_size(module, args, output):
            nonlocal map_size
            map_size = output[0].shape[-2:]

        try:
            with unet.mid_block.attentions[0].register_forward_hook(get_map_size):
                out_u, out_c = model(torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uncond, cond])).chunk(2)
        finally:
            unet.set_attn_processor(dict(original))
        guided_out = out_u + scale * (out_c - out_u)
        x0 = StableDiffusionSAGPipeline.pred_x0(pipe, x, out_u, t)
        eps = StableDiffusionSAGPipeline.pred_epsilon(pipe, x, out_u, t)
        degraded = StableDiffusionSAGPipeline.sag_masking(pipe, x0, store.attention_probs.chunk(2)[0], map_size, t, eps)
        return guided_out + 0.75 * (out_u - model(degraded, t, uncond))

    variants = {"cfg": cfg, "pag": ours, "pag_diffusers": theirs, "pag_separate": separate, "sag": sag_ours,
                "sag_diffusers": sag_theirs}
    with torch.no_grad():
        gap = (ours() - theirs()).abs().max().item()
        apart = (ours() - separate()).abs().max().item()
        moved = (ours() - cfg()).abs().max().item()
        sag_gap = (sag_ours() - sag_theirs()).abs().max().item()
        sag_moved = (sag_ours() - cfg()).abs().max().item()
    if gap > 1e-4 or sag_gap > 1e-4:
        raise SystemExit(f"sdadapt's PAG / SAG are {gap} / {sag_gap} from diffusers': not timing different things")
    print(f"PAG: sdadapt vs diffusers {gap:.2e}, vs separate call {apart:.2e}; it moves the output by {moved:.2f}")
    print(f"SAG: sdadapt vs diffusers {sag_gap:.2e}; it moves the output by {sag_moved:.2f}")
    medians = median_times(variants, steps=args.steps, warmup=args.warmup, device=device)
    pag.remove()
    sag.remove()
    for name, value in medians.items():
        print(f"{name:14s} {value * 1e3:9.1f} ms  ×{value / medians['cfg']:.2f} of cfg", flush=True)
    out = write_result(args.out or RESULTS / f"attention_guidance-{device.type}.json",
                       {"environment": {**environment(), "device": str(device)}, "side": args.side,
                        "gap_vs_diffusers": gap, "gap_vs_separate": apart, "sag_gap_vs_diffusers": sag_gap,
                        **{f"{k}_s": v for k, v in medians.items()}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
