"""An incremental, atomic safetensors writer: the header from a plan, then tensors as they come.

Placeholder written by the LoRA-tools helper with the interface the merge-engine helper announced
(``write_streaming``); the merge engine's own version replaces it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..formats.files import WeightFileError, atomic_write

__all__ = ["write_streaming"]

_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def write_streaming(
    path: str | os.PathLike,
    plan: Mapping[str, tuple[torch.dtype, tuple[int, ...]]],
    tensors: Iterable[tuple[str, Tensor]],
    *,
    metadata: Mapping[str, str] | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Write ``tensors`` (in ``plan`` order) to a safetensors file without holding them all.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        WeightFileError: a tensor arrives out of order or disagrees with the plan.
    """
    target = Path(path)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists; pass overwrite=True to replace it")
    header: dict[str, object] = {}
    offset = 0
    for key, (dtype, shape) in plan.items():
        numel = 1
        for d in shape:
            numel *= int(d)
        size = numel * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _NAMES[dtype], "shape": [int(d) for d in shape], "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    keys = list(plan)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(len(raw).to_bytes(8, "little"))
            handle.write(raw)
            count = 0
            for key, value in tensors:
                if count >= len(keys) or key != keys[count]:
                    raise WeightFileError(f"{target}: tensor {key!r} arrived out of plan order")
                dtype, shape = plan[key]
                if value.dtype != dtype or tuple(value.shape) != tuple(shape):
                    raise WeightFileError(
                        f"{target}: tensor {key!r} is {value.dtype} {tuple(value.shape)}, the plan says {dtype} {tuple(shape)}"
                    )
                data = value.detach().to("cpu").contiguous().reshape(-1)
                handle.write(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
                count += 1
                if progress is not None:
                    progress(count, len(keys))
            if count != len(keys):
                raise WeightFileError(f"{target}: {len(keys) - count} planned tensor(s) never arrived")

    return atomic_write(target, write)
