"""Dynamic thresholding ("CFG Scale Fix"): what it costs per guided call, and its combination against the extension's.

One SD1.5 UNet (``UNet2DConditionModel`` at the public config, random weights), one guided call by branch on x̂0 (as
A1111's σ samplers call it: a batch of 2 at ``--side`` pixels, each branch read to x̂0 at σ 3) with plain guidance
and with ``DynamicThresholding`` (AD per channel, the 95th percentile, a CFG schedule); then the combination alone
on those x̂0 — sdadapt's and, with ``--extension DIR`` (a checkout of mcmonkeyprojects/sd-dynamic-thresholding, its
``dynthres_core.py`` imported from there), the extension's ``DynThresh.dynthresh``, compared first (they must agree to
1e-5). Medians of ``--steps`` after ``--warmup``, interleaved. float32, CPU by default.

Usage::

    python benchmarks/dynamic_thresholding.py [--extension ../sd-dynamic-thresholding]    # ~1 min on two cores

Writes ``benchmarks/results/dynamic_thresholding-<device>.json`` (``--out`` to change).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from sdadapt.dynamic_thresholding import DynamicThresholding
from sdadapt.training.diffusion import guided

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import UNET_CONFIGS, environment, median_times, unet_call_args, write_result

RESULTS = Path(__file__).resolve().parent / "results"
SETTING = DynamicThresholding(mimic_scale=7.0, threshold_percentile=0.95, cfg_mode="Linear Down", cfg_scale_min=6.0)
SCALE, SIGMA = 20.0, 3.0


def _extension(folder: str):
    """The extension's ``DynThresh`` at its step 5 of 20, set as :data:`SETTING` (imported from ``folder``)."""
    spec = importlib.util.spec_from_file_location("dynthres_core", Path(folder) / "dynthres_core.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    s = SETTING
    dt = module.DynThresh(s.mimic_scale, s.threshold_percentile, s.mimic_mode, s.mimic_scale_min, s.cfg_mode,
                          s.cfg_scale_min, s.sched_val, 0, 20, s.separate_feature_channels, s.scaling_startpoint,
                          s.variability_measure, s.interpolate_phi)
    dt.step = 5
    return dt


def main() -> None:
    args, device = unet_call_args(__doc__, extra=lambda parser: parser.add_argument(
        "--extension", default=None, help="a checkout of sd-dynamic-thresholding, to time its dynthresh too"))
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET_CONFIGS["sd15"]).to(device).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, args.side // 8, args.side // 8, generator=g).to(device)
    t = torch.tensor([500.0], device=device)
    cond, uncond = (torch.randn(1, 77, 768, generator=g).to(device) for _ in range(2))

    def model(x_in, t_in, ctx):
        return unet(x_in, t_in, ctx).sample

    def read(out):
        return x * (SIGMA**2 + 1) ** 0.5 - SIGMA * out

    def call(setting):
        def run():
            return guided(model, cond, uncond, SCALE, total_steps=20,
                          dynamic_thresholding=setting).denoised_by_branch(read, x, t, sigma=SIGMA)
        return run

    with torch.no_grad():
        out_u, out_c = (read(model(x, t, c)) for c in (uncond, cond))
    frac = 5 / 19
    combinations = {"ours_combination": lambda: SETTING.combine(out_u, [(out_c, 1.0)], SCALE, frac=frac)}
    gap = None
    if args.extension is not None:
        reference = _extension(args.extension)
        weights = torch.ones(1, 1, 1, 1, 1, device=device)
        combinations["extension_combination"] = lambda: reference.dynthresh(out_c, out_u, SCALE, weights)
        gap = (combinations["ours_combination"]() - combinations["extension_combination"]()).abs().max().item()
        if gap > 1e-5:
            raise SystemExit(f"sdadapt's combination is {gap} from the extension's: not timing the same thing")
        print(f"sdadapt vs the extension's dynthresh {gap:.2e}")
    calls = median_times({"plain_call": call(None), "dynthres_call": call(SETTING)}, steps=args.steps,
                         warmup=args.warmup, device=device)
    alone = median_times(combinations, steps=max(args.steps, 20), warmup=args.warmup, device=device)
    for name, value in calls.items():
        print(f"{name:22s} {value * 1e3:9.2f} ms  ×{value / calls['plain_call']:.4f} of plain", flush=True)
    for name, value in alone.items():
        print(f"{name:22s} {value * 1e3:9.3f} ms", flush=True)
    out = write_result(args.out or RESULTS / f"dynamic_thresholding-{device.type}.json",
                       {"environment": {**environment(), "device": str(device)}, "side": args.side, "gap": gap,
                        **{f"{k}_s": v for k, v in {**calls, **alone}.items()}})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
