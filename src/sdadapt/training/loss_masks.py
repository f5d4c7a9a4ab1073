"""kohya's masked loss: a per-pixel weight in [0, 1] for each training image's loss.

Where the mask comes from (:class:`LossMaskSource`):

* **the image's alpha channel** (kohya's ``alpha_mask``): alpha / 255, all ones for an image
  without one (``train_util.load_images_and_masks_for_caching``). A dataset TOML may set
  ``alpha_mask`` per subset (:attr:`ImageRecord.alpha_mask`): an image of a subset with
  ``alpha_mask = false`` gets all ones, as kohya fills the masks of a batch's unmasked images
  (``BaseDataset.__getitem__``: ``torch.ones`` for each ``None`` once one image has a mask);
* **a mask image** (kohya's ``masked_loss`` with ``conditioning_data_dir``): the red channel of the
  image of the same name in that folder, / 255 (kohya's ``apply_masked_loss`` reads channel 0 of
  the conditioning image, ``x/2 + 0.5`` of its [-1, 1] pixels); it must have the training image's size.

The mask goes through what the image goes through (:func:`mask_like_image`): scaled to cover the
bucket by the image's rule, cropped at the same ``(top, left)`` (random crops included), mirrored
with the image (``flip_aug``), then area-averaged to the latents' size — kohya averages it there
when it applies it (``F.interpolate(mask, size=loss.shape[2:], mode="area")``); doing it once at
caching time gives the same numbers. The step multiplies each latent element's loss by its mask
value and averages as before (:func:`sdadapt.training.diffusion.diffusion_loss`'s ``mask``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor
from torch.nn import functional as F

from ..images import IMAGE_SUFFIXES, ImageFolderError, read_image_channels, scale_image
from ..resampling import interpolation_for

if TYPE_CHECKING:
    from .data import ImageRecord

__all__ = ["LossMaskSource", "attention_map_file", "attention_weights", "is_attention_map", "mask_like_image"]


@dataclass(frozen=True)
class LossMaskSource:
    """Where each training image's loss mask comes from.

    Attributes:
        folder: ``None``: the image's own alpha channel (kohya's ``alpha_mask``); a folder: the red
            channel of the image of the same name there (kohya's ``masked_loss`` with
            ``conditioning_data_dir``), looked for at the image's path relative to the images root
            first (``folder/10_dog/a.png`` for ``10_dog/a.png``), then directly in ``folder``.
    """

    folder: Path | None = None
    attention: bool = False
    #: kohya's per-subset ``conditioning_data_dir`` (a dataset TOML with ``masked_loss``): each image's mask image in
    #: its record's :attr:`~sdadapt.training.data.ImageRecord.mask_folder`, found by its name as kohya's ``glob_images``
    per_subset: bool = False

    @property
    def mask_images(self) -> bool:
        """Whether the masks are mask images (red channel), not the images' alpha channels."""
        return self.folder is not None or self.per_subset

    def mask_file(self, record: ImageRecord) -> Path | None:
        """The file ``record``'s mask is read from.

        Raises:
            ImageFolderError: no mask image of that name in :attr:`folder`.
        """
        if record.path is None:
            raise ValueError("this image was given as a tensor and has no file to read its loss mask from; build the "
                             "dataset from files with find_images")
        if self.attention:  # (the DreamArtist extension's map beside the image; None: none, all weights 1)
            return attention_map_file(record.path)
        if not self.mask_images:
            return record.path
        stem = record.path.stem
        if self.per_subset:
            places = [] if record.mask_folder is None else [Path(record.mask_folder)]
        else:
            places = [self.folder / record.folder, self.folder]
        for where in places:
            for suffix in IMAGE_SUFFIXES:
                for candidate in (where / f"{stem}{suffix}", where / f"{stem}{suffix.upper()}"):
                    if candidate.is_file():
                        return candidate
        looked = " and ".join(map(str, places)) or "no conditioning_data_dir of its subset"
        raise ImageFolderError(f"{places[0] if places else record.folder}: no mask image for {record.path.name} (looked "
                               f"for {stem}.png/.jpg/... in {looked}); every training image needs one, as kohya's "
                               "conditioning_data_dir")

    def latent_mask(self, record: ImageRecord, *, size: tuple[int, int], crop: tuple[int, int] | None = None,
                    flipped: bool = False) -> Tensor:
        """``record``'s loss weights at the latents' ``size`` (1, h', w'): its mask through :func:`mask_like_image`;
        an attention map then becomes the extension's weights (:func:`attention_weights`, 0 to 5)."""
        if self.attention and self.mask_file(record) is None:  # (no map: every element weighs 1)
            return torch.ones(1, *size)
        mask = mask_like_image(self.read(record), record, size=size, crop=crop, flipped=flipped)
        return attention_weights(mask) if self.attention else mask

    def missing(self, records: list[ImageRecord]) -> list[str]:
        """Names of the images without a mask image (empty: all have one; always empty for alpha masks and
        attention maps, which an image may lack)."""
        if self.attention:
            return []
        out = []
        for record in records:
            try:
                self.mask_file(record)
            except ImageFolderError:
                out.append(record.path.name if record.path is not None else "(tensor)")
        return out

    def read(self, record: ImageRecord) -> Tensor:
        """``record``'s mask at the image's full size: (1, H, W) float32 in [0, 1] (all ones for an
        alpha-channel source and a record whose subset says ``alpha_mask = false``).

        Raises:
            ImageFolderError: a mask image whose size differs from the training image's.
        """
        if self.attention:
            file = self.mask_file(record)
            height, width = record.size
            if file is None:  # (its grey value for weight 1 is 127; latent_mask gives the ones itself)
                return torch.full((1, height, width), 127.0 / 255.0)
            rgb = read_image_channels(file)[..., :3].astype(np.int64)  # (PIL's convert("L"): ITU-R 601-2 luma)
            grey = (rgb[..., 0] * 19595 + rgb[..., 1] * 38470 + rgb[..., 2] * 7471 + 0x8000) >> 16
            if tuple(grey.shape) != (height, width):
                raise ImageFolderError(f"{file}: the attention map is {grey.shape[1]}x{grey.shape[0]} but its image "
                                       f"{record.path} is {width}x{height}; a map must have its image's size")
            return torch.from_numpy(grey.astype(np.float32) / 255.0)[None]
        if not self.mask_images and record.alpha_mask is False:
            from .data import image_size  # (data imports this module)

            height, width = record.size if all(record.size) else image_size(self.mask_file(record))
            return torch.ones(1, height, width)
        file = self.mask_file(record)
        channels = read_image_channels(file)
        if self.mask_images and tuple(channels.shape[:2]) != tuple(record.size):
            raise ImageFolderError(f"{file}: the mask is {channels.shape[1]}x{channels.shape[0]} but its image "
                                   f"{record.path} is {record.size[1]}x{record.size[0]}; a mask must have its image's size")
        channel = 0 if self.mask_images else 3  # red of a mask image / the image's alpha
        return torch.from_numpy(channels[..., channel].astype(np.float32) / 255.0)[None]


def attention_map_file(image: Path) -> Path | None:
    """The DreamArtist extension's attention map of a training image: ``<stem>_att<suffix>`` beside it
    (dataset.py: ``path[:path.rfind('.')] + '_att' + path[path.rfind('.'):]``), or ``None``."""
    candidate = image.with_name(f"{image.stem}_att{image.suffix}")
    return candidate if candidate.is_file() else None


def is_attention_map(path: Path) -> bool:
    """Whether ``path`` is an attention map (its stem ends with ``_att``), which the extension never trains on as
    an image."""
    return path.stem.endswith("_att")


def attention_weights(mask: Tensor) -> Tensor:
    """The extension's loss weights of an attention map's grey values ``mask`` in [0, 1] (v = 255·mask): ``v / 127``
    up to 127 (0 to 1: less attention), ``(v − 127) / 128 · 4 + 1`` above (1 to 5: more) — dataset.py's mapping,
    applied here after the map is brought to the latents' size (the extension maps after a bicubic resize)."""
    v = mask * 255.0
    return torch.where(v <= 127 + 0.1, v / 127.0, (v - 127.0) / 128.0 * 4.0 + 1.0)


def mask_like_image(mask: Tensor, record: ImageRecord, *, size: tuple[int, int], crop: tuple[int, int] | None = None,
                    flipped: bool = False) -> Tensor:
    """``mask`` (1, H, W) put through what ``record``'s image goes through, at the latents' ``size``:
    scaled to cover the bucket (:func:`sdadapt.images.scale_image`), cropped at ``crop`` (its
    ``(top, left)``; default the record's centre crop), mirrored left-right when ``flipped``, then
    area-averaged to ``size`` (h', w'). Returns (1, h', w') float32."""
    top, left = record.crop if crop is None else crop
    bh, bw = record.bucket
    method = interpolation_for(record.interpolation, tuple(mask.shape[1:]), record.resized)  # (kohya: with the image)
    scaled = scale_image(mask, record.resized, interpolation=method, bounds=(0.0, 1.0))
    out = scaled[:, top: top + bh, left: left + bw]
    if flipped:
        out = torch.flip(out, dims=[-1])
    return F.interpolate(out[None], size=size, mode="area")[0].contiguous()
