"""Single training steps of a LoRA on the toy model, for the optimiser tests that step an optimiser
through ``train_step`` or ``CapturedStep`` (host syncs, graph bookkeeping) rather than through ``fit``."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from sdadapt.methods import METHODS
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.host_syncs import HostSyncs
from sdadapt.training.step import StepConfig, TrainState, train_step
from sdadapt.training.step_capture import CapturedStep

__all__ = ["ToyLoraStep", "assert_train_steps_read_nothing_back", "toy_lora_step"]


@dataclasses.dataclass
class ToyLoraStep:
    """A LoRA on the toy's UNet and text encoder, and one batch to train it on."""

    #: ``model(x_t, t, ids)``: the denoiser's prediction (B, 12, 16, 16) for noisy latents, timesteps, token ids
    model: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    #: the LoRA's parameters
    params: list[nn.Parameter]
    #: ``{"latents": (B, 12, 16, 16), "cond": (B, 16) token ids}``
    batch: dict[str, torch.Tensor]
    alphas_cumprod: torch.Tensor

    def train_step(self, optimizer: torch.optim.Optimizer, state: TrainState) -> dict:
        """One ``train_step`` on the batch (default ``StepConfig``)."""
        return train_step(self.model, self.batch, params=self.params, optimizer=optimizer, state=state,
                          config=StepConfig(), alphas_cumprod=self.alphas_cumprod)

    def captured(self, optimizer: torch.optim.Optimizer, *, warmup_steps: int = 1) -> CapturedStep:
        """A ``CapturedStep`` of the model with ``optimizer`` (default ``StepConfig``); call it with
        ``(self.batch, state=...)``."""
        return CapturedStep(self.model, params=self.params, optimizer=optimizer, config=StepConfig(),
                            alphas_cumprod=self.alphas_cumprod, warmup_steps=warmup_steps)


def toy_lora_step(images: int = 2) -> ToyLoraStep:
    """A LoRA (seed 1) on a fresh toy (seed 1), its batch the latents and token ids of ``images``
    "cross" concept images (seed 0)."""
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    denoiser = system.denoiser()
    pixels, captions = concept_data("cross", images, seed=0)
    with torch.no_grad():
        batch = {"latents": system.encode_images(pixels), "cond": system.tokenize(captions)}

    def model(x, t, ids):
        return denoiser(x, t, system.condition(ids))

    return ToyLoraStep(model, adaptation.params, batch, system.alphas_cumprod)


def assert_train_steps_read_nothing_back(make: Callable[[list[nn.Parameter]], torch.optim.Optimizer]) -> None:
    """``make(params)``'s optimiser on ``toy_lora_step()``: after a first ``train_step`` (the states made),
    two more make no host sync (``HostSyncs``) and move the weights."""
    toy = toy_lora_step()
    optimizer = make(toy.params)
    state = TrainState(seed=0)
    toy.train_step(optimizer, state)
    before = [p.detach().clone() for p in toy.params]
    with HostSyncs() as syncs:
        toy.train_step(optimizer, state)
        toy.train_step(optimizer, state)
    assert syncs.events == [], syncs.report()
    assert any(not torch.equal(p, q) for p, q in zip(toy.params, before))
