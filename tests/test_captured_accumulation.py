"""CapturedStep with gradient accumulation, and the gradients it owns.

Since its first capture a ``CapturedStep`` owns the trained parameters' ``.grad``: every graph's
backward adds into them and the update zeroes them in place, so batch layouts share one set of
gradients and accumulation is k micro-batch replays plus one update replay. Without a GPU the graph
API is replaced by conftest's ``replaying_cuda_graphs``: a replay runs the captured code again on
the static inputs and writes into the captured outputs — the memory a real replay touches — so the
bookkeeping (static inputs, owned gradients, zeroing, the ``1/k`` scale, the update graph's place,
eager warm-ups between replays) must give ``train_step``'s numbers bit for bit. The CUDA test
compares real graphs with eager steps (``benchmarks/gpu_check.sh`` runs it).

Where the replaying fake is not a real graph (what only the CUDA test, or a structural assert
here, can catch): a replay re-runs the captured *Python*, while a real one re-runs only the
recorded kernels on the memory they used at capture. So in the fake, host-side effects repeat at
every replay (``_settle_grads``' walk and ``p.grad = None``, an optimiser's Python counters, a
branch on a tensor's value, a ``.item()``, which a real capture refuses); tensors the captured code
allocates are fresh at each fake replay, while a real replay rewrites the capture's buffers (a
gradient that autograd allocated inside the capture is overwritten at each real replay, but added
into at each fake one); ``p.grad`` rebound after the capture is what the fake uses and the old
tensor is what a real graph writes; random draws come from the CPU generator again instead of the
graph's Philox offsets; streams, ``record_stream`` and the graphs' memory pools do nothing. Hence
the tests of *when* the update graph is captured and of which gradients a capture may drop assert
the bookkeeping itself rather than only the numbers.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.utils.checkpoint
from torch import nn

from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training import step_capture
from sdadapt.training.optim import AdamW, set_lr
from sdadapt.training.step import EMA, StepConfig, TrainState, train_step


class _Net(nn.Module):
    """A conv denoiser with one parameter the loss never reaches (as a LoRA on a text-encoder layer
    that clip skip leaves out): eager steps leave it alone, so must captured ones."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.mix = nn.Linear(4, 4)
        self.unreached = nn.Parameter(torch.ones(3))

    def forward(self, x, t, cond):
        h = self.conv(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000)
        return self.mix(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + cond.view(-1, 4, 1, 1)


_SIZES = [4, 4, 4, 2, 4, 2, 2, 4, 4, 4, 2, 2]  # batch layouts change inside accumulation cycles
_ALPHAS = torch.linspace(0.9999, 0.98, 1000).cumprod(0)


def _run(k: int, captured: bool):
    torch.manual_seed(0)
    net = _Net()
    params = list(net.parameters())
    opt = AdamW(params, lr=torch.tensor(2e-2), weight_decay=0.1, capturable=True)
    config = StepConfig(accumulation_steps=k, min_snr_gamma=5.0)
    after = lambda: {"weight_norm": net.conv.weight.norm()}  # (a max-norm-like pass)
    step = step_capture.CapturedStep(net, params=params, optimizer=opt, config=config, alphas_cumprod=_ALPHAS,
                                     warmup_steps=2, after_update=after)
    state = TrainState(seed=3, ema=EMA(params, decay=0.9))
    data = torch.Generator().manual_seed(1)
    outs = []
    for i, size in enumerate(_SIZES):
        if i == 6:
            (step.set_lr if captured else lambda lr: set_lr(opt, lr))(5e-3)  # no re-capture
        batch = {"latents": torch.randn(size, 4, 6, 6, generator=data), "cond": torch.randn(size, 4, generator=data)}
        if captured:
            outs.append(step(batch, state=state))
        else:
            outs.append(train_step(net, batch, params=params, optimizer=opt, state=state, config=config,
                                   alphas_cumprod=_ALPHAS, after_update=after))
    return outs, net, opt, state, step


@pytest.mark.parametrize("k", [1, 2, 3])
def test_captured_micro_batches_and_updates_are_train_steps_bit_for_bit(replaying_cuda_graphs, k):
    eager, eager_net, eager_opt, eager_state, _ = _run(k, captured=False)
    graph, graph_net, graph_opt, graph_state, step = _run(k, captured=True)
    assert step.graph_count == 2 and (step._update.graph is not None) == (k > 1)
    assert sum(e.graph.replays for e in step._graphs.values()) == len(_SIZES) - 4  # 2 warm-ups per layout
    for want, got in zip(eager, graph):
        assert set(want) == set(got) and bool(want["stepped"]) == bool(got["stepped"])
        for key in want:
            assert torch.equal(want[key], got[key]) or (key == "grad_norm" and want[key].isnan() and got[key].isnan()), key
    assert (graph_state.step, graph_state.micro_step) == (eager_state.step, eager_state.micro_step) == (len(_SIZES) // k, len(_SIZES))
    for (name, want), got in zip(eager_net.named_parameters(), graph_net.parameters()):
        assert torch.equal(want, got), name
    assert torch.equal(graph_net.unreached, torch.ones(3)) and graph_net.unreached.grad is None  # never stepped
    for want, got in zip(eager_opt.state.values(), graph_opt.state.values()):
        assert all(torch.equal(torch.as_tensor(want[s]), torch.as_tensor(got[s])) for s in want)
    assert graph_state.ema.updates == eager_state.ema.updates == len(_SIZES) // k  # once per update, not per micro-batch
    assert all(torch.equal(a, b) for a, b in zip(eager_state.ema.shadow, graph_state.ema.shadow))


def test_every_layout_adds_into_one_set_of_gradients_owned_by_the_step(replaying_cuda_graphs):
    _, net, _, _, step = _run(2, captured=True)
    grads = [p.grad for p in (net.conv.weight, net.conv.bias, net.mix.weight, net.mix.bias)]
    assert all(g is not None and not g.any() for g in grads)  # zeroed in place by the last update
    assert [id(g) for g in grads] == [id(g) for _, g in step._grads]
    state = TrainState(seed=5)
    for size in (4, 2, 4, 2):  # both layouts' replays: still the same tensors
        step({"latents": torch.randn(size, 4, 6, 6), "cond": torch.randn(size, 4)}, state=state)
    assert all(p.grad is g for p, g in zip((net.conv.weight, net.conv.bias, net.mix.weight, net.mix.bias), grads))


@pytest.mark.parametrize("k", [1, 2])
def test_gradients_replaced_behind_the_steps_back_are_refused_until_reset(replaying_cuda_graphs, k):
    _, net, opt, _, step = _run(k, captured=True)
    batch = {"latents": torch.randn(4, 4, 6, 6), "cond": torch.randn(4, 4)}
    opt.zero_grad(set_to_none=True)  # the graphs would keep adding into the old tensors
    with pytest.raises(step_capture.CaptureError, match="reset()"):
        step(batch, state=TrainState())
    step.reset()  # every graph goes, the update's too (it steps from the old gradients)
    assert not step.captured and step._grads is None
    state = TrainState()
    for _ in range(4):  # 2 warm-ups, capture, replay (k = 2: both updates eager warm-ups again)
        step(batch, state=state)
    assert step.graph_count == 1 and net.conv.weight.grad is step._grads[0][1] and step._update.graph is None


def test_the_update_graph_waits_for_the_gradients_a_micro_batch_graph_owns(replaying_cuda_graphs):
    """Updates warm up before any layout has its graph (every micro-batch a new layout): the update
    graph is captured only once the gradients are owned, or it would record gradients an eager step
    made (freed and replaced by the next one; the fake would not notice, a GPU would)."""
    torch.manual_seed(0)
    net = _Net()
    params = list(net.parameters())
    opt = AdamW(params, lr=torch.tensor(1e-2), capturable=True)
    config = StepConfig(accumulation_steps=2)
    step = step_capture.CapturedStep(net, params=params, optimizer=opt, config=config, alphas_cumprod=_ALPHAS,
                                     warmup_steps=1)
    eager_net = _Net()
    eager_net.load_state_dict(net.state_dict())
    eager_opt = AdamW(list(eager_net.parameters()), lr=torch.tensor(1e-2), capturable=True)
    state, eager_state = TrainState(seed=2), TrainState(seed=2)
    data = torch.Generator().manual_seed(4)
    seen = []
    for size in (1, 2, 3, 4, 1, 5, 1, 2):  # size 1 captured at micro-batch 5 (its 2nd call, 1 warm-up)
        batch = {"latents": torch.randn(size, 4, 6, 6, generator=data), "cond": torch.randn(size, 4, generator=data)}
        got = step(batch, state=state)
        want = train_step(eager_net, batch, params=list(eager_net.parameters()), optimizer=eager_opt, state=eager_state,
                          config=config, alphas_cumprod=_ALPHAS)
        assert torch.equal(got["loss"], want["loss"])
        seen.append((step._grads is not None, step._update.graph is not None))
    assert seen == [(False, False)] * 4 + [(True, False), (True, True), (True, True), (True, True)]
    assert step._update.graph.replays == 2  # updates 3 and 4 (update 2 was eager: no gradients owned yet)
    for want, got in zip(eager_net.parameters(), net.parameters()):
        assert torch.equal(want, got)


class _Gated(_Net):
    """Trains ``extra`` only at batch size 2: two layouts that reach different parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Parameter(torch.ones(4))

    def forward(self, x, t, cond):
        out = super().forward(x, t, cond)
        return out * self.extra.view(1, 4, 1, 1) if x.shape[0] == 2 else out


@pytest.mark.parametrize(("first", "then", "message"), [(4, 2, "did not reach"), (2, 4, "an earlier capture's step trains")])
def test_a_layout_training_other_parameters_than_an_earlier_capture_is_refused(fake_cuda_graphs, first, then, message):
    """Either way round: a gradient the first graph does not own would be the second graph's own,
    and one the second graph does not reach is still added into (and stepped from) by the first —
    dropping it would leave the first graph writing freed memory."""
    net = _Gated()
    params = list(net.parameters())
    step = step_capture.CapturedStep(net, params=params, optimizer=AdamW(params, lr=torch.tensor(1e-2), capturable=True),
                                     config=StepConfig(), alphas_cumprod=_ALPHAS, warmup_steps=1)
    state = TrainState()
    batch = lambda size: {"latents": torch.randn(size, 4, 6, 6), "cond": torch.randn(size, 4)}
    for size in (first, first, then):  # warm-up, capture, warm-up
        step(batch(size), state=state)
    with pytest.raises(step_capture.CaptureError, match=message):
        step(batch(then), state=state)
    assert step.graph_count == 1


def test_the_walk_reaches_a_compiled_models_parameters_and_dropped_out_adapters(monkeypatch):
    """AOT autograd's one backward node still leads to each parameter's AccumulateGrad, and an
    adapter's module dropout under capture selects on the device (``torch.where``), so a dropped
    adapter is still reached: the capture keeps its gradient, as every replay may train it."""
    import sdadapt.adapters.base as adapter_base
    from sdadapt.adapters.lora import LoRAConfig
    from sdadapt.inject import inject

    net = _Net()
    x, t, cond = torch.randn(2, 4, 6, 6), torch.tensor([10, 900]), torch.randn(2, 4)
    reached = [net.conv.weight, net.conv.bias, net.mix.weight, net.mix.bias]
    compiled = torch.compile(net, backend="aot_eager")
    assert step_capture._reached(compiled(x, t, cond).square().mean()) == {id(p) for p in reached}

    base = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)).requires_grad_(False)
    inject(base, ["0", "2"], LoRAConfig(rank=2, module_dropout=0.99))
    adapters = [p for p in base.parameters() if p.requires_grad]
    monkeypatch.setattr(adapter_base, "graph_capturing", lambda: True)
    for _ in range(3):
        assert step_capture._reached(base(torch.randn(3, 4)).square().mean()) == {id(p) for p in adapters}


class _Reentrant(_Net):
    """``mix`` inside a reentrant checkpoint: its gradients come from a nested backward that the
    autograd graph of the loss does not show."""

    def forward(self, x, t, cond):
        h = self.conv(x) * (1 + t.float().view(-1, 1, 1, 1) / 1000)
        mixed = torch.utils.checkpoint.checkpoint(lambda h: self.mix(h.permute(0, 2, 3, 1)), h, use_reentrant=True)
        return mixed.permute(0, 3, 1, 2) + cond.view(-1, 4, 1, 1)


def test_a_gradient_made_by_a_nested_backward_is_refused_at_capture(fake_cuda_graphs):
    """The walk does not see ``mix``, so its gradients would be the graph's own (rewritten by every
    replay, never zeroed, added into by eager warm-ups): refused, naming the way out."""
    net = _Reentrant()
    params = list(net.parameters())
    step = step_capture.CapturedStep(net, params=params, optimizer=AdamW(params, lr=torch.tensor(1e-2), capturable=True),
                                     config=StepConfig(), alphas_cumprod=_ALPHAS, warmup_steps=1)
    batch = {"latents": torch.randn(2, 4, 6, 6), "cond": torch.randn(2, 4)}
    before = net.mix.weight.detach().clone()
    step(batch, state=TrainState())  # the eager warm-up trains mix as train_step would
    assert net.mix.weight.grad is None and not torch.equal(net.mix.weight, before)
    with pytest.raises(step_capture.CaptureError, match="use_reentrant=False"):
        step(batch, state=TrainState())


def _fit_run(config: FitConfig, **kwargs):
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    images, captions = concept_data("cross", 4, seed=0)
    losses = fit(system, adaptation, images, captions, config=config, **kwargs)
    return losses, [p.detach().clone() for p in adaptation.params]


def test_a_captured_run_with_accumulation_resumes_mid_run_bit_for_bit(replaying_cuda_graphs, tmp_path):
    """Saved after step 3 of 6 (2 micro-batches each): the resumed run's new CapturedStep warms up,
    captures and owns its gradients again, and ends where the straight run ends."""
    config = FitConfig(steps=6, batch_size=2, learning_rate=3e-3, warmup_steps=1, schedule="cosine", cuda_graph=True,
                       step=StepConfig(accumulation_steps=2))
    straight = _fit_run(config, on_step=lambda info: info.save_state(tmp_path / "s") if info.step == 3 else None)
    resumed = _fit_run(config, resume=tmp_path / "s")
    assert resumed[0] == straight[0][3:]
    for a, b in zip(straight[1], resumed[1]):
        assert torch.equal(a, b)


def test_fit_with_accumulation_through_captured_steps_is_the_eager_run(replaying_cuda_graphs, monkeypatch):
    """12 micro-batches, 2 per step: 3 eager warm-ups, the micro-batch graph captured at the 4th, the
    update eager 3 times, then captured; the schedule changes the LR every step."""
    made: list[step_capture.CapturedStep] = []
    real_init = step_capture.CapturedStep.__init__
    monkeypatch.setattr(step_capture.CapturedStep, "__init__", lambda self, *a, **kw: (real_init(self, *a, **kw), made.append(self))[0])
    base = FitConfig(steps=6, batch_size=2, learning_rate=3e-3, warmup_steps=2, schedule="cosine",
                     step=StepConfig(min_snr_gamma=5.0, accumulation_steps=2))
    eager = _fit_run(base)
    captured = _fit_run(dataclasses.replace(base, cuda_graph=True))
    assert made[0].graph_count == 1 and made[0]._update.graph.replays == 3  # updates 4, 5, 6
    assert eager[0] == captured[0]
    for a, b in zip(eager[1], captured[1]):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("k", [1, 3])
def test_cuda_captured_accumulation_matches_eager_steps(k):
    """Real graphs: micro-batch replays add into the owned gradients, the update replay steps and
    zeroes them; bf16 autocast, two batch layouts inside cycles, an LR change without re-capture,
    a parameter never reached. Tolerance: bf16 backward may reduce atomically in either run."""
    def run(captured: bool):
        torch.manual_seed(0)
        net = _Net().cuda()
        params = list(net.parameters())
        opt = torch.optim.AdamW(params, lr=torch.tensor(2e-2, device="cuda"), weight_decay=0.1, capturable=True)
        config = StepConfig(accumulation_steps=k, mixed_precision="bf16", min_snr_gamma=5.0)
        alphas = _ALPHAS.cuda()
        step = step_capture.CapturedStep(net, params=params, optimizer=opt, config=config, alphas_cumprod=alphas,
                                         warmup_steps=2)
        state = TrainState(seed=3, device="cuda")
        data = torch.Generator().manual_seed(1)
        losses = []
        for i, size in enumerate(_SIZES * 2):
            if i == 6:
                step.set_lr(5e-3)
            batch = {"latents": torch.randn(size, 4, 6, 6, generator=data).cuda(),
                     "cond": torch.randn(size, 4, generator=data).cuda()}
            if captured:
                losses.append(step(batch, state=state)["loss"])
            else:
                losses.append(train_step(net, batch, params=params, optimizer=opt, state=state, config=config,
                                         alphas_cumprod=alphas)["loss"])
        if captured:
            assert step.graph_count == 2 and (step._update.graph is not None) == (k > 1)
        return [v.item() for v in losses], [p.detach().clone() for p in params]

    eager_losses, eager_params = run(False)
    graph_losses, graph_params = run(True)
    assert graph_losses == pytest.approx(eager_losses, rel=1e-3)
    for p, q in zip(eager_params, graph_params):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)
    assert torch.equal(graph_params[0], torch.ones(3, device="cuda"))  # (unreached: the module's own parameter, first)
