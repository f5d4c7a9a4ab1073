"""A notebook user's first calls of the merge operators on their own model: the A/B/C operators given the command
line's three models as ``tensors`` say how to call them, and ``merge_state_dicts`` on a state dict that is no
Stable Diffusion checkpoint says what to use instead (and its suggestion runs)."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import sdadapt
from sdadapt.merge import MergeError, MergeStep, merge_state_dicts, supermerger_modes
from sdadapt.merge import operators as ops


def _tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(5, 3, generator=g) for _ in range(3))  # type: ignore[return-value]


@pytest.mark.parametrize("op", [ops.add_difference, ops.train_difference, supermerger_modes.smooth_add])
def test_three_tensors_and_no_base_names_the_call(op):
    a, b, c = _tensors()
    name = op.__name__
    with pytest.raises(ValueError, match=re.escape(f"{name}: takes tensors=(A, B) and the third model as base=C")) as info:
        op([a, b, c], 0.5)
    assert f"call {name}([A, B], ..., base=C)" in str(info.value)
    with pytest.raises(ValueError, match="needs 2 tensors, got 1"):  # (other counts: the count, as before)
        op([a], 0.5, base=c)


def test_the_call_the_message_names_is_the_documented_formula():
    a, b, c = _tensors(1)
    want = a.double() + 0.4 * (b.double() - c.double())  # docs/merge.md: add-difference = A + α·(B − C)
    assert torch.allclose(ops.add_difference([a, b], 0.4, base=c).double(), want, atol=1e-6)


def _block(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Linear(8, 4)).state_dict()


def test_merge_state_dicts_of_another_model_points_at_the_per_tensor_operators():
    a, b = _block(0), _block(1)
    with pytest.raises(MergeError, match="nothing to merge") as info:
        merge_state_dicts(MergeStep("weighted-sum", ("a", "b"), alpha=0.3), [a, b])
    message = str(info.value)
    assert "none of them is a Stable Diffusion checkpoint's" in message
    suggestion = re.search(r"e\.g\. (\{.*\})", message).group(1)  # the suggestion runs and is the weighted sum
    merged = eval(suggestion, {"sdadapt": sdadapt, "a": a, "b": b})  # (our own message, in a test)
    assert set(merged) == set(a)
    for key in a:
        assert torch.allclose(merged[key].double(), 0.7 * a[key].double() + 0.3 * b[key].double(), atol=1e-6)


def test_a_checkpoint_with_nothing_mergeable_gets_no_such_hint():
    from sdadapt.merge import KeyPolicy

    key = "model.diffusion_model.out.2.weight"  # an SD key, its component left out: nothing merged, yet a checkpoint
    step = MergeStep("weighted-sum", ("a", "b"), alpha=0.3, policy=KeyPolicy(components=("vae",)))
    with pytest.raises(MergeError, match="nothing to merge") as info:
        merge_state_dicts(step, [{key: torch.zeros(4, 8)}, {key: torch.ones(4, 8)}])
    assert "Stable Diffusion checkpoint's" not in str(info.value)
