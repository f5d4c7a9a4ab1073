"""supermerger's merge modes, calc modes and elemental merge, against float64 transcriptions of
hako-mikan/sd-webui-supermerger ``scripts/mergers/mergers.py`` written here (and scipy.ndimage for
smoothAdd's filters, sd-meh's ``clip_weights_key`` for weights_clip)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.merge.elemental import elemental_ratio, parse_elemental
from sdadapt.merge.engine import DictSource, MergedSource, merge_file, merge_state_dicts
from sdadapt.merge.recipe import MergeStep, load_recipe
from sdadapt.merge.supermerger_modes import (
    cosine_merge,
    cosine_range,
    extract,
    gaussian_filter,
    median_filter3,
    percentile_midpoint,
    smooth_add,
    sum_twice,
    tensor_slice,
    triple_sum,
)
from test_merge_engine import U, load_file_metadata, mini, save

f64 = torch.float64


def _r(g, *shape):
    return torch.randn(shape, generator=g, dtype=f64)


# ------------------------------------------------------------------ float64 transcriptions of supermerger


def ref_triple(a, b, c, alpha, beta):
    return (1 - alpha - beta) * a + alpha * b + beta * c


def ref_twice(a, b, c, alpha, beta):
    t = (1 - alpha) * a + alpha * b
    return (1 - beta) * t + beta * c


def ref_precosine(theta_0, theta_1, mode_a):
    """supermerger ``precosine`` over the given keys (float64): returns (s_min, s_max)."""
    sim = torch.nn.CosineSimilarity(dim=0)
    sims = np.array([], dtype=np.float64)
    for key in theta_0:
        if "first_stage_model" in key:
            continue
        if mode_a:
            n0 = F.normalize(theta_0[key].to(f64), p=2, dim=0)
            n1 = F.normalize(theta_1[key].to(f64), p=2, dim=0)
            sims = np.append(sims, sim(n0, n1).numpy())
        else:
            t0, t1 = theta_0[key].to(f64), theta_1[key].to(f64)
            simab = sim(t0, t1)
            mag = torch.dot(t0.view(-1), t1.view(-1)) / (torch.norm(t0) * torch.norm(t1))
            sims = np.append(sims, ((simab + mag) / 2.0).numpy())
    sims = sims[~np.isnan(sims)]
    sims = np.delete(sims, np.where(sims < np.percentile(sims, 1, method="midpoint")))
    sims = np.delete(sims, np.where(sims > np.percentile(sims, 99, method="midpoint")))
    return sims.min(), sims.max()


def ref_cosine(mode_a, a, b, alpha, s_min, s_max):
    """supermerger ``cosine`` for one key (uselerp path), float64."""
    sim = torch.nn.CosineSimilarity(dim=0)
    a, b = a.to(f64), b.to(f64)
    x, y = (F.normalize(a, p=2, dim=0), F.normalize(b, p=2, dim=0)) if mode_a else (a, b)
    simab = sim(x, y)
    mag = torch.dot(x.view(-1), y.view(-1)) / (torch.norm(x) * torch.norm(y))
    k = ((simab + mag) / 2.0 - s_min) / (s_max - s_min)
    k = (k - (abs(alpha) if mode_a else alpha)).clip(min=0, max=1.0)
    return torch.lerp(b, a, k)


def ref_extract(base, a, b, alpha, beta, gamma):
    """supermerger ``extract_super`` in float64."""
    base = base.to(f64)
    a = a.to(f64) - base
    b = b.to(f64) - base
    c = F.cosine_similarity(a, b, -1).clamp(-1, 1).unsqueeze(-1)
    d = ((c + 1) / 2) ** gamma
    return base + torch.lerp(a, b, alpha) * torch.lerp(d, 1 - d, beta)


def ref_tensormerge(mode, t0, t1, current_alpha, current_beta):
    """supermerger ``tensormerge`` (mode True = tensor, False = tensor2), dims 1..4 as it spells them out."""
    theta_0, theta_1, key = {"k": t0.clone()}, {"k": t1.clone()}, "k"
    dim = t0.dim()
    if mode:
        if current_alpha + current_beta <= 1:
            s = int(theta_0[key].shape[0] * current_beta)
            e = int(theta_0[key].shape[0] * (current_alpha + current_beta))
            theta_0[key][s:e] = theta_1[key][s:e].clone()
        else:
            s = int(theta_0[key].shape[0] * (current_alpha + current_beta - 1))
            e = int(theta_0[key].shape[0] * current_beta)
            theta_t = theta_1[key].clone()
            theta_t[s:e] = theta_0[key][s:e].clone()
            theta_0[key] = theta_t
    else:
        if current_alpha + current_beta <= 1:
            s = int(theta_0[key].shape[0] * current_beta)
            e = int(theta_0[key].shape[0] * (current_alpha + current_beta))
            if dim > 1 and theta_0[key].shape[1] > 100:
                s = int(theta_0[key].shape[1] * current_beta)
                e = int(theta_0[key].shape[1] * (current_alpha + current_beta))
            if dim == 1:
                theta_0[key][s:e] = theta_1[key][s:e].clone()
            else:
                theta_0[key][:, s:e] = theta_1[key][:, s:e].clone()
        else:
            s = int(theta_0[key].shape[0] * (current_alpha + current_beta - 1))
            e = int(theta_0[key].shape[0] * current_beta)
            theta_t = theta_1[key].clone()
            if dim > 1 and theta_0[key].shape[1] > 100:
                s = int(theta_0[key].shape[1] * (current_alpha + current_beta - 1))
                e = int(theta_0[key].shape[1] * current_beta)
            if dim == 1:
                theta_t[s:e] = theta_0[key][s:e].clone()
            else:
                theta_t[:, s:e] = theta_0[key][:, s:e].clone()
            theta_0[key] = theta_t
    return theta_0[key]


BLOCKID = ["BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12))]


def ref_blocker(blocks, blockids):
    """supermerger ``blocker``: expand ``A-B`` ranges in a space-separated block list."""
    output = ""
    for w in blocks.split(" "):
        flagger = [False] * len(blockids)
        if "-" in w:
            wt = [x.strip() for x in w.split("-")]
            i0, i1 = blockids.index(wt[0]), blockids.index(wt[1])
            lo, hi = min(i0, i1), max(i0, i1)
            flagger[lo : hi + 1] = [True] * (hi - lo + 1)
        else:
            output = output + " " + w if output else w
        for i in range(len(blockids)):
            if flagger[i]:
                output = output + " " + blockids[i] if output else blockids[i]
    return output


def ref_elementals(key, block, deep, current_alpha):
    """supermerger ``elementals`` (SD1, not extended, no random ratios)."""
    for d in deep.replace("\n", ",").split(","):
        if d.count(":") != 2:
            continue
        dbs, dws, dr = d.split(":")
        dbs = ref_blocker(dbs, BLOCKID)
        dbs, dws = dbs.split(" "), dws.split(" ")
        dbn, dbs = (True, dbs[1:]) if dbs[0] == "NOT" else (False, dbs)
        dwn, dws = (True, dws[1:]) if dws[0] == "NOT" else (False, dws)
        flag = dbn
        for db in dbs:
            if db == block:
                flag = not dbn
        if flag or dbs == [""]:
            flag = dwn
        else:
            continue
        for dw in dws:
            if dw in key:
                flag = not dwn
        if flag:
            current_alpha = float(dr)
    return current_alpha


# ------------------------------------------------------------------ the operators


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), alpha=st.floats(-1, 2), beta=st.floats(-1, 2),
       seed=st.integers(0, 2**16))
def test_triple_sum_and_sum_twice_match_the_float64_formulas(shape, alpha, beta, seed):
    g = torch.Generator().manual_seed(seed)
    a, b, c = (_r(g, *shape) for _ in range(3))
    kept = [t.clone() for t in (a, b, c)]
    for op, ref in ((triple_sum, ref_triple), (sum_twice, ref_twice)):
        want = ref(a, b, c, alpha, beta)
        got64 = op((a, b), alpha, base=c, beta=beta, compute_dtype=f64)
        assert torch.allclose(got64, want, rtol=1e-12, atol=1e-12), op.__name__
        got32 = op((a.float(), b.float()), alpha, base=c.float(), beta=beta)
        assert got32.dtype == torch.float32
        assert torch.allclose(got32.double(), want, rtol=1e-5, atol=1e-5), op.__name__
        assert all(torch.equal(t, k) for t, k in zip((a, b, c), kept))  # inputs untouched
    # the corners: alpha = beta = 0 is A; alpha = 1, beta = 0 is B; (triple) alpha = 0, beta = 1 is C
    assert torch.equal(triple_sum((a, b), 0.0, base=c, beta=0.0, compute_dtype=f64), a)
    assert torch.equal(triple_sum((a, b), 0.0, base=c, beta=1.0, compute_dtype=f64), c)
    assert torch.equal(sum_twice((a, b), 1.0, base=c, beta=0.0, compute_dtype=f64), b)


@settings(max_examples=30, deadline=None)
@given(shape=st.lists(st.integers(1, 6), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_median_and_gaussian_filters_match_scipy(shape, seed):
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    want = ndimage.median_filter(x.numpy(), size=3)
    assert np.array_equal(median_filter3(x).numpy(), want)  # a median picks a value: exact
    smooth = ndimage.gaussian_filter(want, sigma=1)
    got = gaussian_filter(torch.from_numpy(want), 1.0)
    assert got.dtype == torch.float32
    assert np.allclose(got.numpy(), smooth, rtol=2e-6, atol=2e-7)


def _reflect(i, n):
    """scipy.ndimage mode "reflect" (d c b a | a b c d | d c b a) for any index."""
    i %= 2 * n
    return 2 * n - 1 - i if i >= n else i


def test_filters_match_a_float64_loop_reference_without_scipy():
    x = torch.randn(4, 3, 2, generator=torch.Generator().manual_seed(5), dtype=f64)
    n = x.shape
    median = torch.empty_like(x)
    for idx in np.ndindex(*n):
        window = [float(x[tuple(_reflect(i + o - 1, m) for i, o, m in zip(idx, off, n))])
                  for off in np.ndindex(3, 3, 3)]
        median[idx] = sorted(window)[13]
    assert torch.equal(median_filter3(x), median)
    taps = np.exp(-0.5 * np.arange(-4, 5) ** 2)
    taps /= taps.sum()
    out = median.clone()
    for dim in range(3):
        prev = out.clone()
        for idx in np.ndindex(*n):
            total = 0.0
            for t, w in zip(range(-4, 5), taps):
                j = list(idx)
                j[dim] = _reflect(idx[dim] + t, n[dim])
                total += w * float(prev[tuple(j)])
            out[idx] = total
    assert torch.allclose(gaussian_filter(median, 1.0), out, rtol=1e-12, atol=1e-14)


def test_median_filter_chunks_do_not_change_the_result(monkeypatch):
    ndimage = pytest.importorskip("scipy.ndimage")
    import sdadapt.merge.supermerger_modes as modes

    x = torch.randn(7, 5, 3, 3, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(modes, "_MEDIAN_CHUNK", 45 * 2)  # two rows per slab
    assert np.array_equal(modes.median_filter3(x).numpy(), ndimage.median_filter(x.numpy(), size=3))


def _sorted_window_median3(x):
    """The median filter sdadapt shipped before the selection network (reflect-pad, ``unfold`` every
    dim, ``median`` of the 3^N window): the reference the network must equal value for value."""
    padded = x
    for dim in range(x.dim()):
        n = x.shape[dim]
        i = torch.arange(-1, n + 1) % (2 * n)
        padded = padded.index_select(dim, torch.where(i >= n, 2 * n - 1 - i, i))
    for dim in range(x.dim()):
        padded = padded.unfold(dim, 3, 1)
    return padded.reshape(*x.shape, -1).median(dim=-1).values


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 7), min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       levels=st.sampled_from([2, 3, 5, 1000]), seed=st.integers(0, 2**16), data=st.data())
def test_median_network_equals_the_sorted_window_median_and_scipy(shape, dtype, levels, seed, data):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randint(0, levels, shape, generator=g).to(torch.float64) * 0.37 - 0.5).to(dtype)  # many ties
    if data.draw(st.booleans(), label="specials"):  # ±inf and NaN go through min/max like median
        flat = x.reshape(-1)
        for value in (float("inf"), float("-inf"), float("nan")):
            flat[data.draw(st.integers(0, flat.numel() - 1), label=f"at {value}")] = value
    got = median_filter3(x)
    want = _sorted_window_median3(x)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0.25), want.nan_to_num(0.25))
    if not x.isnan().any():
        ndimage = pytest.importorskip("scipy.ndimage")
        assert np.array_equal(got.float().numpy(), ndimage.median_filter(x.float().numpy(), size=3))


@pytest.mark.parametrize("ndim", [1, 2, 3, 4])
def test_every_merge_stage_of_the_median_is_right_on_all_zero_one_inputs(ndim):
    """The 0-1 principle, exhaustively: a min/max network merging three sorted lists is right for all
    inputs iff it is right for every sorted 0/1 input — (m + 1)^3 of them (m zeros-counts per list)."""
    import sdadapt.merge.supermerger_modes as modes

    for stage, ranks in enumerate(modes._median_plan(ndim)):
        m = 3**stage
        program, outputs = modes._merge_stage(m, ranks)
        zeros = np.stack(np.meshgrid(*[np.arange(m + 1)] * 3, indexing="ij"), -1).reshape(-1, 3)  # (cases, 3)
        values = []
        for op, x, y in program:
            if op == "in":  # list x, rank y: 0 for the first zeros[x] ranks
                values.append((y >= zeros[:, x]).astype(np.int8))
            else:
                values.append((np.minimum if op == "min" else np.maximum)(values[x], values[y]))
        ones = 3 * m - zeros.sum(1)  # the merged list is 0…0 1…1
        for rank, output in zip(ranks, outputs):
            assert np.array_equal(values[output], (rank >= 3 * m - ones).astype(np.int8)), (ndim, stage, rank)
    assert modes._median_plan(ndim)[-1] == ((3**ndim - 1) // 2,)


def _whole_tensor_gaussian(x, sigma=1.0, truncate=4.0):
    """The gaussian filter sdadapt shipped before the slabs (each pass over the whole tensor): the
    slabbed passes must give the same bits."""
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1, dtype=f64)
    kernel = torch.exp(-0.5 / sigma**2 * taps**2)
    kernel = (kernel / kernel.sum()).tolist()
    out = x
    for dim in range(x.dim()):
        n = x.shape[dim]
        i = torch.arange(-radius, n + radius) % (2 * n)
        padded = out.to(f64).index_select(dim, torch.where(i >= n, 2 * n - 1 - i, i))
        total = torch.zeros(out.shape, dtype=f64)
        for tap, weight in enumerate(kernel):
            total.add_(padded.narrow(dim, tap, n), alpha=weight)
        out = total.to(x.dtype)
    return out


@settings(max_examples=40, deadline=None)
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
       chunk=st.sampled_from([1, 7, 64, 1 << 16]), seed=st.integers(0, 2**16))
def test_gaussian_slabs_give_the_bits_of_whole_tensor_passes(shape, dtype, chunk, seed):
    import sdadapt.merge.supermerger_modes as modes

    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=f64).to(dtype)
    saved = modes._GAUSSIAN_CHUNK
    modes._GAUSSIAN_CHUNK = chunk  # (hypothesis and monkeypatch do not mix)
    try:
        got = modes.gaussian_filter(x, 1.0)
    finally:
        modes._GAUSSIAN_CHUNK = saved
    assert got.dtype == dtype and torch.equal(got, _whole_tensor_gaussian(x))


def test_median_network_on_conv_and_linear_sized_slabs_equals_scipy(monkeypatch):
    ndimage = pytest.importorskip("scipy.ndimage")
    import sdadapt.merge.supermerger_modes as modes

    monkeypatch.setattr(modes, "_MEDIAN_CHUNK", 1000)  # slabs of 3 and 10 rows, a short last slab
    g = torch.Generator().manual_seed(3)
    for x in (torch.randn(20, 37, 3, 3, generator=g), torch.randn(33, 100, generator=g),
              torch.randn(1, 5, 3, 3, generator=g), torch.randn(2, 300, 1, 1, generator=g)):
        assert np.array_equal(modes.median_filter3(x).numpy(), ndimage.median_filter(x.numpy(), size=3))


def test_smooth_add_is_a_plus_alpha_times_scipys_smoothed_difference():
    ndimage = pytest.importorskip("scipy.ndimage")
    g = torch.Generator().manual_seed(1)
    a, b, c = (torch.randn(6, 5, 3, 3, generator=g) for _ in range(3))
    diff = (b - c).numpy()  # float32, as supermerger hands it to scipy
    smoothed = ndimage.gaussian_filter(ndimage.median_filter(diff, size=3), sigma=1)
    want = a.double() + 1.5 * torch.from_numpy(smoothed).double()
    got = smooth_add((a, b), 1.5, base=c)
    assert torch.allclose(got.double(), want, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, a + 1.5 * (b - c), atol=1e-2)  # it really smooths


@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), alpha=st.floats(0, 1), beta=st.floats(0, 1),
       gamma=st.one_of(st.just(0.0), st.floats(1e-3, 4)), seed=st.integers(0, 2**16))
def test_extract_matches_supermergers_extract_super(shape, alpha, beta, gamma, seed):
    g = torch.Generator().manual_seed(seed)
    base, a, b = (_r(g, *shape) for _ in range(3))
    want = ref_extract(base, a, b, alpha, beta, gamma)
    assert torch.allclose(extract((base, a), alpha, base=b, beta=beta, gamma=gamma, compute_dtype=f64), want,
                          rtol=1e-10, atol=1e-10)
    # (a gamma that float32 rounds to 0 would make 0**gamma 1 there: supermerger's float32 does the same)
    got32 = extract((base.float(), a.float()), alpha, base=b.float(), beta=beta, gamma=gamma)
    assert torch.allclose(got32.double(), want, rtol=1e-4, atol=1e-4)


def test_extract_refuses_what_supermerger_asserts():
    t = torch.ones(2, 2)
    for kwargs in ({"alpha": 1.5, "beta": 0.0}, {"alpha": 0.5, "beta": -0.1}, {"alpha": 0.5, "beta": 0.5, "gamma": -1}):
        alpha = kwargs.pop("alpha")
        with pytest.raises(InputError, match="extract"):
            extract((t, t), alpha, base=t, **kwargs)


@pytest.mark.parametrize("shape", [(10,), (10, 7), (9, 120), (12, 4, 3, 3), (5, 130, 1, 1), (3, 200), (7, 100), (6, 101)])
@pytest.mark.parametrize("alpha, beta", [(0.3, 0.25), (0.5, 0.5), (0.7, 0.6), (1.0, 0.0), (0.25, 0.9), (0.0, 0.3),
                                         (0.33, 0.33), (-0.2, 0.5)])
def test_tensor_and_tensor2_copy_supermergers_slices(shape, alpha, beta):
    g = torch.Generator().manual_seed(3)
    a, b = _r(g, *shape), _r(g, *shape)
    kept = a.clone(), b.clone()
    for columns, mode in ((False, True), (True, False)):
        want = ref_tensormerge(mode, a, b, alpha, beta)
        got = tensor_slice((a, b), alpha, beta=beta, columns=columns, compute_dtype=f64)
        assert torch.equal(got, want), (columns, alpha, beta)
        assert torch.equal(a, kept[0]) and torch.equal(b, kept[1])  # the slice went into a copy


def test_percentile_midpoint_is_numpys():
    values = torch.randn(1001, generator=torch.Generator().manual_seed(0), dtype=f64)
    for n in (1, 2, 3, 10, 101, 1001):
        for q in (0, 1, 37.5, 50, 99, 100):
            assert percentile_midpoint(values[:n], q) == np.percentile(values[:n].numpy(), q, method="midpoint")
    # numpy rounds the midpoint as hi - (hi - lo)/2; lo + (hi - lo)/2 is an ulp off here
    lo, hi = -0.0029013615188444135, -0.000692970059603328
    pair = torch.tensor([lo, hi], dtype=f64)
    assert percentile_midpoint(pair, 50) == np.percentile(pair.numpy(), 50, method="midpoint") != lo + 0.5 * (hi - lo)


def ref_trim(sims):
    """supermerger ``precosine``'s pooling after the similarities: NaN out, then < p1 out, then > p99 of the rest."""
    sims = sims[~np.isnan(sims)]
    sims = np.delete(sims, np.where(sims < np.percentile(sims, 1, method="midpoint")))
    sims = np.delete(sims, np.where(sims > np.percentile(sims, 99, method="midpoint")))
    return sims.min(), sims.max()


@pytest.mark.parametrize("n", [1, 2, 3, 50, 102, 203, 305, 1000])
def test_cosine_range_trims_like_supermergers_precosine(n):
    # the 99th percentile is of what is left after the 1st-percentile cut (n = 2, 102, 203, ... tell them apart)
    g = torch.Generator().manual_seed(n)
    pooled = torch.randn(n, generator=g, dtype=f64)
    pooled[::7] = float("nan") if n > 1 else pooled[::7]
    split = [pooled[: n // 3].reshape(-1, 1), pooled[n // 3 :], torch.zeros(0, dtype=f64)]  # keys of any shape
    got = cosine_range(split)
    s_min, s_max = ref_trim(pooled.numpy())
    assert (got["s_min"], got["s_max"]) == (s_min, s_max)


# ------------------------------------------------------------------ engine: two passes, elemental, weights_clip


def _merged_keys(state):
    return [k for k in state if (k.startswith(U) or k.startswith("cond_stage_model")) and "position_ids" not in k]


@pytest.mark.parametrize("operator, mode_a, alpha", [("cosine-a", True, -0.2), ("cosine-b", False, 0.1)])
def test_cosine_modes_match_supermerger_over_the_whole_model(operator, mode_a, alpha):
    A, B = mini(0, dtype=torch.float32), mini(1, dtype=torch.float32)
    step = MergeStep(operator, ("a", "b"), alpha=alpha, dtype="fp64", compute_dtype="fp64")
    out, report = merge_state_dicts(step, [A, B])
    keys = _merged_keys(A)
    s_min, s_max = ref_precosine({k: A[k] for k in keys}, {k: B[k] for k in keys}, mode_a)
    assert any("first pass over" in n for n in report.notes)
    changed = 0
    for key in keys:
        want = ref_cosine(mode_a, A[key], B[key], alpha, s_min, s_max)
        assert torch.allclose(out[key], want, rtol=1e-10, atol=1e-12), key
        changed += not torch.equal(out[key], A[key].double())
    assert changed >= len(keys) // 2
    vae = "first_stage_model.decoder.conv_in.weight"
    assert torch.equal(out[vae], A[vae].double()) and "supermerger" in report.copied[vae]


def test_the_first_pass_reads_each_merged_key_once_before_any_merge(monkeypatch):
    import sdadapt.merge.supermerger_modes as modes

    calls = []
    real_similarity = modes._key_similarity  # every similarity computed, in either pass
    monkeypatch.setattr(modes, "_key_similarity", lambda a, b, **k: calls.append("stat") or real_similarity(a, b, **k))
    A, B = mini(0, dtype=torch.float32), mini(1, dtype=torch.float32)
    source = MergedSource(MergeStep("cosine-b", ("a", "b"), alpha=0.0), sources=[DictSource(A), DictSource(B)])
    assert calls == []  # planning does not read tensors
    merged = [k for k in source.keys() if k in source.report.merged]  # noqa: SIM118 (a source, not a dict)
    for key in merged:
        source.get(key)
    assert calls == ["stat"] * len(merged)  # one pass; the merge of every key takes its statistic, computes none
    note = f"cosine-b first pass over {len(merged)} keys: s_min {_s(source, 's_min')}, s_max {_s(source, 's_max')}"
    assert [n for n in source.report.notes if "first pass" in n] == [note]


def _s(source, name):
    return f"{source._prepassed[name]:.6g}"


def test_elemental_rules_follow_supermergers_elementals_on_sd1():
    keys_blocks = [
        (U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", "IN04"),
        (U + "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0.weight", "IN04"),
        (U + "input_blocks.5.1.proj_in.weight", "IN05"),
        (U + "middle_block.1.transformer_blocks.0.attn2.to_q.weight", "M00"),
        (U + "output_blocks.5.1.transformer_blocks.0.attn2.to_out.0.weight", "OUT05"),
        (U + "output_blocks.3.0.in_layers.2.weight", "OUT03"),
        ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", "BASE"),
    ]
    texts = [
        "IN04 IN05:attn2:0.5",
        "OUT06:attn:0.5,OUT06:attn2.to_k:0.2\nOUT03-OUT05:attn2 in_layers:0.7",
        "NOT OUT04:attn:1",
        "OUT05:NOT attn proj:0.2",
        "IN05-IN03::0.9, :to_out:0.1",
        "NOT IN04 M00:NOT attn1:0.3,BASE::0",
        ":attn:0.25\nNOT :to_q:0.75",
    ]
    for text in texts:
        rules = parse_elemental(text, architecture="sd1")
        for key, block in keys_blocks:
            assert elemental_ratio(rules, key, block, 0.42) == ref_elementals(key, block, text, 0.42), (text, key)


_ELEMENTS = ["attn", "attn2", "attn1.to_out", "proj", "in_layers", "to_k", "q_proj"]
_rule = st.builds(
    lambda nb, blocks, ne, elements, ratio: f"{'NOT ' if nb else ''}{' '.join(blocks)}:"
                                            f"{'NOT ' if ne and elements else ''}{' '.join(elements)}:{ratio}",
    st.booleans(), st.lists(st.sampled_from(BLOCKID[1:] + ["IN02-IN06", "OUT05-OUT01"]), max_size=3), st.booleans(),
    st.lists(st.sampled_from(_ELEMENTS), max_size=2), st.sampled_from(["0", "0.5", "1", "-0.25"]),
)


@settings(max_examples=60, deadline=None)
@given(rules=st.lists(_rule, min_size=1, max_size=4), separators=st.sampled_from([",", "\n", ", "]))
def test_random_elemental_rules_agree_with_supermerger(rules, separators):
    text = separators.join(rules)
    parsed = parse_elemental(text, architecture="sd1")
    keys_blocks = [
        (U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight", "IN04"),
        (U + "input_blocks.2.0.in_layers.2.weight", "IN02"),
        (U + "middle_block.1.proj_out.weight", "M00"),
        (U + "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0.weight", "OUT03"),
        ("cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", "BASE"),
    ]
    for key, block in keys_blocks:
        assert elemental_ratio(parsed, key, block, 0.42) == ref_elementals(key, block, text, 0.42), (text, key)


def test_elemental_text_errors_name_the_rule():
    for text, match in (("IN04:attn2", "BLOCKS:ELEMENTS:RATIO"), ("IN13:attn:1", "IN13"), ("IN04:attn:x", "not a number"),
                        ("IN04:attn:inf", "finite"), ("", "no rule")):
        with pytest.raises(InputError, match=match):
            parse_elemental(text, architecture="sd1")
    with pytest.raises(InputError, match="IN09"):
        parse_elemental("IN09::1", architecture="sdxl")
    with pytest.raises(InputError, match="NOT needs"):
        parse_elemental("IN04:NOT :1", architecture="sd1")
    with pytest.raises(InputError, match="more than 1024 rules"):
        parse_elemental(",".join(["IN04:attn:1"] * 1025), architecture="sd1")
    with pytest.raises(InputError, match="IN13"):
        MergeStep("weighted-sum", ("a", "b"), alpha=0.5, elemental="IN13::1")  # checked when the step is made


def test_elemental_merge_applies_after_block_weights_and_is_recorded(tmp_path):
    a, b = save(tmp_path, "a.safetensors", mini(0)), save(tmp_path, "b.safetensors", mini(1))
    vector = [0.0] * 26
    vector[1 + 4] = 1.0  # IN04 -> B
    rules = "IN04:proj_in:0.5\nOUT11:out.2:1, BASE:q_proj:0.25"
    step = MergeStep("weighted-sum", (a, b), block_weights=tuple(vector), elemental=rules, dtype="fp32")
    report = merge_file(step, tmp_path / "o.safetensors")
    out, A, B = load_file(tmp_path / "o.safetensors"), load_file(a), load_file(b)

    def lerp(key, w):
        return ((1 - w) * A[key].double() + w * B[key].double()).float()

    q = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    for key, w in ((U + "input_blocks.4.1.proj_in.weight", 0.5), (U + "out.2.weight", 1.0), (q, 0.25),
                   (U + "input_blocks.1.1.proj_in.weight", 0.0), (U + "input_blocks.0.0.bias", 0.0)):
        assert torch.allclose(out[key], lerp(key, w), atol=1e-6), key
    assert any("elemental rules changed the strength of 3" in n for n in report.notes)
    meta = load_file_metadata(tmp_path / "o.safetensors")
    assert json.loads(meta["sd_merge_recipe"])["elemental_merge"] == rules.replace("\n", ",").split(",")  # supermerger's list
    replayed, _ = load_recipe(tmp_path / "o.safetensors")
    assert replayed.elemental == rules


def test_elemental_on_sdxl_uses_sdxl_blocks_not_sd1_ids():
    # supermerger #468: an SDXL key's position in the SDXL list is looked up in the SD1 list, so there
    # "IN09" hits the middle block and "OUT00" hits OUT03; here the SDXL names mean the SDXL blocks
    from sdadapt.merge.blocks import ldm_block

    mid = U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    out0 = U + "output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight"
    rules = parse_elemental("OUT00:attn2:1", architecture="sdxl")
    assert elemental_ratio(rules, out0, ldm_block(out0, architecture="sdxl"), 0.0) == 1.0
    assert elemental_ratio(rules, mid, ldm_block(mid, architecture="sdxl"), 0.0) == 0.0


def _sdxl(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(s, generator=g) * 0.1
    return {
        U + "label_emb.0.0.weight": r(8, 8),
        U + "input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": r(8, 8),
        U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight": r(8, 8),
        U + "output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight": r(8, 8),
        U + "output_blocks.3.1.transformer_blocks.0.attn2.to_k.weight": r(8, 8),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": r(8, 8),
        "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight": r(24, 8),
        "first_stage_model.decoder.conv_in.weight": r(8, 4, 3, 3),
    }


def test_sdxl_checkpoints_in_the_engine_elemental_blocks_and_cosine_text_encoders():
    A, B = _sdxl(0), _sdxl(1)
    out, report = merge_state_dicts(MergeStep("weighted-sum", ("a", "b"), alpha=0.0, elemental="OUT00 M00:attn2:1"),
                                    [A, B])
    took_b = {k for k in A if torch.equal(out[k], B[k])}
    assert took_b == {U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                      U + "output_blocks.0.1.transformer_blocks.0.attn2.to_k.weight"}
    assert all(torch.equal(out[k], A[k]) for k in set(A) - took_b)
    assert any("(sdxl blocks)" in n for n in report.notes)
    # cosine: both text encoders are in the first pass and merged, the VAE is neither
    out, report = merge_state_dicts(MergeStep("cosine-b", ("a", "b"), alpha=0.0, compute_dtype="fp64", dtype="fp64"),
                                    [A, B])
    merged = [k for k in A if not k.startswith("first_stage_model")]
    s_min, s_max = ref_precosine({k: A[k] for k in merged}, {k: B[k] for k in merged}, False)
    for key in merged:
        assert torch.allclose(out[key], ref_cosine(False, A[key], B[key], 0.0, s_min, s_max), rtol=1e-10, atol=1e-12)
    assert sorted(report.merged) == sorted(merged)
    assert any(f"first pass over {len(merged)} keys" in n for n in report.notes)


def test_elemental_on_diffusers_keys_places_blocks_like_ldm(tmp_path):
    pytest.importorskip("diffusers")
    from merge_layouts import layout, write_random_checkpoint

    from sdadapt.formats.model_keys import convert_checkpoint

    shapes = layout("tiny-sd1")
    paths = [write_random_checkpoint(tmp_path / f"{n}.safetensors", shapes, seed=i, dtype=torch.float32)
             for i, n in enumerate("ab")]
    ldm = [load_file(p) for p in paths]
    diffusers = [convert_checkpoint(state, to="diffusers")[0] for state in ldm]
    rules = "IN02 OUT04:attn2.to_k:1, M00::0.9\nNOT IN01-OUT03:attn1:0"
    step = MergeStep("weighted-sum", ("a", "b"), alpha=0.25, elemental=rules)
    out_ldm, rep_ldm = merge_state_dicts(step, ldm)
    out_diff, rep_diff = merge_state_dicts(step, diffusers)
    back = convert_checkpoint(out_diff, to="ldm")[0]
    assert set(back) == set(out_ldm)
    assert all(torch.equal(back[k], out_ldm[k]) for k in out_ldm)
    changed = [n for n in rep_ldm.notes if "elemental" in n]
    assert changed and changed == [n for n in rep_diff.notes if "elemental" in n]
    assert "changed the strength of 0 " not in changed[0]
    # cosine: the same keys pooled in the first pass (VAE left out in both namings), the same result
    step = MergeStep("cosine-a", ("a", "b"), alpha=0.1)
    (out_ldm, rep_ldm), (out_diff, rep_diff) = merge_state_dicts(step, ldm), merge_state_dicts(step, diffusers)
    back = convert_checkpoint(out_diff, to="ldm")[0]
    assert all(torch.equal(back[k], out_ldm[k]) for k in out_ldm)
    vae = [k for k in out_diff if k.startswith("vae.")]
    assert vae and all(torch.equal(out_diff[k], diffusers[0][k]) for k in vae)
    first = [n for n in rep_ldm.notes if "first pass" in n]
    assert first and first == [n for n in rep_diff.notes if "first pass" in n]


def test_per_key_strengths_need_an_operator_with_one():
    states = [mini(i, dtype=torch.float32) for i in range(3)]
    for fields in ({"elemental": "IN04::0.5"}, {"block_weights": (0.5,) * 26}):
        with pytest.raises(InputError, match="model-stock has no strength.*leave them out"):
            merge_state_dicts(MergeStep("model-stock", ("a", "b", "c"), **fields), states)
    with pytest.raises(InputError, match=r"extract \(block weights / elemental rules, .*middle_block.*'alpha'.*\[0, 1\]"):
        merge_state_dicts(MergeStep("extract", ("a", "b", "c"), alpha=0.5, options={"beta": 0.2}, elemental="M00::1.5"),
                          states)  # refused while planning, naming the key, not halfway through the file
    out, _ = merge_state_dicts(MergeStep("task-arithmetic", ("a", "b", "c"), elemental="IN04::0"), states)
    key = U + "input_blocks.4.1.proj_in.weight"
    assert torch.equal(out[key], states[0][key])  # lam 0 on IN04: the base


@pytest.mark.parametrize("operator, alpha, options", [("add-difference", 2.5, {}), ("weighted-sum", 1.7, {}),
                                                      ("triple-sum", 0.8, {"beta": 0.9})])
def test_weights_clip_clamps_to_sd_mehs_range(operator, alpha, options):
    states = [mini(i, dtype=torch.float32) for i in range(2 if operator == "weighted-sum" else 3)]
    names = tuple("abc"[: len(states)])
    plain, _ = merge_state_dicts(MergeStep(operator, names, alpha=alpha, options=options), states)
    clipped, _ = merge_state_dicts(MergeStep(operator, names, alpha=alpha, options={**options, "weights_clip": True}),
                                   states)
    A, B = states[0], states[1]
    touched = 0
    for key in _merged_keys(A):
        t0, t1 = A[key], B[key]
        want = torch.minimum(torch.maximum(plain[key], torch.minimum(t0, t1)), torch.maximum(t0, t1))  # sd-meh
        assert torch.equal(clipped[key], want), key
        touched += not torch.equal(clipped[key], plain[key])
    assert touched > 0


# ------------------------------------------------------------------ command line and recipes


def run(*argv: str) -> int:
    return main(["merge", *argv])


@pytest.mark.parametrize("argv", [
    ["triple-sum", "{a}", "{b}", "{c}", "--alpha", "0.3", "--beta", "0.2", "--elemental", "IN04:proj:0.9"],
    ["cosine-a", "{a}", "{b}", "--alpha", "0.1"],
    ["sum-twice", "{a}", "{b}", "{c}", "--alpha", "0.4", "--beta", "0.3", "--weights-clip"],
    ["smooth-add", "{a}", "{b}", "{c}", "--alpha", "1.5"],
    ["extract", "{a}", "{b}", "{c}", "--alpha", "0.5", "--beta", "0.25", "--gamma", "2"],
    ["tensor2", "{a}", "{b}", "--alpha", "0.5", "--beta", "0.75"],
])
def test_new_commands_replay_their_recipe_bit_exactly(tmp_path, argv, capsys):
    files = dict(zip("abc", (save(tmp_path, f"{n}.safetensors", mini(i)) for i, n in enumerate("abc"))))
    out = tmp_path / "o.safetensors"
    assert run(*[x.format(**files) for x in argv], "-o", str(out), "-q") == 0
    assert run("--recipe", str(out), "-o", str(tmp_path / "replay.safetensors"), "-q") == 0
    assert (tmp_path / "replay.safetensors").read_bytes() == out.read_bytes()
    step = json.loads(load_file_metadata(out)["sdadapt_merge_recipe"])["step"]
    assert step["operator"] == argv[0]
    if "--beta" in argv:
        assert step["options"]["beta"] == float(argv[argv.index("--beta") + 1])
        assert json.loads(load_file_metadata(out)["sd_merge_recipe"])["base_beta"] == step["options"]["beta"]
    assert ("elemental" in step) == ("--elemental" in argv)
    assert ("weights_clip" in step["options"]) == ("--weights-clip" in argv)


@pytest.mark.parametrize("command, flags", [
    ("triple-sum", ["--alpha", "--beta", "--weights-clip", "--elemental"]), ("sum-twice", ["--beta"]),
    ("cosine-a", ["--alpha"]), ("cosine-b", ["--alpha"]), ("smooth-add", ["--alpha"]),
    ("extract", ["--alpha", "--beta", "--gamma"]), ("tensor", ["--beta"]), ("tensor2", ["--beta"]),
    ("block-weighted", ["--elemental"]),
])
def test_new_commands_have_help_with_their_formula(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(command, "--help")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in flags)
    if command != "block-weighted":
        assert "supermerger" in text


def test_cosine_needs_a_spread_and_tensor_options_are_checked(tmp_path):
    # equal inputs: every similarity is 1, the range is empty; supermerger divides by zero, here k = 1 - alpha
    A = mini(0, dtype=torch.float32)
    out, _ = merge_state_dicts(MergeStep("cosine-b", ("a", "b"), alpha=0.3), [A, dict(A)])
    assert all(torch.equal(out[k], A[k]) for k in _merged_keys(A))
    assert cosine_range([torch.tensor([0.5, 0.5])]) == {"s_min": 0.5, "s_max": 0.5}
    g = torch.Generator().manual_seed(2)
    a, b = _r(g, 4, 3), _r(g, 4, 3)
    for normalize in (True, False):  # an empty range: the scaled similarity is 1, so k = 1 - alpha
        got = cosine_merge((a, b), 0.3, normalize=normalize, s_min=0.25, s_max=0.25, compute_dtype=f64)
        assert torch.allclose(got, torch.lerp(b, a, 0.7), rtol=1e-12, atol=1e-12)
    with pytest.raises(InputError, match="beta"):
        MergeStep("tensor", ("a", "b"), alpha=0.5)
    with pytest.raises(InputError, match="alpha"):
        MergeStep("extract", ("a", "b", "c"), alpha=1.5, options={"beta": 0.0})


def test_docs_supermerger_example_runs(capsys):
    from docs_pages import run_block

    run_block("merge.md", 1)
    assert "cosine-a first pass over" in capsys.readouterr().out
