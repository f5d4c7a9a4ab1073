"""diffusers' ``textual_inversion_sdxl.py`` writes one SDXL embedding as two files: read together, whichever is named."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from embedding_models import ids_of, tiny_clip_text, tiny_tokenizer

from sdadapt.embeddings import inject_embedding
from sdadapt.formats.detect import describe_file
from sdadapt.formats.embeddings import load_embedding

safetensors_torch = pytest.importorskip("safetensors.torch")


def _save_progress(rows: torch.Tensor, token: str, path) -> None:
    """diffusers examples/textual_inversion/textual_inversion_sdxl.py ``save_progress``: ``{placeholder_token: rows}``,
    safetensors with ``{"format": "pt"}`` (the script always writes safetensors)."""
    safetensors_torch.save_file({token: rows.detach().cpu()}, path, metadata={"format": "pt"})


def _rows(count: int, width: int, seed: int) -> torch.Tensor:
    return torch.randn(count, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("named", ["learned_embeds", "learned_embeds_2"])
@pytest.mark.parametrize("steps", ["", "-steps-500"])
def test_either_file_of_the_pair_reads_as_the_sdxl_embedding(tmp_path, named, steps):
    first, second = _rows(2, 768, 1), _rows(2, 1280, 2)
    _save_progress(first, "<cat-toy>", tmp_path / f"learned_embeds{steps}.safetensors")
    _save_progress(second, "<cat-toy>", tmp_path / f"learned_embeds_2{steps}.safetensors")
    # another step's pair beside it must not be mixed in
    _save_progress(_rows(2, 768, 3), "<cat-toy>", tmp_path / "learned_embeds-steps-100.safetensors")
    _save_progress(_rows(2, 1280, 4), "<cat-toy>", tmp_path / "learned_embeds_2-steps-100.safetensors")
    loaded = load_embedding(tmp_path / f"{named}{steps}.safetensors")
    assert loaded.is_sdxl and loaded.name == "<cat-toy>" and loaded.count == 2
    assert torch.equal(loaded.vectors["clip_l"], first) and torch.equal(loaded.vectors["clip_g"], second)


def test_files_that_make_no_pair_stay_apart(tmp_path):
    alone = _rows(1, 768, 1)
    _save_progress(alone, "<a>", tmp_path / "learned_embeds.safetensors")
    assert not load_embedding(tmp_path / "learned_embeds.safetensors").is_sdxl  # no partner: diffusers' SD1 script
    for token, count, width in (("<b>", 1, 1280), ("<a>", 2, 1280), ("<a>", 1, 1024)):
        _save_progress(_rows(count, width, 2), token, tmp_path / "learned_embeds_2.safetensors")
        loaded = load_embedding(tmp_path / "learned_embeds.safetensors")
        assert not loaded.is_sdxl and torch.equal(loaded.vectors["text_encoder"], alone), (token, count, width)
    other = tmp_path / "other"
    other.mkdir()
    _save_progress(alone, "<a>", other / "my-style.safetensors")  # only diffusers' default names pair
    _save_progress(_rows(1, 1280, 2), "<a>", other / "learned_embeds_2.safetensors")
    assert not load_embedding(other / "my-style.safetensors").is_sdxl


def test_the_pair_conditions_sdxl_encoders_as_diffusers_loading_each_file_does(tmp_path):
    """diffusers loads the script's files one per encoder (``load_textual_inversion(path, text_encoder=...,
    tokenizer=...)``); the pair read here as one SDXL embedding gives both encoders the same states."""
    mixin = pytest.importorskip("diffusers.loaders").TextualInversionLoaderMixin
    tokenizers = {"clip_l": tiny_tokenizer(tmp_path / "tok_l"), "clip_g": tiny_tokenizer(tmp_path / "tok_g")}
    encoders = {"clip_l": tiny_clip_text(hidden=768, seed=0), "clip_g": tiny_clip_text(hidden=1280, seed=1)}
    first, second = _rows(2, 768, 5), _rows(2, 1280, 6)
    _save_progress(first, "<cat-toy>", tmp_path / "learned_embeds.safetensors")
    _save_progress(second, "<cat-toy>", tmp_path / "learned_embeds_2.safetensors")
    prompt = "a <cat-toy> in the snow"

    class Loader(mixin):  # (the pipeline's loader without a pipeline: nothing offloaded)
        hf_device_map = None
        components = property(lambda self: {})

    loader = Loader()
    theirs = {}
    for key, name in (("clip_l", "learned_embeds"), ("clip_g", "learned_embeds_2")):
        tok, enc = copy.deepcopy(tokenizers[key]), copy.deepcopy(encoders[key])
        loader.load_textual_inversion(str(tmp_path / f"{name}.safetensors"), tokenizer=tok, text_encoder=enc)
        with torch.no_grad():
            theirs[key] = enc(ids_of(tok, [loader.maybe_convert_prompt(prompt, tok)]))[0]
    toks = {k: copy.deepcopy(v) for k, v in tokenizers.items()}
    encs = {k: copy.deepcopy(v) for k, v in encoders.items()}
    handle = inject_embedding(encs, toks, load_embedding(tmp_path / "learned_embeds_2.safetensors"))
    for key in ("clip_l", "clip_g"):
        with torch.no_grad():
            ours = encs[key](ids_of(toks[key], [handle.expand(prompt)]))[0]
            plain = encoders[key](ids_of(tokenizers[key], [prompt]))[0]
        assert not torch.allclose(ours, plain)  # the embedding matters
        torch.testing.assert_close(ours, theirs[key], rtol=0, atol=0)


def test_convert_writes_the_pair_as_one_sdxl_file_and_inspect_names_the_partner(tmp_path):
    first, second = _rows(3, 768, 7), _rows(3, 1280, 8)
    _save_progress(first, "cat-toy", tmp_path / "learned_embeds.safetensors")
    _save_progress(second, "cat-toy", tmp_path / "learned_embeds_2.safetensors")
    assert "learned_embeds_2.safetensors" in describe_file(tmp_path / "learned_embeds.safetensors")["written_by"]
    out = tmp_path / "cat-toy.safetensors"
    done = subprocess.run([sys.executable, "-m", "sdadapt", "convert", str(tmp_path / "learned_embeds.safetensors"),
                           "--to", "kohya", "-o", str(out)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    tensors = safetensors_torch.load_file(out)
    assert set(tensors) == {"clip_l", "clip_g"}
    assert torch.equal(tensors["clip_l"], first) and torch.equal(tensors["clip_g"], second)
    assert "'cat-toy' (diffusers input), 3 vector(s) × clip_l 768+clip_g 1280, max |Δv| 0" in done.stdout
