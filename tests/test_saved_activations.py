"""``benchmarks/saved_activations.py``'s counter of what autograd saves for backward: each distinct
storage once, parameters and buffers left out, checked against sizes worked out by hand."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from saved_activations import SavedActivations
from torch import nn


@settings(max_examples=20, deadline=None)
@given(rows=st.integers(1, 6), width=st.integers(1, 9), out=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
def test_it_counts_each_saved_storage_once_and_no_parameter(rows, width, out, dtype):
    """``sigmoid(linear(x)) * x``: the linear saves ``x`` (and its weight: left out), the sigmoid its
    output, the product both factors — ``x`` again (a view of it too), so ``x`` and the sigmoid's
    output once each."""
    layer = nn.Linear(width, out).to(dtype)
    x = torch.randn(rows, width, dtype=dtype, requires_grad=True)
    with SavedActivations([*layer.parameters()]) as saved:
        h = torch.sigmoid(layer(x))
        y = h * x[:, :1]  # (broadcast over out: the product saves h and the view x[:, :1])
    size = torch.empty((), dtype=dtype).element_size()
    assert saved.total == (rows * width + rows * out) * size
    assert dict(saved.bytes_by_dtype) == {str(dtype): saved.total}
    assert saved.storages == 2
    y.sum().backward()  # (the hooks let the saved tensors through unchanged)
    expected = torch.autograd.grad(torch.sigmoid(layer(x)).mul(x[:, :1]).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


def test_outside_the_block_nothing_is_counted():
    layer = nn.Linear(4, 4)
    x = torch.randn(3, 4, requires_grad=True)
    with SavedActivations(layer.parameters()) as saved:
        pass
    torch.sigmoid(layer(x))
    assert saved.total == 0 and saved.storages == 0
