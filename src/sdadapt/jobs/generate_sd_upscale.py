"""``generate --init-image IMG --sd-upscale SCALE``: A1111's "SD upscale" img2img script from files — the image
enlarged and cut into tiles of the generation's size (:mod:`sdadapt.sd_upscale` holds the rules), each tile an
img2img run of :func:`sdadapt.jobs.generate.run_generate`'s loop (a PNG per tile in a folder the run removes, so
the tile reaches the VAE exactly as A1111 hands it over: the same 8-bit pixels), the results blended back."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..sd_upscale import TileGrid

__all__ = ["SdUpscaleTiles", "sd_upscale_tiles"]


@dataclass
class SdUpscaleTiles:
    """The tiles of one SD upscale run: ``grid`` (:class:`~sdadapt.sd_upscale.TileGrid`), ``files`` the tiles as
    PNGs (in ``grid.tiles``' order), ``upscaler`` the upscaler's A1111 name; :meth:`add` collects each tile's
    image, :meth:`combined` blends a full set."""

    grid: TileGrid
    files: tuple[Path, ...]
    upscaler: str
    done: list = field(default_factory=list)

    def add(self, image: Tensor) -> Tensor | None:
        """Collect one tile's generated image (3, h, w) in [-1, 1] (8-bit as its PNG would be); returns the combined
        image (H, W, 3) uint8 once every tile of the grid is in (and starts the next set), else ``None``."""
        from PIL import Image

        from ..images import to_uint8
        from ..sd_upscale import combine_grid

        self.done.append(Image.fromarray(np.ascontiguousarray(to_uint8(image.detach().float().cpu())), "RGB"))
        if len(self.done) < len(self.files):
            return None
        combined = combine_grid(self.grid, self.done)
        self.done = []
        return torch.from_numpy(np.array(combined))


def sd_upscale_tiles(init_image: str | os.PathLike, folder: str | os.PathLike, *, scale: float, overlap: int,
                     upscaler: str, width: int, height: int) -> SdUpscaleTiles:
    """A1111's SD upscale script up to its img2img calls: the ``init_image`` file flattened on white
    (:func:`sdadapt.resize_modes.open_init_image`), enlarged by ``upscaler`` (an A1111 name, "Lanczos", "Nearest",
    "None") at ``scale`` (:func:`sdadapt.sd_upscale.upscale_image`), cut into ``width`` x ``height`` tiles overlapping
    by ``overlap`` (:func:`sdadapt.sd_upscale.split_grid`), written as PNGs into ``folder``.

    Raises:
        ValueError: an unreadable image, an upscaled image smaller than a tile, a bad overlap.
    """
    from ..images import write_png
    from ..resize_modes import open_init_image
    from ..sd_upscale import split_grid, upscale_image

    image = upscale_image(open_init_image(init_image), scale, upscaler=upscaler)
    grid = split_grid(image, tile_w=width, tile_h=height, overlap=overlap)
    files = tuple(write_png(Path(folder) / f"tile-{k:03d}.png", torch.from_numpy(np.array(tile)))
                  for k, tile in enumerate(grid.tiles))
    return SdUpscaleTiles(grid, files, upscaler)
