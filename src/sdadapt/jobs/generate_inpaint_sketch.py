"""``generate --init-image SKETCH --inpaint-sketch ORIGINAL``: A1111's img2img "Inpaint sketch" tab
(:mod:`sdadapt.inpaint_sketch`) — the mask and the init image made from the sketch and the original, then one
inpainting run (:func:`~sdadapt.jobs.generate.run_generate`) of them with every inpainting setting given."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["run_inpaint_sketch"]


def run_inpaint_sketch(original: str | os.PathLike, *, mask_transparency: float = 0.0,
                       progress: Callable[..., None] | None = None, log: Callable[[str], None] | None = None,
                       **given: object) -> dict:
    """Inpaint ``given["init_image"]`` (the sketch: ``original`` with colour strokes drawn on it) as A1111's
    Inpaint sketch does: the mask where the sketch differs from ``original``, darkened by ``mask_transparency``
    (A1111's "Mask transparency", 0-100), the sketch blurred and blended over ``original`` through the blurred mask
    (blur: ``given["mask_blur"]``, A1111's 4 when ``None``) as the init image
    (:func:`sdadapt.inpaint_sketch.inpaint_sketch_inputs`); then :func:`~sdadapt.jobs.generate.run_generate` of
    ``given`` on that image and mask (PNGs in a folder the run removes).

    Returns:
        :func:`~sdadapt.jobs.generate.run_generate`'s result.

    Raises:
        ValueError: no sketch (``init_image``) or a folder, a ``mask`` given (the sketch makes it), the images'
            sizes differing, a transparency outside 0-100, another of A1111's scripts.
        FileNotFoundError: no such original.
    """
    from ..inpaint_sketch import inpaint_sketch_inputs
    from ..resize_modes import open_init_image
    from .generate import run_generate
    from .generate_runs import check_script_alone

    check_script_alone("--inpaint-sketch", given)
    sketch = given.get("init_image")
    if sketch is None or not Path(str(sketch)).is_file():
        raise ValueError("--inpaint-sketch ORIGINAL inpaints a sketch drawn over ORIGINAL: give the sketch as "
                         "--init-image (one image file)")
    if given.get("mask") is not None:
        raise ValueError("--inpaint-sketch makes the mask from where the sketch differs from the original: leave "
                         "--mask out")
    if not Path(original).is_file():
        raise FileNotFoundError(f"--inpaint-sketch {original}: no such image file")
    blur = given.get("mask_blur")
    try:
        image, mask = inpaint_sketch_inputs(open_init_image(str(sketch)), open_init_image(str(original)),
                                            mask_alpha=float(mask_transparency),
                                            mask_blur=4.0 if blur is None else float(blur))  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"--inpaint-sketch {original}: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="sdadapt-inpaint-sketch-") as folder:
        init_file, mask_file = Path(folder) / "init.png", Path(folder) / "mask.png"
        image.save(init_file)
        mask.save(mask_file)
        return run_generate(**{**given, "init_image": str(init_file), "mask": str(mask_file)},  # type: ignore[arg-type]
                            progress=progress, log=log)
