"""Lean whole-model fine-tuning: gradient checkpointing and the optimiser fused into backward
(``FitConfig.gradient_checkpointing`` / ``fused_backward``, ``train --gradient-checkpointing
--fused-backward-pass``) change memory, not results.

Why the comparisons are exact (``torch.equal``) on CPU: checkpointing recomputes each block's
forward from the same inputs with the same kernels, so the activations and gradients are the same
bits; a fused optimiser runs the same per-parameter update on the same gradient (torch's AdamW
uses its per-tensor loop on CPU, sdadapt's AdamW quantises int8 states per tensor either way), only
earlier — inside backward, once nothing else needs that weight.
"""

from __future__ import annotations

import dataclasses
import importlib

import pytest
import torch

from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import load_toy
from sdadapt.training.param_groups import parameter_groups_by_module
from sdadapt.training.step import StepConfig

_NO_CLIP = StepConfig(max_grad_norm=None)


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, 32, 32, generator=g) * 2 - 1, ["a red cross", "a blue circle", "a green square"]


def _train(system, *, text_encoder=False, on_step=None, resume=None, **config):
    """Fine-tune ``system`` (restored afterwards); returns the trained weights of every part."""
    images, captions = _data()
    adaptation = METHODS["full"].prepare(system, text_encoder=text_encoder)
    try:
        fit(system, adaptation, images, captions, on_step=on_step, resume=resume,
            config=FitConfig(**{"steps": 3, "batch_size": 2, "learning_rate": 1e-3, "warmup_steps": 0, "step": _NO_CLIP,
                                **config}))
        return {f"{name}.{k}": v.detach().clone() for name, part in adaptation.parts.items()
                for k, v in part.state_dict().items()}
    finally:
        adaptation.remove()


def _assert_same(got, want):
    assert got.keys() == want.keys()
    changed = 0
    for key in want:
        assert torch.equal(got[key], want[key]), key
        changed += 0 if torch.equal(want[key], ORIGINAL.get(key, want[key])) else 1
    assert changed, "the runs trained nothing"


ORIGINAL = {f"unet.{k}": v.clone() for k, v in load_toy().unet.state_dict().items()}


def test_gradient_checkpointing_trains_the_same_weights_and_undoes_itself(monkeypatch):
    system = load_toy()
    unet = system.unet
    classes = {name: type(m) for name, m in unet.named_modules()}
    modes = {name: m.training for name, m in unet.named_modules()}
    plain = _train(system)

    calls = []
    original = torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    seen = {}

    def on_step(info):
        resnet = unet.down_blocks[0].resnets[0]
        seen[info.step] = (type(resnet).__name__, resnet.training, resnet.conv1.training, unet.training)

    lean = _train(system, gradient_checkpointing=True, on_step=on_step)
    _assert_same(lean, plain)
    # 15 toy blocks (resnets + transformers of the down/mid/up blocks) per forward, 3 steps
    assert len(calls) == 15 * 3
    # a fine-tuned UNet runs in training mode (kohya's fine_tune.py / diffusers' unet.train()), with or
    # without checkpointing; the wrappers are in training mode too
    assert seen[3] == ("Checkpointed_Resnet", True, True, True)
    assert {name: type(m) for name, m in unet.named_modules()} == classes
    assert {name: m.training for name, m in unet.named_modules()} == modes
    assert f"unet.{next(iter(unet.state_dict()))}" in ORIGINAL  # state_dict keys unchanged


# a co-trained text encoder with its own LR that stops after step 2, and an EMA: every group kind
_FUSED_OPTIONS = {"text_encoder": True, "text_encoder_lr": 5e-4, "text_encoder_steps": 2, "ema_decay": 0.9}


def _saver(folder):
    def on_step(info):
        if info.step == 1:  # of 3: the resumed steps 2 and 3 read every moment (the text encoder's too) and the count
            info.save_state(folder)
    return on_step


@pytest.fixture(scope="module", params=["adamw", "adamw8bit"])
def usual_and_fused(request, tmp_path_factory):
    """One optimiser's runs that both tests below compare (the 8-bit AdamW is slow on CPU): the usual
    loop's (the reference: it saves nothing) and the fused-backward loop's, which saves its state after
    step 1 of 3 (the state the resume test reads), with every ``fuse_optimizer_into_backward`` handle."""
    from sdadapt.training import optim

    system = load_toy()
    options = {**_FUSED_OPTIONS, "optimizer": request.param}
    folder = tmp_path_factory.mktemp(f"fused-{request.param}")
    plain = _train(system, **options)
    handles = []
    fuse = optim.fuse_optimizer_into_backward
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(optim, "fuse_optimizer_into_backward", lambda *a, **k: handles.append(fuse(*a, **k)) or handles[-1])
        fused = _train(system, fused_backward=True, on_step=_saver(folder / "fused"), **options)
    return {"optimizer": request.param, "system": system, "options": options, "plain": plain, "fused": fused,
            "handles": handles, "folder": folder}


def test_fused_backward_gives_the_weights_of_the_usual_loop(usual_and_fused):
    runs = usual_and_fused
    system, options, plain, handles = runs["system"], runs["options"], runs["plain"], runs["handles"]
    _assert_same(runs["fused"], plain)
    trained = [*system.unet.parameters(), *system.text_encoder.parameters()]
    assert len(handles) == 1 and len(handles[0].params) == len(trained)
    # one optimiser per block (UNet resnets/transformers, text-encoder layers, other modules alone), multi-tensor steps
    blocks = [*parameter_groups_by_module(system.unet, params=trained),
              *parameter_groups_by_module(system.text_encoder, params=trained)]
    assert [list(map(id, g)) for g in handles[0].groups] == [list(map(id, g)) for g in blocks]
    assert len(blocks) < len(trained) / 4
    if runs["optimizer"] == "adamw8bit":  # sdadapt's AdamW takes multi-tensor steps off the CPU only
        make = importlib.import_module("sdadapt.methods.fit").make_optimizer
        assert not any(o.param_groups[0]["foreach"] for o in handles[0].optimizers)
        elsewhere = torch.nn.Parameter(torch.zeros(2, device="meta"))
        assert make([{"params": [elsewhere]}], FitConfig(optimizer="adamw8bit")).param_groups[0]["foreach"]
    both = _train(system, fused_backward=True, gradient_checkpointing=True, **options)
    _assert_same(both, plain)
    for p in system.unet.parameters():  # the hooks are gone: a later backward accumulates .grad again
        assert p.grad is None


def test_a_fused_runs_state_resumes_in_the_usual_loop_and_back(usual_and_fused):
    """The per-block optimisers save the layout of one optimiser over the same groups: a fused run's
    state (saved after step 1, the fixture) resumes in the usual loop, and the usual loop's in the
    fused one, to the uninterrupted usual run's weights (the fixture's reference, which saved nothing)."""
    runs = usual_and_fused
    system, options, straight, folder = runs["system"], runs["options"], runs["plain"], runs["folder"]
    _assert_same(_train(system, resume=folder / "fused", **options), straight)
    _assert_same(_train(system, on_step=_saver(folder / "plain"), **options), straight)  # (saving changes nothing)
    _assert_same(_train(system, fused_backward=True, resume=folder / "plain", **options), straight)


@pytest.mark.parametrize("step, clash", [
    (StepConfig(), "gradient clipping"),
    (StepConfig(max_grad_norm=None, accumulation_steps=2), "accumulation"),
    (StepConfig(max_grad_norm=None, mixed_precision="fp16"), "fp16"),
])
def test_fit_config_refuses_what_a_fused_backward_cannot_do(step, clash):
    with pytest.raises(ValueError, match=clash):
        FitConfig(fused_backward=True, step=step)
    FitConfig(fused_backward=True, step=StepConfig(max_grad_norm=None, mixed_precision="bf16"))


@pytest.mark.parametrize("options, message", [
    ({}, "--max-grad-norm 0"),
    ({"max_grad_norm": 0.0, "gradient_accumulation_steps": 2}, "--gradient-accumulation-steps 2"),
    ({"max_grad_norm": 0.0, "mixed_precision": "fp16"}, "fp16"),
])
def test_train_options_refuse_what_a_fused_backward_cannot_do(tmp_path, options, message):
    from sdadapt.jobs import TrainOptions

    with pytest.raises(ValueError, match=message):
        TrainOptions(images=tmp_path, fused_backward_pass=True, **options)


def test_fused_backward_is_refused_for_adapters_and_checkpointing_without_a_unet(tmp_path):
    from test_finetune_extras import _images

    from sdadapt.jobs import TrainOptions, run_train

    out = tmp_path / "lora.safetensors"
    with pytest.raises(ValueError, match="whole-model methods"):
        run_train("lora", TrainOptions(images=_images(tmp_path / "imgs", 2), steps=1, out=out, fused_backward_pass=True,
                                       max_grad_norm=0))
    assert not out.exists()

    class NoUNet:  # a system whose denoiser is not called `unet`
        def __init__(self, system):
            self.inner = system

        def __getattr__(self, name):
            if name == "unet":
                raise AttributeError(name)
            return getattr(self.inner, name)

    system = load_toy()
    adaptation = METHODS["lora"].adapt(system, seed=0)
    images, captions = _data()
    with pytest.raises(TypeError, match="no unet module"):
        fit(NoUNet(system), adaptation, images, captions, config=FitConfig(steps=1, gradient_checkpointing=True))
    adaptation.remove()


def test_train_full_lean_from_the_command_line_writes_the_model_the_plain_run_writes(tmp_path, capsys, monkeypatch):
    pytest.importorskip("diffusers")
    from test_cli_train import _images, _tiny_pipeline

    from sdadapt.cli import main
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.targets import select
    from sdadapt.training.grad_checkpointing import UNET_BLOCKS

    root = _tiny_pipeline(tmp_path / "sd")
    images = _images(tmp_path / "imgs")
    calls = []
    original = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    common = ["train", "full", "--images", str(images), "--model", str(root), "--steps", "2", "--batch-size", "2",
              "--lr", "1e-3", "--optimizer", "adamw8bit", "--max-grad-norm", "0", "--no-save-state"]
    assert main([*common, "-o", str(tmp_path / "plain")]) == 0, capsys.readouterr().err
    code = main([*common, "--gradient-checkpointing", "--fused-backward-pass", "-o", str(tmp_path / "lean")])
    assert code == 0, capsys.readouterr().err
    base, plain, lean = (DiffusersSystem.from_folder(p) for p in (root, tmp_path / "plain", tmp_path / "lean"))
    assert len(calls) == 2 * len(select(base.unet, UNET_BLOCKS)) > 0  # every resnet/transformer, both steps
    want, got = plain.unet.state_dict(), lean.unet.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    assert any(not torch.equal(a, b) for a, b in zip(base.unet.parameters(), lean.unet.parameters()))
    # refused before any work: clipping is on by default
    capsys.readouterr()
    assert main([*common[:-3], "--fused-backward-pass", "-o", str(tmp_path / "x")]) == 2
    assert "--max-grad-norm 0" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_toml_takes_kohyas_keys(tmp_path):
    from train_inputs import read_train_toml

    options, _, notes = read_train_toml(tmp_path / "train.toml", "[training_arguments]\ngradient_checkpointing = true\n"
                                        "fused_backward_pass = true\nmax_grad_norm = 0.0\nfull_bf16 = true\n")
    assert options == {"gradient_checkpointing": True, "fused_backward_pass": True, "max_grad_norm": 0.0,
                       "full_bf16": True} and not notes


def test_full_bf16_keeps_small_updates_on_average_and_remove_restores_float32(monkeypatch):
    """bf16 weights updated by 1e-5 steps (far below half a bf16 ulp of weights ~1e-2): the
    optimiser make_optimizer picks rounds stochastically, so the change projects onto the float32
    run's change with coefficient ~1 (measured 0.99; the noise of rounding is zero-mean); torch's
    AdamW rounds to nearest and keeps ~6% of it."""
    import sys

    fit_module = sys.modules["sdadapt.methods.fit"]
    system = load_toy()
    original = {k: v.clone() for k, v in system.unet.state_dict().items()}
    images, captions = _data()
    config = FitConfig(steps=3, batch_size=2, learning_rate=1e-5, warmup_steps=0,
                       step=StepConfig(max_grad_norm=None, mixed_precision="bf16"))

    def change(bf16, **options):
        adaptation = METHODS["full"].prepare(system)
        if bf16:
            adaptation.cast(torch.bfloat16)
            assert all(p.dtype == torch.bfloat16 for p in system.unet.parameters())
            assert all(p is q for p, q in zip(adaptation.params, system.unet.parameters()))
        start = {k: v.float().clone() for k, v in system.unet.state_dict().items()}
        fit(system, adaptation, images, captions, config=dataclasses.replace(config, **options))
        delta = torch.cat([(v.float() - start[k]).flatten() for k, v in system.unet.state_dict().items()])
        adaptation.remove()
        for key, value in system.unet.state_dict().items():  # dtype and bits restored
            assert value.dtype == original[key].dtype and torch.equal(value, original[key]), key
        return delta

    want = change(False)
    coefficient = float(change(True) @ want / (want @ want))
    assert 0.9 < coefficient < 1.1
    # fused into backward one block at a time: the same draws in another order, the same statistics
    fused = change(True, fused_backward=True)
    assert 0.9 < float(fused @ want / (want @ want)) < 1.1
    params = [torch.nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]
    assert type(fit_module.make_optimizer([{"params": params}], config)).__module__ == "sdadapt.training.optim"
    monkeypatch.setattr(fit_module, "make_optimizer", lambda groups, config: torch.optim.AdamW(groups, lr=config.learning_rate))
    assert float(change(True) @ want / (want @ want)) < 0.3


def test_full_bf16_from_the_command_line_with_samples_and_its_refusals(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from test_cli_train import _images, _tiny_pipeline

    from sdadapt.cli import main
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.jobs import TrainOptions

    root = _tiny_pipeline(tmp_path / "sd")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo --s 2\n")
    code = main(["train", "full", "--images", str(_images(tmp_path / "imgs")), "--model", str(root), "--steps", "2",
                 "--batch-size", "2", "--full-bf16", "--mixed-precision", "bf16", "--sample-prompts", str(prompts),
                 "--no-save-state", "-o", str(tmp_path / "tuned")])
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "tuned-samples").glob("*.png"))) == 1  # sampled under bf16 autocast mid-run
    base, tuned = DiffusersSystem.from_folder(root), DiffusersSystem.from_folder(tmp_path / "tuned")
    changed = [not torch.equal(a.float(), b.float()) for a, b in zip(base.unet.parameters(), tuned.unet.parameters())]
    assert sum(changed) > len(changed) // 2
    with pytest.raises(ValueError, match="--mixed-precision bf16"):
        TrainOptions(images=tmp_path, full_bf16=True)
    from sdadapt.jobs import run_train

    with pytest.raises(ValueError, match="hypernetwork is not one of them"):  # (the adapter methods: tests/test_full_fp16_adapters.py)
        run_train("hypernetwork", TrainOptions(images=_images(tmp_path / "imgs2"), steps=1, full_bf16=True,
                                               mixed_precision="bf16", out=tmp_path / "h.pt"))


def _original_copy_test(device: str) -> None:
    system = load_toy()
    system.unet.to(device)
    before = {k: v.detach().clone() for k, v in system.unet.state_dict().items()}
    allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
    adaptation = METHODS["full"].prepare(system)
    # the originals live in host memory: on a GPU they would cost a second copy of the weights there
    assert all(v.device.type == "cpu" for part in adaptation._original.values() for v in part.values())
    if device == "cuda":
        assert torch.cuda.memory_allocated() - allocated < 1 << 20
    with torch.no_grad():
        for p in adaptation.params:
            p.add_(1.0)
    adaptation.remove()
    after = system.unet.state_dict()
    assert all(torch.equal(after[k], v) and after[k].device.type == device for k, v in before.items())


def test_full_fine_tune_keeps_its_originals_in_host_memory_and_removes_exactly():
    _original_copy_test("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_full_fine_tune_keeps_its_originals_off_the_gpu():
    _original_copy_test("cuda")
