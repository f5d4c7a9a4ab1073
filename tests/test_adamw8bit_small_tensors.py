"""AdamW8bit keeps small tensors' moments in float32, as bitsandbytes' 8-bit optimisers (``min_8bit_size=4096``):
kohya's AdamW8bit updates a rank-4 LoRA factor (4 x 320 = 1280 elements) exactly as float32 AdamW, and only larger
tensors in 8 bits."""

from __future__ import annotations

import pytest
import torch

from sdadapt.methods import FitConfig
from sdadapt.methods.optimizers import BNB_MIN_8BIT_SIZE, make_optimizer
from sdadapt.training.optim import AdamW


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=g) * 0.1) for shape in ((4, 320), (16, 640), (320,))]


def _run(optimizer, params, steps: int = 12, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for p in params:
            p.grad = None if step == 3 and p.numel() == 320 else torch.randn(p.shape, generator=g) * 0.01
        optimizer.step()


@pytest.mark.parametrize("foreach", [False, True])
def test_small_tensors_step_as_float32_adamw_large_ones_in_8_bits(foreach):
    ours, reference = _params(), _params()
    optimizer = AdamW(ours, lr=1e-3, weight_decay=0.01, state_dtype="int8", min_8bit_size=4096, foreach=foreach)
    _run(optimizer, ours)
    _run(torch.optim.AdamW(reference, lr=1e-3, weight_decay=0.01), reference)
    small, large, bias = ours
    assert "exp_avg" in optimizer.state[small] and optimizer.state[small]["exp_avg"].dtype == torch.float32
    assert "exp_avg_codes" in optimizer.state[large] and "exp_avg" not in optimizer.state[large]
    torch.testing.assert_close(small, reference[0], rtol=0, atol=2e-8)  # (float32 AdamW: rounding only)
    torch.testing.assert_close(bias, reference[2], rtol=0, atol=2e-8)
    assert float((large - reference[1]).abs().max()) > 1e-7  # (the 8-bit one is not float32 AdamW)


def test_foreach_and_per_parameter_steps_agree_on_a_mixed_group():
    a, b = _params(), _params()
    first = AdamW(a, lr=1e-3, state_dtype="int8", min_8bit_size=4096)
    second = AdamW(b, lr=1e-3, state_dtype="int8", min_8bit_size=4096, foreach=True)
    _run(first, a)
    _run(second, b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_kohyas_adamw8bit_name_uses_bitsandbytes_threshold():
    params = _params()
    optimizer = make_optimizer([{"params": params}], FitConfig(optimizer="adamw8bit", learning_rate=1e-3))
    assert optimizer.param_groups[0]["min_8bit_size"] == BNB_MIN_8BIT_SIZE == 4096
    every = make_optimizer([{"params": _params()}],
                           FitConfig(optimizer="adamw8bit", learning_rate=1e-3, optimizer_args=(("min_8bit_size", 0),)))
    assert every.param_groups[0]["min_8bit_size"] == 0
    with pytest.raises(ValueError, match="min_8bit_size"):
        AdamW(params, state_dtype="int8", min_8bit_size=-1)


def test_lion8bit_keeps_small_tensors_momentum_in_float32():
    """kohya's Lion8bit (sdadapt's lion-bf16) over bitsandbytes: a float32 momentum under 4096 elements."""
    params = _params()
    optimizer = make_optimizer([{"params": params}], FitConfig(optimizer="Lion8bit", learning_rate=1e-4))
    _run(optimizer, params, steps=2)
    small, large, bias = params
    assert optimizer.state[small]["exp_avg"].dtype == torch.float32 == optimizer.state[bias]["exp_avg"].dtype
    assert optimizer.state[large]["exp_avg"].dtype == torch.bfloat16
