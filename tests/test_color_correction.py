"""A1111's img2img colour correction (generate --color-correction, sdadapt.color_correction): the LUMINOSITY blend
against blendmodes 2022's code transcribed (the per-pixel loop of its _setLum, its blendLayers composite), the whole
correction against A1111's apply_color_correction transcribed with OpenCV and scikit-image's uint8 histogram
matching, and generate end to end; OpenCV is the interop extra's."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.color_correction import (
    apply_color_correction,
    luminosity_blend,
    setup_color_correction,
)
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)

cv2 = pytest.importorskip("cv2")


def _blendmodes_2022_luminosity(background: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """blendmodes 2022's blendLayers(background, foreground, BlendType.LUMINOSITY) on opaque RGB uint8 arrays."""
    def lum(colours):
        return (colours[:, :, 0] * 0.299) + (colours[:, :, 1] * 0.587) + (colours[:, :, 2] * 0.114)

    def set_lum(original, new_luminosity):
        colours = original.copy()
        luminosity = lum(colours)
        delta = new_luminosity - luminosity
        colours[:, :, 0] += delta
        colours[:, :, 1] += delta
        colours[:, :, 2] += delta
        luminosity = lum(colours)
        mins, maxs = np.min(colours, axis=2), np.max(colours, axis=2)
        for i in range(colours.shape[0]):
            for j in range(colours.shape[1]):
                colour, new, low, high = colours[i][j], luminosity[i, j], mins[i, j], maxs[i, j]
                if low < 0:
                    colours[i][j] = new + (((colour - new) * new) / (new - low))
                if high > 1:
                    colours[i][j] = new + (((colour - new) * (1 - new)) / (high - new))
        return colours

    fg = np.dstack([foreground, np.full(foreground.shape[:2], 255, np.uint8)]) / 255
    bg = np.dstack([background, np.full(background.shape[:2], 255, np.uint8)]) / 255
    bg_alpha, fg_alpha = bg[:, :, 3], fg[:, :, 3] * 1.0
    combined = bg_alpha * fg_alpha
    bg_rgb, fg_rgb = bg[:, :, 0:3], fg[:, :, 0:3]
    with np.errstate(invalid="ignore", divide="ignore"):
        colour = ((bg_alpha - combined)[:, :, None] * bg_rgb + (fg_alpha - combined)[:, :, None] * fg_rgb
                  + combined[:, :, None] * set_lum(bg_rgb, lum(fg_rgb)))
    alpha = bg_alpha + fg_alpha - combined
    out = (np.clip(np.dstack((colour, alpha)), 0, 1) * 255).astype(np.uint8)
    return out[:, :, :3]  # (A1111's .convert('RGB'): alpha 255 dropped)


def _skimage_match_uint8(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """scikit-image's match_histograms(image, reference, channel_axis=-1) for uint8 arrays: its bincount path, the
    interpolated values written into a uint8 array (truncated)."""
    matched = np.empty(image.shape, dtype=image.dtype)
    for c in range(image.shape[-1]):
        source, template = image[..., c], reference[..., c]
        src_lookup = source.reshape(-1)
        src_counts = np.bincount(src_lookup)
        tmpl_counts = np.bincount(template.reshape(-1))
        tmpl_values = np.nonzero(tmpl_counts)[0]
        tmpl_counts = tmpl_counts[tmpl_values]
        src_quantiles = np.cumsum(src_counts) / source.size
        tmpl_quantiles = np.cumsum(tmpl_counts) / template.size
        matched[..., c] = np.interp(src_quantiles, tmpl_quantiles, tmpl_values)[src_lookup].reshape(source.shape)
    return matched


def _a1111_apply_color_correction(correction, image):
    matched = cv2.cvtColor(_skimage_match_uint8(cv2.cvtColor(image, cv2.COLOR_RGB2LAB), correction),
                           cv2.COLOR_LAB2RGB).astype("uint8")
    return _blendmodes_2022_luminosity(matched, image)


def _pixels(seed, h, w, saturated=False):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    if saturated:  # (pure colours and near-black / near-white: the luminosity shift leaves [0, 1] there)
        image[::2, ::3] = [255, 0, 0]
        image[1::3, ::2] = [0, 0, 250]
        image[::5] = [3, 255, 2]
    return image


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2 ** 16), h=st.integers(1, 12), w=st.integers(1, 12), saturated=st.booleans())
def test_the_luminosity_blend_is_blendmodes_2022(seed, h, w, saturated):
    background, foreground = _pixels(seed, h, w, saturated), _pixels(seed + 1, h, w, not saturated)
    assert np.array_equal(luminosity_blend(background, foreground), _blendmodes_2022_luminosity(background, foreground))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2 ** 16), h=st.integers(2, 16), w=st.integers(2, 16), rh=st.integers(2, 16),
       rw=st.integers(2, 16))
def test_the_correction_is_a1111s(seed, h, w, rh, rw):
    """Any image against any reference (another size too): A1111's apply_color_correction transcribed, byte for
    byte; the reference is OpenCV's Lab of the init image."""
    init, image = _pixels(seed, rh, rw, saturated=True), _pixels(seed + 7, h, w)
    correction = setup_color_correction(init)
    assert np.array_equal(correction, cv2.cvtColor(init, cv2.COLOR_RGB2LAB))
    assert np.array_equal(apply_color_correction(correction, image), _a1111_apply_color_correction(correction, image))


def test_an_image_against_its_own_colours_stays_close():
    """Matching an image's histogram to its own Lab is the identity; only OpenCV's 8-bit Lab round trip (lossy for
    saturated colours) and the luminosity blend move it: about a level on average, a few at most."""
    image = _pixels(3, 24, 24)
    moved = np.abs(apply_color_correction(setup_color_correction(image), image).astype(int) - image.astype(int))
    assert moved.mean() < 1.5 and moved.max() <= 12


def test_bad_arrays_and_missing_opencv_are_said(monkeypatch):
    with pytest.raises(ValueError, match="uint8 RGB"):
        setup_color_correction(np.zeros((4, 4, 3), np.float32))
    import sys

    monkeypatch.setitem(sys.modules, "cv2", None)
    with pytest.raises(ImportError, match="opencv-python-headless"):
        setup_color_correction(np.zeros((4, 4, 3), np.uint8))


def test_generate_corrects_each_image_against_its_init_image(plain_sd, tmp_path):  # noqa: F811
    """generate --color-correction: the written image is the uncorrected run's (same seed) corrected against the
    init image as it was encoded (resized to the run's size); with a mask the overlay after the correction keeps the
    unmasked pixels; refused without an init image."""
    from PIL import Image

    from sdadapt.images import to_uint8
    from sdadapt.jobs.generate import run_generate
    from sdadapt.resize_modes import init_image_pixels

    Image.fromarray(_pixels(5, 40, 48, saturated=True)).save(tmp_path / "in.png")
    common = {"model": str(plain_sd), "prompt": "a photo", "steps": 3, "sampler": "euler", "seed": 2,
              "init_image": str(tmp_path / "in.png"), "denoising_strength": 0.6, "width": 32, "height": 32,
              "overwrite": True}
    plain = run_generate(out=str(tmp_path / "a.png"), **common)
    fixed = run_generate(out=str(tmp_path / "b.png"), color_correction=True, **common)
    reference = setup_color_correction(to_uint8(init_image_pixels(str(tmp_path / "in.png"), (32, 32), mode="just")))
    assert np.array_equal(fixed["pixels"][0], apply_color_correction(reference, plain["pixels"][0]))
    assert not np.array_equal(fixed["pixels"][0], plain["pixels"][0])
    with pytest.raises(ValueError, match="give --init-image"):
        run_generate(out=str(tmp_path / "c.png"), color_correction=True,
                     **{**common, "init_image": None, "denoising_strength": 0.75})
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    Image.fromarray(mask, "L").save(tmp_path / "mask.png")
    inpaint = {**common, "init_image": str(tmp_path / "in32.png"), "mask": str(tmp_path / "mask.png"),
               "mask_blur": 0}
    Image.open(tmp_path / "in.png").resize((32, 32)).save(tmp_path / "in32.png")
    plain = run_generate(out=str(tmp_path / "d.png"), **inpaint)
    fixed = run_generate(out=str(tmp_path / "e.png"), color_correction=True, **inpaint)
    original = np.asarray(Image.open(tmp_path / "in32.png"))
    assert np.array_equal(fixed["pixels"][0][:, :12], original[:, :12])  # (corrected, then the overlay: kept)
    assert not np.array_equal(fixed["pixels"][0][:, 20:], plain["pixels"][0][:, 20:])


def test_the_reference_is_the_runs_first_as_a1111_keeps_it(plain_sd, tmp_path, monkeypatch):  # noqa: F811
    """A1111 keeps p.color_corrections from the first init image for the whole run: a folder's second image is
    corrected against the first one's colours; Loopback's reference is the uploaded image as it is (not resized); a
    reference handed over (a script's later run of the same p) is the one used — Outpainting mk2's second side gets
    the first side's."""
    from PIL import Image

    from sdadapt.images import to_uint8
    from sdadapt.jobs.generate import run_generate
    from sdadapt.jobs.generate_outpaint_mk2 import run_outpainting_mk2
    from sdadapt.resize_modes import init_image_pixels

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(_pixels(5, 40, 48, saturated=True)).save(folder / "a.png")
    Image.fromarray(_pixels(9, 40, 48)).save(folder / "b.png")
    common = {"model": str(plain_sd), "prompt": "a photo", "steps": 3, "sampler": "euler", "seed": 2,
              "denoising_strength": 0.6, "width": 32, "height": 32, "overwrite": True}
    plain = run_generate(init_image=str(folder), out=str(tmp_path / "p"), **common)
    fixed = run_generate(init_image=str(folder), out=str(tmp_path / "f"), color_correction=True, **common)
    first = setup_color_correction(to_uint8(init_image_pixels(str(folder / "a.png"), (32, 32), mode="just")))
    assert [np.array_equal(f, apply_color_correction(first, p)) for f, p in zip(fixed["pixels"], plain["pixels"])] \
        == [True, True]
    looped = run_generate(init_image=str(folder / "a.png"), out=str(tmp_path / "l.png"), loopback=2,
                          color_correction=True, **common)
    alone = run_generate(init_image=str(folder / "a.png"), out=str(tmp_path / "o.png"), **common)
    raw = setup_color_correction(np.asarray(Image.open(folder / "a.png").convert("RGB")))
    assert np.array_equal(looped["pixels"][0], apply_color_correction(raw, alone["pixels"][0]))
    given = run_generate(init_image=str(folder / "b.png"), out=str(tmp_path / "g.png"), color_correction=True,
                         color_reference=raw, **common)  # (a later run of the same p: the reference handed over)
    alone_b = run_generate(init_image=str(folder / "b.png"), out=str(tmp_path / "h.png"), **common)
    assert np.array_equal(given["pixels"][0], apply_color_correction(raw, alone_b["pixels"][0]))
    assert given["color_reference"] is raw
    from sdadapt.jobs import generate_runs

    handed = []
    real = generate_runs.run_named

    def spy(where, settings, **kw):
        handed.append(settings.get("color_reference"))
        result = real(where, settings, **kw)
        handed.append(result["color_reference"])
        return result

    monkeypatch.setattr(generate_runs, "run_named", spy)
    run_outpainting_mk2(pixels=16, directions=("left", "right"), init_image=str(folder / "a.png"),
                        out=str(tmp_path / "m.png"), color_correction=True,
                        **{k: v for k, v in common.items() if k not in ("width", "height")}, width=64, height=64)
    first_in, first_out, second_in, second_out = handed  # (mk2's sides: left, then right)
    assert first_in is None and second_in is first_out and second_out is first_out  # (A1111's one p)
    with pytest.raises(ValueError, match="color_correction=True"):
        run_generate(init_image=str(folder / "b.png"), out=str(tmp_path / "i.png"), color_reference=raw, **common)


def test_the_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    scope = run_block_with("samplers.md", "luminosity_blend(image, image)")
    assert scope["fixed"].shape == (16, 16, 3)
