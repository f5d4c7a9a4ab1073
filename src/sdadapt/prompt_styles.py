"""A1111's saved prompt styles (``modules/styles.py``, A1111 1.10): ``styles.csv`` files of ``name, prompt,
negative_prompt`` rows, and their text merged into a prompt as A1111's ``apply_styles_to_prompt`` merges it.

A style's text with ``{prompt}`` has the prompt put in its place; one without is appended after ``", "`` (both
stripped, an empty one left out). Several styles apply in the order given, each to the result of the one before.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["PromptStyle", "apply_styles", "find_styles", "merge_prompts", "read_styles", "styled_prompts"]


@dataclasses.dataclass(frozen=True)
class PromptStyle:
    """One saved style: its ``name``, ``prompt`` and ``negative_prompt`` texts, and the ``path`` it was read from."""

    name: str
    prompt: str = ""
    negative_prompt: str = ""
    path: str | None = None


def merge_prompts(style_prompt: str, prompt: str) -> str:
    """A1111's ``merge_prompts``: ``style_prompt`` with ``{prompt}`` replaced by ``prompt``; without ``{prompt}``,
    both stripped and joined by ``", "`` (an empty one left out)."""
    if "{prompt}" in style_prompt:
        return style_prompt.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_prompt.strip()) if part)


def apply_styles(prompt: str, texts: Sequence[str]) -> str:
    """A1111's ``apply_styles_to_prompt``: each of ``texts`` merged in turn (:func:`merge_prompts`)."""
    for text in texts:
        prompt = merge_prompts(text, prompt)
    return prompt


def styled_prompts(prompt: str, negative: str, styles: Sequence[PromptStyle]) -> tuple[str, str]:
    """The prompt and negative prompt with ``styles`` applied, as A1111's ``setup_prompts`` applies a run's styles
    (the positive texts to the prompt, the negative ones to the negative prompt)."""
    return (apply_styles(prompt, [style.prompt for style in styles]),
            apply_styles(negative, [style.negative_prompt for style in styles]))


def read_styles(paths: Sequence[str | os.PathLike]) -> dict[str, PromptStyle]:
    """The styles in A1111's styles files ``paths`` (its ``--styles-file``; a name with ``*`` or ``?`` is a glob
    pattern), as ``StyleDatabase`` reads them: UTF-8 (a byte-order mark skipped) CSV with a header row, blanks after
    the commas skipped, the ``prompt`` column (or an old file's ``text``), ``negative_prompt`` when there is one;
    rows whose name starts with ``#`` left out; a name given again in a later row or file replaces the earlier.

    Raises:
        InputError: a file that does not exist, a pattern that matches none, a file without a ``name`` column or
            that is no CSV text (named).
    """
    from .errors import InputError

    files: list[Path] = []
    for pattern in paths:
        name = os.path.basename(str(pattern))
        found = sorted(Path(p) for p in glob.glob(str(pattern))) if ("*" in name or "?" in name) else [Path(pattern)]
        if not found or not all(path.is_file() for path in found):
            raise InputError(f"--styles-file {pattern}: no such file (A1111's styles.csv: name, prompt, "
                             "negative_prompt)")
        files += [path for path in found if path not in files]
    styles: dict[str, PromptStyle] = {}
    for path in files:
        try:
            with open(path, encoding="utf-8-sig", newline="") as handle:
                rows = list(csv.DictReader(handle, skipinitialspace=True))
        except (UnicodeDecodeError, csv.Error) as exc:
            raise InputError(f"--styles-file {path}: not a CSV text file of styles ({exc})") from None
        for row in rows:
            if "name" not in row or ("prompt" not in row and "text" not in row):
                raise InputError(f"--styles-file {path}: no 'name' and 'prompt' columns (A1111's header: name,prompt,"
                                 "negative_prompt)")
            if not row["name"] or row["name"].startswith("#"):
                continue
            text = row["prompt"] if "prompt" in row else row["text"]
            styles[row["name"]] = PromptStyle(row["name"], text or "", row.get("negative_prompt") or "", str(path))
    return styles


def find_styles(names: Sequence[str], styles: Mapping[str, PromptStyle]) -> list[PromptStyle]:
    """``names`` looked up in ``styles`` (A1111's style names, exact).

    Raises:
        InputError: a name not there (A1111 would apply nothing for it, silently), the names there listed.
    """
    from .errors import InputError

    missing = [name for name in names if name not in styles]
    if missing:
        known = ", ".join(repr(name) for name in styles) or "none"
        raise InputError(f"--style {missing[0]!r}: no such style in the --styles-file files (their styles: {known})")
    return [styles[name] for name in names]
