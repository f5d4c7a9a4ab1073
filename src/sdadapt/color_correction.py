"""A1111's "Apply color correction to img2img results to match original colors" (``img2img_color_correction``,
modules/processing.py ``setup_color_correction`` / ``apply_color_correction``): the init image's colours in OpenCV's
8-bit CIELAB are the reference; each generated image is taken to Lab, its channels histogram-matched to the
reference's (scikit-image's ``match_histograms``, here :func:`sdadapt.outpainting_mk2.match_histograms`, into the
uint8 array as scikit-image writes it: truncated), taken back to RGB, and blended under the generated image with
blendmodes' LUMINOSITY — the matched colours with the generated image's luminosity (the blendmodes 2022 release
A1111 pins: ``_setLum`` of the matched image to ``_lum`` of the generated one, composited opaque, ``(x·255)`` cast to
uint8).

OpenCV's Lab conversions are OpenCV's own fixed-point code, so they are OpenCV's: the optional package
``opencv-python-headless`` (imported when the correction runs; the message says how to install it).
"""

from __future__ import annotations

import numpy as np

__all__ = ["apply_color_correction", "luminosity_blend", "setup_color_correction"]


def _cv2():
    try:
        import cv2
    except ImportError:
        raise ImportError("colour correction converts to CIELAB with OpenCV, as A1111 does: pip install "
                          "opencv-python-headless") from None
    return cv2


def setup_color_correction(image: np.ndarray) -> np.ndarray:
    """The reference (H, W, 3) uint8 Lab of the init image ``image`` (H, W, 3) uint8 RGB (A1111's
    ``setup_color_correction``: ``cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2LAB)``).

    Raises:
        ImportError: OpenCV is not installed.
        ValueError: not an (H, W, 3) uint8 image.
    """
    image = _rgb8(image, "the init image")
    cv2 = _cv2()
    return cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2LAB)


def _rgb8(image: np.ndarray, what: str) -> np.ndarray:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"colour correction: {what} must be (H, W, 3) uint8 RGB, got {image.dtype} "
                         f"{tuple(image.shape)}")
    return image


def luminosity_blend(background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """blendmodes 2022's ``blendLayers(background, foreground, BlendType.LUMINOSITY)`` of two opaque (H, W, 3) uint8
    images -> (H, W, 3) uint8: ``background``'s colours given ``foreground``'s luminosity ``0.299 R + 0.587 G +
    0.114 B`` (``_setLum``: shifted by the luminosity difference, then pulled back into [0, 1] towards the new
    luminosity where a channel left it — below 0 first, then above 1 with the maximum taken before), in float64 on
    ``x / 255``, clipped, ``(x·255).astype(uint8)``."""
    bg = _rgb8(background, "the background") / 255
    fg = _rgb8(foreground, "the foreground") / 255

    def lum(colours: np.ndarray) -> np.ndarray:
        return (colours[:, :, 0] * 0.299) + (colours[:, :, 1] * 0.587) + (colours[:, :, 2] * 0.114)

    colours = bg.copy()
    colours += (lum(fg) - lum(colours))[:, :, None]
    luminosity = lum(colours)[:, :, None]
    low, high = colours.min(axis=2)[:, :, None], colours.max(axis=2)[:, :, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        colours = np.where(low < 0, luminosity + ((colours - luminosity) * luminosity) / (luminosity - low), colours)
        colours = np.where(high > 1, luminosity + ((colours - luminosity) * (1 - luminosity)) / (high - luminosity),
                           colours)
    # (both opaque: blendLayers' composite is 0·background + 0·foreground + 1·blend)
    blended = (1.0 - 1.0) * bg + (1.0 - 1.0) * fg + 1.0 * colours
    return (np.clip(blended, 0, 1) * 255).astype(np.uint8)


def apply_color_correction(correction: np.ndarray, image: np.ndarray) -> np.ndarray:
    """A1111's ``apply_color_correction`` of a generated ``image`` (H, W, 3) uint8 RGB against the reference
    ``correction`` (h, w, 3) uint8 Lab (:func:`setup_color_correction`; any size) -> (H, W, 3) uint8 RGB.

    Raises:
        ImportError: OpenCV is not installed.
        ValueError: not (H, W, 3) uint8 arrays.
    """
    from .outpainting_mk2 import match_histograms

    image = _rgb8(image, "the image")
    if correction.dtype != np.uint8 or correction.ndim != 3 or correction.shape[2] != 3:
        raise ValueError(f"colour correction: the reference must be (H, W, 3) uint8 Lab, got {correction.dtype} "
                         f"{tuple(correction.shape)}")
    cv2 = _cv2()
    lab = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2LAB)
    matched = cv2.cvtColor(match_histograms(lab, correction), cv2.COLOR_LAB2RGB).astype("uint8")
    return luminosity_blend(matched, image)
