"""cosine-a / cosine-b compute each key's similarity once: the pre-pass hands it to the merge pass.

The reference is the code path before that change, transcribed here: the pre-pass pooled
``cosine_statistic`` and threw it away, and ``cosine_merge`` computed the similarity again for
every key. Every output file must be the same bytes as that path gives (float32 / fp16 / bf16
compute, block weights and weights_clip changing alpha per key, all-zero keys kept as A, VAE keys
skipped, a cosine step nested in a cosine step).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import sdadapt.merge.supermerger_modes as modes
from sdadapt.merge.engine import DictSource, MergedSource, merge_file
from sdadapt.merge.operators import OPERATORS, PrePass
from sdadapt.merge.recipe import MergeStep
from sdadapt.merge.supermerger_modes import CosineStatistic, cosine_key_statistic, cosine_merge, cosine_range
from test_merge_engine import U, mini, save

# ------------------------------------------------------------------ the old path, transcribed


def _old_flat_cos(x, y):
    return torch.dot(x.reshape(-1), y.reshape(-1)) / (torch.linalg.vector_norm(x) * torch.linalg.vector_norm(y))


def _old_columns(t):
    return t.reshape(1) if t.dim() == 0 else t


def old_cosine_statistic(tensors, *, normalize, compute_dtype=torch.float32):
    a, b = (_old_columns(t.to(compute_dtype, copy=True)) for t in tensors)
    if normalize:
        return F.cosine_similarity(F.normalize(a, p=2, dim=0), F.normalize(b, p=2, dim=0), dim=0)
    return (F.cosine_similarity(a, b, dim=0) + _old_flat_cos(a, b)) / 2.0


def old_cosine_merge(tensors, weights, *, normalize, s_min, s_max, compute_dtype=torch.float32):
    alpha = float(weights)
    a, b = (t.to(compute_dtype, copy=True) for t in tensors)
    if not bool(torch.any(a)) or not bool(torch.any(b)):
        return a
    x, y = _old_columns(a), _old_columns(b)
    if normalize:
        x, y = F.normalize(x, p=2, dim=0), F.normalize(y, p=2, dim=0)
    similarity = (F.cosine_similarity(x, y, dim=0) + _old_flat_cos(x, y)) / 2.0
    spread = s_max - s_min
    scaled = (similarity - s_min) / spread if spread != 0 else torch.ones_like(similarity)
    k = (scaled - (abs(alpha) if normalize else alpha)).clip(min=0.0, max=1.0)
    return torch.lerp(b, a, k)


def _old_operator(name: str):
    """The registered operator with the old two-pass wiring (statistic pooled, then recomputed)."""
    normalize = name == "cosine-a"
    new = OPERATORS[name]
    return dataclasses.replace(
        new,
        fn=lambda tensors, weights, *, base=None, s_min, s_max, compute_dtype=torch.float32: old_cosine_merge(
            tensors, weights, normalize=normalize, s_min=s_min, s_max=s_max, compute_dtype=compute_dtype),
        prepass=PrePass(lambda tensors, *, compute_dtype=torch.float32: old_cosine_statistic(
            tensors, normalize=normalize, compute_dtype=compute_dtype), cosine_range, new.prepass.skip),
    )


# ------------------------------------------------------------------ inputs

ZERO_IN_A = U + "input_blocks.7.1.proj_in.weight"  # all zeros in A: kept as A (keep_first)
ZERO_IN_B = U + "output_blocks.4.1.proj_out.weight"  # all zeros in B


def _checkpoints(tmp_path):
    g = torch.Generator().manual_seed(7)
    extra_a = {ZERO_IN_A: torch.zeros(8, 8, 1, 1, dtype=torch.float16),
               ZERO_IN_B: torch.randn(8, 8, 1, 1, generator=g).half(),
               U + "output_blocks.2.1.conv.bias": torch.randn(8, generator=g).half(),
               U + "middle_block.0.in_layers.2.weight": torch.randn(16, 8, 3, 3, generator=g).half()}
    extra_b = {ZERO_IN_A: torch.randn(8, 8, 1, 1, generator=g).half(),
               ZERO_IN_B: torch.zeros(8, 8, 1, 1, dtype=torch.float16),
               U + "output_blocks.2.1.conv.bias": torch.randn(8, generator=g).half(),
               # partly similar to A: the per-column similarities spread over [-1, 1]
               U + "middle_block.0.in_layers.2.weight": extra_a[U + "middle_block.0.in_layers.2.weight"]
               + 0.7 * torch.randn(16, 8, 3, 3, generator=g).half()}
    a = save(tmp_path, "a.safetensors", mini(0, extra=extra_a))
    b = save(tmp_path, "b.safetensors", mini(1, extra=extra_b))
    c = save(tmp_path, "c.safetensors", mini(2, extra=extra_b))
    return a, b, c


BLOCKS = tuple(round(0.04 * i - 0.3, 2) for i in range(26))  # every block its own alpha, some negative


def _bytes_both_ways(monkeypatch, tmp_path, step: MergeStep, names: tuple[str, ...]) -> tuple[bytes, bytes]:
    new_out = tmp_path / "new.safetensors"
    merge_file(step, new_out, save_recipe=False, overwrite=True)
    with monkeypatch.context() as patch:
        for name in names:
            patch.setitem(OPERATORS, name, _old_operator(name))
        old_out = tmp_path / "old.safetensors"
        merge_file(step, old_out, save_recipe=False, overwrite=True)
    return new_out.read_bytes(), old_out.read_bytes()


@pytest.mark.parametrize("operator", ["cosine-a", "cosine-b"])
@pytest.mark.parametrize("compute", ["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("per_key_alpha", [False, True])
def test_the_file_is_the_bytes_of_the_recomputing_path(monkeypatch, tmp_path, operator, compute, per_key_alpha):
    a, b, _ = _checkpoints(tmp_path)
    extra = dict(block_weights=BLOCKS, options={"weights_clip": True}) if per_key_alpha else dict(alpha=0.15)
    step = MergeStep(operator, (a, b), compute_dtype=compute, dtype="fp32", **extra)
    new, old = _bytes_both_ways(monkeypatch, tmp_path, step, (operator,))
    assert new == old
    # the inputs make both the keep_first and the skip branches run, and k is not all 0 or 1
    report = merge_file(step, tmp_path / "again.safetensors", save_recipe=False)
    assert "all zeros" in report.copied[ZERO_IN_A] and "all zeros" in report.copied[ZERO_IN_B]
    assert "first_stage_model" in report.copied["first_stage_model.decoder.conv_in.weight"]


def test_a_cosine_step_read_by_another_cosine_step_is_the_same_file(monkeypatch, tmp_path):
    # the outer step's two passes read every inner key twice: the second read computes the statistic again
    a, b, c = _checkpoints(tmp_path)
    inner = MergeStep("cosine-a", (a, b), alpha=-0.1, compute_dtype="fp16")
    step = MergeStep("cosine-b", (inner, c), block_weights=BLOCKS, dtype="fp32")
    new, old = _bytes_both_ways(monkeypatch, tmp_path, step, ("cosine-a", "cosine-b"))
    assert new == old


@pytest.mark.parametrize("operator", ["cosine-a", "cosine-b"])
def test_each_key_keeps_one_value_per_column_until_it_is_merged(operator):
    A, B = mini(0, dtype=torch.float32), mini(1, dtype=torch.float32)
    source = MergedSource(MergeStep(operator, ("a", "b"), alpha=0.0), sources=[DictSource(A), DictSource(B)])
    merged = [k for k in source.keys() if k in source.report.merged]  # noqa: SIM118 (a source, not a dict)
    source._prepass_arguments()
    assert sorted(source._statistics) == sorted(merged)
    for key in merged:
        columns, whole = source._statistics[key]
        assert columns.shape == A[key].shape[1:] and columns.device.type == "cpu"
        assert (whole is None) == (operator == "cosine-b") and (whole is None or whole.dim() == 0)
    for key in merged:
        source.get(key)
    assert source._statistics == {}  # each handed out once, then dropped


# ------------------------------------------------------------------ the function itself

_SHAPES = st.sampled_from([(), (5,), (6, 3), (4, 3, 3, 3), (7, 2, 1, 1), (1, 9)])
_DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64])


@settings(max_examples=60, deadline=None)
@given(shape=_SHAPES, dtype=_DTYPES, compute=_DTYPES, normalize=st.booleans(), alpha=st.floats(-1, 1),
       seed=st.integers(0, 2**31 - 1), s_min=st.floats(-1, 0.5), spread=st.sampled_from([0.0, 0.3, 1.0, 1.5]))
def test_cosine_merge_with_the_statistic_is_bitwise_the_recomputation(shape, dtype, compute, normalize, alpha, seed,
                                                                      s_min, spread):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=g).to(dtype)
    b = (a * 0.5 + torch.randn(shape, generator=g)).to(dtype)
    options = dict(normalize=normalize, s_min=s_min, s_max=s_min + spread, compute_dtype=compute)
    statistic = cosine_key_statistic((a, b), normalize=normalize, compute_dtype=compute)
    want = old_cosine_merge((a, b), alpha, **options)
    assert torch.equal(cosine_merge((a, b), alpha, statistic=statistic, **options), want)
    assert torch.equal(cosine_merge((a, b), alpha, **options), want)
    # the pooled part is supermerger's precosine value, as before
    assert torch.equal(statistic.columns, old_cosine_statistic((a, b), normalize=normalize, compute_dtype=compute))


def test_a_statistic_that_does_not_fit_the_key_is_refused():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    other = cosine_key_statistic((torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)), normalize=True)
    options = dict(normalize=True, s_min=-0.5, s_max=0.5)
    with pytest.raises(ValueError, match=r"shape \(5,\).*another key"):
        cosine_merge((a, b), 0.1, statistic=other, **options)
    half = cosine_key_statistic((a, b), normalize=True, compute_dtype=torch.float16)
    with pytest.raises(ValueError, match="computed in torch.float16"):
        cosine_merge((a, b), 0.1, statistic=half, **options)
    with pytest.raises(ValueError, match="cosineB statistic"):
        cosine_merge((a, b), 0.1, statistic=cosine_key_statistic((a, b), normalize=False), **options)
    with pytest.raises(ValueError, match="cosineA statistic"):
        cosine_merge((a, b), 0.1, statistic=CosineStatistic(torch.zeros(4), torch.tensor(0.0)),
                     normalize=False, s_min=-0.5, s_max=0.5)


# ------------------------------------------------------------------ review additions


@pytest.mark.parametrize("operator", ["cosine-a", "cosine-b"])
def test_a_key_kept_as_a_drops_its_statistic_too(operator):
    # (review) a key the merge pass keeps as A (all zeros in A or in B) was pooled by the first pass
    # too: its statistic must go when that key is read, or it stays in memory for the whole merge
    A, B = mini(0, dtype=torch.float32), mini(1, dtype=torch.float32)
    zero_a, zero_b = sorted(k for k in A if k.startswith(U) and k.endswith(".weight") and A[k].dim() >= 2)[:2]
    A[zero_a], B[zero_b] = torch.zeros_like(A[zero_a]), torch.zeros_like(B[zero_b])
    source = MergedSource(MergeStep(operator, ("a", "b"), alpha=0.1), sources=[DictSource(A), DictSource(B)])
    merged = [k for k in source.keys() if k in source.report.merged]  # noqa: SIM118 (a source, not a dict)
    assert zero_a in merged and zero_b in merged
    source._prepass_arguments()
    assert zero_a in source._statistics and zero_b in source._statistics
    for key in merged:
        source.get(key)
    assert "all zeros" in source.report.copied[zero_a] and "all zeros" in source.report.copied[zero_b]
    assert source._statistics == {}
