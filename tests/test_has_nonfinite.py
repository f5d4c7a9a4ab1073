"""``checks.has_nonfinite`` (one ``aminmax`` reduction for the usual float dtypes) says what
``not isfinite(t).all()`` says, for every dtype, shape, stride and position of a NaN / ±inf."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.checks import has_nonfinite

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.int64, torch.uint8]
if hasattr(torch, "float8_e4m3fn"):
    DTYPES.append(torch.float8_e4m3fn)


def _reference(tensor: torch.Tensor) -> bool:
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return False
    return not bool(torch.isfinite(tensor.to(torch.complex128 if tensor.is_complex() else torch.float64)).all())


@settings(max_examples=150, deadline=None)
@given(dtype=st.sampled_from(DTYPES), shape=st.lists(st.integers(0, 6), min_size=0, max_size=3),
       special=st.sampled_from([None, float("nan"), float("inf"), -float("inf")]), where=st.integers(0, 10_000),
       strided=st.booleans(), seed=st.integers(0, 2**16))
def test_has_nonfinite_is_isfinite(dtype, shape, special, where, strided, seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(*shape, 2, generator=g, dtype=torch.float64) * 100
    if special is not None and values.numel():
        values.view(-1)[where % values.numel()] = special
    tensor = values.to(dtype) if dtype.is_floating_point or dtype.is_complex else values.nan_to_num().clamp(0, 200).to(dtype)
    if strided:
        tensor = tensor[..., 0]  # (a non-contiguous view: every other element)
    assert has_nonfinite(tensor) == _reference(tensor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_a_single_nan_or_inf_anywhere_is_found(dtype):
    for special in (float("nan"), float("inf"), -float("inf")):
        for i in range(12):
            t = torch.ones(3, 4, dtype=dtype)
            t.view(-1)[i] = special
            assert has_nonfinite(t) and has_nonfinite(t.t())
    assert not has_nonfinite(torch.full((5,), torch.finfo(dtype).max, dtype=dtype))
