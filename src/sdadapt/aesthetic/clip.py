"""Pieces a real CLIP needs around aesthetic gradients: its text projection and its image preprocessing.

SD1 checkpoints hold CLIP-L's *text tower* only; the personalisation's loss needs CLIP's
``text_projection`` (768 × 768, in ``openai/clip-vit-large-patch14``), which the A1111 extension
gets by loading the whole ``CLIPModel``. :func:`load_text_projection` reads just that tensor from
a local CLIP checkpoint (transformers ``model.safetensors`` / ``pytorch_model.bin``, an OpenCLIP
or SD2/SDXL LDM checkpoint). :func:`clip_image_preprocess` turns sdadapt images ([-1, 1]) into the
pixel values CLIP's image tower takes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..errors import WeightFileError

__all__ = ["load_text_projection", "clip_image_preprocess", "CLIP_MEAN", "CLIP_STD"]

#: CLIP's image normalisation (``CLIPImageProcessor``: image_mean / image_std), RGB
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_KEYS = ("text_projection.weight", "text_projection")
_FOLDER_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def load_text_projection(path: str | os.PathLike) -> Tensor:
    """CLIP's text projection ``P`` (E, D) — ``features = P · pooled`` — from a local checkpoint.

    Reads the one tensor named ``*text_projection.weight`` (transformers ``CLIPModel`` /
    ``CLIPTextModelWithProjection``: ``(E, D)``) or ``*text_projection`` (OpenCLIP and the LDM
    ``cond_stage_model.model.text_projection`` of SD2: ``(D, E)``, used as ``x @ P``; transposed
    here). A folder is searched for ``model.safetensors``, ``pytorch_model.bin`` and the OpenCLIP
    names. Pickles only through ``torch.load(weights_only=True)``.

    Raises:
        WeightFileError: no file, no projection in it (names what was found), or several.
    """
    from ..formats.files import (
        read_safetensors_header,
        read_safetensors_tensors,
        read_weights,
        sniff_format,
    )

    file = Path(path)
    if file.is_dir():
        found = [file / name for name in _FOLDER_FILES if (file / name).is_file()]
        if not found:
            raise WeightFileError(f"{file}: no CLIP checkpoint in the folder (looked for {', '.join(_FOLDER_FILES)})")
        file = found[0]
    if file.is_file() and sniff_format(file) == "safetensors":
        names = list(read_safetensors_header(file)[0])
        keys = [k for k in names if k.endswith(_KEYS)]
        tensors = read_safetensors_tensors(file, keys) if keys else {}
    else:
        everything, _ = read_weights(file)
        names = list(everything)
        tensors = {k: v for k, v in everything.items() if k.endswith(_KEYS)}
    if len(tensors) != 1:
        what = "no text_projection" if not tensors else f"several text projections ({', '.join(sorted(tensors))})"
        raise WeightFileError(
            f"{file}: {what} among its {len(names)} tensors; pass a CLIP model checkpoint (e.g. the model.safetensors "
            "of openai/clip-vit-large-patch14 for SD1) or an SD2/SDXL checkpoint"
        )
    key, value = next(iter(tensors.items()))
    if value.ndim != 2:
        raise WeightFileError(f"{file}: {key} has shape {tuple(value.shape)}; a text projection is a matrix")
    value = value.float()
    return value if key.endswith(".weight") else value.T.contiguous()


def clip_image_preprocess(images: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] → CLIP pixel values: ``((x + 1)/2 − mean)/std`` per channel.

    Resize/crop first (``read_image(path, size=224)`` does CLIP's shorter-side resize and centre
    crop; with area/bilinear filtering where ``CLIPImageProcessor`` uses bicubic, so values differ
    slightly from the processor's).
    """
    mean = torch.tensor(CLIP_MEAN, dtype=images.dtype, device=images.device)[:, None, None]
    std = torch.tensor(CLIP_STD, dtype=images.dtype, device=images.device)[:, None, None]
    return ((images + 1) / 2 - mean) / std
