"""extract-lora / resize-lora / combine-loras --mode svd against kohya's scripts, transcribed here in float64.

Reference: kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb
  networks/extract_lora_from_models.py (svd(): lines 171-229, metadata 243-255)
  networks/resize_lora.py (index_* 59-84, extract_linear/extract_conv 88-122, rank_resize 155-198,
                           resize_lora_model 254-290, metadata 346-358)
  networks/svd_merge_lora.py (merge_lora_models 283-387)
The transcriptions below follow those lines; singular vectors are only defined up to sign, so
factors are compared after aligning signs (or as products ``(alpha / r) · up ⋅ down``).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from sdadapt.loratools.combine import combine_lora_states
from sdadapt.loratools.extract import extract_layer, extract_lora, select_rank
from sdadapt.loratools.resize import resize_layer, resize_lora

F64 = torch.float64
MIN_SV = 1e-6  # resize_lora.py:21


# ------------------------------------------------------------------ kohya, transcribed (float64)
def kohya_index_sv_cumulative(S, target):  # resize_lora.py:59-65
    original_sum = float(torch.sum(S))
    cumulative_sums = torch.cumsum(S, dim=0) / original_sum
    index = int(torch.searchsorted(cumulative_sums, torch.tensor(target, dtype=S.dtype))) + 1
    return max(1, min(index, len(S) - 1))


def kohya_index_sv_fro(S, target):  # resize_lora.py:68-75
    S_squared = S.pow(2)
    S_fro_sq = float(torch.sum(S_squared))
    sum_S_squared = torch.cumsum(S_squared, dim=0) / S_fro_sq
    index = int(torch.searchsorted(sum_S_squared, torch.tensor(target**2, dtype=S.dtype))) + 1
    return max(1, min(index, len(S) - 1))


def kohya_index_sv_ratio(S, target):  # resize_lora.py:78-84
    min_sv = S[0] / target
    index = int(torch.sum(S > min_sv).item())
    return max(1, min(index, len(S) - 1))


def kohya_rank_resize(S, rank, dynamic_method, dynamic_param, scale=1.0):  # resize_lora.py:155-181
    index = {"sv_ratio": kohya_index_sv_ratio, "sv_cumulative": kohya_index_sv_cumulative,
             "sv_fro": kohya_index_sv_fro}
    new_rank = index[dynamic_method](S, dynamic_param) + 1 if dynamic_method else rank
    if S[0] <= MIN_SV:
        new_rank = 1
    elif new_rank > rank:
        new_rank = rank
    return new_rank, float(scale * new_rank)


def kohya_resize_extract(weight, lora_rank, dynamic_method, dynamic_param, scale=1.0):
    """resize_lora.py:88-122: extract_conv / extract_linear of a dense (out, in[, k, k]) matrix."""
    out_size = weight.shape[0]
    U, S, Vh = torch.linalg.svd(weight.reshape(out_size, -1))
    new_rank, new_alpha = kohya_rank_resize(S, lora_rank, dynamic_method, dynamic_param, scale)
    up = U[:, :new_rank] @ torch.diag(S[:new_rank])
    down = Vh[:new_rank, :]
    return up, down, new_rank, new_alpha


def kohya_svd_clamp(mat, rank, clamp_quantile):
    """extract_lora_from_models.py:192-213 (= svd_merge_lora.py:361-376): U·S and Vh, quantile clamp."""
    U, S, Vh = torch.linalg.svd(mat)
    U = U[:, :rank] @ torch.diag(S[:rank])
    Vh = Vh[:rank, :]
    return _clamp(U, Vh, clamp_quantile)


def _clamp(U, Vh, clamp_quantile):
    dist = torch.cat([U.flatten(), Vh.flatten()])
    hi_val = torch.quantile(dist, clamp_quantile)
    return U.clamp(-hi_val, hi_val), Vh.clamp(-hi_val, hi_val)


def _product(up, down, alpha):
    r = down.shape[0]
    return (alpha / r) * (up.reshape(up.shape[0], r).double() @ down.reshape(r, -1).double())


def _signs(reference_up, got_up):
    """Per singular direction, the sign that turns kohya's vectors into sdadapt's."""
    dots = (reference_up * got_up.reshape(reference_up.shape).double()).sum(0)
    return torch.where(dots < 0, -1.0, 1.0).to(F64)


def _low_rank(g, out_f, in_f, spectrum):
    """(out_f, in_f) float64 matrix with the given singular values."""
    q_left, _ = torch.linalg.qr(torch.randn(out_f, len(spectrum), generator=g, dtype=F64))
    q_right, _ = torch.linalg.qr(torch.randn(in_f, len(spectrum), generator=g, dtype=F64))
    return q_left @ torch.diag(torch.tensor(spectrum, dtype=F64)) @ q_right.T


# -------------------------------------------------------------------------- rank rules, crafted
CRAFTED = [
    [4.0, 2.0, 1.0, 1.0, 0.0, 0.0],  # Σσ = 8: cumulative 0.5, 0.75, 0.875, 1 (exact ties)
    [1.0, 1.0, 1.0, 1.0, 0.5, 0.5],  # equal values
    [2.0 ** 0.5, 1.0, 0.5 ** 0.5, 0.5 ** 0.5, 0.0, 0.0],  # Σσ² = 4: 0.5, 0.75, 0.875, 1
    [3.0, 1e-3, 1e-4, 0.0, 0.0, 0.0],
    [1e-6, 5e-7, 0.0, 0.0, 0.0, 0.0],  # kohya's zero matrix (σ0 <= MIN_SV)
    [1.1e-6, 5e-7, 1e-7, 0.0, 0.0, 0.0],  # just above it
]
PARAMS = {
    "sv_ratio": [1.0, 2.0, 4.0, 3000.0, 1e9],
    "sv_cumulative": [1e-3, 0.5, 0.75, 0.8, 0.875, 0.999, 1.0],
    "sv_fro": [1e-3, 0.5 ** 0.5, 0.75 ** 0.5, 0.9, 0.875 ** 0.5, 1.0],
}


@pytest.mark.parametrize("spectrum", CRAFTED)
@pytest.mark.parametrize("method", sorted(PARAMS))
def test_dynamic_rank_rules_match_kohya_on_crafted_spectra(spectrum, method):
    s = torch.tensor(spectrum, dtype=F64)
    for param in PARAMS[method]:
        for cap in (1, 2, 3, 5, 6):
            want, _ = kohya_rank_resize(s, cap, method, param)
            assert select_rank(s, method=method, param=param, max_rank=cap) == want, (param, cap)


# ------------------------------------------------------------------------------------ extract
@pytest.mark.parametrize("shape,rank", [((12, 10), 4), ((8, 6, 1, 1), 3), ((6, 4, 3, 3), 5)])
@pytest.mark.parametrize("clamp", [None, 0.99, 0.9])
def test_extract_layer_writes_kohyas_factors(shape, rank, clamp):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(shape, generator=g, dtype=F64)
    tuned = base + torch.randn(shape, generator=g, dtype=F64) ** 3  # heavy tails: the clamp bites
    got = extract_layer(base, tuned, rank=rank, clamp_quantile=clamp)
    mat = (tuned - base).reshape(shape[0], -1)  # extract_lora_from_models.py:194-198 (flatten / squeeze)
    U, S, Vh = torch.linalg.svd(mat)
    up, down = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank]
    sign = _signs(up, got.up)
    up, down = up * sign, down * sign[:, None]  # the same SVD, with sdadapt's signs
    if clamp is not None:
        up, down = _clamp(up, down, clamp)
    assert got.alpha == rank == got.rank  # :229, alpha = rank
    assert got.up.shape == (shape[0], rank, *([1, 1] if len(shape) == 4 else []))  # :215-217
    assert got.down.shape == (rank, *shape[1:])
    assert torch.allclose(got.up.reshape(shape[0], rank), up, atol=1e-10)
    assert torch.allclose(got.down.reshape(rank, -1), down, atol=1e-10)


@pytest.mark.parametrize("method,param", [("sv_ratio", 4.0), ("sv_cumulative", 0.8), ("sv_fro", 0.9)])
def test_dynamic_extract_is_kohyas_resize_rule_on_the_full_difference(method, param):
    g = torch.Generator().manual_seed(12)
    diff = _low_rank(g, 16, 12, [8.0, 4.0, 2.0, 1.0, 0.5, 0.25])
    got = extract_layer(torch.zeros(16, 12, dtype=F64), diff, rank=8, method=method, param=param)
    up, down, new_rank, new_alpha = kohya_resize_extract(diff, 8, method, param)
    assert (got.rank, got.alpha) == (new_rank, new_alpha)
    assert torch.allclose(_product(got.up, got.down, got.alpha), _product(up, down, new_alpha), atol=1e-10)


def test_extract_file_metadata_is_kohyas(tmp_path):
    g = torch.Generator().manual_seed(13)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"
    base = {key: torch.randn(16, 16, generator=g)}
    tuned = {key: base[key] + 0.1 * torch.randn(16, 16, generator=g)}
    from safetensors.torch import save_file

    save_file(base, tmp_path / "base.safetensors")
    save_file(tuned, tmp_path / "tuned.safetensors")
    for method, dim in (("fixed", "4"), ("sv_fro", "Dynamic")):
        out = tmp_path / f"{method}.safetensors"
        extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", out, rank=4, method=method,
                     param=None if method == "fixed" else 0.9, device="cpu")
        with safe_open(out, "pt") as f:
            meta = f.metadata()
        # extract_lora_from_models.py:248-255 (str(dim), str(float(dim)), "{}" without conv_dim)
        assert meta["ss_network_module"] == "networks.lora"
        assert meta["ss_network_dim"] == dim
        if dim != "Dynamic":
            assert float(meta["ss_network_alpha"]) == float(dim)
            assert json.loads(meta["ss_network_args"]) == {}
        else:
            assert meta["ss_network_alpha"] == "Dynamic"  # resize_lora.py:357-358


# ------------------------------------------------------------------------------------- resize
def _lora(g, out_f, in_f, spectrum, kernel=()):
    dense = _low_rank(g, out_f, in_f * (9 if kernel else 1), spectrum)
    r = len(spectrum)
    u, s, vh = torch.linalg.svd(dense, full_matrices=False)
    mix = torch.randn(r, r, generator=g, dtype=F64) + 3 * torch.eye(r, dtype=F64)  # not an SVD layout
    up = (u[:, :r] * s[:r]) @ mix
    down = torch.linalg.solve(mix, vh[:r])
    if kernel:
        return up.reshape(out_f, r, 1, 1), down.reshape(r, in_f, *kernel)
    return up, down


@pytest.mark.parametrize("kernel", [(), (3, 3)])
@pytest.mark.parametrize("method,param,new_rank", [
    (None, None, 3), (None, None, 1), ("sv_ratio", 3.0, 6), ("sv_cumulative", 0.7, 6), ("sv_fro", 0.95, 6),
    ("sv_fro", 0.95, 2),
])
@pytest.mark.parametrize("alpha", [None, 1.0, 16.0])
def test_resize_layer_matches_kohyas_resize(kernel, method, param, new_rank, alpha):
    g = torch.Generator().manual_seed(14)
    up, down = _lora(g, 10, 12, [5.0, 3.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05], kernel)
    old_rank = down.shape[0]
    got = resize_layer(up, down, alpha, rank=new_rank, method=method or "fixed", param=param)
    # resize_lora_model:258-268 — scale = alpha / old_rank (1 without alpha), merge up ⋅ down, extract
    scale = 1.0 if alpha is None else alpha / old_rank
    merged = (up.reshape(10, old_rank) @ down.reshape(old_rank, -1)).reshape(10, *down.shape[1:])
    k_up, k_down, k_rank, k_alpha = kohya_resize_extract(merged, new_rank, method, param, scale)
    assert (got.rank, got.alpha) == (k_rank, pytest.approx(k_alpha, rel=1e-12))
    assert got.up.shape == (10, k_rank, *([1, 1] if kernel else [])) and got.down.shape == (k_rank, *down.shape[1:])
    assert torch.allclose(_product(got.up, got.down, got.alpha), _product(k_up, k_down, k_alpha), atol=1e-9)


def test_resize_zero_layer_gets_rank_one_as_in_kohya_also_for_a_fixed_rank():
    """rank_resize:176-178 — a layer whose up ⋅ down has σ0 <= 1e-6 becomes rank 1 (whatever the method)."""
    g = torch.Generator().manual_seed(15)
    down = torch.randn(8, 12, generator=g, dtype=F64)
    for method, param in (("fixed", None), ("sv_fro", 0.9)):
        got = resize_layer(torch.zeros(10, 8, dtype=F64), down, 4.0, rank=4, method=method, param=param)
        assert (got.rank, got.alpha) == (1, 0.5)  # alpha' = (4 / 8) · 1
        assert float(got.up.abs().max()) == 0.0


def test_resize_zero_test_reads_the_unscaled_product():
    """kohya tests σ0 of up ⋅ down, not of (alpha / r) · up ⋅ down: alpha 1 at rank 8 does not make 5e-6 zero."""
    g = torch.Generator().manual_seed(16)
    up, down = _lora(g, 10, 12, [5e-6, 3e-6, 2e-6, 1e-6, 5e-7, 2e-7, 1e-7, 5e-8])
    got = resize_layer(up, down, 1.0, rank=8, method="sv_fro", param=0.9)
    _, _, k_rank, k_alpha = kohya_resize_extract(up @ down, 8, "sv_fro", 0.9, 1.0 / 8)
    assert k_rank > 1 and (got.rank, got.alpha) == (k_rank, pytest.approx(k_alpha))


def test_resize_never_adds_directions_where_kohya_adds_a_zero_one():
    """Documented difference: kohya SVDs the dense product (min(out, in) values), so when a rule keeps
    every old direction its clamp-then-plus-one writes old rank + 1, the extra singular value ~0;
    sdadapt writes the old rank — the same product."""
    g = torch.Generator().manual_seed(17)
    up, down = _lora(g, 10, 7, [5.0, 4.0, 3.0])
    got = resize_layer(up, down, None, rank=6, method="sv_ratio", param=10.0)
    k_up, k_down, k_rank, k_alpha = kohya_resize_extract(up @ down, 6, "sv_ratio", 10.0)
    assert (got.rank, k_rank) == (3, 4)
    assert torch.allclose(_product(got.up, got.down, got.alpha), _product(k_up, k_down, k_alpha), atol=1e-9)


def test_resize_file_metadata(tmp_path):
    from sdadapt.formats import save_kohya

    g = torch.Generator().manual_seed(18)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    up, down = _lora(g, 16, 16, [4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, 0.01])
    save_kohya(tmp_path / "in.safetensors", {"unet": {f"{layer}.lora_up.weight": up.float(),
                                                      f"{layer}.lora_down.weight": down.float(),
                                                      f"{layer}.alpha": torch.tensor(4.0)}})
    for method, dim, alpha in (("fixed", "4", 2.0), ("sv_ratio", "Dynamic", None)):
        out = tmp_path / f"{method}.safetensors"
        resize_lora(tmp_path / "in.safetensors", out, rank=4, method=method, param=None if method == "fixed" else 3.0)
        with safe_open(out, "pt") as f:
            meta = f.metadata()
        # resize_lora.py:348-358
        assert meta["ss_network_dim"] == dim
        if alpha is None:
            assert meta["ss_network_alpha"] == "Dynamic"
        else:
            assert float(meta["ss_network_alpha"]) == alpha  # new_alpha = scale · new_rank = 4/8 · 4


# ----------------------------------------------------------------------------- svd merge
def _kohya_svd_merge(layers, ratios, new_rank, clamp_quantile):
    """svd_merge_lora.py:283-387 for one layer: Σ ratio · scale · up ⋅ down, then SVD, clamp, alpha = rank."""
    weight = None
    for (up, down, alpha), ratio in zip(layers, ratios):
        network_dim = down.shape[0]
        scale = (alpha if alpha is not None else network_dim) / network_dim
        if down.dim() == 2:
            part = ratio * (up @ down) * scale
        elif down.shape[2:] == (1, 1):
            part = ratio * (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
        else:
            part = ratio * torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale
        weight = part if weight is None else weight + part
    out_dim, in_dim = weight.shape[0:2]
    mat = weight.flatten(start_dim=1) if weight.dim() == 4 else weight
    rank = min(new_rank, in_dim, out_dim)
    U, S, Vh = torch.linalg.svd(mat)
    U, Vh = U[:, :rank] @ torch.diag(S[:rank]), Vh[:rank]
    return U, Vh, rank, clamp_quantile


@pytest.mark.parametrize("kernel", [(), (3, 3)])
@pytest.mark.parametrize("clamp", [None, 0.99])
def test_combine_svd_is_kohyas_svd_merge(kernel, clamp):
    g = torch.Generator().manual_seed(19)
    specs = [([3.0, 2.0, 1.0], 1.5, 0.7), ([4.0, 1.0, 0.5, 0.2], 8.0, -1.3), ([2.0, 2.0], None, 0.4)]
    states, ratios, layers = [], [], []
    for spectrum, alpha, ratio in specs:
        up, down = _lora(g, 9, 6, spectrum, kernel)
        state = {"x.lora_up.weight": up, "x.lora_down.weight": down}
        if alpha is not None:
            state["x.alpha"] = torch.tensor(alpha, dtype=F64)
        states.append(state)
        ratios.append(ratio)
        layers.append((up, down, alpha))
    got = combine_lora_states(states, ratios, mode="svd", rank=5, clamp_quantile=clamp, dtype=F64)
    plain = combine_lora_states(states, ratios, mode="svd", rank=5, dtype=F64)
    U, Vh, rank, _ = _kohya_svd_merge(layers, ratios, 5, clamp)
    sign = _signs(U, plain["x.lora_up.weight"].reshape(9, -1))
    U, Vh = U * sign, Vh * sign[:, None]  # kohya's SVD with sdadapt's signs (the clamp reads signed values)
    if clamp is not None:
        U, Vh = _clamp(U, Vh, clamp)
    assert float(got["x.alpha"]) == rank == got["x.lora_down.weight"].shape[0]  # :387 alpha = rank
    assert torch.allclose(got["x.lora_up.weight"].reshape(9, rank), U, atol=1e-9)
    assert torch.allclose(got["x.lora_down.weight"].reshape(rank, -1), Vh, atol=1e-9)


def test_extract_text_encoder_min_diff_boundary_is_kohyas(tmp_path):
    """extract_lora_from_models.py:139 — a text encoder counts as changed when max |Δ| > min_diff (strictly)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(20)
    te = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    unet = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    base = {te: torch.zeros(8, 8), unet: torch.randn(8, 8, generator=g)}
    save_file(base, tmp_path / "base.safetensors")
    for step, kept in ((0.5, False), (0.5 + 2**-20, True)):
        tuned = {te: torch.zeros(8, 8), unet: base[unet] + torch.randn(8, 8, generator=g)}
        tuned[te][0, 0] = step
        save_file(tuned, tmp_path / "tuned.safetensors")
        report = extract_lora(tmp_path / "base.safetensors", tmp_path / "tuned.safetensors",
                              tmp_path / f"{kept}.safetensors", rank=2, min_diff=0.5, device="cpu")
        assert any(name.startswith("text_encoder") for name in report.layers) is kept
