"""Injection: exact identity at init, exact reversibility, merge/scale/enable switches, state round
trips, compile, and agreement of the injected, merged, applied (in place) and loaded paths."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sdadapt
from sdadapt import LoRAConfig, apply_lora, by_name, by_type, inject, load_adapter
from sdadapt.adapters import LoRAModule
from sdadapt.inject import adapter_names
from sdadapt.targets import UNET_LOCON, everything

from tiny_models import run_unet, tiny_unet_sd1, tiny_unet_sdxl, unet_inputs


class MyLinear(nn.Linear):
    """A Linear subclass (as many libraries define): must be adapted like nn.Linear."""


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2, dilation=2, padding=2)
        self.conv3 = nn.Conv2d(8, 6, 1)
        self.norm = nn.GroupNorm(2, 6)
        self.grouped = nn.Conv2d(6, 6, 3, padding=1, groups=2)
        self.head = nn.Sequential(MyLinear(6, 16), nn.GELU(), nn.Linear(16, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.conv1(x))
        h = F.silu(self.conv2(h))
        h = self.norm(self.conv3(h))
        h = h + self.grouped(h)
        return self.head(h.mean(dim=(2, 3)))


ADAPTABLE = by_type(nn.Linear, nn.Conv2d) & ~by_name("grouped")
LAYERS = ["conv1", "conv2", "conv3", "head.0", "head.2"]
FILE_KEYS = ("lora_down.weight", "lora_up.weight", "alpha")


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net().eval()


def net_input(seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(4, 3, 9, 9, generator=torch.Generator().manual_seed(seed)).to(dtype)


def randomize(handle, seed: int = 3, std: float = 0.3) -> None:
    """Give every adapter a non-zero up (and a fresh down) so deltas are visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in handle.modules.values():
            for p in (adapter.lora_up, adapter.lora_down):
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def with_deltas(model: nn.Module, *weighted_handles) -> nn.Module:
    """Reference: a float64 copy of ``model`` without adapters, weights ``W + Σ c·scale·up·down``.

    Call it while no adapter is merged (it starts from the model's current weights).
    """
    ref = copy.deepcopy(model)
    for module in ref.modules():
        module._modules.pop("sdadapt", None)
        module._forward_hooks.clear()
    ref = ref.double()
    with torch.no_grad():
        for handle, c in weighted_handles:
            for layer_name, adapter in handle.modules.items():
                assert not adapter.merged
                up = adapter.lora_up.detach().double().reshape(adapter.lora_up.shape[0], adapter.rank)
                down = adapter.lora_down.detach().double()
                delta = (up @ down.reshape(adapter.rank, -1)).reshape(up.shape[0], *down.shape[1:])
                scale = float(adapter.alpha) / adapter.rank
                ref.get_submodule(layer_name).weight += c * scale * delta
    return ref


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Same keys in the same order, bit-identical values."""
    now = model.state_dict()
    assert list(now) == list(before)
    assert_base_weights(model, before)


def assert_base_weights(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """The keys of ``before`` still hold bit-identical values (adapter keys may exist besides)."""
    now = model.state_dict()
    for key, value in before.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------------------ selection


def test_grouped_conv_is_rejected_naming_the_module_and_leaves_model_untouched():
    net = make_net()
    before = weights(net)
    with pytest.raises(TypeError, match=r"^grouped: .*groups=2.*by_name\('grouped'\)"):
        inject(net, by_type(nn.Conv2d), LoRAConfig(rank=2))
    # a failed inject changes nothing: no children, no hooks, nothing frozen
    assert_same_state(net, before)
    assert no_hooks(net)
    assert all(p.requires_grad for p in net.parameters())
    assert not any("sdadapt" in n for n, _ in net.named_modules())


def test_layers_keep_their_class_and_subclass_is_adapted():
    net = make_net()
    classes = {n: type(m) for n, m in net.named_modules()}
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2))
    assert handle.names == LAYERS
    assert type(net.head[0]) is MyLinear
    for name, cls in classes.items():
        assert type(net.get_submodule(name)) is cls
    assert adapter_names(net) == ["default"]


def test_conv_rank_for_kxk_convs_only():
    net = make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2, alpha=1.0, conv_rank=3, conv_alpha=6.0))
    ranks = {n: a.rank for n, a in handle.modules.items()}
    assert ranks == {"conv1": 3, "conv2": 3, "conv3": 2, "head.0": 2, "head.2": 2}
    assert handle.modules["conv1"].lora_down.shape == (3, 3, 3, 3)
    assert handle.modules["conv3"].lora_up.shape == (6, 2, 1, 1)
    assert float(handle.modules["conv2"].scale) == pytest.approx(2.0)
    assert float(handle.modules["head.2"].scale) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------ init / keys


@pytest.mark.parametrize("init", ["kaiming", "gaussian"])
def test_injection_is_identity_at_init(init):
    net = make_net()
    x = net_input()
    with torch.no_grad():
        base = net(x)
    inject(net, ADAPTABLE, LoRAConfig(rank=3, alpha=1.0, init=init))
    with torch.no_grad():
        assert torch.equal(net(x), base)


def test_state_dict_keys_and_values():
    net = make_net()
    before = weights(net)
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2), name="style")
    after = net.state_dict()
    assert set(before) <= set(after)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    new = set(after) - set(before)
    assert new == {f"{layer}.sdadapt.style.{k}" for layer in LAYERS for k in ("lora_down", "lora_up", "alpha")}
    # the run-time multiplier is not saved
    assert not any(k.endswith("multiplier") for k in after)
    assert set(handle.state_dict()) == {f"{layer}.{k}" for layer in LAYERS for k in FILE_KEYS}


def test_only_adapter_params_train():
    net = make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2))
    adapter_ids = {id(p) for p in handle.parameters()}
    assert len(adapter_ids) == 2 * len(LAYERS)
    for name, p in net.named_parameters():
        assert p.requires_grad == (".sdadapt." in name), name
        assert (id(p) in adapter_ids) == (".sdadapt." in name), name
    net(net_input()).square().sum().backward()
    for name, p in net.named_parameters():
        if ".sdadapt." in name:
            assert p.grad is not None, name
        else:
            assert p.grad is None, name
    # up starts at zero, so its gradient carries the signal
    assert all(a.lora_up.grad.abs().sum() > 0 for a in handle.modules.values())


def test_freeze_base_false_keeps_requires_grad():
    net = make_net()
    net.conv1.weight.requires_grad_(False)
    inject(net, ADAPTABLE, LoRAConfig(rank=2), freeze_base=False)
    assert not net.conv1.weight.requires_grad
    assert net.conv2.weight.requires_grad and net.head[2].bias.requires_grad


# ------------------------------------------------------------------------------------ remove


@pytest.mark.parametrize("merged", [False, True])
def test_remove_restores_exact_original(merged):
    net = make_net()
    x = net_input()
    with torch.no_grad():
        base = net(x)
    modules = {n: id(m) for n, m in net.named_modules()}
    params = {n: (id(p), p.data_ptr()) for n, p in net.named_parameters()}
    before = weights(net)
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2))
    randomize(handle)
    with torch.no_grad():
        assert not torch.allclose(net(x), base)
    if merged:
        handle.merge()
    handle.remove()
    assert {n: id(m) for n, m in net.named_modules()} == modules
    assert {n: (id(p), p.data_ptr()) for n, p in net.named_parameters()} == params
    assert_same_state(net, before)
    assert no_hooks(net)
    assert adapter_names(net) == []
    with torch.no_grad():
        assert torch.equal(net(x), base)
    handle.remove()  # idempotent
    for call in (handle.merge, handle.state_dict, lambda: handle.set_scale(1.0)):
        with pytest.raises(RuntimeError, match="removed"):
            call()
    # the same name can be injected again
    inject(net, ADAPTABLE, LoRAConfig(rank=2))


def test_duplicate_name_rejected_without_partial_injection():
    net = make_net()
    inject(net, by_name("head.0", "head.2"), LoRAConfig(rank=2), name="a")
    hooks = {n: len(m._forward_hooks) for n, m in net.named_modules()}
    # conv1..conv3 come before head.0 in module order: none of them may be left adapted
    with pytest.raises(ValueError, match=r"head\.0.*'a'"):
        inject(net, ADAPTABLE, LoRAConfig(rank=2), name="a")
    assert {n: len(m._forward_hooks) for n, m in net.named_modules()} == hooks
    assert not hasattr(net.conv1, "sdadapt")
    assert adapter_names(net) == ["a"]


# ------------------------------------------------------------------------------------ merge / scale


def test_merge_equals_unmerged_and_unmerge_is_exact():
    net = make_net()
    x = net_input()
    before = weights(net)
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=3, alpha=1.5))
    randomize(handle)
    with torch.no_grad():
        unmerged = net(x)
        torch.testing.assert_close(unmerged, with_deltas(net, (handle, 1.0))(x.double()).float(), rtol=1e-4, atol=1e-5)
        handle.merge()
        assert all(a.merged for a in handle.modules.values())
        assert not torch.equal(net.conv1.weight, before["conv1.weight"])
        torch.testing.assert_close(net(x), unmerged, rtol=1e-4, atol=1e-5)
        handle.merge()  # idempotent
        torch.testing.assert_close(net(x), unmerged, rtol=1e-4, atol=1e-5)
        handle.unmerge()
    assert_base_weights(net, before)
    with torch.no_grad():
        assert torch.equal(net(x), unmerged)


def test_two_adapters_add_up_and_merge_orders_restore_exact():
    net = make_net()
    x = net_input()
    before = weights(net)
    a = inject(net, ADAPTABLE, LoRAConfig(rank=2, alpha=1.0), name="a")
    b = inject(net, by_name("conv2", "conv3", "head.0", "head.2"), LoRAConfig(rank=3, alpha=6.0), name="b")
    randomize(a, seed=1)
    randomize(b, seed=2)
    assert adapter_names(net) == ["a", "b"]
    assert set(net.conv2.sdadapt.keys()) == {"a", "b"}
    # per layer: y = base + d_a + d_b
    h = torch.randn(3, 16, dtype=torch.float32)
    with torch.no_grad():
        layer = net.head[2]
        expected = F.linear(h, layer.weight, layer.bias) + layer.sdadapt["a"](h) + layer.sdadapt["b"](h)
        torch.testing.assert_close(layer(h), expected)
        both = net(x)
        torch.testing.assert_close(both, with_deltas(net, (a, 1.0), (b, 1.0))(x.double()).float(), rtol=1e-4, atol=1e-5)
    for first, second in itertools.permutations([a, b]):
        for undo_first, undo_second in itertools.permutations([first, second]):
            first.merge()
            with torch.no_grad():
                torch.testing.assert_close(net(x), both, rtol=1e-4, atol=1e-5)
            second.merge()
            with torch.no_grad():
                torch.testing.assert_close(net(x), both, rtol=1e-4, atol=1e-5)
            undo_first.unmerge()
            with torch.no_grad():
                torch.testing.assert_close(net(x), both, rtol=1e-4, atol=1e-5)
            undo_second.unmerge()
            assert_base_weights(net, before)
    # remove one while the other is merged, then the other
    only_b = with_deltas(net, (b, 1.0))(x.double()).float()
    b.merge()
    a.remove()
    with torch.no_grad():
        torch.testing.assert_close(net(x), only_b, rtol=1e-4, atol=1e-5)
    b.remove()
    assert_same_state(net, before)
    assert no_hooks(net)


def test_set_scale():
    net = make_net()
    x = net_input()
    with torch.no_grad():
        base = net(x)
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2))
    randomize(handle)
    with torch.no_grad():
        handle.set_scale(0.0)
        assert torch.equal(net(x), base)
        handle.set_scale(2.0)
        doubled = net(x)
        torch.testing.assert_close(doubled, with_deltas(net, (handle, 2.0))(x.double()).float(), rtol=1e-4, atol=1e-5)
        # per layer the delta is exactly doubled
        h = torch.randn(2, 6)
        layer = net.head[0]
        base_out = F.linear(h, layer.weight, layer.bias)
        handle.set_scale(1.0)
        once = layer(h) - base_out
        handle.set_scale(2.0)
        torch.testing.assert_close(layer(h) - base_out, 2 * once)
        # set_scale on a merged adapter re-merges at the new strength
        handle.merge()
        torch.testing.assert_close(net(x), doubled, rtol=1e-4, atol=1e-5)
        handle.set_scale(0.0)
        torch.testing.assert_close(net(x), base, rtol=0, atol=0)


def test_disable_enable():
    net = make_net()
    x = net_input()
    before = weights(net)
    with torch.no_grad():
        base = net(x)
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2))
    randomize(handle)
    with torch.no_grad():
        adapted = net(x)
        handle.disable()
        assert torch.equal(net(x), base)
        handle.enable()
        assert torch.equal(net(x), adapted)
        handle.merge()
        handle.disable()  # unmerges first
        assert_base_weights(net, before)
        assert torch.equal(net(x), base)
        handle.enable()
        assert torch.equal(net(x), adapted)


# ------------------------------------------------------------------------------------ dtypes


def test_to_float64_after_inject_matches_float64_reference():
    net = make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2, alpha=0.5))
    randomize(handle)
    net.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in net.parameters())
    assert all(a.lora_up.dtype == torch.float64 for a in handle.modules.values())
    x = net_input(dtype=torch.float64)
    reference = with_deltas(net, (handle, 1.0))
    with torch.no_grad():
        expected = reference(x)
        torch.testing.assert_close(net(x), expected, rtol=1e-10, atol=1e-12)
        handle.merge()  # merging float64 weights keeps float64 precision
        torch.testing.assert_close(net(x), expected, rtol=1e-10, atol=1e-12)
        handle.unmerge()
    handle.remove()
    assert net.conv1.weight.dtype == torch.float64


def test_to_bfloat16_runs():
    net = make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2))
    randomize(handle)
    x = net_input()
    with torch.no_grad():
        full = net(x)
        net.to(torch.bfloat16)
        half = net(x.bfloat16())
        assert half.dtype == torch.bfloat16 and torch.isfinite(half).all()
        torch.testing.assert_close(half.float(), full, rtol=0.1, atol=0.1)
        handle.merge()
        torch.testing.assert_close(net(x.bfloat16()).float(), full, rtol=0.1, atol=0.1)


def test_float32_adapters_on_a_bfloat16_model():
    net = make_net().to(torch.bfloat16)
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2))  # dtype=float32 by default
    assert all(a.lora_up.dtype == torch.float32 for a in handle.modules.values())
    randomize(handle)
    with torch.no_grad():
        out = net(net_input(dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    handle_native = inject(make_net().to(torch.bfloat16), ADAPTABLE, LoRAConfig(rank=2), dtype=None)
    assert all(a.lora_up.dtype == torch.bfloat16 for a in handle_native.modules.values())


# ------------------------------------------------------------------------------------ PiSSA


def test_pissa_keeps_output_and_remove_restores_weights():
    net = make_net()
    x = net_input()
    with torch.no_grad():
        base = net(x)
    before = weights(net)
    ids = {n: id(p) for n, p in net.named_parameters()}
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2, alpha=1.0, init="pissa"))
    assert not torch.equal(net.conv1.weight, before["conv1.weight"])  # base holds the residual
    for layer_name, adapter in handle.modules.items():
        layer = net.get_submodule(layer_name)
        torch.testing.assert_close(layer.weight + adapter.delta_weight(), before[f"{layer_name}.weight"], rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(net(x), base, rtol=1e-4, atol=1e-5)
        handle.merge()
        torch.testing.assert_close(net(x), base, rtol=1e-4, atol=1e-5)
    handle.remove()
    assert {n: id(p) for n, p in net.named_parameters()} == ids
    assert_same_state(net, before)
    with torch.no_grad():
        assert torch.equal(net(x), base)


@pytest.mark.parametrize("pissa_first", [True, False])
def test_pissa_next_to_a_merged_adapter(pissa_first):
    """PiSSA on a layer where another adapter is merged: the residual is taken from the unmerged
    weight (the output stays that of base + other in every merge state), and removing either
    adapter in any order restores the original bits."""
    net = make_net()
    x = net_input()
    before = weights(net)
    other = inject(net, by_name("conv*"), LoRAConfig(rank=2), name="other")
    randomize(other)
    expected = with_deltas(net, (other, 1.0))(x.double()).float()  # base + other, from pristine W

    def check():
        with torch.no_grad():
            torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-4)

    if pissa_first:
        other.remove()
        pissa = inject(net, ADAPTABLE, LoRAConfig(rank=2, init="pissa"), name="pissa")
        other = inject(net, by_name("conv*"), LoRAConfig(rank=2), name="other")
        randomize(other)
        other.merge()
    else:
        other.merge()
        pissa = inject(net, ADAPTABLE, LoRAConfig(rank=2, init="pissa"), name="pissa")
    check()
    other.unmerge()
    check()
    other.merge()
    pissa.merge()
    check()
    pissa.unmerge()
    pissa.remove()  # while "other" is still merged
    check()
    other.unmerge()
    check()
    other.remove()
    assert_same_state(net, before)


# ------------------------------------------------------------------------------------ state


def test_state_dict_round_trip_into_fresh_model():
    net = make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2, alpha=3.0, conv_rank=4))
    randomize(handle)
    x = net_input()
    with torch.no_grad():
        expected = net(x)
    state = handle.state_dict()
    assert all(not v.requires_grad for v in state.values())

    other = make_net()
    fresh = inject(other, ADAPTABLE, LoRAConfig(rank=2, alpha=3.0, conv_rank=4))
    fresh.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(other(x), expected)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_load_state_dict_updates_a_merged_adapter():
    net = make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2))
    x = net_input()
    randomize(handle)
    with torch.no_grad():
        expected = net(x)
    state = {k: v.clone() for k, v in handle.state_dict().items()}
    randomize(handle, seed=99)
    handle.merge()
    handle.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, rtol=1e-4, atol=1e-5)


def test_load_state_dict_errors_name_the_key():
    net = make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2))
    state = handle.state_dict()
    missing = dict(state)
    del missing["conv2.lora_up.weight"]
    with pytest.raises(KeyError, match=r"conv2\.lora_up\.weight"):
        handle.load_state_dict(missing)
    extra = {**state, "conv9.lora_up.weight": torch.zeros(1)}
    with pytest.raises(KeyError, match=r"conv9\.lora_up\.weight"):
        handle.load_state_dict(extra)
    wrong = {**state, "head.2.lora_down.weight": torch.zeros(4, 16)}
    with pytest.raises(ValueError, match=r"head\.2\.lora_down\.weight"):
        handle.load_state_dict(wrong)


def test_load_adapter_equals_injected():
    net = make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2, alpha=3.0, conv_rank=4, rank_stabilized=True))
    randomize(handle)
    x = net_input()
    with torch.no_grad():
        expected = net(x)
    other = make_net()
    before = weights(other)
    loaded = load_adapter(other, handle.state_dict(), name="loaded")
    assert loaded.names == handle.names
    assert {n: a.rank for n, a in loaded.modules.items()} == {n: a.rank for n, a in handle.modules.items()}
    with torch.no_grad():
        torch.testing.assert_close(other(x), expected, rtol=1e-6, atol=1e-7)
    loaded.remove()
    assert_same_state(other, before)


def test_load_adapter_with_bad_shape_names_layer_and_changes_nothing():
    net = make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2))
    state = dict(handle.state_dict())
    state["conv3.lora_up.weight"] = torch.zeros(7, 2, 1, 1)
    other = make_net()
    with pytest.raises(ValueError, match="conv3"):
        load_adapter(other, state)
    assert no_hooks(other)
    assert all(p.requires_grad for p in other.parameters())


# ------------------------------------------------------------------------------------ apply_lora


def test_apply_lora_equals_injected_and_undo_is_exact():
    net = make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2, alpha=1.0, conv_rank=3))
    randomize(handle)
    x = net_input()
    with torch.no_grad():
        injected = net(x)
        handle.set_scale(0.5)
        injected_half = net(x)
    other = make_net()
    before = weights(other)
    applied = apply_lora(other, handle.state_dict())
    assert sorted(applied.names) == sorted(LAYERS)
    with torch.no_grad():
        torch.testing.assert_close(other(x), injected, rtol=1e-4, atol=1e-5)
    # nested application, undone like a stack
    again = apply_lora(other, handle.state_dict(), scale=-0.5)
    with torch.no_grad():
        torch.testing.assert_close(other(x), injected_half, rtol=1e-4, atol=1e-5)
    again.undo()
    applied.undo()
    assert_same_state(other, before)
    applied.undo()  # idempotent
    assert_same_state(other, before)


def test_apply_lora_float64_keeps_precision():
    net = make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2))
    randomize(handle)
    other = make_net().double()
    reference = with_deltas(net, (handle, 1.0))
    apply_lora(other, handle.state_dict())
    x = net_input(dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(other(x), reference(x), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------ compile


def test_torch_compile_matches_and_set_scale_does_not_recompile():
    torch._dynamo.reset()
    net = make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2))
    randomize(handle)
    x = net_input()
    with torch.no_grad():
        eager = net(x)
        handle.set_scale(2.0)
        eager_two = net(x)
        handle.set_scale(1.0)
    compiled = torch.compile(net, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager, rtol=1e-5, atol=1e-6)
        with torch._dynamo.config.patch(error_on_recompile=True):
            handle.set_scale(2.0)
            torch.testing.assert_close(compiled(x), eager_two, rtol=1e-5, atol=1e-6)
            handle.set_scale(0.0)
            out_zero = compiled(x)
    handle.disable()
    with torch.no_grad():
        torch.testing.assert_close(out_zero, net(x), rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------ diffusers UNet


@pytest.mark.parametrize("layout", ["sd1", "sdxl"])
def test_unet_inject_merge_remove(layout):
    unet = tiny_unet_sd1() if layout == "sd1" else tiny_unet_sdxl()
    inputs = unet_inputs(unet, batch=1, sdxl=layout == "sdxl")
    base = run_unet(unet, inputs)
    before = weights(unet)
    modules = {n: id(m) for n, m in unet.named_modules()}
    params = {n: id(p) for n, p in unet.named_parameters()}
    handle = inject(unet, UNET_LOCON, LoRAConfig(rank=2, alpha=1.0, conv_rank=2, conv_alpha=1.0))
    assert torch.equal(run_unet(unet, inputs), base)  # exact identity at init

    after = unet.state_dict()
    assert set(before) <= set(after)
    assert all(".sdadapt.default." in k for k in set(after) - set(before))
    assert_base_weights(unet, before)
    assert all(p.requires_grad == (".sdadapt." in n) for n, p in unet.named_parameters())

    randomize(handle, std=0.05)
    adapted = run_unet(unet, inputs)
    assert not torch.allclose(adapted, base, atol=1e-4)
    handle.merge()
    torch.testing.assert_close(run_unet(unet, inputs), adapted, rtol=1e-4, atol=1e-4)
    handle.unmerge()
    assert_base_weights(unet, before)

    other = tiny_unet_sd1() if layout == "sd1" else tiny_unet_sdxl()
    loaded = load_adapter(other, handle.state_dict())
    torch.testing.assert_close(run_unet(other, inputs), adapted, rtol=1e-5, atol=1e-5)
    loaded.remove()

    applied = apply_lora(other, handle.state_dict())
    torch.testing.assert_close(run_unet(other, inputs), adapted, rtol=1e-4, atol=1e-4)
    applied.undo()
    assert_same_state(other, before)

    handle.remove()
    assert {n: id(m) for n, m in unet.named_modules()} == modules
    assert {n: id(p) for n, p in unet.named_parameters()} == params
    assert_same_state(unet, before)
    assert no_hooks(unet)
    assert torch.equal(run_unet(unet, inputs), base)


def test_unet_pissa_and_two_adapters():
    unet = tiny_unet_sd1()
    inputs = unet_inputs(unet)
    base = run_unet(unet, inputs)
    before = weights(unet)
    pissa = inject(unet, sdadapt.targets.UNET_ATTENTION, LoRAConfig(rank=2, init="pissa"), name="pissa")
    torch.testing.assert_close(run_unet(unet, inputs), base, rtol=1e-4, atol=1e-4)
    other = inject(unet, sdadapt.targets.UNET_KOHYA, LoRAConfig(rank=2), name="other")
    randomize(other, std=0.05)
    adapted = run_unet(unet, inputs)
    other.merge()
    pissa.merge()
    torch.testing.assert_close(run_unet(unet, inputs), adapted, rtol=1e-4, atol=1e-4)
    pissa.unmerge()
    other.unmerge()
    other.remove()
    pissa.remove()
    assert_same_state(unet, before)
    assert no_hooks(unet)
    assert torch.equal(run_unet(unet, inputs), base)


def test_everything_target_on_unet_reports_the_unsupported_module():
    unet = tiny_unet_sd1()
    with pytest.raises(TypeError, match=r"time_embedding|GroupNorm|cannot adapt"):
        inject(unet, everything, LoRAConfig(rank=2))
    assert no_hooks(unet)


def test_injected_lora_modules_are_not_selected_again():
    net = make_net()
    inject(net, ADAPTABLE, LoRAConfig(rank=2), name="a")
    second = inject(net, by_type(nn.Linear, nn.Conv2d) & ~by_name("grouped"), LoRAConfig(rank=2), name="b")
    assert second.names == LAYERS
    assert all(isinstance(m, LoRAModule) for m in second.modules.values())


def test_keep_dtype_lets_adapters_keep_their_dtype_through_model_casts_but_not_device_moves():
    net, reference = make_net(), make_net()
    handle = inject(net, ADAPTABLE, LoRAConfig(rank=2, init="gaussian"))
    twin = inject(reference, ADAPTABLE, LoRAConfig(rank=2, init="gaussian"))
    for adapter, other in zip(handle.modules.values(), twin.modules.values()):
        nn.init.normal_(adapter.lora_up, std=0.1)
        other.load_state_dict(adapter.state_dict())
    handle.keep_dtype()
    net.to(torch.bfloat16)
    net.half()
    net.to(dtype=torch.float8_e4m3fn)
    net.to(torch.float32)  # (the base weights took every cast; the adapters none)
    reference.to(torch.bfloat16).half().to(dtype=torch.float8_e4m3fn).to(torch.float32)
    assert all(p.dtype == torch.float32 for p in handle.parameters())
    assert {b.dtype for a in handle.modules.values() for b in a.buffers()} == {torch.float32}
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        kept = net(x)
        twin.remove()
        base = reference(x)  # the rounded base alone: the kept adapters still add their unrounded deltas
    assert not torch.equal(kept, base)
    net.to("meta")  # a device move still moves them
    assert {p.device.type for p in handle.parameters()} == {"meta"}
    assert {p.dtype for p in handle.parameters()} == {torch.float32}
    net.to_empty(device="cpu")
    handle.keep_dtype(False)  # off: they follow the model again
    net.half()
    assert {p.dtype for p in handle.parameters()} == {torch.float16}
    handle.keep_dtype()
    for adapter in handle.modules.values():
        adapter.to(torch.bfloat16)  # (the adapters' own cast still casts them)
    assert {p.dtype for p in handle.parameters()} == {torch.bfloat16}
    handle.remove()
    with pytest.raises(RuntimeError):
        handle.keep_dtype()
