"""An aesthetic embedding from images: the mean CLIP image embedding.

Both original writers (vicgalle ``scripts/gen_aesthetic_embeddings.py``: ``clip.encode_image``;
the A1111 extension's ``generate_imgs_embd``: ``CLIPModel.get_image_features``) average the
**raw** projected image embeddings — no per-image normalisation — and save the ``(1, D)`` mean
unnormalised (hence the norms 3.26 and 17.2 of the shipped files; a mean of unit vectors has norm
≤ 1). :func:`aesthetic_embedding` does the same by default; ``normalize_each=True`` averages unit
vectors instead (what a CLIP-similarity reading of "the set's direction" would suggest; the
direction differs when the images' embedding norms differ). The personalisation normalises
whatever it is given, so only the direction matters downstream.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import Tensor
from torch.nn import functional as F

from ..errors import InputError

__all__ = ["AESTHETIC_IMAGE_SUFFIXES", "aesthetic_embedding", "aesthetic_embedding_from_folder", "image_files"]


def _batches(images: Tensor | Iterable[Tensor], batch_size: int) -> Iterator[Tensor]:
    if isinstance(images, Tensor):
        if images.ndim != 4:
            raise InputError(f"images must be (N, C, H, W), got {tuple(images.shape)}")
        for start in range(0, images.shape[0], batch_size):
            yield images[start : start + batch_size]
        return
    for item in images:
        if not isinstance(item, Tensor) or item.ndim not in (3, 4):
            raise InputError(f"each item must be an image (C, H, W) or a batch (N, C, H, W), got {getattr(item, 'shape', type(item).__name__)}")
        yield item[None] if item.ndim == 3 else item


def _embeddings_of(out: object) -> object:
    """The (B, D) tensor of an image encoder's output: a tensor, ``image_embeds``
    (``CLIPVisionModelWithProjection``) or ``pooler_output`` (transformers 5's
    ``CLIPModel.get_image_features`` returns the projected embedding there)."""
    if isinstance(out, Tensor):
        return out
    for name in ("image_embeds", "pooler_output"):
        value = getattr(out, name, None)
        if isinstance(value, Tensor):
            return value
    return out


@torch.no_grad()
def aesthetic_embedding(
    images: Tensor | Iterable[Tensor],
    image_encoder: Callable[[Tensor], Tensor],
    *,
    batch_size: int = 32,
    normalize_each: bool = False,
) -> Tensor:
    """The mean image embedding of ``images``: ``e = (1/N) Σ_i g(image_i)`` (``(1, D)`` float32).

    Args:
        images: (N, C, H, W) tensor, or an iterable of (C, H, W) images / (n, C, H, W) batches —
            whatever ``image_encoder`` takes (the toy CLIP: (B, 3, 32, 32) in [-1, 1]; a real
            CLIP: pixel values after its processor's resize/normalise).
        image_encoder: ``g(images (B, ...)) -> (B, D)``: a CLIP image tower with its projection
            (``CLIPModel.get_image_features`` — in transformers 5 an output whose ``pooler_output``
            is the projected embedding, read from there —, ``CLIPVisionModelWithProjection``
            (``image_embeds``), the toy judge's ``system.clip.encode_image``).
        batch_size: images per encoder call when ``images`` is one tensor.
        normalize_each: average ``g(x)/‖g(x)‖`` instead of the raw embeddings (not what the
            original tools do; see the module docstring).

    Returns:
        (1, D) float32 on the encoder's output device, unnormalised (as the tools store it).

    Raises:
        ValueError: no images, a bad shape, or an encoder output that is not (B, D) / not finite.

    Example::

        system = sdadapt.toy.load_toy()
        images, _ = sdadapt.toy.evaluate.concept_data("purple", 16)
        e = sdadapt.aesthetic_embedding(images, system.clip.encode_image)      # (1, 64)
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    total: Tensor | None = None
    count = 0
    for batch in _batches(images, batch_size):
        if batch.shape[0] == 0:
            continue
        out = _embeddings_of(image_encoder(batch))
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != batch.shape[0]:
            raise InputError(f"image_encoder must return (B, D) embeddings; for a batch of {batch.shape[0]} it returned "
                             f"{getattr(out, 'shape', type(out).__name__)}")
        out = out.double()
        if normalize_each:
            out = F.normalize(out, dim=-1)
        part = out.sum(dim=0, keepdim=True)  # (1, D)
        total = part if total is None else total + part
        count += batch.shape[0]
    if total is None:
        raise InputError("no images: an aesthetic embedding is the mean over at least one image")
    mean = (total / count).float()
    if not bool(torch.isfinite(mean).all()):
        raise InputError("the image embeddings hold NaN or inf; check the images and the encoder")
    return mean


#: the image files of an aesthetic folder: the A1111 extension's (``check_is_valid_image_file``: png, jpg, jpeg,
#: gif, tiff, webp; a GIF's first frame) and the training folders' (:data:`sdadapt.images.IMAGE_SUFFIXES`: bmp)
AESTHETIC_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".tiff", ".tif", ".webp", ".bmp")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of ``folder`` (sorted; the suffixes :data:`AESTHETIC_IMAGE_SUFFIXES`, any case)."""
    from ..images import ImageFolderError, check_image_folder, is_image_file

    root = check_image_folder(folder)
    files = sorted(p for p in root.iterdir() if is_image_file(p, suffixes=AESTHETIC_IMAGE_SUFFIXES))
    if not files:
        raise ImageFolderError(f"{root}: no images ({', '.join(AESTHETIC_IMAGE_SUFFIXES)}) in the folder")
    return files


def aesthetic_embedding_from_folder(
    folder: str | os.PathLike,
    image_encoder: Callable[[Tensor], Tensor],
    *,
    size: int,
    batch_size: int = 32,
    normalize_each: bool = False,
    preprocess: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """:func:`aesthetic_embedding` of every image file in ``folder``, read in batches (never all at once).

    Each file is read as (3, size, size) in [-1, 1] (shorter side resized to ``size``, centre
    crop — CLIP's processor geometry), then ``preprocess`` (e.g. CLIP's mean/std normalisation:
    the toy CLIP needs none) is applied to each batch before ``image_encoder``.

    Raises:
        ImageFolderError: not a folder, no images, or an unreadable image (named).
    """
    from ..images import read_image

    files = image_files(folder)

    def batches() -> Iterator[Tensor]:
        for start in range(0, len(files), batch_size):
            # (alpha dropped: openai-CLIP's convert("RGB"), as vicgalle's script and the A1111 extension read images)
            batch = torch.stack([read_image(f, size=size, alpha="drop") for f in files[start : start + batch_size]])
            yield preprocess(batch) if preprocess is not None else batch

    return aesthetic_embedding(batches(), image_encoder, normalize_each=normalize_each)
