"""Token ids and their character spans (sdadapt.embeddings.token_offsets): a fast tokenizer's own offsets, and the
walk that finds them for transformers 4's slow CLIPTokenizer, which reports none — checked against the fast
tokenizer's offsets on the same tokens (here, on any transformers) and on the slow tokenizer itself (transformers 4)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from sdadapt.clip_tokenizer import CLIPTokenizer, bytes_to_unicode
from sdadapt.embeddings.token_offsets import TokenSpanError, _walk, token_spans

_ADDED = ["TomCat", "<zz>", "<zz>_1"]
# (letters whose lowercase is longer, "İ"; characters BPE splits into byte tokens, "ꙮ" "☃"; CJK; the prompt syntax)
_PIECES = list("aAbcTtomCz <>_,.:()[]!1\t") + ["İ", "é", "ß", "東", "😀", "ꙮ", "☃", "tomcat", "<zz>", "<ZZ>_1"]
_TEXT = st.lists(st.sampled_from(_PIECES), max_size=30).map("".join)


@functools.cache
def _fast():
    tokenizer = CLIPTokenizer.from_file().to_transformers()
    tokenizer.add_tokens(_ADDED)
    return tokenizer


def _slow_stand_in(fast) -> SimpleNamespace:
    """What the walk reads of a slow CLIPTokenizer (its added tokens, its byte map), over the fast one's vocabulary."""
    return SimpleNamespace(get_added_vocab=fast.get_added_vocab, byte_decoder={c: b for b, c in bytes_to_unicode().items()})


@settings(max_examples=150, deadline=None)
@given(text=_TEXT)
def test_the_walk_finds_the_fast_tokenizers_offsets_from_its_tokens(text):
    fast = _fast()
    ids, spans = token_spans(fast, text)
    assert len(ids) == len(spans)
    assert _walk(_slow_stand_in(fast), text, fast.convert_ids_to_tokens(ids)) == spans


def test_spans_of_split_characters_case_and_added_tokens():
    fast = _fast()
    text = "a İ ꙮ☃ (tomcat:1.2) <ZZ>_1"
    ids, spans = token_spans(fast, text)
    tokens = fast.convert_ids_to_tokens(ids)
    assert [text[a:b] for a, b in spans] == ["a", "İ", "İ", "ꙮ", "ꙮ", "ꙮ", "☃", "☃", "(", "tomcat", ":", "1", ".", "2", ")",
                                           "<ZZ>_1"], tokens
    assert _walk(_slow_stand_in(fast), text, tokens) == spans


def test_text_the_tokenizer_rewrote_is_refused_naming_the_fast_tokenizer():
    fast = _fast()
    text = "cafe\u0301 x"  # (a decomposed accent: both tokenizers normalise it to "café" before splitting)
    ids, _ = token_spans(fast, text)
    with pytest.raises(TokenSpanError, match="CLIPTokenizerFast"):
        _walk(_slow_stand_in(fast), text, fast.convert_ids_to_tokens(ids))


@functools.cache
def _slow():
    """transformers 4's slow CLIPTokenizer of the same vocabulary and added tokens (None on transformers 5)."""
    import tempfile

    if int(transformers.__version__.split(".")[0]) >= 5:
        return None
    tokenizer = transformers.CLIPTokenizer.from_pretrained(CLIPTokenizer.from_file().save_folder(tempfile.mkdtemp()))
    tokenizer.add_tokens(_ADDED)
    return tokenizer


@settings(max_examples=100, deadline=None)
@given(text=_TEXT)
def test_a_slow_tokenizers_spans_are_the_fast_ones_where_their_ids_agree(text):
    slow = _slow()
    if slow is None:
        pytest.skip("transformers 5 has no slow CLIPTokenizer")
    assert not slow.is_fast
    slow_ids, slow_spans = token_spans(slow, text)
    fast_ids, fast_spans = token_spans(_fast(), text)
    assert len(slow_ids) == len(slow_spans) and all(0 <= a <= b <= len(text) for a, b in slow_spans)
    if slow_ids == fast_ids:  # (they differ on CJK text: the slow one splits each character off first)
        assert slow_spans == fast_spans
