"""A kohya sd-scripts user's command line as kohya spells it: ``train`` refuses the underscore flags (the kohya
names work in ``--config`` files, docs/train.md) and names, for each, the flag to give — from the same tables the
config reader uses (``KOHYA_KEYS``, ``KOHYA_IGNORED``), so a flag and a TOML key are read alike."""

from __future__ import annotations

import pytest

from sdadapt.cli import build_parser
from sdadapt.cli.train import KOHYA_IGNORED, KOHYA_KEYS


def _error(argv: list[str], capsys) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(argv)
    assert info.value.code == 2
    return capsys.readouterr().err


def test_kohyas_output_and_ignored_flags_name_what_to_do(capsys):
    err = _error(["train", "lora", "--images", "data", "--output_dir", "out", "--output_name", "x",
                  "--network_module", "networks.lora", "--xformers", "--save_model_as", "safetensors"], capsys)
    assert "--output_dir: kohya's --output_dir and --output_name are one option here: -o DIR/NAME.safetensors" in err
    assert "--output_name: kohya's" in err
    for flag in ("network_module", "xformers", "save_model_as"):
        assert f"--{flag}: kohya's option has no counterpart here ({KOHYA_IGNORED[flag]}); leave it out" in err
    assert err.count("\n") == 1  # (one line, as every usage error)


@pytest.mark.parametrize(("kohya", "ours"), [("save_precision", "--dtype"), ("dataset_repeats", "--repeats"),
                                              ("learning_rate_te", "--text-encoder-lr"),
                                              ("caption_extention", "--caption-extension")])
def test_a_renamed_kohya_flag_names_the_sdadapt_flag_of_its_toml_key(kohya, ours, capsys):
    assert ours == "--" + KOHYA_KEYS[kohya].replace("_", "-")  # (the config reader's table)
    err = _error(["train", "lora", f"--{kohya}", "1"], capsys)
    assert f"--{kohya}: kohya's name; here {ours}" in err


def test_a_kohya_name_that_is_an_option_with_dashes_keeps_did_you_mean(capsys):
    err = _error(["train", "lora", "--max_train_steps", "2", "--network_dim", "4"], capsys)
    assert "--max_train_steps: did you mean --max-train-steps?" in err
    assert "--network_dim: did you mean --network-dim?" in err


def test_other_commands_and_other_flags_are_untouched(capsys):
    err = _error(["generate", "--prompt", "x", "-o", "x.png", "--output_dir", "out"], capsys)
    assert "kohya" not in err  # (generate is no kohya tool)
    err = _error(["train", "lora", "--netwrok-alpha", "4"], capsys)
    assert "--netwrok-alpha: did you mean --network-alpha?" in err and "kohya" not in err


def test_a_toml_key_without_a_flag_is_not_offered_as_one(monkeypatch, capsys):
    """A kohya name whose sdadapt key is TOML-only gets no made-up flag (the hint names only options that exist)."""
    from sdadapt.cli import train

    monkeypatch.setitem(train.KOHYA_KEYS, "some_kohya_key", "not_a_train_option")
    err = _error(["train", "lora", "--some_kohya_key", "1"], capsys)
    assert "--not-a-train-option" not in err and "kohya's name" not in err
