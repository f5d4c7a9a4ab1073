"""``generate --inpaint-sketch ORIGINAL``: A1111's img2img "Inpaint sketch" tab — its mask and init image against
``modules/img2img.py`` (mode 3) transcribed, and the run equal to inpainting those two files."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.cli import main
from sdadapt.inpaint_sketch import inpaint_sketch_inputs
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)

Image = pytest.importorskip("PIL.Image")
ImageEnhance = pytest.importorskip("PIL.ImageEnhance")
ImageFilter = pytest.importorskip("PIL.ImageFilter")


def _a1111(inpaint_color_sketch, inpaint_color_sketch_orig, mask_alpha, mask_blur):  # (img2img(), mode 3)
    image = inpaint_color_sketch
    orig = inpaint_color_sketch_orig or inpaint_color_sketch
    pred = np.any(np.array(image) != np.array(orig), axis=-1)
    mask = Image.fromarray(pred.astype(np.uint8) * 255, "L")
    mask = ImageEnhance.Brightness(mask).enhance(1 - mask_alpha / 100)
    blur = ImageFilter.GaussianBlur(mask_blur)
    image = Image.composite(image.filter(blur), orig, mask.filter(blur))
    return image, mask


def _pair(seed: int, h: int, w: int):
    rng = np.random.default_rng(seed)
    original = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    sketch = original.copy()
    y, x = rng.integers(0, h), rng.integers(0, w)
    sketch[y:y + h // 3 + 1, x:x + w // 3 + 1] = rng.integers(0, 256, 3, dtype=np.uint8)  # (a stroke of one colour)
    return Image.fromarray(sketch, "RGB"), Image.fromarray(original, "RGB")


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(4, 48), st.integers(4, 48), st.floats(0, 100), st.sampled_from([0, 1, 4, 7.5]))
def test_the_mask_and_image_are_a1111s(seed, h, w, alpha, blur):
    sketch, original = _pair(seed, h, w)
    image, mask = inpaint_sketch_inputs(sketch, original, mask_alpha=alpha, mask_blur=blur)
    a_image, a_mask = _a1111(sketch, original, alpha, blur)
    assert np.array_equal(np.asarray(image), np.asarray(a_image)) and np.array_equal(np.asarray(mask), np.asarray(a_mask))


def test_refusals():
    sketch, original = _pair(0, 16, 16)
    with pytest.raises(ValueError, match="the same size"):
        inpaint_sketch_inputs(sketch, original.resize((8, 8)))
    with pytest.raises(ValueError, match="0 to 100"):
        inpaint_sketch_inputs(sketch, original, mask_alpha=101)


def test_the_run_is_inpainting_those_two_files(plain_sd, tmp_path, capsys):  # noqa: F811
    sketch, original = _pair(3, 64, 64)
    sketch.save(tmp_path / "sketch.png")
    original.save(tmp_path / "original.png")
    image, mask = _a1111(sketch, original, 30.0, 2.0)
    image.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    base = ["generate", "--model", str(plain_sd), "--prompt", "a photo", "--steps", "2", "--sampler", "euler",
            "--seed", "5", "-q", "--width", "64", "--height", "64", "--denoising-strength", "0.8", "--mask-blur", "2"]
    assert main([*base, "--init-image", str(tmp_path / "sketch.png"), "--inpaint-sketch", str(tmp_path / "original.png"),
                 "--mask-transparency", "30", "-o", str(tmp_path / "a.png")]) == 0
    assert main([*base, "--init-image", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                 "-o", str(tmp_path / "b.png")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    assert main([*base, "--init-image", str(tmp_path / "sketch.png"), "--inpaint-sketch", str(tmp_path / "original.png"),
                 "--mask", str(tmp_path / "mask.png"), "-o", str(tmp_path / "c.png")]) == 2
    assert "leave --mask out" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--init-image", str(tmp_path / "sketch.png"), "--mask-transparency", "10", "-o",
              str(tmp_path / "c.png")])
    assert "--mask-transparency only applies with --inpaint-sketch ORIGINAL" in capsys.readouterr().err
    assert not (tmp_path / "c.png").exists()


def test_the_docs_example():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "inpaint_sketch_inputs(sketch")
