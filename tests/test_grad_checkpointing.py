"""Gradient checkpointing by target: same gradients, fewer saved activations, exact removal."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from sdadapt.training.grad_checkpointing import enable_checkpointing
from sdadapt.targets import NoTargetsError, by_regex


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 4 * dim)
        self.fc2 = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor, *, scale: float = 1.0) -> torch.Tensor:
        return x + scale * self.fc2(torch.tanh(self.fc1(x)))


class Net(nn.Module):
    def __init__(self, dim: int = 16, depth: int = 4) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(dim) for _ in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, scale=0.5)
        return x


def _grads(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    total = 0

    def pack(t: torch.Tensor):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).pow(2).sum()
    return total


def test_same_gradients_less_saved_memory_and_exact_removal():
    torch.manual_seed(0)
    model = Net().train()
    reference = copy.deepcopy(model)
    x = torch.randn(32, 16)
    keys = list(model.state_dict())
    handle = enable_checkpointing(model, by_regex(r"^blocks\.\d+$"))
    assert handle.names == [f"blocks.{i}" for i in range(4)]
    assert all(isinstance(b, Block) for b in model.blocks)  # isinstance still holds
    assert list(model.state_dict()) == keys
    got, want = _grads(model, x), _grads(reference, x)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert _saved_bytes(model, x) < 0.5 * _saved_bytes(reference, x)
    handle.remove()
    assert all(type(b) is Block for b in model.blocks)
    assert _saved_bytes(model, x) == _saved_bytes(reference, x)


def test_nested_targets_checkpoint_only_the_outermost_and_eval_skips_checkpoint():
    model = Net().train()
    handle = enable_checkpointing(model, by_regex(r"^blocks\.\d+(\.fc1)?$"))
    assert handle.names == [f"blocks.{i}" for i in range(4)]
    model.eval()
    x = torch.randn(4, 16)
    assert _saved_bytes(model, x) == _saved_bytes(copy.deepcopy(model), x)  # no checkpoint in eval
    handle.remove()


def test_checkpointing_a_diffusers_unet_keeps_outputs_and_gradients():
    from tiny_models import tiny_unet_sd1, unet_inputs

    unet = tiny_unet_sd1().train()
    reference = copy.deepcopy(unet)
    (x, t, ctx), _ = unet_inputs(unet)
    handle = enable_checkpointing(unet, by_regex(r"^(down_blocks|up_blocks)\.\d+$"))
    assert len(handle.names) == 4
    out = unet(x, t, ctx).sample
    ref = reference(x, t, ctx).sample
    torch.testing.assert_close(out, ref)
    out.pow(2).mean().backward()
    ref.pow(2).mean().backward()
    for (name, p), q in zip(unet.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    handle.remove()


def test_nothing_selected_is_an_error():
    with pytest.raises(NoTargetsError):
        enable_checkpointing(Net(), by_regex("nothing_here"))
