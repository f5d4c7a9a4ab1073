"""One comparison for "two optimiser runs ended in the same place": the parameters and every state
entry of each, bit for bit (used by the foreach, capturable and flat-step equivalence tests); and a
state handed from one optimiser to another as a saved checkpoint hands it."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch

__all__ = ["assert_same_optimizer_state", "load_saved_state"]


def assert_same_optimizer_state(pa: Sequence[torch.Tensor], oa: torch.optim.Optimizer, pb: Sequence[torch.Tensor],
                                ob: torch.optim.Optimizer, *, step_as_number: bool = False) -> None:
    """``pa[i]`` equals ``pb[i]`` (dtype and values) and ``oa.state[pa[i]]`` equals ``ob.state[pb[i]]``:
    the same keys, tensors of the same dtype, shape and values, other entries equal.

    Args:
        step_as_number: compare ``"step"`` as a number (an int in one mode, a float32 0-dim tensor
            in the capturable one).
    """
    assert len(pa) == len(pb)
    for p, q in zip(pa, pb):
        assert p.dtype == q.dtype and torch.equal(p, q)
        sa, sb = oa.state[p], ob.state[q]
        assert sa.keys() == sb.keys()
        for key, value in sa.items():
            other = sb[key]
            if key == "step" and step_as_number:
                assert float(value) == float(other)
            elif isinstance(value, torch.Tensor):
                assert value.dtype == other.dtype and value.shape == other.shape and torch.equal(value, other), key
            else:
                assert value == other, key


def load_saved_state(source: torch.optim.Optimizer, target: torch.optim.Optimizer) -> None:
    """``source.state_dict()`` through ``torch.save`` and ``torch.load(weights_only=True)`` (as a training
    state file goes) into ``target.load_state_dict``."""
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    target.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
