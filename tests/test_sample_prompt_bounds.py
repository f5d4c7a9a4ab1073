"""A sample prompt's size and steps as kohya's ``sample_image_inference`` takes them, fixed before training starts:
``--w 17`` on a model whose VAE factor is 2 (kohya's: any multiple of 8) or ``--s 0`` passed the prompt-file parse and
stopped the run at its first sample point, after training steps and before the adapter was written."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from tiny_checkpoints import tiny_sd1_parts, write_single_file

from sdadapt.cli import main
from sdadapt.images import write_png
from sdadapt.sampling import SamplePrompt, fit_sample_prompt


@given(steps=st.integers(-5, 1500) | st.none(), width=st.integers(1, 300) | st.none(),
       height=st.integers(1, 300) | st.none(), multiple=st.sampled_from([4, 8, 64]))
def test_steps_are_held_to_kohyas_range_and_sides_rounded_down(steps, width, height, multiple):
    prompt = SamplePrompt("a cat", steps=steps, width=width, height=height, seed=3)
    fitted, notes = fit_sample_prompt(prompt, multiple=multiple)
    # kohya's sample_image_inference (sd-scripts 48d368fa train_util.py:6276-6279, 6541-6542): max(1, min(1000, s));
    # sides: max(64, s - s % 8) — here the model's own multiple in place of 8 and 64
    assert fitted.steps == (None if steps is None else max(1, min(1000, steps)))
    for got, given_side in ((fitted.width, width), (fitted.height, height)):
        assert got == (None if given_side is None else max(multiple, given_side - given_side % multiple))
    changed = sum(a != b for a, b in ((fitted.steps, steps), (fitted.width, width), (fitted.height, height)))
    assert len(notes) == changed and (fitted.prompt, fitted.seed) == ("a cat", 3)


@pytest.mark.parametrize("line", ["sks toy --w 17 --h 16 --s 2 --d 1", "sks toy --s 0 --d 1"])
def test_a_prompt_kohya_takes_no_longer_stops_the_run(tmp_path, line, capsys):
    images = tmp_path / "imgs" / "1_sks toy"
    images.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    for i in range(2):
        write_png(images / f"{i}.png", torch.rand(3, 16, 16, generator=g) * 2 - 1)
    model = write_single_file(tiny_sd1_parts(), tmp_path / "sd1.safetensors", architecture="sd1")
    (tmp_path / "p.txt").write_text(line + "\n")
    out = tmp_path / "out" / "lora.safetensors"
    rc = main(["train", "lora", "--model", str(model), "--images", str(tmp_path / "imgs"), "--resolution", "16",
               "--steps", "2", "--sample-prompts", str(tmp_path / "p.txt"), "--sample-every-n-steps", "2",
               "--sample-steps", "2", "-o", str(out), "--no-prior"])
    said = capsys.readouterr()
    assert rc == 0, said.err
    assert out.is_file() and len(list((out.parent).rglob("step000002-00.png"))) == 1
    assert ("rounded down to 16" in said.out + said.err) if "--w" in line else ("held to 1 steps" in said.out + said.err)
