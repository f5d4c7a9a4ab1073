"""``generate --prompt-matrix``: A1111's "Prompt matrix" script (``scripts/prompt_matrix.py``) — its combinations and
grid labels against A1111's code transcribed here, and every image against its own run."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.cli import main
from sdadapt.images import decode_png, read_png_text
from sdadapt.jobs.generate_prompt_matrix import run_prompt_matrix
from sdadapt.labelled_grid import annotate_grid, cells_grid
from sdadapt.prompt_matrix import matrix_labels, matrix_prompts

pytest.importorskip("PIL")


def _a1111_prompts(original_prompt, put_at_start, variations_delimiter):  # (Script.run, A1111 1.10)
    delimiter = ", " if variations_delimiter == "comma" else " "
    all_prompts = []
    prompt_matrix_parts = original_prompt.split("|")
    combination_count = 2 ** (len(prompt_matrix_parts) - 1)
    for combination_num in range(combination_count):
        selected_prompts = [text.strip().strip(',') for n, text in enumerate(prompt_matrix_parts[1:])
                            if combination_num & (1 << n)]
        if put_at_start:
            selected_prompts = selected_prompts + [prompt_matrix_parts[0]]
        else:
            selected_prompts = [prompt_matrix_parts[0]] + selected_prompts
        all_prompts.append(delimiter.join(selected_prompts))
    return all_prompts


def _a1111_labels(all_prompts):  # (images.draw_prompt_matrix, GridAnnotation as (text, is_active))
    prompts = all_prompts[1:]
    boundary = math.ceil(len(prompts) / 2)
    prompts_horiz = prompts[:boundary]
    prompts_vert = prompts[boundary:]
    hor_texts = [[(x, pos & (1 << i) != 0) for i, x in enumerate(prompts_horiz)]
                 for pos in range(1 << len(prompts_horiz))]
    ver_texts = [[(x, pos & (1 << i) != 0) for i, x in enumerate(prompts_vert)]
                 for pos in range(1 << len(prompts_vert))]
    return hor_texts, ver_texts


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["a cat", " hat ", ",red,", "", " on, a mat ", "x"]), min_size=1, max_size=5),
       st.booleans(), st.sampled_from(["comma", "space"]))
def test_the_combinations_and_labels_are_a1111s(parts, at_start, join):
    text = "|".join(parts)
    prompts, split = matrix_prompts(text, at_start=at_start, join=join)
    assert prompts == _a1111_prompts(text, at_start, join) and split == text.split("|")
    rows, columns, row_labels = matrix_labels(split)
    assert rows == 1 << ((len(split) - 1) // 2)
    assert (columns, row_labels) == _a1111_labels(split)
    assert len(columns) * len(row_labels) == len(prompts)


def test_a_join_that_is_neither_is_refused():
    with pytest.raises(ValueError, match="'comma' or 'space'"):
        matrix_prompts("a|b", join="tab")


def _pixels(path):
    return decode_png(path.read_bytes())[..., :3]


def test_every_image_is_its_own_runs_and_the_grid_is_a1111s(tmp_path):
    base = ["generate", "--model", "toy", "--steps", "2", "--seed", "4", "-q"]
    assert main([*base, "--prompt", "a circle | red | on the left | small", "--prompt-matrix",
                 "--prompt-matrix-different-seeds", "--grid-margin", "2", "-o", str(tmp_path / "m.png")]) == 0
    prompts = _a1111_prompts("a circle | red | on the left | small", False, "comma")
    assert len(prompts) == 8
    for i, prompt in enumerate(prompts):
        assert main([*base[:-3], "--seed", str(4 + i), "-q", "--prompt", prompt,
                     "-o", str(tmp_path / f"own{i}.png")]) == 0
        assert (tmp_path / f"m-{i:02d}.png").read_bytes() == (tmp_path / f"own{i}.png").read_bytes(), i
    cells = [_pixels(tmp_path / f"own{i}.png") for i in range(8)]
    rows, columns, row_labels = matrix_labels(["a circle ", " red ", " on the left ", " small"])
    expected = annotate_grid(cells_grid(cells, rows=rows), 32, 32, columns, row_labels, margin=2)
    assert rows == 2 and np.array_equal(_pixels(tmp_path / "m.png"), expected)
    assert read_png_text(tmp_path / "m.png") == read_png_text(tmp_path / "m-00.png")


def test_the_negative_matrix_the_same_seed_and_what_is_refused(tmp_path, capsys):
    base = ["generate", "--model", "toy", "--steps", "1", "--prompt", "a ring", "--seed", "9", "--prompt-matrix"]
    assert main([*base, "--negative", "blue | red", "--prompt-matrix-negative", "--prompt-matrix-join", "space",
                 "--prompt-matrix-at-start", "-q", "-o", str(tmp_path / "n.png")]) == 0
    texts = [read_png_text(tmp_path / f"n-{i:02d}.png")["parameters"] for i in range(2)]
    assert "Negative prompt: blue " in texts[0] and "Negative prompt: red blue " in texts[1]
    assert [int(re.search(r"Seed: (\d+)", text)[1]) for text in texts] == [9, 9]
    assert main([*base, "--prompt", "a ring | red", "--noise", "a1111", "--subseed", "5", "--subseed-strength", "0.5",
                 "-q", "-o", str(tmp_path / "v.png")]) == 0  # (A1111 hands a batch its variation seeds SUBSEED + i)
    assert [re.search(r"Variation seed: (\d+)", read_png_text(tmp_path / f"v-{i:02d}.png")["parameters"])[1]
            for i in range(2)] == ["5", "6"]
    assert main([*base, "--count", "2", "-o", str(tmp_path / "c.png")]) == 2
    assert "leave out --count 2" in capsys.readouterr().err
    assert main([*base, "--xyz-x", "Steps", "1", "-o", str(tmp_path / "x.png")]) == 2
    assert "two of A1111's scripts" in capsys.readouterr().err
    (tmp_path / "e-01.png").write_bytes(b"mine")
    assert main([*base, "--prompt", "a | b", "-o", str(tmp_path / "e.png")]) == 8
    assert not (tmp_path / "e-00.png").exists()
    with pytest.raises(ValueError, match="not with --loopback"):
        run_prompt_matrix(prompt="a | b", out=str(tmp_path / "l.png"), loopback=2)


def test_the_docs_example():
    from docs_pages import run_block_with

    run_block_with("prompts.md", "matrix_prompts(")
