"""A1111's "Emphasis mode" (``generate --emphasis``; modules/sd_emphasis.py v1.10): "Original" (the states times the
weights, then each prompt's mean restored — sdadapt's default, unchanged), "No norm" (``EmphasisOriginalNoNorm``: the
weights only), "Ignore" (``EmphasisIgnore``: the syntax read, the weights not applied); the infotext's "Emphasis"
field as A1111's ``sd_hijack_clip`` writes it (not Original, and a text encoded has "(" or "[")."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sdadapt.cli import main

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("emphasis"), prediction_type="epsilon")


def test_the_modes_weigh_the_states_as_a1111(tiny_sd):
    from sdadapt.diffusers_system import DiffusersSystem

    system = DiffusersSystem.from_folder(tiny_sd)
    prompt = ["a (cat:1.5) [hat]"]
    weighted = system.tokenize_weighted(prompt, a1111=True)
    with torch.no_grad():
        plain = system.condition(weighted["ids"])  # (1, L, D): the states without weights
        original = system._prompt_condition(prompt, None)
        system.emphasis = "No norm"
        no_norm = system._prompt_condition(prompt, None)
        system.emphasis = "Ignore"
        ignored = system._prompt_condition(prompt, None)
    weights = weighted["weights"][..., None].to(plain)
    assert torch.equal(no_norm, plain * weights)  # (EmphasisOriginalNoNorm: z * multipliers)
    assert torch.equal(ignored, plain) and not torch.equal(original, no_norm)  # (Original: tests of _restore_mean)
    system.emphasis = "none"
    with pytest.raises(ValueError, match="emphasis must be one of Original, No norm, Ignore"):
        system._prompt_condition(prompt, None)


def test_generate_takes_the_mode_writes_it_and_reads_it_back(tiny_sd, tmp_path, capsys):
    base = ["--model", str(tiny_sd), "--negative", "blurry", "--sampler", "Euler", "--steps", "3", "--seed", "2",
            "--width", "32", "--height", "32"]
    run = {}
    for name, extra in (("original", []), ("no_norm", ["--emphasis", "no norm"]), ("ignore", ["--emphasis", "Ignore"]),
                        ("words", [])):
        prompt = "a cat hat" if name == "words" else "a (cat:1.5) [hat]"
        assert main(["generate", *base, "--prompt", prompt, *extra, "-o", str(tmp_path / f"{name}.png")]) == 0
        image = Image.open(tmp_path / f"{name}.png")
        run[name] = (np.asarray(image), image.text["parameters"])
    assert "Emphasis" not in run["original"][1] and ", Emphasis: No norm," in run["no_norm"][1]
    assert ", Emphasis: Ignore," in run["ignore"][1]
    assert not np.array_equal(run["no_norm"][0], run["original"][0])
    assert np.array_equal(run["ignore"][0], run["words"][0])  # (the weights not applied: the words alone)
    assert main(["generate", "--model", str(tiny_sd), "--infotext", str(tmp_path / "no_norm.png"), "-o",
                 str(tmp_path / "again.png")]) == 0
    again = Image.open(tmp_path / "again.png")
    assert np.array_equal(np.asarray(again), run["no_norm"][0]) and again.text["parameters"] == run["no_norm"][1]
    # prompt editing alone has no "(" or "[" left in the texts encoded: nothing written
    assert main(["generate", *base, "--prompt", "a [cat:dog:0.5]", "--emphasis", "No norm", "-o",
                 str(tmp_path / "edit.png")]) == 0
    assert "Emphasis" not in Image.open(tmp_path / "edit.png").text["parameters"]
    capsys.readouterr()
    assert main(["generate", "--prompt", "a (b)", "--emphasis", "No norm", "-o", str(tmp_path / "toy.png")]) == 2
    assert "reads no emphasis itself" in capsys.readouterr().err
    assert main(["generate", *base, "--prompt", "a", "--emphasis", "None", "-o", str(tmp_path / "x.png")]) == 2
    assert "'None', brackets as literal text, is not taken" in capsys.readouterr().err
