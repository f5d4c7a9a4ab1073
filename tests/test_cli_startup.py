"""Startup: ``import sdadapt`` and ``python -m sdadapt --help`` without torch; no abbreviated options;
extract-lora's skipped layers summarised by reason.

* the lazy package (PEP 562): every name of ``sdadapt.__all__`` is the object its submodule defines, named in
  the ``TYPE_CHECKING`` block (what type checkers see) and in the loader's table alike; ``from sdadapt import *``
  and ``dir(sdadapt)`` give them all; ``sdadapt.inject`` stays the function after the submodule
  ``sdadapt.inject`` is imported (a fresh interpreter: the order matters);
* the command line: ``--help``, ``--version``, a misspelt command, every command's ``--help`` and usage errors
  run in one fresh interpreter through ``python -m sdadapt``'s ``__main__``, which must not import torch — except
  the commands whose options are built from torch modules (:data:`TORCH_AT_PARSE`);
* the summary parser's ``--help`` is the full parser's, word for word;
* ``allow_abbrev=False`` on every parser: ``--min-d`` is refused with the options it begins.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

import sdadapt
from sdadapt import cli
from sdadapt.cli.loratools import skipped_lines

SRC = Path(sdadapt.__file__).resolve().parents[1]  # (the tree under test, also for the fresh interpreters)

#: commands whose parser needs torch modules to be built: none. train/demo read the method names and options from
#: sdadapt.method_tables, generate its sampler tables from sdadapt.sampler_tables, merge its operators' declarations
#: from sdadapt.merge_tables (all torch-free; tests/test_merge_help.py checks every merge operator's --help).
TORCH_AT_PARSE: set[str] = set()


def _type_checking_table() -> dict[str, tuple[str, bool]]:
    """``{name: (module, whether the name is that module)}`` from sdadapt/__init__.py's ``if TYPE_CHECKING:`` imports
    (``"formats": (".formats", True)`` for ``from . import formats``, ``"inject": (".inject", False)`` for
    ``from .inject import inject``)."""
    tree = ast.parse((SRC / "sdadapt" / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING")
    table = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1, ast.dump(node)
        for alias in node.names:
            assert alias.asname == alias.name, f"{alias.name} as {alias.asname}: re-export under its own name"
            table[alias.name] = (f".{node.module}", False) if node.module else (f".{alias.name}", True)
    return table


def test_every_public_name_is_its_submodules_object_in_all_three_lists():
    table = _type_checking_table()
    public = set(sdadapt.__all__) - {"__version__"}
    assert set(table) == public == set(sdadapt._LAZY), (set(table) ^ public, set(sdadapt._LAZY) ^ public)
    for name in sorted(public):
        path, is_module = table[name]
        assert sdadapt._LAZY[name] == path and (name in sdadapt._MODULES) == is_module, name
        module = importlib.import_module(path, "sdadapt")
        want = module if is_module else getattr(module, name)
        assert getattr(sdadapt, name) is want, name
    assert sdadapt.inject is importlib.import_module("sdadapt.inject").inject  # the function, not its module
    namespace: dict = {}
    exec("from sdadapt import *", namespace)  # noqa: S102 - the star import itself is what is tested
    assert set(namespace) - {"__builtins__"} == set(sdadapt.__all__)
    assert all(namespace[name] is getattr(sdadapt, name) for name in sdadapt.__all__)
    assert set(sdadapt.__all__) <= set(dir(sdadapt))
    assert not {"importlib", "sys", "types", "Any", "TYPE_CHECKING"} & set(dir(sdadapt))  # (its own imports)
    with pytest.raises(AttributeError, match="no attribute 'LoRAConfg'"):
        sdadapt.LoRAConfg  # noqa: B018


_FRESH_IMPORT = """
import sys, types
import sdadapt
assert "torch" not in sys.modules, "import sdadapt imported torch"
assert "LoRAConfig" in dir(sdadapt) and "inject" in dir(sdadapt)
import sdadapt.inject                         # the submodule first: the import system setattr()s it on the package
assert not isinstance(sdadapt.inject, types.ModuleType), sdadapt.inject
from sdadapt.inject import inject
assert sdadapt.inject is inject
from sdadapt import inject as again
assert again is inject
assert sdadapt.errors is sys.modules["sdadapt.errors"]   # any submodule, as the eager package made them reachable
print("ok")
"""


def test_a_fresh_import_is_torch_free_and_inject_stays_the_function():
    done = subprocess.run([sys.executable, "-c", _FRESH_IMPORT], capture_output=True, text=True, timeout=300,
                          env={**_env(), "PYTHONPATH": str(SRC)})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


_CLI_RUNNER = """
import contextlib, io, json, runpy, sys
results = []
for argv in json.loads(sys.argv[1]):
    sys.argv = ["sdadapt", *argv]
    out, err = io.StringIO(), io.StringIO()
    code = "returned"
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("sdadapt", run_name="__main__", alter_sys=True)
        except SystemExit as exc:
            code = exc.code
    results.append([argv, code, "torch" in sys.modules, out.getvalue() + err.getvalue()])
print(json.dumps(results))
"""


def _env() -> dict:
    import os

    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def test_help_version_and_usage_errors_do_not_import_torch():
    """``python -m sdadapt`` (its ``__main__``) in one fresh interpreter: each command line in turn, and torch
    must still be absent after each."""
    free = [command for command in cli._COMMAND_MODULES if command not in TORCH_AT_PARSE]
    argvs = [[], ["--help"], ["--version"], ["trian"], ["--bogus"]]
    argvs += [[command, "--help"] for command in free]
    argvs += [[command] for command in free if command not in ("demo", "merge")]  # missing required arguments
    # (bare demo and merge run: demo trains the toy model, merge prints its help from the run, exit 2)
    argvs += [["extract-lora", "a", "b", "-o", "c", "--min-d", "0.1"], ["inspect", "x", "--json", "--jsn"]]
    argvs += [["demo", "--method", "lorra"], ["train", "lorra"], ["train", "lora", "--lr-scheduler", "cosin"],
              ["train", "lora", "--network-d", "4"], ["train", "lora", "--sample-sampler", "eulr"],
              ["generate", "--sampler", "DPM++ 2M Karas"], ["generate", "--schedule", "karas"],
              ["generate", "--hires-upscaler", "lanczoz"], ["generate", "--model", "toy", "--prompt", "a", "--seed", "1"],
              ["train", "LoRA"], ["merge", "weighted_sum"], ["insepct", "x"],
              ["train", "lora", "--network_train_unet_only"], ["train", "lora", "--learning_rate_te1", "1e-5"],
              ["train", "lora", "--huggingface_repo_id", "a/b"], ["extract-lora", "a", "b", "--dim", "8", "-o", "e"],
              ["merge-lora", "--sd_model", "A", "--models", "L", "--ratios", "0.8", "--save_to", "m"]]
    done = subprocess.run([sys.executable, "-c", _CLI_RUNNER, json.dumps(argvs)], capture_output=True, text=True,
                          timeout=300, env={**_env(), "PYTHONPATH": str(SRC)})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout)
    assert [argv for argv, *_ in results] == argvs
    for argv, code, torch_loaded, text in results:
        assert not torch_loaded, f"python -m sdadapt {' '.join(argv)} imported torch"
        assert code in (0, 2), (argv, code, text)  # help/version: 0; usage errors: 2, one line
    by_argv = {" ".join(argv): (code, text) for argv, code, _, text in results}
    assert by_argv["--help"][0] == 0 and all(f"    {c}" in by_argv["--help"][1] for c in cli._COMMAND_MODULES)
    assert by_argv[""][1] == by_argv["--help"][1]
    assert by_argv["--version"][1].strip() == f"sdadapt {sdadapt.__version__}"
    assert "invalid choice: 'trian'" in by_argv["trian"][1]
    assert "--min-d: options are not abbreviated; did you mean --min-diff?" in by_argv["extract-lora a b -o c --min-d 0.1"][1]
    for command in free:
        assert by_argv[f"{command} --help"][1].startswith(f"usage: python -m sdadapt {command}"), command
    assert "argument --method: invalid choice: 'lorra'" in by_argv["demo --method lorra"][1]
    assert "argument method: invalid choice: 'lorra'" in by_argv["train lorra"][1]
    assert "invalid choice: 'cosin'" in by_argv["train lora --lr-scheduler cosin"][1]
    assert "did you mean --network-dim" in by_argv["train lora --network-d 4"][1]
    assert "invalid choice: 'eulr'" in by_argv["train lora --sample-sampler eulr"][1]
    assert "did you mean 'DPM++ 2M Karras'?" in by_argv["generate --sampler DPM++ 2M Karas"][1]
    assert "unknown schedule 'karas'" in by_argv["generate --schedule karas"][1]
    assert "argument --hires-upscaler: --hires-upscaler 'lanczoz': not one of" in by_argv["generate --hires-upscaler lanczoz"][1]
    # a whole option is no abbreviation (only -o is missing here: --prompt and --seed are options themselves)
    missing_out = by_argv["generate --model toy --prompt a --seed 1"][1]
    assert "required: -o/--out" in missing_out and "not abbreviated" not in missing_out, missing_out
    assert "invalid choice: 'LoRA', did you mean 'lora'?" in by_argv["train LoRA"][1]
    assert "invalid choice: 'weighted_sum', did you mean 'weighted-sum'?" in by_argv["merge weighted_sum"][1]
    assert "invalid choice: 'insepct', did you mean 'inspect'?" in by_argv["insepct x"][1]
    # kohya's flags (docs/train.md's table, kohya's LoRA scripts) name the option to use here
    assert "--network_train_unet_only: kohya's option; here --no-text-encoder" in \
        by_argv["train lora --network_train_unet_only"][1]
    assert "here --text-encoder-lr" in by_argv["train lora --learning_rate_te1 1e-5"][1]
    assert "--huggingface_repo_id: kohya's option is not taken here (sdadapt uploads nothing" in \
        by_argv["train lora --huggingface_repo_id a/b"][1]
    assert "--dim: kohya's script's option; here --rank" in by_argv["extract-lora a b --dim 8 -o e"][1]
    merge = by_argv["merge-lora --sd_model A --models L --ratios 0.8 --save_to m"][1]
    assert "--ratios: kohya's script's option; here --scale" in merge and "--save_to: kohya's script's option; here -o" \
        in merge, merge


def _parsers(parser: argparse.ArgumentParser, name: str = "python -m sdadapt"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child_name, child in action.choices.items():
                yield from _parsers(child, f"{name} {child_name}")


def test_the_summary_help_is_the_full_parsers_and_every_command_says_the_same_line():
    full = cli.build_parser()
    summary = cli._parser_for(["--help"])
    assert summary.format_help() == full.format_help()
    sub = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    assert {a.dest: a.help for a in sub._choices_actions} == cli._COMMAND_HELP
    assert list(sub.choices) == list(cli._COMMAND_MODULES)


def test_no_parser_takes_abbreviations():
    parsers = list(_parsers(cli.build_parser()))
    assert len(parsers) > 40  # (every command and every merge operator)
    taking = [name for name, parser in parsers if parser.allow_abbrev]
    assert not taking, taking


@pytest.mark.parametrize("argv, prefix, hint", [
    (["train", "lora", "--images", "x", "--network-d", "4"], "--network-d", "did you mean --network-dim or --network-dropout?"),
    (["train", "lora", "--images", "x", "--lr-sched", "cosine"], "--lr-sched", "did you mean --lr-scheduler"),
    (["merge", "weighted-sum", "A", "B", "--alpha", "0.5", "-o", "c", "--overw"], "--overw", "--overwrite"),
])
def test_an_abbreviated_option_is_refused_with_the_options_it_begins(argv, prefix, hint):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    line = err.getvalue()
    assert f"unrecognized arguments: {prefix}" in line and f"{prefix}: options are not abbreviated" in line, line
    assert hint in line, line


def test_skipped_layers_are_one_line_per_reason():
    te = "text encoder unchanged: its max |Δ| = 0.002 <= min_diff 0.01 (kohya's rule; --min-diff 0.0019 keeps it)"
    skipped = {f"text_encoder:layer{i}": te for i in range(72)}
    skipped.update({f"unet:block{i}": f"max |Δ| = {value} <= min_layer_diff 0.01"
                    for i, value in enumerate(["0", "3e-06", "0.0004", "1.5e-05"])})
    skipped["unet:one.bias"] = "bias delta (diff_b, norm 0.3) not written: a LoRA holds weight deltas only"
    assert skipped_lines(skipped) == [
        f"  72 × {te}: text_encoder:layer0, text_encoder:layer1, text_encoder:layer2, ... (69 more)",
        "  4 × max |Δ| = 0..0.0004 <= min_layer_diff 0.01: unet:block0, unet:block1, unet:block2, ... (1 more)",
        "  1 × bias delta (diff_b, norm 0.3) not written: a LoRA holds weight deltas only: unet:one.bias",
    ]
    assert skipped_lines({"a": "x = 1", "b": "x = 1"}, names=5) == ["  2 × x = 1: a, b"]


def test_extract_lora_prints_its_skipped_layers_one_line_per_reason(tmp_path, monkeypatch, capsys):
    """``extract-lora`` through :func:`sdadapt.cli.main`, the extraction replaced by a report as a checkpoint with an
    unchanged text encoder gives (123 text-encoder layers, kohya's min_diff rule; 3 UNet layers under
    min_layer_diff): two lines under the count, not one line a layer."""
    from sdadapt.loratools import extract
    from sdadapt.loratools.output import LoRAJobReport, LayerReport

    te = "text encoder unchanged: its max |Δ| = 0.002 <= min_diff 0.01 (kohya's rule; --min-diff 0.0019 keeps it)"
    report = LoRAJobReport(path=tmp_path / "a.safetensors", base_model="sd1",
                           layers={"unet:moved": LayerReport(2, 2.0, 0.1, 1.0)},
                           skipped={**{f"text_encoder:l{i}": te for i in range(123)},
                                    **{f"unet:u{i}": f"max |Δ| = {i}e-07 <= min_layer_diff 1e-06" for i in range(3)}})
    seen = {}
    monkeypatch.setattr(extract, "extract_lora", lambda *a, **kw: seen.update(kw) or report)
    assert cli.main(["extract-lora", "base", "tuned", "-o", str(tmp_path / "a.safetensors"), "--rank", "2", "-q"]) == 0
    assert seen["rank"] == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["skipped 126 layer(s):",
                   f"  123 × {te}: text_encoder:l0, text_encoder:l1, text_encoder:l2, ... (120 more)",
                   "  3 × max |Δ| = 0e-07, 1e-07 or 2e-07 <= min_layer_diff 1e-06: unet:u0, unet:u1, unet:u2"]
