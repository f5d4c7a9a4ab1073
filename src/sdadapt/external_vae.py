"""Swap a Stable Diffusion model's VAE for one given on its own (kohya's ``--vae``).

The replacement keeps the model's VAE config (its latent scaling factor too: SD1/SD2 0.18215,
SDXL 0.13025) and dtype (float32: the VAE encodes outside the training autocast), and takes the
weights :func:`sdadapt.formats.vae_file.read_vae_weights` reads from an LDM file, a full
checkpoint, a diffusers file or folder. A diffusers folder's ``config.json`` must describe the
same VAE (latent channels, blocks, scaling factor): an SDXL VAE folder for an SD1 model is refused.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
from torch import nn

from .errors import InputError, WeightFileError
from .formats.vae_file import LATENT_FAMILIES, read_vae_weights

__all__ = ["load_vae", "replace_vae"]

#: config entries a diffusers VAE folder must share with the model's VAE (diffusers' defaults when absent)
_SAME_CONFIG = {"latent_channels": 4, "block_out_channels": [64], "layers_per_block": 1, "scaling_factor": 0.18215}


def _check_config(path: Path, config: dict, model_config: dict, *, family: str | None) -> None:
    changed = []
    for name, default in _SAME_CONFIG.items():
        if name not in config:
            continue
        have, want = config.get(name, default), model_config.get(name, default)
        if isinstance(want, (list, tuple)):
            same = isinstance(have, (list, tuple)) and list(have) == list(want)
        else:  # (a number; a damaged config's null, text or table is another VAE's, not a crash)
            same = isinstance(have, (int, float)) and not isinstance(have, bool) and float(have) == float(want)
        if not same:
            changed.append(f"{name} {have!r} (the model's {want!r})")
    if changed:
        hint = ""
        if any(c.startswith("scaling_factor") for c in changed):
            hint = (f" — a VAE for another latent space (SD1/SD2 scale latents by 0.18215, SDXL by 0.13025); give "
                    f"{'an ' + family if family else 'this model'}'s VAE")
        raise WeightFileError(f"--vae {path}: its config.json describes another VAE: {'; '.join(changed)}{hint}")


def load_vae(path: str | os.PathLike, *, like: nn.Module, architecture: str | None = None) -> nn.Module:
    """A copy of the diffusers ``AutoencoderKL`` ``like`` holding the VAE at ``path``.

    Args:
        path: an LDM VAE file (with or without ``first_stage_model.``), a diffusers VAE file or
            folder, or a full SD checkpoint (its VAE; see :mod:`sdadapt.formats.vae_file`).
        like: the model's VAE: its config, device and dtype are kept.
        architecture: the model's ``"sd1"``/``"sd2"``/``"sdxl"`` (refuses a full checkpoint of the other
            latent space).

    Returns:
        The new VAE in eval mode, without gradients, on ``like``'s device in ``like``'s dtype.

    Raises:
        WeightFileError: the file is missing, damaged, unsafe, holds no VAE, or another VAE than the
            model's (other latent channels, shapes or config); the message names the file.
    """
    parameter = next(like.parameters())
    expected = {k: tuple(v.shape) for k, v in like.state_dict().items()}
    weights = read_vae_weights(path, expected=expected, architecture=architecture)
    if weights.config:
        _check_config(weights.path, weights.config, dict(like.config),
                      family=LATENT_FAMILIES.get(architecture) if architecture else None)
    with torch.device("meta"):
        vae = type(like).from_config(copy.deepcopy(dict(like.config)))
    vae.load_state_dict({k: v.to(dtype=parameter.dtype) if v.is_floating_point() else v
                         for k, v in weights.state.items()}, strict=True, assign=True)
    leftover = [n for n, b in vae.named_buffers() if b.is_meta]
    if leftover:
        raise WeightFileError(f"--vae {weights.path}: the VAE has buffers the file does not hold ({', '.join(leftover[:3])})")
    vae.requires_grad_(False)
    return vae.eval().to(parameter.device)


def replace_vae(system: nn.Module, path: str | os.PathLike) -> str:
    """Put the VAE at ``path`` into a Stable Diffusion ``system`` (``system.vae``) for encoding the
    training latents and decoding samples; returns a line saying what was read.

    Raises:
        InputError: a system without a diffusers VAE (the toy).
        WeightFileError: see :func:`load_vae`.
    """
    old = getattr(system, "vae", None)
    if old is None or not hasattr(old, "config"):
        raise InputError(f"--vae {path}: this model has no Stable Diffusion VAE to replace (the toy's latents come from "
                         "its own fixed encoder); --vae is for Stable Diffusion models")
    architecture = getattr(system, "architecture", None)
    system.vae = load_vae(path, like=old, architecture=architecture)
    return f"--vae {path}: the model's VAE replaced (latents and samples use it; scaling factor {system.vae.config.scaling_factor})"
