"""An embedding written from another (convert, a re-cast, the Python API) never carries the hashes of the bytes it
was read from: ``sshs_model_hash`` / ``sshs_legacy_hash`` / ``modelspec.hash_sha256`` described the old file (a
fp16 convert kept a float32 file's hash, which A1111 and kohya then show for the wrong bytes)."""

from __future__ import annotations

import pytest
import torch

from sdadapt.embeddings.convert import convert_embedding
from sdadapt.embeddings.embedding import ENCODER_KEY, Embedding
from sdadapt.formats.embeddings import save_embedding
from sdadapt.formats.files import read_safetensors, read_safetensors_header
from sdadapt import __version__
from sdadapt.formats.kohya import kohya_hashes


def _trained(tmp_path):
    """A kohya TI file as training leaves it: ss_* metadata and kohya's hashes of its own bytes."""
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0))
    path = save_embedding(tmp_path / "sks.safetensors", Embedding("sks", {ENCODER_KEY: vectors}, metadata={"ss_steps": "10"}),
                          format="kohya", base_model="sd1")
    tensors, meta = read_safetensors(path)
    from sdadapt.formats.files import write_safetensors

    write_safetensors(path, tensors, {**meta, **kohya_hashes(tensors, meta), "modelspec.hash_sha256": "0xdeadbeef",
                                      "modelspec.implementation_version": "sdadapt/0.0.1"})
    return path


@pytest.mark.parametrize("to,suffix", [("kohya", ".safetensors"), ("a1111", ".safetensors"),
                                       ("diffusers", ".safetensors")])
def test_a_converted_embedding_carries_no_hash_of_the_old_bytes(tmp_path, to, suffix):
    source = _trained(tmp_path)
    before = read_safetensors_header(source)[1]
    assert before["sshs_model_hash"] == kohya_hashes(*read_safetensors(source))["sshs_model_hash"]
    out = tmp_path / f"out-{to}{suffix}"
    convert_embedding(source, out, to=to, dtype=torch.float16)
    _, meta = read_safetensors(out)
    assert not {"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"} & set(meta), meta
    if to == "kohya":
        assert meta["ss_steps"] == "10"  # (the rest of kohya's metadata carries over)


def test_the_python_api_drops_stale_keys_too(tmp_path):
    tensors, meta = read_safetensors(_trained(tmp_path))
    embedding = Embedding("sks", {ENCODER_KEY: tensors["emb_params"].to(torch.float16)}, metadata=meta)
    for fmt in ("kohya", "a1111", "diffusers"):
        _, written = read_safetensors(save_embedding(tmp_path / fmt / "sks.safetensors", embedding, format=fmt))
        assert not {"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"} & set(written), (fmt, written)
        # (the writer's own version, not the read file's)
        assert written.get("modelspec.implementation_version") == (f"sdadapt/{__version__}" if fmt == "kohya" else None)


def test_a_one_encoder_embedding_is_not_written_as_sdxl(tmp_path, capsys):
    """diffusers' SDXL script writes one file per encoder: ``learned_embeds.safetensors`` (768) given
    ``--base-model sdxl`` wrote a one-table kohya file labelled SDXL, which no SDXL loader can use — now refused."""
    from safetensors.torch import save_file

    from sdadapt.cli import main

    save_file({"<cat>": torch.randn(2, 768)}, str(tmp_path / "learned_embeds.safetensors"))
    code = main(["convert", str(tmp_path / "learned_embeds.safetensors"), "--to", "kohya", "--base-model", "sdxl",
                 "-o", str(tmp_path / "cat.safetensors")])
    assert code != 0 and "not an SDXL embedding" in capsys.readouterr().err
    assert not (tmp_path / "cat.safetensors").exists()
    with pytest.raises(ValueError, match="base_model 'sd1' does not fit"):
        save_embedding(tmp_path / "xl.safetensors", Embedding("xl", {"clip_l": torch.zeros(1, 768),
                                                                    "clip_g": torch.zeros(1, 1280)}),
                       format="kohya", base_model="sd1")
