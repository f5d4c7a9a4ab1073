"""Lazy tensor sources: one tensor at a time from a .safetensors file (or a legacy pickle).

Placeholder written by the LoRA-tools helper with the interface the merge-engine helper announced
(``TensorSource``, ``open_source``, ``sha256_of``); the merge engine's own version replaces it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from ..formats.files import WeightFileError, read_safetensors_header, read_weights, sniff_format

__all__ = ["TensorSource", "open_source", "sha256_of"]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class TensorSource:
    """A weights file read lazily: ``keys()``, ``shape(key)``, ``dtype(key)``, ``get(key)``."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handle = None
        self._tensors: dict[str, Tensor] | None = None
        if sniff_format(self.path) == "safetensors":
            from safetensors import safe_open

            header, metadata = read_safetensors_header(self.path)  # validates, names the file on error
            self._header = header
            self.metadata: dict[str, str] = dict(metadata)
            self._handle = safe_open(str(self.path), "pt", device="cpu")
        else:
            tensors, metadata = read_weights(self.path)
            if tensors and all(k.startswith("state_dict.") for k in tensors):
                tensors = {k[len("state_dict.") :]: v for k, v in tensors.items()}
            self._tensors = tensors
            self.metadata = dict(metadata)

    def keys(self) -> list[str]:
        return list(self._header) if self._tensors is None else list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __contains__(self, key: str) -> bool:
        return key in (self._header if self._tensors is None else self._tensors)

    def _check(self, key: str) -> None:
        if key not in self:
            raise KeyError(f"{self.path}: has no tensor {key!r}")

    def shape(self, key: str) -> tuple[int, ...]:
        self._check(key)
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        self._check(key)
        if self._tensors is not None:
            return self._tensors[key].dtype
        name = self._header[key]["dtype"]
        if name not in _SAFETENSORS_DTYPES:
            raise WeightFileError(f"{self.path}: tensor {key!r} has unsupported dtype {name}")
        return _SAFETENSORS_DTYPES[name]

    def get(self, key: str) -> Tensor:
        self._check(key)
        if self._tensors is not None:
            return self._tensors[key]
        return self._handle.get_tensor(key)

    def close(self) -> None:
        self._handle = None
        self._tensors = None

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(path: str | os.PathLike) -> TensorSource:
    """Open a weights file lazily (safetensors) or through ``torch.load(weights_only=True)``.

    Raises:
        WeightFileError: missing, truncated or unreadable file (names it).
    """
    file = Path(path)
    if not file.exists():
        raise WeightFileError(f"{file}: no such file")
    return TensorSource(file)


def sha256_of(path: str | os.PathLike, *, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (A1111's full hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
