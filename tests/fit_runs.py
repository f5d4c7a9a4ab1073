"""fit of a LoRA on the toy model: plain runs (the optimiser tests), eager against CUDA-graph runs, and
runs watching what each step trains on (the data-augmentation tests)."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training import step_capture

__all__ = ["Run", "assert_cuda_graph_run_trains_as_eager", "capturable_optimizers", "spy_on_built_optimizers",
           "spy_on_captured_steps", "straight_and_resumed", "toy_lora_fit", "toy_lora_run", "usual_and_fused_full_finetune"]

#: (the losses, CPU copies of the LoRA's parameters) of one run
Run = tuple[list[float], list[torch.Tensor]]


def toy_lora_run(config: FitConfig, *, device: str = "cpu", **fit_kwargs) -> Run:
    """``fit`` of a LoRA (seed 1) on a fresh toy (seed 1) on ``device`` over 4 "cross" concept images
    (seed 0) with ``config``: (the losses, CPU clones of the LoRA's parameters). ``fit_kwargs``
    (``on_step``, ``resume``...) go to ``fit``."""
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    system.to(device)
    images, captions = concept_data("cross", 4, seed=0)
    losses = fit(system, adaptation, images.to(device), captions, config=config, **fit_kwargs)
    return losses, [p.detach().cpu().clone() for p in adaptation.params]


def straight_and_resumed(config: FitConfig, folder: Path, *, at: int = 2) -> tuple[Run, Run]:
    """``toy_lora_run(config)`` saving its training state to ``folder`` after step ``at``, and
    ``toy_lora_run(config)`` resumed from that state: (losses, weights) of each."""
    straight = toy_lora_run(config, on_step=lambda info: info.save_state(folder) if info.step == at else None)
    return straight, toy_lora_run(config, resume=folder)


def usual_and_fused_full_finetune(config: FitConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The toy's full fine-tune (a fresh toy, seed 1) over 4 "cross" concept images (seed 0) with ``config``, once
    as given and once with ``fused_backward=True`` (one optimiser per block stepped inside backward): clones of the
    trained parameters of each run."""
    images, captions = concept_data("cross", 4, seed=0)
    runs = []
    for fused in (False, True):
        system = build_toy(seed=1)
        adaptation = METHODS["full"].adapt(system, seed=1)
        fit(system, adaptation, images, captions, config=dataclasses.replace(config, fused_backward=fused))
        runs.append([p.detach().clone() for p in adaptation.params])
    return runs[0], runs[1]


def spy_on_built_optimizers(monkeypatch) -> list[torch.optim.Optimizer]:
    """Every optimiser ``fit``'s ``make_optimizer`` builds from now on (``monkeypatch`` undoes the spy), in order."""
    fit_module = importlib.import_module("sdadapt.methods.fit")
    built: list[torch.optim.Optimizer] = []
    real = fit_module.make_optimizer

    def recording(groups, config):
        built.append(real(groups, config))
        return built[-1]

    monkeypatch.setattr(fit_module, "make_optimizer", recording)
    return built


def capturable_optimizers(monkeypatch) -> None:
    """From now on ``fit`` builds every optimiser as a ``cuda_graph`` run does (``capturable=True``, each
    group's LR a tensor; on a CPU nothing changes): an eager CUDA run then steps with the captured
    run's arithmetic. The comparison needs it: torch's capturable AdamW rounds differently from its
    default step, and AdamW turns a rounding-level difference into up to ~lr per step on an element
    whose gradient is near 0 (``m/√v``): on a CPU, multiplying the LR by 1 + 1e-6 moves 17 % of a toy
    LoRA's weights past ``rtol=1e-3, atol=1e-4`` in 10 steps (at most 1.1·lr) — what the first H200 run
    of these tests showed between the default and the capturable AdamW."""
    fit_module = importlib.import_module("sdadapt.methods.fit")
    real = fit_module.make_optimizer
    monkeypatch.setattr(fit_module, "make_optimizer",
                        lambda groups, config: real(groups, dataclasses.replace(config, cuda_graph=True)))


def spy_on_captured_steps(monkeypatch) -> list[step_capture.CapturedStep]:
    """Every ``CapturedStep`` made from now on (``monkeypatch`` undoes the spy), in order."""
    made: list[step_capture.CapturedStep] = []
    real_init = step_capture.CapturedStep.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(step_capture.CapturedStep, "__init__", init)
    return made


def assert_cuda_graph_run_trains_as_eager(config: FitConfig, monkeypatch, **fit_kwargs) -> None:
    """On a GPU: ``toy_lora_run(config, **fit_kwargs)`` on CUDA with ``cuda_graph=True`` (eager warm-up
    steps, then replays) trains as the eager run with the same optimiser arithmetic
    (:func:`capturable_optimizers`): losses to 1e-3 relative, weights to bf16-backward tolerance."""
    capturable_optimizers(monkeypatch)
    eager = toy_lora_run(dataclasses.replace(config, cuda_graph=False), device="cuda", **fit_kwargs)
    captured = toy_lora_run(dataclasses.replace(config, cuda_graph=True), device="cuda", **fit_kwargs)
    assert captured[0] == pytest.approx(eager[0], rel=1e-3)
    for a, b in zip(eager[1], captured[1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


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


def optimizers_made(monkeypatch) -> list:
    """The optimisers ``fit`` builds from now on, in order (``make_optimizer`` patched to record each): a test reads
    their groups' LRs and betas at each step."""
    fit_module = importlib.import_module("sdadapt.methods.fit")  # (the module: sdadapt.methods.fit is the function)
    made: list = []
    real_make = fit_module.make_optimizer
    monkeypatch.setattr(fit_module, "make_optimizer", lambda *a, **k: made.append(real_make(*a, **k)) or made[-1])
    return made
