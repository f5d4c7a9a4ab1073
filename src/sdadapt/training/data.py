"""Training data as kohya sd-scripts and OneTrainer lay it out: folders, captions, aspect-ratio buckets.

**Folders.** ``--images DIR`` holds images directly (each seen ``repeats`` times per epoch) and/or
kohya's repeat folders ``N_name`` (``10_sks dog/``: each image seen 10 times per epoch). Other
sub-folders are skipped and reported. An image's caption is ``NAME.txt`` (or ``NAME.caption``)
beside it; without one it takes the folder's ``name`` part (kohya's class tokens) or the
default caption (``--prompt``), else it is an error naming the images.

**Captions** (:class:`CaptionOptions`, applied each time an image is drawn): an image without a
caption (``""``, :func:`find_images` with ``uncaptioned=True``) gets one of ``templates`` drawn
anew (kohya's textual-inversion templates: ``add_replacement("", templates)``); then split at
commas into tags; the first ``keep_tokens`` stay in place, the rest are shuffled (``shuffle``) and
each dropped with probability ``tag_dropout``; the whole caption is replaced by ``""`` with
probability ``dropout`` (kohya's ``caption_dropout_rate``: it trains the unconditional prediction).

**Buckets** (:func:`bucket_sizes`, :func:`plan_dataset`): sizes whose area is at most the
training resolution's, sides multiples of ``step`` between ``min_size`` and ``max_size`` — kohya's
``make_bucket_resolutions``. Each image goes to the bucket closest to its aspect ratio, is scaled
(area-averaged down, bilinear up) to cover it and centre-cropped; with ``no_upscale`` an image
smaller than the resolution gets a bucket of its own size (rounded down to ``step``) and is never
enlarged. Without bucketing every image is scaled and centre-cropped to the square resolution.
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
"""

from __future__ import annotations

import math
import os
import random
import re
import struct
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..images import IMAGE_SUFFIXES, ImageFolderError, read_image
from .pixel_augment import PixelAugment

__all__ = [
    "CaptionOptions",
    "ImageRecord",
    "Dataset",
    "find_images",
    "bucket_sizes",
    "plan_dataset",
    "encode_buckets",
    "epoch_batches",
    "flip_draws",
    "size_conditioning",
    "image_size",
]

_REPEAT_FOLDER = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class CaptionOptions:
    """How a caption changes each time its image is drawn (kohya's caption options).

    Attributes:
        templates: captions for images without one (caption ``""``), the trigger word already in
            place (``"a photo of a <sks>"`` …): one drawn at each use, before the options below
            (``train --templates``). Empty: such an image trains on ``""``.
        shuffle: shuffle the comma-separated tags (``--shuffle-caption``).
        keep_tokens: the first N tags never move or drop (``--keep-tokens``; e.g. the trigger word).
        dropout: probability of training on the empty caption (``--caption-dropout-rate``).
        tag_dropout: probability of dropping each movable tag (``--caption-tag-dropout-rate``).
        separator: the tag separator.
    """

    shuffle: bool = False
    keep_tokens: int = 0
    dropout: float = 0.0
    tag_dropout: float = 0.0
    separator: str = ","
    templates: tuple[str, ...] = ()

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

    @property
    def active(self) -> bool:
        """Whether captions change between draws at all."""
        return self.shuffle or self.dropout > 0 or self.tag_dropout > 0 or bool(self.templates)

    def apply(self, caption: str, rng: random.Random) -> str:
        """One draw of ``caption`` (the same ``rng`` state gives the same result); ``""`` draws one
        of :attr:`templates` first."""
        if not self.active:
            return caption
        if not caption and self.templates:
            caption = self.templates[rng.randrange(len(self.templates))]
        if self.dropout and rng.random() < self.dropout:
            return ""
        if not (self.shuffle or self.dropout or self.tag_dropout):  # templates only: a caption stays as written
            return caption
        tags = [t.strip() for t in caption.split(self.separator)]
        tags = [t for t in tags if t]
        fixed, rest = tags[: self.keep_tokens], tags[self.keep_tokens:]
        if self.tag_dropout:
            rest = [t for t in rest if rng.random() >= self.tag_dropout]
        if self.shuffle:
            rng.shuffle(rest)
        return f"{self.separator} ".join(fixed + rest)


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


def _caption_of(file: Path, extension: str) -> str | None:
    for suffix in dict.fromkeys((extension, ".txt", ".caption")):
        caption_file = file.with_suffix(suffix)
        if caption_file.is_file():
            text = caption_file.read_text(encoding="utf-8").strip()
            return " ".join(text.split()) or None
    return None


def find_images(
    root: str | os.PathLike,
    *,
    default_caption: str | None = None,
    caption_extension: str = ".txt",
    repeats: int = 1,
    uncaptioned: bool = False,
) -> tuple[list[ImageRecord], list[str]]:
    """The images of a dataset folder with captions and repeats (see the module docstring).

    ``uncaptioned``: an image without any caption gets ``""`` (the caller fills it in, e.g. a
    trigger-word method's templates) instead of an error.

    Returns:
        ``(records, notes)``: one record per image (sizes read from the headers), and what was
        skipped (non-``N_name`` sub-folders, other files).

    Raises:
        ImageFolderError: no such folder, no images, images without any caption, unreadable images.
    """
    base = Path(root)
    if not base.is_dir():
        raise ImageFolderError(f"{base}: not a folder of images")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    if default_caption is not None and not default_caption.strip():
        raise ValueError("the default caption (--prompt) is empty; give words, or leave it out and use NAME.txt captions")
    sets: list[tuple[Path, int, str | None, str]] = [(base, repeats, None, ".")]
    notes: list[str] = []
    for sub in sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")):
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
    for folder, count, class_tokens, label in sets:
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        for file in files:
            caption = _caption_of(file, caption_extension) or class_tokens or default_caption
            if caption is None:
                if not uncaptioned:
                    missing.append(str(file.relative_to(base)))
                caption = ""
            records.append(ImageRecord(file, caption, count, label, image_size(file)))
    if not records:
        raise ImageFolderError(f"{base}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder or its N_name sub-folders")
    if missing:
        raise ImageFolderError(
            f"{base}: {len(missing)} image(s) have no caption file ({', '.join(missing[:5])}); "
            "add NAME.txt beside each image or pass --prompt for all of them"
        )
    return records, notes


def bucket_sizes(resolution: tuple[int, int] | int, *, step: int = 64, min_size: int = 256,
                 max_size: int = 1024) -> list[tuple[int, int]]:
    """Bucket (height, width) sizes of at most the resolution's area (kohya's ``make_bucket_resolutions``).

    For each width ``w = min_size, min_size + step, … ≤ max_size`` the bucket is
    ``h = min(max_size, ⌊area / w / step⌋·step)`` (and its transpose), plus the resolution itself.

    Args:
        resolution: ``size`` or ``(height, width)``; sides multiples of ``step``.
    """
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if step < 1 or height % step or width % step:
        raise ValueError(f"resolution {width}x{height} must be a multiple of the bucket step {step}")
    if min_size > max_size or min_size < step:
        raise ValueError(f"need step ({step}) <= min bucket size ({min_size}) <= max bucket size ({max_size})")
    area = height * width
    sizes = {(height, width)}
    w = min_size
    while w <= max_size:
        h = min(max_size, (area // w) // step * step)
        if h >= min_size:
            sizes.add((h, w))
            sizes.add((w, h))
        w += step
    return sorted(sizes, key=lambda s: (s[1] / s[0], s))


def _fit(record: ImageRecord, bucket: tuple[int, int]) -> None:
    """Scale ``record`` to cover ``bucket`` and centre-crop; fills resized/crop/note."""
    h, w = record.size
    bh, bw = bucket
    scale = max(bh / h, bw / w)
    rh, rw = max(bh, round(h * scale)), max(bw, round(w * scale))
    top, left = (rh - bh) // 2, (rw - bw) // 2
    record.bucket, record.resized, record.crop = bucket, (rh, rw), (top, left)
    action = "kept" if (rh, rw) == (h, w) else ("scaled down" if scale < 1 else "scaled up")
    text = f"{w}x{h} -> bucket {bw}x{bh}: {action}"
    if (rh, rw) != (h, w):
        text += f" to {rw}x{rh}"
    if (rh, rw) != (bh, bw):
        text += f", cropped {rw - bw} px wide and {rh - bh} px high (centre)"
    record.note = text


def plan_dataset(records: list[ImageRecord], *, resolution: tuple[int, int] | int, buckets: bool = True,
                 step: int = 64, min_size: int | None = None, max_size: int | None = None,
                 no_upscale: bool = False) -> list[tuple[int, int]]:
    """Assign each record a bucket, scale and crop (in place); returns the bucket sizes in use.

    Args:
        resolution: the training size (``size`` or ``(height, width)``).
        buckets: aspect-ratio bucketing; ``False``: every image to the (square) resolution.
        step: bucket sides are multiples of it (64 for SD; the model's size multiple at least).
        min_size, max_size: bucket side limits (default: resolution/2 and resolution·2, kohya-like).
        no_upscale: never enlarge an image (small images get buckets of their own size).
    """
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    if not buckets:
        for record in records:
            _fit(record, (height, width))
        return sorted({r.bucket for r in records})
    side = int(math.sqrt(height * width))
    low = min_size if min_size is not None else max(step, side // 2 // step * step)
    high = max_size if max_size is not None else side * 2 // step * step
    sizes = bucket_sizes((height, width), step=step, min_size=low, max_size=high)
    ratios = torch.tensor([w / h for h, w in sizes])
    for record in records:
        h, w = record.size
        if no_upscale and h * w < height * width:
            bucket = (max(step, h // step * step), max(step, w // step * step))
        else:
            bucket = sizes[int(torch.argmin((ratios - w / h).abs()))]
        _fit(record, bucket)
    return sorted({r.bucket for r in records})


def _scaled(record: ImageRecord) -> Tensor:
    """The record's image scaled to cover its bucket, not cropped: (3, rh, rw) in [-1, 1]."""
    if record.path is None:
        raise ValueError("this image was given as a tensor and has no file to read: pass the tensors to "
                         "encode_buckets(images=...), or build the dataset from files with find_images")
    image = read_image(record.path)  # (3, H, W)
    rh, rw = record.resized
    if (rh, rw) != tuple(image.shape[1:]):
        mode = "area" if rh < image.shape[1] else "bilinear"
        image = torch.nn.functional.interpolate(image[None], size=(rh, rw), mode=mode,
                                                **({} if mode == "area" else {"align_corners": False}))[0]
    return image


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
        latents: ``{bucket (h, w): (n_b, C, h', w') latents}`` in :attr:`members` order (CPU).
        members: ``{bucket: [record index, ...]}``.
        captions: caption options applied at each draw.
        notes: what was skipped or changed, for the report.
        flip: kohya's ``flip_aug``: :func:`encode_buckets` also caches the horizontally mirrored
            images' latents (:attr:`latents_flipped`) and each use of an image takes the mirrored
            one with probability 1/2 (:func:`flip_draws`).
        latents_flipped: ``{bucket: (n_b, C, h', w')}``, the mirrored images' latents (with :attr:`flip`).
        augment: kohya's ``random_crop`` / ``color_aug``; when active nothing is cached
            (:func:`encode_buckets` only groups the images) and each batch's pixels come from
            :meth:`pixel_batch`, encoded before the step.
    """

    records: list[ImageRecord]
    latents: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    members: dict[tuple[int, int], list[int]] = field(default_factory=dict)
    captions: CaptionOptions = field(default_factory=CaptionOptions)
    notes: list[str] = field(default_factory=list)
    flip: bool = False
    latents_flipped: dict[tuple[int, int], Tensor] = field(default_factory=dict)
    augment: PixelAugment = field(default_factory=PixelAugment)

    def __len__(self) -> int:
        return len(self.records)

    def latent_bytes(self) -> int:
        """Bytes the cached latents take (both caches with :attr:`flip`)."""
        return sum(t.numel() * t.element_size() for cache in (self.latents, self.latents_flipped) for t in cache.values())

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
            image, crop = self.augment.apply(_scaled(record), bucket=record.bucket, crop=record.crop, flipped=flipped, rng=rng)
            images.append(image)
            crops.append(crop)
        return torch.stack(images), crops

    @property
    def samples_per_epoch(self) -> int:
        """Images × repeats."""
        return sum(r.repeats for r in self.records)

    def batches_per_epoch(self, batch_size: int) -> int:
        """Batches one epoch has (each bucket's ``images × repeats`` in batches, the last one partial)."""
        count = Counter()
        for r in self.records:
            count[r.bucket] += r.repeats
        return sum(-(-n // batch_size) for n in count.values())

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """``{folder: {tag: images with it}}`` (kohya's ``ss_tag_frequency``; an image without a
        caption counts the tags of every template it draws from)."""
        out: dict[str, Counter] = {}
        for r in self.records:
            captions = [r.caption] if r.caption or not self.captions.templates else self.captions.templates
            tags = {t.strip() for c in captions for t in c.split(self.captions.separator) if t.strip()}
            out.setdefault(r.folder, Counter()).update(tags)
        return {k: dict(v) for k, v in out.items()}

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """``{folder: {"n_repeats": N, "img_count": n}}`` (kohya's ``ss_dataset_dirs``)."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            entry = out.setdefault(r.folder, {"n_repeats": r.repeats, "img_count": 0})
            entry["img_count"] += 1
        return out

    def bucket_info(self) -> dict:
        """kohya's ``ss_bucket_info``: ``{"buckets": {i: {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}``."""
        count = Counter()
        for r in self.records:
            count[r.bucket] += r.repeats
        errors = [abs(r.size[1] / r.size[0] - r.bucket[1] / r.bucket[0]) for r in self.records if r.size[0]]
        buckets = {str(i): {"resolution": [w, h], "count": count[(h, w)]} for i, (h, w) in enumerate(sorted(count))}
        return {"buckets": buckets, "mean_img_ar_error": sum(errors) / max(1, len(errors))}

    def report(self) -> list[str]:
        """One line per image (what was done with it), then the buckets and the notes."""
        lines = []
        for r in self.records:
            name = r.path.name if r.path is not None else "(tensor)"
            where = f"{r.folder}/" if r.folder != "." else ""
            lines.append(f"{where}{name}: {r.note}" + (f" (x{r.repeats})" if r.repeats != 1 else ""))
        sizes = Counter(r.bucket for r in self.records)
        lines.append("buckets: " + ", ".join(f"{w}x{h}: {n} image{'s' if n != 1 else ''}" for (h, w), n in sorted(sizes.items())))
        return lines + list(self.notes)


def encode_buckets(dataset: Dataset, encode: Callable[[Tensor], Tensor], *, batch: int = 4,
                   images: Tensor | None = None,
                   progress: Callable[[int, int, str], None] | None = None) -> None:
    """Fill ``dataset.latents`` / ``members``: each bucket's images encoded ``batch`` at a time (CPU latents).

    With ``dataset.flip`` also ``dataset.latents_flipped``: the same images mirrored left-right
    (``torch.flip(pixels, dims=[3])``, as kohya's ``cache_batch_latents`` with ``flip_aug``) encoded
    in the same batches, after the plain ones. ``images`` (N, 3, H, W): encode these tensors (one
    bucket) instead of reading the files. ``progress(done, total, name)`` after each image.
    """
    groups: dict[tuple[int, int], list[int]] = {}
    for index, record in enumerate(dataset.records):
        groups.setdefault(record.bucket, []).append(index)
    dataset.members = groups
    dataset.latents = {}
    dataset.latents_flipped = {}
    if dataset.augment.active:  # the pixels change at every use: encoded batch by batch in training
        if images is not None or any(r.path is None for r in dataset.records):
            raise ValueError("random crops and colour changes read the image files at each use; these images were "
                             "given as tensors (build the dataset with find_images)")
        return
    done, total = 0, len(dataset.records)
    for bucket, indices in groups.items():
        chunks, mirrored = [], []
        for start in range(0, len(indices), batch):
            part = indices[start: start + batch]
            pixels = images[part] if images is not None else torch.stack([_load(dataset.records[i]) for i in part])
            with torch.no_grad():
                chunks.append(encode(pixels).detach().float().cpu())
                if dataset.flip:
                    mirrored.append(encode(torch.flip(pixels, dims=[3])).detach().float().cpu())
            done += len(part)
            if progress is not None:
                last = dataset.records[part[-1]]
                progress(done, total, last.path.name if last.path is not None else "")
        dataset.latents[bucket] = torch.cat(chunks)
        if dataset.flip:
            dataset.latents_flipped[bucket] = torch.cat(mirrored)


def epoch_batches(dataset: Dataset, batch_size: int, *, seed: int, epoch: int) -> list[tuple[tuple[int, int], list[int]]]:
    """One epoch's batches: ``[(bucket, [position in the bucket's latents, ...]), ...]``.

    Each bucket's members repeated ``repeats`` times and shuffled, cut into batches (the last
    may be smaller), then all batches shuffled — a pure function of ``(seed, epoch)``, so a
    resumed run draws the same batches.
    """
    rng = random.Random(f"{seed}/{epoch}")
    batches: list[tuple[tuple[int, int], list[int]]] = []
    for bucket, indices in dataset.members.items():
        pool = [pos for pos, i in enumerate(indices) for _ in range(dataset.records[i].repeats)]
        rng.shuffle(pool)
        batches.extend((bucket, pool[s: s + batch_size]) for s in range(0, len(pool), batch_size))
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
    top, left = record.crop if crop is None else crop
    if flipped:
        left = record.resized[1] - record.bucket[1] - left
    return (*record.size, top, left, *record.bucket)


def records_from_tensors(images: Tensor, captions: Iterable[str]) -> list[ImageRecord]:
    """Records for images already in memory (one bucket: their size)."""
    h, w = int(images.shape[-2]), int(images.shape[-1])
    return [ImageRecord(None, c, 1, ".", (h, w), (h, w), (h, w), (0, 0), "given as a tensor") for c in captions]
