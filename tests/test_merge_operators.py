"""Merge operators against naive float64 references, invariants and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.merge import operators as ops
from sdadapt.merge.operators import OPERATORS, key_generator, key_seed

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _t(seed: int, shape=(6, 5), dtype=torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


# ---------------------------------------------------------------- references (float64, written naively)


def ref_ties(base, models, weights, density, normalize):
    deltas = []
    for w, m in zip(weights, models):
        d = (m - base).ravel()
        keep = int(round(density * d.size))
        out = np.zeros_like(d)
        if keep:
            order = np.argsort(-np.abs(d), kind="stable")
            threshold = abs(d[order[keep - 1]])
            out = np.where(np.abs(d) >= threshold, d, 0.0)
        deltas.append(w * out)
    total = sum(deltas)
    sign = np.where(total >= 0, 1.0, -1.0)
    kept = [np.where((np.sign(d) == sign) & (d != 0), d, 0.0) for d in deltas]
    tau = sum(kept)
    if normalize:
        div = sum(w * ((np.sign(d) == sign) & (d != 0)) for w, d in zip(weights, deltas))
        div = np.where(div == 0, 1.0, div)
        tau = tau / div
    return (base.ravel() + tau).reshape(base.shape)


def ref_slerp(a, b, t):
    va, vb = a.ravel(), b.ravel()
    cos = np.dot(va, vb) / (np.linalg.norm(va) * np.linalg.norm(vb))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    omega = np.arccos(cos)
    return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def ref_model_stock(base, models):
    deltas = [(m - base).ravel() for m in models]
    cos = []
    for i in range(len(deltas)):
        for j in range(i + 1, len(deltas)):
            cos.append(np.dot(deltas[i], deltas[j]) / (np.linalg.norm(deltas[i]) * np.linalg.norm(deltas[j])))
    c = min(1.0, max(0.0, float(np.mean(cos))))
    k = len(models)
    t = k * c / (1 + (k - 1) * c)
    return t * np.mean(models, axis=0) + (1 - t) * base


# ---------------------------------------------------------------- references


@settings(max_examples=15, deadline=None)
@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple),
    alpha=st.floats(-0.5, 1.5),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
)
def test_weighted_sum_and_add_difference_match_float64(shape, alpha, dtype):
    a, b, c = (_t(i, shape, dtype) for i in range(3))
    got = ops.weighted_sum((a, b), alpha)
    assert got.dtype == torch.float32 and got.shape == shape
    np.testing.assert_allclose(got.double().numpy(), (1 - alpha) * _np(a) + alpha * _np(b), atol=1e-5)
    got = ops.add_difference((a, b), alpha, base=c)
    np.testing.assert_allclose(got.double().numpy(), _np(a) + alpha * (_np(b) - _np(c)), atol=1e-5)


def test_train_difference_matches_float64():
    a, b, c = (_t(i, (7, 3)) for i in range(3))
    b[0] = c[0]  # B == C rows: result must be A there
    b[1, 0] = a[1, 0]  # |B - A| = 0: weight 0
    A, B, C = (_np(x) for x in (a, b, c))
    far, near = np.abs(B - A), np.abs(B - C)
    w = np.where(far + near > 0, far / np.where(far + near > 0, far + near, 1), 0)
    want = A + 1.8 * 0.7 * w * (B - C)
    got = ops.train_difference((a, b), 0.7, base=c)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-6)
    assert torch.equal(got[0], a[0])


@pytest.mark.parametrize("t", [0.2, 0.5, 0.9])
def test_slerp_matches_float64_and_keeps_norm_of_equal_orthogonal(t):
    a, b = _t(1, (4, 8)), _t(2, (4, 8))
    np.testing.assert_allclose(ops.slerp((a, b), t).double().numpy(), ref_slerp(_np(a), _np(b), t), atol=1e-5)
    # orthogonal unit vectors: the result stays on the unit circle at angle t*pi/2
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    got = ops.slerp((e1, e2), t)
    assert torch.allclose(got, torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)]), atol=1e-6)
    # nearly parallel: lerp
    near = a + 1e-4 * b
    assert torch.allclose(ops.slerp((a, near), t), (1 - t) * a + t * near, atol=1e-6)


@pytest.mark.parametrize("density", [0.0, 0.2, 0.5, 1.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_matches_float64(density, normalize):
    base = _t(0, (9, 7))
    models = [base + _t(i, (9, 7)) for i in (1, 2, 3)]
    weights = [1.0, 0.5, 2.0]
    got = ops.ties(models, weights, base=base, density=density, normalize=normalize)
    want = ref_ties(_np(base), [_np(m) for m in models], weights, density, normalize)
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5)


def test_sparsify_magnitude_keeps_exactly_the_top_fraction():
    delta = _t(5, (40, 25))
    kept = ops.sparsify_magnitude(delta, 0.2)
    assert int((kept != 0).sum()) == 200
    smallest_kept = kept[kept != 0].abs().min()
    assert bool((delta[kept == 0].abs() <= smallest_kept).all())


def test_dare_matches_a_reference_with_the_same_masks():
    base = _t(0, (10, 6))
    models = [base + _t(i, (10, 6)) for i in (1, 2)]
    p = 0.7
    got = ops.dare(models, [1.0, 0.5], base=base, drop=p, consensus="none", generator=key_generator(3, "k"))
    g = key_generator(3, "k")
    masks = [(torch.rand((10, 6), generator=g) >= p).numpy() for _ in models]
    want = _np(base) + sum(w * m * (_np(x) - _np(base)) / (1 - p) for w, m, x in zip([1.0, 0.5], masks, models))
    np.testing.assert_allclose(got.double().numpy(), want, atol=1e-5)


def test_dare_rescale_keeps_the_delta_in_expectation():
    base = torch.zeros(200_000)
    model = torch.full((200_000,), 0.5)
    got = ops.dare([model], 1.0, base=base, drop=0.9, consensus="none", generator=key_generator(0, "x"))
    assert abs(float(got.mean()) - 0.5) < 0.02


def test_model_stock_matches_float64_and_limits():
    base = _t(0, (8, 8))
    models = [base + _t(i, (8, 8)) + 0.8 * _t(9, (8, 8)) for i in (1, 2, 3)]  # correlated deltas
    got = ops.model_stock(models, base=base)
    np.testing.assert_allclose(got.double().numpy(), ref_model_stock(_np(base), [_np(m) for m in models]), atol=1e-5)
    same = [base + _t(4, (8, 8))] * 2  # identical deltas: cos 1, t 1 -> their mean
    assert torch.allclose(ops.model_stock(same, base=base), same[0], atol=1e-6)
    e = torch.eye(4)
    orthogonal = [e[0], e[1]]  # cos 0 -> the base
    assert torch.equal(ops.model_stock(orthogonal, base=torch.zeros(4)), torch.zeros(4))


# ---------------------------------------------------------------- invariants


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_alpha_zero_and_one_give_an_input_back_exactly(dtype):
    a, b, c = (_t(i, (5, 4), dtype) for i in range(3))
    for op in (ops.weighted_sum, ops.slerp):
        assert torch.equal(op((a, b), 0.0), a.float())
        assert torch.equal(op((a, b), 1.0), b.float())
    assert torch.equal(ops.add_difference((a, b), 0.0, base=c), a.float())
    assert torch.equal(ops.train_difference((a, b), 0.0, base=c), a.float())


def test_density_one_without_sign_conflict_is_a_plain_sum():
    base = _t(0, (6, 6))
    d1, d2 = _t(1, (6, 6)).abs(), _t(2, (6, 6)).abs()  # same sign everywhere
    models = [base + d1, base + d2]
    plain = ops.task_arithmetic(models, [1.0, 1.0], base=base)
    assert torch.allclose(plain, base + d1 + d2, atol=1e-6)
    summed = ops.task_vector_merge(models, 1.0, base=base, sparsify="magnitude", density=1.0, consensus="sum")
    assert torch.allclose(summed, plain, atol=1e-6)
    # TIES proper takes the disjoint *mean*: the average of the two deltas
    assert torch.allclose(ops.ties(models, base=base, density=1.0), base + (d1 + d2) / 2, atol=1e-6)
    # DARE with p = 0 is task arithmetic too
    assert torch.allclose(ops.dare(models, base=base, drop=0.0, consensus="none"), plain, atol=1e-6)


def test_sign_election_drops_the_minority():
    base = torch.zeros(3)
    models = [torch.tensor([1.0, -1.0, 2.0]), torch.tensor([2.0, -3.0, -1.0]), torch.tensor([-0.5, 1.0, 0.0])]
    # sums: 2.5 (+), -3 (-), 1 (+)
    got = ops.ties(models, base=base, density=1.0, normalize=False)
    assert torch.equal(got, torch.tensor([3.0, -4.0, 2.0]))


def test_per_key_seeds_are_reproducible_and_order_independent():
    base = torch.zeros(50, 50)
    model = torch.ones(50, 50)

    def run(key, seed):
        return ops.dare([model], base=base, drop=0.5, consensus="none", generator=key_generator(seed, key))

    first = {k: run(k, 7) for k in ("a", "b", "c")}
    again = {k: run(k, 7) for k in ("c", "a", "b")}  # other order, fresh generators
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not torch.equal(first["a"], first["b"])  # keys get different masks
    assert not torch.equal(first["a"], run("a", 8))  # seeds matter
    assert key_seed(7, "a") == key_seed(7, "a") and key_seed(7, "a") != key_seed(7, "b")


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_every_operator_leaves_its_inputs_untouched(name):
    op = OPERATORS[name]
    tensors = [_t(i, (4, 5)) for i in range(4)]
    before = [t.clone() for t in tensors]
    kwargs = {"generator": key_generator(0, "k")} if op.random else {}
    kwargs.update({o.name: 0.3 for o in op.keyword_options if o.required})  # beta of the supermerger modes
    if op.prepass is not None:  # two-pass operators: the statistics of this one key stand in for the model's
        kwargs.update(op.prepass.aggregate([op.prepass.statistic(tensors[:2])]))
    if op.inputs == "a":  # supermerger's self / plus random
        out = op.fn(tensors[:1], 0.4, **kwargs)
    elif op.inputs == "ab":
        out = op.fn(tensors[:2], 0.4, **kwargs)
    elif op.inputs == "abc":
        out = op.fn(tensors[:2], 0.4, base=tensors[2], **kwargs)
    else:
        out = op.fn(tensors[1:], 1.0, base=tensors[0], **kwargs)
    assert out.shape == (4, 5) and out.dtype == torch.float32
    assert all(torch.equal(a, b) for a, b in zip(tensors, before))
    assert all(out.data_ptr() != t.data_ptr() for t in tensors)


def test_compute_dtype_float64_is_more_accurate_than_float16_inputs_suggest():
    a, b = _t(1, (100,), torch.float16), _t(2, (100,), torch.float16)
    got = ops.weighted_sum((a, b), 1 / 3, compute_dtype=torch.float64)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), (2 / 3) * _np(a) + (1 / 3) * _np(b), atol=1e-12)


def test_errors_name_the_problem():
    a, b = torch.zeros(2, 3), torch.zeros(3, 2)
    with pytest.raises(ValueError, match="share one shape"):
        ops.weighted_sum((a, b), 0.5)
    with pytest.raises(ValueError, match="needs base"):
        ops.add_difference((a, a), 1.0)
    with pytest.raises(TypeError, match="integer"):
        ops.weighted_sum((torch.arange(3), torch.arange(3)), 0.5)
    with pytest.raises(ValueError, match="density"):
        ops.ties([a], base=a, density=1.5)
    with pytest.raises(ValueError, match="unknown merge operator"):
        ops.get_operator("average")


def test_count_consensus_votes_by_sign_not_by_mass():
    base = torch.zeros(1)
    models = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-5.0])]
    by_mass = ops.task_vector_merge(models, 1.0, base=base, consensus="sum")
    by_count = ops.task_vector_merge(models, 1.0, base=base, consensus="count")
    assert torch.equal(by_mass, torch.tensor([-5.0])) and torch.equal(by_count, torch.tensor([2.0]))
    mean = ops.task_vector_merge(models, 1.0, base=base, consensus="count", normalize=True)
    assert torch.equal(mean, torch.tensor([1.0]))  # disjoint mean of the two agreeing entries


# ----------------------------------------------------------------- ComfyUI's ModelSubtract / ModelAdd
def test_difference_and_add_are_comfyuis_subtract_and_add_in_float64():
    """ModelSubtract: ``add_patches(kp, -m, m)`` on model1 -> ``m·A − m·B``; ModelAdd: ``add_patches(kp, 1, 1)`` ->
    ``A + B`` (comfy/model_patcher.py: weight·strength_model + strength_patch·patch); ``add`` scales B by α."""
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g).half()
    for m in (1.0, 0.8, -0.5):
        got = OPERATORS["difference"].fn((a, b), m, compute_dtype=torch.float64)
        torch.testing.assert_close(got, a * m + (-m) * b.double(), rtol=0, atol=1e-15)
        got = OPERATORS["add"].fn((a, b), m, compute_dtype=torch.float64)
        torch.testing.assert_close(got, a + m * b.double(), rtol=0, atol=1e-15)
    assert torch.equal(b, b.clone())  # (the inputs are not written to)


def test_subtract_then_add_is_add_difference(tmp_path):
    """ComfyUI users save ``Subtract(B, C, k)`` and add it to A later: the two steps give ``add-difference A B C``."""
    from safetensors.torch import load_file
    from tiny_checkpoints import tiny_sd1_parts, write_single_file

    from sdadapt.merge.engine import merge_file
    from sdadapt.merge.recipe import MergeStep

    paths = [write_single_file(tiny_sd1_parts(seed), tmp_path / f"m{seed}.safetensors", architecture="sd1")
             for seed in (0, 1, 2)]
    merge_file(MergeStep("difference", (paths[1], paths[2]), alpha=0.7), tmp_path / "d.safetensors")
    merge_file(MergeStep("add", (paths[0], tmp_path / "d.safetensors"), alpha=1.0), tmp_path / "two.safetensors")
    merge_file(MergeStep("add-difference", (paths[0], paths[1], paths[2]), alpha=0.7), tmp_path / "one.safetensors")
    two, one = load_file(tmp_path / "two.safetensors"), load_file(tmp_path / "one.safetensors")
    merged = [k for k in one if one[k].is_floating_point()]
    assert merged and all(torch.allclose(two[k], one[k], rtol=0, atol=1e-6) for k in merged)
