"""``python -m sdadapt train --optimizer adafactor`` builds the Adafactor kohya trains with.

Reference (kohya-ss/sd-scripts, library/train_util.py ``get_optimizer``, 2026-02): for
``optimizer_type = "Adafactor"`` kohya reads ``optimizer_args`` with ``ast.literal_eval``, then

* ``relative_step`` missing -> ``relative_step = True`` ("default");
* ``relative_step`` False with ``warmup_init`` True -> ``relative_step = True``;
* with ``relative_step``: "learning rate is used as initial_lr", ``args.learning_rate = None``, the
  groups' lrs popped ("unet_lr and text_encoder_lr are ignored"), ``args.lr_scheduler =
  f"adafactor:{lr}"`` (transformers' ``AdafactorSchedule``, which refuses warm-up steps) and
  ``lr = None``;
* builds ``transformers.optimization.Adafactor(params, lr=lr, **kwargs)``, whose own defaults are
  ``scale_parameter=True``, ``warmup_init=False``, ``weight_decay=0.0`` (and it factors the last two
  dims of a conv weight);
* ``ss_optimizer`` = ``name + "(" + ",".join(f"{k}={v}" for k, v in kwargs.items()) + ")"`` with the
  corrected ``kwargs`` (so ``relative_step=True`` shows even when not given).

AdamW keeps weight decay 0.01 (torch's default, which kohya's ``torch.optim.AdamW`` gets).
"""

from __future__ import annotations

import ast
import json

import pytest
import torch
from safetensors import safe_open

from sdadapt.cli import main
from sdadapt.jobs import train_optimizer
from sdadapt.jobs.train import TrainOptions, _optimizer_args
from sdadapt.methods import FitConfig
from sdadapt.methods.fit import make_optimizer
from sdadapt.training.optim import Adafactor
from sdadapt.training.optimizer_args import kohya_constructor_args, kohya_optimizer_args

transformers_optimization = pytest.importorskip("transformers.optimization")

LR = 1e-4
SHAPES = [(12, 20), (6, 4, 3, 3), (9,)]  # a linear weight, a conv weight, a bias


def kohya_adafactor(params, optimizer_args: list[str], lr: float):
    """kohya's get_optimizer Adafactor branch, rewritten from the reference above (not copied)."""
    kwargs = {}
    for arg in optimizer_args:
        key, value = arg.split("=")
        kwargs[key] = ast.literal_eval(value)
    if "relative_step" not in kwargs:
        kwargs["relative_step"] = True
    if not kwargs["relative_step"] and kwargs.get("warmup_init", False):
        kwargs["relative_step"] = True
    if kwargs["relative_step"]:
        lr = None
        params = [{k: v for k, v in group.items() if k != "lr"} for group in params]
    name = "transformers.optimization.Adafactor"
    shown = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return transformers_optimization.Adafactor(params, lr=lr, **kwargs), name + (f"({shown})" if shown else "")


def sdadapt_train_optimizer(params, optimizer_args: list[str], lr: float, **fields):
    """The optimiser ``train`` builds: TrainOptions -> FitConfig -> make_optimizer (as run_train does)."""
    options = TrainOptions(images=".", optimizer="Adafactor", optimizer_args=optimizer_args, learning_rate=lr, **fields)
    given = _optimizer_args(options)
    config = FitConfig(optimizer=options.optimizer, learning_rate=lr,
                       optimizer_args=train_optimizer.fit_optimizer_args(options, given),
                       weight_decay=train_optimizer.fit_weight_decay(options))
    return make_optimizer(params, config), options, given


def _grads(steps: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) * torch.logspace(-2, 1, s[0]).view(-1, *[1] * (len(s) - 1)) + 0.1
             for s in SHAPES] for _ in range(steps)]


KOHYA_ARGS = [
    [],  # kohya's default: relative step, transformers' scale_parameter
    ["relative_step=False", "warmup_init=True"],  # kohya turns the relative step back on
    ["scale_parameter=False", "relative_step=False", "warmup_init=False"],  # the usual LoRA recipe: the LR used
    ["weight_decay=0.1", "beta1=0.9", "clip_threshold=0.5"],  # relative step with decay and momentum
]


@pytest.mark.parametrize("args", KOHYA_ARGS, ids=lambda a: " ".join(a) or "none")
def test_train_trains_as_kohyas_transformers_adafactor(args):
    gen = torch.Generator().manual_seed(3)
    init = [torch.randn(s, generator=gen) for s in SHAPES]
    theirs = [p.clone().requires_grad_() for p in init]
    ours = [p.clone().requires_grad_() for p in init]
    reference, _ = kohya_adafactor([{"params": theirs, "lr": LR}], args, LR)
    built, _, _ = sdadapt_train_optimizer([{"params": ours, "lr": LR}], args, LR)
    assert isinstance(built, Adafactor)
    ref_group, our_group = reference.param_groups[0], built.param_groups[0]
    for key in ("relative_step", "scale_parameter", "warmup_init", "weight_decay", "beta1", "clip_threshold",
                "decay_rate"):
        assert our_group[key] == ref_group[key], key
    assert tuple(our_group["eps"]) == tuple(ref_group["eps"]) and our_group["factor_conv_as_matrix"] is False
    for step_grads in _grads(6, seed=5):
        for a, b, g in zip(ours, theirs, step_grads):
            a.grad, b.grad = g.clone(), g.clone()
        built.step()
        reference.step()
    for a, b in zip(ours, theirs):
        assert not torch.equal(a, torch.zeros_like(a))
        torch.testing.assert_close(a, b, rtol=0, atol=2e-6)
    if "relative_step=False" in args and "warmup_init=True" not in args:  # the LR trains: a 10× LR moves 10× further
        assert our_group["lr"] == LR


def test_the_relative_step_ignores_the_lr_and_starts_at_the_step_size():
    """Step 1 of relative step, scale_parameter, no momentum: ρ = min(1e-2, 1) · max(1e-3, RMS(w)), and the
    update is clip(G/√V̂)·ρ with V̂ = G² + ε₁ at t = 1 (β₂₁ = 0): every element moves by ρ/max(1, RMS(U))·sign(G)."""
    w0 = torch.tensor([0.5, -2.0, 1.0, 0.25], dtype=torch.float64)
    g = torch.tensor([1e-3, -4.0, 0.5, 2.0], dtype=torch.float64)
    rho = 1e-2 * max(1e-3, float(w0.square().mean().sqrt()))
    u = g / (g.square() + 1e-30).sqrt()  # ±1
    expected = w0 - u / max(1.0, float(u.square().mean().sqrt())) * rho
    for lr in (1e-4, 1.0):  # the LR makes no difference
        p = w0.float().clone().requires_grad_()
        built, _, _ = sdadapt_train_optimizer([{"params": [p], "lr": lr}], [], lr)
        p.grad = g.float()
        built.step()
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("args, shown", [
    ([], "transformers.optimization.Adafactor(relative_step=True)"),
    (["scale_parameter=False", "relative_step=False", "warmup_init=False"],
     "transformers.optimization.Adafactor(scale_parameter=False,relative_step=False,warmup_init=False)"),
    (["relative_step=False", "warmup_init=True"], "transformers.optimization.Adafactor(relative_step=True,warmup_init=True)"),
])
def test_ss_optimizer_shows_kohyas_arguments(args, shown):
    _, kohya_shown = kohya_adafactor([{"params": [torch.zeros(2, requires_grad=True)]}], args, LR)
    options = TrainOptions(images=".", optimizer="Adafactor", optimizer_args=args)
    assert train_optimizer.ss_optimizer(options, _optimizer_args(options)) == shown
    assert kohya_shown == shown
    relative = dict(kohya_optimizer_args("adafactor", _optimizer_args(options)))["relative_step"]
    assert train_optimizer.ss_lr_scheduler(options, _optimizer_args(options), learning_rate=LR, schedule="cosine") == (
        f"adafactor:{LR}" if relative else "cosine")


def test_given_arguments_win_and_other_optimisers_pass_through():
    given = (("scale_parameter", False), ("factor_conv_as_matrix", True), ("relative_step", False))
    assert dict(kohya_constructor_args("adafactor", given)) == dict(given)
    assert kohya_constructor_args("adamw", (("eps", 1e-6),)) == (("eps", 1e-6),)
    assert kohya_optimizer_args("adamw8bit", ()) == ()


@pytest.mark.parametrize("optimizer", ["AdamW", "adamw8bit", "adamw-bf16"])
def test_adamw_keeps_weight_decay_0_01(optimizer):
    options = TrainOptions(images=".", optimizer=optimizer)
    assert options.weight_decay is None
    config = FitConfig(optimizer=optimizer, weight_decay=train_optimizer.fit_weight_decay(options),
                       optimizer_args=train_optimizer.fit_optimizer_args(options, _optimizer_args(options)))
    built = make_optimizer([{"params": [torch.zeros(3, requires_grad=True)], "lr": 1e-3}], config)
    assert built.param_groups[0]["weight_decay"] == 0.01 == torch.optim.AdamW([torch.zeros(1)]).defaults["weight_decay"]


def test_weight_decay_flag_and_args():
    p = [torch.zeros(3, 2, requires_grad=True)]
    assert sdadapt_train_optimizer([{"params": p}], [], LR)[0].param_groups[0]["weight_decay"] == 0.0
    assert sdadapt_train_optimizer([{"params": p}], [], LR, weight_decay=0.05)[0].param_groups[0]["weight_decay"] == 0.05
    assert sdadapt_train_optimizer([{"params": p}], ["weight_decay=0.1"], LR)[0].param_groups[0]["weight_decay"] == 0.1
    # 0.01 given on the command line is no longer taken for "the default": it disagrees with the args
    with pytest.raises(ValueError, match="disagree"):
        TrainOptions(images=".", optimizer="adafactor", weight_decay=0.01, optimizer_args=["weight_decay=0.1"])
    with pytest.raises(ValueError, match="--weight-decay must be >= 0"):
        TrainOptions(images=".", weight_decay=-0.1)
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        FitConfig(weight_decay=-1.0)
    assert FitConfig().weight_decay is None


def test_legacy_records_keep_sdadapts_old_defaults():
    options = TrainOptions(images=".", optimizer="adafactor")
    given = _optimizer_args(options)
    assert train_optimizer.recorded_defaults(None) == train_optimizer.KOHYA_DEFAULTS
    assert train_optimizer.recorded_defaults({"optimizer_defaults": "kohya"}) == train_optimizer.KOHYA_DEFAULTS
    legacy = train_optimizer.recorded_defaults({"step": 3})
    assert legacy == train_optimizer.LEGACY_DEFAULTS
    assert train_optimizer.fit_optimizer_args(options, given, legacy) == ()
    assert train_optimizer.fit_weight_decay(options, legacy) == 0.01
    assert not train_optimizer.uses_relative_step(options, given, legacy)
    assert train_optimizer.ss_optimizer(options, given, legacy) == "transformers.optimization.Adafactor"
    with pytest.raises(ValueError, match="optimizer_defaults 'other'"):
        train_optimizer.recorded_defaults({"optimizer_defaults": "other"})
    # the old build: sdadapt's Adafactor defaults with the LR and weight decay 0.01
    config = FitConfig(optimizer="adafactor", optimizer_args=train_optimizer.fit_optimizer_args(options, given, legacy),
                       weight_decay=train_optimizer.fit_weight_decay(options, legacy), learning_rate=LR)
    group = make_optimizer([{"params": [torch.zeros(2, 2, requires_grad=True)], "lr": LR}], config).param_groups[0]
    assert (group["relative_step"], group["scale_parameter"], group["factor_conv_as_matrix"], group["weight_decay"],
            group["lr"]) == (False, False, True, 0.01, LR)


def test_train_run_report_metadata_and_resume(red_circles, tmp_path, capsys, monkeypatch):
    out = tmp_path / "a.safetensors"
    common = ["train", "lora", "--images", str(red_circles), "--batch-size", "2", "--no-prior", "--optimizer", "Adafactor",
              "--lr", "3e-4", "--lr-scheduler", "linear", "--seed", "1"]
    assert main([*common, "--steps", "2", "--save-every-n-steps", "1", "-o", str(out)]) == 0
    report = capsys.readouterr().err
    assert "Adafactor with relative_step (kohya's default" in report and "the learning rate 0.0003 is unused" in report
    assert "--lr-scheduler linear: not used with Adafactor's relative step" in report
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_optimizer"] == "transformers.optimization.Adafactor(relative_step=True)" and meta["ss_lr_scheduler"] == "adafactor:0.0003"
    state = tmp_path / "a-state"
    record = json.loads((state / "run.json").read_text())
    assert record["optimizer_defaults"] == "kohya" and record["step"] == 1
    # resuming the kohya-defaults record at step 1 ends where the uninterrupted run did
    again = tmp_path / "b.safetensors"
    assert main([*common, "--steps", "2", "--resume", str(state), "-o", str(again), "-q"]) == 0
    with safe_open(str(out), "pt") as a, safe_open(str(again), "pt") as b:
        for key in a.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
            assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    # a record written before (no optimizer_defaults) resumes with the old build: no relative step, the LR schedule
    del record["optimizer_defaults"]
    (state / "run.json").write_text(json.dumps(record))
    jobs = __import__("sdadapt.jobs.train", fromlist=["fit"])
    seen = {}

    def capture(system, adaptation, dataset, *, config, **kwargs):
        seen["config"] = config
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "fit", capture)
    assert main([*common, "--steps", "2", "--resume", str(state), "-o", str(tmp_path / "c.safetensors")]) != 0  # (stopped)
    config = seen["config"]
    assert (config.optimizer_args, config.weight_decay, config.schedule) == ((), 0.01, "linear")
    assert "recorded before Adafactor took kohya's defaults" in capsys.readouterr().err
