"""LoRA end to end on a small cross-attention network — runs in seconds on a CPU, no downloads.

    python examples/lora_quickstart.py

1. builds a small model with SD-style module names (attn1/attn2 with to_q/to_k/to_v/to_out.0),
2. injects LoRA on the attention projections with the same preset you would use on a real UNet,
3. trains it to imitate a "fine-tuned" copy of the model,
4. saves a kohya-format file, reads it back, applies it without surgery and undoes it exactly.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

import sdadapt
from sdadapt.targets import UNET_ATTENTION


class Attention(nn.Module):
    def __init__(self, dim: int, context_dim: int) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        return self.to_out[0](attn @ v)


class Block(nn.Module):
    def __init__(self, dim: int = 32, context_dim: int = 16) -> None:
        super().__init__()
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, context_dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(x, x)
        x = x + self.attn2(x, context)
        return x + self.ff(x)


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            x = block(x, context)
        return x


def main() -> None:
    torch.manual_seed(0)
    model = TinyNet()
    # a "fine-tuned" teacher: the same network with rank-2 changes on its attention projections
    teacher = TinyNet()
    teacher.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, module in teacher.named_modules():
            if UNET_ATTENTION(name, module) or name.endswith(("to_q", "to_k", "to_v", "to_out.0")):
                module.weight += 0.3 * torch.randn(module.weight.shape[0], 2) @ torch.randn(2, module.weight.shape[1]) / 4

    x, context = torch.randn(32, 8, 32), torch.randn(32, 4, 16)
    target = teacher(x, context).detach()

    handle = sdadapt.inject(model, UNET_ATTENTION, sdadapt.LoRAConfig(rank=4, alpha=4.0))
    print(f"injected LoRA into {len(handle)} layers, e.g. {handle.names[:2]}")
    optimiser = torch.optim.AdamW(handle.parameters(), lr=1e-2)
    loss0 = None
    for step in range(150):
        loss = nn.functional.mse_loss(model(x, context), target)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        loss0 = loss0 if loss0 is not None else loss.item()
    print(f"loss {loss0:.5f} -> {loss.item():.5f}")

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "tiny_lora.safetensors"
        sdadapt.formats.save_kohya(path, {"unet": handle.state_dict()}, base_model="sd1")
        trained = model(x, context).detach()
        handle.remove()  # the model is exactly the base again
        base = model(x, context).detach()

        components, metadata = sdadapt.load_lora(path)
        print(f"saved {path.name}: {len(components['unet']) // 3} modules, ss_network_dim={metadata['ss_network_dim']}")
        applied = sdadapt.apply_lora(model, components["unet"], scale=1.0)  # W += ΔW, no surgery
        print(f"applied file == trained adapter: max |diff| = {(model(x, context) - trained).abs().max():.2e}")
        applied.undo()
        print(f"undo restores the base exactly: {torch.equal(model(x, context), base)}")


if __name__ == "__main__":
    main()
