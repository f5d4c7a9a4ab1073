"""Legacy pickle checkpoints (``.ckpt``/``.pt``/``.bin``/``.pth``) looked at without trusting them.

Loading (the tensors themselves) only ever happens through ``torch.load(weights_only=True)`` in
:func:`sdadapt.formats.files.read_weights`. This module adds what that loader does not do:

* :func:`scan_pickle_file` — which globals the pickle names, found by running it through a
  *restricted* unpickler whose ``find_class`` returns inert stand-ins (no module is imported, no
  callable of the file's choosing ever runs; tensor storages are not read). A pickle that names
  code (``posix.system``, ``builtins.eval``, ``subprocess`` ...) is an :class:`UnsafeFileError`
  however it is encoded — protocol 2 or 4, zip archive or the old sequential format — whereas
  torch's own error for, e.g., a protocol-4 attack is "Unsupported operand 149".
* :func:`pickle_header` — header-level information for ``inspect`` (tensor names, shapes and
  dtypes, non-tensor entries) from the same restricted pass: the work and the memory are bounded
  by the size of the pickle stream (``data.pkl``), never by the tensors it describes.
* :func:`check_archive` — sizes checked before anything is decompressed: an archive that expands
  far beyond its own size (``torch.save`` never compresses; a deflated entry is a zip bomb) or
  beyond the available memory is refused.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ResourceError, UnsafeFileError, WeightFileError

__all__ = [
    "CODE_MODULES",
    "CODE_BUILTINS",
    "runs_code",
    "TensorStub",
    "PickleScan",
    "scan_pickle_file",
    "pickle_header",
    "check_archive",
    "check_pickle_safe",
    "check_folder_pickles",
    "pickle_scalars",
    "PickleHeader",
    "available_memory",
    "MAX_PICKLE_STREAM",
]

#: modules whose globals execute code, import, or touch the system: a pickle naming one is an attack
CODE_MODULES = ("os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "runpy", "importlib", "imp", "zipimport",
                "pty", "webbrowser", "ctypes", "code", "codeop", "pickle", "_pickle", "marshal", "commands", "platform",
                "types", "timeit", "pdb", "bdb", "trace", "cProfile", "profile", "pydoc", "asyncio", "multiprocessing",
                "operator", "_operator", "io", "_io", "tempfile", "urllib", "http", "ftplib", "smtplib", "telnetlib",
                "requests", "distutils", "setuptools", "pip", "yaml", "dill", "cloudpickle", "joblib")
#: builtins that evaluate, import, open or reach attributes
CODE_BUILTINS = ("eval", "exec", "compile", "__import__", "getattr", "setattr", "delattr", "open", "execfile",
                 "apply", "input", "breakpoint", "globals", "locals", "vars", "help", "exit", "quit")
#: the largest pickle stream (``data.pkl``) read for a scan or ``inspect`` (checkpoints hold ~1 MB)
MAX_PICKLE_STREAM = 256 << 20
#: an archive may expand to at most this many times its own size (stored entries: about 1x)
_MAX_EXPANSION = 4

# restricted unpickling: what torch.save writes, mapped to inert stand-ins
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16", "BFloat16Storage": "bfloat16",
    "LongStorage": "int64", "IntStorage": "int32", "ShortStorage": "int16", "CharStorage": "int8",
    "ByteStorage": "uint8", "BoolStorage": "bool", "ComplexFloatStorage": "complex64",
    "ComplexDoubleStorage": "complex128", "Float8_e4m3fnStorage": "float8_e4m3fn", "Float8_e5m2Storage": "float8_e5m2",
}


def runs_code(module: str, name: str) -> bool:
    """Whether global ``module.name`` in a pickle executes code (or reaches the system) when loaded."""
    root = module.split(".")[0]
    if root in ("builtins", "__builtin__", ""):
        return name.split(".")[0] in CODE_BUILTINS
    return root in CODE_MODULES


@dataclass(frozen=True)
class TensorStub:
    """A tensor as a pickle describes it (nothing read): dtype name, shape, storage element count."""

    dtype: str
    shape: tuple[int, ...]
    storage: str = ""  # the archive entry of its storage (``data/<key>``), "" if unknown
    offset: int = 0  # element offset into the storage


class _StorageType:
    def __init__(self, dtype: str) -> None:
        self.dtype = dtype


class _Storage:
    def __init__(self, dtype: str, numel: int, key: str = "") -> None:
        self.dtype = dtype
        self.numel = numel
        self.key = key


class _Opaque:
    """Any other object the pickle builds: accepts every argument and state, does nothing."""

    _global = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> _Opaque:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self._global}>"


def _shape_of(size: Any) -> tuple[int, ...]:
    if isinstance(size, (tuple, list)) and all(isinstance(d, int) and not isinstance(d, bool) for d in size):
        return tuple(int(d) for d in size)
    return ()


def _rebuild_tensor(storage: Any, offset: Any = 0, size: Any = (), *args: Any, **kwargs: Any) -> Any:
    if not isinstance(storage, _Storage):
        return TensorStub("unknown", _shape_of(size))
    start = offset if isinstance(offset, int) and not isinstance(offset, bool) else 0
    return TensorStub(storage.dtype, _shape_of(size), storage.key, start)


def _rebuild_parameter(data: Any, *args: Any, **kwargs: Any) -> Any:
    return data


def _codecs_encode(text: Any, encoding: Any = "utf-8", *args: Any) -> bytes:
    if isinstance(text, str) and isinstance(encoding, str) and encoding.lower().replace("-", "") in ("latin1", "utf8"):
        return text.encode(encoding)
    return b""


_SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): dict,
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _codecs_encode,
}


def _torch_allowed() -> frozenset[str]:
    """The globals ``torch.load(weights_only=True)`` accepts (its allowlist and registered safe globals)."""
    global _ALLOWED
    if _ALLOWED is None:
        names: set[str] = {f"{m}.{n}" for m, n in _SAFE_GLOBALS} | {f"torch.{n}" for n in _STORAGE_DTYPES}
        try:
            import torch._weights_only_unpickler as unpickler
            import torch.serialization as serialization

            names.update(unpickler._get_allowed_globals())
            for item in serialization.get_safe_globals():
                obj = item[0] if isinstance(item, tuple) else item
                names.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', '')}")
        except Exception:  # noqa: BLE001 - private API: the own list is enough to classify
            pass
        _ALLOWED = frozenset(names)
    return _ALLOWED


_ALLOWED: frozenset[str] | None = None


class PickleScan:
    """What a restricted pass over a pickle found: the globals it names and the code-running ones."""

    def __init__(self) -> None:
        self.globals: list[str] = []
        self.code: list[str] = []
        self.opaque: list[str] = []
        self.malformed: str | None = None  # why the pickle stream could not be parsed (None: it could)
        self.foreign: list[str] = []  # globals torch.load(weights_only=True) would refuse (not code)


class _Restricted(pickle.Unpickler):
    """``pickle.Unpickler`` whose ``find_class`` hands out inert stand-ins only (never imports)."""

    def __init__(self, stream: Any, scan: PickleScan) -> None:
        super().__init__(stream, encoding="latin1")
        self._scan = scan

    def find_class(self, module: str, name: str) -> Any:  # noqa: D401 - pickle API
        full = f"{module}.{name}"
        if len(self._scan.globals) < 1000 and full not in self._scan.globals:
            self._scan.globals.append(full)
        if runs_code(module, name):
            self._scan.code.append(full)
            raise _CodeFound(full)
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch" and name in ("UntypedStorage", "TypedStorage"):
            return _StorageType("uint8")
        if len(self._scan.opaque) < 1000 and full not in self._scan.opaque:
            self._scan.opaque.append(full)
            if full not in _torch_allowed():
                self._scan.foreign.append(full)
        return type(name[:60] or "object", (_Opaque,), {"_global": full[:120]})

    def persistent_load(self, pid: Any) -> Any:
        # torch: ("storage", storage_type, key, location, numel); storage_type from find_class
        if isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage":
            kind, key, numel = pid[1], pid[2], pid[4]
            dtype = kind.dtype if isinstance(kind, _StorageType) else "unknown"
            return _Storage(dtype, numel if isinstance(numel, int) else 0, key[:64] if isinstance(key, str) else "")
        return _Storage("unknown", 0)


class _CodeFound(Exception):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def _unsafe(file: Path, name: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{file}: this file tries to run code when it is loaded (its pickle calls {name}); sdadapt refused it "
        "without running anything (legacy files are read only with torch.load(weights_only=True)). Do not open it with plain torch.load or pickle; get the file from a trusted source, preferably "
        "as .safetensors."
    )


def available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux ``MemAvailable``), or ``None`` if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _size_text(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _pickle_member(archive: zipfile.ZipFile) -> zipfile.ZipInfo | None:
    members = [i for i in archive.infolist() if i.filename.endswith("data.pkl")]
    return min(members, key=lambda i: i.filename.count("/")) if members else None


def check_archive(path: str | os.PathLike, *, memory: int | None = None) -> None:
    """Refuse a ``torch.save`` zip archive that would expand far beyond its own size or the memory.

    Sizes come from the archive's directory; nothing is decompressed.

    Raises:
        WeightFileError: a zip bomb (entries expanding to more than 4x the file, and over 64 MiB),
            or an unreadable archive directory.
        ResourceError: the tensors need more memory than is available (``memory``: override).
    """
    file = Path(path)
    size = file.stat().st_size
    try:
        with zipfile.ZipFile(file) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError, NotImplementedError) as exc:
        raise WeightFileError(f"{file}: corrupt or truncated torch.save archive ({exc}); download or copy it again") from None
    expanded = sum(max(i.file_size, 0) for i in infos)
    compressed = [i for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if compressed and expanded > max(_MAX_EXPANSION * size, 64 << 20):
        raise WeightFileError(
            f"{file}: its zip entries expand to {_size_text(expanded)} from a {_size_text(size)} file "
            f"({len(compressed)} compressed entries; torch.save never compresses) — a zip bomb, refused unread"
        )
    available = available_memory() if memory is None else memory
    if available is not None and expanded > available:
        raise ResourceError(
            f"{file}: loading it needs about {_size_text(expanded)} of memory (legacy pickles are read whole), "
            f"{_size_text(available)} are available; convert it to .safetensors on a larger machine"
        )


def _zip_pickle(file: Path) -> bytes:
    try:
        with zipfile.ZipFile(file) as archive:
            info = _pickle_member(archive)
            if info is None:
                raise WeightFileError(f"{file}: a zip archive without data.pkl — not a torch.save file")
            if info.file_size > MAX_PICKLE_STREAM:
                raise ResourceError(
                    f"{file}: its pickle stream (data.pkl) is {_size_text(info.file_size)}, over the "
                    f"{_size_text(MAX_PICKLE_STREAM)} sdadapt reads; not a plain tensor checkpoint"
                )
            if info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_EXPANSION * max(info.compress_size, 1) + (1 << 20):
                raise WeightFileError(f"{file}: data.pkl expands {info.file_size // max(info.compress_size, 1)}x "
                                      "(a zip bomb?); refused unread")
            with archive.open(info) as handle:
                data = handle.read(MAX_PICKLE_STREAM + 1)
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError) as exc:
        raise WeightFileError(f"{file}: corrupt or truncated torch.save archive ({exc}); download or copy it again") from None
    return data


def _unpickle_all(file: Path, scan: PickleScan) -> list[Any]:
    """Run every pickle of the file through the restricted unpickler (zip: data.pkl; old format: the
    magic number, protocol, sys info and object pickles). Returns the unpickled stand-ins."""
    objects: list[Any] = []
    try:
        if zipfile.is_zipfile(file):
            stream: Any = io.BytesIO(_zip_pickle(file))
            objects.append(_Restricted(stream, scan).load())
        else:
            with open(file, "rb") as handle:
                for index in range(4):  # legacy torch: magic, protocol, sys_info, then the object
                    if handle.tell() >= MAX_PICKLE_STREAM:
                        break
                    objects.append(_Restricted(handle, scan).load())
                    if index == 0 and objects[0] != 0x1950A86A20F9469CFC6C:
                        break  # a plain pickle (not torch's legacy format): one object
    except _CodeFound as found:
        raise _unsafe(file, found.name) from None
    except (WeightFileError, ResourceError):
        raise
    except MemoryError:
        raise ResourceError(f"{file}: its pickle is too large to scan in the available memory") from None
    except RecursionError:
        raise WeightFileError(f"{file}: its pickle is nested too deeply; corrupt or hostile, refused") from None
    except Exception as exc:  # noqa: BLE001 - any malformed pickle: the caller reports what torch says
        if not objects:
            raise _Malformed(str(exc)[:200] or type(exc).__name__) from None
    return objects


class _Malformed(Exception):
    pass


def scan_pickle_file(path: str | os.PathLike) -> PickleScan:
    """The globals a pickle file names, found without running or importing anything.

    Raises:
        UnsafeFileError: it names a code-running global (:func:`runs_code`).
        WeightFileError: a corrupt archive; ResourceError: a pickle stream over the size cap.
    """
    file = Path(path)
    scan = PickleScan()
    try:
        _unpickle_all(file, scan)
    except _Malformed as exc:
        scan.malformed = str(exc) or "malformed pickle"
    return scan


def check_pickle_safe(path: str | os.PathLike) -> None:
    """Raise :class:`UnsafeFileError` if the pickle file ``path`` would run code when loaded (scans
    the pickle stream only; tensors are not read). Use before handing a file to a loader you do
    not control (e.g. diffusers ``from_pretrained`` on a folder with ``.bin`` files)."""
    scan_pickle_file(path)


_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_folder_pickles(folder: str | os.PathLike, *, max_depth: int = 3, max_files: int = 500) -> None:
    """Scan every pickle file (``.bin``/``.pt``/``.pth``/``.ckpt``/``.pkl``) under a model folder
    (e.g. a diffusers pipeline about to be loaded by ``from_pretrained``) and refuse the folder if
    one would run code — before any loader that might print torch's advice to retry with
    ``weights_only=False`` sees it. Only the pickle streams are read; nothing runs.

    Raises:
        UnsafeFileError: a file under ``folder`` names a code-running global (the message names it).
    """
    root = Path(folder)
    if not root.is_dir():
        return
    seen = 0
    stack: list[tuple[Path, int]] = [(root, 0)]
    while stack and seen < max_files:
        here, depth = stack.pop()
        try:
            entries = sorted(here.iterdir())
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink() and not entry.is_file():
                continue
            if entry.is_dir() and depth < max_depth:
                stack.append((entry, depth + 1))
            elif entry.is_file() and entry.suffix.lower() in _PICKLE_SUFFIXES and seen < max_files:
                seen += 1
                try:
                    scan_pickle_file(entry)
                except (WeightFileError, ResourceError, OSError) as exc:
                    if isinstance(exc, UnsafeFileError):
                        raise
                    # corrupt or huge: the loader reports it in its own words


@dataclass
class PickleHeader:
    """Header-level content of a pickle checkpoint: ``{name: TensorStub}`` and the other entries."""

    tensors: dict[str, TensorStub] = field(default_factory=dict)
    extras: dict[str, str] = field(default_factory=dict)


def pickle_header(path: str | os.PathLike, *, max_entries: int = 1_000_000) -> PickleHeader:
    """Tensor names, shapes and dtypes of a pickle checkpoint, without reading any tensor data.

    Nested dicts flatten with dots as :func:`sdadapt.formats.files.read_weights` does; non-tensor
    entries come back as short text.

    Raises:
        UnsafeFileError: the pickle names code. WeightFileError: corrupt. ResourceError: too large.
    """
    file = Path(path)
    scan = PickleScan()
    try:
        objects = _unpickle_all(file, scan)
    except _Malformed as exc:
        raise WeightFileError(f"{file}: corrupt or truncated torch.save file ({exc}); download or copy it again") from None
    if scan.foreign:
        raise WeightFileError(
            f"{file}: holds a pickled Python object ({scan.foreign[0]}) that only full unpickling, i.e. running code "
            "from the file, can rebuild; sdadapt reads legacy files only with torch.load(weights_only=True). If you "
            "trust the file, load it yourself and re-save its tensors as a plain dict or as .safetensors."
        )
    out = PickleHeader()
    if not objects:
        return out
    root = objects[-1]
    stack: list[tuple[str, Any, int]] = [("", root, 0)]
    seen: set[int] = set()
    while stack and len(out.tensors) + len(out.extras) < max_entries:
        prefix, obj, depth = stack.pop()
        if isinstance(obj, TensorStub):
            out.tensors[prefix] = obj
        elif isinstance(obj, dict) and depth < 32 and id(obj) not in seen:
            seen.add(id(obj))
            items = list(obj.items())
            for key, value in reversed(items):
                stack.append((f"{prefix}.{key}" if prefix else str(key), value, depth + 1))
        elif isinstance(obj, (list, tuple)) and depth < 32 and id(obj) not in seen and any(
            isinstance(v, (TensorStub, dict)) for v in obj
        ):
            seen.add(id(obj))
            for index in reversed(range(len(obj))):
                stack.append((f"{prefix}.{index}" if prefix else str(index), obj[index], depth + 1))
        elif prefix:
            out.extras[prefix] = _as_json(obj)
    return out


def _as_json(obj: Any) -> str:
    """A non-tensor entry as JSON text (as :func:`sdadapt.formats.files.read_weights` reports it), bounded."""
    import json

    def plain(value: Any, depth: int) -> Any:
        if isinstance(value, (str, int, float, bool, type(None))):
            return value
        if depth < 8 and isinstance(value, (list, tuple)):
            return [plain(v, depth + 1) for v in value[:1000]]
        if depth < 8 and isinstance(value, dict):
            return {str(k): plain(v, depth + 1) for k, v in list(value.items())[:1000]}
        if isinstance(value, bytes):
            return f"<{len(value)} bytes>"
        return repr(value) if isinstance(value, _Opaque) else f"<{type(value).__name__}>"

    try:
        text = json.dumps(plain(obj, 0))
    except (ValueError, TypeError, RecursionError):
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= 10_000 else text[:10_000] + "..."


_ITEM_FORMATS = {"float32": "<f", "float64": "<d", "float16": "<e", "int64": "<q", "int32": "<i", "int16": "<h",
                 "int8": "<b", "uint8": "<B", "bool": "<?"}


def pickle_scalars(path: str | os.PathLike, stubs: dict[str, TensorStub]) -> dict[str, float]:
    """Values of one-element tensors (e.g. LoRA alphas) of a ``torch.save`` zip archive, read from
    their storage entries (a few bytes each, sizes checked); tensors it cannot read are left out."""
    import struct

    file = Path(path)
    out: dict[str, float] = {}
    if not zipfile.is_zipfile(file):
        return out
    try:
        with zipfile.ZipFile(file) as archive:
            by_suffix = {info.filename.split("/", 1)[-1]: info for info in archive.infolist()}
            for name, stub in list(stubs.items())[:100_000]:
                fmt = _ITEM_FORMATS.get(stub.dtype)
                info = by_suffix.get(f"data/{stub.storage}")
                if fmt is None or info is None or prod_of(stub.shape) != 1:
                    continue
                width = struct.calcsize(fmt)
                begin = stub.offset * width
                if info.file_size > 1 << 20 or begin + width > info.file_size:
                    continue
                with archive.open(info) as handle:
                    raw = handle.read(begin + width)[begin:]
                if len(raw) == width:
                    out[name] = float(struct.unpack(fmt, raw)[0])
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError, RuntimeError, struct.error):
        return out
    return out


def prod_of(shape: tuple[int, ...]) -> int:
    """Product of a shape's sizes (1 for a 0-dim tensor)."""
    n = 1
    for d in shape:
        n *= d
    return n
