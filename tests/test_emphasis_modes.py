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
    with pytest.raises(ValueError, match="emphasis must be one of Original, No norm, Ignore, None"):
        system._prompt_condition(prompt, None)


@pytest.mark.parametrize("prompt", ["a (cat:1.5) [hat] BREAK \\(dog\\)", "a cat", "x, " * 60 + "(end:1.2) BREAK y"])
def test_none_encodes_the_text_as_it_is(tiny_sd, prompt):
    """A1111's "None" (``EmphasisNone``; sd_hijack_clip ``tokenize_line``: ``parsed = [[line, 1.0]]``): brackets,
    backslashes and ``BREAK`` are words, every weight 1 — the plain text's chunks (the comma rule still cuts a long
    one), not the emphasised ones."""
    from sdadapt.diffusers_system import DiffusersSystem
    from sdadapt.clip_tokenizer import special_token_ids
    from sdadapt.prompt_chunks import prompt_chunks
    from sdadapt.prompt_weights import _piece_ids

    system = DiffusersSystem.from_folder(tiny_sd)
    system.emphasis = "None"
    tokenizer = system._all_tokenizers[0]
    ids, weights = prompt_chunks(tokenizer, prompt, literal=True)
    assert bool((weights == 1).all())
    with torch.no_grad():
        got = system._prompt_condition([prompt], None, breaks=True)
        want = torch.cat([system.condition(chunk[None]) for chunk in ids], dim=1)  # (1, n * C, D)
        system.emphasis = "Original"
        original = system._prompt_condition([prompt], None, breaks=True)
    assert torch.equal(got, want)
    special = set(special_token_ids(tokenizer))
    assert [t for row in ids.tolist() for t in row if t not in special] == _piece_ids(tokenizer, prompt)  # (every
    # token of the text as it is, BREAK and brackets too, in order)
    assert torch.equal(got, original) == (prompt == "a cat")


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
    assert main(["generate", *base, "--prompt", "a", "--emphasis", "Nothing", "-o", str(tmp_path / "x.png")]) == 2
    assert "--emphasis must be one of Original, No norm, Ignore, None" in capsys.readouterr().err


def test_generate_none_writes_it_and_reads_it_back(tiny_sd, tmp_path):
    """``--emphasis None``: "Emphasis: None" written (a text has "("), the image made again from the PNG alone, and
    another image than Original's; a prompt editing ``[cat:dog:0.5]`` still switches (A1111 schedules before it
    reads emphasis)."""
    base = ["--model", str(tiny_sd), "--negative", "blurry", "--sampler", "Euler", "--steps", "4", "--seed", "2",
            "--width", "32", "--height", "32", "--prompt", "a (cat:1.5) [dog:hat:0.5]"]
    assert main(["generate", *base, "--emphasis", "None", "-o", str(tmp_path / "none.png")]) == 0
    assert main(["generate", *base, "-o", str(tmp_path / "original.png")]) == 0
    assert main(["generate", "--model", str(tiny_sd), "--infotext", str(tmp_path / "none.png"), "-o",
                 str(tmp_path / "again.png")]) == 0
    none, original, again = (Image.open(tmp_path / f"{n}.png") for n in ("none", "original", "again"))
    assert ", Emphasis: None," in none.text["parameters"] and "Emphasis" not in original.text["parameters"]
    assert not np.array_equal(np.asarray(none), np.asarray(original))
    assert np.array_equal(np.asarray(none), np.asarray(again)) and none.text["parameters"] == again.text["parameters"]
