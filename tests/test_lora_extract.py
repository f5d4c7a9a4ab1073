"""LoRA tools math: extraction (SVD, dynamic rank, clamp), resize, combine, merge into weights.

Every operator is checked against a naive float64 reference written here (numpy or plain loops),
plus the invariants that define it: Eckart–Young for truncation, exactness of rank
concatenation, preserved alpha/rank for resize.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.adapters.lora import lora_delta_weight
from sdadapt.loratools.checkpoint_layers import checkpoint_layers, detect_base_model, is_lora_target
from sdadapt.loratools.combine import add_delta, combine_lora_states, concat_layers, layer_delta
from sdadapt.loratools.extract import (
    clamp_factors,
    extract_layer,
    low_rank_factors,
    select_rank,
    truncated_svd,
)
from sdadapt.loratools.resize import factored_svd, resize_layer, resize_lora_state
from docs_pages import run_block_with

SETTINGS = settings(max_examples=15, deadline=None)


def _product(layer) -> torch.Tensor:
    """(alpha / r) · up ⋅ down as a dense (out, in·k) float64 matrix, written out naively."""
    r = layer.down.shape[0]
    up = layer.up.double().reshape(layer.up.shape[0], r)
    down = layer.down.double().reshape(r, -1)
    return (layer.alpha / r) * (up @ down)


def _naive_rank(s: np.ndarray, method: str, param: float, cap: int) -> int:
    """kohya's resize_lora.py rules, as loops."""
    n = len(s)
    if method == "fixed":
        return min(cap, n)
    if method == "sv_ratio":
        index = sum(1 for v in s if v > s[0] / param)
    elif method == "sv_cumulative":
        total, acc, index = s.sum(), 0.0, n
        for i, v in enumerate(s):
            acc += v
            if acc / total >= param:
                index = i + 1
                break
    else:
        total, acc, index = (s**2).sum(), 0.0, n
        for i, v in enumerate(s):
            acc += v * v
            if acc / total >= param**2:
                index = i + 1
                break
    if s[0] <= 1e-6:
        return 1
    index = max(1, min(index, n - 1)) + 1
    return max(1, min(index, cap))


# ----------------------------------------------------------------------------------- rank choice
@SETTINGS
@given(
    st.lists(st.floats(0.0, 10.0), min_size=2, max_size=12),
    st.sampled_from(["fixed", "sv_ratio", "sv_cumulative", "sv_fro"]),
    st.floats(0.05, 1.0),
    st.integers(1, 16),
)
def test_select_rank_matches_kohya_rules(values, method, fraction, cap):
    s = np.sort(np.asarray(values))[::-1].copy()
    param = 1.0 + 20 * fraction if method == "sv_ratio" else fraction
    got = select_rank(torch.tensor(s), method=method, param=param, max_rank=cap)
    assert got == _naive_rank(s, method, param, cap)


def test_select_rank_examples_and_errors():
    s = torch.tensor([10.0, 5.0, 1.0, 0.5, 0.1])
    # 10 and 5 are > 10/4; kohya then adds one
    assert select_rank(s, method="sv_ratio", param=4, max_rank=8) == 3
    # (100+25)/126.26 = 0.99 >= 0.9**2 at two values, +1
    assert select_rank(s, method="sv_fro", param=0.9, max_rank=8) == 3
    assert select_rank(s, method="sv_fro", param=0.9, max_rank=2) == 2  # capped
    assert select_rank(torch.zeros(5), method="sv_fro", param=0.9, max_rank=8) == 1  # zero difference
    with pytest.raises(ValueError, match="needs a parameter"):
        select_rank(s, method="sv_ratio", max_rank=4)
    with pytest.raises(ValueError, match=">= 1"):
        select_rank(s, method="sv_ratio", param=0.5, max_rank=4)
    with pytest.raises(ValueError, match="one of"):
        select_rank(s, method="svd", param=0.5, max_rank=4)


# ------------------------------------------------------------------------------------ extraction
@SETTINGS
@given(
    st.integers(2, 12),
    st.integers(2, 12),
    st.sampled_from([(), (1, 1), (3, 3)]),
    st.integers(1, 6),
    st.sampled_from([None, 1.0, 3.5]),
    st.sampled_from(["up", "sqrt"]),
    st.integers(0, 2**16),
)
def test_extraction_error_is_eckart_young_bound(out_f, in_f, kernel, rank, alpha, split, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(out_f, in_f, *kernel, generator=g, dtype=torch.float64)
    tuned = base + torch.randn(base.shape, generator=g, dtype=torch.float64)
    layer = extract_layer(base, tuned, rank=rank, alpha=alpha, clamp_quantile=None, split=split)
    diff = (tuned - base).reshape(out_f, -1).numpy()
    s = np.linalg.svd(diff, compute_uv=False)  # naive reference spectrum
    r = min(rank, min(diff.shape))
    assert layer.rank == r and layer.down.shape == (r, in_f, *kernel)
    assert layer.up.shape == (out_f, r, *([1, 1] if kernel else []))
    assert layer.alpha == (r if alpha is None else alpha)
    error = np.linalg.norm(diff - _product(layer).numpy())
    bound = math.sqrt(float((s[r:] ** 2).sum()))
    assert error == pytest.approx(bound, rel=1e-9, abs=1e-9)
    assert layer.residual_norm == pytest.approx(bound, rel=1e-9, abs=1e-9)
    assert np.allclose(layer.singular_values.numpy(), s)
    # the same delta through the library's own LoRA formula
    delta = lora_delta_weight(layer.up, layer.down, layer.alpha / r).reshape(out_f, -1)
    assert np.allclose(delta.numpy(), _product(layer).numpy())
    # kohya's split puts S into up: down has orthonormal rows when alpha == r
    if split == "up" and alpha is None:
        d = layer.down.reshape(r, -1)
        assert torch.allclose(d @ d.T, torch.eye(r, dtype=torch.float64), atol=1e-9)


def test_clamp_matches_kohya_reference():
    g = torch.Generator().manual_seed(3)
    diff = torch.randn(24, 40, generator=g, dtype=torch.float64) ** 3  # heavy tails: clamping bites
    up, down, alpha, s, _, _ = low_rank_factors(diff, rank=6, clamp_quantile=0.9)
    # kohya extract_lora_from_models.py, step by step, from the same SVD
    u, s_ref, vh = torch.linalg.svd(diff, full_matrices=False)
    ref_up = (u[:, :6] @ torch.diag(s_ref[:6])).numpy()
    ref_down = vh[:6].numpy()
    hi = np.quantile(np.concatenate([ref_up.ravel(), ref_down.ravel()]), 0.9)
    assert np.allclose(up.numpy(), np.clip(ref_up, -hi, hi))
    assert np.allclose(down.numpy(), np.clip(ref_down, -hi, hi))
    assert alpha == 6.0
    clipped = (np.abs(ref_up) > hi).sum() + (np.abs(ref_down) > hi).sum()
    assert clipped > 0  # the test exercised the clamp
    # disabled clamp = plain truncation
    up1, down1 = clamp_factors(torch.tensor(ref_up), torch.tensor(ref_down), None)
    assert np.array_equal(up1.numpy(), ref_up)
    # the clamp is applied before the split: sqrt split gives the same product
    up2, down2, *_ = low_rank_factors(diff, rank=6, clamp_quantile=0.9, split="sqrt")
    assert torch.allclose(up2 @ down2, up @ down, atol=1e-10)


def test_randomized_svd_close_to_exact_on_low_rank_plus_noise():
    g = torch.Generator().manual_seed(0)
    low = torch.randn(200, 6, generator=g) @ torch.randn(6, 300, generator=g)
    diff = low + 1e-3 * torch.randn(200, 300, generator=g)
    exact = extract_layer(torch.zeros_like(diff), diff, rank=6, clamp_quantile=None)
    fast = extract_layer(torch.zeros_like(diff), diff, rank=6, clamp_quantile=None, randomized=True, niter=2)
    err_exact = torch.linalg.norm(diff.double() - _product(exact))
    err_fast = torch.linalg.norm(diff.double() - _product(fast))
    assert float(err_fast) <= 1.01 * float(err_exact)
    assert fast.residual_norm == pytest.approx(exact.residual_norm, rel=0.05)
    # reproducible, and the global RNG is untouched
    state = torch.get_rng_state()
    again = extract_layer(torch.zeros_like(diff), diff, rank=6, clamp_quantile=None, randomized=True)
    assert torch.equal(again.up, fast.up) and torch.equal(torch.get_rng_state(), state)
    q = truncated_svd(diff, 6, randomized=True, oversample=4)[1].numel()
    assert q == 10


def test_dynamic_rank_extraction_keeps_the_frobenius_fraction():
    g = torch.Generator().manual_seed(1)
    s_true = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05], dtype=torch.float64)
    q1, _ = torch.linalg.qr(torch.randn(16, 8, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(20, 8, generator=g, dtype=torch.float64))
    diff = q1 @ torch.diag(s_true) @ q2.T
    layer = extract_layer(torch.zeros_like(diff), diff, rank=8, method="sv_fro", param=0.95, clamp_quantile=None)
    # smallest n with cumulative energy >= 0.95²: 64+16 = 80 of 85.33 -> 0.9375 < 0.9025? yes at n=2; +1
    assert layer.rank == 3 and layer.alpha == 3.0
    kept = 1 - layer.residual_norm**2 / layer.norm**2
    assert kept >= 0.95**2


def test_extract_layer_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in shape"):
        extract_layer(torch.zeros(3, 4), torch.zeros(4, 3), rank=2)
    with pytest.raises(ValueError, match="Linear"):
        extract_layer(torch.zeros(3), torch.zeros(3), rank=2)


# ---------------------------------------------------------------------------------------- resize
@SETTINGS
@given(st.integers(2, 10), st.integers(2, 10), st.integers(1, 8), st.integers(1, 8), st.floats(0.5, 16), st.integers(0, 999))
def test_resize_is_truncated_svd_of_the_delta_with_same_scale(out_f, in_f, old_rank, new_rank, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    up = torch.randn(out_f, old_rank, generator=g, dtype=torch.float64)
    down = torch.randn(old_rank, in_f, generator=g, dtype=torch.float64)
    resized = resize_layer(up, down, alpha, rank=new_rank)
    dense = (alpha / old_rank) * (up @ down).numpy()  # naive reference delta
    s = np.linalg.svd(dense, compute_uv=False)
    r = min(new_rank, old_rank, out_f, in_f)
    assert resized.rank == r
    assert resized.alpha / r == pytest.approx(alpha / old_rank)  # kohya: alpha' = scale · r'
    error = np.linalg.norm(dense - _product(resized).numpy())
    assert error == pytest.approx(math.sqrt(float((s[r:] ** 2).sum())), rel=1e-7, abs=1e-9)
    assert resized.residual_norm == pytest.approx(error, rel=1e-7, abs=1e-9)


def test_factored_svd_equals_dense_svd():
    g = torch.Generator().manual_seed(2)
    up, down = torch.randn(30, 5, generator=g, dtype=torch.float64), torch.randn(5, 50, generator=g, dtype=torch.float64)
    u, s, vh = factored_svd(up, down)
    assert torch.allclose(u @ torch.diag(s) @ vh, up @ down, atol=1e-10)
    assert torch.allclose(s, torch.linalg.svdvals(up @ down)[:5], atol=1e-10)
    assert torch.allclose(u.T @ u, torch.eye(5, dtype=torch.float64), atol=1e-10)


def test_resize_state_conv_and_dynamic():
    g = torch.Generator().manual_seed(4)
    state = {
        "a.to_q.lora_down.weight": torch.randn(8, 12, generator=g),
        "a.to_q.lora_up.weight": torch.randn(10, 8, generator=g),
        "a.to_q.alpha": torch.tensor(4.0),
        "b.conv1.lora_down.weight": torch.randn(6, 4, 3, 3, generator=g),
        "b.conv1.lora_up.weight": torch.randn(5, 6, 1, 1, generator=g),
    }
    new, report = resize_lora_state(state, rank=4, conv_rank=2)
    assert new["a.to_q.lora_down.weight"].shape == (4, 12) and float(new["a.to_q.alpha"]) == pytest.approx(2.0)
    assert new["b.conv1.lora_down.weight"].shape == (2, 4, 3, 3) and new["b.conv1.lora_up.weight"].shape == (5, 2, 1, 1)
    assert float(new["b.conv1.alpha"]) == pytest.approx(2.0)  # no alpha = scale 1 -> alpha' = r'
    for layer in ("a.to_q", "b.conv1"):
        old = layer_delta({k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] if "lora" in k else "alpha": v
                           for k, v in state.items() if k.startswith(layer)}, name=layer)
        got = layer_delta({k[len(layer) + 1 :]: v for k, v in new.items() if k.startswith(layer)}, name=layer)
        err = torch.linalg.norm((old - got).double())
        assert float(err) == pytest.approx(report[layer].residual_norm, rel=1e-3, abs=1e-4)
    dyn, _ = resize_lora_state(state, rank=8, method="sv_ratio", param=1.0001)  # keep only σ_0 (+1 kohya)
    assert dyn["a.to_q.lora_down.weight"].shape[0] == 2


# --------------------------------------------------------------------------------------- combine
def _rand_layer(g, out_f, in_f, rank, kernel=(), alpha=None):
    layer = {
        "lora_down.weight": torch.randn(rank, in_f, *kernel, generator=g, dtype=torch.float64),
        "lora_up.weight": torch.randn(out_f, rank, *([1, 1] if kernel else []), generator=g, dtype=torch.float64),
    }
    if alpha is not None:
        layer["alpha"] = torch.tensor(alpha)
    return layer


@SETTINGS
@given(
    st.lists(st.tuples(st.integers(1, 5), st.floats(-2, 2), st.sampled_from([None, 1.0, 7.0])), min_size=1, max_size=4),
    st.sampled_from([(), (3, 3)]),
    st.integers(0, 999),
)
def test_concat_is_exact_sum_of_scaled_deltas(specs, kernel, seed):
    g = torch.Generator().manual_seed(seed)
    layers = [_rand_layer(g, 6, 5, r, kernel, a) for r, _, a in specs]
    strengths = [s for _, s, _ in specs]
    combined = concat_layers(layers, strengths)
    # naive reference: Σ s_i (alpha_i / r_i) up_i @ down_i, element loops over the rank
    want = np.zeros((6, 5 * (9 if kernel else 1)))
    for layer, s in zip(layers, strengths):
        r = layer["lora_down.weight"].shape[0]
        a = float(layer["alpha"]) if "alpha" in layer else r
        up = layer["lora_up.weight"].reshape(6, r).numpy()
        down = layer["lora_down.weight"].reshape(r, -1).numpy()
        for k in range(r):
            want += s * (a / r) * np.outer(up[:, k], down[k])
    assert combined["lora_down.weight"].shape[0] == sum(r for r, _, _ in specs)
    assert float(combined["alpha"]) == combined["lora_down.weight"].shape[0]
    got = layer_delta(combined).reshape(6, -1).numpy()
    assert np.allclose(got, want, atol=1e-9)


def test_combine_states_concat_and_svd():
    g = torch.Generator().manual_seed(5)
    a = {f"x.{k}": v for k, v in _rand_layer(g, 8, 9, 3, alpha=1.5).items()}
    a.update({f"only_a.{k}": v for k, v in _rand_layer(g, 4, 4, 2).items()})
    b = {f"x.{k}": v for k, v in _rand_layer(g, 8, 9, 4, alpha=8.0).items()}
    strengths = [0.7, -1.3]
    exact = combine_lora_states([a, b], strengths, dtype=torch.float64)
    want = 0.7 * layer_delta({k[2:]: v for k, v in a.items() if k.startswith("x.")}) - 1.3 * layer_delta(
        {k[2:]: v for k, v in b.items() if k.startswith("x.")}
    )
    got = layer_delta({k[2:]: v for k, v in exact.items() if k.startswith("x.")})
    assert torch.allclose(got, want, atol=1e-10)
    only = layer_delta({k[7:]: v for k, v in exact.items() if k.startswith("only_a.")})
    assert torch.allclose(only, 0.7 * layer_delta({k[7:]: v for k, v in a.items() if k.startswith("only_a.")}))
    # svd re-compression = best rank-3 approximation of the exact sum
    small = combine_lora_states([a, b], strengths, mode="svd", rank=3, dtype=torch.float64)
    assert small["x.lora_down.weight"].shape[0] == 3 and float(small["x.alpha"]) == 3.0
    s = torch.linalg.svdvals(want)
    err = torch.linalg.norm(layer_delta({k[2:]: v for k, v in small.items() if k.startswith("x.")}) - want)
    assert float(err) == pytest.approx(float(torch.sqrt((s[3:] ** 2).sum())), rel=1e-8)
    with pytest.raises(ValueError, match="target rank"):
        combine_lora_states([a], [1.0], mode="svd")


def test_combine_rejects_mismatched_layers():
    g = torch.Generator().manual_seed(6)
    with pytest.raises(ValueError, match="different models"):
        concat_layers([_rand_layer(g, 4, 5, 2), _rand_layer(g, 4, 6, 2)], [1, 1], name="x")


# ------------------------------------------------------------------------------ merge into weight
def test_add_delta_float32_math_fused_rows_and_cast_once():
    g = torch.Generator().manual_seed(7)
    weight = torch.randn(12, 4, generator=g).to(torch.float16)
    dq = torch.randn(4, 4, generator=g)
    dv = torch.randn(4, 4, generator=g)
    merged = add_delta(weight, [(dq, 0.5, slice(0, 4)), (dv, -2.0, slice(8, 12))])
    want = weight.double().clone()
    want[0:4] += 0.5 * dq.double()
    want[8:12] -= 2.0 * dv.double()
    assert merged.dtype == torch.float16
    assert torch.equal(merged, want.to(torch.float16))  # one rounding, from float32 math
    assert torch.equal(merged[4:8], weight[4:8])
    conv = torch.zeros(6, 5, 1, 1)
    assert torch.equal(add_delta(conv, [(torch.ones(6, 5), 1.0, None)]), torch.ones(6, 5, 1, 1))
    with pytest.raises(ValueError, match="another model"):
        add_delta(conv, [(torch.ones(6, 4), 1.0, None)], name="proj_in.weight")


# ------------------------------------------------------------------------- checkpoint key mapping
def test_checkpoint_layers_map_ldm_diffusers_and_openclip_keys():
    shapes = {
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": (32, 32),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (32, 32, 1, 1),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": (32, 32, 3, 3),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (64, 64, 3, 3),
        "model.diffusion_model.input_blocks.1.0.in_layers.0.weight": (32,),  # norm: not a layer
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": (32, 32),
        "conditioner.embedders.1.model.transformer.resblocks.3.attn.in_proj_weight": (96, 32),
        "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight": (128, 32),
        "conditioner.embedders.1.model.transformer.resblocks.3.attn.out_proj.weight": (32, 32),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (32, 32),
        "text_encoder_2.text_model.encoder.layers.1.mlp.fc2.weight": (32, 37),
    }
    layers = checkpoint_layers(shapes)
    unet = {k[1]: v for k, v in layers.items() if k[0] == "unet"}
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"].key.startswith("model.diffusion_model.input_blocks.1.1.")
    assert "down_blocks.0.attentions.0.proj_in" in unet and "down_blocks.0.resnets.0.conv1" in unet
    assert "up_blocks.0.upsamplers.0.conv" in unet
    assert unet["down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"].key.startswith("down_blocks.")
    te = layers[("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")]
    assert te.rows is None
    for i, name in enumerate(("q_proj", "k_proj", "v_proj")):
        slot = layers[("text_encoder_2", f"text_model.encoder.layers.3.self_attn.{name}")]
        assert slot.rows == (32 * i, 32 * (i + 1)) and slot.key.endswith("in_proj_weight")
    assert ("text_encoder_2", "text_model.encoder.layers.3.mlp.fc1") in layers
    assert ("text_encoder_2", "text_model.encoder.layers.3.self_attn.out_proj") in layers
    assert ("text_encoder_2", "text_model.encoder.layers.1.mlp.fc2") in layers
    assert len(layers) == 12  # 5 UNet, 1 + 6 text-encoder layers (norm weights are not layers)
    assert detect_base_model(shapes) == "sdxl"
    assert detect_base_model({"cond_stage_model.transformer.text_model.x": (1,)}) == "sd1"
    assert detect_base_model({"cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight": (6, 2)}) == "sd2"
    assert detect_base_model({"first_stage_model.decoder.conv_in.weight": (8, 4, 3, 3)}) == "sd1"  # nothing tells
    # kohya's target sets
    assert is_lora_target("unet", "down_blocks.0.attentions.0.proj_in", (32, 32, 1, 1), conv=False)
    assert not is_lora_target("unet", "down_blocks.0.resnets.0.conv1", (32, 32, 3, 3), conv=False)
    assert is_lora_target("unet", "down_blocks.0.resnets.0.conv1", (32, 32, 3, 3), conv=True)
    assert not is_lora_target("unet", "conv_in", (32, 4, 3, 3), conv=True)
    assert is_lora_target("text_encoder", "text_model.encoder.layers.0.mlp.fc1", (37, 32), conv=False)
    assert not is_lora_target("text_encoder", "text_model.embeddings.token_embedding", (99, 32), conv=False)


# --------------------------------------------------------------------------- LoRA block weights
def _kohya_sd1_slot(kind: str, i: int, j: int) -> int:
    """kohya svd_merge_lora.get_lbw_block_index for SD1 diffusers names, written out."""
    if kind == "down":
        return 1 + (3 * i + j + 1)
    if kind == "downsample":
        return 1 + 3 * (i + 1)
    if kind == "up":
        return 1 + 12 + 1 + (3 * i + j)
    return 1 + 12 + 1 + (3 * i + 2)  # upsample


@SETTINGS
@given(st.integers(0, 3), st.integers(0, 2), st.sampled_from(["down", "downsample", "up", "upsample"]))
def test_block_slot_matches_kohya_index(i, j, kind):
    from sdadapt.loratools.block_weights import block_slot

    if kind == "down":
        if j > 1:
            return
        path = f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.to_q"
    elif kind == "downsample":
        if i > 2:
            return
        path = f"down_blocks.{i}.downsamplers.0.conv"
    elif kind == "up":
        path = f"up_blocks.{i}.resnets.{j}.conv1"
    else:
        if i > 2:
            return
        path = f"up_blocks.{i}.upsamplers.0.conv"
    assert block_slot("unet", path) == _kohya_sd1_slot(kind, i, j)


def test_block_weight_vectors_expand_like_kohya():
    from sdadapt.loratools.block_weights import BLOCK_IDS, block_slot, expand_block_weights

    vector17 = [float(v) for v in range(2, 19)]  # BASE=2, IN01=3, ...
    weights = expand_block_weights(vector17, base_model="sd1")
    named = dict(zip(BLOCK_IDS, weights))
    assert named["BASE"] == 2 and named["IN01"] == 3 and named["IN04"] == 5 and named["M00"] == 9
    assert named["OUT03"] == 10 and named["OUT11"] == 18
    assert named["IN00"] == named["IN03"] == named["OUT00"] == 1.0  # unnamed slots keep 1 (kohya)
    xl = dict(zip(BLOCK_IDS, expand_block_weights([0.5] * 12, base_model="sdxl")))
    assert xl["IN04"] == xl["OUT05"] == xl["M00"] == 0.5 and xl["OUT06"] == xl["IN01"] == 1.0
    with pytest.raises(ValueError, match="SDXL"):
        expand_block_weights([1.0] * 20, base_model="sd1")
    with pytest.raises(ValueError, match="12 or 20"):
        expand_block_weights([1.0] * 5)
    # SDXL layers use their LDM block number; text encoders are BASE; conv_out is the last OUT block
    assert block_slot("unet", "down_blocks.1.attentions.0.proj_in", base_model="sdxl") == 1 + 4
    assert block_slot("unet", "up_blocks.0.attentions.2.proj_out", base_model="sdxl") == 14 + 2
    assert block_slot("text_encoder_2", "text_model.encoder.layers.0.mlp.fc1") == 0
    assert block_slot("unet", "conv_out", base_model="sdxl") == BLOCK_IDS.index("OUT08")
    assert block_slot("unet", "time_embedding.linear_1") == BLOCK_IDS.index("IN00")


# ------------------------------------------------------------------------------------ docs page
def test_lora_tools_page_example_runs_and_says_what_it_claims(capsys):
    namespace = run_block_with("lora-tools.md", "import os, tempfile")
    # Eckart–Young on the single layer
    error = torch.linalg.norm(namespace["tuned_w"] - namespace["base_w"] - namespace["delta"])
    assert float(error) == pytest.approx(float(namespace["sigma"][2:].square().sum().sqrt()), rel=1e-4)
    # extract -> resize to the true rank -> merge reproduces the fine-tune; combine is exact
    assert namespace["max_error"] < 1e-5
    assert namespace["rank_both"] == 7 and namespace["combine_error"] < 1e-5
    assert "[4]" in capsys.readouterr().out
