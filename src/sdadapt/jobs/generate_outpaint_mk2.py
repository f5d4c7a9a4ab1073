"""``generate --init-image IMG --outpaint-mk2 PX``: A1111's "Outpainting mk2" script (:mod:`sdadapt.outpainting_mk2`)
— the image grown one side at a time (left, right, up, down), each side's new border filled with matched noise and
inpainted by :func:`~sdadapt.jobs.generate.run_generate` (A1111's ``process_images`` with the script's mask, latent
mask, mask blur ``4·blur`` along the grown axes, "original" content, whole picture), the next side grown from the
result."""

from __future__ import annotations

import inspect
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

__all__ = ["run_outpainting_mk2"]

#: what the script sets itself, and so is refused when given: run_generate's keyword -> (its default, the option)
_SET_BY_SCRIPT = {"mask": (None, "--mask"), "mask_blur": (None, "--mask-blur"),
                  "inpainting_fill": ("original", "--inpainting-fill"),
                  "inpaint_full_res": (False, "--inpaint-full-res"), "latent_mask": (None, "a latent mask")}


def _run_size(given: dict, loaded, say: Callable[[str], None]) -> tuple[int, int]:
    """The generation's ``(width, height)`` (A1111's ``p.width``, ``p.height``: the longest region run): as given, else
    the model's own size — read from the model loaded as :func:`~sdadapt.jobs.generate.run_generate` loads it
    (through ``loaded``, so the runs get copies of it)."""
    width, height = given.get("width"), given.get("height")
    if width and height:
        return int(width), int(height)
    from .generate import run_generate
    from .models import resolve_device

    defaults = {name: parameter.default for name, parameter in inspect.signature(run_generate).parameters.items()}

    def value(name: str) -> object:
        return given.get(name, defaults[name])

    system = loaded.load(value("model"), device=resolve_device(value("device")), tokenizer=value("tokenizer"),
                         prediction_type=value("prediction_type"), clip_skip=value("clip_skip"),
                         max_token_length=value("max_token_length"), vae=value("vae"), log=say,
                         clip_stats=value("clip_stats"))
    size = int(getattr(system, "image_size", 0))
    return int(width or size), int(height or size)


def run_outpainting_mk2(*, pixels: int, blur: int = 8, directions: Sequence[str] = ("left", "right", "up", "down"),
                        noise_q: float = 1.0, color_variation: float = 0.05,
                        progress: Callable[..., None] | None = None, log: Callable[[str], None] | None = None,
                        **given: object) -> dict:
    """A1111's "Outpainting mk2" on ``given["init_image"]``: ``given`` are
    :func:`~sdadapt.jobs.generate.run_generate`'s arguments (``prompt``, ``out``, ``seed``, ``denoising_strength``,
    ``width`` / ``height`` — the longest region run along a grown axis, the model's size when not given —, ...).

    Each chosen side, in the script's order left, right, up, down, grows the image by ``pixels``
    (:func:`sdadapt.outpainting_mk2.mk2_step`: the canvas rounded up to 64, the border filled by
    :func:`~sdadapt.outpainting_mk2.matched_noise` with ``noise_q`` — "Fall-off exponent" — and ``color_variation``)
    and inpaints the region at its side with the script's mask (blurred by ``4·blur`` along the grown axes:
    :func:`~sdadapt.outpainting_mk2.mk2_blur`), its latent mask, "original" content, at ``seed``; the next side
    grows the result. The image written is the last side's, with the first run's infotext (A1111's
    ``initial_seed_and_info``). ``count`` N makes N images, each from the init image — with ``seed`` -1 each run
    draws its own seed, as A1111's ``process_images`` does; a fixed seed makes the same image N times in A1111 (the
    script keeps ``p.seed``), so it is refused. The model is loaded once
    (:class:`~sdadapt.jobs.loaded_models.LoadedModels`).

    Returns:
        ``{"files": [...], "runs": [each run's run_generate result, side by side]}``.

    Raises:
        ValueError: bad settings (:func:`~sdadapt.outpainting_mk2.check_mk2`), no init image or a folder, a mask
            option (the script sets them), ``count`` above 1 with a fixed seed, another of A1111's scripts.
        FileExistsError: an output exists and ``overwrite`` is false (checked before anything runs).
        ImportError: Pillow is not installed (the script grows and blends the image with it), saying how to install it.
    """
    from ..optional_packages import require_pillow

    require_pillow("--outpaint-mk2 grows and blends the image with Pillow")
    from PIL import Image

    from ..images import check_output_suffix, numbered
    from ..outpainting import side_amounts
    from ..outpainting_mk2 import MK2_DIRECTIONS, check_mk2, mk2_blur, mk2_step
    from ..resize_modes import open_init_image
    from .generate_runs import (
        check_outputs_free,
        check_script_alone,
        first_set,
        run_named,
        write_grid,
    )
    from .generate_seed import RANDOM_SEED
    from .loaded_models import LoadedModels

    check_script_alone("--outpaint-mk2", given)
    chosen = check_mk2(pixels, blur, directions, noise_q, color_variation)
    sides = [side for side in MK2_DIRECTIONS if side in chosen]  # (the script's order, whatever the order given)
    init_image = given.get("init_image")
    if init_image is None:
        raise ValueError("--outpaint-mk2 is A1111's img2img script: give --init-image, the image to grow")
    if not Path(str(init_image)).is_file():
        raise ValueError(f"--init-image {init_image}: no such image file")
    option = first_set(given, _SET_BY_SCRIPT)
    if option is not None:
        raise ValueError(f"--outpaint-mk2 makes its own mask and inpaints with its own settings (A1111's script "
                         f"sets them): leave {option} out")
    count = int(given.get("count", 1))  # type: ignore[call-overload]
    seed = int(given.get("seed", 0))  # type: ignore[call-overload]
    if count > 1 and seed != RANDOM_SEED:
        raise ValueError(f"--outpaint-mk2 with --count {count} and --seed {seed}: A1111's script runs every batch at "
                         "the same seed, so the images would all be one; give --seed -1 (each run draws its own), or "
                         "run once per seed")
    say = log if log is not None else (lambda _line: None)
    out = Path(str(given["out"]))
    check_output_suffix(out, what="the grown image")
    outputs = [out] if count == 1 else [numbered(out, i) for i in range(count)]
    check_outputs_free(outputs, overwrite=bool(given.get("overwrite")))
    image = open_init_image(str(init_image))  # (read before any model loads: an unreadable image is said now)
    loaded = LoadedModels()
    size = _run_size(dict(given), loaded, say)
    blur_xy = mk2_blur(blur, sides)
    # (the script shares the growth out so each axis ends on a multiple of 64: 8 px on each side of a 512 image is 32)
    amounts = side_amounts(image.width, image.height, pixels, sides)
    say(f"outpainting mk2 of {init_image}: {', '.join(f'{side} {amounts[side]}' for side in sides)} pixels (to "
        f"{image.width + amounts['left'] + amounts['right']}x{image.height + amounts['up'] + amounts['down']}), "
        f"regions up to {size[0]}x{size[1]}, mask blur {4 * blur_xy[0]} x / {4 * blur_xy[1]} y")
    runs, written, reference = [], [], None
    with tempfile.TemporaryDirectory(prefix="sdadapt-outpaint-mk2-") as folder:
        for n, target in enumerate(outputs):
            grown, infotext = image, None
            for k, side in enumerate(sides):
                step = mk2_step(grown, side, amounts[side], blur=blur_xy, size=size, noise_q=noise_q,
                                color_variation=color_variation)
                files = {name: Path(folder) / f"{name}-{n}-{side}.png" for name in ("init", "mask", "latent")}
                step.init.save(files["init"])
                step.mask.save(files["mask"])
                step.latent_mask.save(files["latent"])
                settings = {**given, "init_image": str(files["init"]), "mask": str(files["mask"]),
                            "latent_mask": str(files["latent"]), "mask_blur": (4.0 * blur_xy[0], 4.0 * blur_xy[1]),
                            "inpainting_fill": "original", "inpaint_full_res": False, "width": step.size[0],
                            "height": step.size[1], "count": 1, "out": str(Path(folder) / f"run-{n}-{side}.png"),
                            "overwrite": True}
                if reference is not None:  # (--color-correction: A1111 keeps the first run's p.color_corrections)
                    settings["color_reference"] = reference
                result = run_named(f"outpainting mk2 ({side})", settings, loaded=loaded, log=log)
                reference = result.get("color_reference", reference)
                runs.append(result)
                grown = step.paste(Image.fromarray(result["pixels"][0], "RGB"))
                infotext = result["infotexts"][0] if infotext is None else infotext
                if progress is not None:
                    progress(n * len(sides) + k + 1, count * len(sides), f"{target.name}: {side}")
            written.append(str(write_grid(target, np.asarray(grown), parameters=str(infotext), given=given, say=say)))
    return {"files": written, "runs": runs}
