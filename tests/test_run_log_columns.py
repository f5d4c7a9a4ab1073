"""The run's CSV / TensorBoard log carries kohya's max-norm statistics with ``--scale-weight-norms``.

kohya (train_network.py ``generate_step_logs``) logs ``max_norm/keys_scaled``,
``max_norm/max_key_norm`` and ``norm/avg_key_norm`` at each step when ``--scale_weight_norms`` is on.
sdadapt's CSV gets them as the columns ``keys_scaled, average_key_norm, max_key_norm`` after
``step, epoch, loss, lr, seconds``; a resumed run appends under the header the file has (a column
it adds is added to the header, the older rows left empty there).
"""

from __future__ import annotations

import csv

import pytest

from sdadapt.cli import main
from sdadapt.training.monitor import MAX_NORM_COLUMNS, RunLog

STATS = {"keys_scaled": 3.0, "average_key_norm": 0.25, "max_key_norm": 1.0}


def _rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.reader(handle))


def test_columns_follow_the_options_at_the_first_write(tmp_path):
    path = tmp_path / "log.csv"
    with RunLog(path, extra=MAX_NORM_COLUMNS) as log:
        log.step(1, 1, 0.5, 1e-4, STATS)
        log.step(2, 1, 0.25, 1e-4, None)  # a step without the statistics: empty cells
    rows = _rows(path)
    assert rows[0] == ["step", "epoch", "loss", "lr", "seconds", "keys_scaled", "average_key_norm", "max_key_norm"]
    assert rows[1][:4] == ["1", "1", "0.5", "0.0001"] and rows[1][5:] == ["3", "0.25", "1"]
    assert rows[2][5:] == ["", "", ""]
    with RunLog(tmp_path / "plain.csv") as log:
        log.step(1, 1, 0.5, 1e-4, STATS)  # (no such columns: not written)
    assert _rows(tmp_path / "plain.csv") == [list(RunLog.FIELDS), _rows(tmp_path / "plain.csv")[1]]
    assert len(_rows(tmp_path / "plain.csv")[1]) == 5


def test_appending_keeps_one_consistent_header(tmp_path):
    path = tmp_path / "log.csv"
    with RunLog(path) as log:  # the first run: without --scale-weight-norms
        for step in (1, 2, 3):
            log.step(step, 1, 0.5, 1e-4)
    # resumed at step 2 with the option on: step 3 is dropped, the columns are added, old rows padded
    with RunLog(path, append=True, after_step=2, extra=MAX_NORM_COLUMNS) as log:
        assert log.columns == (*RunLog.FIELDS, *MAX_NORM_COLUMNS)
        log.step(3, 1, 0.4, 1e-4, STATS)
    rows = _rows(path)
    assert rows[0] == [*RunLog.FIELDS, *MAX_NORM_COLUMNS]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3"] and all(len(r) == len(rows[0]) for r in rows)
    assert rows[1][5:] == ["", "", ""] and rows[3][5:] == ["3", "0.25", "1"]
    # resumed again without the option: the header stays, the new row is empty there
    with RunLog(path, append=True, after_step=3) as log:
        assert log.columns == tuple(rows[0])
        log.step(4, 2, 0.3, 1e-4)
    rows = _rows(path)
    assert rows[0] == [*RunLog.FIELDS, *MAX_NORM_COLUMNS] and rows[4][0] == "4" and rows[4][5:] == ["", "", ""]
    before = path.read_text()
    with RunLog(path, append=True, extra=MAX_NORM_COLUMNS) as log:  # same columns: a plain append
        log.step(5, 2, 0.2, 1e-4, STATS)
    assert path.read_text().startswith(before) and _rows(path)[5][5:] == ["3", "0.25", "1"]


def test_appending_to_another_file_is_refused(tmp_path):
    path = tmp_path / "log.csv"
    path.write_text("name,value\na,1\n")
    with pytest.raises(ValueError, match="log.csv: not a training log"):
        RunLog(path, append=True, after_step=0)
    assert path.read_text() == "name,value\na,1\n"


def test_tensorboard_gets_kohyas_tags(tmp_path, tensorboard_scalars):
    scalars = tensorboard_scalars
    with RunLog(tmp_path / "log.csv", tensorboard=tmp_path / "tb", extra=MAX_NORM_COLUMNS) as log:
        log.step(7, 1, 0.5, 1e-4, STATS)
    assert scalars == [("loss", 0.5, 7), ("lr", 1e-4, 7), ("max_norm/keys_scaled", 3.0, 7),
                       ("norm/avg_key_norm", 0.25, 7), ("max_norm/max_key_norm", 1.0, 7)]


def test_train_writes_the_statistics_and_resume_appends(red_circles, tmp_path):
    out = tmp_path / "l.safetensors"
    common = ["train", "lora", "--images", str(red_circles), "--batch-size", "2", "--no-prior", "--lr", "0.05",
              "--scale-weight-norms", "0.01", "--log-with", "csv", "-q"]
    assert main([*common, "--steps", "3", "--save-every-n-steps", "2", "-o", str(out)]) == 0
    log = tmp_path / "l-log.csv"
    with open(log, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    for row in rows:
        scaled, average, largest = (float(row[c]) for c in MAX_NORM_COLUMNS)
        assert scaled == int(scaled) >= 0 and 0 <= average <= largest <= 0.01 * (1 + 1e-5)
    assert any(float(r["keys_scaled"]) > 0 for r in rows)  # LR 0.05 pushes adapters past 0.01
    assert main([*common, "--steps", "3", "--resume", str(tmp_path / "l-state"), "-o", str(out), "--overwrite"]) == 0
    again = _rows(log)
    assert again[0] == [*RunLog.FIELDS, *MAX_NORM_COLUMNS] and [r[0] for r in again[1:]] == ["1", "2", "3"]
    assert all(len(r) == len(again[0]) and r[5] != "" for r in again[1:])
