"""The small pieces the optimisers in ``sdadapt.training`` share: ``_float32`` (the per-parameter
float32 working copy, the counterpart of ``_float32_many``) and ``_bias_corrected`` (Adam's bias
correction of the step size, DAdaptAdam's and Prodigy's)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.training.optim import _float32, _float32_many
from sdadapt.training.step_size_estimate import _bias_corrected


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "transposed"])
def test_a_float32_tensor_is_its_own_working_copy_in_any_layout(layout):
    t = torch.randn(2, 3, 4, 5)
    t = {"contiguous": t, "channels_last": t.to(memory_format=torch.channels_last), "transposed": t.transpose(1, 3)}[layout]
    assert _float32(t) is t  # (updated in place; _write_weight then skips the write-back)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_narrower_tensor_is_copied_exactly_to_float32(dtype):
    t = torch.randn(3, 7).to(dtype)
    w = _float32(t)
    assert w.dtype == torch.float32 and w.shape == t.shape
    assert w.data_ptr() != t.data_ptr()
    assert torch.equal(w.double(), t.double())  # every bf16/fp16 value is a float32 value
    w.add_(1.0)
    assert torch.equal(t, (w - 1.0).to(dtype))  # a copy: t is left as it was
    assert torch.equal(_float32_many([t])[0], _float32(t))  # the multi-tensor path's values


@settings(max_examples=50, deadline=None)
@given(beta1=st.floats(0.0, 0.999), beta2=st.floats(0.0, 0.9999), k=st.integers(0, 500),
       step=st.floats(1e-8, 10.0))
def test_the_bias_correction_is_adams_formula(beta1, beta2, k, step):
    """dadaptation 3.2 (DAdaptAdam.step) and prodigyopt 1.1.2 (Prodigy.step):
    ``bias_correction = ((1 - beta2**(k+1))**0.5) / (1 - beta1**(k+1))``, times ``d · lr``."""
    group = {"betas": (beta1, beta2), "use_bias_correction": True}
    got = _bias_corrected(torch.tensor(step, dtype=torch.float64), group, torch.tensor(float(k), dtype=torch.float64))
    want = step * (math.sqrt(1 - beta2 ** (k + 1)) / (1 - beta1 ** (k + 1)))
    assert got.dtype == torch.float64 and got.dim() == 0
    assert math.isclose(got.item(), want, rel_tol=1e-12)


def test_without_the_bias_correction_the_step_size_is_left_as_it_is():
    step = torch.tensor(0.125, dtype=torch.float64)
    assert _bias_corrected(step, {"betas": (0.9, 0.999), "use_bias_correction": False}, torch.tensor(3.0)) is step
    first = _bias_corrected(step, {"betas": (0.9, 0.999), "use_bias_correction": True}, torch.tensor(0.0, dtype=torch.float64))
    assert first.item() == pytest.approx(0.125 * math.sqrt(0.001) / 0.1, rel=1e-14)  # step 1: √(1 − β₂) / (1 − β₁)
