"""Which caption a caption file of several lines gives, for a new run and for a resumed one.

A caption file's caption is its first line (kohya's ``read_caption``; with ``enable_wildcard`` one
of its lines drawn at each use). Runs recorded before that trained on all its lines joined by spaces;
``train --resume`` of such a run keeps joining them, so it trains on as it started (the run report
counts the files it joined). Such a ``run.json`` has neither ``caption_lines`` nor ``vae``: the first
version that took the first line also began writing ``vae`` (always, ``null`` without ``--vae``) but
did not record the rule yet, so a record with ``vae`` and no ``caption_lines`` took the first line.

Empty captions and tags (``caption_empties``): a caption file whose first line is empty trains on the
caption ``""`` (kohya's ``read_caption`` returns ``""``, so neither the folder's class tokens nor
``--prompt`` take its place), and an empty tag (``"a, b, "``: a trailing comma) is a tag to shuffle,
drop and warm up, as kohya's ``process_caption`` splits a caption without ``keep_tokens_separator``.
Runs recorded before (no ``caption_empties`` in ``run.json``) dropped both; ``train --resume`` of such
a run keeps dropping them.

How a caption is put together (``caption_assembly``), as kohya's ``process_caption`` and
``FineTuningDataset``: a fine-tuning caption of several lines loses ``caption_suffix`` (kohya adds it
after the last line, then keeps the first line); with ``enable_wildcard`` an entry with an empty caption
and tags trains on ``""`` and one without tags keeps its empty lines; a whole-caption dropout alone does
not re-split the caption at commas; the movable tags are shuffled before the tag dropout draws (kohya's
``random.shuffle`` then ``dropout_tags``). Runs recorded before (no ``caption_assembly`` in ``run.json``) did
otherwise (they dropped tags, then shuffled the rest); ``train --resume`` of such a run keeps their way
(:attr:`~sdadapt.training.data.CaptionOptions.kohya_assembly` off).

Its second revision (``caption_assembly = "kohya-2"``, sd-scripts 48d368fa ``process_caption`` and
``train_textual_inversion.py``): a trigger-word method's template replaces an uncaptioned image's caption
last, after the prefix / suffix, wildcards and tag steps drew on it, and never a dropped one; a
``keep_tokens_separator`` stays in a caption that nothing shuffles, drops or warms up; the first line is
cut after the prefix / suffix are added; a fine-tuning caption keeps its white space as written
(:attr:`~sdadapt.training.data.CaptionOptions.kohya_order`). Runs recorded ``"kohya"`` resume as they
started (the template first, and so on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..training.data import (
    ASSEMBLY_BEFORE,
    ASSEMBLY_KOHYA,
    ASSEMBLY_KOHYA_2,
    EMPTIES_DROPPED,
    EMPTIES_KEPT,
    FIRST_LINE_CAPTIONS,
    JOINED_CAPTIONS,
)
from .run_versions import recorded_version

__all__ = ["recorded_caption_assembly", "recorded_caption_empties", "recorded_caption_lines"]


def recorded_caption_lines(record: Mapping[str, Any] | None) -> str:
    """How a run reads a caption file of several lines: :data:`~sdadapt.training.data.FIRST_LINE_CAPTIONS`
    for a new run (``record`` ``None``), else the resumed run's ``run.json`` ``caption_lines``
    (when it has none: :data:`~sdadapt.training.data.JOINED_CAPTIONS` for a record written before the
    first-line rule — one without ``vae`` too — else the first line).

    Raises:
        ValueError: a ``caption_lines`` entry this version does not know (an edited file).
    """
    if record is not None and "caption_lines" not in record and "vae" in record:
        return FIRST_LINE_CAPTIONS  # (written by the versions that took the first line before recording it)
    return recorded_version(record, "caption_lines", new=FIRST_LINE_CAPTIONS, legacy=JOINED_CAPTIONS)


def recorded_caption_empties(record: Mapping[str, Any] | None) -> str:
    """How a run reads an empty caption and an empty tag: :data:`~sdadapt.training.data.EMPTIES_KEPT`
    (kohya's) for a new run (``record`` ``None``), else the resumed run's ``run.json``
    ``caption_empties`` (:data:`~sdadapt.training.data.EMPTIES_DROPPED` when it has none: the run
    started before they were kept).

    Raises:
        ValueError: a ``caption_empties`` entry this version does not know (an edited file).
    """
    return recorded_version(record, "caption_empties", new=EMPTIES_KEPT, legacy=EMPTIES_DROPPED)


def recorded_caption_assembly(record: Mapping[str, Any] | None) -> str:
    """How a run puts a caption together: :data:`~sdadapt.training.data.ASSEMBLY_KOHYA_2` for a new run
    (``record`` ``None``), else the resumed run's ``run.json`` ``caption_assembly``
    (:data:`~sdadapt.training.data.ASSEMBLY_KOHYA` for a run recorded with it,
    :data:`~sdadapt.training.data.ASSEMBLY_BEFORE` when it has none: the run started before either).

    Raises:
        ValueError: a ``caption_assembly`` entry this version does not know (an edited file).
    """
    return recorded_version(record, "caption_assembly", new=ASSEMBLY_KOHYA_2, legacy=ASSEMBLY_BEFORE,
                            between=(ASSEMBLY_KOHYA,))
