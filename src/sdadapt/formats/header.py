"""The one safetensors header validator, the file layout, and bounded JSON.

Every reader of a ``.safetensors`` file in sdadapt (``read_safetensors``, the merge engine's
streaming :class:`~sdadapt.merge.sources.TensorSource`, ``inspect``, ``load_lora`` ...) goes
through :func:`parse_header`, which applies the rules of the safetensors library itself:

* the 8-byte little-endian header length is at most :data:`MAX_HEADER_BYTES` (100 MB) and fits
  in the file; the header is UTF-8 JSON starting with ``{``, nested at most a few levels;
* ``__metadata__`` (optional) maps strings to strings;
* every other entry is ``{"dtype", "shape", "data_offsets"}`` with a known dtype, a shape of
  non-negative integers and two integer offsets ``begin <= end``; names are unique;
* ``(end - begin) == prod(shape) * itemsize`` (checked with exact integers, before anything is
  allocated: a header that claims a 60000x60000 tensor over 16 bytes is refused here);
* sorted by offset the tensors are contiguous — no gap, no overlap — starting at 0 and covering
  the data section exactly (no trailing bytes).

The reader then allocates each tensor only from a validated entry and reads exactly its bytes.

:func:`safetensors_layout` is the inverse, used by both writers (``write_safetensors`` and the
merge engine's streaming writer): the same bytes ``safetensors.torch.save_file`` produces.

:func:`load_json` parses JSON from files (recipes, ``adapter_config.json``, metadata values) with
a bounded nesting depth: deep nesting is an error naming the file, never a ``RecursionError``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Iterator, Mapping
from math import prod
from typing import Any, BinaryIO

import torch
from torch import Tensor

from ..errors import ResourceError, WeightFileError

__all__ = [
    "MAX_HEADER_BYTES",
    "MAX_JSON_DEPTH",
    "DTYPE_BITS",
    "TORCH_DTYPES",
    "DTYPE_NAMES",
    "parse_header",
    "read_tensor",
    "safetensors_layout",
    "load_json",
    "json_depth",
]

#: the largest header the safetensors library accepts
MAX_HEADER_BYTES = 100_000_000
#: default nesting limit of :func:`load_json` (recipes nest steps; configs and metadata are flat)
MAX_JSON_DEPTH = 64

#: every dtype name the safetensors format defines -> bits per element
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}

#: safetensors dtype name -> torch dtype, for the ones this torch can hold
TORCH_DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, attr)
    for name, attr in (
        ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
        ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("BOOL", "bool"),
        ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
        ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"), ("C64", "complex64"),
    )
    if hasattr(torch, attr)
}

#: torch dtype -> (safetensors name, rank in safetensors' ``Dtype`` enum; files order data by it, descending)
_WRITE_ORDER: dict[torch.dtype, tuple[str, int]] = {
    torch.bool: ("BOOL", 0),
    torch.uint8: ("U8", 4),
    torch.int8: ("I8", 5),
    torch.int16: ("I16", 9),
    torch.float16: ("F16", 11),
    torch.bfloat16: ("BF16", 12),
    torch.int32: ("I32", 13),
    torch.float32: ("F32", 15),
    torch.float64: ("F64", 17),
    torch.int64: ("I64", 18),
}
if hasattr(torch, "float8_e4m3fn"):
    _WRITE_ORDER[torch.float8_e5m2] = ("F8_E5M2", 6)
    _WRITE_ORDER[torch.float8_e4m3fn] = ("F8_E4M3", 7)
#: torch dtype -> safetensors dtype name (the dtypes sdadapt writes)
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for dtype, (name, _) in _WRITE_ORDER.items()}


# ------------------------------------------------------------------------------------------ JSON
def json_depth(value: Any, *, limit: int) -> int:
    """Nesting depth of a parsed JSON value (a scalar is 0), counted without recursion; stops
    counting once ``limit`` is exceeded (returns ``limit + 1``)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        depth += 1
        if depth > deepest:
            deepest = depth
            if deepest > limit:
                return deepest
        stack.extend((child, depth) for child in children if isinstance(child, (dict, list)))
    return deepest


@contextlib.contextmanager
def _no_gc() -> Iterator[None]:
    """Pause the cyclic garbage collector: parsing a 100k-tensor header builds ~10^6 objects, none
    cyclic, and the collector's repeated passes over them would double the time."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def load_json(text: str | bytes, *, source: str, what: str = "JSON", max_depth: int | None = MAX_JSON_DEPTH,
              unique_keys: bool = False) -> Any:
    """Parse ``text`` (JSON from a file) with a bounded nesting depth.

    Args:
        source: the file, for messages.
        what: what the JSON is (``"recipe"``, ``"lora_adapter_metadata"`` ...), for messages.
        max_depth: the deepest nesting accepted (objects and arrays count one level each); ``None``:
            only the parser's own limit (no ``RecursionError`` either way) — for callers that check
            the structure themselves without recursion.
        unique_keys: refuse an object that repeats a key.

    Raises:
        WeightFileError: malformed JSON, nesting deeper than ``max_depth`` (no ``RecursionError``),
            a repeated key (with ``unique_keys``), non-UTF-8 bytes.
        ResourceError: the parser ran out of memory.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise WeightFileError(f"{source}: {what} is not valid UTF-8 (byte {exc.start}); the file is corrupt") from None
    try:
        with _no_gc():
            value = json.loads(text, object_pairs_hook=_unique_object if unique_keys else None)
    except RecursionError:
        raise WeightFileError(
            f"{source}: {what} is nested too deeply (over {max_depth} levels); not a file sdadapt or its "
            "ecosystem writes — refusing it"
        ) from None
    except _DuplicateKey as exc:
        raise WeightFileError(f"{source}: {what} repeats the name {exc.key!r}; the file is corrupt") from None
    except json.JSONDecodeError as exc:
        raise WeightFileError(f"{source}: {what} is not valid JSON ({exc.msg} at character {exc.pos})") from None
    except MemoryError:
        raise ResourceError(f"{source}: {what} is too large to parse in the available memory") from None
    if max_depth is not None and json_depth(value, limit=max_depth) > max_depth:
        raise WeightFileError(
            f"{source}: {what} is nested too deeply (over {max_depth} levels); not a file sdadapt or its "
            "ecosystem writes — refusing it"
        )
    return value


# ------------------------------------------------------------------------------- the validator
def _corrupt(file: object, detail: str) -> WeightFileError:
    return WeightFileError(f"{file}: corrupt safetensors header ({detail}); download or copy the file again")


def _entry_error(entry: object) -> str | None:
    """Why ``entry`` is not ``{"dtype", "shape", "data_offsets"}`` (None: it is)."""
    if not isinstance(entry, dict):
        return f"an entry is a {type(entry).__name__}, not an object"
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        return "no dtype" if dtype is None else f"dtype {dtype!r} is not a string"
    if dtype not in DTYPE_BITS:
        return f"unknown dtype {dtype[:40]!r}"
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        return "shape is not a list of non-negative integers"
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(n) is int and n >= 0 for n in offsets)
        or offsets[0] > offsets[1]
    ):
        return "data_offsets is not [begin, end] with integers 0 <= begin <= end"
    return None


def _short(name: str) -> str:
    return name if len(name) <= 120 else name[:117] + "..."


def parse_header(raw: bytes, *, file: str | os.PathLike, data_size: int) -> tuple[dict[str, dict], dict[str, str]]:
    """Validate a safetensors header (the JSON bytes after the 8-byte length) against the data
    section's size; the rules are in the module doc.

    Args:
        raw: the header bytes (padding included).
        file: the file, for messages.
        data_size: bytes after the header (file size - 8 - header length).

    Returns:
        ``({name: {"dtype", "shape", "data_offsets"}} in data order, metadata)``.

    Raises:
        WeightFileError: any rule broken; the message names the file, the tensor and the rule.
        ResourceError: the header is too large to parse in the available memory.
    """
    if not raw.lstrip(b" \t\r\n").startswith(b"{"):
        raise WeightFileError(f"{file}: not a safetensors file (its header does not start with '{{')")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WeightFileError(
            f"{file}: the safetensors header is not valid UTF-8 (bad byte at offset {8 + exc.start}); "
            "the file is corrupt — download or copy it again"
        ) from None
    # (no depth walk: every entry is type-checked below without recursion, extra fields are never visited)
    header = load_json(text, source=str(file), what="the safetensors header", max_depth=None, unique_keys=True)
    if not isinstance(header, dict):
        raise _corrupt(file, "the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(file, "__metadata__ must map strings to strings")
    with _no_gc():
        ordered = _checked_entries(header, file=file, data_size=data_size, header_size=len(raw))
    return {name: header[name] for _, _, name in ordered}, dict(metadata)


def _element_count(shape: list[int], *, limit: int) -> int:
    """prod(shape), but stops multiplying once it passes ``limit`` (a hostile shape of millions of huge
    sizes would otherwise build an enormous integer); a zero anywhere makes it 0."""
    if 0 in shape:
        return 0
    if len(shape) <= 64:  # real tensors: exact, for the message
        return prod(shape)
    count = 1
    for size in shape:
        count *= size
        if count > limit:
            return count
    return count


def _checked_entries(header: dict[str, Any], *, file: object, data_size: int, header_size: int) -> list[tuple[int, int, str]]:
    """``[(begin, end, name)]`` sorted by offset, after every per-entry and layout rule."""
    raw_len = header_size
    ordered: list[tuple[int, int, str]] = []
    for name, entry in header.items():
        problem = _entry_error(entry)
        if problem is not None:
            raise _corrupt(file, f"tensor {_short(name)!r}: {problem}")
        begin, end = entry["data_offsets"]
        if end > data_size:
            raise WeightFileError(
                f"{file}: truncated safetensors file (tensor {_short(name)!r} ends at data byte {end}, the file "
                f"has {data_size} data bytes; header promises at least {8 + raw_len + end} bytes, the file has "
                f"{8 + raw_len + data_size}); download or copy it again"
            )
        bits = DTYPE_BITS[entry["dtype"]]
        count = _element_count(entry["shape"], limit=(end - begin) * 8 // bits + 1)
        if count * bits != (end - begin) * 8:
            need = f"{count * bits // 8} bytes" if len(entry["shape"]) <= 64 else "far more bytes"
            raise _corrupt(
                file,
                f"tensor {_short(name)!r}: shape {entry['shape'][:8]}{'...' if len(entry['shape']) > 8 else ''} "
                f"{entry['dtype']} needs {need} but its data_offsets hold {end - begin}",
            )
        ordered.append((begin, end, name))
    ordered.sort()
    position = 0
    for begin, end, name in ordered:
        if begin != position:
            what = "a gap" if begin > position else "an overlap"
            raise _corrupt(file, f"{what} in the data before tensor {_short(name)!r} (it starts at {begin}, the "
                                 f"previous tensor ends at {position})")
        position = end
    if position != data_size:
        if position > data_size:  # (unreachable: every end was checked) kept for clarity
            raise WeightFileError(f"{file}: truncated safetensors file; download or copy it again")
        raise _corrupt(file, f"{data_size - position} bytes after the last tensor's data (the tensors cover "
                             f"{position} of {data_size} data bytes)")
    return ordered


def read_tensor(handle: BinaryIO, data_start: int, entry: Mapping[str, Any], *, file: object, key: str) -> Tensor:
    """Read one validated entry (from :func:`parse_header`) into a fresh CPU tensor.

    Raises:
        WeightFileError: a dtype this torch cannot hold, or the file got shorter since it was validated.
        ResourceError: not enough memory for the tensor.
    """
    name = entry["dtype"]
    if name not in TORCH_DTYPES:
        raise WeightFileError(f"{file}: tensor {_short(key)!r} has dtype {name}, which this torch cannot hold")
    begin, end = entry["data_offsets"]
    try:
        out = torch.empty([int(d) for d in entry["shape"]], dtype=TORCH_DTYPES[name])
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "memory" not in str(exc).lower() and "alloc" not in str(exc).lower():
            raise
        raise ResourceError(f"{file}: not enough memory to read tensor {_short(key)!r} ({end - begin} bytes)") from None
    size = end - begin
    if size:
        view = memoryview(out.reshape(-1).view(torch.uint8).numpy()).cast("B")
        handle.seek(data_start + begin)
        got = handle.readinto(view)
        if got != size:
            raise WeightFileError(f"{file}: truncated while reading {_short(key)!r}; download or copy it again")
    return out


# ------------------------------------------------------------------------------------ the layout
def safetensors_layout(
    plan: Mapping[str, tuple[torch.dtype, tuple[int, ...]]], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """``(header bytes incl. the 8-byte length prefix and padding, {key: (start, end) data offsets})``.

    The layout ``safetensors.torch.save_file`` produces: compact JSON (``__metadata__`` first),
    padded with spaces to a multiple of 8, data ordered by dtype (widest first) then name.

    Raises:
        WeightFileError: a dtype safetensors cannot store, or non-string metadata.
    """
    for key, (dtype, _) in plan.items():
        if dtype not in _WRITE_ORDER:
            raise WeightFileError(f"tensor {key!r}: safetensors cannot store dtype {dtype}")
    order = sorted(plan, key=lambda k: (-_WRITE_ORDER[plan[k][0]][1], k))
    header: dict[str, object] = {}
    if metadata:
        bad = {k: type(v).__name__ for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)}
        if bad:
            raise WeightFileError(f"safetensors metadata must be str -> str; non-strings: {bad}")
        header["__metadata__"] = dict(metadata)
    offsets: dict[str, tuple[int, int]] = {}
    offset = 0
    for key in order:
        dtype, shape = plan[key]
        size = prod(int(d) for d in shape) * torch.empty((), dtype=dtype).element_size()
        header[key] = {"dtype": _WRITE_ORDER[dtype][0], "shape": [int(d) for d in shape],
                       "data_offsets": [offset, offset + size]}
        offsets[key] = (offset, offset + size)
        offset += size
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    raw += b" " * (-len(raw) % 8)
    if len(raw) > MAX_HEADER_BYTES:
        raise WeightFileError(f"the safetensors header would be {len(raw)} bytes, over the format's "
                              f"{MAX_HEADER_BYTES}-byte limit (too many tensors or too much metadata)")
    return len(raw).to_bytes(8, "little") + raw, offsets
