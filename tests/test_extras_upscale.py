"""``python -m sdadapt upscale``: A1111's Extras "Upscale" (``scripts/postprocessing_upscale.py``) against its
``upscale`` / ``process`` transcribed here, with Lanczos, Nearest and an ESRGAN model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.cli import main
from sdadapt.extras_upscale import (
    ExtrasUpscale,
    extras_upscale,
    limit_size_by_one_dimension,
    postprocessing_text,
)
from sdadapt.images import read_png_text

Image = pytest.importorskip("PIL.Image")
ImageOps = pytest.importorskip("PIL.ImageOps")
from test_sd_upscale import _a1111_upscale


def _a1111_limit(w, h, limit):
    if h > w and h > limit:
        w = limit * w // h
        h = limit
    elif w > limit:
        h = limit * h // w
        w = limit
    return int(w), int(h)


def _a1111_extras(image, resample_1, name_1, mode, upscale_by, max_side_length, to_w, to_h, crop,
                  resample_2=None, name_2=None, visibility=0.0):
    """``ScriptPostprocessingUpscale.process`` with its ``upscale`` (no cache), ``resample``: the upscaler's
    ``do_upscale`` for ``_a1111_upscale`` (a PIL filter or a callable)."""
    info = {}

    def upscale(image, resample, upscale_mode, upscale_by, upscale_to_width, upscale_to_height, upscale_crop):
        if upscale_mode == 1:
            upscale_by = max(upscale_to_width / image.width, upscale_to_height / image.height)
            info["Postprocess upscale to"] = f"{upscale_to_width}x{upscale_to_height}"
        else:
            info["Postprocess upscale by"] = upscale_by
            if max_side_length != 0 and max(*image.size) * upscale_by > max_side_length:
                upscale_mode = 1
                upscale_crop = False
                upscale_to_width, upscale_to_height = _a1111_limit(image.width * upscale_by,
                                                                   image.height * upscale_by, max_side_length)
                upscale_by = max(upscale_to_width / image.width, upscale_to_height / image.height)
                info["Max side length"] = max_side_length
        image = _a1111_upscale(image, upscale_by, resample)
        if upscale_mode == 1 and upscale_crop:
            cropped = Image.new("RGB", (upscale_to_width, upscale_to_height))
            cropped.paste(image, box=(upscale_to_width // 2 - image.width // 2,
                                      upscale_to_height // 2 - image.height // 2))
            image = cropped
            info["Postprocess crop to"] = f"{image.width}x{image.height}"
        return image

    upscaled = upscale(image, resample_1, mode, upscale_by, to_w, to_h, crop)
    info["Postprocess upscaler"] = name_1
    if resample_2 is not None and visibility > 0:
        second = upscale(image, resample_2, mode, upscale_by, to_w, to_h, crop)
        upscaled = Image.blend(upscaled, second, visibility)
        info["Postprocess upscaler 2"] = name_2
    return upscaled, info


@settings(max_examples=200, deadline=None)
@given(st.floats(1, 5000), st.floats(1, 5000), st.integers(8, 4096))
def test_the_max_side_length_is_a1111s(w, h, limit):
    assert limit_size_by_one_dimension(w, h, limit) == _a1111_limit(w, h, limit)


def _picture(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize(("mode", "scale", "size", "crop", "limit", "second"), [
    (0, 2.0, None, True, 0, None),
    (0, 2.5, None, True, 0, ("Nearest", 0.3)),
    (0, 4.0, None, True, 100, None),  # (the max side length: scaled to fit, no crop)
    (1, None, (96, 80), True, 0, None),  # (scale to, cropped to fit)
    (1, None, (96, 80), False, 0, None),
    (1, None, (70, 90), True, 0, ("Nearest", 1.0)),
])
def test_the_upscale_is_a1111s(mode, scale, size, crop, limit, second):
    image = _picture(37, 29, seed=4)
    ours, info = extras_upscale(image, ExtrasUpscale(
        upscaler="Lanczos", scale=scale or 4.0, size=size, crop=crop, max_side_length=limit,
        upscaler_2=None if second is None else second[0], visibility_2=0.0 if second is None else second[1]))
    theirs, their_info = _a1111_extras(image, Image.Resampling.LANCZOS, "Lanczos", mode, scale or 4.0, limit,
                                       *(size or (0, 0)), crop,
                                       resample_2=None if second is None else Image.Resampling.NEAREST,
                                       name_2=None if second is None else second[0],
                                       visibility=0.0 if second is None else second[1])
    assert ours.size == theirs.size and np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert info == their_info


def test_the_postprocessing_text_and_an_esrgan_model(tmp_path):
    from test_esrgan import _basicsr

    from sdadapt.esrgan import EsrganUpscaler

    torch.save(_basicsr(2).state_dict(), tmp_path / "2x-Fine.pth")
    upscaler = EsrganUpscaler(tmp_path / "2x-Fine.pth")
    image = _picture(30, 20, seed=1)
    ours, info = extras_upscale(image, ExtrasUpscale(upscaler=upscaler, scale=2.0))
    theirs, _ = _a1111_extras(image, upscaler, "2x-Fine", 0, 2.0, 0, 0, 0, True)
    assert np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert postprocessing_text(info) == "Postprocess upscale by: 2, Postprocess upscaler: 2x-Fine"
    assert postprocessing_text({"Postprocess upscale to": "96x80", "A": "A", "B": None, "C": "x, y"}) == \
        'Postprocess upscale to: 96x80, A, C: "x, y"'
    same, nothing = extras_upscale(image, ExtrasUpscale(upscaler="None"))  # (A1111 skips the step)
    assert np.array_equal(np.asarray(same), np.asarray(image)) and nothing == {}


def test_the_command(tmp_path, capsys):
    assert main(["generate", "--model", "toy", "--prompt", "a red circle", "--steps", "1", "-q",
                 "-o", str(tmp_path / "in" / "a.png")]) == 0
    Image.new("RGBA", (20, 12), (9, 8, 7, 100)).save(tmp_path / "in" / "b.png")
    assert main(["upscale", str(tmp_path / "in" / "a.png"), "--scale-by", "2", "-q",
                 "-o", str(tmp_path / "a2.png")]) == 0
    chunks = read_png_text(tmp_path / "a2.png")
    assert Image.open(tmp_path / "a2.png").size == (64, 64) and chunks["parameters"].startswith("a red circle")
    assert chunks["postprocessing"] == chunks["extras"] == "Postprocess upscale by: 2, Postprocess upscaler: Lanczos"
    assert main(["upscale", str(tmp_path / "in"), "--scale-to", "48x40", "--upscaler", "nearest", "-q",
                 "-o", str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png"]
    assert Image.open(tmp_path / "out" / "b.png").size == (48, 40)
    assert "parameters" not in read_png_text(tmp_path / "out" / "b.png")
    assert main(["upscale", str(tmp_path / "in" / "a.png"), "-o", str(tmp_path / "a2.png")]) == 8
    assert main(["upscale", str(tmp_path / "in" / "a.png"), "--upscaler", str(tmp_path / "none.pth"),
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "no such file" in capsys.readouterr().err
    from test_esrgan import _basicsr

    # (an upscaler found by A1111's name in --upscaler-dir)

    (tmp_path / "models").mkdir()
    torch.save(_basicsr(2).state_dict(), tmp_path / "models" / "RealESRGAN_x2plus.pth")
    assert main(["upscale", str(tmp_path / "in" / "a.png"), "--upscaler", "R-ESRGAN 2x+", "--upscaler-dir",
                 str(tmp_path / "models"), "--scale-by", "2", "-q", "-o", str(tmp_path / "r.png")]) == 0
    assert read_png_text(tmp_path / "r.png")["postprocessing"].endswith("Postprocess upscaler: R-ESRGAN 2x+")
    with pytest.raises(SystemExit):  # (a usage error: argparse's exit 2)
        main(["upscale", str(tmp_path / "in" / "a.png"), "--no-crop", "-o", str(tmp_path / "y.png")])
    assert "--no-crop only applies with --scale-to WxH" in capsys.readouterr().err


def test_an_exif_rotated_image_is_upscaled_upright_and_several_images_need_a_folder(tmp_path, capsys):
    """A JPEG stored 32x40 with EXIF Orientation 6 (upright 40x32) comes out upright, as A1111's Extras reads it
    (``images.read`` -> ``ImageOps.exif_transpose``); two images with an image-named ``--out`` are refused (they go
    into a folder), where a folder named ``two.png`` was made."""
    stored = Image.new("RGB", (32, 40), (200, 10, 10))
    stored.paste((10, 10, 200), (0, 0, 32, 8))  # (a blue band on top of the stored pixels)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert main(["upscale", str(tmp_path / "rot.jpg"), "--scale-by", "2", "-q", "-o", str(tmp_path / "up.png")]) == 0
    with Image.open(tmp_path / "rot.jpg") as opened:
        want = ImageOps.exif_transpose(opened).convert("RGB").resize((80, 64), Image.LANCZOS)
    got = Image.open(tmp_path / "up.png")
    assert got.size == (80, 64) and np.abs(np.asarray(got, dtype=int) - np.asarray(want, dtype=int)).max() <= 1
    stored.save(tmp_path / "b.png")
    assert main(["upscale", str(tmp_path / "rot.jpg"), str(tmp_path / "b.png"), "-q",
                 "-o", str(tmp_path / "two.png")]) == 2
    assert "several images are written into a folder" in capsys.readouterr().err and not (tmp_path / "two.png").exists()


def test_the_docs_example():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "extras_upscale(")
