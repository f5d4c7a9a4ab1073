"""kohya's --fp8_base: the frozen base's Linear/Conv weights stored in float8_e4m3fn, computed under autocast.

The reference path: the same base rounded to fp8 and upcast explicitly to bf16 (what autocast
does op by op), run under the same autocast — it must give the same numbers.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from torch import nn

import sdadapt
from sdadapt.adapters import FAMILIES
from sdadapt.training.fp8_base import FP8_DTYPE, cast_base_to_fp8, fp8_castable

BF16 = torch.bfloat16


class _Block(nn.Module):
    """A small net with every kind of module kohya's rule meets: linear, conv, norms, an embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 12)
        self.conv_in = nn.Conv2d(3, 12, 3, padding=1)
        self.group = nn.GroupNorm(3, 12)
        self.conv_out = nn.Conv2d(12, 3, 1, bias=False)
        self.register_buffer("scale", torch.ones(3))

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:  # x (B, 3, H, W), ids (B, N)
        h = self.proj(self.norm(self.embed(ids))).mean(1)  # (B, 12)
        y = self.group(self.conv_in(x) + h[:, :, None, None])
        return self.conv_out(y) * self.scale[:, None, None]


def _kohya_rule(model: nn.Module) -> set[str]:
    """Written from the rule (not from sdadapt's function): the weight and bias of every Linear / Conv."""
    names = set()
    for module_name, module in model.named_modules():
        if type(module) in (nn.Linear, nn.Conv2d) and "sdadapt" not in module_name.split("."):
            names |= {f"{module_name}.{k}" for k, v in module._parameters.items() if v is not None}
    return names


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 6, 6, generator=g), torch.randint(0, 10, (2, 5), generator=g)


def _rounded_reference(model: nn.Module, dtype=BF16) -> nn.Module:
    """The base rounded to fp8 and upcast to ``dtype`` explicitly (the test-only stand-in for autocast's upcast)."""
    ref = copy.deepcopy(model)
    for _, module in ref.named_modules():
        if type(module) in (nn.Linear, nn.Conv2d):
            for v in module._parameters.values():
                if v is not None and not v.requires_grad:
                    v.data = v.data.to(FP8_DTYPE).to(dtype)
    return ref


def test_cast_keeps_keys_and_casts_only_linear_and_conv():
    torch.manual_seed(0)
    model = _Block().requires_grad_(False)
    keys = list(model.state_dict())
    result = cast_base_to_fp8(model)
    state = model.state_dict()
    assert list(state) == keys
    fp8 = {k for k, v in state.items() if v.dtype == FP8_DTYPE}
    assert fp8 == _kohya_rule(model) == set(result.names)
    assert {k for k, v in state.items() if v.dtype == torch.float32} == set(keys) - fp8
    # fp32 -> fp8 is 4 bytes -> 1 byte for the cast tensors
    cast_numel = sum(state[k].numel() for k in fp8)
    assert result.bytes_before - result.bytes_after == 3 * cast_numel


def test_cast_rounds_as_torch_to():
    torch.manual_seed(1)
    model = nn.Linear(16, 16).requires_grad_(False)
    model.weight.data[0, 0] = 1000.0  # beyond e4m3fn's 448: saturates, as kohya's .to()
    expected = model.weight.detach().to(FP8_DTYPE).float()
    cast_base_to_fp8(model)
    assert torch.equal(model.weight.float(), expected)
    assert model.weight.float()[0, 0] == 448.0


def test_forward_and_gradients_match_the_rounded_reference():
    torch.manual_seed(2)
    model = _Block()
    model.requires_grad_(False)
    ref = _rounded_reference(model)
    x, ids = _inputs()
    cast_base_to_fp8(model)
    for net in (model, ref):  # a trainable input to check the backward through the fp8 ops
        net.scale.fill_(1.0)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    with torch.autocast("cpu", dtype=BF16):
        y = model(xs[0], ids)
        y_ref = ref(xs[1], ids)
    assert torch.equal(y, y_ref)
    y.float().square().mean().backward()
    y_ref.float().square().mean().backward()
    assert torch.equal(xs[0].grad, xs[1].grad)


def test_without_autocast_the_fp8_base_fails_loudly():
    model = nn.Linear(4, 4).requires_grad_(False)
    cast_base_to_fp8(model)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 4))


def test_refusals():
    with pytest.raises(TypeError, match="float8"):
        cast_base_to_fp8(nn.Linear(2, 2), dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="trainable"):
        cast_base_to_fp8(nn.Linear(2, 2))  # requires_grad: a fully trained base cannot be fp8
    model = nn.Sequential(nn.Linear(4, 4))
    handle = sdadapt.inject(model, sdadapt.by_type(nn.Linear), sdadapt.LoRAConfig(rank=2))
    handle.merge()
    with pytest.raises(ValueError, match="merged"):
        cast_base_to_fp8(model)
    handle.unmerge()
    cast_base_to_fp8(model)  # and the other way round: no merging into fp8 weights (it could not be undone)
    with pytest.raises(RuntimeError, match="fp8 base"):
        handle.merge()
    assert model[0].weight.dtype == FP8_DTYPE and not any(a.merged for a in handle.modules.values())


#: (fp8_base stores Linear/Conv weights; the norms, and LyCORIS' norm modules on them, stay as they are)
FAMILY_CASES = [pytest.param(name, config, kind, id=f"{name}{i}-{kind}")
                for name, family in FAMILIES.items() if not family.module_type.adapts_norms
                for i, config in enumerate(family.examples) for kind in ("linear", "conv")]


def _randomize(handle, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in handle.modules.values():
            for name, p in adapter.named_parameters():
                noise = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4
                p.mul_(1 + noise.abs()) if name.endswith("dora_scale") else p.copy_(noise)


@pytest.mark.parametrize("family, config, kind", FAMILY_CASES)
def test_every_family_trains_on_an_fp8_base(family, config, kind):
    """Forward and adapter gradients with the fp8 base equal those with the fp8-rounded base kept in bf16
    (DoRA and (IA)³ read the base weight itself: they must read the same values)."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 8) if kind == "linear" else nn.Conv2d(4, 8, 3, padding=1)
    models = [nn.Sequential(copy.deepcopy(layer)) for _ in range(2)]
    handles = [sdadapt.inject(m, sdadapt.by_type(nn.Linear, nn.Conv2d), config) for m in models]
    for h in handles:
        _randomize(h)
    cast_base_to_fp8(models[0])
    for v in models[1][0]._parameters.values():
        if v is not None:
            v.data = v.data.to(FP8_DTYPE).to(BF16)
    assert models[0][0].weight.dtype == FP8_DTYPE
    g = torch.Generator().manual_seed(1)
    x = torch.randn((3, 6) if kind == "linear" else (2, 4, 5, 5), generator=g)
    outs = []
    for m in models:
        with torch.autocast("cpu", dtype=BF16):
            y = m(x)
        y.float().square().mean().backward()
        outs.append(y)
    assert torch.equal(outs[0], outs[1])
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=0, atol=0, msg=n)


# --------------------------------------------------------------------------- the training step

def _tiny_unet():
    import diffusers

    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)


DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_a_lora_training_step_on_an_fp8_unet_matches_the_rounded_bf16_reference(device):
    """The diffusers UNet with LoRA on its attention and conv layers: loss and every LoRA gradient of one
    step with the fp8 base equal those with the base rounded to fp8 and upcast to bf16 explicitly."""
    from sdadapt.training.step import StepConfig, TrainState, prepare_batch, step_loss

    unets = [_tiny_unet().to(device) for _ in range(2)]
    handles = [sdadapt.inject(u, sdadapt.by_type(nn.Linear, nn.Conv2d), sdadapt.LoRAConfig(rank=2)) for u in unets]
    for h in handles:
        _randomize(h, seed=5)
    cast_base_to_fp8(unets[0])
    reference = unets[1]
    for _, module in fp8_castable(reference):
        for v in module._parameters.values():
            if v is not None:
                v.data = v.data.to(FP8_DTYPE).to(BF16)
    g = torch.Generator().manual_seed(0)
    batch = {"latents": torch.randn(2, 4, 8, 8, generator=g).to(device),
             "cond": torch.randn(2, 5, 16, generator=g).to(device)}
    config = StepConfig(mixed_precision="bf16")
    alphas = torch.linspace(0.999, 0.01, 1000, device=device)
    results = []
    for unet in unets:
        prepared = prepare_batch(batch, state=TrainState(seed=0, device=device), config=config, alphas_cumprod=alphas)
        loss = step_loss(lambda x, t, c, unet=unet: unet(x, t, c).sample, prepared, config)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in unet.named_parameters() if p.requires_grad}))
    # the same bf16 ops on the same bf16 values: bit-equal on a CPU; on CUDA within kernel-choice noise
    tol = {"rtol": 0, "atol": 0} if device == "cpu" else {"rtol": 1e-3, "atol": 1e-6}
    assert torch.isfinite(results[0][0])
    torch.testing.assert_close(results[0][0], results[1][0], **tol)
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) > 20
    for n, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][n], **tol, msg=n)
    assert all(p.dtype == torch.float32 for p in unets[0].parameters() if p.requires_grad)  # the adapters stay fp32


def _fit_on_an_fp8_toy(device: str = "cpu", *, small: bool = False, **changes):
    """A LoRA fit of the toy (bf16 autocast) with its UNet and text encoder stored in fp8: (losses, adapter weights).
    ``small``: ``one_level_toy`` (every layer kind, one UNet level: a ninth of the compile trace), else
    ``small_toy``."""
    import dataclasses

    from _fast_compile import small_toy
    from _fast_s1 import one_level_toy

    from sdadapt.methods import METHODS, FitConfig, fit
    from sdadapt.toy.evaluate import concept_data
    from sdadapt.training.step import StepConfig

    # (small_toy: the toy's every block at half width, one text layer; the CUDA test's)
    system = one_level_toy(seed=1) if small else small_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    for model in (system.unet, system.text_encoder):
        assert cast_base_to_fp8(model).names
    system.to(device)
    images, captions = concept_data("cross", 4, seed=0)
    config = dataclasses.replace(FitConfig(steps=5, batch_size=2, learning_rate=3e-3,
                                           step=StepConfig(mixed_precision="bf16")), **changes)
    losses = fit(system, adaptation, images.to(device), captions, config=config)
    return losses, [p.detach().cpu().clone() for p in adaptation.params]


@pytest.fixture(scope="module")
def eager_fp8_fit():
    """The eager fit both cases below compare with (run once: it is the same run for both)."""
    return _fit_on_an_fp8_toy(small=True)


@pytest.mark.parametrize("change", [{"cuda_graph": True}, {"compile_backend": "aot_eager"}],
                         ids=["cuda-graph", "torch-compile"])
def test_captured_and_compiled_steps_on_an_fp8_base_are_the_eager_steps(replaying_cuda_graphs, monkeypatch, change,
                                                                         eager_fp8_fit):
    """--cuda-graph (CapturedStep's capture and replays, emulated on a CPU by conftest's replaying graphs) and
    --torch-compile (the traced graph, aot_eager) over an fp8 base: bit for bit the eager run."""
    from fit_runs import spy_on_captured_steps

    eager = eager_fp8_fit
    made = spy_on_captured_steps(monkeypatch)
    other = _fit_on_an_fp8_toy(small=True, **change)
    assert bool(made) == ("cuda_graph" in change) and all(m.graph_count == 1 for m in made)
    assert all(math.isfinite(x) for x in eager[0]) and other[0] == eager[0]
    for a, b in zip(eager[1], other[1]):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_graph_on_an_fp8_base_matches_the_eager_run(monkeypatch):
    """On a GPU: real CUDA-graph capture of the step with the fp8 base (autocast's fp8 -> bf16 casts recorded in
    the graph) trains like the eager run, to bf16-backward tolerance (as tests/test_fit_cuda_graph.py), with the
    same AdamW arithmetic on both sides (``capturable_optimizers``)."""
    from fit_runs import capturable_optimizers

    capturable_optimizers(monkeypatch)
    eager = _fit_on_an_fp8_toy("cuda")
    captured = _fit_on_an_fp8_toy("cuda", cuda_graph=True)
    assert captured[0] == pytest.approx(eager[0], rel=1e-3)
    for a, b in zip(eager[1], captured[1]):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4)


# --------------------------------------------------------------------------- the command line

def _train(*args: str) -> int:
    from sdadapt.cli import main

    return main(["train", *args, "--no-prior", "--steps", "2", "--batch-size", "2", "-q"])


def test_cli_trains_lora_with_an_fp8_base_and_writes_kohya_metadata(red_circles, tmp_path, capsys):
    from safetensors import safe_open

    out = tmp_path / "a.safetensors"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle --s 2\n")  # (samples run the fp8 base under the run's autocast too)
    assert _train("lora", "--images", str(red_circles), "--fp8-base", "--mixed-precision", "bf16",
                  "--save-every-n-steps", "1", "--sample-prompts", str(prompts), "-o", str(out)) == 0
    assert len(list((tmp_path / "a-samples").glob("*.png"))) == 1
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        assert all(f.get_tensor(k).dtype != FP8_DTYPE for k in f.keys())  # noqa: SIM118
    assert (meta["ss_fp8_base"], meta["ss_fp8_base_unet"]) == ("True", "False")
    state = tmp_path / "a-state"
    assert json.loads((state / "run.json").read_text())["fp8_base"] == "unet+text"
    # the base's rounding changes every step's numbers: resuming without the same flag is refused
    assert _train("lora", "--images", str(red_circles), "--mixed-precision", "bf16", "--resume", str(state),
                  "-o", str(tmp_path / "b.safetensors")) != 0
    assert "fp8_base 'unet+text' (now 'off'" in capsys.readouterr().err
    assert _train("lora", "--images", str(red_circles), "--fp8-base", "--mixed-precision", "bf16", "--resume", str(state),
                  "-o", str(tmp_path / "c.safetensors")) == 0


def test_cli_refusals(red_circles, tmp_path, capsys):
    out = str(tmp_path / "x.safetensors")
    assert _train("lora", "--images", str(red_circles), "--fp8-base", "-o", out) != 0
    assert "--mixed-precision bf16" in capsys.readouterr().err
    assert _train("full", "--images", str(red_circles), "--fp8-base-unet", "--mixed-precision", "bf16",
                  "-o", str(tmp_path / "x.safetensors")) != 0
    assert "trains the base weights themselves" in capsys.readouterr().err
    assert _train("textual-inversion", "--images", str(red_circles), "--token", "<x>", "--fp8-base",
                  "--mixed-precision", "bf16", "-o", str(tmp_path / "x.pt")) != 0
    assert "adapter training" in capsys.readouterr().err


@pytest.mark.parametrize("flags, cache, stored, record", [
    ({"fp8_base": True}, False, {"unet", "text_encoder", "text_encoder_2"}, "unet+text"),
    ({"fp8_base_unet": True}, False, {"unet"}, "unet"),
    ({"fp8_base": True, "fp8_base_unet": True}, False, {"unet"}, "unet"),  # kohya: fp8_base_unet keeps the TEs
    ({"fp8_base": True}, True, {"unet"}, "unet+text"),  # the cache runs the text encoders outside autocast
    ({}, False, set(), "off"),
])
def test_the_run_stores_the_models_kohya_stores(flags, cache, stored, record):
    """Which of the system's models ``run_train`` stores in fp8, and the ``run.json`` record of it (kohya's
    train_network.py: the UNet with either flag, the text encoders with ``fp8_base`` unless ``fp8_base_unet``)."""
    import types

    from sdadapt.jobs.train import TrainOptions, _cast_base_to_fp8, _fp8_base_record

    options = TrainOptions(images=".", mixed_precision="bf16", cache_text_encoder_outputs=cache, **flags)
    system = types.SimpleNamespace(**{name: nn.Sequential(nn.Linear(4, 4)).requires_grad_(False)
                                      for name in ("unet", "text_encoder", "text_encoder_2")})
    _cast_base_to_fp8(system, options)
    assert {name for name, model in vars(system).items() if model[0].weight.dtype == FP8_DTYPE} == stored
    assert _fp8_base_record(options) == record


def test_kohya_toml_keys_train_with_an_fp8_unet(red_circles, tmp_path):
    config = tmp_path / "kohya.toml"
    config.write_text('fp8_base_unet = true\nmixed_precision = "bf16"\n')
    from safetensors import safe_open

    out = tmp_path / "a.safetensors"
    assert _train("lora", "--config", str(config), "--images", str(red_circles), "-o", str(out)) == 0
    with safe_open(str(out), "pt") as f:
        assert (f.metadata()["ss_fp8_base"], f.metadata()["ss_fp8_base_unet"]) == ("False", "True")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_cuda_fp8_base_memory():
    """On the device the cast frees 3 of every 4 bytes of the Linear/Conv weights (fp32 -> fp8)."""
    unet = _tiny_unet().requires_grad_(False).cuda()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    cast = cast_base_to_fp8(unet)
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    castable = cast.bytes_before - cast.bytes_after
    assert castable > 0 and abs(freed - castable) <= 0.05 * castable  # (the allocator rounds blocks up)
