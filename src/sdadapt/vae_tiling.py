"""VAE tiling (``generate --vae-tiling``): the VAE decodes and encodes an image in overlapping tiles, blended at the
seams, so a large image needs the memory of one tile — diffusers' ``AutoencoderKL.enable_tiling`` (its pipelines'
``enable_vae_tiling``; tiles of the VAE config's ``sample_size`` pixels, a quarter overlapping), run by diffusers
itself, so the image is diffusers' tiled one bit for bit. Images no larger than a tile are decoded whole."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

__all__ = ["tiled_vae"]


@contextlib.contextmanager
def tiled_vae(*systems: object) -> Iterator[None]:
    """Within the block, the VAE of each of ``systems`` (``None`` entries skipped) decodes and encodes in tiles
    (diffusers' ``use_tiling``); each VAE's own setting is restored after.

    Raises:
        ValueError: a system without a diffusers VAE that tiles (the toy model), named by its class.
    """
    vaes = []
    for system in systems:
        if system is None:
            continue
        vae = getattr(system, "vae", None)
        if vae is None or not hasattr(vae, "use_tiling") or not hasattr(vae, "enable_tiling"):
            raise ValueError(f"--vae-tiling: {type(system).__name__} has no diffusers VAE that decodes in tiles (the "
                             "toy model's images are whole); leave it out")
        vaes.append((vae, vae.use_tiling))
    try:
        for vae, _ in vaes:
            vae.enable_tiling()
        yield
    finally:
        for vae, before in vaes:
            vae.use_tiling = before
