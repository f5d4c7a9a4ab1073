"""What an optimiser fused into backward costs per step: per-parameter vs per-block fusing.

On a GPU the lean full fine-tune was host-bound (issue 16): one single-tensor optimiser step per
parameter, each a Python hook plus a few dozen small kernels. This counts, per backward, the
optimiser ``step()`` calls, the aten ops they dispatch (views left out: each of the others is about
one kernel launch on a GPU) and
how many of those are multi-tensor ``_foreach`` ops, and times the step and the optimiser's share
of it — so the effect shows on a CPU too, where launches are cheap but Python is not.

Model: a diffusers ``UNet2DConditionModel`` in SD1.5's block layout (686 parameter tensors, the
real count) with narrow channels (``--channels``, default 32,64,128,128) and small latents
(``--latent``, default 16), batch 1, so the optimiser's fixed costs are a visible part of a step.

Modes (sdadapt ``AdamW``, int8 or fp32 states, ``lr=1e-5``):

``unfused``        one ``AdamW(foreach=True)`` over everything: ``backward(); step(); zero_grad()``
``fused/param``    ``fuse_optimizer_into_backward`` with one single-tensor optimiser per parameter
                   (what ``--fused-backward-pass`` ran before grouping; kohya's fused backward)
``fused/param+foreach``  the same with ``foreach=True`` (nothing to batch in a one-tensor group)
``fused/block``    one ``AdamW(foreach=True)`` per block: ``groups=parameter_groups_by_module(unet)``
                   (what ``train --fused-backward-pass`` runs now)

Usage::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/fused_backward_overhead.py      # ~1 min
    python benchmarks/fused_backward_overhead.py --device cuda --channels 320 640 1280 1280 --latent 64

Prints a Markdown table and writes ``benchmarks/results/fused_backward_overhead[-cuda].json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _bench import sd15_layout_unet, sync
from aten_ops import AtenOps

from sdadapt.training.optim import AdamW, fuse_optimizer_into_backward
from sdadapt.training.param_groups import parameter_groups_by_module

MODES = ("unfused", "fused/param", "fused/param+foreach", "fused/block")


class _Run:
    """One mode: its own copy of the UNet and its optimiser(s), instrumented by step hooks."""

    def __init__(self, mode: str, unet: torch.nn.Module, state_dtype: str | torch.dtype) -> None:
        self.mode = mode
        self.unet = copy.deepcopy(unet)
        params = list(self.unet.parameters())
        self.steps = 0  # optimiser step() calls
        self.opt_seconds = 0.0
        self.counter: AtenOps | None = None
        started = [0.0]

        def make(ps: list[torch.Tensor], foreach: bool) -> torch.optim.Optimizer:
            optimizer = AdamW(ps, lr=1e-5, state_dtype=state_dtype, foreach=foreach)

            def pre(*_):
                self.steps += 1
                if self.counter is not None:
                    self.counter.__enter__()
                started[0] = time.perf_counter()

            def post(*_):
                self.opt_seconds += time.perf_counter() - started[0]
                if self.counter is not None:
                    self.counter.__exit__(None, None, None)

            optimizer.register_step_pre_hook(pre)
            optimizer.register_step_post_hook(post)
            return optimizer

        self.optimizer = None
        if mode == "unfused":
            self.optimizer = make(params, True)
        elif mode == "fused/block":
            self.handle = fuse_optimizer_into_backward(params, lambda ps: make(ps, True),
                                                       groups=parameter_groups_by_module(self.unet))
        else:
            foreach = mode.endswith("+foreach")
            self.handle = fuse_optimizer_into_backward(params, lambda ps: make(ps, foreach))

    def step(self, inputs: tuple) -> None:
        x, t, context, target = inputs
        loss = torch.nn.functional.mse_loss(self.unet(x, t, context).sample.float(), target)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--channels", type=int, nargs=4, default=[32, 64, 128, 128])
    parser.add_argument("--latent", type=int, default=16)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per mode (after 2 warm-up steps)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--state-dtypes", nargs="+", default=["int8", "float32"], choices=["int8", "float32", "bfloat16"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    unet = sd15_layout_unet(args.channels, args.latent).to(device)
    gen = torch.Generator(device="cpu").manual_seed(1)
    inputs = (torch.randn(1, 4, args.latent, args.latent, generator=gen).to(device), torch.tensor([500], device=device),
              torch.randn(1, 77, 768, generator=gen).to(device), torch.randn(1, 4, args.latent, args.latent, generator=gen).to(device))
    tensors = sum(1 for _ in unet.parameters())
    elements = sum(p.numel() for p in unet.parameters())
    groups = len(parameter_groups_by_module(unet))
    rows = []
    for state_dtype in args.state_dtypes:
        runs = [_Run(mode, unet, state_dtype) for mode in MODES]
        for run in runs:  # warm-up (allocates the states), then one counted step
            for _ in range(2):
                run.step(inputs)
            run.steps = 0
            run.counter = AtenOps()
            run.step(inputs)
        counts = {run.mode: (run.steps, run.counter.ops, run.counter.foreach) for run in runs}  # type: ignore[union-attr]
        times: dict[str, list[float]] = {run.mode: [] for run in runs}
        opt: dict[str, list[float]] = {run.mode: [] for run in runs}
        for _ in range(args.steps):  # interleaved, so a busy machine slows every mode alike
            for run in runs:
                run.counter, run.opt_seconds = None, 0.0
                sync(device)
                start = time.perf_counter()
                run.step(inputs)
                sync(device)
                times[run.mode].append(time.perf_counter() - start)
                opt[run.mode].append(run.opt_seconds)
        for run in runs:
            steps, ops, foreach = counts[run.mode]
            rows.append({"state_dtype": state_dtype, "mode": run.mode, "step_calls": steps, "aten_ops": ops,
                         "foreach_ops": foreach, "s_per_step": statistics.median(times[run.mode]),
                         "optimizer_s": statistics.median(opt[run.mode])})
        del runs
    print(f"UNet: SD1.5 layout, channels {args.channels}, {tensors} parameter tensors ({elements / 1e6:.1f} M elements), "
          f"{groups} blocks; latents {args.latent}x{args.latent}, batch 1, {args.device}, "
          f"median of {args.steps} steps\n")
    print("| states | mode | optimiser step() calls | aten ops in them (no views) | of which _foreach | optimiser s | s/step |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['state_dtype']} | {row['mode']} | {row['step_calls']} | {row['aten_ops']} | {row['foreach_ops']} | "
              f"{row['optimizer_s']:.3f} | {row['s_per_step']:.3f} |")
    out = args.out or Path(__file__).parent / "results" / (
        "fused_backward_overhead.json" if device.type == "cpu" else f"fused_backward_overhead-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"channels": args.channels, "latent": args.latent, "device": args.device,
                               "parameter_tensors": tensors, "blocks": groups, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
