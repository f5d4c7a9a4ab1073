"""The image-size rule and the default sampler of a Stable Diffusion model read from its configs or file header —
without loading its weights — so ``generate`` refuses a size the model cannot make before the load, and checks the
sampler a model that names none runs with before the load too."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

__all__ = ["model_default_sampler", "model_edm_scheduler", "model_size_multiple"]

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


def model_edm_scheduler(model: str | os.PathLike) -> dict | None:
    """The EDM scheduler config of an EDM-formulation ``model`` (Playground v2.5), told without loading it: a
    diffusers folder whose ``scheduler/scheduler_config.json`` names an EDM scheduler (that config), or a single file
    with ``edm_mean`` / ``edm_std`` (diffusers' Playground scheduler config, what the loader gives it:
    :data:`sdadapt.formats.edm.PLAYGROUND_SCHEDULER`) — a ``.safetensors`` file by its header, a ``.ckpt`` /
    ``torch.save`` pickle by its tensor names (:func:`sdadapt.formats.pickles.pickle_header`: the pickle stream only,
    no tensor read, nothing run); ``None`` for every other model and where that cannot tell (the toy, a corrupt or
    oversized file: the loader reports it, and the loaded model's own checks apply then).

    Raises:
        UnsafeFileError: a pickle that would run code (what the load would refuse, said before it).
    """
    from ..formats.edm import PLAYGROUND_SCHEDULER, has_edm_stats, is_edm_scheduler

    path = Path(model)
    config = None
    if path.is_dir():
        try:
            config = json.loads((path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = None  # (the loader says what is wrong with the folder)
    elif path.is_file():
        from ..errors import ResourceError, UnsafeFileError
        from ..formats.files import (
            WeightFileError,
            read_safetensors_header,
            sniff_format,
        )
        from ..formats.pickles import pickle_header

        try:
            kind = sniff_format(path)
            keys = (read_safetensors_header(path)[0] if kind == "safetensors"
                    else pickle_header(path).tensors if kind == "pickle" else ())
            if has_edm_stats(keys):
                config = dict(PLAYGROUND_SCHEDULER)
        except UnsafeFileError:
            raise
        except (OSError, WeightFileError, ResourceError):
            config = None
    return config if isinstance(config, dict) and is_edm_scheduler(config) else None


def model_default_sampler(model: str | os.PathLike) -> str:
    """The sampler ``generate`` runs ``model`` with when none is given, told without loading it: an EDM-formulation
    model's own scheduler (:func:`model_edm_scheduler`) by :func:`sdadapt.training.edm.edm_own_sampler` —
    ``dpmsolver++`` for Playground v2.5, what its diffusers pipeline samples with (a folder's ``EDMEulerScheduler``:
    ``euler``); ``ddim`` for every other model (and where the file cannot tell: the toy, a corrupt file).
    :func:`sdadapt.sampling.default_sampler` is the same rule on a loaded system."""
    from ..training.edm import edm_own_sampler

    config = model_edm_scheduler(model)
    return "ddim" if config is None else edm_own_sampler(config)
