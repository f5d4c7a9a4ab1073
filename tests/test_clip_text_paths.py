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


def test_a_trigger_word_is_cut_out_before_the_clean_up_as_the_slow_tokenizer_cuts_it(tmp_path):
    """The slow tokenizer cuts its added tokens (an embedding's trigger such as diffusers' ``<cat-toy>``) out of a
    caption before cleaning the pieces, so the trigger's ``<`` does not stop ftfy un-escaping ``&amp;`` in the rest
    (ftfy leaves the entities of a line with a ``<``): kohya's and diffusers' textual-inversion ids."""
    transformers = pytest.importorskip("transformers")
    from sdadapt.clip_tokenizer import CLIPTokenizer
    from sdadapt.diffusers_system import _token_ids

    tokenizer = CLIPTokenizer.load(None).to_transformers()
    tokenizer.add_tokens(["<cat-toy>"])
    fancy, plain = "a photo of <cat-toy>, tom &amp; jerry", "a photo of <cat-toy>, tom & jerry"
    ours = _token_ids(tokenizer, [fancy], 20)
    assert torch.equal(ours, _token_ids(tokenizer, [plain], 20)) and len(tokenizer) - 1 in ours[0].tolist()
    if int(transformers.__version__.split(".")[0]) < 5 and pytest.importorskip("ftfy"):
        tokenizer.save_pretrained(tmp_path)
        slow = transformers.CLIPTokenizer.from_pretrained(tmp_path)
        assert ours[0].tolist() == slow(fancy, padding="max_length", max_length=20).input_ids


def test_an_embeddings_name_is_looked_up_in_its_cleaned_spelling():
    """An A1111 embedding named with a curly apostrophe (``it’s-style``) is found in a prompt spelled either way: its
    name's ids are the cleaned name's, as the prompt's are (the slow tokenizer's reading of both)."""
    import sdadapt
    from sdadapt.clip_tokenizer import CLIPTokenizer
    from sdadapt.diffusers_system import _token_ids

    tokenizer = CLIPTokenizer.load(None).to_transformers()
    table = torch.nn.Embedding(len(tokenizer) + 8, 4)
    sdadapt.inject_embedding(table, tokenizer, sdadapt.Embedding("it\u2019s-style", {"text_encoder": torch.randn(2, 4)}),
                             a1111=True)
    for prompt in ("a it\u2019s-style cat", "a it's-style cat"):
        ids = _token_ids(tokenizer, [prompt], 12)[0].tolist()
        assert sum(i >= 49408 for i in ids) == 2, prompt  # (both vectors of the embedding)
