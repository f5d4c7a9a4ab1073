"""``FitConfig.cuda_graph`` / ``train --cuda-graph``: fit's steps through ``CapturedStep``.

On a CPU the captured step runs eagerly, so a run with the option must be bit for bit the run
without it; what it refuses is refused before the first step. The CUDA tests (skipped here;
``benchmarks/gpu_check.sh`` runs them) compare captured and eager runs on the GPU.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch
from _fast_compile import small_toy
from fit_runs import capturable_optimizers, spy_on_captured_steps

from sdadapt.cli import main
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training import step_capture
from sdadapt.training.step import StepConfig


def _run(method: str, config: FitConfig, *, device: str = "cpu", prior: bool = False, toy=small_toy):
    """fit on a toy (seed 1): the half-width one on a CPU (its steps run eagerly either way), the
    shipped topology in the CUDA comparisons."""
    system = toy(seed=1)
    adaptation = METHODS[method].adapt(system, seed=1, **({"token": "sks"} if method == "textual-inversion" else {}))
    if device != "cpu":
        system.to(device)
    images, captions = concept_data("cross", 4, seed=0)
    if method == "textual-inversion":
        captions = [f"a sks {c}" for c in captions]
    class_prior = (images.flip(0), captions[::-1], 0.5) if prior else None
    losses = fit(system, adaptation, images.to(device), captions, config=config, prior=class_prior)
    return losses, [p.detach().cpu().clone() for p in adaptation.params]


_BASE = FitConfig(steps=4, batch_size=2, learning_rate=3e-3, warmup_steps=2, schedule="cosine",
                  step=StepConfig(min_snr_gamma=5.0))  # LR warm-up at steps 1-2, cosine at 3-4


@pytest.mark.parametrize("method,optimizer,prior", [("lora", "adamw", False), ("lora", "adamw8bit", True),
                                                    ("textual-inversion", "adamw-bf16", False)])
def test_on_a_cpu_the_captured_run_is_the_eager_run_bit_for_bit(method, optimizer, prior):
    config = dataclasses.replace(_BASE, optimizer=optimizer)
    eager = _run(method, config, prior=prior)
    captured = _run(method, dataclasses.replace(config, cuda_graph=True), prior=prior)
    assert eager[0] == captured[0]
    for a, b in zip(eager[1], captured[1]):
        assert torch.equal(a, b)


def test_fit_steps_through_captured_step_and_resets_it_when_the_text_encoder_stops(monkeypatch):
    """The loop hands each step to CapturedStep (the eager one is not called), and drops its graphs
    when the text encoder's parameters stop requiring gradients (a captured backward still computes
    theirs)."""
    made = spy_on_captured_steps(monkeypatch)
    resets: list[int] = []
    real_reset = step_capture.CapturedStep.reset

    def reset(self):
        resets.append(self.calls)
        real_reset(self)

    monkeypatch.setattr(step_capture.CapturedStep, "reset", reset)
    monkeypatch.setattr(importlib.import_module("sdadapt.methods.fit"), "train_step", lambda *a, **k: pytest.fail("the eager train_step was called"))
    _run("lora", dataclasses.replace(_BASE, cuda_graph=True, text_encoder_steps=3))
    assert len(made) == 1 and made[0].calls == _BASE.steps == 4
    assert resets == [3]  # before the 4th step, once


@pytest.mark.parametrize("change, message", [
    (dict(fused_backward=True, step=StepConfig(max_grad_norm=None)), "fused_backward"),
    (dict(step=StepConfig(mixed_precision="fp16")), "fp16"),
    (dict(optimizer="sgd-nesterov"), "optimizer 'sgd-nesterov'"),
])
def test_what_cannot_be_captured_is_refused_by_the_config(change, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(_BASE, cuda_graph=True, **change)


def _dataset_run(config: FitConfig, *, device: str = "cpu", toy=small_toy):
    from sdadapt.training.data import Dataset, encode_buckets, records_from_tensors

    system = toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    if device != "cpu":
        system.to(device)
    images, captions = concept_data("cross", 4, seed=0)
    dataset = Dataset(records_from_tensors(images, captions))
    encode_buckets(dataset, system.encode_images, images=images)
    losses = fit(system, adaptation, dataset, prior=(images.flip(0).to(device), captions[::-1], 0.7), config=config)
    return losses, [p.detach().cpu().clone() for p in adaptation.params]


def test_a_datasets_prior_batch_goes_through_the_captured_step_as_the_eager_one_draws_it(monkeypatch):
    """DreamBooth on a dataset: the class batch is a second forward. Through CapturedStep(prior=...)
    (noise drawn before the step, after the batch's) the run is the eager run bit for bit."""
    eager = _dataset_run(_BASE)
    calls: list[bool] = []
    real_call = step_capture.CapturedStep.__call__

    def call(self, batch, *, state, prior=None):
        calls.append(prior is not None and prior[1] == 0.7)
        return real_call(self, batch, state=state, prior=prior)

    monkeypatch.setattr(step_capture.CapturedStep, "__call__", call)
    captured = _dataset_run(dataclasses.replace(_BASE, cuda_graph=True))
    assert calls == [True] * _BASE.steps
    assert eager[0] == captured[0]
    for a, b in zip(eager[1], captured[1]):
        assert torch.equal(a, b)


def test_the_train_command_takes_cuda_graph_and_refuses_its_clashes(red_circles, tmp_path, capsys, monkeypatch):
    import sdadapt

    made = spy_on_captured_steps(monkeypatch)
    common = ["train", "lora", "--images", str(red_circles), "--batch-size", "2", "--no-prior", "--steps", "2", "-q",
              "--device", "cpu"]  # (eager there, also on a machine with CUDA)
    assert main([*common, "-o", str(tmp_path / "plain.safetensors")]) == 0
    assert not made
    assert main([*common, "--cuda-graph", "-o", str(tmp_path / "graph.safetensors")]) == 0
    assert len(made) == 1 and made[0].calls == 2  # the flag reached fit: every step went through CapturedStep
    a, b = sdadapt.load_lora(tmp_path / "plain.safetensors")[0], sdadapt.load_lora(tmp_path / "graph.safetensors")[0]
    assert all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])  # eager on a CPU: the same run
    accumulated = ["--gradient-accumulation-steps", "2"]
    assert main([*common, *accumulated, "-o", str(tmp_path / "plain2.safetensors")]) == 0
    assert main([*common, *accumulated, "--cuda-graph", "-o", str(tmp_path / "graph2.safetensors")]) == 0
    assert len(made) == 2 and made[1].calls == 4  # accumulation is captured too: 2 micro-batches per step
    a, b = sdadapt.load_lora(tmp_path / "plain2.safetensors")[0], sdadapt.load_lora(tmp_path / "graph2.safetensors")[0]
    assert all(torch.equal(a[c][k], b[c][k]) for c in a for k in a[c])
    assert main([*common, "--cuda-graph", "--torch-compile", "--dynamo-backend", "cudagraphs", "-o",
                 str(tmp_path / "x.safetensors")]) == 2
    assert "cudagraphs compile backend" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


# ------------------------------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,optimizer", [("lora", "adamw"), ("lora", "adamw8bit"), ("textual-inversion", "adamw")])
def test_cuda_fit_with_cuda_graph_matches_the_eager_run(method, optimizer, monkeypatch):
    """On a GPU: the captured run (3 eager steps per layout, then replays; the LR schedule filled into
    the optimiser's tensor lr) trains like the eager run — losses and weights to bf16-backward
    tolerance, with the same optimiser arithmetic (``capturable_optimizers``) — and did capture.
    (The textual-inversion rows, made before ``system.to("cuda")``, follow the model: fit moves them.)"""
    made = spy_on_captured_steps(monkeypatch)
    capturable_optimizers(monkeypatch)
    config = dataclasses.replace(_BASE, steps=10, optimizer=optimizer,
                                 step=StepConfig(min_snr_gamma=5.0, mixed_precision="bf16"))
    eager = _run(method, config, device="cuda", toy=build_toy)
    captured = _run(method, dataclasses.replace(config, cuda_graph=True), device="cuda", toy=build_toy)
    assert made and made[0].graph_count == 1 and made[0].calls == 10
    assert captured[0] == pytest.approx(eager[0], rel=1e-3)
    for a, b in zip(eager[1], captured[1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def test_a_captured_step_keeps_the_class_batch_among_its_static_inputs(fake_cuda_graphs):
    """Graph bookkeeping without a GPU (torch.cuda's graph API replaced by stand-ins): the class
    batch's prepared tensors are static inputs of the graph, refreshed before every replay, and the
    prior weight is part of the layout (another weight, another graph). Bookkeeping only: a fake
    replay trains nothing."""
    system = small_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    images, captions = concept_data("cross", 4, seed=0)
    latents, ids = system.encode_images(images), system.tokenize(captions)
    denoiser = system.denoiser()
    params = adaptation.params
    step = step_capture.CapturedStep(lambda x, t, c: denoiser(x, t, system.condition(c)), params=params,
                                     optimizer=torch.optim.AdamW(params, lr=1e-3), config=StepConfig(),
                                     alphas_cumprod=system.alphas_cumprod, warmup_steps=1)
    state = step_capture.TrainState(seed=0)
    for i in range(4):
        rows = torch.tensor([i % 4, (i + 1) % 4])
        step({"latents": latents[:2], "cond": ids[:2]}, state=state,
             prior=({"latents": latents[rows], "cond": ids[rows]}, 0.5 if i < 3 else 0.25))
    assert len(step._graphs) == 2 and step.graph_count == 1 and state.step == 4  # the 0.25 layout: warming up
    first = next(iter(step._graphs.values()))
    static = torch.utils._pytree.tree_unflatten(first.static_leaves, first.spec)
    assert static["prior_weight"] == 0.5 and first.graph.replays == 2  # warm-up, capture + replay, replay
    assert torch.equal(static["prior"]["latents"], latents[torch.tensor([2, 3])])  # the last batch-0.5 call's rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_on_a_dataset_with_a_prior_captures_both_forwards(monkeypatch):
    """On a GPU: DreamBooth on a dataset (the class batch a second forward inside the graph) trains
    like the eager run, to bf16-backward tolerance — and did capture (not 8 eager steps)."""
    config = dataclasses.replace(_BASE, steps=8, step=StepConfig(min_snr_gamma=5.0, mixed_precision="bf16"))
    capturable_optimizers(monkeypatch)  # (the same optimiser arithmetic on both sides)
    eager = _dataset_run(config, device="cuda", toy=build_toy)
    made = spy_on_captured_steps(monkeypatch)
    captured = _dataset_run(dataclasses.replace(config, cuda_graph=True), device="cuda", toy=build_toy)
    assert len(made) == 1 and made[0].graph_count >= 1 and made[0].calls == 8
    assert captured[0] == pytest.approx(eager[0], rel=1e-3)
    for a, b in zip(eager[1], captured[1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


def test_dropout_inside_checkpointed_blocks_is_refused_with_cuda_graph():
    """Inside a graph, checkpointing cannot restore the RNG for its recompute, so dropout would draw
    other masks in backward than in forward: refused (naming the layers); without dropout it trains
    as the eager run does."""
    from sdadapt.adapters.base import AdapterModule

    config = dataclasses.replace(_BASE, cuda_graph=True, gradient_checkpointing=True)
    eager = _run("lora", dataclasses.replace(config, cuda_graph=False))
    assert _run("lora", config)[0] == eager[0]

    system = small_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    adapters = [m for m in system.unet.modules() if isinstance(m, AdapterModule)]
    adapters[0].module_dropout = 0.1
    images, captions = concept_data("cross", 4, seed=0)
    before = [p.detach().clone() for p in adaptation.params]
    with pytest.raises(ValueError, match="cannot replay the dropout of .*sdadapt"):
        fit(system, adaptation, images, captions, config=config)
    assert all(torch.equal(a, b) for a, b in zip(before, adaptation.params))
    # the same run without checkpointing is fine
    fit(system, adaptation, images, captions, config=dataclasses.replace(config, gradient_checkpointing=False, steps=1))


def test_the_cudagraphs_compile_backend_is_refused_with_cuda_graph():
    with pytest.raises(ValueError, match="cudagraphs compile backend"):
        dataclasses.replace(_BASE, cuda_graph=True, compile_backend="cudagraphs")


def test_a_dropout_layer_in_training_mode_inside_the_unet_counts_too():
    """The refusal's other branch: a plain ``nn.Dropout`` (p > 0, training) in the UNet, not an adapter's."""
    from torch import nn

    from sdadapt.methods.fit import _dropout_modules

    system = small_toy(seed=1)
    assert _dropout_modules(system.unet) == []
    system.unet.extra_dropout = nn.Dropout(0.1)
    assert _dropout_modules(system.unet) == ["extra_dropout"]
    system.unet.extra_dropout.eval()
    assert _dropout_modules(system.unet) == []  # not drawing in eval mode


def test_trained_rows_made_before_the_model_moved_follow_it(monkeypatch):
    """Textual-inversion rows live in hooks beside the text encoder, outside the module tree
    ``system.to`` moves: ``fit`` hands every trained parameter and the model's device to
    ``_follow_model`` (in place: the same objects) before it builds the optimiser. On the first H200
    run a textual-inversion fit made before ``system.to("cuda")`` stepped its rows on the CPU and never
    captured; ``test_cuda_fit_with_cuda_graph_matches_the_eager_run[textual-inversion-adamw]`` checks
    the move itself (a CPU has no second device to move to)."""
    fit_module = importlib.import_module("sdadapt.methods.fit")
    system = small_toy(seed=1)
    adaptation = METHODS["textual-inversion"].adapt(system, seed=1, token="sks")
    rows = adaptation.params[0]
    system.to(torch.float64)  # a conversion `to` makes: the rows stay behind
    assert rows.dtype == torch.float32
    seen: list[tuple[list, torch.device, int]] = []
    built: list[int] = []
    real_make = fit_module.make_optimizer
    monkeypatch.setattr(fit_module, "_follow_model", lambda params, device: seen.append((params, device, len(built))))
    monkeypatch.setattr(fit_module, "make_optimizer", lambda groups, config: built.append(1) or real_make(groups, config))
    system = small_toy(seed=1)
    adaptation = METHODS["textual-inversion"].adapt(system, seed=1, token="sks")
    images, captions = concept_data("cross", 2, seed=0)
    fit(system, adaptation, images, [f"a sks {c}" for c in captions], config=dataclasses.replace(_BASE, steps=1))
    assert len(seen) == 1 and seen[0][0] is adaptation.params and seen[0][1] == torch.device("cpu") and seen[0][2] == 0
    assert built == [1]
