"""The training step: learning, accumulation, weighting, resume and data-parallel equivalence."""

from __future__ import annotations

import gc
import os
import socket

import pytest
import torch
from torch import nn

import sdadapt
from sdadapt.targets import by_type
from sdadapt.training.host_syncs import HostSyncs
from sdadapt.training.step import EMA, StepConfig, TrainState, load_training_state, save_training_state, train_step


class ToyDenoiser(nn.Module):
    """A small conditional denoiser with LoRA-able Linear/Conv2d layers and dropout."""

    def __init__(self, channels: int = 4, width: int = 16, cond_dim: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Linear(1, width)
        self.cond = nn.Linear(cond_dim, width)
        self.mid = nn.Conv2d(width, width, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.conv_out = nn.Conv2d(width, channels, 3, padding=1)

    def forward(self, x, t, cond):
        h = self.conv_in(x)
        h = h + self.time(t.float()[:, None] / 1000)[:, :, None, None] + self.cond(cond)[:, :, None, None]
        h = self.drop(torch.nn.functional.silu(self.mid(torch.nn.functional.silu(h))))
        return self.conv_out(h)


def _data(n: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 8, generator=g)


def _alphas():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def _setup(seed: int = 0, rank: int = 4):
    torch.manual_seed(seed)
    model = ToyDenoiser()
    handle = sdadapt.inject(model, by_type(nn.Conv2d, nn.Linear), sdadapt.LoRAConfig(rank=rank, init="gaussian"))
    params = list(handle.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    return model, handle, params, optimizer


def test_lora_training_lowers_the_loss():
    model, handle, params, optimizer = _setup()
    latents, cond = _data()
    state, config, alphas = TrainState(seed=1), StepConfig(), _alphas()
    losses = []
    for _ in range(60):
        metrics = train_step(model, {"latents": latents, "cond": cond}, params=params, optimizer=optimizer,
                             state=state, config=config, alphas_cumprod=alphas)
        losses.append(float(metrics["loss"]))
    assert state.step == 60
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10
    # only adapter parameters changed; frozen base has no grads and no optimizer state
    assert all(p.grad is None for n, p in model.named_parameters() if ".sdadapt." not in n)


def test_step_matches_a_hand_written_reference_with_min_snr_and_loss_weights():
    model, handle, params, optimizer = _setup()
    model.drop.p = 0.0
    latents, cond = _data(4)
    alphas = _alphas()
    noise = torch.randn_like(latents)
    t = torch.tensor([5, 200, 600, 990])
    weights = torch.tensor([1.0, 0.5, 2.0, 1.0])
    before = [p.detach().clone() for p in params]
    batch = {"latents": latents, "cond": cond, "noise": noise, "timesteps": t, "loss_weight": weights}
    metrics = train_step(model, batch, params=params, optimizer=torch.optim.SGD(params, lr=0.0), state=TrainState(),
                         config=StepConfig(min_snr_gamma=5.0, max_grad_norm=None), alphas_cumprod=alphas)
    assert all(torch.equal(p, q) for p, q in zip(params, before))  # lr 0: nothing moved
    # reference in float64: x_t, epsilon target, min-SNR weight times the per-sample weight
    a = alphas.double()[t][:, None, None, None]
    x_t = (a.sqrt() * latents.double() + (1 - a).sqrt() * noise.double()).float()
    snr = (a / (1 - a)).flatten()
    w = torch.minimum(snr, torch.tensor(5.0, dtype=torch.float64)) / snr * weights.double()
    with torch.no_grad():
        pred = model(x_t, t, cond).double()
    ref = (((pred - noise.double()) ** 2).mean(dim=(1, 2, 3)) * w).mean()
    torch.testing.assert_close(metrics["loss"].double(), ref, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_equals_one_big_batch():
    latents, cond = _data(8)
    noise = torch.randn_like(latents)
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(3))
    alphas = _alphas()
    results = []
    for accumulation, chunks in ((1, 1), (4, 4)):
        model, handle, params, _ = _setup(seed=5)
        model.drop.p = 0.0
        optimizer = torch.optim.SGD(params, lr=0.1)
        config = StepConfig(accumulation_steps=accumulation, max_grad_norm=None)
        state = TrainState()
        for part in range(chunks):
            sl = slice(part * 8 // chunks, (part + 1) * 8 // chunks)
            train_step(model, {"latents": latents[sl], "cond": cond[sl], "noise": noise[sl], "timesteps": t[sl]},
                       params=params, optimizer=optimizer, state=state, config=config, alphas_cumprod=alphas)
        assert state.step == 1
        results.append([p.detach().clone() for p in params])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def _run(steps: int, *, folder=None, resume_at: int | None = None, ema: bool = True):
    model, handle, params, optimizer = _setup(seed=11)
    latents, cond = _data(4, seed=2)
    state = TrainState(seed=7, ema=EMA(params, decay=0.99) if ema else None)
    config = StepConfig(min_snr_gamma=5.0, noise_offset=0.05, accumulation_steps=2)
    losses = []
    start = 0
    if folder is not None and resume_at is None:
        meta = load_training_state(folder, named_params={f"p{i}": p for i, p in enumerate(params)},
                                   optimizer=optimizer, state=state)
        start = meta["micro_step"]
    for i in range(start, steps):
        metrics = train_step(model, {"latents": latents, "cond": cond}, params=params, optimizer=optimizer,
                             state=state, config=config, alphas_cumprod=_alphas())
        losses.append(metrics["loss"].item())
        if resume_at is not None and i + 1 == resume_at:
            save_training_state(folder, named_params={f"p{i}": p for i, p in enumerate(params)},
                                optimizer=optimizer, state=state, config=config)
            break
    return losses, [p.detach().clone() for p in params], state


def test_resume_gives_bit_identical_losses(tmp_path):
    straight, final, _ = _run(8)
    first, _, _ = _run(8, folder=tmp_path, resume_at=4)
    rest, resumed_final, state = _run(8, folder=tmp_path)
    assert first + rest == straight  # bit-identical, dropout RNG included
    for p, q in zip(final, resumed_final):
        assert torch.equal(p, q)
    assert state.step == 4 and state.ema.updates == 4


def test_interrupted_state_is_detected(tmp_path):
    _run(4, folder=tmp_path, resume_at=2)
    (tmp_path / "state.json").write_text((tmp_path / "state.json").read_text().replace('"step": 1', '"step": 7'))
    with pytest.raises(ValueError, match="disagree"):
        _run(4, folder=tmp_path)


def test_a_save_that_fails_half_way_keeps_the_previous_state(tmp_path, monkeypatch):
    import sdadapt.training.step as step_module

    _run(8, folder=tmp_path, resume_at=2)  # the previous state: step 1 (2 micro-batches, accumulation 2)
    before = {name: (tmp_path / name).read_bytes() for name in ("state.safetensors", "state.json")}

    real_atomic_write = step_module.atomic_write

    def state_json_fills_the_disk(path, write, **kwargs):  # state.json, written after state.safetensors
        def write_then_fail(tmp):
            write(tmp)
            raise OSError(28, "No space left on device")
        return real_atomic_write(path, write_then_fail, **kwargs)

    monkeypatch.setattr(step_module, "atomic_write", state_json_fills_the_disk)
    with pytest.raises(OSError, match="disk filled up"):
        _save_at(tmp_path, 4)
    monkeypatch.setattr(step_module, "atomic_write", real_atomic_write)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "state.safetensors"]  # no temporaries left
    rest, _, state = _run(8, folder=tmp_path)  # and it still resumes
    assert state.step == 4 and len(rest) == 6


def _save_at(folder, micro_steps):
    """Train ``micro_steps`` batches from scratch and save the state into ``folder``."""
    return _run(micro_steps + 4, folder=folder, resume_at=micro_steps)


def test_bf16_autocast_step_runs_and_learns():
    model, handle, params, optimizer = _setup()
    latents, cond = _data()
    state, config = TrainState(seed=1), StepConfig(mixed_precision="bf16")
    losses = [float(train_step(model, {"latents": latents, "cond": cond}, params=params, optimizer=optimizer,
                               state=state, config=config, alphas_cumprod=_alphas())["loss"]) for _ in range(40)]
    assert all(map(lambda v: v == v, losses))
    assert sum(losses[-8:]) < sum(losses[:8])


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model, handle, params, _ = _setup(seed=5)
    model.drop.p = 0.0
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    latents, cond = _data(8)
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(10))
    sl = slice(rank * 4, rank * 4 + 4)
    state = TrainState()
    for _ in range(3):
        train_step(ddp, {"latents": latents[sl], "cond": cond[sl], "noise": noise[sl], "timesteps": t[sl]},
                   params=params, optimizer=optimizer, state=state, config=StepConfig(), alphas_cumprod=_alphas())
    if rank == 0:
        torch.save([p.detach() for p in params], out)
    dist.barrier()  # no rank tears gloo down while another still uses it (aborts under load)
    del ddp, optimizer  # DDP's reducer holds the process group: free it before destroying the group
    gc.collect()
    dist.destroy_process_group()


def test_ddp_two_processes_equal_single_process_with_the_global_batch(tmp_path):
    from _fast_dist import fork_ranks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "ddp.pt")
    fork_ranks(_ddp_worker, args=(2, port, out), nprocs=2)  # (tests/_fast_dist.py: forked ranks, no re-import)
    ddp_params = torch.load(out, weights_only=True)

    model, handle, params, _ = _setup(seed=5)
    model.drop.p = 0.0
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    latents, cond = _data(8)
    noise = torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    t = torch.randint(0, 1000, (8,), generator=torch.Generator().manual_seed(10))
    state = TrainState()
    for _ in range(3):
        train_step(model, {"latents": latents, "cond": cond, "noise": noise, "timesteps": t}, params=params,
                   optimizer=optimizer, state=state, config=StepConfig(), alphas_cumprod=_alphas())
    for p, q in zip(params, ddp_params):
        torch.testing.assert_close(p.detach(), q, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------ step options / capture
def _losses_with(config, steps=6, seed=0, batch_extra=None):
    model, handle, params, optimizer = _setup(seed=seed)
    model.drop.p = 0.0
    latents, cond = _data(4)
    state = TrainState(seed=2)
    out = []
    for _ in range(steps):
        out.append(train_step(model, {"latents": latents, "cond": cond, **(batch_extra or {})}, params=params,
                              optimizer=optimizer, state=state, config=config, alphas_cumprod=_alphas())["loss"].item())
    return out, params


def test_channels_last_gives_the_same_training():
    a, pa = _losses_with(StepConfig())
    b, pb = _losses_with(StepConfig(channels_last=True))
    assert a == pytest.approx(b, rel=1e-5)
    # (channels_last runs other CPU conv kernels, whose rounding follows the CPU; AdamW at lr 1e-2 turns a rounding
    # difference in a near-zero gradient into up to an lr-sized step: 2.7e-6 seen on one parameter of an AVX-512
    # machine. 1e-5 is a thousandth of one step; a wrong layout moves whole tensors by ~lr.)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_p2_and_huber_schedule_weights_reach_the_loss():
    model, handle, params, _ = _setup()
    model.drop.p = 0.0
    latents, cond = _data(4)
    noise, t = torch.randn_like(latents), torch.tensor([5, 200, 600, 990])
    ac = _alphas()
    batch = {"latents": latents, "cond": cond, "noise": noise, "timesteps": t}
    opt = torch.optim.SGD(params, lr=0.0)
    cfg = StepConfig(p2_gamma=0.5, loss="huber", huber_c=0.2, huber_schedule="snr", max_grad_norm=None)
    loss = train_step(model, batch, params=params, optimizer=opt, state=TrainState(), config=cfg, alphas_cumprod=ac)["loss"]
    a = ac.double()[t]
    snr = a / (1 - a)
    sigma = ((1 - a) / a).sqrt()
    c = (0.8 / (1 + sigma) ** 2 + 0.2)[:, None, None, None]
    x_t = (a.sqrt()[:, None, None, None] * latents.double() + (1 - a).sqrt()[:, None, None, None] * noise.double()).float()
    with torch.no_grad():
        d = model(x_t, t, cond).double() - noise.double()
    per = (2 * c * (torch.sqrt(d * d + c * c) - c)).mean(dim=(1, 2, 3)) * (1 + snr) ** -0.5
    torch.testing.assert_close(loss.double(), per.mean(), rtol=1e-5, atol=1e-7)


def test_images_are_encoded_without_grad_when_latents_are_absent():
    model, handle, params, optimizer = _setup()
    model.drop.p = 0.0
    latents, cond = _data(4)
    enc = torch.nn.Conv2d(4, 4, 1)
    common = dict(params=params, optimizer=torch.optim.SGD(params, lr=0.0), config=StepConfig(), alphas_cumprod=_alphas())
    a = train_step(model, {"images": latents, "cond": cond}, state=TrainState(seed=4), encode_latents=enc, **common)["loss"]
    with torch.no_grad():
        pre = enc(latents)
    b = train_step(model, {"latents": pre, "cond": cond}, state=TrainState(seed=4), **common)["loss"]
    assert torch.equal(a, b) and enc.weight.grad is None
    with pytest.raises(TypeError, match="encode_latents"):
        train_step(model, {"images": latents, "cond": cond}, state=TrainState(), **common)


def test_fp16_loss_scaler_path_learns():
    losses, _ = _losses_with(StepConfig(mixed_precision="fp16"), steps=3)
    assert all(v == v for v in losses)


def test_captured_step_falls_back_to_eager_with_identical_results_on_cpu():
    from sdadapt.training.step_capture import CapturedStep, capture_problems

    a, pa = _losses_with(StepConfig(min_snr_gamma=5.0), steps=5)
    model, handle, params, optimizer = _setup(seed=0)
    model.drop.p = 0.0
    latents, cond = _data(4)
    state = TrainState(seed=2)
    step = CapturedStep(model, params=params, optimizer=optimizer, config=StepConfig(min_snr_gamma=5.0), alphas_cumprod=_alphas())
    assert any("CUDA" in p for p in step.problems) and any("capturable" in p for p in step.problems)
    b = [step({"latents": latents, "cond": cond}, state=state)["loss"].item() for _ in range(5)]
    assert a == b and state.step == 5
    for p, q in zip(pa, params):
        assert torch.equal(p, q)
    assert capture_problems(params, optimizer, StepConfig(accumulation_steps=2)) == step.problems  # (accumulation can be captured)


@pytest.mark.parametrize("config", [
    StepConfig(),
    StepConfig(min_snr_gamma=5.0, noise_offset=0.05, input_perturbation=0.1, loss="huber", huber_schedule="snr"),
    StepConfig(prediction_type="v_prediction", debiased_estimation=True, p2_gamma=1.0, mixed_precision="bf16",
               timestep_range=(100, 900), max_grad_norm=None),
], ids=["plain", "weighted-huber", "v-bf16"])
def test_train_step_reads_no_tensor_back_to_python(config):
    """What would be a host sync on a GPU (``.item()``, ``if tensor:``, ``float(tensor)``) never
    happens inside ``train_step`` or the captured step's eager path, nor a blocking host-to-device
    copy (tests/test_host_syncs.py has more configurations; the loss weights here are made before
    the recording, as a data loader would)."""
    from sdadapt.training.step_capture import CapturedStep

    model, handle, params, optimizer = _setup()
    latents, cond = _data(4)
    state = TrainState(seed=3)
    alphas = _alphas()
    step = CapturedStep(model, params=params, optimizer=optimizer, config=config, alphas_cumprod=alphas)
    weights = torch.rand(4)
    with HostSyncs() as recorder:
        for _ in range(2):
            train_step(model, {"latents": latents, "cond": cond, "loss_weight": weights}, params=params,
                       optimizer=optimizer, state=state, config=config, alphas_cumprod=alphas)
            step({"latents": latents, "cond": cond}, state=state)
    assert recorder.events == [], recorder.report()


def test_captured_step_set_lr_reaches_the_optimizer():
    from sdadapt.training.step_capture import CapturedStep

    model, handle, params, _ = _setup()
    tensor_lr = torch.optim.AdamW(params, lr=torch.tensor(1e-2))
    step = CapturedStep(model, params=params, optimizer=tensor_lr, config=StepConfig(), alphas_cumprod=_alphas())
    lr_tensor = tensor_lr.param_groups[0]["lr"]
    step.set_lr(3e-3)
    assert tensor_lr.param_groups[0]["lr"] is lr_tensor and lr_tensor.item() == pytest.approx(3e-3)
    float_lr = torch.optim.AdamW(params, lr=1e-2)
    CapturedStep(model, params=params, optimizer=float_lr, config=StepConfig(), alphas_cumprod=_alphas()).set_lr(5e-4)
    assert float_lr.param_groups[0]["lr"] == 5e-4


def test_captured_step_keeps_one_graph_per_batch_layout(fake_cuda_graphs):
    """The capture bookkeeping without a GPU (torch.cuda's graph API replaced by stand-ins): warm-up
    per layout, one capture per layout (batch size, dict conditioning included), static buffers
    refreshed before each replay, the float-LR guard."""
    from sdadapt.training import step_capture

    model, handle, params, optimizer = _setup()
    net = model
    latents, cond = _data(4)
    step = step_capture.CapturedStep(lambda x, t, c: net(x, t, c["text"]), params=params, optimizer=optimizer,
                                     config=StepConfig(), alphas_cumprod=_alphas(), warmup_steps=2)
    state = TrainState(seed=0)
    sizes = [4, 4, 4, 4, 2, 2, 2, 4]
    for i, size in enumerate(sizes):
        text = cond[:size] * (2 if i == len(sizes) - 1 else 1)  # the last batch differs from the capture's
        out = step({"latents": latents[:size], "cond": {"text": text}}, state=state)
        assert set(out) == {"loss", "grad_norm", "stepped"}
        if i == 2:
            with pytest.raises(step_capture.CaptureError, match="lr=torch.tensor"):
                step.set_lr(1e-3)  # a float lr is baked into a captured graph
    assert step.graph_count == 2 and state.step == len(sizes)
    graphs = {key[1][0][1]: entry for key, entry in step._graphs.items()}  # by x_t's shape
    by_batch = {shape[0]: entry for shape, entry in graphs.items()}
    assert by_batch[4].calls == 5 and by_batch[4].graph.replays == 3  # 2 warm-up, capture + replay, 2 replays
    assert by_batch[2].calls == 3 and by_batch[2].graph.replays == 1
    # the last call (batch 4) copied its batch into the batch-4 graph's static inputs
    static = torch.utils._pytree.tree_unflatten(by_batch[4].static_leaves, by_batch[4].spec)
    assert torch.equal(static["cond"]["text"], cond[:4] * 2) and static["x_t"].shape == (4, 4, 8, 8)


def test_captured_step_works_where_a_treespec_has_no_hash(fake_cuda_graphs, monkeypatch):
    """torch < 2.7's pytree ``TreeSpec`` is unhashable, and every captured step failed there ("unhashable type"):
    the graphs are keyed without hashing the batch's spec."""
    import types

    from sdadapt.training import step_capture

    real = torch.utils._pytree

    class Spec:  # (a TreeSpec as torch < 2.7 has it: equal by value, no hash)
        def __init__(self, spec):
            self.spec = spec

        def __eq__(self, other):
            return isinstance(other, Spec) and self.spec == other.spec

        def __str__(self):
            return str(self.spec)

    def flatten(tree):
        leaves, spec = real.tree_flatten(tree)
        return leaves, Spec(spec)

    def unflatten(leaves, spec):
        return real.tree_unflatten(leaves, spec.spec if isinstance(spec, Spec) else spec)

    monkeypatch.setattr(step_capture, "pytree", types.SimpleNamespace(**{**vars(real), "tree_flatten": flatten,
                                                                         "tree_unflatten": unflatten}))
    with pytest.raises(TypeError, match="unhashable"):
        hash(step_capture.pytree.tree_flatten({"a": torch.zeros(1)})[1])
    model, _, params, optimizer = _setup()
    latents, cond = _data(4)
    step = step_capture.CapturedStep(lambda x, t, c: model(x, t, c["text"]), params=params, optimizer=optimizer,
                                     config=StepConfig(), alphas_cumprod=_alphas(), warmup_steps=1)
    state = TrainState(seed=0)
    for size in (4, 4, 2, 2, 4):
        step({"latents": latents[:size], "cond": {"text": cond[:size]}}, state=state)
    assert step.graph_count == 2 and state.step == 5


def _cuda_run(mode: str, captured: bool):
    """10 steps over batch sizes 4,4,4,4,2,2,2,2,4,4 with an LR change after step 5; returns losses, params."""
    from sdadapt.training.step_capture import CapturedStep

    torch.manual_seed(0)
    net = ToyDenoiser().cuda()
    net.drop.p = 0.0
    if mode == "lora":
        handle = sdadapt.inject(net, by_type(nn.Conv2d, nn.Linear), sdadapt.LoRAConfig(rank=4, init="gaussian"))
        params, model = list(handle.parameters()), net
    elif mode == "full":
        params, model = list(net.parameters()), net
    else:  # textual-inversion-like: one trainable vector inside the conditioning, frozen network
        net.requires_grad_(False)
        vector = nn.Parameter(torch.zeros(8, device="cuda"))
        params = [vector]

        def model(x, t, c):
            return net(x, t, c + vector)
    opt = torch.optim.AdamW(params, lr=torch.tensor(1e-2, device="cuda"), capturable=True)
    latents, cond = (x.cuda() for x in _data(4))
    state = TrainState(seed=2, device="cuda")
    config = StepConfig(mixed_precision="bf16", min_snr_gamma=5.0)
    ac = _alphas().cuda()
    step = CapturedStep(model, params=params, optimizer=opt, config=config, alphas_cumprod=ac, warmup_steps=2)
    losses = []
    for i, size in enumerate([4, 4, 4, 4, 2, 2, 2, 2, 4, 4]):
        if i == 5:
            step.set_lr(2e-3)
        batch = {"latents": latents[:size], "cond": cond[:size]}
        if captured:
            losses.append(step(batch, state=state)["loss"])
        else:
            losses.append(train_step(model, batch, params=params, optimizer=opt, state=state, config=config,
                                     alphas_cumprod=ac)["loss"])
    if captured:
        assert step.graph_count == 2  # one graph per batch size, reused when batch 4 comes back
    return [v.item() for v in losses], [p.detach().clone() for p in params]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["lora", "full", "ti"])
def test_cuda_graph_step_matches_eager_steps(mode):
    """Captured replays equal eager steps (same kernels, same noise): bf16 autocast, any batch size,
    LR changed without re-capture, LoRA / full fine-tune / an embedding-like vector. Tolerance: the
    bf16 backward may use non-deterministic (atomic) reductions in either run."""
    eager_losses, eager_params = _cuda_run(mode, captured=False)
    graph_losses, graph_params = _cuda_run(mode, captured=True)
    assert graph_losses == pytest.approx(eager_losses, rel=1e-3)
    for p, q in zip(eager_params, graph_params):
        torch.testing.assert_close(p, q, rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_has_no_host_sync():
    """After warm-up neither train_step nor a graph replay makes the host wait for the GPU. (Two
    copies of the LoRA: train_step's ``zero_grad(set_to_none=True)`` would drop the gradients the
    captured step owns, which it refuses.)"""
    from sdadapt.training.step_capture import CapturedStep

    def lora():
        torch.manual_seed(0)
        net = ToyDenoiser().cuda()
        return net, list(sdadapt.inject(net, by_type(nn.Conv2d, nn.Linear),
                                        sdadapt.LoRAConfig(rank=4, init="gaussian")).parameters())

    (model, params), (graphed, graphed_params) = lora(), lora()
    latents, cond = (x.cuda() for x in _data(4))
    ac = _alphas().cuda()
    state = TrainState(seed=2, device="cuda")
    config = StepConfig(mixed_precision="bf16", min_snr_gamma=5.0, noise_offset=0.05)
    batch = {"latents": latents, "cond": cond}
    fused = torch.optim.AdamW(params, lr=1e-3, fused=True)
    capturable = torch.optim.AdamW(graphed_params, lr=torch.tensor(1e-3, device="cuda"), capturable=True)
    step = CapturedStep(graphed, params=graphed_params, optimizer=capturable, config=config, alphas_cumprod=ac,
                        warmup_steps=1)
    for _ in range(2):  # warm-up: optimiser state, the graph's capture
        train_step(model, batch, params=params, optimizer=fused, state=state, config=config, alphas_cumprod=ac)
        step(batch, state=state)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            train_step(model, batch, params=params, optimizer=fused, state=state, config=config, alphas_cumprod=ac)
            step(batch, state=state)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert step.captured


def test_fused_backward_optimizer_equals_the_plain_step():
    from sdadapt.training.optim import AdamW, fuse_optimizer_into_backward

    cfg = StepConfig(max_grad_norm=None)
    runs = []
    for fused in (False, True):
        model, handle, params, _ = _setup(seed=3)
        model.drop.p = 0.0
        opt = fuse_optimizer_into_backward(params, lambda ps: AdamW(ps, lr=1e-2)) if fused else AdamW(params, lr=1e-2)
        latents, cond = _data(4)
        state = TrainState(seed=1)
        losses = [train_step(model, {"latents": latents, "cond": cond}, params=params, optimizer=opt, state=state,
                             config=cfg, alphas_cumprod=_alphas())["loss"].item() for _ in range(4)]
        runs.append((losses, [p.detach().clone() for p in params]))
        assert all(p.grad is None for p in params)
    assert runs[0][0] == pytest.approx(runs[1][0], rel=1e-6)
    for p, q in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="max_grad_norm=None"):
        train_step(model, {"latents": latents, "cond": cond}, params=params, optimizer=opt, state=state,
                   config=StepConfig(), alphas_cumprod=_alphas())


def test_a_prior_batch_is_a_second_forward_drawn_after_the_batch_and_weighted():
    """``prepare_batch(..., prior=(class_batch, w))`` prepares the class batch after the batch (its
    noise the generator's next draws) and ``step_loss`` adds ``w`` × its loss (then extra_loss):
    the same as preparing and weighting the two by hand."""
    from sdadapt.training.step import prepare_batch, step_loss

    model, _, _, _ = _setup()
    model.drop.p = 0.0
    latents, cond = _data(4)
    config = StepConfig(min_snr_gamma=5.0)

    def extra(prepared, prediction):
        return prediction.square().mean() * 0.01

    state = TrainState(seed=5)
    prepared = prepare_batch({"latents": latents[:2], "cond": cond[:2]}, state=state, config=config,
                             alphas_cumprod=_alphas(), prior=({"latents": latents[2:], "cond": cond[2:]}, 0.3))
    got = step_loss(model, prepared, config, extra)
    by_hand_state = TrainState(seed=5)
    main = prepare_batch({"latents": latents[:2], "cond": cond[:2]}, state=by_hand_state, config=config, alphas_cumprod=_alphas())
    second = prepare_batch({"latents": latents[2:], "cond": cond[2:]}, state=by_hand_state, config=config, alphas_cumprod=_alphas())
    prediction = model(main["x_t"], main["t"], main["cond"]).float()
    want = step_loss(model, main, config) + (0.3 * step_loss(model, second, config) + extra(main, prediction))
    assert torch.equal(got, want)
    assert torch.equal(prepared["prior"]["x_t"], second["x_t"]) and prepared["prior_weight"] == 0.3


def test_a_generator_on_another_device_than_the_latents_is_refused_with_the_fix():
    """A ``TrainState`` made on the CPU for latents elsewhere: a ValueError that names both devices
    and the constructor call, not torch's bare "Expected a 'cuda' device type for generator"."""
    from sdadapt.training.step import prepare_batch

    batch = {"latents": torch.zeros(2, 4, 8, 8, device="meta"), "cond": torch.zeros(2, 5, 16, device="meta")}
    with pytest.raises(ValueError, match=r"generator is on cpu but the latents are on meta.*device='meta'"):
        prepare_batch(batch, state=TrainState(seed=0), config=StepConfig(), alphas_cumprod=_alphas())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_capture_of_a_models_own_checkpointing():
    """A model that checkpoints through its own code with torch's default ``preserve_rng_state=True`` (as
    diffusers' ``enable_gradient_checkpointing()`` does) reads the CUDA generator's seed at every forward,
    which a capture refuses: ``CapturedStep`` raises a ``CaptureError`` naming sdadapt's checkpointing and
    ``preserve_rng_state=False``. With ``preserve_rng_state=False`` the same model is captured and its
    losses are the eager steps'. (Last in this file: a failed capture is recoverable — a host-side check, no
    CUDA error — but the other CUDA tests run first anyway.)"""
    from sdadapt.training.step_capture import CaptureError, CapturedStep

    def run(*, preserve: bool, captured: bool) -> list[float]:
        torch.manual_seed(0)
        net = ToyDenoiser().cuda()
        net.drop.p = 0.0
        params = list(sdadapt.inject(net, by_type(nn.Conv2d, nn.Linear),
                                     sdadapt.LoRAConfig(rank=4, init="gaussian")).parameters())

        def model(x, t, c):
            return torch.utils.checkpoint.checkpoint(net, x, t, c, use_reentrant=False, preserve_rng_state=preserve)

        opt = torch.optim.AdamW(params, lr=torch.tensor(1e-2, device="cuda"), capturable=True)
        latents, cond = (x.cuda() for x in _data(4))
        state, config, ac = TrainState(seed=2, device="cuda"), StepConfig(mixed_precision="bf16"), _alphas().cuda()
        step = CapturedStep(model, params=params, optimizer=opt, config=config, alphas_cumprod=ac, warmup_steps=1)
        batch = {"latents": latents, "cond": cond}
        return [float((step(batch, state=state) if captured else train_step(
            model, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac))["loss"])
            for _ in range(4)]

    with pytest.raises(CaptureError, match="enable_checkpointing.*preserve_rng_state=False"):
        run(preserve=True, captured=True)
    assert run(preserve=False, captured=True) == pytest.approx(run(preserve=False, captured=False), rel=1e-3)
