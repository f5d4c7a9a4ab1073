"""Aesthetic-gradient embedding files: the A1111 extension's ``.pt`` and a ``.safetensors`` twin.

What the tools write (``docs/aesthetic-gradients.md``; ../shared/reference/FORMATS.md §6):

| writer | file | object |
|---|---|---|
| vicgalle ``scripts/gen_aesthetic_embeddings.py`` | ``NAME.pt`` | ``torch.save`` of a plain tensor, the mean of the raw CLIP image embeddings, ``(1, D)`` |
| A1111 extension ``generate_imgs_embd`` | ``NAME.pt`` | the same ``(1, D)`` tensor (``get_image_features`` mean) |
| sdadapt ``save_aesthetic_embedding`` | ``NAME.pt`` / ``NAME.safetensors`` | ``(1, D)`` tensor; safetensors key ``aesthetic_embedding`` |

Files found in the wild disagree (see ``../shared/fixtures/aesthetic``): ``(768,)`` float32 and
``(1, 768)`` float16, saved from CUDA tensors, L2 norms 3.26 and 17.2 — the vector is stored
**unnormalised**; every consumer normalises it at load (A1111: ``image_embs /= image_embs.norm()``),
and so does :func:`sdadapt.personalize_text_encoder`. :func:`load_aesthetic_embedding` reads all of
these (the pickle only through ``torch.load(weights_only=True)``, on the CPU) and returns the raw
``(1, D)`` vector.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor

from ..errors import InputError
from .files import (
    WeightFileError,
    check_finite,
    check_output_file,
    read_weights,
    write_safetensors,
)
from .torch_files import save_torch_file

__all__ = ["AESTHETIC_KEY", "load_aesthetic_embedding", "save_aesthetic_embedding", "as_aesthetic_vector"]

#: the tensor name in an sdadapt ``.safetensors`` aesthetic embedding
AESTHETIC_KEY = "aesthetic_embedding"
_SUFFIXES = (".pt", ".safetensors")


def as_aesthetic_vector(value: Tensor, *, source: str = "the aesthetic embedding") -> Tensor:
    """``(D,)`` or ``(1, D)`` → ``(1, D)`` (a view; dtype and device kept).

    Raises:
        ValueError: any other shape (e.g. ``(N, D)`` per-image embeddings: take their mean first,
            :func:`sdadapt.aesthetic_embedding` does).
    """
    if not isinstance(value, Tensor) or not value.is_floating_point():
        raise InputError(f"{source}: expected a floating-point tensor, got {type(value).__name__}"
                         f"{'' if not isinstance(value, Tensor) else ' of ' + str(value.dtype)}")
    if value.ndim == 1 and value.shape[0] > 0:
        return value[None]
    if value.ndim == 2 and value.shape[0] == 1 and value.shape[1] > 0:
        return value
    raise InputError(
        f"{source}: shape {tuple(value.shape)} is not an aesthetic embedding; expected (D,) or (1, D) — one mean "
        "CLIP image embedding (for per-image embeddings (N, D) take the mean: sdadapt.aesthetic_embedding)"
    )


def load_aesthetic_embedding(path: str | os.PathLike, *, dtype: torch.dtype | None = torch.float32) -> Tensor:
    """Read an aesthetic embedding: ``.pt`` (A1111 extension / vicgalle, any of their shapes and
    dtypes, CUDA-saved included) or ``.safetensors``.

    The vector comes back as stored — *not* normalised (the personalisation normalises it).

    Args:
        path: the file. A ``.pt`` must hold one tensor (``torch.save(tensor)``); a safetensors
            file the key :data:`AESTHETIC_KEY` or exactly one tensor.
        dtype: the returned dtype (default float32, what the personalisation computes in; fp16
            files convert exactly); ``None`` keeps the file's.

    Returns:
        ``(1, D)`` tensor on the CPU.

    Raises:
        WeightFileError: missing, corrupt, not one (D,)/(1, D) tensor, or NaN/inf values.
        UnsafeFileError: a pickle that would run code when loaded (refused, never run).

    Example::

        e = sdadapt.load_aesthetic_embedding("aesthetic_embeddings/sac_8plus.pt")   # (1, 768) float32
    """
    file = Path(path)
    tensors, _ = read_weights(file)  # weights_only for pickles, map_location="cpu"
    if AESTHETIC_KEY in tensors:
        value = tensors[AESTHETIC_KEY]
    elif len(tensors) == 1:
        value = next(iter(tensors.values()))
    else:
        names = sorted(tensors)[:6]
        raise WeightFileError(
            f"{file}: not an aesthetic embedding: it holds {len(tensors)} tensors ({', '.join(repr(n) for n in names)}"
            f"{' ...' if len(tensors) > 6 else ''}); an aesthetic embedding file holds one (1, D) tensor"
            + (" — this looks like a textual-inversion embedding: sdadapt.load_embedding reads those"
               if any("string_to_param" in n or n == "emb_params" for n in tensors) else "")
        )
    try:
        value = as_aesthetic_vector(value, source=str(file))
    except ValueError as exc:
        raise WeightFileError(str(exc)) from None
    check_finite({AESTHETIC_KEY: value}, source=str(file))
    return value.to(dtype) if dtype is not None else value


def save_aesthetic_embedding(path: str | os.PathLike, embedding: Tensor, *, overwrite: bool = True,
                             metadata: dict[str, str] | None = None) -> Path:
    """Write ``embedding`` ((D,) or (1, D); stored as (1, D), dtype kept) atomically.

    ``.pt``: ``torch.save`` of the plain CPU tensor — the file the A1111 extension lists in its
    aesthetic-embeddings folder (``torch.load(weights_only=True)`` reads it). ``.safetensors``:
    the tensor under :data:`AESTHETIC_KEY` with string ``metadata``.

    Raises:
        ValueError: another suffix, a wrong shape, or metadata on a ``.pt`` (it has nowhere to go).
        WeightFileError: NaN/inf values.
        OutputExistsError / OutputError: see :func:`sdadapt.formats.files.atomic_write`.
    """
    target = Path(path)
    suffix = target.suffix.lower()
    if suffix not in _SUFFIXES:
        raise InputError(f"{target}: aesthetic embeddings are written as .pt (the A1111 extension's) or .safetensors, "
                         f"not {target.suffix or 'a file without suffix'}")
    vector = as_aesthetic_vector(embedding.detach()).to("cpu").contiguous().clone()  # (1, D); own storage
    if not bool(torch.isfinite(vector).all()):
        raise WeightFileError(f"{target}: the aesthetic embedding holds NaN or inf; not written")
    if suffix == ".safetensors":
        return write_safetensors(target, {AESTHETIC_KEY: vector}, metadata, overwrite=overwrite)
    if metadata:
        raise InputError(f"{target}: a .pt aesthetic embedding is a bare tensor and holds no metadata; use .safetensors")
    check_output_file(target, overwrite=overwrite, needed_bytes=vector.numel() * vector.element_size() + 1024, suffix=None)
    return save_torch_file(target, vector, overwrite=overwrite)
