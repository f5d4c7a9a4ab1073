"""The image-size rule, the default sampler and the layout of a Stable Diffusion model read from its configs or file
header — without loading its weights — so ``generate`` refuses a size the model cannot make before the load, checks
the sampler a model that names none runs with before the load too, and ``train`` refuses what an SDXL model cannot
train before the load.

A single file's header (a ``.safetensors`` header; a ``.ckpt`` / ``torch.save`` pickle's tensor names and shapes,
read by :func:`sdadapt.formats.pickles.pickle_header`: the pickle stream only, no tensor read, nothing run) is read
once per file version: :func:`_header_shapes` keeps the last few, keyed by the path and the file's size, mtime and
inode, so ``generate``'s several questions about one ``--model`` read a ``.ckpt``'s ~1 MB pickle stream once."""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType

__all__ = ["model_default_sampler", "model_edm_scheduler", "model_is_sdxl", "model_size_multiple"]

#: LDM single-file keys of a downsampling step: the UNet's ``input_blocks.N.0.op`` and the VAE
#: encoder's ``down.N.downsample`` (each halves the side)
_UNET_DOWNSAMPLE = re.compile(r"model\.diffusion_model\.input_blocks\.(\d+)\.0\.op\.weight$")
_VAE_DOWNSAMPLE = re.compile(r"first_stage_model\.encoder\.down\.(\d+)\.downsample\.conv\.weight$")


def _header_shapes(file: Path) -> Mapping[str, tuple[int, ...]] | None:
    """``{key: shape}`` of a single file's tensors, from its header alone (a ``.ckpt``'s ``{"state_dict": ...}``
    level taken off, as the loader and ``inspect`` do), read-only; ``None`` where the header cannot tell (not a
    weight file, corrupt, a pickle stream over :data:`~sdadapt.formats.pickles.MAX_PICKLE_STREAM`: the loader
    reports it). The same file version is read once (:func:`_cached_header_shapes`).

    Raises:
        UnsafeFileError: a pickle that would run code (what the load would refuse, said before it).
    """
    try:
        stat = file.stat()
    except OSError:
        return None
    return _cached_header_shapes(str(file.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=4)
def _cached_header_shapes(path: str, size: int, mtime_ns: int, inode: int) -> Mapping[str, tuple[int, ...]] | None:
    """:func:`_header_shapes` of the file version ``(path, size, mtime_ns, inode)`` (a file rewritten or replaced is
    another version, read anew; an exception, e.g. ``UnsafeFileError``, is not kept and is raised again)."""
    from ..errors import ResourceError, UnsafeFileError
    from ..formats.files import WeightFileError, read_safetensors_header, sniff_format
    from ..formats.pickles import pickle_header

    try:
        kind = sniff_format(path)
        if kind == "safetensors":
            shapes = {key: tuple(info["shape"]) for key, info in read_safetensors_header(path)[0].items()}
        elif kind == "pickle":
            shapes = {key.removeprefix("state_dict."): stub.shape for key, stub in pickle_header(path).tensors.items()}
        else:
            return None
    except UnsafeFileError:  # (a WeightFileError too: raised, as the load would)
        raise
    except (OSError, WeightFileError, ResourceError):
        return None
    return MappingProxyType(shapes)


def _folder_multiple(folder: Path) -> int | None:
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
        vae = json.loads((folder / "vae" / "config.json").read_text(encoding="utf-8"))
        unet_blocks, vae_blocks = len(unet["block_out_channels"]), len(vae["block_out_channels"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # (the loader says what is wrong with the folder)
    return 2 ** (vae_blocks - 1) if unet_blocks else None  # (a UNet config without blocks: the load says why)


def _file_multiple(file: Path) -> int | None:
    shapes = _header_shapes(file)
    if shapes is None:
        return None
    unet = {m.group(1) for k in shapes if (m := _UNET_DOWNSAMPLE.match(k))}
    vae = {m.group(1) for k in shapes if (m := _VAE_DOWNSAMPLE.match(k))}
    if not unet or not vae:
        return None  # (no LDM checkpoint this rule knows: the loaded model's own check applies)
    return 2 ** len(vae)


def model_size_multiple(model: str | os.PathLike) -> int | None:
    """The multiple a generated image's sides must be for ``model`` (:meth:`DiffusersSystem.sample
    <sdadapt.diffusers_system.DiffusersSystem.sample>`: its VAE's downsampling, :attr:`vae_factor`, 8 for every SD
    model), read from a diffusers folder's ``unet``/``vae`` configs or an LDM single file's
    header (the downsampling layers' keys; a ``.ckpt`` by its pickle's tensor names, :func:`_header_shapes`:
    no tensor read, nothing run), no weights loaded.

    Returns:
        the multiple, or ``None`` where it cannot be told without loading (the toy, a file of
        another layout, a corrupt one): the loaded model checks the size then.

    Raises:
        UnsafeFileError: a pickle that would run code (what the load would refuse, said before it).
    """
    path = Path(model)
    if path.is_dir():
        return _folder_multiple(path)
    if path.is_file():
        return _file_multiple(path)
    return None


def model_edm_scheduler(model: str | os.PathLike) -> dict | None:
    """The EDM scheduler config of an EDM-formulation ``model`` (Playground v2.5, CosXL), told without loading it: a
    diffusers folder whose ``scheduler/scheduler_config.json`` names an EDM scheduler (that config), or a single file
    with ``edm_mean`` / ``edm_std`` (diffusers' Playground scheduler config, what the loader gives it:
    :data:`sdadapt.formats.edm.PLAYGROUND_SCHEDULER`) or ComfyUI's ``edm_vpred.sigma_max`` (CosXL's:
    :func:`sdadapt.formats.edm.edm_v_scheduler`, ComfyUI's default σ range — the loader reads the file's) — a ``.safetensors`` file by its header, a ``.ckpt`` /
    ``torch.save`` pickle by its tensor names (:func:`sdadapt.formats.pickles.pickle_header`: the pickle stream only,
    no tensor read, nothing run; read once per file version, :func:`_header_shapes`); ``None`` for every other model
    and where that cannot tell (the toy, a corrupt or oversized file: the loader reports it, and the loaded model's
    own checks apply then).

    Raises:
        UnsafeFileError: a pickle that would run code (what the load would refuse, said before it).
    """
    from ..formats.edm import (
        COSXL_SIGMA_RANGE,
        PLAYGROUND_SCHEDULER,
        edm_v_scheduler,
        has_edm_stats,
        is_edm_scheduler,
    )
    from ..formats.prediction_markers import EDM_V_KEYS

    path = Path(model)
    config = None
    if path.is_dir():
        try:
            config = json.loads((path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = None  # (the loader says what is wrong with the folder)
    elif path.is_file():
        shapes = _header_shapes(path)
        if shapes is not None and has_edm_stats(shapes):
            config = dict(PLAYGROUND_SCHEDULER)
        elif shapes is not None and EDM_V_KEYS[0] in {k.removeprefix("state_dict.") for k in shapes}:
            config = edm_v_scheduler(*COSXL_SIGMA_RANGE)  # (CosXL: its class and formulation; the loader reads its σ)
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


def model_is_sdxl(model: str | os.PathLike) -> bool | None:
    """Whether ``model`` has the SDXL layout (two text encoders; Playground v2.5 and the refiner too), told without
    loading it as the loader tells it: a diffusers folder by its ``text_encoder_2/`` folder
    (:meth:`sdadapt.diffusers_system.DiffusersSystem.from_pretrained`), a single file by its header's keys and shapes
    (:func:`sdadapt.formats.model_keys.checkpoint_architecture`, the loader's detector; a ``.ckpt`` by its pickle's
    tensor names, :func:`_header_shapes`).

    Returns:
        ``True`` / ``False``; ``None`` where that cannot be told without loading (the toy, a name that is no path, a
        file of another layout or a corrupt one): the loaded model decides then.

    Raises:
        UnsafeFileError: a pickle that would run code (what the load would refuse, said before it).
    """
    path = Path(model)
    if path.is_dir():
        return (path / "text_encoder_2").exists() if (path / "model_index.json").is_file() else None
    if not path.is_file():
        return None
    shapes = _header_shapes(path)
    if shapes is None:
        return None
    from ..formats.key_source import KeyMapError
    from ..formats.model_keys import checkpoint_architecture

    try:
        return checkpoint_architecture(shapes) == "sdxl"
    except KeyMapError:
        return None
