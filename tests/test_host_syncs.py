"""No host syncs in the training step (issue 16 §2), checked on a CPU with HostSyncs and on CUDA
with torch.cuda.set_sync_debug_mode.

A host sync is a device value read back to Python (``.item()``, ``if t:``, ``nonzero``, ...) or a
blocking copy of host-made data to the device. ``train_step`` and ``CapturedStep`` make none per
step (fp16's GradScaler: one read per optimiser step, inherent); ``fit`` reads the step's loss once
per optimiser step (for ``callback``, ``on_step``, the NaN check and its returned list).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings

import pytest
import torch
from _fast_s1 import one_level_toy
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training import diffusion
from sdadapt.training.host_syncs import HostSyncs, copy_to_device
from sdadapt.training.optim import Adafactor, AdamW, fuse_optimizer_into_backward
from sdadapt.training.step import EMA, StepConfig, TrainState, train_step
from sdadapt.training.step_capture import CapturedStep


# ------------------------------------------------------------------------------- the recorder
def _device_tensor() -> torch.Tensor:
    return torch.randn(4)  # made before the recording: stands for a tensor on the accelerator


_SYNCS = {
    ".item()": lambda x: x[0].item(),
    "float(t)": lambda x: float(x.sum()),
    "bool(t)": lambda x: bool(x[0] > 0),
    "if t:": lambda x: 1 if (x > 0).any() else 0,
    "int(t)": lambda x: int(x.argmax()),
    ".tolist()": lambda x: x.tolist(),
    ".numpy()": lambda x: x.numpy(),
    "nonzero": lambda x: x.nonzero(),
    "boolean mask": lambda x: x[x > 0],
    "masked_select": lambda x: x.masked_select(x > 0),
    "unique": lambda x: x.unique(),
    "torch.equal": lambda x: torch.equal(x, x),
    "repeat_interleave without output_size": lambda x: x.repeat_interleave(torch.ones_like(x, dtype=torch.long)),
    "torch.tensor of tensors": lambda x: torch.tensor([x[0], x[1]]),
    "host tensor .to(device)": lambda x: torch.ones(3).to(x.device),
    "host tensor .to(other)": lambda x: torch.cat([torch.ones(2), torch.zeros(2)]).to(x),
    "torch.tensor(data, device=...)": lambda x: torch.tensor([1.0, 2.0], device=x.device),
    "host index into a device tensor": lambda x: x[torch.randint(4, (2,), generator=torch.Generator())],
    "device.copy_(host)": lambda x: x.clone().copy_(torch.zeros(4)),
    ".cpu()": lambda x: x.cpu(),
    ".to('cpu')": lambda x: x.to("cpu"),
    "host.copy_(device)": lambda x: torch.zeros(4).copy_(x),
}

_NO_SYNCS = {
    "device math": lambda x: (x * 2).sum() + torch.full((), 1.0, device=x.device),
    "a host tensor read": lambda x: torch.tensor(3.0).item(),  # (torch's optimiser step counters)
    "host math read": lambda x: float(torch.arange(4.0).sum()),
    "non_blocking copy": lambda x: torch.ones(3).to(x.device, non_blocking=True),
    "copy_to_device": lambda x: x[copy_to_device(torch.tensor([0, 2]), x.device)],
    "dtype change of a host tensor": lambda x: torch.ones(2).to(torch.float64).sum().item(),
    "repeat_interleave with output_size": lambda x: x.repeat_interleave(torch.ones_like(x, dtype=torch.long), output_size=4),
    "0-dim host scalar in device math": lambda x: x * torch.tensor(2.0),
}


@pytest.mark.parametrize("what", sorted(_SYNCS))
def test_the_recorder_catches_each_kind_of_host_sync(what):
    x = _device_tensor()
    with HostSyncs() as syncs:
        _SYNCS[what](x)
    assert len(syncs.events) >= 1, what
    assert all("test_host_syncs.py" in e.where for e in syncs.events), syncs.report()  # points at the line


@pytest.mark.parametrize("what", sorted(_NO_SYNCS))
def test_the_recorder_lets_host_work_and_device_work_pass(what):
    x = _device_tensor()
    with HostSyncs() as syncs:
        _NO_SYNCS[what](x)
    assert syncs.events == [], syncs.report()


def test_reads_and_copies_are_told_apart():
    x = _device_tensor()
    with HostSyncs() as syncs:
        x.sum().item()
        torch.ones(2).to(x.device)
    assert [e.op for e in syncs.reads()] == ["_local_scalar_dense"]
    assert [e.op for e in syncs.copies()] == ["to"]
    with syncs, pytest.raises(RuntimeError, match="already recording"):
        syncs.__enter__()


@pytest.mark.parametrize("call", ["Tensor.backward", "torch.autograd.backward"])
def test_a_copy_in_python_code_backward_runs_is_caught(call):
    """A hook autograd calls in backward copies a host-made tensor in: recorded, whichever way the backward
    was started (each is dispatched through the recorder's function mode, which leaves the stack while it
    handles a call: before, the whole backward ran without it and the copy went unseen). The gradients
    are those of the same backward unrecorded."""
    def run(record: bool) -> tuple[list[str], torch.Tensor]:
        w = torch.linspace(-1.0, 1.0, 6, requires_grad=True)

        def hook(p: torch.Tensor) -> None:
            p.grad.mul_(torch.full((), 3.0).to(p.device))

        w.register_post_accumulate_grad_hook(hook)
        loss, seed = (w * w).sum(), torch.ones(())  # (made before the recording: device tensors)
        with HostSyncs() if record else contextlib.nullcontext() as syncs:
            loss.backward() if call == "Tensor.backward" else torch.autograd.backward([loss], [seed])
        return ([] if syncs is None else [e.op for e in syncs.events]), w.grad

    events, grad = run(True)
    assert events == ["to"]
    torch.testing.assert_close(grad, run(False)[1], rtol=0, atol=0)


def test_a_backward_the_recorder_cannot_restart_runs_as_called():
    """``inputs=`` (and gradients torch refuses) are left to torch: the same gradients, torch's own error."""
    w, v = torch.ones(3, requires_grad=True), torch.ones(3, requires_grad=True)
    with HostSyncs():
        (w * v).sum().backward(inputs=[w])
        with pytest.raises(RuntimeError, match="grad can be implicitly created only for scalar outputs"):
            (w * 2).backward()
    assert torch.equal(w.grad, torch.ones(3)) and v.grad is None


def test_copy_to_device_on_the_same_device_is_the_tensor_itself():
    x = torch.arange(6).reshape(2, 3)
    assert copy_to_device(x, "cpu") is x
    assert copy_to_device(x, torch.device("cpu")) is x


# ------------------------------------------------------------------------------- train_step
def _toy_lora(seed: int = 1):
    """LoRA on the toy system (``one_level_toy``: every layer kind, a ninth of the ops a step records): (model(x_t, t,
    ids), params, latents (4,12,16,16), ids, alphas_cumprod)."""
    system = one_level_toy(seed=seed)
    adaptation = METHODS["lora"].adapt(system, seed=seed)
    denoiser = system.denoiser()
    images, captions = concept_data("cross", 4, seed=0)
    with torch.no_grad():
        latents, ids = system.encode_images(images), system.tokenize(captions)

    def model(x, t, token_ids):
        return denoiser(x, t, system.condition(token_ids))

    return model, adaptation.params, latents, ids, system.alphas_cumprod


def _events_per_step(step, steps: int = 2) -> list[list[str]]:
    """The host syncs of each call of ``step()`` after a first (optimiser state, lookup tables) one (two by
    default: with 2-step accumulation one optimiser step and one micro-batch, and a sync of the step shows in
    every call of its kind)."""
    per_step = []
    with HostSyncs() as syncs:
        step()
        for _ in range(steps):
            syncs.events.clear()
            step()
            per_step.append([str(e) for e in syncs.events])
    return per_step


_OPTIMIZERS = {
    "torch AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-3),
    "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),
    "int8 AdamW foreach": lambda ps: AdamW(ps, lr=1e-3, state_dtype="int8", foreach=True),
    "bf16-state AdamW": lambda ps: AdamW(ps, lr=1e-3, state_dtype=torch.bfloat16),
    "fused backward": lambda ps: fuse_optimizer_into_backward(ps, lambda group: AdamW(group, lr=1e-3)),
    "Adafactor scaled": lambda ps: Adafactor(ps, scale_parameter=True, relative_step=True, weight_decay=0.01),
}
_CASES = [  # (optimiser, StepConfig, EMA)
    ("torch AdamW", StepConfig(), False),  # clipping at 1.0
    ("torch AdamW", StepConfig(max_grad_norm=None), True),
    ("torch AdamW fused", StepConfig(min_snr_gamma=5.0, mixed_precision="bf16", channels_last=True,
                                     sdpa_backends=("math",)), True),
    ("int8 AdamW foreach", StepConfig(min_snr_gamma=5.0, noise_offset=0.05, input_perturbation=0.1, loss="huber",
                                      huber_schedule="snr", pyramid_noise_iterations=3), False),
    ("bf16-state AdamW", StepConfig(prediction_type="v_prediction", debiased_estimation=True, p2_gamma=1.0,
                                    timestep_range=(100, 900), accumulation_steps=2), True),
    ("fused backward", StepConfig(max_grad_norm=None), False),
    ("Adafactor scaled", StepConfig(), False),  # the weight's RMS scales the step on the device
]


@pytest.mark.parametrize("optimizer,config,ema", _CASES,
                         ids=[f"{o}-clip{c.max_grad_norm}-acc{c.accumulation_steps}{'-ema' if e else ''}" for o, c, e in _CASES])
def test_train_step_makes_no_host_sync(optimizer, config, ema):
    model, params, latents, ids, ac = _toy_lora()
    opt = _OPTIMIZERS[optimizer](params)
    state = TrainState(seed=0, ema=EMA(params, decay=0.9) if ema else None)
    batch = {"latents": latents, "cond": ids, "loss_weight": torch.rand(4)}

    def step():
        train_step(model, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac)

    before = [p.detach().clone() for p in params]
    assert _events_per_step(step) == [[], []]
    assert state.step == 3 // config.accumulation_steps
    assert any(not torch.equal(p, q) for p, q in zip(params, before))  # it trained


def test_fp16_loss_scaling_reads_one_value_per_optimiser_step():
    """GradScaler.step reads its found-inf flag (``.item()``) to skip the step: the documented fp16
    exception; bf16 has none (above)."""
    model, params, latents, ids, ac = _toy_lora()
    opt = torch.optim.AdamW(params, lr=1e-3)
    state = TrainState(seed=0)

    def step():
        train_step(model, {"latents": latents, "cond": ids}, params=params, optimizer=opt, state=state,
                   config=StepConfig(mixed_precision="fp16"), alphas_cumprod=ac)

    for events in _events_per_step(step, steps=1):
        assert len(events) == 1 and events[0].startswith("read _local_scalar_dense") and "clip_and_step" in events[0]


def test_a_copy_added_to_an_optimiser_fused_into_backward_is_caught():
    """The fused-backward optimiser steps inside backward (hooks autograd calls): a host-made tensor it
    copies in at each step is caught in every step."""
    model, params, latents, ids, ac = _toy_lora()

    class Copying(AdamW):
        def step(self, closure=None):
            for group in self.param_groups:
                group["params"][0].grad.mul_(torch.ones(()).to(latents.device))
            return super().step(closure)

    opt = fuse_optimizer_into_backward(params, lambda group: Copying(group, lr=1e-3))
    state = TrainState(seed=0)

    def step():
        train_step(model, {"latents": latents, "cond": ids}, params=params, optimizer=opt, state=state,
                   config=StepConfig(max_grad_norm=None), alphas_cumprod=ac)

    for events in _events_per_step(step):
        assert events and all(e.startswith("copy to") and "in step" in e for e in events), events


@pytest.mark.parametrize("sync", ["read", "copy"])
def test_a_sync_added_to_the_step_is_caught(monkeypatch, sync):
    """The measurement above fails when the step gains a sync (here: inside the loss)."""
    model, params, latents, ids, ac = _toy_lora()
    opt = torch.optim.AdamW(params, lr=1e-3)
    state = TrainState(seed=0)
    loss_of = diffusion.diffusion_loss

    def syncing_loss(prediction, target, **options):
        loss = loss_of(prediction, target, **options)
        if sync == "read":
            return loss * 2 if loss > 100 else loss  # `if tensor:` reads it
        return loss * torch.ones(1).to(loss.device)  # host-made tensor copied in

    monkeypatch.setattr(diffusion, "diffusion_loss", syncing_loss)

    def step():
        train_step(model, {"latents": latents, "cond": ids}, params=params, optimizer=opt, state=state,
                   config=StepConfig(), alphas_cumprod=ac)

    assert [len(events) for events in _events_per_step(step, steps=2)] == [1, 1]


def test_captured_step_eager_fallback_makes_no_host_sync():
    model, params, latents, ids, ac = _toy_lora()
    opt = torch.optim.AdamW(params, lr=1e-3)
    state = TrainState(seed=0, ema=EMA(params, decay=0.9))
    captured = CapturedStep(model, params=params, optimizer=opt, config=StepConfig(min_snr_gamma=5.0, noise_offset=0.05),
                            alphas_cumprod=ac, strict=False)
    assert captured.problems  # on a CPU it runs train_step's semantics eagerly

    def step():
        captured({"latents": latents, "cond": ids}, state=state)
        captured.set_lr(5e-4)

    assert _events_per_step(step) == [[], []]


# ------------------------------------------------------------------------------------- fit
def _fit_events(data, captions=None, *, prior=None, accumulation: int = 1, steps: int = 3, system=None, adaptation=None):
    """Each optimiser step's host syncs in ``fit`` (from the end of the previous ``on_step``)."""
    per_step: list[list] = []
    with HostSyncs() as syncs:
        losses = fit(system, adaptation, data, captions, prior=prior,
                     config=FitConfig(steps=steps, batch_size=2, learning_rate=1e-3, warmup_steps=0,
                                      step=StepConfig(accumulation_steps=accumulation)),
                     on_step=lambda progress: (per_step.append(list(syncs.events)), syncs.events.clear()))
    assert len(losses) == steps
    return per_step


@pytest.mark.parametrize("prior,accumulation", [(False, 1), (True, 2)], ids=["plain", "prior-accumulated"])
def test_fit_reads_the_loss_once_per_optimiser_step(prior, accumulation):
    system = one_level_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    images, captions = concept_data("cross", 4, seed=0)
    class_images = (images.flip(0), captions[::-1], 0.5) if prior else None
    per_step = _fit_events(images, captions, prior=class_images, accumulation=accumulation, system=system,
                           adaptation=adaptation)
    for events in per_step[1:]:  # (the first also holds the setup: encoding, tokenizing)
        assert [(e.kind, e.op) for e in events] == [("read", "tolist")], "\n".join(map(str, events))
        assert "methods/fit.py" in events[0].where


def test_fit_on_a_dataset_copies_its_host_latents_without_a_wait():
    """Dataset mode: the cached (host) latents, the prior's draws and the size conditioning reach the
    device by copy_to_device, and so do the token ids the system's ``tokenize`` makes of each step's
    captions; the one read per step is the loss."""
    from sdadapt.training.data import Dataset, encode_buckets, records_from_tensors

    system = one_level_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    images, captions = concept_data("cross", 4, seed=0)
    per_step: list[list] = []
    with HostSyncs() as syncs:
        dataset = Dataset(records_from_tensors(images, captions))
        encode_buckets(dataset, system.encode_images, images=images)  # host latents, made while recording
        fit(system, adaptation, dataset, prior=(images.flip(0), captions[::-1], 0.5),
            config=FitConfig(steps=3, batch_size=2, learning_rate=1e-3, warmup_steps=0),
            on_step=lambda progress: (per_step.append(list(syncs.events)), syncs.events.clear()))
    for events in per_step[1:]:
        assert [(e.kind, e.op) for e in events] == [("read", "tolist")], "\n".join(map(str, events))


@settings(max_examples=200, deadline=None)
@example([3.39617752923046e+38, -3.39617752923046e+38], torch.bfloat16)  # ±inf in bf16: NaN both ways
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=32), min_size=1, max_size=8),
       st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_the_step_loss_read_once_equals_the_python_float_sum(values, dtype):
    """fit reads an optimiser step's micro-batch losses once: bit for bit the Python float sum of one
    ``float()`` per micro-batch (what it did before), whatever the loss dtype — NaN where that sum is
    NaN (float32 values beyond bf16's range become ±inf in bf16, and inf − inf is NaN)."""
    from sdadapt.methods.fit import _mean_loss

    losses = [torch.tensor(v, dtype=dtype) for v in values]
    python = 0.0
    for loss in losses:
        python += float(loss)
    with HostSyncs() as syncs:
        mean = _mean_loss(losses)
    assert mean == python / len(values) or (math.isnan(mean) and math.isnan(python))
    assert [e.op for e in syncs.reads()] == ["tolist"]


def test_fit_makes_no_float64_tensor():
    """MPS has no float64: a float64 tensor made from the step's (device) loss fails there on every
    step. On the toy system nothing in fit's steps makes one."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Float64Outputs(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in pytree.tree_leaves(out)):
                self.ops.append(str(func))
            return out

    system = one_level_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    images, captions = concept_data("cross", 4, seed=0)
    with Float64Outputs() as seen:
        losses = fit(system, adaptation, images, captions, config=FitConfig(
            steps=2, batch_size=2, learning_rate=1e-3, warmup_steps=0, step=StepConfig(accumulation_steps=2)))
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert seen.ops == []


# ----------------------------------------------------------------------------- pyramid noise
class _AcceleratorGenerator:
    """Stands for a CUDA generator: its seed and Philox offset are host-side numbers."""

    device = torch.device("cuda")

    def __init__(self, seed: int, offset: int) -> None:
        self.seed, self.offset = seed, offset

    def initial_seed(self) -> int:
        return self.seed

    def get_offset(self) -> int:
        return self.offset


def test_pyramid_noise_scales_of_an_accelerator_generator_are_drawn_on_the_host():
    """Pyramid noise's random scales set tensor shapes, so they are host numbers: from a CPU generator
    itself (unchanged), from an accelerator's generator by its seed and offset (no read back): the
    same state gives the same scales, a generator that has drawn more gives new ones."""
    from sdadapt.training.diffusion import _host_uniform

    g = torch.Generator().manual_seed(3)
    cpu = _host_uniform(g)
    reference = torch.Generator().manual_seed(3)
    assert [cpu(), cpu()] == [float(torch.rand((), generator=reference)) for _ in range(2)]

    def scales(seed, offset):
        draw = _host_uniform(_AcceleratorGenerator(seed, offset))  # type: ignore[arg-type]
        return [draw() for _ in range(4)]

    first = scales(0, 0)
    assert all(0.0 <= u < 1.0 for u in first) and len(set(first)) == 4
    assert scales(0, 0) == first
    assert scales(0, 4) != first and scales(1, 0) != first
    with HostSyncs() as syncs:
        scales(0, 8)
    assert syncs.events == []


# ------------------------------------------------------------------------------------- CUDA
def _sync_warnings(caught: list[warnings.WarningMessage]) -> int:
    return sum("synchronizing" in str(w.message) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_train_step_and_captured_replays_make_no_host_sync():
    """On CUDA, under set_sync_debug_mode("error") (which also raises on a blocking host-to-device
    copy): LoRA on the toy through train_step (fused torch AdamW, EMA, pyramid noise, huber-snr loss)
    and through CapturedStep replays with sdadapt's capturable int8 AdamW (LR changed in between)."""
    torch.manual_seed(0)
    # (two copies of the same LoRA: train_step clears the gradients of its parameters, which a CapturedStep owns)
    system, eager_system = build_toy(seed=1), build_toy(seed=1)
    adaptation, eager_adaptation = METHODS["lora"].adapt(system, seed=1), METHODS["lora"].adapt(eager_system, seed=1)
    system.cuda()
    eager_system.cuda()
    params, eager_params = adaptation.params, eager_adaptation.params
    denoiser, eager_denoiser = system.denoiser(), eager_system.denoiser()
    images, captions = concept_data("cross", 4, seed=0)
    latents, ids = system.encode_images(images.cuda()), system.tokenize(captions)
    ac = system.alphas_cumprod

    def model(x, t, token_ids):
        return denoiser(x, t, system.condition(token_ids))

    def eager_model(x, t, token_ids):
        return eager_denoiser(x, t, eager_system.condition(token_ids))

    config = StepConfig(mixed_precision="bf16", min_snr_gamma=5.0, noise_offset=0.05, pyramid_noise_iterations=3,
                        loss="huber", huber_schedule="snr")
    state = TrainState(seed=2, device="cuda", ema=EMA(eager_params, decay=0.9))
    captured_state = TrainState(seed=2, device="cuda", ema=EMA(params, decay=0.9))
    batch = {"latents": latents, "cond": ids}
    fused = torch.optim.AdamW(eager_params, lr=1e-3, fused=True)
    int8 = AdamW(params, lr=torch.tensor(1e-3, device="cuda"), state_dtype="int8", foreach=True, capturable=True)
    captured = CapturedStep(model, params=params, optimizer=int8, config=config, alphas_cumprod=ac, warmup_steps=1)
    rows = torch.tensor([0, 2, 1, 3])

    def steps():
        train_step(eager_model, batch, params=eager_params, optimizer=fused, state=state, config=config,
                   alphas_cumprod=ac)
        captured({"latents": latents[copy_to_device(rows, "cuda")], "cond": ids}, state=captured_state)
        captured.set_lr(5e-4)

    for _ in range(2):  # warm-up: optimiser states, lookup tables, the graph's capture, pinned memory
        steps()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            steps()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert captured.captured
    assert torch.isfinite(torch.stack([p.float().norm() for p in [*params, *eager_params]])).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_syncs_once_per_optimiser_step():
    """fit on CUDA (tensor data with a prior, gradient accumulation, bf16): one synchronising call
    per optimiser step — the loss read — and none from the batches (host indices by pinned copies)."""
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    system.cuda()
    images, captions = concept_data("cross", 4, seed=0)
    images = images.cuda()
    counts: list[int] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit(system, adaptation, images, captions, prior=(images.flip(0), captions[::-1], 0.5),
                config=FitConfig(steps=4, batch_size=2, learning_rate=1e-3, warmup_steps=0,
                                 step=StepConfig(accumulation_steps=2, mixed_precision="bf16")),
                on_step=lambda progress: counts.append(_sync_warnings(caught)))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    per_step = [b - a for a, b in itertools.pairwise(counts)]
    assert per_step == [1, 1, 1], (counts, [str(w.message) for w in caught][:5])


def test_the_docs_example_runs_and_records_what_it_says():
    from docs_pages import code_blocks, run_block

    index = next(i for i, block in enumerate(code_blocks("training.md")) if "HostSyncs" in block)
    namespace = run_block("training.md", index)
    assert len(namespace["syncs"].events) == 2
