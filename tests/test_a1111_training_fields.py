"""A1111's own trainers write ``step`` (the optimiser steps taken: "continue training" starts there),
``sd_checkpoint`` (the base model file's sha256, first 10 hex digits) and ``sd_checkpoint_name`` (its file name
without the suffix) into textual-inversion and hypernetwork ``.pt`` files; a training run here writes them too."""

from __future__ import annotations

import hashlib

import pytest
import torch

from sdadapt.cli import main
from sdadapt.formats.a1111_fields import a1111_training_fields, trained_embedding
from sdadapt.images import write_png


def test_fields_from_a_runs_metadata():
    digest = hashlib.sha256(b"model").hexdigest()
    meta = {"ss_steps": "120", "ss_new_sd_model_hash": digest, "ss_sd_model_name": "v1-5-pruned.safetensors"}
    assert a1111_training_fields(meta) == {"step": 120, "sd_checkpoint": digest[:10], "sd_checkpoint_name": "v1-5-pruned"}
    assert a1111_training_fields({"ss_sd_model_name": "my.model.v2"}) == {"sd_checkpoint_name": "my.model.v2"}  # (a folder)
    # missing, empty or malformed sources: the field is left out (A1111 writes None)
    assert a1111_training_fields({"ss_steps": "", "ss_new_sd_model_hash": "", "ss_sd_model_name": ""}) == {}
    assert a1111_training_fields({"ss_steps": "3.5", "ss_new_sd_model_hash": "not-a-hash-at-all"}) == {}
    assert a1111_training_fields(None) == {}
    embedding = trained_embedding("sks", {"text_encoder": torch.ones(2, 8)}, metadata=meta)
    assert embedding.step == 120 and embedding.metadata["sd_checkpoint"] == digest[:10]
    assert embedding.metadata["ss_steps"] == "120"  # (the run's metadata kept beside them)


@pytest.mark.parametrize("method, out", [("textual-inversion", "ti.pt"), ("hypernetwork", "hn.pt"),
                                         ("dreamartist", "da.pt")])
def test_a_trained_pt_file_carries_a1111s_step_and_checkpoint_fields(tmp_path, method, out):
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(2):
        write_png(images / f"i{i}.png", torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(i)) * 2 - 1)
        (images / f"i{i}.txt").write_text("red, blue")
    argv = ["train", method, "--images", str(images), "--model", "toy", "-o", str(tmp_path / out), "--steps", "3",
            "--batch-size", "1", "-q"] + (["--token", "<sks>"] if method != "hypernetwork" else [])
    assert main(argv) == 0
    saved = torch.load(tmp_path / out, weights_only=True)
    log = (tmp_path / out).with_name((tmp_path / out).stem + "-log.csv")
    assert log.is_file()
    assert saved["step"] == 3
    assert isinstance(saved["sd_checkpoint"], str) and len(saved["sd_checkpoint"]) == 10
    assert int(saved["sd_checkpoint"], 16) >= 0 and saved["sd_checkpoint_name"] == "toy-v1"
