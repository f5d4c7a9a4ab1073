"""The job behind ``python -m sdadapt invert IMAGE --prompt ...``: invert, save, reconstruct, edit.

:func:`run_invert` reads the image (any size: the shorter side is resized to the model's size
and the centre cropped; grayscale and RGBA are converted to RGB, the alpha dropped as the notebook's
``load_512``), inverts it with its caption, writes ``OUT.png`` (the reconstruction),
``OUT.safetensors`` (the inversion) and, with an edit prompt, ``OUT-edit.png`` (the edit
regenerated from the same inversion), and returns a plain dict. Progress goes through
``progress(done, total, label)`` with labels ``"invert"``, ``"null-text"``, ``"reconstruct"``,
``"edit"``.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

from ..formats.files import check_output_file
from ..images import ImageFolderError, read_image, write_png
from .core import Progress, psnr
from .invert import INVERSION_METHODS, invert_image, regenerate_image, save_inversion

__all__ = ["run_invert", "load_model", "outputs_for"]

_PNG_MODES = {0: "L", 2: "RGB", 3: "P", 4: "LA", 6: "RGBA"}


def load_model(model: str, *, device: str = "cpu"):
    """``"toy"`` (the shipped toy), ``"toy-image"`` (its image-embedding variant) or a path
    (``sdadapt.jobs.load_system``: a diffusers Stable Diffusion folder or single file). An
    EDM-formulation model (Playground v2.5, ``system.edm``) is inverted through its Euler ODE
    (:class:`sdadapt.inversion.core.EDMSteps`)."""
    if model == "toy-image":
        from ..toy import load_toy_image

        return load_toy_image(device=device)
    from ..jobs import load_system

    return load_system(model, device=device)


def _image_header(path: Path) -> tuple[int, int, str]:
    """(width, height, mode) from the file header, without decoding the pixels."""
    with open(path, "rb") as handle:
        head = handle.read(26)
    if head[:8] == b"\x89PNG\r\n\x1a\n" and len(head) >= 26:
        width, height = struct.unpack(">II", head[16:24])
        return width, height, _PNG_MODES.get(head[25], "?")
    try:
        from PIL import Image
    except ImportError:
        raise ImageFolderError(f"{path}: reading {path.suffix} images needs PIL (pip install pillow); PNGs work without it") from None
    try:
        with Image.open(path) as im:
            return im.size[0], im.size[1], im.mode
    except OSError as exc:
        raise ImageFolderError(f"{path}: unreadable image ({exc})") from None


def outputs_for(out: str | Path, *, edit: bool) -> dict[str, Path]:
    """The files :func:`run_invert` writes for ``out`` (``X.png`` -> ``X.png``, ``X.safetensors``,
    ``X-edit.png``)."""
    target = Path(out)
    if target.suffix.lower() != ".png":
        raise ValueError(f"{target}: the output must be a .png file (the reconstruction); the inversion is written beside it")
    files = {"reconstruction": target, "inversion": target.with_suffix(".safetensors")}
    if edit:
        files["edit"] = target.with_name(f"{target.stem}-edit.png")
    return files


def run_invert(
    image: str | Path,
    *,
    prompt: str,
    out: str | Path,
    method: str = "null-text",
    guidance: float | None = None,
    steps: int = 50,
    model: str = "toy",
    edit_prompt: str | None = None,
    source_steps: int = 0,
    init: str = "null",
    negative: str = "",
    overwrite: bool = False,
    progress: Progress | None = None,
    optimize_pooled: bool = False,
    comments: bool = True,
) -> dict:
    """Invert ``image`` (its caption ``prompt``) and write the reconstruction, the inversion and an edit.

    Args:
        method: ``"null-text"`` (default), ``"negative-prompt"`` or ``"ddim"`` (on an EDM model: plain
            Euler ODE inversion with the empty prompt).
        guidance, steps: classifier-free guidance scale and DDIM steps (the paper: 7.5, 50); on an EDM
            model (Playground v2.5) the steps of diffusers' ``EDMEulerScheduler`` grid. ``guidance`` ``None``: the
            model's — 7.5, an EDM model's model-card scale for the Euler scheduler its inversion and reconstruction
            run (Playground v2.5: 5; :func:`sdadapt.inversion.invert.invert_latents`' default, as ``generate``'s).
        model: ``"toy"``, ``"toy-image"`` or a diffusers Stable Diffusion folder or single file.
        edit_prompt: also regenerate the inversion with this prompt (plain prompt swap; no
            prompt-to-prompt attention control) into ``OUT-edit.png``.
        source_steps: for the edit, keep the source prompt for the first ``source_steps`` steps.
        init: null-text's starting embedding, ``"null"`` (the empty prompt, the paper's) or
            ``"negative-prompt"`` (start from negative-prompt inversion: better in fewer steps).
        negative: the prompt of the starting null embedding (default ``""``).
        optimize_pooled: SDXL: null-text also optimises the pooled null embedding ``text_embeds`` per step
            (``extra_keys=("text_embeds",)`` of :func:`~.invert.invert_image`; saved in the inversion file).
        overwrite: replace existing outputs (else refused before any work).
        comments: A1111's "Enable comments", as ``generate``'s (on by default): ``#`` and the rest of its line are
            left out of ``prompt``, ``negative`` and ``edit_prompt`` before anything reads them
            (:func:`sdadapt.prompt_schedule.strip_comments`), so the inversion conditions on the text ``generate``
            samples; ``False`` keeps ``#`` as text.

    Returns:
        ``{"method", "guidance" (the scale used), "psnr" (dB, reconstruction vs the input at the model's size),
        "seconds", "invert_seconds", "size", "source_size", "resized" (a sentence or None), "converted"
        (a sentence or None), "guidance_note" (a sentence when an EDM model's default was taken, else None),
        "files": {"reconstruction", "inversion"[, "edit"]}}``.

    Raises:
        FileExistsError, ValueError, ImageFolderError (unreadable image), ModelFolderError.
    """
    if method not in INVERSION_METHODS:
        raise ValueError(f"unknown inversion method {method!r}; use one of {', '.join(INVERSION_METHODS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if comments:  # (A1111's "Enable comments", generate's default: before any other reading of the texts)
        from ..prompt_schedule import strip_comments, strip_prompt_comments

        prompt = strip_prompt_comments(prompt, fix="give the image's caption, or pass comments=False "
                                       "(--no-comments) to keep '#'")
        negative = strip_comments(negative)
        edit_prompt = None if edit_prompt is None else strip_comments(edit_prompt)
    source = Path(image)
    if not source.is_file():
        raise ImageFolderError(f"{source}: no such image file")
    files = outputs_for(out, edit=edit_prompt is not None)
    for path in files.values():
        if path.exists() and not overwrite:
            raise FileExistsError(f"{path}: already exists; pass --overwrite (overwrite=True) to replace it")
    check_output_file(files["reconstruction"], overwrite=True, suffix=None)  # (a missing folder: made at the first write)
    start = time.perf_counter()
    no_pooled = (f"optimize_pooled (--optimize-pooled): the model {model!r} has no pooled text embedding; it is an SDXL "
                 "option (SDXL, Playground v2.5) — leave it out")
    if optimize_pooled:  # (told from the folder / header, before the load; None: unknown there)
        from ..jobs.model_size import model_is_sdxl

        if model_is_sdxl(model) is False:
            raise ValueError(no_pooled)
    system = load_model(model)
    if optimize_pooled and not getattr(system, "is_sdxl", False):  # (what the header could not tell: the toy, ...)
        raise ValueError(no_pooled)
    size = system.image_size
    width, height, mode = _image_header(source)
    picture = read_image(source, size=size, alpha="drop")  # (3, size, size) in [-1, 1]; alpha dropped, as load_512
    resized = None
    if (width, height) != (size, size):
        resized = f"resized {width}x{height} -> {size}x{size} (shorter side to {size}, centre crop)"
    converted = None if mode in ("RGB", "?") else f"converted {mode} -> RGB" + (" (alpha dropped)" if "A" in mode else "")
    t0 = time.perf_counter()
    # (guidance None: the library's default, invert_latents': 7.5, an EDM model's card scale for Euler)
    inversion = invert_image(system, picture, prompt, method=method, guidance=guidance, num_steps=steps, init=init,
                             negative=negative, progress=progress,
                             extra_keys=("text_embeds",) if optimize_pooled else ())
    guidance_note = None
    if guidance is None and getattr(system, "edm", None) is not None:
        guidance_note = (f"guidance {inversion.guidance:g}, the EDM model's model card default for the Euler scheduler "
                         "inversion and reconstruction run (--guidance to change)")
    guidance = inversion.guidance
    invert_seconds = time.perf_counter() - t0
    reconstruction = regenerate_image(system, inversion, progress=progress)[0]
    info = {"model": model, "source_image": source.name, "source_size": f"{width}x{height}", "size": f"{size}x{size}",
            "invert_seconds": f"{invert_seconds:.2f}"}
    save_inversion(files["inversion"], inversion, metadata=info)
    write_png(files["reconstruction"], reconstruction)
    if edit_prompt is not None:
        edited = regenerate_image(system, inversion, prompt=edit_prompt, source_steps=source_steps, progress=progress)[0]
        write_png(files["edit"], edited)
    return {
        "method": method,
        "guidance": float(guidance),
        "guidance_note": guidance_note,
        "psnr": psnr(reconstruction, picture.to(reconstruction.device)),
        "seconds": time.perf_counter() - start,
        "invert_seconds": invert_seconds,
        "size": (size, size),
        "source_size": (width, height),
        "resized": resized,
        "converted": converted,
        "files": {k: str(v) for k, v in files.items()},
    }
