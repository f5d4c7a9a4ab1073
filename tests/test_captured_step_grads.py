"""CapturedStep: every optimiser step must see only its own batch's gradient.

A captured graph's backward leaves its static gradient tensors bound to ``p.grad`` after every
replay; an eager step that follows (the warm-up of another batch layout — a new bucket, a last
smaller batch — or any step after ``reset()``) must not add its gradient to them. torch.cuda's
graph API is replaced by stand-ins (the "capture" runs eagerly, as a real capture leaves
``p.grad``), so this runs on a CPU.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sdadapt.training import step_capture
from sdadapt.training.step import StepConfig, TrainState, step_loss


@pytest.mark.parametrize("then", ["another layout", "reset"])
def test_an_eager_step_after_a_capture_sees_only_its_own_gradient(fake_cuda_graphs, then):
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(4, 1, 1, dtype=torch.float64))

    def model(x, t, cond):
        return x * w

    prepared_seen: list[dict] = []

    def extra_loss(prepared, prediction):  # records what each step trained on (adds nothing)
        prepared_seen.append(dict(prepared))
        return prediction.sum() * 0

    optimizer = torch.optim.SGD([w], lr=0.0)  # w stays put: each step's gradient can be recomputed
    seen: list[torch.Tensor] = []
    real_step = optimizer.step
    optimizer.step = lambda *a, **k: (seen.append(w.grad.detach().clone()), real_step(*a, **k))[1]
    config = StepConfig(max_grad_norm=None)  # the optimiser sees the raw gradient
    alphas = torch.linspace(0.99, 0.01, 1000, dtype=torch.float64).cumprod(0)
    step = step_capture.CapturedStep(model, params=[w], optimizer=optimizer, config=config, alphas_cumprod=alphas,
                                     warmup_steps=1, extra_loss=extra_loss)
    state = TrainState(seed=0)
    latents = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    step({"latents": latents[:2], "cond": 0}, state=state)  # warm-up (eager)
    step({"latents": latents[:2], "cond": 0}, state=state)  # capture (+ replay)
    assert step.graph_count == 1
    if then == "reset":
        step.reset()
        step({"latents": latents[:2], "cond": 0}, state=state)  # warm-up again (eager)
    else:
        step({"latents": latents[:3], "cond": 0}, state=state)  # another layout's warm-up (eager)
    assert len(seen) == len(prepared_seen) == 3
    for got, prepared in zip(seen, prepared_seen):
        want, = torch.autograd.grad(step_loss(model, prepared, config), w)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.usefixtures("replaying_cuda_graphs")
def test_a_dropped_captured_step_frees_the_model_its_gradients_and_the_optimiser():
    """Nothing of a captured step outlives it: the model, the trained parameters (and the gradients it
    owns), the step and the optimiser's state are freed with the last reference (weak references die
    after ``gc.collect()``). On the H200 each captured benchmark row left 195–264 MiB allocated after it
    was dropped; this pins that it is not these objects (on a CPU, graphs replayed by stand-ins)."""
    import gc
    import weakref

    import sdadapt
    from sdadapt.targets import by_type
    from sdadapt.training.step_capture import CapturedStep

    class Denoiser(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x, t, cond):
            return self.conv(x)

    model = Denoiser()
    handle = sdadapt.inject(model, by_type(nn.Conv2d), sdadapt.LoRAConfig(rank=2))
    params = list(handle.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    step = CapturedStep(model, params=params, optimizer=optimizer, config=StepConfig(mixed_precision="bf16"),
                        alphas_cumprod=torch.linspace(0.99, 0.01, 100), warmup_steps=1)
    state = TrainState(seed=0)
    for _ in range(3):
        step({"latents": torch.randn(2, 4, 8, 8), "cond": None}, state=state)
    assert step.graph_count == 1
    refs = [weakref.ref(x) for x in (model, params[0], params[0].grad, step, optimizer)]
    del model, handle, params, optimizer, step
    gc.collect()
    assert [ref() is None for ref in refs] == [True] * 5


@pytest.mark.parametrize("accumulation", [1, 2])
def test_every_warm_up_and_capture_runs_on_one_side_stream(fake_cuda_graphs, monkeypatch, accumulation):
    """One side stream per step, made once: each warm-up runs on it and each graph (every batch layout's,
    and the update's with accumulation) is captured on it. (A stream per warm-up took torch's pooled
    streams in turn, and cuBLAS keeps a workspace for each stream it ran on: 32 MiB each on Hopper.)"""
    import contextlib

    made, entered, captured_on = [], [], []

    class Stream:
        def __init__(self, device=None) -> None:
            made.append(self)

        def wait_stream(self, other) -> None:
            pass

    def stream(s):
        entered.append(s)
        return contextlib.nullcontext()

    def graph(g, stream=None):
        captured_on.append(stream)
        return contextlib.nullcontext()

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    w = nn.Parameter(torch.randn(4, 1, 1, dtype=torch.float64))
    optimizer = torch.optim.SGD([w], lr=1e-3)
    step = step_capture.CapturedStep(lambda x, t, cond: x * w, params=[w], optimizer=optimizer,
                                     config=StepConfig(max_grad_norm=None, accumulation_steps=accumulation),
                                     alphas_cumprod=torch.linspace(0.99, 0.01, 1000, dtype=torch.float64).cumprod(0),
                                     warmup_steps=2)
    state = TrainState(seed=0)
    latents = torch.randn(3, 4, 2, 2, dtype=torch.float64)
    for size in (2, 2, 2, 3, 3, 3, 2, 3) * accumulation:  # two layouts: 2 warm-ups and a capture each, then replays
        step({"latents": latents[:size], "cond": 0}, state=state)
    assert step.graph_count == 2
    warm_ups = 4 + (2 if accumulation > 1 else 0)  # (the update's own warm-ups with accumulation)
    assert len(made) == 1 and len(entered) >= warm_ups and all(s is made[0] for s in entered)
    assert len(captured_on) == 2 + (accumulation > 1) and all(s is made[0] for s in captured_on)
