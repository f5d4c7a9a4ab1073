"""A1111's "Inpaint area: Only masked" (``inpaint_full_res``) and "Only masked padding, pixels"
(``inpaint_full_res_padding``): the masked part of a large image is cut out, inpainted at the generation size and
pasted back, so a face or a hand is repainted at full resolution.

The geometry, from AUTOMATIC1111's ``modules/masking.py`` (``get_crop_region_v2``, ``expand_crop_region``) and
``modules/processing.py`` (``StableDiffusionProcessingImg2Img.init``, ``uncrop``, ``apply_overlay``):

* the crop region is the bounding box of the prepared mask's non-zero pixels — *after* the mask is prepared
  (an alpha mask thresholded, an L mask kept grey; inverted, blurred), so the blur's fringe is inside — widened by
  the padding on every side and clamped to the image (:func:`crop_region`; a blank mask has none: A1111 then runs
  plain img2img on the whole image);
* it is grown to the aspect ratio of the generation size (``width / height``) around its centre, moved back inside
  the image where it crosses an edge and clamped there (:func:`expand_crop_region`, A1111's integer arithmetic);
* the region is found in the mask's own pixels and image and mask are cut to it there (a mask of another size than
  the image is not resized first, as in A1111: PIL's ``crop`` pads the image black past its edge) and brought to
  ``width`` x ``height`` by "Resize and fill" (A1111's ``resize_image(2, ...)``, whatever the img2img resize mode:
  :func:`resize_image`, PIL's 8-bit calls themselves); the mask for the final overlay is brought to the image's size
  by the resize mode when the sizes differ (A1111's ``mask_for_overlay``);
* after sampling the generated image (8-bit) is brought back to the region's size by "Crop and resize"
  (``resize_image(1, ...)``: :func:`crop_and_resize`) and pasted at its corner on a transparent
  canvas of the image's size, and the original image is composited over it with alpha ``255 − mask`` (the blurred
  mask, *not* doubled as for "Whole picture") by PIL's ``alpha_composite`` (:func:`paste_back`, A1111's PIL path bit
  for bit): every pixel where the mask is 0 — all of the image outside the region — is the original's.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DEFAULT_PADDING", "crop_and_resize", "crop_region", "expand_crop_region", "only_masked_region",
           "paste_back", "resize_image"]

#: A1111's default "Only masked padding, pixels" (its UI slider and API field ``inpaint_full_res_padding``)
DEFAULT_PADDING = 32

Region = tuple[int, int, int, int]


def crop_region(mask: Tensor, padding: int = 0) -> Region | None:
    """A1111's ``masking.get_crop_region_v2``: the box ``(x1, y1, x2, y2)`` (x2, y2 exclusive, PIL's ``getbbox``)
    around the non-zero pixels of ``mask`` (H, W), each side moved out by ``padding`` pixels and clamped to
    ``[0, W] x [0, H]``; ``None`` for a mask with no non-zero pixel.

    Raises:
        ValueError: a mask that is not 2-D, or a negative padding.
    """
    if mask.dim() != 2:
        raise ValueError(f"crop_region: the mask must be (H, W), got shape {tuple(mask.shape)}")
    if padding < 0:
        raise ValueError(f"--inpaint-full-res-padding must be >= 0, got {padding}")
    h, w = mask.shape
    cols = torch.nonzero(mask.ne(0).any(dim=0)).flatten()  # (k,) columns with a masked pixel
    rows = torch.nonzero(mask.ne(0).any(dim=1)).flatten()
    if cols.numel() == 0:
        return None
    x1, x2, y1, y2 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
    return max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, w), min(y2 + padding, h)


def expand_crop_region(region: Region, *, width: int, height: int, image_width: int, image_height: int) -> Region:
    """A1111's ``masking.expand_crop_region``: ``region`` (x1, y1, x2, y2) grown along its short side to the ratio
    ``width / height`` of the generation size (the extra ``int(desired − size)`` pixels split ``d // 2`` before,
    the rest after), shifted back inside an ``image_width`` x ``image_height`` image where it crosses an edge and
    clamped to it (then it keeps a slightly different ratio: the crop is later fitted by "Resize and fill")."""
    x1, y1, x2, y2 = (int(v) for v in region)
    ratio_crop = (x2 - x1) / (y2 - y1)
    ratio_processing = width / height
    if ratio_crop > ratio_processing:  # too wide: grow the height
        y1, y2 = _grown(y1, y2, int((x2 - x1) / ratio_processing - (y2 - y1)), image_height)
    else:  # too tall (or exact): grow the width
        x1, x2 = _grown(x1, x2, int((y2 - y1) * ratio_processing - (x2 - x1)), image_width)
    return x1, y1, x2, y2


def _grown(lo: int, hi: int, diff: int, limit: int) -> tuple[int, int]:
    """One side of ``expand_crop_region``: ``[lo, hi)`` grown by ``diff`` (``diff // 2`` before, the rest after),
    shifted back inside ``[0, limit]`` where it crosses an edge and clamped to it (A1111's order of steps)."""
    lo -= diff // 2
    hi += diff - diff // 2
    if hi >= limit:
        lo -= hi - limit
        hi = limit
    if lo < 0:
        hi -= lo
        lo = 0
    return lo, min(hi, limit)


def only_masked_region(mask: Tensor, *, padding: int, width: int, height: int) -> Region | None:
    """The region "Only masked" inpaints: :func:`crop_region` of the prepared mask (H, W) with ``padding``, grown by
    :func:`expand_crop_region` to ``width / height`` inside the image; ``None`` for a blank mask (A1111: "Unable to
    perform Inpaint Only mask because mask is blank", plain img2img instead)."""
    region = crop_region(mask, padding)
    if region is None:
        return None
    h, w = mask.shape
    return expand_crop_region(region, width=width, height=height, image_width=w, image_height=h)


def resize_image(image, width: int, height: int, *, mode: str = "just"):
    """A1111's ``images.resize_image(mode, image, width, height)`` on a PIL image (its default
    ``upscaler_for_img2img`` None, and every ``L`` mask whatever the upscaler: PIL's Lanczos), done by PIL itself so
    the 8-bit result is A1111's bit for bit — in the pass order of A1111's Pillow 9.5 on any Pillow
    (:func:`sdadapt.pillow_resize.resize_across_first`):

    * ``just`` (0): ``image.resize((width, height), LANCZOS)``;
    * ``crop`` (1): scaled by Lanczos to cover ``width`` x ``height`` keeping its aspect (``src_w = width if
      width/height > w/h else w·height // h``, ``src_h = height if width/height <= w/h else h·width // w``) and
      pasted at ``(width//2 − src_w//2, height//2 − src_h//2)`` on black: what sticks out is cut off;
    * ``fill`` (2): scaled to fit inside (the same sizes with the comparisons turned round), pasted centred on black,
      and each band left (``height//2 − src_h//2`` rows, or as many columns, when above 0) filled with PIL's bicubic
      resize of the zero-height (zero-width) box at that edge of the scaled image.

    The canvas keeps the image's mode (A1111's is ``RGB``: an ``L`` mask pasted there has three equal channels, and
    ``convert("L")`` — how A1111 reads it back — gives the same values, PIL's luma weights summing to 1 exactly).
    Returns a PIL image of ``width`` x ``height``.

    Raises:
        ValueError: an unknown mode, a size below 1, or an image so far from the size's aspect that its scaled side
            would be 0 pixels (A1111 fails there in PIL).
    """
    from PIL import Image

    from .pillow_resize import resize_across_first
    from .resize_modes import RESIZE_MODES

    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    width, height = int(width), int(height)
    if width < 1 or height < 1:
        raise ValueError(f"size must be at least 1 x 1, got {width} x {height}")
    if mode == "just":
        return resize_across_first(image, (width, height), Image.LANCZOS)
    ratio, src_ratio = width / height, image.width / image.height
    if mode == "crop":
        src_w = width if ratio > src_ratio else image.width * height // image.height
        src_h = height if ratio <= src_ratio else image.height * width // image.width
    else:
        src_w = width if ratio < src_ratio else image.width * height // image.height
        src_h = height if ratio >= src_ratio else image.height * width // image.width
    if src_w < 1 or src_h < 1:  # (A1111: PIL's "height and width must be > 0")
        verb = "fit" if mode == "fill" else "cover"
        raise ValueError(f"resize mode {mode}: a {image.width}x{image.height} image scaled to {verb} {width}x{height} "
                         f"would be {src_w}x{src_h} pixels; use another --resize-mode or size")
    resized = resize_across_first(image, (src_w, src_h), Image.LANCZOS)
    out = Image.new(image.mode, (width, height))
    out.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    if mode == "fill" and ratio < src_ratio:  # bands above and below
        band = height // 2 - src_h // 2
        if band > 0:
            out.paste(resized.resize((width, band), Image.BICUBIC, box=(0, 0, width, 0)), box=(0, 0))
            out.paste(resized.resize((width, band), Image.BICUBIC, box=(0, src_h, width, src_h)),
                      box=(0, band + src_h))
    elif mode == "fill" and ratio > src_ratio:  # bands left and right
        band = width // 2 - src_w // 2
        if band > 0:
            out.paste(resized.resize((band, height), Image.BICUBIC, box=(0, 0, 0, height)), box=(0, 0))
            out.paste(resized.resize((band, height), Image.BICUBIC, box=(src_w, 0, src_w, height)),
                      box=(band + src_w, 0))
    return out


def crop_and_resize(image, width: int, height: int):
    """A1111's ``images.resize_image(1, image, width, height)`` ("Crop and resize"): :func:`resize_image` with
    ``mode="crop"``. Returns a PIL image of ``width`` x ``height``."""
    return resize_image(image, width, height, mode="crop")


def paste_back(generated, *, original, mask, region: Region):
    """A1111's ``apply_overlay`` with ``paste_to`` (``uncrop``), on PIL images as A1111 runs it: the generated image
    — a PIL RGB image, or (3, h, w) in [-1, 1] made 8-bit first (:func:`sdadapt.images.to_uint8`, rounded as every
    sdadapt PNG; A1111 truncates its decoded floats) — brought to the region's size by "Crop and resize"
    (:func:`crop_and_resize`, PIL's 8-bit Lanczos) and pasted at ``(x1, y1)`` on a transparent canvas of the
    ``original`` PIL RGB image's size; the original composited over it with alpha ``255 − mask`` (``mask``: the
    prepared PIL ``L`` mask at the original's size, 255 = repaint; :func:`sdadapt.inpaint.overlay_layer`) by PIL's
    ``alpha_composite``. For an 8-bit generated image the result is A1111's bit for bit. Returns a PIL RGB image of
    the original's size."""
    import numpy as np
    from PIL import Image

    from .images import to_uint8
    from .inpaint import overlay_layer

    x1, y1, x2, y2 = region
    if not isinstance(generated, Image.Image):
        generated = Image.fromarray(np.ascontiguousarray(to_uint8(generated.detach().float().cpu())), "RGB")
    canvas = Image.new("RGBA", original.size)
    canvas.paste(crop_and_resize(generated.convert("RGB"), x2 - x1, y2 - y1), (x1, y1))
    canvas.alpha_composite(overlay_layer(original, mask))
    return canvas.convert("RGB")
