"""A1111's Extras tab steps after "Upscale" — the dataset preparation its Train tab's "Preprocess images" used to
do (textual inversion, hypernetwork training): "Auto-sized crop" (``scripts/processing_autosized_crop.py``), "Create
flipped copies" (``scripts/postprocessing_create_flipped_copies.py``) and "Split oversized images"
(``scripts/postprocessing_split_oversized.py``), run as A1111's ``ScriptPostprocessingRunner.run`` runs its scripts
(``modules/scripts_postprocessing.py``): every script's ``process_firstpass`` first (the upscale's sets the target
size the split reads), then each script over every image so far, the images a script adds appended after them, in
A1111's order — Upscale (order 1000), then the three of order 4000 by name: Auto-sized crop, Create flipped copies,
Split oversized images. :func:`extras_images` returns each output with A1111's file-name suffix (``get_suffix``: the
first image none, the next ``-1``, ``-2``, ...; A1111 stops at ``-99`` and gives the 101st image on the bare name
again, overwriting the first — here the numbers go on). Face restoration, the focal-point crop (OpenCV's face and corner
detectors) and captioning (BLIP / DeepDanbooru) need models and are not run here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from .pillow_resize import resize_across_first

__all__ = ["FLIPS", "AutosizedCrop", "SplitOversized", "center_crop", "extras_images", "flipped_copies",
           "multicrop", "split_oversized", "upscale_target"]

#: "Create flipped copies" choices, in the order the script adds them
FLIPS: tuple[str, ...] = ("Horizontal", "Vertical", "Both")
_OBJECTIVES = ("Maximize area", "Minimize error")


@dataclasses.dataclass(frozen=True)
class AutosizedCrop:
    """"Auto-sized crop" settings (A1111's defaults): sides from ``min_dim`` to ``max_dim`` in steps of 64, an area
    within ``[min_area, max_area]``, an aspect-ratio error at most ``threshold``; ``objective`` "Maximize area" or
    "Minimize error".

    Raises:
        ValueError: bounds out of order or below 1, an unknown objective, a threshold outside [0, 1].
    """

    min_dim: int = 384
    max_dim: int = 768
    min_area: int = 64 * 64
    max_area: int = 640 * 640
    objective: str = "Maximize area"
    threshold: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.min_dim <= self.max_dim or not 1 <= self.min_area <= self.max_area:
            raise ValueError(f"auto-sized crop: need 1 <= min <= max for the sides ({self.min_dim}, {self.max_dim}) "
                             f"and the areas ({self.min_area}, {self.max_area})")
        if self.objective not in _OBJECTIVES:
            raise ValueError(f"auto-sized crop: objective must be one of {', '.join(_OBJECTIVES)}, got "
                             f"{self.objective!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"auto-sized crop: error threshold must be in [0, 1], got {self.threshold}")


@dataclasses.dataclass(frozen=True)
class SplitOversized:
    """"Split oversized images" settings (A1111's defaults): an image whose aspect ratio over the target's is below
    ``threshold`` is cut into overlapping pieces (``overlap_ratio`` of a piece shared with the next).

    Raises:
        ValueError: a threshold outside [0, 1] or an overlap ratio outside [0, 0.9].
    """

    threshold: float = 0.5
    overlap_ratio: float = 0.2

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0 or not 0.0 <= self.overlap_ratio <= 0.9:
            raise ValueError(f"split oversized: threshold must be in [0, 1] and the overlap ratio in [0, 0.9] (A1111's "
                             f"sliders), got {self.threshold} and {self.overlap_ratio}")


def center_crop(image, width: int, height: int):
    """The script's ``center_crop``: the centred box of ``image`` with the aspect of ``width`` x ``height`` resized
    to that size by Lanczos (the float box handed to Pillow as it is)."""
    from PIL import Image

    iw, ih = image.size
    if ih / height < iw / width:
        sw = width * ih / height
        box = (iw - sw) / 2, 0, iw - (iw - sw) / 2, ih
    else:
        sh = height * iw / width
        box = 0, (ih - sh) / 2, iw, ih - (ih - sh) / 2
    return resize_across_first(image, (width, height), Image.Resampling.LANCZOS, box)


def multicrop(image, settings: AutosizedCrop):
    """The script's ``multicrop_pic``: of the sizes ``(w, h)`` on the 64-step grid within the bounds whose aspect error
    ``1 − min(r, 1/r)`` (``r``: the image's aspect over ``w/h``) is at most the threshold, the largest area (ties:
    the smaller error) — or with "Minimize error" the smallest error (ties: the larger area) — centre-cropped to it;
    ``None`` when no size fits."""
    iw, ih = image.size

    def err(w: int, h: int) -> float:
        x = iw / ih / (w / h)
        return 1 - (x if x < 1 else 1 / x)

    sides = range(settings.min_dim, settings.max_dim + 1, 64)
    fits = [(w, h) for w in sides for h in sides
            if settings.min_area <= w * h <= settings.max_area and err(w, h) <= settings.threshold]
    if not fits:
        return None
    order = 1 if settings.objective == "Maximize area" else -1
    w, h = max(fits, key=lambda wh: (wh[0] * wh[1], -err(*wh))[::order])
    return center_crop(image, w, h)


def _split_pic(image, inverse_xy: bool, width: int, height: int, overlap_ratio: float) -> list:
    """The script's ``split_pic``: ``image`` resized (Pillow's default filter) to the target's width along its short
    side, then cut into ``ceil((h − to_h·overlap)/(to_h·(1 − overlap)))`` pieces evenly along the long side."""
    if inverse_xy:
        from_w, from_h, to_w, to_h = image.height, image.width, height, width
    else:
        from_w, from_h, to_w, to_h = image.width, image.height, width, height
    h = from_h * to_w // from_w
    image = resize_across_first(image, (h, to_w) if inverse_xy else (to_w, h))
    split_count = math.ceil((h - to_h * overlap_ratio) / (to_h * (1.0 - overlap_ratio)))
    y_step = (h - to_h) / (split_count - 1)
    pieces = []
    for i in range(split_count):
        y = int(y_step * i)
        pieces.append(image.crop((y, 0, y + to_h, to_w)) if inverse_xy else image.crop((0, y, to_w, y + to_h)))
    return pieces


def split_oversized(image, width: int | None, height: int | None, settings: SplitOversized) -> list:
    """The script's ``process``: ``[image]`` as it is when there is no target size or its aspect is not far enough
    from the target's (the ratio of the two at least 1, or above the threshold), else the pieces (the first replaces
    the image, the rest are added)."""
    if not width or not height:
        return [image]
    if image.height > image.width:
        ratio, inverse_xy = (image.width * height) / (image.height * width), False
    else:
        ratio, inverse_xy = (image.height * width) / (image.width * height), True
    if ratio >= 1.0 or ratio > settings.threshold:
        return [image]
    return _split_pic(image, inverse_xy, width, height, settings.overlap_ratio)


def flipped_copies(image, flips: Sequence[str]) -> list:
    """The script's copies of ``image`` for ``flips`` (of :data:`FLIPS`), in its order: mirrored, flipped top to
    bottom, both.

    Raises:
        ValueError: an unknown flip.
    """
    from PIL import Image, ImageOps

    unknown = [flip for flip in flips if flip not in FLIPS]
    if unknown:
        raise ValueError(f"flipped copies: {unknown[0]!r} is not one of {', '.join(FLIPS)}")
    copies = []
    if "Horizontal" in flips:
        copies.append(ImageOps.mirror(image))
    if "Vertical" in flips:
        copies.append(image.transpose(Image.Transpose.FLIP_TOP_BOTTOM))
    if "Both" in flips:
        copies.append(image.transpose(Image.Transpose.FLIP_TOP_BOTTOM).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    return copies


def upscale_target(image, *, scale: float, size: tuple[int, int] | None, max_side_length: int) -> tuple[int, int]:
    """The Upscale script's ``process_firstpass`` target (what "Split oversized images" splits to): "Scale to"'s
    size, else ``int(side·scale)`` passed through its ``limit_size_by_one_dimention`` with the max side length — which
    with A1111's default 0 is ``(0, 0)``, so that A1111 splits nothing in "Scale by" mode unless a max side length is
    set."""
    from .extras_upscale import limit_size_by_one_dimension

    if size is not None:
        return int(size[0]), int(size[1])
    return limit_size_by_one_dimension(int(image.width * scale), int(image.height * scale), int(max_side_length))


def extras_images(image, *, upscale, crop: AutosizedCrop | None = None, flips: Sequence[str] = (),
                  split: SplitOversized | None = None) -> list[tuple[object, dict, str]]:
    """A1111's Extras run of one PIL ``image`` (made RGB): the Upscale step (:func:`sdadapt.extras_upscale.
    extras_upscale` of ``upscale``, an :class:`~sdadapt.extras_upscale.ExtrasUpscale`), then ``crop``, ``flips``
    and ``split`` where given, each over every image so far in A1111's order (module docstring) -> ``[(image, info,
    suffix), ...]``: the first the upscaled image itself (suffix ``""``), then the images the steps added, each with
    the info of the image it came from (A1111's ``create_copy``) and its suffix ``-1``, ``-2``, ... (A1111's
    ``get_suffix``: the file is ``NAME`` + suffix)."""
    from .extras_upscale import extras_upscale

    image = image.convert("RGB")
    target = upscale_target(image, scale=upscale.scale, size=upscale.size, max_side_length=upscale.max_side_length)
    first, info = extras_upscale(image, upscale)
    images: list[list] = [[first, info]]  # (A1111's all_images: [image, info] each)

    def run(step) -> None:
        for item in list(images):
            replaced, *added = step(item[0])
            item[0] = replaced
            images.extend([extra, dict(item[1])] for extra in added)

    if crop is not None:  # (A1111 keeps an image no size fits: "skipped ... can't find suitable size")
        run(lambda picture: [multicrop(picture, crop) or picture])
    if flips:
        run(lambda picture: [picture, *flipped_copies(picture, flips)])
    if split is not None:
        run(lambda picture: split_oversized(picture, *target, split))
    return [(picture, info, "" if n == 0 else f"-{n}") for n, (picture, info) in enumerate(images)]
