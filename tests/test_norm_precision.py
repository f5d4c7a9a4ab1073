"""``StepConfig(half_precision_norms=True)``: GroupNorm/LayerNorm in autocast's dtype (training.norm_precision).

CPU autocast already leaves the norms in bfloat16, so CUDA autocast's float32 rule for them is put on
CPU autocast by ``benchmarks/norm_casts.py``'s ``CudaNormPolicy`` (entered outside the code under
test); the numbers are checked against float64 references written here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from aten_ops import AtenOps
from hypothesis import given, settings
from hypothesis import strategies as st
from norm_casts import CudaNormPolicy
from saved_activations import SavedActivations
from torch import nn

import sdadapt
from sdadapt.targets import by_type
from sdadapt.toy import ToyUNet
from sdadapt.training.norm_precision import half_precision_norms
from sdadapt.training.step import StepConfig, TrainState, train_step

HALF = (torch.bfloat16, torch.float16)


def _reference(kind: str, x: torch.Tensor, weight, bias, arg, eps: float) -> torch.Tensor:
    """The norm in float64 (affine in float64 from the weights the half path reads: cast to x's dtype)."""
    x64 = x.double()
    if kind == "group":
        b, c = x.shape[:2]
        g = x64.reshape(b, arg, -1)
        y = (g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + eps)
        y = y.reshape(x.shape)
        shape = (1, c) + (1,) * (x.dim() - 2)
    else:
        dims = tuple(range(-len(arg), 0))
        y = (x64 - x64.mean(dims, keepdim=True)) / torch.sqrt(x64.var(dims, unbiased=False, keepdim=True) + eps)
        shape = tuple(arg)
    if weight is not None:
        y = y * weight.to(x.dtype).double().reshape(shape)
    if bias is not None:
        y = y + bias.to(x.dtype).double().reshape(shape)
    return y


def _call(kind: str, x, weight, bias, arg, eps, *, as_keywords: bool = False):
    func = F.group_norm if kind == "group" else F.layer_norm
    if as_keywords:
        return func(x, arg, weight=weight, bias=bias, eps=eps)
    return func(x, arg, weight, bias, eps)


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(["group", "layer"]), dtype=st.sampled_from(HALF), batch=st.integers(1, 3),
       groups=st.integers(1, 4), per_group=st.integers(1, 4), spatial=st.integers(1, 5),
       affine=st.sampled_from(["none", "float32", "half"]), as_keywords=st.booleans(), seed=st.integers(0, 2**16))
def test_norms_run_in_the_half_dtype_with_float32_statistics(kind, dtype, batch, groups, per_group, spatial, affine,
                                                             as_keywords, seed):
    """Under the mode the output is the input's half dtype where CUDA's rule gives float32, equals the
    float64 norm rounded once (within one half-precision step of it), and is bit for bit the same call
    made without autocast on half-precision weights."""
    g = torch.Generator().manual_seed(seed)
    channels = groups * per_group
    x = (torch.randn(batch, channels, spatial, spatial + 1, generator=g) * 3 + 1).to(dtype)
    arg = groups if kind == "group" else [spatial + 1]
    width = channels if kind == "group" else spatial + 1
    weight = bias = None
    if affine != "none":
        wdtype = torch.float32 if affine == "float32" else dtype
        weight = (torch.rand(width, generator=g) + 0.5).to(wdtype)
        bias = torch.randn(width, generator=g).to(wdtype)
    with CudaNormPolicy(), torch.autocast("cpu", dtype=dtype):
        upcast = _call(kind, x, weight, bias, arg, 1e-5, as_keywords=as_keywords)
        with half_precision_norms(True, "cpu"):
            out = _call(kind, x, weight, bias, arg, 1e-5, as_keywords=as_keywords)
    assert upcast.dtype == torch.float32  # (the stand-in policy is on)
    assert out.dtype == dtype and out.shape == x.shape
    cast = None if weight is None else weight.to(dtype), None if bias is None else bias.to(dtype)
    torch.testing.assert_close(out, _call(kind, x, *cast, arg, 1e-5), rtol=0, atol=0)
    ref = _reference(kind, x, weight, bias, arg, 1e-5)
    step = torch.finfo(dtype).eps * ref.abs().clamp_min(1.0)  # one rounding of the output + float32 statistics
    assert ((out.double() - ref).abs() <= 2 * step).all()


def test_gradients_reach_float32_weights_and_the_input():
    """A trained float32 norm weight gets a float32 gradient through the cast; input and weight
    gradients match float64 autograd of the same norm within half-precision rounding."""
    torch.manual_seed(0)
    x = (torch.randn(2, 8, 4, 4) * 2).bfloat16().requires_grad_(True)
    norm = nn.GroupNorm(4, 8)
    nn.init.uniform_(norm.weight, 0.5, 1.5)
    nn.init.normal_(norm.bias)
    upstream = torch.randn(2, 8, 4, 4)
    with CudaNormPolicy(), torch.autocast("cpu", dtype=torch.bfloat16), half_precision_norms(True, "cpu"):
        y = norm(x)
    assert y.dtype == torch.bfloat16
    (y.float() * upstream).sum().backward()
    assert norm.weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    x64 = x.detach().double().requires_grad_(True)
    w64 = norm.weight.detach().bfloat16().double().requires_grad_(True)
    b64 = norm.bias.detach().bfloat16().double().requires_grad_(True)
    (F.group_norm(x64, 4, w64, b64, norm.eps) * upstream.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=2e-2 * float(x64.grad.abs().max()))
    torch.testing.assert_close(norm.weight.grad.double(), w64.grad, rtol=2e-2, atol=2e-2 * float(w64.grad.abs().max()))
    torch.testing.assert_close(norm.bias.grad.double(), b64.grad, rtol=1e-2, atol=1e-3)


def test_calls_it_does_not_own_are_left_alone():
    """Outside autocast, on an input of another dtype than autocast's, on another device type, with
    ``enabled=False``, and for every other function the calls are what they are without the mode."""
    torch.manual_seed(0)
    x32 = torch.randn(2, 8, 3, 3)
    w = torch.rand(8) + 0.5
    xb = x32.bfloat16()
    with CudaNormPolicy():
        with half_precision_norms(True, "cpu"):
            assert F.group_norm(xb, 2, w.bfloat16()).dtype == torch.bfloat16  # autocast off: plain call
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain = F.group_norm(x32, 2, w)
            with half_precision_norms(True, "cpu"):
                same = F.group_norm(x32, 2, w)  # float32 input: not autocast's dtype
                other_device = half_precision_norms(True, "cuda")
            with other_device:
                upcast = F.group_norm(xb, 2, w)
            with half_precision_norms(False, "cpu"):
                off = F.group_norm(xb, 2, w)
            with half_precision_norms(True, "cpu"):
                silu = F.silu(xb)
    torch.testing.assert_close(same, plain, rtol=0, atol=0)
    assert upcast.dtype == off.dtype == torch.float32
    assert silu.dtype == torch.bfloat16


def test_torch_level_norm_functions_are_covered():
    """``torch.layer_norm``/``torch.group_norm`` called directly (not through ``F``) are run in half too."""
    x = torch.randn(2, 6, 5).bfloat16()
    w = torch.rand(5) + 0.5
    with CudaNormPolicy(), torch.autocast("cpu", dtype=torch.bfloat16), half_precision_norms(True, "cpu"):
        a = torch.layer_norm(x, [5], w, None, 1e-5)
        b = torch.group_norm(x, 3, None, None, 1e-5)
    assert a.dtype == b.dtype == torch.bfloat16
    torch.testing.assert_close(a, F.layer_norm(x, [5], w.bfloat16()), rtol=0, atol=0)


def _toy_batch(dtype: torch.dtype, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The toy UNet's seeded training batch: latents (2, 12, 8, 8) and text states (2, 7, 64)."""
    g = torch.Generator().manual_seed(1)
    return {"latents": torch.randn(2, 12, 8, 8, generator=g).to(device, dtype),
            "cond": torch.randn(2, 7, 64, generator=g).to(device, dtype)}


def _lora_toy_step(norms: str):
    """Loss, LoRA gradients, aten op counts and saved activations of the second of two LoRA steps on the toy UNet under
    CUDA's norm rule: ``norms`` "float32" (bf16 autocast, CUDA's float32 norms), "half"
    (``half_precision_norms``) or "reference" (everything float32, no autocast, from the same bf16
    weights and data). LoRA factors in float32 over the base, as the benchmark's row."""
    dtype = torch.float32 if norms == "reference" else torch.bfloat16
    torch.manual_seed(0)
    unet = ToyUNet().bfloat16().to(dtype)
    handle = sdadapt.inject(unet, by_type(nn.Linear), sdadapt.LoRAConfig(rank=4, init="gaussian"))
    params = list(handle.parameters())
    for p in params:
        p.data = p.data.float()
    opt = torch.optim.SGD(params, lr=1e-2)
    grads = []
    opt.register_step_pre_hook(lambda *_: grads.__setitem__(slice(None), [torch.zeros_like(p) if p.grad is None
                                                                          else p.grad.clone() for p in params]))
    batch = {key: value.to(dtype) for key, value in _toy_batch(torch.bfloat16).items()}  # (the reference: same values)
    config = StepConfig(mixed_precision=None if norms == "reference" else "bf16", half_precision_norms=norms == "half")
    ac = torch.linspace(0.999, 0.01, 1000)
    state = TrainState(seed=3)
    counter, saved = AtenOps(), SavedActivations([*unet.parameters(), *unet.buffers()])
    with CudaNormPolicy():
        train_step(unet, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac)
        with counter, saved:
            out = train_step(unet, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac)
    return float(out["loss"]), torch.cat([g.flatten() for g in grads]), counter.counts, saved


def test_the_step_drops_the_norm_casts_and_keeps_its_numbers():
    """A bf16 LoRA step on the toy UNet under CUDA's norm rule: the option leaves only the step's own
    casts (every norm's up and down casts, forward and backward, go), and its loss and LoRA gradients
    are no farther from an all-float32 step's than those of the step with float32 norms (both ~1.8 %)."""
    loss32, grads32, ops32, _ = _lora_toy_step("float32")
    loss16, grads16, ops16, _ = _lora_toy_step("half")
    loss, grads, _, _ = _lora_toy_step("reference")
    norms = sum(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in ToyUNet().modules())
    assert ops32["_to_copy"] - ops16["_to_copy"] >= 3 * norms  # input up, output down, their backward at least
    assert ops16["_to_copy"] <= 12
    assert float(grads.norm()) > 0
    error32, error16 = (float((g - grads).norm() / grads.norm()) for g in (grads32, grads16))
    assert error16 <= 1.25 * error32 + 1e-3, (error16, error32)
    assert abs(loss16 - loss) <= 1.25 * abs(loss32 - loss) + 1e-4 * loss


def test_the_step_saves_its_normalised_activations_in_half_precision():
    """What the option does to memory: CUDA's float32 norms make the step save float32 activations
    (each norm's output, read by the SiLU or linear after it, and what their backward needs); with
    the option those are bf16, so the float32 bytes the step saves nearly vanish and the total falls
    (SD1.5 at batch 1: 1,048 → 771 MiB, ``benchmarks/saved_activations.py``)."""
    _, _, _, full = _lora_toy_step("float32")
    _, _, _, half = _lora_toy_step("half")
    f32 = "torch.float32"
    assert full.bytes_by_dtype[f32] > 0.25 * full.total  # the premise: float32 norms save much in float32
    assert half.bytes_by_dtype[f32] < 0.1 * full.bytes_by_dtype[f32], (half.bytes_by_dtype, full.bytes_by_dtype)
    assert half.total < full.total - 0.4 * full.bytes_by_dtype[f32]


def test_step_config_needs_mixed_precision():
    with pytest.raises(ValueError, match="half_precision_norms.*mixed_precision"):
        StepConfig(half_precision_norms=True)
    assert StepConfig(mixed_precision="fp16", half_precision_norms=True).half_precision_norms


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autocast_upcasts_norms_and_the_mode_keeps_them_half():
    """The premise on a real GPU: CUDA autocast runs GroupNorm/LayerNorm in float32 (what the CPU tests
    emulate); under the mode they return bfloat16, bit for bit the call without autocast on bf16
    weights, and a bf16 LoRA step of the toy UNet dispatches its norms' casts no more."""
    x = torch.randn(2, 8, 4, 4, device="cuda").bfloat16()
    w = torch.rand(8, device="cuda") + 0.5
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert F.group_norm(x, 4, w).dtype == F.layer_norm(x, [4], None).dtype == torch.float32
        with half_precision_norms(True, "cuda"):
            out = F.group_norm(x, 4, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, F.group_norm(x, 4, w.bfloat16()), rtol=0, atol=0)

    def casts(half: bool) -> int:
        torch.manual_seed(0)
        unet = ToyUNet().cuda().bfloat16()
        handle = sdadapt.inject(unet, by_type(nn.Linear), sdadapt.LoRAConfig(rank=4, init="gaussian"))
        params = list(handle.parameters())
        opt = torch.optim.SGD(params, lr=1e-2)
        batch = _toy_batch(torch.bfloat16, "cuda")
        config = StepConfig(mixed_precision="bf16", half_precision_norms=half)
        counter = AtenOps()
        with counter:
            train_step(unet, batch, params=params, optimizer=opt, state=TrainState(seed=0, device="cuda"),
                       config=config, alphas_cumprod=torch.linspace(0.999, 0.01, 1000, device="cuda"))
        return counter.counts["_to_copy"]

    norms = sum(isinstance(m, (nn.GroupNorm, nn.LayerNorm)) for m in ToyUNet().modules())
    assert casts(False) - casts(True) >= 3 * norms


def test_train_half_precision_norms_reaches_the_step(tmp_path, monkeypatch):
    """``train --half-precision-norms`` (TOML ``half_precision_norms``) runs every step under the mode
    with the run's device; without ``--mixed-precision`` bf16/fp16 it is refused before training."""
    from train_inputs import read_train_toml

    from sdadapt.cli import main
    from sdadapt.images import write_png
    from sdadapt.jobs import TrainOptions
    from sdadapt.training import step as step_module

    options, _, notes = read_train_toml(tmp_path / "train.toml", "half_precision_norms = true\n")
    assert options == {"half_precision_norms": True} and not notes
    with pytest.raises(ValueError, match="--half-precision-norms.*--mixed-precision bf16 or fp16"):
        TrainOptions(images=str(tmp_path), half_precision_norms=True)
    seen = []

    def spy(enabled, device_type):
        seen.append((enabled, device_type))
        return half_precision_norms(enabled, device_type)

    monkeypatch.setattr(step_module, "half_precision_norms", spy)
    images = tmp_path / "imgs"
    images.mkdir()
    write_png(images / "a.png", torch.zeros(3, 32, 32))
    (images / "a.txt").write_text("a red circle")
    args = ["train", "lora", "--images", str(images), "--model", "toy", "--steps", "2", "--batch-size", "1",
            "--no-prior",
            "--mixed-precision", "bf16"]
    assert main([*args, "--half-precision-norms", "-o", str(tmp_path / "h.safetensors")]) == 0
    assert seen and set(seen) == {(True, "cpu")}
    seen.clear()
    assert main([*args, "-o", str(tmp_path / "p.safetensors")]) == 0
    assert seen and set(seen) == {(False, "cpu")}


def test_a_compiled_model_traces_the_mode_without_graph_breaks():
    """``torch.compile`` of the injected toy UNet inside a half-precision-norm step (CUDA's norm rule
    emulated as well): dynamo traces both modes in one graph and the compiled step's losses equal
    the eager step's with the option."""
    from torch._dynamo.utils import counters

    def losses(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        unet = ToyUNet().bfloat16()
        handle = sdadapt.inject(unet, by_type(nn.Linear), sdadapt.LoRAConfig(rank=4, init="gaussian"))
        params = list(handle.parameters())
        opt = torch.optim.SGD(params, lr=1e-2)
        batch = _toy_batch(torch.bfloat16)
        model = torch.compile(unet, backend="aot_eager") if compiled else unet
        config = StepConfig(mixed_precision="bf16", half_precision_norms=True)
        state, ac = TrainState(seed=3), torch.linspace(0.999, 0.01, 1000)
        with CudaNormPolicy():
            return [float(train_step(model, batch, params=params, optimizer=opt, state=state, config=config,
                                     alphas_cumprod=ac)["loss"]) for _ in range(2)]

    torch._dynamo.reset()
    counters.clear()
    try:
        assert losses(True) == losses(False)
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()


def _float_base_step(*, checkpoint: str = "none", compiled: bool = False, half: bool = True, captured: bool = False):
    """LoRA gradients of one bf16 step on the float32 toy UNet (CPU autocast: the mode casts the norms'
    float32 weights to bf16, so a recompute without it differs in its saved tensors' dtypes).
    ``checkpoint``: "none", "sdadapt" (``enable_checkpointing``) or "own" (the model calls
    ``torch.utils.checkpoint`` itself, as diffusers' ``enable_gradient_checkpointing()`` does)."""
    from sdadapt.training.grad_checkpointing import UNET_BLOCKS, enable_checkpointing
    from sdadapt.training.step_capture import CapturedStep

    torch.manual_seed(0)
    unet = ToyUNet()
    handle = sdadapt.inject(unet, by_type(nn.Linear), sdadapt.LoRAConfig(rank=4, init="gaussian"))
    if checkpoint == "sdadapt":
        enable_checkpointing(unet, UNET_BLOCKS)
    unet.train()
    params = list(handle.parameters())
    opt = torch.optim.SGD(params, lr=1e-2)
    grads = []
    opt.register_step_pre_hook(lambda *_: grads.extend(torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                                       for p in params))
    batch = _toy_batch(torch.float32)
    config = StepConfig(mixed_precision="bf16", half_precision_norms=half)
    ac = torch.linspace(0.999, 0.01, 1000)
    model = unet
    if checkpoint == "own":
        def model(x, t, c):
            return torch.utils.checkpoint.checkpoint(unet, x, t, c, use_reentrant=False)
    if compiled:
        model = torch.compile(model, backend="aot_eager")
    state = TrainState(seed=3)
    if captured:
        CapturedStep(model, params=params, optimizer=opt, config=config, alphas_cumprod=ac)(batch, state=state)
    else:
        train_step(model, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac)
    return torch.cat([x.flatten() for x in grads])


@pytest.mark.parametrize("captured", [False, True])
def test_checkpointed_blocks_recompute_under_the_half_precision_norms(captured):
    """``enable_checkpointing``'s recompute runs inside backward, where no torch function mode is
    active: it re-enters the step's mode, so the recompute matches the forward (torch would refuse
    it otherwise) and the gradients are bit for bit those of the step without checkpointing."""
    plain = _float_base_step()
    torch.testing.assert_close(_float_base_step(checkpoint="sdadapt", captured=captured), plain, rtol=0, atol=0)
    assert not torch.equal(_float_base_step(half=False), plain)  # (the mode changes something here)


@pytest.mark.parametrize("captured", [False, True])
def test_a_models_own_checkpointing_recomputes_under_the_half_precision_norms(captured):
    """A model checkpointing through its own code (as diffusers' ``enable_gradient_checkpointing()``)
    recomputes inside ``backward()``, which the step starts inside its mode (``step_backward``):
    the gradients are bit for bit the step's without checkpointing (before, torch refused the recompute:
    float32 norms against the forward's bf16), and without the option the same model trains as before."""
    plain = _float_base_step()
    torch.testing.assert_close(_float_base_step(checkpoint="own", captured=captured), plain, rtol=0, atol=0)
    torch.testing.assert_close(_float_base_step(checkpoint="own", half=False), _float_base_step(half=False),
                               rtol=0, atol=0)


def _own_loop_grads(*, checkpoint: bool, backend: str | None = None) -> torch.Tensor:
    """Your own loop's LoRA gradients on the float32 toy UNet: forward and ``loss.backward()`` both inside
    ``half_precision_norms`` (and ``sdpa_backends(None, {every call: (backend,)})`` when ``backend``), the
    whole model checkpointed by its caller's ``torch.utils.checkpoint`` call or not."""
    from contextlib import nullcontext

    from sdadapt.training.attention import record_attention_calls, sdpa_backends

    torch.manual_seed(0)
    unet = ToyUNet()
    params = list(sdadapt.inject(unet, by_type(nn.Linear), sdadapt.LoRAConfig(rank=4, init="gaussian")).parameters())
    batch = _toy_batch(torch.float32)
    t = torch.tensor([10, 700])

    def forward():
        if checkpoint:
            return torch.utils.checkpoint.checkpoint(unet, batch["latents"], t, batch["cond"], use_reentrant=False)
        return unet(batch["latents"], t, batch["cond"])

    per_call = None
    if backend is not None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            per_call = {c.signature: (backend,) for c in record_attention_calls(lambda: forward())}
    with torch.autocast("cpu", dtype=torch.bfloat16), half_precision_norms(True, "cpu"), \
            (sdpa_backends(None, per_call) if per_call else nullcontext()):
        loss = forward().float().pow(2).mean()
        loss.backward()
    return torch.cat([torch.zeros_like(p).flatten() if p.grad is None else p.grad.flatten() for p in params])


@pytest.mark.parametrize("backend", [None, "math"], ids=["norms", "norms-and-per-call-order"])
def test_your_own_loops_backward_inside_the_contexts_reaches_the_recompute(backend):
    """``loss.backward()`` called inside ``half_precision_norms`` (and a per-call ``sdpa_backends``): the
    modes restart it with themselves on the stack, so a model's own checkpoint recomputes under them — the
    gradients without checkpointing, bit for bit (before, torch refused the recompute)."""
    plain = _own_loop_grads(checkpoint=False, backend=backend)
    torch.testing.assert_close(_own_loop_grads(checkpoint=True, backend=backend), plain, rtol=0, atol=0)
    assert float(plain.abs().max()) > 0


@pytest.mark.parametrize("checkpoint", ["sdadapt", "own"])
def test_the_emulated_cuda_norm_rule_reaches_the_recompute(checkpoint):
    """``CudaNormPolicy`` (CUDA's float32 norms on a CPU) restarts the backward it handles with itself on
    the stack: a checkpointed block recomputes its norms in float32 as its forward did — the gradients of
    the float32-norm step without checkpointing, bit for bit (before, torch refused the recompute, its
    norms in bf16 against the forward's float32)."""
    with CudaNormPolicy():
        plain = _float_base_step(half=False)
        torch.testing.assert_close(_float_base_step(half=False, checkpoint=checkpoint), plain, rtol=0, atol=0)
    assert not torch.equal(_float_base_step(half=False), plain)  # (the policy changes something here)


def test_compiled_checkpointed_blocks_train_with_the_option():
    """Under ``torch.compile`` the checkpointed blocks are recomputed from the traced graph (no context
    function: torch.compile refuses one that is not a dispatch mode); the step runs without a graph
    break and within bf16 rounding of the eager step's gradients."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = _float_base_step(checkpoint="sdadapt", compiled=True)
        assert not counters["graph_break"], dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    plain = _float_base_step()
    assert float((compiled - plain).norm()) <= 3e-2 * float(plain.norm())


def test_docs_example_runs():
    """docs/training.md's half-precision norms example: a bf16 LoRA step with the option, and a norm
    under the mode in bf16."""
    from docs_pages import code_blocks, run_block

    index = next(i for i, block in enumerate(code_blocks("training.md", "python")) if "half_precision_norms" in block)
    namespace = run_block("training.md", index)
    assert namespace["y"].dtype == torch.bfloat16 and namespace["config"].half_precision_norms
    assert torch.isfinite(namespace["metrics"]["loss"])


def test_docs_own_loop_example_runs():
    """docs/training.md's own-loop example: ``step_loss`` + ``step_backward`` on a model that checkpoints
    through its own code gives the plain model's gradients bit for bit (each LoRA factor that trains)."""
    from docs_pages import code_blocks, run_block

    index = next(i for i, block in enumerate(code_blocks("training.md", "python")) if "step_backward(" in block)
    namespace = run_block("training.md", index)
    assert namespace["same"] and len(namespace["grads"]["plain"]) == len(namespace["grads"]["checkpointed"]) > 0
    assert any(float(g.abs().max()) > 0 for g in namespace["grads"]["plain"])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("checkpoint", ["none", "sdadapt", "own"])
def test_cuda_graph_half_precision_norm_steps_match_eager_steps(device, checkpoint):
    """Five bf16 LoRA steps of the toy UNet with half-precision norms, as CUDA-graph replays and as eager
    steps, without checkpointing, with checkpointed blocks (on the GPU the recompute runs on autograd's
    device thread, under the mode ``enable_checkpointing`` re-enters there) and with the model checkpointed
    by its caller's own ``torch.utils.checkpoint`` call (the step's backward carries the mode to that
    thread; CUDA autocast's float32 norms would make torch refuse the recompute): the same losses and
    weights (on a CPU ``CapturedStep`` runs eagerly: the two paths' code, not the graph)."""
    from sdadapt.training.grad_checkpointing import UNET_BLOCKS, enable_checkpointing
    from sdadapt.training.step_capture import CapturedStep

    cuda = device == "cuda"

    def run(captured: bool):
        torch.manual_seed(0)
        unet = ToyUNet().to(device, torch.bfloat16)
        handle = sdadapt.inject(unet, by_type(nn.Linear), sdadapt.LoRAConfig(rank=4, init="gaussian"))
        if checkpoint == "sdadapt":
            enable_checkpointing(unet, UNET_BLOCKS)
        unet.train()
        model = unet
        if checkpoint == "own":  # (a capture cannot read the CUDA RNG state: tests/test_train.py)
            def model(x, t, c):
                return torch.utils.checkpoint.checkpoint(unet, x, t, c, use_reentrant=False, preserve_rng_state=False)
        params = list(handle.parameters())
        for p in params:
            p.data = p.data.float()
        lr = torch.tensor(1e-3, device=device) if cuda else 1e-3
        opt = torch.optim.AdamW(params, lr=lr, capturable=cuda)
        batch = _toy_batch(torch.bfloat16, device)
        config = StepConfig(mixed_precision="bf16", half_precision_norms=True)
        ac = torch.linspace(0.999, 0.01, 1000, device=device)
        state = TrainState(seed=2, device=device)
        step = CapturedStep(model, params=params, optimizer=opt, config=config, alphas_cumprod=ac, warmup_steps=2)
        def eager():
            return train_step(model, batch, params=params, optimizer=opt, state=state, config=config, alphas_cumprod=ac)

        losses = [(step(batch, state=state) if captured else eager())["loss"] for _ in range(5)]
        if captured and cuda:
            assert step.graph_count == 1
        return [float(v) for v in losses], [p.detach().clone() for p in params]

    eager_losses, eager_params = run(False)
    graph_losses, graph_params = run(True)
    assert graph_losses == pytest.approx(eager_losses, rel=1e-3)
    for p, q in zip(eager_params, graph_params):
        assert float((p - q).norm()) <= 0.05 * float(p.norm()) + 1e-6
