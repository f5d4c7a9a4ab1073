"""fit on the toy model, watching what each step trains on (for the data-augmentation tests)."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy

__all__ = ["toy_lora_fit"]


def toy_lora_fit(dataset, *, steps: int, monkeypatch, seed: int = 0, save_at: int | None = None,
                 state: Path | None = None, resume: Path | None = None,
                 sizes: list | None = None) -> tuple[list[float], list[torch.Tensor]]:
    """``fit`` of a LoRA (seed 1) on a fresh toy (seed 1) over ``dataset``, batch 2, lr 1e-3, no warm-up:
    returns (the losses, a clone of each micro-batch's (B, C, h, w) latents as ``train_step`` got them).

    ``save_at``/``state``: the training state is saved to ``state`` after that step; ``resume``: a
    state folder to continue from; ``sizes``: gets the size-conditioning rows fit makes (SDXL's; fit
    builds them only for a size-conditioned system, so the toy is marked as one and its ``condition``
    still gets the ids alone) as lists. fit's ``train_step`` (and ``_condition_batch``) are restored after.
    """
    fit_module = importlib.import_module("sdadapt.methods.fit")
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    seen: list[torch.Tensor] = []
    real, real_condition = fit_module.train_step, fit_module._condition_batch

    def recording(model, batch, **kwargs):
        seen.append(batch["latents"].clone())
        return real(model, batch, **kwargs)

    def condition(system, ids, rows):
        sizes.append(rows.tolist())
        return real_condition(system, ids, None)

    monkeypatch.setattr(fit_module, "train_step", recording)
    if sizes is not None:
        system.size_conditioning = True
        monkeypatch.setattr(fit_module, "_condition_batch", condition)
    try:
        losses = fit(system, adaptation, dataset,
                     config=FitConfig(steps=steps, batch_size=2, learning_rate=1e-3, warmup_steps=0, seed=seed),
                     on_step=(lambda info: info.save_state(state) if info.step == save_at else None), resume=resume)
    finally:
        monkeypatch.setattr(fit_module, "train_step", real)
        monkeypatch.setattr(fit_module, "_condition_batch", real_condition)
    return losses, seen
