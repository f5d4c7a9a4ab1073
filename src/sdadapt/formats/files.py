"""Reading and writing weight files safely.

* safetensors first; legacy ``.pt/.ckpt/.bin`` only through ``torch.load(weights_only=True)``
  (never plain unpickling) and always mapped to CPU;
* every write is atomic: a temporary file in the target folder, fsync, then ``os.replace``, so a
  crash never leaves a half-written file under the final name;
* every failure names the file and says what to do.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "WeightFileError",
    "read_safetensors",
    "read_safetensors_header",
    "read_weights",
    "write_safetensors",
    "atomic_write",
    "check_finite",
]

_LEGACY_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")


class WeightFileError(ValueError):
    """A weights file that cannot be used; the message names the file and the fix."""


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename the result to ``path``.

    The temporary file lives in the same folder (so the rename is atomic) and is removed if
    ``write`` raises.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise WeightFileError(f"{target}: folder {folder} does not exist; create it first")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` (contiguous CPU copies) and string ``metadata`` atomically.

    Raises:
        WeightFileError: a metadata value is not a string, or tensors share memory.
    """
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise WeightFileError(f"{path}: safetensors metadata must be str -> str; non-strings: {bad}")
    payload = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(payload, tmp, metadata=meta))


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse only the JSON header: ``({key: {"dtype", "shape", "data_offsets"}}, metadata)``.

    Cheap for multi-GB files (reads 8 bytes + the header). Raises :class:`WeightFileError` for a
    missing, truncated or non-safetensors file.
    """
    file = Path(path)
    if not file.is_file():
        raise WeightFileError(f"{file}: no such file")
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise WeightFileError(f"{file}: {size} bytes is too short to be a safetensors file (truncated?)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100_000_000):
            raise WeightFileError(_not_safetensors(file, head))
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightFileError(_not_safetensors(file, head)) from None
    if not isinstance(header, dict):
        raise WeightFileError(_not_safetensors(file, head))
    metadata = header.pop("__metadata__", None) or {}
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + header_len + end > size:
        raise WeightFileError(
            f"{file}: truncated safetensors file (header promises {8 + header_len + end} bytes, "
            f"the file has {size}); download or copy it again"
        )
    return header, metadata


def _not_safetensors(file: Path, head: bytes) -> str:
    if head[:2] == b"PK" or head[:1] == b"\x80":
        kind = "a pickle/zip (torch.save) file"
    else:
        kind = "not a safetensors file"
    return (
        f"{file}: {kind}. sdadapt reads .safetensors directly and legacy .pt/.ckpt/.bin through "
        "torch.load(weights_only=True); rename it to its real extension, or convert it to .safetensors."
    )


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors on CPU, metadata)`` of a safetensors file, validated first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _, metadata = read_safetensors_header(path)
    try:
        tensors = load_file(str(path), device="cpu")
    except SafetensorError as exc:  # pragma: no cover - header checks catch the common cases
        raise WeightFileError(f"{path}: unreadable safetensors file ({exc})") from exc
    return tensors, dict(metadata)


def _flatten(obj: object, prefix: str, out: dict[str, Tensor], extras: dict[str, object]) -> None:
    if isinstance(obj, Tensor):
        out[prefix] = obj
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out, extras)
    elif prefix:
        extras[prefix] = obj


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a ``.safetensors`` file, or a legacy pickle with ``torch.load(weights_only=True)``.

    Legacy nested dicts are flattened with dots (``{"state_dict": {"a": t}}`` -> ``"state_dict.a"``);
    their non-tensor entries come back JSON-encoded in the metadata dict.

    Raises:
        WeightFileError: missing, truncated, unsafe (needs full unpickling) or unknown file.
    """
    file = Path(path)
    if not file.is_file():
        raise WeightFileError(f"{file}: no such file")
    with open(file, "rb") as handle:
        head = handle.read(8)
    is_pickle = head[:2] == b"PK" or head[:1] == b"\x80"
    if not is_pickle and file.suffix.lower() not in _LEGACY_SUFFIXES:
        return read_safetensors(file)
    if not is_pickle:
        try:
            return read_safetensors(file)
        except WeightFileError:
            raise WeightFileError(f"{file}: neither a safetensors file nor a torch.save archive") from None
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError variants
        text = str(exc).split("\n")[0]
        raise WeightFileError(
            f"{file}: cannot be read safely with torch.load(weights_only=True): {text}. sdadapt never "
            "runs arbitrary pickled code; if you trust the file, re-save its tensors as a plain dict "
            "or as .safetensors."
        ) from exc
    tensors: dict[str, Tensor] = {}
    extras: dict[str, object] = {}
    _flatten(obj, "", tensors, extras)
    metadata = {k: json.dumps(v, default=str) for k, v in extras.items()}
    return tensors, metadata


def check_finite(tensors: Mapping[str, Tensor], *, source: str) -> None:
    """Raise :class:`WeightFileError` naming the first tensors that contain NaN or inf."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise WeightFileError(
            f"{source}: {len(bad)} tensor(s) contain NaN or inf, e.g. {bad[:5]}; the training that "
            "made this file diverged — use an earlier checkpoint."
        )
