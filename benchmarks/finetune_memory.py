"""Peak memory and speed of a whole-UNet fine-tune through ``sdadapt.methods.fit`` (what
``python -m sdadapt train full`` runs), plain and with the lean options.

The UNet is a diffusers ``UNet2DConditionModel`` in SD1.5's block layout (4 levels, 2 resnets per
level, cross-attention in the first three, 768-d text states) with narrower channels
(``--channels``, default 64,128,256,256 instead of 320,640,1280,1280) so a step takes seconds on
a CPU; random weights, random 4-channel latents (``--latent`` side, default 64 = 512-px images), a fixed
random 77×768 text state, batch 1, no gradient clipping (a fused backward cannot clip globally).

Variants (each in a fresh subprocess, ``--steps`` optimiser steps):

``adamw``        torch AdamW, fp32 states, the usual ``backward(); step()``
``adamw8bit``    sdadapt's AdamW with int8 states
``8bit+fused``   … stepped inside backward (``FitConfig.fused_backward``): no gradient buffer; one
                 multi-tensor optimiser step per block (UNet resnet/transformer, other modules alone)
``8bit+fused/param``  … one single-tensor optimiser per parameter instead (the fused backward before
                 it grouped by block, and kohya's ``--fused_backward_pass``), for comparison
``8bit+ckpt``    … with gradient checkpointing of every resnet and transformer (``gradient_checkpointing``)
``8bit+ckpt0.5`` … of the half of them keeping the most activations (``gradient_checkpointing_fraction=0.5``:
                 the highest-resolution blocks, transformers first)
``8bit+fused+ckpt``  both (``8bit+fused/param+ckpt``: per parameter; ``8bit+fused+ckpt0.5``: half the blocks)
``bf16+8bit+fused+ckpt``  and bf16 weights with stochastic rounding (``--full-bf16``, bf16 autocast)
                 (``bf16+8bit+fused+ckpt0.5``: checkpointing half the blocks)

``--foreach`` makes sdadapt's AdamW take its multi-tensor step (``foreach=True``, chunks of 2²⁴
elements, a bigger tensor cut into pieces) as ``fit`` does on an accelerator; on a CPU ``fit`` takes
the per-parameter step, whose working memory is one whole tensor's.

Memory: ``VmHWM`` (peak RSS, /proc/self/status, reset with ``/proc/self/clear_refs`` right before
``fit``) minus the RSS then (the UNet built and prepared, including the copy of the original
weights the fine-tune keeps for ``remove()``): what training adds — optimiser state, gradients,
activations; the table adds the trained weights themselves (fp32, or bf16 with ``--full-bf16``).
Big allocations are made mmap-backed first (``mallopt``), so RSS follows live memory. Time: median seconds per step
after the first (from ``fit``'s per-step callback).

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/finetune_memory.py            # ~3 min on one core
    python benchmarks/finetune_memory.py --channels 320 640 1280 1280 --latent 64  # the real SD1.5 size

Prints a Markdown table and writes ``benchmarks/results/finetune_memory.json``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {
    "adamw": {"optimizer": "adamw"},
    "adamw8bit": {"optimizer": "adamw8bit"},
    "8bit+fused": {"optimizer": "adamw8bit", "fused_backward": True},
    "8bit+fused/param": {"optimizer": "adamw8bit", "fused_backward": True, "per_parameter": True},
    "8bit+ckpt": {"optimizer": "adamw8bit", "gradient_checkpointing": True},
    "8bit+ckpt0.5": {"optimizer": "adamw8bit", "gradient_checkpointing": True, "gradient_checkpointing_fraction": 0.5},
    "8bit+fused+ckpt0.5": {"optimizer": "adamw8bit", "fused_backward": True, "gradient_checkpointing": True,
                           "gradient_checkpointing_fraction": 0.5},
    "8bit+fused+ckpt": {"optimizer": "adamw8bit", "fused_backward": True, "gradient_checkpointing": True},
    "8bit+fused/param+ckpt": {"optimizer": "adamw8bit", "fused_backward": True, "gradient_checkpointing": True,
                              "per_parameter": True},
    "bf16+8bit+fused+ckpt": {"optimizer": "adamw8bit", "fused_backward": True, "gradient_checkpointing": True, "full_bf16": True},
    "bf16+8bit+fused+ckpt0.5": {"optimizer": "adamw8bit", "fused_backward": True, "gradient_checkpointing": True,
                                "gradient_checkpointing_fraction": 0.5, "full_bf16": True},
}


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


class _LatentSystem:
    """The least a :func:`sdadapt.methods.fit` system needs: the images *are* latents, one fixed text state."""

    prediction_type = "epsilon"

    def __init__(self, unet, context):
        import torch

        self.unet, self.context = unet, context
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()

    def encode_images(self, images):
        return images

    def tokenize(self, captions):
        import torch

        return torch.zeros(len(captions), 1, dtype=torch.long)

    def condition(self, ids):
        return self.context.expand(ids.shape[0], -1, -1)

    def denoiser(self):
        return lambda x, t, context: self.unet(x, t, context).sample


def _per_parameter_fusing() -> None:
    """Make ``fit``'s fused backward step one single-tensor optimiser per parameter, as it did
    before it grouped them by block."""
    fit_module = importlib.import_module("sdadapt.methods.fit")  # the module (sdadapt.methods.fit is also the function)
    make = fit_module.make_optimizer

    def single_tensor(groups, config):
        optimizer = make(groups, config)
        for group in optimizer.param_groups:
            group["foreach"] = False  # sdadapt's AdamW: its per-parameter path
        return optimizer

    fit_module._fused_blocks = lambda system, params: [[p] for p in params]
    fit_module.make_optimizer = single_tensor


def _multi_tensor_steps() -> None:
    """Make ``fit``'s sdadapt AdamW take its multi-tensor step (``foreach=True``), as it does on an
    accelerator (on a CPU it takes the per-parameter one)."""
    fit_module = importlib.import_module("sdadapt.methods.fit")
    make = fit_module.make_optimizer
    from sdadapt.training.optim import AdamW

    def multi_tensor(groups, config):
        optimizer = make(groups, config)
        if isinstance(optimizer, AdamW):
            for group in optimizer.param_groups:
                group["foreach"] = True
        return optimizer

    fit_module.make_optimizer = multi_tensor


def child(args: argparse.Namespace) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from _bench import glibc_return_freed_memory, malloc_trim, sd15_layout_unet

    from sdadapt.methods import FitConfig, fit
    from sdadapt.methods.finetune import prepare_full
    from sdadapt.training.step import StepConfig

    glibc_return_freed_memory()
    torch.manual_seed(0)
    unet = sd15_layout_unet(args.channels, args.latent).eval()
    system = _LatentSystem(unet, torch.randn(1, 77, 768))
    latents = torch.randn(2, 4, args.latent, args.latent)
    adaptation = prepare_full(system)  # what train full prepares (the registry's adapt also checks a whole System)
    options = dict(VARIANTS[args.variant])
    if options.pop("per_parameter", False):  # the per-parameter fused backward: every parameter its own block
        _per_parameter_fusing()
    elif args.foreach:
        _multi_tensor_steps()
    mixed = None
    if options.pop("full_bf16", False):
        adaptation.cast(torch.bfloat16)
        mixed = "bf16"
    params = sum(p.numel() for p in unet.parameters())
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    times: list[float] = []
    last = [time.perf_counter()]

    def callback(step, total, loss):
        now = time.perf_counter()
        times.append(now - last[0])
        last[0] = now

    config = FitConfig(steps=args.steps, batch_size=1, learning_rate=1e-5, warmup_steps=0,
                       step=StepConfig(max_grad_norm=None, mixed_precision=mixed), **options)
    gc.collect()
    malloc_trim()
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0): the peak of fit alone
    before = _status_kib("VmRSS")
    last[0] = time.perf_counter()
    fit(system, adaptation, latents, ["a", "b"], config=config, callback=callback)
    peak = _status_kib("VmHWM")
    return {"variant": args.variant, "params": params, "weights_mib": weights / 2**20, "peak_mib": (peak - before) / 1024, "rss_before_mib": before / 1024,
            "s_per_step": statistics.median(times[1:] or times), "steps": args.steps, "foreach": args.foreach}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs=4, default=[64, 128, 256, 256])
    parser.add_argument("--latent", type=int, default=64, help="latent side (image side / 8)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--foreach", action="store_true",
                        help="sdadapt's AdamW takes its multi-tensor step, as fit does on an accelerator")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "finetune_memory.json")
    args = parser.parse_args()
    if args.variant is not None:
        print(json.dumps(child(args)))
        return
    rows = []
    for variant in args.variants:
        command = [sys.executable, __file__, "--variant", variant, "--steps", str(args.steps), "--latent", str(args.latent),
                   "--channels", *map(str, args.channels), *(["--foreach"] if args.foreach else [])]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{variant}: {rows[-1]['peak_mib']:.0f} MiB, {rows[-1]['s_per_step']:.2f} s/step", file=sys.stderr)
    params = rows[0]["params"]
    base = rows[0]["peak_mib"]
    print(f"UNet: SD1.5 layout, channels {args.channels}, {params / 1e6:.1f} M parameters "
          f"({params * 4 / 2**20:.0f} MiB fp32); latents {args.latent}x{args.latent}, batch 1, {args.steps} steps\n")
    print(f"| variant | trained weights | peak memory above the loaded model | weights + peak | vs {rows[0]['variant']} | s/step |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        total = row["weights_mib"] + row["peak_mib"]
        print(f"| {row['variant']} | {row['weights_mib']:.0f} MiB | {row['peak_mib']:.0f} MiB | {total:.0f} MiB | "
              f"{total / (rows[0]['weights_mib'] + base):.2f}× | {row['s_per_step']:.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"channels": args.channels, "latent": args.latent, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
