"""``generate --count N --grid``: A1111's batch grid (``images.image_grid`` at its default rows), and
``--prompts-file -`` (standard input)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from sdadapt.cli import main
from sdadapt.images import decode_png, read_png_text
from sdadapt.jobs.generate_grid import batch_grid_rows
from sdadapt.labelled_grid import cells_grid


def _a1111_rows(n):  # (image_grid with rows None: opts.n_rows -1, grid_prevent_empty_spots False)
    rows = round(math.sqrt(n))
    return min(rows, n)


@pytest.mark.parametrize("n", range(1, 40))
def test_rows_are_a1111s_default(n):
    assert batch_grid_rows(n) == _a1111_rows(n)


def _pixels(path):
    return decode_png(path.read_bytes())[..., :3]


def test_the_grid_of_a_runs_images(tmp_path, capsys):
    base = ["generate", "--model", "toy", "--prompt", "a red circle", "--steps", "1", "--seed", "2", "-q"]
    assert main([*base, "--count", "5", "--grid", "-o", str(tmp_path / "b.png")]) == 0
    cells = [_pixels(tmp_path / f"b-{i:02d}.png") for i in range(5)]
    assert np.array_equal(_pixels(tmp_path / "b.png"), cells_grid(cells, rows=2))  # (3 columns, 2 rows, one white)
    assert read_png_text(tmp_path / "b.png") == read_png_text(tmp_path / "b-00.png")
    assert main([*base, "--count", "5", "--grid", "-o", str(tmp_path / "b.png")]) == 8  # (the grid exists)
    assert main([*base, "--grid", "-o", str(tmp_path / "one.png")]) == 2
    assert "2 or more" in capsys.readouterr().err
    assert not (tmp_path / "one.png").exists()


def test_a_prompts_file_from_standard_input(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"a red circle\na blue square\n")))
    assert main(["generate", "--model", "toy", "--steps", "1", "--prompt", "", "--prompts-file", "-", "-q",
                 "-o", str(tmp_path / "s.png")]) == 0
    assert "a blue square" in read_png_text(tmp_path / "s-01.png")["parameters"]
