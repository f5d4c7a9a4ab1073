"""Where a LoRA training step's strided elementwise kernels come from, counted on a CPU.

A CUDA elementwise op (or copy) whose operands are not all dense with one layout and one shape — a
transposed or sliced view, a broadcast — runs torch's generic ``elementwise_kernel`` with an offset
calculator instead of a vectorised one: the GPU profiles of the captured SD1.5 LoRA step show 276 such
launches at batch 1 (6.4 µs each) and the same 276 at batch 8 (37 µs each, 10.1 ms of 85). The script
records every pointwise aten op and copy one step of ``benchmarks/train_step.py``'s rows dispatches
(``peft-unet``: the UNet-only peft step; ``sdadapt-halfnorms``: sdadapt's LoRA step with
``half_precision_norms``; both NCHW, bf16 autocast, CUDA's float32 norms emulated as in
``norm_casts.py``), keeps those with such operands, and says where each was called (the diffusers or
sdadapt line in forward, the autograd node in backward) and how many bytes it writes. CUDA-only
extra a CPU run cannot show is counted from its cause: cuDNN adds a convolution's bias in a separate
broadcast ``add_`` (``aten/src/ATen/native/Convolution.cpp``; one per convolution with a bias). Not
counted: CUDA's GroupNorm reads a channels_last input through a contiguous copy (the rows here are NCHW).

    python benchmarks/strided_ops.py [--config tiny|sd15] [--batch N]   # sd15: ~1 min

Writes ``benchmarks/results/strided_ops-<config>.json``. The time they take is the GPU profile's
(``gpu_check.sh``); the census says which of them are the UNet's own (the same in both rows) and
which an adapter adds.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step
from _bench import write_result
from norm_casts import CudaNormPolicy, lora_rows

__all__ = ["StridedOps", "dense_alike", "main"]

_COPIES = {"copy_", "_to_copy", "clone"}
_OWN_FRAMES = ("engine_backward", "norm_precision", "training/attention", "training/step")  # the step's modes


def dense_alike(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether an elementwise kernel over ``tensors`` (output first) could run vectorised: every tensor of
    the same shape and strides, none a broadcast or a 0-dim operand of a larger op (CUDA keeps a device
    scalar as a broadcast operand), and that layout dense (a permutation of a contiguous one)."""
    first = tensors[0]
    if any(t.shape != first.shape or t.stride() != first.stride() for t in tensors):
        return False
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(first.stride(), first.shape) if n > 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _caller() -> str:
    node = torch._C._current_autograd_node()
    if node is not None:
        return f"backward {node.name()}"
    for frame in reversed(traceback.extract_stack()[:-3]):
        name = frame.filename.replace("\\", "/")
        if ("diffusers" in name or "sdadapt" in name or "peft" in name) and not any(o in name for o in _OWN_FRAMES):
            return f"{Path(name).name}:{frame.lineno} {(frame.line or '').strip()[:60]}"
    return "?"


class StridedOps(TorchDispatchMode):
    """Records the pointwise aten ops and copies dispatched while it is on that a CUDA kernel would run
    strided (:func:`dense_alike` false), by (op, caller, input shapes), with the bytes they write; and the
    convolutions with a bias (cuDNN's separate bias add on CUDA).

    Attributes:
        elementwise: how many pointwise ops and copies were dispatched (views excluded).
        strided: calls of each (op, caller, input shapes) that would run strided.
        written: bytes the calls of each such key write.
        conv_bias_adds: convolutions with a bias (each one broadcast ``add_`` on CUDA).
    """

    def __init__(self) -> None:
        super().__init__()
        self.elementwise = 0
        self.strided: Counter[tuple] = Counter()
        self.written: Counter[tuple] = Counter()
        self.conv_bias_adds = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name == "convolution" and args[2] is not None:
            self.conv_bias_adds += 1
        if func.is_view or not (torch.Tag.pointwise in func.tags or name in _COPIES):
            return out
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs:
            return out
        self.elementwise += 1
        if not dense_alike(outputs + [t for t in inputs if t is not outputs[0]]):
            key = (name, _caller(), tuple(tuple(t.shape) for t in inputs))
            self.strided[key] += 1
            self.written[key] += sum(t.numel() * t.element_size() for t in outputs)
        return out


def census(config: str, batch: int, variants: Sequence[str]) -> dict[str, StridedOps]:
    """The strided ops of the second step of each of ``train_step.py``'s LoRA rows ``variants`` (CPU, bf16)."""
    out = {}
    for variant, step, _ in lora_rows(config, batch, variants):
        out[variant] = StridedOps()
        with CudaNormPolicy():
            step()
            with out[variant]:
                step()
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=["peft-unet", "sdadapt-halfnorms"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result: dict = {"config": args.config, "batch": args.batch, "rows": {}}
    lines = []
    for variant, ops in census(args.config, args.batch, args.variants).items():
        keys = sorted(ops.strided, key=lambda k: -ops.written[k])
        total = sum(ops.strided.values())
        lines += [(f"### {variant}: {total} of {ops.elementwise} elementwise ops strided (CPU), "
                   f"+ {ops.conv_bias_adds} cuDNN bias adds (CUDA only)"), "",
                  "| calls | MiB written | op | called from | input shapes |", "|---:|---:|---|---|---|"]
        lines += [f"| {ops.strided[k]} | {ops.written[k] / 2**20:.1f} | {k[0]} | `{k[1]}` | {k[2]} |" for k in keys]
        lines.append("")
        result["rows"][variant] = {
            "elementwise_ops": ops.elementwise, "strided_ops": total, "conv_bias_adds": ops.conv_bias_adds,
            "strided": [{"op": k[0], "caller": k[1], "input_shapes": k[2], "calls": ops.strided[k],
                         "bytes_written": ops.written[k]} for k in keys]}
    print("\n".join(lines))
    print(f"wrote {write_result(args.out or train_step.RESULTS / f'strided_ops-{args.config}.json', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
