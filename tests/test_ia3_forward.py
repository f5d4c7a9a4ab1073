"""(IA)³'s hook forward (``y + (y − b) ⊙ m·w`` on the output axis, no second matmul) against a
float64 reference written here: linear and conv, both axes, strengths 0 / 0.5 / 1, with a bias;
values and gradients; and the cases where the hook does not see the base output (a second hook,
another adapter merged) still give the exact result through the matmul path.
"""

from __future__ import annotations

import pytest
import torch
from aten_ops import AtenOps
from torch import nn

import sdadapt
from sdadapt.adapters import IA3Config, LoRAConfig

TARGET = sdadapt.by_type(nn.Linear, nn.Conv2d)


def _reference(layer: nn.Module, x: torch.Tensor, vector: torch.Tensor, *, on_input: bool, m: float) -> torch.Tensor:
    """float64 ``op(x, W ⊙ (1 + m·w)) + b``, the scaled weight built channel by channel."""
    w = layer.weight.detach().double().clone()
    v = vector.detach().double().flatten()
    for c in range(v.numel()):
        if on_input:
            w[:, c] = w[:, c] * (1 + m * float(v[c]))
        else:
            w[c] = w[c] * (1 + m * float(v[c]))
    b = layer.bias.detach().double()
    if isinstance(layer, nn.Linear):
        return torch.nn.functional.linear(x.double(), w, b)
    return torch.nn.functional.conv2d(x.double(), w, b, layer.stride, layer.padding)


def _layer(kind: str) -> nn.Module:
    layer = nn.Linear(5, 7) if kind == "linear" else nn.Conv2d(5, 7, 3, padding=1)
    layer = layer.double()
    with torch.no_grad():
        layer.bias.normal_()  # a bias far from zero: scaling it would show
    return layer


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randn((2, 4, 5) if kind == "linear" else (2, 5, 6, 6), generator=g, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("m", [0.0, 0.5, 1.0])
def test_forward_and_gradients_match_the_float64_reference(kind, on_input, m):
    torch.manual_seed(0)
    layer = _layer(kind)
    model = nn.Sequential(layer)
    handle = sdadapt.inject(model, TARGET, IA3Config(train_on_input=on_input), dtype=torch.float64)
    adapter = handle.modules["0"]
    with torch.no_grad():
        adapter.weight.copy_(torch.randn_like(adapter.weight))
    handle.set_scale(m)
    x = _input(kind).requires_grad_(True)
    y = model(x)
    x_ref = x.detach().clone().requires_grad_(True)
    vector_ref = adapter.weight.detach().clone().requires_grad_(True)
    ref = _reference(layer, x_ref, vector_ref, on_input=on_input, m=m)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=1e-12)
    # gradients: the vector's and the input's (the base output path carries (1 + m·w) now)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    w_ref = layer.weight.detach()
    scale_axis = 1 if on_input else 0
    shape = [1] * w_ref.dim()
    shape[scale_axis] = -1
    merged = w_ref * (1 + m * vector_ref.flatten().reshape(shape))
    out = (torch.nn.functional.linear(x_ref, merged, layer.bias.detach()) if kind == "linear"
           else torch.nn.functional.conv2d(x_ref, merged, layer.bias.detach(), 1, 1))
    (out * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(adapter.weight.grad.flatten(), vector_ref.grad.flatten(), atol=1e-11, rtol=1e-11)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_second_hook_or_a_merged_adapter_keeps_the_exact_result(kind):
    """With a LoRA on the same layer (a hook before (IA)³'s, then merged into W) the hook's output
    is not the base output: (IA)³ must scale op(x, W_original), not y."""
    torch.manual_seed(1)
    layer = _layer(kind)
    model = nn.Sequential(layer)
    lora = sdadapt.inject(model, TARGET, LoRAConfig(rank=2), name="lora", dtype=torch.float64)
    for module in lora.modules.values():
        with torch.no_grad():
            module.lora_up.normal_()
    ia3 = sdadapt.inject(model, TARGET, IA3Config(), name="ia3", dtype=torch.float64)
    with torch.no_grad():
        ia3.modules["0"].weight.normal_()
    x = _input(kind)
    vector = ia3.modules["0"].weight
    lora_delta = lora.modules["0"].delta_weight().double()
    w = layer.weight.detach()
    ia3_delta = w * vector.detach().flatten().reshape(-1, *([1] * (w.dim() - 1)))
    op = (lambda x, w_: torch.nn.functional.linear(x, w_, layer.bias.detach())) if kind == "linear" else (
        lambda x, w_: torch.nn.functional.conv2d(x, w_, layer.bias.detach(), 1, 1))
    expected = op(x, w + lora_delta + ia3_delta)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=1e-12)
        lora.merge()  # W now holds the LoRA delta; (IA)³ still scales the original W
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=1e-12)
        lora.remove()  # (IA)³ alone again: the one-hook path
        torch.testing.assert_close(model(x), op(x, w + ia3_delta), atol=1e-12, rtol=1e-12)


def _matmuls(model: nn.Module, x: torch.Tensor) -> int:
    """The forward's matmul / convolution calls (a dispatch mode: torch's FlopCounterMode adds global
    module hooks, which would turn the one-hook path off)."""
    with AtenOps() as ops, torch.no_grad():
        model(x)
    return sum(ops.counts[name] for name in ("mm", "addmm", "bmm", "convolution"))


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_the_output_axis_costs_no_second_matmul_and_the_fallbacks_stay_exact(kind):
    """The one-hook output-axis path runs the layer's matmul only; a global hook, a hook registered
    after injection (``with_kwargs``, ``always_call``) or a subclass overriding ``forward`` take the
    matmul path (two matmuls) and keep the float64 result of ``op(x, W ⊙ (1 + m·w)) + b`` plus what
    the others add."""
    torch.manual_seed(2)
    layer = _layer(kind)
    x = _input(kind)
    plain = _matmuls(layer, x)
    model = nn.Sequential(layer)
    handle = sdadapt.inject(model, TARGET, IA3Config(), dtype=torch.float64)
    vector = handle.modules["0"].weight
    with torch.no_grad():
        vector.normal_()
    expected = _reference(layer, x, vector, on_input=False, m=1.0)
    assert plain == 1 and _matmuls(model, x) == plain  # (one matmul: the layer's)
    torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=1e-12)

    def shift(module, args, kwargs, output):  # a hook after (IA)³'s: the output it returns is shifted
        return output + 1.0

    second = layer.register_forward_hook(shift, with_kwargs=True, always_call=True)
    assert _matmuls(model, x) == 2 * plain
    torch.testing.assert_close(model(x), expected + 1.0, atol=1e-12, rtol=1e-12)
    second.remove()
    first = layer.register_forward_hook(lambda module, args, output: output + 1.0, prepend=True)  # before (IA)³'s
    torch.testing.assert_close(model(x), expected + 1.0, atol=1e-12, rtol=1e-12)  # (IA)³ scales op(x, W), not y
    first.remove()
    glob = torch.nn.modules.module.register_module_forward_hook(lambda module, args, output: None)
    try:
        assert _matmuls(model, x) == 2 * plain
        torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=1e-12)
    finally:
        glob.remove()
    assert _matmuls(model, x) == plain


class _ShiftedLinear(nn.Linear):
    """A Linear subclass whose forward adds more than the bias (as diffusers' LoRACompatibleLinear may)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 2.0


def test_a_subclass_with_its_own_forward_gets_the_matmul_path():
    torch.manual_seed(4)
    layer = _ShiftedLinear(5, 7).double()
    model = nn.Sequential(layer)
    handle = sdadapt.inject(model, TARGET, IA3Config(), dtype=torch.float64)
    with torch.no_grad():
        handle.modules["0"].weight.normal_()
    x = _input("linear")
    expected = _reference(layer, x, handle.modules["0"].weight, on_input=False, m=1.0) + 2.0  # (the shift not scaled)
    torch.testing.assert_close(model(x), expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_no_bias_channels_last_and_autocast_match_the_matmul_path(kind, dtype):
    """A linear without a bias, a conv with a large bias on a channels_last input, under autocast (the
    base output in bf16 / fp16, the bias float32): the one-hook path ``y + (y − b) ⊙ m·w`` is within
    the output's own rounding of the matmul path."""
    torch.manual_seed(5)
    results = []
    for force_matmul in (False, True):
        torch.manual_seed(5)
        layer = nn.Linear(16, 12, bias=False) if kind == "linear" else nn.Conv2d(8, 12, 3, padding=1)
        model = nn.Sequential(layer)
        handle = sdadapt.inject(model, TARGET, IA3Config())
        with torch.no_grad():
            handle.modules["0"].weight.normal_()
            if layer.bias is not None:
                layer.bias.normal_(0, 3.0)
        if force_matmul:  # a no-op second hook: the matmul path
            layer.register_forward_hook(lambda module, args, output: None)
        x = torch.randn(3, 10, 16) if kind == "linear" else torch.randn(2, 8, 6, 6).to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=dtype):
            results.append(model(x).float().detach())
    fast, matmul = results
    assert fast.shape == matmul.shape
    ulp = torch.finfo(dtype).eps * matmul.abs().max()
    assert float((fast - matmul).abs().max()) <= 2 * ulp
