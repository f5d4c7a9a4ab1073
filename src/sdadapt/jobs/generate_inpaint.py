"""``generate --init-image IMG --mask MASK``: A1111's img2img inpaint tab ("Inpaint whole picture") from files —
the mask read and prepared, the init image filled and encoded, the latent mask and an inpainting model's image
conditioning (:mod:`sdadapt.inpaint` holds the rules)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["InpaintInputs", "check_inpaint_options", "inpaint_inputs"]


@dataclass(frozen=True)
class InpaintInputs:
    """What one inpainting run samples from: ``init`` (1, C, h, w) the init image's latent, ``latmask`` (1, 1, h, w)
    A1111's latent mask (1 = repaint), ``conditioning`` (1, 5, h, w) an inpainting model's ``c_concat`` (``None``
    for a plain model), ``fill`` the ``--inpainting-fill``; ``original`` / ``mask``: the init image (PIL RGB, at the
    output size, before any fill) and the prepared mask (PIL ``L``) for the final overlay."""

    init: Tensor
    latmask: Tensor
    conditioning: Tensor | None
    fill: str
    original: object = None
    mask: object = None

    def overlay(self, image: Tensor) -> Tensor:
        """A1111's final overlay (:func:`sdadapt.inpaint.overlay_original`) on a generated image (3, H, W) in
        [-1, 1], 8-bit as the PNG will be; returns (3, H, W) in [-1, 1]."""
        from ..inpaint import overlay_original

        if self.original is None:
            return image
        return _tensor(overlay_original(_pil(image), self.original, self.mask)).to(image)

    def init_latents(self, seed: int) -> Tensor:
        """The init latent of the image of ``seed`` under :attr:`fill` (``latent-noise``: the unit noise of
        ``torch.Generator().manual_seed(seed)``, the start noise ``generate`` draws for that seed)."""
        from ..inpaint import fill_latent

        noise = None
        if self.fill == "latent-noise":
            noise = torch.randn(self.init.shape, generator=torch.Generator().manual_seed(seed)).to(self.init)
        return fill_latent(self.init, self.latmask, self.fill, noise)

    def generate_options(self) -> dict:
        """:func:`sdadapt.sampling.generate`'s inpainting keywords."""
        return {"inpaint_mask": self.latmask, "inpaint_conditioning": self.conditioning}


def check_inpaint_options(*, mask: str | os.PathLike | None, init_image, mask_blur: float | None, invert_mask: bool,
                          inpainting_fill: str, inpainting_mask_weight: float) -> None:
    """The inpainting options, checked before any loading.

    Raises:
        ValueError: ``--mask`` without ``--init-image``, a mask option without ``--mask``, a negative blur, an unknown
            fill, a weight outside [0, 1].
        FileNotFoundError: no mask file.
    """
    from ..inpaint import check_inpainting_fill, check_mask_weight

    if mask is None:
        if mask_blur is not None or invert_mask or inpainting_fill != "original" or inpainting_mask_weight != 1.0:
            raise ValueError("--mask-blur / --invert-mask / --inpainting-fill / --inpainting-mask-weight shape a "
                             "--mask: give one")
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
    if mask_blur is not None and mask_blur < 0:
        raise ValueError(f"--mask-blur must be >= 0, got {mask_blur}")
    check_inpainting_fill(inpainting_fill)
    check_mask_weight(inpainting_mask_weight)


def _pil(image: Tensor):
    """(3, H, W) in [-1, 1] -> a PIL RGB image (A1111 works on 8-bit images)."""
    import numpy as np
    from PIL import Image

    array = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def _tensor(image) -> Tensor:
    """A PIL RGB image -> (3, H, W) float32 in [-1, 1]."""
    import numpy as np

    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def inpaint_inputs(system, image_path: str | os.PathLike, mask_path: str | os.PathLike, *, height: int, width: int,
                   mask_blur: float = 4.0, invert_mask: bool = False, inpainting_fill: str = "original",
                   inpainting_mask_weight: float = 1.0, resize_mode: str = "just") -> InpaintInputs:
    """A1111's ``StableDiffusionProcessingImg2Img.init`` for "Inpaint whole picture": the mask made binary
    (an RGBA mask's alpha, ``> 128``; other masks their luminance), inverted (``invert_mask``), blurred
    (``mask_blur``, x and y), brought with the image to ``width`` x ``height`` by ``resize_mode`` (A1111's
    ``resize_image``: :func:`sdadapt.resize_modes.a1111_resize`); every ``inpainting_fill`` but ``"original"``: the
    masked pixels filled from around them (A1111's ``masking.fill``); the image encoded; the latent mask; an inpainting UNet's conditioning
    (``inpainting_mask_weight``, A1111's "Inpainting conditioning mask strength"); what the final overlay needs
    (:meth:`InpaintInputs.overlay`).

    Raises:
        FileNotFoundError: no such image or mask.
        ValueError: a UNet neither plain nor an inpainting one.
    """
    from PIL import Image

    from .. import inpaint
    from ..images import read_image
    from ..resize_modes import a1111_resize

    for flag, path in (("--init-image", image_path), ("--mask", mask_path)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such image file")
    with Image.open(mask_path) as opened:
        mask = inpaint.binary_mask(opened)  # (RGBA: its alpha; LA/PA/L/RGB: luminance, as A1111's convert("L"))
    if invert_mask:
        mask = inpaint.invert_mask(mask)
    if mask_blur > 0:
        import numpy as np

        blurred = inpaint.blur_mask(torch.from_numpy(np.asarray(mask, dtype=np.float32)), x=mask_blur, y=mask_blur)
        mask = Image.fromarray(blurred.to(torch.uint8).numpy(), "L")
    if mask.size != (width, height) and resize_mode == "just":
        mask = mask.resize((width, height), resample=Image.LANCZOS)
    elif mask.size != (width, height):  # (A1111 resizes the mask with the image's resize mode)
        import numpy as np

        pixels = torch.from_numpy(np.asarray(mask, dtype=np.float32))[None] / 127.5 - 1.0  # (1, h, w)
        pixels = a1111_resize(pixels, (height, width), mode=resize_mode)
        mask = Image.fromarray(((pixels[0] + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy(), "L")
    image = read_image(image_path)
    if tuple(image.shape[1:]) != (height, width):
        image = a1111_resize(image, (height, width), mode=resize_mode)
    original = _pil(image)
    if inpainting_fill != "original":  # (A1111's masking.fill for fill, latent noise and latent nothing)
        image = _tensor(inpaint.fill_masked_pixels(_pil(image), mask))
    device = system.alphas_cumprod.device
    with torch.no_grad():
        init = system.encode_images(image[None].to(device)).float()
    latmask = inpaint.latent_mask(mask, tuple(init.shape[-2:])).to(device)
    conditioning = None
    unet = getattr(system, "unet", None)
    if unet is not None and inpaint.check_inpainting_unet(int(unet.config.in_channels),
                                                          int(system.vae.config.latent_channels)):
        import numpy as np

        pixel_mask = inpaint.conditioning_mask(torch.from_numpy(np.asarray(mask, dtype=np.float32)))
        masked = inpaint.masked_image(image[None], pixel_mask, inpainting_mask_weight)
        conditioning = system.inpainting_conditioning(masked, pixel_mask).float()
    return InpaintInputs(init, latmask, conditioning, inpainting_fill, original=original, mask=mask)
