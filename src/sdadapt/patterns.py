"""Regular expressions from files and users, matched in linear time (no backtracking).

Python's ``re`` backtracks: a pattern such as ``(.*.*.*)*#`` takes exponential time on a
40-character layer name, and a file can carry such a pattern (peft/diffusers ``alpha_pattern`` /
``rank_pattern`` keys in ``lora_adapter_metadata`` or ``adapter_config.json``; a merge recipe's
``discard``). Patterns that come from data are therefore never given to ``re`` when they could
backtrack; they are compiled here into a Thompson NFA and run as a lazily built DFA: time linear in
the text for a fixed pattern, with a hard cap on the work (:class:`PatternError` past it).

Supported syntax (Python's, for matching — no captures are returned): literals and escapes
(``\\.``, ``\\n``, ``\\xhh`` ...), ``.``, classes ``[a-z_]`` / ``[^...]`` with ``\\d \\w \\s`` and
their negations, groups ``(...)``, ``(?:...)``, ``(?P<name>...)``, alternation ``|``, quantifiers
``* + ? {m} {m,} {m,n} {,n}`` (lazy/possessive suffixes accepted: they do not change *whether* a
text matches), anchors ``^ $ \\A \\Z``. Refused with a clear error: backreferences, lookaround,
inline flags, word boundaries, atomic groups.

:func:`peft_pattern_key` is peft's ``get_pattern_key`` (``re.match(rf"(.*\\.)?({key})$", name)``:
the key matches the whole module name or a dotted suffix of it; the first key in order wins).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import InputError

__all__ = ["PatternError", "SafePattern", "compile_pattern", "own_pattern_entries", "peft_pattern_key", "peft_pattern_value",
           "MAX_PATTERN_LENGTH"]

#: longest pattern accepted (characters)
MAX_PATTERN_LENGTH = 2000
_MAX_NODES = 20_000  # NFA size after expanding counted repeats
_MAX_NESTING = 100
_MAX_CACHE = 200_000  # DFA cache entries (state sets' total size) before the cache is reset
_WORK_PER_CALL = 50_000_000  # NFA node visits one match may cost


class PatternError(InputError):
    """A pattern that is invalid, uses unsupported syntax, or needs too much work; names the pattern."""


# --------------------------------------------------------------------------------------- parsing
# AST nodes: ("lit", pred) | ("cat", [nodes]) | ("alt", [nodes]) | ("rep", node, min, max|None) | ("bol",) | ("eol",) | ("empty",)
Pred = Callable[[str], bool]


def _is_digit(c: str) -> bool:
    return c.isdecimal()


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _is_space(c: str) -> bool:
    return c in " \t\n\r\f\v" or c.isspace()


_CLASS_ESCAPES: dict[str, Pred] = {
    "d": _is_digit, "w": _is_word, "s": _is_space,
    "D": lambda c: not _is_digit(c), "W": lambda c: not _is_word(c), "S": lambda c: not _is_space(c),
}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a", "0": "\0"}
_UNSUPPORTED_ESCAPES = {"b": "word boundaries (\\b)", "B": "word boundaries (\\B)", "G": "\\G"}


class _Parser:
    def __init__(self, text: str, what: str) -> None:
        self.text = text
        self.pos = 0
        self.what = what
        self.depth = 0

    def error(self, message: str) -> PatternError:
        return PatternError(f"{self.what}: invalid pattern {self.text[:80]!r}: {message} (at position {self.pos})")

    def unsupported(self, feature: str) -> PatternError:
        return PatternError(
            f"{self.what}: pattern {self.text[:80]!r} uses {feature}, which sdadapt does not evaluate (patterns are "
            "matched in linear time: no backreferences, lookaround, inline flags or word boundaries)"
        )

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def take(self) -> str:
        c = self.text[self.pos]
        self.pos += 1
        return c

    def parse(self) -> Any:
        node = self.alternation()
        if self.pos != len(self.text):
            if self.peek() == ")":
                raise self.error("unbalanced parenthesis")
            raise self.error("unexpected character")
        return node

    def alternation(self) -> Any:
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.take()
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concatenation(self) -> Any:
        items: list[Any] = []
        while self.peek() is not None and self.peek() not in "|)":
            items.append(self.repetition())
        if not items:
            return ("empty",)
        return items[0] if len(items) == 1 else ("cat", items)

    def repetition(self) -> Any:
        start = self.pos
        atom = self.atom()
        quantified = False
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                bounds = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
                self.take()
            elif c == "{":
                bounds = self.counted()
                if bounds is None:
                    break
            else:
                break
            if quantified:
                raise self.error("multiple repeat")
            if atom[0] in ("bol", "eol") or self.pos - 1 == start:
                raise self.error("nothing to repeat")
            atom = ("rep", atom, bounds[0], bounds[1])
            quantified = True
            if self.peek() == "?":  # lazy: the same texts match
                self.take()
            elif self.peek() == "+":
                raise self.unsupported("a possessive quantifier")
        return atom

    def counted(self) -> tuple[int, int | None] | None:
        match = re.match(r"\{(\d*)(,?)(\d*)\}", self.text[self.pos :])
        if not match or (not match.group(1) and not match.group(3) and match.group(2)) or (
            not match.group(1) and not match.group(2)
        ):
            if match and not match.group(1) and match.group(2) and not match.group(3):
                return None  # "{,}" is a literal in Python
            return None  # not a quantifier: "{" is a literal
        low = int(match.group(1)) if match.group(1) else 0
        high: int | None
        if match.group(2):
            high = int(match.group(3)) if match.group(3) else None
        else:
            high = low
        if low > 100_000 or (high is not None and high > 100_000):
            raise self.error("repeat count too large")
        if high is not None and high < low:
            raise self.error("min repeat greater than max repeat")
        self.pos += match.end()
        return low, high

    def atom(self) -> Any:
        c = self.take()
        if c == "(":
            return self.group()
        if c == "[":
            return ("lit", self.char_class())
        if c == ".":
            return ("lit", lambda ch: ch != "\n")
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c == "\\":
            return self.escape(in_class=False)
        if c in "*+?":
            raise self.error("nothing to repeat")
        return ("lit", _equals(c))

    def group(self) -> Any:
        self.depth += 1
        if self.depth > _MAX_NESTING:
            raise self.error(f"groups nested deeper than {_MAX_NESTING}")
        if self.text.startswith("?", self.pos):
            rest = self.text[self.pos :]
            if rest.startswith("?:"):
                self.pos += 2
            elif rest.startswith("?P<"):
                end = self.text.find(">", self.pos)
                if end < 0 or not self.text[self.pos + 3 : end].isidentifier():
                    raise self.error("bad group name")
                self.pos = end + 1
            elif rest.startswith(("?=", "?!", "?<=", "?<!")):
                raise self.unsupported("lookaround")
            elif rest.startswith("?P="):
                raise self.unsupported("a backreference")
            elif rest.startswith("?>"):
                raise self.unsupported("an atomic group")
            elif rest.startswith("?#"):
                end = self.text.find(")", self.pos)
                if end < 0:
                    raise self.error("missing ), unterminated comment")
                self.pos = end + 1
                self.depth -= 1
                return ("empty",)
            else:
                raise self.unsupported("inline flags or an unknown group extension")
        node = self.alternation()
        if self.peek() != ")":
            raise self.error("missing ), unterminated subpattern")
        self.take()
        self.depth -= 1
        return node

    def escape(self, *, in_class: bool) -> Any:
        if self.peek() is None:
            raise self.error("bad escape (end of pattern)")
        c = self.take()
        if c in _CLASS_ESCAPES:
            return ("lit", _CLASS_ESCAPES[c])
        if not in_class and c in ("A", "Z"):
            return ("bol",) if c == "A" else ("eol",)
        if c in _UNSUPPORTED_ESCAPES and not in_class:
            raise self.unsupported(_UNSUPPORTED_ESCAPES[c])
        if c == "b" and in_class:
            return ("lit", _equals("\b"))
        if c.isdigit() and c != "0":
            if in_class:
                raise self.error("bad escape")
            raise self.unsupported("a backreference")
        if c in _CHAR_ESCAPES:
            return ("lit", _equals(_CHAR_ESCAPES[c]))
        if c in "xuU":
            width = {"x": 2, "u": 4, "U": 8}[c]
            digits = self.text[self.pos : self.pos + width]
            if len(digits) != width or not all(d in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"incomplete escape \\{c}{digits}")
            self.pos += width
            code = int(digits, 16)
            if code > 0x10FFFF:
                raise self.error("bad escape (code point out of range)")
            return ("lit", _equals(chr(code)))
        if c == "N":
            raise self.unsupported("named characters (\\N{...})")
        if c.isascii() and c.isalpha():
            raise self.error(f"bad escape \\{c}")
        return ("lit", _equals(c))

    def char_class(self) -> Pred:
        negate = False
        if self.peek() == "^":
            self.take()
            negate = True
        chars: set[str] = set()
        ranges: list[tuple[str, str]] = []
        preds: list[Pred] = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.error("unterminated character set")
            if c == "]" and not first:
                self.take()
                break
            first = False
            self.take()
            if c == "\\":
                node = self.escape(in_class=True)
                pred = node[1]
                single = getattr(pred, "char", None)
                if single is None:
                    preds.append(pred)
                    continue
                c = single
            if self.peek() == "-" and self.pos + 1 < len(self.text) and self.text[self.pos + 1] != "]":
                self.take()
                end = self.take()
                if end == "\\":
                    node = self.escape(in_class=True)
                    end = getattr(node[1], "char", None)
                    if end is None:
                        raise self.error("bad character range")
                if ord(end) < ord(c):
                    raise self.error(f"bad character range {c}-{end}")
                ranges.append((c, end))
            else:
                chars.add(c)
        frozen = frozenset(chars)
        ranges_t = tuple(ranges)
        preds_t = tuple(preds)

        def pred(ch: str) -> bool:
            hit = ch in frozen or any(a <= ch <= b for a, b in ranges_t) or any(p(ch) for p in preds_t)
            return hit != negate

        return pred


def _equals(char: str) -> Pred:
    def pred(ch: str) -> bool:
        return ch == char

    pred.char = char  # type: ignore[attr-defined]
    return pred


# ------------------------------------------------------------------------------------------- NFA
_CHAR, _SPLIT, _BOL, _EOL, _MATCH, _EPS = range(6)


class _NFA:
    def __init__(self, what: str, text: str) -> None:
        self.kind: list[int] = []
        self.pred: list[Pred | None] = []
        self.out1: list[int] = []
        self.out2: list[int] = []
        self.what = what
        self.text = text

    def node(self, kind: int, pred: Pred | None = None) -> int:
        if len(self.kind) >= _MAX_NODES:
            raise PatternError(f"{self.what}: pattern {self.text[:80]!r} is too large to match safely "
                               f"(over {_MAX_NODES} states after expanding its counted repeats)")
        self.kind.append(kind)
        self.pred.append(pred)
        self.out1.append(-1)
        self.out2.append(-1)
        return len(self.kind) - 1

    def build(self, ast: Any) -> tuple[int, list[tuple[int, int]]]:
        """Fragment (start node, dangling exits [(node, slot)])."""
        kind = ast[0]
        if kind == "lit":
            n = self.node(_CHAR, ast[1])
            return n, [(n, 1)]
        if kind in ("bol", "eol", "empty"):
            n = self.node({"bol": _BOL, "eol": _EOL, "empty": _EPS}[kind])
            return n, [(n, 1)]
        if kind == "cat":
            start, exits = self.build(ast[1][0])
            for item in ast[1][1:]:
                s, e = self.build(item)
                self.patch(exits, s)
                exits = e
            return start, exits
        if kind == "alt":
            starts_exits = [self.build(b) for b in ast[1]]
            start, exits = starts_exits[-1]
            for s, e in reversed(starts_exits[:-1]):
                split = self.node(_SPLIT)
                self.out1[split], self.out2[split] = s, start
                start, exits = split, e + exits
            return start, exits
        if kind == "rep":
            _, sub, low, high = ast
            pieces: list[tuple[int, list[tuple[int, int]]]] = [self.build(sub) for _ in range(low)]
            if high is None:
                s, e = self.build(sub)
                split = self.node(_SPLIT)
                self.out1[split] = s
                self.patch(e, split)
                pieces.append((split, [(split, 2)]))
            else:
                for _ in range(high - low):
                    s, e = self.build(sub)
                    split = self.node(_SPLIT)
                    self.out1[split] = s
                    pieces.append((split, e + [(split, 2)]))
            if not pieces:
                n = self.node(_EPS)
                return n, [(n, 1)]
            start, exits = pieces[0]
            for s, e in pieces[1:]:
                self.patch(exits, s)
                exits = e
            return start, exits
        raise AssertionError(kind)  # pragma: no cover

    def patch(self, exits: list[tuple[int, int]], target: int) -> None:
        for n, slot in exits:
            if slot == 1:
                self.out1[n] = target
            else:
                self.out2[n] = target


class SafePattern:
    """A compiled pattern with :meth:`search` and :meth:`fullmatch` in linear time.

    Attributes:
        text: the pattern as given.
    """

    def __init__(self, text: str, *, what: str = "pattern", prefix: str = "") -> None:
        if not isinstance(text, str):
            raise PatternError(f"{what}: a pattern must be a string, got {type(text).__name__}")
        if len(text) > MAX_PATTERN_LENGTH:
            raise PatternError(f"{what}: pattern of {len(text)} characters is over the {MAX_PATTERN_LENGTH} sdadapt "
                               "accepts")
        self.text = text
        self.what = what
        ast = _Parser(text, what).parse()
        if prefix:
            ast = ("cat", [_Parser(prefix, what).parse(), ast])
        self._literal = _literal_text(ast)
        nfa = _NFA(what, text)
        start, exits = nfa.build(ast)
        match = nfa.node(_MATCH)
        nfa.patch(exits, match)
        self._nfa = nfa
        self._start = start
        self._match = match
        self._cache: dict[tuple[frozenset[int], str, bool], frozenset[int]] = {}
        self._closures: dict[tuple[frozenset[int], bool], frozenset[int]] = {}
        self._cached = 0
        self._work = 0

    def __repr__(self) -> str:
        return f"SafePattern({self.text!r})"

    # closure: CHAR, EOL (pending) and MATCH nodes reachable through epsilons
    def _closure(self, seeds: Iterable[int], *, at_begin: bool, at_end: bool) -> frozenset[int]:
        nfa = self._nfa
        out: set[int] = set()
        seen: set[int] = set()
        stack = [s for s in seeds if s >= 0]
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            self._work += 1
            kind = nfa.kind[n]
            if kind == _SPLIT:
                stack.append(nfa.out1[n])
                stack.append(nfa.out2[n])
            elif kind == _EPS:
                stack.append(nfa.out1[n])
            elif kind == _BOL:
                if at_begin:
                    stack.append(nfa.out1[n])
            elif kind == _EOL:
                if at_end:
                    stack.append(nfa.out1[n])
                else:
                    out.add(n)
            else:
                out.add(n)
        return frozenset(out)

    def _step(self, states: frozenset[int], char: str, restart: frozenset[int] | None) -> frozenset[int]:
        key = (states, char, restart is not None)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        nfa = self._nfa
        moved = []
        for n in states:
            self._work += 1
            if nfa.kind[n] == _CHAR and nfa.pred[n](char):  # type: ignore[misc]
                moved.append(nfa.out1[n])
        result = self._closure(moved, at_begin=False, at_end=False)
        if restart is not None:
            result = result | restart
        self._cached += len(result) + 1
        if self._cached > _MAX_CACHE:
            self._cache.clear()
            self._cached = 0
        self._cache[key] = result
        return result

    def _accepts_at_end(self, states: frozenset[int], *, at_begin: bool) -> bool:
        key = (states, at_begin)
        hit = self._closures.get(key)
        if hit is None:
            pending = [self._nfa.out1[n] for n in states if self._nfa.kind[n] == _EOL]
            hit = self._closure(pending, at_begin=at_begin, at_end=True) | states
            if len(self._closures) > 10_000:
                self._closures.clear()
            self._closures[key] = hit
        return self._match in hit

    def _budget(self, text: str) -> None:
        if self._work > _WORK_PER_CALL:
            self._work = 0
            raise PatternError(f"{self.what}: matching pattern {self.text[:80]!r} against a {len(text)}-character "
                               "name needs too much work; refusing it")

    def fullmatch(self, text: str) -> bool:
        """Whether the whole of ``text`` matches (``re.fullmatch``)."""
        self._work = 0
        if self._literal is not None:
            return text == self._literal
        states = self._closure([self._start], at_begin=True, at_end=False)
        for index, char in enumerate(text):
            if not states:
                return False
            states = self._step(states, char, None)
            if index & 1023 == 1023:
                self._budget(text)
        return self._accepts_at_end(states, at_begin=not text)

    def search(self, text: str) -> bool:
        """Whether a match starts anywhere in ``text`` (``re.search``)."""
        self._work = 0
        if self._literal is not None:
            return self._literal in text
        restart = self._closure([self._start], at_begin=False, at_end=False)
        states = self._closure([self._start], at_begin=True, at_end=False)
        if self._match in states:
            return True
        for index, char in enumerate(text):
            states = self._step(states, char, restart)
            if self._match in states:
                return True
            if index & 1023 == 1023:
                self._budget(text)
        return self._accepts_at_end(states, at_begin=not text)


def _literal_text(ast: Any) -> str | None:
    """The text a pattern of plain characters matches (None: it has any operator)."""
    items = ast[1] if ast[0] == "cat" else [ast]
    chars = []
    for item in items:
        char = getattr(item[1], "char", None) if item[0] == "lit" else None
        if char is None:
            return None
        chars.append(char)
    return "".join(chars)


def compile_pattern(text: str, *, what: str = "pattern") -> SafePattern:
    """Compile a user's or a file's pattern for linear-time :meth:`SafePattern.search`/``fullmatch``.

    Args:
        what: where the pattern comes from (``"--discard"``, ``"recipe.json: discard"``), for messages.

    Raises:
        PatternError: invalid (``"("``), unsupported syntax, over :data:`MAX_PATTERN_LENGTH`, or too large.
    """
    return SafePattern(text, what=what)


# ------------------------------------------------------------------------- peft's pattern lookup
_PLAIN = re.compile(r"[A-Za-z0-9_\-]*\Z")
_FIXED = re.compile(r"[A-Za-z0-9_\-.]*\Z")


class _PeftKeys:
    """Compiled keys of one ``alpha_pattern``/``rank_pattern`` dict (in order)."""

    def __init__(self, keys: list[str], what: str) -> None:
        self.keys = keys
        self.compiled: list[tuple[str, Any]] = []
        for key in keys:
            if _PLAIN.match(key):  # no operator at all: a dotted-suffix test
                self.compiled.append(("plain", key))
            elif _FIXED.match(key):  # letters and '.' wildcards: fixed length, re cannot backtrack
                self.compiled.append(("fixed", re.compile(key)))
            else:
                self.compiled.append(("nfa", SafePattern(key, what=what, prefix=r"(?:.*\.)?")))


_PEFT_CACHE: dict[tuple[str, tuple[str, ...]], _PeftKeys] = {}


def _peft_keys(keys: tuple[str, ...], what: str) -> _PeftKeys:
    cache_key = (what, keys)
    found = _PEFT_CACHE.get(cache_key)
    if found is None:
        if len(_PEFT_CACHE) > 64:
            _PEFT_CACHE.clear()
        found = _PEFT_CACHE[cache_key] = _PeftKeys(list(keys), what)
    return found


def peft_pattern_key(keys: Iterable[str], name: str, *, what: str = "pattern") -> str | None:
    """The first of ``keys`` that peft's ``get_pattern_key`` would match against module ``name``.

    peft: ``re.match(rf"(.*\\.)?({key})$", name)`` — the key (a regular expression) matches the whole
    name or a dotted suffix. Here plain keys are string tests, keys of letters and ``.`` run through
    ``re`` on the fixed-length suffix (no backtracking possible), anything else through
    :class:`SafePattern`.

    Raises:
        PatternError: a key that is invalid or unsupported (``what`` names where it comes from).
    """
    compiled = _peft_keys(tuple(keys), what)
    for key, (kind, test) in zip(compiled.keys, compiled.compiled):
        if kind == "plain":
            hit = name == test or name.endswith("." + test)
        elif kind == "fixed":
            length = len(key)
            hit = len(name) >= length and (len(name) == length or name[-length - 1] == ".") and (
                test.fullmatch(name[-length:]) is not None
            )
        else:
            hit = test.fullmatch(name)
        if hit:
            return key
    return None


def peft_pattern_value(patterns: Mapping[str, Any], name: str, default: Any, *, what: str = "pattern") -> Any:
    """``patterns[key]`` for the key peft would pick for ``name`` (:func:`peft_pattern_key`), else ``default``."""
    if not patterns:
        return default
    key = peft_pattern_key(list(patterns), name, what=what)
    return default if key is None else patterns[key]


def own_pattern_entries(values: Mapping[str, Any], default: Any) -> dict[str, Any]:
    """peft ``rank_pattern`` / ``alpha_pattern`` entries under which every layer of ``values`` gets its own value.

    peft matches a key against any dotted suffix and takes the first key that matches, so the entry ``proj`` would
    also give ``blocks.proj`` its value. Layers that differ from ``default`` get an entry, longer (more dotted) names
    first; a layer another entry would catch gets its own entry too (even at ``default``).

    Raises:
        ValueError: a layer no ordering of entries gives its value (naming it).
    """
    ordered = sorted(values, key=lambda name: (-name.count("."), name))
    patterns = {name: values[name] for name in ordered if values[name] != default}
    caught = {name for name in ordered if peft_pattern_value(patterns, name, default) != values[name]}
    if caught:
        patterns = {name: values[name] for name in ordered if values[name] != default or name in caught}
        wrong = [name for name in ordered if peft_pattern_value(patterns, name, default) != values[name]]
        if wrong:
            raise ValueError(f"{wrong[0]}: peft's pattern keys match any dotted suffix, and no set of keys gives this "
                             "layer its own rank/alpha beside the others; save the adapter as a kohya file instead")
    return patterns
