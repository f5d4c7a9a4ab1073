"""The text clean-up CLIP tokenizers run before BPE, in pure Python (no ``ftfy`` needed).

The tokenizers people train and generate with clean a caption or prompt before byte-level BPE:

* transformers' slow ``CLIPTokenizer`` (kohya sd-scripts, A1111 SD1, ComfyUI, diffusers on transformers 4)
  runs ``whitespace_clean(ftfy.fix_text(text)).lower()`` when ftfy is installed
  (transformers 4.44.2 ``models/clip/tokenization_clip.py:76-79`` ``whitespace_clean``, ``:459-465`` ``_tokenize``).
  It does so per segment: ``PreTrainedTokenizer.tokenize`` first cuts the added tokens (``<|startoftext|>``,
  ``<|endoftext|>``) out of the text, and ``_tokenize`` sees only the pieces between them.
* open_clip's ``SimpleTokenizer`` (A1111/Forge SD2, SDXL's OpenCLIP-G) runs
  ``whitespace_clean(basic_clean(text)).lower()`` on the whole text, where ``basic_clean`` is
  ``html.unescape(html.unescape(ftfy.fix_text(text))).strip()`` and ``whitespace_clean`` is
  ``" ".join(text.split())`` (open-clip-torch 3.3.0 ``src/open_clip/tokenizer.py:66-75`` and ``:83-85``,
  ``encode`` at ``:213-216``). Its special tokens are ``<start_of_text>`` / ``<end_of_text>``, found by its BPE
  regex after the clean-up; ``<|endoftext|>`` is ordinary text there.

sdadapt's tokenizers (transformers' fast ``CLIPTokenizer`` and :mod:`sdadapt.clip_tokenizer`) only apply NFC,
collapse white space and lower-case, so without this clean-up curly quotes (``it’s``), full-width forms
(``，！ＡＢＣ``), ligatures (``ﬁ``), HTML entities (``&amp;``) and control characters give other ids.

:func:`fix_text` reproduces ``ftfy.fix_text`` of ftfy 6.3.1 with its default ``TextFixerConfig``
(``ftfy/__init__.py`` ``fix_text`` :290-361 and ``fix_and_explain`` :364-421; the fixers in ``ftfy/fixes.py``;
the tables of ``ftfy/chardata.py``, built here by the same definitions), except mojibake repair: see its docstring.
"""

from __future__ import annotations

import html
import html.entities
import re
import unicodedata
from functools import lru_cache
from re import Match

__all__ = ["SPECIAL_TOKENS", "added_tokens", "clip_clean", "fix_text"]

#: transformers' CLIP added tokens, cut out of the text before the slow tokenizer cleans it
SPECIAL_TOKENS: tuple[str, str] = ("<|startoftext|>", "<|endoftext|>")

#: ftfy's ``TextFixerConfig.max_decode_length``: the longest segment fixed at once
_MAX_SEGMENT = 1_000_000

# ----------------------------------------------------------------------------- ftfy's tables (chardata.py)


def _c1_map() -> dict[int, str]:
    """``fix_c1_controls`` (fixes.py ``_c1_fixer``): U+0080-U+009F decoded as ftfy's "sloppy-windows-1252"
    (Windows-1252, its five undefined bytes passed through as Latin-1)."""
    table: dict[int, str] = {}
    for code in range(0x80, 0xA0):
        try:
            char = bytes([code]).decode("cp1252")
        except UnicodeDecodeError:
            char = chr(code)
        if char != chr(code):
            table[code] = char
    return table


#: ``chardata.LIGATURES`` (copied: ftfy lists them by hand)
_LIGATURES: dict[int, str] = {
    ord("Ĳ"): "IJ", ord("ĳ"): "ij", ord("ŉ"): "ʼn",
    ord("Ǳ"): "DZ", ord("ǲ"): "Dz", ord("ǳ"): "dz", ord("Ǆ"): "DŽ", ord("ǅ"): "Dž", ord("ǆ"): "dž",
    ord("Ǉ"): "LJ", ord("ǈ"): "Lj", ord("ǉ"): "lj", ord("Ǌ"): "NJ", ord("ǋ"): "Nj", ord("ǌ"): "nj",
    ord("ﬀ"): "ff", ord("ﬁ"): "fi", ord("ﬂ"): "fl", ord("ﬃ"): "ffi", ord("ﬄ"): "ffl", ord("ﬅ"): "ſt", ord("ﬆ"): "st",
}


def _width_map() -> dict[int, str]:
    """``chardata._build_width_map``: U+3000 -> space, and U+FF01-U+FFEF -> their NFKC form where it differs
    (built from this Python's ``unicodedata``, as ftfy builds it)."""
    table = {0x3000: " "}
    for code in range(0xFF01, 0xFFF0):
        alternate = unicodedata.normalize("NFKC", chr(code))
        if alternate != chr(code):
            table[code] = alternate
    return table


def _quote_map() -> dict[int, str]:
    """``uncurl_quotes``: ``chardata.SINGLE_QUOTE_RE`` ``[\\u02bc\\u2018-\\u201b]`` -> ``'``,
    ``DOUBLE_QUOTE_RE`` ``[\\u201c-\\u201f]`` -> ``"``."""
    table = {0x02BC: "'"}
    table.update({code: "'" for code in range(0x2018, 0x201C)})
    table.update({code: '"' for code in range(0x201C, 0x2020)})
    return table


#: ``fix_line_breaks`` after its ``"\\r\\n" -> "\\n"``: CR, LINE/PARAGRAPH SEPARATOR, NEXT LINE -> ``\\n``
_LINE_BREAKS: dict[int, str] = {0x0D: "\n", 0x2028: "\n", 0x2029: "\n", 0x85: "\n"}


def _control_chars() -> dict[int, None]:
    """``chardata._build_control_char_mapping``: what ``remove_control_chars`` deletes."""
    codes = [*range(0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)]
    return dict.fromkeys(codes)


def _compose(*tables: dict[int, str] | dict[int, None]) -> dict[int, str | None]:
    """One ``str.translate`` table doing the per-character ``tables`` one after another."""
    keys = set().union(*tables)
    composed: dict[int, str | None] = {}
    for code in keys:
        text = chr(code)
        for table in tables:
            text = text.translate(table)
        if text != chr(code):
            composed[code] = text or None
    return composed


_CONTROL_CHARS = _control_chars()
#: ftfy's per-character fixers in its order: fix_c1_controls, fix_latin_ligatures, fix_character_width,
#: uncurl_quotes, fix_line_breaks (each maps characters that the later ones never produce in a way an earlier one
#: would have to see again, so composing them is exact)
_CHAR_FIXES = _compose(_c1_map(), _LIGATURES, _width_map(), _quote_map(), _LINE_BREAKS)
#: the same followed by remove_control_chars: exact when the text has no ESC and no surrogates (the two steps
#: ftfy runs between them)
_CHAR_FIXES_AND_CONTROLS = _compose(_CHAR_FIXES, _CONTROL_CHARS)

_SURROGATE_RE = re.compile("[\ud800-\udfff]")  # fixes.SURROGATE_RE
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")  # fixes.SURROGATE_PAIR_RE
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")  # fixes.ANSI_RE
_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")  # chardata.HTML_ENTITY_RE
#: ASCII characters ftfy may change (controls, CR, ``&`` entities); other ASCII text is returned as it is
_ASCII_FIX_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f&]")
#: the same where white space is collapsed afterwards anyway (CR, FF and the other white space are left to that)
_ASCII_CLEAN_RE = re.compile("[\x00-\x08\x0b\x0e-\x1f\x7f&]")


@lru_cache(maxsize=1)
def _html_entities() -> dict[str, str]:
    """``chardata._build_html_entities``: HTML5 entities ending in ``;``, and upper-cased forms of the lower-case
    ones where ``html.unescape`` leaves them alone."""
    entities: dict[str, str] = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            entities["&" + name] = char
            if name == name.lower():
                upper = "&" + name.upper()
                if html.unescape(upper) == upper:
                    entities[upper] = char.upper()
    return entities


def _unescape_entity(match: Match[str]) -> str:
    """``fixes._unescape_fixup``: one matched entity -> its character, or left as it is."""
    text = match.group(0)
    entities = _html_entities()
    if text in entities:
        return entities[text]
    if text.startswith("&#"):
        unescaped = html.unescape(text)
        return text if ";" in unescaped else unescaped
    return text


def _unescape_html(text: str) -> str:
    """``fixes.unescape_html``."""
    return _HTML_ENTITY_RE.sub(_unescape_entity, text) if "&" in text else text


def _pair_to_char(match: Match[str]) -> str:
    """``fixes.convert_surrogate_pair``."""
    high, low = match.group(0)
    return chr(0x10000 + (ord(high) - 0xD800) * 0x400 + (ord(low) - 0xDC00))


def _fix_pass(text: str) -> str:
    """One pass of ftfy's fixers after ``unescape_html`` and the (left out) ``fix_encoding``: fix_c1_controls,
    fix_latin_ligatures, fix_character_width, uncurl_quotes, fix_line_breaks, fix_surrogates,
    remove_terminal_escapes, remove_control_chars, then NFC (``fix_and_explain`` :402-418)."""
    if "\r\n" in text:  # (first: none of the earlier fixers makes or breaks a CR LF)
        text = text.replace("\r\n", "\n")
    surrogates = _SURROGATE_RE.search(text) is not None
    if not surrogates and "\x1b" not in text:
        text = text.translate(_CHAR_FIXES_AND_CONTROLS)
    else:
        text = text.translate(_CHAR_FIXES)
        if surrogates:
            text = _SURROGATE_RE.sub("\ufffd", _SURROGATE_PAIR_RE.sub(_pair_to_char, text))
        if "\x1b" in text:
            text = _ANSI_RE.sub("", text)
        text = text.translate(_CONTROL_CHARS)
    return unicodedata.normalize("NFC", text)


def _fix_segment(text: str, unescape: bool) -> str:
    """``fix_and_explain``: the fixers again and again until the text no longer changes."""
    while True:
        before = text
        if unescape:
            text = _unescape_html(text)
        text = _fix_pass(text)
        if text == before:
            return text


def fix_text(text: str) -> str:
    """``ftfy.fix_text(text)`` of ftfy 6.3.1 with the default configuration, without mojibake repair.

    Runs, in ftfy's order and until the text no longer changes: ``unescape_html`` (``"auto"``: HTML5 entities
    ending in ``;``, upper-cased Latin ones like ``&EACUTE;``, and ``&#...;`` character references; ftfy fixes the
    text line by line, ``\\n`` ending a line, and from the first line holding a ``<`` on it stops un-escaping for
    that line and all later ones), ``fix_c1_controls`` (U+0080-U+009F as Windows-1252: ``\\x85`` -> ``…``),
    ``fix_latin_ligatures``, ``fix_character_width`` (full-width ASCII, half-width katakana/Hangul, U+3000 ->
    space), ``uncurl_quotes``, ``fix_line_breaks``, ``fix_surrogates``, ``remove_terminal_escapes``,
    ``remove_control_chars`` (C0 controls but tab, LF, FF, CR; DEL; U+206A-U+206F; BOM; U+FFF9-U+FFFC) and NFC.

    Left out is ``fix_encoding`` (with ``restore_byte_a0``, ``replace_lossy_sequences`` and
    ``decode_inconsistent_utf8``): ftfy's heuristics that guess that text is UTF-8 decoded in the wrong encoding
    (``Ã©`` -> ``é``) need its character-class "badness" model and sloppy codecs, thousands of lines that would
    change with every ftfy release. This function equals ``ftfy.fix_text(text, fix_encoding=False)`` for every
    text, and ``ftfy.fix_text(text)`` for every text without mojibake (for which ``fix_encoding`` changes nothing).
    The tables come from this Python's ``unicodedata`` and ``html.entities`` as ftfy builds them.
    """
    if text.isascii() and _ASCII_FIX_RE.search(text) is None:
        return text
    if len(text) <= _MAX_SEGMENT and "&" not in text and "\uff06" not in text:
        # (no entity can appear, and every fixer is local to a line: the whole text at once is the same)
        return _fix_segment(text, False)
    out: list[str] = []
    unescape = True
    pos, end = 0, len(text)
    while pos < end:  # (ftfy.fix_text :346-361, its "auto" rule included)
        stop = text.find("\n", pos) + 1 or end
        stop = min(stop, pos + _MAX_SEGMENT)
        segment = text[pos:stop]
        if unescape and "<" in segment:
            unescape = False
        out.append(_fix_segment(segment, unescape))
        pos = stop
    return "".join(out)


def _whitespace_clean(text: str) -> str:
    """Every white-space run -> one space, stripped: transformers' ``re.sub(r"\\s+", " ", text).strip()`` and
    open_clip's ``" ".join(text.split())`` (``\\s`` matches exactly what ``str.isspace`` accepts)."""
    return " ".join(text.split())


def _slow_clean(text: str) -> str:
    """transformers' slow ``CLIPTokenizer._tokenize`` clean-up of one segment, before ``.lower()``."""
    if text.isascii() and _ASCII_CLEAN_RE.search(text) is None:
        return _whitespace_clean(text)
    return _whitespace_clean(fix_text(text))


def added_tokens(tokenizer: object) -> tuple[str, ...]:
    """The added tokens of a transformers tokenizer (its special tokens, an embedding's trigger words), which its
    slow form cuts out of a text before cleaning the pieces between them; ``()`` for another tokenizer."""
    vocab = getattr(tokenizer, "get_added_vocab", None)
    return tuple(vocab()) if callable(vocab) else ()


@lru_cache(maxsize=64)
def _cutter(tokens: tuple[str, ...]) -> re.Pattern[str]:
    """A pattern splitting a text at ``tokens`` (longest first, as transformers' trie takes the longest match)."""
    return re.compile("(" + "|".join(map(re.escape, sorted(set(tokens), key=len, reverse=True))) + ")")


def clip_clean(text: str, *, open_clip: bool = False, added: tuple[str, ...] = ()) -> str:
    """The clean-up a CLIP tokenizer applies before BPE, except the lower-casing (the tokenizer does that).

    ``open_clip=False``: transformers' slow ``CLIPTokenizer`` (kohya, A1111 SD1, ComfyUI, diffusers on
    transformers 4): ``whitespace_clean(ftfy.fix_text(segment))`` for each segment between its added tokens — the
    special tokens ``<|startoftext|>`` / ``<|endoftext|>`` and ``added`` (:func:`added_tokens`: an embedding's
    trigger words such as ``<cat-toy>``) —, which are kept as they are (the slow tokenizer cuts them out first,
    so a ``<`` in them does not turn off HTML un-escaping of the rest, and each segment is stripped). The
    segments are joined without separator, so transformers' fast tokenizer or :class:`sdadapt.clip_tokenizer.
    CLIPTokenizer` on the result gives the slow tokenizer's ids. Not reproducible by cleaning: text that turns
    into a special token only through the clean-up and lower-casing (``<|ENDOFTEXT|>``, full-width
    ``＜｜endoftext｜＞``), which the slow tokenizer's BPE regex reads as the special token unless punctuation
    precedes it, while a fast tokenizer matches special tokens in the raw text only; and text for which ftfy's
    left-out mojibake repair would change something (see :func:`fix_text`).

    ``open_clip=True``: open_clip's ``whitespace_clean(basic_clean(text))`` on the whole text, so HTML entities
    are un-escaped twice more by ``html.unescape`` (also without ``;`` and when a ``<`` is in the text), and
    special tokens get no treatment: open_clip's own ``<start_of_text>`` / ``<end_of_text>`` are recognised by its
    regex after the clean-up, and ``<|endoftext|>`` is plain text to it (a fast CLIP tokenizer would read it as
    the special token).
    """
    if open_clip:
        if text.isascii() and _ASCII_CLEAN_RE.search(text) is None:
            return _whitespace_clean(text)
        return _whitespace_clean(html.unescape(html.unescape(fix_text(text))))
    cut = tuple(token for token in (*SPECIAL_TOKENS, *added) if token and token in text)
    if not cut:
        return _slow_clean(text)
    pieces = _cutter(cut).split(text)
    return "".join(piece if i % 2 else _slow_clean(piece) for i, piece in enumerate(pieces))
