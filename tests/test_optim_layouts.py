"""AdamW(foreach=True) hands CUDA's multi-tensor kernels lists they can take in one launch.

CUDA's ``_foreach_*`` kernels take their fast route only when the corresponding tensors of all the
lists of an op share sizes and strides (and each list one dtype); otherwise they loop over the
tensors, one launch each. A channels_last conv weight beside its row-major int8 moments broke that
for every op of its chunk. The condition is checked here on a CPU (where every foreach op takes the
per-tensor route anyway) by recording the ops' arguments; the results must stay those of the
per-parameter step, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdadapt.training.optim import AdamW


def _same_layout(a: torch.Tensor, b: torch.Tensor) -> bool:
    """ATen's ``_check_tensors_share_sizes_and_strides`` for one pair (a size-1 dim's stride is free)."""
    return a.shape == b.shape and all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


def is_non_overlapping_and_dense(t: torch.Tensor) -> bool:
    """Its elements fill one block of memory without gaps or overlaps (in some dimension order)."""
    expected = 1
    for dim in sorted((d for d in range(t.dim()) if t.shape[d] != 1), key=t.stride):
        if t.stride(dim) != expected:
            return False
        expected *= t.shape[dim]
    return True


class _ForeachArguments(TorchDispatchMode):
    """Records every ``_foreach_*`` op whose tensor lists would not take CUDA's fast route."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self.slow: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name.startswith("_foreach_") and name != "_foreach_copy_":  # (a write-back into another layout: per tensor by nature)
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and all(isinstance(t, torch.Tensor) for t in a)]
            # a list of 0-dim tensors beside tensors is a list of scalars (the capturable step's bias
            # corrections: per tensor in torch's own capturable AdamW too, inside a graph)
            lists = [lst for lst in lists if lst[0].dim() > 0] or lists
            self.ops.append(name)
            first = lists[0]
            for other in lists[1:]:
                if len(other) == len(first) and not all(_same_layout(a, b) for a, b in zip(first, other)):
                    self.slow.append(f"{name}: strides differ")
            for lst in lists:
                if any(t.dtype != lst[0].dtype for t in lst) or not all(is_non_overlapping_and_dense(t) for t in lst):
                    self.slow.append(f"{name}: mixed dtypes or not dense")
        return func(*args, **(kwargs or {}))


def _params(dtype: torch.dtype, channels_last: bool) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    convs = [torch.randn(8, 6, 3, 3, generator=g), torch.randn(4, 8, 1, 1, generator=g), torch.randn(16, 3, 3, 3, generator=g)]
    if channels_last:
        convs = [c.contiguous(memory_format=torch.channels_last) for c in convs]
    others = [torch.randn(37, generator=g), torch.randn(5, 7, generator=g)]
    return [torch.nn.Parameter(t.to(dtype)) for t in (convs[0], others[0], convs[1], others[1], convs[2])]


def _run(params, **options):
    opt = AdamW(params, lr=1e-2, weight_decay=0.1, generator=torch.Generator().manual_seed(3), **options)
    g = torch.Generator().manual_seed(1)
    recorder = _ForeachArguments()
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype).contiguous(
                memory_format=torch.channels_last if p.dim() == 4 and not p.is_contiguous() else torch.contiguous_format)
        if options.get("foreach"):
            with recorder:
                opt.step()
        else:
            opt.step()
    return [p.detach().clone() for p in params], opt, recorder


@pytest.mark.parametrize("state_dtype", ["int8", torch.bfloat16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capturable", [False, True])
def test_every_multi_tensor_op_gets_lists_of_one_layout_and_the_result_is_the_per_parameter_steps(
        state_dtype, dtype, capturable):
    if state_dtype == torch.float32 and dtype == torch.float32 and capturable:
        pytest.skip("covered by the non-capturable case")
    options = dict(state_dtype=state_dtype, stochastic_rounding=False, capturable=capturable)
    batched, opt, recorder = _run(_params(dtype, channels_last=True), foreach=True, **options)
    assert recorder.ops and recorder.slow == [], sorted(set(recorder.slow))
    reference, ref_opt, _ = _run(_params(dtype, channels_last=True), foreach=False, **options)
    for a, b in zip(batched, reference):
        assert torch.equal(a, b) and a.stride() == b.stride()  # the parameters keep their layout
    for p, q in zip(opt.param_groups[0]["params"], ref_opt.param_groups[0]["params"]):
        for key, value in ref_opt.state[q].items():
            other = opt.state[p][key]
            assert torch.equal(torch.as_tensor(other), torch.as_tensor(value)), key
            if isinstance(value, torch.Tensor) and value.dim() == 4:
                assert other.stride() == value.stride(), key  # moments keep the parameter's layout
