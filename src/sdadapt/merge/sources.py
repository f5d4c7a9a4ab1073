"""Lazy tensor sources: one tensor at a time from a weights file.

A :class:`TensorSource` answers ``keys()``, ``shape(key)``, ``dtype(key)`` from the file's header
alone and reads a tensor's bytes only when ``get(key)`` is called. For ``.safetensors`` files the
bytes are read with plain positioned reads straight into a fresh tensor — no ``mmap`` — so a
process that streams a whole checkpoint only ever holds the tensors it still references (mapped
file pages would otherwise count toward its resident memory until the end of the merge).

Legacy ``.ckpt`` / ``.pt`` / ``.bin`` / ``.pth`` files can only be read whole, through
:func:`sdadapt.formats.files.read_weights` (``torch.load(weights_only=True)``); they become an
in-memory source with the same API. Convert them to safetensors once to merge in bounded memory.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping
from math import prod
from pathlib import Path

import torch
from torch import Tensor

from ..formats.files import WeightFileError, _header_and_start, check_input_file, read_weights, sniff_format
from ..formats.header import TORCH_DTYPES, read_tensor

__all__ = ["MemorySource", "TensorSource", "open_source", "sha256_of", "short_hash", "legacy_hash", "SAFETENSORS_DTYPES"]

#: safetensors dtype names -> torch dtypes (the ones this torch can hold)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = dict(TORCH_DTYPES)


class TensorSource:
    """A read-only, lazy view of one weights file.

    Attributes:
        path: the file.
        metadata: the safetensors ``__metadata__`` (strings), or a legacy file's non-tensor
            entries JSON-encoded.

    ``get(key)`` returns a fresh CPU tensor the caller owns (writing to it never changes the
    source). Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._handle = None
        self._tensors: dict[str, Tensor] | None = None
        self._header: dict[str, dict] = {}
        self._data_start = 0
        check_input_file(self.path)
        if sniff_format(self.path) == "safetensors":
            # the one validator (sdadapt.formats.header): offsets contiguous, sizes = shape x itemsize,
            # all within the file — get() can then trust every entry before allocating anything
            header, metadata, self._data_start = _header_and_start(self.path)
            self._header = header
            self.metadata: dict[str, str] = dict(metadata)
            try:
                self._handle = open(self.path, "rb")  # noqa: SIM115 - closed by close()
            except OSError as exc:
                raise WeightFileError(f"{self.path}: cannot be read ({exc.strerror or exc})") from None
        else:
            tensors, metadata = read_weights(self.path)
            if tensors and all(k.startswith("state_dict.") for k in tensors):
                tensors = {k[len("state_dict.") :]: v for k, v in tensors.items()}
            self._tensors = tensors
            self.metadata = dict(metadata)

    @property
    def lazy(self) -> bool:
        """True for safetensors (read tensor by tensor), False for legacy files read whole."""
        return self._tensors is None

    def keys(self) -> list[str]:
        """Tensor names in file order (safetensors: order of their bytes in the file)."""
        if self._tensors is not None:
            return list(self._tensors)
        return sorted(self._header, key=lambda k: self._header[k]["data_offsets"][0])

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._header if self._tensors is None else self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in (self._header if self._tensors is None else self._tensors)

    def _check(self, key: str) -> None:
        if key not in self:
            raise KeyError(f"{self.path}: has no tensor {key!r}")

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key`` without reading it."""
        self._check(key)
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return tuple(int(d) for d in self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        """dtype of ``key`` without reading it."""
        self._check(key)
        if self._tensors is not None:
            return self._tensors[key].dtype
        name = self._header[key]["dtype"]
        if name not in SAFETENSORS_DTYPES:
            raise WeightFileError(f"{self.path}: tensor {key!r} has dtype {name}, which torch cannot hold")
        return SAFETENSORS_DTYPES[name]

    def nbytes(self, key: str) -> int:
        """Size of ``key``'s data in bytes."""
        return prod(self.shape(key)) * torch.empty((), dtype=self.dtype(key)).element_size()

    def get(self, key: str) -> Tensor:
        """Read ``key``: a fresh, contiguous CPU tensor the caller may keep or modify."""
        self._check(key)
        if self._tensors is not None:
            return self._tensors[key].clone()
        if self._handle is None:
            raise ValueError(f"{self.path}: the source is closed")
        try:
            return read_tensor(self._handle, self._data_start, self._header[key], file=self.path, key=key)
        except OSError as exc:  # e.g. EIO from a failing disk: the input, not the output
            raise WeightFileError(f"{self.path}: reading tensor {key!r} failed ({exc.strerror or exc})") from None

    def close(self) -> None:
        """Release the file handle (or the in-memory tensors of a legacy file)."""
        if self._handle is not None:
            self._handle.close()
        self._handle = None
        if self._tensors is not None:
            self._tensors = {}

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorSource({str(self.path)!r}, {len(self)} tensors{'' if self.lazy else ', in memory'})"


class MemorySource:
    """:class:`TensorSource`'s reading interface over tensors already in memory (a state dict): ``get`` returns the
    tensor itself, detached, on its device (no copy: a reader that changes it in place changes the dict).

    Attributes:
        path: the name errors give it (``"<tuned state dict>"``); no file.
        metadata: empty.
    """

    def __init__(self, tensors: Mapping[str, Tensor], *, name: str = "<state dict>") -> None:
        bad = next((k for k, v in tensors.items() if not isinstance(v, Tensor)), None)
        if bad is not None:
            raise WeightFileError(f"{name}: {bad!r} is a {type(tensors[bad]).__name__}, not a tensor")
        self.path = name
        self.metadata: dict[str, str] = {}
        self._tensors = dict(tensors)
        self.lazy = False

    def keys(self) -> list[str]:
        return list(self._tensors)

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def _tensor(self, key: str) -> Tensor:
        if key not in self._tensors:
            raise KeyError(f"{self.path}: has no tensor {key!r}")
        return self._tensors[key]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensor(key).shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensor(key).dtype

    def nbytes(self, key: str) -> int:
        tensor = self._tensor(key)
        return tensor.numel() * tensor.element_size()

    def get(self, key: str) -> Tensor:
        return self._tensor(key).detach()

    def close(self) -> None:
        self._tensors = {}

    def __enter__(self) -> MemorySource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MemorySource({self.path!r}, {len(self)} tensors)"


def open_source(path: str | os.PathLike) -> TensorSource:
    """Open a weights file lazily (safetensors) or whole through ``torch.load(weights_only=True)``.

    A legacy checkpoint whose tensors all sit under ``state_dict`` (A1111 ``.ckpt``) is seen
    without that prefix, like its safetensors conversion.

    Raises:
        WeightFileError: missing, empty, truncated, corrupt file, or a pickle that needs full
            unpickling (the message names the file and the fix).
    """
    return TensorSource(check_input_file(path))


def sha256_of(path: str | os.PathLike, *, chunk: int = 1 << 22, start: int = 0) -> str:
    """Hex sha256 of the whole file (A1111's "sha256" / full hash), or of its bytes from ``start`` on, read in
    ``chunk``-byte pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def short_hash(sha256: str) -> str:
    """The AutoV2 short hash civitai and A1111 show: the first 10 hex digits of the sha256."""
    return sha256[:10]


def legacy_hash(path: str | os.PathLike) -> str:
    """A1111's old 8-digit model hash: sha256 of 64 KiB at offset 1 MiB (``modules.sd_models.model_hash``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(0x100000)
        digest.update(handle.read(0x10000))
    return digest.hexdigest()[:8]
