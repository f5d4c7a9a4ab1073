"""A1111's img2img resize modes (``modules/images.py`` ``resize_image``, modes 0, 1, 2): how an init image of
another size or aspect is brought to the size being generated.

* ``just`` (0, "Just resize"): stretched to (H, W).
* ``crop`` (1, "Crop and resize"): scaled to cover (H, W) keeping its aspect, the centre cut out:
  ``src_w = W if W/H > w/h else w·H // h``, ``src_h = H if W/H <= w/h else h·W // w``, pasted at
  ``(W//2 − src_w//2, H//2 − src_h//2)``.
* ``fill`` (2, "Resize and fill"): scaled to fit inside (H, W) (the same sizes with the comparisons turned round),
  pasted centred on black, and the two bands left filled from the image's edge rows (or columns): A1111 resizes
  a zero-height box at the edge (PIL's default bicubic) to the band — each band row is
  ``1.125·edge − 0.125·next`` (PIL's bicubic weights 0.5625 and −0.0625 at distances ½ and 1½, normalised;
  the edge row alone for a one-row image), clipped to the pixel range.

The scaling is Lanczos (:func:`sdadapt.resampling.resample`, PIL's filter; A1111 with its default
``upscaler_for_img2img`` None); black is the low bound of ``bounds``. :func:`a1111_resize` is the float path of
tensors (PIL rounds to 8 bits between its passes: within ~3 levels of A1111's 8-bit result).

An init image *file* (``generate --init-image``: img2img, an inpainting model's img2img conditioning, the inpaint
tab) is taken as A1111's ``StableDiffusionProcessingImg2Img.init`` takes it (AUTOMATIC1111/stable-diffusion-webui
``modules/processing.py``, read at commit 0027ce1f6e58), on 8-bit PIL images, so the pixels the VAE encodes are
A1111's bit for bit: :func:`open_init_image` (the img2img tab's RGBA, ``images.flatten`` on the default white
``img2img_background_color``), :func:`sdadapt.inpaint_crop.resize_image` (``images.resize_image(resize_mode, ...)``,
PIL's calls themselves) and :func:`pil_pixels` (``np.array(image).astype(np.float32) / 255.0``, then ``· 2 − 1``):
:func:`init_image_pixels`. Without Pillow (an optional dependency) :func:`init_image_pixels` falls back to the
float path — :func:`sdadapt.images.read_image` (8-bit PNGs only, alpha blended on white in float) and
:func:`a1111_resize`: within ~3 levels of 8 bits of A1111's pixels instead of equal to them.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from .sampler_tables import RESIZE_MODE_LABELS

__all__ = ["IMG2IMG_RESIZE_MODES", "LATENT_RESIZE", "RESIZE_MODES", "a1111_resize", "init_image_pixels",
           "latent_resize", "open_init_image", "pil_pixels"]

#: ``--resize-mode`` names of the pixel resizes -> A1111's resize_mode number and label (the labels' home:
#: :mod:`sdadapt.sampler_tables`)
RESIZE_MODES: dict[str, tuple[int, str]] = {name: (number, RESIZE_MODE_LABELS[name])
                                            for number, name in enumerate(("just", "crop", "fill"))}
#: A1111's fourth img2img resize mode (3, "Just resize (latent upscale)"): the init image encoded at its own size,
#: its latents resized (:func:`latent_resize`)
LATENT_RESIZE = "latent"
#: every ``--resize-mode`` an img2img run takes
IMG2IMG_RESIZE_MODES: tuple[str, ...] = (*RESIZE_MODES, LATENT_RESIZE)


def _scaled(image: Tensor, size: tuple[int, int], bounds: tuple[float, float]) -> Tensor:
    """PIL's Lanczos resize of ``image`` (C, h, w) to ``size`` (:func:`sdadapt.resampling.resample`, in the pass
    order of A1111's Pillow 9.5: across first); ``image`` itself at its own size (PIL's ``resize`` returns a copy)."""
    from .pillow_resize import A1111_PILLOW
    from .resampling import resample

    if tuple(image.shape[1:]) == tuple(size):
        return image
    return resample(image, size, interpolation="lanczos", bounds=bounds, pillow=A1111_PILLOW)


def _paste(canvas: Tensor, piece: Tensor, top: int, left: int) -> None:
    """PIL's ``paste(piece, box=(left, top))`` onto ``canvas`` (C, H, W), clipped at its edges (in place)."""
    _, H, W = canvas.shape
    _, h, w = piece.shape
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + h, H), min(left + w, W)
    if y1 > y0 and x1 > x0:
        canvas[:, y0:y1, x0:x1] = piece[:, y0 - top:y1 - top, x0 - left:x1 - left]


def _edge(piece: Tensor, dim: int, last: bool) -> Tensor:
    """The band a zero-size box at one edge of ``piece`` (C, h, w) resizes to (PIL bicubic): ``1.125·edge −
    0.125·next`` along ``dim`` (1: rows, 2: columns), kept as a size-1 slice along it."""
    n = piece.shape[dim]
    edge = piece.narrow(dim, n - 1 if last else 0, 1)
    if n == 1:
        return edge
    return 1.125 * edge - 0.125 * piece.narrow(dim, n - 2 if last else 1, 1)


def a1111_resize(image: Tensor, size: tuple[int, int], *, mode: str = "just",
                 bounds: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """``image`` (C, h, w) brought to ``size`` = (H, W) by A1111's resize ``mode`` (see the module) -> (C, H, W).

    Raises:
        ValueError: an unknown mode or a size below 1.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(RESIZE_MODES)}, got {mode!r}")
    H, W = (int(v) for v in size)
    if H < 1 or W < 1:
        raise ValueError(f"size must be at least 1 x 1, got {size}")
    if mode == "just":
        return _scaled(image, (H, W), bounds)
    _, h, w = image.shape
    ratio, src_ratio = W / H, w / h
    if mode == "crop":
        src_w = W if ratio > src_ratio else w * H // h
        src_h = H if ratio <= src_ratio else h * W // w
    else:
        src_w = W if ratio < src_ratio else w * H // h
        src_h = H if ratio >= src_ratio else h * W // w
    resized = _scaled(image, (src_h, src_w), bounds)
    canvas = torch.full((image.shape[0], H, W), float(bounds[0]), dtype=resized.dtype, device=resized.device)
    top, left = H // 2 - src_h // 2, W // 2 - src_w // 2
    _paste(canvas, resized, top, left)
    if mode == "fill":
        if ratio < src_ratio and top > 0:  # bands above and below, each `top` rows
            _paste(canvas, _edge(resized, 1, False).clamp(*bounds).expand(-1, top, -1), 0, 0)
            _paste(canvas, _edge(resized, 1, True).clamp(*bounds).expand(-1, top, -1), top + src_h, 0)
        elif ratio > src_ratio and left > 0:  # bands left and right, each `left` columns
            _paste(canvas, _edge(resized, 2, False).clamp(*bounds).expand(-1, -1, left), 0, 0)
            _paste(canvas, _edge(resized, 2, True).clamp(*bounds).expand(-1, -1, left), 0, left + src_w)
    return canvas


def open_init_image(path: str | os.PathLike, *, option: str = "--init-image"):
    """The init image at ``path`` as A1111's img2img tab hands it over (Gradio's ``image_mode="RGBA"``: PIL's
    ``convert("RGBA")``, a palette's transparency included) and ``images.flatten`` with the default
    ``img2img_background_color`` white takes it, after ``images.fix_image`` turned it upright by its EXIF
    orientation (a phone photo): pasted through its own alpha on an opaque white RGBA canvas, then
    ``convert("RGB")`` — 8-bit throughout, PIL's calls themselves. Returns a PIL RGB image of the file's size.

    Raises:
        ImportError: no Pillow (``pip install pillow``).
        ValueError: a file PIL cannot read as an image (the message names ``option`` and the file).
    """
    try:
        from PIL import Image, ImageOps
    except ImportError:
        raise ImportError(f"{option} {path}: reading it as A1111 does needs Pillow (pip install pillow)") from None
    try:
        with Image.open(path) as opened:  # (turned upright by its EXIF orientation: A1111's images.fix_image)
            rgba = ImageOps.exif_transpose(opened.convert("RGBA"))
    except OSError as exc:  # (PIL's UnidentifiedImageError and truncated files)
        raise ValueError(f"{option} {path}: unreadable image ({exc}); give a PNG, JPEG or WebP image") from None
    background = Image.new("RGBA", rgba.size, "#ffffff")
    background.paste(rgba, mask=rgba)
    return background.convert("RGB")


def pil_pixels(image) -> Tensor:
    """A PIL RGB image (W x H) -> (3, H, W) float32 in [-1, 1], in A1111's float32 steps:
    ``np.array(image).astype(np.float32) / 255.0``, then ``· 2 − 1`` where the VAE (``images_tensor_to_samples``)
    and the image conditioning take it."""
    import numpy as np

    unit = torch.from_numpy(np.asarray(image).astype(np.float32) / 255.0)  # (H, W, 3) in [0, 1]
    return (unit * 2 - 1).permute(2, 0, 1).contiguous()


def latent_resize(latents: Tensor, size: tuple[int, int]) -> Tensor:
    """A1111's "Just resize (latent upscale)": the init image's latents (B, C, h, w), encoded at the image's own
    size, brought to the latent ``size`` = (H/8, W/8) by ``F.interpolate(mode="bilinear")`` (corners not aligned;
    ``StableDiffusionProcessingImg2Img.init``: ``interpolate(self.init_latent, size=(height // 8, width // 8))``).
    Returns (B, C, *size) in ``latents``' dtype."""
    return torch.nn.functional.interpolate(latents, size=tuple(int(v) for v in size), mode="bilinear")


def init_image_pixels(path: str | os.PathLike, size: tuple[int, int], *, mode: str = "just",
                      option: str = "--init-image") -> Tensor:
    """The init image file at ``path`` brought to ``size`` = (H, W) by A1111's resize ``mode`` -> (3, H, W) float32
    in [-1, 1]: the pixels A1111's img2img encodes (``StableDiffusionProcessingImg2Img.init`` without a mask:
    :func:`open_init_image`, :func:`sdadapt.inpaint_crop.resize_image`, :func:`pil_pixels`), bit for bit.
    ``mode`` :data:`LATENT_RESIZE`: the image at its own size (3, h, w), as A1111 encodes it there (its latents are
    then resized: :func:`latent_resize`).

    Without Pillow: the float path (:func:`sdadapt.images.read_image`, which reads 8-bit PNGs without it, and
    :func:`a1111_resize`), within ~3 levels of 8 bits of A1111's pixels.

    Raises:
        ValueError: an unknown mode, a size below 1, a mode that scales a side of the image to 0 pixels, an
            unreadable file (or, without Pillow, a file other than an 8-bit PNG: the message says to install it).
    """
    if mode not in IMG2IMG_RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {', '.join(IMG2IMG_RESIZE_MODES)}, got {mode!r}")
    H, W = (int(v) for v in size)
    try:
        import PIL.Image  # noqa: F401  (optional)
    except ImportError:  # (the float path: read_image says what needs Pillow)
        from .images import read_image

        image = read_image(path)
        return image if mode == LATENT_RESIZE else a1111_resize(image, (H, W), mode=mode)
    if mode == LATENT_RESIZE:
        return pil_pixels(open_init_image(path, option=option))
    from .inpaint_crop import resize_image

    return pil_pixels(resize_image(open_init_image(path, option=option), W, H, mode=mode))
