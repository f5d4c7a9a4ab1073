"""sd-meh's merge methods, against float64 transcriptions of s1dlx/meh ``sd_meh/merge_methods.py``
written here (sd-meh's ``.float()`` casts become float64 so the reference is exact), then the engine,
the command line and recipe replay."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.merge.engine import merge_state_dicts
from sdadapt.merge.meh_modes import (
    distribution_crossover,
    euclidean_add_difference,
    filter_top_k,
    fractional_matrix_power,
    multiply_difference,
    ratio_to_region,
    rotate,
    similarity_add_difference,
    ties_add_difference,
    top_k_tensor_sum,
    weighted_subtraction,
)
from sdadapt.merge.recipe import MergeStep
from test_merge_engine import U, load_file_metadata, mini, save

f64 = torch.float64
EPSILON = 1e-10


# ------------------------------------------------------------------ float64 transcriptions of sd-meh


def ref_weighted_sum(a, b, alpha):
    return (1 - alpha) * a + alpha * b


def ref_weighted_subtraction(a, b, alpha, beta):
    if alpha == 1.0 and beta == 1.0:
        beta -= EPSILON
    return (a - alpha * beta * b) / (1 - alpha * beta)


def ref_euclidean_add_difference(a, b, c, alpha):
    a_diff = a - c
    b_diff = b - c
    a_diff = torch.nan_to_num(a_diff / torch.linalg.norm(a_diff))
    b_diff = torch.nan_to_num(b_diff / torch.linalg.norm(b_diff))
    distance = (1 - alpha) * a_diff**2 + alpha * b_diff**2
    distance = torch.sqrt(distance)
    sum_diff = ref_weighted_sum(a, b, alpha) - c
    distance = torch.copysign(distance, sum_diff)
    target_norm = torch.linalg.norm(sum_diff)
    return c + distance / torch.linalg.norm(distance) * target_norm


def ref_multiply_difference(a, b, c, alpha, beta):
    diff_a = torch.pow(torch.abs(a - c), (1 - alpha))
    diff_b = torch.pow(torch.abs(b - c), alpha)
    difference = torch.copysign(diff_a * diff_b, ref_weighted_sum(a, b, beta) - c)
    return c + difference.to(c.dtype)


def ref_kth_abs_value(a, k):
    if k <= 0:
        return torch.tensor(-1, device=a.device)
    return torch.kthvalue(torch.abs(a), k)[0]


def ref_ratio_to_region(width, offset, n):
    if width < 0:
        offset += width
        width = -width
    width = min(width, 1)
    if offset < 0:
        offset = 1 + offset - int(offset)
    offset = math.fmod(offset, 1.0)
    if width + offset <= 1:
        inverted = False
        start = offset * n
        end = (width + offset) * n
    else:
        inverted = True
        start = (width + offset - 1) * n
        end = offset * n
    return round(start), round(end), inverted


def ref_top_k_tensor_sum(a, b, alpha, beta):
    a_flat = torch.flatten(a)
    a_dist = torch.msort(a_flat)
    b_indices = torch.argsort(torch.flatten(b), stable=True)
    redist_indices = torch.argsort(b_indices)
    start_i, end_i, region_is_inverted = ref_ratio_to_region(alpha, beta, torch.numel(a))
    start_top_k = ref_kth_abs_value(a_dist, start_i)
    end_top_k = ref_kth_abs_value(a_dist, end_i)
    indices_mask = (start_top_k < torch.abs(a_dist)) & (torch.abs(a_dist) <= end_top_k)
    if region_is_inverted:
        indices_mask = ~indices_mask
    indices_mask = torch.gather(indices_mask.double(), 0, redist_indices)
    a_redist = torch.gather(a_dist, 0, redist_indices)
    a_redist = (1 - indices_mask) * a_flat + indices_mask * a_redist
    return a_redist.reshape_as(a)


def ref_similarity_add_difference(a, b, c, alpha, beta):
    threshold = torch.maximum(torch.abs(a), torch.abs(b))
    similarity = ((a * b / threshold**2) + 1) / 2
    similarity = torch.nan_to_num(similarity * beta, nan=beta)
    ab_diff = a + alpha * (b - c)
    ab_sum = (1 - alpha / 2) * a + (alpha / 2) * b
    return (1 - similarity) * ab_diff + similarity * ab_sum


def ref_distribution_crossover(a, b, c, alpha, beta):
    if a.shape == ():
        return alpha * a + (1 - alpha) * b
    c_indices = torch.argsort(torch.flatten(c))
    a_dist = torch.gather(torch.flatten(a), 0, c_indices)
    b_dist = torch.gather(torch.flatten(b), 0, c_indices)
    a_dft = torch.fft.rfft(a_dist)
    b_dft = torch.fft.rfft(b_dist)
    dft_filter = torch.arange(0, torch.numel(a_dft), device=a_dft.device).double()
    dft_filter /= torch.numel(a_dft)
    if beta > EPSILON:
        dft_filter = (dft_filter - alpha) / beta + 1 / 2
        dft_filter = torch.clamp(dft_filter, 0.0, 1.0)
    else:
        dft_filter = (dft_filter >= alpha).double()
    x_dft = (1 - dft_filter) * a_dft + dft_filter * b_dft
    x_dist = torch.fft.irfft(x_dft, a_dist.shape[0])
    x_values = torch.gather(x_dist, 0, torch.argsort(c_indices))
    return x_values.reshape_as(a)


def ref_filter_top_k(a, k):
    k = max(int((1 - k) * torch.numel(a)), 1)
    k_value, _ = torch.kthvalue(torch.abs(a.flatten()), k)
    top_k_filter = (torch.abs(a) >= k_value).double()
    return a * top_k_filter


def ref_ties_add_difference(a, b, c, alpha, beta):
    deltas = []
    signs = []
    for m in [a, b]:
        deltas.append(ref_filter_top_k(m - c, beta))
        signs.append(torch.sign(deltas[-1]))
    signs = torch.stack(signs, dim=0)
    final_sign = torch.sign(torch.sum(signs, dim=0))
    delta_filters = (signs == final_sign).double()
    res = torch.zeros_like(c, device=c.device)
    for delta_filter, delta in zip(delta_filters, deltas):
        res += delta_filter * delta
    param_count = torch.sum(delta_filters, dim=0)
    return c + alpha * torch.nan_to_num(res / param_count)


def ref_fractional_matrix_power(matrix, power):
    eigenvalues, eigenvectors = torch.linalg.eig(matrix)
    eigenvectors_inv = torch.linalg.inv(eigenvectors)
    eigenvalues.pow_(power)
    result = eigenvectors @ torch.diag(eigenvalues) @ eigenvectors_inv
    return result.real.to(dtype=matrix.dtype)


def ref_rotate(a, b, alpha, beta):
    """sd-meh's rotate (s1dlx/meh PR 50, the code as kept in sd-mecha), cache left out, float64."""
    import functools
    import operator

    a, b = a.clone(), b.clone()
    if alpha == 0 and beta == 0:
        return a
    is_conv = len(a.shape) == 4 and a.shape[-1] != 1
    if len(a.shape) == 0 or is_conv or torch.allclose(a.half(), b.half()):
        return ref_weighted_sum(a, b, beta)
    if len(a.shape) == 4:
        shape_2d = (-1, functools.reduce(operator.mul, a.shape[1:]))
    else:
        shape_2d = (-1, a.shape[-1])
    a_neurons = a.reshape(*shape_2d)
    b_neurons = b.reshape(*shape_2d)
    a_centroid = a_neurons.mean(0)
    b_centroid = b_neurons.mean(0)
    new_centroid = ref_weighted_sum(a_centroid, b_centroid, alpha)
    if len(a.shape) == 1 or len(a.shape) == 2 and a.shape[0] == 1:
        return new_centroid.reshape_as(a)
    a_neurons -= a_centroid
    b_neurons -= b_centroid
    alpha_is_float = alpha != round(alpha)
    u, _, v_t = torch.linalg.svd(a_neurons.T @ b_neurons)
    if alpha_is_float:
        u[:, -1] /= torch.det(u) * torch.det(v_t)
    rotation = transform = u @ v_t
    if alpha_is_float:
        transform = ref_fractional_matrix_power(transform, alpha)
    elif alpha == 0:
        transform = torch.eye(len(transform), dtype=transform.dtype, device=transform.device)
    elif alpha != 1:
        transform = torch.linalg.matrix_power(transform, round(alpha))
    if beta != 0:
        a_neurons = ref_weighted_sum(a_neurons, b_neurons @ rotation.T, beta)
    a_neurons @= transform
    a_neurons += new_centroid
    return a_neurons.reshape_as(a)


# (ours, reference, uses C, alpha strategy, beta strategy)
# rounded: a float64 alpha such as 5e-324 is 0 in the float32 run's comparisons (as in sd-meh's float32)
_UNIT = st.floats(0, 1).map(lambda x: round(x, 6))
_ANY = st.floats(-1.5, 2.5).map(lambda x: round(x, 6))
METHODS = {
    "weighted_subtraction": (weighted_subtraction, ref_weighted_subtraction, False, _ANY, _ANY),
    "euclidean_add_difference": (euclidean_add_difference, ref_euclidean_add_difference, True, _UNIT, None),
    "multiply_difference": (multiply_difference, ref_multiply_difference, True, _UNIT, _ANY),
    "similarity_add_difference": (similarity_add_difference, ref_similarity_add_difference, True, _ANY, _ANY),
    "top_k_tensor_sum": (top_k_tensor_sum, ref_top_k_tensor_sum, False, _ANY, _ANY),
    "distribution_crossover": (distribution_crossover, ref_distribution_crossover, True, _ANY, _ANY),
    "ties_add_difference": (ties_add_difference, ref_ties_add_difference, True, _ANY, _UNIT),
    "rotate": (rotate, ref_rotate, False, st.sampled_from([0.0, 1.0, 2.0, -1.0]) | _ANY, _ANY),
}


def call(name, a, b, c, alpha, beta, **kwargs):
    ours, _, uses_c, _, beta_strategy = METHODS[name]
    extra = {} if beta_strategy is None else {"beta": beta}
    return ours((a, b), alpha, **({"base": c} if uses_c else {}), **extra, **kwargs)


def reference(name, a, b, c, alpha, beta):
    _, ref, uses_c, _, beta_strategy = METHODS[name]
    args = (a, b, c) if uses_c else (a, b)
    return ref(*args, alpha) if beta_strategy is None else ref(*args, alpha, beta)


# ------------------------------------------------------------------ the operators


@pytest.mark.parametrize("name", sorted(METHODS))
@settings(max_examples=20, deadline=None)
@given(data=st.data(), shape=st.lists(st.integers(1, 5), min_size=0, max_size=3), seed=st.integers(0, 2**16))
def test_methods_match_sd_mehs_code_in_float64(name, data, shape, seed):
    _, _, _, alpha_strategy, beta_strategy = METHODS[name]
    alpha = data.draw(alpha_strategy, "alpha")
    beta = data.draw(beta_strategy, "beta") if beta_strategy is not None else None
    if name == "weighted_subtraction":
        assume_product = abs(1 - alpha * beta) > 1e-3  # near 1 the division amplifies rounding
        if not assume_product:
            return
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(shape, generator=g, dtype=f64) for _ in range(3))
    kept = [t.clone() for t in (a, b, c)]
    want = reference(name, a, b, c, alpha, beta)
    got = call(name, a, b, c, alpha, beta, compute_dtype=f64)
    assert got.dtype == f64 and got.shape == a.shape
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9), (got, want)
    got32 = call(name, a.float(), b.float(), c.float(), alpha, beta)
    assert got32.dtype == torch.float32
    if name not in ("top_k_tensor_sum", "ties_add_difference", "rotate"):  # rank/threshold picks may flip
        scale = 1 + want.abs().max() if want.numel() else 1
        assert torch.allclose(got32.double(), want, rtol=1e-4, atol=1e-4 * float(scale))
    assert all(torch.equal(t, k) for t, k in zip((a, b, c), kept))  # inputs untouched


def test_edge_cases_follow_sd_meh():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(6, 5, generator=g, dtype=f64) for _ in range(3))
    # alpha = beta = 1: sd-meh's beta - 1e-10 nudge, not a division by zero
    got = weighted_subtraction((a, b), 1.0, beta=1.0, compute_dtype=f64)
    assert torch.isfinite(got).all()
    assert torch.allclose(got, ref_weighted_subtraction(a, b, 1.0, 1.0), rtol=1e-6)
    assert torch.isfinite(weighted_subtraction((a, b), 2.0, beta=0.5, compute_dtype=f64)).all()
    # weighted subtraction undoes a weighted sum: W = (1-t)*A + t*B  ->  A = (W - t*B)/(1 - t)
    w = ref_weighted_sum(a, b, 0.3)
    assert torch.allclose(weighted_subtraction((w, b), 0.3, beta=1.0, compute_dtype=f64), a, atol=1e-12)
    # euclidean: A = B = C gives C (sd-meh: 0/0); alpha 0 gives A, alpha 1 gives B
    assert torch.equal(euclidean_add_difference((c, c), 0.5, base=c, compute_dtype=f64), c)
    assert torch.allclose(euclidean_add_difference((a, b), 0.0, base=c, compute_dtype=f64), a, atol=1e-12)
    assert torch.allclose(euclidean_add_difference((a, b), 1.0, base=c, compute_dtype=f64), b, atol=1e-12)
    # multiply difference with A = B is A (the geometric mean of equal differences)
    assert torch.allclose(multiply_difference((a, a), 0.3, base=c, beta=0.6, compute_dtype=f64), a, atol=1e-12)
    # similarity: where A = B = 0 the similarity is beta
    z = a.clone()
    z[0] = 0
    zb = b.clone()
    zb[0] = 0
    got = similarity_add_difference((z, zb), 0.7, base=c, beta=0.4, compute_dtype=f64)
    assert torch.allclose(got, ref_similarity_add_difference(z, zb, c, 0.7, 0.4), atol=1e-12)
    assert torch.allclose(got[0], 0.6 * (0.7 * -c[0]), atol=1e-12)
    # top-k: a full band gives A's values in B's order; an empty band gives A
    full = top_k_tensor_sum((a, b), 1.0, beta=0.0, compute_dtype=f64)
    assert torch.equal(torch.sort(full.reshape(-1)).values, torch.sort(a.reshape(-1)).values)
    assert torch.equal(torch.argsort(full.reshape(-1)), torch.argsort(b.reshape(-1)))
    assert torch.equal(top_k_tensor_sum((a, b), 0.0, beta=0.3, compute_dtype=f64), a)
    # ties in B: stable order, as sd-meh's argsort(stable=True)
    tied = torch.zeros_like(b)
    assert torch.equal(top_k_tensor_sum((a, tied), 0.6, beta=0.2, compute_dtype=f64),
                       ref_top_k_tensor_sum(a, tied, 0.6, 0.2))
    # crossover: alpha 0 with a hard step is all B; alpha past 1 all A; 0-d keeps sd-meh's swapped weights
    assert torch.allclose(distribution_crossover((a, b), 0.0, base=c, beta=0.0, compute_dtype=f64), b, atol=1e-12)
    assert torch.allclose(distribution_crossover((a, b), 1.5, base=c, beta=0.0, compute_dtype=f64), a, atol=1e-12)
    s = [torch.tensor(v, dtype=f64) for v in (2.0, 5.0, 1.0)]
    assert float(distribution_crossover((s[0], s[1]), 0.25, base=s[2], beta=0.1, compute_dtype=f64)) == 4.25
    # ties: opposite differences cancel to C; agreeing ones average; beta = 1 keeps everything
    d = torch.tensor([1.0, -2.0, 3.0, 0.0], dtype=f64)
    got = ties_add_difference((c[0, :4] + d, c[0, :4] - d), 1.0, base=c[0, :4], beta=1.0, compute_dtype=f64)
    assert torch.equal(got, c[0, :4])
    got = ties_add_difference((c[0, :4] + d, c[0, :4] + 3 * d), 0.5, base=c[0, :4], beta=1.0, compute_dtype=f64)
    assert torch.allclose(got, c[0, :4] + d, atol=1e-12)
    # sd-meh's rank int((1 - k)*n) keeps one more than k*n: 0.25 of 4 keeps the top 2 (and the zero stays 0)
    assert torch.equal(filter_top_k(d, 0.25), torch.tensor([0.0, -2.0, 3.0, 0.0], dtype=f64))
    assert torch.equal(filter_top_k(d, 0.25), ref_filter_top_k(d, 0.25))


def test_rotate_aligns_rotated_neurons_and_its_powers_compose():
    g = torch.Generator().manual_seed(3)
    b = torch.randn(12, 5, generator=g, dtype=f64)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=f64))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]  # a proper rotation
    shift = torch.randn(5, generator=g, dtype=f64)
    a = (b - b.mean(0)) @ q + b.mean(0) + shift  # B's neurons turned by Q and moved
    # alpha 1, beta 0: the Procrustes rotation undoes Q, around B's centroid: B exactly
    assert torch.allclose(rotate((a, b), 1.0, beta=0.0, compute_dtype=f64), b, atol=1e-10)
    # alpha 0, beta 1: B's neurons rotated into A's frame (here they are A's) around A's centroid
    assert torch.allclose(rotate((a, b), 0.0, beta=1.0, compute_dtype=f64), a, atol=1e-10)
    # alpha 1/2: half of the rotation (Q^T)^(1/2); the other half brings the neurons onto B's
    half = rotate((a, b), 0.5, beta=0.0, compute_dtype=f64)
    assert torch.allclose(half.mean(0), torch.lerp(a.mean(0), b.mean(0), 0.5), atol=1e-12)
    rest = (half - half.mean(0)) @ fractional_matrix_power(q.T, 0.5)
    assert torch.allclose(rest, b - b.mean(0), atol=1e-8)
    assert not torch.allclose(half - half.mean(0), b - b.mean(0), atol=1e-2)
    r = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=f64))[0]
    r[:, 0] *= torch.det(r)
    root = fractional_matrix_power(r, 0.5)
    assert torch.allclose(root @ root, r, atol=1e-10)
    assert torch.allclose(root @ root.T, torch.eye(6, dtype=f64), atol=1e-10)
    # sd-meh's fallbacks: 3x3 convolutions and equal tensors lerp by beta, 1-d ones by alpha
    conv_a, conv_b = torch.randn(2, 4, 8, 3, 3, generator=g, dtype=f64)
    assert torch.allclose(rotate((conv_a, conv_b), 0.7, beta=0.2, compute_dtype=f64),
                          torch.lerp(conv_a, conv_b, 0.2), atol=1e-12)
    v_a, v_b = torch.randn(2, 7, generator=g, dtype=f64)
    assert torch.allclose(rotate((v_a, v_b), 0.7, beta=0.2, compute_dtype=f64), torch.lerp(v_a, v_b, 0.7))
    assert torch.equal(rotate((b, b), 0.7, beta=0.0, compute_dtype=f64), b)


@pytest.mark.parametrize("alpha, beta", [(2.0, 0.0), (-1.0, 0.3), (3.0, 0.5), (0.4, 0.6)])
@pytest.mark.parametrize("shape", [(9, 4), (6, 3, 1, 1), (3, 7)])
def test_rotate_integer_powers_and_1x1_convolutions_follow_sd_meh(alpha, beta, shape):
    # integer alpha takes matrix powers of R (no reflection cancelled); a 1x1 convolution's neurons are
    # its in-channel rows; (3, 7) is wide (fewer rows than the width)
    g = torch.Generator().manual_seed(7)
    a, b = (torch.randn(shape, generator=g, dtype=f64) for _ in range(2))
    got = rotate((a, b), alpha, beta=beta, compute_dtype=f64)
    assert torch.allclose(got, ref_rotate(a, b, alpha, beta), rtol=1e-9, atol=1e-9)
    if alpha in (2.0, -1.0):
        assert not torch.allclose(got, rotate((a, b), 1.0, beta=beta, compute_dtype=f64), atol=1e-3)


def test_rotate_cancels_the_reflection_by_the_sign_of_the_determinant(monkeypatch):
    # torch.det of an orthogonal matrix underflows to 0 past ~2000 wide (sd-meh's CPU "determinant
    # error"); only its sign matters: simulate the underflow on a small tensor
    g = torch.Generator().manual_seed(11)
    a, b = (torch.randn(8, 5, generator=g, dtype=f64) for _ in range(2))
    want = ref_rotate(a, b, 0.5, 0.2)
    real_det = torch.det
    monkeypatch.setattr(torch, "det", lambda m: real_det(m) * 1e-300 * 1e-300)
    assert torch.allclose(rotate((a, b), 0.5, beta=0.2, compute_dtype=f64), want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_compute_dtypes_work_and_crossover_ffts_in_float32(dtype):
    # sd-meh's FFT is .float(); torch has no half FFT on CPU
    g = torch.Generator().manual_seed(9)
    a, b, c = (torch.randn(6, 5, generator=g, dtype=f64) for _ in range(3))
    half = [t.to(dtype) for t in (a, b, c)]
    got = distribution_crossover(half[:2], 0.3, base=half[2], beta=0.1, compute_dtype=dtype)
    assert got.dtype == dtype
    want = ref_distribution_crossover(*(t.double() for t in half), 0.3, 0.1)
    assert torch.allclose(got.double(), want, rtol=1e-2, atol=1e-2)
    for name in sorted(METHODS):
        out = call(name, *half, 0.3, 0.1, compute_dtype=dtype)
        assert out.dtype == dtype and torch.isfinite(out).all(), name


def test_top_k_band_from_rank_zero_takes_zero_values_like_sd_meh():
    # sd-meh's kth_abs_value(.., 0) is -1, so exact zeros of A belong to a band starting at rank 0
    g = torch.Generator().manual_seed(5)
    a, b = (torch.randn(40, generator=g, dtype=f64) for _ in range(2))
    a[::3] = 0.0
    for alpha, beta in ((0.5, 0.0), (0.7, 0.6)):
        got = top_k_tensor_sum((a, b), alpha, beta=beta, compute_dtype=f64)
        assert torch.equal(got, ref_top_k_tensor_sum(a, b, alpha, beta)), (alpha, beta)


@settings(max_examples=60, deadline=None)
@given(width=st.floats(-3, 3), offset=st.floats(-3, 3), n=st.integers(1, 50))
def test_ratio_to_region_is_sd_mehs(width, offset, n):
    assert ratio_to_region(width, offset, n) == ref_ratio_to_region(width, offset, n)


# ------------------------------------------------------------------ engine, command line, recipes

OPS = {
    "weighted-subtraction": ("weighted_subtraction", 0.4, 0.5),
    "euclidean-add-difference": ("euclidean_add_difference", 0.6, None),
    "multiply-difference": ("multiply_difference", 0.3, 0.7),
    "similarity-add-difference": ("similarity_add_difference", 0.8, 0.5),
    "top-k-tensor-sum": ("top_k_tensor_sum", 0.5, 0.25),
    "distribution-crossover": ("distribution_crossover", 0.2, 0.1),
    "ties-add-difference": ("ties_add_difference", 1.0, 0.5),
    "rotate": ("rotate", 0.5, 0.25),
}


def _merged_keys(state):
    return [k for k in state if k.startswith((U, "cond_stage_model")) and "position_ids" not in k]


@pytest.mark.parametrize("operator", sorted(OPS))
def test_engine_merges_every_key_like_sd_meh(operator):
    name, alpha, beta = OPS[operator]
    uses_c = METHODS[name][2]
    states = [mini(i, dtype=torch.float32) for i in range(3 if uses_c else 2)]
    options = {} if beta is None else {"beta": beta}
    step = MergeStep(operator, tuple("abc"[: len(states)]), alpha=alpha, options=options, dtype="fp64",
                     compute_dtype="fp64")
    out, _ = merge_state_dicts(step, states)
    c = states[2] if uses_c else None
    changed = 0
    for key in _merged_keys(states[0]):
        a, b = states[0][key].double(), states[1][key].double()
        want = reference(name, a, b, c[key].double() if uses_c else None, alpha, beta)
        assert torch.allclose(out[key], want, rtol=1e-10, atol=1e-12), key
        changed += not torch.equal(out[key], a)
    assert changed >= len(_merged_keys(states[0])) // 2


def run(*argv: str) -> int:
    return main(["merge", *argv])


@pytest.mark.parametrize("argv", [
    ["weighted-subtraction", "{a}", "{b}", "--alpha", "0.3", "--beta", "0.5"],
    ["distribution-crossover", "{a}", "{b}", "{c}", "--alpha", "0.2", "--beta", "0.1", "--weights-clip"],
    ["ties-add-difference", "{a}", "{b}", "{c}", "--alpha", "1", "--beta", "0.3"],
    ["multiply-difference", "{a}", "{b}", "{c}", "--alpha", "0.5", "--beta", "0.5"],
    ["rotate", "{a}", "{b}", "--alpha", "0.5", "--beta", "0.25"],
])
def test_commands_write_a_recipe_that_replays_bit_exactly(tmp_path, argv):
    files = dict(zip("abc", (save(tmp_path, f"{n}.safetensors", mini(i)) for i, n in enumerate("abc"))))
    out = tmp_path / "o.safetensors"
    assert run(*[x.format(**files) for x in argv], "-o", str(out), "-q") == 0
    assert run("--recipe", str(out), "-o", str(tmp_path / "replay.safetensors"), "-q") == 0
    assert (tmp_path / "replay.safetensors").read_bytes() == out.read_bytes()
    step = json.loads(load_file_metadata(out)["sdadapt_merge_recipe"])["step"]
    assert step["operator"] == argv[0]
    assert step["options"]["beta"] == float(argv[argv.index("--beta") + 1])
    assert ("weights_clip" in step["options"]) == ("--weights-clip" in argv)


@pytest.mark.parametrize("command", sorted(OPS))
def test_commands_have_help_naming_sd_meh(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(command, "--help")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "sd-meh" in text and "--alpha" in text
    assert ("--beta" in text) == (OPS[command][2] is not None)


def test_out_of_range_options_are_refused_naming_them():
    with pytest.raises(InputError, match="alpha"):
        MergeStep("euclidean-add-difference", ("a", "b", "c"), alpha=1.5)
    with pytest.raises(InputError, match="alpha"):
        MergeStep("multiply-difference", ("a", "b", "c"), alpha=-0.1, options={"beta": 0.5})
    with pytest.raises(InputError, match="beta"):
        MergeStep("ties-add-difference", ("a", "b", "c"), alpha=1.0, options={"beta": 1.5})
    with pytest.raises(InputError, match="beta"):
        MergeStep("weighted-subtraction", ("a", "b"), alpha=0.5)
    with pytest.raises(InputError, match="beta"):
        MergeStep("euclidean-add-difference", ("a", "b", "c"), alpha=0.5, options={"beta": 0.5})


@pytest.mark.parametrize("operator", sorted(op for op, (_, _, beta) in OPS.items() if beta is not None))
def test_beta_is_required_as_in_sd_meh(operator):
    inputs = ("a", "b", "c") if METHODS[OPS[operator][0]][2] else ("a", "b")
    with pytest.raises(InputError, match="beta"):
        MergeStep(operator, inputs, alpha=0.5)


def test_docs_sd_meh_example_runs(capsys):
    from docs_pages import code_blocks, run_block

    index = next(i for i, block in enumerate(code_blocks("merge.md")) if "ties-add-difference" in block)
    run_block("merge.md", index)
    assert "ties-add-difference changed" in capsys.readouterr().out


def test_per_block_beta_reaches_the_method():
    states = [mini(i, dtype=torch.float32) for i in range(3)]
    blocks = (0.5,) * 14 + (0.2,) * 12  # BASE, IN00..IN11, M00: 0.5; OUT00..OUT11: 0.2
    step = MergeStep("ties-add-difference", ("a", "b", "c"), alpha=1.0, options={"beta": 0.5}, block_beta=blocks,
                     dtype="fp64", compute_dtype="fp64")
    out, _ = merge_state_dicts(step, states)
    for key in ("input_blocks.4.1.proj_in.weight", "middle_block.1.proj_out.weight",
                "output_blocks.11.1.proj_out.weight"):
        a, b, c = (s[U + key].double() for s in states)
        beta = 0.2 if key.startswith("output") else 0.5
        assert torch.allclose(out[U + key], ref_ties_add_difference(a, b, c, 1.0, beta), rtol=1e-10), key
        assert not torch.allclose(out[U + key], ref_ties_add_difference(a, b, c, 1.0, 0.7 - beta)), key
