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


def test_a_lora_convert_stages_beside_its_output_and_leaves_nothing(tmp_path, monkeypatch):
    """``convert`` of a LoRA file wrote and checked it in the system's temporary folder (a full /tmp failed it, a kill
    left it there for good): now beside OUT, named with the pid (removed by the next write there once that process is
    gone), and nothing is left after a run."""
    import importlib

    import torch
    from safetensors.torch import save_file

    convert = importlib.import_module("sdadapt.loratools.convert")
    g = torch.Generator().manual_seed(0)
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 32, generator=g),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(32, 2, generator=g),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(2.0)}, str(tmp_path / "a.safetensors"))
    out = tmp_path / "out"
    out.mkdir()
    real, seen = convert._move_checked, []

    def spy(staging, target, **kwargs):
        seen.append(staging.parent)
        return real(staging, target, **kwargs)

    monkeypatch.setattr(convert, "_move_checked", spy)
    assert main(["convert", str(tmp_path / "a.safetensors"), "--to", "diffusers", "-o", str(out / "b.safetensors"),
                 "-q"]) == 0
    assert seen[0].parent == out and seen[0].name.startswith(f".b.safetensors.{os.getpid()}-")
    assert sorted(p.name for p in out.iterdir()) == ["b.safetensors"]
