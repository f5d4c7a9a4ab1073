"""kohya's ``face_crop_aug_range``: crops around a face whose position is written in the file name.

kohya finds no faces while training: its ``tools/detect_face_rotate.py`` writes each image as
``<name>_<cx>_<cy>_<w>_<h>.<ext>`` (the face's centre and size in pixels), and
``BaseDataset.load_image_with_face_info`` reads the last four ``_``-separated parts of the file's
stem (:func:`face_box_from_name`; a stem of fewer than five parts has none). When bucketing is off
and the image is read at each use (not a cached latent), ``BaseDataset.crop_target`` scales it so
the face's larger side takes between ``1/HI`` and ``1/LO`` of the target's shorter side, drawing the
scale uniformly, and takes the target-sized window centred on the face, moved by kohya's random
offsets (:func:`face_crop_window`). kohya's code (sd-scripts ``library/train_util.py``)::

    face_size = max(face_w, face_h)
    size = min(self.height, self.width)
    min_scale = max(self.height / height, self.width / width)
    min_scale = min(1.0, max(min_scale, size / (face_size * range[1])))
    max_scale = min(1.0, max(min_scale, size / (face_size * range[0])))
    scale = min_scale if min_scale >= max_scale else random.uniform(min_scale, max_scale)
    nh, nw = int(height * scale + 0.5), int(width * scale + 0.5)
    face_cx, face_cy = int(face_cx * scale + 0.5), int(face_cy * scale + 0.5)
    for axis (height then width):
        p1 = face_p - target_size // 2
        if random_crop:  r = max(length - face_p, face_p); p1 += randint(0, r) + randint(0, r) - r
        elif range[0] != range[1] and face_size > size // 10 and face_size >= 40:
            p1 += randint(-face_size // 20, +face_size // 20)
        p1 = max(0, min(p1, length - target_size))

An image already the target's size is taken as it is (no draws). The scale is never above 1, so an
image smaller than the target on a side cannot be face-cropped (kohya fails on it; here
:func:`check_face_image` refuses it before training). The draws come from the ``random.Random``
passed in, in kohya's order (the scale, then the top, then the left). Scaling is
:func:`sdadapt.images.scale_image` with kohya's method (:mod:`sdadapt.resampling`; by default OpenCV's
``area``, as the scale is never above 1).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from ..errors import InputError
from ..images import scale_image
from ..resampling import interpolation_for

__all__ = [
    "FaceBox",
    "check_face_image",
    "face_box_from_name",
    "face_crop",
    "face_crop_window",
    "parse_face_crop_range",
]

#: a face as kohya's file names give it: (centre x, centre y, width, height) in the image's pixels
FaceBox = tuple[int, int, int, int]


def face_box_from_name(path: str | Path) -> FaceBox | None:
    """The face written in ``path``'s name (kohya's ``<name>_<cx>_<cy>_<w>_<h>.<ext>``), or ``None``.

    kohya's rule: the stem split at ``_``; with five parts or more the last four are the face's
    ``cx, cy, w, h``. A face whose ``cx`` is not above 0 is none (kohya: ``if face_cx > 0``).

    Raises:
        InputError: five parts or more whose last four are not integers (kohya fails reading them),
            or a face of size 0.
    """
    file = Path(path)
    tokens = file.stem.split("_")
    if len(tokens) < 5:
        return None
    try:
        cx, cy, w, h = (int(t) for t in tokens[-4:])
    except ValueError:
        raise InputError(f"{file}: face_crop_aug_range reads the last four '_'-separated parts of an image's name as "
                         f"its face's centre and size (<name>_<cx>_<cy>_<w>_<h>, as kohya's tools/detect_face_rotate.py "
                         f"writes them), and {'_'.join(tokens[-4:])!r} are not four integers (kohya fails on it too): "
                         "rename the file with fewer '_' or leave face_crop_aug_range out") from None
    if cx <= 0:
        return None
    if max(w, h) <= 0:
        raise InputError(f"{file}: the face in its name has size {w}x{h}; face_crop_aug_range scales by the face's "
                         "size (kohya divides by it): write the face's width and height, or rename the file")
    return cx, cy, w, h


def parse_face_crop_range(value: object, *, source: str = "face_crop_aug_range") -> tuple[float, float] | None:
    """kohya's ``face_crop_aug_range``: ``"LO,HI"`` (kohya's command line and TOML string) or two
    numbers -> ``(LO, HI)``; ``None`` / ``""`` / ``[]`` -> ``None`` (off).

    Raises:
        InputError: not two numbers, ``LO > HI`` (kohya's assert) or a number not above 0.
    """
    if value is None or value == "" or value == [] or value == ():
        return None
    try:
        parts = [float(p) for p in (value.split(",") if isinstance(value, str) else value)]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        parts = []
    if len(parts) != 2 or not all(math.isfinite(p) for p in parts):
        raise InputError(f"{source} {value!r}: give two numbers LO,HI (e.g. 2.0,4.0: the face's larger side takes "
                         "1/HI to 1/LO of the training size's shorter side)")
    low, high = parts
    if low > high:
        raise InputError(f"{source} {value!r}: LO must not be above HI (kohya's check)")
    if low <= 0:
        raise InputError(f"{source} {value!r}: both numbers must be above 0 (the face's size is divided by them)")
    return low, high


def check_face_image(path: str | Path, size: tuple[int, int], target: tuple[int, int]) -> None:
    """Refuse an image with a face that is smaller than the ``target`` (h, w) on a side (``size``: its (h, w)):
    kohya's face crop only scales down, and fails on it ("internal error. small scale")."""
    (h, w), (th, tw) = size, target
    if (h, w) != (th, tw) and (h < th or w < tw):
        raise InputError(f"{path}: {w}x{h} is smaller than the training size {tw}x{th}; face_crop_aug_range only "
                         "scales images down (kohya fails on it): use a larger image, a smaller --resolution, or "
                         "rename the file without the face's numbers")


def face_crop_window(size: tuple[int, int], target: tuple[int, int], face: FaceBox, crop_range: Sequence[float], *,
                     random_crop: bool, rng: random.Random) -> tuple[tuple[int, int], tuple[int, int]]:
    """kohya's ``crop_target`` as numbers: ``((nh, nw), (top, left))``, the size the image (``size``
    (h, w)) is scaled to and the ``target`` (h, w) window taken from the scaled image.

    ``face``: (cx, cy, w, h) in the image's pixels; ``crop_range``: (LO, HI); ``random_crop``: kohya's
    wider offset around the face (``subset.random_crop``). Draws from ``rng`` in kohya's order.
    """
    (height, width), (th, tw) = size, target
    if (height, width) == (th, tw):
        return (height, width), (0, 0)
    cx, cy, fw, fh = face
    face_size = max(fw, fh)
    shorter = min(th, tw)
    min_scale = max(th / height, tw / width)
    min_scale = min(1.0, max(min_scale, shorter / (face_size * crop_range[1])))
    max_scale = min(1.0, max(min_scale, shorter / (face_size * crop_range[0])))
    scale = min_scale if min_scale >= max_scale else rng.uniform(min_scale, max_scale)
    nh, nw = int(height * scale + 0.5), int(width * scale + 0.5)
    if nh < th or nw < tw:
        raise InputError(f"an image of {width}x{height} scaled by {scale:g} ({nw}x{nh}) does not cover the training "
                         f"size {tw}x{th} (face_crop_aug_range scales images down only)")
    corner = []
    for target_side, length, centre in ((th, nh, int(cy * scale + 0.5)), (tw, nw, int(cx * scale + 0.5))):
        p1 = centre - target_side // 2
        if random_crop:
            reach = max(length - centre, centre)
            p1 = p1 + (rng.randint(0, reach) + rng.randint(0, reach)) - reach
        elif crop_range[0] != crop_range[1] and face_size > shorter // 10 and face_size >= 40:
            p1 = p1 + rng.randint(-face_size // 20, +face_size // 20)
        corner.append(max(0, min(p1, length - target_side)))
    return (nh, nw), (corner[0], corner[1])


def face_crop(image: Tensor, target: tuple[int, int], face: FaceBox, crop_range: Sequence[float], *, random_crop: bool,
              rng: random.Random, interpolation: str | None = None) -> Tensor:
    """``image`` (C, H, W) cropped around ``face`` to ``target`` (h, w) as kohya's ``crop_target``
    (:func:`face_crop_window`): scaled (kohya's default ``area``; ``interpolation``: kohya's
    ``resize_interpolation``, :mod:`sdadapt.resampling`) then cut -> (C, h, w)."""
    (nh, nw), (top, left) = face_crop_window(tuple(image.shape[-2:]), target, face, crop_range,  # type: ignore[arg-type]
                                             random_crop=random_crop, rng=rng)
    scaled = scale_image(image, (nh, nw), interpolation=interpolation_for(interpolation, tuple(image.shape[-2:]), (nh, nw)))
    return scaled[:, top: top + target[0], left: left + target[1]].contiguous()
