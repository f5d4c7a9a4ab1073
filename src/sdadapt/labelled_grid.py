"""A1111's image grids (``modules/images.py``): the cells side by side (``image_grid``) and the labels around them
(``draw_grid_annotations``), as its X/Y/Z plot and prompt matrix scripts draw them.

:func:`cells_grid` is numpy only; :func:`annotate_grid` draws the text with Pillow (``sdadapt[images]``), imported
when called.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np

__all__ = ["GridLabel", "annotate_grid", "cells_grid"]


#: a label's lines: its text, or A1111's ``GridAnnotation`` lines as ``(text, active)`` (an inactive one grey and
#: struck through: the prompt matrix's parts left out)
GridLabel = str | Sequence[tuple[str, bool]]


def cells_grid(images: Sequence[np.ndarray], *, rows: int) -> np.ndarray:
    """A1111's ``images.image_grid``: ``images`` ``(H, W, 3)`` uint8 in ``rows`` rows (at most one per image) of
    ``ceil(n / rows)`` columns, each cell the largest image's size, a smaller image centred in its cell, on A1111's
    default grid background (white) -> ``(rows·H, cols·W, 3)`` uint8."""
    rows = min(rows, len(images))
    cols = math.ceil(len(images) / rows)
    h = max(image.shape[0] for image in images)
    w = max(image.shape[1] for image in images)
    grid = np.full((rows * h, cols * w, 3), 255, dtype=np.uint8)
    for i, image in enumerate(images):
        top = i // cols * h + (0 if image.shape[0] == h else (h - image.shape[0]) // 2)
        left = i % cols * w + (0 if image.shape[1] == w else (w - image.shape[1]) // 2)
        grid[top:top + image.shape[0], left:left + image.shape[1]] = image[..., :3]
    return grid


def _font_maker(font: str | os.PathLike | None) -> Callable[[int], object]:
    """``size -> font``: ``font`` (a TrueType file, A1111's ``opts.font``) or Pillow's own scalable font."""
    from PIL import ImageFont

    def make(size: int) -> object:
        if font is not None:
            return ImageFont.truetype(str(font), max(size, 1))
        try:
            return ImageFont.load_default(size=max(size, 1))
        except TypeError:  # pragma: no cover - Pillow before 10.1: its one bitmap font
            return ImageFont.load_default()

    return make


def annotate_grid(grid: np.ndarray, width: int, height: int, hor_texts: Sequence[GridLabel],
                  ver_texts: Sequence[GridLabel], *, margin: int = 0,
                  font: str | os.PathLike | None = None) -> np.ndarray:
    """A1111's ``images.draw_grid_annotations``: ``grid`` ``(rows·height, cols·width, 3)`` with a column label above
    each column and a row label left of each row, the cells ``margin`` px apart on white -> the annotated image
    ``(H', W', 3)`` uint8.

    A1111's layout: font size ``(width + height) // 25``, line spacing half of it; each label line wrapped at word
    breaks to the column width (the row labels to ``width * 3 // 4``, the left pad, when any row label has text); a
    line still too wide drawn a point smaller until it fits; centred on its cell, black, or for an inactive line
    (``(text, False)``) A1111's grey ``#999999`` struck through by a 4 px line. ``font``: a TrueType file (A1111's
    "Font for image grids"; A1111 ships Roboto); default Pillow's own (Pillow 10.1+), so the letters look
    otherwise than A1111's where the fonts differ, laid out by the same rules.

    Raises:
        ImportError: without Pillow (``pip install sdadapt[images]``).
        ValueError: a label count that is not the grid's columns / rows.
    """
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise ImportError("the grid's legend is drawn with Pillow: pip install 'sdadapt[images]' (or pillow), or leave "
                          "the legend out") from None
    cols, rows = grid.shape[1] // width, grid.shape[0] // height
    if cols != len(hor_texts) or rows != len(ver_texts):
        raise ValueError(f"{len(hor_texts)} column and {len(ver_texts)} row labels for a grid of {cols}x{rows} cells")
    hor_lines = [[(label, True)] if isinstance(label, str) else list(label) for label in hor_texts]
    ver_lines = [[(label, True)] if isinstance(label, str) else list(label) for label in ver_texts]
    get_font = _font_maker(font)
    fontsize = (width + height) // 25
    line_spacing = fontsize // 2
    fnt = get_font(fontsize)
    pad_left = 0 if sum(len(text) for lines in ver_lines for text, _ in lines) == 0 else width * 3 // 4
    calc = ImageDraw.Draw(Image.new("RGB", (1, 1), (255, 255, 255)))

    def wrap(text: str, allowed: int) -> list[str]:
        lines = [""]
        for word in text.split():
            line = f"{lines[-1]} {word}".strip()
            if calc.textlength(line, font=fnt) <= allowed:
                lines[-1] = line
            else:
                lines.append(word)
        return lines

    def laid_out(labels: list[list[tuple[str, bool]]], allowed: int) -> list[list[tuple[str, bool, tuple, int]]]:
        out = []
        for label in labels:
            lines = []
            for text, active in label:
                for line in wrap(text, allowed):
                    box = calc.multiline_textbbox((0, 0), line, font=fnt)
                    lines.append((line, active, (box[2] - box[0], box[3] - box[1]), allowed))
            out.append(lines)
        return out

    hor, ver = laid_out(hor_lines, width), laid_out(ver_lines, pad_left)
    hor_heights = [sum(size[1] + line_spacing for _, _, size, _ in lines) - line_spacing for lines in hor]
    ver_heights = [sum(size[1] + line_spacing for _, _, size, _ in lines) - line_spacing * len(lines) for lines in ver]
    pad_top = 0 if sum(hor_heights) == 0 else max(hor_heights) + line_spacing * 2
    result = Image.new("RGB", (grid.shape[1] + pad_left + margin * (cols - 1),
                               grid.shape[0] + pad_top + margin * (rows - 1)), (255, 255, 255))
    for row in range(rows):
        for col in range(cols):
            cell = grid[height * row:height * (row + 1), width * col:width * (col + 1)]
            result.paste(Image.fromarray(np.ascontiguousarray(cell)),
                         (pad_left + (width + margin) * col, pad_top + (height + margin) * row))
    draw = ImageDraw.Draw(result)
    inactive = (153, 153, 153)

    def draw_texts(x: float, y: float, lines: list[tuple[str, bool, tuple, int]]) -> None:
        for text, active, size, allowed in lines:
            font_now, points = fnt, fontsize
            while True:
                box = draw.multiline_textbbox((0, 0), text, font=font_now)
                if box[2] - box[0] > allowed and points > 0:
                    points -= 1
                    font_now = get_font(points)
                else:
                    break
            draw.multiline_text((x, y + size[1] / 2), text, font=font_now, fill=(0, 0, 0) if active else inactive,
                                anchor="mm", align="center")
            if not active:
                draw.line((x - size[0] // 2, y + size[1] // 2, x + size[0] // 2, y + size[1] // 2), fill=inactive,
                          width=4)
            y += size[1] + line_spacing

    for col in range(cols):
        draw_texts(pad_left + (width + margin) * col + width / 2, pad_top / 2 - hor_heights[col] / 2, hor[col])
    for row in range(rows):
        draw_texts(pad_left / 2, pad_top + (height + margin) * row + height / 2 - ver_heights[row] / 2, ver[row])
    return np.array(result)
