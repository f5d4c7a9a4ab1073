"""A backward pass that keeps the torch function modes of its caller.

``Tensor.backward``, ``torch.autograd.backward`` and ``torch.autograd.grad`` are themselves dispatched
through the active torch function modes, and a mode leaves the stack while it handles a call: the whole
backward then runs without it. Autograd's engine runs backward under the thread-local state of the call
that starts it, modes included, on its CUDA device threads too — so started from the engine directly, the
Python code backward runs (a checkpointed block's recompute, hooks, an optimiser fused into backward, a custom
``autograd.Function``'s ``backward``) sees the modes active at the call. The training step uses it for
its kernel choices (:func:`~sdadapt.training.step.step_backward`); a mode that must see that code
itself derives from :class:`BackwardKeepingMode`, which restarts the backward calls it handles
(:func:`backward_call`) with itself back on the stack, and implements ``handle`` instead of
``__torch_function__`` (the half-precision norms, the per-call attention orders,
:class:`~sdadapt.training.host_syncs.HostSyncs`). Modes acting on disjoint functions, entered one inside
another, share one entry of torch's mode stack (``BackwardKeepingMode.functions``): one Python call per torch
call for all of them.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

try:
    from torch.autograd.graph import GradientEdge
except ImportError:  # pragma: no cover - torch < 2.2 (no gradient edges: nothing is one)
    GradientEdge = ()  # type: ignore[assignment,misc]

__all__ = ["BackwardKeepingMode", "backward_call", "backward_keeping_modes", "grad_keeping_modes", "kept_for_recompute",
           "recompute_under"]


def backward_keeping_modes(tensors: Sequence[Tensor], grads: Sequence[Tensor | None] | None = None, *,
                           retain_graph: bool | None = None, create_graph: bool = False,
                           inputs: Sequence[Tensor | GradientEdge] = ()) -> None:
    """``torch.autograd.backward(tensors, grads, inputs=inputs)`` (gradients accumulated into ``.grad``)
    started from autograd's engine, inside the torch function modes active here.

    Args:
        tensors: the outputs to differentiate, any shapes.
        grads: one gradient per output, each of its output's shape; ``None`` (or a ``None`` entry) for a
            one-element output: ones.
        retain_graph: keep the graph for another backward (default: ``create_graph``).
        create_graph: record the backward itself (higher-order gradients).
        inputs: accumulate only into these tensors' ``.grad`` (leaves or not) or gradient edges
            (``torch.autograd.graph.get_gradient_edge``); empty: every leaf the outputs reach.

    Raises:
        ValueError: a ``None`` gradient for an output of more than one element, a gradient of another shape
            than its output's, or not one gradient per output.
    """
    tensors = tuple(tensors)
    _engine()(tensors, _seeds(tensors, grads), create_graph if retain_graph is None else retain_graph, create_graph,
              tuple(inputs), allow_unreachable=True, accumulate_grad=True)


def grad_keeping_modes(outputs: Sequence[Tensor], inputs: Sequence[Tensor | GradientEdge],
                       grads: Sequence[Tensor | None] | None = None, *, retain_graph: bool | None = None,
                       create_graph: bool = False, allow_unused: bool | None = None,
                       materialize_grads: bool = False) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grads)`` (the gradients returned, ``.grad`` untouched) started
    from autograd's engine, inside the torch function modes active here.

    Args:
        outputs, grads, retain_graph, create_graph: as :func:`backward_keeping_modes`.
        inputs: the tensors (or gradient edges) to differentiate with respect to.
        allow_unused: an input the outputs do not depend on gets ``None`` instead of an error (default:
            ``materialize_grads``).
        materialize_grads: such an input gets zeros of its shape instead of ``None`` (tensor inputs only).

    Returns:
        one gradient per input, each of its input's shape (or ``None``, see ``allow_unused``).

    Raises:
        ValueError: as :func:`backward_keeping_modes`, or ``materialize_grads`` with ``allow_unused=False``
            or with a gradient edge among the inputs.
    """
    if materialize_grads and allow_unused is False:
        raise ValueError("materialize_grads gives zeros for unused inputs, so it needs allow_unused True or None")
    if materialize_grads and not all(isinstance(i, Tensor) for i in inputs):
        raise ValueError("materialize_grads makes zeros of an input's shape: give tensors, not gradient edges")
    outputs, inputs = tuple(outputs), tuple(inputs)
    result = _engine()(outputs, _seeds(outputs, grads), create_graph if retain_graph is None else retain_graph,
                       create_graph, inputs, materialize_grads if allow_unused is None else allow_unused,
                       accumulate_grad=False)
    if materialize_grads:
        result = tuple(torch.zeros_like(i, requires_grad=create_graph) if g is None else g
                       for g, i in zip(result, inputs))
    return tuple(result)


def _engine() -> Callable[..., Any]:
    """What ``torch.autograd.backward`` and ``grad`` call (torch >= 2.3 wraps the engine to show compiled
    autograd's config to the device threads; before, the engine's own ``run_backward``)."""
    return (getattr(torch.autograd.graph, "_engine_run_backward", None)
            or torch.autograd.Variable._execution_engine.run_backward)  # type: ignore[attr-defined]


def _seeds(tensors: tuple[Tensor, ...], grads: Sequence[Tensor | None] | None) -> tuple[Tensor, ...]:
    """The gradient each output's backward starts from: the given one, or ones for a one-element output."""
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
        elif grad.shape != tensor.shape:
            raise ValueError(f"a gradient of shape {tuple(grad.shape)} for an output of shape {tuple(tensor.shape)}: "
                             "give each output's gradient its shape")
        made.append(grad)
    return tuple(made)


_BACKWARDS = {Tensor.backward: inspect.signature(Tensor.backward),
              torch.autograd.backward: inspect.signature(torch.autograd.backward),
              torch.autograd.grad: inspect.signature(torch.autograd.grad)}


def backward_call(func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Callable[[], Any] | None:
    """For a torch function mode: a ``Tensor.backward``, ``torch.autograd.backward`` or ``torch.autograd.grad``
    call it handles, as a function that runs it through :func:`backward_keeping_modes` /
    :func:`grad_keeping_modes` (the same gradients, the same result), or ``None`` — for any other function,
    and for a call it does not take (outputs given as ``GradientEdge``s, empty ``inputs``, ``is_grads_batched``,
    the old ``grad_variables=``, gradients or options torch would refuse: those run as called, with torch's own
    errors). ``inputs`` (of ``backward`` too) may be tensors or gradient edges; a dict of inputs reaches a mode
    as its values (``torch.autograd.grad`` turns the result back into a dict)."""
    signature = _BACKWARDS.get(func)
    if signature is None:
        return None
    try:
        arguments = signature.bind(*args, **kwargs).arguments
    except TypeError:
        return None
    if func is Tensor.backward:
        tensors, grads = (arguments["self"],), arguments.get("gradient")
        grads = None if grads is None else (grads,)
    else:
        tensors = arguments["outputs" if func is torch.autograd.grad else "tensors"]
        grads = arguments.get("grad_outputs" if func is torch.autograd.grad else "grad_tensors")
        tensors = (tensors,) if isinstance(tensors, Tensor) else tuple(tensors)
        grads = (grads,) if isinstance(grads, Tensor) else grads
    listed = (None,) * len(tensors) if grads is None else tuple(grads)
    if len(listed) != len(tensors) or not all(
            isinstance(t, Tensor) and (t.numel() == 1 if g is None else isinstance(g, Tensor) and g.shape == t.shape)
            for t, g in zip(tensors, listed)):
        return None
    options = {"retain_graph": arguments.get("retain_graph"), "create_graph": arguments.get("create_graph", False)}
    inputs = arguments.get("inputs")
    inputs = (inputs,) if isinstance(inputs, (Tensor, GradientEdge)) else inputs
    if inputs is not None and (not isinstance(inputs, (tuple, list)) or not inputs
                               or not all(isinstance(i, (Tensor, GradientEdge)) for i in inputs)):
        return None
    if func is not torch.autograd.grad:
        if arguments.get("grad_variables") is not None:
            return None
        return lambda: backward_keeping_modes(tensors, grads, **options, inputs=inputs or ())
    materialize = arguments.get("materialize_grads")
    if (inputs is None or arguments.get("is_grads_batched")
            or (materialize and (arguments.get("allow_unused") is False
                                 or not all(isinstance(i, Tensor) for i in inputs)))):
        return None
    return lambda: grad_keeping_modes(tensors, tuple(inputs), grads, **options,
                                      allow_unused=arguments.get("allow_unused"),
                                      materialize_grads=arguments.get("materialize_grads", False))


class BackwardKeepingMode(TorchFunctionMode):
    """A torch function mode that stays active for the Python code of the backward passes started inside
    it (a checkpoint's recompute, hooks): a ``Tensor.backward`` / ``torch.autograd.backward`` / ``grad``
    call it handles is restarted by :func:`backward_call` with the mode back on the stack (a mode is off
    it while it handles a call); every other call goes to :meth:`handle`.

    A mode that acts on a few functions only lists them in ``functions`` (every other call it would run as
    called). Such modes entered one directly inside another share one mode on torch's stack when their
    functions are disjoint (:class:`_SharedModes`): each torch call then goes through one Python
    ``__torch_function__`` instead of one per mode — the step's kernel choices (half-precision norms,
    per-call attention orders, fused LoRA linear layers) cost an eager step the host time of one mode.
    The calls each mode sees and what it does with them are the same as stacked (disjoint functions: no
    mode's call reaches another's ``handle`` either way). ``functions = None`` (the default): every call
    goes to ``handle``, and the mode is pushed on its own."""

    #: the functions ``handle`` acts on; ``None``: every call (not shared). Never a backward function.
    functions: frozenset[Callable[..., Any]] | None = None

    def __torch_function__(self, func: Callable[..., Any], types: Sequence[type], args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        restart = backward_call(func, args, kwargs)
        if restart is not None:
            with self:
                return restart()
        return self.handle(func, args, kwargs)

    def handle(self, func: Callable[..., Any], args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        """What the mode does with a call that is not a backward to restart (this one: runs it as called)."""
        return func(*args, **kwargs)

    def __enter__(self) -> BackwardKeepingMode:  # noqa: PYI034 (typing.Self needs Python 3.11)
        if self.functions is None:
            return super().__enter__()
        top = torch.overrides._get_current_function_mode()
        if isinstance(top, _SharedModes) and top.takes(self):
            top.add(self)
        else:
            top = _SharedModes()
            top.add(self)
            top.__enter__()
        self.__dict__.setdefault("_shared_in", []).append(top)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.functions is None:
            return super().__exit__(*exc)
        shared = self.__dict__["_shared_in"].pop()
        shared.remove(self)
        if not shared.members:
            shared.__exit__(*exc)
        return None


class _SharedModes(TorchFunctionMode):
    """One mode on torch's stack for several :class:`BackwardKeepingMode` s with disjoint ``functions``: a call
    of a member's function goes to that member's ``handle``, a backward call is restarted with this mode back
    on the stack, every other call runs as called."""

    def __init__(self) -> None:
        super().__init__()
        self.members: list[BackwardKeepingMode] = []
        self.by_function: dict[Callable[..., Any], BackwardKeepingMode] = {}

    def takes(self, mode: BackwardKeepingMode) -> bool:
        return mode.functions is not None and mode.functions.isdisjoint(self.by_function)

    def add(self, mode: BackwardKeepingMode) -> None:
        if mode.functions is None or not mode.functions.isdisjoint(_BACKWARDS):
            raise ValueError(f"{type(mode).__name__}.functions must list the functions its handle acts on, "
                             "no backward function among them")
        self.members.append(mode)
        self.by_function.update(dict.fromkeys(mode.functions, mode))

    def remove(self, mode: BackwardKeepingMode) -> None:
        self.members.remove(mode)
        self.by_function = {func: member for member in self.members for func in member.functions or ()}

    def __torch_function__(self, func: Callable[..., Any], types: Sequence[type], args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        member = self.by_function.get(func)
        if member is not None:
            return member.handle(func, args, kwargs or {})
        if func in _BACKWARDS:
            restart = backward_call(func, args, kwargs or {})
            if restart is not None:
                with self:
                    return restart()
        return func(*args, **(kwargs or {}))


@contextmanager
def kept_for_recompute(kind: object, factory: Callable[[], AbstractContextManager[object]]) -> Iterator[None]:
    """While open: a gradient-checkpointed block started on this thread recomputes under a fresh ``factory()``
    (:func:`recompute_under`; the innermost of each ``kind``). For the step's kernel choices (half-precision
    norms, attention kernel orders, fused LoRA layers): a recompute runs inside backward, which may start after
    the forward's contexts have ended, and must choose what its forward chose (torch refuses other saved tensors).
    ``factory`` makes a new context each time (a recompute enters it once; a block may recompute more than once)."""
    entries = _KEPT.__dict__.setdefault("entries", [])
    entries.append((kind, factory))
    try:
        yield
    finally:
        entries.pop()


def recompute_under() -> AbstractContextManager[object] | None:
    """What a checkpointed block started now should recompute under: a context that enters, of each kind
    registered by :func:`kept_for_recompute` on this thread, a fresh ``factory()`` of the innermost, in the order
    the kinds were first entered — fresh each time it is entered (torch makes a checkpoint's recompute context
    once, at forward, and enters it at every recompute: a graph kept with ``retain_graph`` recomputes again);
    ``None`` when none is open. ``enable_checkpointing`` gives it to ``torch.utils.checkpoint`` (``context_fn``)."""
    innermost: dict[object, Callable[[], AbstractContextManager[object]]] = {}
    for kind, factory in getattr(_KEPT, "entries", ()):
        innermost[kind] = factory
    return _Fresh(list(innermost.values())) if innermost else None


class _Fresh:
    """A context entering a new context from each of its factories every time it is entered (nesting allowed)."""

    def __init__(self, factories: list[Callable[[], AbstractContextManager[object]]]) -> None:
        self.factories = factories
        self._open: list[ExitStack] = []

    def __enter__(self) -> None:
        with ExitStack() as stack:
            for factory in self.factories:
                stack.enter_context(factory())
            self._open.append(stack.pop_all())

    def __exit__(self, *exc: object) -> bool | None:
        return self._open.pop().__exit__(*exc)


_KEPT = threading.local()  # .entries: (kind, factory) of each kept_for_recompute open on this thread, innermost last
