"""Counting the aten ops code dispatches. On a GPU every op that is not a view is about one kernel
launch, so on a machine without one the count says what a step costs in launches (and which ops:
``counts["_to_copy"]`` are the casts)."""

from __future__ import annotations

from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["AtenOps"]


class AtenOps(TorchDispatchMode):
    """Records the aten ops dispatched while it is on, in order; it can be entered again to add more.

    Attributes:
        calls: every ``torch._ops.OpOverload`` dispatched, views included.
    """

    def __init__(self) -> None:
        super().__init__()
        self.calls: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))

    @property
    def counts(self) -> Counter[str]:
        """How many calls of each op, by name (``"mm"``, ``"_to_copy"``), views included."""
        return Counter(func.overloadpacket.__name__ for func in self.calls)

    @property
    def launched(self) -> list[str]:
        """The names of the ops that are not views (those launch kernels), in order."""
        return [func.overloadpacket.__name__ for func in self.calls if not func.is_view]

    @property
    def ops(self) -> int:
        """How many ops that are not views were dispatched."""
        return len(self.launched)

    @property
    def foreach(self) -> int:
        """How many of :attr:`ops` are multi-tensor ``_foreach_*`` ops."""
        return sum(name.startswith("_foreach") for name in self.launched)
