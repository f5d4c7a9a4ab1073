"""``generate --embeddings-dir``: A1111's embeddings folder — the files whose names the prompts use, matched by
tokens as A1111's ``EmbeddingDatabase.find_embedding_at_position`` matches them."""

from __future__ import annotations

import pytest
import torch

import sdadapt
from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.jobs.generate_prompt_tags import prompt_embedding_files

pytest.importorskip("diffusers")


def _words(text: str) -> list[int]:  # (a stand-in tokenizer: one id per lower-cased word, punctuation apart)
    import re

    return [hash(word) for word in re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]", text.lower())]


def _save(path, name, width=32, count=1, seed=0):
    vectors = {"text_encoder": torch.randn(count, width, generator=torch.Generator().manual_seed(seed))}
    path.parent.mkdir(parents=True, exist_ok=True)
    sdadapt.save_embedding(path, sdadapt.Embedding(name, vectors))
    return path


def test_only_the_embeddings_the_prompts_name_are_picked_case_insensitive_by_whole_tokens(tmp_path):
    root = tmp_path / "emb"
    _save(root / "EasyNegative.safetensors", "EasyNegative")
    _save(root / "sub" / "style.pt", "style")
    _save(root / "unused.safetensors", "unused")
    _save(root / "neg.bin", "neg")
    (root / "empty.pt").write_bytes(b"")  # (A1111 skips empty files)
    (root / "inside.png").write_bytes(b"\x89PNG")
    logs = []
    found = prompt_embedding_files(["a (style:1.2) cat, inside", "easynegative_v2, negatives"], root,
                                   tokenize=_words, log=logs.append)
    assert [p.name for p in found] == ["EasyNegative.safetensors", "style.pt"]  # ("negatives" is not "neg")
    assert len(logs) == 1 and "inside.png" in logs[0] and "convert" in logs[0]
    assert prompt_embedding_files(["a cat"], root, tokenize=_words) == []
    with pytest.raises(InputError, match="no such folder"):
        prompt_embedding_files(["a"], tmp_path / "nowhere", tokenize=_words)
    _save(root / "other" / "style.safetensors", "style")
    with pytest.raises(InputError, match=r"2 embeddings named 'style'.*keep one"):
        prompt_embedding_files(["style"], root, tokenize=_words)


def test_the_cli_image_equals_the_one_with_the_files_given_and_another_width_is_skipped(tmp_path, capsys):
    from test_cli_train import _tiny_pipeline

    pipe = _tiny_pipeline(tmp_path / "pipe")
    root = tmp_path / "emb"
    good = _save(root / "mystyle.safetensors", "mystyle", count=2, seed=1)
    neg = _save(root / "bad.pt", "bad", seed=2)
    _save(root / "wide.safetensors", "wide", width=768)  # (an embedding of another model: skipped)
    _save(root / "unused.safetensors", "unused", seed=3)
    base = ["generate", "--model", str(pipe), "--prompt", "a MyStyle cat wide", "--negative", "bad", "--seed", "1",
            "--steps", "2", "--sampler", "euler", "--width", "32", "--height", "32"]
    assert main([*base, "--embeddings-dir", str(root), "-o", str(tmp_path / "dir.png")]) == 0
    err = capsys.readouterr().err
    assert "wide.safetensors" in err and "skipped" in err and "unused" not in err
    assert main([*base, "--embedding", str(good), "--embedding", str(neg), "-q", "-o", str(tmp_path / "files.png")]) == 0
    assert main([*base, "-q", "-o", str(tmp_path / "none.png")]) == 0
    assert (tmp_path / "dir.png").read_bytes() == (tmp_path / "files.png").read_bytes()
    assert (tmp_path / "dir.png").read_bytes() != (tmp_path / "none.png").read_bytes()
    # a file given with --embedding too is injected once
    assert main([*base, "--embedding", str(good), "--embeddings-dir", str(root), "-q", "-o",
                 str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").read_bytes() == (tmp_path / "dir.png").read_bytes()


def test_an_embedding_named_only_in_the_hires_prompt_is_loaded(tmp_path, capsys):
    """A1111 loads its whole embeddings folder, so a name used only in --hires-prompt works in the hires pass: the
    image equals the one with the file given by --embedding, and differs from the one without it."""
    from test_cli_train import _tiny_pipeline

    pipe = _tiny_pipeline(tmp_path / "pipe")
    root = tmp_path / "emb"
    good = _save(root / "hirestyle.safetensors", "hirestyle", count=2, seed=4)
    base = ["generate", "--model", str(pipe), "--prompt", "a cat", "--hires-prompt", "a hirestyle cat", "--seed", "1",
            "--steps", "2", "--sampler", "euler", "--width", "32", "--height", "32", "--hires-scale", "1.5",
            "--hires-denoising", "0.5", "-q"]
    assert main([*base, "--embeddings-dir", str(root), "-o", str(tmp_path / "dir.png")]) == 0
    assert main([*base, "--embedding", str(good), "-o", str(tmp_path / "file.png")]) == 0
    assert main([*base, "-o", str(tmp_path / "none.png")]) == 0
    assert (tmp_path / "dir.png").read_bytes() == (tmp_path / "file.png").read_bytes()
    assert (tmp_path / "dir.png").read_bytes() != (tmp_path / "none.png").read_bytes()
