"""What A1111's multi-run scripts share here (``--prompts-file``, ``--xyz-x``, ``--prompt-matrix``): one script at
a time, outputs checked before anything runs, each run's errors named by the run, the grid written in the runs'
format."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np

__all__ = ["check_outputs_free", "check_script_alone", "first_pictures", "first_set", "infotext_chunk", "infotext_too_long",
           "require_pillow", "run_named", "write_grid"]


def first_set(given: Mapping[str, object], table: Mapping[str, tuple[object, str]]) -> str | None:
    """The option of the first ``table`` entry (:func:`~sdadapt.jobs.generate.run_generate`'s keyword -> (its value
    when not set, the option)) that ``given`` sets — its value neither that one, ``None`` nor an empty list where the
    unset value is an empty tuple — else ``None``."""
    for key, (unset, option) in table.items():
        value = given.get(key, unset)
        if value is None or value == unset or (isinstance(value, (list, tuple)) and not value and not unset):
            continue
        return option
    return None


def check_script_alone(option: str, given: Mapping[str, object]) -> None:
    """Refuse ``given`` (:func:`~sdadapt.jobs.generate.run_generate`'s arguments) with another of A1111's scripts
    (SD upscale, Loopback, Poor man's outpainting) or a folder of init images, for the script ``option``.

    Raises:
        ValueError: naming both.
    """
    other = next((flag for flag, key in (("--sd-upscale", "sd_upscale"), ("--loopback", "loopback"),
                                         ("--outpaint", "outpaint")) if given.get(key) is not None), None)
    if other is not None:
        raise ValueError(f"{option}: not with {other}: each is one of A1111's scripts, and A1111 runs one at a time; "
                         "leave one out")
    if given.get("init_image") is not None and Path(str(given["init_image"])).is_dir():
        raise ValueError(f"{option}: not with --init-image FOLDER (A1111's img2img batch runs the script on each "
                         "image; not built here): give one init image at a time")


def check_outputs_free(paths: Iterable[Path], *, overwrite: bool, why: Callable[[Path], str] | None = None) -> None:
    """Refuse before anything runs when one of ``paths`` exists and ``overwrite`` is false.

    Raises:
        OutputExistsError: the first such path (``why(path)`` added, e.g. the line that writes it).
    """
    from ..errors import OutputExistsError

    if overwrite:
        return
    for path in paths:
        if path.exists():
            raise OutputExistsError(f"{path}: already exists{'' if why is None else f' ({why(path)})'}; pass "
                                    "--overwrite to replace it")


def require_pillow(what: str) -> None:
    """Refuse, before the runs, a grid whose labels Pillow draws when Pillow is missing.

    Raises:
        ImportError: saying how to install it.
    """
    from ..optional_packages import require_pillow as required

    required(f"{what} is drawn with Pillow")


def run_named(where: str, settings: Mapping[str, object], **keywords: object) -> dict:
    """:func:`~sdadapt.jobs.generate.run_generate` of ``settings`` (and ``keywords``: ``loaded``, ``log``), its
    errors' messages starting with ``where`` (the line, the cell, the combination), their types kept."""
    from .generate import run_generate

    try:
        return run_generate(**settings, **keywords)  # type: ignore[arg-type]
    except (ValueError, OSError) as exc:
        if len(exc.args) == 1 and isinstance(exc.args[0], str):
            exc.args = (f"{where}: {exc.args[0]}",)
        raise


def first_pictures(results: Iterable[Mapping]) -> tuple[list[np.ndarray], list[str]]:
    """Each run's first image (``run_generate``'s ``pixels``: ``(H, W, 3)`` uint8 as written — before a JPEG's loss
    — the 8-bit pixels A1111's grid is made of) and its infotext (a grid's is its first image's, as A1111's)."""
    runs = list(results)
    return [run["pixels"][0] for run in runs], [run["infotexts"][0] for run in runs]


def cell_pictures(results: Iterable[Mapping]) -> tuple[list[np.ndarray], list[str]]:
    """:func:`first_pictures`, but a run of two or more images is its batch grid (:func:`.generate_grid.batch_grid_rows`
    rows): what A1111's X/Y/Z plot puts in a cell, ``processed.images[0]`` — the grid ``process_images`` returns
    first for a batch (its defaults "return grid" and "grid only if multiple")."""
    from ..labelled_grid import cells_grid
    from .generate_grid import batch_grid_rows

    runs = list(results)
    pictures = [run["pixels"][0] if len(run["pixels"]) < 2 else
                cells_grid(list(run["pixels"]), rows=batch_grid_rows(len(run["pixels"]))) for run in runs]
    return pictures, [run["infotexts"][0] for run in runs]


def infotext_chunk(path: str | os.PathLike, parameters: str | None,
                   say: Callable[[str], None] | None = None) -> dict[str, str] | None:
    """``{"parameters": parameters}``, the text an image at ``path`` is written with — ``None`` without one, or for a
    JPEG whose EXIF cannot hold it (64 KiB: :func:`sdadapt.image_exif.check_jpeg_comment`; fields A1111 adds while
    sampling, a large X/Y/Z plot's), said on ``say``: the image is written without it rather than lost (A1111's
    ``piexif.insert`` fails there after Pillow saved the JPEG, under a ``.tmp`` name)."""
    problem = infotext_too_long(path, parameters)
    if problem is not None:
        if say is not None:
            say(f"{Path(path).name}: written without its infotext ({problem})")
        return None
    return None if parameters is None else {"parameters": parameters}


def infotext_too_long(path: str | os.PathLike, parameters: str | None) -> str | None:
    """Why a JPEG at ``path`` cannot hold ``parameters`` in its EXIF (64 KiB:
    :func:`sdadapt.image_exif.check_jpeg_comment`), else ``None`` (it fits; no text; PNG, WebP and AVIF hold any
    length)."""
    if parameters is None or Path(path).suffix.lower() not in (".jpg", ".jpeg"):
        return None
    from ..image_exif import check_jpeg_comment

    try:
        check_jpeg_comment(parameters)
    except ValueError as exc:
        return str(exc)
    return None


def write_grid(path: str | os.PathLike, grid: np.ndarray, *, parameters: str | None,
               given: Mapping[str, object], say: Callable[[str], None] | None = None) -> Path:
    """Write an image a script makes of its runs — a grid, Outpainting mk2's grown image — ``(H, W, 3)`` uint8,
    atomically, with ``parameters`` as its infotext, in ``path``'s format at the runs' JPEG/WebP settings
    (``given``'s ``jpeg_quality``, ``webp_lossless``). A JPEG whose infotext is longer than its EXIF holds (a large
    X/Y/Z plot's) is written without it, said on ``say``: the runs' images are made by then, and the grid is not
    lost."""
    from ..images import write_image

    return write_image(path, np.ascontiguousarray(grid), text=infotext_chunk(path, parameters, say),
                       quality=int(given.get("jpeg_quality", 80)),  # type: ignore[call-overload]
                       lossless=bool(given.get("webp_lossless", False)))
