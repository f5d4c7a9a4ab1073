"""A backward pass that keeps the torch function modes of its caller.

``Tensor.backward`` and ``torch.autograd.backward`` are themselves dispatched through the active torch
function modes, and a mode leaves the stack while it handles a call: the whole backward then runs
without it. Autograd's engine runs backward under the thread-local state of the call that starts it,
modes included, on its CUDA device threads too — so started from the engine directly, the Python code
backward runs (a checkpointed block's recompute, hooks, an optimiser fused into backward, a custom
``autograd.Function``'s ``backward``) sees the modes active at the call. The training step uses it for
its kernel choices (:func:`~sdadapt.training.step.step_backward`); a mode that must see that code
itself (:class:`~sdadapt.training.host_syncs.HostSyncs`) restarts the backward calls it handles with
:func:`backward_call`::

    def __torch_function__(self, func, types, args=(), kwargs=None):
        restart = backward_call(func, args, kwargs or {})
        if restart is not None:
            with self:              # (off the stack while it handles this call: back on for the backward)
                return restart()
        ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["backward_call", "backward_keeping_modes"]


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


_BACKWARDS = {Tensor.backward: inspect.signature(Tensor.backward),
              torch.autograd.backward: inspect.signature(torch.autograd.backward)}


def backward_call(func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Callable[[], None] | None:
    """For a torch function mode: a ``Tensor.backward`` or ``torch.autograd.backward`` call it handles, as a
    function that runs it through :func:`backward_keeping_modes` (the same gradients), or ``None`` — for any
    other function, and for a backward call it does not take (``inputs=``, the old ``grad_variables=``,
    gradients torch would refuse: those run as called, with torch's own errors)."""
    signature = _BACKWARDS.get(func)
    if signature is None:
        return None
    try:
        arguments = signature.bind(*args, **kwargs).arguments
    except TypeError:
        return None
    if arguments.get("inputs") is not None or arguments.get("grad_variables") is not None:
        return None
    if func is Tensor.backward:
        tensors, grads = (arguments["self"],), arguments.get("gradient")
        grads = None if grads is None else (grads,)
    else:
        tensors, grads = arguments["tensors"], arguments.get("grad_tensors")
        tensors = (tensors,) if isinstance(tensors, Tensor) else tuple(tensors)
        grads = (grads,) if isinstance(grads, Tensor) else grads
    listed = (None,) * len(tensors) if grads is None else tuple(grads)
    if len(listed) != len(tensors) or not all(isinstance(t, Tensor) and (g is not None or t.numel() == 1)
                                             for t, g in zip(tensors, listed)):
        return None
    options = {"retain_graph": arguments.get("retain_graph"), "create_graph": arguments.get("create_graph", False)}
    return lambda: backward_keeping_modes(tensors, grads, **options)
