"""supermerger's elemental merge: per-key strengths from ``Blocks:Elements:Ratio`` rules.

Text form (supermerger's ``elemental_en.md``): rules separated by commas or newlines, each
``BLOCKS:ELEMENTS:RATIO``:

* ``BLOCKS`` — block names separated by spaces (``IN04 OUT05``), ranges with ``-`` (``IN04-IN07``,
  either order), a leading ``NOT`` inverts the set; blank = every block. Names are the block list
  of the model's architecture (:func:`sdadapt.merge.blocks.block_names`: ``BASE, IN00..IN11, M00,
  OUT00..OUT11`` for SD1/SD2, ``BASE, IN00..IN08, M00, OUT00..OUT08`` for SDXL).
* ``ELEMENTS`` — substrings of the tensor key separated by spaces (``attn2``,
  ``attn2.to_out``), a leading ``NOT`` inverts; blank = every key.
* ``RATIO`` — the strength those keys get (alpha; the ``lam`` factor of task-vector operators).

Rules apply after block weights, in order; a later matching rule overrides an earlier one.

Differences from supermerger, on purpose: on SDXL the block of a key is its SDXL block (supermerger
looks an SDXL key's position in the SDXL list up in the SD1 list, so the middle block answers to
``IN09``, OUT00/OUT01 to ``IN10``/``IN11``, OUT02 to ``M00`` and an ``OUT00`` rule hits OUT03 — its issue #468);
a rule that is not ``A:B:C``, names an unknown block or has a bare ``NOT`` as its elements is an
error here (supermerger skips the first, fails later on the second, and reads the third as every key
or none depending on a trailing space); repeated spaces do not create an empty element that matches every key; random
ratios (supermerger's ``R``) are not supported.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from ..errors import InputError
from .blocks import block_names

__all__ = ["ElementalRule", "parse_elemental", "parse_selection", "elemental_ratio", "MAX_RULES"]

#: most rules one text may hold (every merged key is matched against each; supermerger users write a few)
MAX_RULES = 1024


@dataclass(frozen=True)
class ElementalRule:
    """One ``Blocks:Elements:Ratio`` rule.

    Attributes:
        blocks: block names (ranges expanded); empty = every block.
        not_blocks: the rule applies to the blocks *not* listed.
        elements: key substrings; empty = every key.
        not_elements: the rule applies to keys containing *none* of them.
        ratio: the strength the matching keys get.
    """

    blocks: tuple[str, ...]
    not_blocks: bool
    elements: tuple[str, ...]
    not_elements: bool
    ratio: float

    def matches(self, key: str, block: str | None) -> bool:
        """Whether the rule applies to ``key`` in ``block`` (``None``: a key outside every block)."""
        if self.blocks and ((block in self.blocks) == self.not_blocks):
            return False
        if self.elements and (any(e in key for e in self.elements) == self.not_elements):
            return False
        return True


def _words(field: str) -> tuple[bool, list[str]]:
    words = field.split()
    if words and words[0] == "NOT":
        return True, words[1:]
    return False, words


def _expand_blocks(words: Sequence[str], names: Sequence[str], rule: str, architecture: str, *,
                   what: str = "elemental rule") -> tuple[str, ...]:
    out: list[str] = []
    for word in words:
        ends = [w.strip() for w in word.split("-")] if "-" in word else [word]
        unknown = [w for w in ends if w not in names]
        if len(ends) > 2 or unknown:
            raise InputError(
                f"{what} {rule!r}: {word!r} is not a block of {architecture}; blocks are "
                f"{', '.join(names)} (ranges as IN04-IN07)"
            )
        if len(ends) == 1:
            out.append(ends[0])
        else:
            i, j = sorted((names.index(ends[0]), names.index(ends[1])))
            out.extend(names[i : j + 1])
    return tuple(dict.fromkeys(out))


def _rule_texts(text: str, what: str, too_many: str) -> Iterator[str]:
    """The rules of ``text`` (separated by commas or newlines), stripped, empty ones skipped; at most
    :data:`MAX_RULES` (``too_many``: the fix the error names)."""
    if not isinstance(text, str):
        raise InputError(f"{what} rules are text, got {type(text).__name__}")
    count = 0
    for raw in text.replace("\n", ",").split(","):
        rule = raw.strip()
        if not rule:
            continue
        if count == MAX_RULES:
            raise InputError(f"{what}: more than {MAX_RULES} rules; {too_many}")
        count += 1
        yield rule


def _rule(rule: str, block_field: str, element_field: str, ratio: float, names: Sequence[str], architecture: str, *,
          what: str) -> ElementalRule:
    """One rule from its ``BLOCKS`` and ``ELEMENTS`` fields (``NOT`` read on each)."""
    not_blocks, block_words = _words(block_field)
    not_elements, elements = _words(element_field)
    if not_elements and not elements:  # supermerger: all keys or none, depending on a trailing space
        raise InputError(f"{what} {rule[:80]!r}: NOT needs the elements to leave out after it")
    return ElementalRule(blocks=_expand_blocks(block_words, names, rule[:80], architecture, what=what),
                         not_blocks=not_blocks, elements=tuple(elements), not_elements=not_elements, ratio=ratio)


def parse_elemental(text: str, *, architecture: str, limit: float = 100.0) -> tuple[ElementalRule, ...]:
    """Rules from supermerger's elemental text (see the module doc).

    Args:
        text: ``"IN04 IN05:attn2:0.5, OUT03-OUT05:NOT attn1:0"``; commas and newlines separate rules.
        architecture: ``"sd1"``, ``"sd2"`` or ``"sdxl"``: which block names are valid.
        limit: the largest ``|ratio|``.

    Raises:
        InputError: a rule that is not ``BLOCKS:ELEMENTS:RATIO``, an unknown block, a ratio that
            is not a finite number within ``±limit`` (the message quotes the rule), or more than
            :data:`MAX_RULES` rules.
    """
    names = block_names(architecture)
    rules: list[ElementalRule] = []
    for rule in _rule_texts(text, "elemental", "merge in steps or use block weights"):
        if rule.count(":") != 2:
            raise InputError(f"elemental rule {rule[:80]!r}: write BLOCKS:ELEMENTS:RATIO (e.g. \"IN04 IN05:attn2:0.5\")")
        block_field, element_field, ratio_text = rule.split(":")
        try:
            ratio = float(ratio_text)
        except ValueError:
            raise InputError(f"elemental rule {rule[:80]!r}: the ratio {ratio_text.strip()[:20]!r} is not a number") from None
        if not math.isfinite(ratio) or abs(ratio) > limit:
            raise InputError(f"elemental rule {rule[:80]!r}: the ratio must be a finite number within ±{limit:g}")
        rules.append(_rule(rule, block_field, element_field, ratio, names, architecture, what="elemental rule"))
    if not rules:
        raise InputError("elemental: no rule given; write BLOCKS:ELEMENTS:RATIO (e.g. \"IN04 IN05:attn2:0.5\")")
    return tuple(rules)


def parse_selection(text: str, *, architecture: str) -> tuple[ElementalRule, ...]:
    """Key-selection rules ``BLOCKS:ELEMENTS`` (elemental rules without the ratio) for include/exclude.

    supermerger's Include/Exclude lists as rules: ``"IN04 OUT05:"`` selects two blocks,
    ``":attn2"`` the keys containing ``attn2`` anywhere, ``"IN04:attn2"`` both at once; rules are
    separated by commas or newlines and a key is selected when any rule matches it (supermerger's
    blocks-or-elements). ``BASE`` is the text encoders and the VAE.

    Raises:
        InputError: a rule that is not ``BLOCKS:ELEMENTS``, an unknown block, no rule.
    """
    names = block_names(architecture)
    rules: list[ElementalRule] = []
    for rule in _rule_texts(text, "include/exclude", "name blocks with ranges (IN04-IN07)"):
        if rule.count(":") != 1:
            raise InputError(f"include/exclude rule {rule[:80]!r}: write BLOCKS:ELEMENTS (e.g. \"IN04 OUT05:\" for "
                             "blocks, \":attn2\" for keys containing attn2)")
        block_field, element_field = rule.split(":")
        rules.append(_rule(rule, block_field, element_field, 1.0, names, architecture, what="include/exclude rule"))
    if not rules:
        raise InputError("include/exclude: no rule given; write BLOCKS:ELEMENTS (e.g. \"IN04 OUT05:\" or \":attn2\")")
    return tuple(rules)


def elemental_ratio(rules: Sequence[ElementalRule], key: str, block: str | None, value: float) -> float:
    """``value`` (the key's strength after block weights) overridden by the last rule matching ``key``.

    Args:
        rules: from :func:`parse_elemental`.
        key: the tensor key (element names are matched as substrings of it).
        block: the key's block (:func:`sdadapt.merge.blocks.key_block`), ``None`` outside every block.
        value: the strength without rules.
    """
    for rule in rules:
        if rule.matches(key, block):
            value = rule.ratio
    return value
