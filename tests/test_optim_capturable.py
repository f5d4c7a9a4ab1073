"""sdadapt's AdamW(capturable=True): bit-identical to the non-capturable step on CPU (every state
dtype, bf16 weights with stochastic rounding, foreach and per-parameter, a tensor lr changed between
steps), resumable across modes, graph-friendly state (tensors updated in place), accepted by
CapturedStep; on CUDA, captured CUDA-graph steps against eager ones."""

from __future__ import annotations

import copy

import pytest
import torch
from optimizer_states import assert_same_optimizer_state
from torch import nn

from sdadapt.training.optim import AdamW, set_lr
from sdadapt.training.step import (
    StepConfig,
    TrainState,
    load_training_state,
    save_training_state,
    train_step,
)
from sdadapt.training.step_capture import (
    CapturedStep,
    capture_problems,
    graph_generators,
)

SHAPES = [(20, 13), (300,), (7,), (3, 4, 3, 3)]
# learning rates a float32 lr tensor holds exactly, so both modes step with the same value
LR, LR_LATER = float(torch.tensor(1e-2)), float(torch.tensor(3e-3))
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _grads(steps: int, seed: int) -> list[list[torch.Tensor | None]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        grads: list[torch.Tensor | None] = [torch.randn(s, generator=g) * 10.0 ** float(torch.randint(-4, 1, (), generator=g))
                                            for s in SHAPES]
        if step % 2:
            grads[2] = None  # a parameter without gradient this step: its step count lags the others
        out.append(grads)
    return out


def _make(capturable: bool, state_dtype, param_dtype, foreach: bool, *, lr: float = LR, seed: int = 5):
    """Parameters (the same values for either mode) and an AdamW over two groups; the capturable
    one gets a tensor lr."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(0)
    params = [torch.randn(s).to(param_dtype).requires_grad_() for s in SHAPES]
    groups = [{"params": params[:3]}, {"params": params[3:], "weight_decay": 0.3}]
    opt = AdamW(groups, lr=torch.tensor(lr) if capturable else lr, state_dtype=state_dtype, block_size=64,
                generator=gen, foreach=foreach, capturable=capturable)
    return params, opt, gen


def _run(opt, params, grads, param_dtype, *, lr_change_at: int | None = None) -> None:
    for step, step_grads in enumerate(grads):
        for p, g in zip(params, step_grads):
            p.grad = None if g is None else g.to(param_dtype)
        if step == lr_change_at:
            set_lr(opt, LR_LATER)
        opt.step()


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, "int8"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_capturable_is_bit_identical_to_the_python_scalar_step(state_dtype, param_dtype, foreach, monkeypatch):
    """Weights, every state tensor and the stochastic-rounding stream agree bit for bit over 8 steps,
    with two groups (one with weight decay), a parameter missing its gradient on odd steps (its step
    count lags), a tensor lr changed in place after step 3, int8 blocks that are not whole, and
    foreach chunks of a few parameters."""
    from sdadapt.training import optim

    monkeypatch.setattr(optim, "_FOREACH_CHUNK_ELEMENTS", 300)
    grads = _grads(8, seed=3)
    runs = []
    for capturable in (False, True):
        params, opt, gen = _make(capturable, state_dtype, param_dtype, foreach)
        lr_tensor = opt.param_groups[0]["lr"]
        _run(opt, params, grads, param_dtype, lr_change_at=3)
        if capturable:  # the same lr tensor, filled in place (a graph reads it)
            assert opt.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == LR_LATER
            assert all(opt.state[p]["step"].dtype == torch.float32 for p in params)
        runs.append((params, opt, gen.get_state()))
    (pa, oa, ga), (pb, ob, gb) = runs
    assert_same_optimizer_state(pa, oa, pb, ob, step_as_number=True)  # step: an int or a 0-dim tensor
    assert torch.equal(ga, gb)  # the same stochastic-rounding draws


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("state_dtype", [torch.bfloat16, "int8"])
def test_capturable_updates_its_state_tensors_in_place(state_dtype, foreach):
    """What a CUDA graph needs: after the first step (which creates the state) every state tensor
    and the lr tensor stay the same storage, only their contents change."""
    params, opt, _ = _make(True, state_dtype, torch.bfloat16, foreach)
    grads = _grads(4, seed=1)
    for step_grads in grads:
        step_grads[2] = torch.randn(SHAPES[2])  # every parameter has a gradient every step
    _run(opt, params, grads[:1], torch.bfloat16)
    before = {(i, k): (v.data_ptr(), v.clone()) for i, p in enumerate(params) for k, v in opt.state[p].items()}
    weights = [p.data_ptr() for p in params]
    _run(opt, params, grads[1:], torch.bfloat16)
    for (i, key), (ptr, old) in before.items():
        now = opt.state[params[i]][key]
        assert now.data_ptr() == ptr, key
        if key in ("step", "exp_avg", "exp_avg_sq", "exp_avg_codes", "exp_avg_sq_codes"):
            assert not torch.equal(now, old), key
    assert [p.data_ptr() for p in params] == weights
    assert float(opt.state[params[0]]["step"]) == 4.0


@pytest.mark.parametrize("state_dtype", [torch.float32, "int8"])
@pytest.mark.parametrize("saved_capturable", [False, True])
def test_state_resumes_across_modes(state_dtype, saved_capturable):
    """5 steps in one mode, state_dict, 5 more steps in the other mode == 10 uninterrupted steps
    (bf16 weights, stochastic rounding); the loading optimiser keeps its own mode and lr tensor."""
    grads = _grads(10, seed=4)
    params, opt, gen = _make(saved_capturable, state_dtype, torch.bfloat16, True)
    _run(opt, params, grads[:5], torch.bfloat16)
    saved = copy.deepcopy(opt.state_dict())
    saved_params = [p.detach().clone() for p in params]
    saved_rng = gen.get_state()
    _run(opt, params, grads[5:], torch.bfloat16)

    resumed, opt2, gen2 = _make(not saved_capturable, state_dtype, torch.bfloat16, True, lr=0.5)
    lr_before = opt2.param_groups[0]["lr"]
    with torch.no_grad():
        for q, p in zip(resumed, saved_params):
            q.copy_(p)
    gen2.set_state(saved_rng)
    opt2.load_state_dict(saved)
    for group in opt2.param_groups:
        assert group["capturable"] is (not saved_capturable)
        assert group["lr"] == LR if saved_capturable else (group["lr"] is lr_before and float(lr_before) == LR)
    step = opt2.state[resumed[0]]["step"]
    assert (type(step) is int) if saved_capturable else (isinstance(step, torch.Tensor) and step.dtype == torch.float32)
    _run(opt2, resumed, grads[5:], torch.bfloat16)
    assert_same_optimizer_state(params, opt, resumed, opt2, step_as_number=True)  # step: an int or a 0-dim tensor


def test_training_state_files_resume_a_capturable_run_in_the_other_mode(tmp_path):
    """save_training_state of a capturable run (step tensors in safetensors, lr tensor as a JSON
    float) loads into a non-capturable optimiser and back."""
    grads = _grads(6, seed=2)
    params, opt, _ = _make(True, "int8", torch.float32, True)
    _run(opt, params, grads[:3], torch.float32)
    named = {f"p{i}": p for i, p in enumerate(params)}
    save_training_state(tmp_path / "a", named_params=named, optimizer=opt, state=TrainState())
    _run(opt, params, grads[3:], torch.float32)

    plain_params, plain, _ = _make(False, "int8", torch.float32, True)
    load_training_state(tmp_path / "a", named_params={f"p{i}": p for i, p in enumerate(plain_params)},
                        optimizer=plain, state=TrainState())
    assert type(plain.state[plain_params[0]]["step"]) is int
    save_training_state(tmp_path / "b", named_params={f"p{i}": p for i, p in enumerate(plain_params)},
                        optimizer=plain, state=TrainState())
    back_params, back, _ = _make(True, "int8", torch.float32, True)
    load_training_state(tmp_path / "b", named_params={f"p{i}": p for i, p in enumerate(back_params)},
                        optimizer=back, state=TrainState())
    _run(back, back_params, grads[3:], torch.float32)
    assert_same_optimizer_state(params, opt, back_params, back, step_as_number=True)  # step: an int or a 0-dim tensor


def test_tensor_lr_needs_capturable_and_the_parameters_device():
    p = [torch.zeros(3, requires_grad=True)]
    with pytest.raises(ValueError, match="capturable=True"):
        AdamW(p, lr=torch.tensor(1e-3))
    with pytest.raises(ValueError, match="one value"):
        AdamW(p, lr=torch.tensor([1e-3, 1e-3]), capturable=True)
    on_meta = [torch.zeros(3, device="meta", requires_grad=True)]
    opt = AdamW(on_meta, lr=torch.tensor(1e-3), capturable=True)
    on_meta[0].grad = torch.ones(3, device="meta")
    with pytest.raises(ValueError, match="lr tensor is on cpu but the parameters are on meta"):
        opt.step()


def test_capture_problems_accepts_the_capturable_sdadapt_adamw():
    params = [nn.Parameter(torch.zeros(4))]
    config = StepConfig()
    assert not any("capturable" in p for p in capture_problems(params, AdamW(params, capturable=True), config))
    assert any("not capturable" in p for p in capture_problems(params, AdamW(params), config))
    assert graph_generators(AdamW(params, generator=torch.Generator())) == []  # a CPU generator: nothing to register


def test_captured_step_with_capturable_adamw_runs_eagerly_on_cpu_like_train_step():
    """On CPU CapturedStep falls back to the eager step: identical to train_step with the same optimiser."""
    runs = []
    for captured in (False, True):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.SiLU(), nn.Conv2d(8, 4, 3, padding=1)).to(torch.bfloat16)
        params = list(net.parameters())
        opt = AdamW(params, lr=torch.tensor(1e-3), state_dtype="int8", foreach=True, capturable=True,
                    generator=torch.Generator().manual_seed(1))

        def model(x, t, c, net=net):
            return net(x)

        ac = torch.linspace(0.999, 0.01, 1000)
        state, config = TrainState(seed=3), StepConfig(mixed_precision="bf16")
        latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)).bfloat16()
        step = CapturedStep(model, params=params, optimizer=opt, config=config, alphas_cumprod=ac, strict=False)
        for i in range(3):
            if i == 2:
                step.set_lr(5e-4)
            batch = {"latents": latents, "cond": None}
            if captured:
                step(batch, state=state)
            else:
                train_step(model, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac)
        runs.append(params)
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def test_captured_step_set_lr_is_optim_set_lr_and_refuses_a_baked_lr_without_changing_any_group(monkeypatch):
    """Before a capture CapturedStep.set_lr sets every group as optim.set_lr does (tensor lrs filled
    in place, float ones replaced); once a graph holds a float lr as a constant it raises and leaves
    every group as it was (a half-applied schedule step would leave the groups disagreeing)."""
    from sdadapt.training.step_capture import CaptureError

    params = [nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))]
    lr_tensor = torch.tensor(1e-3)
    opt = AdamW([{"params": params[:1], "lr": lr_tensor}, {"params": params[1:], "lr": 2e-3}], capturable=True)
    step = CapturedStep(lambda x, t, c: x, params=params, optimizer=opt, config=StepConfig(),
                        alphas_cumprod=torch.linspace(0.999, 0.01, 10), strict=False)
    step.set_lr(LR)
    assert opt.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == LR and opt.param_groups[1]["lr"] == LR
    monkeypatch.setattr(CapturedStep, "captured", property(lambda self: True))
    with pytest.raises(CaptureError, match="constant"):
        step.set_lr(LR_LATER)
    assert float(lr_tensor) == LR and opt.param_groups[1]["lr"] == LR


@pytest.mark.parametrize("warmup_steps", [0, -1, 1.5])
def test_captured_step_needs_a_warmup_step_before_capturing(warmup_steps):
    """The optimiser state must exist before a capture: created inside it, a replay would zero it again."""
    params = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="warmup_steps >= 1"):
        CapturedStep(lambda x, t, c: x, params=params, optimizer=AdamW(params, capturable=True), config=StepConfig(),
                     alphas_cumprod=torch.linspace(0.999, 0.01, 10), warmup_steps=warmup_steps, strict=False)


# ------------------------------------------------------------------------------------- CUDA
def _cuda_full_finetune(state_dtype, captured: bool, *, steps: int = 8):
    """A small bf16 conv net fully fine-tuned with capturable sdadapt AdamW (stochastic rounding from
    its own CUDA generator), batch 4, LR changed after step 4; returns losses and weights."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, 32, 3, padding=1), nn.SiLU(),
                        nn.Conv2d(32, 4, 3, padding=1)).cuda().to(torch.bfloat16)
    params = list(net.parameters())
    gen = torch.Generator(device="cuda").manual_seed(7)
    opt = AdamW(params, lr=torch.tensor(1e-3, device="cuda"), state_dtype=state_dtype, foreach=True,
                capturable=True, generator=gen)

    def model(x, t, c, net=net):
        return net(x)

    ac = torch.linspace(0.999, 0.01, 1000, device="cuda")
    state, config = TrainState(seed=3, device="cuda"), StepConfig(mixed_precision="bf16", max_grad_norm=1.0)
    latents = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2)).cuda().bfloat16()
    step = CapturedStep(model, params=params, optimizer=opt, config=config, alphas_cumprod=ac, warmup_steps=2)
    losses = []
    for i in range(steps):
        if i == 4:
            step.set_lr(2e-4)
        batch = {"latents": latents, "cond": None}
        if captured:
            losses.append(step(batch, state=state)["loss"])
        else:
            losses.append(train_step(model, batch, params=params, optimizer=opt, state=state, config=config,
                                     alphas_cumprod=ac)["loss"])
    if captured:
        assert step.graph_count == 1  # the LR change did not re-capture
    return [v.item() for v in losses], [p.detach().clone() for p in params], gen.get_state()


@CUDA
@pytest.mark.parametrize("state_dtype", ["int8", torch.bfloat16])
def test_cuda_captured_full_finetune_with_sdadapt_adamw_matches_eager(state_dtype):
    """CapturedStep with sdadapt's capturable AdamW (int8 or bf16 states, bf16 weights + stochastic
    rounding from a registered generator) equals the eager steps: same kernels, same noise, the
    graph's generator offsets advanced as the eager draws advance them. Tolerance: the bf16
    backward may use non-deterministic (atomic) reductions in either run; stochastic rounding turns
    a last-bit gradient difference into at most one bf16 ulp of a weight."""
    eager_losses, eager_params, eager_gen = _cuda_full_finetune(state_dtype, captured=False)
    graph_losses, graph_params, graph_gen = _cuda_full_finetune(state_dtype, captured=True)
    assert graph_losses == pytest.approx(eager_losses, rel=2e-2)
    for p, q in zip(eager_params, graph_params):
        torch.testing.assert_close(p.float(), q.float(), rtol=1.6e-2, atol=1e-3)
    assert torch.equal(eager_gen, graph_gen)  # the replays advanced the generator as far as eager steps do


@CUDA
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, "int8"])
def test_cuda_capturable_adamw_has_no_host_sync_and_matches_the_python_scalar_step(state_dtype):
    """On CUDA the capturable step never makes the host wait (set_sync_debug_mode='error') and
    tracks the non-capturable step (which divides by host scalars through their reciprocals: last-bit
    differences, then stochastic rounding of bf16 weights may round them apart by one ulp)."""
    runs = []
    for capturable in (False, True):
        torch.manual_seed(0)
        params = [torch.randn(s, device="cuda").bfloat16().requires_grad_() for s in SHAPES]
        lr = torch.tensor(1e-2, device="cuda") if capturable else 1e-2
        opt = AdamW(params, lr=lr, state_dtype=state_dtype, foreach=True, capturable=capturable, block_size=64)
        grads = [[None if g is None else g.cuda().bfloat16() for g in step_grads] for step_grads in _grads(6, seed=3)]
        _run(opt, params, grads[:1], torch.bfloat16)  # creates the state (allocations)
        torch.cuda.synchronize()
        if capturable:
            torch.cuda.set_sync_debug_mode("error")
        try:
            _run(opt, params, grads[1:], torch.bfloat16)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        runs.append(params)
    for p, q in zip(*runs):
        torch.testing.assert_close(p.float(), q.float(), rtol=1.6e-2, atol=1e-3)
