"""Outpainting mk2 (A1111's built-in img2img script ``scripts/outpainting_mk_2.py``): the image grown one side at a
time, each new border filled with noise shaped like the image's own spectrum and coloured like its pixels, then
inpainted.

* :func:`matched_noise` — the script's ``get_matched_noise`` (from g-diffuser-bot): the image windowed and
  normalised, its centred orthonormal FFT's magnitude and phase, a seeded (``default_rng(0)``: the same fill every
  run) uniform noise blended towards grey by ``color_variation``, low-passed by a Cauchy-like window, its spectrum's
  squared magnitude times the image's magnitude to the ``noise_q`` ("Fall-off exponent") with the image's phase, back
  to pixels, stretched to [0, 1] and histogram-matched per channel to the image's unmasked pixels
  (:func:`match_histograms`, scikit-image's ``match_histograms``); the image kept outside the mask. All float64.
* :func:`mk2_step` — the script's ``expand`` for one side of one image, up to its ``process_images`` call: the
  canvas grown by ``pixels`` and rounded up to 64, filled by :func:`matched_noise`, the image mask (black over the
  old image but ``pixels + blur`` on the grown side), the region run (at most the generation's size along the grown
  axis) and its latent mask (the blur doubled); :meth:`Mk2Step.paste` puts the generated region back and crops to
  the grown size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .outpainting import OUTPAINT_DIRECTIONS, check_outpainting

__all__ = ["MK2_DIRECTIONS", "Mk2Step", "check_mk2", "match_histograms", "matched_noise", "mk2_blur", "mk2_step"]

#: the sides the script grows, in its order (each grown from the side before's result): Poor man's outpainting's
MK2_DIRECTIONS = OUTPAINT_DIRECTIONS


def check_mk2(pixels: int, mask_blur: int, directions, noise_q: float, color_variation: float) -> tuple[str, ...]:
    """``directions`` as a tuple (in the order given; the script grows them left, right, up, down), the settings
    checked.

    Raises:
        ValueError: no direction or an unknown one, ``pixels`` not above 0, a negative blur or fall-off exponent, a
            colour variation outside [0, 1].
    """
    directions = check_outpainting(pixels, mask_blur, directions, option="--outpaint-mk2")
    if not noise_q >= 0.0:
        raise ValueError(f"--outpaint-falloff must be >= 0 (A1111's 'Fall-off exponent', 0 to 4), got {noise_q}")
    if not 0.0 <= color_variation <= 1.0:
        raise ValueError(f"--outpaint-color-variation must be in [0, 1] (A1111's slider), got {color_variation}")
    return directions


def _match_cdf(source: np.ndarray, template: np.ndarray) -> np.ndarray:
    """scikit-image's ``_match_cumulative_cdf`` for float arrays: each distinct source value moved to the template
    value at its quantile (linear interpolation between the template's distinct values)."""
    _, lookup, counts = np.unique(source.reshape(-1), return_inverse=True, return_counts=True)
    template_values, template_counts = np.unique(template.reshape(-1), return_counts=True)
    quantiles = np.cumsum(counts) / source.size
    template_quantiles = np.cumsum(template_counts) / template.size
    return np.interp(quantiles, template_quantiles, template_values)[lookup].reshape(source.shape)


def match_histograms(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``skimage.exposure.match_histograms(image, reference, channel_axis=-1)`` for float arrays (..., C): each
    channel's values mapped so that their cumulative histogram follows the reference channel's."""
    if image.shape[-1] != reference.shape[-1]:
        raise ValueError(f"the image has {image.shape[-1]} channels and the reference {reference.shape[-1]}")
    matched = np.empty(image.shape, dtype=image.dtype)
    for channel in range(image.shape[-1]):
        matched[..., channel] = _match_cdf(image[..., channel], reference[..., channel])
    return matched


def _fft2(data: np.ndarray) -> np.ndarray:
    """Each channel's orthonormal 2-D FFT with the script's shifts (``ifftshift(fft2(fftshift(c)))``)."""
    out = np.zeros(data.shape, dtype=np.complex128)
    for c in range(data.shape[2]):
        out[:, :, c] = np.fft.ifftshift(np.fft.fft2(np.fft.fftshift(data[:, :, c]), norm="ortho"))
    return out


def _ifft2(data: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_fft2`'s transform as the script writes it (``ifftshift(ifft2(fftshift(c)))``)."""
    out = np.zeros(data.shape, dtype=np.complex128)
    for c in range(data.shape[2]):
        out[:, :, c] = np.fft.ifftshift(np.fft.ifft2(np.fft.fftshift(data[:, :, c]), norm="ortho"))
    return out


def _noise_window(rows: int, columns: int) -> np.ndarray:
    """The script's ``_get_gaussian_window(mode=1)`` (std 3.14: exponent 1): ``1 / ((x² + 1)(y² + 1))`` over
    [-1, 1) scaled by the sides' ratio to the shorter one (x along the rows, as the script names them)."""
    shorter = min(rows, columns)
    x = (np.arange(rows) / rows * 2.0 - 1.0) * float(rows / shorter)
    y = (np.arange(columns) / columns * 2.0 - 1.0) * float(columns / shorter)
    return (1 / ((x[:, None] ** 2 + 1.0) * (y[None, :] ** 2 + 1.0))) ** (3.14 / 3.14)


def matched_noise(image: np.ndarray, mask: np.ndarray, *, noise_q: float = 1.0,
                  color_variation: float = 0.05) -> np.ndarray:
    """The script's fill (module docstring): ``image`` (H, W, 3) float64 in [0, 1] with the new border ``mask``
    (H, W, 3) float64, 1 where noise goes -> (H, W, 3) float64 in [0, 1], the image kept where the mask is 0.

    Raises:
        ValueError: shapes that differ, or not three channels; an image black where it is kept.
    """
    if image.shape != mask.shape or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"matched_noise takes an (H, W, 3) image and a mask of its shape, got {image.shape} and "
                         f"{mask.shape}")
    rows, columns, channels = image.shape
    grey_mask = np.sum(mask, axis=2) / 3.0
    noise_area, reference_area = grey_mask > 1e-6, grey_mask < 1e-3
    windowed = image * (1.0 - np.repeat(grey_mask[:, :, None], 3, axis=2))
    if not np.max(windowed) > 0.0:
        raise ValueError("outpainting mk2 shapes its fill on the image's pixels, and they are all black (the script "
                         "divides by the brightest): give an image with some light, or use --outpaint")
    windowed /= np.max(windowed)
    windowed += np.average(image) * mask  # (the border: the image's mean colour, for the spectrum)
    source = _fft2(windowed)
    magnitude = np.absolute(source)
    phase = source / magnitude

    rng = np.random.default_rng(0)  # (the script's static seed: the same fill every run)
    window = _noise_window(rows, columns)
    noise = rng.random((rows, columns, channels))
    grey = np.sum(noise, axis=2) / 3.0
    noise *= color_variation
    for c in range(channels):
        noise[:, :, c] += (1.0 - color_variation) * grey
    spectrum = _fft2(noise)
    for c in range(channels):
        spectrum[:, :, c] *= window
    noise = np.real(_ifft2(spectrum))
    shaped = _fft2(noise)
    shaped[:, :, :] = np.absolute(shaped[:, :, :]) ** 2 * (magnitude ** noise_q) * phase

    shaped_noise = np.real(_ifft2(shaped))
    shaped_noise -= np.min(shaped_noise)
    shaped_noise /= np.max(shaped_noise)
    shaped_noise[noise_area, :] = match_histograms(shaped_noise[noise_area, :] ** 1.0, image[reference_area, :])
    shaped_noise = image * (1.0 - mask) + shaped_noise * mask
    return np.clip(shaped_noise, 0.0, 1.0)


def mk2_blur(mask_blur: int, directions) -> tuple[int, int]:
    """The script's ``(mask_blur_x, mask_blur_y)``: ``mask_blur`` along an axis any chosen side grows, else 0 (the
    runs' own mask blur is four times these: ``p.mask_blur_x/y``)."""
    sides = set(directions)
    return (mask_blur if sides & {"left", "right"} else 0), (mask_blur if sides & {"up", "down"} else 0)


@dataclass(frozen=True)
class Mk2Step:
    """One side's run for one image: ``init`` (PIL RGB, the noise-filled region run), its ``mask`` and
    ``latent_mask`` (PIL RGB, white where it is generated), the run's ``size`` (width, height), and where the result
    goes: ``canvas`` (the noise-filled grown canvas, PIL RGB), ``at`` (the paste corner) and ``grown`` (the final
    width, height)."""

    init: object
    mask: object
    latent_mask: object
    size: tuple[int, int]
    canvas: object
    at_side: tuple[bool, bool]
    grown: tuple[int, int]

    def paste(self, generated):
        """The grown image: the generated region (PIL, the run's size) pasted into the canvas at its side, cropped
        to the grown size (the script's last two lines of ``expand``)."""
        canvas = self.canvas.copy()
        is_left, is_top = self.at_side
        canvas.paste(generated, (0 if is_left else canvas.width - generated.width,
                                 0 if is_top else canvas.height - generated.height))
        return canvas.crop((0, 0, *self.grown))


def mk2_step(image, side: str, pixels: int, *, blur: tuple[int, int], size: tuple[int, int], noise_q: float = 1.0,
             color_variation: float = 0.05) -> Mk2Step:
    """The script's ``expand`` of the PIL RGB ``image`` by ``pixels`` on ``side`` up to its ``process_images``:
    ``blur`` the script's ``(mask_blur_x, mask_blur_y)`` (:func:`mk2_blur`), ``size`` the generation's
    (width, height) — the region run is at most that long along the grown axis.

    Raises:
        ValueError: an unknown side; a region whose masks PIL cannot draw (a side grown past the generation's size
            by less than the blur: the script fails there too).
    """
    from PIL import Image, ImageDraw

    if side not in MK2_DIRECTIONS:
        raise ValueError(f"side must be one of {MK2_DIRECTIONS}, got {side!r}")
    is_left, is_right, is_top, is_bottom = (side == name for name in MK2_DIRECTIONS)
    horizontal = is_left or is_right
    grow_w, grow_h = (pixels, 0) if horizontal else (0, pixels)
    res_w, res_h = image.width + grow_w, image.height + grow_h
    canvas_size = (math.ceil(res_w / 64) * 64, math.ceil(res_h / 64) * 64)
    canvas = Image.new("RGB", canvas_size)
    canvas.paste(image, (grow_w if is_left else 0, grow_h if is_top else 0))
    blur_x, blur_y = blur
    mask = Image.new("RGB", canvas_size, "white")
    ImageDraw.Draw(mask).rectangle((pixels + blur_x if is_left else 0, pixels + blur_y if is_top else 0,
                                    mask.width - pixels - blur_x if is_right else res_w,
                                    mask.height - pixels - blur_y if is_bottom else res_h), fill="black")
    filled = matched_noise((np.asarray(canvas) / 255.0).astype(np.float64),
                           (np.asarray(mask) / 255.0).astype(np.float64), noise_q=noise_q,
                           color_variation=color_variation)
    filled = Image.fromarray(np.clip(filled * 255.0, 0.0, 255.0).astype(np.uint8), mode="RGB")
    target_w = min(size[0], image.width + grow_w) if horizontal else canvas.width
    target_h = min(size[1], image.height + grow_h) if not horizontal else canvas.height
    region = (0 if is_left else filled.width - target_w, 0 if is_top else filled.height - target_h,
              target_w if is_left else filled.width, target_h if is_top else filled.height)
    mask = mask.crop(region)
    latent_mask = Image.new("RGB", (target_w, target_h), "white")
    ImageDraw.Draw(latent_mask).rectangle((pixels + blur_x * 2 if is_left else 0, pixels + blur_y * 2 if is_top else 0,
                                           mask.width - pixels - blur_x * 2 if is_right else res_w,
                                           mask.height - pixels - blur_y * 2 if is_bottom else res_h), fill="black")
    return Mk2Step(filled.crop(region), mask, latent_mask, (target_w, target_h), filled, (is_left, is_top),
                   (res_w, res_h))
