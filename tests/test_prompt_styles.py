"""A1111's saved prompt styles (``modules/styles.py``): ``generate --styles-file CSV --style NAME``, a prompts file's
``--styles`` and the X/Y/Z plot's Styles axis — against A1111's merge transcribed here, and the images against runs
given the merged prompts."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.prompt_styles import (
    PromptStyle,
    apply_styles,
    find_styles,
    read_styles,
    styled_prompts,
)


def _a1111_merge_prompts(style_prompt, prompt):  # (A1111 1.10 modules/styles.py)
    if "{prompt}" in style_prompt:
        res = style_prompt.replace("{prompt}", prompt)
    else:
        parts = filter(None, (prompt.strip(), style_prompt.strip()))
        res = ", ".join(parts)
    return res


def _a1111_apply_styles_to_prompt(prompt, styles):
    for style in styles:
        prompt = _a1111_merge_prompts(style, prompt)
    return prompt


_TEXT = st.sampled_from(["", " ", "a cat", " masterpiece, ", "{prompt}, best", "art of {prompt} {prompt}",
                         "(red:1.2)", "x,"])


@settings(max_examples=300, deadline=None)
@given(_TEXT, st.lists(_TEXT, max_size=4))
def test_styles_merge_as_a1111_merges_them(prompt, texts):
    assert apply_styles(prompt, texts) == _a1111_apply_styles_to_prompt(prompt, texts)


def test_a_styles_file_reads_as_a1111_reads_it(tmp_path):
    (tmp_path / "styles.csv").write_text('\ufeffname,prompt,negative_prompt\n'
                                         'photo, "a photo of {prompt}, sharp", blurry\n'
                                         '# note,ignored,\n'
                                         'ink,"ink, lines",\n'
                                         'photo,"{prompt}, a photo",grain\n', encoding="utf-8")
    (tmp_path / "styles-old.csv").write_text("name,text\nold,vintage\n", encoding="utf-8")
    table = read_styles([tmp_path / "styles*.csv"])
    assert table == {"photo": PromptStyle("photo", "{prompt}, a photo", "grain", str(tmp_path / "styles.csv")),
                     "ink": PromptStyle("ink", "ink, lines", "", str(tmp_path / "styles.csv")),
                     "old": PromptStyle("old", "vintage", "", str(tmp_path / "styles-old.csv"))}
    assert styled_prompts("a cat", "ugly", find_styles(["photo", "ink"], table)) == ("a cat, a photo, ink, lines",
                                                                                     "ugly, grain")
    with pytest.raises(InputError, match=r"--style 'inkk': no such style .*'old', 'photo', 'ink'"):
        find_styles(["inkk"], table)
    with pytest.raises(InputError, match="no such file"):
        read_styles([tmp_path / "none.csv"])
    with pytest.raises(InputError, match="no such file"):
        read_styles([tmp_path / "nothing*.csv"])
    (tmp_path / "bad.csv").write_text("title,words\na,b\n")
    with pytest.raises(InputError, match="no 'name' and 'prompt' columns"):
        read_styles([tmp_path / "bad.csv"])
    (tmp_path / "bin.csv").write_bytes(b"name,prompt\n\xff\xfe,x\n")
    with pytest.raises(InputError, match="not a CSV text file"):
        read_styles([tmp_path / "bin.csv"])


@pytest.fixture
def styles_csv(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text('name,prompt,negative_prompt\nleft,"{prompt} on the left",blue\nbig,large,"green, {prompt}"\n')
    return path


def test_a_runs_styles_make_the_image_of_the_merged_prompts(tmp_path, styles_csv):
    base = ["generate", "--model", "toy", "--steps", "2", "--seed", "1", "-q"]
    assert main([*base, "--prompt", "a red circle", "--negative", "square", "--styles-file", str(styles_csv),
                 "--style", "left", "--style", "big", "-o", str(tmp_path / "styled.png")]) == 0
    assert main([*base, "--prompt", "a red circle on the left, large", "--negative", "green, square, blue",
                 "-o", str(tmp_path / "merged.png")]) == 0
    assert (tmp_path / "styled.png").read_bytes() == (tmp_path / "merged.png").read_bytes()  # (infotext too)
    assert main([*base, "--prompt", "a", "--style", "left", "-o", str(tmp_path / "x.png")]) == 2
    assert main([*base, "--prompt", "a", "--styles-file", str(styles_csv), "--style", "huge",
                 "-o", str(tmp_path / "x.png")]) == 2


def test_a_prompts_files_styles_and_the_styles_axis(tmp_path, styles_csv):
    base = ["generate", "--model", "toy", "--steps", "2", "--seed", "1", "-q", "--styles-file", str(styles_csv)]
    (tmp_path / "p.txt").write_text('--prompt a red circle --styles "big, left"\na red circle\n')
    assert main([*base, "--prompt", "", "--style", "left", "--prompts-file", str(tmp_path / "p.txt"),
                 "-o", str(tmp_path / "p.png")]) == 0
    for k, (prompt, negative) in enumerate([("a red circle, large on the left", "green,, blue"),
                                            ("a red circle on the left", "blue")]):
        assert main(["generate", "--model", "toy", "--steps", "2", "--seed", "1", "-q", "--prompt", prompt,
                     "--negative", negative, "-o", str(tmp_path / f"own{k}.png")]) == 0
        assert (tmp_path / f"p-{k:02d}.png").read_bytes() == (tmp_path / f"own{k}.png").read_bytes(), k
    assert main([*base, "--prompt", "a ring", "--xyz-x", "Styles", '"left", "big, left"', "--xyz-no-legend",
                 "-o", str(tmp_path / "x.png")]) == 0
    for k, prompt in enumerate(["a ring on the left", "a ring, large on the left"]):
        negative = ["blue", "green,, blue"][k]
        assert main(["generate", "--model", "toy", "--steps", "2", "--seed", "1", "-q", "--prompt", prompt,
                     "--negative", negative, "-o", str(tmp_path / f"ax{k}.png")]) == 0
        assert (tmp_path / f"x-{k:02d}.png").read_bytes() == (tmp_path / f"ax{k}.png").read_bytes(), k


def test_the_docs_example():
    from docs_pages import run_block_with

    run_block_with("prompts.md", "styled_prompts(")
