"""kohya's regularisation images (``--reg-data-dir``): the user's own class images as the prior data.

The folder has kohya's layout (:func:`sdadapt.training.data.find_images`): ``N_classname/``
sub-folders (each image seen ``N`` times per epoch, captioned ``NAME.txt`` or the folder's
``classname``) and/or images directly in it (seen once per epoch).

**Balancing** (kohya's ``DreamBoothDataset``): the regularisation set is repeated until an epoch has
at least as many regularisation samples as training samples (``images x repeats`` of ``--images``).
Walking the regularisation images in order, the first pass takes each image with its folder's
repeats; each later pass adds one repeat to each image in turn; the walk stops as soon as the count
reaches the training samples. So with more regularisation samples than training samples only the
first images are used (kohya warns "some of reg images are not used"), and with fewer they are
repeated round-robin (:func:`balanced_repeats`).

In sdadapt the regularisation images are the prior batch of each step (a second forward, loss
``instance + prior_weight · class``): batches are drawn bucket by bucket from the balanced set, one
regularisation batch per training batch, so an epoch trains on as many regularisation samples as
training samples, as in kohya.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..images import ImageFolderError
from .data import (
    EMPTIES_KEPT,
    FIRST_LINE_CAPTIONS,
    ImageRecord,
    find_images,
    kohya_dataset_dirs,
    kohya_folder_names,
)

__all__ = ["balanced_repeats", "RegImages", "find_reg_images", "balance_reg_images"]


def balanced_repeats(repeats: Sequence[int], train_samples: int) -> list[int]:
    """How often each regularisation image is used per epoch (kohya's balancing rule).

    First pass: image ``i`` counts ``repeats[i]``; later passes: one more for each image in turn;
    stop as soon as the total reaches ``train_samples``. Images the walk never reaches get 0.

    Args:
        repeats: each regularisation image's folder repeats (``N`` of ``N_classname``), in order.
        train_samples: the training images x repeats of one epoch.

    Returns:
        the per-epoch count of each image; the total is ``>= train_samples`` (it exceeds it only
        by part of the last first-pass image's repeats).

    Raises:
        ValueError: ``train_samples < 1`` or a repeat below 1.
    """
    if train_samples < 1:
        raise ValueError(f"need at least one training sample to balance the regularisation images against, got {train_samples}")
    if any(r < 1 for r in repeats):
        raise ValueError(f"regularisation image repeats must be >= 1, got {list(repeats)}")
    counts = [0] * len(repeats)
    if not counts:
        return counts
    total, first = 0, True
    while total < train_samples:
        for i, r in enumerate(repeats):
            step = r if first else 1
            counts[i] += step
            total += step
            if total >= train_samples:
                break
        first = False
    return counts


@dataclass
class RegImages:
    """The regularisation images of a run, balanced against its training samples.

    Attributes:
        records: the images used, each with its balanced ``repeats`` (unused ones left out).
        samples: kohya's ``num_reg_images``: images x folder repeats, before balancing.
        dirs: kohya's ``ss_reg_dataset_dirs``: ``{folder: {"n_repeats": N, "img_count": n}}``
            (the folders' own repeats, before balancing).
        notes: what was skipped or repeated, for the run report.
        found: every image found, before balancing (kohya counts their captions in ``ss_tag_frequency``,
            unused ones too); a ``--reg-data-dir``'s named by folder as kohya names them
            (:func:`~sdadapt.training.data.kohya_folder_names`: the images directly in it by its name).
    """

    records: list[ImageRecord]
    samples: int
    dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    found: list[ImageRecord] = field(default_factory=list)


def find_reg_images(
    folder: str | os.PathLike,
    *,
    train_samples: int,
    default_caption: str | None = None,
    caption_extension: str = ".txt",
    caption_lines: str = FIRST_LINE_CAPTIONS,
    empties: str = EMPTIES_KEPT,
) -> RegImages:
    """Read a ``--reg-data-dir`` folder and balance it against ``train_samples`` (kohya's rule).

    Captions: ``NAME.txt`` beside the image, else the folder's class name (``N_classname``), else
    ``default_caption`` (``--class-prompt``); ``caption_lines``, ``empties``: how a caption file of
    several lines and an empty caption are read (:func:`~sdadapt.training.data.find_images`).
    :attr:`RegImages.dirs` names the images directly in ``folder`` by its name, as kohya's
    ``ss_reg_dataset_dirs`` (:func:`~sdadapt.training.data.kohya_dataset_dirs`: a sub-folder of the folder's
    own name is numbered `` (2)``).

    Raises:
        ImageFolderError: no such folder, no images, or images without any caption (naming the
            folder and the fix).
    """
    root = Path(folder)
    try:
        records, notes = find_images(root, default_caption=default_caption, caption_extension=caption_extension,
                                     caption_lines=caption_lines, empties=empties)
    except ImageFolderError as exc:
        text = str(exc).replace("pass --prompt for all of them", "pass --class-prompt for all of them")
        raise ImageFolderError(f"--reg-data-dir: {text}") from None
    # (kohya's names; a sub-folder named as the folder itself numbered " (2)", as kohya_dataset_dirs)
    dirs = kohya_dataset_dirs(records, root)
    reg = balance_reg_images(records, train_samples=train_samples, source="--reg-data-dir", dirs=dirs)
    reg.notes[:0] = [f"--reg-data-dir: {n}" for n in notes]
    reg.found = kohya_folder_names(reg.found, root)  # (ss_tag_frequency's keys: as ss_reg_dataset_dirs')
    return reg


def balance_reg_images(records: Sequence[ImageRecord], *, train_samples: int, source: str,
                       dirs: dict[str, dict[str, int]] | None = None) -> RegImages:
    """Regularisation images already read (each ``repeats`` its folder's) balanced against
    ``train_samples`` by kohya's rule (:func:`balanced_repeats`).

    ``source`` names where they came from in the notes (``--reg-data-dir``, a dataset TOML);
    ``dirs``: :attr:`RegImages.dirs` (default: by each record's ``folder``).
    """
    if dirs is None:
        dirs = {}
        for record in records:
            entry = dirs.setdefault(record.folder, {"n_repeats": record.repeats, "img_count": 0})
            entry["img_count"] += 1
    samples = sum(r.repeats for r in records)
    counts = balanced_repeats([r.repeats for r in records], train_samples)
    used = [replace(r, repeats=n) for r, n in zip(records, counts) if n]
    notes = []
    if samples > train_samples and len(used) < len(records):
        notes.append(f"{source}: {samples} regularisation samples (images x repeats) for {train_samples} training "
                     f"samples per epoch: only the first {len(used)} of {len(records)} images are used (kohya's balancing)")
    elif sum(counts) > samples:
        notes.append(f"{source}: {samples} regularisation samples (images x repeats) for {train_samples} training "
                     f"samples per epoch: repeated to {sum(counts)} per epoch (kohya's balancing)")
    return RegImages(used, samples, dirs, notes, list(records))
