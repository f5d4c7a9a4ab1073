"""The activation memory of a LoRA training step, counted on a CPU: the bytes autograd saves for
backward in one step of ``benchmarks/train_step.py``'s LoRA rows.

What a step holds at its peak is the weights, the optimiser state and the activations its forward
saves for backward; the last is what a step's choices change. :class:`SavedActivations` records, while
it is on, every distinct storage autograd saves (``torch.autograd.graph.saved_tensors_hooks``), leaving
out those of the model's parameters and buffers (a layer saving its weight holds no new memory). CUDA
autocast runs GroupNorm and LayerNorm in float32 and CPU autocast does not, so each step runs under
``norm_casts.CudaNormPolicy`` (CUDA's rule put on CPU autocast): the float32 activations it saves are
the ones a GPU step saves. Rows: ``peft-unet`` (peft LoRA, the issue's baseline), ``sdadapt``,
``sdadapt-halfnorms`` (``StepConfig(half_precision_norms=True)``) and any other LoRA variant of
``train_step.py`` that runs on a CPU (channels_last is CUDA-only there, so those rows are NCHW here).

    python benchmarks/saved_activations.py [--config tiny|sd15] [--batch 1]   # sd15: ~1 min a row

Writes ``benchmarks/results/saved_activations-<config>-b<batch>.json``. The GPU's peak memory of the
same rows is measured by ``train_step.py`` (``benchmarks/gpu_check.sh``); a CUDA step also holds the
kernels' workspaces and a captured step its warm-up's and capture's transients, which this does not see.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_step
from norm_casts import CudaNormPolicy, lora_rows

__all__ = ["SavedActivations", "main", "saved_by_variant"]

DEFAULT_VARIANTS = ("peft-unet", "sdadapt", "sdadapt-halfnorms")


class SavedActivations:
    """Context manager recording the distinct storages autograd saves for backward while it is on.

    Args:
        exclude: tensors whose storages are not counted (the model's parameters and buffers).

    Attributes:
        bytes_by_dtype: saved bytes per dtype name (``"torch.float32"``), each storage counted once
            (a view of a counted storage adds nothing).
        storages: how many distinct storages were saved.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()) -> None:
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._seen: set[int] = set()
        self.bytes_by_dtype: Counter[str] = Counter()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key not in self._excluded and key not in self._seen and storage.nbytes():
            self._seen.add(key)
            self.bytes_by_dtype[str(tensor.dtype)] += storage.nbytes()
        return tensor

    @property
    def storages(self) -> int:
        return len(self._seen)

    @property
    def total(self) -> int:
        """All saved bytes."""
        return sum(self.bytes_by_dtype.values())

    def __enter__(self) -> SavedActivations:  # noqa: PYI034 (typing.Self needs Python 3.11)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.__exit__(*exc)


def saved_by_variant(config: str, batch: int, variants: Sequence[str]) -> dict[str, SavedActivations]:
    """What the second step of each LoRA ``variant`` of ``train_step.py`` saves (``config``, ``batch``
    images, bf16 autocast under :class:`CudaNormPolicy`, on the CPU)."""
    out = {}
    for variant, step, unet in lora_rows(config, batch, variants):
        with CudaNormPolicy():
            step()  # (the first step makes the optimiser state)
            with SavedActivations([*unet.parameters(), *unet.buffers()]) as saved:
                step()
        out[variant] = saved
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", choices=("tiny", "sd15"), default="tiny")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        choices=[v for v in train_step.VARIANTS["lora"] if v != "reference"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    saved = saved_by_variant(args.config, args.batch, args.variants)
    base = saved.get("peft-unet")
    mib = 2**20
    title = (f"LoRA step, {args.config} config, batch {args.batch}: activations saved for backward "
             "(bf16 autocast, CUDA's float32 norms emulated on CPU)")
    lines = [title, "", "| variant | saved MiB | bf16 MiB | float32 MiB | storages | vs peft-unet |",
             "|---|---:|---:|---:|---:|---:|"]
    for variant, s in saved.items():
        ratio = f"{s.total / base.total:.2f}x" if base is not None else "—"
        lines.append(f"| {variant} | {s.total / mib:.1f} | {s.bytes_by_dtype['torch.bfloat16'] / mib:.1f} "
                     f"| {s.bytes_by_dtype['torch.float32'] / mib:.1f} | {s.storages} | {ratio} |")
    print("\n".join(lines))
    out = args.out or train_step.RESULTS / f"saved_activations-{args.config}-b{args.batch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": args.config, "batch": args.batch,
                               "rows": {v: {"bytes": s.total, "bytes_by_dtype": dict(s.bytes_by_dtype),
                                            "storages": s.storages} for v, s in saved.items()}}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
