"""kohya's pixel augmentations: a random crop and a colour change at each use of an image.

They change the pixels every time an image is drawn, so the latents cannot be cached: with
:attr:`sdadapt.training.data.Dataset.augment` active, ``fit`` reads each drawn image (scaled to
cover its bucket, not yet cropped), augments it here and encodes the batch with the VAE before the
step. kohya's order: crop, colour, then the flip (``flip_aug``).

* **random crop** (kohya's ``random_crop``, ``trim_and_resize_if_required``): the bucket-sized
  window's offset is drawn uniformly, ``randint(0, scaled_w - bucket_w)`` for the left edge and
  then ``randint(0, scaled_h - bucket_h)`` for the top (a side with nothing to trim draws nothing),
  instead of the centre.
* **colour** (kohya's ``color_aug``, ``AugHelper.color_aug``): with probability 0.33 the image
  changes, half of those times by a hue rotation, else by a gamma curve. The hue shift draws
  ``s ~ U(-8, 8)`` in OpenCV's hue units (2 degrees; kohya converts its RGB image with
  ``COLOR_BGR2HSV``, so the hue turns the other way round): here the RGB hue turns by ``-2 s``
  degrees, saturation and value kept (:func:`hue_shift`). The gamma draws ``g ~ U(0.95, 1.05)``
  and maps each 0–255 value ``v`` to ``min(255, v ** g)`` (:func:`kohya_gamma`). Computed in
  floating point: kohya rounds each step to 8-bit integers.

* **face crop** (kohya's ``face_crop_aug_range``, :mod:`sdadapt.training.face_crop`): an image whose
  file name gives a face (:attr:`sdadapt.training.data.ImageRecord.face`) is read as it is, scaled
  by a drawn factor and cut around the face (:meth:`PixelAugment.apply_face`) instead.

Every draw comes from the ``random.Random`` passed in: ``fit`` seeds one per micro-batch, so a
resumed run makes the same draws.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PixelAugment", "random_crop_box", "hue_shift", "kohya_gamma", "color_aug"]

#: kohya's hue_shift_limit, in OpenCV's hue units (2 degrees each)
HUE_SHIFT_LIMIT = 8


def random_crop_box(scaled: tuple[int, int], bucket: tuple[int, int], rng: random.Random) -> tuple[int, int]:
    """kohya's random crop: ``(top, left)`` of a ``bucket`` (h, w) window in an image ``scaled`` (h, w)
    that covers it; the left edge is drawn first, a side without slack draws nothing."""
    (sh, sw), (bh, bw) = scaled, bucket
    if sh < bh or sw < bw:
        raise ValueError(f"the scaled image {sw}x{sh} does not cover its bucket {bw}x{bh}")
    left = rng.randint(0, sw - bw) if sw > bw else 0
    top = rng.randint(0, sh - bh) if sh > bh else 0
    return top, left


def hue_shift(image: Tensor, degrees: float) -> Tensor:
    """``image`` (..., 3, H, W) in [-1, 1] with its HSV hue turned by ``degrees``; saturation and value kept.

    RGB -> HSV (hue in sextants, 0 <= h < 6) -> ``h + degrees / 60`` -> RGB by
    ``v - v s clamp(min(k, 4 - k), 0, 1)`` with ``k = (n + h) mod 6``, ``n`` = 5, 3, 1 for red, green, blue.
    """
    rgb = ((image + 1) / 2).clamp(0, 1)
    r, g, b = rgb.split(1, dim=-3)
    value = rgb.amax(dim=-3, keepdim=True)
    chroma = value - rgb.amin(dim=-3, keepdim=True)
    grey = chroma == 0
    c = torch.where(grey, torch.ones_like(chroma), chroma)  # (grey pixels: no hue, no division by 0)
    hue = torch.where(value == r, ((g - b) / c) % 6, torch.where(value == g, (b - r) / c + 2, (r - g) / c + 4))
    hue = (torch.where(grey, torch.zeros_like(hue), hue) + degrees / 60.0) % 6
    saturation = torch.where(value > 0, chroma / torch.where(value > 0, value, torch.ones_like(value)), torch.zeros_like(value))
    k = torch.cat([(n + hue) % 6 for n in (5.0, 3.0, 1.0)], dim=-3)  # red, green, blue
    return (value - value * saturation * torch.clamp(torch.minimum(k, 4 - k), 0, 1)) * 2 - 1


def kohya_gamma(image: Tensor, gamma: float) -> Tensor:
    """``image`` in [-1, 1] through kohya's gamma: each 0–255 value ``v`` becomes ``min(255, v ** gamma)``."""
    levels = ((image + 1) * 127.5).clamp(0, 255)
    return (levels**gamma).clamp(max=255) / 127.5 - 1


def color_aug(image: Tensor, rng: random.Random) -> Tensor:
    """kohya's ``color_aug`` of one image (3, H, W) in [-1, 1]: unchanged with probability 0.67, else a
    hue rotation or a gamma curve (even odds), drawn from ``rng`` in kohya's order."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        return hue_shift(image, -2.0 * rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT))
    return kohya_gamma(image, rng.uniform(0.95, 1.05))


@dataclass(frozen=True)
class PixelAugment:
    """Which pixel augmentations each use of an image gets (``train --random-crop``, ``--color-aug``).

    Attributes:
        random_crop: draw the crop's offset (:func:`random_crop_box`) instead of the centre.
        color_aug: kohya's colour change (:func:`color_aug`).
        face_crop_range: kohya's ``face_crop_aug_range`` (LO, HI): the images with a face
            (:meth:`apply_face`); ``None``: off.
    """

    random_crop: bool = False
    color_aug: bool = False
    face_crop_range: tuple[float, float] | None = None

    @property
    def active(self) -> bool:
        """Whether the pixels change between uses (then nothing can be cached)."""
        return self.random_crop or self.color_aug or self.face_crop_range is not None

    def apply_face(self, image: Tensor, *, bucket: tuple[int, int], face: tuple[int, int, int, int], flipped: bool,
                   rng: random.Random, interpolation: str | None = None) -> Tensor:
        """One use of an image with a face: ``image`` (3, H, W) as read, not scaled, cut around ``face``
        to ``bucket`` (h, w) by kohya's ``crop_target`` (:func:`sdadapt.training.face_crop.face_crop`;
        :attr:`random_crop` widens the offset as kohya's), then the colour change and the mirror -> (3, h, w)."""
        from .face_crop import face_crop

        if self.face_crop_range is None:
            raise ValueError("apply_face needs face_crop_range (kohya's face_crop_aug_range)")
        out = face_crop(image, bucket, face, self.face_crop_range, random_crop=self.random_crop, rng=rng,
                        interpolation=interpolation)  # (kohya's resize_interpolation of the image's subset)
        if self.color_aug:
            out = color_aug(out, rng)
        if flipped:
            out = torch.flip(out, dims=[-1])
        return out.contiguous()

    def apply(self, scaled: Tensor, *, bucket: tuple[int, int], crop: tuple[int, int], flipped: bool,
              rng: random.Random) -> tuple[Tensor, tuple[int, int]]:
        """One use of an image: ``scaled`` (3, sh, sw) covering ``bucket`` (h, w) -> (3, h, w) and the
        ``(top, left)`` of the crop taken (``crop``, the centre, without :attr:`random_crop`); mirrored
        left-right last when ``flipped``."""
        top, left = random_crop_box(tuple(scaled.shape[-2:]), bucket, rng) if self.random_crop else crop  # type: ignore[arg-type]
        image = scaled[:, top: top + bucket[0], left: left + bucket[1]]
        if self.color_aug:
            image = color_aug(image, rng)
        if flipped:
            image = torch.flip(image, dims=[-1])
        return image.contiguous(), (top, left)
