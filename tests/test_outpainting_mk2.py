"""Outpainting mk2 (A1111's ``scripts/outpainting_mk_2.py``): the matched-noise fill and the per-side geometry
against the script transcribed (its ``get_matched_noise`` with scikit-image's ``match_histograms``, and its
``expand`` around a stand-in for ``process_images``), and ``generate --outpaint-mk2`` end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.outpainting_mk2 import (
    check_mk2,
    match_histograms,
    matched_noise,
    mk2_blur,
    mk2_step,
)
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)

Image = pytest.importorskip("PIL.Image")
ImageDraw = pytest.importorskip("PIL.ImageDraw")


# ------------------------------------------------------------------ the script, transcribed
def _skimage_match_cdf(source, template):  # (skimage.exposure.histogram_matching._match_cumulative_cdf, float path)
    _src_values, src_lookup, src_counts = np.unique(source.reshape(-1), return_inverse=True, return_counts=True)
    tmpl_values, tmpl_counts = np.unique(template.reshape(-1), return_counts=True)
    src_quantiles = np.cumsum(src_counts) / source.size
    tmpl_quantiles = np.cumsum(tmpl_counts) / template.size
    interp_a_values = np.interp(src_quantiles, tmpl_quantiles, tmpl_values)
    return interp_a_values[src_lookup].reshape(source.shape)


def _skimage_match_histograms(image, reference):  # (match_histograms(..., channel_axis=1) on (N, C) arrays)
    matched = np.empty(image.shape, dtype=image.dtype)
    for channel in range(image.shape[-1]):
        matched[..., channel] = _skimage_match_cdf(image[..., channel], reference[..., channel])
    return matched


def _a1111_matched_noise(_np_src_image, np_mask_rgb, noise_q=1, color_variation=0.05):
    def _fft2(data):
        out_fft = np.zeros((data.shape[0], data.shape[1], data.shape[2]), dtype=np.complex128)
        for c in range(data.shape[2]):
            c_data = data[:, :, c]
            out_fft[:, :, c] = np.fft.fft2(np.fft.fftshift(c_data), norm="ortho")
            out_fft[:, :, c] = np.fft.ifftshift(out_fft[:, :, c])
        return out_fft

    def _ifft2(data):
        out_ifft = np.zeros((data.shape[0], data.shape[1], data.shape[2]), dtype=np.complex128)
        for c in range(data.shape[2]):
            c_data = data[:, :, c]
            out_ifft[:, :, c] = np.fft.ifft2(np.fft.fftshift(c_data), norm="ortho")
            out_ifft[:, :, c] = np.fft.ifftshift(out_ifft[:, :, c])
        return out_ifft

    def _get_gaussian_window(width, height, std=3.14, mode=0):
        window_scale_x = float(width / min(width, height))
        window_scale_y = float(height / min(width, height))
        window = np.zeros((width, height))
        x = (np.arange(width) / width * 2. - 1.) * window_scale_x
        for y in range(height):
            fy = (y / height * 2. - 1.) * window_scale_y
            if mode == 0:
                window[:, y] = np.exp(-(x ** 2 + fy ** 2) * std)
            else:
                window[:, y] = (1 / ((x ** 2 + 1.) * (fy ** 2 + 1.))) ** (std / 3.14)
        return window

    def _get_masked_window_rgb(np_mask_grey, hardness=1.):
        np_mask_rgb = np.zeros((np_mask_grey.shape[0], np_mask_grey.shape[1], 3))
        hardened = np_mask_grey[:] ** hardness if hardness != 1. else np_mask_grey[:]
        for c in range(3):
            np_mask_rgb[:, :, c] = hardened[:]
        return np_mask_rgb

    width = _np_src_image.shape[0]
    height = _np_src_image.shape[1]
    num_channels = _np_src_image.shape[2]
    np_mask_grey = (np.sum(np_mask_rgb, axis=2) / 3.)
    img_mask = np_mask_grey > 1e-6
    ref_mask = np_mask_grey < 1e-3
    windowed_image = _np_src_image * (1. - _get_masked_window_rgb(np_mask_grey))
    windowed_image /= np.max(windowed_image)
    windowed_image += np.average(_np_src_image) * np_mask_rgb
    src_fft = _fft2(windowed_image)
    src_dist = np.absolute(src_fft)
    src_phase = src_fft / src_dist
    rng = np.random.default_rng(0)
    noise_window = _get_gaussian_window(width, height, mode=1)
    noise_rgb = rng.random((width, height, num_channels))
    noise_grey = (np.sum(noise_rgb, axis=2) / 3.)
    noise_rgb *= color_variation
    for c in range(num_channels):
        noise_rgb[:, :, c] += (1. - color_variation) * noise_grey
    noise_fft = _fft2(noise_rgb)
    for c in range(num_channels):
        noise_fft[:, :, c] *= noise_window
    noise_rgb = np.real(_ifft2(noise_fft))
    shaped_noise_fft = _fft2(noise_rgb)
    shaped_noise_fft[:, :, :] = np.absolute(shaped_noise_fft[:, :, :]) ** 2 * (src_dist ** noise_q) * src_phase
    brightness_variation = 0.
    contrast_adjusted_np_src = _np_src_image[:] * (brightness_variation + 1.) - brightness_variation * 2.
    shaped_noise = np.real(_ifft2(shaped_noise_fft))
    shaped_noise -= np.min(shaped_noise)
    shaped_noise /= np.max(shaped_noise)
    shaped_noise[img_mask, :] = _skimage_match_histograms(shaped_noise[img_mask, :] ** 1.,
                                                          contrast_adjusted_np_src[ref_mask, :])
    shaped_noise = _np_src_image[:] * (1. - np_mask_rgb) + shaped_noise * np_mask_rgb
    return np.clip(shaped_noise[:], 0., 1.)


def _a1111_expand(init, expand_pixels, process_width, process_height, mask_blur_x, mask_blur_y, noise_q,
                  color_variation, process, *, is_left=False, is_right=False, is_top=False, is_bottom=False):
    """The script's ``expand`` for one image; ``process(image, mask, latent_mask, width, height)`` stands in for
    ``process_images`` (what it is handed is recorded by the caller)."""
    is_horiz = is_left or is_right
    is_vert = is_top or is_bottom
    pixels_horiz = expand_pixels if is_horiz else 0
    pixels_vert = expand_pixels if is_vert else 0
    res_w = init.width + pixels_horiz
    res_h = init.height + pixels_vert
    process_res_w = math.ceil(res_w / 64) * 64
    process_res_h = math.ceil(res_h / 64) * 64
    img = Image.new("RGB", (process_res_w, process_res_h))
    img.paste(init, (pixels_horiz if is_left else 0, pixels_vert if is_top else 0))
    mask = Image.new("RGB", (process_res_w, process_res_h), "white")
    draw = ImageDraw.Draw(mask)
    draw.rectangle((
        expand_pixels + mask_blur_x if is_left else 0,
        expand_pixels + mask_blur_y if is_top else 0,
        mask.width - expand_pixels - mask_blur_x if is_right else res_w,
        mask.height - expand_pixels - mask_blur_y if is_bottom else res_h,
    ), fill="black")
    np_image = (np.asarray(img) / 255.0).astype(np.float64)
    np_mask = (np.asarray(mask) / 255.0).astype(np.float64)
    noised = _a1111_matched_noise(np_image, np_mask, noise_q, color_variation)
    output = Image.fromarray(np.clip(noised * 255., 0., 255.).astype(np.uint8), mode="RGB")
    target_width = min(process_width, init.width + pixels_horiz) if is_horiz else img.width
    target_height = min(process_height, init.height + pixels_vert) if is_vert else img.height
    width = target_width if is_horiz else img.width
    height = target_height if is_vert else img.height
    crop_region = (
        0 if is_left else output.width - target_width,
        0 if is_top else output.height - target_height,
        target_width if is_left else output.width,
        target_height if is_top else output.height,
    )
    mask = mask.crop(crop_region)
    image_to_process = output.crop(crop_region)
    latent_mask = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(latent_mask)
    draw.rectangle((
        expand_pixels + mask_blur_x * 2 if is_left else 0,
        expand_pixels + mask_blur_y * 2 if is_top else 0,
        mask.width - expand_pixels - mask_blur_x * 2 if is_right else res_w,
        mask.height - expand_pixels - mask_blur_y * 2 if is_bottom else res_h,
    ), fill="black")
    result = process(image_to_process, mask, latent_mask, width, height)
    output.paste(result, (0 if is_left else output.width - result.width, 0 if is_top else output.height - result.height))
    return output.crop((0, 0, res_w, res_h))


# ------------------------------------------------------------------ the tests
def _image(seed: int, h: int, w: int, *, black: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    return (pixels / 255.0).astype(np.float64)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**16), st.integers(4, 40), st.integers(4, 40), st.integers(1, 12), st.integers(0, 3),
       st.floats(0, 4), st.floats(0, 1))
def test_the_fill_is_the_scripts(seed, h, w, border, side, noise_q, color_variation):
    image = _image(seed, h, w)
    mask = np.zeros((h, w, 3))
    border = min(border, (w if side < 2 else h) - 1)
    [lambda: mask[:, :border].fill(1), lambda: mask[:, w - border:].fill(1), lambda: mask[:border].fill(1),
     lambda: mask[h - border:].fill(1)][side]()
    image = image * (1 - mask)  # (the canvas: black where it grows, as the script pastes it)
    ours = matched_noise(image, mask, noise_q=noise_q, color_variation=color_variation)
    assert np.array_equal(ours, _a1111_matched_noise(image.copy(), mask, noise_q, color_variation))
    assert np.array_equal(ours[mask == 0], image[mask == 0])


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**16), st.integers(1, 200), st.integers(1, 200), st.integers(1, 4))
def test_histogram_matching_is_scikit_images(seed, n, m, distinct):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, distinct * 3, (n, 3)).astype(np.float64) / 7.0  # (ties, as 8-bit pixels have)
    reference = rng.random((m, 3))
    assert np.array_equal(match_histograms(image, reference), _skimage_match_histograms(image, reference))


def test_histogram_matching_against_scikit_image_itself():
    exposure = pytest.importorskip("skimage.exposure")  # (not a test dependency: run where it is installed)
    rng = np.random.default_rng(1)
    image, reference = rng.integers(0, 9, (300, 3)) / 8.0, rng.random((120, 3))
    assert np.array_equal(match_histograms(image, reference), exposure.match_histograms(image, reference,
                                                                                       channel_axis=1))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**16), st.integers(24, 90), st.integers(24, 90), st.sampled_from([8, 16, 24, 40]),
       st.integers(0, 8), st.sampled_from(["left", "right", "up", "down"]), st.sampled_from([64, 96, 128]))
def test_each_side_is_the_scripts_expand(seed, h, w, pixels, blur, side, size):
    image = Image.fromarray((_image(seed, h, w) * 255).astype(np.uint8), "RGB")
    blur_xy = mk2_blur(blur, [side])
    handed = []

    def process(init, mask, latent_mask, width, height):  # (a stand-in generation: the init image, inverted)
        handed.append((np.asarray(init), np.asarray(mask), np.asarray(latent_mask), (width, height)))
        return Image.fromarray(255 - np.asarray(init), "RGB")

    try:
        expected = _a1111_expand(image, pixels, size, size, *blur_xy, 1.0, 0.05, process,
                                 **{{"left": "is_left", "right": "is_right", "up": "is_top",
                                     "down": "is_bottom"}[side]: True})
    except ValueError:  # (PIL refuses the script's rectangle: sdadapt refuses it too)
        with pytest.raises(ValueError):
            mk2_step(image, side, pixels, blur=blur_xy, size=(size, size))
        return
    step = mk2_step(image, side, pixels, blur=blur_xy, size=(size, size))
    init, mask, latent_mask, run_size = handed[0]
    assert step.size == run_size
    assert np.array_equal(np.asarray(step.init), init)
    assert np.array_equal(np.asarray(step.mask), mask)
    assert np.array_equal(np.asarray(step.latent_mask), latent_mask)
    grown = step.paste(Image.fromarray(255 - np.asarray(step.init), "RGB"))
    assert np.array_equal(np.asarray(grown), np.asarray(expected))


def test_settings_and_refusals():
    assert mk2_blur(8, ["left"]) == (8, 0) and mk2_blur(8, ["up", "right"]) == (8, 8) and mk2_blur(3, ["down"]) == (0, 3)
    assert check_mk2(128, 8, ["up", "left"], 1.0, 0.05) == ("up", "left")
    for bad in [(0, 8, ["left"], 1.0, 0.05), (8, -1, ["left"], 1.0, 0.05), (8, 8, [], 1.0, 0.05),
                (8, 8, ["north"], 1.0, 0.05), (8, 8, ["left"], -1.0, 0.05), (8, 8, ["left"], 1.0, 1.5)]:
        with pytest.raises(ValueError):
            check_mk2(*bad)
    with pytest.raises(ValueError, match="all black"):
        matched_noise(np.zeros((8, 8, 3)), np.pad(np.ones((8, 2, 3)), ((0, 0), (0, 6), (0, 0))))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        matched_noise(np.zeros((8, 8, 3)), np.zeros((8, 8, 1)))


# ------------------------------------------------------------------ generate --outpaint-mk2, end to end


def _cli(model, out, *extra):
    from sdadapt.cli import main

    return main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", "2", "--sampler", "euler",
                 "--quiet", "--out", str(out), "--width", "64", "--height", "64", "--denoising-strength", "0.8",
                 "--init-image", str(out.parent / "in.png"), *extra])


def test_cli_is_the_scripts_chain_of_sides(plain_sd, tmp_path, monkeypatch):  # noqa: F811
    """48 x 40 grown by 24 left and 32 down (mask blur 8): each side's run handed A1111's region, mask (blur 32 x
    and y), latent mask, "original" content and seed 5 at the region's size, the image written A1111's chain of
    pastes with the first run's infotext; the model loaded once."""
    from sdadapt.images import read_png_text
    from sdadapt.jobs import generate_inpaint, generate_runs, loaded_models

    Image.fromarray((_image(3, 40, 48) * 255).astype(np.uint8), "RGB").save(tmp_path / "in.png")
    handed, results, loads = [], [], []
    real_inputs, real_run, real_load = generate_inpaint.inpaint_inputs, generate_runs.run_named, loaded_models.load_system

    def spy_inputs(system, image_path, mask_path, **kw):
        handed.append((np.asarray(Image.open(image_path)), np.asarray(Image.open(mask_path)),
                       np.asarray(Image.open(kw["latent_mask"])), kw["mask_blur"], kw["inpainting_fill"],
                       (kw["width"], kw["height"])))
        return real_inputs(system, image_path, mask_path, **kw)

    def spy_run(where, settings, **kw):
        results.append((settings, real_run(where, settings, **kw)))
        return results[-1][1]

    monkeypatch.setattr(generate_inpaint, "inpaint_inputs", spy_inputs)
    monkeypatch.setattr(generate_runs, "run_named", spy_run)
    monkeypatch.setattr(loaded_models, "load_system", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    assert _cli(plain_sd, tmp_path / "out.png", "--seed", "5", "--outpaint-mk2", "24", "--outpaint-directions",
                "down", "left", "--outpaint-mask-blur", "2") == 0
    assert len(loads) == 1 and len(handed) == len(results) == 2
    expected_handed = []

    def process(init, mask, latent_mask, width, height):
        expected_handed.append((np.asarray(init), np.asarray(mask), np.asarray(latent_mask), (width, height)))
        return Image.fromarray(results[len(expected_handed) - 1][1]["pixels"][0], "RGB")

    grown = Image.open(tmp_path / "in.png").convert("RGB")
    # the script's run (outpainting_mk_2.py:172-185): each axis grows to a multiple of 64, shared between its sides
    left, right, up, down = 24, 0, 0, 24
    target_w, target_h = math.ceil((48 + left + right) / 64) * 64, math.ceil((40 + up + down) / 64) * 64
    left = left * (target_w - 48) // (left + right)
    down = target_h - 40 - up
    assert (left, down) == (80, 24)  # (not the 24 asked: 48 + 24 is no multiple of 64)
    for side, amount in (("is_left", left), ("is_bottom", down)):  # (the script's order: left before down)
        grown = _a1111_expand(grown, amount, 64, 64, 2, 2, 1.0, 0.05, process, **{side: True})
    for (image, mask, latent, blur, fill, size), (init, a_mask, a_latent, a_size), (run, _) in zip(
            handed, expected_handed, results):
        assert np.array_equal(image, init) and np.array_equal(mask, a_mask) and np.array_equal(latent, a_latent)
        assert blur == (8.0, 8.0) and fill == "original" and size == a_size and run["seed"] == 5
    written = Image.open(tmp_path / "out.png")
    assert written.size == (128, 64) and np.array_equal(np.asarray(written.convert("RGB")), np.asarray(grown))
    assert read_png_text(tmp_path / "out.png")["parameters"] == results[0][1]["infotexts"][0]


def test_cli_counts_seeds_and_refusals(plain_sd, tmp_path, capsys):  # noqa: F811
    Image.fromarray((_image(4, 32, 32) * 255).astype(np.uint8), "RGB").save(tmp_path / "in.png")
    assert _cli(plain_sd, tmp_path / "o.png", "--seed", "5", "--count", "2", "--outpaint-mk2", "16") == 2
    assert "the same seed" in capsys.readouterr().err
    assert _cli(plain_sd, tmp_path / "o.png", "--seed", "-1", "--count", "2", "--outpaint-mk2", "16",
                "--outpaint-directions", "right") == 0
    assert sorted(p.name for p in tmp_path.glob("o*.png")) == ["o-00.png", "o-01.png"]
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "o-00.png")), np.asarray(Image.open(tmp_path / "o-01.png")))
    assert _cli(plain_sd, tmp_path / "m.png", "--seed", "5", "--outpaint-mk2", "16", "--mask",
                str(tmp_path / "in.png")) == 2
    assert "leave --mask out" in capsys.readouterr().err
    assert _cli(plain_sd, tmp_path / "m.png", "--outpaint-mk2", "16", "--outpaint", "16") == 2
    assert "not with --outpaint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(plain_sd, tmp_path / "m.png", "--outpaint-mk2", "16", "--outpaint-fill", "original")
    assert "--outpaint-fill only applies with --outpaint PX" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()


def test_the_docs_example():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "mk2_step(")
