"""A backward pass that keeps the torch function modes of its caller.

``Tensor.backward`` and ``torch.autograd.backward`` are themselves dispatched through the active torch
function modes, and a mode leaves the stack while it handles a call: the whole backward then runs
without it. Autograd's engine runs backward under the thread-local state of the call that starts it,
modes included, on its CUDA device threads too — so started from the engine directly, the Python code
backward runs (a checkpointed block's recompute, hooks, an optimiser fused into backward, a custom
``autograd.Function``'s ``backward``) sees the modes active at the call. The training step uses it for
its kernel choices (:func:`~sdadapt.training.step.step_backward`), :class:`~sdadapt.training.host_syncs.HostSyncs`
to see the host syncs of that code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["backward_keeping_modes"]


def backward_keeping_modes(tensors: Sequence[Tensor], grads: Sequence[Tensor | None] | None = None, *,
                           retain_graph: bool | None = None, create_graph: bool = False) -> None:
    """``torch.autograd.backward(tensors, grads)`` (gradients accumulated into the leaves' ``.grad``)
    started from autograd's engine, inside the torch function modes active here.

    Args:
        tensors: the outputs to differentiate, any shapes.
        grads: one gradient per output, each of its output's shape; ``None`` (or a ``None`` entry) for a
            one-element output: ones.
        retain_graph: keep the graph for another backward (default: ``create_graph``).
        create_graph: record the backward itself (higher-order gradients).

    Raises:
        ValueError: a ``None`` gradient for an output of more than one element, or as many gradients as outputs
            not given.
    """
    tensors = tuple(tensors)
    given = (None,) * len(tensors) if grads is None else tuple(grads)
    if len(given) != len(tensors):
        raise ValueError(f"backward of {len(tensors)} tensor(s) got {len(given)} gradient(s); give one per tensor")
    made = []
    for tensor, grad in zip(tensors, given):
        if grad is None:
            if tensor.numel() != 1:
                raise ValueError(f"backward of a tensor of shape {tuple(tensor.shape)} needs its gradient: only a "
                                 "one-element output's is implied (ones)")
            grad = torch.ones_like(tensor, memory_format=torch.preserve_format)
        made.append(grad)
    # what torch.autograd.backward calls (torch >= 2.3 wraps the engine to show compiled autograd's config to
    # the device threads)
    engine = (getattr(torch.autograd.graph, "_engine_run_backward", None)
              or torch.autograd.Variable._execution_engine.run_backward)  # type: ignore[attr-defined]
    engine(tensors, tuple(made), create_graph if retain_graph is None else retain_graph, create_graph, (),
           allow_unreachable=True, accumulate_grad=True)
