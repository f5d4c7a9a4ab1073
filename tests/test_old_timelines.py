"""A1111's "Use old prompt editing timelines" in ``generate`` (``--old-prompt-editing-timelines``): the plans of both
passes made with :func:`sdadapt.prompt_schedule.prompt_schedule`'s ``old_scheduling``, "Old prompt editing timelines:
True" written where they change a schedule (A1111's ``get_conds_with_caching`` compares the old and new schedules of
the texts it encodes, the hires pass's too), read back, and turned on by A1111's backcompat for a prompt with ``[``
made before v1.6.0; and the third rule, "Pad conds v0" for an old DDIM / PLMS text."""

from __future__ import annotations

import pytest

from sdadapt.prompt_schedule import prompt_schedule


@pytest.mark.parametrize("prompt,first,hires,differs", [
    ("a [red:blue:1.0] circle", 10, None, True),  # (old: 1.0 is no fraction below 1, step 1; new: all 10 steps)
    ("a [red:blue:0.5] circle", 10, None, False),  # (a fraction in both)
    ("a [red:blue:3] circle", 10, None, False),  # (a step number in both)
    ("a [red:blue:12] circle", 10, ("euler", 6, None, None), True),  # (new: hires step 2; old: the first pass's plan)
    ("a red circle", 10, ("euler", 6, None, None), True),  # (A1111's hires schedules: the old of 10 steps, new 6)
    ("a red circle", 10, ("euler", 10, None, None), False),
    ("a circle", 10, ("euler", 6, "a [red:blue:1.0] circle", None), True),  # (the hires prompt's own)
])
def test_the_field_is_written_where_the_old_timelines_change_a_schedule(prompt, first, hires, differs):
    from sdadapt.jobs.generate import _old_timelines_differ

    assert _old_timelines_differ(prompt, "", sampler="euler", steps=first, clean=None, hires=hires) is differs
    # (the rule itself, written out for the first case: A1111 1.5's "when < 1: fraction" and 1.6's "has a '.'")
    assert prompt_schedule("a [red:blue:1.0] circle", 10, old_scheduling=True) == [(1, "a red circle"),
                                                                                    (10, "a blue circle")]
    assert prompt_schedule("a [red:blue:1.0] circle", 10) == [(10, "a red circle")]


@pytest.mark.parametrize("version,prompt,old", [
    ("v1.5.2", "a [red:blue:0.5] circle", True), ("v1.6.0-RC-12-gabc", "a [red:blue:0.5] circle", True),
    ("v1.6.0", "a [red:blue:0.5] circle", False), ("v1.5.2", "a red circle", False),
    ("f0.0.17v1.8.0rc-latest-276-g29be1da7", "a [red:blue:0.5] circle", False), (None, "a [b:c:1.0]", False)])
def test_an_old_infotext_turns_them_on_as_a1111s_backcompat(version, prompt, old):
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    text = f"{prompt}\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512"
    options, _ = infotext_options(parse_infotext(text + ("" if version is None else f", Version: {version}")))
    assert options.get("old_prompt_editing_timelines", False) is old
    written, not_taken = infotext_options(parse_infotext(text + ", Old prompt editing timelines: True"))
    assert written["old_prompt_editing_timelines"] is True and not [line for line in not_taken if "Old" in line]


def test_generate_plans_with_them_writes_the_field_and_reads_it_back(tmp_path):
    pytest.importorskip("PIL")
    import numpy as np
    from PIL import Image

    from sdadapt.cli import main

    base = ["generate", "--model", "toy", "--steps", "6", "--sampler", "Euler", "--seed", "3"]
    edit = ["--prompt", "a [red:blue:1.0] circle"]
    assert main([*base, *edit, "--old-prompt-editing-timelines", "--out", str(tmp_path / "old.png")]) == 0
    text = Image.open(tmp_path / "old.png").text["parameters"]
    assert "RNG: CPU, Old prompt editing timelines: True" in text
    assert main(["generate", "--model", "toy", "--infotext", str(tmp_path / "old.png"),
                 "--out", str(tmp_path / "again.png")]) == 0
    assert main([*base, *edit, "--out", str(tmp_path / "new.png")]) == 0
    assert main([*base, "--prompt", "a red circle", "--out", str(tmp_path / "red.png")]) == 0
    assert main([*base, "--prompt", "a [red:blue:0.5] circle", "--old-prompt-editing-timelines",
                 "--out", str(tmp_path / "same.png")]) == 0
    old, again, new, red = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in ("old", "again", "new", "red"))
    assert np.array_equal(old, again) and not np.array_equal(old, new)
    assert np.array_equal(new, red)  # (new timelines: [red:blue:1.0] is red all through)
    assert "Old prompt editing" not in Image.open(tmp_path / "same.png").text["parameters"]


@pytest.mark.parametrize("sampler,version,v0", [("DDIM", "v1.5.2", True), ("PLMS", "v1.5.1-12-gabc", True),
                                                ("DDIM", "v1.6.0", False), ("Euler a", "v1.5.2", False),
                                                ("DDIM", None, False)])
def test_an_old_ddim_infotext_pads_as_a1111s_backcompat(sampler, version, v0):
    """A1111's third backcompat rule: Sampler DDIM / PLMS before v1.6.0 padded the negative as "Pad conds v0" does."""
    from sdadapt.jobs.infotext_read import infotext_options, parse_infotext

    text = f"a cat\nSteps: 20, Sampler: {sampler}, CFG scale: 7, Seed: 1"
    options, _ = infotext_options(parse_infotext(text + ("" if version is None else f", Version: {version}")))
    assert options.get("pad_conds_v0", False) is v0
    options, _ = infotext_options(parse_infotext(text + ", Pad conds: True, Version: v1.5.2"))
    assert "pad_conds_v0" not in options  # (the text's own padding wins)

