"""The docs' and examples' code runs and says what it claims."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest
import torch
from docs_pages import code_blocks

ROOT = Path(__file__).resolve().parents[1]


def test_lora_page_example_runs_and_agrees_with_diffusers():
    pytest.importorskip("diffusers")
    namespace: dict = {}
    blocks = code_blocks("lora.md")
    exec(compile(blocks[0], "docs/lora.md", "exec"), namespace)
    assert torch.allclose(namespace["y_merged"], namespace["y_adapter"], atol=1e-5)
    with torch.no_grad():
        theirs = namespace["other"](namespace["x"], namespace["t"], namespace["ctx"]).sample
    assert torch.allclose(theirs, namespace["y_adapter"], atol=1e-5)
    # the undo in the example restored the base exactly
    assert not any(".sdadapt." in k for k in namespace["unet"].state_dict())
    # the second block: several adapters on one model, any merge order, exact restore
    before = {k: v.clone() for k, v in namespace["unet"].state_dict().items()}
    exec(compile(blocks[1], "docs/lora.md", "exec"), namespace)
    namespace["subject"].unmerge()
    namespace["style"].remove()
    namespace["subject"].remove()
    after = namespace["unet"].state_dict()
    assert set(after) == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_quickstart_example_learns_and_round_trips(capsys):
    # the script itself, run as __main__ in this process (a subprocess would only add a second torch import)
    runpy.run_path(str(ROOT / "examples" / "lora_quickstart.py"), run_name="__main__")
    stdout = capsys.readouterr().out
    losses = re.search(r"loss ([\d.]+) -> ([\d.]+)", stdout)
    assert losses and float(losses.group(2)) < 0.05 * float(losses.group(1)), stdout
    diff = re.search(r"max \|diff\| = ([\d.e+-]+)", stdout)
    assert diff and float(diff.group(1)) < 1e-4, stdout
    assert "undo restores the base exactly: True" in stdout


def test_training_page_example_learns_and_resumes(capsys):
    namespace: dict = {}
    exec(compile(code_blocks("training.md")[0], "docs/training.md", "exec"), namespace)
    losses = [float(v) for v in namespace["losses"]]
    assert sum(losses[-4:]) < 0.8 * sum(losses[:4])
    assert namespace["state"].step == 40 and namespace["x0"].shape == (2, 4, 8, 8)
    assert torch.isfinite(namespace["x0"]).all()


def test_textual_inversion_page_example_trains_saves_and_reloads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes purple.safetensors into the working folder
    namespace: dict = {}
    exec(compile(code_blocks("textual-inversion.md")[0], "docs/textual-inversion.md", "exec"), namespace)
    emb = namespace["emb"]
    assert emb.name == "purple" and emb.vectors["text_encoder"].shape == (1, 64)
    assert namespace["pictures"].shape == (2, 3, 32, 32) and (tmp_path / "purple.safetensors").is_file()
    assert namespace["system"].tokenizer.added == {}  # handle.remove() took the word out again


def test_dreamartist_page_example_writes_the_pair_that_reproduces_the_samples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code_blocks("dreamartist.md")[0], "docs/dreamartist.md", "exec"), namespace)
    assert (tmp_path / "purple.pt").is_file() and (tmp_path / "purple-neg.pt").is_file()
    assert namespace["negative"].vectors["text_encoder"].shape == (2, 64)
