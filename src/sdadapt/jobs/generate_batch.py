"""``generate --init-image FOLDER``: A1111's img2img "Batch" tab (``modules/img2img.py`` ``process_batch``) — every
image of a folder run through img2img (or inpainting, with a folder of masks) with the same settings and seed, each
written under its own name into the output folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..images import numbered

__all__ = ["BATCH_IMAGE_SUFFIXES", "batch_images", "batch_masks", "batch_outputs"]

#: the files A1111's batch reads (``process_batch``: ``shared.walk_files(input, allowed_extensions=...)``)
BATCH_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")


def _natural(text: str) -> list:
    """A1111's ``natural_sort_key``: digit runs compared as numbers, the rest case-folded."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split("([0-9]+)", text)]


def batch_images(folder: str | os.PathLike) -> list[Path]:
    """The images of ``folder`` as A1111's ``walk_files`` lists them: the folder and its subfolders (following
    links) in natural order, each folder's files in natural order, only :data:`BATCH_IMAGE_SUFFIXES` (any case),
    none under a hidden folder below ``folder`` (A1111's default ``list_hidden_files`` off; A1111 tests the whole
    path, so a ``folder`` inside a hidden one, ``~/.cache/imgs``, lists nothing there) and no hidden file (macOS's
    ``._NAME.png`` AppleDouble files, which A1111 fails to open and skips with a message).

    Raises:
        ValueError: a folder without such images.
    """
    found = []
    for root, _, names in sorted(os.walk(folder, followlinks=True), key=lambda item: _natural(item[0])):
        below = os.path.relpath(root, folder)
        if any(part.startswith(".") and part not in (".", "..") for part in Path(below).parts):
            continue
        found += [Path(root) / name for name in sorted(names, key=_natural)
                  if os.path.splitext(name)[1].lower() in BATCH_IMAGE_SUFFIXES and not name.startswith(".")]
    if not found:
        raise ValueError(f"--init-image {folder}: a folder without images ({', '.join(BATCH_IMAGE_SUFFIXES)}); give "
                         "an image, or a folder of them (A1111's img2img batch)")
    return found


def batch_masks(mask: str | os.PathLike | None, images: list[Path]) -> list[Path | None]:
    """Each image's mask, as A1111's batch finds it: ``None`` (no ``mask``): none; a file: that one for every image;
    a folder with one file: that one for every image; else the folder's first file (by name) whose name is the
    image's stem and an extension (A1111's ``glob(f"{stem}.*")``), ``None`` where there is none (A1111 skips that
    image, with a warning)."""
    if mask is None:
        return [None] * len(images)
    folder = Path(mask)
    if not folder.is_dir():
        return [folder] * len(images)
    files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
    if len(files) == 1:
        return [files[0]] * len(images)
    return [next((path for path in files if path.name.startswith(f"{image.stem}.")), None) for image in images]


def batch_outputs(images: list[Path], folder: str | os.PathLike, count: int, *, suffix: str = "png") -> list[list[Path]]:
    """Each image's output files in ``folder``: ``{stem}.{suffix}`` (``count`` 1) or ``{stem}-{n:02d}.{suffix}``.

    Raises:
        ValueError: two images of the same stem (in different subfolders, or with other extensions): their outputs
            would be one file.
    """
    seen: dict[str, Path] = {}
    for image in images:
        if image.stem in seen:
            raise ValueError(f"--init-image: {seen[image.stem]} and {image} would both be written as "
                             f"{image.stem}.{suffix}; rename one, or run the folders one by one")
        seen[image.stem] = image
    out = Path(folder)
    return [[out / f"{image.stem}.{suffix}"] if count == 1 else [numbered(out / f"{image.stem}.{suffix}", n)
                                                             for n in range(count)] for image in images]
