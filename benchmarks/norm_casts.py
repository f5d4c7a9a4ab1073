"""What ``StepConfig(half_precision_norms=True)`` removes from a LoRA training step, counted on a CPU.

CUDA autocast runs GroupNorm and LayerNorm in float32 (input, weight and bias cast up, a float32
output every following convolution or linear casts back down); CPU autocast leaves them in bfloat16,
so on a CPU the difference would not show. :class:`CudaNormPolicy` puts CUDA's rule for the two
norms on CPU autocast (a torch function mode outside the step's own), and the script counts the aten
ops one step of ``benchmarks/train_step.py``'s LoRA rows ``sdadapt`` and ``sdadapt-halfnorms`` (r16 on
attention, bf16 autocast, cached latents) dispatch, without and with the option — each op about one
kernel on a GPU — and the largest absolute difference of the LoRA gradients between the two.

    python benchmarks/norm_casts.py [--config tiny|sd15]      # tiny: seconds; sd15 (512 px): ~2 min

Writes ``benchmarks/results/norm_casts-<config>.json``. The GPU time it saves is measured by
``train_step.py``'s ``-halfnorms`` rows (``benchmarks/gpu_check.sh``).

``--variants A B`` counts two other LoRA rows the same way, e.g. what ``StepConfig(fused_lora_linear=True)``
removes (``sdadapt-halfnorms sdadapt-fused-halfnorms``), into ``norm_casts-<config>-<A>-<B>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook
from torch.utils._python_dispatch import _disable_current_modes

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step
from aten_ops import AtenOps

from sdadapt.training.engine_backward import BackwardKeepingMode
from sdadapt.training.norm_precision import NORM_FUNCTIONS

__all__ = ["CudaNormPolicy", "count_step_ops", "lora_rows", "main"]


class CudaNormPolicy(BackwardKeepingMode):
    """CUDA autocast's rule for GroupNorm and LayerNorm on CPU autocast: while CPU autocast is on,
    every floating-point tensor argument of those calls is cast to float32 and the call runs with
    autocast off (a float32 output). Enter it outside the code under test; a backward started inside it
    runs inside it too (a checkpointed block recomputes its norms as its forward did)."""

    def handle(self, func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if func in NORM_FUNCTIONS and torch.is_autocast_enabled("cpu"):
            up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
            with torch.autocast("cpu", enabled=False):
                return func(*up, **{k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                                    for k, v in kwargs.items()})
        return func(*args, **kwargs)


DEFAULT_VARIANTS = ("sdadapt", "sdadapt-halfnorms")


class _Args:
    compile_backend = "inductor"


def lora_rows(config: str, batch: int,
              variants: Sequence[str]) -> Iterator[tuple[str, Callable[[], torch.Tensor], Any]]:
    """``(variant, step, unet)`` of each LoRA row ``variant`` of ``benchmarks/train_step.py`` (``peft-unet`` too) on
    the CPU with bf16 autocast, built one after the other from one set of random models and one batch of ``batch``
    images, each from the same random state (the same adapter initialisation): the rows whose steps the CPU counts
    (this script's ops, ``saved_activations.py``, ``strided_ops.py``) take under :class:`CudaNormPolicy`."""
    spec = train_step.CONFIGS[config]
    models = train_step.Models(spec, 0)
    data = train_step.make_batch(spec, batch, torch.device("cpu"), 0)
    for variant in variants:
        torch.manual_seed(0)
        step, unet, *_ = train_step._build(variant, "lora", models, torch.device("cpu"), torch.bfloat16, data, _Args())
        yield variant, step, unet


def count_step_ops(step: Callable[[], torch.Tensor]) -> tuple[Counter[str], int, list[torch.Tensor]]:
    """The aten ops of the second call of a :func:`lora_rows` ``step`` (under :class:`CudaNormPolicy`; by name,
    views included), how many of them launch a kernel (no views), and the LoRA gradients of that step (copied
    outside the count)."""
    grads: list[torch.Tensor] = []

    def keep_grads(optimizer, *_):
        with _disable_current_modes():  # (the copies are the benchmark's, not the step's)
            grads[:] = [p.grad.detach().clone() for group in optimizer.param_groups for p in group["params"]]

    with CudaNormPolicy():
        step()
        counter = AtenOps()
        hook = register_optimizer_step_pre_hook(keep_grads)  # (the optimiser the row made)
        try:
            with counter:
                step()
        finally:
            hook.remove()
    return counter.counts, counter.ops, grads


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variants", nargs=2, default=DEFAULT_VARIANTS, metavar=("A", "B"),
                        help="the two LoRA rows of train_step.py to count (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    variants = tuple(args.variants)
    (off, launched_off, grads_off), (on, launched_on, grads_on) = (
        count_step_ops(step) for _, step, _ in lora_rows(args.config, 1, variants))
    diff = max(float((a - b).abs().max()) for a, b in zip(grads_off, grads_on))
    scale = max(float(a.abs().max()) for a in grads_off)
    names = sorted(set(off) | set(on), key=lambda n: off[n] - on[n], reverse=True)
    rows = [(name, off[name], on[name]) for name in names if off[name] != on[name]]
    labels = ("float32 norms", "half_precision_norms") if variants == DEFAULT_VARIANTS else variants
    lines = [f"LoRA step, {args.config} config, bf16 autocast with CUDA's float32 norms (emulated on CPU)", "",
             f"| aten op | {labels[0]} | {labels[1]} |", "|---|---:|---:|"]
    lines += [f"| {name} | {a} | {b} |" for name, a, b in rows]
    lines += [f"| **all ops** | **{sum(off.values())}** | **{sum(on.values())}** |",
              f"| **ops that launch a kernel (no views)** | **{launched_off}** | **{launched_on}** |", "",
              f"LoRA gradients: largest |difference| {diff:.3g} (largest |gradient| {scale:.3g})"]
    print("\n".join(lines))
    suffix = "" if variants == DEFAULT_VARIANTS else f"-{variants[0]}-{variants[1]}"
    out = args.out or train_step.RESULTS / f"norm_casts-{args.config}{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "variants": list(variants),
                               "ops": {variants[0]: dict(off), variants[1]: dict(on)},
                               "launching_ops": {variants[0]: launched_off, variants[1]: launched_on},
                               "grad_max_abs_diff": diff, "grad_max_abs": scale}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
