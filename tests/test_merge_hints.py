"""Block weights given to a command that does not take them, and other mergers' recipe fields: the
message names the command or the recipe field that does it (and nothing is written)."""

from __future__ import annotations

import json

import pytest

from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.formats.files import WeightFileError
from sdadapt.merge.engine import merge_file
from sdadapt.merge.recipe import RECIPE_FORMAT, load_recipe, step_from_dict
from test_merge_engine import mini, save

SD1 = ",".join(["0.5"] * 26)


@pytest.fixture
def files(tmp_path):
    return [save(tmp_path, f"{n}.safetensors", mini(i)) for i, n in enumerate("abc")]


def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["merge", *argv])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


@pytest.mark.parametrize("operator, inputs", [("weighted-sum", "AB"), ("add-difference", "ABC")])
@pytest.mark.parametrize("flag", ["--block-weights", "--mbw", "--weights", "--base-alpha"])  # --alpha LIST runs: test_merge_cli_leftovers.py
def test_per_block_weights_on_weighted_sum_name_block_weighted(tmp_path, files, capsys, operator, inputs, flag):
    out = tmp_path / "o.safetensors"
    values = "0.2" if flag == "--base-alpha" else SD1
    err = _error(capsys, [operator, *files[: len(inputs)], flag, values, "-o", str(out)])
    # before argparse would say "--alpha is required": the flag itself is answered
    assert "required" not in err and flag in err
    assert f"block-weighted {' '.join(inputs)} --weights" in err and f"{operator} takes one --alpha" in err
    assert not out.exists()


def test_the_block_weighted_command_the_hint_names_runs(tmp_path, files, capsys):
    # (the hint's command is real: the same block weights through it write the file)
    assert main(["merge", "block-weighted", *files[:2], "--weights", SD1, "-o", str(tmp_path / "o.safetensors")]) == 0


@pytest.mark.parametrize("operator, want", [
    ("cosine-a", 'cosine-a takes one --alpha or one per block: --alpha W,W,'),
    ("ties", "ties takes one --lam (block weights scale it)"),
    ("model-stock", "model-stock has no strength to set per block"),
])
def test_other_operators_point_at_the_recipe_field(tmp_path, files, capsys, operator, want):
    inputs = files[:2] if operator == "cosine-a" else files
    err = _error(capsys, [operator, *inputs, "--block-weights", SD1, "-o", str(tmp_path / "o.safetensors")])
    assert want in err


def test_a_plain_alpha_and_a_bad_one_still_parse_as_before(tmp_path, files, capsys):
    assert main(["merge", "weighted-sum", *files[:2], "--alpha", "0.25", "-o", str(tmp_path / "o.safetensors"),
                 "-q", "--no-recipe"]) == 0
    capsys.readouterr()
    assert "argument --alpha: invalid float value: 'x'" in _error(capsys, ["weighted-sum", *files[:2], "--alpha", "x",
                                                                            "-o", str(tmp_path / "p.safetensors")])


def test_the_recipe_the_hint_describes_takes_block_weights_for_cosine(tmp_path, files):
    # what the cosine-a hint says to write is a recipe that runs
    recipe = {"format": RECIPE_FORMAT, "version": 1, "step": {
        "operator": "cosine-a", "inputs": [{"path": files[0]}, {"path": files[1]}],
        "block_weights": [0.1 * (i % 5) for i in range(26)]}}
    path = tmp_path / "r.json"
    path.write_text(json.dumps(recipe))
    step, _ = load_recipe(path)
    assert step.block_weights is not None and step.alpha is None
    merge_file(step, tmp_path / "o.safetensors", save_recipe=False)


# ------------------------------------------------------------------ recipe fields copied from supermerger / A1111

_BASE = {"operator": "cosine-a", "inputs": [{"path": "a"}, {"path": "b"}], "alpha": 0.1}


@pytest.mark.parametrize("field, value, want", [
    ("calcmode", "cosineA", 'cosineA -> "cosine-a"'),
    ("mode", "Weight sum", '"Weight sum" -> "weighted-sum"'),
    ("weights_alpha", "0,1,1", '"block_weights": a list of 26'),
    ("weights_beta", "0,1,1", '"block_beta"'),
    ("mbw", True, '"block_weights"'),
    ("model_b", "0" * 64, '"inputs": [{"path": A}'),
    ("base_beta", 0.2, "takes no beta"),
    ("elemental_merge", "IN04:attn2:1", '"elemental"'),
    ("Exclude", "IN04:", '"policy": {"exclude"'),
    ("multiplier", 0.3, '"alpha"'),
    ("save_as_half", True, '"dtype": "fp16"'),
    ("weights_clip", True, '"options": {"weights_clip"'),
])
def test_a_copied_supermerger_field_is_named_with_what_a_step_calls_it(field, value, want):
    with pytest.raises(InputError) as refused:
        step_from_dict({**_BASE, field: value})
    message = str(refused.value)
    assert f"unknown field(s) ['{field}'] ({field}: " in message and want in message


def test_a_field_no_merger_has_gets_no_made_up_hint():
    with pytest.raises(InputError) as refused:
        step_from_dict({**_BASE, "alhpa": 0.1})
    assert "unknown field(s) ['alhpa']; a step has" in str(refused.value)


def test_a_supermerger_sd_merge_recipe_file_says_what_to_write(tmp_path):
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"type": "sd-webui-supermerger", "calcmode": "cosineA", "mode": "Weight sum",
                                "model_a": "0" * 64, "mbw": False}))
    with pytest.raises(WeightFileError, match=r"supermerger's sd_merge_recipe, which records input hashes, not files"):
        load_recipe(path)


# ------------------------------------------------------------------ review additions


def test_an_a1111_sd_merge_recipe_file_is_named_as_a1111s(tmp_path):
    # (review) A1111's modelmerger records {"type": "webui", "primary_model_hash": ..., "interp_method": ...}
    path = tmp_path / "recipe.json"
    path.write_text(json.dumps({"type": "webui", "primary_model_hash": "0" * 64, "secondary_model_hash": "1" * 64,
                                "tertiary_model_hash": None, "interp_method": "Weighted sum", "multiplier": 0.3}))
    with pytest.raises(WeightFileError, match=r"AUTOMATIC1111's sd_merge_recipe, which records input hashes"):
        load_recipe(path)


@pytest.mark.parametrize("operator, inputs, argv, hint", [
    ("triple-sum", 3, ["--alpha", "0.2", "--b", "0.1"], "--b: options are not abbreviated; did you mean --beta?"),
    ("weighted-sum", 2, ["--alpha", "0.2", "--weight"],
     "--weight: options are not abbreviated; did you mean --weights-clip?"),
])
def test_an_abbreviation_is_refused_naming_the_visible_options_it_begins(tmp_path, files, capsys, operator, inputs,
                                                                          argv, hint):
    """No abbreviations (a prefix's meaning changes when an option is added); the hint names only the options
    ``--help`` shows, not the hidden block-weight flags that catch other tools' names (--base-alpha, --weights)."""
    out = tmp_path / "o.safetensors"
    with pytest.raises(SystemExit) as exited:
        main(["merge", operator, *files[:inputs], *argv, "-o", str(out), "-q", "--no-recipe"])
    assert exited.value.code == 2 and not out.exists()
    assert hint in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--mbw", "True"], ["--base-alpha", "x"], ["--block-weights", "0.5 0.5"]])
def test_a_block_weight_flag_with_any_value_gets_the_hint(tmp_path, files, capsys, argv):
    err = _error(capsys, ["weighted-sum", *files[:2], "--alpha", "0.3", *argv, "-o", str(tmp_path / "o.safetensors")])
    assert "block-weighted A B --weights" in err


@pytest.mark.parametrize("field", ["beta", "base_beta"])
def test_a_beta_field_on_an_operator_without_beta_is_not_sent_to_options(field):
    with pytest.raises(InputError) as refused:
        step_from_dict({**_BASE, field: 0.2})  # cosine-a: alpha and weights_clip only
    assert '"options": {"beta"' not in str(refused.value) and "takes no beta" in str(refused.value)
    # (an operator with a beta: the field goes in "options")
    with pytest.raises(InputError, match='"options": {"beta"'):
        step_from_dict({**_BASE, "operator": "triple-sum", field: 0.2})
