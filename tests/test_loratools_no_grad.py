"""The LoRA tools' tensor functions keep no autograd graph when given parameters (a UNet's ``nn.Parameter`` s):
``extract_layer`` and ``resize_lora_state`` returned factors with a ``grad_fn`` (every layer's SVD graph held)."""

from __future__ import annotations

import torch

from sdadapt.loratools.extract import extract_layer
from sdadapt.loratools.resize import resize_lora_state


def _tensors(obj) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (tuple, list)):
        return [t for v in obj for t in _tensors(v)]
    if hasattr(obj, "__dataclass_fields__"):
        return [t for name in obj.__dataclass_fields__ for t in _tensors(getattr(obj, name))]
    return []


def test_extract_and_resize_of_parameters_hold_no_graph():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Parameter(torch.randn(16, 8, generator=g))
    tuned = torch.nn.Parameter(base.detach() + 0.1 * torch.randn(16, 8, generator=g))
    extracted = extract_layer(base, tuned, rank=2)
    state = {"a.lora_down.weight": torch.nn.Parameter(torch.randn(8, 16, generator=g)),
             "a.lora_up.weight": torch.nn.Parameter(torch.randn(16, 8, generator=g)), "a.alpha": torch.tensor(8.0)}
    resized = resize_lora_state(state, rank=2)
    found = _tensors(extracted) + _tensors(resized)
    assert len(found) >= 4 and not any(t.requires_grad or t.grad_fn is not None for t in found)
