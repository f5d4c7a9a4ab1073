"""One down-projection for LoRA adapters that share an input (q/k/v): exact, reversible, safe.

References: a float64 q/k/v LoRA written here; the unbatched path of the same adapters (outputs
and gradients of down, up and the input); a tiny diffusers UNet with LoRA on attn1/attn2.
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import sdadapt
from sdadapt.adapters.shared_input import SharedInputBatching, batch_shared_input_adapters
from sdadapt.formats import save_lora
from sdadapt.training.grad_checkpointing import UNET_BLOCKS, enable_checkpointing

from tiny_models import tiny_clip, tiny_unet_sd1, unet_inputs

# float32: the matmuls' summation order; bf16 (8-bit mantissa): each sum of products rounds at the
# scale of its largest terms, so the absolute tolerance is relative to the tensor's largest entry
# bf16: the batched and the unbatched path round their intermediate sums in another order; a bf16 ulp is
# 1.6e-2 at magnitudes 2-4, which the rank-r products and the gradient sums reach here, so two or three ulps
# apart (hypothesis found 0.041 at ranks (4, 2, 4), bf16) is rounding, not a wrong formula (which float32 and
# the float64 reference catch at 1e-5)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=5e-2)}


class QKV(nn.Module):
    """An attention's three projections: self-attention reads ``x`` thrice, cross-attention
    reads ``x`` for q and ``context`` for k and v (diffusers' order: q, then k, then v)."""

    def __init__(self, dim: int = 6, outs: tuple[int, int, int] = (5, 4, 3), *, dtype=torch.float32) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, outs[0], dtype=dtype)
        self.to_k = nn.Linear(dim, outs[1], dtype=dtype)
        self.to_v = nn.Linear(dim, outs[2], dtype=dtype)

    def forward(self, x, context=None, *, order=("to_q", "to_k", "to_v")):
        inputs = {"to_q": x, "to_k": x if context is None else context, "to_v": x if context is None else context}
        return {name if order.count(name) == 1 else f"{i}:{name}": getattr(self, name)(inputs[name]) for i, name in enumerate(order)}


def _qkv_with_lora(ranks, *, alpha=1.0, dtype=torch.float32, seed=0, **module) -> QKV:
    torch.manual_seed(seed)
    model = QKV(dtype=dtype, **module)
    for layer, rank in zip(("to_q", "to_k", "to_v"), ranks):
        handle = sdadapt.inject(model, [layer], sdadapt.LoRAConfig(rank=rank, alpha=alpha), dtype=None)
        for p in handle.parameters():
            nn.init.normal_(p, std=0.5)
    return model


def _reference(model: QKV, x: Tensor, context=None):
    """float64 outputs and gradients (LoRA down/up, x, context) of the loss :func:`_run` uses:
    y = W x + b + (alpha / r) · multiplier · B (A x) per projection."""
    with torch.enable_grad():
        return _reference_under_grad(model, x, context)


def _reference_under_grad(model: QKV, x: Tensor, context=None):
    xs = x.detach().double().requires_grad_(True)
    cs = None if context is None else context.detach().double().requires_grad_(True)
    out, params = {}, {}
    for name in ("to_q", "to_k", "to_v"):
        layer = getattr(model, name)
        lora = layer.sdadapt["default"]
        inp = xs if cs is None or name == "to_q" else cs
        w, b = layer.weight.detach().double(), layer.bias.detach().double()
        down = params[f"{name}.sdadapt.default.lora_down"] = lora.lora_down.detach().double().requires_grad_(True)
        up = params[f"{name}.sdadapt.default.lora_up"] = lora.lora_up.detach().double().requires_grad_(True)
        scale = float(lora.alpha) / lora.rank * lora.multiplier
        out[name] = inp @ w.T + b + scale * (inp @ down.T) @ up.T
    g = torch.Generator().manual_seed(7)
    sum((y * torch.randn(y.shape, generator=g).double()).sum() for y in out.values()).backward()
    grads = {n: p.grad for n, p in params.items()}
    return {n: y.detach() for n, y in out.items()}, grads, xs.grad, None if cs is None else cs.grad


def _lora_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if ".sdadapt." in f".{n}"}


def _run(model: nn.Module, x: Tensor, context=None, **kwargs):
    """Outputs, LoRA grads and input grads of sum(y · fixed random weights)."""
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    ctx = None if context is None else context.detach().clone().requires_grad_(True)
    out = model(x, ctx, **kwargs)
    g = torch.Generator().manual_seed(7)
    loss = sum((y.float() * torch.randn(y.shape, generator=g).to(y.device)).sum() for y in out.values())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in _lora_params(model).items() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads, x.grad, None if ctx is None else ctx.grad


def _assert_close(a, b, dtype):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_close(a[key], b[key], dtype)
    elif a is None:
        assert b is None
    else:
        tol = dict(TOLERANCE[dtype])
        # (atol relative to the tensor's largest entry, as the float64 check below: another summation order moves
        # an element that cancels by a few float32 ulps of the largest one — CI saw 1.8e-6 on a gradient whose
        # entries reach ~10, where this process and matmul kernel gave 1e-7)
        tol["atol"] *= max(1.0, b.abs().max().item())
        torch.testing.assert_close(a.float(), b.float(), **tol)


# ---------------------------------------------------------------------------- the math


@settings(max_examples=25, deadline=None)
@example(ranks=(4, 2, 4), batch=1, seq=2, cross=True, alpha=3.0, dtype=torch.bfloat16)  # 0.041 apart (see TOLERANCE)
@example(ranks=(3, 1, 3), batch=3, seq=2, cross=True, alpha=3.0, dtype=torch.float32)  # 1.8e-6 apart in one CI worker
@given(
    ranks=st.tuples(*[st.integers(1, 5)] * 3),
    batch=st.integers(1, 3),
    seq=st.integers(1, 4),
    cross=st.booleans(),
    alpha=st.sampled_from([1.0, 3.0, 0.7]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_batched_equals_unbatched_and_the_float64_reference(ranks, batch, seq, cross, alpha, dtype):
    model = _qkv_with_lora(ranks, alpha=alpha, dtype=dtype)
    x = torch.randn(batch, seq, 6, dtype=dtype)
    context = torch.randn(batch, seq + 1, 6, dtype=dtype) if cross else None
    plain = _run(model, x, context)
    batching = batch_shared_input_adapters(model)
    batched = _run(model, x, context)
    again = _run(model, x, context)  # after a cross-attention split too
    batching.remove()
    for result in (batched, again):
        for a, b in zip(plain, result):
            _assert_close(a, b, dtype)
    stats = batching.stats()
    assert stats["waiting"] == 0
    assert stats["splits"] == int(cross)  # q learned to stand apart from k/v once
    # cross: q makes a projection for all, k finds it made on another tensor (split) and makes
    # one for k/v, v takes its slice; then q runs alone and k/v share one
    assert stats["served"] == (3 + 2 if cross else 3 + 3)
    # against float64: each tensor within a fraction of its largest entry (bf16 rounds every op)
    reference = _reference(model, x, context)
    for ours, exact in zip(batched, reference):
        for key in ours if isinstance(ours, dict) else ([None] if ours is not None else []):
            a, b = (ours[key], exact[key]) if key is not None else (ours, exact)
            bound = (1e-5 if dtype == torch.float32 else 3e-2) * max(1.0, b.abs().max().item())
            torch.testing.assert_close(a.double(), b, rtol=0, atol=bound, msg=lambda m, key=key: f"{key}: {m}")


def test_one_matmul_serves_the_group():
    model = _qkv_with_lora((2, 3, 4), alpha=1.0)  # scales 1/2, 1/3, 1/4: not exact in bf16
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        plain = model(x)
    batching = batch_shared_input_adapters(model)
    (group,) = batching.groups
    assert group.subsets == [("to_q:default", "to_k:default", "to_v:default")]
    with torch.no_grad():
        batched = model(x)
    assert group.served == 3 and group.fallbacks == 0
    for name in plain:
        torch.testing.assert_close(batched[name], plain[name], rtol=1e-6, atol=1e-6)


def test_autocast_gives_the_unbatched_dtypes():
    model = _qkv_with_lora((2, 3, 4))
    x = torch.randn(2, 3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = _run(model, x)
        batching = batch_shared_input_adapters(model)
        batched = _run(model, x)
    batching.remove()
    for name in plain[0]:
        assert batched[0][name].dtype == plain[0][name].dtype == torch.bfloat16
    for a, b in zip(plain, batched):
        _assert_close(a, b, torch.bfloat16)
    assert all(g.dtype == torch.float32 for g in batched[1].values())


# ---------------------------------------------------------------------------- safety: other call patterns


@pytest.mark.parametrize(
    ("order", "splits"),
    [(("to_v", "to_k", "to_q"), 0), (("to_q", "to_q", "to_k", "to_v", "to_v"), 0), (("to_k", "to_v"), 1)],
    ids=["reversed", "called-twice", "q-never-called"],
)
def test_other_call_orders_fall_back_exactly(order, splits):
    model = _qkv_with_lora((2, 3, 1))
    x = torch.randn(2, 4, 6)
    plain = _run(model, x, order=order)
    batching = batch_shared_input_adapters(model)
    first = _run(model, x, order=order)
    # a member never called got a slice once (its down then has a zero gradient, not None)
    for name in set(first[1]) - set(plain[1]):
        assert name.startswith("to_q.") and not first[1].pop(name).any()
    for run in (first, _run(model, x, order=order)):
        for a, b in zip(plain, run):
            _assert_close(a, b, torch.float32)
    assert batching.stats()["waiting"] == 0
    assert batching.stats()["splits"] == splits


def test_a_base_layer_called_by_other_code_in_between():
    model = _qkv_with_lora((2, 3, 4))
    other = torch.randn(2, 4, 6)

    class Meddling(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            x = x * 1.0  # a fresh tensor this module changes in place
            q = self.inner.to_q(x)
            side = self.inner.to_k(other)  # someone else calls to_k in between
            x.add_(0.5)  # the next calls see other values in the same tensor
            return {"q": q, "side": side, "k": self.inner.to_k(x), "v": self.inner.to_v(x)}

    wrapped = Meddling(model)
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        plain = wrapped(x)
        batching = batch_shared_input_adapters(model)
        for _ in range(2):
            _assert_close(plain, wrapped(x), torch.float32)
    assert batching.stats()["waiting"] == 0


def test_an_input_changed_in_place_between_calls_is_projected_again():
    model = _qkv_with_lora((2, 3, 4))

    class InPlace(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            x = x * 1.0
            q = self.inner.to_q(x)  # makes the slices of k and v from x as it is now
            x.mul_(-2.0)  # same tensor object, other values
            return {"q": q, "k": self.inner.to_k(x), "v": self.inner.to_v(x)}

    wrapped = InPlace(model)
    x = torch.randn(2, 4, 6)
    with torch.no_grad():
        plain = wrapped(x)
        batching = batch_shared_input_adapters(model)
        _assert_close(plain, wrapped(x), torch.float32)
    assert batching.stats()["served"] == 3 and batching.stats()["splits"] == 0  # k made a fresh one, v took it


def test_cross_attention_without_a_flag_learns_that_q_reads_another_tensor():
    model = _qkv_with_lora((2, 3, 4))
    batching = batch_shared_input_adapters(model)
    (group,) = batching.groups
    x, context = torch.randn(2, 3, 6), torch.randn(2, 5, 6)
    with torch.no_grad():
        model(x, context)
    assert group.subsets == [("to_q:default",), ("to_k:default", "to_v:default")]
    served, fallbacks = group.served, group.fallbacks
    with torch.no_grad():
        model(x, context)
    assert (group.served - served, group.fallbacks - fallbacks, group.splits) == (2, 1, 1)


def test_dropout_merge_and_disable_fall_back_per_member():
    torch.manual_seed(0)
    model = QKV()
    handle = sdadapt.inject(model, ["to_q", "to_k", "to_v"], sdadapt.LoRAConfig(rank=2, dropout=0.5))
    for p in handle.parameters():
        nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        model.eval()
        expected = model(x)
        base = {n: nn.functional.linear(x, getattr(model, n).weight, getattr(model, n).bias) for n in expected}
        batching = batch_shared_input_adapters(handle)
        model.train()
        model(x)  # dropout acts in training: every member runs its own path
        assert batching.stats()["served"] == 0 and batching.stats()["fallbacks"] == 3
        model.eval()
        _assert_close(expected, model(x), torch.float32)
        assert batching.stats()["served"] == 3
        handle.merge()  # merged: the hooks return before asking the group
        _assert_close(expected, model(x), torch.float32)
        handle.unmerge()
        handle.modules["to_k"].enabled = False  # one member off: the others still share
        out = model(x)
        assert torch.equal(out["to_k"], base["to_k"])
        _assert_close({n: expected[n] for n in ("to_q", "to_v")}, {n: out[n] for n in ("to_q", "to_v")}, torch.float32)
        assert batching.stats()["served"] == 5 and batching.stats()["waiting"] == 0


def test_members_of_different_dtypes_run_their_own_paths():
    model = _qkv_with_lora((2, 3, 4))
    model.to_k.sdadapt["default"].double()  # one adapter computes in float64
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        plain = model(x)
        batching = batch_shared_input_adapters(model)
        _assert_close(plain, model(x), torch.float32)
    assert batching.stats()["served"] == 0 and batching.stats()["fallbacks"] == 3


# ---------------------------------------------------------------------------- reversibility, memory, files


def _without_date(path) -> tuple[dict, bytes]:
    """A safetensors file's header (its ``modelspec.date`` left out) and its data bytes."""
    raw = path.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    assert header["__metadata__"].pop("modelspec.date")
    return header, raw[8 + size:]


def test_remove_restores_the_per_adapter_path_and_keys(tmp_path):
    model = _qkv_with_lora((2, 3, 4))
    keys = list(model.state_dict())
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        before = model(x)
    (tmp_path / "before").mkdir()
    (tmp_path / "during").mkdir()
    save_lora(tmp_path / "before" / "lora.safetensors", {"unet": _canonical(model)})
    batching = batch_shared_input_adapters(model)
    with pytest.raises(ValueError, match="already batched"):
        batch_shared_input_adapters(model)
    assert list(model.state_dict()) == keys
    save_lora(tmp_path / "during" / "lora.safetensors", {"unet": _canonical(model)})
    # the same file, but for the save time kohya's modelspec.date records (whole seconds: two saves may straddle one)
    assert _without_date(tmp_path / "before" / "lora.safetensors") == _without_date(tmp_path / "during" / "lora.safetensors")
    batching.remove()
    batching.remove()  # idempotent
    assert all(m._shared_input is None for m in model.modules() if isinstance(m, sdadapt.LoRAModule))
    assert not any(m._forward_hooks for m in [model])  # the parent's end-of-call hook is gone
    with torch.no_grad():
        after = model(x)
    for name in before:
        assert torch.equal(before[name], after[name])
    assert isinstance(batch_shared_input_adapters(model), SharedInputBatching)  # can group again


def _canonical(model: nn.Module) -> dict[str, Tensor]:
    state = {}
    for name, module in model.named_modules():
        slot = module._modules.get("sdadapt")
        if slot is not None:
            for key, value in slot["default"].file_tensors().items():
                state[f"{name}.{key}"] = value.detach()
    return state


@pytest.mark.parametrize("grad", [False, True])
def test_no_activation_outlives_the_attention_call(grad):
    model = _qkv_with_lora((2, 3, 4))
    batching = batch_shared_input_adapters(model)
    x = torch.randn(2, 3, 6, requires_grad=grad)
    ref = weakref.ref(x)
    with torch.set_grad_enabled(grad):
        out = model(x, order=("to_q", "to_k"))  # to_v's slice is computed and never taken
    assert batching.stats() == {"served": 2, "fallbacks": 0, "splits": 1, "waiting": 0}  # v left the group
    del x, out
    gc.collect()
    assert ref() is None
    # called outside the parent (no end-of-call hook): the weak reference drops the slices
    x = torch.randn(2, 3, 6)
    ref = weakref.ref(x)
    with torch.no_grad():
        model.to_q(x)
    assert batching.stats()["waiting"] == 1  # to_k's slice
    del x
    assert ref() is None and batching.stats()["waiting"] == 0


# ---------------------------------------------------------------------------- a diffusers UNet


def _unet_with_lora(seed=0):
    unet = tiny_unet_sd1(seed)
    handle = sdadapt.inject(unet, sdadapt.targets.UNET_ATTENTION, sdadapt.LoRAConfig(rank=4, alpha=2.0))
    torch.manual_seed(seed + 1)
    for p in handle.parameters():
        nn.init.normal_(p, std=0.05)
    return unet, handle


def _unet_step(unet, handle, inputs):
    (x, t, ctx), _ = inputs
    for p in handle.parameters():
        p.grad = None
    x = x.clone().requires_grad_(True)
    ctx = ctx.clone().requires_grad_(True)
    out = unet(x, t, ctx).sample
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), [p.grad.clone() for p in handle.parameters()], x.grad, ctx.grad


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-checkpointing"])
def test_tiny_unet_outputs_and_every_lora_grad_match(checkpointing):
    unet, handle = _unet_with_lora()
    unet.train()
    inputs = unet_inputs(unet)
    if checkpointing:
        enable_checkpointing(unet, UNET_BLOCKS)
    plain = _unet_step(unet, handle, inputs)
    batching = batch_shared_input_adapters(handle)
    attn2 = [g for g in batching.groups if ".attn2." in g.names[0]]
    assert attn2 and all(
        [tuple(n.rsplit(".", 1)[1] for n in s) for s in g.subsets] == [("to_k:default", "to_v:default")] for g in attn2
    )  # cross-attention: q reads hidden states, k and v the text context
    batched = _unet_step(unet, handle, inputs)
    torch.testing.assert_close(batched[0], plain[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(batched[1], plain[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched[2], plain[2], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(batched[3], plain[3], rtol=1e-4, atol=1e-6)
    stats = batching.stats()
    members = sum(len(g.members) for g in batching.groups)
    assert stats["splits"] == 0 and stats["waiting"] == 0 and stats["fallbacks"] == 0
    assert stats["served"] == members * (2 if checkpointing else 1)  # recomputed once in backward
    keys = set(handle.state_dict())
    batching.remove()
    assert set(handle.state_dict()) == keys
    assert torch.equal(_unet_step(unet, handle, inputs)[0], plain[0])


def test_clip_text_encoder_q_k_v_proj():
    encoder = tiny_clip()
    handle = sdadapt.inject(encoder, sdadapt.targets.TEXT_ENCODER, sdadapt.LoRAConfig(rank=4))
    torch.manual_seed(3)
    for p in handle.parameters():
        nn.init.normal_(p, std=0.1)
    ids = torch.randint(3, 99, (2, 7))
    with torch.no_grad():
        plain = encoder(ids).last_hidden_state
        batching = batch_shared_input_adapters(handle)
        batched = encoder(ids).last_hidden_state
    assert [len(g.members) for g in batching.groups] == [3, 3]  # q/k/v_proj of each layer
    assert batching.stats() == {"served": 6, "fallbacks": 0, "splits": 0, "waiting": 0}
    torch.testing.assert_close(batched, plain, rtol=1e-5, atol=1e-5)


def test_several_adapter_names_on_one_layer_share_one_matmul():
    torch.manual_seed(0)
    model = QKV()
    handles = [sdadapt.inject(model, ["to_q", "to_k", "to_v"], sdadapt.LoRAConfig(rank=r), name=n) for n, r in (("a", 2), ("b", 3))]
    for handle in handles:
        for p in handle.parameters():
            nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 3, 6)
    plain = _run(model, x)
    whole = batch_shared_input_adapters(model)
    (group,) = whole.groups
    assert len(group.members) == 6
    _assert_close(plain[0], _run(model, x)[0], torch.float32)
    _assert_close(plain[1], _run(model, x)[1], torch.float32)
    whole.remove()
    only_a = batch_shared_input_adapters(handles[0])
    assert [len(g.members) for g in only_a.groups] == [3]
    only_a.remove()


def test_torch_compile_traces_the_unbatched_path():
    model = _qkv_with_lora((2, 3, 4))
    x = torch.randn(2, 3, 6)
    with torch.no_grad():
        plain = model(x)
    batching = batch_shared_input_adapters(model)
    compiled = torch.compile(model, backend="eager")  # dynamo traces the hooks; Inductor would fuse
    with torch.no_grad():
        out = compiled(x)
    _assert_close(plain, out, torch.float32)
    # traced calls leave the bookkeeping alone (a counter read in the graph would recompile it per call)
    assert batching.stats() == {"served": 0, "fallbacks": 0, "splits": 0, "waiting": 0}


def test_set_scale_dtype_change_and_deepcopy_keep_the_scales_right():
    import copy

    model = _qkv_with_lora((2, 3, 4))
    x = torch.randn(2, 3, 6)
    batch_shared_input_adapters(model)
    twin = copy.deepcopy(model)  # gets its own groups, over its own buffers
    loras = [m for m in model.modules() if isinstance(m, sdadapt.LoRAModule)]
    for m in loras:
        m.set_multiplier(0.3)  # fills the scale buffers in place: the groups read them
    with torch.no_grad():
        expected = {n: y.float() for n, y in _reference(model, x)[0].items()}
        _assert_close(expected, model(x), torch.float32)
        model.double()  # .to() replaces the buffers: the group follows
        _assert_close({n: v.double() for n, v in expected.items()}, model(x.double()), torch.float32)
        for m in twin.modules():
            if isinstance(m, sdadapt.LoRAModule):
                m.set_multiplier(0.3)
        _assert_close(expected, twin(x), torch.float32)
    group = twin.to_q.sdadapt["default"]._shared_input[0]
    assert group.served == 3 and group is not model.to_q.sdadapt["default"]._shared_input[0]


def test_the_docs_example_runs():
    from docs_pages import code_blocks

    (block,) = [b for b in code_blocks("lora.md") if "batch_shared_input_adapters" in b]
    unet = tiny_unet_sd1()
    namespace = {"sdadapt": sdadapt, "unet": unet}
    exec(compile(block, "docs/lora.md", "exec"), namespace)
    assert namespace["batching"]._removed and not any(
        m._shared_input for m in unet.modules() if isinstance(m, sdadapt.LoRAModule)
    )


def test_refuses_what_is_not_a_handle_or_a_model():
    with pytest.raises(TypeError, match="AdapterHandle"):
        batch_shared_input_adapters("unet")


# ---------------------------------------------------------------------------- CUDA (benchmarks/gpu_check.sh runs these)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_and_cuda_graph_replay_match_the_unbatched_path():
    model = _qkv_with_lora((4, 8, 16)).cuda()
    x = torch.randn(2, 64, 6, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        plain = _run(model, x)
        batching = batch_shared_input_adapters(model)
        batched = _run(model, x)
    for a, b in zip(plain, batched):
        _assert_close(a, b, torch.bfloat16)
    assert all(batched[0][n].dtype == plain[0][n].dtype for n in plain[0])

    # forward + backward captured in one CUDA graph with the batching on; a replay on new input
    # equals the eager unbatched step (set_scale after capture shows: the scales are read in-graph)
    params = list(_lora_params(model).values())
    static_x = torch.randn(2, 64, 6, device="cuda", requires_grad=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for p in params:
                p.grad = None
            sum(y.sum() for y in model(static_x).values()).backward()
    torch.cuda.current_stream().wait_stream(side)
    for p in params:
        p.grad = None
    static_x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_x)
        sum(y.sum() for y in static_out.values()).backward()
    static_grads = {n: p.grad for n, p in _lora_params(model).items()}  # the graph's gradient buffers
    new_x = torch.randn(2, 64, 6, device="cuda")
    for multiplier in (1.0, 0.5):
        for module in model.modules():
            if isinstance(module, sdadapt.LoRAModule):
                module.set_multiplier(multiplier)  # fills the scale buffers in place
        with torch.no_grad():
            static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        replayed = {n: y.detach().clone() for n, y in static_out.items()}, {n: g.clone() for n, g in static_grads.items()}
        batching.remove()
        eager_x = new_x.clone().requires_grad_(True)
        for p in params:
            p.grad = None
        eager_out = model(eager_x)
        sum(y.sum() for y in eager_out.values()).backward()
        eager = {n: y.detach() for n, y in eager_out.items()}, {n: p.grad.clone() for n, p in _lora_params(model).items()}
        # (bf16-sized tolerance: other CUDA tests in the session may have allowed TF32 matmuls)
        for a, b in zip(replayed, eager):
            _assert_close(a, b, torch.bfloat16)
        batching = batch_shared_input_adapters(model)


def test_an_attention_call_that_raises_does_not_split_the_group():
    """An exception between to_q and to_k (out of memory, Ctrl-C, checkpointing's early stop) ends the
    parent's call with k/v's slices untaken: that is no evidence they read another tensor."""
    model = _qkv_with_lora((2, 3, 4))
    batching = batch_shared_input_adapters(model)

    def fail_after_q(module, args, output):
        raise RuntimeError("out of memory (simulated)")

    x = torch.randn(2, 3, 6)
    hook = model.to_q.register_forward_hook(fail_after_q)
    with pytest.raises(RuntimeError, match="simulated"):
        model(x)
    hook.remove()
    assert batching.stats() == {"served": 1, "fallbacks": 0, "splits": 0, "waiting": 0}
    assert len(batching.groups[0].subsets) == 1  # q, k and v still share one matmul
    model(x)
    assert batching.stats() == {"served": 4, "fallbacks": 0, "splits": 0, "waiting": 0}


@pytest.mark.parametrize("forwards", [1, 2], ids=["one-forward", "two-forwards-one-backward"])
def test_checkpointing_recomputes_the_forward_that_learned_a_split(forwards):
    """A model whose cross-attention has no flag learns q apart in its first forward, which runs another
    path than later ones. Non-reentrant checkpointing recomputes that forward in backward and refuses a
    different path (CheckpointError: "different metadata"), so a split is committed only once the
    backward of the forward that learned it is over — also with a second forward (a prior batch) first."""
    from torch.utils.checkpoint import checkpoint

    x, context = torch.randn(2, 3, 6), torch.randn(2, 5, 6)
    reference = _run(_qkv_with_lora((2, 3, 4)), x, context)
    model = _qkv_with_lora((2, 3, 4))
    batching = batch_shared_input_adapters(model)

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, inp, ctx):
            outs = [checkpoint(self.inner, inp, ctx, use_reentrant=False) for _ in range(forwards)]
            return {k: sum(o[k] for o in outs) / forwards for k in outs[0]}

    wrapped = Checkpointed()
    for _ in range(3):
        out, grads, x_grad, context_grad = _run(wrapped, x, context)
        _assert_close(out, reference[0], torch.float32)
        _assert_close({n.removeprefix("inner."): g for n, g in grads.items()}, reference[1], torch.float32)
        _assert_close(x_grad, reference[2], torch.float32)
        _assert_close(context_grad, reference[3], torch.float32)
    (group,) = batching.groups
    assert group.subsets == [("to_q:default",), ("to_k:default", "to_v:default")]
    before = batching.stats()
    with torch.no_grad():
        model(x, context)  # learned for good: q runs its own path, k and v share one matmul
    after = batching.stats()
    assert (after["served"] - before["served"], after["fallbacks"] - before["fallbacks"], after["splits"]) == (
        2, 1, before["splits"])
