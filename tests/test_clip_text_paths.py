"""Every way sdadapt tokenizes a caption or a prompt cleans it first as the slow CLIP tokenizer does (kohya's,
A1111's, ComfyUI's ids: :func:`sdadapt.clip_text.clip_clean`): curly quotes, full-width forms, ligatures and HTML
entities read as their plain forms — on a tiny SD folder (a small byte-level BPE vocabulary, CLIP's tokenizer)."""

from __future__ import annotations

import pytest
import tiny_sd_fixtures
import torch

system, tiny_sd = tiny_sd_fixtures.system, tiny_sd_fixtures.tiny_sd

FANCY = "it\u2019s a \uff23\uff21\uff34\uff0c\ufb01sh &amp; chips\u3000\u201cnow\u201d\ufeff"
PLAIN = 'it\'s a CAT,fish & chips "now"'


def test_the_plain_and_the_fancy_spelling_tokenize_alike_on_every_path(system):
    from sdadapt.jobs.generate import _token_ids

    length = system.tokenize([PLAIN]).shape[-1]
    raw = system.tokenizer([FANCY], padding="max_length", truncation=True, max_length=length,
                           return_tensors="pt").input_ids
    assert torch.equal(system.tokenize([FANCY]), system.tokenize([PLAIN]))
    assert not torch.equal(system.tokenize([FANCY]), raw)  # (the fast tokenizer alone: other ids)
    for a1111 in (False, True):  # (kohya's weighted captions, A1111's emphasis)
        fancy = system.tokenize_weighted([f"({FANCY}:1.2) x"], a1111=a1111)
        plain = system.tokenize_weighted([f"({PLAIN}:1.2) x"], a1111=a1111)
        assert torch.equal(fancy["ids"], plain["ids"]) and torch.equal(fancy["weights"], plain["weights"])
    words = _token_ids(system)  # (A1111's chunks in generate)
    assert words(FANCY) == words(PLAIN) == system.tokenizer(PLAIN, add_special_tokens=False).input_ids


def test_the_cleaned_ids_are_the_slow_tokenizers(system, tmp_path):
    """transformers 4's slow CLIPTokenizer (kohya's, A1111's) with ftfy reads the fancy text as sdadapt does."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("ftfy")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("transformers 5 has no slow CLIPTokenizer")
    system.tokenizer.save_pretrained(tmp_path)
    slow = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    ours = system.tokenize([FANCY])
    want = slow([FANCY], padding="max_length", truncation=True, max_length=ours.shape[-1], return_tensors="pt")
    assert torch.equal(ours, want.input_ids)
