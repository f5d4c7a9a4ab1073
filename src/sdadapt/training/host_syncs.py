"""Host syncs: find them on a CPU, and avoid the blocking host-to-device copy.

A training step keeps an accelerator busy only while the host can queue work ahead of it. Two
things make the host wait for the device, and on a GPU they cost a pipeline drain each:

* **reads** — a device tensor's value brought back to Python: ``.item()``, ``float(t)``,
  ``bool(t)``/``if t:``, ``.tolist()``, ``.numpy()``, ``.cpu()`` (a blocking copy), and the ops whose output size depends on the
  data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``, ``repeat_interleave``
  without ``output_size``, ``bincount``), ``torch.equal``/``allclose``, linalg's error checks;
* **copies** — tensors built from host data (``torch.tensor(...)``, ``torch.ones(3)`` without a
  device, a CPU generator's draws) sent to the device by a blocking copy: ``.to(device)``,
  ``.cuda()``, ``torch.tensor(data, device=...)``, or used as an index into a device tensor. (On
  CUDA a blocking host-to-device copy synchronises the stream.)

:class:`HostSyncs` records both while it is active, on any device — on a CPU too, where nothing
waits, which is what makes them testable without a GPU::

    with HostSyncs() as syncs:
        train_step(...)                    # first step: optimiser state, lookup tables
        syncs.events.clear()
        for _ in range(3):
            train_step(...)
    assert not syncs.events, syncs.report()

Reads of host tensors are no syncs and are not recorded (``torch.optim.AdamW`` keeps its step
counters on the host unless ``capturable``/``fused`` and reads them every step). A tensor counts as
*host* when it was made during the recording by a factory call without ``device=`` (or by
``.cpu()``/``.to("cpu")``/``.pin_memory()``) or computed only from host tensors; every other tensor
is taken to live on the device. Limits: tensors made before the recording began count as device
tensors; ``.to(torch.device("cpu"))`` is taken as a move to the device (indistinguishable on a CPU
from ``.to(x.device)``: write ``.cpu()`` or ``.to("cpu")`` for the host); a Python list used as an
index into a device tensor (made into a tensor and copied in C++) is not seen. On a CUDA machine
``torch.cuda.set_sync_debug_mode("error")`` is the ground truth.

:func:`copy_to_device` is the copy that does not wait: pinned memory and ``non_blocking`` on CUDA.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.weak import WeakIdKeyDictionary

from . import engine_backward
from .engine_backward import BackwardKeepingMode

__all__ = ["HostSync", "HostSyncs", "READ_OPS", "copy_to_device"]

#: aten ops (overload packets) that read a tensor's values on the host whatever their arguments
READ_OPS = frozenset({
    "_local_scalar_dense", "is_nonzero", "nonzero", "masked_select", "equal", "allclose", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "bincount", "_linalg_check_errors",
})
_INDEXING = frozenset({"index", "index_put", "index_put_", "_index_put_impl_", "_unsafe_index_put"})
_FACTORIES = frozenset({
    "tensor", "as_tensor", "asarray", "from_numpy", "ones", "zeros", "full", "empty", "arange", "linspace", "logspace",
    "eye", "rand", "randn", "randint", "randperm", "normal", "scalar_tensor",
})
_HOST_DATA_READS = frozenset({"tolist", "numpy", "__array__"})
# the recorder's own frames (its function mode's __torch_function__ is BackwardKeepingMode's)
_OWN_FILES = frozenset({os.path.abspath(__file__), os.path.abspath(engine_backward.__file__)})
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


@dataclass(frozen=True)
class HostSync:
    """One recorded sync: ``kind`` ``"read"`` (device → host) or ``"copy"`` (blocking host → device),
    the aten op or torch function, and ``where``: the innermost calling frame outside torch."""

    kind: str
    op: str
    where: str

    def __str__(self) -> str:
        return f"{self.kind} {self.op} at {self.where}"


def _caller() -> str:
    """``path:line in function`` of the innermost frame outside torch and the recorder's own modules."""
    frame = sys._getframe(1)
    while frame is not None:
        path = os.path.abspath(frame.f_code.co_filename)
        if path not in _OWN_FILES and not path.startswith(_TORCH_DIR):
            return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back  # type: ignore[assignment]
    return "<torch>"


def _tensors(tree: Any) -> list[Tensor]:
    return [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, Tensor)]


class _Functions(BackwardKeepingMode):
    """Marks host-made tensors and records blocking copies / host data reads at the Python level."""

    def __init__(self, owner: HostSyncs) -> None:
        super().__init__()
        self.owner = owner

    def handle(self, func, args, kwargs):  # type: ignore[override]
        name = getattr(func, "__name__", "")
        owner = self.owner
        if name in _HOST_DATA_READS and args and isinstance(args[0], Tensor) and not owner.is_host(args[0]):
            owner.record("read", name)
        if name in ("tensor", "as_tensor", "asarray") and args and not isinstance(args[0], Tensor):
            for inner in _tensors(args[0]):  # torch.tensor([t0, t1]) reads every element on the host
                if not owner.is_host(inner):
                    owner.record("read", f"{name} of tensors")
        out = func(*args, **kwargs)
        converts = name in ("tensor", "as_tensor", "asarray") and bool(args) and isinstance(args[0], Tensor)
        if name in _FACTORIES and not converts:  # (a tensor converted keeps its place: the dispatch mode sees it)
            device = kwargs.get("device")
            if device is None or _names_cpu(device):
                owner.mark_host(out)
            elif name in ("tensor", "as_tensor", "asarray", "from_numpy"):
                owner.record("copy", f"{name}(data, device=...)")
        elif name in ("cpu", "pin_memory"):
            if name == "cpu" and args and isinstance(args[0], Tensor) and not owner.is_host(args[0]):
                owner.record("read", "cpu")  # a blocking device-to-host copy
            owner.mark_host(out)
        elif name == "cuda" and args and owner.is_host(args[0]) and not kwargs.get("non_blocking", False):
            owner.record("copy", "cuda")
        elif name == "to" and args and isinstance(args[0], Tensor):
            self._moved(args[0], args[1:], kwargs, out)
        return out

    def _moved(self, source: Tensor, args: tuple, kwargs: dict, out: Any) -> None:
        owner = self.owner
        targets = [a for a in (*args, kwargs.get("device"), kwargs.get("other")) if a is not None
                   and not isinstance(a, (torch.dtype, bool, torch.memory_format))]
        if not targets:  # a dtype change only: stays where it was
            return
        target = targets[0]
        to_host = owner.is_host(target) if isinstance(target, Tensor) else _names_cpu(target)
        non_blocking = kwargs.get("non_blocking", False) or any(a is True for a in args)
        if to_host:
            if not owner.is_host(source) and not non_blocking:
                owner.record("read", "to the host")  # a blocking device-to-host copy
            owner.mark_host(out)
        elif owner.is_host(source):
            if isinstance(out, Tensor):
                owner.unmark(out)  # now on the device
            if not non_blocking:
                owner.record("copy", "to")


def _names_cpu(device: Any) -> bool:
    """Only the literal string ``"cpu"`` is taken as the host (``x.device`` is the device's stand-in)."""
    return isinstance(device, str) and device.split(":")[0] == "cpu"


class _Dispatch(TorchDispatchMode):
    """Records aten ops that read device values, and device ops fed with host tensors; propagates hostness."""

    def __init__(self, owner: HostSyncs) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        owner = self.owner
        name = func.overloadpacket.__name__
        if name in _INDEXING and args and isinstance(args[0], Tensor) and owner.is_host(args[0]):
            owner.mark_host(args[1:2])  # a host tensor's indices are on the host (a list index is made in C++)
        inputs = _tensors((args, kwargs))
        host = [t for t in inputs if owner.is_host(t)]
        device = [t for t in inputs if not owner.is_host(t)]
        masks = [t for t in _tensors(args[1:2]) if t.dtype in (torch.bool, torch.uint8)] if name in _INDEXING else []
        if device and name in READ_OPS:
            owner.record("read", name)
        elif (name == "repeat_interleave" and func._overloadname == "Tensor" and kwargs.get("output_size") is None
              and not owner.is_host(args[0])):  # the output size is the sum of the repeats
            owner.record("read", "repeat_interleave without output_size")
        elif any(not owner.is_host(mask) for mask in masks):  # a mask's True count sizes the result
            owner.record("read", f"{name} with a boolean mask")
        if device and any(t.ndim > 0 for t in host) and name not in ("_to_copy", "copy_", "lift_fresh"):
            owner.record("copy", f"{name} of a host tensor on the device")
        elif name == "copy_" and len(args) > 1 and owner.is_host(args[0]) != owner.is_host(args[1]) \
                and not kwargs.get("non_blocking", args[2] if len(args) > 2 else False):
            if owner.is_host(args[0]):
                owner.record("read", "copy_ to the host")  # a blocking device-to-host copy
            else:
                owner.record("copy", "copy_")
        out = func(*args, **kwargs)
        if host and not device:
            for t in _tensors(out):
                owner.mark_host(t)
        return out


@dataclass
class HostSyncs:
    """Context manager recording host syncs (see the module docstring) into :attr:`events`.

    Attributes:
        events: every :class:`HostSync` seen so far, in order (clear it to start counting afresh).
    """

    events: list[HostSync] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._host: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self._modes: tuple[_Functions, _Dispatch] | None = None

    def __enter__(self) -> HostSyncs:
        if self._modes is not None:
            raise RuntimeError("HostSyncs is already recording; use one `with` block at a time")
        self._modes = (_Functions(self), _Dispatch(self))
        self._modes[0].__enter__()
        self._modes[1].__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        functions, dispatch = self._modes  # type: ignore[misc]
        self._modes = None
        dispatch.__exit__(*exc)
        functions.__exit__(*exc)

    def reads(self) -> list[HostSync]:
        """The device → host reads among :attr:`events`."""
        return [e for e in self.events if e.kind == "read"]

    def copies(self) -> list[HostSync]:
        """The blocking host → device copies among :attr:`events`."""
        return [e for e in self.events if e.kind == "copy"]

    def report(self) -> str:
        """One line per event (for an assertion message)."""
        return "\n".join(str(e) for e in self.events) or "no host syncs"

    # ------------------------------------------------------------------ used by the two modes
    def record(self, kind: str, op: str) -> None:
        self.events.append(HostSync(kind, op, _caller()))

    def is_host(self, tensor: Tensor) -> bool:
        return tensor in self._host

    def mark_host(self, out: Any) -> None:
        for t in _tensors(out):
            self._host[t] = True

    def unmark(self, tensor: Tensor) -> None:
        self._host.pop(tensor, None)


def copy_to_device(tensor: Tensor, device: torch.device | str) -> Tensor:
    """``tensor`` (any shape) on ``device`` without making the host wait for it.

    Host → CUDA: a copy from pinned memory with ``non_blocking=True`` (PyTorch's caching host
    allocator keeps the pinned buffer until the copy has run; later work on the stream sees the
    data). The copy runs later: a ``tensor`` that is already pinned and contiguous is read then, so
    do not change it in place afterwards (a fresh tensor — an index, token ids — is safe). Already
    there: ``tensor`` itself. Anything else (to the host, or another accelerator):
    ``tensor.to(device)``, which may wait.
    """
    device = torch.device(device)
    if tensor.device.type == "cpu" and device.type == "cuda":  # (contiguous: a strided one would copy unpinned)
        return tensor.contiguous().pin_memory().to(device, non_blocking=True)
    if tensor.device == device or (tensor.device.type == device.type == "cpu"):
        return tensor.to(device, non_blocking=True)  # nothing is copied (HostSyncs sees the tensor arrive)
    return tensor.to(device)
