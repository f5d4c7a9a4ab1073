"""A model folder is written whole beside its final name and renamed; a writer killed meanwhile (SIGKILL) left that
folder (a whole model, GBs) under a name nothing cleaned. Its name now carries the writer's pid, and the next write
into the folder removes it once that pid is gone — never a live writer's."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("diffusers")
from tiny_checkpoints import tiny_sd1_file

from sdadapt.cli import main


def test_a_killed_writers_model_folder_is_removed_by_the_next_write(tmp_path):
    source = tiny_sd1_file(tmp_path / "m.safetensors")
    out = tmp_path / "out"
    out.mkdir()
    dead = out / ".diff.999999999-abcdefgh.tmp"  # (a pid no process has)
    live = out / f".diff.{os.getppid()}-abcdefgh.tmp"  # (a live process's: being written)
    other = out / ".notes.tmp"  # (not ours)
    for folder in (dead, live, other):
        folder.mkdir()
        (folder / "model_index.json").write_text("{}")
    assert main(["convert", str(source), "--to", "diffusers", "-o", str(out / "diff"), "-q"]) == 0
    assert (out / "diff" / "model_index.json").is_file()
    assert not dead.exists() and live.exists() and other.exists()
    assert [p.name for p in out.iterdir() if p.name.startswith(".diff.") and p != live] == []
