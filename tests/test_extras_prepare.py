"""A1111's Extras steps after "Upscale" (upscale --autosized-crop / --flipped-copies / --split-oversized): each
against the script's function transcribed, the run against A1111's ScriptPostprocessingRunner.run and
PostprocessedImage.get_suffix transcribed (which images, in which order, with which info and file suffix), worked
examples by hand, and the command's files."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from sdadapt.extras_postprocess import (
    AutosizedCrop,
    SplitOversized,
    extras_images,
    flipped_copies,
    multicrop,
    split_oversized,
    upscale_target,
)
from sdadapt.extras_upscale import ExtrasUpscale
from sdadapt.pillow_resize import resize_across_first


def _image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8), "RGB")


# ---- A1111, transcribed (scripts_postprocessing.py, processing_autosized_crop.py, postprocessing_split_oversized.py,
# postprocessing_create_flipped_copies.py, postprocessing_upscale.py's process_firstpass)
class _PP:
    def __init__(self, image):
        self.image, self.info, self.extra_images, self.nametags, self.target = image, {}, [], [], None

    def get_suffix(self, used):
        suffix = "-".join(self.nametags)
        if suffix:
            suffix = "-" + suffix
        if suffix not in used:
            used[suffix] = 1
            return suffix
        for i in range(1, 100):
            proposed = suffix + "-" + str(i)
            if proposed not in used:
                used[proposed] = 1
                return proposed
        return suffix

    def create_copy(self, new_image):
        pp = _PP(new_image)
        pp.target, pp.nametags, pp.info = self.target, self.nametags.copy(), self.info.copy()
        return pp


def _a1111_center_crop(image, w, h):
    iw, ih = image.size
    if ih / h < iw / w:
        sw = w * ih / h
        box = (iw - sw) / 2, 0, iw - (iw - sw) / 2, ih
    else:
        sh = h * iw / w
        box = 0, (ih - sh) / 2, iw, ih - (ih - sh) / 2
    return resize_across_first(image, (w, h), Image.Resampling.LANCZOS, box)  # (A1111's Pillow 9.5)


def _a1111_multicrop(image, mindim, maxdim, minarea, maxarea, objective, threshold):
    iw, ih = image.size
    err = lambda w, h: 1 - (lambda x: x if x < 1 else 1 / x)(iw / ih / (w / h))  # noqa: PLC3002
    wh = max(((w, h) for w in range(mindim, maxdim + 1, 64) for h in range(mindim, maxdim + 1, 64)
              if minarea <= w * h <= maxarea and err(w, h) <= threshold),
             key=lambda wh: (wh[0] * wh[1], -err(*wh))[::1 if objective == 'Maximize area' else -1], default=None)
    return wh and _a1111_center_crop(image, *wh)


def _a1111_split_pic(image, inverse_xy, width, height, overlap_ratio):
    if inverse_xy:
        from_w, from_h = image.height, image.width
        to_w, to_h = height, width
    else:
        from_w, from_h = image.width, image.height
        to_w, to_h = width, height
    h = from_h * to_w // from_w
    image = resize_across_first(image, (h, to_w) if inverse_xy else (to_w, h))
    split_count = math.ceil((h - to_h * overlap_ratio) / (to_h * (1.0 - overlap_ratio)))
    y_step = (h - to_h) / (split_count - 1)
    for i in range(split_count):
        y = int(y_step * i)
        yield image.crop((y, 0, y + to_h, to_w)) if inverse_xy else image.crop((0, y, to_w, y + to_h))


def _a1111_split(pp, threshold, overlap_ratio):
    width, height = pp.target
    if not width or not height:
        return
    if pp.image.height > pp.image.width:
        ratio, inverse_xy = (pp.image.width * height) / (pp.image.height * width), False
    else:
        ratio, inverse_xy = (pp.image.height * width) / (pp.image.width * height), True
    if ratio >= 1.0 or ratio > threshold:
        return
    result, *others = _a1111_split_pic(pp.image, inverse_xy, width, height, overlap_ratio)
    pp.image = result
    pp.extra_images = [pp.create_copy(x) for x in others]


def _a1111_flips(pp, option):
    if "Horizontal" in option:
        pp.extra_images.append(ImageOps.mirror(pp.image))
    if "Vertical" in option:
        pp.extra_images.append(pp.image.transpose(Image.Transpose.FLIP_TOP_BOTTOM))
    if "Both" in option:
        pp.extra_images.append(pp.image.transpose(Image.Transpose.FLIP_TOP_BOTTOM).transpose(
            Image.Transpose.FLIP_LEFT_RIGHT))


def _a1111_run(image, *, size, crop, flips, split):
    """The Extras run with "Upscale" at "None" in "Scale to" mode (``size``): process_firstpass, then the scripts in
    A1111's order over all_images, then the files' suffixes."""
    pp = _PP(image.convert("RGB"))
    pp.target = size  # (Upscale's process_firstpass, mode 1)
    steps = []  # (order 4000, by name: Auto-sized crop, Create flipped copies, Split oversized images)
    if crop is not None:
        def crop_step(single):
            cropped = _a1111_multicrop(single.image, crop.min_dim, crop.max_dim, crop.min_area, crop.max_area,
                                       crop.objective, crop.threshold)
            if cropped is not None:
                single.image = cropped
        steps.append(crop_step)
    if flips:
        steps.append(lambda single: _a1111_flips(single, flips))
    if split is not None:
        steps.append(lambda single: _a1111_split(single, split.threshold, split.overlap_ratio))
    all_images = [pp]
    for step in steps:
        for single in all_images.copy():
            step(single)
            for extra in single.extra_images:
                if not isinstance(extra, _PP):
                    extra = single.create_copy(extra)
                all_images.append(extra)
            single.extra_images.clear()
    used: dict = {}
    return [(item.image, item.info, item.get_suffix(used)) for item in all_images]


@settings(max_examples=25, deadline=None)
@example(width=251, height=40, tw=32, th=128, flips=["Horizontal", "Vertical", "Both"], crop=False, split=True,
         objective="Maximize area", overlap=0.0, threshold=0.3)  # (over 100 images: A1111's suffixes run out)
@given(width=st.integers(40, 320), height=st.integers(40, 320), tw=st.sampled_from([32, 64, 96]),
       th=st.sampled_from([32, 64, 128]), flips=st.lists(st.sampled_from(["Horizontal", "Vertical", "Both"]),
                                                         unique=True, max_size=3),
       crop=st.booleans(), split=st.booleans(), objective=st.sampled_from(["Maximize area", "Minimize error"]),
       overlap=st.sampled_from([0.0, 0.2, 0.5]), threshold=st.sampled_from([0.3, 0.5, 0.9]))
def test_the_run_is_a1111s_runner(width, height, tw, th, flips, crop, split, objective, overlap, threshold):
    """Any image, target and choice of steps: the same images, pixel for pixel, in the same order, with the same
    info and file suffixes as A1111's runner over its scripts (past its 99 numbered suffixes, see below)."""
    image = _image(width, height, seed=width * 1000 + height)
    crop_settings = AutosizedCrop(min_dim=64, max_dim=256, objective=objective) if crop else None
    split_settings = SplitOversized(threshold=threshold, overlap_ratio=overlap) if split else None
    ours = extras_images(image, upscale=ExtrasUpscale(upscaler="None", size=(tw, th)), crop=crop_settings,
                         flips=tuple(flips), split=split_settings)
    theirs = _a1111_run(image, size=(tw, th), crop=crop_settings, flips=tuple(flips), split=split_settings)
    assert len(ours) == len(theirs) and [b for _, b, _ in ours] == [b for _, b, _ in theirs]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _, _), (b, _, _) in zip(ours, theirs))
    # (A1111's get_suffix tries -1 ... -99 and then gives the bare suffix again, so its 101st image on overwrites the
    # first; here they go on -100, -101, ...)
    assert [c for _, _, c in ours] == [c if n < 100 else f"-{n}" for n, (_, _, c) in enumerate(theirs)]


def test_worked_examples():
    """By hand: a 100x300 image split to 64x64 — resized to 64x192, ceil((192 − 12.8)/51.2) = 4 pieces at y 0, 42,
    85, 128; the auto-sized crop of a 100x300 image within 64..256 is 64x192 (aspect 1/3 exactly); with "Minimize
    error" among areas up to 150000 a 3:2 image picks the exact 384x256 over the larger 448x320 that "Maximize
    area" picks."""
    tall = _image(100, 300)
    pieces = split_oversized(tall, 64, 64, SplitOversized())
    resized = resize_across_first(tall, (64, 192))  # (A1111's Pillow 9.5: across first)
    assert [np.array_equal(np.asarray(p), np.asarray(resized.crop((0, y, 64, y + 64)))) for p, y in
            zip(pieces, (0, 42, 85, 128))] == [True] * 4 and len(pieces) == 4
    assert multicrop(tall, AutosizedCrop(min_dim=64, max_dim=256)).size == (64, 192)
    wide = _image(300, 200)
    area = multicrop(wide, AutosizedCrop(min_dim=64, max_dim=512, max_area=150000, threshold=0.2))
    exact = multicrop(wide, AutosizedCrop(min_dim=64, max_dim=512, max_area=150000, threshold=0.2,
                                          objective="Minimize error"))
    assert (area.size, exact.size) == ((448, 320), (384, 256))
    assert multicrop(wide, AutosizedCrop(min_dim=64, max_dim=64, threshold=0.0)) is None  # (no 3:2 size there)
    assert split_oversized(tall, 64, 192, SplitOversized()) == [tall]  # (the target's own aspect: not split)
    assert [np.asarray(c).tolist() for c in flipped_copies(tall, ["Both", "Horizontal"])] == [
        np.asarray(ImageOps.mirror(tall)).tolist(), np.asarray(tall.rotate(180)).tolist()]


def test_the_upscale_target_is_a1111s_first_pass():
    """"Scale to": its size; "Scale by": int(side·scale) limited by the max side length — (0, 0) with A1111's
    default 0 (its limit_size_by_one_dimention(w, h, 0)), so nothing is split in that mode unless one is set."""
    image = _image(100, 300)
    assert upscale_target(image, scale=2.0, size=(64, 48), max_side_length=0) == (64, 48)
    assert upscale_target(image, scale=2.0, size=None, max_side_length=0) == (0, 0)
    assert upscale_target(image, scale=2.0, size=None, max_side_length=150) == (50, 150)
    assert split_oversized(image, *upscale_target(image, scale=2.0, size=None, max_side_length=0),
                           SplitOversized()) == [image]


@pytest.mark.parametrize("bad", [{"min_dim": 0}, {"min_dim": 800}, {"objective": "Biggest"}, {"threshold": 1.5}])
def test_bad_crop_settings_are_refused(bad):
    with pytest.raises(ValueError, match="auto-sized crop"):
        AutosizedCrop(**bad)


def test_the_command_writes_every_image_with_a1111s_names(tmp_path, capsys):
    """upscale --scale-to 64x64 --upscaler none --flipped-copies --split-oversized: NAME.png and NAME-1.png ... in
    A1111's order (the flipped copy, then each image's pieces), the upscale's postprocessing text on each; refusals."""
    from sdadapt.cli import main
    from sdadapt.images import decode_png, read_png_text

    _image(100, 300).save(tmp_path / "tall.png")
    out = tmp_path / "out" / "tall.png"
    assert main(["upscale", str(tmp_path / "tall.png"), "--upscaler", "lanczos", "--scale-to", "64x192",
                 "--flipped-copies", "--split-oversized", "-o", str(out), "--quiet"]) == 0
    # (the upscale to 64x192 exactly, then 2 images of 64x192, each split against the 64x192 target: not split)
    names = sorted(path.name for path in out.parent.iterdir())
    assert names == ["tall-1.png", "tall.png"]
    expected = _a1111_run(Image.open(out), size=(64, 192), crop=None, flips=("Horizontal",), split=None)
    assert np.array_equal(decode_png((out.parent / "tall-1.png").read_bytes()), np.asarray(expected[1][0]))
    assert read_png_text(out.parent / "tall-1.png")["postprocessing"] == read_png_text(out)["postprocessing"]
    assert main(["upscale", str(tmp_path / "tall.png"), "--upscaler", "none", "--scale-to", "64x64",
                 "--flipped-copies", "horizontal", "--split-oversized", "-o", str(tmp_path / "o2" / "t.png"),
                 "--quiet"]) == 0
    assert len(list((tmp_path / "o2").iterdir())) == 2 * 4  # (the image and its copy, 4 pieces each)
    assert main(["upscale", str(tmp_path / "tall.png"), "--upscaler", "none", "--scale-to", "64x64",
                 "--split-oversized", "-o", str(tmp_path / "o2" / "t.png"), "--quiet"]) != 0  # (t-1.png ... exist)
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["upscale", str(tmp_path / "tall.png"), "--crop-dims", "64", "128", "-o", str(tmp_path / "x.png")])
    assert "only applies with --autosized-crop" in capsys.readouterr().err


def test_the_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", "extras_images(tall")
    assert len(scope["outputs"]) == 8
