"""kohya's "any optimizer" path (library/train_util.py ``get_optimizer``): an ``optimizer_type`` sdadapt does not
implement is a class — ``module.Class`` imported, a name without a dot from ``torch.optim`` — built as
``Class(params, lr=lr, **optimizer_args)`` with the arguments as ``ast.literal_eval`` reads them."""

from __future__ import annotations

import pytest
import torch
from fit_runs import straight_and_resumed, toy_lora_run
from safetensors import safe_open
from torch import nn

from sdadapt.methods import FitConfig
from sdadapt.methods.fit import make_optimizer

#: this module as the optimizers below are named (tests/ is on the path, as a user's own module would be)
HERE = __name__


class SignMomentum(torch.optim.Optimizer):
    """A test optimiser with state: ``m ← ½·m + g``, and every ``every``-th step ``p ← p − lr·sign(m)``.
    ``every`` must arrive as an ``int`` (kohya passes ``literal_eval``'s values as they are)."""

    def __init__(self, params, lr: float = 1e-3, every: int = 1) -> None:
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise TypeError(f"every must be a whole number >= 1, got {every!r}")
        super().__init__(params, {"lr": lr, "every": every})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(())
                    state["momentum"] = torch.zeros_like(p)
                state["step"] += 1
                state["momentum"].mul_(0.5).add_(p.grad)
                if int(state["step"]) % group["every"] == 0:
                    p.add_(torch.sign(state["momentum"]), alpha=-group["lr"])


class SignMomentumScheduleFree(SignMomentum):
    """Named as kohya tells schedule-free optimisers (``optimizer_type.lower().endswith("schedulefree")``); records
    the mode switches ``fit`` makes."""

    modes: list[str] = []

    def train(self) -> None:
        type(self).modes.append("train")

    def eval(self) -> None:
        type(self).modes.append("eval")


@pytest.mark.parametrize("name", ["RAdam", "torch.optim.RAdam"])
def test_a_torch_optim_name_builds_that_class_with_the_arguments(name):
    p = nn.Parameter(torch.zeros(3))
    opt = make_optimizer([{"params": [p]}], FitConfig(optimizer=name, learning_rate=2e-4,
                                                      optimizer_args={"betas": (0.8, 0.9), "decoupled_weight_decay": True}))
    assert type(opt) is torch.optim.RAdam
    group = opt.param_groups[0]
    assert group["lr"] == 2e-4 and group["betas"] == (0.8, 0.9) and group["decoupled_weight_decay"] is True


def test_torch_adamw_as_a_class_trains_as_sdadapts_adamw_bit_for_bit():
    """The class path and the name path meet in the same optimiser: ``torch.optim.AdamW`` given as a class trains the
    toy LoRA exactly as ``adamw`` (float32 weights: torch's AdamW), the arguments passed through the same."""
    args = {"betas": (0.8, 0.95), "weight_decay": 0.1, "eps": 1e-6}
    runs = [toy_lora_run(FitConfig(steps=3, batch_size=2, learning_rate=1e-3, optimizer=name, optimizer_args=args))
            for name in ("adamw", "torch.optim.AdamW")]
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    moved = toy_lora_run(FitConfig(steps=3, batch_size=2, learning_rate=1e-3, optimizer="torch.optim.AdamW"))
    assert any(not torch.equal(a, b) for a, b in zip(runs[1][1], moved[1]))  # (the arguments reached the class)


def test_fit_resumes_an_imported_optimizer_bit_for_bit(tmp_path):
    """Its state (a 0-dim step, a momentum) is saved and restored with the run's; ``every=2`` stays an int."""
    config = FitConfig(steps=4, batch_size=2, learning_rate=1e-3, optimizer=f"{HERE}.SignMomentum",
                       optimizer_args={"every": 2})
    straight, resumed = straight_and_resumed(config, tmp_path / "state", at=1)
    assert all(torch.equal(a, b) for a, b in zip(straight[1], resumed[1]))


def test_a_class_named_schedule_free_gets_the_schedule_free_rules():
    SignMomentumScheduleFree.modes.clear()
    config = FitConfig(steps=2, batch_size=2, learning_rate=1e-3, optimizer=f"{HERE}.SignMomentumScheduleFree")
    assert config.schedule_free and not FitConfig(optimizer=f"{HERE}.SignMomentum").schedule_free
    toy_lora_run(config)
    assert SignMomentumScheduleFree.modes[0] == "train" and SignMomentumScheduleFree.modes[-1] == "eval"


@pytest.mark.parametrize("name, args, words", [
    ("no_such_optimizer_package.Opt", {}, "cannot import no_such_optimizer_package"),
    ("os.system", {}, "os has no optimizer class 'system'"),
    ("torch.optim.NoSuchOptimizer", {}, "torch.optim has no 'NoSuchOptimizer'"),
    ("RAdam", {"no_such_argument": 1}, r"RAdam\(no_such_argument=1\) refuses to build"),
    (f"{HERE}.SignMomentum", {"every": 2.0}, "every must be a whole number"),
    ("NoSuchOptimizer", {}, "a torch.optim class such as RAdam, or an installed optimizer class as module.Class"),
    ("torch..optim.RAdam", {}, "a torch.optim class such as RAdam"),
])
def test_what_cannot_be_built_is_refused_before_training(name, args, words):
    with pytest.raises(ValueError, match=words):
        FitConfig(optimizer=name, optimizer_args=args)


def test_cuda_graphs_refuse_an_imported_class():
    with pytest.raises(ValueError, match="cuda_graph .* optimizer 'RAdam'"):
        FitConfig(optimizer="RAdam", cuda_graph=True)


def test_the_train_command_and_a_kohya_config_take_an_optimizer_class(three_shapes, tmp_path, capsys):
    """``train --optimizer module.Class --optimizer-args every=2`` trains and resumes bit for bit, and its file's
    ``ss_optimizer`` is kohya's (the class's module and name, then the arguments); a kohya TOML's
    ``optimizer_type = "RAdam"`` reads as torch's RAdam; a class that does not import ends the command before the
    model loads."""
    from train_inputs import lora_train_args, read_train_toml, resumed_train_is_the_straight_one

    from sdadapt.cli import main
    from sdadapt.jobs import TrainOptions

    args = lora_train_args(three_shapes, "--optimizer", f"{HERE}.SignMomentum", "--optimizer-args", "every=2",
                           "--lr", "1e-3", "--steps", "2", "-q")
    assert resumed_train_is_the_straight_one(tmp_path, args)
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata()["ss_optimizer"] == f"{HERE}.SignMomentum(every=2)"
    options, _, _ = read_train_toml(tmp_path / "k.toml", 'optimizer_type = "RAdam"\noptimizer_args = ["betas=0.8,0.9"]\n')
    assert options["optimizer"] == "RAdam"
    TrainOptions(images=str(three_shapes), **{k: v for k, v in options.items() if k in ("optimizer", "optimizer_args")})
    capsys.readouterr()
    code = main([*lora_train_args(three_shapes, "--optimizer", "no_such_optimizer_package.CAME", "-o",
                                  str(tmp_path / "c.safetensors"))])
    err = capsys.readouterr().err
    assert code == 2 and "cannot import no_such_optimizer_package" in err and not (tmp_path / "c.safetensors").exists()


def test_an_imported_class_is_not_fused_into_backward_and_its_weight_decay_is_probed():
    """One optimiser per block (``--fused-backward-pass``) is right only for a per-parameter optimiser, which an
    imported class need not be (prodigyopt's Prodigy sums over every parameter): refused, as kohya fuses Adafactor
    only. ``weight_decay`` given outside the arguments reaches the probe as it reaches the class: Rprop has none."""
    from sdadapt.jobs import TrainOptions

    with pytest.raises(ValueError, match="fused_backward .* imported class"):
        FitConfig(optimizer="RAdam", fused_backward=True)
    with pytest.raises(ValueError, match="--fused-backward-pass .* imported class"):
        TrainOptions(images=".", optimizer="RAdam", fused_backward_pass=True, max_grad_norm=0)
    with pytest.raises(ValueError, match=r"Rprop\(weight_decay=0.01\) refuses to build"):
        FitConfig(optimizer="Rprop", weight_decay=0.01)
    with pytest.raises(ValueError, match=r"Rprop\(weight_decay=0.01\) refuses to build"):
        TrainOptions(images=".", optimizer="Rprop", weight_decay=0.01)
    assert FitConfig(optimizer="RAdam", weight_decay=0.01).weight_decay == 0.01


def test_an_imported_class_with_a_train_mode_starts_in_it_as_kohyas():
    """kohya's ``get_optimizer`` calls ``train()`` on any optimiser that has one (schedulefree's ``…Reference``
    classes refuse a step outside train mode)."""
    schedulefree = pytest.importorskip("schedulefree")
    p = nn.Parameter(torch.zeros(3))
    opt = make_optimizer([{"params": [p]}], FitConfig(optimizer="schedulefree.SGDScheduleFreeReference"))
    p.grad = torch.ones(3)
    opt.step()  # (raises "Optimizer was not in train mode" when built without train())
    assert isinstance(opt, schedulefree.SGDScheduleFreeReference) and not torch.equal(p, torch.zeros(3))


def test_kohyas_names_without_an_sdadapt_implementation_build_the_packages_class():
    """kohya's ``RAdamScheduleFree`` / ``DAdaptAdaGrad`` ... are its packages' classes: built so (schedulefree's
    RAdamScheduleFree gets the schedule-free rules; dadaptation's estimate one step size, so the groups' LRs must
    agree, as for sdadapt's DAdaptAdam); ``ss_optimizer`` names the class as kohya does."""
    schedulefree = pytest.importorskip("schedulefree")
    pytest.importorskip("dadaptation")
    from sdadapt.jobs import TrainOptions
    from sdadapt.jobs.train_optimizer import kohya_class_name, prodigy_clashes

    p = nn.Parameter(torch.zeros(3))
    config = FitConfig(optimizer="RAdamScheduleFree", optimizer_args={"betas": (0.8, 0.99)})
    opt = make_optimizer([{"params": [p]}], config)
    assert type(opt) is schedulefree.RAdamScheduleFree and opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert config.schedule_free and kohya_class_name("RAdamScheduleFree") == \
        f"{schedulefree.RAdamScheduleFree.__module__}.RAdamScheduleFree"
    with pytest.raises(ValueError, match="DAdaptSGD estimates one step size .*--text-encoder-lr 0.5"):
        TrainOptions(images=".", optimizer="DAdaptSGD", learning_rate=1.0, text_encoder_lr=0.5)
    assert not prodigy_clashes(TrainOptions(images=".", optimizer="DAdaptSGD", learning_rate=1.0))
    assert kohya_class_name("DAdaptSGD") == "dadaptation.dadapt_sgd.DAdaptSGD"
    pytest.importorskip("prodigyopt")  # (prodigyopt's own class given by its path: the same rule as sdadapt's prodigy)
    with pytest.raises(ValueError, match="prodigyopt.Prodigy estimates one step size"):
        TrainOptions(images=".", optimizer="prodigyopt.Prodigy", learning_rate=1.0, text_encoder_lr=0.5)
    from sdadapt.jobs.train_optimizer import prodigy_notes

    said = prodigy_notes(TrainOptions(images=".", optimizer="prodigyopt.Prodigy", learning_rate=0.1), learning_rate=0.1)
    assert "kohya and prodigyopt advise 1.0" in said[0] and "tune d_coef" in said[-1]  # (prodigyopt's, not dadaptation's)
    said = prodigy_notes(TrainOptions(images=".", optimizer="DAdaptSGD", learning_rate=1.0), learning_rate=1.0)
    assert said[0].startswith("DAdaptSGD estimates") and "kohya and dadaptation advise 1.0" in said[0]
