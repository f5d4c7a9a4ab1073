"""The SDPA backend choice: recording a model's attention calls, timing backends, running the step under a priority list."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import run_unet, tiny_unet_sd1, unet_inputs

from sdadapt.training.attention import (
    SDPA_BACKENDS,
    AttentionCall,
    fastest_sdpa_backends,
    fastest_sdpa_backends_per_call,
    record_attention_calls,
    sdpa_backends,
    time_sdpa_backends,
)
from sdadapt.training.step import StepConfig, TrainState, train_step


def _attention_float64(q, k, v, mask=None, causal=False):
    """Naive softmax(q kᵀ/√E + mask) v in float64."""
    q, k, v = q.double(), k.double(), v.double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(lq, lk, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        scores = scores + mask.double()
    return scores.softmax(-1) @ v


def test_recorder_sees_every_call_of_a_diffusers_unet_with_its_shapes():
    unet = tiny_unet_sd1()
    inputs = unet_inputs(unet, batch=2)
    calls = record_attention_calls(lambda: run_unet(unet, inputs))
    # tiny SD1 UNet: CrossAttnDownBlock2D + CrossAttnUpBlock2D (2 + 3 transformer blocks) + mid block (1): 6 × (attn1, attn2)
    assert sum(c.count for c in calls) == 12
    heads = {c.query[1] for c in calls}
    assert heads == {8}  # diffusers reads SD1's attention_head_dim=8 as the number of heads
    self_attn = [c for c in calls if c.query[2] == c.key[2]]
    cross = [c for c in calls if c.key[2] == inputs[0][2].shape[1]]
    assert sum(c.count for c in self_attn) == sum(c.count for c in cross) == 6
    assert all(c.dtype == torch.float32 and not c.requires_grad and c.mask is None for c in calls)
    assert calls == sorted(calls, key=lambda c: -c.count)


def test_recorder_reports_dtype_under_autocast_and_grad_need():
    q = torch.randn(2, 3, 5, 8, requires_grad=True)

    def run():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            F.scaled_dot_product_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), is_causal=True)

    (call,) = record_attention_calls(run)
    assert call == AttentionCall((2, 3, 5, 8), (2, 3, 5, 8), (2, 3, 5, 8), torch.bfloat16, q.device,
                                 is_causal=True, mask=None, requires_grad=True, count=1)
    with torch.no_grad():
        (call,) = record_attention_calls(lambda: F.scaled_dot_product_attention(q, q, q))
    assert not call.requires_grad


@pytest.mark.parametrize("backend", ["flash", "math"])
@pytest.mark.parametrize("causal", [False, True])
def test_each_cpu_backend_computes_attention(backend, causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 16, generator=g) for _ in range(3))
    with sdpa_backends((backend,)):
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out.double(), _attention_float64(q, k, v, causal=causal), atol=1e-5, rtol=1e-5)


def test_priority_list_falls_back_and_unrunnable_raises():
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="No viable backend"):
        with sdpa_backends(("efficient",)):  # no memory-efficient kernel on CPU
            F.scaled_dot_product_attention(q, q, q)
    with sdpa_backends(("efficient", "math")):  # falls to math
        out = F.scaled_dot_product_attention(q, q, q)
    torch.testing.assert_close(out.double(), _attention_float64(q, q, q), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="unknown SDPA backend 'xformers'"):
        sdpa_backends(("xformers",))
    with pytest.raises(ValueError, match="at least one"):
        sdpa_backends(())


def test_timing_table_marks_unsupported_backends_and_fills_their_calls_from_the_fastest():
    calls = [AttentionCall((1, 2, 16, 8), (1, 2, 16, 8), (1, 2, 16, 8), torch.float32, torch.device("cpu"),
                           requires_grad=True, count=3),
             AttentionCall((1, 2, 16, 8), (1, 2, 4, 8), (1, 2, 4, 8), torch.float32, torch.device("cpu"), count=2)]
    table = time_sdpa_backends(calls, repeats=2)
    assert set(table) == set(SDPA_BACKENDS)
    for name in ("efficient", "cudnn"):  # CUDA-only kernels
        assert table[name]["total"] is None and table[name]["unsupported"] == 2
    for name in ("flash", "math"):
        row = table[name]
        assert row["unsupported"] == 0
        assert row["total"] == pytest.approx(3 * row["call0"] + 2 * row["call1"])
    order = fastest_sdpa_backends(calls, repeats=2)
    assert order in (("flash", "math"),)  # math is always last, the CUDA-only ones are dropped
    with pytest.raises(ValueError, match="unknown SDPA backend"):
        time_sdpa_backends(calls, backends=("flash", "sage"))


def _toy_step(sdpa):
    from sdadapt.toy import ToyUNet

    torch.manual_seed(0)
    unet = ToyUNet()
    params = [p for p in unet.parameters()]
    opt = torch.optim.SGD(params, lr=0.1)
    g = torch.Generator().manual_seed(3)
    batch = {"latents": torch.randn(2, unet.config["in_channels"], 8, 8, generator=g),
             "cond": torch.randn(2, 6, unet.config["context_dim"], generator=g)}
    ac = torch.linspace(0.99, 0.01, 100)
    state = TrainState(seed=1)
    config = StepConfig(sdpa_backends=sdpa)
    losses = [train_step(unet, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac)["loss"]
              for _ in range(2)]
    return torch.stack(losses), torch.cat([p.detach().flatten() for p in params])


def test_step_under_a_backend_list_trains_like_torchs_choice_and_actually_uses_it():
    default_losses, default_params = _toy_step(None)
    math_losses, math_params = _toy_step(("math",))
    torch.testing.assert_close(math_losses, default_losses, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(math_params, default_params, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="No viable backend"):  # the list really reaches the model's attention
        _toy_step(("efficient",))


def _checkpointed_toy_grads(sdpa, *, checkpoint: bool | str, half: bool = False, per_call=None):
    """LoRA gradients of one step on the toy UNet under ``StepConfig(sdpa_backends=sdpa)``, its UNet
    blocks recomputed in backward (``enable_checkpointing``) or not; ``checkpoint="own"``: the whole
    model checkpointed by the caller's own ``torch.utils.checkpoint`` call, as diffusers'
    ``enable_gradient_checkpointing()`` does inside the model."""
    import sdadapt
    from sdadapt.targets import by_type
    from sdadapt.toy import ToyUNet
    from sdadapt.training.grad_checkpointing import UNET_BLOCKS, enable_checkpointing

    torch.manual_seed(0)
    unet = ToyUNet()
    handle = sdadapt.inject(unet, by_type(torch.nn.Linear), sdadapt.LoRAConfig(rank=4, init="gaussian"))
    params = list(handle.parameters())
    if checkpoint is True:
        enable_checkpointing(unet, UNET_BLOCKS)
    unet.train()
    model = unet
    if checkpoint == "own":
        def model(x, t, c):
            return torch.utils.checkpoint.checkpoint(unet, x, t, c, use_reentrant=False)
    g = torch.Generator().manual_seed(3)
    batch = {"latents": torch.randn(2, unet.config["in_channels"], 8, 8, generator=g),
             "cond": torch.randn(2, 6, unet.config["context_dim"], generator=g)}
    opt = torch.optim.SGD(params, lr=0.0)
    grads = []
    opt.register_step_pre_hook(lambda *_: grads.extend(torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                                       for p in params))
    config = StepConfig(sdpa_backends=sdpa, sdpa_backends_per_call=per_call, mixed_precision="bf16" if half else None,
                        half_precision_norms=half)
    train_step(model, batch, params=params, optimizer=opt, state=TrainState(seed=1), config=config,
               alphas_cumprod=torch.linspace(0.99, 0.01, 100))
    return torch.cat([grad.flatten() for grad in grads])


@pytest.mark.parametrize("half", [False, True], ids=["float32", "half-norms"])
def test_checkpointed_blocks_recompute_under_the_steps_backend_order(half):
    """A checkpointed block recomputes inside backward, after the step's ``sdpa_backends`` context has
    ended: ``enable_checkpointing`` re-enters the order (with the half-precision norms when both are on),
    so a block whose forward ran the math kernel does not recompute with torch's default (flash on a
    CPU), whose saved tensors have other shapes — torch refused the step before. The gradients are bit
    for bit the step's without checkpointing."""
    plain = _checkpointed_toy_grads(("math",), checkpoint=False, half=half)
    torch.testing.assert_close(_checkpointed_toy_grads(("math",), checkpoint=True, half=half), plain, rtol=0, atol=0)
    default = _checkpointed_toy_grads(None, checkpoint=False, half=half)
    assert not torch.equal(default, plain)  # (math is not torch's default here)


def _toy_forward():
    """A seeded toy UNet's forward on a seeded batch, as a function of no arguments."""
    from sdadapt.toy import ToyUNet

    torch.manual_seed(0)
    unet = ToyUNet()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, unet.config["in_channels"], 8, 8, generator=g)
    cond = torch.randn(2, 6, unet.config["context_dim"], generator=g)
    return lambda: unet(x, torch.tensor([10, 500]), cond)


def _toy_calls():
    forward = _toy_forward()
    return record_attention_calls(lambda: forward().sum().backward())


def test_each_kind_of_call_runs_its_own_order():
    """``sdpa_backends(order, per_call)``: a call of a listed kind runs under its own order (here the
    first kind on the math kernel, the others on CPU flash), the rest under ``order``; counted as the
    aten ops each backend dispatches, forward and backward."""
    from aten_ops import AtenOps

    calls = _toy_calls()
    assert len(calls) >= 2
    math_kind, *others = calls
    per_call = {math_kind.signature: ("math",), **{c.signature: ("flash", "math") for c in others}}
    forward = _toy_forward()
    flash = "_scaled_dot_product_flash_attention_for_cpu"
    with AtenOps() as ops, sdpa_backends(("math",), per_call):
        forward().sum().backward()
    assert ops.counts[flash] == sum(c.count for c in others) and ops.counts[flash + "_backward"] == ops.counts[flash]
    with AtenOps() as ops, sdpa_backends(("math",)):  # (without per_call: every call on math)
        forward()
    assert ops.counts[flash] == 0
    with AtenOps() as ops, sdpa_backends(None, {math_kind.signature: ("math",)}):  # the rest: torch's choice (flash)
        forward()
    assert ops.counts[flash] == sum(c.count for c in others)


def test_per_call_orders_are_measured_per_call_and_kept_by_the_step_config():
    calls = _toy_calls()
    orders = fastest_sdpa_backends_per_call(calls, repeats=1)
    assert set(orders) == {c.signature for c in calls}
    assert all(order[-1] == "math" and set(order) <= {"flash", "math"} for order in orders.values())  # (CPU kernels)
    config = StepConfig(sdpa_backends_per_call=orders)
    assert config.sdpa_backends_per_call == tuple(sorted(orders.items()))  # (pairs of tuples: JSON lists work too)
    assert StepConfig(sdpa_backends_per_call=[list(pair) for pair in config.sdpa_backends_per_call]) == config
    with pytest.raises(ValueError, match="each call's order"):
        StepConfig(sdpa_backends_per_call={calls[0].signature: ("sage",)})


def test_the_measured_per_call_orders_keep_only_the_calls_the_order_runs_on_another_kernel(monkeypatch):
    """``fastest_sdpa_orders``: one timing gives the order (fastest total) and the per-call orders, of
    which only the kinds whose fastest kernel the order would not pick stay (a stand-in timing table:
    cuDNN fastest in total and for the second kind, flash for the first)."""
    from sdadapt.training import attention

    calls = [AttentionCall((2, 8, 64, 40), (2, 8, 77, 40), (2, 8, 77, 40), torch.bfloat16, torch.device("cuda"),
                           count=5),
             AttentionCall((2, 8, 4096, 40), (2, 8, 4096, 40), (2, 8, 4096, 40), torch.bfloat16, torch.device("cuda"),
                           count=5)]
    table = {"flash": {"call0": 1.0, "call1": 3.0, "total": 20.0},
             "efficient": {"call0": None, "call1": None, "total": None},
             "cudnn": {"call0": 2.0, "call1": 1.0, "total": 15.0},
             "math": {"call0": 4.0, "call1": 9.0, "total": 65.0}}
    monkeypatch.setattr(attention, "time_sdpa_backends", lambda calls, **kw: table)
    order, per_call = attention.fastest_sdpa_orders(calls)
    assert order == ("cudnn", "flash", "math")
    assert per_call == {calls[0].signature: ("flash", "cudnn", "math")}  # (the second kind: cuDNN either way)
    assert attention.fastest_sdpa_backends_per_call(calls) == {calls[0].signature: ("flash", "cudnn", "math"),
                                                               calls[1].signature: ("cudnn", "flash", "math")}


@pytest.mark.parametrize("half", [False, True], ids=["float32", "half-norms"])
def test_a_models_own_checkpointing_recomputes_under_the_steps_backend_order(half):
    """A model that checkpoints through its own code recomputes inside ``backward()``, which the step
    starts inside its attention order (``step_backward``; autograd keeps the torch function modes of
    the ``backward()`` call): every call, forward and recompute, on the math kernel — bit for bit the
    step without checkpointing. Before, the recompute ran torch's default (flash on a CPU) and torch
    refused the step ("different metadata")."""
    every = {c.signature: ("math",) for c in _toy_calls()}  # (float32 calls: the per-call case without autocast)
    for sdpa, per_call in ((("math",), None), *(() if half else ((None, every),))):
        plain = _checkpointed_toy_grads(sdpa, checkpoint=False, half=half, per_call=per_call)
        own = _checkpointed_toy_grads(sdpa, checkpoint="own", half=half, per_call=per_call)
        torch.testing.assert_close(own, plain, rtol=0, atol=0)
    assert not torch.equal(_checkpointed_toy_grads(None, checkpoint=False, half=half), plain)


def test_checkpointed_blocks_recompute_each_call_under_its_order():
    """The per-call orders are re-entered for a checkpointed block's recompute too: every call on the
    math kernel (not torch's CPU default), with and without checkpointing, bit for bit."""
    every = {c.signature: ("math",) for c in _toy_calls()}
    plain = _checkpointed_toy_grads(None, checkpoint=False, per_call=every)
    torch.testing.assert_close(_checkpointed_toy_grads(None, checkpoint=True, per_call=every), plain, rtol=0, atol=0)
    assert not torch.equal(_checkpointed_toy_grads(None, checkpoint=False), plain)


def test_step_config_validates_and_normalises_backends():
    assert StepConfig(sdpa_backends=["flash", "math"]).sdpa_backends == ("flash", "math")
    with pytest.raises(ValueError, match="sdpa_backends"):
        StepConfig(sdpa_backends=("flash", "xformers"))
    with pytest.raises(ValueError, match="sdpa_backends"):
        StepConfig(sdpa_backends=())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_measured_order_runs_every_call_and_matches_torchs_choice():
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(2, 8, 256, 40, device=device, dtype=torch.bfloat16, generator=g, requires_grad=True)
    ctx = torch.randn(2, 8, 77, 40, device=device, dtype=torch.bfloat16, generator=g, requires_grad=True)

    def run():
        out = F.scaled_dot_product_attention(q, q, q) + F.scaled_dot_product_attention(q, ctx, ctx).float().sum()
        out.float().sum().backward()

    calls = record_attention_calls(run)
    assert len(calls) == 2 and all(c.requires_grad and c.dtype == torch.bfloat16 for c in calls)
    order = fastest_sdpa_backends(calls, repeats=3)
    assert order[-1] == "math" and len(order) >= 2  # at least one fused CUDA kernel runs head size 40 in bf16
    reference = F.scaled_dot_product_attention(q, ctx, ctx)
    with sdpa_backends(order):
        chosen = F.scaled_dot_product_attention(q, ctx, ctx)
    torch.testing.assert_close(chosen.float(), reference.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(chosen.double(), _attention_float64(q, ctx, ctx), atol=2e-2, rtol=2e-2)


def test_docs_example_runs_and_orders_the_cpu_backends():
    from docs_pages import code_blocks, run_block

    blocks = code_blocks("training.md", "python")
    index = next(i for i, block in enumerate(blocks) if "fastest_sdpa_backends" in block)
    namespace = run_block("training.md", index)
    assert namespace["order"][-1] == "math" and set(namespace["order"]) == {"flash", "math"}
    assert namespace["config"].sdpa_backends == namespace["order"]


def test_docs_per_call_example_runs(capsys):
    from docs_pages import run_block_with

    namespace = run_block_with("training.md", "fastest_sdpa_backends_per_call(calls")
    per_call = namespace["per_call"]
    assert set(per_call) == {c.signature for c in namespace["calls"]} and len(per_call) >= 2
    assert dict(namespace["config"].sdpa_backends_per_call) == per_call
    assert capsys.readouterr().out.count(" for q(") == len(per_call)


def _fit_lora(**options):
    from sdadapt.methods import METHODS, FitConfig, fit
    from sdadapt.toy import load_toy

    system = load_toy()
    g = torch.Generator().manual_seed(0)
    images, captions = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, ["a red cross", "a blue circle", "a green square"]
    adaptation = METHODS["lora"].adapt(system, seed=0)
    seen = []
    try:
        losses = fit(system, adaptation, images, captions, on_step=lambda info: seen.append(info.sdpa_backends),
                     config=FitConfig(steps=3, batch_size=2, learning_rate=1e-3, warmup_steps=0, **options))
        return losses, [p.detach().clone() for p in adaptation.params], seen
    finally:
        adaptation.remove()


def test_fit_measures_attention_without_changing_the_run(monkeypatch):
    from sdadapt.training import attention

    plain_losses, plain_params, plain_seen = _fit_lora()
    measured = []
    original = attention.fastest_sdpa_backends

    def orders(calls, **kw):  # (each kind of call: torch's CPU default too — a timed per-call table could pick
        measured.append(calls)  # math for a tiny call by noise, and the run would no longer be the plain one)
        return original(calls, repeats=1), {c.signature: ("flash", "math") for c in calls}

    monkeypatch.setattr(attention, "fastest_sdpa_orders", orders)
    losses, params, seen = _fit_lora(measure_attention=True)
    (calls,) = measured  # once, before the first step, on the toy UNet's own calls (batch of 2, grads needed)
    assert calls and all(c.query[0] == 2 and c.requires_grad for c in calls)
    assert seen == [("flash", "math")] * 3 and plain_seen == [None] * 3
    # torch's CPU default is flash too, and the probe draws from its own generator: the same run, bit for bit
    assert losses == plain_losses
    for a, b in zip(params, plain_params):
        assert torch.equal(a, b)


def test_fit_measures_the_batch_the_step_trains_on_with_few_images_and_a_prior(monkeypatch):
    """Tensor mode draws batch_size rows with replacement (one image still gives 2 rows) and adds as
    many prior rows: the measured calls must have the step's batch of 4, not the first image alone."""
    from sdadapt.methods import METHODS, FitConfig, fit
    from sdadapt.toy import load_toy
    from sdadapt.training import attention
    from sdadapt.training import step as step_module

    measured, entered = [], []
    monkeypatch.setattr(attention, "fastest_sdpa_orders", lambda calls, **kw: measured.append(calls) or (
        ("math",), {c.signature: ("flash", "math") for c in calls}))
    real = step_module.sdpa_backends
    monkeypatch.setattr(step_module, "sdpa_backends", lambda names, per_call=None: entered.append((names, per_call))
                        or real(names, per_call))
    system = load_toy()
    g = torch.Generator().manual_seed(0)
    image, prior_images = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1, torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    adaptation = METHODS["lora"].adapt(system, seed=0)
    try:  # everything fit runs: the measuring forward and the training step
        seen = record_attention_calls(lambda: fit(
            system, adaptation, image, ["a red cross"], prior=(prior_images, ["a cross"] * 3, 1.0),
            config=FitConfig(steps=1, batch_size=2, learning_rate=1e-3, warmup_steps=0, measure_attention=True)))
    finally:
        adaptation.remove()
    (calls,) = measured
    assert calls and {c.query[0] for c in calls} == {4}
    assert {c.query[0] for c in seen} == {4}
    # the training step ran under both measured results: the order and each kind of call's own
    assert entered and entered[-1] == (("math",), {c.signature: ("flash", "math") for c in calls})


def _train_toy(tmp_path, sdpa: str, name: str) -> int:
    """``sdadapt train lora`` on the toy model, one step on one image, under ``--sdpa-backends sdpa``."""
    from sdadapt.cli import main
    from sdadapt.images import write_png

    images = tmp_path / "imgs"
    if not images.exists():
        images.mkdir()
        write_png(images / "a.png", torch.zeros(3, 32, 32))
        (images / "a.txt").write_text("a red circle")
    # (--no-prior: the class images these runs sampled first were most of this test's time, and no assertion reads them)
    return main(["train", "lora", "--images", str(images), "--model", "toy", "--steps", "1", "--batch-size", "1",
                 "--sdpa-backends", sdpa, "--no-prior", "-o", str(tmp_path / name)])


def test_train_says_which_kinds_of_call_run_their_own_kernel(tmp_path, capsys, monkeypatch):
    """``--sdpa-backends measure``: the report names the order and how many kinds of call run on
    another kernel (a stand-in measurement: the first kind faster on math) — the progress carries them."""
    from sdadapt.training import attention

    monkeypatch.setattr(attention, "fastest_sdpa_orders",
                        lambda calls, **kw: (("flash", "math"), {calls[0].signature: ("math",)}))
    assert _train_toy(tmp_path, "measure", "m.safetensors") == 0
    assert ("attention kernels measured on the first batch: flash, math (fastest first); 1 kind of call faster on "
            "math, run there") in capsys.readouterr().err


def test_train_sdpa_backends_flag_and_toml_key(tmp_path, capsys):
    from train_inputs import read_train_toml

    from sdadapt.jobs import TrainOptions

    options, _, notes = read_train_toml(tmp_path / "train.toml", 'sdpa_backends = "flash,math"\n')
    assert options == {"sdpa_backends": "flash,math"} and not notes
    with pytest.raises(ValueError, match="--sdpa-backends must be 'measure' or a comma list"):
        TrainOptions(images=str(tmp_path), sdpa_backends="xformers")
    assert _train_toy(tmp_path, "measure", "m.safetensors") == 0
    assert "attention kernels measured on the first batch: flash, math (fastest first)" in capsys.readouterr().err
    # no such kernel on a CPU:
    assert _train_toy(tmp_path, "efficient", "e.safetensors") != 0
    assert "No viable backend" in capsys.readouterr().err
