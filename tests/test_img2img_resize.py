"""``generate --resize-mode``: A1111's ``modules/images.py`` ``resize_image`` modes 0-2, against that function
transcribed here on PIL (which it runs on), for several aspect ratios. A1111 pins Pillow 9.5.0, whose two-axis
resize runs across first: the transcription resizes with ``sdadapt.pillow_resize.resize_across_first`` (equal to
Pillow 9.5's and 12's ``resize``: tests/test_pillow_resize.py), not the installed Pillow's own order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdadapt.pillow_resize import resize_across_first
from sdadapt.resize_modes import RESIZE_MODES, a1111_resize


def _a1111_resize_image(resize_mode, im, width, height):
    """A1111's resize_image (upscaler None: Lanczos), transcribed."""
    from PIL import Image

    def resize(im, w, h):  # (A1111's Pillow 9.5: across first)
        return resize_across_first(im, (w, h), Image.LANCZOS)

    if resize_mode == 0:
        res = resize(im, width, height)
    elif resize_mode == 1:
        ratio = width / height
        src_ratio = im.width / im.height
        src_w = width if ratio > src_ratio else im.width * height // im.height
        src_h = height if ratio <= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
    else:
        ratio = width / height
        src_ratio = im.width / im.height
        src_w = width if ratio < src_ratio else im.width * height // im.height
        src_h = height if ratio >= src_ratio else im.height * width // im.width
        resized = resize(im, src_w, src_h)
        res = Image.new("RGB", (width, height))
        res.paste(resized, box=(width // 2 - src_w // 2, height // 2 - src_h // 2))
        if ratio < src_ratio:
            fill_height = height // 2 - src_h // 2
            if fill_height > 0:
                res.paste(resized.resize((width, fill_height), box=(0, 0, width, 0)), box=(0, 0))
                res.paste(resized.resize((width, fill_height), box=(0, resized.height, width, resized.height)),
                          box=(0, fill_height + src_h))
        elif ratio > src_ratio:
            fill_width = width // 2 - src_w // 2
            if fill_width > 0:
                res.paste(resized.resize((fill_width, height), box=(0, 0, 0, height)), box=(0, 0))
                res.paste(resized.resize((fill_width, height), box=(resized.width, 0, resized.width, height)),
                          box=(fill_width + src_w, 0))
    return res


@pytest.mark.parametrize("mode", list(RESIZE_MODES))
@pytest.mark.parametrize("source,target", [((20, 44), (32, 32)), ((40, 24), (32, 48)), ((30, 30), (24, 40)),
                                           ((17, 23), (16, 16)), ((32, 32), (32, 32))])
def test_resize_modes_are_a1111s_resize_image(mode, source, target):
    """Within 3 levels of 8 bits (PIL rounds to 8 bits between its passes and on the fill bands; sdadapt keeps
    floats): a wrong crop box, paste offset or band would be off by far more."""
    pil = pytest.importorskip("PIL.Image")
    g = torch.Generator().manual_seed(0)
    pixels = (torch.rand(3, *source, generator=g) * 255).round().to(torch.uint8)
    image = pixels.float() / 127.5 - 1
    ours = a1111_resize(image, target, mode=mode)
    im = pil.fromarray(pixels.permute(1, 2, 0).numpy())
    theirs = np.asarray(_a1111_resize_image(RESIZE_MODES[mode][0], im, target[1], target[0]), dtype=np.float32)
    theirs = torch.from_numpy(theirs).permute(2, 0, 1) / 127.5 - 1
    assert ours.shape == theirs.shape == (3, *target)
    assert (ours - theirs).abs().max() <= 3 / 127.5, (ours - theirs).abs().max()


def test_an_unknown_resize_mode_is_refused_by_name():
    with pytest.raises(ValueError, match="resize mode must be one of just, crop, fill"):
        a1111_resize(torch.zeros(3, 4, 4), (8, 8), mode="pad")
