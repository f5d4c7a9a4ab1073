"""The image-size rule of a Stable Diffusion model read from its configs or file header — without
loading its weights — so ``generate`` refuses a size the model cannot make before the load."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = ["model_size_multiple"]

#: LDM single-file keys of a downsampling step: the UNet's ``input_blocks.N.0.op`` and the VAE
#: encoder's ``down.N.downsample`` (each halves the side)
_UNET_DOWNSAMPLE = re.compile(r"model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.weight$")
_VAE_DOWNSAMPLE = re.compile(r"first_stage_model\.encoder\.down\.(\d+)\.downsample\.conv\.weight$")


def _folder_multiple(folder: Path) -> int | None:
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        unet_blocks, vae_blocks = len(unet["block_out_channels"]), len(vae["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # (the loader says what is wrong with the folder)
    return 2 ** (vae_blocks - 1) * 2 ** (unet_blocks - 1)


def _file_multiple(file: Path) -> int | None:
    from ..formats.files import WeightFileError, read_safetensors_header, sniff_format

    try:
        if sniff_format(file) != "safetensors":
            return None  # (a legacy pickle: its keys need the whole load)
        keys = read_safetensors_header(file)[0]
    except (OSError, WeightFileError):
        return None
    unet = {m.group(1) for k in keys if (m := _UNET_DOWNSAMPLE.match(k))}
    vae = {m.group(1) for k in keys if (m := _VAE_DOWNSAMPLE.match(k))}
    if not unet or not vae:
        return None  # (no LDM checkpoint this rule knows: the loaded model's own check applies)
    return 2 ** len(vae) * 2 ** len(unet)


def model_size_multiple(model: str | os.PathLike) -> int | None:
    """What :attr:`sdadapt.diffusers_system.DiffusersSystem.size_multiple` will be for ``model``
    (image sides must be multiples of it: the VAE's times the UNet's downsampling, 64 for SD1/SD2,
    32 for SDXL), read from a diffusers folder's ``unet``/``vae`` configs or an LDM
    ``.safetensors`` file's header (the downsampling layers' keys), no weights loaded.

    Returns:
        the multiple, or ``None`` where it cannot be told without loading (the toy, a ``.ckpt``
        pickle, a file of another layout): the loaded model checks the size then.
    """
    path = Path(model)
    if path.is_dir():
        return _folder_multiple(path)
    if path.is_file():
        return _file_multiple(path)
    return None
