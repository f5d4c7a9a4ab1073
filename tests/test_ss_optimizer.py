"""``ss_optimizer`` is written as kohya writes it, for every optimiser ``train`` takes.

Reference (kohya-ss/sd-scripts, library/train_util.py ``get_optimizer``, 2026-02): after building
``optimizer_class(params, lr=lr, **optimizer_kwargs)`` kohya returns

    optimizer_name = optimizer_class.__module__ + "." + optimizer_class.__name__
    optimizer_args = ",".join([f"{k}={v}" for k, v in optimizer_kwargs.items()])

and train_network.py writes ``ss_optimizer = optimizer_name + (f"({optimizer_args})" if optimizer_args else "")``.
The classes per ``optimizer_type`` (lower-cased): adamw → ``torch.optim.AdamW``; adamw8bit /
pagedadamw8bit / lion8bit / pagedlion8bit → ``bnb.optim.AdamW8bit`` / ``PagedAdamW8bit`` /
``Lion8bit`` / ``PagedLion8bit``; lion → ``lion_pytorch.Lion``; sgdnesterov → ``torch.optim.SGD``
(``nesterov=True`` passed apart from the kwargs, ``momentum=0.9`` added to them); adafactor →
``transformers.optimization.Adafactor`` (``relative_step=True`` added); Prodigy, the D-Adaptation and
schedule-free classes from their packages. The installed packages' classes give the expected names
here; bitsandbytes (not installed) defines its classes in ``bitsandbytes/optim/adamw.py`` and
``bitsandbytes/optim/lion.py``.
"""

from __future__ import annotations

import ast
import importlib

import pytest

from sdadapt.jobs import train_optimizer
from sdadapt.jobs.train import TrainOptions, _optimizer_args


def kohya_ss_optimizer(optimizer_class_path: str, optimizer_args: list[str], *, added: dict | None = None) -> str:
    """kohya's formula, rewritten from the reference above: the class found by its dotted path
    (imported, so its real ``__module__``), the kwargs read with ``ast.literal_eval``."""
    module_name, _, class_name = optimizer_class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    kwargs = {}
    for arg in optimizer_args:
        key, value = arg.split("=")
        kwargs[key] = ast.literal_eval(value)
    for key, value in (added or {}).items():
        kwargs.setdefault(key, value)
    name = cls.__module__ + "." + cls.__name__
    shown = ",".join([f"{k}={v}" for k, v in kwargs.items()])
    return name + (f"({shown})" if shown else "")


def ours(optimizer: str, args: list[str]) -> str:
    options = TrainOptions(images=".", optimizer=optimizer, optimizer_args=args)
    return train_optimizer.ss_optimizer(options, _optimizer_args(options))


# (optimizer_type as a kohya config gives it, the public class kohya builds, args, what kohya adds)
INSTALLED = [
    ("AdamW", "torch.optim.AdamW", [], None),
    ("AdamW", "torch.optim.AdamW", ["weight_decay=0.1", "betas=0.9,0.99", "eps=1e-6"], None),
    ("Lion", "lion_pytorch.Lion", ["weight_decay=0.1"], None),
    ("SGDNesterov", "torch.optim.SGD", [], {"momentum": 0.9}),
    ("SGDNesterov", "torch.optim.SGD", ["momentum=0.5"], {"momentum": 0.9}),
    ("Adafactor", "transformers.optimization.Adafactor", [], {"relative_step": True}),
    ("Adafactor", "transformers.optimization.Adafactor", ["scale_parameter=False", "relative_step=False"], None),
    ("Prodigy", "prodigyopt.Prodigy", ["decouple=True", "d_coef=2"], None),
    ("DAdaptAdam", "dadaptation.DAdaptAdam", [], None),
    ("DAdaptLion", "dadaptation.DAdaptLion", ["weight_decay=0.1"], None),
    ("DAdaptation", "dadaptation.experimental.DAdaptAdamPreprint", [], None),
    ("AdamWScheduleFree", "schedulefree.AdamWScheduleFree", ["warmup_steps=10"], None),
    ("SGDScheduleFree", "schedulefree.SGDScheduleFree", [], None),
]


@pytest.mark.parametrize("optimizer_type, cls, args, added", INSTALLED)
def test_each_installed_optimizer_is_named_by_kohyas_formula(optimizer_type, cls, args, added):
    pytest.importorskip(cls.rpartition(".")[0])
    assert ours(optimizer_type, args) == kohya_ss_optimizer(cls, args, added=added)


@pytest.mark.parametrize("optimizer_type, expected", [
    ("AdamW8bit", "bitsandbytes.optim.adamw.AdamW8bit"), ("adamw_8bit", "bitsandbytes.optim.adamw.AdamW8bit"),
    ("PagedAdamW8bit", "bitsandbytes.optim.adamw.PagedAdamW8bit"), ("Lion8bit", "bitsandbytes.optim.lion.Lion8bit"),
    ("PagedLion8bit", "bitsandbytes.optim.lion.PagedLion8bit"), ("PagedAdamW", "bitsandbytes.optim.adamw.PagedAdamW"),
    ("PagedAdamW32bit", "bitsandbytes.optim.adamw.PagedAdamW32bit"),
])
def test_bitsandbytes_names_are_its_module_paths(optimizer_type, expected):
    assert ours(optimizer_type, []) == expected
    assert ours(optimizer_type, ["weight_decay=0.1"]) == expected + "(weight_decay=0.1)"


@pytest.mark.parametrize("public", ["AdamW8bit", "PagedAdamW8bit", "Lion8bit", "PagedLion8bit"])
def test_bitsandbytes_names_match_the_installed_package(public):
    pytest.importorskip("bitsandbytes")  # (not installed here: the module paths above are from its source)
    assert train_optimizer.kohya_class_name(public) == kohya_ss_optimizer("bitsandbytes.optim." + public, [])


def test_sdadapts_own_optimizers_are_named_by_their_class():
    from sdadapt.training.lion import Lion
    from sdadapt.training.optim import AdamW

    assert ours("adamw-bf16", ["eps=1e-7"]) == f"{AdamW.__module__}.{AdamW.__name__}(eps=1e-07)"
    assert ours("lion-bf16", []) == f"{Lion.__module__}.{Lion.__name__}"


def test_every_name_train_takes_has_an_entry():
    from sdadapt.methods.optimizers import _OPTIMIZER_ALIASES, OPTIMIZERS

    for name in [*OPTIMIZERS, *_OPTIMIZER_ALIASES]:
        assert "." in train_optimizer.kohya_class_name(name), name
    # the same canonical optimiser named as kohya names the class its alias builds
    assert train_optimizer.kohya_class_name("sgd_nesterov") == train_optimizer.kohya_class_name("SGDNesterov")
    # kohya's any-optimizer path: where the class is defined, as kohya writes optimizer_class.__module__ + "." + name
    assert train_optimizer.kohya_class_name("RAdam") == train_optimizer.kohya_class_name("torch.optim.RAdam") == \
        "torch.optim.radam.RAdam"
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train_optimizer.kohya_class_name("NoSuchOptimizer")


def test_a_legacy_resumed_adafactor_keeps_its_arguments_but_gets_the_class_name():
    options = TrainOptions(images=".", optimizer="adafactor", optimizer_args=["scale_parameter=False"])
    given = _optimizer_args(options)
    assert (train_optimizer.ss_optimizer(options, given, train_optimizer.LEGACY_DEFAULTS)
            == "transformers.optimization.Adafactor(scale_parameter=False)")


def test_paged_adamw_trains_as_adamw_and_a_class_path_must_import():
    """kohya's PagedAdamW / PagedAdamW32bit are bitsandbytes' float32 AdamW (paging moves memory only): sdadapt's
    adamw; kohya's module.Class passthrough (pytorch_optimizer.CAME ...) must import before the model loads."""
    from sdadapt.jobs import TrainOptions
    from sdadapt.methods.optimizers import _OPTIMIZER_ALIASES

    assert _OPTIMIZER_ALIASES["pagedadamw"] == _OPTIMIZER_ALIASES["pagedadamw32bit"] == "adamw"
    TrainOptions(images=".", optimizer="PagedAdamW32bit")
    with pytest.raises(ValueError, match="cannot import no_such_optimizer_package"):
        TrainOptions(images=".", optimizer="no_such_optimizer_package.CAME")
