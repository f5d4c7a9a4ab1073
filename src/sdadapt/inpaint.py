"""Inpainting: the mask, the latent mask and blends of A1111's inpaint tab, and the image conditioning of
inpainting checkpoints (a UNet with 9 input channels: sd-v1-5-inpainting and the models ``merge`` makes from it).

The rules, from AUTOMATIC1111's ``modules/processing.py`` (``StableDiffusionProcessingImg2Img.init``,
``create_binary_mask``, ``txt2img_image_conditioning``, ``inpainting_image_conditioning``),
``modules/masking.py`` (``fill``) and ``modules/sd_samplers_cfg_denoiser.py`` (``CFGDenoiser.forward``):

* the mask (white = repaint): :func:`binary_mask` (gray, ``> 128`` -> 255; an RGBA mask with transparency: its
  alpha), :func:`invert_mask` (``--invert-mask``: A1111's "Inpaint not masked"), :func:`blur_mask` (``--mask-blur``:
  A1111's ``cv2.GaussianBlur``, x then y, kernel ``2·int(2.5·σ + 0.5) + 1``, in OpenCV's 8-bit fixed point), all at
  the mask's own size, then resized as the init image (:func:`sdadapt.inpaint_crop.resize_image`);
* the latent mask ``latmask`` (:func:`latent_mask`): the mask resized to the latent size (PIL bicubic, as A1111's
  ``Image.resize``), / 255, rounded; A1111's ``nmask = latmask`` (repaint), ``mask = 1 − latmask`` (keep);
* a 4-channel model: :func:`blend_denoised` — A1111 blends the guided x̂0 after every model call,
  ``denoised = init·mask + nmask·denoised`` (the k-diffusion samplers), and for DDIM the model *input* before the
  call (``CFGDenoiserTimesteps.mask_before_denoising``); after sampling ``samples·nmask + init·mask``;
  :func:`masked_model` is that rule as a model wrapper for :func:`sdadapt.samplers.sample_latents`;
* ``--inpainting-fill`` (:data:`INPAINTING_FILLS`, A1111's ``inpainting_fill`` 0..3): what the masked area starts
  as: ``fill`` (:func:`fill_masked_pixels`, the image's colours blurred into it), ``original``, ``latent-noise``
  (the seed's noise in the latent), ``latent-nothing`` (zeros) (:func:`fill_latent`);
* the final overlay (:func:`overlay_original`, A1111's ``apply_overlay``): the original pixels pasted over the
  generated image outside the (blurred) mask;
* an inpainting model's ``c_concat`` (:func:`image_conditioning`): ``[mask (1), VAE(masked image) (4)]`` on the
  latent grid, concatenated to x before every UNet call (:func:`concat_conditioning`); the masked image is
  ``lerp(image, image·(1 − mask), inpainting_mask_weight)`` (:func:`masked_image`; A1111's "Inpainting conditioning
  mask strength", 1 = the image cut out); txt2img on an inpainting model (:func:`txt2img_masked_image`): a 0.5-grey
  image (0 in [-1, 1]) under a mask of ones — what diffusers' ``StableDiffusionInpaintPipeline`` gives for a mask of
  ones (its ``masked_image = image · (mask < 0.5)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .denoised_branches import ReadDenoised, denoised_of, read_at
from .sampler_tables import TIMESTEP_SAMPLERS

if TYPE_CHECKING:
    from .soft_inpainting import SoftInpainting

__all__ = [
    "INPAINTING_FILLS",
    "binary_mask",
    "blend_denoised",
    "blur_mask",
    "check_inpainting_fill",
    "check_mask_weight",
    "check_inpainting_unet",
    "composite_original",
    "concat_conditioning",
    "conditioning_mask",
    "fill_latent",
    "fill_masked_pixels",
    "image_conditioning",
    "invert_mask",
    "latent_mask",
    "masked_image",
    "masked_model",
    "overlay_layer",
    "overlay_original",
    "txt2img_masked_image",
]

#: ``--inpainting-fill`` -> A1111's ``inpainting_fill`` index ("fill", "original", "latent noise", "latent nothing")
INPAINTING_FILLS: dict[str, int] = {"fill": 0, "original": 1, "latent-noise": 2, "latent-nothing": 3}


# ----------------------------------------------------------------------------------------------- the mask (pixels)
def binary_mask(image, *, rounded: bool = True):
    """A1111's ``create_binary_mask`` (``mask_round``): a PIL mask -> an ``L`` image. An RGBA mask with any
    transparency is read from its alpha channel, made 0 / 255 (``> 128`` -> 255; ``rounded=False``, soft
    inpainting's: the alpha as it is); any other mask is its luminance as it is (A1111 rounds it only later, on the
    latent grid: :func:`latent_mask`)."""
    if image.mode == "RGBA" and image.getextrema()[-1] != (255, 255):
        alpha = image.split()[-1].convert("L")
        return alpha.point(lambda v: 255 if v > 128 else 0) if rounded else alpha
    return image.convert("L")


def invert_mask(image):
    """``--invert-mask`` (A1111's "Inpaint not masked", ``ImageOps.invert``): 255 − the ``L`` mask."""
    return image.point(lambda v: 255 - v)


def _gaussian_kernel(sigma: float, size: int | None = None) -> list[int]:
    """OpenCV's 8-bit ``GaussianBlur`` kernel for σ > 0 of odd ``size`` (default A1111's
    ``2·int(2.5·σ + 0.5) + 1``), in its fixed point (``getGaussianKernelBitExact``, then
    ``getGaussianKernelFixedPoint_ED``): the taps ``exp(−x²/(2σ²))`` normalised to sum 1 (float64), scaled by 256
    and rounded with the error carried from tap to tap (half to even), outer taps first, the centre ``256 − 2·Σ``
    the others. Returns ``size`` ints summing to 256."""
    n = 2 * int(2.5 * sigma + 0.5) + 1 if size is None else int(size)
    half = (n - 1) // 2
    scale = -0.125 / (sigma * sigma)  # (OpenCV's x runs over 1 − n, 3 − n, ...: twice the distance, so −0.5 / 4)
    values = [math.exp(float(x * x) * scale) for x in range(1 - n, -1, 2)]  # (half,) the outer taps, unnormalised
    total = 0.0
    for v in values:  # (OpenCV's own left-to-right sum)
        total += v
    inverse = 1.0 / (total * 2.0 + 1.0)
    taps, carried, err = [0] * n, 0, 0.0
    for i, v in enumerate(values):
        adjusted = v * inverse * 256.0 + err
        q = round(adjusted)  # (cvRound: half to even)
        err = adjusted - q
        taps[i] = taps[n - 1 - i] = q
        carried += q
    taps[half] = 256 - 2 * carried
    return taps


def _reflect_101(index: Tensor, size: int) -> Tensor:
    """OpenCV's ``borderInterpolate`` for ``BORDER_REFLECT_101`` (its ``BORDER_DEFAULT``): indices outside
    ``[0, size)`` reflected about the edge pixels, again and again for a kernel wider than the line; 0 for size 1."""
    if size == 1:
        return torch.zeros_like(index)
    index = index.clone()
    while True:
        low, high = index < 0, index >= size
        if not (low.any() or high.any()):
            return index
        index[low] = -index[low]
        index[high] = 2 * size - 2 - index[high]


def blur_mask(mask: Tensor, *, x: float, y: float) -> Tensor:
    """A1111's ``--mask-blur`` (``mask_blur_x``, ``mask_blur_y``): ``cv2.GaussianBlur(mask, (k, 1), σx)`` then
    ``cv2.GaussianBlur(mask, (1, k), σy)`` of the uint8 mask ``mask`` (H, W) (values 0..255, any dtype), bit for bit
    as OpenCV's 8-bit path computes it: each pass the integer sum ``Σ kᵢ·vᵢ`` with the fixed-point taps of
    :func:`_gaussian_kernel` (summing to 256), then ``(Σ + 128) >> 8``; borders ``BORDER_REFLECT_101``. σ 0 skips a
    pass. Returns (H, W) float32 in 0..255 (whole numbers).

    A kernel wider than the mask reflects again and again, as OpenCV's (``BORDER_REFLECT_101``).
    """
    out = mask.round().to(torch.int64)
    for sigma, dim in ((x, 1), (y, 0)):
        if sigma <= 0:
            continue
        taps = _gaussian_kernel(float(sigma))
        pad = len(taps) // 2
        size = out.shape[dim]
        acc = torch.zeros_like(out)
        for j, tap in enumerate(taps):
            if tap:
                index = _reflect_101(torch.arange(size) + (j - pad), size)
                acc += tap * out.index_select(dim, index)
        out = ((acc + 128) >> 8).clamp(0, 255)
    return out.float()


def conditioning_mask(mask: Tensor) -> Tensor:
    """An inpainting model's pixel mask (A1111's ``inpainting_image_conditioning``): the uint8 mask (1, 1, H, W) (or
    (H, W)) / 255, rounded to 0 / 1 (the model was trained on a discrete mask). Returns (1, 1, H, W) float32."""
    m = mask.float().reshape(1, 1, *mask.shape[-2:]) / 255.0
    return torch.round(m)


def latent_mask(mask, size: tuple[int, int], *, rounded: bool = True) -> Tensor:
    """A1111's ``latmask``: the PIL ``L`` mask (the init image's size) resized to the latent ``size`` = (h, w) as RGB
    with PIL's bicubic ``resize``, / 255, rounded (``mask_round``; ``rounded=False``, soft inpainting's: the
    fractions kept). Returns (1, 1, h, w) float32: 1 = repaint (A1111's ``nmask``), 0 = keep
    (``mask = 1 − latmask``)."""
    import numpy as np

    from .pillow_resize import resize_across_first

    small = resize_across_first(mask.convert("RGB"), (int(size[1]), int(size[0])))  # (A1111's Pillow 9.5)
    values = np.asarray(small, dtype=np.float32)[..., 0] / 255.0
    return torch.from_numpy((np.around(values) if rounded else values).copy())[None, None]


# --------------------------------------------------------------------------------------------- latents and blends
def blend_denoised(denoised: Tensor, init: Tensor, latmask: Tensor) -> Tensor:
    """A1111's blend: ``denoised·nmask + init·mask`` with ``nmask = latmask`` (1, 1 or C, h, w) and
    ``mask = 1 − latmask``; ``denoised``, ``init`` (B, C, h, w). Returns (B, C, h, w)."""
    latmask = latmask.to(device=denoised.device, dtype=denoised.dtype)
    return denoised * latmask + init.to(denoised) * (1 - latmask)


def check_inpainting_fill(fill: str) -> str:
    """``fill`` if it is one of :data:`INPAINTING_FILLS`.

    Raises:
        ValueError: another name, listing them.
    """
    if fill not in INPAINTING_FILLS:
        raise ValueError(f"--inpainting-fill must be one of {', '.join(INPAINTING_FILLS)}, got {fill!r}")
    return fill


def check_mask_weight(weight: float) -> float:
    """``weight`` (A1111's "Inpainting conditioning mask strength") as a float.

    Raises:
        ValueError: a weight outside [0, 1].
    """
    if not 0.0 <= float(weight) <= 1.0:
        raise ValueError(f"--inpainting-mask-weight must be in [0, 1], got {weight}")
    return float(weight)


def fill_latent(init: Tensor, latmask: Tensor, fill: str, noise: Tensor | None = None) -> Tensor:
    """The init latent (B, C, h, w) under ``--inpainting-fill`` (A1111's ``inpainting_fill``): ``latent-noise``:
    ``init·mask + noise·nmask`` (``noise`` (B, C, h, w): the seed's unit noise, A1111's ``create_random_tensors`` of
    the seeds), ``latent-nothing``: ``init·mask``; ``fill`` / ``original``: ``init`` (``fill`` works on the pixels:
    :func:`fill_masked_pixels`).

    Raises:
        ValueError: an unknown fill, or ``latent-noise`` without ``noise``.
    """
    check_inpainting_fill(fill)
    latmask = latmask.to(device=init.device, dtype=init.dtype)
    if fill == "latent-noise":
        if noise is None:
            raise ValueError("--inpainting-fill latent-noise needs the seed's noise")
        return init * (1 - latmask) + noise.to(init) * latmask
    if fill == "latent-nothing":
        return init * (1 - latmask)
    return init


def fill_masked_pixels(image, mask):
    """A1111's ``masking.fill`` (``--inpainting-fill fill``): the PIL RGB ``image`` with its masked area (``mask``:
    PIL ``L``, 255 = repaint) replaced by the unmasked colours blurred into it (premultiplied-alpha Gaussian blurs
    of radius 256, 64, 16, 4, 2, 0 composited over each other). Returns a PIL RGB image."""
    from PIL import Image, ImageFilter, ImageOps

    image_mod = Image.new("RGBA", (image.width, image.height))
    image_masked = Image.new("RGBa", (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    image_masked = image_masked.convert("RGBa")
    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)
    return image_mod.convert("RGB")


def overlay_layer(original, mask):
    """The layer A1111 composites over a generated image (``overlay_images``): the PIL RGB ``original`` pasted
    through premultiplied alpha (A1111's ``RGBa`` paste) with alpha ``255 − mask`` (``mask``: A1111's
    ``mask_for_overlay``, PIL ``L``, 255 = repaint) on a transparent canvas. Returns a PIL RGBA image."""
    from PIL import Image, ImageOps

    masked = Image.new("RGBa", original.size)
    masked.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    return masked.convert("RGBA")


def overlay_original(generated, original, mask):
    """A1111's final overlay for "Inpaint whole picture" (``processing.py``: ``mask_for_overlay``,
    ``overlay_images``, ``apply_overlay``): the PIL RGB ``original`` (the init image at the output size, before any
    fill) composited over the PIL RGB ``generated`` image with alpha ``255 − min(2·mask, 255)`` (``mask``: the
    prepared PIL ``L`` mask at that size, 255 = repaint; the doubling widens the repainted area into the blur's
    inner half; :func:`overlay_layer`). Returns a PIL RGB image."""
    import numpy as np
    from PIL import Image

    doubled = Image.fromarray(np.clip(np.asarray(mask.convert("L"), dtype=np.float32) * 2, 0, 255).astype(np.uint8))
    return composite_original(generated, original, doubled)


def composite_original(generated, original, mask_for_overlay):
    """A1111's ``apply_overlay`` without ``paste_to``: the PIL RGB ``original`` composited over the PIL RGB
    ``generated`` image through :func:`overlay_layer` (alpha ``255 − mask_for_overlay``, PIL ``L``, 255 = the
    generated pixels). Returns a PIL RGB image."""
    out = generated.convert("RGBA")
    out.alpha_composite(overlay_layer(original, mask_for_overlay))
    return out.convert("RGB")


def _sigma_of(t: Tensor, train_sigmas: Tensor, linear: bool) -> Tensor:
    """σ (B,) float64 of the timesteps ``t`` (B,) a sampler passed: integer timesteps -> the training σ; fractional
    ones -> linear in t (diffusers' grids) or in log σ (Karras σ and A1111's schedules: ``t = t(σ)``)."""
    from .samplers.sigma_space import sigmas_at, t_to_sigma

    if not t.is_floating_point():
        return train_sigmas[t.long().cpu()]
    tt = t.detach().double().cpu()
    return sigmas_at(tt, train_sigmas) if linear else t_to_sigma(tt, train_sigmas)


def masked_model(fn: Callable[[Tensor, Tensor, object], Tensor], *, init: Tensor, latmask: Tensor, sampler: str,
                 alphas_cumprod: Tensor, prediction_type: str, linear_timesteps: bool = True,
                 sigma_table: Tensor | None = None,
                 soft: SoftInpainting | None = None) -> Callable[[Tensor, Tensor, object], Tensor]:
    """The guided model ``fn(x_in, t, cond)`` with A1111's inpainting blend on a 4-channel model
    (``CFGDenoiser.forward``): ``init`` (B, C, h, w) the init latent, ``latmask`` (1 or B, 1 or C, h, w) 1 = repaint.

    A timestep sampler (:data:`sdadapt.sampler_tables.TIMESTEP_SAMPLERS`: A1111's ``CFGDenoiserTimesteps``,
    ``mask_before_denoising``): the model sees
    ``init·mask + nmask·x_t``. Every other sampler: the output is changed so that the sampler's x̂0 is
    ``init·mask + nmask·x̂0`` — the VP sample ``x_in = α·x0 + s·ε`` at the call's σ, ``α = 1/√(σ²+1)``, ``s = σα``,
    x̂0 read as :func:`sdadapt.samplers.sigma_space.vp_data_prediction` reads it, blended, and written back in the
    model's prediction type. σ comes from the call's timesteps: integer ones exactly (DPM-Solver), fractional ones
    linear in t (``linear_timesteps``: diffusers' σ grids, exact on their grid points) or in log σ (Karras σ and
    A1111's schedules, exact: their timesteps are ``t(σ)``), on ``sigma_table`` (T,): the σ table the sampler reads
    its timesteps on (``None``: :func:`~sdadapt.samplers.sigma_space.training_sigmas`, diffusers'; A1111's grids:
    :func:`~sdadapt.samplers.sigma_space.model_sigmas`, whose zero-terminal-SNR σ_max is A1111's). A sampler that
    reads x̂0 by branch (A1111's grids, :mod:`sdadapt.denoised_branches`) gets the blend of its own x̂0 instead, in
    A1111's arithmetic, with no σ read back.

    ``soft``: A1111's soft inpainting (:mod:`sdadapt.soft_inpainting`) in place of the linear blend — the call's σ
    (the timestep samplers: its timestep, as A1111 hands it over) schedules the mask, the magnitudes are blended.
    """
    from .samplers.sigma_space import training_sigmas

    train = training_sigmas(alphas_cumprod) if sigma_table is None else sigma_table.double().cpu()
    if sampler in TIMESTEP_SAMPLERS:
        return _BlendedBefore(fn, init, latmask, soft)
    return _BlendedAfter(fn, init, latmask, train, linear_timesteps, prediction_type, soft)


def _blend(current: Tensor, init: Tensor, latmask: Tensor, sigma: float | Tensor,
           soft: SoftInpainting | None) -> Tensor:
    """A1111's ``apply_blend``: :func:`blend_denoised`, or soft inpainting's blend at ``sigma``
    (:func:`sdadapt.soft_inpainting.soft_blend`)."""
    if soft is None:
        return blend_denoised(current, init, latmask)
    from .soft_inpainting import scheduled_nmask, soft_blend

    nmask = latmask.to(device=current.device, dtype=torch.float32)  # (A1111's (C, h, w): its pow over every channel)
    t = scheduled_nmask(nmask.expand(-1, current.shape[1], -1, -1).contiguous(), sigma, soft)
    return soft_blend(init.to(current), current, t, soft)


class _BlendedBefore:
    """:func:`masked_model` for the timestep samplers (A1111's DDIM, PLMS, DDIM CFG++, UniPC): the model at
    ``init·mask + nmask·x_t``, its branches read by the sampler where it asks (:mod:`sdadapt.denoised_branches`)."""

    def __init__(self, fn: Callable[[Tensor, Tensor, object], Tensor], init: Tensor, latmask: Tensor,
                 soft: SoftInpainting | None = None) -> None:
        self.fn, self.init, self.latmask, self.soft = fn, init, latmask, soft

    def __call__(self, x: Tensor, t: Tensor, cond: object) -> Tensor:
        return self.fn(_blend(x, self.init, self.latmask, t, self.soft), t, cond)

    def denoised_by_branch(self, read: ReadDenoised, x: Tensor, t: Tensor, cond: object, *,
                           sigma: float | Tensor) -> Tensor:
        x_in = _blend(x, self.init, self.latmask, t, self.soft)
        return denoised_of(self.fn, read_at(read, x_in), x_in, t, cond, sigma=sigma)


class _BlendedAfter:
    """:func:`masked_model` for the σ samplers: A1111's blend on the x̂0 the sampler reads (its docstring)."""

    def __init__(self, fn: Callable[[Tensor, Tensor, object], Tensor], init: Tensor, latmask: Tensor, train: Tensor,
                 linear_timesteps: bool, prediction_type: str, soft: SoftInpainting | None = None) -> None:
        self.fn, self.init, self.latmask, self.train = fn, init, latmask, train
        self.linear_timesteps, self.prediction_type, self.soft = linear_timesteps, prediction_type, soft

    def __call__(self, x: Tensor, t: Tensor, cond: object) -> Tensor:
        """The model output (B, C, h, w) whose x̂0 is the blend, σ read back from ``t`` (float64 arithmetic)."""
        from .samplers.sigma_space import vp_data_prediction

        out = self.fn(x, t, cond)
        sigma = _sigma_of(t, self.train, self.linear_timesteps).to(device=x.device, dtype=torch.float64)
        sigma = sigma.view(-1, 1, 1, 1)
        alpha = 1.0 / (sigma * sigma + 1).sqrt()
        s = sigma * alpha
        x64, out64 = x.double(), out.double()
        x0 = vp_data_prediction(out64, x64, alpha, s, self.prediction_type)
        x0 = _blend(x0, self.init.double(), self.latmask.double(), sigma.reshape(-1)[0], self.soft)
        if self.prediction_type == "epsilon":
            new = (x64 - alpha * x0) / s
        elif self.prediction_type == "v_prediction":
            new = (alpha * x64 - x0) / s
        else:  # sample
            new = x0
        return new.to(out.dtype)

    def denoised_by_branch(self, read: ReadDenoised, x: Tensor, t: Tensor, cond: object, *,
                           sigma: float | Tensor) -> Tensor:
        """The blend of the x̂0 (B, C, h, w) the sampler reads (one of A1111's grids: A1111's own arithmetic)."""
        return _blend(denoised_of(self.fn, read, x, t, cond, sigma=sigma), self.init, self.latmask, sigma, self.soft)


# -------------------------------------------------------------------------------------- inpainting models (9-ch)
def check_inpainting_unet(in_channels: int, latent_channels: int) -> bool:
    """Whether a UNet of ``in_channels`` takes an inpainting model's ``c_concat`` (``latent_channels + 5``: x, the
    mask, the masked image's latent); ``False`` for a plain UNet (``latent_channels``).

    Raises:
        ValueError: any other count (8: an InstructPix2Pix UNet, whose image conditioning is not run here).
    """
    if in_channels == latent_channels:
        return False
    if in_channels == latent_channels + 5:
        return True
    what = " (an InstructPix2Pix model: x and the image's latent)" if in_channels == 2 * latent_channels else ""
    raise ValueError(f"the UNet takes {in_channels} input channels{what}; sdadapt generates with plain UNets "
                     f"({latent_channels}) and inpainting UNets ({latent_channels + 5}: x, mask, masked image) only")


def masked_image(image: Tensor, mask: Tensor, weight: float = 1.0) -> Tensor:
    """A1111's masked image for an inpainting model: ``lerp(image, image·(1 − mask), weight)``; ``image``
    (B, 3, H, W) in [-1, 1], ``mask`` (1, 1, H, W) of 0 / 1 (:func:`conditioning_mask`), ``weight``: A1111's
    ``inpainting_mask_weight`` ("Inpainting conditioning mask strength", ``--inpainting-mask-weight``; 1: the
    masked area 0 in [-1, 1], diffusers' ``image · (mask < 0.5)``; 0: the whole image). Returns (B, 3, H, W).

    Raises:
        ValueError: ``weight`` outside [0, 1]."""
    check_mask_weight(weight)
    mask = mask.to(image)
    return torch.lerp(image, image * (1.0 - mask), float(weight))


def txt2img_masked_image(batch: int, height: int, width: int) -> tuple[Tensor, Tensor]:
    """A1111's ``txt2img_image_conditioning`` for an inpainting model: ``(image, mask)`` — the 0.5-grey image
    (B, 3, H, W) (0 in [-1, 1]) to encode and the mask of ones (1, 1, H, W)."""
    return torch.zeros(batch, 3, height, width), torch.ones(1, 1, height, width)


def image_conditioning(mask: Tensor, masked_latents: Tensor) -> Tensor:
    """An inpainting model's ``c_concat``: ``[mask, masked_latents]`` (B, 1 + C, h, w) — ``mask`` (1, 1, H, W) in
    pixels, resized to the latent (h, w) by ``interpolate`` (nearest, A1111's and diffusers' rule),
    ``masked_latents`` (B, C, h, w): the VAE latent of :func:`masked_image`."""
    small = torch.nn.functional.interpolate(mask.to(masked_latents), size=tuple(masked_latents.shape[-2:]))
    return torch.cat([small.expand(masked_latents.shape[0], -1, -1, -1), masked_latents], dim=1)


def concat_conditioning(model: Callable[[Tensor, Tensor, object], Tensor],
                        conditioning: Tensor) -> Callable[[Tensor, Tensor, object], Tensor]:
    """``model(x, t, cond)`` of an inpainting UNet from a latent-only one: ``x`` (n·B, C, h, w) (n: the guidance's
    batches) gets ``conditioning`` (B, 5, h, w) (:func:`image_conditioning`) concatenated on the channels (the same
    for the conditional and unconditional halves, as A1111's ``image_uncond = image_cond`` and diffusers do)."""
    def run(x: Tensor, t: Tensor, cond: object) -> Tensor:
        c = conditioning.to(device=x.device, dtype=x.dtype)
        if x.shape[0] != c.shape[0]:
            if x.shape[0] % c.shape[0]:
                raise ValueError(f"inpainting conditioning for {c.shape[0]} images, the model is called with "
                                 f"{x.shape[0]}")
            c = c.repeat(x.shape[0] // c.shape[0], 1, 1, 1)
        return model(torch.cat([x, c], dim=1), t, cond)

    return run
