"""Under autocast a LoRA's down-projection casts a half-precision input itself, so the hook hands it
over uncast (``AdapterModule.input_cast_by_autocast``) instead of casting it to the adapter's float32
first — a cast autocast undoes. The H200 profile counted those casts as most of the step's
activation-sized casts (190 of 420 casts per step on the tiny benchmark UNet). Dropping them must
change nothing: output and every gradient bit for bit equal the path with the cast."""

from __future__ import annotations

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from test_shared_input_lora import _qkv_with_lora
from test_shared_input_lora import _run as run_qkv
from torch import nn

import sdadapt
from sdadapt.adapters import lora as lora_module


def _run(layer: nn.Module, x: torch.Tensor, *, cast_first: bool, monkeypatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
    monkeypatch.setattr(lora_module.LoRAModule, "input_cast_by_autocast", not cast_first)
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in layer.parameters() if p.requires_grad]
    for p in layer.parameters():
        p.grad = None
    return y.detach(), grads


@settings(max_examples=25, deadline=None)
@given(conv=st.booleans(), rank=st.integers(1, 6), width=st.integers(2, 24), x_dtype=st.sampled_from(["bf16", "fp16"]),
       dropout=st.sampled_from([0.0, 0.25]), seed=st.integers(0, 2**16))
def test_an_uncast_input_gives_the_same_output_and_gradients_under_autocast(conv, rank, width, x_dtype, dropout, seed):
    with pytest.MonkeyPatch.context() as monkeypatch:
        torch.manual_seed(seed)
        base = nn.Conv2d(width, width + 1, 3, padding=1) if conv else nn.Linear(width, width + 1)
        model = nn.Sequential(base).to(torch.bfloat16)  # a bf16 base, as the training step keeps it
        handle = sdadapt.inject(model, sdadapt.by_type(nn.Linear, nn.Conv2d), sdadapt.LoRAConfig(rank=rank, dropout=dropout))
        for p in handle.parameters():
            nn.init.normal_(p, std=0.3)  # (a zero up-projection would hide the delta)
        model.train()
        dtype = torch.bfloat16 if x_dtype == "bf16" else torch.float16
        x = (torch.randn(2, width, 5, 4) if conv else torch.randn(3, 2, width)).to(dtype)
        runs = []
        for cast_first in (True, False):
            torch.manual_seed(seed + 1)  # the same dropout draws
            runs.append(_run(model, x, cast_first=cast_first, monkeypatch=monkeypatch))
        (ya, ga), (yb, gb) = runs
        assert ya.dtype == yb.dtype and torch.equal(ya, yb)
        assert len(ga) == len(gb) >= 3 and all(torch.equal(a, b) for a, b in zip(ga, gb))


def test_without_autocast_the_input_is_still_cast_to_the_adapters_dtype():
    """No autocast: a bf16 input meets the float32 adapter only after the cast (the down-projection
    would refuse mixed dtypes otherwise), and the delta is float32 math rounded once into the output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8)).to(torch.bfloat16)
    handle = sdadapt.inject(model, sdadapt.by_type(nn.Linear), sdadapt.LoRAConfig(rank=2))
    for p in handle.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(4, 8).to(torch.bfloat16)
    (adapter,) = handle.modules.values()
    y = model(x)
    with torch.no_grad():
        base = nn.functional.linear(x, model[0].weight, model[0].bias)
        delta = adapter(x.float())
        expected = base + delta.to(torch.bfloat16)
    assert torch.equal(y, expected)


@settings(max_examples=15, deadline=None)
@example(ranks=(3, 1, 1), cross=True, seed=1059)  # (a cross call on a grouping reused across the two runs took
@example(ranks=(3, 1, 1), cross=True, seed=0)  # another path in the second: the test builds one per run now)
@given(ranks=st.tuples(*[st.integers(1, 4)] * 3), cross=st.booleans(), seed=st.integers(0, 2**16))
def test_the_batched_qkv_down_projection_takes_the_uncast_input_too(ranks, cross, seed):
    """``batch_shared_input_adapters``: one down-projection for q/k/v, its half-precision input left to
    autocast as the per-adapter hook leaves it — bit for bit the batched path with the cast."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 6, generator=g).to(torch.bfloat16)
    context = torch.randn(2, 4, 6, generator=g).to(torch.bfloat16) if cross else None
    runs, served = [], []
    for cast_first in (True, False):  # each on a fresh model and grouping (a cross call teaches the group a split)
        model = _qkv_with_lora(ranks, dtype=torch.bfloat16, seed=seed)  # a bf16 base, float32 LoRAs (dtype=None)
        batching = sdadapt.batch_shared_input_adapters(model)
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setattr(lora_module.LoRAModule, "input_cast_by_autocast", not cast_first)  # both paths read it
            with torch.autocast("cpu", dtype=torch.bfloat16):
                runs.append(run_qkv(model, x, context))
        served.append(batching.stats()["served"])
        batching.remove()
    (outs_a, grads_a, xa, ca), (outs_b, grads_b, xb, cb) = runs
    assert outs_a.keys() == outs_b.keys() and all(torch.equal(outs_a[k], outs_b[k]) for k in outs_a)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 6 and all(torch.equal(grads_a[k], grads_b[k]) for k in grads_a)
    assert torch.equal(xa, xb) and (ca is None or torch.equal(ca, cb))
    assert served[0] == served[1] > 0  # the batched path ran, the same calls in both
