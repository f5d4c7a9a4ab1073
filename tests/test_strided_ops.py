"""``benchmarks/strided_ops.py``: which elementwise ops a CUDA kernel would run strided, and where the LoRA
step's come from (the UNet's own code, the same in peft's step and sdadapt's)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from strided_ops import StridedOps, census, dense_alike


def _dense_reference(t: torch.Tensor) -> bool:
    """Dense: some order of the dimensions makes ``t`` contiguous (checked by trying every permutation)."""
    import itertools

    return any(t.permute(order).is_contiguous() for order in itertools.permutations(range(t.dim())))


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 4), min_size=1, max_size=4), data=st.data())
def test_dense_alike_is_one_layout_with_no_holes(shape, data):
    base = torch.zeros(shape)
    order = data.draw(st.permutations(range(len(shape))))
    laid_out = base.permute(order).contiguous().permute(sorted(range(len(shape)), key=lambda i: order[i]))
    assert laid_out.shape == base.shape
    assert dense_alike([laid_out]) == _dense_reference(laid_out) is True
    assert dense_alike([laid_out, laid_out.clone(memory_format=torch.preserve_format)])
    sliced = torch.zeros(*shape[:-1], 2 * shape[-1])[..., : shape[-1]]  # a chunk of a wider tensor
    assert dense_alike([sliced]) == _dense_reference(sliced)
    if base.dim() > 1 and shape[0] > 1 and shape[-1] > 1:
        assert not dense_alike([base, base.transpose(0, -1).contiguous().transpose(0, -1)])  # two layouts
    if base.numel() > 1:
        assert not dense_alike([base, torch.zeros(()).expand(shape)])  # a broadcast operand
        assert not dense_alike([base, torch.zeros(())])


def test_the_recorder_keeps_strided_calls_and_counts_biased_convolutions():
    x = torch.randn(4, 6, requires_grad=True)
    wide = torch.randn(4, 12)
    recorder = StridedOps()
    with recorder:
        (x + 1).sum()  # dense: not kept
        y = x * wide[:, :6]  # a chunk: kept, and its backward's product
        y.sum().backward()
        F.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3), torch.randn(3))
        F.conv2d(torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3))
    ops = {(op, caller.split()[0]) for op, caller, _ in recorder.strided}
    assert ("mul", "?") in ops and ("mul", "backward") in ops
    assert all(op != "add" for op, _ in ops)
    assert recorder.conv_bias_adds == 1
    assert recorder.elementwise >= 3


def test_the_lora_steps_strided_ops_are_the_unets_own():
    rows = census("tiny", 1, ("peft-unet", "sdadapt-halfnorms"))
    peft, ours = rows["peft-unet"], rows["sdadapt-halfnorms"]

    def by_model_code(ops):
        return sorted((op, caller, n) for (op, caller, _), n in ops.strided.items()
                      if caller.split(":")[0] in ("activations.py", "attention.py", "resnet.py", "transformer_2d.py"))

    assert by_model_code(ours) and by_model_code(ours) == by_model_code(peft)
    adapter_files = ("lora.py", "base.py", "shared_input.py", "weight_casts.py", "tuners_utils.py", "layer.py")
    assert not [key for key in ours.strided if key[1].split(":")[0] in adapter_files]
    assert ours.conv_bias_adds == peft.conv_bias_adds > 0
    assert ours.elementwise < peft.elementwise
