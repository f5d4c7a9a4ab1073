"""The toy UNet with a LoRA on every linear layer whose up factors are not zero (a trained LoRA: a fresh one's
delta is zero, and would hide a path that drops or doubles it), optionally checkpointed block by block."""

from __future__ import annotations

import torch
from torch import nn

import sdadapt
from sdadapt.targets import by_type
from sdadapt.toy import ToyUNet
from sdadapt.training.grad_checkpointing import UNET_BLOCKS, enable_checkpointing


def trained_toy_lora(*, checkpoint: bool = False, device: str = "cpu", up_std: float = 0.05):
    """``(unet, handle)``: ``ToyUNet()`` made after ``torch.manual_seed(0)`` (on ``device``), LoRA rank 4
    (gaussian ``down``) on its ``nn.Linear`` layers, each ``up`` drawn from N(0, ``up_std``²);
    ``checkpoint``: every UNet block recomputed in backward (``enable_checkpointing``)."""
    torch.manual_seed(0)
    unet = ToyUNet().to(device)
    handle = sdadapt.inject(unet, by_type(nn.Linear), sdadapt.LoRAConfig(rank=4, init="gaussian"))
    for adapter in handle.modules.values():
        nn.init.normal_(adapter.lora_up, std=up_std)
    if checkpoint:
        enable_checkpointing(unet, UNET_BLOCKS)
    return unet, handle
