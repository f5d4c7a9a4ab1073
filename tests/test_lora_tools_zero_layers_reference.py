"""resize-lora / combine-loras --mode svd on zero layers of every family: the dense path (LoHa, LoKr,
full ``diff`` inputs) against kohya's rank rules, transcribed here in float64.

Reference: kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb
  networks/resize_lora.py:21 ``MIN_SV = 1e-6``; rank_resize 155-180: fixed ``new_rank = rank``, then
      ``if S[0] <= MIN_SV: new_rank = 1; new_alpha = float(scale * new_rank)``;
  networks/svd_merge_lora.py:360-361, 387: ``module_new_rank = min(new_rank, in_dim, out_dim)``, alpha
      ``module_new_rank`` (no zero rule).
kohya's resize reads LoRA files only; sdadapt resizes the other families through their dense delta,
with the rule its LoRA path follows (tests/test_lora_tools_reference.py): a zero layer is rank 1.
"""

from __future__ import annotations

import pytest
import torch

from sdadapt.loratools.combine import combine_lora_states
from sdadapt.loratools.resize import dense_lora_factors, resize_lora_state

F64 = torch.float64
MIN_SV = 1e-6  # resize_lora.py:21


def kohya_fixed_rank(S, rank, scale=1.0):  # resize_lora.py:155-180, dynamic_method None
    new_rank = rank
    new_alpha = float(scale * new_rank)
    if S[0] <= MIN_SV:  # Zero matrix, set dim to 1
        new_rank = 1
        new_alpha = float(scale * new_rank)
    elif new_rank > rank:
        new_rank = rank
        new_alpha = float(scale * new_rank)
    return new_rank, new_alpha


def _state():
    g = torch.Generator().manual_seed(0)
    return {
        "zero_full.diff": torch.zeros(6, 5),
        "zero_conv.diff": torch.zeros(6, 5, 3, 3),
        "zero_lokr.lokr_w1": torch.zeros(2, 1), "zero_lokr.lokr_w2": torch.randn(3, 5, generator=g),
        "tiny_full.diff": torch.full((6, 5), 1e-8),  # σ0 = 1e-8·√30 < 1e-6: kohya's zero matrix
        "zero_lora.lora_down.weight": torch.zeros(5, 5), "zero_lora.lora_up.weight": torch.randn(6, 5, generator=g),
        "zero_lora.alpha": torch.tensor(5.0),  # (rank 5 >= 4: sdadapt never pads a LoRA above its own rank)
        "full.diff": torch.randn(6, 5, generator=g),
    }


def test_resize_gives_every_zero_layer_rank_one_whatever_its_family():
    state = _state()
    out, report = resize_lora_state(state, rank=4, conv_rank=3)
    for layer in ("zero_full", "zero_conv", "zero_lokr", "tiny_full", "zero_lora", "full"):
        tensors = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(layer + ".")}
        dense = tensors.get("diff")
        if dense is None:  # the LoKr / LoRA zero layers' deltas are zero
            dense = torch.zeros(6, 5)
        S = torch.linalg.svdvals(dense.double().reshape(6, -1))
        rank, alpha = kohya_fixed_rank(S, 3 if layer == "zero_conv" else 4)
        assert out[f"{layer}.lora_down.weight"].shape[0] == rank == report[layer].rank, layer
        assert float(out[f"{layer}.alpha"]) == alpha, layer  # scale 1 on the dense path (alpha = r)
    assert torch.count_nonzero(out["zero_full.lora_up.weight"] @ out["zero_full.lora_down.weight"]) == 0


def test_dense_lora_factors_keeps_a_fixed_rank_unless_asked_for_the_zero_rule():
    zero = torch.zeros(6, 5, dtype=F64)
    assert dense_lora_factors(zero, rank=4).down.shape[0] == 4  # combine's svd mode (kohya's svd_merge_lora)
    assert dense_lora_factors(zero, rank=4, zero_rank_one=True).down.shape[0] == 1
    nonzero = torch.eye(6, 5, dtype=F64)
    assert dense_lora_factors(nonzero, rank=4, zero_rank_one=True).down.shape[0] == 4


@pytest.mark.parametrize("method,param", [("fixed", None), ("sv_fro", 0.9)])
def test_combine_svd_keeps_the_rank_of_a_zero_layer_on_both_paths_as_kohyas_svd_merge(method, param):
    state = _state()
    out = combine_lora_states([state], [1.0], mode="svd", rank=4, method=method, param=param)
    if method == "fixed":  # svd_merge_lora.py:360-361: min(new_rank, in_dim, out_dim), alpha = that rank
        for layer in ("zero_full", "zero_lokr", "zero_lora", "full"):
            assert out[f"{layer}.lora_down.weight"].shape[0] == 4 and float(out[f"{layer}.alpha"]) == 4.0, layer
    else:  # (sdadapt's dynamic rules in combine: kohya's resize rule, a zero layer rank 1 on both paths)
        assert out["zero_full.lora_down.weight"].shape[0] == out["zero_lora.lora_down.weight"].shape[0] == 1
