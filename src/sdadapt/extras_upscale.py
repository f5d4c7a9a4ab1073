"""A1111's Extras tab "Upscale" (``scripts/postprocessing_upscale.py``, run by ``modules/postprocessing.py``): an
image enlarged by an upscaler — its built-in Lanczos / Nearest or an ESRGAN model (:mod:`sdadapt.esrgan`) — by a
factor ("Scale by", with its "Max side length") or to a size ("Scale to", cropped to fit), optionally blended with a
second upscaler's result, and the ``postprocessing`` text A1111 writes beside the image's own parameters.
"""

from __future__ import annotations

import dataclasses

__all__ = ["ExtrasUpscale", "extras_upscale", "limit_size_by_one_dimension", "postprocessing_text"]


def limit_size_by_one_dimension(width: float, height: float, limit: int) -> tuple[int, int]:
    """A1111's ``limit_size_by_one_dimention``: ``(width, height)`` with the longer side brought down to ``limit``
    (the other in proportion, floored), unchanged when it is within."""
    if height > width and height > limit:
        width = limit * width // height
        height = limit
    elif width > limit:
        height = limit * height // width
        width = limit
    return int(width), int(height)


@dataclasses.dataclass(frozen=True)
class ExtrasUpscale:
    """The Extras "Upscale" settings: ``upscaler`` (A1111's name "Lanczos" / "Nearest" / "None", or an
    :class:`sdadapt.esrgan.EsrganUpscaler`), ``scale`` ("Resize", A1111's default 4) or ``size`` ``(width,
    height)`` ("Scale to"; ``crop``: "Crop to fit"), ``max_side_length`` (0: none), a second upscaler and its
    visibility (``upscaler_2``, ``visibility_2``)."""

    upscaler: object = "Lanczos"
    scale: float = 4.0
    size: tuple[int, int] | None = None
    crop: bool = True
    max_side_length: int = 0
    upscaler_2: object = None
    visibility_2: float = 0.0


def _name(upscaler: object) -> str:
    return str(getattr(upscaler, "name", upscaler))


def _upscale_once(image, settings: ExtrasUpscale, upscaler: object, info: dict):
    """A1111's ``ScriptPostprocessingUpscale.upscale``: the scale (from the size, or the factor limited by the max
    side length), the upscaler's ``Upscaler.upscale`` (:func:`sdadapt.sd_upscale.upscale_image`), then "Crop to fit"
    onto a black canvas of the size, centred; ``info`` gets A1111's fields."""
    from PIL import Image

    from .jobs.infotext import a1111_number
    from .sd_upscale import upscale_image

    mode, crop = (1, settings.crop) if settings.size is not None else (0, False)
    width, height = settings.size or (0, 0)
    if mode == 1:
        scale = max(width / image.width, height / image.height)
        info["Postprocess upscale to"] = f"{width}x{height}"
    else:
        scale = settings.scale
        info["Postprocess upscale by"] = a1111_number(scale)  # (its slider's number: 2, 2.5)
        if settings.max_side_length != 0 and max(*image.size) * scale > settings.max_side_length:
            mode, crop = 1, False
            width, height = limit_size_by_one_dimension(image.width * scale, image.height * scale,
                                                        settings.max_side_length)
            scale = max(width / image.width, height / image.height)
            info["Max side length"] = settings.max_side_length
    image = upscale_image(image, scale, upscaler=upscaler)
    if mode == 1 and crop:
        cropped = Image.new("RGB", (width, height))
        cropped.paste(image, box=(width // 2 - image.width // 2, height // 2 - image.height // 2))
        image = cropped
        info["Postprocess crop to"] = f"{image.width}x{image.height}"
    return image


def extras_upscale(image, settings: ExtrasUpscale):
    """A1111's Extras "Upscale" on a PIL ``image`` (made RGB, as its ``run_postprocessing`` makes it) ->
    ``(image, info)``: the upscaled image and A1111's ``pp.info`` fields in its order ("Postprocess upscale by" or
    "... to", "Max side length", "Postprocess crop to", "Postprocess upscaler", "Postprocess upscaler 2"). An
    upscaler "None" leaves the image as it is with no fields (A1111 skips the step); a second upscaler at
    visibility above 0 is blended in (``Image.blend``)."""
    from PIL import Image

    image = image.convert("RGB")
    info: dict[str, object] = {}
    if _name(settings.upscaler) == "None":
        return image, info
    upscaled = _upscale_once(image, settings, settings.upscaler, info)
    info["Postprocess upscaler"] = _name(settings.upscaler)
    if settings.upscaler_2 is not None and _name(settings.upscaler_2) != "None" and settings.visibility_2 > 0:
        second = _upscale_once(image, settings, settings.upscaler_2, info)
        if upscaled.mode != second.mode:
            second = second.convert(upscaled.mode)
        upscaled = Image.blend(upscaled, second, settings.visibility_2)
        info["Postprocess upscaler 2"] = _name(settings.upscaler_2)
    return upscaled, info


def postprocessing_text(info: dict) -> str:
    """A1111's ``postprocessing`` text of ``info``: ``"key: value"`` joined by ``", "`` (a key equal to its value
    alone; values with ``,`` ``:`` or a line break JSON-quoted, A1111's ``quote``)."""
    from .jobs.infotext import quote

    return ", ".join(key if key == value else f"{key}: {quote(value)}" for key, value in info.items()
                     if value is not None)
