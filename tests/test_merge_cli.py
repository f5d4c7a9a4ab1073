"""``python -m sdadapt merge ...``: every command form, --help, errors, recipe replay."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from sdadapt.cli import main
from sdadapt.merge.engine import merge_file
from sdadapt.merge.recipe import MergeStep
from test_merge_engine import U, load_file_metadata, mini, save
from docs_pages import run_block


@pytest.fixture
def files(tmp_path):
    return [save(tmp_path, f"{n}.safetensors", mini(i)) for i, n in enumerate("abcd")]


def run(*argv: str) -> int:
    return main(["merge", *argv])


def same_tensors(x, y) -> bool:
    a, b = load_file(x), load_file(y)
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("command, flags", [
    ("weighted-sum", ["--alpha"]), ("add-difference", ["--alpha"]), ("ties", ["--density", "--lam", "--normalize"]),
    ("dare", ["--drop", "--seed", "--consensus", "--rescale"]), ("slerp", ["--alpha"]),
    ("block-weighted", ["--weights", "--base-alpha"]), ("task-arithmetic", ["--lam", "--weights"]),
    ("model-stock", []), ("train-difference", ["--alpha"]),
])
def test_every_command_has_help(command, flags, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(command, "--help")
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert all(f in text for f in [*flags, "-o OUT", "--overwrite", "--quiet", "--dtype", "--no-recipe", "--reset-position-ids"])


def test_merge_help_names_the_recipe_replay(capsys):
    with pytest.raises(SystemExit):
        run("--help")
    text = capsys.readouterr().out
    assert "--recipe" in text and "weight of the SECOND" in text


@pytest.mark.parametrize("argv, step", [
    (["weighted-sum", "{a}", "{b}", "--alpha", "0.3"], MergeStep("weighted-sum", ("{a}", "{b}"), alpha=0.3)),
    (["add-difference", "{a}", "{b}", "{c}", "--alpha", "1.0"], MergeStep("add-difference", ("{a}", "{b}", "{c}"), alpha=1.0)),
    (["ties", "{a}", "{b}", "{c}", "{d}", "--density", "0.2"],
     MergeStep("ties", ("{a}", "{b}", "{c}", "{d}"), options={"density": 0.2, "lam": 1.0, "normalize": True})),
    (["dare", "{a}", "{b}", "{c}", "--drop", "0.9", "--seed", "0"],
     MergeStep("dare", ("{a}", "{b}", "{c}"), options={"drop": 0.9, "consensus": "sum", "lam": 1.0, "rescale": True},
               seed=0)),
    (["ties", "{a}", "{b}", "{c}", "--weights", "0.5,2", "--no-normalize", "--lam", "0.7"],
     MergeStep("ties", ("{a}", "{b}", "{c}"), weights=(0.5, 2.0), options={"density": 0.2, "lam": 0.7, "normalize": False})),
    (["block-weighted", "{a}", "{b}", "{c}", "--weights", ",".join(["1"] * 25), "--base-alpha", "0.5"],
     MergeStep("add-difference", ("{a}", "{b}", "{c}"), block_weights=tuple([1.0] * 25), base_alpha=0.5)),
    (["slerp", "{a}", "{b}", "--alpha", "0.5"], MergeStep("slerp", ("{a}", "{b}"), alpha=0.5)),
    (["block-weighted", "{a}", "{b}", "--weights", ",".join(["0"] + ["1"] * 25)],
     MergeStep("weighted-sum", ("{a}", "{b}"), block_weights=tuple([0.0] + [1.0] * 25))),
    (["model-stock", "{a}", "{b}", "{c}", "--dtype", "fp32"], MergeStep("model-stock", ("{a}", "{b}", "{c}"), dtype="fp32")),
])
def test_commands_write_what_the_library_writes(tmp_path, files, argv, step, capsys):
    names = dict(zip("abcd", files))
    fill = [a.format(**names) for a in argv]
    assert run(*fill, "-o", str(tmp_path / "cli.safetensors"), "-q") == 0
    assert "wrote" in capsys.readouterr().out
    inputs = tuple(i.format(**names) for i in step.inputs)
    merge_file(MergeStep(step.operator, inputs, alpha=step.alpha, weights=step.weights, options=step.options, seed=step.seed,
                         dtype=step.dtype, block_weights=step.block_weights, base_alpha=step.base_alpha),
               tmp_path / "lib.safetensors")
    assert same_tensors(tmp_path / "cli.safetensors", tmp_path / "lib.safetensors")
    assert (tmp_path / "cli.safetensors").read_bytes() == (tmp_path / "lib.safetensors").read_bytes()  # recipe too


def test_recipe_replay_is_bit_exact(tmp_path, files, capsys):
    out = tmp_path / "dare.safetensors"
    assert run("dare", *files[:3], "--drop", "0.5", "--seed", "3", "--dtype", "bf16", "-o", str(out), "-q") == 0
    assert run("--recipe", str(out), "-o", str(tmp_path / "replay.safetensors"), "-q") == 0
    assert (tmp_path / "replay.safetensors").read_bytes() == out.read_bytes()
    recipe = tmp_path / "recipe.json"
    recipe.write_text(load_file_metadata(out)["sdadapt_merge_recipe"])
    assert run("--recipe", str(recipe), "-o", str(tmp_path / "from_json.safetensors"), "-q") == 0
    assert (tmp_path / "from_json.safetensors").read_bytes() == out.read_bytes()
    assert json.loads(recipe.read_text())["step"]["seed"] == 3


def test_errors_are_one_line_and_name_the_problem(tmp_path, files, capsys):
    a, b = files[:2]
    assert run("weighted-sum", a, str(tmp_path / "missing.safetensors"), "--alpha", "0.5", "-o", str(tmp_path / "o.safetensors")) == 3  # WeightFileError
    assert "missing.safetensors: no such file" in capsys.readouterr().err
    (tmp_path / "exists.safetensors").write_bytes(b"x")
    assert run("weighted-sum", a, b, "--alpha", "0.5", "-o", str(tmp_path / "exists.safetensors")) == 8  # OutputExistsError
    assert "--overwrite" in capsys.readouterr().err
    assert run("weighted-sum", a, b, "--alpha", "0.5", "-o", str(tmp_path / "exists.safetensors"), "--overwrite", "-q") == 0
    wide = mini(5)
    wide[U + "out.2.weight"] = torch.zeros(4, 16, 3, 3, dtype=torch.float16)
    other = save(tmp_path, "other.safetensors", wide)
    assert run("weighted-sum", a, other, "--alpha", "0.5", "-o", str(tmp_path / "m.safetensors")) == 6  # MergeError
    assert "out.2.weight" in capsys.readouterr().err
    assert run("block-weighted", a, b, "--weights", "1,1,1", "-o", str(tmp_path / "bw.safetensors")) == 2
    assert "give 26 values" in capsys.readouterr().err
    assert run("--recipe", a, "-o", str(tmp_path / "r.safetensors")) == 3
    assert "no sdadapt_merge_recipe" in capsys.readouterr().err


def test_not_enough_disk_space_is_checked_before_writing(tmp_path, files, monkeypatch, capsys):
    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    assert run("weighted-sum", *files[:2], "--alpha", "0.5", "-o", str(tmp_path / "o.safetensors")) == 9  # DiskSpaceError
    assert "not enough disk space" in capsys.readouterr().err
    assert not (tmp_path / "o.safetensors").exists()


def test_progress_bar_goes_to_stderr_and_the_module_runs(tmp_path, files):
    out = subprocess.run(
        [sys.executable, "-m", "sdadapt", "merge", "weighted-sum", *files[:2], "--alpha", "0.5", "-o", str(tmp_path / "o.safetensors")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "merged" in out.stdout and "wrote" in out.stdout
    assert "merge weighted-sum" in out.stderr  # the bar (tqdm or built-in), not on stdout


def test_docs_example_runs(tmp_path, capsys):
    namespace = run_block("merge.md")
    out = capsys.readouterr().out
    assert "Add difference" in out and "True" in out
    assert namespace["report"].flags["is_inpainting"]


def test_recipe_replay_takes_the_shared_output_options(tmp_path, files, capsys):
    out = tmp_path / "ws.safetensors"
    assert run("weighted-sum", *files[:2], "--alpha", "0.5", "-o", str(out), "-q") == 0
    replay = tmp_path / "replay.safetensors"
    assert run("--recipe", str(out), "-o", str(replay), "--dtype", "fp32", "-q") == 0
    assert capsys.readouterr().err == ""  # -q: no bar
    assert all(v.dtype == torch.float32 for v in load_file(replay).values() if v.is_floating_point())
    assert json.loads(load_file_metadata(replay)["sdadapt_merge_recipe"])["step"]["dtype"] == "fp32"
    assert run("--recipe", str(out), "-o", str(replay), "-q") == 8  # exists: OutputExistsError
    assert "--overwrite" in capsys.readouterr().err
    assert run("--recipe", str(out), "-o", str(replay), "--overwrite", "-q") == 0
    assert replay.read_bytes() == out.read_bytes()  # --dtype keep: as recorded, bit-exact


def test_output_options_before_the_operator_are_refused(tmp_path, files, capsys):
    assert run("-q", "weighted-sum", *files[:2], "--alpha", "0.5", "-o", str(tmp_path / "o.safetensors")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: -q before the operator name") and "put them after it" in err
    assert not (tmp_path / "o.safetensors").exists()
