"""``generate --init-image IMG --mask MASK``: A1111's img2img inpaint tab ("Inpaint whole picture", and "Only
masked" with ``--inpaint-full-res``) from files — the mask read and prepared, the init image (or its masked part)
filled and encoded, the latent mask, an inpainting model's image conditioning and the final overlay
(:mod:`sdadapt.inpaint` and :mod:`sdadapt.inpaint_crop` hold the rules)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ..samplers.a1111_noise import A1111Seeds

__all__ = ["InpaintInputs", "check_inpaint_options", "img2img_conditioning", "inpaint_inputs"]


@dataclass(frozen=True)
class InpaintInputs:
    """What one inpainting run samples from: ``init`` (1, C, h, w) the init image's latent, ``latmask`` (1, 1, h, w)
    A1111's latent mask (1 = repaint), ``conditioning`` (1, 5, h, w) an inpainting model's ``c_concat`` (``None``
    for a plain model), ``fill`` the ``--inpainting-fill``; ``original`` / ``mask``: the init image (PIL RGB, before
    any fill) and the prepared mask (PIL ``L``) for the final overlay — at the output size ("Whole picture"), or at
    the init image's own size with ``region`` the (x1, y1, x2, y2) box that was inpainted ("Only masked",
    :mod:`sdadapt.inpaint_crop`; A1111's ``paste_to``)."""

    init: Tensor
    latmask: Tensor
    conditioning: Tensor | None
    fill: str
    original: object = None
    mask: object = None
    region: tuple[int, int, int, int] | None = None

    def overlay(self, image: Tensor) -> Tensor:
        """A1111's final overlay on a generated image (3, H, W) in [-1, 1], 8-bit as the PNG will be: "Whole
        picture": :func:`sdadapt.inpaint.overlay_original`, (3, H, W); "Only masked": the image pasted back into
        the init image (:func:`sdadapt.inpaint_crop.paste_back`), (3, H0, W0) at the init image's size. Returns
        [-1, 1]."""
        from ..inpaint import overlay_original
        from ..inpaint_crop import paste_back

        if self.original is None:
            return image
        if self.region is not None:
            return _tensor(paste_back(image, original=self.original, mask=self.mask, region=self.region)).to(image)
        return _tensor(overlay_original(_pil(image), self.original, self.mask)).to(image)

    def init_latents(self, seed: int, noise: A1111Seeds | None = None) -> Tensor:
        """The init latent of the image of ``seed`` under :attr:`fill`. ``latent-noise``: A1111's
        ``create_random_tensors`` of the seed — with ``noise`` (an :class:`~sdadapt.samplers.a1111_noise.A1111Seeds`:
        ``--noise a1111``/``a1111-cpu``) the first draw of a generator newly seeded with ``seed`` from its source,
        without variation seed or seed resize (A1111 passes it the seeds alone); without it the unit noise of
        ``torch.Generator().manual_seed(seed)``, the start noise ``generate`` draws for that seed."""
        from ..inpaint import fill_latent

        draw = None
        if self.fill == "latent-noise" and noise is not None:
            from ..samplers.a1111_noise import randn_local

            draw = randn_local(seed, self.init.shape[1:], source=noise.source)[None].to(self.init)
        elif self.fill == "latent-noise":
            draw = torch.randn(self.init.shape, generator=torch.Generator().manual_seed(seed)).to(self.init)
        return fill_latent(self.init, self.latmask, self.fill, draw)

    def generate_options(self) -> dict:
        """:func:`sdadapt.sampling.generate`'s inpainting keywords."""
        return {"inpaint_mask": self.latmask, "inpaint_conditioning": self.conditioning}


def check_inpaint_options(*, mask: str | os.PathLike | None, init_image, mask_blur: float | None, invert_mask: bool,
                          inpainting_fill: str, inpainting_mask_weight: float, inpaint_full_res: bool = False,
                          inpaint_full_res_padding: int | None = None) -> None:
    """The inpainting options, checked before any loading.

    Raises:
        ValueError: ``--mask`` without ``--init-image``, a mask option without ``--mask`` (``--inpainting-mask-weight``
            alone needs an ``--init-image``: A1111's txt2img conditioning has no weight), the padding without
            ``--inpaint-full-res`` or negative, a negative blur, an unknown fill, a weight outside [0, 1]; with
            ``--inpaint-full-res``, a mask of another size than the init image. (``--resize-mode`` is taken with
            ``--inpaint-full-res``, as A1111 takes it: the crop is fitted by "Resize and fill" whatever the mode, which
            brings the image to the size only when the mask is blank and the run falls back to plain img2img.)
        FileNotFoundError: no mask file.
    """
    from ..inpaint import check_inpainting_fill, check_mask_weight

    if inpaint_full_res_padding is not None and not inpaint_full_res:
        raise ValueError("--inpaint-full-res-padding is the margin of --inpaint-full-res (A1111's 'Only masked "
                         "padding'): add --inpaint-full-res, or leave the padding out")
    if inpaint_full_res_padding is not None and inpaint_full_res_padding < 0:
        raise ValueError(f"--inpaint-full-res-padding must be >= 0 pixels, got {inpaint_full_res_padding}")
    if mask is None:
        if mask_blur is not None or invert_mask or inpainting_fill != "original" or inpaint_full_res:
            raise ValueError("--mask-blur / --invert-mask / --inpainting-fill / --inpaint-full-res shape a "
                             "--mask: give one")
        if inpainting_mask_weight != 1.0 and init_image is None:
            raise ValueError("--inpainting-mask-weight weighs an inpainting model's image conditioning of an "
                             "--init-image (A1111's txt2img conditioning is a grey image, without a weight): give "
                             "--init-image, or leave the weight out")
        check_mask_weight(inpainting_mask_weight)
        return
    if init_image is None:
        raise ValueError("--mask inpaints an --init-image: give the image too")
    if not Path(mask).is_file():
        raise FileNotFoundError(f"--mask {mask}: no such image file")
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("--mask reads the mask with Pillow: pip install pillow") from None
    try:
        with Image.open(mask) as opened:
            opened.verify()
    except Exception as exc:  # (PIL raises several kinds for a file that is no image)
        raise ValueError(f"--mask {mask}: not an image PIL can read ({exc}); give a PNG, JPEG or WebP mask") from None
    if inpaint_full_res and Path(init_image).is_file():
        try:
            with Image.open(mask) as opened_mask, Image.open(init_image) as opened_image:
                sizes = opened_mask.size, opened_image.size
        except Exception:  # (an unreadable --init-image is refused where it is read, with its own message)
            sizes = None
        if sizes is not None:
            _check_same_size(*sizes, mask)
    if mask_blur is not None and mask_blur < 0:
        raise ValueError(f"--mask-blur must be >= 0, got {mask_blur}")
    check_inpainting_fill(inpainting_fill)
    check_mask_weight(inpainting_mask_weight)


def _check_same_size(mask_size: tuple[int, int], image_size: tuple[int, int], mask_path) -> None:
    """``--inpaint-full-res`` cuts the region out of mask and image at the same place: sizes (width, height) must match.

    Raises:
        ValueError: the sizes differ (naming both and the mask file).
    """
    if tuple(mask_size) != tuple(image_size):
        raise ValueError(f"--inpaint-full-res: the mask {mask_path} is {mask_size[0]}x{mask_size[1]}, the "
                         f"--init-image {image_size[0]}x{image_size[1]}; the masked region is cut out of both "
                         "at the same place, so give a mask of the image's size")


def _pil(image: Tensor):
    """(3, H, W) in [-1, 1] -> a PIL RGB image (A1111 works on 8-bit images)."""
    import numpy as np
    from PIL import Image

    from ..images import to_uint8

    return Image.fromarray(np.ascontiguousarray(to_uint8(image)), "RGB")


def _tensor(image) -> Tensor:
    """A PIL RGB image -> (3, H, W) float32 in [-1, 1]."""
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def _resized_mask(mask, size: tuple[int, int], mode: str):
    """The PIL ``L`` ``mask`` brought to ``size`` = (height, width) by A1111's ``resize_image`` of ``mode`` (``just``:
    PIL's Lanczos as A1111 resizes an ``L`` image; the others through :func:`sdadapt.resize_modes.a1111_resize`)."""
    import numpy as np
    from PIL import Image

    from ..resize_modes import a1111_resize

    height, width = size
    if mask.size == (width, height):
        return mask
    if mode == "just":
        return mask.resize((width, height), resample=Image.LANCZOS)
    pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None] / 127.5 - 1.0  # (1, h, w)
    pixels = a1111_resize(pixels, (height, width), mode=mode)
    return Image.fromarray(((pixels[0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy(), "L")


def _prepared_mask(mask_path, *, mask_blur: float, invert_mask: bool):
    """A1111's mask preparation at the mask's own size: made binary (an RGBA mask's alpha, ``> 128``; other masks
    their luminance), inverted (``invert_mask``), blurred (``mask_blur``, x and y). Returns a PIL ``L`` image."""
    import numpy as np
    from PIL import Image

    from .. import inpaint

    with Image.open(mask_path) as opened:
        mask = inpaint.binary_mask(opened)  # (RGBA: its alpha; LA/PA/L/RGB: luminance, as A1111's convert("L"))
    if invert_mask:
        mask = inpaint.invert_mask(mask)
    if mask_blur > 0:
        blurred = inpaint.blur_mask(torch.from_numpy(np.asarray(mask, dtype=np.float32)), x=mask_blur, y=mask_blur)
        mask = Image.fromarray(blurred.to(torch.uint8).numpy(), "L")
    return mask


def inpaint_inputs(system, image_path: str | os.PathLike, mask_path: str | os.PathLike, *, height: int, width: int,
                   mask_blur: float = 4.0, invert_mask: bool = False, inpainting_fill: str = "original",
                   inpainting_mask_weight: float = 1.0, resize_mode: str = "just", inpaint_full_res: bool = False,
                   inpaint_full_res_padding: int = 32) -> InpaintInputs | None:
    """A1111's ``StableDiffusionProcessingImg2Img.init`` for the inpaint tab: the mask prepared (made binary, inverted,
    blurred: :func:`_prepared_mask`); "Whole picture": mask and image brought to ``width`` x ``height`` by
    ``resize_mode`` (A1111's ``resize_image``: :func:`sdadapt.resize_modes.a1111_resize`); "Only masked"
    (``inpaint_full_res``): the region around the prepared mask's non-zero pixels, ``inpaint_full_res_padding``
    pixels wider and grown to the generation's aspect (:func:`sdadapt.inpaint_crop.only_masked_region`), cut out of
    mask and image and fitted to ``width`` x ``height`` by "Resize and fill". Then every ``inpainting_fill`` but
    ``"original"``: the masked pixels filled from around them (A1111's ``masking.fill``); the image encoded; the
    latent mask; an inpainting UNet's conditioning (``inpainting_mask_weight``, A1111's "Inpainting conditioning mask
    strength"); what the final overlay needs (:meth:`InpaintInputs.overlay`).

    Returns ``None`` for "Only masked" with a blank prepared mask: A1111 then says "Unable to perform Inpaint Only
    mask because mask is blank" and runs plain img2img (:func:`img2img_conditioning` and the job's img2img path).

    Raises:
        FileNotFoundError: no such image or mask.
        ValueError: a UNet neither plain nor an inpainting one; "Only masked" with a mask of another size than the
            image.
    """
    import numpy as np

    from .. import inpaint
    from ..images import read_image
    from ..inpaint_crop import only_masked_region
    from ..resize_modes import a1111_resize

    for flag, path in (("--init-image", image_path), ("--mask", mask_path)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such image file")
    mask = _prepared_mask(mask_path, mask_blur=mask_blur, invert_mask=invert_mask)
    image = read_image(image_path)  # (3, H0, W0) in [-1, 1]
    region = None
    if inpaint_full_res:
        _check_same_size(mask.size, (image.shape[2], image.shape[1]), mask_path)
        region = only_masked_region(torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()),
                                    padding=inpaint_full_res_padding, width=width, height=height)
        if region is None:
            return None
        original, overlay_mask = _pil(image), mask  # (A1111's mask_for_overlay: the blurred mask, not doubled)
        x1, y1, x2, y2 = region
        mask = _resized_mask(mask.crop(region), (height, width), "fill")
        image = a1111_resize(image[:, y1:y2, x1:x2], (height, width), mode="fill")
    else:
        mask = _resized_mask(mask, (height, width), resize_mode)  # (A1111 resizes the mask with the image's mode)
        if tuple(image.shape[1:]) != (height, width):
            image = a1111_resize(image, (height, width), mode=resize_mode)
        original, overlay_mask = _pil(image), mask
    if inpainting_fill != "original":  # (A1111's masking.fill for fill, latent noise and latent nothing)
        image = _tensor(inpaint.fill_masked_pixels(_pil(image), mask))
    device = system.alphas_cumprod.device
    with torch.no_grad():
        init = system.encode_images(image[None].to(device)).float()
    latmask = inpaint.latent_mask(mask, tuple(init.shape[-2:])).to(device)
    conditioning = None
    if _is_inpainting_model(system):
        pixel_mask = inpaint.conditioning_mask(torch.from_numpy(np.asarray(mask, dtype=np.float32)))
        masked = inpaint.masked_image(image[None], pixel_mask, inpainting_mask_weight)
        conditioning = system.inpainting_conditioning(masked, pixel_mask).float()
    return InpaintInputs(init, latmask, conditioning, inpainting_fill, original=original, mask=overlay_mask,
                         region=region)


def _is_inpainting_model(system) -> bool:
    """Whether ``system``'s UNet takes an inpainting model's image conditioning (9 input channels on SD)."""
    from ..inpaint import check_inpainting_unet

    unet = getattr(system, "unet", None)
    if unet is None or not hasattr(system, "inpainting_conditioning"):  # (the toy: no image conditioning)
        return False
    return check_inpainting_unet(int(unet.config.in_channels), int(system.vae.config.latent_channels))


def img2img_conditioning(system, image_path: str | os.PathLike, *, height: int, width: int,
                         resize_mode: str = "just", inpainting_mask_weight: float = 1.0) -> Tensor | None:
    """An inpainting model's image conditioning for img2img without a mask (also "Only masked" with a blank mask):
    A1111's ``img2img_image_conditioning`` with ``image_mask=None`` — a mask of ones and the masked image
    ``lerp(image, 0, W) = image·(1 − W)`` (``W``: ``inpainting_mask_weight``; 1: all 0, the grey image of txt2img's
    conditioning), the image brought to ``width`` x ``height`` by ``resize_mode``. Returns (1, 5, h, w), or
    ``None`` for a plain model (whose img2img has no image conditioning).

    Raises:
        ValueError: a UNet neither plain nor an inpainting one, a weight outside [0, 1].
    """
    from .. import inpaint
    from ..images import read_image
    from ..resize_modes import a1111_resize

    if not _is_inpainting_model(system):
        return None
    image = read_image(image_path)
    if tuple(image.shape[1:]) != (height, width):
        image = a1111_resize(image, (height, width), mode=resize_mode)
    ones = torch.ones(1, 1, height, width)
    masked = inpaint.masked_image(image[None], ones, inpainting_mask_weight)
    return system.inpainting_conditioning(masked, ones).float()
