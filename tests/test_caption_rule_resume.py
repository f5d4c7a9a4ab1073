"""The caption rule a run trains with is recorded, and ``--resume`` of an older state keeps its own.

A caption file's caption is its first line (kohya's ``read_caption``); runs recorded before
(``run.json`` without ``caption_lines``) trained on all its lines joined by spaces. A resumed run of
such a state keeps joining them (as ``step_shares`` keeps an old state's rounding), says so, and its
new records say ``"joined"``; a new run records ``caption_lines = "first-line"``. A record with ``vae``
and without ``caption_lines`` comes from the versions that took the first line before recording it.
"""

from __future__ import annotations

import json

import pytest
from train_inputs import captioned_pngs, lora_train_args

from sdadapt.cli import main
from sdadapt.jobs.caption_lines import recorded_caption_lines
from sdadapt.jobs.train import TrainOptions, _data_config_fallback
from sdadapt.training.data import FIRST_LINE_CAPTIONS, JOINED_CAPTIONS, find_images
from sdadapt.training.dataset_config import read_dataset_config, subset_records

TWO_LINES = "a red circle\n  second   line\n\n"


@pytest.fixture()
def multi_line(tmp_path):
    """Three images; the first's caption file has two non-empty lines."""
    return captioned_pngs(tmp_path / "imgs", [(32, 32)] * 3, caption=[TWO_LINES, "a red circle", "a blue square"])


def _captions(call) -> list[str]:
    return [record.caption for record in call.dataset.records]


def test_find_images_reads_the_first_line_or_all_lines_joined(multi_line):
    first, notes = find_images(multi_line)
    assert [r.caption for r in first] == ["a red circle", "a red circle", "a blue square"] and notes == []
    joined, notes = find_images(multi_line, caption_lines=JOINED_CAPTIONS)
    assert [r.caption for r in joined] == ["a red circle second line", "a red circle", "a blue square"]
    assert len(notes) == 1 and "1 caption file(s) of several lines" in notes[0]
    wildcard, notes = find_images(multi_line, multiline=True, caption_lines=JOINED_CAPTIONS)  # (lines kept either way)
    assert wildcard[0].caption == "a red circle\nsecond   line" and notes == []  # (kohya: lines stripped)
    with pytest.raises(ValueError, match="caption_lines must be"):
        find_images(multi_line, caption_lines="all")


def test_a_dataset_toml_subset_takes_the_rule_too(multi_line, tmp_path):
    toml = tmp_path / "data.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{multi_line.as_posix()}"\ncaption_extension = ".txt"\n')
    subset = read_dataset_config(toml, fallback=_data_config_fallback(TrainOptions(images="."))).subsets[0]
    assert subset_records(subset)[0][0].caption == "a red circle"
    assert subset_records(subset, caption_lines=JOINED_CAPTIONS)[0][0].caption == "a red circle second line"


def test_the_recorded_rule():
    assert recorded_caption_lines(None) == FIRST_LINE_CAPTIONS
    assert recorded_caption_lines({"step": 2, "caption_lines": "first-line"}) == FIRST_LINE_CAPTIONS
    assert recorded_caption_lines({"step": 2}) == JOINED_CAPTIONS
    # (the versions that took the first line before recording it wrote "vae", null without --vae)
    assert recorded_caption_lines({"step": 2, "vae": None}) == FIRST_LINE_CAPTIONS
    with pytest.raises(ValueError, match="caption_lines 'all' is not 'first-line' or 'joined'; the file was edited"):
        recorded_caption_lines({"step": 2, "caption_lines": "all"})


def test_resume_of_an_old_state_keeps_joining_and_a_new_one_takes_the_first_line(multi_line, tmp_path, train_fit_calls,
                                                                                  capsys):
    args = lora_train_args(multi_line, "--seed", "1")
    out = tmp_path / "a.safetensors"
    assert main([*args, "--steps", "1", "--save-state-on-train-end", "-o", str(out), "--quiet"]) == 0
    assert _captions(train_fit_calls[-1])[0] == "a red circle"
    record_file = tmp_path / "a-state" / "run.json"
    record = json.loads(record_file.read_text())
    assert record["caption_lines"] == "first-line"

    # resumed from an intact new state: the first line still
    assert main([*args, "--steps", "2", "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "b.safetensors"),
                 "--no-save-state", "--quiet"]) == 0
    assert _captions(train_fit_calls[-1])[0] == "a red circle"

    del record["caption_lines"]  # (a state saved by a version that took the first line before recording it)
    record_file.write_text(json.dumps(record))
    assert main([*args, "--steps", "2", "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "e.safetensors"),
                 "--no-save-state", "--quiet"]) == 0
    assert _captions(train_fit_calls[-1])[0] == "a red circle"

    del record["vae"]  # (a state saved before the rule changed: neither entry)
    record_file.write_text(json.dumps(record))
    capsys.readouterr()
    assert main([*args, "--steps", "2", "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "c.safetensors"),
                 "--save-state-on-train-end"]) == 0
    assert _captions(train_fit_calls[-1]) == ["a red circle second line", "a red circle", "a blue square"]
    assert "1 caption file(s) of several lines: all their lines joined into one caption" in capsys.readouterr().err
    record = json.loads(record_file.read_text())  # (the resumed run's end state, in the folder it resumed)
    assert record["step"] == 2 and record["caption_lines"] == "joined"  # (recorded: "vae" is in the record now)
    assert recorded_caption_lines(record) == JOINED_CAPTIONS  # (a further resume keeps joining)
