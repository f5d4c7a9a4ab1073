"""kohya's ``resize_interpolation``: the image scaling methods of sd-scripts, in torch (no OpenCV, no PIL).

kohya (``library/utils.py`` ``resize_image``) scales a training image to its bucket with OpenCV or
PIL, by name:

===================  ==========================  =============================================================
name                 kohya calls                 computed here as
===================  ==========================  =============================================================
``lanczos``          PIL ``LANCZOS``             PIL's resampling: Lanczos-3 stretched by the reduction (anti-aliased)
``box``              PIL ``BOX``                 PIL's resampling: a box of the reduction's width (anti-aliased)
``nearest``          cv2 ``INTER_NEAREST_EXACT`` source pixel ``≈ ⌊(x + ½) · in / out⌋`` (OpenCV's 16-bit fixed point)
``bilinear``         cv2 ``INTER_LINEAR``        2 taps at ``(x + ½) · in / out − ½``, edges repeated (no anti-aliasing)
``linear``           (the same)
``bicubic``          cv2 ``INTER_CUBIC``         4 taps, Keys' cubic with ``a = −0.75``, edges repeated (no anti-aliasing)
``cubic``            (the same)
``area``             cv2 ``INTER_AREA``          shrinking both ways: each pixel the mean of the source area it
                                                 covers (fractional edges weighted); otherwise OpenCV's "area"
                                                 linear weights
===================  ==========================  =============================================================

Each is one separable table of source indices and weights per axis (float64), applied to float
pixels. kohya works on 8-bit pixels: OpenCV and PIL round (PIL also between its two passes) and
clip to 0..255; here nothing is rounded, and the ``lanczos`` / ``bicubic`` overshoot is clipped to
``bounds`` (for PIL's filters after each pass, in Pillow 13's pass order: :func:`_pil_runs_down_first`;
``pillow=12`` or lower: across first, as A1111's pinned Pillow 9.5).
The result is therefore within about one 8-bit level of kohya's (tests/test_resize_interpolation.py
compares with PIL and with float64 formulas written out from OpenCV's ``resize.cpp``).

kohya's default (no ``resize_interpolation``) is ``area`` when the image shrinks both ways and
``lanczos`` otherwise (:func:`kohya_default`); training images (and their loss masks and face crops) take
it too, through :func:`interpolation_for`.
(:func:`sdadapt.images.scale_image` without a method — :func:`sdadapt.images.read_image`'s scaling
for the other commands — averages areas down and is bilinear up.)
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["RESIZE_INTERPOLATIONS", "check_interpolation", "interpolation_for", "kohya_default", "resample"]

#: the names kohya takes (``library/utils.py`` ``validate_interpolation_fn``)
RESIZE_INTERPOLATIONS = ("lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box")


def check_interpolation(name: object, *, where: str = "resize_interpolation") -> str:
    """``name`` if it is one of :data:`RESIZE_INTERPOLATIONS`.

    Raises:
        ValueError: another value, naming ``where`` and the names.
    """
    if name not in RESIZE_INTERPOLATIONS:
        raise ValueError(f"{where} must be one of {', '.join(RESIZE_INTERPOLATIONS)} (kohya's names), got {name!r}")
    return str(name)


def kohya_default(size: tuple[int, int], target: tuple[int, int]) -> str:
    """kohya's method without ``resize_interpolation``: ``area`` when ``target`` (h, w) is no
    larger than ``size`` (h, w) both ways, else ``lanczos``."""
    return "area" if size[0] >= target[0] and size[1] >= target[1] else "lanczos"


def interpolation_for(interpolation: str | None, size: tuple[int, int], target: tuple[int, int]) -> str:
    """The method kohya scales an image of ``size`` (h, w) to ``target`` (h, w) with: ``interpolation``
    (kohya's ``resize_interpolation``) when given, else :func:`kohya_default` (``area`` shrinking both
    ways, ``lanczos`` otherwise). The one place every training caller (bucket images, loss masks, face
    crops) decides it."""
    return interpolation or kohya_default(size, target)


def resample(image: Tensor, size: tuple[int, int], *, interpolation: str,
             bounds: tuple[float, float] | None = None, pillow: int = 13) -> Tensor:
    """``image`` (C, H, W) scaled to ``size`` (h, w) with kohya's ``interpolation`` (module docstring).

    Args:
        image: (C, H, W) floating-point pixels.
        size: the (h, w) to scale to.
        interpolation: one of :data:`RESIZE_INTERPOLATIONS`.
        bounds: clip the result to ``(low, high)`` (kohya's 8-bit pixels clip at 0 and 255:
            ``(-1, 1)`` for images in [-1, 1]); ``None``: no clipping.
        pillow: the Pillow major version whose pass order ``lanczos`` and ``box`` follow: 13 (and later) runs
            down first where :func:`_pil_runs_down_first`, 12 and before across first always — A1111 pins 9.5.0
            (:data:`sdadapt.pillow_resize.A1111_PILLOW`); kohya's bucket resize takes what a fresh install has, 13.

    Returns:
        (C, h, w) in ``image``'s dtype (computed in float32 at least).

    Raises:
        ValueError: an unknown ``interpolation`` or a size below 1.
    """
    check_interpolation(interpolation)
    h, w = size
    if h < 1 or w < 1:
        raise ValueError(f"size must be at least 1 x 1, got {size}")
    _, in_h, in_w = image.shape
    shrinking = in_h >= h and in_w >= w
    work = image.to(torch.promote_types(image.dtype, torch.float32))
    pil = interpolation in _PIL_FILTERS
    # PIL keeps 8-bit pixels between its two passes (clipped there too), so its pass order shows:
    # across then down, except down first where :func:`_pil_runs_down_first`; OpenCV: across then down
    dims = (1, 2) if pil and pillow >= 13 and _pil_runs_down_first((in_h, in_w), (h, w)) else (2, 1)
    out = work
    for i, dim in enumerate(dims):
        n_in, n_out = out.shape[dim], size[dim - 1]
        if dim == 2 and out.device.type == "cpu":  # (one sparse product: gathering along the last dim is ~20x slower)
            matrix = _host_matrix(interpolation, n_in, n_out, shrinking=shrinking, dtype=out.dtype)
            out = (out.reshape(-1, n_in) @ matrix).reshape(*out.shape[:-1], n_out)
        else:
            out = _apply(out, dim, *_table(interpolation, n_in, n_out, shrinking=shrinking, like=out))
        if bounds is not None and (pil or i == 1):
            out = out.clamp(*bounds)
    return out.to(image.dtype)


def _pil_runs_down_first(size: tuple[int, int], target: tuple[int, int]) -> bool:
    """Whether Pillow (13.0) resamples an image of ``size`` (H, W) to ``target`` (h, w) down (the vertical pass)
    first: when the height shrinks and the width grows, stays, or shrinks by less than half as many pixels
    as the height, ``h < H and 2·(w − W) > h − H``; else across first.

    Found by matching the installed Pillow 13.0.0's 8-bit ``resize`` bit for bit against a transcription of
    its ``libImaging/Resample.c`` fixed-point passes in both orders on random images: 387 random sizes up to
    160 px and 57 within two pixels of the boundary up to 500 px, each time one order exact and this rule
    picking it; the other order is off by up to 36 levels of 8 bits (0.28 on [-1, 1]) where Lanczos
    overshoot is clipped to 0..255 between the passes. Pillow 12 and before always ran across first
    (``ImagingResampleInner``); the change began as python-pillow/Pillow PR #9549 ("If height is being
    scaled down, but not width, resize vertically first"); the released rule reaches further
    (docs/samplers.md, "Lanczos pass order").
    """
    (H, W), (h, w) = size, target
    return h < H and 2 * (w - W) > h - H


def _apply(x: Tensor, dim: int, index: Tensor, weight: Tensor) -> Tensor:
    """``out[..., o, ...] = Σ_k weight[o, k] · x[..., index[o, k], ...]`` along ``dim``."""
    shape = [1] * x.ndim
    shape[dim] = index.shape[0]
    out = None
    for k in range(index.shape[1]):
        term = x.index_select(dim, index[:, k]) * weight[:, k].view(shape)
        out = term if out is None else out + term
    return out  # type: ignore[return-value]


def _table(name: str, n_in: int, n_out: int, *, shrinking: bool, like: Tensor) -> tuple[Tensor, Tensor]:
    """One axis: ``(index, weight)``, each (n_out, K), on ``like``'s device in its dtype (built once
    per size on the host, kept: a training image is scaled at each use)."""
    index, weight = _host_table(name, n_in, n_out, shrinking=shrinking)
    if like.device.type != "cpu":  # (training images are scaled on the host: this is for a caller's device tensor)
        index, weight = index.to(like.device, non_blocking=True), weight.to(like.device, non_blocking=True)
    return index, weight.to(like.dtype)


@functools.lru_cache(maxsize=64)
def _host_matrix(name: str, n_in: int, n_out: int, *, shrinking: bool, dtype: torch.dtype) -> Tensor:
    """:func:`_table` as an (n_in, n_out) sparse CSR matrix in ``dtype``: ``x (…, n_in) @ it`` is
    :func:`_apply` along the last dim (cached: callers must not write into it)."""
    index, weight = _host_table(name, n_in, n_out, shrinking=shrinking)
    rows = torch.arange(n_out).repeat_interleave(index.shape[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (torch's note that sparse CSR support is in beta)
        matrix = torch.sparse_coo_tensor(torch.stack([index.reshape(-1), rows]), weight.reshape(-1).to(dtype),
                                         (n_in, n_out), check_invariants=True)
        return matrix.coalesce().to_sparse_csr()


@functools.lru_cache(maxsize=256)
def _host_table(name: str, n_in: int, n_out: int, *, shrinking: bool) -> tuple[Tensor, Tensor]:
    """:func:`_table` on the host in float64 (cached: callers must not write into it)."""
    if name in ("lanczos", "box"):
        rows = _pil_rows(n_in, n_out, _PIL_FILTERS[name])
    elif name == "nearest":  # OpenCV's resizeNN_bitexact: 16-bit fixed point, pixel centres
        step = ((n_in << 16) + n_out // 2) // n_out
        first = step // 2 - n_in % 2
        rows = [[(min((step * o + first) >> 16, n_in - 1), 1.0)] for o in range(n_out)]
    elif name in ("bilinear", "linear"):
        rows = _cv2_rows(n_in, n_out, taps=2, area_mode=False)
    elif name in ("bicubic", "cubic"):
        rows = _cv2_rows(n_in, n_out, taps=4, area_mode=False)
    elif shrinking:  # area, shrinking both ways (OpenCV's resizeArea)
        rows = _area_rows(n_in, n_out)
    else:  # area, growing either way: OpenCV's linear weights in "area mode", both axes
        rows = _cv2_rows(n_in, n_out, taps=2, area_mode=True)
    k = max(len(r) for r in rows)
    index = torch.tensor([[i for i, _ in r] + [0] * (k - len(r)) for r in rows], dtype=torch.long)
    weight = torch.tensor([[v for _, v in r] + [0.0] * (k - len(r)) for r in rows], dtype=torch.float64)
    return index, weight


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x *= math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    return _sinc(x) * _sinc(x / 3.0) if -3.0 <= x < 3.0 else 0.0


def _box(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


#: PIL's filters (libImaging/Resample.c): (function, support)
_PIL_FILTERS: dict[str, tuple[Callable[[float], float], float]] = {"lanczos": (_lanczos, 3.0), "box": (_box, 0.5)}


def _pil_rows(n_in: int, n_out: int, filt: tuple[Callable[[float], float], float]) -> list[list[tuple[int, float]]]:
    """PIL's ``precompute_coeffs``: the filter stretched by the reduction, normalised per pixel."""
    function, support = filt
    scale = n_in / n_out
    filterscale = max(scale, 1.0)
    support *= filterscale
    rows = []
    for o in range(n_out):
        center = (o + 0.5) * scale
        lo = max(0, int(center - support + 0.5))
        hi = min(n_in, int(center + support + 0.5))
        taps = [(i, function((i - center + 0.5) / filterscale)) for i in range(lo, hi)]
        total = sum(v for _, v in taps)
        rows.append([(i, v / total if total != 0.0 else v) for i, v in taps])
    return rows


def _cubic_weights(x: float) -> list[float]:
    a = -0.75  # OpenCV's interpolateCubic
    w0 = ((a * (x + 1) - 5 * a) * (x + 1) + 8 * a) * (x + 1) - 4 * a
    w1 = ((a + 2) * x - (a + 3)) * x * x + 1
    w2 = ((a + 2) * (1 - x) - (a + 3)) * (1 - x) * (1 - x) + 1
    return [w0, w1, w2, 1.0 - w0 - w1 - w2]


def _cv2_rows(n_in: int, n_out: int, *, taps: int, area_mode: bool) -> list[list[tuple[int, float]]]:
    """OpenCV's ``resize`` tables for INTER_LINEAR (``taps=2``; ``area_mode``: INTER_AREA when
    enlarging) and INTER_CUBIC (``taps=4``): source positions, edge handling and weights."""
    scale, inverse = n_in / n_out, n_out / n_in
    rows = []
    for o in range(n_out):
        if area_mode:
            sx = math.floor(o * scale)
            fx = (o + 1) - (sx + 1) * inverse
            fx = 0.0 if fx <= 0 else fx - math.floor(fx)
        else:
            fx = (o + 0.5) * scale - 0.5
            sx = math.floor(fx)
            fx -= sx
        if taps == 2:
            if sx < 0:
                fx, sx = 0.0, 0
            if sx >= n_in - 1:
                fx, sx = 0.0, n_in - 1
            weights, first = [1.0 - fx, fx], sx
        else:
            weights, first = _cubic_weights(fx), sx - 1
        rows.append([(min(max(first + k, 0), n_in - 1), weights[k]) for k in range(taps)])
    return rows


def _area_rows(n_in: int, n_out: int) -> list[list[tuple[int, float]]]:
    """OpenCV's ``computeResizeAreaTab``: the source cells each target pixel covers, weighted by
    the covered share (a fractional cell at either end)."""
    scale = n_in / n_out
    rows = []
    for o in range(n_out):
        fsx1 = o * scale
        fsx2 = fsx1 + scale
        cell = min(scale, n_in - fsx1)
        sx1, sx2 = math.ceil(fsx1), math.floor(fsx2)
        sx2 = min(sx2, n_in - 1)
        sx1 = min(sx1, sx2)
        row = []
        if sx1 - fsx1 > 1e-3:
            row.append((sx1 - 1, (sx1 - fsx1) / cell))
        row += [(i, 1.0 / cell) for i in range(sx1, sx2)]
        if fsx2 - sx2 > 1e-3:
            row.append((sx2, min(min(fsx2 - sx2, 1.0), cell) / cell))
        rows.append(row)
    return rows
