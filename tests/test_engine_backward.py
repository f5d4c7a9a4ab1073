"""``backward_keeping_modes`` / ``grad_keeping_modes``: torch.autograd.backward's and grad's gradients,
with the caller's torch function modes active for the Python code backward runs; ``backward_call``, the
restart a mode makes of the backward calls it handles."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.graph import get_gradient_edge
from torch.overrides import TorchFunctionMode

from sdadapt.training.engine_backward import (
    backward_call,
    backward_keeping_modes,
    grad_keeping_modes,
)


class _Seen(TorchFunctionMode):
    """Records the names of the torch functions called while it is active; ``restart``: with the
    backward calls it handles restarted by :func:`backward_call`."""

    def __init__(self, restart: bool = False) -> None:
        super().__init__()
        self.names: list[str] = []
        self.restart = restart

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        restart = backward_call(func, args, kwargs or {}) if self.restart else None
        if restart is not None:
            with self:
                return restart()
        return func(*args, **(kwargs or {}))


def _net(x: torch.Tensor) -> torch.Tensor:
    return torch.sin(x).mul(3.0)


def test_the_recompute_of_a_checkpoint_runs_under_the_callers_modes():
    """The recompute of a non-reentrant checkpoint runs inside backward: started from the engine it
    sees the mode active at the call; ``Tensor.backward()`` inside the same mode runs without it (the
    mode leaves the stack while it handles that call: why this function exists)."""
    for start, sees in ((lambda loss: backward_keeping_modes([loss]), True), (lambda loss: loss.backward(), False)):
        x = torch.linspace(-1.0, 1.0, 5, requires_grad=True)
        loss = torch.utils.checkpoint.checkpoint(_net, x, use_reentrant=False).sum()
        mode = _Seen()
        with mode:
            start(loss)
        assert ("sin" in mode.names) is sees, mode.names  # (the recompute's first call)
        torch.testing.assert_close(x.grad, 3.0 * torch.cos(x.detach()))


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=3),
       dtype=st.sampled_from([torch.float32, torch.float64]), seed=st.integers(0, 2**16))
def test_gradients_equal_torch_autograd_backward(shapes, dtype, seed):
    """Several outputs of any shapes, each with its given gradient (a one-element one: implied ones),
    accumulated into ``.grad`` bit for bit as ``torch.autograd.backward``."""
    def run(backward) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(7, dtype=dtype, generator=g, requires_grad=True)
        outs, grads = [], []
        for shape in shapes:
            a = torch.randn(*shape, 7, dtype=dtype, generator=g)
            out = (a * w).sum(-1).exp()
            outs.append(out)
            grads.append(None if out.numel() == 1 else torch.randn(out.shape, dtype=dtype, generator=g))
        backward(outs, grads)
        return w.grad

    torch.testing.assert_close(run(backward_keeping_modes), run(torch.autograd.backward), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Using backward\\(\\) with create_graph=True")
def test_retain_graph_and_create_graph_as_torch():
    x = torch.tensor([0.5, -1.5], requires_grad=True)
    y = (x ** 3).sum()
    backward_keeping_modes([y], retain_graph=True)
    backward_keeping_modes([y])  # (the graph was kept for this one)
    torch.testing.assert_close(x.grad, 2 * 3 * x.detach() ** 2)
    with pytest.raises(RuntimeError, match="second time"):
        backward_keeping_modes([y])
    x.grad = None
    backward_keeping_modes([(x ** 3).sum()], create_graph=True)  # d/dx (3x²) summed: 6x
    (first,) = torch.autograd.grad(x.grad.sum(), x)
    torch.testing.assert_close(first, 6 * x.detach())
    x.grad = None  # (breaks the cycle create_graph makes)


def test_a_gradient_that_cannot_be_implied_is_asked_for():
    x = torch.ones(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"shape \(3,\) needs its gradient"):
        backward_keeping_modes([x * 2])
    with pytest.raises(ValueError, match="1 tensor.*2 gradient"):
        backward_keeping_modes([x.sum()], [None, None])


@pytest.mark.parametrize("call", ["Tensor.backward", "torch.autograd.backward", "torch.autograd.grad"])
def test_a_mode_restarting_the_backward_calls_it_handles_sees_the_recompute(call):
    """``backward_call`` in a mode's handler: ``loss.backward()`` / ``torch.autograd.backward([loss])``
    called inside the mode reach the checkpoint's recompute with the mode on; the same gradients."""
    x = torch.linspace(-1.0, 1.0, 5, requires_grad=True)
    loss = torch.utils.checkpoint.checkpoint(_net, x, use_reentrant=False).sum()
    mode = _Seen(restart=True)
    with mode:
        if call == "torch.autograd.grad":
            (x.grad,) = torch.autograd.grad(loss, {"x": x}.values())
        else:
            loss.backward() if call == "Tensor.backward" else torch.autograd.backward([loss])
    assert "sin" in mode.names, mode.names
    torch.testing.assert_close(x.grad, 3.0 * torch.cos(x.detach()))


def test_backward_call_leaves_other_calls_alone():
    """Other functions, empty or odd ``inputs=``, a non-scalar output without its gradient, a count mismatch: ``None``
    (run as called: torch's own behaviour and errors)."""
    x = torch.ones(3, requires_grad=True)
    y = (x * 2).sum()
    assert backward_call(torch.add, (x, x), {}) is None
    assert backward_call(torch.Tensor.backward, (y,), {"inputs": []}) is None  # (torch's "cannot be empty")
    assert backward_call(torch.Tensor.backward, (y,), {"inputs": [x, 3]}) is None
    assert backward_call(torch.Tensor.backward, (x * 2,), {}) is None
    assert backward_call(torch.autograd.backward, ([y, y], [None]), {}) is None
    assert backward_call(torch.autograd.backward, (), {"nonsense": 1}) is None
    backward_call(torch.Tensor.backward, (y,), {"retain_graph": True})()
    backward_call(torch.autograd.backward, ([y],), {})()  # (the graph kept by the first)
    torch.testing.assert_close(x.grad, torch.full((3,), 4.0))


def test_without_torchs_engine_wrapper_the_engine_itself_runs(monkeypatch):
    """torch < 2.3 has no ``torch.autograd.graph._engine_run_backward``: the engine's own
    ``run_backward`` is called, with the same gradients and the same modes kept."""
    monkeypatch.delattr(torch.autograd.graph, "_engine_run_backward")
    x = torch.linspace(-1.0, 1.0, 5, requires_grad=True)
    loss = torch.utils.checkpoint.checkpoint(_net, x, use_reentrant=False).sum()
    mode = _Seen()
    with mode:
        backward_keeping_modes([loss])
    assert "sin" in mode.names
    torch.testing.assert_close(x.grad, 3.0 * torch.cos(x.detach()))


@settings(max_examples=25, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 4), min_size=0, max_size=3), min_size=1, max_size=3),
       unused=st.sampled_from([None, "allow", "materialize"]), seed=st.integers(0, 2**16))
def test_grad_equals_torch_autograd_grad(shapes, unused, seed):
    """Several outputs, two inputs (one unused when ``unused`` says so): the same gradients as
    ``torch.autograd.grad`` with the same options, ``None`` or zeros for the unused one, ``.grad`` untouched."""
    def run(grad_fn):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
        v = torch.randn(3, dtype=torch.float64, generator=g, requires_grad=True)
        outs, grads = [], []
        for shape in shapes:
            a = torch.randn(*shape, 7, dtype=torch.float64, generator=g)
            out = (a * w).sum(-1).exp() + (0.0 if unused else v.sum())
            outs.append(out)
            grads.append(None if out.numel() == 1 else torch.randn(out.shape, dtype=torch.float64, generator=g))
        options = {"allow": {"allow_unused": True}, "materialize": {"materialize_grads": True}}.get(unused, {})
        result = grad_fn(outs, (w, v), grads, **options)
        assert w.grad is None and v.grad is None
        return result

    ours, theirs = run(grad_keeping_modes), run(torch.autograd.grad)
    assert len(ours) == len(theirs) == 2
    for a, b in zip(ours, theirs):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    if unused is None:
        assert ours[1] is not None


def test_grad_calls_backward_call_leaves_alone():
    x = torch.ones(3, requires_grad=True)
    y = (x * 2).sum()
    assert backward_call(torch.autograd.grad, ((y,), (x,)), {"is_grads_batched": True}) is None
    assert backward_call(torch.autograd.grad, ((y,), (x,)), {"materialize_grads": True, "allow_unused": False}) is None
    assert backward_call(torch.autograd.grad, ((y,), (x,)), {"grad_outputs": (torch.ones(2),)}) is None
    assert backward_call(torch.autograd.grad, ((y,), ()), {}) is None
    edge = (get_gradient_edge(x),)
    assert backward_call(torch.autograd.grad, ((y,), edge), {"materialize_grads": True}) is None
    with pytest.raises(ValueError, match="gradient edges"):
        grad_keeping_modes([y], edge, materialize_grads=True)
    (g,) = backward_call(torch.autograd.grad, ((y,), (x,)), {})()
    torch.testing.assert_close(g, torch.full((3,), 2.0))
    with pytest.raises(ValueError, match="shape"):
        grad_keeping_modes([y], [x], [torch.ones(2)])
    with pytest.raises(ValueError, match="allow_unused"):
        grad_keeping_modes([y], [x], materialize_grads=True, allow_unused=False)


def _two_paths(seed: int):
    """A graph with two leaves and a non-leaf between them (``h = w * a``, ``out = (h * v).sum()``)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    h = w * torch.randn(5, dtype=torch.float64, generator=g)
    h.retain_grad()
    return w, v, h, (h * v).sum().sin()


@settings(max_examples=20, deadline=None)
@given(chosen=st.lists(st.sampled_from(["w", "v", "h", "edge_h"]), min_size=1, max_size=3, unique=True),
       seed=st.integers(0, 2**16))
def test_backward_inputs_accumulate_only_there_as_torch(chosen, seed):
    """``inputs=`` (leaves, a non-leaf, a gradient edge): only those get gradients, bit for bit
    ``torch.autograd.backward``'s; through a mode's restart of ``Tensor.backward(inputs=...)`` too."""
    def run(backward):
        w, v, h, out = _two_paths(seed)
        named = {"w": w, "v": v, "h": h, "edge_h": get_gradient_edge(h)}
        backward(out, [named[n] for n in chosen])
        return [None if t.grad is None else t.grad.clone() for t in (w, v, h)]

    def restarted(out, inputs):
        with _Seen(restart=True):
            out.backward(inputs=inputs)

    theirs = run(lambda out, inputs: torch.autograd.backward([out], inputs=inputs))
    for ours in (run(lambda out, inputs: backward_keeping_modes([out], inputs=inputs)), run(restarted)):
        for a, b in zip(ours, theirs):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (theirs[0] is None) == ("w" not in chosen)


def test_a_restarted_backward_with_inputs_sees_the_recompute():
    """``loss.backward(inputs=[x])`` inside a restarting mode reaches the checkpoint's recompute with the
    mode on (it ran without it before), and only ``x`` gets a gradient."""
    x = torch.linspace(-1.0, 1.0, 5, requires_grad=True)
    other = torch.ones(5, requires_grad=True)
    loss = torch.utils.checkpoint.checkpoint(_net, x, use_reentrant=False).sum() + (other * 2).sum()
    mode = _Seen(restart=True)
    with mode:
        loss.backward(inputs=[x])
    assert "sin" in mode.names, mode.names
    torch.testing.assert_close(x.grad, 3.0 * torch.cos(x.detach()))
    assert other.grad is None


def test_grad_with_respect_to_a_gradient_edge_as_torch():
    _, v, h, out = _two_paths(3)
    edge = get_gradient_edge(h)
    theirs = torch.autograd.grad(out, (edge, v), retain_graph=True)
    ours = grad_keeping_modes([out], (edge, v), retain_graph=True)
    restart = backward_call(torch.autograd.grad, ((out,), edge), {})
    assert restart is not None
    for a, b in zip(ours + restart(), theirs + theirs[:1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_recompute_enters_the_innermost_kept_context_of_each_kind_afresh():
    """``kept_for_recompute``: a block checkpointed inside nested contexts recomputes under the innermost of each
    kind, the kinds in the order first entered, each a fresh context for each recompute (a graph kept with
    ``retain_graph`` recomputes twice); nothing when none is open."""
    from contextlib import contextmanager

    from sdadapt.training.engine_backward import kept_for_recompute, recompute_under

    entered = []

    def factory(name):
        @contextmanager
        def context():
            entered.append(name)
            yield

        return context

    assert recompute_under() is None
    with kept_for_recompute("a", factory("a-outer")), kept_for_recompute("b", factory("b")), \
            kept_for_recompute("a", factory("a-inner")):
        recompute = recompute_under()
    assert recompute_under() is None  # (closed again)
    for _ in range(2):  # (torch enters a checkpoint's one recompute context at each recompute)
        with recompute:
            pass
    assert entered == ["a-inner", "b", "a-inner", "b"]

    from sdadapt.training.grad_checkpointing import enable_checkpointing
    from sdadapt.training.norm_precision import half_precision_norms

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    enable_checkpointing(model, ["1"])
    x = torch.randn(3, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16), half_precision_norms(True, "cpu"):
        loss = model(x).float().square().sum()
    loss.backward(retain_graph=True)  # (outside the contexts: the recompute re-enters the norms' mode, twice)
    once = [p.grad.clone() for p in model.parameters()]
    loss.backward()
    for p, g in zip(model.parameters(), once):
        torch.testing.assert_close(p.grad, 2 * g, rtol=0, atol=0)
