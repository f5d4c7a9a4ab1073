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
    from ..soft_inpainting import SoftInpainting

__all__ = ["InpaintInputs", "blur_sides", "check_inpaint_options", "img2img_conditioning", "img2img_pixels", "inpaint_inputs",
           "sampled_encodings"]


@dataclass(frozen=True)
class InpaintInputs:
    """What one inpainting run samples from: ``init`` (1, C, h, w) the init image's latent, ``latmask`` (1, 1, h, w)
    A1111's latent mask (1 = repaint), ``conditioning`` (1, 5, h, w) an inpainting model's ``c_concat`` (``None``
    for a plain model), ``fill`` the ``--inpainting-fill``; ``original`` / ``mask``: the init image (PIL RGB, before
    any fill) and the prepared mask (PIL ``L``) for the final overlay — at the output size ("Whole picture"), or at
    the init image's own size with ``region`` the (x1, y1, x2, y2) box that was inpainted ("Only masked",
    :mod:`sdadapt.inpaint_crop`; A1111's ``paste_to``). ``pixels`` (3, H, W) in [-1, 1]: the image that was encoded
    (resized or cut out, filled) — what A1111 hands ``img2img_image_conditioning`` (an SD 2.1 unCLIP model's image
    embedding is taken of it: :func:`sdadapt.unclip.unclip_image_of_pixels`). ``masked``: an inpainting model's
    masked image (1, 3, H, W) and pixel mask (1, 1, H, W) that ``conditioning`` encodes (``None`` for a plain model;
    ``--vae-encode sample`` encodes them again by a posterior sample: :func:`sampled_encodings`)."""

    init: Tensor
    latmask: Tensor
    conditioning: Tensor | None
    fill: str
    original: object = None
    mask: object = None
    region: tuple[int, int, int, int] | None = None
    pixels: Tensor | None = None
    masked: tuple[Tensor, Tensor] | None = None
    soft: SoftInpainting | None = None

    def overlay(self, image: Tensor, *, latents: Tensor | None = None, init: Tensor | None = None) -> Tensor:
        """A1111's final overlay on a generated image (3, H, W) in [-1, 1], 8-bit as the PNG will be: "Whole
        picture": :func:`sdadapt.inpaint.overlay_original`, (3, H, W); "Only masked": the image pasted back into
        the init image (:func:`sdadapt.inpaint_crop.paste_back`), (3, H0, W0) at the init image's size. With
        :attr:`soft` (soft inpainting) the mask composited through is its difference mask of the run's final
        ``latents`` (1, C, h, w) against the ``init`` latents sampled from (1, C, h, w: after the fill; ``None``:
        :attr:`init`) (:func:`sdadapt.soft_inpainting.difference_mask`, :func:`~sdadapt.soft_inpainting.
        overlay_mask`; "Only masked": brought back to the region by "Crop and resize" on black, A1111's
        ``uncrop``). Returns [-1, 1].

        Raises:
            ValueError: soft inpainting without the run's ``latents``.
        """
        from ..inpaint import composite_original, overlay_original
        from ..inpaint_crop import paste_back

        if self.original is None:
            return image
        mask = self.mask
        if self.soft is not None:
            if latents is None:
                raise ValueError("soft inpainting composites by how far the latents moved: pass the run's latents")
            mask = self._soft_mask(latents, self.init if init is None else init, width=int(image.shape[-1]),
                                   height=int(image.shape[-2]))
        if self.region is not None:
            return _tensor(paste_back(image, original=self.original, mask=mask, region=self.region)).to(image)
        combine = overlay_original if self.soft is None else composite_original  # (soft: its mask as it is)
        return _tensor(combine(_pil(image), self.original, mask)).to(image)

    def _soft_mask(self, latents: Tensor, init: Tensor, *, width: int, height: int):
        """Soft inpainting's ``mask_for_overlay``: a PIL ``L`` image at the output size, or (``region``) at the
        original's, the region's part resized into it on black."""
        from PIL import Image

        from ..inpaint_crop import crop_and_resize
        from ..soft_inpainting import difference_mask, overlay_mask

        mask = overlay_mask(difference_mask(init, latents, self.latmask, self.soft)[0], width=width, height=height)
        if self.region is None:
            return mask
        x1, y1, x2, y2 = self.region
        canvas = Image.new("L", self.original.size)
        canvas.paste(crop_and_resize(mask, x2 - x1, y2 - y1), (x1, y1))
        return canvas

    def init_latents(self, seed: int, noise: A1111Seeds | None = None, *, init: Tensor | None = None,
                     start: torch.Generator | None = None) -> Tensor:
        """The init latent of the image of ``seed`` under :attr:`fill`. ``latent-noise``: A1111's
        ``create_random_tensors`` of the seed — with ``noise`` (an :class:`~sdadapt.samplers.a1111_noise.A1111Seeds`:
        ``--noise a1111``/``a1111-cpu``) the first draw of a generator newly seeded with ``seed`` from its source,
        without variation seed or seed resize (A1111 passes it the seeds alone); without it the unit noise of
        ``torch.Generator().manual_seed(seed)``, the start noise ``generate`` draws for that seed. ``init``: the
        image's latent (1, C, h, w) in place of :attr:`init` (``--vae-encode sample``: a VAE posterior sample of
        :attr:`pixels` for this seed, :func:`sdadapt.jobs.generate_hires.seeded_encoding`); ``None``: :attr:`init`,
        the posterior mean. ``start``: the generator ``generate`` will draw the start noise from (``--vae-encode
        sample``: the seed's generator after the posterior sample, whose first draw that ε took); ``latent-noise``
        then draws from a copy of it, so that its noise is still the start noise, as A1111's fill (its
        ``create_random_tensors`` and its start noise are the same draw of the seed) and the mean encoding's are."""
        from ..inpaint import fill_latent

        init = self.init if init is None else init.to(self.init)

        draw = None
        if self.fill == "latent-noise" and noise is not None:
            from ..samplers.a1111_noise import randn_local

            draw = randn_local(seed, init.shape[1:], source=noise.source)[None].to(init)
        elif self.fill == "latent-noise":
            g = torch.Generator().manual_seed(seed)
            if start is not None:  # (the start noise's generator, untouched: its next draw, from a copy)
                g.set_state(start.get_state())
            draw = torch.randn(init.shape, generator=g).to(init)
        return fill_latent(init, self.latmask, self.fill, draw)

    def generate_options(self) -> dict:
        """:func:`sdadapt.sampling.generate`'s inpainting keywords."""
        soft = {} if self.soft is None else {"soft_inpainting": self.soft}
        return {"inpaint_mask": self.latmask, "inpaint_conditioning": self.conditioning, **soft}


def check_inpaint_options(*, mask: str | os.PathLike | None, init_image,
                          mask_blur: float | tuple[float, float] | None, invert_mask: bool,
                          inpainting_fill: str, inpainting_mask_weight: float, inpaint_full_res: bool = False,
                          inpaint_full_res_padding: int | None = None, hires: bool = False) -> None:
    """The inpainting options, checked before any loading. ``hires``: the run has a txt2img hires pass, whose
    conditioning takes ``--inpainting-mask-weight`` without an init image (A1111's ``sample_hr_pass``:
    :func:`sdadapt.jobs.generate_hires.hires_image_conditioning`).

    Raises:
        ValueError: ``--mask`` without ``--init-image``, a mask option without ``--mask`` (``--inpainting-mask-weight``
            alone needs an ``--init-image`` or the hires fix: A1111's txt2img conditioning has no weight), the padding without
            ``--inpaint-full-res`` or negative, a negative blur, an unknown fill, a weight outside [0, 1]. (A mask of
            another size than the init image is taken, as A1111 takes it: :func:`inpaint_inputs`. ``--resize-mode``
            is taken with ``--inpaint-full-res`` too: the crop is fitted by "Resize and fill" whatever the mode; the
            mode brings a mask of another size to the image's for the final overlay, and the image to the size when
            the mask is blank and the run falls back to plain img2img.)
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
        if inpainting_mask_weight != 1.0 and init_image is None and not hires:
            raise ValueError("--inpainting-mask-weight weighs an inpainting model's image conditioning of an "
                             "--init-image or of a txt2img hires pass (A1111's txt2img conditioning is a grey image, "
                             "without a weight): give --init-image or --hires-scale / --hires-width / --hires-height, "
                             "or leave the weight out")
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
    if mask_blur is not None and min(blur_sides(mask_blur)) < 0:
        raise ValueError(f"--mask-blur must be >= 0, got {mask_blur}")
    check_inpainting_fill(inpainting_fill)
    check_mask_weight(inpainting_mask_weight)


def _pil(image: Tensor):
    """(3, H, W) in [-1, 1] -> a PIL RGB image (A1111 works on 8-bit images)."""
    import numpy as np
    from PIL import Image

    from ..images import to_uint8

    return Image.fromarray(np.ascontiguousarray(to_uint8(image)), "RGB")


def _tensor(image) -> Tensor:
    """A PIL RGB image -> (3, H, W) float32 in [-1, 1], in A1111's float32 steps
    (:func:`sdadapt.resize_modes.pil_pixels`)."""
    from ..resize_modes import pil_pixels

    return pil_pixels(image)


def _init_image(path):
    """The ``--init-image`` as A1111 takes it: flattened on white, 8-bit (:func:`sdadapt.resize_modes.open_init_image`).
    Returns a PIL RGB image.

    Raises:
        ValueError: a file PIL cannot read as an image.
    """
    from ..resize_modes import open_init_image

    return open_init_image(path)


def blur_sides(mask_blur: float | tuple[float, float]) -> tuple[float, float]:
    """A mask blur as A1111's ``(mask_blur_x, mask_blur_y)``: one number is both (its "Mask blur" slider), a pair
    is each (Outpainting mk2 sets them apart)."""
    if isinstance(mask_blur, (tuple, list)):
        x, y = mask_blur
        return float(x), float(y)
    return float(mask_blur), float(mask_blur)


def _prepared_mask(mask_path, *, mask_blur: float | tuple[float, float], invert_mask: bool, rounded: bool = True):
    """A1111's mask preparation at the mask's own size: made binary (an RGBA mask's alpha, ``> 128``; ``rounded=False``,
    soft inpainting's: the alpha as it is; other masks their luminance), inverted (``invert_mask``), blurred
    (``mask_blur``: x and y, or a pair, :func:`blur_sides`). Returns a PIL ``L`` image."""
    import numpy as np
    from PIL import Image, ImageOps

    from .. import inpaint

    with Image.open(mask_path) as opened:  # (upright by its EXIF orientation, as A1111's images.fix_image)
        # (RGBA: its alpha; LA/PA/L/RGB: luminance, as A1111's convert("L"))
        mask = inpaint.binary_mask(ImageOps.exif_transpose(opened), rounded=rounded)
    if invert_mask:
        mask = inpaint.invert_mask(mask)
    blur_x, blur_y = blur_sides(mask_blur)
    if blur_x > 0 or blur_y > 0:
        blurred = inpaint.blur_mask(torch.from_numpy(np.asarray(mask, dtype=np.float32)), x=blur_x, y=blur_y)
        mask = Image.fromarray(blurred.to(torch.uint8).numpy(), "L")
    return mask


def inpaint_inputs(system, image_path: str | os.PathLike, mask_path: str | os.PathLike, *, height: int, width: int,
                   mask_blur: float | tuple[float, float] = 4.0, invert_mask: bool = False,
                   inpainting_fill: str = "original",
                   inpainting_mask_weight: float = 1.0, resize_mode: str = "just", inpaint_full_res: bool = False,
                   inpaint_full_res_padding: int = 32, soft_inpainting: SoftInpainting | None = None,
                   latent_mask: str | os.PathLike | None = None) -> InpaintInputs | None:
    """A1111's ``StableDiffusionProcessingImg2Img.init`` for the inpaint tab, on 8-bit PIL images as A1111 runs it.

    The mask is prepared at its own size (made binary, inverted, blurred: :func:`_prepared_mask`) and the init image
    flattened on white (:func:`_init_image`). "Whole picture": both brought to ``width`` x ``height`` by
    ``resize_mode`` (A1111's ``resize_image``: :func:`sdadapt.inpaint_crop.resize_image`, PIL's 8-bit result),
    whatever the mask's size. "Only masked" (``inpaint_full_res``): the region around the prepared mask's non-zero
    pixels, ``inpaint_full_res_padding`` pixels wider and grown to the generation's aspect
    (:func:`sdadapt.inpaint_crop.only_masked_region`), is found in the mask's pixels and cut out of mask and image
    at those coordinates (A1111 does not resize the mask to the image first: a mask of another size cuts the image
    where it says, PIL's ``crop`` padding black past the image's edge), and both are fitted to ``width`` x
    ``height`` by "Resize and fill"; the mask for the final overlay is the prepared one, brought to the image's size
    by ``resize_mode`` when the sizes differ (A1111's ``mask_for_overlay``), and the generated image is pasted back
    at the region's place (:meth:`InpaintInputs.overlay`). Then every ``inpainting_fill`` but ``"original"``: the
    masked pixels filled from around them (A1111's ``masking.fill``); the image encoded; the latent mask; an
    inpainting UNet's conditioning (``inpainting_mask_weight``, A1111's "Inpainting conditioning mask strength").

    ``soft_inpainting``: A1111's soft inpainting (its ``mask_round`` off: the RGBA mask's alpha and the latent mask
    not rounded; the blend and the final composite: :mod:`sdadapt.soft_inpainting`). ``latent_mask``: a mask file
    of the output size taken as it is — no blur, no resize — for the fill and the latent mask (A1111's
    ``p.latent_mask``, set by its Poor man's outpainting: :mod:`sdadapt.outpainting`); the prepared mask still makes
    the overlay and an inpainting model's conditioning.

    Returns ``None`` for "Only masked" with a blank prepared mask: A1111 then says "Unable to perform Inpaint Only
    mask because mask is blank" and runs plain img2img (:func:`img2img_conditioning` and the job's img2img path).

    Raises:
        FileNotFoundError: no such image or mask.
        ValueError: a UNet neither plain nor an inpainting one, an unreadable init image, a resize mode that
            scales a side to 0 pixels (:func:`sdadapt.inpaint_crop.resize_image`).
    """
    import numpy as np

    from .. import inpaint
    from ..inpaint_crop import only_masked_region, resize_image

    for flag, path in (("--init-image", image_path), ("--mask", mask_path)):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{flag} {path}: no such image file")
    rounded = soft_inpainting is None  # (soft inpainting turns A1111's mask_round off)
    mask = _prepared_mask(mask_path, mask_blur=mask_blur, invert_mask=invert_mask, rounded=rounded)  # PIL L
    image = _init_image(image_path)  # PIL RGB, the image's size
    region = None
    if inpaint_full_res:
        region = only_masked_region(torch.from_numpy(np.asarray(mask, dtype=np.uint8).copy()),
                                    padding=inpaint_full_res_padding, width=width, height=height)
        if region is None:
            return None
        overlay_mask = mask if mask.size == image.size else resize_image(mask, image.width, image.height,
                                                                         mode=resize_mode)
        original = image  # (the overlay: the init image at its own size; A1111's mask_for_overlay is not doubled)
        mask = resize_image(mask.crop(region), width, height, mode="fill")
        image = resize_image(image.crop(region), width, height, mode="fill")
    else:
        mask = resize_image(mask, width, height, mode=resize_mode)  # (A1111 resizes the mask with the image's mode)
        image = resize_image(image, width, height, mode=resize_mode)
        original, overlay_mask = image, mask
    latent = mask  # (A1111's latent_mask: p.latent_mask when given, else the prepared mask)
    if latent_mask is not None:
        from PIL import Image

        with Image.open(latent_mask) as opened:
            latent = opened.convert("L")
    if inpainting_fill != "original":  # (A1111's masking.fill for fill, latent noise and latent nothing)
        image = inpaint.fill_masked_pixels(image, latent)
    pixels = _tensor(image)  # (3, height, width) in [-1, 1]
    device = system.alphas_cumprod.device
    with torch.no_grad():
        init = system.encode_images(pixels[None].to(device)).float()
    latmask = inpaint.latent_mask(latent, tuple(init.shape[-2:]), rounded=rounded).to(device)
    conditioning = masked = None
    if _is_inpainting_model(system):
        pixel_mask = inpaint.conditioning_mask(torch.from_numpy(np.asarray(mask, dtype=np.float32)))
        masked = (inpaint.masked_image(pixels[None], pixel_mask, inpainting_mask_weight), pixel_mask)
        conditioning = system.inpainting_conditioning(*masked).float()
    return InpaintInputs(init, latmask, conditioning, inpainting_fill, original=original, mask=overlay_mask,
                         region=region, pixels=pixels, masked=masked, soft=soft_inpainting)


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
    conditioning), the image brought to ``width`` x ``height`` by ``resize_mode`` — the pixels the init image's VAE
    encoding takes, A1111's bit for bit (:func:`sdadapt.resize_modes.init_image_pixels`; A1111 hands
    ``img2img_image_conditioning`` the same ``image * 2 − 1``). Returns (1, 5, h, w), or ``None`` for a plain model
    (whose img2img has no image conditioning).

    Raises:
        ValueError: a UNet neither plain nor an inpainting one, a weight outside [0, 1], an unreadable image, a
            resize mode that scales a side to 0 pixels.
    """
    if not _is_inpainting_model(system):
        return None
    _, masked = img2img_pixels(system, image_path, height=height, width=width, resize_mode=resize_mode,
                               inpainting_mask_weight=inpainting_mask_weight)
    return system.inpainting_conditioning(*masked).float()


def img2img_pixels(system, image_path: str | os.PathLike, *, height: int, width: int, resize_mode: str = "just",
                   inpainting_mask_weight: float = 1.0) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """The pixels an img2img run without a mask encodes: ``(image, masked)`` — the init image (1, 3, H, W) in
    [-1, 1] brought to ``width`` x ``height`` by ``resize_mode`` (:func:`sdadapt.resize_modes.init_image_pixels`,
    what :func:`sdadapt.jobs.generate_hires.init_latents_from_image` encodes) and, on an inpainting model, the masked
    image ``image·(1 − W)`` (1, 3, H, W) with its mask of ones (1, 1, H, W) that :func:`img2img_conditioning`
    encodes; ``None`` on a plain model.

    ``resize_mode`` ``latent``: the image at its own size (its latents are resized after the encoding:
    :func:`sdadapt.jobs.generate_hires.sized_init_latents`).

    Raises:
        ValueError: a UNet neither plain nor an inpainting one, a weight outside [0, 1], an unreadable image, a
            resize mode that scales a side to 0 pixels, ``latent`` on an inpainting model with an image of another
            size (A1111 fails there: its conditioning is the image's size, its latents the generation's).
    """
    from .. import inpaint
    from ..resize_modes import LATENT_RESIZE, init_image_pixels

    image = init_image_pixels(image_path, (height, width), mode=resize_mode)[None]
    if not _is_inpainting_model(system):
        return image, None
    if resize_mode == LATENT_RESIZE and tuple(image.shape[-2:]) != (height, width):
        raise ValueError(f"--resize-mode latent on an inpainting model: the image is {image.shape[-1]}x"
                         f"{image.shape[-2]}, the run {width}x{height}; A1111 builds the model's image conditioning "
                         "at the image's size and fails joining it to the resized latents — resize the image to the "
                         "run's size first, or use --resize-mode just / crop / fill")
    ones = torch.ones(1, 1, height, width)
    return image, (inpaint.masked_image(image, ones, inpainting_mask_weight), ones)


def sampled_encodings(system, pixels: Tensor, *, seed: int, a1111_noise: bool,
                      masked: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, dict, torch.Generator | None]:
    """``--vae-encode sample`` for the image of ``seed`` of an img2img or inpainting run: ``pixels`` (1, 3, H, W) in
    [-1, 1] encoded by a VAE posterior sample and, on an inpainting model (``masked``: its masked image (1, 3, H, W)
    and pixel mask (1, 1, H, W), :attr:`InpaintInputs.masked` / :func:`img2img_pixels`), the masked image too, all
    from the generator :func:`sdadapt.img2img.init_generator` gives (:func:`sdadapt.jobs.generate_hires.
    seeded_encoding`).

    The draws follow diffusers' inpaint pipelines (``pipeline_stable_diffusion_inpaint.py`` and
    ``pipeline_stable_diffusion_xl_inpaint.py``, diffusers 0.42: ``prepare_latents`` encodes the image with the
    generator, ``_encode_vae_image`` → ``retrieve_latents``, then draws the start noise ``randn_tensor(shape,
    generator=generator)``; ``prepare_mask_latents`` then encodes the masked image with the same generator; the
    scheduler's noise comes after): the image's ε, the start noise, the masked image's ε, then the sampler noise.
    The start noise is therefore drawn here and handed to :func:`sdadapt.sampling.generate` as ``start_noise``, with
    the generator, which then draws only the sampler noise. On a plain model (``masked`` ``None``) the start noise is
    left to ``generate``, as diffusers' img2img pipelines draw it. With A1111's noise (``a1111_noise``) the start and
    sampler noise stay A1111's; the masked image's ε follows the image's on the same generator, A1111's order
    (``StableDiffusionProcessingImg2Img.init``: ``images_tensor_to_samples`` of the image, then
    ``img2img_image_conditioning`` encodes the masked image, both from its global RNG).

    Returns:
        ``(init, options, start)``: the init latents (1, C, h, w) float32; ``generate``'s options — ``generator``,
        ``start_noise`` (1, C, h, w) and ``inpaint_conditioning`` (1, 5, h, w), each where drawn; ``start``: a
        generator whose next draw is the start noise (``None`` with A1111's noise), for ``--inpainting-fill
        latent-noise`` (:meth:`InpaintInputs.init_latents`).

    Raises:
        ValueError: a system whose ``encode_images`` draws no posterior sample (the toy's).
    """
    from .generate_hires import seeded_encoding

    device = system.alphas_cumprod.device
    drawn: dict = {}

    def encode(g: torch.Generator) -> Tensor:
        init = system.encode_images(pixels.to(device), generator=g)
        if masked is not None:
            if not a1111_noise:  # (diffusers' randn_tensor on a CPU generator: drawn on the CPU, float32)
                drawn["start"] = g.get_state()
                drawn["start_noise"] = torch.randn(tuple(init.shape), generator=g)
            drawn["inpaint_conditioning"] = system.inpainting_conditioning(*masked, generator=g).float()
        return init

    shape = (1, *system.latent_shape(int(pixels.shape[-2]), int(pixels.shape[-1])))
    init, g = seeded_encoding(system, encode, seed=seed, a1111_noise=a1111_noise, latent_shape=shape)
    options = {k: v for k, v in drawn.items() if k != "start"}
    start = g
    if g is not None:
        options["generator"] = g
        if "start" in drawn:  # (a copy at the start noise: the generator itself has moved past it)
            start = torch.Generator().set_state(drawn["start"])
    return init, options, start
