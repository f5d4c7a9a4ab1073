"""``BackwardKeepingMode.functions``: modes acting on disjoint functions, entered one inside another, share
one entry of torch's function-mode stack (one Python ``__torch_function__`` per torch call) and do exactly
what they did stacked — the step's kernel choices (half-precision norms, per-call attention orders, fused
LoRA linear layers) included, through a checkpointed block's recompute and under ``torch.compile``."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import pytest
import torch
from trained_toy_lora import trained_toy_lora

from sdadapt.training import attention, fused_lora, norm_precision
from sdadapt.training.attention import record_attention_calls, sdpa_backends
from sdadapt.training.engine_backward import BackwardKeepingMode
from sdadapt.training.fused_lora import fused_lora_linear
from sdadapt.training.norm_precision import half_precision_norms


def _stack_depth() -> int:
    return torch._C._len_torch_function_stack()


class _Recorder(BackwardKeepingMode):
    """Records the names of the calls its handle sees and adds ``offset`` to what ``torch.add`` and ``torch.mul``
    return (so that which mode handled a call, and in which order, shows in the result)."""

    def __init__(self, functions: frozenset | None, offset: float = 0.0) -> None:
        super().__init__()
        self.functions = functions
        self.offset = offset
        self.seen: list[str] = []

    def handle(self, func, args, kwargs):
        self.seen.append(func.__name__)
        out = func(*args, **kwargs)
        return out + self.offset if self.offset and func in (torch.add, torch.mul) else out


def test_disjoint_modes_share_one_stack_entry_and_each_sees_only_its_functions():
    adds, muls = _Recorder(frozenset({torch.add}), 1.0), _Recorder(frozenset({torch.mul}), 10.0)
    x = torch.ones(2)
    with adds:
        assert _stack_depth() == 1
        with muls:
            assert _stack_depth() == 1  # shared
            y = torch.mul(torch.add(x, x), x)
            z = torch.sub(x, x)
        assert _stack_depth() == 1
    assert _stack_depth() == 0
    assert adds.seen == ["add"] and muls.seen == ["mul"]
    torch.testing.assert_close(y, torch.full((2,), 13.0))  # (1 + 1 + 1) · 1 + 10
    torch.testing.assert_close(z, torch.zeros(2))


def test_overlapping_modes_stack_and_the_inner_one_handles_first():
    outer, inner = _Recorder(frozenset({torch.add}), 1.0), _Recorder(frozenset({torch.add, torch.mul}), 100.0)
    x = torch.ones(2)
    with outer, inner:
        assert _stack_depth() == 2
        y = torch.add(x, x)
    assert _stack_depth() == 0
    assert outer.seen == ["add"] and inner.seen == ["add"]
    torch.testing.assert_close(y, torch.full((2,), 103.0))  # inner's call went through outer: +1, then +100


def test_a_mode_for_every_call_is_pushed_on_its_own_and_splits_the_sharing():
    adds, every, muls = _Recorder(frozenset({torch.add})), _Recorder(None), _Recorder(frozenset({torch.mul}))
    x = torch.ones(2)
    with adds, every, muls:
        assert _stack_depth() == 3
        torch.mul(torch.add(x, x), x)
    assert (adds.seen, muls.seen) == (["add"], ["mul"])
    assert every.seen == ["add", "mul"]  # (the inner mode's pass-through call reaches it)


def test_the_stack_is_left_clean_when_the_body_raises_and_a_mode_can_be_reentered():
    adds, muls = _Recorder(frozenset({torch.add})), _Recorder(frozenset({torch.mul}))
    with pytest.raises(RuntimeError, match="boom"), adds, muls:
        raise RuntimeError("boom")
    assert _stack_depth() == 0
    with adds, adds:  # the same instance inside itself: overlapping, so a second entry
        assert _stack_depth() == 2
        torch.add(torch.ones(1), 1)
    assert _stack_depth() == 0 and adds.seen == ["add", "add"]


def test_a_backward_started_inside_shared_modes_keeps_them_for_its_python_code():
    """A custom function's backward calls ``torch.mul``: started inside the shared modes by ``Tensor.backward``,
    the member for ``torch.mul`` sees it (the shared mode restarts the backward with itself on the stack)."""

    class Twice(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, grad):
            return torch.mul(grad, 2.0)

    adds, muls = _Recorder(frozenset({torch.add})), _Recorder(frozenset({torch.mul}))
    x = torch.ones(3, requires_grad=True)
    with adds, muls:
        Twice.apply(x).sum().backward()
        assert _stack_depth() == 1
    assert muls.seen == ["mul"]
    torch.testing.assert_close(x.grad, torch.full((3,), 2.0))


def test_a_member_listing_a_backward_function_is_refused():
    with pytest.raises(ValueError, match="no backward function"), _Recorder(frozenset({torch.Tensor.backward})):
        pass
    assert _stack_depth() == 0


@contextmanager
def _each_on_its_own(monkeypatch):
    """The kernel-choice modes as they were before sharing: each pushed on torch's stack by itself."""
    with monkeypatch.context() as patch:
        for cls in (norm_precision._HalfPrecisionNorms, attention._PerCallBackends, fused_lora._FusedLoRALinear):
            patch.setattr(cls, "functions", None)
        yield


def _step_gradients(*, checkpoint: bool, depth: list[int], choices: bool = True) -> torch.Tensor:
    """The LoRA gradients of one bf16-autocast toy UNet step under the three kernel choices (half-precision
    norms, a per-call attention order, fused LoRA linear layers), optionally with every block checkpointed
    (recomputed under the modes inside backward); ``depth`` gets the stack depth inside the contexts;
    ``choices=False``: none of them."""
    unet, handle = trained_toy_lora(checkpoint=checkpoint)
    params = list(handle.parameters())
    g = torch.Generator().manual_seed(1)
    x, t, ehs = torch.randn(2, 12, 16, 16, generator=g), torch.tensor([10, 500]), torch.randn(2, 8, 64, generator=g)

    def forward():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return unet(x, t, ehs).float().pow(2).mean()

    with torch.no_grad():  # the first half of the kinds of attention call the toy makes: math; the others flash
        calls = record_attention_calls(forward)
    per_call = {call.signature: ("math",) for call in calls[: len(calls) // 2]}
    with ExitStack() as stack:
        for context in (sdpa_backends(("flash", "math"), per_call), half_precision_norms(True, "cpu"),
                        fused_lora_linear()):
            if choices:
                stack.enter_context(context)
        depth.append(_stack_depth())
        forward().backward()
    return torch.cat([p.grad.flatten() for p in params if p.grad is not None])


@pytest.mark.parametrize("checkpoint", [False, True])
def test_the_step_kernel_choices_shared_equal_them_each_on_its_own(monkeypatch, checkpoint):
    shared_depth, own_depth = [], []
    shared = _step_gradients(checkpoint=checkpoint, depth=shared_depth)
    with _each_on_its_own(monkeypatch):
        own = _step_gradients(checkpoint=checkpoint, depth=own_depth)
    assert (shared_depth, own_depth) == ([1], [3])
    torch.testing.assert_close(shared, own, rtol=0, atol=0)
    assert _stack_depth() == 0
    assert not torch.equal(shared, _step_gradients(checkpoint=checkpoint, depth=[], choices=False))  # (they acted)


def test_shared_kernel_choices_trace_under_torch_compile_without_graph_breaks():
    from torch._dynamo.utils import counters

    unet, _ = trained_toy_lora()
    x, t, ehs = torch.randn(1, 12, 8, 8), torch.tensor([10]), torch.randn(1, 8, 64)

    def run(model):
        with half_precision_norms(True, "cpu"), fused_lora_linear(), torch.no_grad(), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            assert _stack_depth() == 1
            return model(x, t, ehs).float()

    expected = run(unet)
    torch._dynamo.reset()
    counters.clear()
    try:
        out = run(torch.compile(unet, backend="eager"))
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    # (the compiled model's linear layers keep their hooks: bf16 rounding apart from the fused eager path)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
