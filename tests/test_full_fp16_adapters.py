"""kohya's ``full_fp16`` / ``full_bf16`` for the adapter methods (``train --full-fp16`` / ``--full-bf16``).

* fp16: adapter weights stored in fp16, the step's loss scaled and the fp16 gradients unscaled by
  :class:`~sdadapt.training.half_weights.HalfGradScaler` (torch's refuses fp16 gradients), AdamW's
  update in float32 rounded to fp16: equal to a float64 AdamW step written here from the same fp16
  weights and unscaled fp16 gradients, within one fp16 rounding;
* an inf gradient: the step is skipped (weights and moments untouched) and the scale halves;
* bf16: sdadapt's AdamW writes bf16 adapter weights with stochastic rounding: many draws of one
  step below half a bf16 ulp average to the float32 update (round-to-nearest: no change at all);
* the command line and kohya configs: every adapter family trains, the file keeps the trained dtype
  (or ``--dtype``), ``ss_full_fp16``, kohya's mixed-precision assert, the refused optimiser and
  methods, and a resume with another flag refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

import sdadapt
from sdadapt.adapters import LoRAConfig
from sdadapt.errors import InputError
from sdadapt.methods.fit import FitConfig
from sdadapt.methods.optimizers import make_optimizer
from sdadapt.training.half_weights import HalfGradScaler, cast_trainable_, loss_scaler
from sdadapt.training.step import StepConfig, TrainState, clip_and_step

BETAS, EPS, DECAY, LR = (0.9, 0.999), 1e-8, 0.01, 1e-3


def _lora_model(dtype: torch.dtype, seed: int = 0) -> tuple[nn.Module, list[nn.Parameter]]:
    """A frozen linear layer with a rank-2 LoRA, its up factor non-zero, the adapter stored in ``dtype``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 6))
    handle = sdadapt.inject(model, sdadapt.by_type(nn.Linear), LoRAConfig(rank=2))
    params = list(handle.parameters())
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.5)
    cast_trainable_(params, dtype)
    return model, params


def _adamw_reference(w16: torch.Tensor, g16: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int) -> torch.Tensor:
    """One float64 AdamW step (torch's order) from an fp16 weight and fp16 gradient; updates ``m``/``v``
    (float64) in place and returns the new weight rounded to fp16."""
    w, g = w16.double(), g16.double()
    w = w * (1 - LR * DECAY)
    m.mul_(BETAS[0]).add_(g, alpha=1 - BETAS[0])
    v.mul_(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
    w = w - LR / (1 - BETAS[0] ** t) * m / (v.sqrt() / (1 - BETAS[1] ** t) ** 0.5 + EPS)
    return w.half()


def test_fp16_steps_equal_a_float64_adamw_on_the_unscaled_fp16_gradients():
    model, params = _lora_model(torch.float16)
    assert all(p.dtype == torch.float16 for p in params)
    optimizer = make_optimizer([{"params": params, "lr": LR}], FitConfig(optimizer="adamw", learning_rate=LR,
                                                                          weight_decay=DECAY))
    state, config = TrainState(), StepConfig(mixed_precision="fp16", max_grad_norm=None)
    state.scaler = loss_scaler(params, "cpu")
    assert isinstance(state.scaler, HalfGradScaler)
    moments = [(torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)) for p in params]
    g = torch.Generator().manual_seed(1)
    t, skipped = 0, 0
    while t < 3:  # (the first steps overflow fp16 at the initial scale 2¹⁶: skipped, the scale halves)
        x = torch.randn(4, 8, generator=g)
        with torch.autocast("cpu", dtype=torch.float16):
            y = model(x)
        loss = (y.float() * torch.randn(4, 6, generator=g)).sum()
        state.scaler.scale(loss).backward()
        scale = float(state.scaler.get_scale())
        before = [p.detach().clone() for p in params]
        scaled = [p.grad.detach().clone() for p in params]
        assert all(s.dtype == torch.float16 for s in scaled)
        clip_and_step(params, optimizer, state, config)
        unscaled_grads = [p.grad.detach().clone() for p in params]  # (what the optimiser read)
        optimizer.zero_grad(set_to_none=True)
        if not all(bool(torch.isfinite(s).all()) for s in scaled):
            assert all(torch.equal(p.detach(), w16) for p, w16 in zip(params, before))  # skipped
            assert float(state.scaler.get_scale()) == scale / 2
            skipped += 1
            continue
        t += 1
        for p, w16, s16, read, (m, v) in zip(params, before, scaled, unscaled_grads, moments):
            unscaled = (s16.double() * (1.0 / scale)).half()  # the scaler's unscale, in fp16 as kohya's patch
            # (AdamW's step hardly depends on the gradients' scale: check the unscaled fp16 gradients themselves)
            assert torch.equal(read, unscaled)
            want = _adamw_reference(w16, unscaled, m, v, t)
            assert p.dtype == torch.float16
            # within one fp16 rounding of the float64 step (the optimiser's float32 arithmetic may round the other way)
            ulp = torch.finfo(torch.float16).eps * want.double().abs().clamp_min(2 ** -14)
            assert bool(((p.detach().double() - want.double()).abs() <= ulp).all()), (t, p, want)
            assert not torch.equal(p.detach(), w16)  # (it moved)
    assert 0 < skipped < 10


def test_torchs_own_scaler_refuses_fp16_gradients_which_is_why_the_half_scaler_exists():
    model, params = _lora_model(torch.float16)
    optimizer = torch.optim.SGD(params, lr=0.1)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(2, 8)).float().sum()
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(loss).backward()
    with pytest.raises(ValueError, match="FP16"):
        scaler.unscale_(optimizer)
    assert type(loss_scaler([torch.zeros(1)], "cpu")) is torch.amp.GradScaler  # float32 weights: torch's own


def test_an_inf_gradient_skips_the_step_and_halves_the_scale():
    model, params = _lora_model(torch.float16)
    optimizer = make_optimizer([{"params": params, "lr": LR}], FitConfig(optimizer="adamw", learning_rate=LR))
    state, config = TrainState(), StepConfig(mixed_precision="fp16", max_grad_norm=1.0)
    state.scaler = HalfGradScaler("cpu", init_scale=256.0)  # (finite gradients at this scale)
    scale = float(state.scaler.get_scale())
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(torch.randn(2, 8)).float().sum()
    state.scaler.scale(loss).backward()
    params[0].grad[0, 0] = float("inf")  # an fp16 overflow in one gradient
    before = [p.detach().clone() for p in params]
    clip_and_step(params, optimizer, state, config)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))  # no update
    assert not optimizer.state or all(not s for s in optimizer.state.values())  # no moment either
    assert float(state.scaler.get_scale()) == scale / 2
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.float16):  # the next finite step updates
        loss = model(torch.randn(2, 8)).float().sum()
    state.scaler.scale(loss).backward()
    clip_and_step(params, optimizer, state, config)
    assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert float(state.scaler.get_scale()) == scale / 2


def test_bf16_adapter_updates_are_unbiased_by_stochastic_rounding():
    """Weights at 1.0 (bf16 ulp below 1: 2⁻⁸ ≈ 3.9e-3) and AdamW's first step of size lr = 1e-3,
    a quarter ulp: round-to-nearest keeps 1.0 everywhere; stochastic rounding lands on 1 − 2⁻⁸
    with probability lr/ulp, so the mean over 8192 independent draws is the float32 update."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    handle = sdadapt.inject(model, sdadapt.by_type(nn.Linear), LoRAConfig(rank=64))
    params = list(handle.parameters())
    cast_trainable_(params, torch.bfloat16)
    with torch.no_grad():
        for p in params:
            p.fill_(1.0)
            p.grad = torch.full_like(p, 0.3)  # (AdamW's first step: lr · m̂/(√v̂ + ε) ≈ lr in every element)
    optimizer = make_optimizer([{"params": params, "lr": LR}], FitConfig(optimizer="adamw", learning_rate=LR,
                                                                          weight_decay=0.0))
    optimizer.step()
    g = torch.tensor(0.3, dtype=torch.float64)
    want = -LR * g / (g.abs() + EPS)  # the float64 first step
    changes = torch.cat([(p.detach().double() - 1.0).flatten() for p in params])
    assert changes.numel() == 8192
    assert set(changes.unique().tolist()) <= {0.0, -(2 ** -8)}  # every weight on one of its two bf16 neighbours
    spread = 2 ** -8 * (0.26 * 0.74 / changes.numel()) ** 0.5  # the mean's standard deviation
    assert abs(float(changes.mean() - want)) < 5 * spread
    nearest = (torch.ones(()) + float(want)).bfloat16()  # what round-to-nearest would write
    assert float(nearest) == 1.0


def test_make_optimizer_keeps_float32_moments_over_fp16_weights_and_refuses_sgd():
    """torch's AdamW over fp16 weights keeps fp16 moments: (1 − β₂)·g² of a small gradient flushes to
    zero and ε = 1e-8 is 0 in fp16, so its step is 0/0; sdadapt's AdamW keeps float32 moments."""
    p = nn.Parameter(torch.full((16,), 0.05, dtype=torch.float16))
    p.grad = torch.full_like(p, 1e-3)
    torch_adamw = torch.optim.AdamW([nn.Parameter(p.detach().clone())], lr=LR)
    torch_adamw.param_groups[0]["params"][0].grad = p.grad.clone()
    torch_adamw.step()
    assert not torch.isfinite(torch_adamw.param_groups[0]["params"][0]).all()  # (kohya's plain fp16 AdamW here)
    optimizer = make_optimizer([{"params": [p], "lr": LR}], FitConfig(optimizer="adamw", learning_rate=LR))
    optimizer.step()
    assert torch.isfinite(p.detach()).all() and float(p.detach()[0]) < 0.05
    moments = [s for s in optimizer.state[p].values() if torch.is_tensor(s) and s.numel() > 1]
    assert moments and all(s.dtype == torch.float32 for s in moments)
    with pytest.raises(InputError, match="sgd-nesterov over fp16"):
        make_optimizer([{"params": [p], "lr": LR}], FitConfig(optimizer="sgd-nesterov", learning_rate=LR))


# --------------------------------------------------------------------------- the command line


def _train(*args: str, steps: int = 1) -> int:
    from sdadapt.cli import main

    # (steps of one 16x16 image: every property here is about dtypes, metadata and refusals, not the loss)
    return main(["train", *args, "--no-prior", "--steps", str(steps), "--batch-size", "1", "--resolution", "16", "-q"])


def _file(path) -> tuple[dict[str, torch.dtype], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k).dtype for k in f.keys()}, f.metadata()  # noqa: SIM118


@pytest.mark.parametrize("method", ["lora", "loha", "lokr", "dora", "ia3"])
def test_every_adapter_family_trains_in_fp16_and_saves_what_it_trained(method, red_circles, tmp_path):
    out = tmp_path / "a.safetensors"
    assert _train(method, "--images", str(red_circles), "--full-fp16", "--mixed-precision", "fp16", "--no-save-state",
                  "-o", str(out)) == 0
    dtypes, meta = _file(out)
    weights = {k: d for k, d in dtypes.items() if not k.endswith((".alpha", ".on_input"))}
    assert weights and set(weights.values()) == {torch.float16}  # kohya: the network as trained (no save_precision)
    zero_init = {"lora": "lora_up", "dora": "lora_up", "ia3": ".weight"}.get(method)  # (factors that start at 0)
    if zero_init is not None:
        with safe_open(str(out), "pt") as f:
            assert any(f.get_tensor(k).abs().max() > 0 for k in f.keys() if zero_init in k)  # noqa: SIM118 (it trained)
    assert (meta["ss_full_fp16"], meta["ss_mixed_precision"]) == ("True", "fp16")


def test_full_bf16_adapters_and_the_save_dtype(red_circles, tmp_path):
    out = tmp_path / "b.safetensors"
    assert _train("locon", "--images", str(red_circles), "--full-bf16", "--mixed-precision", "bf16", "--no-save-state",
                  "--dtype", "fp32", "-o", str(out)) == 0
    dtypes, meta = _file(out)
    assert set(dtypes.values()) == {torch.float32}  # --dtype (kohya's save_precision) wins
    assert (meta["ss_full_fp16"], meta["ss_full_bf16"]) == ("False", "True")
    out = tmp_path / "c.safetensors"
    assert _train("locon", "--images", str(red_circles), "--full-bf16", "--mixed-precision", "bf16", "--no-save-state",
                  "-o", str(out)) == 0
    dtypes, _ = _file(out)
    assert {d for k, d in dtypes.items() if not k.endswith(".alpha")} == {torch.bfloat16}


def test_kohya_config_full_fp16_trains_and_needs_fp16_mixed_precision(red_circles, tmp_path, capsys):
    from train_inputs import write_kohya_toml

    (tmp_path / "out").mkdir()
    table = {"train_data_dir": str(red_circles), "output_dir": str(tmp_path / "out"), "output_name": "k",
             "pretrained_model_name_or_path": "toy", "resolution": "16,16", "max_train_steps": 1, "train_batch_size": 1,
             "full_fp16": True, "mixed_precision": "fp16", "network_module": "networks.lora", "network_dim": 4,
             "save_state": False}
    write_kohya_toml(tmp_path / "a.toml", table)
    assert _train("lora", "--config", str(tmp_path / "a.toml")) == 0, capsys.readouterr().err
    dtypes, meta = _file(tmp_path / "out" / "k.safetensors")
    assert meta["ss_full_fp16"] == "True" and torch.float16 in dtypes.values()
    for precision in ("bf16", "no"):  # kohya: assert mixed_precision == "fp16", "full_fp16 requires mixed precision='fp16'"
        write_kohya_toml(tmp_path / "b.toml", {**table, "mixed_precision": precision, "output_name": "k2"})
        capsys.readouterr()
        assert _train("lora", "--config", str(tmp_path / "b.toml")) != 0
        assert "--mixed-precision fp16" in capsys.readouterr().err
    assert not (tmp_path / "out" / "k2.safetensors").exists()


def test_refusals_before_the_model_loads(red_circles, tmp_path, capsys):
    from sdadapt.jobs import TrainOptions, run_train

    with pytest.raises(ValueError, match="--full-fp16 with --optimizer sgd-nesterov"):
        TrainOptions(images=".", optimizer="SGDNesterov", full_fp16=True, mixed_precision="fp16")
    with pytest.raises(ValueError, match="add --mixed-precision fp16"):
        TrainOptions(images=".", full_fp16=True, mixed_precision="bf16")
    for method, out, match in (("full", "f.safetensors", "trains the whole model: use --mixed-precision bf16 --full-bf16"),
                               ("hypernetwork", "h.pt", "hypernetwork is not one of them")):
        with pytest.raises(ValueError, match=match):
            run_train(method, TrainOptions(images=red_circles, model="/nonexistent/model", steps=1, full_fp16=True,
                                           mixed_precision="fp16", out=tmp_path / out))
    with pytest.raises(ValueError, match="custom-diffusion is not one of them"):
        run_train("custom-diffusion", TrainOptions(images=red_circles, model="/nonexistent/model", steps=1, full_bf16=True,
                                                   mixed_precision="bf16", method_options={"token": "<sks>"},
                                                   out=tmp_path / "t.safetensors"))


def test_resume_with_another_weight_storage_is_refused(red_circles, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    assert _train("lora", "--images", str(red_circles), "--full-fp16", "--mixed-precision", "fp16",
                  "--save-every-n-steps", "1", "-o", str(out), steps=2) == 0  # (the state of step 1)
    state = tmp_path / "a-state"
    assert json.loads((state / "run.json").read_text())["half_weights"] == "fp16"
    capsys.readouterr()
    assert _train("lora", "--images", str(red_circles), "--mixed-precision", "fp16", "--resume", str(state),
                  "-o", str(tmp_path / "b.safetensors")) != 0
    assert "(--full-fp16 / --full-bf16) 'fp16' (now 'off'" in capsys.readouterr().err
    assert _train("lora", "--images", str(red_circles), "--full-fp16", "--mixed-precision", "fp16", "--resume", str(state),
                  "-o", str(tmp_path / "c.safetensors"), steps=2) == 0, capsys.readouterr().err


_OPTIMIZERS = ["adamw", "adamw8bit", "adamw-bf16", "adafactor", "lion", "lion-bf16", "prodigy", "dadapt-adam",
               "dadapt-lion", "dadapt-adam-preprint", "adamw-schedulefree", "sgd-schedulefree"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", _OPTIMIZERS)
def test_every_other_optimiser_trains_half_weights_as_float32_ones(name, dtype):
    """Each optimiser ``train`` allows with --full-fp16 / --full-bf16, on a quadratic pull towards
    0.3: after 20 steps (100 for the step-size estimating ones) the half-precision weights moved as the
    float32 ones did (direction and size)."""
    estimating = name in ("prodigy", "dadapt-adam", "dadapt-lion", "dadapt-adam-preprint")
    lr = 1.0 if estimating else 1e-2
    w0 = torch.randn(64, 32, generator=torch.Generator().manual_seed(0)) * 0.05
    changes = []
    for d in (torch.float32, dtype):
        p = nn.Parameter(w0.to(d, copy=True))
        optimizer = make_optimizer([{"params": [p], "lr": lr}], FitConfig(optimizer=name, learning_rate=lr))
        if hasattr(optimizer, "train"):
            optimizer.train()  # (schedule-free: training mode)
        noise = torch.Generator().manual_seed(1)
        for _ in range(100 if estimating else 20):  # (the estimates start tiny: compare where they arrive)
            p.grad = (p.detach().float() - 0.3 + 1e-3 * torch.randn(64, 32, generator=noise)).to(d)
            optimizer.step()
        if hasattr(optimizer, "eval"):
            optimizer.eval()
        assert p.dtype == d
        changes.append(p.detach().double() - w0.to(d).double())
    full, half = changes
    if estimating:  # (near 0.3 they oscillate by their large final step: compare the distance left, not the phase)
        start = float((w0.double() - 0.3).abs().mean())
        left = [float((w0.double() + c - 0.3).abs().mean()) for c in changes]
        assert left[0] < start / 2 and abs(left[1] - left[0]) < 0.05 * start, (start, left)  # (both got there)
        return
    assert float(full.norm()) > 0.01
    assert float((full * half).sum() / (full.norm() * half.norm())) > 0.98
    assert abs(float(half.norm() / full.norm()) - 1) < 0.05
