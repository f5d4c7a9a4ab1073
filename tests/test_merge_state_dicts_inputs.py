"""``merge_state_dicts`` checks its inputs (an integrator's audit: a third state for a two-input step was ignored,
a module gave ``KeyError: 'keys'``, a bare UNet state said only "none is a Stable Diffusion checkpoint's")."""

from __future__ import annotations

import pytest
import torch

from sdadapt.merge import MergeError, MergeStep, merge_state_dicts

pytest.importorskip("diffusers")
from tiny_models import tiny_unet_sd1


def test_inputs_are_counted_typed_and_a_bare_unet_is_told_its_prefix():
    a, b = tiny_unet_sd1(seed=0), tiny_unet_sd1(seed=1)
    step = MergeStep("weighted-sum", ("a", "b"), alpha=0.25)
    with pytest.raises(ValueError, match=r"3 state dict\(s\) for the 2 input\(s\) of the weighted-sum step"):
        merge_state_dicts(step, [a.state_dict(), b.state_dict(), b.state_dict()])
    with pytest.raises(TypeError, match=r"input 'b' is a UNet2DConditionModel, not a state dict \(a module: pass its"):
        merge_state_dicts(step, [a.state_dict(), b])
    with pytest.raises(MergeError, match=r"needs its component first \(\{f'unet\.\{k\}': v"):
        merge_state_dicts(step, [a.state_dict(), b.state_dict()])
    merged, _ = merge_state_dicts(step, [{f"unet.{k}": v for k, v in m.state_dict().items()} for m in (a, b)])
    key = "unet.conv_in.weight"
    torch.testing.assert_close(merged[key], 0.75 * a.state_dict()["conv_in.weight"] + 0.25 * b.state_dict()["conv_in.weight"])
