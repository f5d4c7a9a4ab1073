"""Poor man's outpainting (A1111's built-in img2img script ``scripts/poor_mans_outpainting.py``): the image pasted on
a larger black canvas, and the tiles that reach past it inpainted one by one with the new border masked.

:func:`outpainting_canvas` is the script's geometry on PIL images: each chosen side grows by ``pixels``, the canvas
rounded up to multiples of 64 (the extra shared between the two sides of an axis in proportion); the image mask is
white (repaint) but for the image's area shrunk by ``2·mask_blur`` on each grown side, the latent mask the same
shrunk by ``mask_blur // 2``; the canvas and both masks are cut by :func:`sdadapt.sd_upscale.split_grid` into tiles of
the generation's size overlapping by ``pixels``, and only the tiles that reach outside the image's area are run
(inpainting, A1111's "Whole picture", the mask blurred by ``2·mask_blur``, the latent mask given apart: A1111's
``p.latent_mask``) — seed ``seed + k`` for the k-th of them — and blended back by
:func:`sdadapt.sd_upscale.combine_grid`, the other tiles the canvas's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .sd_upscale import TileGrid, split_grid

__all__ = ["OUTPAINT_DIRECTIONS", "OutpaintingCanvas", "check_outpainting", "outpainting_canvas", "side_amounts"]

#: the sides the script grows, in its order
OUTPAINT_DIRECTIONS = ("left", "right", "up", "down")


@dataclass(frozen=True)
class OutpaintingCanvas:
    """The script's canvas cut into tiles: ``grid`` (the canvas's, :class:`~sdadapt.sd_upscale.TileGrid`), the image
    mask's and the latent mask's tiles in the same order (``masks``, ``latent_masks``: PIL ``L``), ``run`` the
    indices of the tiles that are inpainted (those reaching outside the image's area), ``borders`` the
    ``(left, right, up, down)`` pixels added."""

    grid: TileGrid
    masks: tuple
    latent_masks: tuple
    run: tuple[int, ...]
    borders: tuple[int, int, int, int]


def check_outpainting(pixels: int, mask_blur: int, directions, *, option: str = "--outpaint") -> tuple[str, ...]:
    """``directions`` as a tuple, the settings checked (``option``: the script's flag, for the message).

    Raises:
        ValueError: no direction or an unknown one, ``pixels`` not above 0, a negative blur.
    """
    directions = tuple(directions)
    unknown = [d for d in directions if d not in OUTPAINT_DIRECTIONS]
    if not directions or unknown:
        raise ValueError(f"--outpaint-directions takes {', '.join(OUTPAINT_DIRECTIONS)}, got {list(directions)}")
    if isinstance(pixels, bool) or not isinstance(pixels, int) or pixels <= 0 or mask_blur < 0:
        raise ValueError(f"{option} takes pixels above 0 (A1111's slider: 8 to 256) and --outpaint-mask-blur at "
                         f"least 0, got {pixels} and {mask_blur}")
    return directions


def side_amounts(width: int, height: int, pixels: int, directions) -> dict[str, int]:
    """How many pixels each side of a ``width`` x ``height`` image grows, as both A1111 outpainting scripts share them
    out (poor man's and mk2: ``target = ceil((W + left + right) / 64) · 64``, ``left = left·(target − W) // (left +
    right)``, ``right = target − W − left``; rows alike): ``{side: amount}`` over :data:`OUTPAINT_DIRECTIONS`, 0 for a
    side not in ``directions``. A 512 x 512 image grown 8 on every side gets 32 per side (576 x 576)."""
    left, right, up, down = (pixels if side in directions else 0 for side in OUTPAINT_DIRECTIONS)
    target_w = math.ceil((width + left + right) / 64) * 64
    target_h = math.ceil((height + up + down) / 64) * 64
    if left > 0:
        left = left * (target_w - width) // (left + right)
    if right > 0:
        right = target_w - width - left
    if up > 0:
        up = up * (target_h - height) // (up + down)
    if down > 0:
        down = target_h - height - up
    return dict(zip(OUTPAINT_DIRECTIONS, (left, right, up, down)))


def outpainting_canvas(image, *, pixels: int, mask_blur: int, directions=OUTPAINT_DIRECTIONS, tile_w: int,
                       tile_h: int) -> OutpaintingCanvas:
    """A1111's Poor man's outpainting up to its img2img calls, on the PIL RGB ``image`` (module docstring).

    Raises:
        ValueError: no direction or an unknown one, ``pixels`` not above 0, a negative blur, a canvas smaller than a
            tile or an overlap not below the tile's sides (:func:`~sdadapt.sd_upscale.split_grid`).
    """
    from PIL import Image, ImageDraw

    directions = check_outpainting(pixels, mask_blur, directions)
    left, right, up, down = side_amounts(image.width, image.height, pixels, directions).values()
    # (the canvas is the rounded size on both axes, a side that does not grow included: the image sits at the top left)
    target_w = math.ceil((image.width + (pixels if "left" in directions else 0) + (pixels if "right" in directions else 0))
                         / 64) * 64
    target_h = math.ceil((image.height + (pixels if "up" in directions else 0) + (pixels if "down" in directions else 0))
                         / 64) * 64
    canvas = Image.new("RGB", (target_w, target_h))
    canvas.paste(image, (left, up))

    def mask_inside(margin: int):
        mask = Image.new("L", canvas.size, "white")
        ImageDraw.Draw(mask).rectangle((left + (margin if left > 0 else 0), up + (margin if up > 0 else 0),
                                        target_w - right - (margin if right > 0 else 0),
                                        target_h - down - (margin if down > 0 else 0)), fill="black")
        return mask

    grid = split_grid(canvas, tile_w=tile_w, tile_h=tile_h, overlap=pixels)
    masks = split_grid(mask_inside(mask_blur * 2), tile_w=tile_w, tile_h=tile_h, overlap=pixels).tiles
    latent_masks = split_grid(mask_inside(mask_blur // 2), tile_w=tile_w, tile_h=tile_h, overlap=pixels).tiles
    run, index = [], 0
    for y, h, row in grid.rows:
        for x, w in row:
            if not (x >= left and x + w <= target_w - right and y >= up and y + h <= target_h - down):
                run.append(index)
            index += 1
    return OutpaintingCanvas(grid, masks, latent_masks, tuple(run), (left, right, up, down))
