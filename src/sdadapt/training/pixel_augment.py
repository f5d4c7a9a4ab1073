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

* **resize** (Custom Diffusion's augmentation, diffusers' ``train_custom_diffusion.py``
  ``CustomDiffusionDataset``, on unless ``--noaug``; ``train custom-diffusion --resize-aug``): each
  use of an image is rescaled to a drawn size and either placed on a zero canvas (smaller) or cut
  (larger), the loss masked to the image's latent region and the caption prefixed
  (:func:`draw_resize`, :func:`resize_pixels`, :func:`resize_mask`, :attr:`ResizeDraw.prefix`).
  ``fit`` applies it last, to the bucket-sized, already mirrored pixels (diffusers mirrors first too).

Every draw comes from the ``random.Random`` passed in: ``fit`` seeds one per micro-batch, so a
resumed run makes the same draws.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["PixelAugment", "random_crop_box", "hue_shift", "kohya_gamma", "color_aug", "ResizeDraw", "draw_resize",
           "resize_pixels", "resize_mask", "SMALL_PREFIXES", "LARGE_PREFIXES"]

#: kohya's hue_shift_limit, in OpenCV's hue units (2 degrees each)
HUE_SHIFT_LIMIT = 8
#: Custom Diffusion's caption prefixes: an image shrunk below 0.6 of its size, one enlarged past it
SMALL_PREFIXES = ("a far away ", "very small ")
LARGE_PREFIXES = ("zoomed in ", "close up ")


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
    hue rotation or a gamma curve (even odds), drawn from ``rng`` in kohya's order. The hue turns by whole OpenCV
    units (2 degrees), ``floor`` of the draw: kohya adds the float draw to the 8-bit hue channel and stores the sum
    back into it, which truncates (``(h + s) % 180`` with ``s`` made positive, ``h`` an integer: ``h + floor(s)``)."""
    if rng.random() > 0.33:
        return image
    if rng.random() > 0.5:
        return hue_shift(image, -2.0 * math.floor(rng.uniform(-HUE_SHIFT_LIMIT, HUE_SHIFT_LIMIT)))
    return kohya_gamma(image, rng.uniform(0.95, 1.05))


@dataclass(frozen=True)
class ResizeDraw:
    """One use's draw of Custom Diffusion's resize augmentation (:func:`draw_resize`).

    Attributes:
        size: the image's (height, width) before and after (the bucket's).
        scale: the rescaled image's (height, width): smaller than ``size`` -> placed on a zero canvas
            at ``(top, left)``; larger -> the ``size`` window at ``(top, left)`` cut from it.
        top, left: the offset (of the image on the canvas, or of the window in the image).
        prefix: put in front of the caption (``""``, :data:`SMALL_PREFIXES`, :data:`LARGE_PREFIXES`).
    """

    size: tuple[int, int]
    scale: tuple[int, int]
    top: int
    left: int
    prefix: str

    @property
    def larger(self) -> bool:
        """Whether the image was enlarged (cut to ``size``; its loss mask all ones)."""
        return self.scale[0] > self.size[0]


def draw_resize(size: tuple[int, int], rng: random.Random) -> ResizeDraw:
    """Custom Diffusion's draw (diffusers ``CustomDiffusionDataset.__getitem__`` and ``preprocess``) for an
    image of ``size`` (h, w), from ``rng`` in diffusers' order.

    With ``h`` the height (diffusers' square ``size``): ``u ~ U[0, 1)``; ``u < 0.66``: the new height
    ``s ~ randint(h // 3, h)``, else ``s ~ randint(int(1.2 h), int(1.4 h) - 1)`` (both ends inclusive;
    nothing between ``h`` and ``1.2 h``); the width in proportion, ``round(s w / h)`` (``s`` on a square
    image). Then ``top ~ randint(0, |s - h|)`` and ``left ~ randint(0, |s_w - w|)``, and the prefix:
    ``s < 0.6 h`` one of :data:`SMALL_PREFIXES`, ``s > h`` one of :data:`LARGE_PREFIXES`, else none.

    Raises:
        ValueError: a side below 3 pixels.
    """
    h, w = size
    if h < 3 or w < 3:
        raise ValueError(f"the resize augmentation needs an image of at least 3x3 pixels, got {w}x{h}")
    if rng.random() < 0.66:
        s = rng.randint(h // 3, h)
    else:
        s = rng.randint(int(1.2 * h), int(1.4 * h) - 1)
    sw = s if w == h else max(1, round(s * w / h))
    top = rng.randint(0, abs(s - h))
    left = rng.randint(0, abs(sw - w))
    prefix = rng.choice(SMALL_PREFIXES) if s < 0.6 * h else rng.choice(LARGE_PREFIXES) if s > h else ""
    return ResizeDraw(size=(h, w), scale=(s, sw), top=top, left=left, prefix=prefix)


def resize_pixels(image: Tensor, draw: ResizeDraw) -> Tensor:
    """``image`` (3, h, w) in [-1, 1] rescaled to ``draw.scale`` (bilinear, anti-aliased when shrinking:
    PIL's ``BILINEAR``, diffusers' ``Image.resize``) and, smaller, placed on zeros at ``(top, left)``
    or, larger, cut to its ``(h, w)`` window at ``(top, left)`` -> (3, h, w)."""
    if tuple(image.shape[-2:]) != draw.size:
        raise ValueError(f"the image is {tuple(image.shape[-2:])} but the draw was made for {draw.size}")
    (h, w), (s, sw) = draw.size, draw.scale
    wide = image.to(torch.promote_types(image.dtype, torch.float32))
    scaled = F.interpolate(wide[None], size=(s, sw), mode="bilinear", align_corners=False, antialias=True)[0]
    if draw.larger:  # (3, s, sw) -> its (h, w) window
        out = scaled[:, draw.top: draw.top + h, draw.left: draw.left + w]
    else:  # (3, s, sw) on a zero canvas (3, h, w)
        out = scaled.new_zeros((scaled.shape[0], h, w))
        out[:, draw.top: draw.top + s, draw.left: draw.left + sw] = scaled
    return out.to(image.dtype).contiguous()


def resize_mask(draw: ResizeDraw, latent_size: tuple[int, int]) -> Tensor:
    """The loss mask (1, h', w') float32 of one use at the latents' ``latent_size``: all ones for an
    enlarged image; for a smaller one 1 on the image's latent region less a one-latent-pixel border,
    diffusers' ``mask[top // f + 1 : (top + s) // f - 1, ...]`` with ``f = size // latent_size``
    (0 elsewhere; possibly empty at tiny sizes, see :func:`sdadapt.training.diffusion.region_loss_mask`)."""
    (h, w), (s, sw) = draw.size, draw.scale
    lh, lw = latent_size
    if draw.larger:
        return torch.ones((1, lh, lw))
    fh, fw = h // lh, w // lw
    if fh < 1 or fw < 1:
        raise ValueError(f"latents {lw}x{lh} larger than the image {w}x{h}")
    mask = torch.zeros((1, lh, lw))
    mask[:, draw.top // fh + 1: (draw.top + s) // fh - 1, draw.left // fw + 1: (draw.left + sw) // fw - 1] = 1.0
    return mask


@dataclass(frozen=True)
class PixelAugment:
    """Which pixel augmentations each use of an image gets (``train --random-crop``, ``--color-aug``).

    Attributes:
        random_crop: draw the crop's offset (:func:`random_crop_box`) instead of the centre.
        color_aug: kohya's colour change (:func:`color_aug`).
        face_crop_range: kohya's ``face_crop_aug_range`` (LO, HI): the images with a face
            (:meth:`apply_face`); ``None``: off.
        resize_aug: Custom Diffusion's resize augmentation (:func:`draw_resize`), which ``fit``
            applies after the others, with its loss mask and caption prefix; not with loss masks
            (``Dataset.loss_masks``) or cached text-encoder outputs.
    """

    random_crop: bool = False
    color_aug: bool = False
    face_crop_range: tuple[float, float] | None = None
    resize_aug: bool = False

    @property
    def active(self) -> bool:
        """Whether the pixels change between uses (then nothing can be cached)."""
        return self.random_crop or self.color_aug or self.face_crop_range is not None or self.resize_aug

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
