"""Pillow's ``Image.resize`` as A1111 runs it, whatever Pillow is installed.

PIL resizes in two separable passes and keeps 8-bit pixels between them (rounded, clipped to 0..255), so the
order of the passes shows wherever the first pass overshoots (Lanczos, bicubic): up to 36 levels of 8 bits on
random pixels. Pillow 12 and before ran the horizontal pass first, always; Pillow 13 runs the vertical pass first
when the height shrinks and ``2·(w − W) > h − H`` (``sdadapt.resampling._pil_runs_down_first``; docs/samplers.md,
"Lanczos pass order"). A1111 and Forge pin ``Pillow==9.5.0`` (``requirements_versions.txt``), so their images
were resized across first, while a fresh install of sdadapt gets the current Pillow.

:func:`resize_across_first` is ``image.resize(size, resample, box)`` with Pillow 12's pass order on any Pillow:
two single-axis resizes — each one PIL pass, the same code in every version — the horizontal one first, through
an 8-bit image as Pillow's own two-axis resize goes (``RGBA``/``LA`` premultiplied around both passes, as Pillow
does around its one call). Every place sdadapt reproduces an A1111 resize with PIL calls it.
"""

from __future__ import annotations

__all__ = ["A1111_PILLOW", "resize_across_first"]

#: the Pillow major version A1111 and Forge run (``requirements_versions.txt``: ``Pillow==9.5.0``): its resize
#: runs the horizontal pass first (``sdadapt.resampling.resample(..., pillow=A1111_PILLOW)`` for float pixels)
A1111_PILLOW = 9

_PREMULTIPLIED = {"RGBA": "RGBa", "LA": "La"}


def resize_across_first(image, size: tuple[int, int], resample=None,
                        box: tuple[float, float, float, float] | None = None):
    """``image.resize(size, resample, box)`` (a PIL image, ``size`` = (width, height)) as Pillow 12 and before
    compute it (module docstring): equal to it bit for bit there, and on Pillow 13 wherever that version also runs
    across first. ``resample`` ``None``: Pillow's default (bicubic; nearest for ``1``/``P`` images). Returns a
    new PIL image of ``size``."""
    from PIL import Image

    filters = getattr(Image, "Resampling", Image)  # (Pillow 9.0: the constants on Image)
    width, height = (int(v) for v in size)
    if resample is None:
        resample = filters.NEAREST if image.mode in ("1", "P") else filters.BICUBIC
    x0, y0, x1, y1 = (0.0, 0.0, float(image.width), float(image.height)) if box is None else box
    horizontal = width != x1 - x0 or x0 != 0
    vertical = height != y1 - y0 or y0 != 0
    if resample == filters.NEAREST or image.mode in ("1", "P") or not (horizontal and vertical):
        return image.resize((width, height), resample, box)  # (one pass, or no 8-bit step between passes)
    mode = image.mode
    work = image.convert(_PREMULTIPLIED[mode]) if mode in _PREMULTIPLIED else image
    across = work.resize((width, work.height), resample, (x0, 0, x1, work.height))  # all rows: the same values
    out = across.resize((width, height), resample, (0, y0, width, y1))
    return out.convert(mode) if mode in _PREMULTIPLIED else out
