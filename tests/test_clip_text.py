"""sdadapt.clip_text: ftfy's fix_text without mojibake repair, and the CLIP tokenizers' clean-up.

The literal tests run without ftfy. The comparisons need ftfy (6.3.1 is the reference); the tokenizer ones also
transformers 4 (its slow CLIPTokenizer) or open_clip, and are skipped without them.
"""

from __future__ import annotations

import importlib.util
import random
import re
import sys
import unicodedata
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sdadapt.clip_text import SPECIAL_TOKENS, clip_clean, fix_text

# ----------------------------------------------------------------------------- literal expectations (no ftfy)


@pytest.mark.parametrize("text, fixed", [
    ("it\u2019s", "it's"), ("\u201cquoted\u201d", '"quoted"'), ("\uff0c", ","), ("\uff01", "!"),
    ("\uff21\uff22\uff23", "ABC"), ("\u3000", " "), ("\ufb01sh", "fish"), ("\ufb00", "ff"), ("\u0149", "'n"),
    ("&amp;", "&"), ("&amp;amp;", "&"), ("&#39;", "'"), ("&nbsp;", "\xa0"), ("&#x2019;s", "'s"), ("&EACUTE;", "\xc9"),
    ("a &amp; b <lora:x:1>", "a &amp; b <lora:x:1>"), ("tom&jerry", "tom&jerry"), ("\ufeffcat", "cat"),
    ("a\x00b\x7f", "ab"), ("x\x85y", "x\u2026y"), ("a\r\nb\rc\u2028d", "a\nb\nc\nd"), ("\x1b[31mred\x1b[0m", "red"),
    ("e\u0301", "\xe9"), ("\uff76\uff80\uff76\uff85", "\u30ab\u30bf\u30ab\u30ca"), ("plain ascii, 1girl", "plain ascii, 1girl"),
    ("\ud83d\udca9", "\U0001f4a9"), ("\udca9", "\ufffd"),
])
def test_fix_text_literals(text: str, fixed: str) -> None:
    assert fix_text(text) == fixed


@pytest.mark.parametrize("text, slow, open_clip", [
    ("  a  photo\tof\n a cat ", "a photo of a cat", "a photo of a cat"),
    ("it\u2019s \uff0c\uff01", "it's ,!", "it's ,!"),
    ("a &amp; b <lora:x:1>", "a &amp; b <lora:x:1>", "a & b <lora:x:1>"),  # (ftfy's '<' rule; open_clip unescapes)
    ("a &amp; b<|endoftext|><", "a & b<|endoftext|><", "a & b<|endoftext|><"),  # (slow: per segment)
    (" x <|startoftext|> y ", "x<|startoftext|>y", "x <|startoftext|> y"),
    ("&amp\u3000&lt;", "&amp <", "& <"), ("\ufeff\x0b", "", ""), ("\x1c a \x1f", "a", "a"),
])
def test_clip_clean_literals(text: str, slow: str, open_clip: str) -> None:
    assert clip_clean(text) == slow
    assert clip_clean(text, open_clip=True) == open_clip


def test_whitespace_rule_matches_transformers_regex() -> None:
    """transformers' ``re.sub(r"\\s+", " ", t).strip()`` and open_clip's ``" ".join(t.split())`` agree."""
    pattern = re.compile(r"\s")
    assert [c for c in range(sys.maxunicode + 1) if bool(pattern.match(chr(c))) != chr(c).isspace()] == []


# ----------------------------------------------------------------------------- comparisons with ftfy

_ALPHABET = st.one_of(
    st.sampled_from(list("abcXYZ019 ,.!?()[]:|\\'\"-_<>&#;")),
    st.sampled_from(["\u2018", "\u2019", "\u201a", "\u201b", "\u201c", "\u201d", "\u201e", "\u201f", "\u02bc",
                     "\u3000", "\u00a0", "\u2003", "\ufeff", "\u200b", "\u200c", "\u200d", "\u2060", "\u206a",
                     "\ufff9", "\ufffc", "\r\n", "\r", "\n", "\u2028", "\u2029", "\t", "\x0b", "\x0c", "\x1b[1;31m",
                     "\x1b[", "&amp;", "&lt;", "&gt;", "&#39;", "&nbsp;", "&quot;", "&amp;amp;", "&#x2019;", "&#0;",
                     "&#128;", "&EACUTE;", "&eacute;", "&AMP;", "\uff06amp;", "<", "\u0301", "\u0308", "\u0327",
                     "\U0001f600", "\U0001f3fd", "\u6771\u4eac", "\u30ab", "\ud55c", "\u0149", "\u01c5", "\u0132"]),
    st.characters(min_codepoint=0xFF00, max_codepoint=0xFFEF),
    st.characters(min_codepoint=0xFB00, max_codepoint=0xFB06),
    st.characters(min_codepoint=0x00, max_codepoint=0x1F),
    st.characters(min_codepoint=0x7F, max_codepoint=0x9F),
    st.characters(min_codepoint=0x2000, max_codepoint=0x206F),
    st.characters(min_codepoint=0x4E00, max_codepoint=0x4FFF),
    st.characters(min_codepoint=0x0300, max_codepoint=0x036F),
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
)
_TEXTS = st.lists(_ALPHABET, max_size=24).map("".join)
_SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _ftfy():
    return pytest.importorskip("ftfy")


@_SETTINGS
@given(_TEXTS)
def test_fix_text_equals_ftfy_without_fix_encoding(text: str) -> None:
    assert fix_text(text) == _ftfy().fix_text(text, fix_encoding=False)


@_SETTINGS
@given(_TEXTS)
def test_fix_text_equals_ftfy_on_text_without_mojibake(text: str) -> None:
    ftfy = _ftfy()
    assume(ftfy.fix_encoding(text) == text)  # (mojibake repair is left out)
    assert fix_text(text) == ftfy.fix_text(text)


@_SETTINGS
@given(_TEXTS, st.lists(st.sampled_from(SPECIAL_TOKENS), max_size=2))
def test_clip_clean_equals_reference_formulas(text: str, specials: list[str]) -> None:
    import html

    ftfy = _ftfy()
    half = len(text) // 2
    text = text[:half] + "".join(specials) + text[half:]
    assume(ftfy.fix_encoding(text) == text)
    pieces = re.split("(<\\|startoftext\\|>|<\\|endoftext\\|>)", text)
    slow = "".join(p if p in SPECIAL_TOKENS else re.sub(r"\s+", " ", ftfy.fix_text(p)).strip() for p in pieces)
    assert clip_clean(text) == slow
    open_clip = " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).strip().split())
    assert clip_clean(text, open_clip=True) == open_clip


def _audit_corpus() -> list[str]:
    """The tokenizer audit's fuzz corpus (its gen_corpus.py, same seed): prompt pieces heavy in the characters
    the clean-up changes, and random Unicode soup."""
    rng = random.Random(1234)
    pieces = ["a", "photo", "of", "cat", "Dog", "MASTERPIECE", "best quality", "1girl", "solo", "it's", "don't",
              "they're", "we've", "I'm", "you'll", "he'd", "it’s", "don’t", "“quoted”", "‘single’", "&amp;", "&lt;b&gt;",
              "&quot;", "&#39;", "&nbsp;", "&amp;amp;", "café", "naïve", "e\u0301", "A\u0301", "東京", "カタカナ", "한국어",
              "中文字", "😀", "👍🏽", "🏳️‍🌈", "\u200b", "\u200d", "\u200c", "\ufeff", "שלום", "مرحبا", "\u202e", "ﬁ", "ﬂower",
              "ＡＢＣ", "１２３", "，", "。", "！", "½", "²", "٣", "Ⅻ", "ǅ", "İstanbul", "ß", "ẞ", "Σίσυφος", "(", ")", "[", "]",
              "{", "}", ":", "|", "\\", "\\(", "\\)", "BREAK", "<lora:x:1>", "<hypernet:y:0.5>", "(word:1.3)", "[a:b:0.5]",
              "[a|b]", "  ", "\t", "\n", "\r\n", "   \t \n ", ",", ", ", "!!", "!!!", "...", "--", "__", "~", "@", "#", "$",
              "%", "^", "&", "*", "12345", "3.14", "1,000", "'s", "'t", "'re", "''", "'", "\"", "x" * 60,
              "supercalifragilisticexpialidocious" * 3, "\x00", "\x01", "\x1c", "\x1f", "\x7f", "\x85", "\xa0", "\u2003",
              "\u3000", "\u2028", "ŉ", "ﬀ", "Å", "Ω", "K", "µ", "ﾊﾝｶｸ", "Ã©", "â€™", "Ã¨s", "<|endoftext|>",
              "<|startoftext|>", "<start_of_text>", "sks", "ohwx", "emb-name", "1.5", "0.8)", "__init__", "a1111", "v2",
              "4k", "8K UHD", "RAW photo", "f/1.8", "50mm", "hair ornament", "looking_at_viewer", "\u0300", "\u0308a", "ǆ"]
    texts = []
    for _ in range(4000):
        count = rng.randint(0, 30)
        sep = rng.choice([" ", "", ", ", " ", "  "])
        texts.append(sep.join(rng.choice(pieces) for _ in range(count)))
    for _ in range(1500):
        chars = []
        for _ in range(rng.randint(0, 25)):  # (the same calls in the same order as the audit's script)
            r = rng.random()
            cp = (rng.randint(0x20, 0x7E) if r < 0.5 else rng.randint(0xA0, 0x2FFF) if r < 0.7 else
                  rng.randint(0x3000, 0x9FFF) if r < 0.85 else rng.randint(0x1F300, 0x1FAFF) if r < 0.95 else
                  rng.randint(0, 0x1F))
            chars.append(chr(0x41 if 0xD800 <= cp <= 0xDFFF else cp))
        texts.append("".join(chars))
    return texts


def _corpus_without_mojibake() -> list[str]:
    """The audit corpus minus the texts ftfy's ``fix_encoding`` changes (mojibake, which clip_text leaves)."""
    ftfy = _ftfy()
    return [t for t in _audit_corpus() if ftfy.fix_encoding(t) == t]


def test_fix_text_on_audit_corpus() -> None:
    ftfy = _ftfy()
    corpus = _audit_corpus()
    assert [t for t in corpus if fix_text(t) != ftfy.fix_text(t, fix_encoding=False)] == []
    kept = _corpus_without_mojibake()
    assert len(kept) > 0.7 * len(corpus)
    assert [t for t in kept if fix_text(t) != ftfy.fix_text(t)] == []


# ----------------------------------------------------------------------------- comparisons with the tokenizers


def _comparable(text: str, cleaned: str, specials: tuple[str, ...]) -> bool:
    """Texts whose tokens the clean-up can reproduce: no special-token text made by the clean-up or the
    lower-casing (see clip_clean's docstring)."""
    lowered = cleaned.lower()
    return all(lowered.count(s) == cleaned.count(s) == text.count(s) for s in specials)


def _unassigned(text: str) -> bool:
    """Code points unassigned in this Python's Unicode (the tokenizers' Unicode versions differ on some:
    U+058B, U+208F in the audit corpus)."""
    return any(unicodedata.category(c) == "Cn" for c in text)


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sdadapt.clip_tokenizer import CLIPTokenizer

    return CLIPTokenizer.load(None).save_folder(tmp_path_factory.mktemp("clip_tokenizer"))


def test_clip_clean_gives_slow_tokenizer_ids(tokenizer_folder: Path) -> None:
    _ftfy()
    transformers = pytest.importorskip("transformers")
    if int(transformers.__version__.split(".")[0]) >= 5:
        pytest.skip("transformers 5 has no slow (ftfy) CLIPTokenizer")
    from transformers import CLIPTokenizer as SlowTokenizer
    from transformers import CLIPTokenizerFast

    from sdadapt.clip_tokenizer import CLIPTokenizer

    slow = SlowTokenizer.from_pretrained(tokenizer_folder)
    if getattr(slow, "fix_text", None) is None:
        pytest.skip("the slow CLIPTokenizer did not find ftfy")
    fast = CLIPTokenizerFast.from_pretrained(tokenizer_folder)
    ours = CLIPTokenizer.load(None)
    compared = 0
    for text in _corpus_without_mojibake():
        cleaned = clip_clean(text)
        if not _comparable(text, cleaned, SPECIAL_TOKENS):
            continue
        want = slow(text, add_special_tokens=False).input_ids
        for got in (fast(cleaned, add_special_tokens=False).input_ids, ours.encode_words(cleaned)):
            assert got == want or _unassigned(text), text
        compared += 1
    assert compared > 4000


def _open_clip_tokenizer_module():
    for name in ("ftfy", "regex", "torch", "numpy"):
        pytest.importorskip(name)
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip is not installed")
    # (its tokenizer.py alone: the package's __init__ imports timm/torchvision models)
    path = Path(next(iter(spec.submodule_search_locations))) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_clip_clean_gives_open_clip_ids() -> None:
    from sdadapt.clip_tokenizer import CLIPTokenizer

    reference = _open_clip_tokenizer_module().SimpleTokenizer()
    ours = CLIPTokenizer.load(None)
    specials = SPECIAL_TOKENS + ("<start_of_text>", "<end_of_text>")
    compared = 0
    for text in _corpus_without_mojibake():
        cleaned = clip_clean(text, open_clip=True)
        if not _comparable(text, cleaned, specials) or any(s in text for s in specials):
            continue
        assert ours.encode_words(cleaned) == reference.encode(text) or _unassigned(text), text
        compared += 1
    assert compared > 3500
