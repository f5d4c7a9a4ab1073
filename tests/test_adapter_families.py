"""The property suite every registered adapter family passes (LoRA/LoCon, LoHa, LoKr, full, DoRA).

It runs over ``sdadapt.adapters.FAMILIES`` and each family's registered example configs, on a
linear layer, a 1x1 convolution and a strided 3x3 convolution. The float64 references below are
written from the published definitions (see docs/lycoris.md), not from sdadapt's functions.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import sdadapt
from sdadapt.adapters import FAMILIES, DoRAConfig, GLoRAConfig, LoHaConfig, LoKrConfig, LoRAConfig, build_adapter, geometry_of
from sdadapt.formats import load_lora, save_lora

# --------------------------------------------------------------------------- float64 references


def _scale(t: dict, rank: int | None) -> float:
    if rank is None:
        return 1.0
    alpha = float(t["alpha"]) if "alpha" in t else float(rank)
    return (alpha or rank) / rank


def ref_lora(t: dict, shape: tuple) -> torch.Tensor:
    up, down = t["lora_up.weight"].double(), t["lora_down.weight"].double()
    out, r = up.shape[:2]
    up = up.reshape(out, r)
    if "lora_mid.weight" in t:  # ΔW[o,i,..] = Σ_ab up[o,a] mid[a,b,..] down[b,i]
        mid = t["lora_mid.weight"].double()
        w = torch.einsum("oa,ab...,bi->oi...", up, mid, down.reshape(r, -1))
    else:
        w = (up @ down.reshape(r, -1)).reshape(shape)
    return w * _scale(t, r)


def ref_loha(t: dict, shape: tuple) -> torch.Tensor:
    d = {k: v.double() for k, v in t.items()}
    r = d["hada_w1_b"].shape[0]
    if "hada_t1" in d:  # T(t, a, b)[p,q,..] = Σ_ij t[i,j,..] a[i,p] b[j,q]
        h1 = torch.einsum("ij...,ip,jq->pq...", d["hada_t1"], d["hada_w1_a"], d["hada_w1_b"])
        h2 = torch.einsum("ij...,ip,jq->pq...", d["hada_t2"], d["hada_w2_a"], d["hada_w2_b"])
        w = h1 * h2
    else:
        w = ((d["hada_w1_a"] @ d["hada_w1_b"]) * (d["hada_w2_a"] @ d["hada_w2_b"])).reshape(shape)
    return w * _scale(t, r)


def ref_lokr(t: dict, shape: tuple) -> torch.Tensor:
    d = {k: v.double() for k, v in t.items()}
    kernel = tuple(shape[2:])
    w1 = d["lokr_w1"] if "lokr_w1" in d else d["lokr_w1_a"] @ d["lokr_w1_b"]
    a, c = w1.shape
    b, dd = shape[0] // a, shape[1] // c
    if "lokr_w2" in d:
        w2 = d["lokr_w2"]
    elif "lokr_t2" in d:
        w2 = torch.einsum("ij...,ip,jq->pq...", d["lokr_t2"], d["lokr_w2_a"], d["lokr_w2_b"])
    else:
        w2 = (d["lokr_w2_a"] @ d["lokr_w2_b"]).reshape(b, dd, *kernel)
    # Kronecker product by its definition: ΔW[i·b + j, l·d + m] = w1[i, l] · w2[j, m]
    w = torch.zeros(shape, dtype=torch.float64)
    for i in range(a):
        for l in range(c):
            w[i * b : (i + 1) * b, l * dd : (l + 1) * dd] = w1[i, l] * w2
    ranks = [d[k].shape[0] for k in ("lokr_w1_b", "lokr_w2_b") if k in d]
    return w * _scale(t, ranks[0] if ranks else None)


def ref_full(t: dict, shape: tuple) -> torch.Tensor:
    return t["diff"].double().reshape(shape)


def ref_dora(t: dict, shape: tuple, base: torch.Tensor) -> torch.Tensor:
    inner = {k: v for k, v in t.items() if k != "dora_scale"}
    family = sdadapt.adapters.registry.family_of_keys(inner).name
    v = base.double() + REFERENCES[family](inner, shape)
    m = t["dora_scale"].double()
    if m.shape[0] == shape[0] and m.shape[1] == 1:  # per output row
        norm = v.reshape(shape[0], -1).norm(dim=1).reshape(m.shape)
    else:  # per input column
        norm = v.transpose(0, 1).reshape(shape[1], -1).norm(dim=1).reshape(m.shape)
    return m * v / norm - base.double()  # the merge delta W' − W


def ref_ia3(t: dict, base: torch.Tensor) -> torch.Tensor:
    """ΔW[o, i, ...] = w[o] · W[o, i, ...] (on_input: w[i] · W[o, i, ...]); the bias is not scaled."""
    w, b = t["weight"].double().flatten(), base.double()
    out = torch.empty_like(b)
    for o in range(b.shape[0]):
        for i in range(b.shape[1]):
            out[o, i] = (w[i] if int(t["on_input"]) else w[o]) * b[o, i]
    return out


def _cayley64(blocks: torch.Tensor, bound: float) -> torch.Tensor:
    """R = (I + Q)(I − Q)⁻¹ per block, Q = A − Aᵀ scaled to norm ``bound`` when over it (one norm, all blocks)."""
    q = blocks.double() - blocks.double().transpose(-1, -2)
    norm = q.norm() + 1e-8
    if bound > 0 and norm > bound:
        q = q * bound / norm
    eye = torch.eye(q.shape[-1], dtype=torch.float64)
    return (eye + q) @ torch.linalg.inv(eye - q)


def _butterfly_permutation(out: int, half: int) -> torch.Tensor:
    """P with (P W)[p] = W[o]: row o = c·2h + g·h + t moves to p = c·2h + 2t + g (rows h apart become neighbours)."""
    p = torch.zeros(out, out, dtype=torch.float64)
    for o in range(out):
        c, rest = divmod(o, 2 * half)
        g, t = divmod(rest, half)
        p[c * 2 * half + 2 * t + g, o] = 1.0
    return p


def ref_oft(t: dict, base: torch.Tensor) -> torch.Tensor:
    """Diag-OFT: W' = diag(R_k)ᵀ W; BOFT: W' = Π_i P_iᵀ diag(R_ik) P_i W; then rows · rescale; ΔW = W' − W."""
    w = base.double().reshape(base.shape[0], -1)  # (out, in·k)
    out = w.shape[0]
    blocks = t["oft_blocks"]
    rotations = _cayley64(blocks, float(t.get("alpha", torch.tensor(0.0))) * out)
    if blocks.dim() == 3:
        merged = torch.block_diag(*rotations).T @ w
    else:
        merged, b = w, blocks.shape[-1]
        for i in range(blocks.shape[0]):
            p = _butterfly_permutation(out, 2**i * b // 2)
            merged = p.T @ torch.block_diag(*rotations[i]) @ p @ merged
    if "rescale" in t:
        merged = t["rescale"].double().reshape(out, 1) * merged
    return (merged - w).reshape(base.shape)


def ref_norm(t: dict, base: torch.Tensor) -> torch.Tensor:
    """LyCORIS norm offsets: w' = w + w_norm, so ΔW = w_norm (C,)."""
    return t["w_norm"].double().reshape(base.shape)


def ref_glora(t: dict, base: torch.Tensor) -> torch.Tensor:
    """LyCORIS GLoRA: ΔW[o, j, ...] = s · (Σ_i W[o, i, ...] (a1 a2)[i, j] + (b1 b2)[o, (j, ...)]), s = alpha / r."""
    a1, a2 = t["a1.weight"].double().flatten(1), t["a2.weight"].double().flatten(1)  # (in, r), (r, in)
    b1, b2 = t["b1.weight"].double().flatten(1), t["b2.weight"].double()  # (out, r), (r, in, *k)
    w, r = base.double(), a2.shape[0]
    mix = a1 @ a2
    out = torch.zeros_like(w)
    for j in range(w.shape[1]):
        for i in range(w.shape[1]):
            out[:, j] += w[:, i] * mix[i, j]
    out += (b1 @ b2.reshape(r, -1)).reshape(w.shape)
    return out * _scale(t, r)


REFERENCES = {"lora": ref_lora, "loha": ref_loha, "lokr": ref_lokr, "full": ref_full, "ia3": ref_ia3, "oft": ref_oft, "glora": ref_glora, "norm": ref_norm}


def reference_delta(family: str, tensors: dict, base: torch.Tensor) -> torch.Tensor:
    shape = tuple(base.shape)
    if family == "dora":
        return ref_dora(tensors, shape, base)
    if family in ("ia3", "oft", "glora", "norm"):  # multiplicative: the delta is made from the base weight
        return REFERENCES[family](tensors, base)
    return REFERENCES[family](tensors, shape)


def reference_bias_delta(tensors: dict) -> torch.Tensor | None:
    for key in ("diff_b", "b_norm"):
        if key in tensors:
            return tensors[key].double()
    return None


# --------------------------------------------------------------------------- cases

LAYERS = {
    "linear": lambda: nn.Linear(6, 8),
    "conv1x1": lambda: nn.Conv2d(6, 8, 1),
    "conv3x3": lambda: nn.Conv2d(4, 8, 3, stride=2, padding=1),
}
#: the layers of the families that adapt normalisation layers (LyCORIS norm modules)
NORM_LAYERS = {
    "groupnorm": lambda: nn.GroupNorm(2, 8),
    "layernorm": lambda: nn.LayerNorm(8),
}


def _input(layer_kind: str, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = {"linear": (3, 5, 6), "conv1x1": (2, 6, 5, 5), "conv3x3": (2, 4, 7, 7), "groupnorm": (2, 8, 5, 5),
             "layernorm": (3, 5, 8)}[layer_kind]
    return torch.randn(shape, generator=g, dtype=dtype)


def _model(layer_kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential({**LAYERS, **NORM_LAYERS}[layer_kind]())


def _op(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The base layer's own op with the given weight and bias."""
    if isinstance(layer, nn.Linear):
        return nn.functional.linear(x, weight, bias)
    if isinstance(layer, nn.GroupNorm):
        return nn.functional.group_norm(x, layer.num_groups, weight, bias, layer.eps)
    if isinstance(layer, nn.LayerNorm):
        return nn.functional.layer_norm(x, layer.normalized_shape, weight, bias, layer.eps)
    return layer._conv_forward(x, weight, bias)


CASES = [
    pytest.param(name, config, kind, id=f"{name}{i}-{kind}")
    for name, family in FAMILIES.items()
    for i, config in enumerate(family.examples)
    for kind in (NORM_LAYERS if family.module_type.adapts_norms else LAYERS)
]
TARGET = sdadapt.by_type(nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)


def randomize(handle, seed: int = 3, std: float = 0.4) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in handle.modules.values():
            for name, p in adapter.named_parameters():
                noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * std
                if name.endswith("dora_scale"):  # magnitudes: positive, near the init
                    p.mul_(1 + noise.abs())
                else:
                    p.copy_(noise)


def _layer(model):
    return model[0]


def test_every_family_has_examples_and_a_reference():
    assert {"lora", "loha", "lokr", "full", "dora"} <= set(FAMILIES)
    for name, family in FAMILIES.items():
        assert family.examples, f"family {name} registers no example configs"
        assert name == "dora" or name in REFERENCES, f"no float64 reference for family {name}"


@pytest.mark.parametrize("family, config, kind", CASES)
def test_identity_at_init(family, config, kind):
    model = _model(kind)
    x = _input(kind)
    with torch.no_grad():
        before = model(x)
        handle = sdadapt.inject(model, TARGET, config)
        after = model(x)
    assert torch.equal(before, after)
    assert all(a.family == family for a in handle.modules.values())


@pytest.mark.parametrize("family, config, kind", CASES)
def test_module_equals_functional_and_reference(family, config, kind):
    model = _model(kind)
    layer = _layer(model)
    x = _input(kind)
    handle = sdadapt.inject(model, TARGET, config)
    randomize(handle)
    adapter = handle.modules["0"]
    base = layer.weight.detach()
    with torch.no_grad():
        y = model(x)
        merge = adapter.merge_delta(base)
        # the hook's Δy equals the layer's own op applied with the merged weight (+ bias delta)
        bias = adapter.bias_delta()
        expected = _op(layer, x, base + merge, layer.bias if bias is None else layer.bias + bias)
        assert torch.allclose(y, expected, atol=1e-5, rtol=1e-5)
        # the merge delta equals the float64 reference from the published definition
        tensors = {k: v.detach() for k, v in adapter.file_tensors().items()}
        ref = reference_delta(family, tensors, base)
        assert merge.dtype == torch.float32 and tuple(merge.shape) == tuple(base.shape)
        assert torch.allclose(merge.double(), ref, atol=1e-5, rtol=1e-5), (merge.double() - ref).abs().max()
        assert ref.abs().max() > 1e-3, "randomized adapter should have a non-trivial delta"
        ref_bias = reference_bias_delta(tensors)
        if ref_bias is not None:
            assert torch.allclose(bias.double(), ref_bias)


@pytest.mark.parametrize("family, config, kind", CASES)
def test_merge_unmerge_exact_and_scale_is_linear(family, config, kind):
    model = _model(kind)
    layer = _layer(model)
    x = _input(kind)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    handle = sdadapt.inject(model, TARGET, config)
    randomize(handle)
    with torch.no_grad():
        base_model = _model(kind)
        base_model.load_state_dict(original)
        y_base = base_model(x)
        y = model(x)
        handle.merge()
        assert not torch.equal(layer.weight, original["0.weight"])
        y_merged = model(x)
        assert torch.allclose(y_merged, y, atol=1e-5, rtol=1e-5)
        handle.set_scale(0.5)  # merged weights follow the strength
        y_half_merged = model(x)
        handle.unmerge()
        for key, value in original.items():  # unmerge restores the original bits (bias too)
            assert torch.equal(model.state_dict()[key], value), key
        y_half = model(x)
        assert torch.allclose(y_half_merged, y_half, atol=1e-5, rtol=1e-5)
        # strength t moves the output linearly: y(t) = y_base + t · (y(1) − y_base)
        assert torch.allclose(y_half - y_base, 0.5 * (y - y_base), atol=1e-5, rtol=1e-4)
        handle.remove()
        assert torch.equal(model(x), y_base)


@pytest.mark.parametrize("family, config, kind", CASES)
def test_state_dict_round_trip_into_fresh_model_and_file(family, config, kind, tmp_path):
    model = _model(kind)
    x = _input(kind)
    handle = sdadapt.inject(model, TARGET, config)
    randomize(handle)
    state = handle.state_dict()
    with torch.no_grad():
        y = model(x)
    # load_adapter rebuilds the same family from the tensors alone
    fresh = _model(kind)
    loaded = sdadapt.load_adapter(fresh, state)
    assert type(loaded.modules["0"]) is type(handle.modules["0"])
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    # load_state_dict into an injected twin (same config) restores the same outputs
    twin = _model(kind)
    twin_handle = sdadapt.inject(twin, TARGET, config)
    twin_handle.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(twin(x), y)
    # save_lora / load_lora (kohya / LyCORIS naming) keeps every tensor bit for bit
    path = tmp_path / "adapter.safetensors"
    save_lora(path, {"unet": state}, format="kohya")
    components, metadata = load_lora(path)
    assert set(components["unet"]) == set(state)
    for key, value in state.items():
        got = components["unet"][key]
        assert got.dtype == value.dtype and torch.equal(got, value), key
    plain_lora = family == "lora" and not any(k.endswith("lora_mid.weight") for k in state)
    expected_module = "networks.lora" if plain_lora else "lycoris.kohya"
    assert metadata["ss_network_module"] == expected_module
    again = _model(kind)
    sdadapt.load_adapter(again, components["unet"])
    with torch.no_grad():
        assert torch.equal(again(x), y)


@pytest.mark.parametrize("family, config, kind", CASES)
def test_apply_lora_equals_merge_and_undo_is_exact(family, config, kind):
    model = _model(kind)
    x = _input(kind)
    handle = sdadapt.inject(model, TARGET, config)
    randomize(handle)
    state = handle.state_dict()
    handle.set_scale(0.7)
    with torch.no_grad():
        y = model(x)
    target = _model(kind)
    original = {k: v.clone() for k, v in target.state_dict().items()}
    applied = sdadapt.apply_lora(target, state, scale=0.7)
    with torch.no_grad():
        assert torch.allclose(target(x), y, atol=1e-5, rtol=1e-5)
    applied.undo()
    for key, value in original.items():
        assert torch.equal(target.state_dict()[key], value), key


@pytest.mark.parametrize("family, config, kind", CASES)
def test_gradients_reach_every_adapter_parameter(family, config, kind):
    model = _model(kind)
    handle = sdadapt.inject(model, TARGET, config)
    randomize(handle)
    model(_input(kind)).square().mean().backward()
    for adapter in handle.modules.values():
        for name, p in adapter.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert all(p.grad is None for n, p in model.named_parameters() if ".sdadapt." not in f".{n}")


@settings(max_examples=12, deadline=None)
@given(
    family=st.sampled_from(["lora", "loha", "lokr", "dora", "glora"]),
    out_f=st.sampled_from([4, 6, 9, 12]),
    in_f=st.sampled_from([2, 6, 8, 10]),
    kernel=st.sampled_from([(), (1, 1), (3, 3), (1, 3)]),
    rank=st.integers(1, 4),
    tucker=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_merge_delta_matches_reference_over_shapes(family, out_f, in_f, kernel, rank, tucker, dtype, seed):
    torch.manual_seed(seed)
    layer = nn.Linear(in_f, out_f) if not kernel else nn.Conv2d(in_f, out_f, kernel, padding=tuple(k // 2 for k in kernel))
    layer = layer.to(dtype)
    geometry = geometry_of(layer)
    inner = {
        "lora": LoRAConfig(rank=rank, alpha=1.5, use_tucker=tucker),
        "loha": LoHaConfig(rank=rank, alpha=1.5, use_tucker=tucker),
        "lokr": LoKrConfig(rank=rank, alpha=1.5, use_tucker=tucker, decompose_both=bool(seed % 2)),
        "dora": LoHaConfig(rank=rank, alpha=1.5, use_tucker=tucker),
        "glora": GLoRAConfig(rank=rank, alpha=1.5),
    }[family]
    config = DoRAConfig(inner, wd_on_out=bool(seed % 2)) if family == "dora" else inner
    adapter = build_adapter(config, geometry, dtype=dtype)
    if family == "dora":
        adapter.init_from_base(layer.weight)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.shape == adapter.file_tensors().get("dora_scale", torch.empty(0)).shape else 0.0))
    base = layer.weight.detach()
    with torch.no_grad():
        got = adapter.merge_delta(base)
        ref = reference_delta(family, {k: v.detach() for k, v in adapter.file_tensors().items()}, base)
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        assert got.dtype == dtype
        assert torch.allclose(got.double(), ref, atol=tol * max(1.0, ref.abs().max().item()), rtol=tol)
        x = torch.randn(2, in_f, *([5] * len(kernel)), dtype=dtype) if kernel else torch.randn(3, in_f, dtype=dtype)
        out = adapter.delta_output(x, base)
        assert torch.allclose(out, geometry.conv(x, got), atol=tol * 10 * max(1.0, out.abs().max().item()), rtol=tol * 10)


def test_dora_norm_is_detached_in_backward():
    """The gradient equals the reference with ‖W + ΔW‖ held constant (paper §4.3, peft)."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    model = nn.Sequential(layer)
    handle = sdadapt.inject(model, TARGET, DoRAConfig(LoRAConfig(rank=2, alpha=2.0)))
    randomize(handle)
    adapter = handle.modules["0"]
    x = _input("linear")
    model(x).square().sum().backward()
    up = adapter.inner.lora_up.detach().clone().requires_grad_()
    down = adapter.inner.lora_down.detach().clone().requires_grad_()
    m = adapter.dora_scale.detach().clone().requires_grad_()
    w = layer.weight.detach()
    v = w + (up @ down) * (2.0 / 2)
    w_new = m * v / v.norm(dim=1, keepdim=True).detach()
    nn.functional.linear(x, w_new, layer.bias).square().sum().backward()
    assert torch.allclose(adapter.inner.lora_up.grad, up.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(adapter.inner.lora_down.grad, down.grad, atol=1e-4, rtol=1e-4)
    assert torch.allclose(adapter.dora_scale.grad, m.grad, atol=1e-4, rtol=1e-4)
    # and it differs from back-propagating through the norm (LyCORIS's choice)
    up2 = up.detach().clone().requires_grad_()
    v2 = w + up2 @ down.detach()
    nn.functional.linear(x, m.detach() * v2 / v2.norm(dim=1, keepdim=True), layer.bias).square().sum().backward()
    assert not torch.allclose(up2.grad, up.grad, atol=1e-4)


def test_dora_next_to_a_merged_lora_uses_the_original_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8))
    x = _input("linear")
    lora = sdadapt.inject(model, TARGET, LoRAConfig(rank=2), name="lora")
    dora = sdadapt.inject(model, TARGET, DoRAConfig(LoKrConfig(rank=1, factor=2)), name="dora")
    randomize(lora, seed=1)
    randomize(dora, seed=2)
    with torch.no_grad():
        y = model(x)
        for first, second in ((lora, dora), (dora, lora)):
            first.merge()
            assert torch.allclose(model(x), y, atol=1e-5)
            second.merge()
            assert torch.allclose(model(x), y, atol=1e-5)
            first.unmerge()
            second.unmerge()
            assert torch.equal(model(x), y)


def test_full_bias_delta_on_a_layer_without_bias():
    model = nn.Sequential(nn.Linear(6, 8, bias=False))
    x = _input("linear")
    state = {"0.diff": torch.randn(8, 6), "0.diff_b": torch.randn(8)}
    handle = sdadapt.load_adapter(model, state)
    with torch.no_grad():
        assert torch.allclose(model(x), x @ state["0.diff"].T + state["0.diff_b"] + x @ model[0].weight.T, atol=1e-5)
    with pytest.raises(RuntimeError, match="no bias"):
        handle.merge()
    with pytest.raises(ValueError, match="no bias"):
        sdadapt.apply_lora(nn.Sequential(nn.Linear(6, 8, bias=False)), state)


@pytest.mark.parametrize(
    "state, message",
    [
        ({"0.hada_w1_a": torch.zeros(8, 2), "0.hada_w1_b": torch.zeros(2, 5), "0.hada_w2_a": torch.zeros(8, 2), "0.hada_w2_b": torch.zeros(2, 5)}, "LoHa shapes"),
        ({"0.hada_w1_a": torch.zeros(8, 2)}, "missing"),
        ({"0.lokr_w1": torch.zeros(2, 2), "0.lokr_w2": torch.zeros(4, 4)}, "do not fit"),
        ({"0.lokr_w1": torch.zeros(2, 2)}, "LoKr needs"),
        ({"0.lora_down.weight": torch.zeros(2, 6), "0.lora_up.weight": torch.zeros(8, 2), "0.dora_scale": torch.ones(3, 1)}, "fits neither"),
        ({"0.diff": torch.zeros(6, 8)}, "do not fit"),
    ],
)
def test_bad_file_tensors_name_the_layer_and_change_nothing(state, message):
    model = _model("linear")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as info:
        sdadapt.load_adapter(model, state)
    assert "0" in str(info.value)
    assert set(model.state_dict()) == set(before)
    assert all(p.requires_grad for p in model.parameters())


def test_unknown_config_is_rejected_before_touching_the_model():
    model = _model("linear")
    with pytest.raises(TypeError, match="LoHaConfig"):
        sdadapt.inject(model, TARGET, object())
    assert all(p.requires_grad for p in model.parameters())


def test_lokr_both_full_has_scale_one_whatever_alpha_says():
    geometry = geometry_of(nn.Linear(6, 8))
    tensors = {"lokr_w1": torch.randn(2, 2), "lokr_w2": torch.randn(4, 3), "alpha": torch.tensor(0.25)}
    adapter = sdadapt.adapters.LoKrModule.from_file_tensors(geometry, tensors)
    assert torch.allclose(adapter.delta_weight(), torch.kron(tensors["lokr_w1"], tensors["lokr_w2"]))
    assert float(adapter.file_tensors()["alpha"]) == 0.25  # kept for an exact round trip
    assert math.isclose(float(adapter.scale), 1.0)
