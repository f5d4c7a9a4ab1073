"""Re-read of the session's in-place deltas (LoHa, LoKr, full; ``adapter_working_copy(consumable=)``).

The deltas now multiply into tensors they allocated themselves (LoHa's halves' product, LoKr's Kronecker
product, a consumable working copy's float32 ``diff``). What must hold, each checked against the
out-of-place formulas of 3aa3c74 (``a * b * scale``, ``kron(w1, w2) * scale``, ``diff * scale``),
written out here:

* no tensor the caller holds changes (the factors, the scale, a module's parameters);
* the values are those formulas' bit for bit, the dtype too (halves of two dtypes: the promoted one);
* gradients in float64 are the formulas' for every input, a trainable 0-dim scale included;
* a full module's ``diff`` is handed over only by a consumable copy's own converted tensor, never
  while autograd needs it, never one it shares with the module.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.adapters.base import LayerGeometry
from sdadapt.adapters.loha import loha_delta_weight
from sdadapt.adapters.lokr import lokr_delta_weight
from sdadapt.adapters.registry import (
    adapter_from_file_tensors,
    adapter_layer_delta,
    adapter_working_copy,
)
from sdadapt.adapters.tucker import rebuild_tucker


def _head_loha(w1_a, w1_b, w2_a, w2_b, scale, kernel=(), t1=None, t2=None):
    """3aa3c74's ``loha_delta_weight`` (out of place)."""
    if t1 is not None:
        return rebuild_tucker(t1, w1_a, w1_b) * rebuild_tucker(t2, w2_a, w2_b) * scale
    out = w1_a.shape[0]
    delta = (w1_a.reshape(out, -1) @ w1_b.reshape(w1_b.shape[0], -1)) * (w2_a.reshape(out, -1) @ w2_b.reshape(w2_b.shape[0], -1))
    return (delta * scale).reshape(out, -1, *kernel)


def _head_lokr(w1, w2, scale):
    """3aa3c74's ``lokr_delta_weight``."""
    w1 = w1.reshape(*w1.shape, *([1] * (w2.dim() - w1.dim())))
    return torch.kron(w1, w2.contiguous()) * scale


def _loha_inputs(g, *, out, inn, rank, kernel, tucker, dtype):
    if tucker:  # (Tucker: w_a (r, out), w_b (r, in), core (r, r, *k))
        shapes = [(rank, out), (rank, inn), (rank, out), (rank, inn)]
        cores = [torch.randn(rank, rank, *kernel, generator=g).to(dtype) for _ in range(2)]
    else:
        k = 1
        for size in kernel:
            k *= size
        shapes = [(out, rank), (rank, inn * k), (out, rank), (rank, inn * k)]
        cores = [None, None]
    return [torch.randn(*s, generator=g).to(dtype) for s in shapes], cores


@settings(max_examples=25, deadline=None)
@given(out=st.integers(1, 6), inn=st.integers(1, 6), rank=st.integers(1, 4), conv=st.booleans(), tucker=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       scale_kind=st.sampled_from(["float", "tensor", "tensor64", "vector"]), seed=st.integers(0, 2**16))
def test_loha_and_lokr_deltas_are_the_out_of_place_formulas_and_touch_no_input(out, inn, rank, conv, tucker, dtype,
                                                                               scale_kind, seed):
    g = torch.Generator().manual_seed(seed)
    kernel = (3, 3) if conv or tucker else ()
    scale = {"float": 0.37, "tensor": torch.tensor(0.37, dtype=dtype), "tensor64": torch.tensor(0.37, dtype=torch.float64),
             "vector": torch.full((1,), 0.37, dtype=dtype)}[scale_kind]
    factors, (t1, t2) = _loha_inputs(g, out=out, inn=inn, rank=rank, kernel=kernel, tucker=tucker, dtype=dtype)
    held = [t.clone() for t in (*factors, *(c for c in (t1, t2) if c is not None))]
    scale_held = scale.clone() if isinstance(scale, torch.Tensor) else scale
    got = loha_delta_weight(*factors, scale, kernel=kernel, t1=t1, t2=t2)
    want = _head_loha(*factors, scale, kernel=kernel, t1=t1, t2=t2)
    assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)
    assert all(torch.equal(a, b) for a, b in zip((*factors, *(c for c in (t1, t2) if c is not None)), held))
    assert not isinstance(scale, torch.Tensor) or torch.equal(scale, scale_held)
    # LoKr: w1 (a, c), w2 (b, d, *k)
    w1 = torch.randn(2, 3, generator=g).to(dtype)
    w2 = torch.randn(out, inn, *kernel, generator=g).to(dtype)
    kept = (w1.clone(), w2.clone())
    got = lokr_delta_weight(w1, w2, scale)
    want = _head_lokr(w1, w2, scale)
    assert got.dtype == want.dtype and torch.equal(got, want)
    assert torch.equal(w1, kept[0]) and torch.equal(w2, kept[1])


def test_loha_halves_of_two_dtypes_give_the_promoted_product():
    """A file whose two Hadamard halves differ in dtype (an fp16 and an fp32 pair): the product is float32, as
    3aa3c74's ``a * b`` (the in-place multiply must not keep the first half's float16)."""
    g = torch.Generator().manual_seed(0)
    w1_a, w1_b = torch.randn(4, 2, generator=g).half(), torch.randn(2, 5, generator=g).half()
    w2_a, w2_b = torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g)
    got = loha_delta_weight(w1_a, w1_b, w2_a, w2_b, 0.5)
    want = _head_loha(w1_a, w1_b, w2_a, w2_b, 0.5)
    assert got.dtype == torch.float32 and torch.equal(got, want)


@pytest.mark.parametrize("tucker", [False, True])
def test_loha_and_lokr_gradients_are_the_formulas_in_float64(tucker):
    """Autograd through the in-place products: every factor's, every core's and a trainable 0-dim scale's gradient
    equal those of the out-of-place formula (float64; the in-place multiply must leave what backward reads)."""
    g = torch.Generator().manual_seed(3)
    kernel = (3, 3) if tucker else ()
    factors, cores = _loha_inputs(g, out=5, inn=4, rank=3, kernel=kernel, tucker=tucker, dtype=torch.float64)
    leaves = [t.requires_grad_() for t in (*factors, *(c for c in cores if c is not None))]
    scale = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 4, *kernel, generator=g, dtype=torch.float64)
    got = loha_delta_weight(*factors, scale, kernel=kernel, t1=cores[0], t2=cores[1])
    want = _head_loha(*factors, scale, kernel=kernel, t1=cores[0], t2=cores[1])
    grads = torch.autograd.grad((got * weight).sum(), [*leaves, scale])
    expected = torch.autograd.grad((want * weight).sum(), [*leaves, scale])
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    w1 = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(3, 2, *kernel, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 6, *kernel, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad((lokr_delta_weight(w1, w2, scale) * weight).sum(), [w1, w2, scale])
    expected = torch.autograd.grad((_head_lokr(w1, w2, scale) * weight).sum(), [w1, w2, scale])
    for a, b in zip(grads, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _full_module(dtype, *, bias=False):
    g = torch.Generator().manual_seed(5)
    tensors = {"diff": torch.randn(6, 4, generator=g).to(dtype)}
    if bias:
        tensors["diff_b"] = torch.randn(6, generator=g).to(dtype)
    module = adapter_from_file_tensors(LayerGeometry.from_weight_shape((6, 4), has_bias=bias), tensors, name="x")
    return module, tensors


def test_a_consumable_copy_keeps_a_diff_autograd_needs():
    """With autograd on and a ``diff`` that needs a gradient, the consumable copy's delta is out of place: the copy
    keeps its ``diff``, a second delta works, and the gradient is ``scale · upstream`` (3aa3c74's ``diff * scale``)."""
    module, tensors = _full_module(torch.float16)
    work = adapter_working_copy(module, torch.float32, consumable=True)
    assert work.diff.requires_grad  # (the file's parameter needs a gradient: the copy's does too)
    work.set_multiplier(0.5)
    delta = work.delta_weight()
    assert work.diff is not None and delta.data_ptr() != work.diff.data_ptr()
    upstream = torch.randn(6, 4, generator=torch.Generator().manual_seed(1))
    (grad,) = torch.autograd.grad((delta * upstream).sum(), [work.diff])
    assert torch.equal(grad, upstream * 0.5)
    assert torch.equal(work.delta_weight().detach(), tensors["diff"].float() * 0.5)  # (again: nothing was handed over)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_no_delta_scales_a_tensor_the_module_or_the_caller_holds(dtype):
    """Deltas of every kind of working copy leave the module and the file tensors the caller built it from
    bit for bit as they were, whatever was shared (float32 file: the copy shares ``diff``; float16: converts it)."""
    module, tensors = _full_module(dtype, bias=True)
    files = {k: v.clone() for k, v in tensors.items()}
    params = {k: v.detach().clone() for k, v in module.named_parameters()}
    for _ in range(2):  # (twice: a first delta must not leave the module scaled for the next)
        for kwargs in ({"consumable": True}, {}, {"vectors_only": True}):
            work = adapter_working_copy(module, torch.float32, **kwargs)
            delta, bias = adapter_layer_delta(work, scale=0.25, dtype=torch.float32, name="x",
                                              weight="vectors_only" not in kwargs)
            if delta is not None:
                assert torch.equal(delta, files["diff"].float() * torch.tensor(0.25))
            assert torch.equal(bias, files["diff_b"].float() * torch.tensor(0.25))
        assert all(torch.equal(tensors[k], files[k]) for k in files)
        assert all(torch.equal(v, params[k]) and v.dtype == dtype for k, v in module.named_parameters())
