"""SD upscale (A1111's built-in img2img script ``scripts/sd_upscale.py``): the init image enlarged by an upscaler,
cut into overlapping tiles of the generation's size, each tile run through img2img, and the tiles blended back.

The geometry and the blend are A1111's ``modules/images.py`` on 8-bit PIL images:

* :func:`upscale_image` — the upscaler's ``Upscaler.upscale`` (``modules/upscaler.py``) for A1111's built-in ones:
  ``dest = int((w·scale) // 8·8)`` per side; unless the image covers it already, ``do_upscale`` to
  ``(int(w·scale), int(h·scale))`` (Lanczos or Nearest: PIL's resize; its loop stops once the image covers
  ``dest``), then a Lanczos resize to ``dest`` where that differs; "None": the image as it is;
* :func:`split_grid` — ``cols = ceil((W − overlap) / (tile_w − overlap))`` (rows likewise), the tiles spread evenly
  (``x = int(col·dx)``, ``dx = (W − tile_w) / (cols − 1)``), the last one flush with the edge;
* :func:`combine_grid` — each row's tiles pasted left to right, the ``overlap`` columns at a tile's left through a
  linear ramp ``uint8(i·255 / overlap)``, then the rows top to bottom the same way over ``overlap`` rows.

A run (``generate --sd-upscale SCALE``) samples the tiles in order with seeds ``seed + k`` (A1111's ``p.seed =
processed.seed + 1`` after each one-image batch; upscale ``n`` of ``--count`` starts at ``seed + n``) and writes the
combined image with the first tile's infotext (its ``Size`` the tile's, "SD upscale overlap" and "SD upscale
upscaler" among the fields), as A1111 saves it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "SD_UPSCALERS",
    "SD_UPSCALE_FIELDS",
    "TileGrid",
    "check_sd_upscale",
    "combine_grid",
    "pixel_upscaler",
    "split_grid",
    "upscale_image",
]

#: ``--sd-upscale-upscaler`` -> A1111's upscaler name (its built-in ones: ``modules/upscaler.py``)
SD_UPSCALERS: dict[str, str] = {"lanczos": "Lanczos", "nearest": "Nearest", "none": "None"}
#: A1111's infotext keys of the script (``p.extra_generation_params``): the overlap, the upscaler's name
SD_UPSCALE_FIELDS = ("SD upscale overlap", "SD upscale upscaler")


@dataclass(frozen=True)
class TileGrid:
    """A1111's ``Grid``: ``rows`` of ``(y, tile_h, [(x, tile_w), ...])`` and the tiles' PIL images in the same
    order, row by row (``tiles``); the image's size ``(width, height)``; the ``overlap`` in pixels."""

    rows: tuple[tuple[int, int, tuple[tuple[int, int], ...]], ...]
    tiles: tuple
    tile_size: tuple[int, int]
    size: tuple[int, int]
    overlap: int

    @property
    def uncovered(self) -> tuple[int, int]:
        """The pixels at the right and bottom edges no tile reaches ``(columns, rows)``: ``(0, 0)`` but where
        A1111's float steps round the last tile's place down without reaching the clamp (``int(22 * (109 / 22))``
        is 108: a 117 px high image in 8 px tiles overlapping by 3), where :func:`combine_grid` leaves those pixels
        black, as A1111's does."""
        last_y, last_h, last_row = self.rows[-1]
        return (self.size[0] - max(x + w for x, w in last_row), self.size[1] - (last_y + last_h))

    @property
    def faded(self) -> tuple[int, int]:
        """The pixels at the left and top edges :func:`combine_grid` blends with black ``(columns, rows)``, as A1111's
        does: ``(0, 0)`` but for an image narrower (lower) than a tile, whose one tile per row (column) starts before
        the edge (``x = W - tile_w < 0``) and is pasted through the overlap's ramp like any later tile — over the
        black of the empty image, ``overlap + x`` columns of it inside the image, fading from black."""
        y, _, row = self.rows[0]
        x = row[0][0]
        return (min(self.size[0], max(0, x + self.overlap)) if x < 0 else 0,
                min(self.size[1], max(0, y + self.overlap)) if y < 0 else 0)


def pixel_upscaler(option: str, text: str, labels: dict[str, str], *, device: str = "cpu",
                   folder: str | None = None):
    """``text`` of an upscaler option: one of ``labels``' names (either spelling: :func:`canonical_choice`), returned
    as its name, or an ESRGAN model file (``.pth`` / ``.safetensors``: A1111's ``models/ESRGAN``) — its path, or with
    ``folder`` A1111's name of one there (:func:`sdadapt.esrgan.upscaler_in_folder`) — returned as an
    :class:`sdadapt.esrgan.EsrganUpscaler` on ``device`` (loaded when first used; its ``name`` A1111's).

    Raises:
        ValueError: neither (the names listed), or a model file that does not exist.
    """
    from pathlib import Path

    from .sampler_tables import canonical_choice

    path = Path(str(text))
    known = {*labels, *(label.lower() for label in labels.values())}
    if folder is not None and not path.is_file() and str(text).lower() not in known:
        from .esrgan import upscaler_in_folder

        path = upscaler_in_folder(str(text), folder) or path
    if path.suffix.lower() in (".pth", ".pt", ".safetensors", ".ckpt", ".bin") or path.is_file():
        if not path.is_file():
            raise ValueError(f"{option} {text}: no such file (an ESRGAN upscaler model, .pth or .safetensors)")
        from .esrgan import EsrganUpscaler

        return EsrganUpscaler(path, device=device)
    try:
        return canonical_choice(option, str(text), labels)
    except ValueError as exc:
        raise ValueError(f"{exc}; or an ESRGAN model file (.pth / .safetensors: R-ESRGAN 4x+, 4x-UltraSharp, ... — "
                         "other upscaler architectures are not run here)") from None


def check_sd_upscale(scale: float, overlap: int, upscaler: str, *, device: str = "cpu"):
    """The upscaler for ``upscaler``: A1111's name of a built-in one (:data:`SD_UPSCALERS`, either spelling) or an
    ESRGAN model file's :class:`sdadapt.esrgan.EsrganUpscaler` (:func:`pixel_upscaler`), the other settings checked
    before the model's size is known (the overlap against the tile's sides: :func:`split_grid`).

    Raises:
        ValueError: a scale that is not a finite number above 0, a negative overlap, an unknown upscaler.
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"--sd-upscale is the scale factor, a number above 0 (A1111's slider: 1 to 4), got {scale}")
    chosen = pixel_upscaler("--sd-upscale-upscaler", upscaler, SD_UPSCALERS, device=device)
    if overlap < 0:
        raise ValueError(f"--sd-upscale-overlap must be at least 0 and below the tile's sides (--width x --height; "
                         f"A1111's slider: 0 to 256), got {overlap}")
    return SD_UPSCALERS[chosen] if isinstance(chosen, str) else chosen


def upscale_image(image, scale: float, *, upscaler: str | Callable = "Lanczos"):
    """A1111's ``Upscaler.upscale(image, scale)`` on a PIL image (module docstring) for its built-in ``upscaler``
    ("Lanczos", "Nearest"; "None": ``image`` as it is) or a model's ``do_upscale`` (a callable, PIL image -> the
    image enlarged by the model's own scale: :class:`sdadapt.esrgan.EsrganUpscaler`). Its PIL resizes run in the pass
    order of A1111's Pillow 9.5 on any Pillow (:func:`sdadapt.pillow_resize.resize_across_first`). Returns a PIL
    image."""
    from PIL import Image

    from .pillow_resize import resize_across_first

    if isinstance(upscaler, str) and upscaler == "None":
        return image
    if isinstance(upscaler, str):
        resample = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}[upscaler]

        def do_upscale(img):
            return resize_across_first(img, (int(img.width * scale), int(img.height * scale)), resample)
    else:
        do_upscale = upscaler
    dest_w, dest_h = int((image.width * scale) // 8 * 8), int((image.height * scale) // 8 * 8)
    for i in range(3):  # (its loop: a do_upscale until the image covers dest, or stops growing; at scale 1 one)
        if image.width >= dest_w and image.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = image.size
        image = do_upscale(image)
        if shape == image.size:
            break
    if image.size != (dest_w, dest_h):
        image = resize_across_first(image, (int(dest_w), int(dest_h)), Image.LANCZOS)
    return image


def split_grid(image, *, tile_w: int, tile_h: int, overlap: int) -> TileGrid:
    """A1111's ``images.split_grid``: the PIL ``image`` cut into ``tile_w`` x ``tile_h`` tiles overlapping by
    ``overlap`` pixels (module docstring). Returns a :class:`TileGrid`.

    An image smaller than a tile gets one tile that reaches past it (``x = w - tile_w`` below 0: PIL's crop fills
    with black there), as in A1111 (its SD upscale and ESRGAN tiling of a small image); :attr:`TileGrid.faded` says
    where its blend then fades the image's edge.

    Raises:
        ValueError: an overlap not below the tile's sides; an image no larger than the overlap (A1111's formula gives
            it no tile: its result would be black).
    """
    w, h = image.size
    if not 0 <= overlap < min(tile_w, tile_h):
        raise ValueError(f"SD upscale: the overlap must be at least 0 and below the tile's sides, got {overlap}")
    if min(w, h) <= overlap:
        raise ValueError(f"SD upscale: the {w}x{h} image is no larger than the {overlap} px overlap, which leaves it "
                         "no tile (A1111's result is black); lower the overlap or raise the scale")
    cols = math.ceil((w - overlap) / (tile_w - overlap))
    rows = math.ceil((h - overlap) / (tile_h - overlap))
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    layout, tiles = [], []
    for row in range(rows):
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        row_tiles = []
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            tiles.append(image.crop((x, y, x + tile_w, y + tile_h)))
            row_tiles.append((x, tile_w))
        layout.append((y, tile_h, tuple(row_tiles)))
    return TileGrid(tuple(layout), tuple(tiles), (tile_w, tile_h), (w, h), overlap)


def combine_grid(grid: TileGrid, tiles: list | tuple | None = None):
    """A1111's ``images.combine_grid``: the tiles (``tiles``: PIL images in :attr:`TileGrid.tiles`' order, e.g. the
    img2img results; ``None``: the grid's own) blended back into an RGB image of the grid's size over linear ramps
    in the overlaps (module docstring). Returns a PIL RGB image.

    Raises:
        ValueError: another number of tiles than the grid has.
    """
    import numpy as np
    from PIL import Image

    tiles = list(grid.tiles if tiles is None else tiles)
    if len(tiles) != len(grid.tiles):
        raise ValueError(f"SD upscale: {len(tiles)} tiles for a grid of {len(grid.tiles)}")
    overlap, (_, tile_h), (width, height) = grid.overlap, grid.tile_size, grid.size

    def ramp(values):
        return Image.fromarray((values * 255 / overlap).astype(np.uint8), "L")

    if overlap:
        mask_w = ramp(np.arange(overlap, dtype=np.float32).reshape((1, overlap)).repeat(tile_h, axis=0))
        mask_h = ramp(np.arange(overlap, dtype=np.float32).reshape((overlap, 1)).repeat(width, axis=1))
    combined = Image.new("RGB", (width, height))
    index = 0
    for y, h, row in grid.rows:
        combined_row = Image.new("RGB", (width, h))
        for x, w in row:
            tile = tiles[index]
            index += 1
            if x == 0:
                combined_row.paste(tile, (0, 0))
                continue
            if overlap:
                combined_row.paste(tile.crop((0, 0, overlap, h)), (x, 0), mask=mask_w)
            combined_row.paste(tile.crop((overlap, 0, w, h)), (x + overlap, 0))
        if y == 0:
            combined.paste(combined_row, (0, 0))
            continue
        if overlap:
            combined.paste(combined_row.crop((0, 0, combined_row.width, overlap)), (0, y), mask=mask_h)
        combined.paste(combined_row.crop((0, overlap, combined_row.width, h)), (0, y + overlap))
    return combined
