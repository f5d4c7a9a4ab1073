"""Soft inpainting (A1111's built-in ``extensions-builtin/soft-inpainting``, v1.8+): the mask's grey levels kept, the
original latents blended in by how transparent the mask is and how far the run is, and the final image composited
over the original where the picture barely changed.

Three parts, each A1111's arithmetic (``soft_inpainting.py``; :class:`SoftInpainting` holds its six sliders):

* **the mask as it is** — A1111 turns ``mask_round`` off: an RGBA mask's alpha is not thresholded
  (:func:`sdadapt.inpaint.binary_mask` ``rounded=False``) and the latent mask keeps its fractions
  (:func:`sdadapt.inpaint.latent_mask` ``rounded=False``); "Mask blur" then makes the soft edge;
* **the blend in the sampler** (its ``on_mask_blend``, in place of ``x·nmask + init·mask``), at each model call::

      t   = nmask ** (σ ** schedule_bias · preservation_strength)          (h, w) per channel
      lin = init·(1 − t) + x·t                                                 (B, C, h, w)
      |·| = ‖·‖₂ over the channels; d = transition_contrast_boost
      out = lin · ((|init|^d·(1 − t) + |x|^d·t)^(1/d) / (|lin| + 1e-5))        magnitudes in float64

  (:func:`scheduled_nmask`, :func:`soft_blend`) — on the x̂0 of A1111's σ samplers after the call, on the model's
  input before the call for its timestep samplers (DDIM, PLMS, UniPC: A1111 hands the blend the *timestep* as σ
  there, so ``t = nmask^(timestep·0.5)`` keeps the original almost wholly until the last few steps; sdadapt does the
  same). The blend after sampling is left out (``is_final_blend``: the samples stay);
* **the pixel composite** (its ``post_sample`` / ``apply_adaptive_masks``): how far each latent moved,
  ``‖samples − init‖₂`` over the channels, is smoothed by two weighted-percentile filters (top decile, then the
  interquartile mean, over a 5×5 Gaussian window: :func:`weighted_histogram_filter`), divided by
  ``difference_threshold`` biased by the mask (``mask_influence``), turned into an opacity by
  ``1 − smootherstep(1 / (1 + r^difference_contrast))``, made 8-bit, resized to the image by "Resize and fill",
  blurred (radius 4) (:func:`difference_mask`, :func:`overlay_mask`); the original is composited over the generated
  image through it in place of the mask's doubled blur (:func:`sdadapt.inpaint.composite_original`).

The arithmetic follows A1111 with ``--no-half`` (float32 masks); on a half model A1111 keeps ``nmask`` in float16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
from torch import Tensor

__all__ = ["SOFT_INPAINTING_FIELDS", "SoftInpainting", "difference_mask", "gaussian_kernel", "overlay_mask",
           "parse_soft_inpainting", "scheduled_nmask", "smootherstep", "soft_blend", "soft_inpainting_fields",
           "soft_inpainting_from_fields", "weighted_histogram_filter"]

#: A1111's infotext keys: enabled, then one per :class:`SoftInpainting` field in its order
SOFT_INPAINTING_FIELDS = ("Soft inpainting enabled", "Soft inpainting schedule bias",
                          "Soft inpainting preservation strength", "Soft inpainting transition contrast boost",
                          "Soft inpainting mask influence", "Soft inpainting difference threshold",
                          "Soft inpainting difference contrast")


@dataclass(frozen=True)
class SoftInpainting:
    """A1111's soft inpainting panel (its defaults). ``schedule_bias`` ("Schedule bias", ``mask_blend_power``): the
    power of σ in the blend's exponent (above 1: the original kept more early on); ``preservation_strength``
    ("Preservation strength", ``mask_blend_scale``): that exponent's scale (higher keeps more of the original);
    ``transition_contrast_boost`` ("Transition contrast boost", ``inpaint_detail_preservation``): the power the
    magnitudes are blended at (1: linear); ``mask_influence`` ("Mask influence", in [0, 1]): how much the mask
    biases the difference threshold; ``difference_threshold`` ("Difference threshold"): the latent change at which
    the original is half opaque; ``difference_contrast`` ("Difference contrast"): how sharp that transition is.

    Raises:
        ValueError: a value that is no finite number, a negative one, a boost of 0 or a mask influence above 1.
    """

    schedule_bias: float = 1.0
    preservation_strength: float = 0.5
    transition_contrast_boost: float = 4.0
    mask_influence: float = 0.0
    difference_threshold: float = 0.5
    difference_contrast: float = 2.0

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"soft inpainting {item.name} must be a finite number >= 0, got {value!r}")
            object.__setattr__(self, item.name, float(value))
        if self.transition_contrast_boost == 0:
            raise ValueError("soft inpainting transition_contrast_boost is the power the magnitudes are blended at "
                             "and must be above 0 (A1111's slider: 1 to 32), got 0")
        if self.mask_influence > 1:
            raise ValueError(f"soft inpainting mask_influence is a share in [0, 1], got {self.mask_influence}")


# ------------------------------------------------------------------------------------------------- the blend
def scheduled_nmask(nmask: Tensor, sigma: float | Tensor, setting: SoftInpainting) -> Tensor:
    """A1111's ``get_modified_nmask``: ``nmask ** (σ ** schedule_bias · preservation_strength)`` — ``nmask``
    (…, h, w) the latent mask (1 = repaint), ``σ`` the call's noise level (A1111's timestep samplers: the timestep),
    taken as a float32 scalar as A1111's ``sigma[0]``. Returns ``nmask``'s shape and dtype."""
    s = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)[0].to(nmask.device)
    return torch.pow(nmask, (s ** setting.schedule_bias) * setting.preservation_strength)


def soft_blend(init: Tensor, current: Tensor, t: Tensor, setting: SoftInpainting) -> Tensor:
    """A1111's ``latent_blend``: ``init`` and ``current`` (B, C, h, w) interpolated by ``t`` (1 or B, 1 or C, h, w;
    :func:`scheduled_nmask`, 1 = ``current``), the result's channel-vector magnitudes set to the magnitudes
    interpolated at the power ``transition_contrast_boost`` (in float64; ``t``'s first channel weighs them).
    Returns (B, C, h, w) in the linear blend's dtype."""
    d = setting.transition_contrast_boost
    t = t.to(current.device)
    t3 = t[:, :1]
    interp = init * (1 - t)
    interp = interp + current * t
    current_magnitude = torch.linalg.vector_norm(interp, 2, dim=1, keepdim=True).to(torch.float64).add_(0.00001)
    a = torch.linalg.vector_norm(init, 2, dim=1, keepdim=True).to(torch.float64).pow_(d) * (1 - t3)
    b = torch.linalg.vector_norm(current, 2, dim=1, keepdim=True).to(torch.float64).pow_(d) * t3
    desired = a.add_(b).pow_(1 / d)
    return interp * desired.div_(current_magnitude).to(interp.dtype)


# ------------------------------------------------------------------------------------------ the pixel composite
def gaussian_kernel(stddev: float = 1.5, radius: int = 2) -> np.ndarray:
    """A1111's ``get_gaussian_kernel``: ``exp(−r²/stddev²)`` on a (2·radius + 1)² grid, lowered so it reaches 0 one
    pixel past ``radius`` and rescaled to 1 at the centre. Returns (2·radius + 1, 2·radius + 1) float64."""
    zero = math.exp(-((radius + 1.0) ** 2) / (stddev * stddev))
    scale = 1 / (1 - zero)
    size = 2 * radius + 1
    kernel = np.zeros((size, size))
    for i in range(size):
        for j in range(size):
            x = math.exp(-((i - radius) ** 2.0 + (j - radius) ** 2.0) / (stddev * stddev))
            kernel[i, j] = max(0.0, (x - zero) * scale)
    return kernel


def weighted_histogram_filter(image: np.ndarray, kernel: np.ndarray, *, percentile_min: float,
                              percentile_max: float, min_width: float = 1.0) -> np.ndarray:
    """A1111's ``weighted_histogram_filter``: each pixel of ``image`` (h, w) the weighted mean of the values around
    it (``kernel`` (k, k) centred on it, cut at the edges) whose stacked weights — sorted by value — lie in the
    window ``[percentile_min, percentile_max]`` of their sum, each weighted by its overlap (a window narrower than
    ``min_width`` is widened about its centre, kept inside the stack). Its float64 arithmetic in its order, all
    pixels at once. Returns (h, w) in ``image``'s dtype."""
    h, w = image.shape
    k = kernel.shape[0] // 2
    padded = np.zeros((h + 2 * k, w + 2 * k), dtype=np.float64)
    padded[k:k + h, k:k + w] = image
    inside = np.zeros(padded.shape, dtype=bool)
    inside[k:k + h, k:k + w] = True
    values, weights, valid = [], [], []
    for i in range(kernel.shape[0]):  # (the window in row-major order, as A1111's np.ndindex)
        for j in range(kernel.shape[1]):
            values.append(padded[i:i + h, j:j + w])
            valid.append(inside[i:i + h, j:j + w])
            weights.append(np.full((h, w), kernel[i, j]))
    v, wt, ok = np.stack(values, -1), np.stack(weights, -1), np.stack(valid, -1)
    v = np.where(ok, v, np.inf)  # (outside the image: sorted last, weightless)
    wt = np.where(ok, wt, 0.0)
    order = np.argsort(v, axis=-1, kind="stable")  # (Python's sort: stable by value)
    v, wt, ok = (np.take_along_axis(a, order, -1) for a in (v, wt, ok))
    v = np.where(ok, v, 0.0)
    lo = np.empty_like(wt)
    hi = np.empty_like(wt)
    total = np.zeros((h, w))
    for n in range(wt.shape[-1]):  # (the running sum, in order)
        lo[..., n] = total
        total = total + wt[..., n]
        hi[..., n] = total
    wmin, wmax = total * percentile_min, total * percentile_max
    narrow = (wmax - wmin) < min_width
    centre = (wmin + wmax) / 2
    wmin, wmax = np.where(narrow, centre - min_width / 2, wmin), np.where(narrow, centre + min_width / 2, wmax)
    over = narrow & (wmax > total)
    wmin, wmax = np.where(over, total - min_width, wmin), np.where(over, total, wmax)
    under = narrow & (wmin < 0)
    wmin, wmax = np.where(under, 0.0, wmin), np.where(under, min_width, wmax)
    value = np.zeros((h, w))
    weight = np.zeros((h, w))
    for n in range(wt.shape[-1]):
        taken = ok[..., n] & (wmin < hi[..., n]) & (wmax > lo[..., n])
        overlap = np.minimum(wmax, hi[..., n]) - np.maximum(wmin, lo[..., n])
        overlap = np.where(taken, overlap, 0.0)  # (A1111 skips the others: adding 0 leaves the sums as they are)
        value = value + v[..., n] * overlap
        weight = weight + overlap
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(weight != 0, value / weight, 0.0)
    return out.astype(image.dtype)


def smootherstep(x: np.ndarray) -> np.ndarray:
    """Perlin's smootherstep ``x³(x(6x − 15) + 10)`` of ``x`` in [0, 1] (A1111's, in ``x``'s dtype)."""
    return x * x * x * (x * (6 * x - 15) + 10)


def difference_mask(init: Tensor, samples: Tensor, nmask: Tensor, setting: SoftInpainting) -> np.ndarray:
    """A1111's ``apply_adaptive_masks`` up to its 8-bit mask: how far each latent moved (``init``, ``samples``
    (B, C, h, w): the init latent as sampled from and the run's final latents), as a repaint opacity. ``nmask``
    (…, h, w): the latent mask (its first plane is read). Returns (B, h, w) uint8, 255 = the generated pixels."""
    latent = nmask.reshape(-1, *nmask.shape[-2:])[0].float().cpu()
    scalar = 1 - (torch.clamp(latent, min=0, max=1) ** (setting.preservation_strength / 2))
    scalar = 0.5 * (1 - setting.mask_influence) + scalar * setting.mask_influence
    scalar = (scalar / (1.00001 - scalar)).numpy()
    distance = torch.linalg.vector_norm(samples.float().cpu() - init.float().cpu(), 2, dim=1)
    kernel = gaussian_kernel(1.5, 2)
    out = []
    for plane in distance:
        m = plane.numpy()
        m = weighted_histogram_filter(m, kernel, percentile_min=0.9, percentile_max=1.0)
        m = weighted_histogram_filter(m, kernel, percentile_min=0.25, percentile_max=0.75)
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            m = m / (setting.difference_threshold * scalar)
            m = 1 / (1 + m ** setting.difference_contrast)
            m = 255.0 * (1 - smootherstep(m))
            out.append(m.astype(np.uint8))
    return np.stack(out)


def overlay_mask(mask: np.ndarray, *, width: int, height: int):
    """One image's :func:`difference_mask` (h, w) as A1111's ``mask_for_overlay``: resized to ``width`` x
    ``height`` by "Resize and fill" (Lanczos) and blurred by PIL's Gaussian blur of radius 4. Returns a PIL ``L``
    image (255 = the generated pixels)."""
    from PIL import Image, ImageFilter

    from .inpaint_crop import resize_image

    image = resize_image(Image.fromarray(np.ascontiguousarray(mask), "L"), width, height, mode="fill")
    return image.convert("L").filter(ImageFilter.GaussianBlur(radius=4))


# -------------------------------------------------------------------------------------------- fields and words
def soft_inpainting_fields(setting: SoftInpainting) -> dict[str, object]:
    """A1111's infotext fields of ``setting`` (:data:`SOFT_INPAINTING_FIELDS`, in its order)."""
    return dict(zip(SOFT_INPAINTING_FIELDS, (True, *(getattr(setting, f.name) for f in fields(setting)))))


def soft_inpainting_from_fields(values: dict[str, str]) -> tuple[SoftInpainting | None, list[str]]:
    """``(setting, keys taken)`` of parsed infotext fields: A1111's, enabled (a missing slider: its default);
    ``None`` when not enabled (fields written off are taken, as nothing to run).

    Raises:
        ValueError: a field whose value is not a number A1111 writes there, naming it.
    """
    present = [key for key in SOFT_INPAINTING_FIELDS if key in values]
    if str(values.get(SOFT_INPAINTING_FIELDS[0], "")).strip().lower() != "true":
        return None, present if SOFT_INPAINTING_FIELDS[0] in values else []
    options = {}
    for key, item in zip(SOFT_INPAINTING_FIELDS[1:], fields(SoftInpainting)):
        if key in values:
            try:
                options[item.name] = float(values[key])
            except ValueError:
                raise ValueError(f"infotext field {key}: {values[key]!r} is not the number A1111 writes "
                                 "there") from None
    return SoftInpainting(**options), present


def parse_soft_inpainting(words: list[str] | tuple[str, ...]) -> SoftInpainting:
    """``--soft-inpainting [KEY=VALUE ...]``: A1111's defaults, any :class:`SoftInpainting` field given by its name
    (``schedule_bias=1.5 difference_threshold=1``).

    Raises:
        ValueError: a word that is not ``KEY=VALUE`` with a known key, a value that is no number or out of range.
    """
    known = [f.name for f in fields(SoftInpainting)]
    options = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or key not in known:
            raise ValueError(f"{word!r} is not KEY=VALUE with a KEY among {', '.join(known)}")
        try:
            options[key] = float(value)
        except ValueError:
            raise ValueError(f"{key} is a number, got {value!r}") from None
    return SoftInpainting(**options)
