"""The torch-free tables the ``train``, ``demo`` and ``generate`` parsers are built from (sdadapt.method_tables,
sdadapt.sampler_tables) are the ones the library runs on: one home each, re-exported (the same objects) from where
they lived; the sampler names are the sampler functions' table; the registry's methods are the table's, in order,
with its options; the ``train`` parser built before and after ``sdadapt.methods`` is imported is the same, and a
method registered at run time still gets its ``train METHOD`` and options (tests/test_cli_startup.py runs the
commands in a fresh interpreter and checks that torch stays out).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

import sdadapt
from sdadapt import method_tables, sampler_tables

SRC = Path(sdadapt.__file__).resolve().parents[1]


@pytest.mark.parametrize("module, names", [
    ("sdadapt.samplers", ["DISCARD_NEXT_TO_LAST_SIGMA", "KARRAS_SAMPLERS", "SAMPLERS", "SAMPLER_ALIASES", "SCHEDULES",
                          "SCHEDULE_SAMPLERS", "canonical_sampler", "check_karras", "resolve_schedule"]),
    ("sdadapt.samplers.schedules", ["A1111_AUTOMATIC", "DISCARD_NEXT_TO_LAST_SIGMA", "SCHEDULES", "SCHEDULE_LABELS",
                                    "canonical_schedule"]),
    ("sdadapt.samplers.labels", ["A1111_DISPLAY", "A1111_LABELS", "A1111_MISSING", "a1111_label", "sampler_choices",
                                 "sampler_from_label", "sampler_schedule_from_label"]),
    ("sdadapt.img2img", ["HIRES_UPSCALERS", "LATENT_UPSCALERS"]),
])
def test_the_sampler_names_are_re_exported_not_copied(module, names):
    import importlib

    mod = importlib.import_module(module)
    for name in names:
        assert name in mod.__all__, (module, name)
        assert getattr(mod, name) is getattr(sampler_tables, name), (module, name)


def test_every_sampler_name_is_a_sampler_function_and_back():
    from sdadapt import samplers

    assert sampler_tables.SAMPLERS == ("ddim", *samplers._SAMPLERS)  # (same names, same order)
    assert set(sampler_tables.SAMPLER_ALIASES.values()) <= set(sampler_tables.SAMPLERS)
    assert set(sampler_tables.KARRAS_SAMPLERS) <= set(sampler_tables.SCHEDULE_SAMPLERS) <= set(sampler_tables.SAMPLERS)
    assert set(sampler_tables.SAMPLERS) - set(sampler_tables.SCHEDULE_SAMPLERS) == set(sampler_tables._NO_SCHEDULE)
    assert set(sampler_tables.A1111_AUTOMATIC) <= set(sampler_tables.SCHEDULE_SAMPLERS)


def test_a1111_k_aliases_name_the_same_sampler_in_the_api_and_on_the_command_line():
    """``sample_latents(sampler="k_dpmpp_2m")`` takes what ``generate --sampler k_dpmpp_2m`` takes (A1111's alias
    lists, modules/sd_samplers_kdiffusion.py); the API refused k_dpmpp_2m, k_dpmpp_2m_sde, k_heun, k_euler_ancestral."""
    aliases = [a for a in sampler_tables.A1111_LABELS if a.startswith("k_")]
    assert {"k_dpmpp_2m", "k_dpmpp_2m_sde", "k_heun", "k_euler_ancestral"} <= set(aliases)
    for alias in aliases:
        assert sampler_tables.canonical_sampler(alias) == sampler_tables.sampler_from_label(alias)[0], alias
        assert sampler_tables.canonical_sampler(alias.upper()) == sampler_tables.A1111_LABELS[alias], alias


def test_the_method_tables_are_the_registrys():
    import importlib

    from sdadapt import methods
    from sdadapt.methods import optimizers
    from sdadapt.training import lr_schedules

    fit = importlib.import_module("sdadapt.methods.fit")  # (sdadapt.methods.fit is also the function fit)

    assert list(methods.METHODS) == list(method_tables.METHOD_OPTIONS)  # the built-ins, in registration order
    for name, method in methods.METHODS.items():
        assert method.options is method_tables.METHOD_OPTIONS[name], name
    for name in ("MethodOption", "LORA_OPTIONS", "LOKR_OPTIONS", "DYLORA_OPTIONS", "IA3_OPTIONS", "OFT_OPTIONS",
                 "EMBEDDING_OPTIONS", "DREAMARTIST_OPTIONS", "CUSTOM_DIFFUSION_OPTIONS"):
        assert getattr(methods, name) is getattr(method_tables, name), name
    assert fit.SCHEDULES is method_tables.LR_SCHEDULES and fit.OPTIMIZERS is method_tables.OPTIMIZERS
    assert optimizers.OPTIMIZERS is method_tables.OPTIMIZERS
    assert lr_schedules.EXTRA_SCHEDULES is method_tables.EXTRA_SCHEDULES
    # every option type converts command-line text without torch (the parser's only use of them)
    assert {o.type for options in method_tables.METHOD_OPTIONS.values() for o in options} <= {int, float, str, bool}


_HELP_BEFORE_AND_AFTER = """
import sys
from sdadapt.cli import _parser
def helps():
    parser = _parser(["train", "generate"])  # (as main builds them: one command module each)
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return {name: sub.choices[name].format_help() for name in ("train", "demo", "generate")}
before = helps()
assert "torch" not in sys.modules and "sdadapt.methods" not in sys.modules
import sdadapt.methods, sdadapt.samplers, sdadapt.img2img
after = helps()
for name in before:
    assert before[name] == after[name], name
print("same")
"""


def test_the_parsers_are_the_same_built_from_the_tables_or_after_the_registry_is_imported():
    """In a fresh interpreter: ``train``/``demo``/``generate``'s help built torch-free (the tables) and again after
    ``sdadapt.methods`` (the registry) and the samplers are imported, word for word."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", _HELP_BEFORE_AND_AFTER], capture_output=True, text=True,
                          timeout=300, env={**env, "PYTHONPATH": str(SRC), "COLUMNS": "100"})
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-3000:]


def test_a_method_registered_at_run_time_is_a_train_choice_with_its_option(monkeypatch):
    from sdadapt import methods
    from sdadapt.cli import build_parser

    extra = methods.MethodOption("sharpness", float, "how sharp (test)", (), "S")
    method = methods.Method("w2-toy-method", "a test method", methods.prepare_lora, 1e-3, 10, options=(extra,))
    monkeypatch.setitem(methods.METHODS, method.name, method)
    parser = build_parser()
    args = parser.parse_args(["train", "w2-toy-method", "--sharpness", "0.5"])
    assert args.method == "w2-toy-method" and args.mo_sharpness == "0.5"
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert "w2-toy-method" in sub.choices["demo"].format_help()
    assert "how sharp (test) [w2-toy-method]" in " ".join(sub.choices["train"].format_help().split())
