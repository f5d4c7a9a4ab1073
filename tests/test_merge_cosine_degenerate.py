"""supermerger's cosineA/cosineB on keys whose similarity is undefined (an all-zero tensor, in A or B).

supermerger (``scripts/mergers/mergers.py``, ``cosine``) computes, per key,
``(CosineSimilarity(dim=0)(X, Y) + dot(X, Y)/(‖X‖·‖Y‖))/2``: torch's column cosine clamps the norms
with ``eps=1e-8`` (0 for a zero column) but the whole-tensor term divides by the raw norms, so an
all-zero A or B gives ``0/0 = NaN``; ``k`` is NaN, ``clip`` keeps NaN and ``lerp(B, A, NaN)`` writes
NaN over the whole key. sdadapt keeps A's tensor for such a key instead and the report says so
(A == B: lerp(B, A, k) = A for every finite k, so that is what any defined k would give).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sdadapt.merge.engine import merge_state_dicts
from sdadapt.merge.recipe import MergeStep
from test_merge_engine import U, mini
from test_merge_supermerger import ref_cosine, ref_precosine

f64 = torch.float64
ZERO = U + "input_blocks.4.1.proj_in.weight"


def _supermerger_key_is_nan(mode_a: bool, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Run the float64 transcription of supermerger's ``cosine`` on one key: is its output NaN?"""
    return bool(torch.isnan(ref_cosine(mode_a, a, b, 0.0, -1.0, 1.0)).all())


@pytest.mark.parametrize("operator, mode_a", [("cosine-a", True), ("cosine-b", False)])
@pytest.mark.parametrize("which", ["both", "a", "b"])
def test_cosine_keeps_a_where_supermerger_writes_nan(operator, mode_a, which):
    A, B = mini(0, dtype=torch.float32), mini(1, dtype=torch.float32)
    if which in ("both", "a"):
        A[ZERO] = torch.zeros_like(A[ZERO])
    if which in ("both", "b"):
        B[ZERO] = torch.zeros_like(B[ZERO])
    assert _supermerger_key_is_nan(mode_a, A[ZERO], B[ZERO])  # the reference really is undefined there
    out, report = merge_state_dicts(MergeStep(operator, ("a", "b"), alpha=0.1, dtype="fp64", compute_dtype="fp64"), [A, B])
    assert torch.equal(out[ZERO], A[ZERO].double())
    assert ZERO in report.copied and "similarity" in report.copied[ZERO] and ZERO not in report.merged
    assert "similarity" in report.summary()
    # every other key is supermerger's value (its pre-pass drops the NaN, cosineA pools the 0s of the zero key)
    keys = [k for k in A if (k.startswith(U) or k.startswith("cond_stage_model")) and "position_ids" not in k]
    s_min, s_max = ref_precosine({k: A[k] for k in keys}, {k: B[k] for k in keys}, mode_a)
    for key in keys:
        if key != ZERO:
            want = ref_cosine(mode_a, A[key], B[key], 0.1, s_min, s_max)
            assert torch.allclose(out[key], want, rtol=1e-10, atol=1e-12), key


@pytest.mark.parametrize("operator, mode_a", [("cosine-a", True), ("cosine-b", False)])
def test_cosine_of_identical_models_is_the_model(operator, mode_a):
    # A == B: every similarity is 1, s_max == s_min (supermerger divides by 0 there: 0/0 = NaN);
    # any finite k gives lerp(A, A, k) = A
    A = mini(0, dtype=torch.float32)
    out, report = merge_state_dicts(MergeStep(operator, ("a", "b"), alpha=0.3, dtype="fp32"), [A, dict(A)])
    for key in report.merged:
        assert torch.equal(out[key], A[key]), key


def test_zero_column_is_not_nan_in_supermerger_and_merges_normally():
    # a zero *column* (not a zero tensor): torch's eps makes its column cosine 0, the key stays defined
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(6, 5, generator=g, dtype=f64), torch.randn(6, 5, generator=g, dtype=f64)
    a[:, 2] = 0
    assert not torch.isnan(ref_cosine(True, a, b, 0.0, -1.0, 1.0)).any()
    assert not torch.isnan(ref_cosine(False, a, b, 0.0, -1.0, 1.0)).any()
    sim = torch.nn.CosineSimilarity(dim=0)(F.normalize(a, dim=0), F.normalize(b, dim=0))
    assert sim[2] == 0 and np.isfinite(sim.numpy()).all()
