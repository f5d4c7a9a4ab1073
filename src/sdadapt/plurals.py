"""Counted nouns in the lines sdadapt says: ``plural(1, "model call")`` is "1 model call", ``plural(2, ...)``
"2 model calls" — the one home of the rule (the command-line reports and the jobs' log lines use it; nothing
heavy imported, so ``--help`` stays fast)."""

from __future__ import annotations

__all__ = ["plural"]


def plural(count: int, word: str, *, many: str | None = None) -> str:
    """``"COUNT WORD"`` with ``word`` for a count of exactly 1 and its plural otherwise (0, 2, ...): ``many`` when
    given (``plural(n, "entry", many="entries")``), else ``word + "s"``. ``count`` is written as given (an int)."""
    return f"{count} {word if count == 1 else (many if many is not None else word + 's')}"
