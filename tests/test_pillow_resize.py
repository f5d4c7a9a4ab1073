"""``sdadapt.pillow_resize.resize_across_first``: Pillow's ``resize`` in the pass order of Pillow 12 and before
(A1111 and Forge pin Pillow 9.5.0), on whatever Pillow is installed; ``resample(..., pillow=9)``, its float twin.

Against the installed Pillow itself: equal bit for bit wherever that Pillow runs across first (every call on
Pillow ≤ 12; on 13, where ``_pil_runs_down_first`` says so), and not equal where Pillow 13 runs down first and
the clip between the passes bites. (Also run by hand on Pillow 9.5.0 and 12.3.0 under Python 3.10: equal on 300 of
300 random calls — RGB/RGBA/L/LA, five filters, float boxes — and on Pillow 13.0.0 on all 203 across-first ones.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

Image = pytest.importorskip("PIL.Image")

from sdadapt.pillow_resize import A1111_PILLOW, resize_across_first
from sdadapt.resampling import _pil_runs_down_first, resample

_PILLOW_MAJOR = int(Image.__version__.split(".")[0])
_CHANNELS = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}
_FILTERS = [Image.Resampling.LANCZOS, Image.Resampling.BICUBIC, Image.Resampling.BILINEAR, Image.Resampling.BOX,
            Image.Resampling.HAMMING]


def _image(mode: str, h: int, w: int, seed: int):
    rng = np.random.default_rng(seed)
    if mode in ("P", "1"):
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").convert(mode)
    pixels = rng.integers(0, 256, (h, w, _CHANNELS[mode]), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode)


def _runs_across_first(size: tuple[int, int], target: tuple[int, int]) -> bool:
    """Whether the installed Pillow's two-axis resize of (H, W) to (h, w) runs its horizontal pass first."""
    return _PILLOW_MAJOR < 13 or not _pil_runs_down_first(size, target)


@settings(max_examples=60, deadline=None)
@given(src=st.tuples(st.integers(1, 60), st.integers(1, 60)), dst=st.tuples(st.integers(1, 80), st.integers(1, 80)),
       mode=st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1"]), filter_index=st.integers(0, len(_FILTERS) - 1),
       boxed=st.booleans(), seed=st.integers(0, 2**16))
def test_equal_to_the_installed_pillow_wherever_it_runs_across_first(src, dst, mode, filter_index, boxed, seed):
    image = _image(mode, *src, seed)
    box = None
    if boxed:
        rng = np.random.default_rng(seed + 1)
        x0, y0 = rng.uniform(0, src[1] / 3), rng.uniform(0, src[0] / 3)
        box = (x0, y0, rng.uniform(x0 + 0.25, src[1]), rng.uniform(y0 + 0.25, src[0]))
    (h, w), resample_filter = dst, _FILTERS[filter_index]
    ours = resize_across_first(image, (w, h), resample_filter, box)
    assert ours.mode == image.mode and ours.size == (w, h)
    # (P and 1 images resize by nearest: no order; a box whose height the call does not shrink: across first
    # whichever size Pillow 13 weighs, the box's or the image's)
    across = _runs_across_first(src, dst) if box is None else _PILLOW_MAJOR < 13 or h >= src[0]
    if across or mode in ("P", "1"):
        assert np.array_equal(np.asarray(ours), np.asarray(image.resize((w, h), resample_filter, box)))


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
@pytest.mark.parametrize("src,dst", [((40, 24), (32, 48)), ((30, 30), (24, 40)), ((64, 64), (32, 56))])
def test_where_pillow_13_runs_down_first_it_keeps_pillow_12s_order(mode, src, dst):
    """Shapes where Pillow 13 runs down first (the height shrinks, the width grows or shrinks less): the result is
    horizontal-then-vertical, which is not the installed Pillow 13's — and the default resample of ``None``
    (bicubic) takes the same path."""
    image = _image(mode, *src, seed=3)
    (h, w) = dst
    across = image.resize((w, src[0]), Image.Resampling.LANCZOS).resize((w, h), Image.Resampling.LANCZOS)
    if mode in ("RGBA", "LA"):  # (Pillow premultiplies alpha around its whole resize)
        premultiplied = image.convert({"RGBA": "RGBa", "LA": "La"}[mode])
        across = premultiplied.resize((w, src[0]), Image.Resampling.LANCZOS).resize((w, h), Image.Resampling.LANCZOS)
        across = across.convert(mode)
    ours = resize_across_first(image, (w, h), Image.Resampling.LANCZOS)
    assert np.array_equal(np.asarray(ours), np.asarray(across))
    assert _pil_runs_down_first(src, dst)
    if _PILLOW_MAJOR >= 13:
        assert not np.array_equal(np.asarray(ours), np.asarray(image.resize((w, h), Image.Resampling.LANCZOS)))
    bicubic = resize_across_first(image, (w, h))
    default = image.resize((w, src[0])).resize((w, h)) if mode not in ("RGBA", "LA") else None
    if default is not None:
        assert np.array_equal(np.asarray(bicubic), np.asarray(default))


@pytest.mark.parametrize("src,dst", [((40, 24), (32, 48)), ((30, 30), (24, 40)), ((20, 44), (32, 32)),
                                     ((50, 17), (23, 29)), ((64, 64), (32, 56))])
def test_resample_in_a1111s_order_is_within_its_roundings_of_pillow_9s_8bit_resize(src, dst):
    """``resample(..., pillow=A1111_PILLOW)`` stays in float between the passes where Pillow rounds to 8 bits: within
    1.5 levels of :func:`resize_across_first`; ``pillow=13`` takes the other order where 13 runs down first (up to
    36 levels off on random pixels)."""
    image = _image("RGB", *src, seed=5)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    theirs = torch.from_numpy(np.asarray(resize_across_first(image, dst[::-1], Image.Resampling.LANCZOS),
                                         dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
    ours = resample(pixels, dst, interpolation="lanczos", bounds=(-1.0, 1.0), pillow=A1111_PILLOW)
    assert (ours - theirs).abs().max() <= 1.5 / 127.5
    pillow_13 = resample(pixels, dst, interpolation="lanczos", bounds=(-1.0, 1.0))
    if _pil_runs_down_first(src, dst):
        assert (pillow_13 - theirs).abs().max() > 4 / 127.5
    else:
        torch.testing.assert_close(pillow_13, ours, rtol=0, atol=0)
