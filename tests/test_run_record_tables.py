"""run.json's option tables (captions, augmentations, noise, prior) compared by one helper for --resume."""

from pathlib import Path

import pytest

from sdadapt.jobs.train import _record_table_changes


def test_absent_table_is_unchecked_or_stands_for_its_defaults():
    now = {"flip_aug": True, "random_crop": False}
    defaults = {"flip_aug": False, "random_crop": False}
    # absent=None: a record written before the table existed is not checked
    assert _record_table_changes(Path("s"), {}, "prior", now) == []
    assert _record_table_changes(Path("s"), {"prior": None}, "prior", now) == []
    # absent={}: such a record trained with the defaults
    assert _record_table_changes(Path("s"), {}, "augmentations", now, defaults=defaults, absent={}) == [
        "flip_aug False (now True)"]


def test_missing_names_read_as_defaults_on_both_sides():
    defaults = {"caption_prefix": None, "token_warmup_min": 1}
    # a name recorded only when set (absent from `now`) and a name the old record lacks
    saved = {"shuffle_caption": False, "caption_prefix": "photo of"}
    now = {"shuffle_caption": False, "token_warmup_min": 1}
    assert _record_table_changes(Path("s"), {"captions": saved}, "captions", now, defaults=defaults) == [
        "caption_prefix 'photo of' (now None)"]
    assert _record_table_changes(Path("s"), {"captions": {"shuffle_caption": False}}, "captions", now,
                                 defaults=defaults) == []


@pytest.mark.parametrize("entry", ["captions", "augmentations", "noise", "prior"])
def test_a_table_that_is_not_a_table_is_refused(entry):
    with pytest.raises(ValueError, match=f"run.json's {entry} entry is not a table \\(list\\)"):
        _record_table_changes(Path("state"), {entry: [1]}, entry, {"x": 1})


def test_a_null_table_with_defaults_is_refused():
    """A table every record has written (absent: the defaults) that reads ``null`` was edited."""
    with pytest.raises(ValueError, match="run.json's noise entry is not a table \\(NoneType\\)"):
        _record_table_changes(Path("state"), {"noise": None}, "noise", {"zero_terminal_snr": False},
                              defaults={"zero_terminal_snr": False}, absent={})
