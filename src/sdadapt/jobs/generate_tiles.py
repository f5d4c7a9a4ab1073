"""``generate --init-image IMG`` with one of A1111's tiled img2img scripts — "SD upscale" (``--sd-upscale``:
:mod:`sdadapt.sd_upscale`) and "Poor man's outpainting" (``--outpaint``: :mod:`sdadapt.outpainting`): the image cut
into tiles of the generation's size, the tiles to run written as PNGs (with their masks) into a folder the run
removes — so each reaches the VAE exactly as A1111 hands it over, the same 8-bit pixels — each run through
:func:`sdadapt.jobs.generate.run_generate`'s loop, the results blended back."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..sd_upscale import TileGrid

__all__ = ["TiledRun", "outpainting_tiles", "sd_upscale_tiles"]


@dataclass
class TiledRun:
    """The tiles of one tiled run: ``grid`` (:class:`~sdadapt.sd_upscale.TileGrid`), ``run`` the indices of the
    tiles that are generated (the others stay the grid's own), ``sources`` their ``(image, mask, latent mask)``
    PNGs (the masks ``None`` for plain img2img); :meth:`add` collects each generated tile and returns the blend of
    a full set."""

    grid: TileGrid
    run: tuple[int, ...]
    sources: tuple[tuple[Path, Path | None, Path | None], ...]
    done: list = field(default_factory=list)

    def add(self, image: Tensor) -> Tensor | None:
        """Collect one run tile's generated image (3, h, w) in [-1, 1] (8-bit as its PNG would be); returns the
        combined image (H, W, 3) uint8 once every run tile is in (and starts the next set), else ``None``."""
        from PIL import Image

        from ..images import to_uint8
        from ..sd_upscale import combine_grid

        self.done.append(Image.fromarray(np.ascontiguousarray(to_uint8(image.detach().float().cpu())), "RGB"))
        if len(self.done) < len(self.run):
            return None
        tiles = list(self.grid.tiles)
        for index, tile in zip(self.run, self.done):
            tiles[index] = tile
        self.done = []
        return torch.from_numpy(np.array(combine_grid(self.grid, tiles)))


def _written(folder: str | os.PathLike, name: str, image) -> Path:
    """A PIL image (RGB or L) as a PNG in ``folder``."""
    from ..images import write_png

    pixels = np.array(image)
    return write_png(Path(folder) / name, torch.from_numpy(pixels if pixels.ndim == 3 else pixels[..., None]))


def sd_upscale_tiles(init_image: str | os.PathLike, folder: str | os.PathLike, *, scale: float, overlap: int,
                     upscaler: object, width: int, height: int) -> TiledRun:
    """A1111's SD upscale script up to its img2img calls: the ``init_image`` file flattened on white
    (:func:`sdadapt.resize_modes.open_init_image`), enlarged by ``upscaler`` (an A1111 name, "Lanczos", "Nearest",
    "None") at ``scale`` (:func:`sdadapt.sd_upscale.upscale_image`), cut into ``width`` x ``height`` tiles overlapping
    by ``overlap`` (:func:`sdadapt.sd_upscale.split_grid`), every tile run, written as PNGs into ``folder``.

    Raises:
        ValueError: an unreadable image, a bad overlap (or an upscaled image no larger than it).
    """
    from ..resize_modes import open_init_image
    from ..sd_upscale import split_grid, upscale_image

    image = upscale_image(open_init_image(init_image), scale, upscaler=upscaler)
    grid = split_grid(image, tile_w=width, tile_h=height, overlap=overlap)
    sources = tuple((_written(folder, f"tile-{k:03d}.png", tile), None, None) for k, tile in enumerate(grid.tiles))
    return TiledRun(grid, tuple(range(len(grid.tiles))), sources)


def outpainting_tiles(init_image: str | os.PathLike, folder: str | os.PathLike, *, pixels: int, mask_blur: int,
                      directions, width: int, height: int) -> TiledRun:
    """A1111's Poor man's outpainting up to its img2img calls: the ``init_image`` file flattened on white, on the
    grown canvas (:func:`sdadapt.outpainting.outpainting_canvas`), the tiles reaching past the image written with
    their image mask and latent mask as PNGs into ``folder``.

    Raises:
        ValueError: an unreadable image, bad settings, a canvas smaller than a tile.
    """
    from ..outpainting import outpainting_canvas
    from ..resize_modes import open_init_image

    canvas = outpainting_canvas(open_init_image(init_image), pixels=pixels, mask_blur=mask_blur,
                                directions=directions, tile_w=width, tile_h=height)
    sources = tuple((_written(folder, f"tile-{k:03d}.png", canvas.grid.tiles[k]),
                     _written(folder, f"mask-{k:03d}.png", canvas.masks[k]),
                     _written(folder, f"latent-{k:03d}.png", canvas.latent_masks[k])) for k in canvas.run)
    return TiledRun(canvas.grid, canvas.run, sources)
