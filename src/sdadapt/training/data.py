"""Training data as kohya sd-scripts and OneTrainer lay it out: folders, captions, aspect-ratio buckets.

**Folders.** ``--images DIR`` holds images directly (each seen ``repeats`` times per epoch) and/or
kohya's repeat folders ``N_name`` (``10_sks dog/``: each image seen 10 times per epoch). Other
sub-folders are skipped and reported. An image's caption is ``NAME.txt`` (or ``NAME.caption``)
beside it (its first line; an empty one is the caption ``""``, as kohya's ``read_caption``); without
one it takes the folder's ``name`` part (kohya's class tokens) or the default caption (``--prompt``),
else it is an error naming the images.

**Captions** (:class:`CaptionOptions`, applied each time an image is drawn, in kohya's order): the
whole caption is replaced by ``""`` with probability ``dropout`` (kohya's ``caption_dropout_rate``: it
trains the unconditional prediction); else it is split at commas into tags (empty ones kept, as
kohya's: :attr:`CaptionOptions.keep_empty_tags`), the first ``keep_tokens`` stay in place, the rest are
shuffled (``shuffle``) and each dropped with probability ``tag_dropout``; last, an image without a
caption (``""``, :func:`find_images` with ``uncaptioned=True``) gets one of ``templates`` drawn anew
(kohya's textual-inversion templates: ``add_replacement("", templates)``, :attr:`CaptionOptions.kohya_order`).

**Buckets** (:func:`bucket_sizes`, :func:`plan_dataset`): sizes whose area is at most the
training resolution's, sides multiples of ``step`` between ``min_size`` and ``max_size`` — kohya's
``make_bucket_resolutions``. Each image goes to the bucket closest to its aspect ratio, is scaled
(kohya's default: OpenCV's ``area`` when it shrinks both ways, else PIL's ``lanczos`` —
:func:`sdadapt.resampling.kohya_default`; or :attr:`ImageRecord.interpolation`) to cover it and centre-cropped; with ``no_upscale``
(kohya's ``bucket_no_upscale``) an image larger than the resolution's area is scaled to about that area,
and each image is cropped, unscaled, to a bucket of its own sides rounded down to ``step``: never
enlarged. The bucket, the scaled size and the crop are kohya's integers (:data:`BUCKETS_KOHYA`).
Without bucketing every image is scaled and centre-cropped to the square resolution.
Every image's decision is written in its :attr:`ImageRecord.note`. Batches are drawn from one
bucket at a time; latents are encoded once per bucket (:func:`encode_buckets`).

**Flips** (kohya's ``flip_aug``, :attr:`Dataset.flip`): the mirrored images' latents are cached too
(twice the latent memory) and each use of an image takes one of the two by a fair coin
(:func:`flip_draws`, a pure function of the seed and the micro-batch, so a resumed run makes the
same draws); SDXL's crop conditioning of a mirrored image gives the crop's left edge as seen in the
mirrored image (:func:`size_conditioning`).

**Pixel augmentations** (kohya's ``random_crop`` and ``color_aug``, :attr:`Dataset.augment`,
:mod:`sdadapt.training.pixel_augment`): they change the pixels at every use, so nothing is cached;
each drawn image is read, scaled, augmented (and mirrored by the flip coin) and the batch encoded
before its step (:meth:`Dataset.pixel_batch`).

**Loss masks** (kohya's ``alpha_mask`` / ``masked_loss``, :attr:`Dataset.loss_masks`,
:mod:`sdadapt.training.loss_masks`): each image's mask is scaled and cropped as the image and
cached at the latents' size beside them (:meth:`Dataset.batch_masks` mirrors it with the flip
coin); with pixel augmentations it is cropped at each use's window (:meth:`Dataset.pixel_masks`).
"""

from __future__ import annotations

import math
import os
import random
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor

from ..images import IMAGE_SUFFIXES, ImageFolderError, check_image_folder, is_image_file, read_image, scale_image
from ..resampling import interpolation_for
from .loss_masks import LossMaskSource
from .pixel_augment import PixelAugment

__all__ = [
    "FIRST_LINE_CAPTIONS",
    "JOINED_CAPTIONS",
    "EMPTIES_KEPT",
    "EMPTIES_DROPPED",
    "ASSEMBLY_KOHYA",
    "ASSEMBLY_BEFORE",
    "ASSEMBLY_KOHYA_2",
    "TRIGGER_WRAPPED",
    "TRIGGER_FILLED",
    "CaptionOptions",
    "expand_wildcards",
    "token_warmup_step_count",
    "ImageRecord",
    "Dataset",
    "find_images",
    "tag_frequency_of",
    "dataset_dirs_of",
    "kohya_folder_name",
    "kohya_folder_names",
    "kohya_dataset_dirs",
    "BUCKETS_KOHYA",
    "BUCKETS_BEFORE",
    "bucket_sizes",
    "plan_dataset",
    "encode_buckets",
    "epoch_batches",
    "flip_draws",
    "size_conditioning",
    "image_size",
]

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")
#: a caption file of several lines trains on its first line (kohya's ``read_caption``; without ``enable_wildcard``)
FIRST_LINE_CAPTIONS = "first-line"
#: what runs recorded before trained on: all the lines joined by spaces (``train --resume`` of such a run keeps it)
JOINED_CAPTIONS = "joined"
#: kohya's empties: a caption file's empty first line is the caption ``""`` (not a missing caption), and an
#: empty tag (``"a, , b"``, a trailing comma) is a tag (:attr:`CaptionOptions.keep_empty_tags`)
EMPTIES_KEPT = "kept"
#: what runs recorded before dropped: an empty first line fell back to the class tokens / ``--prompt``,
#: and empty tags were left out (``train --resume`` of such a run keeps it)
EMPTIES_DROPPED = "dropped"
#: kohya's assembly of a caption (``BaseDataset.process_caption`` / ``FineTuningDataset``): a fine-tuning caption of
#: several lines is cut to its first line after ``caption_prefix`` / ``caption_suffix`` are added (the suffix, added
#: after its last line, never trains: :attr:`ImageRecord.suffix_cut`); with ``enable_wildcard`` an entry's tags join
#: each non-empty caption line (none: ``""``, not the tags alone) and an entry without tags keeps its empty lines; a
#: whole-caption dropout alone leaves a drawn caption as it is, and the tags are shuffled before the tag dropout
#: draws (:attr:`CaptionOptions.kohya_assembly`)
ASSEMBLY_KOHYA = "kohya"
#: what runs recorded before did: the suffix after the cut, the tags alone for a tags-only wildcard entry, its empty
#: lines dropped, a dropout-only caption re-split at commas and the tags dropped before they were shuffled
#: (``train --resume`` of such a run keeps it)
ASSEMBLY_BEFORE = "before-kohya"
#: kohya's assembly, second revision (sd-scripts 48d368fa ``process_caption``; :attr:`CaptionOptions.kohya_order`):
#: a trigger-word template replaces the whole caption *last* (after the prefix / suffix, wildcards and tag steps
#: have drawn on the caption, never on a dropped one), ``keep_tokens_separator`` stays in a caption that nothing
#: shuffles, drops or warms up, the first line is cut after the prefix / suffix are added (a ``"\n"`` in them
#: cuts too), and a fine-tuning caption keeps its white space as written (:mod:`sdadapt.training.dataset_config`)
ASSEMBLY_KOHYA_2 = "kohya-2"
#: a trigger-word method's caption template around an image's own caption (``--caption-template``, A1111's
#: ``[name], [filewords]``): the caption options draw on the image's own caption only, and the template is put around
#: each draw (:attr:`ImageRecord.wrapped`) — as A1111's ``create_text`` shuffles and drops ``[filewords]``'s tags only:
#: the trigger word and the template's words never move or drop
TRIGGER_WRAPPED = "wrapped"
#: what runs recorded before trained on: the template filled in once, its words (the trigger word too) shuffled and
#: dropped with the caption's tags (``train --resume`` of such a run keeps it)
TRIGGER_FILLED = "filled"


@dataclass(frozen=True)
class CaptionOptions:
    """How a caption changes each time its image is drawn (kohya's caption options).

    The steps of one draw, in kohya's order (``BaseDataset.process_caption``): ``prefix`` / ``suffix``
    joined on with a space; the whole caption dropped (``dropout``, or every ``dropout_every_n_epochs``-th
    epoch); wildcards (``wildcards``), else the first line; the tags split, kept (``keep_tokens``,
    ``keep_tokens_separator``), cut to the warm-up's count (``token_warmup_*``), shuffled and dropped
    (``tag_dropout``); ``secondary_separator`` made a ``separator``; a template for an uncaptioned image
    (``templates``, last: :attr:`kohya_order`).

    Attributes:
        templates: captions for images without one (caption ``""``), the trigger word already in
            place (``"a photo of a <sks>"`` …): one drawn at each use that is not dropped, after the
            options below, in place of the whole caption (``train --templates``; :attr:`kohya_order`).
            Empty: such an image trains on ``""``.
        shuffle: shuffle the comma-separated tags (``--shuffle-caption``).
        keep_tokens: the first N tags never move or drop (``--keep-tokens``; e.g. the trigger word).
        dropout: probability of training on the empty caption (``--caption-dropout-rate``).
        tag_dropout: probability of dropping each movable tag (``--caption-tag-dropout-rate``).
        separator: the tag separator the tags are split at (kohya's ``caption_separator``); they are
            joined back with ``", "`` whatever it is, as kohya's.
        prefix, suffix: text put before / after every caption with a space between (kohya's
            ``caption_prefix`` / ``caption_suffix``; ``""``: none). Part of the caption from then
            on: it can be dropped, shuffled and counted by ``keep_tokens`` like any tag.
        dropout_every_n_epochs: every N-th epoch (epochs counted from 1, as kohya's: epochs N, 2N,
            …) trains every image on the empty caption (``--caption-dropout-every-n-epochs``; 0: never).
        wildcards: kohya's ``enable_wildcard``: a caption of several lines trains on one line drawn
            at each use, and each ``{a|b|c}`` becomes one of its choices drawn at each use
            (``{{`` / ``}}`` are literal braces).
        keep_tokens_separator: kohya's ``keep_tokens_separator`` (e.g. ``"|||"``): in a caption that
            holds it, the tags before it never move or drop (``keep_tokens`` is then not used), and
            the tags after a second one stay at the end. The separator itself never reaches the
            text encoder (kohya leaves it in when nothing shuffles or drops tags).
        secondary_separator: kohya's ``secondary_separator`` (e.g. ``";;;"``): tags joined by it
            move and drop as one tag, and it is replaced by ``separator`` at the end.
        token_warmup_min: with ``token_warmup_steps``, the number of movable tags at step 0
            (kohya's ``token_warmup_min``, default 1).
        token_warmup_steps: kohya's ``token_warmup_step`` as a step count: before that step only the
            first ``⌊step·(n − min)/token_warmup_steps⌋ + min`` of a caption's ``n`` movable tags are
            used (in caption order, before dropout and shuffle); 0: off. The fraction form
            (``< 1``: a share of the steps) is resolved by :func:`token_warmup_step_count`.
        keep_empty_tags: kohya's split of a caption without ``keep_tokens_separator``
            (``[t.strip() for t in caption.strip().split(separator)]``): an empty tag (``"a, , b"``, the
            trailing comma of ``"a, b, "``) is a tag that moves, drops and counts in the warm-up like
            any other, joined back as ``"a, , b"``; a caption with the separator drops them, as kohya's.
            ``False``: every empty tag left out (runs recorded before, :data:`EMPTIES_DROPPED`).
        kohya_assembly: kohya's way of putting a drawn caption together (:data:`ASSEMBLY_KOHYA`, the
            default): a caption that a whole-caption ``dropout`` leaves is not split into tags unless
            something shuffles, drops tags or warms up (``"a,,b"`` trains as written), and the movable tags
            are shuffled first and then each dropped (``tag_dropout``), as kohya's ``process_caption``
            draws them. ``False``: runs recorded before (:data:`ASSEMBLY_BEFORE`): with ``dropout`` (and the
            ``","`` separator) a kept caption is split and joined back with ``", "`` (``"a, , b"``), and the
            tags are dropped first and the rest shuffled (the same distribution, other draws).
        kohya_order: kohya's order of the last steps (:data:`ASSEMBLY_KOHYA_2`, the default; needs
            :attr:`kohya_assembly`), as ``process_caption`` and ``train_textual_inversion.py``'s
            ``add_replacement("", templates)``: an uncaptioned image's caption (``""``) goes through every step
            above (drawing from ``rng`` as any caption), and only then, unless it was dropped, is replaced by
            one of :attr:`templates` — so ``prefix`` / ``suffix`` and the tag steps never change a template;
            a caption is split into tags only to shuffle, drop tags or warm up (a ``keep_tokens_separator``
            alone stays in the caption); without :attr:`wildcards` the caption is cut at its first ``"\n"``
            after ``prefix`` / ``suffix`` are added (a prefix holding ``"\n"`` keeps its first line only).
            ``False`` (runs recorded before, :data:`ASSEMBLY_KOHYA`, :data:`ASSEMBLY_BEFORE`): the template drawn first, then prefix / suffix and the tag steps on it;
            a caption holding the separator always split (the separator taken out); no first-line cut here.
    """

    shuffle: bool = False
    keep_tokens: int = 0
    dropout: float = 0.0
    tag_dropout: float = 0.0
    separator: str = ","
    templates: tuple[str, ...] = ()
    prefix: str = ""
    suffix: str = ""
    dropout_every_n_epochs: int = 0
    wildcards: bool = False
    keep_tokens_separator: str = ""
    secondary_separator: str = ""
    token_warmup_min: int = 1
    token_warmup_steps: float = 0
    keep_empty_tags: bool = True
    kohya_assembly: bool = True
    kohya_order: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.templates, str) or not all(isinstance(t, str) and t.strip() for t in self.templates):
            raise ValueError("caption templates must be a tuple of non-empty captions, e.g. ('a photo of a <sks>',)")
        object.__setattr__(self, "templates", tuple(self.templates))
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")
        for name in ("dropout", "tag_dropout"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"caption {name.replace('_', ' ')} must be a probability in [0, 1], got {value}")
        for name in ("prefix", "suffix", "keep_tokens_separator", "secondary_separator"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"caption {name.replace('_', ' ')} must be a string (\"\": none), got {getattr(self, name)!r}")
        if self.dropout_every_n_epochs < 0:
            raise ValueError(f"caption dropout_every_n_epochs must be >= 0 (0: never), got {self.dropout_every_n_epochs}")
        if self.token_warmup_min < 0:
            raise ValueError(f"token_warmup_min must be >= 0 (the tags used at step 0), got {self.token_warmup_min}")
        if not self.token_warmup_steps >= 0:
            raise ValueError(f"token_warmup_steps must be >= 0 (0: off), got {self.token_warmup_steps}")
        for name in ("keep_tokens_separator", "secondary_separator"):
            if getattr(self, name) and getattr(self, name) == self.separator:
                raise ValueError(f"caption {name.replace('_', ' ')} {getattr(self, name)!r} is the tag separator "
                                 "itself: choose another string, e.g. '|||'")

    @property
    def active(self) -> bool:
        """Whether captions change between draws or are rewritten at all."""
        return (self.shuffle or self.dropout > 0 or self.tag_dropout > 0 or bool(self.templates)
                or bool(self.prefix or self.suffix or self.keep_tokens_separator or self.secondary_separator)
                or self.wildcards or self.dropout_every_n_epochs > 0 or self.token_warmup_steps > 0)

    def apply(self, caption: str, rng: random.Random, *, epoch: int = 0, step: int = 0) -> str:
        """One draw of ``caption`` (the same ``rng`` state, ``epoch`` and ``step`` give the same
        result); ``""`` ends with one of :attr:`templates` unless dropped (:attr:`kohya_order`; runs recorded
        before drew it first).

        Args:
            epoch: the training epoch, counted from 0 (for :attr:`dropout_every_n_epochs`).
            step: the optimiser step, counted from 0 (for :attr:`token_warmup_steps`).
        """
        kohya_order = self.kohya_order and self.kohya_assembly
        if not self.active and not (kohya_order and "\n" in caption):
            return caption
        template = not caption and bool(self.templates)
        if template and not kohya_order:
            caption = self.templates[rng.randrange(len(self.templates))]
        if self.prefix:
            caption = f"{self.prefix} {caption}"
        if self.suffix:
            caption = f"{caption} {self.suffix}"
        if self.dropout and rng.random() < self.dropout:
            return ""
        if self.dropout_every_n_epochs and (epoch + 1) % self.dropout_every_n_epochs == 0:
            return ""
        if self.wildcards:
            caption = expand_wildcards(caption, rng)
        elif kohya_order:  # (kohya's process_caption: caption.split("\n")[0], after the prefix / suffix)
            caption = caption.split("\n", 1)[0]
        # (kohya splits only to shuffle, drop tags or warm up; runs recorded before re-split at "," with a
        # whole-caption dropout alone too: kohya_assembly off, and at a keep_tokens_separator: kohya_order off)
        resplit = not self.kohya_assembly and self.dropout and self.separator == ","
        held = not kohya_order and self.keep_tokens_separator and self.keep_tokens_separator in caption
        if self.shuffle or resplit or self.tag_dropout or self.token_warmup_steps or held:
            caption = self._tags(caption, rng, step)
        if self.secondary_separator:
            caption = caption.replace(self.secondary_separator, self.separator)
        if template and kohya_order:  # (kohya's add_replacement("", templates): the whole caption, last)
            caption = rng.choice(self.templates)
        return caption

    def _tags(self, caption: str, rng: random.Random, step: int) -> str:
        """The tag steps of :meth:`apply`: split, keep, warm up, shuffle, drop, join (runs recorded before,
        :attr:`kohya_assembly` off: drop, then shuffle)."""
        def split(text: str) -> list[str]:
            return [t for t in (t.strip() for t in text.split(self.separator)) if t]

        suffix: list[str] = []
        if self.keep_tokens_separator and self.keep_tokens_separator in caption:
            head, rest = caption.split(self.keep_tokens_separator, 1)
            if self.keep_tokens_separator in rest:
                rest, tail = rest.split(self.keep_tokens_separator, 1)
                suffix = split(tail)
            fixed, rest_tags = split(head), split(rest)
        else:  # (kohya keeps the empty tags here: "a, b, " is three tags, the last one "")
            tags = [t.strip() for t in caption.strip().split(self.separator)] if self.keep_empty_tags else split(caption)
            fixed, rest_tags = tags[: self.keep_tokens], tags[self.keep_tokens:]
        if self.token_warmup_steps and step < self.token_warmup_steps:
            count = math.floor(step * ((len(rest_tags) - self.token_warmup_min) / self.token_warmup_steps)) + self.token_warmup_min
            rest_tags = rest_tags[:count]
        if self.shuffle and self.kohya_assembly:  # (kohya's process_caption: random.shuffle, then dropout_tags)
            rng.shuffle(rest_tags)
        if self.tag_dropout:
            rest_tags = [t for t in rest_tags if rng.random() >= self.tag_dropout]
        if self.shuffle and not self.kohya_assembly:
            rng.shuffle(rest_tags)
        return ", ".join(fixed + rest_tags + suffix)  # (kohya joins with ", " whatever caption_separator splits at)


def expand_wildcards(caption: str, rng: random.Random) -> str:
    """kohya's ``enable_wildcard`` on one caption: a caption of several lines becomes one of its
    lines, then each ``{a|b|c}`` one of its choices (drawn from ``rng`` in order); ``{{`` and ``}}``
    stay literal ``{`` and ``}``."""
    if "\n" in caption:
        caption = rng.choice(caption.split("\n"))
    if "{" not in caption:
        return caption
    opening, closing = "\x00<", ">\x00"  # placeholders for the escaped braces (never in a caption file)
    while opening in caption or closing in caption:
        opening, closing = opening + "<", closing + ">"
    caption = caption.replace("{{", opening).replace("}}", closing)
    caption = re.sub(r"\{([^}]+)\}", lambda match: rng.choice(match.group(1).split("|")), caption)
    return caption.replace(opening, "{").replace(closing, "}")


def token_warmup_step_count(value: float, total_steps: int) -> float:
    """kohya's ``token_warmup_step`` as a step count: below 1 a share of the run,
    ``⌊value·total_steps⌋``; from 1 on the steps themselves (0: no warm-up)."""
    if not value >= 0:
        raise ValueError(f"token_warmup_step must be >= 0 (a step count, or a share of the steps below 1), got {value}")
    return float(math.floor(value * total_steps)) if value < 1 else float(value)


@dataclass
class ImageRecord:
    """One training image and what is done with it.

    Attributes:
        path: the image file (``None`` for images given as tensors).
        caption: its caption (before the per-draw :class:`CaptionOptions`).
        repeats: how often it is seen per epoch.
        folder: the dataset folder it came from (relative to the images root; ``"."`` = the root).
        size: its (height, width) in pixels.
        bucket: the (height, width) it is trained at.
        resized: the (height, width) it is scaled to before cropping.
        crop: (top, left) of the crop in the scaled image (SDXL's crop conditioning).
        note: what was done, in words.
        captions: this image's own caption options, used instead of the dataset's
            (:attr:`Dataset.captions`) — kohya's per-subset options of a dataset TOML; ``None``: the dataset's.
        face: kohya's ``face_crop_aug_range``: the face its file name gives, (cx, cy, w, h) in its
            pixels (:func:`sdadapt.training.face_crop.face_box_from_name`), set when the run crops
            around it at each use (no buckets, :attr:`PixelAugment.face_crop_range`); ``None``: not face-cropped.
        alpha_mask: its dataset-TOML subset's ``alpha_mask`` (kohya's per-subset setting): with an
            alpha-channel :class:`~sdadapt.training.loss_masks.LossMaskSource`, ``False`` gives it an
            all-ones mask (every pixel counts, as kohya fills a batch's unmasked images); ``None``
            (images not from a dataset TOML) and ``True``: its alpha channel.
        interpolation: kohya's ``resize_interpolation`` for scaling it to its bucket
            (:mod:`sdadapt.resampling`); ``None``: kohya's default (``area`` when shrinking both ways, else ``lanczos``).
        dataset: the index of its dataset TOML's ``[[datasets]]`` block (kohya's several datasets: each
            bucketed alone, at its own resolution and batch size, :attr:`Dataset.batch_sizes`); 0 otherwise.
        tags: a fine-tuning (``--in-json`` / ``metadata_file``) entry's ``tags`` as kohya reads them: what
            :func:`tag_frequency_of` counts for it (kohya counts only those, not the caption); ``None``: the
            caption is counted.
        suffix_cut: a fine-tuning entry whose caption (with its tags) had several lines, cut to the first:
            kohya adds ``caption_suffix`` after the last line and then keeps the first, so the suffix never
            reaches this image (the run gives it its options without the suffix, :data:`ASSEMBLY_KOHYA`).
        wrapped: ``(before, own caption, after)``: a trigger-word method's caption template around the image's own
            caption (:data:`TRIGGER_WRAPPED`): each draw applies the caption options to the own caption only and
            puts the template around it (:meth:`draw_caption`); ``caption`` then holds the template filled in once
            (what reports, checks and ``ss_tag_frequency`` read). ``None``: ``caption`` is drawn as it is.
        full_size: kept at its own size, a bucket-sized window cut from it (kohya's no-bucket ``random_crop``,
            :func:`plan_dataset` ``full_size_crop``): SDXL conditions it as kohya's uncached path does, an uncropped
            image of the bucket's size (:func:`size_conditioning`).
        mask_folder: its dataset-TOML subset's ``conditioning_data_dir`` (kohya's masked loss per subset): the folder
            its mask image is looked for in (:class:`~sdadapt.training.loss_masks.LossMaskSource` ``per_subset``).
    """

    path: Path | None
    caption: str
    repeats: int = 1
    folder: str = "."
    size: tuple[int, int] = (0, 0)
    bucket: tuple[int, int] = (0, 0)
    resized: tuple[int, int] = (0, 0)
    crop: tuple[int, int] = (0, 0)
    note: str = ""
    captions: CaptionOptions | None = None
    face: tuple[int, int, int, int] | None = None
    alpha_mask: bool | None = None
    interpolation: str | None = None
    dataset: int = 0
    tags: str | None = None
    suffix_cut: bool = False
    wrapped: tuple[str, str, str] | None = None
    full_size: bool = False
    mask_folder: Path | None = None

    def draw_caption(self, options: CaptionOptions, rng: random.Random, *, epoch: int = 0, step: int = 0) -> str:
        """One draw of this image's caption under ``options`` (:meth:`CaptionOptions.apply`); an image with
        :attr:`wrapped` ``(before, own, after)``: ``before + draw of own + after``, or ``""`` when that draw is empty
        (a whole-caption dropout, or every tag dropped)."""
        if self.wrapped is None:
            return options.apply(self.caption, rng, epoch=epoch, step=step)
        before, own, after = self.wrapped
        text = options.apply(own, rng, epoch=epoch, step=step)
        return before + text + after if text else ""


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(height, width) of an image file without decoding it (PNG header; other formats need PIL).

    Raises:
        ImageFolderError: unreadable image (names the file).
    """
    file = Path(path)
    try:
        with open(file, "rb") as handle:
            head = handle.read(24)
    except OSError as exc:
        raise ImageFolderError(f"{file}: unreadable image ({exc})") from None
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR":
        width, height = struct.unpack(">II", head[16:24])
        return int(height), int(width)
    try:
        from PIL import Image  # optional
    except ImportError:
        raise ImageFolderError(f"{file}: reading {file.suffix} images needs PIL (pip install pillow); PNGs work without it") from None
    try:
        with Image.open(file) as im:
            width, height = im.size
    except OSError as exc:
        raise ImageFolderError(f"{file}: unreadable image ({exc})") from None
    return int(height), int(width)


def _caption_text(file: Path, extension: str, *, borrowed: list[str] | None = None,
                  other: list[str] | None = None, unread: list[str] | None = None) -> str | None:
    """The text of ``file``'s caption file (``extension``, else ``.txt``, else ``.caption`` when ``extension`` is one
    of those two; another extension — kohya_ss's ``.none-use-foldername``, which asks for the folder's class tokens —
    is read alone, as kohya reads it), or ``None``.

    As kohya's ``read_caption``, a path of five ``_``-separated parts or more (a face position,
    ``<name>_<cx>_<cy>_<w>_<h>``: :mod:`sdadapt.training.face_crop`) also takes ``<name>`` + ``extension``
    when its own ``extension`` file is missing (then ``file``'s name is appended to ``borrowed``). kohya
    splits the whole path without its extension (``os.path.splitext(img_path)[0].split("_")``), not the
    file's name: the last four ``_`` of the path are cut, so a name with fewer than four ``_`` in a folder
    whose name has ``_`` (``10_my_cat/a_b_c.png``) points into the folder's parent (``10.txt`` beside
    ``10_my_cat``), as kohya reads it. The ``.txt`` / ``.caption`` files are sdadapt's (kohya's ``read_caption``
    reads ``extension`` only): when one of them is read, ``file``'s name is appended to ``other``; when the
    ``extension`` file (``.txt`` or ``.caption``) is read and the other of the two is there too, to ``unread``."""
    if unread is not None and extension in (".txt", ".caption") and file.with_suffix(extension).is_file():
        twin = file.with_suffix(".caption" if extension == ".txt" else ".txt")
        if twin.is_file():
            unread.append(f"{file.name} <- {file.with_suffix(extension).name}, not {twin.name}")
    tokens = os.path.splitext(str(file))[0].split("_")
    base = "_".join(tokens[:-4])
    stripped = Path(base + extension) if len(tokens) >= 5 and base else None
    standard = (".txt", ".caption") if extension in (".txt", ".caption") else ()  # (another extension named: its alone)
    for caption_file in dict.fromkeys([file.with_suffix(extension), *([stripped] if stripped is not None else []),
                                       *(file.with_suffix(suffix) for suffix in standard)]):
        if caption_file.is_file():
            if caption_file == stripped and borrowed is not None:
                shown = caption_file.name if caption_file.parent == file.parent else str(caption_file)
                borrowed.append(f"{file.name} <- {shown}")
            elif caption_file not in (file.with_suffix(extension), stripped) and other is not None:
                other.append(f"{file.name} <- {caption_file.name}")
            try:
                return caption_file.read_text(encoding="utf-8")
            except UnicodeDecodeError as exc:  # (kohya reads UTF-8 only too, and stops on the file)
                raise ImageFolderError(f"{caption_file}: not UTF-8 text ({exc.reason} at byte {exc.start}); save the "
                                       "caption file as UTF-8, as kohya reads it") from None
    return None


def _caption_of(text: str | None, *, lines: bool = False, rule: str = FIRST_LINE_CAPTIONS,
                empties: str = EMPTIES_KEPT) -> str | None:
    """A caption file's ``text`` as a caption, as kohya's ``read_caption`` (sd-scripts
    ``library/train_util.py``) reads it: its first line, stripped (later lines are ignored; white
    space inside the line kept, so ``ss_tag_frequency`` counts ``"red  ball"`` as kohya does — the
    tokenizers fold any white-space run to one space, so the model sees the same ids either way);
    ``lines``: each non-empty line stripped, joined by ``"\n"`` (kohya's wildcard mode);
    :data:`JOINED_CAPTIONS` (runs recorded before the first-line rule): all lines joined by one space,
    white space collapsed, as those runs trained. ``None``: no caption file. An empty result is ``""``
    (kohya's: the image trains on the empty caption), or ``None`` with ``empties``
    :data:`EMPTIES_DROPPED` (runs recorded before: the class tokens / default caption took its place)."""
    if text is None:
        return None
    if lines:
        caption = "\n".join(line.strip() for line in text.split("\n") if line.strip())
    elif rule == JOINED_CAPTIONS:
        caption = " ".join(text.split())
    else:
        caption = text.split("\n", 1)[0].strip()  # kohya's readlines() cuts at "\n" only (universal newlines)
    return caption if caption or empties == EMPTIES_KEPT else None


def tag_frequency_of(records: Iterable[ImageRecord], *, templates: Sequence[str] = ()) -> dict[str, dict[str, int]]:
    """``{folder: {tag: count}}`` as kohya counts it (sd-scripts ``library/train_util.py``,
    ``BaseDataset.set_tag_frequency``, called once per subset with its images' captions as read):
    each image's caption split at ``","`` only (whatever ``caption_separator`` says), each piece
    stripped, empty ones skipped, *lower-cased*, and every occurrence counted (a tag twice in one
    caption counts 2). Captions are counted once per image, not per repeat; an image without a
    caption counts its folder's class tokens if it took them, nothing otherwise (templates and
    wildcards are drawn later, at training time, and are not counted). A folder whose images have
    no tags still gets its (empty) entry.

    A fine-tuning entry (:attr:`ImageRecord.tags` set) counts its ``tags`` only, as kohya's
    ``FineTuningDataset`` passes its ``tags_list``.

    ``templates`` (sdadapt's trigger-word methods; kohya's ``train_textual_inversion.py`` writes no
    ``ss_tag_frequency`` at all): a caption-less image counts the tags of each template, so the
    metadata shows what it trained on.
    """
    out: dict[str, dict[str, int]] = {}
    for record in records:
        counts = out.setdefault(record.folder, {})
        if record.tags is not None:
            texts = [record.tags]
        else:
            texts = [record.caption] if record.caption or not templates else list(templates)
        for caption in texts:
            for tag in caption.split(","):
                tag = tag.strip()
                if tag:
                    tag = tag.lower()
                    counts[tag] = counts.get(tag, 0) + 1
    return out


def dataset_dirs_of(records: Iterable[ImageRecord]) -> dict[str, dict[str, int]]:
    """``{folder: {"n_repeats": N, "img_count": n}}`` of ``records`` (kohya's ``ss_dataset_dirs``:
    each folder's repeats and its number of images, not counting repeats)."""
    out: dict[str, dict[str, int]] = {}
    for record in records:
        entry = out.setdefault(record.folder, {"n_repeats": record.repeats, "img_count": 0})
        entry["img_count"] += 1
    return out


def kohya_folder_name(root: str | os.PathLike) -> str:
    """The name kohya gives the images directly in folder ``root`` in ``ss_dataset_dirs`` /
    ``ss_tag_frequency``: the folder's own name (``os.path.basename`` of a subset's ``image_dir``;
    ``--images data/imgs`` → ``imgs``; ``--images .`` → the current folder's name, as written without
    the dot; ``imgs/`` → ``imgs``)."""
    return Path(os.path.abspath(os.fspath(root))).name


def kohya_folder_names(records: Iterable[ImageRecord], root: str | os.PathLike) -> list[ImageRecord]:
    """``records`` (of :func:`find_images` over ``root``) named as kohya's metadata names their
    folders: the images directly in ``root`` (:attr:`ImageRecord.folder` ``"."``) by ``root``'s name
    (:func:`kohya_folder_name`: kohya reads them as a dataset-TOML subset ``image_dir = root``, its
    ``train_data_dir`` reads only the ``N_name`` sub-folders), an ``N_name`` sub-folder by its name
    (kohya's ``train_data_dir`` subsets: ``10_sks dog``). Copies for :func:`dataset_dirs_of` /
    :func:`tag_frequency_of`; the records keep ``"."`` (their folder relative to ``root``)."""
    name = kohya_folder_name(root)
    return [replace(record, folder=name) if record.folder == "." else record for record in records]


def kohya_dataset_dirs(records: Iterable[ImageRecord], root: str | os.PathLike) -> dict[str, dict[str, int]]:
    """``ss_dataset_dirs`` of ``records`` (of :func:`find_images` over ``root``) as kohya writes it: each
    folder's :func:`dataset_dirs_of` entry keyed by its kohya name (:func:`kohya_folder_names`), the images
    directly in ``root`` first; a name that comes again (``--images data/2_cat`` holding a ``2_cat``
    sub-folder) is numbered `` (2)``, `` (3)`` …, as kohya's dataset-config branch of ``train_network.py``
    numbers a repeated ``image_dir`` name (``ss_tag_frequency`` keeps them under one name, as kohya's
    ``set_tag_frequency`` adds them up)."""
    name = kohya_folder_name(root)
    out: dict[str, dict[str, int]] = {}
    for folder, entry in dataset_dirs_of(records).items():
        base = name if folder == "." else folder
        key, number = base, 2
        while key in out:
            key, number = f"{base} ({number})", number + 1
        out[key] = entry
    return out


def find_images(
    root: str | os.PathLike,
    *,
    default_caption: str | None = None,
    caption_extension: str = ".txt",
    repeats: int = 1,
    uncaptioned: bool = False,
    multiline: bool = False,
    subfolders: bool = True,
    caption_lines: str = FIRST_LINE_CAPTIONS,
    empties: str = EMPTIES_KEPT,
) -> tuple[list[ImageRecord], list[str]]:
    """The images of a dataset folder with captions and repeats (see the module docstring).

    ``uncaptioned``: an image without any caption gets ``""`` (the caller fills it in, e.g. a
    trigger-word method's templates) instead of an error. ``multiline``: a caption file's lines
    stay lines (``"\n"``-joined, empty ones left out; kohya's ``enable_wildcard`` draws one of
    them at each use, :attr:`CaptionOptions.wildcards`); otherwise the first line is the caption
    (``caption_lines`` :data:`FIRST_LINE_CAPTIONS`, kohya's; :data:`JOINED_CAPTIONS`: all lines joined
    into one, as runs recorded before trained, with a note counting the files it joined).
    ``subfolders=False``: only the images directly in ``root`` (a subset of kohya's dataset TOML:
    its ``N_name`` sub-folders are not read). A caption file whose caption is empty (an empty first
    line; with ``multiline`` no non-empty line) gives ``""``, as kohya's ``read_caption``: the class
    tokens and ``default_caption`` are for images without a caption file (a note names them);
    ``empties`` :data:`EMPTIES_DROPPED` (runs recorded before): such a file counts as none.

    Returns:
        ``(records, notes)``: one record per image (sizes read from the headers), and what was
        skipped (non-``N_name`` sub-folders, other files) or read otherwise than kohya reads it: images
        captioned by a ``.txt`` / ``.caption`` file that is not ``caption_extension`` (kohya's ``read_caption``
        reads that extension only), images taking their folder's class tokens (kohya warns about them).

    Raises:
        ImageFolderError: no such folder, no images, images without any caption, unreadable images.
    """
    base = check_image_folder(root)
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if caption_lines not in (FIRST_LINE_CAPTIONS, JOINED_CAPTIONS):
        raise ValueError(f"caption_lines must be {FIRST_LINE_CAPTIONS!r} or {JOINED_CAPTIONS!r}, got {caption_lines!r}")
    if empties not in (EMPTIES_KEPT, EMPTIES_DROPPED):
        raise ValueError(f"empties must be {EMPTIES_KEPT!r} or {EMPTIES_DROPPED!r}, got {empties!r}")
    if default_caption is not None and not default_caption.strip():
        raise ValueError("the default caption (--prompt) is empty; give words, or leave it out and use NAME.txt captions")
    sets: list[tuple[Path, int, str | None, str]] = [(base, repeats, None, ".")]
    notes: list[str] = []
    for sub in sorted(p for p in base.iterdir() if subfolders and p.is_dir() and not p.name.startswith(".")):
        match = _REPEAT_FOLDER.match(sub.name)
        if match is None:
            notes.append(f"skipped folder {sub.name}/ (kohya dataset folders are named N_name, e.g. 10_{sub.name})")
            continue
        count = int(match.group(1))
        if count < 1:
            notes.append(f"skipped folder {sub.name}/ (0 repeats)")
            continue
        sets.append((sub, count, match.group(2).strip() or None, sub.name))
    records: list[ImageRecord] = []
    missing: list[str] = []
    borrowed: list[str] = []
    other: list[str] = []
    tokened: list[str] = []
    blank: list[str] = []
    hidden: list[str] = []
    unread: list[str] = []
    unlisted: list[str] = []  # (kohya's glob_images reads neither: AVIF images, folders inside an N_name one)
    joined = 0
    for folder, count, class_tokens, label in sets:
        listed = list(folder.iterdir())
        hidden.extend(f"{label}/{p.name}" if label != "." else p.name for p in listed
                      if p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
        unlisted.extend(f"{label}/{p.name}" if label != "." else p.name for p in listed if not p.name.startswith(".")
                        and (p.suffix.lower() == ".avif" or label != "." and p.is_dir()))
        files = sorted(p for p in listed if is_image_file(p))
        for file in files:
            text = _caption_text(file, caption_extension, borrowed=borrowed, other=other, unread=unread)
            if text is not None and not multiline and caption_lines == JOINED_CAPTIONS:
                joined += sum(1 for line in text.splitlines() if line.strip()) > 1
            caption = _caption_of(text, lines=multiline, rule=caption_lines, empties=empties)
            if caption == "":
                blank.append(str(file.relative_to(base)))
            elif caption is None:
                if class_tokens:
                    tokened.append(str(file.relative_to(base)))
                caption = class_tokens or default_caption
            if caption is None:
                if not uncaptioned:
                    missing.append(str(file.relative_to(base)))
                caption = ""
            records.append(ImageRecord(file, caption, count, label, image_size(file)))
    if not records:
        raise ImageFolderError(f"{base}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder or its N_name sub-folders")
    if borrowed:  # (kohya's read_caption; runs before it was read here gave these images no caption file's text)
        notes.append(f"{base}: {len(borrowed)} image(s) named <name>_<cx>_<cy>_<w>_<h> without their own "
                     f"{caption_extension} file take <name>{caption_extension}'s caption, as kohya's read_caption "
                     f"({', '.join(borrowed[:3])}{', ...' if len(borrowed) > 3 else ''})")
    if other:  # (kohya 48d368fa's read_caption reads the caption extension only: it would not see these)
        notes.append(f"{base}: {len(other)} image(s) without a {caption_extension} file: their caption read from "
                     f"another caption file ({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); kohya reads "
                     f"{caption_extension} files only (it would give them the class tokens, else \"\"): pass "
                     "--caption-extension (kohya's caption_extension) to name the files")
    if unlisted:
        notes.append(f"{base}: skipped {', '.join(sorted(unlisted)[:3])}{', ...' if len(unlisted) > 3 else ''} (AVIF "
                     "images and folders inside an N_name folder are not read: kohya's glob_images reads no folder "
                     "there, and AVIF only with the pillow_avif plugin, which its requirements do not install)")
    if hidden:  # (kohya's glob_images skips them too)
        notes.append(f"{base}: {len(hidden)} hidden file(s) named like images skipped ({', '.join(sorted(hidden)[:3])}"
                     f"{', ...' if len(hidden) > 3 else ''}; e.g. macOS ._name resource forks), as kohya skips them")
    if unread:
        notes.append(f"{base}: {len(unread)} image(s) have both a .txt and a .caption file; their {caption_extension} "
                     f"file is read ({', '.join(unread[:3])}{', ...' if len(unread) > 3 else ''}): pass "
                     "--caption-extension (kohya's caption_extension; kohya's own default is .caption) to read the other")
    if tokened:  # (kohya warns "No caption file found for N images ... If class token exists, it will be used")
        notes.append(f"{base}: {len(tokened)} image(s) without a {caption_extension} file train on their folder's class "
                     f"tokens ({', '.join(tokened[:3])}{', ...' if len(tokened) > 3 else ''}), as kohya's")
    if blank:  # (kohya's read_caption returns "" for them, so it uses neither the class tokens nor a default)
        notes.append(f"{base}: {len(blank)} image(s) have a caption file with an empty caption "
                     f"({', '.join(blank[:3])}{', ...' if len(blank) > 3 else ''}): "
                     + ("they count as uncaptioned" if uncaptioned else "they train on the empty caption")
                     + ", as kohya's read_caption reads them (the folder's class tokens and --prompt are for images "
                     "without a caption file)")
    if joined:
        notes.append(f"{base}: {joined} caption file(s) of several lines: all their lines joined into one caption, as the "
                     "resumed run trained (runs started now take the first line, kohya's read_caption)")
    if missing:
        raise ImageFolderError(
            f"{base}: {len(missing)} image(s) have no caption file ({', '.join(missing[:5])}); "
            "add NAME.txt beside each image or pass --prompt for all of them"
        )
    return records, notes


def bucket_sizes(resolution: tuple[int, int] | int, *, step: int = 64, min_size: int = 256,
                 max_size: int = 1024, kohya_square: bool = True) -> list[tuple[int, int]]:
    """Bucket (height, width) sizes of at most the resolution's area (kohya's ``make_bucket_resolutions``).

    For each width ``w = min_size, min_size + step, … ≤ max_size`` the bucket is
    ``h = min(max_size, ⌊area / w / step⌋·step)`` (and its transpose), plus the square of side
    ``⌊√area / step⌋·step`` (kohya's; with a square resolution, the resolution) and the resolution itself
    (already there whenever ``min_size ≤`` its sides ``≤ max_size``, which kohya requires).

    Args:
        resolution: ``size`` or ``(height, width)``; sides multiples of ``step``.
        kohya_square: add kohya's square; ``False``: not (runs recorded before, :data:`BUCKETS_BEFORE`:
            a non-square resolution then had no square bucket).
    """
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if step < 1 or height % step or width % step:
        raise ValueError(f"resolution {width}x{height} must be a multiple of the bucket step {step}")
    if min_size > max_size or min_size < step:
        raise ValueError(f"need step ({step}) <= min bucket size ({min_size}) <= max bucket size ({max_size})")
    area = height * width
    sizes = {(height, width)}
    if kohya_square:  # kohya: width = int(math.sqrt(max_area) // divisible) * divisible; resos.add((width, width))
        side = int(math.sqrt(area) // step) * step
        sizes.add((side, side))
    w = min_size
    while w <= max_size:
        h = min(max_size, (area // w) // step * step)
        if h >= min_size:
            sizes.add((h, w))
            sizes.add((w, h))
        w += step
    return sorted(sizes, key=lambda s: (s[1] / s[0], s))


#: kohya's buckets (sd-scripts 48d368fa ``BucketManager.select_bucket`` / ``make_bucket_resolutions``,
#: :func:`plan_dataset`): the nearest aspect ratio in float64, ties to the bucket kohya lists first (the
#: narrower), an image of a bucket's exact size in that bucket, sizes rounded half up (``int(x + 0.5)``),
#: the square bucket of a non-square resolution, ``min_size`` / ``max_size`` moved onto the step, and
#: ``no_upscale`` as kohya's: an image larger than the resolution's area scaled to about that area (each side
#: rounded to the step as kohya), then, as a smaller image, cropped to its sides rounded down to the step,
#: unscaled
BUCKETS_KOHYA = "kohya"
#: what runs recorded before planned: float32 aspect ratios with ties to the lower ratio, Python's
#: ``round``, no square bucket for a non-square resolution, ``min_size`` / ``max_size`` as given, and with
#: ``no_upscale`` a larger image in the usual buckets and a smaller one scaled down to cover its own
#: (``train --resume`` of such a run keeps it)
BUCKETS_BEFORE = "before-kohya"


def _fit(record: ImageRecord, bucket: tuple[int, int], *, kohya: bool = False,
         resized: tuple[int, int] | None = None) -> None:
    """Scale ``record`` to cover ``bucket`` (or to ``resized``, given) and centre-crop; fills
    resized/crop/note. ``kohya``: kohya's scale and rounding (``select_bucket``: the side the aspect ratios
    say, ``int(x · scale + 0.5)``); else the run recorded before's (``max`` of the two scales, ``round``)."""
    h, w = record.size
    bh, bw = bucket
    if resized is not None:
        rh, rw = resized
        scale = rh / h
    elif kohya:  # sd-scripts 48d368fa library/train_util.py:299-305 (reso and sizes as (w, h) there)
        scale = bh / h if w / h > bw / bh else bw / w
        rh, rw = max(bh, int(h * scale + 0.5)), max(bw, int(w * scale + 0.5))
    else:
        scale = max(bh / h, bw / w)
        rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
    top, left = (rh - bh) // 2, (rw - bw) // 2  # kohya's trim_and_resize_if_required: trim_size // 2
    record.bucket, record.resized, record.crop = bucket, (rh, rw), (top, left)
    action = "kept" if (rh, rw) == (h, w) else ("scaled down" if scale < 1 else "scaled up")
    text = f"{w}x{h} -> bucket {bw}x{bh}: {action}"
    if (rh, rw) != (h, w):
        text += f" to {rw}x{rh}"
    if (rh, rw) != (bh, bw):
        text += f", cropped {rw - bw} px wide and {rh - bh} px high (centre)"
    record.note = text


def _kohya_no_upscale(size: tuple[int, int], area: int, step: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """kohya's ``select_bucket`` with ``bucket_no_upscale`` (sd-scripts 48d368fa library/train_util.py:307-341):
    ``(bucket, resized)`` (height, width) of an image of ``size`` (height, width) for a resolution of ``area``."""
    h, w = size
    aspect = w / h

    def to_steps(x: float) -> int:  # kohya's round_to_steps
        x = int(x + 0.5)
        return x - x % step

    if w * h > area:  # scaled to about the area, one side rounded to the step: the one whose aspect ratio is nearer
        resized_w = math.sqrt(area * aspect)
        resized_h = area / resized_w
        width_rounded = to_steps(resized_w)
        height_in_wr = to_steps(width_rounded / aspect)
        height_rounded = to_steps(resized_h)
        width_in_hr = to_steps(height_rounded * aspect)
        error_w = abs(width_rounded / height_in_wr - aspect) if height_in_wr else math.inf  # (0: kohya fails)
        error_h = abs(width_in_hr / height_rounded - aspect) if height_rounded else math.inf
        if error_w < error_h:
            rw, rh = width_rounded, int(width_rounded / aspect + 0.5)
        else:
            rw, rh = int(height_rounded * aspect + 0.5), height_rounded
    else:
        rh, rw = h, w
    return (rh - rh % step, rw - rw % step), (rh, rw)


def plan_dataset(records: list[ImageRecord], *, resolution: tuple[int, int] | int, buckets: bool = True,
                 step: int = 64, min_size: int | None = None, max_size: int | None = None,
                 no_upscale: bool = False, rule: str = BUCKETS_KOHYA, full_size_crop: bool = False
                 ) -> list[tuple[int, int]]:
    """Assign each record a bucket, scale and crop (in place); returns the bucket sizes in use.

    Args:
        resolution: the training size (``size`` or ``(height, width)``).
        buckets: aspect-ratio bucketing; ``False``: every image to the (square) resolution.
        step: bucket sides are multiples of it (64 for SD; the model's size multiple at least).
        min_size, max_size: bucket side limits (default: resolution/2 and resolution·2, kohya-like);
            kohya moves them onto ``step`` (the minimum down, the maximum up).
        no_upscale: never enlarge an image (kohya's ``bucket_no_upscale``: each image gets a bucket of
            its own size, :data:`BUCKETS_KOHYA`; ``min_size`` / ``max_size`` unused, as kohya's).
        rule: :data:`BUCKETS_KOHYA` (kohya's, the default) or :data:`BUCKETS_BEFORE` (runs recorded before).
        full_size_crop: with ``buckets=False``, kohya's ``random_crop`` without buckets (its uncached path,
            sd-scripts 48d368fa library/train_util.py:1629-1650): no image is scaled; each keeps its size and a
            resolution-sized window is cut from it at each use (:attr:`ImageRecord.full_size`).

    Raises:
        ValueError: with ``full_size_crop``, an image smaller than the resolution (kohya stops on it: "image too
            small"), naming it.
    """
    if rule not in (BUCKETS_KOHYA, BUCKETS_BEFORE):
        raise ValueError(f"bucket rule must be {BUCKETS_KOHYA!r} or {BUCKETS_BEFORE!r}, got {rule!r}")
    kohya = rule == BUCKETS_KOHYA
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if not buckets:
        for record in records:
            if full_size_crop:
                h, w = record.size
                if h < height or w < width:
                    raise ValueError(f"{record.path}: {w}x{h} is smaller than the resolution {width}x{height}; random "
                                     "crops without buckets cut windows of the unscaled image, as kohya's (which "
                                     "stops on it: image too small): enable buckets, or enlarge the image")
                _fit(record, (height, width), resized=(h, w))
                record.full_size = True
            else:
                _fit(record, (height, width), kohya=kohya)
        return sorted({r.bucket for r in records})
    side = int(math.sqrt(height * width))
    low = min_size if min_size is not None else max(step, side // 2 // step * step)
    high = max_size if max_size is not None else side * 2 // step * step
    if kohya:  # kohya's adjust_min_max_bucket_reso_by_steps (sd-scripts 48d368fa library/train_util.py:747-764)
        low, high = max(step, low - low % step), high + (-high) % step
    sizes = bucket_sizes((height, width), step=step, min_size=low, max_size=high, kohya_square=kohya)
    if kohya:  # kohya's order (make_bucket_resolutions sorts (w, h)): np.argmin takes the first of equal errors
        sizes = sorted(sizes, key=lambda s: (s[1], s[0]))
    ratios = torch.tensor([w / h for h, w in sizes], dtype=torch.float64 if kohya else torch.float32)
    for record in records:
        h, w = record.size
        if kohya and no_upscale:
            bucket, resized = _kohya_no_upscale((h, w), height * width, step)
            if bucket[0] >= step and bucket[1] >= step:
                _fit(record, bucket, resized=resized)
            else:  # a side under the step (kohya fails on a bucket of size 0): scaled up to cover one step
                _fit(record, (max(step, bucket[0]), max(step, bucket[1])), kohya=True)
            continue
        if no_upscale and h * w < height * width:
            bucket = (max(step, h // step * step), max(step, w // step * step))
        elif kohya and (h, w) in sizes:  # kohya: an image of a bucket's exact size takes that bucket
            bucket = (h, w)
        else:
            bucket = sizes[int(torch.argmin((ratios - w / h).abs()))]
        _fit(record, bucket, kohya=kohya)
    return sorted({r.bucket for r in records})


def _scaled(record: ImageRecord) -> Tensor:
    """The record's image scaled to cover its bucket, not cropped: (3, rh, rw) in [-1, 1]."""
    if record.path is None:
        raise ValueError("this image was given as a tensor and has no file to read: pass the tensors to "
                         "encode_buckets(images=...), or build the dataset from files with find_images")
    image = read_image(record.path, alpha="drop")  # (3, H, W) -> (3, rh, rw); kohya's method (its default without one)
    return scale_image(image, record.resized,
                       interpolation=interpolation_for(record.interpolation, tuple(image.shape[1:]), record.resized))


def _load(record: ImageRecord) -> Tensor:
    """The record's image scaled and cropped to its bucket: (3, bh, bw) in [-1, 1]."""
    image = _scaled(record)
    top, left = record.crop
    bh, bw = record.bucket
    return image[:, top: top + bh, left: left + bw].contiguous()


@dataclass
class Dataset:
    """Records grouped by bucket, with their cached latents.

    Attributes:
        records: every image (see :class:`ImageRecord`).
        latents: ``{bucket (h, w): (n_b, C, h', w') latents}`` in :attr:`members` order (CPU); with
            :attr:`batch_sizes` keyed by ``(block, h, w)`` (:meth:`key_of`).
        members: ``{bucket: [record index, ...]}``.
        captions: caption options applied at each draw.
        notes: what was skipped or changed, for the report.
        flip: kohya's ``flip_aug``: :func:`encode_buckets` also caches the horizontally mirrored
            images' latents (:attr:`latents_flipped`) and each use of an image takes the mirrored
            one with probability 1/2 (:func:`flip_draws`).
        latents_flipped: ``{bucket: (n_b, C, h', w')}``, the mirrored images' latents (with :attr:`flip`).
        loss_masks: kohya's masked loss (``alpha_mask``, ``masked_loss``): where each image's loss
            mask comes from; :func:`encode_buckets` caches the masks at the latents' size
            (:attr:`masks`) and :meth:`batch_masks` / :meth:`pixel_masks` give a batch's.
        masks: ``{bucket: (n_b, 1, h', w')}`` float32 masks in [0, 1] (with :attr:`loss_masks`, cached latents).
        augment: kohya's ``random_crop`` / ``color_aug``; when active nothing is cached
            (:func:`encode_buckets` only groups the images) and each batch's pixels come from
            :meth:`pixel_batch`, encoded before the step.
        batch_sizes: kohya's several ``[[datasets]]`` blocks: block ``i``'s batch size (its records'
            :attr:`ImageRecord.dataset`); each block's images are grouped apart (:meth:`key_of`: a
            batch never mixes blocks) and cut into batches of its own size (:func:`epoch_batches`).
            Empty (one block, the default): every batch is the ``batch_size`` asked for.
    """

    records: list[ImageRecord]
    latents: dict[tuple[int, ...], Tensor] = field(default_factory=dict)
    members: dict[tuple[int, ...], list[int]] = field(default_factory=dict)
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    notes: list[str] = field(default_factory=list)
    flip: bool = False
    latents_flipped: dict[tuple[int, ...], Tensor] = field(default_factory=dict)
    augment: PixelAugment = field(default_factory=PixelAugment)
    loss_masks: LossMaskSource | None = None
    masks: dict[tuple[int, ...], Tensor] = field(default_factory=dict)
    batch_sizes: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.records)

    def key_of(self, record: ImageRecord) -> tuple[int, ...]:
        """The group ``record`` is batched in (the key of :attr:`latents` / :attr:`members`): its
        bucket (height, width), or with :attr:`batch_sizes` ``(block, height, width)``."""
        return (record.dataset, *record.bucket) if self.batch_sizes else record.bucket

    def batch_size_of(self, key: tuple[int, ...], batch_size: int) -> int:
        """The batch size of group ``key`` (:meth:`key_of`): its block's, else ``batch_size``."""
        return self.batch_sizes[key[0]] if self.batch_sizes else batch_size

    def latent_bytes(self) -> int:
        """Bytes the cached latents take (both caches with :attr:`flip`; the loss masks with :attr:`loss_masks`)."""
        return sum(t.numel() * t.element_size() for cache in (self.latents, self.latents_flipped, self.masks)
                   for t in cache.values())

    def batch_masks(self, bucket: tuple[int, int], positions: list[int], flips: list[bool] | None = None) -> Tensor:
        """The cached loss masks (B, 1, h', w') of ``positions`` in ``bucket``, mirrored where
        ``flips[i]`` (as the latents :meth:`batch_latents` gives)."""
        if bucket not in self.masks:
            raise ValueError("loss masks asked for but not cached: set dataset.loss_masks before encode_buckets")
        plain = self.masks[bucket][positions]
        if not flips or not any(flips):
            return plain
        mirror = torch.tensor(flips, dtype=torch.bool).view(-1, 1, 1, 1)
        return torch.where(mirror, torch.flip(plain, dims=[3]), plain)

    def pixel_masks(self, records: list[ImageRecord], crops: list[tuple[int, int]], flips: list[bool],
                    size: tuple[int, int]) -> Tensor:
        """The loss masks (B, 1, h', w') of one :meth:`pixel_batch` use: each record's mask cropped at the
        ``(top, left)`` its image took, mirrored where ``flips[i]``, area-averaged to the latents' ``size``."""
        if self.loss_masks is None:
            raise ValueError("no loss masks: set dataset.loss_masks (a LossMaskSource)")
        return torch.stack([self.loss_masks.latent_mask(r, size=size, crop=c, flipped=f)
                            for r, c, f in zip(records, crops, flips, strict=True)])

    def batch_latents(self, bucket: tuple[int, int], positions: list[int], flips: list[bool] | None = None) -> Tensor:
        """The host latents (B, C, h', w') of ``positions`` in ``bucket``; where ``flips[i]`` is true,
        the mirrored image's latents (:attr:`latents_flipped`). Without flips: exactly the plain cache's rows."""
        plain = self.latents[bucket][positions]
        if not flips or not any(flips):
            return plain
        if bucket not in self.latents_flipped:
            raise ValueError("flipped latents asked for but not cached: set dataset.flip = True before encode_buckets")
        mask = torch.tensor(flips, dtype=torch.bool).view(-1, *([1] * (plain.ndim - 1)))
        return torch.where(mask, self.latents_flipped[bucket][positions], plain)

    def pixel_batch(self, records: list[ImageRecord], flips: list[bool], rng: random.Random) -> tuple[Tensor, list[tuple[int, int]]]:
        """One use of ``records`` (one bucket) with :attr:`augment`: the pixels (B, 3, bh, bw) in [-1, 1],
        each read, scaled, augmented and mirrored where ``flips[i]``, and each crop's ``(top, left)``
        in its scaled image; the draws come from ``rng`` in order."""
        images, crops = [], []
        for record, flipped in zip(records, flips, strict=True):
            if record.face is not None and self.augment.face_crop_range is not None:  # kohya's face crop: read unscaled
                if record.path is None:
                    raise ValueError("a face crop reads the image file at each use; this image was given as a tensor")
                image = self.augment.apply_face(read_image(record.path, alpha="drop"), bucket=record.bucket, face=record.face,
                                                flipped=flipped, rng=rng, interpolation=record.interpolation)
                images.append(image)
                crops.append((0, 0))
                continue
            image, crop = self.augment.apply(_scaled(record), bucket=record.bucket, crop=record.crop, flipped=flipped, rng=rng)
            images.append(image)
            crops.append(crop)
        return torch.stack(images), crops

    @property
    def samples_per_epoch(self) -> int:
        """Images × repeats."""
        return sum(r.repeats for r in self.records)

    def batches_per_epoch(self, batch_size: int, *, processes: int = 1) -> int:
        """Batches one epoch has (each bucket's ``images × repeats`` in batches, the last one partial;
        with :attr:`batch_sizes` each block's buckets in batches of its own size: kohya's sum over
        its datasets). ``processes`` > 1: kohya's count of steps on that many processes (accelerate's sharding:
        each bucket in per-process batches of ``batch_size / processes``, dealt to the processes in turn, so one step
        may mix buckets), where sdadapt's global batches (``processes`` = 1) each hold one bucket."""
        count = Counter()
        for r in self.records:
            count[self.key_of(r)] += r.repeats
        batches = sum(-(-n // max(1, self.batch_size_of(key, batch_size) // processes)) for key, n in count.items())
        return -(-batches // processes)

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """``{folder: {tag: count}}``: kohya's ``ss_tag_frequency`` of these images
        (:func:`tag_frequency_of`; with :attr:`CaptionOptions.templates`, a caption-less image counts
        every template's tags)."""
        return tag_frequency_of(self.records, templates=self.captions.templates)

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """``{folder: {"n_repeats": N, "img_count": n}}`` (kohya's ``ss_dataset_dirs``; the images
        directly in the root are ``"."`` here, :func:`kohya_folder_names` names them as kohya)."""
        return dataset_dirs_of(self.records)

    def bucket_info(self) -> dict:
        """kohya's ``ss_bucket_info``: ``{"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}``
        (``i`` in kohya's order of ``[w, h]``, ``n`` with repeats, ``e`` the mean over images of
        ``|bucket w / h − image w / h|``)."""
        count = Counter()
        for r in self.records:
            count[r.bucket] += r.repeats
        errors = [abs(r.size[1] / r.size[0] - r.bucket[1] / r.bucket[0]) for r in self.records if r.size[0]]
        # numbered in kohya's order (BucketManager.sort: its (width, height) sizes sorted)
        order = sorted(count, key=lambda s: (s[1], s[0]))
        buckets = {str(i): {"resolution": [w, h], "count": count[(h, w)]} for i, (h, w) in enumerate(order)}
        return {"buckets": buckets, "mean_img_ar_error": sum(errors) / max(1, len(errors))}

    def report(self) -> list[str]:
        """One line per image (what was done with it), then the buckets and the notes."""
        lines = []
        for r in self.records:
            name = r.path.name if r.path is not None else "(tensor)"
            where = f"{r.folder}/" if r.folder != "." else ""
            lines.append(f"{where}{name}: {r.note}" + (f" (x{r.repeats})" if r.repeats != 1 else ""))
        sizes = Counter(self.key_of(r) for r in self.records)
        lines.append("buckets: " + ", ".join(  # (several dataset blocks: each block's own, "datasets[1] 64x64")
            f"{f'datasets[{key[0]}] ' if self.batch_sizes else ''}{key[-1]}x{key[-2]}: {n} image{'s' if n != 1 else ''}"
            for key, n in sorted(sizes.items())))
        return lines + list(self.notes)


def encode_buckets(dataset: Dataset, encode: Callable[[Tensor], Tensor], *, batch: int = 4,
                   images: Tensor | None = None,
                   progress: Callable[[int, int, str], None] | None = None,
                   latents_of: Callable[..., tuple[Tensor, Tensor | None]] | None = None) -> None:
    """Fill ``dataset.latents`` / ``members``: each bucket's images encoded ``batch`` at a time (CPU latents).

    With ``dataset.flip`` also ``dataset.latents_flipped``: the same images mirrored left-right
    (``torch.flip(pixels, dims=[3])``, as kohya's ``cache_batch_latents`` with ``flip_aug``) encoded
    in the same batches, after the plain ones. With ``dataset.loss_masks`` also ``dataset.masks``: each
    image's loss mask scaled and cropped as the image, at the latents' size (:mod:`.loss_masks`).
    ``images`` (N, 3, H, W): encode these tensors (one bucket) instead of reading the files.
    ``progress(done, total, name)`` after each image. ``latents_of(records, flip=...)``: each batch's
    ``(latents (n, C, h, w), mirrored latents or None)`` from it in place of ``encode`` (kohya's latent
    ``.npz`` files, :class:`sdadapt.training.kohya_latent_files.KohyaLatentFiles`; not with ``images``).
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for index, record in enumerate(dataset.records):  # (by bucket; with several dataset blocks, by block and bucket)
        groups.setdefault(dataset.key_of(record), []).append(index)
    dataset.members = groups
    dataset.latents = {}
    dataset.latents_flipped = {}
    dataset.masks = {}
    if dataset.loss_masks is not None and (images is not None or any(r.path is None for r in dataset.records)):
        raise ValueError("loss masks are read from the image files (their alpha channel or a mask image of the same "
                         "name); these images were given as tensors (build the dataset with find_images)")
    if dataset.augment.active:  # the pixels change at every use: encoded batch by batch in training
        if images is not None or any(r.path is None for r in dataset.records):
            raise ValueError("random crops and colour changes read the image files at each use; these images were "
                             "given as tensors (build the dataset with find_images)")
        return
    done, total = 0, len(dataset.records)
    for bucket, indices in groups.items():
        chunks, mirrored, masks = [], [], []
        for start in range(0, len(indices), batch):
            part = indices[start: start + batch]
            if latents_of is not None and images is None:
                plain, flipped = latents_of([dataset.records[i] for i in part], flip=dataset.flip)
                chunks.append(plain)
                if dataset.flip:
                    mirrored.append(flipped)
            else:
                pixels = images[part] if images is not None else torch.stack([_load(dataset.records[i]) for i in part])
                with torch.no_grad():
                    chunks.append(encode(pixels).detach().float().cpu())
                    if dataset.flip:
                        mirrored.append(encode(torch.flip(pixels, dims=[3])).detach().float().cpu())
            if dataset.loss_masks is not None:
                size = tuple(chunks[-1].shape[-2:])
                masks.extend(dataset.loss_masks.latent_mask(dataset.records[i], size=size)
                             for i in part)
            done += len(part)
            if progress is not None:
                last = dataset.records[part[-1]]
                progress(done, total, last.path.name if last.path is not None else "")
        dataset.latents[bucket] = torch.cat(chunks)
        if dataset.flip:
            dataset.latents_flipped[bucket] = torch.cat(mirrored)
        if dataset.loss_masks is not None:
            dataset.masks[bucket] = torch.stack(masks)


def epoch_batches(dataset: Dataset, batch_size: int, *, seed: int, epoch: int) -> list[tuple[tuple[int, ...], list[int]]]:
    """One epoch's batches: ``[(bucket, [position in the bucket's latents, ...]), ...]``.

    Each bucket's members repeated ``repeats`` times and shuffled, cut into batches (the last
    may be smaller), then all batches shuffled — a pure function of ``(seed, epoch)``, so a
    resumed run draws the same batches. With :attr:`Dataset.batch_sizes` (kohya's several
    ``[[datasets]]``) the groups are ``(block, height, width)`` and each block's are cut into
    batches of that block's size: kohya's ``ConcatDataset`` of every dataset's batches, shuffled
    together.
    """
    rng = random.Random(f"{seed}/{epoch}")
    batches: list[tuple[tuple[int, ...], list[int]]] = []
    for bucket, indices in dataset.members.items():
        pool = [pos for pos, i in enumerate(indices) for _ in range(dataset.records[i].repeats)]
        rng.shuffle(pool)
        size = dataset.batch_size_of(bucket, batch_size)
        batches.extend((bucket, pool[s: s + size]) for s in range(0, len(pool), size))
    rng.shuffle(batches)
    return batches


def flip_draws(seed: int, micro: int, count: int) -> list[bool]:
    """Which of micro-batch ``micro``'s ``count`` images train mirrored (kohya's ``flip_aug``: each
    use of an image flips a fair coin, ``random.random() < 0.5``).

    A pure function of ``(seed, micro)`` on its own stream (``random.Random(f"{seed}/flip/{micro}")``),
    apart from the caption draws: turning flips on changes no caption, and a resumed run draws the
    same flips.
    """
    rng = random.Random(f"{seed}/flip/{micro}")
    return [rng.random() < 0.5 for _ in range(count)]


def size_conditioning(record: ImageRecord, *, flipped: bool = False,
                      crop: tuple[int, int] | None = None) -> tuple[int, int, int, int, int, int]:
    """SDXL's size conditioning of ``record``: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``.

    ``crop``: the ``(top, left)`` this use took (a random crop), default the record's. ``flipped``:
    the image trains mirrored, so its crop's left edge is counted from the left of the mirrored
    scaled image: ``resized_w - bucket_w - crop_left`` (kohya: ``target_w - crop_right`` with its
    own crop convention).
    """
    if record.face is not None or record.full_size:  # kohya's face crop and its no-bucket random crop (read at each
        # use, its uncached path): the target's size, crop 0 — and mirrored, kohya's target_w - crop_right with its
        h, w = record.bucket  # crop (0, 0, 0, 0): left = target_w
        return (h, w, 0, w if flipped else 0, h, w)
    top, left = record.crop if crop is None else crop
    if flipped:
        left = record.resized[1] - record.bucket[1] - left
    return (*record.size, top, left, *record.bucket)


def records_from_tensors(images: Tensor, captions: Iterable[str]) -> list[ImageRecord]:
    """Records for images already in memory (one bucket: their size)."""
    h, w = int(images.shape[-2]), int(images.shape[-1])
    return [ImageRecord(None, c, 1, ".", (h, w), (h, w), (h, w), (0, 0), "given as a tensor") for c in captions]
