"""One cast of every trained LoRA factor per step (sdadapt.adapters.weight_casts): bit for bit the
per-layer autocast casts it replaces, in the forward, the loss and every gradient; fewer casts."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import sdadapt
from sdadapt.adapters.weight_casts import batched_weight_casts, cast_weight
from sdadapt.targets import by_type


class _Net(nn.Module):
    """bf16 base layers (as a lean LoRA run's frozen UNet), a conv then two linears and one more
    linear that ``forward`` skips unless asked (an adapter whose layer does not run)."""

    def __init__(self, width: int, *, checkpointed: str | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, padding=1)
        self.first = nn.Linear(width, width)
        self.second = nn.Linear(width, 5)
        self.unused = nn.Linear(width, width)
        self.checkpointed = checkpointed

    def _tail(self, h: torch.Tensor) -> torch.Tensor:
        return self.second(torch.nn.functional.gelu(self.first(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x).mean((2, 3))  # (B, width)
        if self.checkpointed is None:
            return self._tail(h)
        return checkpoint(self._tail, h, use_reentrant=self.checkpointed == "reentrant")


def _model(width: int, rank: int, seed: int, *, bf16_scales: bool = False,
           **kwargs) -> tuple[nn.Module, list[nn.Parameter]]:
    """The base in bf16, then float32 LoRA factors injected (inject's default), at alpha ≠ rank so the
    scale folded into the up factors' copies is not 1; ``bf16_scales``: the whole model cast to bf16
    after injection (the scale buffers too), the factors made float32 again."""
    torch.manual_seed(seed)
    net = _Net(width, **kwargs)
    if not bf16_scales:
        net.to(torch.bfloat16)
    handle = sdadapt.inject(net, by_type(nn.Linear, nn.Conv2d), sdadapt.LoRAConfig(rank=rank, alpha=0.7 * rank + 0.4))
    if bf16_scales:
        net.to(torch.bfloat16)
    g = torch.Generator().manual_seed(seed + 1)
    params = list(handle.parameters())
    with torch.no_grad():
        for p in params:
            p.data = (torch.randn(p.shape, generator=g) * 0.3).float()  # (float32 factors, bf16 base)
    return net, params


def _loss_and_grads(net: nn.Module, params: list[nn.Parameter], x: torch.Tensor, batched: bool):
    for p in params:
        p.grad = None
    device = x.device.type
    with torch.autocast(device, dtype=torch.bfloat16), batched_weight_casts(params if batched else [], device):
        out = net(x)
    loss = out.float().square().mean()
    loss.backward()
    return loss.detach(), [None if p.grad is None else p.grad.clone() for p in params]


def _assert_same(a, b) -> None:
    assert torch.equal(a[0], b[0])
    for ga, gb in zip(a[1], b[1]):
        assert (ga is None) == (gb is None)
        if ga is not None:
            assert ga.dtype == gb.dtype == torch.float32 and torch.equal(ga, gb)


@settings(max_examples=12, deadline=None)
@given(width=st.integers(2, 24), rank=st.integers(1, 6), batch=st.integers(1, 3), seed=st.integers(0, 2**16),
       bf16_scales=st.booleans())
def test_the_loss_and_every_gradient_equal_the_per_layer_casts_bit_for_bit(width, rank, batch, seed, bf16_scales):
    net, params = _model(width, rank, seed, bf16_scales=bf16_scales)
    x = torch.randn(batch, 3, 4, 4, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)
    _assert_same(_loss_and_grads(net, params, x, False), _loss_and_grads(net, params, x, True))


def test_an_adapter_whose_layer_does_not_run_keeps_no_gradient():
    net, params = _model(8, 2, seed=0)
    x = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    _, grads = _loss_and_grads(net, params, x, True)
    unused = {id(p) for n, p in net.named_parameters() if "unused" in n and p.dtype == torch.float32}
    assert len(unused) == 2 and all((g is None) == (id(p) in unused) for p, g in zip(params, grads))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_the_loss_and_every_gradient_equal_the_per_layer_casts_bit_for_bit():
    """CUDA autocast's casts and kernels: the same bits with the copies made together."""
    net, params = _model(32, 4, seed=9)
    net.cuda()
    x = torch.randn(4, 3, 8, 8).to(torch.bfloat16).cuda()
    _assert_same(_loss_and_grads(net, params, x, False), _loss_and_grads(net, params, x, True))


@pytest.mark.parametrize("kind", ["non-reentrant", "reentrant"])
def test_checkpointed_layers_get_the_same_gradients(kind):
    """A recomputed block (torch.utils.checkpoint) reads the copies again (reentrant: inside backward,
    where the context is closed, autocast casts the weights again): the same numbers either way."""
    net, params = _model(12, 3, seed=4, checkpointed=kind)
    x = torch.randn(3, 3, 4, 4).to(torch.bfloat16).requires_grad_(kind == "reentrant")
    _assert_same(_loss_and_grads(net, params, x, False), _loss_and_grads(net, params, x, True))


class _Casts(TorchDispatchMode):
    """Counts casts (``count``) and multiplies (``muls``)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.muls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.count += 1
        if func.overloadpacket is torch.ops.aten.mul:
            self.muls += 1
        return func(*args, **(kwargs or {}))


def test_the_factors_are_cast_twice_per_step_instead_of_twice_each():
    net, params = _model(8, 2, seed=1)
    x = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    counts, muls = [], []
    for batched in (False, True):
        with _Casts() as casts:
            _loss_and_grads(net, params, x, batched)
        counts.append(casts.count)
        muls.append(casts.muls)
    read = sum(1 for n, p in net.named_parameters() if p.dtype == torch.float32 and "unused" not in n)
    assert read == 6 and counts[0] - counts[1] == 2 * read - 2  # (forward and backward: n casts each -> 1 each)
    assert muls[0] - muls[1] == 2 * 3 - 2  # (each layer's scale · up and its backward -> one multiply each way)


def test_outside_the_context_and_for_other_tensors_the_weight_itself_is_read():
    """Inside: a down factor's copy is its bf16 cast, an up factor's is ``bf16(up · scale)`` (read through
    ``cast_scaled_weight`` only); outside, or for a tensor no adapter marked, the weight (times the scale)."""
    from sdadapt.adapters.lora import LoRAModule
    from sdadapt.adapters.weight_casts import cast_scaled_weight

    net, params = _model(4, 1, seed=2)
    modules = [m for m in net.modules() if isinstance(m, LoRAModule)]
    assert all(cast_weight(p) is p for p in params)
    assert all(torch.equal(cast_scaled_weight(m.lora_up, m.scale), m.lora_up * m.scale) for m in modules)
    other = nn.Parameter(torch.zeros(3, 3))  # (not an adapter's: never batched)
    with torch.autocast("cpu", dtype=torch.bfloat16), batched_weight_casts(params + [other], "cpu"):
        assert cast_weight(other) is other
        downs = [cast_weight(m.lora_down) for m in modules]
        ups = [cast_scaled_weight(m.lora_up, m.scale) for m in modules]
        assert all(cast_weight(m.lora_up) is m.lora_up for m in modules)  # (an up factor's copy carries its scale)
    assert all(float(m.scale) != 1 for m in modules)
    bf16 = torch.bfloat16
    assert all(d.dtype == bf16 and torch.equal(d, m.lora_down.to(bf16)) for d, m in zip(downs, modules))
    assert all(u.dtype == bf16 and torch.equal(u, (m.lora_up * m.scale).to(bf16)) for u, m in zip(ups, modules))
    with batched_weight_casts(params, "cpu"):  # autocast off: nothing to cast to
        assert all(cast_weight(p) is p for p in params)


def test_the_captured_steps_graph_walk_counts_only_the_copies_read():
    """CapturedStep owns the gradients of the parameters the backward reaches: through the batched cast
    that is the weights whose copy the forward read, not every weight cast (an unrun layer's adapter
    stays unstepped, as in eager steps)."""
    from sdadapt.training.step_capture import _reached

    net, params = _model(6, 2, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16), batched_weight_casts(params, "cpu"):
        loss = net(torch.randn(2, 3, 4, 4).to(torch.bfloat16)).float().sum()
    unused = {id(p) for n, p in net.named_parameters() if "unused" in n and p.dtype == torch.float32}
    assert len(unused) == 2 and _reached(loss) & {id(p) for p in params} == {id(p) for p in params} - unused


def test_train_step_casts_together_and_matches_the_per_layer_casts():
    """``train_step`` (bf16 mixed precision) passes its parameters to ``step_loss``: its loss and
    gradients equal a step whose forward casts layer by layer."""
    from sdadapt.training.step import (
        StepConfig,
        TrainState,
        prepare_batch,
        step_loss,
        train_step,
    )

    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Conv2d(4, 8, 3, padding=1)
            self.outer = nn.Conv2d(8, 4, 1)

        def forward(self, x, t, cond):
            return self.outer(torch.nn.functional.silu(self.inner(x))) + cond.view(-1, 1, 1, 1)

    torch.manual_seed(0)
    net = Denoiser()
    handle = sdadapt.inject(net, by_type(nn.Conv2d), sdadapt.LoRAConfig(rank=2, init="gaussian"))
    net.to(torch.bfloat16)
    params = list(handle.parameters())
    for p in params:
        p.data = torch.randn(p.shape) * 0.2
    batch = {"latents": torch.randn(2, 4, 6, 6).to(torch.bfloat16), "cond": torch.randn(2)}
    config = StepConfig(mixed_precision="bf16", max_grad_norm=None)
    alphas = torch.linspace(0.999, 0.01, 100)
    prepared = prepare_batch(batch, state=TrainState(seed=7), config=config, alphas_cumprod=alphas)
    reference = step_loss(lambda x, t, c: net(x, t, c), prepared, config)
    reference.backward()
    expected = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    optimizer = torch.optim.SGD(params, lr=0.0)
    with _Casts() as casts:
        out = train_step(lambda x, t, c: net(x, t, c), batch, params=params, optimizer=optimizer,
                         state=TrainState(seed=7), config=dataclass_replace(config, accumulation_steps=2),
                         alphas_cumprod=alphas)
    assert torch.equal(out["loss"], reference.detach())
    assert all(torch.equal(p.grad * 2, g) for p, g in zip(params, expected))  # (loss / accumulation_steps: exact)
    assert casts.count <= 8  # (2 batched casts + the inputs' and the loss's, not 2 per factor on top)


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_a_weight_listed_twice_is_cast_once_and_gets_its_gradient_once():
    net, params = _model(8, 2, seed=6)
    x = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    once = _loss_and_grads(net, params, x, True)
    for p in params:
        p.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16), batched_weight_casts(params + params[:3], "cpu"):
        loss = net(x).float().square().mean()
    loss.backward()
    _assert_same(once, (loss.detach(), [p.grad for p in params]))


def test_the_batched_qkv_projection_reads_the_copies_of_the_up_factors():
    """``batch_shared_input_adapters``' path takes each member's up factor through ``cast_weight`` too:
    under autocast the same loss and gradients with the copies made together, and the up factors no
    longer cast one by one."""
    from test_shared_input_lora import _qkv_with_lora

    model = _qkv_with_lora((2, 3, 2), seed=4, alpha=1.7)
    for layer in (model.to_q, model.to_k, model.to_v):  # (a bf16 base; float32 factors and scales)
        layer.weight.data, layer.bias.data = layer.weight.data.bfloat16(), layer.bias.data.bfloat16()
    params = [p for n, p in model.named_parameters() if "lora" in n]
    sdadapt.batch_shared_input_adapters(model)
    x = torch.randn(2, 5, 6).to(torch.bfloat16)

    def run(batched: bool):
        for p in params:
            p.grad = None
        with _Casts() as casts:
            with torch.autocast("cpu", dtype=torch.bfloat16), batched_weight_casts(params if batched else [], "cpu"):
                out = model(x)
            loss = sum(v.float().square().sum() for v in out.values())
            loss.backward()
        return (loss.detach(), [p.grad.clone() for p in params]), casts.count

    (plain, plain_casts), (together, together_casts) = run(False), run(True)
    _assert_same(plain, together)
    # (the three up factors a cast each way each, the group's concatenated downs one each way: now 1 + 1 for all)
    assert plain_casts - together_casts == 2 * 3 + 2 - 2


@pytest.mark.parametrize("how", ["pickled", "deepcopy"])
def test_a_copied_model_pickles_and_gives_the_same_numbers(how):
    """The scale a weight's copy is made with is found through a registry, not an attribute of the
    weight (a weak reference there made every LoRA-injected model unpicklable: ``torch.save(model)``
    raised). A copy of the model — unpickled or deep-copied — is not registered: its up factors take
    the per-layer path, with the same numbers."""
    import copy
    import io

    net, _ = _model(10, 3, seed=8)
    params = [p for _, p in net.named_parameters() if p.dtype == torch.float32]  # (the twin's order)
    if how == "pickled":
        buffer = io.BytesIO()
        torch.save(net, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    else:
        twin = copy.deepcopy(net)
    twin_params = [p for n, p in twin.named_parameters() if p.dtype == torch.float32]
    assert len(twin_params) == len(params)
    x = torch.randn(2, 3, 4, 4).to(torch.bfloat16)
    reference = _loss_and_grads(net, params, x, False)
    _assert_same(reference, _loss_and_grads(twin, twin_params, x, True))
    _assert_same(reference, _loss_and_grads(net, params, x, True))
