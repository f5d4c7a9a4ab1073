"""Extra optimiser arguments (kohya's ``--optimizer_args``): :mod:`sdadapt.training.optimizer_args`,
``FitConfig.optimizer_args`` and ``train --optimizer-args`` / the ``optimizer_args`` TOML key.

The reference behaviour, kohya sd-scripts ``library/train_util.py`` ``get_optimizer``::

    for arg in args.optimizer_args:            # e.g. ["weight_decay=0.1", "betas=0.9,0.99", "eps=1e-6"]
        key, value = arg.split("=")
        value = ast.literal_eval(value)         # "0.9,0.99" -> (0.9, 0.99)
        optimizer_kwargs[key] = value
    optimizer = optimizer_class(trainable_params, lr=lr, **optimizer_kwargs)
    ...
    optimizer_args = ",".join([f"{k}={v}" for k, v in optimizer_kwargs.items()])
    metadata["ss_optimizer"] = optimizer_name + (f"({optimizer_args})" if len(optimizer_args) > 0 else "")
"""

from __future__ import annotations

import ast
import dataclasses
import importlib

import pytest
import torch
from safetensors import safe_open

from sdadapt.cli import main
from sdadapt.jobs.train import TrainOptions
from sdadapt.methods import FitConfig
from sdadapt.methods.fit import cuda_graph_clashes, make_optimizer
from sdadapt.training.optim import Adafactor, AdamW
from sdadapt.training.optimizer_args import (
    OPTIMIZER_ARG_KEYS,
    check_optimizer_args,
    format_optimizer_args,
    parse_optimizer_args,
)

KOHYA_EXAMPLE = ["weight_decay=0.1", "betas=0.9,0.99", "eps=1e-6"]


def _kohya_kwargs(items: list[str]) -> dict:
    """kohya's parse, as written in get_optimizer."""
    kwargs = {}
    for arg in items:
        key, value = arg.split("=")
        kwargs[key] = ast.literal_eval(value)
    return kwargs


def test_values_are_read_as_kohya_reads_them():
    items = [*KOHYA_EXAMPLE, "beta1=None", "relative_step=False", "decay_rate=-0.8", "eps2=1e-30,1e-3"]
    assert dict(parse_optimizer_args(items)) == _kohya_kwargs(items)
    assert parse_optimizer_args(KOHYA_EXAMPLE) == (("weight_decay", 0.1), ("betas", (0.9, 0.99)), ("eps", 1e-6))
    assert parse_optimizer_args([" betas = [0.8, 0.9] "]) == (("betas", (0.8, 0.9)),)  # a list becomes a tuple


@pytest.mark.parametrize("item, message", [
    ("weight_decay", "is not KEY=VALUE"),
    ("=0.1", "is not KEY=VALUE"),
    ("betas=fast", "is not a number, True/False, None"),
    ("eps=__import__('os')", "is not a number, True/False, None"),
])
def test_unreadable_items_are_refused(item, message):
    with pytest.raises(ValueError, match=message):
        parse_optimizer_args([item])


def test_a_key_given_twice_is_refused():
    with pytest.raises(ValueError, match="eps is given twice"):
        parse_optimizer_args(["eps=1e-6", "eps=1e-8"])


@pytest.mark.parametrize("optimizer, args, message", [
    ("adamw", {"amsgrad": True}, "amsgrad is not an argument of the adamw optimizer; it takes betas, eps, weight_decay"),
    ("adamw8bit", {"optim_bits": 8}, "it takes betas, eps, weight_decay, block_size, min_8bit_size, stochastic_rounding"),
    ("adafactor", {"betas": (0.9, 0.99)}, "betas is not an argument of the adafactor optimizer"),
    ("adamw", {"betas": 0.9}, "betas of adamw must be two numbers"),
    ("adamw", {"eps": (1e-30, 1e-3)}, "eps of adamw must be a number"),
    ("adafactor", {"eps": 1e-6}, "eps of adafactor must be two numbers"),
    ("adafactor", {"relative_step": "yes"}, "relative_step of adafactor must be True or False"),
    ("adamw8bit", {"block_size": 2.5}, "block_size of adamw8bit must be a whole number"),
    ("adamw", {"betas": (0.9, 1.5)}, "the adamw optimizer refuses betas=(0.9, 1.5)"),
    ("adamw", {"weight_decay": -1}, "the adamw optimizer refuses"),
    ("adamw-bf16", {"eps": -1e-8}, "eps must be >= 0"),
    ("adafactor", {"warmup_init": True}, "warmup_init=True needs relative_step=True"),
    ("adafactor", {"beta1": 1.0}, "beta1 must be None or in [0, 1)"),
])
def test_each_optimiser_takes_its_own_keys_and_values(optimizer, args, message):
    with pytest.raises(ValueError) as caught:
        check_optimizer_args(optimizer, args)
    assert message in str(caught.value)


def test_every_key_each_optimiser_takes_is_a_keyword_of_its_constructor():
    import inspect

    from sdadapt.training.dadapt import DAdaptAdam, DAdaptAdamPreprint, DAdaptLion
    from sdadapt.training.lion import Lion
    from sdadapt.training.prodigy import Prodigy
    from sdadapt.training.schedule_free import AdamWScheduleFree, SGDScheduleFree

    constructors = {"adamw": [torch.optim.AdamW, AdamW], "adamw8bit": [AdamW], "adamw-bf16": [AdamW],
                    "adafactor": [Adafactor], "lion": [Lion], "lion-bf16": [Lion], "sgd-nesterov": [torch.optim.SGD],
                    "prodigy": [Prodigy], "dadapt-adam": [DAdaptAdam], "dadapt-lion": [DAdaptLion],
                    "dadapt-adam-preprint": [DAdaptAdamPreprint],
                    "adamw-schedulefree": [AdamWScheduleFree], "sgd-schedulefree": [SGDScheduleFree]}
    for name, keys in OPTIMIZER_ARG_KEYS.items():
        for cls in constructors[name]:
            assert set(keys) <= set(inspect.signature(cls).parameters), (name, cls)


def test_the_config_holds_them_frozen_and_hashable():
    config = FitConfig(optimizer_args={"betas": [0.8, 0.9], "weight_decay": 0})
    assert config.optimizer_args == (("betas", (0.8, 0.9)), ("weight_decay", 0))
    assert hash(config) == hash(FitConfig(optimizer_args=(("betas", (0.8, 0.9)), ("weight_decay", 0))))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optimizer_args = ()  # type: ignore[misc]
    with pytest.raises(ValueError, match="it takes betas, eps, weight_decay"):
        FitConfig(optimizer="AdamW", optimizer_args={"lr": 1.0})  # the loop's own


def _params(dtype=torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(5, 3, generator=g).to(dtype)), torch.nn.Parameter(torch.randn(4, generator=g).to(dtype))]


def _grads(params) -> None:
    g = torch.Generator().manual_seed(1)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def test_adamw_with_the_args_steps_as_torchs_adamw_built_with_them():
    """Two paths: the loop's optimiser and ``torch.optim.AdamW(**kohya's kwargs)`` take the same steps."""
    ours, theirs = _params(), _params()
    config = FitConfig(learning_rate=1e-2, optimizer_args=parse_optimizer_args(KOHYA_EXAMPLE))
    built = make_optimizer([{"params": ours, "lr": 1e-2}], config)
    reference = torch.optim.AdamW(theirs, lr=1e-2, **_kohya_kwargs(KOHYA_EXAMPLE))
    for _ in range(3):
        for opt, ps in ((built, ours), (reference, theirs)):
            _grads(ps)
            opt.step()
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    default = make_optimizer([{"params": _params(), "lr": 1e-2}], FitConfig(learning_rate=1e-2))
    assert default.param_groups[0]["betas"] == (0.9, 0.999)  # (the test is not vacuous)


@pytest.mark.parametrize("optimizer, dtype", [("adamw", torch.bfloat16), ("adamw8bit", torch.float32),
                                              ("adamw-bf16", torch.float32)])
def test_sdadapts_adamw_gets_them_too(optimizer, dtype):
    args = {"betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05}
    built = make_optimizer([{"params": _params(dtype), "lr": 1e-3}],
                           FitConfig(optimizer=optimizer, weight_decay=0.3, optimizer_args=args))
    assert isinstance(built, AdamW)
    group = built.param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.05)  # the args' decay wins


def test_the_weight_decay_field_is_used_without_the_key():
    built = make_optimizer([{"params": _params(), "lr": 1e-3}], FitConfig(weight_decay=0.3, optimizer_args={"eps": 1e-7}))
    assert (built.param_groups[0]["weight_decay"], built.param_groups[0]["eps"]) == (0.3, 1e-7)


def test_adafactor_takes_kohyas_usual_args_and_relative_step():
    kohya = ["scale_parameter=False", "relative_step=False", "warmup_init=False", "clip_threshold=1.0"]
    built = make_optimizer([{"params": _params(), "lr": 1e-3}],
                           FitConfig(optimizer="Adafactor", optimizer_args=parse_optimizer_args(kohya)))
    assert isinstance(built, Adafactor) and built.param_groups[0]["relative_step"] is False
    relative = make_optimizer([{"params": _params(), "lr": 1e-3}],
                              FitConfig(optimizer="adafactor", optimizer_args={"relative_step": True, "warmup_init": True}))
    group = relative.param_groups[0]
    assert (group["relative_step"], group["warmup_init"]) == (True, True)
    ps = relative.param_groups[0]["params"]
    before = [p.detach().clone() for p in ps]
    _grads(ps)
    relative.step()
    # warm-up init, step 1: ρ = min(1e-6 · 1, 1/√1) = 1e-6 whatever the group's lr; the 1-D parameter moves by
    # at most ρ · clip_threshold per element RMS
    moved = (ps[1] - before[1]).abs()
    assert 0 < float(moved.detach().max()) <= 1e-6 * 2


def test_cuda_graph_takes_adamw_and_adafactor_args_and_refuses_sgd():
    assert FitConfig(cuda_graph=True, optimizer_args={"betas": (0.9, 0.99), "eps": 1e-6}).cuda_graph
    assert FitConfig(cuda_graph=True, optimizer="adafactor",
                     optimizer_args={"relative_step": True, "scale_parameter": True, "warmup_init": True}).cuda_graph
    assert not cuda_graph_clashes(fused_backward=False, mixed_precision=None, optimizer="adafactor")
    with pytest.raises(ValueError, match="optimizer 'sgd-nesterov'"):
        FitConfig(cuda_graph=True, optimizer="sgd-nesterov")


def test_the_metadata_string_is_kohyas():
    assert format_optimizer_args(parse_optimizer_args(KOHYA_EXAMPLE)) == ",".join(
        f"{k}={v}" for k, v in _kohya_kwargs(KOHYA_EXAMPLE).items()) == "weight_decay=0.1,betas=(0.9, 0.99),eps=1e-06"


# ------------------------------------------------------------------------------------------ train
def test_a_kohya_config_trains_with_them_and_records_them(red_circles, tmp_path, train_fit_calls):
    config = tmp_path / "kohya.toml"
    config.write_text('[optimizer_arguments]\noptimizer_type = "AdamW"\n'
                      'optimizer_args = [ "weight_decay=0.1", "betas=0.9,0.99", "eps=1e-6" ]\n')
    out = tmp_path / "l.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--config", str(config), "--steps", "1",
                 "--batch-size", "2", "--no-prior", "-o", str(out), "-q"]) == 0
    seen = [call.config for call in train_fit_calls]
    assert seen[0].optimizer_args == (("weight_decay", 0.1), ("betas", (0.9, 0.99)), ("eps", 1e-6))
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_optimizer"] == "torch.optim.adamw.AdamW(weight_decay=0.1,betas=(0.9, 0.99),eps=1e-06)"


def test_the_flag_takes_them_and_without_them_the_name_is_alone(red_circles, tmp_path):
    out = tmp_path / "l.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--steps", "1", "--batch-size", "2", "--no-prior",
                 "--optimizer", "adamw8bit", "--optimizer-args", "eps=1e-7", "block_size=64", "-o", str(out), "-q"]) == 0
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_optimizer"] == "bitsandbytes.optim.adamw.AdamW8bit(eps=1e-07,block_size=64)"
    plain = tmp_path / "p.safetensors"
    assert main(["train", "lora", "--images", str(red_circles), "--steps", "1", "--batch-size", "2", "--no-prior",
                 "-o", str(plain), "-q"]) == 0
    with safe_open(str(plain), "pt") as f:
        assert f.metadata()["ss_optimizer"] == "torch.optim.adamw.AdamW"


@pytest.mark.parametrize("flags, message", [
    (["--optimizer-args", "amsgrad=True"], "amsgrad is not an argument of the adamw optimizer; it takes betas, eps, weight_decay"),
    (["--optimizer-args", "betas=0.9"], "betas of adamw must be two numbers"),
    (["--optimizer-args", "betas=0.9,0.999,0.5"], "betas of adamw must be two numbers"),
    (["--optimizer", "adafactor", "--optimizer-args", "eps=1e-6"], "eps of adafactor must be two numbers"),
    (["--optimizer-args", "eps"], "is not KEY=VALUE"),
    (["--weight-decay", "0.05", "--optimizer-args", "weight_decay=0.1"], "disagree"),
])
def test_bad_args_are_refused_before_the_model_loads(red_circles, tmp_path, capsys, monkeypatch, flags, message):
    jobs = importlib.import_module("sdadapt.jobs.train")
    monkeypatch.setattr(jobs, "load_system", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["train", "lora", "--images", str(red_circles), *flags, "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "--optimizer-args" in err or "--weight-decay" in err
    assert message in err


def test_options_keep_the_strings_and_agreeing_weight_decays_pass():
    options = TrainOptions(images=".", optimizer_args=["weight_decay=0.1"], weight_decay=0.1)
    assert options.optimizer_args == ("weight_decay=0.1",)
    assert TrainOptions(images=".", optimizer_args="eps=1e-6 betas=0.9,0.99").optimizer_args == ("eps=1e-6", "betas=0.9,0.99")


def test_resume_refuses_changed_args(red_circles, tmp_path, capsys):
    out = tmp_path / "l.safetensors"
    common = ["train", "lora", "--images", str(red_circles), "--batch-size", "2", "--no-prior", "-q"]
    assert main([*common, "--steps", "2", "--save-every-n-steps", "1", "--optimizer-args", "betas=0.8,0.9",
                 "-o", str(out)]) == 0
    state = tmp_path / "l-state"
    assert (state / "run.json").is_file()
    assert main([*common, "--steps", "3", "--resume", str(state), "--optimizer-args", "betas=0.9,0.99", "-o", str(out),
                 "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "optimizer_args ['betas=(0.8, 0.9)']" in err and "now ['betas=(0.9, 0.99)']" in err
    assert main([*common, "--steps", "3", "--resume", str(state), "--optimizer-args", "betas=0.8,0.9", "-o", str(out),
                 "--overwrite"]) == 0
