"""Hypernetworks (A1111 / NovelAI): the MLP against a naive A1111 reference, injection on the toy,
a tiny diffusers and an LDM-named UNet, exact removal, strength, and the errors."""

from __future__ import annotations

import copy
import inspect
import math
import types
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_unet_sd1, unet_inputs
from torch import nn
from torch.nn import functional as F

import sdadapt
from sdadapt.hypernetworks import (
    ACTIVATIONS,
    Hypernetwork,
    HypernetworkConfig,
    HypernetworkMLP,
    context_widths,
    dropout_structure_for,
    hypernetwork_context,
    inject_hypernetwork,
    mlp_layout,
)
from sdadapt.toy import build_toy
from docs_pages import run_block

# --------------------------------------------------------------------------- naive A1111 reference
# Written from modules/hypernetworks/hypernetwork.py (A1111 v1.x, see FORMATS.md §3): the module
# construction, its init, forward ``x + linear(x) * multiplier`` and apply_hypernetworks.
A1111_ACTIVATIONS = {
    "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
    "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
}
A1111_ACTIVATIONS.update({name.lower(): cls for name, cls in inspect.getmembers(torch.nn.modules.activation)
                          if inspect.isclass(cls) and cls.__module__ == "torch.nn.modules.activation"})
A1111_ACTIVATIONS["swish"] = nn.Hardswish  # the update above has no "swish": A1111 keeps Hardswish


class A1111Module(nn.Module):
    def __init__(self, dim, state_dict=None, layer_structure=None, activation_func=None, weight_init="Normal",
                 add_layer_norm=False, activate_output=False, dropout_structure=None):
        super().__init__()
        self.multiplier = 1.0
        assert layer_structure[0] == 1 and layer_structure[-1] == 1
        linears = []
        for i in range(len(layer_structure) - 1):
            linears.append(nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
            if activation_func == "linear" or activation_func is None or (i >= len(layer_structure) - 2 and not activate_output):
                pass
            else:
                linears.append(A1111_ACTIVATIONS[activation_func]())
            if add_layer_norm:
                linears.append(nn.LayerNorm(int(dim * layer_structure[i + 1])))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                linears.append(nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = nn.Sequential(*linears)
        if state_dict is not None:
            for old, new in {"linear1.bias": "linear.0.bias", "linear1.weight": "linear.0.weight",
                             "linear2.bias": "linear.1.bias", "linear2.weight": "linear.1.weight"}.items():
                if old in state_dict:
                    state_dict[new] = state_dict.pop(old)
            self.load_state_dict(state_dict)

    def forward(self, x):
        return x + self.linear(x) * (self.multiplier if not self.training else 1)


def a1111_apply_hypernetworks(hypernetworks, context):
    """``hypernetworks``: list of ``{width: (k_module, v_module)}``, chained as A1111 chains them."""
    context_k = context_v = context
    for layers in hypernetworks:
        pair = layers.get(context_k.shape[2])
        if pair is not None:
            context_k, context_v = pair[0](context_k), pair[1](context_v)
    return context_k, context_v


def a1111_reference(hypernetwork: Hypernetwork, multiplier: float = 1.0, dtype=torch.float64):
    """A1111 modules with ``hypernetwork``'s weights: ``{width: (k, v)}``."""
    c = hypernetwork.config
    out = {}
    for width in hypernetwork.widths:
        pair = []
        for index, ours in enumerate(hypernetwork.pair(width)):
            m = A1111Module(width, {k: v.clone() for k, v in ours.state_dict().items()}, list(c.layer_structure),
                            c.activation, c.weight_init, c.layer_norm, c.activate_output, list(c.dropout_structure))
            m.multiplier = multiplier
            pair.append(m.to(dtype).eval())
        out[width] = tuple(pair)
    return out


CONFIGS = [
    HypernetworkConfig(),
    HypernetworkConfig(activation="relu", layer_norm=True),
    HypernetworkConfig(layer_structure=(1, 1.5, 1.5, 1), activation="leakyrelu", activate_output=True,
                       dropout_structure=dropout_structure_for((1, 1.5, 1.5, 1), use_dropout=True, last_layer_dropout=True)),
    HypernetworkConfig(layer_structure=(1, 2, 2, 1), activation="swish", layer_norm=True,
                       dropout_structure=(0, 0.3, 0, 0), weight_init="XavierNormal"),
    HypernetworkConfig(layer_structure=(1, 0.5, 1), activation="tanh", activate_output=True, weight_init="KaimingUniform"),
    HypernetworkConfig(activation="sigmoid", weight_init="XavierUniform"),
    HypernetworkConfig(layer_structure=(1, 3, 1), activation="elu", layer_norm=True, weight_init="KaimingNormal"),
    HypernetworkConfig(activation="gelu", activate_output=True),
]


def _randomise(module: nn.Module, seed: int = 0) -> None:
    """Weights big enough that every layer matters (A1111's N(0, 0.01) init is nearly identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


# --------------------------------------------------------------------------- the MLP
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.activation}-{len(c.layer_structure)}-ln{int(c.layer_norm)}")
def test_mlp_is_a1111s_module(config):
    dim = 12
    ours = HypernetworkMLP(dim, config)
    theirs = A1111Module(dim, None, list(config.layer_structure), config.activation, config.weight_init,
                         config.layer_norm, config.activate_output, list(config.dropout_structure))
    assert [type(m) for m in ours.linear] == [type(m) for m in theirs.linear]
    assert [getattr(m, "p", None) for m in ours.linear] == [getattr(m, "p", None) for m in theirs.linear]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    _randomise(ours)
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.double().eval(), theirs.double().eval()
    x = torch.randn(2, 5, dim, dtype=torch.float64)
    for strength in (1.0, 0.35, -2.0):
        theirs.multiplier = strength
        torch.testing.assert_close(ours(x, strength=strength), theirs(x), rtol=1e-12, atol=1e-12)
    # module path == functional path over the same tensors
    layout = mlp_layout(dim, config)
    params = {k: v for k, v in ours.state_dict().items()}
    assert torch.equal(ours(x, strength=0.7), hypernetwork_context(x, params, layout, strength=0.7))


def test_layout_matches_formats_md_example_and_edge_widths():
    # FORMATS.md §3: relu + LN on (1, 2, 1): Linear, ReLU, LayerNorm, Linear, LayerNorm
    layout = mlp_layout(768, HypernetworkConfig(activation="relu", layer_norm=True))
    assert [layer.kind for layer in layout] == ["linear", "activation", "layer_norm", "linear", "layer_norm"]
    assert (layout[0].width_in, layout[0].width, layout[3].width) == (768, 1536, 768)
    # int(dim * mult) truncates exactly as A1111 does
    assert mlp_layout(5, HypernetworkConfig(layer_structure=(1, 1.5, 1)))[0].width == 7
    with pytest.raises(ValueError, match="0-wide"):
        mlp_layout(3, HypernetworkConfig(layer_structure=(1, 0.2, 1)))


def test_dropout_only_in_training_and_structure_helper():
    assert dropout_structure_for((1, 2, 1), use_dropout=False, last_layer_dropout=True) == (0.0, 0.0, 0.0)
    assert dropout_structure_for((1, 2, 2, 1), use_dropout=True, last_layer_dropout=False) == (0.0, 0.3, 0.0, 0.0)
    assert dropout_structure_for((1, 2, 2, 1), use_dropout=True, last_layer_dropout=True) == (0.0, 0.3, 0.3, 0.0)
    config = HypernetworkConfig(layer_structure=(1, 2, 2, 1), dropout_structure=(0, 0.5, 0.5, 0))
    assert config.use_dropout and config.last_layer_dropout
    mlp = HypernetworkMLP(16, config)
    _randomise(mlp)
    x = torch.randn(4, 16)
    assert torch.equal(mlp.eval()(x), mlp(x))  # eval: deterministic
    mlp.train()
    assert not torch.equal(mlp(x), mlp(x))  # train: dropout draws


def test_strength_zero_and_zeroed_output_layer_are_the_identity():
    config = HypernetworkConfig(layer_structure=(1, 2, 2, 1), activation="relu", layer_norm=True)
    mlp = HypernetworkMLP(8, config)
    _randomise(mlp)
    x = torch.randn(3, 8)
    assert torch.equal(mlp(x, strength=0.0), x)
    assert not torch.equal(mlp(x), x)
    with torch.no_grad():  # the last parametrised layer (the final LayerNorm) zeroed -> exact identity
        mlp.linear[-1].weight.zero_()
        mlp.linear[-1].bias.zero_()
    assert torch.equal(mlp(x), x)


def test_a1111_initialisation():
    torch.manual_seed(0)
    mlp = HypernetworkMLP(256, HypernetworkConfig(activation="relu", layer_norm=True))
    linear, norm = mlp.linear[0], mlp.linear[2]
    assert abs(linear.weight.std().item() - 0.01) < 1e-3 and not linear.bias.any()
    # A1111's trap: LayerNorm gains are drawn N(0, 0.01) too (not ones)
    assert norm.weight.abs().max() < 0.1 and abs(norm.weight.std().item() - 0.01) < 2e-3 and not norm.bias.any()
    xavier = HypernetworkMLP(256, HypernetworkConfig(weight_init="XavierNormal")).linear[0]
    assert abs(xavier.weight.std().item() - math.sqrt(2 / (256 + 512))) < 3e-3 and not xavier.bias.any()
    kaiming = HypernetworkMLP(256, HypernetworkConfig(weight_init="KaimingNormal")).linear[0]
    assert abs(kaiming.weight.std().item() - math.sqrt(2 / 256)) < 5e-3
    with pytest.raises(ValueError, match="unknown weight_init 'Zeros'"):
        HypernetworkMLP(8, HypernetworkConfig(weight_init="Zeros"))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(layer_structure=(2, 1)), "start and end with 1"),
        (dict(layer_structure=(1,)), "start and end with 1"),
        (dict(layer_structure=(1, -2, 1)), "> 0"),
        (dict(dropout_structure=(0, 0.3)), "one entry per"),
        (dict(dropout_structure=(0, 1.0, 0)), r"\[0, 1\)"),
        (dict(activation="rrelu"), "unknown hypernetwork activation 'rrelu'"),
    ],
)
def test_config_refuses_what_a1111_refuses(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HypernetworkConfig(**kwargs)


def test_every_listed_activation_is_the_torch_class_a1111_would_pick():
    for name, (function, cls) in ACTIVATIONS.items():
        assert A1111_ACTIVATIONS[name] is cls, name
        x = torch.linspace(-3, 3, 13)
        torch.testing.assert_close(function(x), cls()(x))


def test_hypernetwork_container_and_bad_widths():
    hn = Hypernetwork([32, 16], HypernetworkConfig())
    assert hn.widths == (32, 16)
    assert set(hn.file_tensors()) == {f"{w}.{i}.linear.{j}.{p}" for w in (32, 16) for i in (0, 1) for j in (0, 1)
                                     for p in ("weight", "bias")}
    x = torch.randn(1, 3, 16)
    k, v = hn(x)
    assert torch.equal(k, hn.pair(16)[0](x)) and torch.equal(v, hn.pair(16)[1](x))
    assert hn(torch.randn(1, 3, 7))[0].shape == (1, 3, 7) and hn.pair(7) is None
    for bad in ([], [0], [16, 16], [True]):
        with pytest.raises(ValueError, match="width"):
            Hypernetwork(bad)


# --------------------------------------------------------------------------- injection
def _a1111_attention(attn, references, x, context=None):
    """A1111's CrossAttention.forward with hypernetworks on ``attn``'s projections (the toy attention
    or diffusers' ``Attention``: ``to_q``/``to_k``/``to_v``/``to_out``/``heads``); x (B, N, D) -> (B, N, D)."""
    context = x if context is None else context
    context_k, context_v = a1111_apply_hypernetworks(references, context)
    b, n, _ = x.shape
    q = attn.to_q(x).view(b, n, attn.heads, -1).transpose(1, 2)
    k = attn.to_k(context_k).view(b, context_k.shape[1], attn.heads, -1).transpose(1, 2)
    v = attn.to_v(context_v).view(b, context_v.shape[1], attn.heads, -1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
    return attn.to_out[1](attn.to_out[0](out))


def _a1111_attention_forward(references):
    """The toy attention as A1111's CrossAttention.forward computes it, with hypernetworks."""

    def forward(self, x, context=None):
        return _a1111_attention(self, references, x, context)

    return forward


def _toy_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 12, 16, 16, generator=g), torch.randn(2, 6, 64, generator=g)
    return x.double(), torch.tensor([10, 700]), ctx.double()


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy without the injected hypernetworks (their child and hooks)."""
    reference = copy.deepcopy(model)
    reference._modules.pop("sdadapt", None)
    for module in reference.modules():
        module._forward_pre_hooks.clear()
    return reference


def _toy_reference(unet, hypernetworks_and_strengths):
    reference = _plain_copy(unet).double()
    refs = [a1111_reference(hn, s) for hn, s in hypernetworks_and_strengths]
    for name, module in reference.named_modules():
        if name.endswith(("attn1", "attn2")):
            module.forward = types.MethodType(_a1111_attention_forward(refs), module)  # the test's own copy
    return reference


def test_injection_on_the_toy_unet_is_a1111s_formula_and_removes_exactly():
    unet = build_toy(seed=1).unet.double().eval()
    x, t, ctx = _toy_inputs()
    keys = list(unet.state_dict())
    with torch.no_grad():
        base = unet(x, t, ctx)
    hn = Hypernetwork([64, 32], HypernetworkConfig(activation="relu", layer_norm=True), name="style")
    _randomise(hn)
    hn.double()
    handle = sdadapt.inject_hypernetwork(unet, hn, strength=0.6)
    # every attn1/attn2 k/v projection of the toy (widths 32, 64; context 64) is hooked
    assert len(handle) == 28 and handle.unused_widths == ()
    assert {w for w, _ in handle.layers.values()} == {32, 64}
    assert handle.layers["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"] == (32, 0)
    assert handle.layers["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v"] == (64, 1)
    assert isinstance(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k, nn.Linear)
    assert "forward" not in vars(unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_k)
    with torch.no_grad():
        got = unet(x, t, ctx)
        want = _toy_reference(unet, [(hn, 0.6)])(x, t, ctx)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(got, base, atol=1e-3)
    # base keys unchanged; the hypernetwork shows under sdadapt.<name>.*
    new_keys = [k for k in unet.state_dict() if k not in keys]
    assert [k for k in unet.state_dict() if k in keys] == keys
    assert new_keys and all(k.startswith("sdadapt.default.layers.") for k in new_keys)
    handle.set_strength(0.0)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx), base)
    handle.set_strength(-1.5)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx), _toy_reference(unet, [(hn, -1.5)])(x, t, ctx),
                                   rtol=1e-10, atol=1e-10)
    handle.remove()
    handle.remove()  # idempotent
    assert list(unet.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx), base)
    with pytest.raises(RuntimeError, match="was removed"):
        handle.set_strength(1.0)


def test_two_hypernetworks_chain_in_injection_order_and_gradients_reach_them():
    unet = build_toy(seed=2).unet.double().eval()
    x, t, ctx = _toy_inputs(1)
    first = Hypernetwork([64], HypernetworkConfig(activation="tanh"))
    second = Hypernetwork([64, 32], HypernetworkConfig(layer_structure=(1, 1, 1), layer_norm=True))
    for i, hn in enumerate((first, second)):
        _randomise(hn, seed=i)
        hn.double()
    h1 = inject_hypernetwork(unet, first, strength=0.5, name="a")
    h2 = inject_hypernetwork(unet, second, strength=1.0, name="b")
    with pytest.raises(ValueError, match="already injected"):
        inject_hypernetwork(unet, second, name="b")
    out = unet(x, t, ctx)
    with torch.no_grad():
        want = _toy_reference(unet, [(first, 0.5), (second, 1.0)])(x, t, ctx)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in h1.parameters())
    assert all(p.grad is not None for p in h2.parameters())
    h1.remove()  # the other stays
    assert list(unet.sdadapt.keys()) == ["b"]
    h2.remove()
    assert "sdadapt" not in unet._modules


def test_injection_on_a_tiny_diffusers_unet_matches_a_reference_processor():
    unet = tiny_unet_sd1().double()
    (x, t, ctx), _ = unet_inputs(unet)
    x, ctx = x.double(), ctx.double()
    assert sorted(set(context_widths(unet).values())) == [32, 64]
    # (16: a width no layer of this UNet takes, as SD2's 1024 on SD1 — a 1024-wide MLP pair was most of the setup)
    hn = Hypernetwork([32, 64, 16], HypernetworkConfig(activation="relu", layer_structure=(1, 2, 2, 1)))
    _randomise(hn)
    hn.double()
    with torch.no_grad():
        base = unet(x, t, ctx).sample
    keys = list(unet.state_dict())
    handle = inject_hypernetwork(unet, hn, strength=0.8)
    assert handle.unused_widths == (16,)
    assert all(name.endswith(("attn1.to_k", "attn1.to_v", "attn2.to_k", "attn2.to_v")) for name in handle.layers)
    with torch.no_grad():
        got = unet(x, t, ctx).sample

    refs = [a1111_reference(hn, 0.8)]

    class A1111Processor:  # diffusers' attention with A1111's context_k / context_v
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
            return _a1111_attention(attn, refs, hidden_states, encoder_hidden_states)

    reference = _plain_copy(unet)
    reference.set_attn_processor(A1111Processor())
    with torch.no_grad():
        want = reference(x, t, ctx).sample
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(got, base, atol=1e-4)
    handle.remove()
    assert list(unet.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, base)


def test_fused_projections_and_unmatched_widths_are_refused():
    unet = tiny_unet_sd1()
    # (one Linear per MLP: the refusal reads the widths only; the default 1, 2, 1 MLPs were most of this test's time)
    sd_widths = Hypernetwork([768, 320, 640, 1280], HypernetworkConfig(layer_structure=(1, 1)), name="anime")
    with pytest.raises(ValueError, match=r"\[768, 320, 640, 1280\].*context widths \[32, 64\]"):
        inject_hypernetwork(unet, sd_widths)
    unet.fuse_qkv_projections()
    with pytest.raises(ValueError, match="unfuse_qkv_projections"):
        inject_hypernetwork(unet, Hypernetwork([32]))
    with pytest.raises(ValueError, match="no nn.Linear layers named 'k_proj'/'v_proj'"):
        inject_hypernetwork(build_toy().unet, Hypernetwork([64]), kv_names=("k_proj", "v_proj"))
    assert "sdadapt" not in unet._modules


def test_injection_arguments_are_checked():
    unet = build_toy().unet
    hn = Hypernetwork([64])
    with pytest.raises(TypeError, match="Hypernetwork"):
        inject_hypernetwork(unet, {"768": 1})  # type: ignore[arg-type]
    for bad in (float("nan"), "1", True):
        with pytest.raises(ValueError, match="strength"):
            inject_hypernetwork(unet, hn, strength=bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="without dots"):
        inject_hypernetwork(unet, hn, name="a.b")
    assert "sdadapt" not in unet._modules


class _LDMCrossAttention(nn.Module):
    """ldm.modules.attention.CrossAttention's layout (to_q, to_k, to_v, to_out.0)."""

    def __init__(self, dim, context_dim, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        b, n, d = x.shape
        q = self.to_q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k = self.to_k(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.heads, -1).transpose(1, 2)
        return self.to_out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d))


class _LDMBlock(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.attn1, self.attn2 = _LDMCrossAttention(dim, dim), _LDMCrossAttention(dim, context_dim)

    def forward(self, x, context):
        x = x + self.attn1(x)
        return x + self.attn2(x, context)


class _LDMSpatialTransformer(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_LDMBlock(dim, context_dim)])


class _LDMUNet(nn.Module):
    """LDM/compvis names: input_blocks.1.1.transformer_blocks.0.attn1.to_k, middle_block.1..., output_blocks."""

    def __init__(self):
        super().__init__()
        self.input_blocks = nn.ModuleList([nn.ModuleList([nn.Identity()]),
                                           nn.ModuleList([nn.Linear(16, 16), _LDMSpatialTransformer(16, 24)])])
        self.middle_block = nn.ModuleList([nn.Linear(16, 16), _LDMSpatialTransformer(16, 24)])

    def forward(self, x, context):
        for stage in (self.input_blocks[1], self.middle_block):
            x = stage[1].transformer_blocks[0](stage[0](x), context)
        return x


def test_injection_on_ldm_names():
    torch.manual_seed(0)
    unet = _LDMUNet().double()
    x, ctx = torch.randn(2, 5, 16, dtype=torch.float64), torch.randn(2, 3, 24, dtype=torch.float64)
    hn = Hypernetwork([24, 16], HypernetworkConfig(activation="elu"))
    _randomise(hn)
    hn.double()
    handle = inject_hypernetwork(unet, hn)
    assert sorted(handle.layers) == sorted(
        f"{block}.transformer_blocks.0.{attn}.{proj}" for block in ("input_blocks.1.1", "middle_block.1")
        for attn in ("attn1", "attn2") for proj in ("to_k", "to_v")
    )
    got = unet(x, ctx)
    reference = _plain_copy(unet)
    refs = [a1111_reference(hn)]
    for name, module in reference.named_modules():
        if name.endswith(("attn1", "attn2")):
            module.heads = 2
            module.forward = types.MethodType(_a1111_attention_forward(refs), module)
            module.to_out = nn.ModuleList([module.to_out[0], module.to_out[1]])
    torch.testing.assert_close(got, reference(x, ctx), rtol=1e-10, atol=1e-10)
    handle.remove()
    assert "sdadapt" not in unet._modules


def test_hypernetwork_in_float32_on_a_half_context_casts_back():
    unet = build_toy(seed=3).unet.eval()
    hn = Hypernetwork([64])
    _randomise(hn)
    handle = inject_hypernetwork(unet, hn)
    layer = unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_k
    layer.to(torch.bfloat16)
    hn.to(torch.float32)
    ctx = torch.randn(1, 4, 64, dtype=torch.bfloat16)
    out = layer(ctx)
    assert out.dtype == torch.bfloat16
    want = F.linear(hn.pair(64)[0](ctx.float()).to(torch.bfloat16), layer.weight)
    assert torch.equal(out, want)
    # a keyword call (input=...) is transformed too
    assert torch.equal(layer(input=ctx), out)
    handle.remove()


def test_docs_page_example_runs():
    namespace = run_block("hypernetworks.md")
    assert namespace["hn"].name == "purple" and namespace["hn"].widths == (32, 64)
    assert "sdadapt" not in namespace["unet"]._modules
    losses = namespace["losses"]
    assert len(losses) == 60 and all(math.isfinite(v) for v in losses)
    mine = sdadapt.load_hypernetwork(Path(namespace["folder"]) / "mine.safetensors")
    assert mine.config == namespace["config"]
