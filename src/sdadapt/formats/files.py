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
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = [
    "WeightFileError",
    "DiskSpaceError",
    "check_output_file",
    "read_safetensors",
    "read_safetensors_header",
    "read_weights",
    "write_safetensors",
    "atomic_write",
    "check_finite",
    "sniff_format",
]

_LEGACY_SUFFIXES = (".pt", ".ckpt", ".bin", ".pth")


class WeightFileError(ValueError):
    """A weights file that cannot be used; the message names the file and the fix."""


class DiskSpaceError(WeightFileError, OSError):
    """Not enough free disk space for an output file: an ``OSError`` (as a full disk is) and a
    :class:`WeightFileError` (so every command reports it as a clear file error)."""


def _output_folder(target: Path) -> Path:
    """The folder ``target`` goes into; it must exist."""
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise WeightFileError(f"{target}: folder {folder} does not exist; create it first")
    return folder


def _size_text(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def check_output_file(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    needed_bytes: int = 0,
    margin_bytes: int = 0,
    suffix: str | None = ".safetensors",
) -> Path:
    """The one output check, before any work: name, existing file, folder, free disk space.

    Args:
        path: the file to be written (atomically: a temporary file beside it, so replacing an
            existing file needs the full size free too).
        overwrite: whether an existing ``path`` may be replaced.
        needed_bytes: the output's size (0: skip the space check, e.g. before the size is known).
        margin_bytes: free space to leave beyond ``needed_bytes``.
        suffix: the required file suffix (``None``: any).

    Returns:
        ``Path(path)``.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        WeightFileError: a wrong suffix, ``path`` is a folder, or its folder does not exist.
        DiskSpaceError: less than ``needed_bytes + margin_bytes`` free (names both sizes).
    """
    target = Path(path)
    if suffix is not None and target.suffix.lower() != suffix:
        raise WeightFileError(f"{target}: sdadapt writes {suffix} files only; name the output *{suffix}")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists; pass --overwrite (overwrite=True) to replace it")
    if target.is_dir():
        raise WeightFileError(f"{target}: is a folder; give a file name such as {target / ('out' + (suffix or ''))}")
    folder = _output_folder(target)
    if needed_bytes > 0 or margin_bytes > 0:
        free = shutil.disk_usage(folder).free
        if free < needed_bytes + margin_bytes:
            margin = f" (plus {_size_text(margin_bytes)} to spare)" if margin_bytes else ""
            raise DiskSpaceError(
                f"{target}: not enough disk space in {folder}: the output needs about {_size_text(needed_bytes)}"
                f"{margin}, {_size_text(free)} are free; free some space or write elsewhere"
            )
    return target


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then atomically rename the result to ``path``.

    The temporary file lives in the same folder (so the rename is atomic) and is removed if
    ``write`` raises.
    """
    target = Path(path)
    folder = _output_folder(target)
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

    Tensors that share memory (tied weights, views of one buffer) are written as independent
    copies, which safetensors requires.

    Raises:
        WeightFileError: a metadata key or value is not a string.
    """
    from safetensors.torch import save_file

    meta = dict(metadata or {})
    bad = {k: type(v).__name__ for k, v in meta.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise WeightFileError(f"{path}: safetensors metadata must be str -> str; non-strings: {bad}")
    payload: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, value in tensors.items():
        value = value.detach().to("cpu").contiguous()
        if value.numel():
            storage = value.untyped_storage().data_ptr()
            if storage in seen:
                value = value.clone()
            seen.add(value.untyped_storage().data_ptr())
        payload[key] = value
    return atomic_write(path, lambda tmp: save_file(payload, tmp, metadata=meta))


def sniff_format(path: str | os.PathLike) -> str:
    """``"safetensors"``, ``"pickle"`` (a ``torch.save`` zip archive or legacy pickle) or ``"unknown"``.

    Decided from the first bytes, not the extension. A safetensors file starts with an 8-byte
    little-endian header length followed by ``{``; its first byte is that length's low byte, so
    it can be ``0x80`` or ``"P"`` — which is why "starts with 0x80 -> pickle" alone misreads about
    one safetensors file in 256.
    """
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        (header_len,) = struct.unpack("<Q", head[:8])
        if 2 <= header_len <= 100_000_000:
            return "safetensors"
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pickle"
    return "unknown"


def _check_is_file(file: Path) -> None:
    if file.is_dir():
        raise WeightFileError(f"{file}: is a folder, not a weights file; pass the file inside it")
    if not file.is_file():
        raise WeightFileError(f"{file}: no such file")
    if file.stat().st_size == 0:
        raise WeightFileError(f"{file}: the file is empty (0 bytes); the download or save did not finish")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """Parse only the JSON header: ``({key: {"dtype", "shape", "data_offsets"}}, metadata)``.

    Cheap for multi-GB files (reads 8 bytes + the header). Raises :class:`WeightFileError` for a
    missing, truncated or non-safetensors file.
    """
    file = Path(path)
    _check_is_file(file)
    size = file.stat().st_size
    with open(file, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise WeightFileError(f"{file}: {size} bytes is too short to be a safetensors file (truncated?)")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(size - 8, 100_000_000):
            if header_len <= 100_000_000 and handle.read(1) in (b"{", b""):
                raise WeightFileError(
                    f"{file}: truncated safetensors file (the {header_len}-byte header alone is longer "
                    f"than the {size}-byte file); download or copy it again"
                )
            raise WeightFileError(_not_safetensors(file, head))
        raw = handle.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise WeightFileError(_not_safetensors(file, head)) from None
    if not isinstance(header, dict):
        raise WeightFileError(_not_safetensors(file, head))
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise WeightFileError(f"{file}: corrupt safetensors header (__metadata__ must map strings to strings)")
    bad = [k for k, v in header.items() if not _valid_entry(v)]
    if bad:
        raise WeightFileError(
            f"{file}: corrupt safetensors header (entries without a valid dtype/shape/data_offsets, "
            f"e.g. {bad[:3]}); download or copy it again"
        )
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + header_len + end > size:
        raise WeightFileError(
            f"{file}: truncated safetensors file (header promises {8 + header_len + end} bytes, "
            f"the file has {size}); download or copy it again"
        )
    return header, metadata


def _valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        return False
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    return (
        isinstance(shape, list)
        and all(isinstance(n, int) and n >= 0 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(n, int) and n >= 0 for n in offsets)
        and offsets[0] <= offsets[1]
    )


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
    elif isinstance(obj, (list, tuple)) and _holds_tensor(obj):
        # e.g. A1111 hypernetworks: {768: (k_state_dict, v_state_dict), ...} -> "768.0.linear.0.weight"
        for index, value in enumerate(obj):
            _flatten(value, f"{prefix}.{index}" if prefix else str(index), out, extras)
    elif prefix:
        extras[prefix] = obj


def _holds_tensor(obj: object) -> bool:
    if isinstance(obj, Tensor):
        return True
    if isinstance(obj, Mapping):
        return any(_holds_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(_holds_tensor(v) for v in obj)
    return False


#: pickle globals that execute code (modules torch's weights-only unpickler blocks outright, and
#: builtins that evaluate or import): a file that names one is an attack, not an odd format
_CODE_MODULES = ("os", "posix", "nt", "subprocess", "sys", "builtins", "__builtin__", "shutil", "socket", "runpy",
                 "importlib", "pty", "webbrowser", "ctypes", "code", "pickle", "marshal", "commands", "platform")
_CODE_BUILTINS = ("eval", "exec", "compile", "__import__", "getattr", "setattr", "open", "execfile", "apply", "input", "breakpoint")


def _runs_code(name: str, text: str) -> bool:
    module, _, attr = name.rpartition(".")
    if "is blocked" in text:  # torch: "... whose module posix is blocked"
        return True
    return module.split(".")[0] in _CODE_MODULES or (not module and attr in _CODE_BUILTINS)


def _torch_load_error(file: Path, exc: Exception) -> WeightFileError:
    """A one-paragraph reason for a failed ``torch.load(weights_only=True)``, without torch's essay."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    unsafe = re.search(r"[Uu]nsupported (?:global: )?GLOBAL ([\w.]+)", text)
    if unsafe and _runs_code(unsafe.group(1), text):
        return WeightFileError(
            f"{file}: this file tries to run code when it is loaded (its pickle calls {unsafe.group(1)}); "
            "sdadapt refused it without running anything (legacy files are read only with "
            "torch.load(weights_only=True)). Do not open it with plain torch.load or pickle; get the "
            "file from a trusted source, preferably as .safetensors."
        )
    if unsafe:
        return WeightFileError(
            f"{file}: holds a pickled Python object ({unsafe.group(1)}) that only full unpickling, "
            "i.e. running code from the file, can rebuild; sdadapt reads legacy files only with "
            "torch.load(weights_only=True). If you trust the file, load it yourself and re-save its "
            "tensors as a plain dict or as .safetensors."
        )
    detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" in text else text
    detail = " ".join(detail.split()).split(" Check the documentation")[0]
    detail = detail.split(". ")[0].strip().rstrip(".")[:200]
    return WeightFileError(
        f"{file}: corrupt or truncated torch.save file ({detail or type(exc).__name__}); "
        "download or copy it again"
    )


def read_weights(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a ``.safetensors`` file, or a legacy pickle with ``torch.load(weights_only=True)``.

    Legacy nested dicts are flattened with dots (``{"state_dict": {"a": t}}`` -> ``"state_dict.a"``);
    their non-tensor entries come back JSON-encoded in the metadata dict.

    Raises:
        WeightFileError: missing, truncated, unsafe (needs full unpickling) or unknown file.
    """
    file = Path(path)
    _check_is_file(file)
    kind = sniff_format(file)
    if kind == "safetensors" or (kind == "unknown" and file.suffix.lower() not in _LEGACY_SUFFIXES):
        return read_safetensors(file)  # (for "unknown": raises the precise safetensors error)
    if kind == "unknown":
        try:
            return read_safetensors(file)
        except WeightFileError:
            raise WeightFileError(
                f"{file}: neither a safetensors file nor a torch.save archive (corrupt, or another format); "
                "download or copy it again"
            ) from None
    try:
        # an open handle, not the path: torch >= 2.1x hands any "*.safetensors" *path* to the
        # safetensors reader, which fails on a pickle that carries that extension
        with warnings.catch_warnings(), open(file, "rb") as handle:
            warnings.simplefilter("ignore")  # e.g. "Detected pickle protocol ..." on garbage
            obj = torch.load(handle, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError / RuntimeError / EOFError variants
        raise _torch_load_error(file, exc) from exc
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
