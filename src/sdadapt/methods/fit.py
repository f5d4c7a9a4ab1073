"""The shared fitting loop: a handful of images + captions, any adaptation, sdadapt's train step.

A *system* implements :class:`sdadapt.methods.system.System` (``encode_images``, ``tokenize``,
``condition``, ``denoiser``, ``alphas_cumprod``, ``prediction_type`` ...): :class:`sdadapt.toy.ToySystem`,
the diffusers-folder system of the ``train`` command, or your own. An *adaptation* (:class:`Adaptation`) owns the trainable parameters, can save
itself in its method's file format and can be removed, leaving the system as it was.

Latents are encoded once; the text encoder runs inside each step (its LoRA, or a trainable
embedding, gets gradients; when nothing in it trains it costs one forward).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from ..training.optim import lr_at, set_lr
from ..training.step import StepConfig, TrainState, train_step
from .system import System

__all__ = ["Adaptation", "FitConfig", "fit"]


class Adaptation(Protocol):
    """What a method hands the loop: parameters to train, a file to write, a way back."""

    params: list[nn.Parameter]

    def save(self, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> Path: ...

    def remove(self) -> None: ...


@dataclass(frozen=True)
class FitConfig:
    """Loop options (the step's own options are in ``step``)."""

    steps: int = 300
    batch_size: int = 4
    learning_rate: float = 1e-3
    warmup_steps: int = 20
    schedule: str = "cosine"
    seed: int = 0
    step: StepConfig = field(default_factory=lambda: StepConfig(min_snr_gamma=5.0))

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps} and {self.batch_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")


def fit(
    system: System,
    adaptation: Adaptation,
    images: Tensor,
    captions: list[str],
    *,
    config: FitConfig,
    prior: tuple[Tensor, list[str], float] | None = None,
    callback: Callable[[int, int, float], None] | None = None,
) -> list[float]:
    """Train ``adaptation.params`` on ``images`` (N, 3, H, W) in [-1, 1] with their ``captions``.

    Args:
        prior: DreamBooth prior preservation: ``(class_images, class_captions, weight)``; each
            step adds as many class samples as instance samples, their loss weighted by ``weight``.
        callback: ``callback(step, total, loss)`` after each step (the CLI draws a bar with it).

    Returns:
        the loss of every step (floats; one host sync per step, cheap next to a toy step).
    """
    if images.ndim != 4 or images.shape[0] != len(captions) or len(captions) == 0:
        raise ValueError(f"need N >= 1 images (N, 3, H, W) and N captions; got {tuple(images.shape)} and {len(captions)} captions")
    params = adaptation.params
    if not params:
        raise ValueError("the adaptation has no trainable parameters")
    with torch.no_grad():
        latents = system.encode_images(images)
        ids = system.tokenize(captions)
        if prior is not None:
            prior_latents, prior_ids = system.encode_images(prior[0]), system.tokenize(prior[1])
    step_config = config.step
    prediction_type = getattr(system, "prediction_type", "epsilon")
    if step_config.prediction_type != prediction_type:  # the system's scheduler decides what it predicts
        step_config = dataclasses.replace(step_config, prediction_type=prediction_type)
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=1e-2)
    state = TrainState(seed=config.seed, device=latents.device)
    denoiser = system.denoiser()

    def model(x: Tensor, t: Tensor, token_ids: Tensor) -> Tensor:
        return denoiser(x, t, system.condition(token_ids))

    g = torch.Generator().manual_seed(config.seed + 1)
    losses: list[float] = []
    for step in range(config.steps):
        set_lr(optimizer, lr_at(step, base_lr=config.learning_rate, schedule=config.schedule,  # type: ignore[arg-type]
                                warmup_steps=config.warmup_steps, total_steps=config.steps))
        idx = torch.randint(len(captions), (config.batch_size,), generator=g)
        batch = {"latents": latents[idx], "cond": ids[idx]}
        if prior is not None:
            pidx = torch.randint(len(prior[1]), (config.batch_size,), generator=g)
            batch = {
                "latents": torch.cat([latents[idx], prior_latents[pidx]]),
                "cond": torch.cat([ids[idx], prior_ids[pidx]]),
                "loss_weight": torch.cat([torch.ones(config.batch_size), torch.full((config.batch_size,), float(prior[2]))]).to(latents.device),
            }
        metrics = train_step(model, batch, params=params, optimizer=optimizer, state=state, config=step_config,
                             alphas_cumprod=system.alphas_cumprod)
        losses.append(float(metrics["loss"]))
        if callback is not None:
            callback(step + 1, config.steps, losses[-1])
    return losses
