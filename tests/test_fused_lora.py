"""``lora_linear`` (adapters.fused_lora) and ``StepConfig(fused_lora_linear=True)`` (training.fused_lora):
a linear LoRA layer as one autograd function, its delta accumulated into the base GEMM's output.

Checked against float64 references written here, against the hook path (the same model without the mode), and
by counting the aten ops both paths dispatch (``benchmarks/aten_ops.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from aten_ops import AtenOps
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from trained_toy_lora import trained_toy_lora

import sdadapt
from sdadapt.adapters.fused_lora import lora_linear
from sdadapt.targets import by_type
from sdadapt.training.fused_lora import fused_lora_linear
from sdadapt.training.step import StepConfig, TrainState, train_step


def _reference(x, weight, bias, up, down):
    """``x Wᵀ + b + (x downᵀ) upᵀ`` in float64, written out."""
    y = x.double() @ weight.double().t() + (x.double() @ down.double().t()) @ up.double().t()
    return y if bias is None else y + bias.double()


def _inputs(g, lead, in_f, out_f, rank, dtype, *, bias=True, up_std=0.3):
    x = torch.randn(*lead, in_f, generator=g).to(dtype)
    weight = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    up = (torch.randn(out_f, rank, generator=g) * up_std).to(dtype)
    down = (torch.randn(rank, in_f, generator=g) / in_f**0.5).to(dtype)
    return x, weight, b, up, down


@settings(max_examples=40, deadline=None)
@given(lead=st.lists(st.integers(1, 4), min_size=0, max_size=3), in_f=st.integers(1, 12), out_f=st.integers(1, 12),
       rank=st.integers(1, 5), dtype=st.sampled_from([torch.float32, torch.float64]), bias=st.booleans(),
       grads=st.lists(st.booleans(), min_size=5, max_size=5), seed=st.integers(0, 2**16))
def test_output_and_every_gradient_match_a_float64_reference(lead, in_f, out_f, rank, dtype, bias, grads, seed):
    """Forward and the gradients of x, W, b, up and down (each asked for or not) equal the float64 formula's
    (float64 to ~1e-12, float32 to float32 rounding); an input that asks for none gets ``None``."""
    g = torch.Generator().manual_seed(seed)
    tensors = _inputs(g, lead, in_f, out_f, rank, dtype, bias=bias)
    tensors = [None if t is None else t.requires_grad_(want) for t, want in zip(tensors, grads)]
    upstream = torch.randn(*lead, out_f, generator=g)
    y = lora_linear(*tensors)
    assert y.shape == (*lead, out_f) and y.dtype == dtype
    refs = [None if t is None else t.detach().double().requires_grad_(True) for t in tensors]
    y64 = _reference(*refs)
    tol = {"rtol": 1e-10, "atol": 1e-10} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(y.double(), y64, **tol)
    if not any(t is not None and t.requires_grad for t in tensors):
        return
    (y * upstream.to(dtype)).sum().backward()
    (y64 * upstream.double()).sum().backward()
    for t, r in zip(tensors, refs):
        if t is None:
            continue
        if not t.requires_grad:
            assert t.grad is None
            continue
        assert t.grad.shape == t.shape and t.grad.dtype == dtype
        torch.testing.assert_close(t.grad.double(), r.grad, **tol)


def _hook_path(x, weight, bias, up, down):
    """What the forward hook computes in a half dtype: the base output, the delta, their sum (each rounded)."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x, down), up)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_errors_are_no_larger_than_the_hook_paths(dtype):
    """In a half dtype the fused output and input gradient skip one rounding (the delta is summed into the
    base output inside the GEMM): against float64 of the same half inputs their errors are at most the hook
    path's, the factors' gradients equal to rounding."""
    g = torch.Generator().manual_seed(0)
    errors = {"fused": [0.0, 0.0], "hook": [0.0, 0.0]}
    for _ in range(4):
        tensors = [t.requires_grad_(True) for t in _inputs(g, (3, 40), 96, 80, 8, dtype)]
        upstream = torch.randn(3, 40, 80, generator=g).to(dtype)
        refs = [t.detach().double().requires_grad_(True) for t in tensors]
        y64 = _reference(*refs)
        (y64 * upstream.double()).sum().backward()
        for name, fn in (("fused", lora_linear), ("hook", _hook_path)):
            for t in tensors:
                t.grad = None
            y = fn(*tensors)
            (y * upstream).sum().backward()
            errors[name][0] += float((y.detach().double() - y64.detach()).norm() / y64.detach().norm())
            errors[name][1] += float((tensors[0].grad.double() - refs[0].grad).norm() / refs[0].grad.norm())
            if name == "fused":
                fused_factor_grads = [tensors[3].grad.clone(), tensors[4].grad.clone()]
        for fused_grad, hook_grad, ref in zip(fused_factor_grads, (tensors[3].grad, tensors[4].grad), refs[3:]):
            scale = float(ref.grad.abs().max())
            torch.testing.assert_close(fused_grad.double(), hook_grad.double(), rtol=0, atol=2e-2 * scale)
    assert errors["fused"][0] <= errors["hook"][0] * 1.02, errors
    assert errors["fused"][1] <= errors["hook"][1] * 1.02, errors
    assert errors["hook"][0] > 0  # (the premise: the half dtype rounds)


def test_its_backward_runs_unseen_by_function_modes_which_stay_on_the_stack():
    """The Python backward runs as a built-in op's: a torch function mode that restarts backward with itself on
    the stack (the step's kernel-choice modes do) sees none of its calls, and is back on the stack after it and
    for the rest of backward; the gradients are those computed without any mode."""
    from sdadapt.training.engine_backward import BackwardKeepingMode

    class Seen(BackwardKeepingMode):
        def __init__(self):
            super().__init__()
            self.names = []
            self.depths = []

        def handle(self, func, args, kwargs):
            self.names.append(func.__name__)
            self.depths.append(torch._C._len_torch_function_stack())
            return func(*args, **kwargs)

    class Square(torch.autograd.Function):  # on the input: its Python backward runs after lora_linear's
        @staticmethod
        def forward(ctx, y):
            ctx.save_for_backward(y)
            return y * y

        @staticmethod
        def backward(ctx, grad):
            (y,) = ctx.saved_tensors
            return torch.mul(grad, y) * 2

    g = torch.Generator().manual_seed(0)
    tensors = [t.requires_grad_() for t in _inputs(g, (3,), 8, 6, 2, torch.float32)]
    x, rest = tensors[0], tensors[1:]
    expected = torch.autograd.grad(lora_linear(Square.apply(x), *rest).sum(), tensors)
    seen = Seen()
    with seen:
        out = lora_linear(Square.apply(x), *rest).sum()
        seen.names.clear()
        got = torch.autograd.grad(out, tensors)
        assert torch._C._len_torch_function_stack() == 1
    assert "mul" in seen.names and not {"matmul", "addmm_", "t", "reshape"} & set(seen.names), seen.names
    assert set(seen.depths) == {0}  # (a mode is off the stack while it handles a call)
    assert torch._C._len_torch_function_stack() == 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_shapes_and_dtypes_that_do_not_fit_are_refused():
    x, w, b, up, down = _inputs(torch.Generator().manual_seed(0), (2,), 6, 5, 3, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear(x, w, b, up.t(), down)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear(x[:, :4], w, b, up, down)
    with pytest.raises(ValueError, match="do not fit"):
        lora_linear(x, w, b[:3], up, down)
    with pytest.raises(ValueError, match="one dtype"):
        lora_linear(x, w.double(), b, up, down)


# ------------------------------------------------------------------------------------ the mode on models
def _adapted_linears(*, rank=4, bias=True, up_std=0.1, seed=0, **config):
    """A two-layer model with a LoRA (non-zero up) on both linears, and its handle."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 10, bias=bias), nn.GELU(), nn.Linear(10, 7))
    handle = sdadapt.inject(model, by_type(nn.Linear), sdadapt.LoRAConfig(rank=rank, init="gaussian", **config))
    for adapter in handle.modules.values():
        nn.init.normal_(adapter.lora_up, std=up_std)
    return model, handle


def _run(model, params, x, *, fused, autocast=False):
    """Output, input gradient, parameter gradients and dispatched aten ops of one forward and backward."""
    for p in [*params, x]:
        p.grad = None
    ops = AtenOps()
    with ops, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), fused_lora_linear(fused):
        y = model(x)
        (y.float() ** 2).sum().backward()
    return y.detach(), x.grad.clone(), [None if p.grad is None else p.grad.clone() for p in params], ops


def test_the_mode_gives_the_hook_paths_numbers_in_two_fewer_ops_per_layer():
    """Under the mode each adapted layer runs its delta inside the base GEMM (``addmm_``, forward and backward)
    and no add: the output and every gradient equal the hook path's (float32: to ~1e-6) in at least two aten
    ops fewer per layer, and outside the mode nothing changed."""
    model, handle = _adapted_linears()
    params = list(handle.parameters())
    x = torch.randn(3, 5, 12, requires_grad=True)
    hook = _run(model, params, x, fused=False)
    fused = _run(model, params, x, fused=True)
    torch.testing.assert_close(fused[0], hook[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[1], hook[1], rtol=1e-5, atol=1e-6)
    for a, b in zip(fused[2], hook[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert fused[3].counts["addmm_"] == 4 and hook[3].counts["addmm_"] == 0  # 2 layers × (forward, backward)
    assert "add" not in fused[3].launched and hook[3].counts["add"] >= 4
    assert hook[3].ops - fused[3].ops >= 2 * 2, (hook[3].launched, fused[3].launched)
    after = _run(model, params, x, fused=False)
    torch.testing.assert_close(after[0], hook[0], rtol=0, atol=0)


@settings(max_examples=30, deadline=None)
@given(lead=st.lists(st.integers(1, 3), min_size=1, max_size=3), in_f=st.integers(1, 10), out_f=st.integers(1, 10),
       rank=st.integers(1, 4), alpha=st.sampled_from([None, 1.0, 3.0]), bias=st.booleans(),
       strength=st.sampled_from([1.0, 0.5, -1.0]), autocast=st.booleans(), training=st.booleans(),
       seed=st.integers(0, 2**16))
def test_served_layers_match_the_hook_path(lead, in_f, out_f, rank, alpha, bias, strength, autocast, training, seed):
    """Any linear LoRA the mode serves (shapes, rank, alpha, a bias or none, a strength set on the handle, train or
    eval mode, float32 or under bf16 autocast): the output and the gradients of the input and both factors are
    the hook path's — float32 to ~1e-6, bf16 to its rounding."""
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f, bias=bias)
    model = nn.Sequential(layer)
    handle = sdadapt.inject(model, ["0"], sdadapt.LoRAConfig(rank=rank, alpha=alpha, init="gaussian"))
    nn.init.normal_(handle.modules["0"].lora_up, std=0.3)
    handle.set_scale(strength)
    model.train(training)
    params = list(handle.parameters())
    x = torch.randn(*lead, in_f, requires_grad=True)
    hook = _run(model, params, x, fused=False, autocast=autocast)
    fused = _run(model, params, x, fused=True, autocast=autocast)
    assert fused[3].counts["addmm_"] == 2 and fused[0].dtype == hook[0].dtype
    tol = 2e-2 if autocast else 1e-5
    for a, b in zip([fused[0], fused[1], *fused[2]], [hook[0], hook[1], *hook[2]]):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("autocast", [False, True])
def test_a_fresh_lora_leaves_the_base_output_bit_for_bit(autocast):
    """``up = 0`` (a fresh LoRA): the fused output is the base model's, bit for bit, in float32 and under bf16
    autocast (the in-place GEMM adds exact zeros)."""
    model, handle = _adapted_linears(up_std=0.0)
    x = torch.randn(2, 12)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), fused_lora_linear():
        fused = model(x)
    handle.disable()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        base = model(x)
    assert fused.dtype == base.dtype
    torch.testing.assert_close(fused, base, rtol=0, atol=0)


def _served(model, params, x, **kwargs) -> int:
    """How many layer calls the mode served (one forward and backward: two ``addmm_`` each)."""
    return _run(model, params, x, fused=True, **kwargs)[3].counts["addmm_"] // 2


def _same_as_hook_path(model, params, x, **kwargs):
    torch.manual_seed(5)
    hook = _run(model, params, x, fused=False, **kwargs)
    torch.manual_seed(5)
    fused = _run(model, params, x, fused=True, **kwargs)
    torch.testing.assert_close(fused[0], hook[0], rtol=0, atol=0)
    for a, b in zip(fused[2], hook[2]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["dropout", "rank_dropout", "module_dropout", "disabled", "merged", "first_hook",
                                  "global_hook", "subclass", "mixed_dtypes"])
def test_layers_it_cannot_serve_take_the_hook_path(case):
    """A layer whose output would differ from ``x Wᵀ + b + scale · (x downᵀ) upᵀ`` — training dropout of any
    kind, a disabled or merged adapter, a forward hook before the adapter's, a global forward hook, a Linear
    subclass with its own forward, float32 factors over a bf16 weight without autocast — is not served: the
    hook path's numbers bit for bit (q/k/v LoRAs batched into one down-projection: the next test)."""
    config = {key: 0.3 for key in ("dropout", "rank_dropout", "module_dropout") if key == case}
    if case == "subclass":
        class Scaled(nn.Linear):
            def forward(self, x):
                return super().forward(x) * 2

        torch.manual_seed(0)
        model = nn.Sequential(Scaled(12, 10), nn.GELU(), Scaled(10, 7))
        handle = sdadapt.inject(model, by_type(nn.Linear), sdadapt.LoRAConfig(rank=4, init="gaussian"))
        for adapter in handle.modules.values():
            nn.init.normal_(adapter.lora_up, std=0.1)
    else:
        model, handle = _adapted_linears(**config)
    model.train()
    params = list(handle.parameters())
    x = torch.randn(3, 12, requires_grad=True)
    cleanup = []
    if case == "disabled":
        handle.disable()
    elif case == "merged":
        handle.merge()
    elif case == "first_hook":  # (a hook before the adapter's sees the output without the delta)
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.register_forward_hook(lambda m, a, out: out * 1.5, prepend=True)
    elif case == "global_hook":
        cleanup.append(nn.modules.module.register_module_forward_hook(lambda m, a, out: None))
    elif case == "mixed_dtypes":
        model.bfloat16()
        for p in params:
            p.data = p.data.float()
        x = x.detach().bfloat16().requires_grad_(True)
    try:
        assert _served(model, params, x) == 0
        _same_as_hook_path(model, params, x)
    finally:
        for h in cleanup:
            h.remove()
    if case in ("disabled", "merged", "first_hook", "global_hook", "mixed_dtypes", "subclass"):
        return
    model.eval()  # (dropout is a training-time thing: in eval the layers are served)
    assert _served(model, params, x) == 2


def test_batched_qkv_loras_are_left_to_their_shared_projection():
    """On the toy UNet with q/k/v LoRAs batched (``batch_shared_input_adapters``) the mode serves only the
    layers outside the groups (out projections, feed-forward, time embedding), and the numbers are the hook
    path's to float32 rounding."""
    unet, handle = trained_toy_lora()
    sdadapt.batch_shared_input_adapters(handle)
    params = list(handle.parameters())
    grouped = sum(adapter._shared_input is not None for adapter in handle.modules.values())
    assert grouped > 0
    x = torch.randn(2, 12, 8, 8, requires_grad=True)
    t = torch.tensor([10, 700])
    c = torch.randn(2, 7, 64)

    def run(fused):
        for p in [*params, x]:
            p.grad = None
        ops = AtenOps()
        with fused_lora_linear(fused):
            with ops:  # (the forward's: one addmm_ per served call; backward's only where the input needs a gradient)
                y = unet(x, t, c)
            (y**2).sum().backward()
        return y.detach(), [None if p.grad is None else p.grad.clone() for p in params], ops.counts["addmm_"]

    hook = run(False)
    called = [a for a in handle.modules.values() if a.lora_up.grad is not None]  # (the toy's image_embedding: not)
    fused = run(True)
    assert fused[2] == sum(a._shared_input is None for a in called) == len(called) - grouped
    torch.testing.assert_close(fused[0], hook[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(fused[1], hook[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_a_call_with_the_weight_outside_the_layers_forward_runs_as_written():
    """``F.linear(x, layer.weight)`` called by other code (not the layer's forward, so no hook sees it), and
    ``layer.forward(x)`` called directly (no hook runs), are the plain call under the mode too; the layer's own
    call right after is served."""
    model, _ = _adapted_linears()
    layer = model[0]
    x = torch.randn(4, 12)
    with fused_lora_linear():
        direct = F.linear(x, layer.weight, layer.bias)
        forward_only = layer.forward(x)  # (no hook runs: the base output, as without the mode)
        through = layer(x)
    torch.testing.assert_close(direct, x @ layer.weight.t() + layer.bias, rtol=0, atol=0)
    torch.testing.assert_close(forward_only, direct, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(through, layer(x), rtol=1e-6, atol=1e-6)  # (the hook path, outside the mode)
    assert not torch.allclose(through, direct)


def test_two_adapters_on_one_layer_both_apply():
    """Two LoRAs on one layer: the first hook's is fused, the second's hook adds its delta as always."""
    model, first = _adapted_linears()
    second = sdadapt.inject(model, by_type(nn.Linear), sdadapt.LoRAConfig(rank=2, init="gaussian"), name="second")
    for adapter in second.modules.values():
        nn.init.normal_(adapter.lora_up, std=0.1)
    params = [*first.parameters(), *second.parameters()]
    x = torch.randn(3, 12, requires_grad=True)
    hook, fused = _run(model, params, x, fused=False), _run(model, params, x, fused=True)
    assert fused[3].counts["addmm_"] == 4
    torch.testing.assert_close(fused[0], hook[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(fused[2], hook[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _toy_step(*, fused: bool, mixed: str | None, checkpoint: str = "none", captured: bool = False, steps: int = 2):
    """Loss and LoRA gradients of the last of ``steps`` LoRA steps on the toy UNet (LoRA on every Linear,
    non-zero up factors)."""
    from sdadapt.training.step_capture import CapturedStep

    unet, handle = trained_toy_lora(checkpoint=checkpoint == "sdadapt")
    params = list(handle.parameters())
    opt = torch.optim.SGD(params, lr=1e-2)
    grads: list[torch.Tensor] = []
    opt.register_step_pre_hook(lambda *_: grads.__setitem__(slice(None), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]))
    g = torch.Generator().manual_seed(1)
    batch = {"latents": torch.randn(2, 12, 8, 8, generator=g), "cond": torch.randn(2, 7, 64, generator=g)}
    model = unet
    if checkpoint == "own":
        def model(x, t, c):
            return torch.utils.checkpoint.checkpoint(unet, x, t, c, use_reentrant=False)
    config = StepConfig(mixed_precision=mixed, fused_lora_linear=fused)
    ac, state = torch.linspace(0.999, 0.01, 1000), TrainState(seed=3)
    step = (CapturedStep(model, params=params, optimizer=opt, config=config, alphas_cumprod=ac) if captured else
            lambda b, state: train_step(model, b, params=params, optimizer=opt, state=state, config=config,
                                        alphas_cumprod=ac))
    for _ in range(steps):
        out = step(batch, state=state)
    return float(out["loss"]), torch.cat([x.flatten() for x in grads])


def test_the_step_with_the_option_keeps_its_numbers():
    """Two float32 LoRA steps on the toy UNet: the loss and every LoRA gradient equal the hook path's to
    float32 rounding; under bf16 autocast both paths are as close to the float32 step (the fused one no farther)."""
    loss, grads = _toy_step(fused=False, mixed=None)
    loss_f, grads_f = _toy_step(fused=True, mixed=None)
    assert abs(loss_f - loss) <= 1e-6 * abs(loss)
    torch.testing.assert_close(grads_f, grads, rtol=1e-4, atol=1e-6 * float(grads.abs().max()))
    loss16, grads16 = _toy_step(fused=False, mixed="bf16")
    loss16_f, grads16_f = _toy_step(fused=True, mixed="bf16")
    error, error_f = (float((g - grads).norm() / grads.norm()) for g in (grads16, grads16_f))
    assert 0 < error_f <= 1.25 * error + 1e-3, (error_f, error)
    assert abs(loss16_f - loss) <= 1.25 * abs(loss16 - loss) + 1e-3 * abs(loss)


@pytest.mark.parametrize("checkpoint", ["sdadapt", "own"])
@pytest.mark.parametrize("captured", [False, True])
def test_checkpointed_blocks_recompute_on_the_fused_path(checkpoint, captured):
    """``enable_checkpointing``'s recompute (re-entering the mode) and a model's own checkpoint (the step's
    backward started inside the mode) take the fused path their forward took: the gradients of the step
    without checkpointing, bit for bit (torch refuses a recompute that saves other tensors)."""
    plain = _toy_step(fused=True, mixed="bf16", steps=1)[1]
    torch.testing.assert_close(_toy_step(fused=True, mixed="bf16", steps=1, checkpoint=checkpoint, captured=captured)[1],
                               plain, rtol=0, atol=0)


def test_your_own_backward_outside_the_context_recomputes_checkpointed_blocks_fused():
    """A loop that calls ``backward()`` after leaving the context: ``enable_checkpointing`` re-enters the mode
    for its recomputes, so they match the forward (the gradients of the un-checkpointed model bit for bit)."""

    def grads(checkpoint):
        unet, handle = trained_toy_lora(checkpoint=checkpoint)
        unet.train()
        x = torch.randn(2, 12, 8, 8, generator=torch.Generator().manual_seed(2))
        with fused_lora_linear():
            loss = unet(x, torch.tensor([3, 400]), torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3)))
        loss.pow(2).mean().backward()
        return torch.cat([p.grad.flatten() for p in handle.parameters() if p.grad is not None])

    torch.testing.assert_close(grads(True), grads(False), rtol=0, atol=0)


def test_a_compiled_model_traces_through_the_mode():
    """Under ``torch.compile`` the mode leaves the calls alone (Inductor fuses the graph itself): no graph
    break, and the hook path's numbers."""
    from torch._dynamo.utils import counters

    model, _ = _adapted_linears()
    x = torch.randn(3, 12)
    with torch.no_grad():
        expected = model(x)
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = torch.compile(model, backend="eager")
        with torch.no_grad(), fused_lora_linear():
            out = compiled(x)
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_captured_fused_steps_match_eager_fused_steps():
    """Three bf16 LoRA steps of the toy UNet with the option as CUDA-graph replays and as eager steps: the same
    losses and LoRA factors (to bf16 kernel-choice noise)."""
    from sdadapt.training.step_capture import CapturedStep

    def run(captured):
        unet, handle = trained_toy_lora(device="cuda")
        params = list(handle.parameters())
        opt = torch.optim.AdamW(params, lr=torch.tensor(1e-3, device="cuda"), capturable=True)
        g = torch.Generator().manual_seed(1)
        batch = {"latents": torch.randn(2, 12, 8, 8, generator=g).cuda(), "cond": torch.randn(2, 7, 64, generator=g).cuda()}
        config = StepConfig(mixed_precision="bf16", fused_lora_linear=True, half_precision_norms=True)
        ac, state = torch.linspace(0.999, 0.01, 1000, device="cuda"), TrainState(seed=3, device="cuda")
        if captured:
            step = CapturedStep(unet, params=params, optimizer=opt, config=config, alphas_cumprod=ac, strict=True)
            losses = [float(step(batch, state=state)["loss"]) for _ in range(3)]
        else:
            losses = [float(train_step(unet, batch, params=params, optimizer=opt, state=state, config=config,
                                       alphas_cumprod=ac)["loss"]) for _ in range(3)]
        return losses, torch.cat([p.detach().flatten() for p in params])

    (eager_losses, eager), (captured_losses, captured) = run(False), run(True)
    assert captured_losses == pytest.approx(eager_losses, rel=2e-2)
    torch.testing.assert_close(captured, eager, rtol=2e-2, atol=2e-3)


def test_step_config_default_is_off():
    assert StepConfig().fused_lora_linear is False
    assert StepConfig(fused_lora_linear=True).fused_lora_linear


def test_train_fused_lora_linear_reaches_the_step(tmp_path, monkeypatch):
    """``train --fused-lora-linear`` (TOML ``fused_lora_linear``) runs every step under the mode; without it the
    step's context is the no-op one."""
    from train_inputs import read_train_toml

    from sdadapt.cli import main
    from sdadapt.images import write_png
    from sdadapt.training import step as step_module

    options, _, notes = read_train_toml(tmp_path / "train.toml", "fused_lora_linear = true\n")
    assert options == {"fused_lora_linear": True} and not notes
    seen = []

    def spy(enabled=True):
        seen.append(enabled)
        return fused_lora_linear(enabled)

    monkeypatch.setattr(step_module, "fused_lora_linear", spy)
    images = tmp_path / "imgs"
    images.mkdir()
    write_png(images / "a.png", torch.zeros(3, 32, 32))
    (images / "a.txt").write_text("a red circle")
    args = ["train", "lora", "--images", str(images), "--model", "toy", "--steps", "2", "--batch-size", "1", "--no-prior"]
    assert main([*args, "--fused-lora-linear", "-o", str(tmp_path / "f.safetensors")]) == 0
    assert seen and set(seen) == {True}
    seen.clear()
    assert main([*args, "-o", str(tmp_path / "p.safetensors")]) == 0
    assert seen and set(seen) == {False}


def test_docs_example_runs():
    """docs/training.md's fused LoRA example: the step's LoRA gradients with and without the option agree to
    float32 rounding, and the own-loop layer trains through the fused function."""
    from docs_pages import run_block_with

    namespace = run_block_with("training.md", "fused_lora_linear()")
    assert 0 <= namespace["difference"] < 1e-4 and torch.isfinite(namespace["metrics"]["loss"])
    assert namespace["y"].shape == (5, 32) and namespace["x"].grad is not None
    assert all(p.grad is not None for p in namespace["lora"].parameters())


def test_lora_docs_example_runs():
    """docs/lora.md's fused example: the same outputs as the hooks."""
    from docs_pages import run_block_with

    namespace = run_block_with("lora.md", "fused_lora_linear()")
    assert namespace["fused"].shape == (3, 4)
