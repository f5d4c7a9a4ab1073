"""Seamless tiling: A1111's "Tiling" — every convolution pads circularly, so the image wraps around its edges and tiles
without a seam.

A1111 (``modules/sd_hijack.py`` ``apply_circular``, called for every run from ``process_images_inner`` before the
init image is encoded) sets ``padding_mode = 'circular'`` on every layer of the loaded model whose type is exactly
``torch.nn.Conv2d`` — the UNet's and the VAE's (the text encoders have none) — and back to ``'zeros'`` when a run asks
for no tiling; its infotext says ``Tiling: True``. :func:`circular_padding` does the same for the models it is given,
for the length of a ``with`` block, and restores each layer's own mode after (on an error too). Nothing else changes:
the weights, the ``state_dict`` keys and every ``forward`` stay the user's.

Why it tiles: with circular padding a convolution commutes with a cyclic shift of its input, GroupNorm and the
position-free attention of SD's UNet and VAE do too, and stride-2 / nearest-×2 resampling does for even shifts — so
the UNet and the VAE decoder commute with ``torch.roll`` by a multiple of their total stride, and a deterministic
sampler run from rolled noise gives the rolled image (tests/test_tiling.py checks those). The VAE encoder's
downsampling pads ``(0, 1, 0, 1)`` with zeros itself (LDM's and diffusers' ``Downsample``), which circular padding
does not reach: an init image is encoded with that seam, in A1111 too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["TILING_FIELD", "circular_padding", "models_of"]

#: the infotext key A1111 writes for a tiled run ("Tiling: True", after "RNG")
TILING_FIELD = "Tiling"


def models_of(system: object) -> list[nn.Module]:
    """The modules of ``system`` that hold its convolutions: the system itself when it is an ``nn.Module`` (the toy),
    else its ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2`` that are modules (a
    :class:`~sdadapt.diffusers_system.DiffusersSystem`)."""
    if isinstance(system, nn.Module):
        return [system]
    found = (getattr(system, name, None) for name in ("unet", "vae", "text_encoder", "text_encoder_2"))
    return [module for module in found if isinstance(module, nn.Module)]


@contextmanager
def circular_padding(*models: nn.Module | None) -> Iterator[int]:
    """Inside the block every layer of ``models`` whose type is exactly ``torch.nn.Conv2d`` (A1111's rule: a subclass
    keeps its own padding) pads circularly; each layer's mode is restored on exit, on an error too. ``None`` entries
    are skipped, a layer shared by two models is changed once. Yields how many layers it changed.

    >>> conv = nn.Conv2d(1, 1, 3, padding=1)
    >>> with circular_padding(conv) as changed:
    ...     (changed, conv.padding_mode)
    (1, 'circular')
    >>> conv.padding_mode
    'zeros'
    """
    layers = {id(layer): layer for model in models if model is not None for layer in model.modules()
              if type(layer) is nn.Conv2d}
    before = [(layer, layer.padding_mode) for layer in layers.values()]
    try:
        for layer, _ in before:
            layer.padding_mode = "circular"
        yield len(before)
    finally:
        for layer, mode in before:
            layer.padding_mode = mode
