"""A1111's img2img "Inpaint sketch" tab: colour strokes drawn over an image are both what is repainted and how it
starts — the mask is where the sketch differs from the original, and the init image is the sketch blended over the
original through that mask (``modules/img2img.py``, mode 3).

:func:`inpaint_sketch_inputs` is that step on PIL images: the mask (255 where any channel differs, else 0) darkened
by "Mask transparency" (``ImageEnhance.Brightness(mask).enhance(1 − alpha / 100)``), then the sketch and the mask
blurred by PIL's ``GaussianBlur(mask_blur)`` and the blurred sketch composited over the original through the
blurred mask. The run then inpaints that image under that mask, which it makes binary and blurs again by
``mask_blur`` as any inpainting (A1111's ``StableDiffusionProcessingImg2Img.init``).
"""

from __future__ import annotations

__all__ = ["inpaint_sketch_inputs"]


def inpaint_sketch_inputs(sketch, original, *, mask_alpha: float = 0.0, mask_blur: float = 4.0) -> tuple:
    """``(init image, mask)`` (PIL RGB, PIL L) of A1111's Inpaint sketch from the PIL ``sketch`` (the original with
    strokes drawn on it) and the PIL ``original`` — both RGB, of one size.

    Raises:
        ValueError: images of different sizes or modes, a transparency outside 0-100, a negative blur.
    """
    import numpy as np
    from PIL import Image, ImageEnhance, ImageFilter

    if sketch.size != original.size or sketch.mode != original.mode:
        raise ValueError(f"the sketch is {sketch.width}x{sketch.height} {sketch.mode} and the original "
                         f"{original.width}x{original.height} {original.mode}: draw the sketch on a copy of the "
                         "original, the same size")
    if not 0.0 <= mask_alpha <= 100.0:
        raise ValueError(f"--mask-transparency must be from 0 to 100 (A1111's slider), got {mask_alpha}")
    if not mask_blur >= 0.0:
        raise ValueError(f"--mask-blur must be >= 0, got {mask_blur}")
    changed = np.any(np.array(sketch) != np.array(original), axis=-1)
    mask = Image.fromarray(changed.astype(np.uint8) * 255, "L")
    mask = ImageEnhance.Brightness(mask).enhance(1 - mask_alpha / 100)
    blur = ImageFilter.GaussianBlur(mask_blur)
    return Image.composite(sketch.filter(blur), original, mask.filter(blur)), mask
