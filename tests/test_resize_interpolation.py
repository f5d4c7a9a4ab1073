"""kohya's ``resize_interpolation`` (sd-scripts library/utils.py ``resize_image``): each method against
the library kohya calls (PIL for lanczos / box / nearest) or a float64 reference written here from
OpenCV's ``resize.cpp`` (bilinear, bicubic, area — OpenCV is not installed), plus torch's own
non-antialiased bilinear / bicubic as a second implementation of OpenCV's geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.resampling import (
    RESIZE_INTERPOLATIONS,
    check_interpolation,
    kohya_default,
    resample,
)

Image = pytest.importorskip("PIL.Image")

_sizes = st.tuples(st.integers(3, 40), st.integers(3, 40))


def _pil_float(array: np.ndarray, size: tuple[int, int], method) -> np.ndarray:
    """PIL's resize of a float32 (H, W) image ("F" mode: no rounding) to (h, w)."""
    return np.asarray(Image.fromarray(array.astype(np.float32), mode="F").resize((size[1], size[0]), resample=method))


@settings(max_examples=25, deadline=None)
@given(src=_sizes, dst=_sizes, name=st.sampled_from(["lanczos", "box"]), seed=st.integers(0, 2**16))
def test_lanczos_and_box_are_pils_filters(src, dst, name, seed):
    image = np.random.default_rng(seed).random(src)
    method = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}[name]
    ours = resample(torch.from_numpy(image)[None], dst, interpolation=name)[0].numpy()
    np.testing.assert_allclose(ours, _pil_float(image, dst, method), rtol=0, atol=2e-6)


def _smooth_rgb(h: int, w: int, seed: int) -> np.ndarray:
    """An 8-bit photo-like image: gradients, a disc and mild noise, (h, w, 3)."""
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    rng = np.random.default_rng(seed)
    disc = ((x - 0.5) ** 2 + (y - 0.4) ** 2 < 0.08) * 90.0
    channels = [60 + 120 * x + disc, 200 - 150 * y + 0.5 * disc, 128 + 60 * np.sin(6 * x + 3 * y)]
    return np.clip(np.stack(channels, -1) + rng.normal(0, 4, (h, w, 3)), 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("src, dst", [((96, 128), (64, 80)), ((64, 48), (100, 75)), ((77, 51), (77, 30))])
@pytest.mark.parametrize("name", ["lanczos", "box"])
def test_eight_bit_images_are_within_one_level_of_kohyas_pil_path(src, dst, name):
    """kohya runs PIL on 8-bit pixels (rounded between the passes); ours stays in float: at most 1.5
    8-bit levels apart on a photo-like image, 0.35 on average (measured: 1.11 and 0.31)."""
    pixels = _smooth_rgb(*src, seed=sum(src))
    method = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}[name]
    kohya = np.asarray(Image.fromarray(pixels).resize((dst[1], dst[0]), resample=method)).astype(np.float64)
    image = torch.from_numpy(pixels).permute(2, 0, 1).double() / 127.5 - 1  # (3, H, W) in [-1, 1]
    ours = ((resample(image, dst, interpolation=name, bounds=(-1.0, 1.0)) + 1) * 127.5).permute(1, 2, 0).numpy()
    assert np.abs(ours - kohya).max() <= 1.5  # (its two roundings, the first one through the filter's taps)
    assert np.abs(ours - kohya).mean() <= 0.35  # (its final rounding alone: 0.25)


def _pil_8bit_vs_ours(pixels: np.ndarray, dst: tuple[int, int], name: str) -> np.ndarray:
    """|ours − PIL| in 8-bit levels for ``pixels`` (H, W, 3) uint8 resized to ``dst`` (h, w) the way kohya does."""
    method = {"lanczos": Image.Resampling.LANCZOS, "box": Image.Resampling.BOX}[name]
    pil = np.asarray(Image.fromarray(pixels).resize((dst[1], dst[0]), resample=method)).astype(np.float64)
    image = torch.from_numpy(pixels).permute(2, 0, 1).double() / 127.5 - 1  # (3, H, W) in [-1, 1]
    ours = ((resample(image, dst, interpolation=name, bounds=(-1.0, 1.0)) + 1) * 127.5).permute(1, 2, 0).numpy()
    return np.abs(ours - pil)


#: Pillow 13 picks the pass order (``sdadapt.resampling._pil_runs_down_first``); Pillow 12 and before ran across first
_PILLOW_13 = pytest.mark.skipif(int(Image.__version__.split(".")[0]) < 13, reason="Pillow 13's pass order")


@_PILLOW_13
@settings(max_examples=40, deadline=None)
@given(src=st.tuples(st.integers(1, 48), st.integers(1, 48)), dst=st.tuples(st.integers(1, 72), st.integers(1, 72)),
       name=st.sampled_from(["lanczos", "box"]), seed=st.integers(0, 2**16))
def test_random_8bit_rgb_images_match_pil_in_its_pass_order(src, dst, name, seed):
    """PIL clips its 8-bit pixels between the two passes, so on random pixels (Lanczos overshoot everywhere)
    the pass order shows: across first or down first (``_pil_runs_down_first``) as Pillow 13 does, ours is
    within its two roundings (≤ 1.5 levels; measured 1.23 over 600 random sizes, the other order up to 36)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (*src, 3), dtype=np.uint8)
    assert _pil_8bit_vs_ours(pixels, dst, name).max() <= 1.5


@_PILLOW_13
@pytest.mark.parametrize("src, dst", [
    ((30, 40), (12, 60)),   # height shrinks, width grows: down first
    ((30, 40), (4, 30)),    # both shrink, the height by more than twice the width's pixels: down first
    ((30, 40), (20, 33)),   # both shrink, the width by more than half the height's pixels: across first
    ((34, 2), (19, 23)),    # the old code's worst case (36 levels off)
    ((20, 30), (35, 12)),   # height grows: across first
])
def test_pass_order_regions_match_pil(src, dst):
    pixels = np.random.default_rng(sum(src + dst)).integers(0, 256, (*src, 3), dtype=np.uint8)
    assert _pil_8bit_vs_ours(pixels, dst, "lanczos").max() <= 1.5


@_PILLOW_13
@settings(max_examples=60, deadline=None)
@given(src=st.tuples(st.integers(1, 90), st.integers(1, 90)), dst=st.tuples(st.integers(1, 90), st.integers(1, 90)),
       seed=st.integers(0, 2**16))
def test_the_pass_order_rule_is_pils_own_two_single_axis_resizes(src, dst, seed):
    """An oracle without a transcription of Resample.c: a resize along one axis only is a single PIL pass, so
    ``resize((W, h))`` then ``resize((w, h))`` is PIL's down-first result bit for bit, ``resize((w, H))`` then
    ``resize((w, h))`` its across-first one; Pillow's own two-axis resize must equal the order
    ``_pil_runs_down_first`` names (both, where the clip between the passes never bites). (review RX)"""
    from sdadapt.resampling import _pil_runs_down_first

    (H, W), (h, w) = src, dst
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (H, W, 3), dtype=np.uint8))
    lanczos = Image.Resampling.LANCZOS
    direct = np.asarray(image.resize((w, h), lanczos))
    down_first = np.asarray(image.resize((W, h), lanczos).resize((w, h), lanczos))
    across_first = np.asarray(image.resize((w, H), lanczos).resize((w, h), lanczos))
    picked = down_first if _pil_runs_down_first(src, dst) else across_first
    assert np.array_equal(direct, picked)


@_PILLOW_13
@pytest.mark.parametrize("src, dst", [
    ((1, 50), (1, 7)), ((50, 1), (7, 1)), ((1, 1), (5, 9)), ((9, 5), (1, 1)), ((300, 2), (10, 2)),
    ((2, 300), (2, 10)), ((300, 3), (10, 50)), ((3, 300), (50, 10)), ((400, 1), (1, 400)), ((64, 64), (64, 32)),
    ((64, 64), (32, 64)), ((100, 100), (40, 70)), ((100, 100), (40, 71)), ((2, 1), (1, 1)),
])
@pytest.mark.parametrize("name", ["lanczos", "box"])
def test_extreme_sizes_match_pil(src, dst, name):
    """1-pixel sizes, extreme aspect ratios, one axis unchanged, the rule's boundary (100 → 40 high: 70 wide is
    the boundary, across first; 71 down first). (review RX)"""
    pixels = np.random.default_rng(sum(src + dst)).integers(0, 256, (*src, 3), dtype=np.uint8)
    assert _pil_8bit_vs_ours(pixels, dst, name).max() <= 1.5


def test_pass_order_rule():
    from sdadapt.resampling import _pil_runs_down_first

    assert _pil_runs_down_first((30, 40), (12, 60)) and _pil_runs_down_first((30, 40), (4, 30))
    assert not _pil_runs_down_first((30, 40), (20, 33)) and not _pil_runs_down_first((20, 30), (35, 12))
    assert not _pil_runs_down_first((30, 40), (28, 39))  # 2·(w − W) = h − H: across first (measured)
    assert not _pil_runs_down_first((30, 40), (30, 80))  # height unchanged: no vertical pass at all


def _cv2_source(o: int, n_in: int, n_out: int) -> float:
    return (o + 0.5) * n_in / n_out - 0.5


def _reference_linear(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV INTER_LINEAR in float64, pixel by pixel: 2x2 taps at (o + ½)·in/out − ½, edges clamped."""
    (H, W), (h, w) = image.shape, size
    out = np.zeros(size)
    for oy in range(h):
        for ox in range(w):
            fy, fx = _cv2_source(oy, H, h), _cv2_source(ox, W, w)
            sy, sx = math.floor(fy), math.floor(fx)
            ay, ax = fy - sy, fx - sx
            if sy < 0:
                sy, ay = 0, 0.0
            if sy >= H - 1:
                sy, ay = H - 1, 0.0
            if sx < 0:
                sx, ax = 0, 0.0
            if sx >= W - 1:
                sx, ax = W - 1, 0.0
            y1, x1 = min(sy + 1, H - 1), min(sx + 1, W - 1)
            out[oy, ox] = ((1 - ay) * ((1 - ax) * image[sy, sx] + ax * image[sy, x1])
                           + ay * ((1 - ax) * image[y1, sx] + ax * image[y1, x1]))
    return out


def _keys(t: float, a: float = -0.75) -> float:
    t = abs(t)
    if t <= 1:
        return (a + 2) * t**3 - (a + 3) * t**2 + 1
    if t < 2:
        return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
    return 0.0


def _reference_cubic(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV INTER_CUBIC in float64: Keys' kernel (a = −0.75) at 4 taps, edges replicated."""
    (H, W), (h, w) = image.shape, size
    out = np.zeros(size)
    for oy in range(h):
        for ox in range(w):
            fy, fx = _cv2_source(oy, H, h), _cv2_source(ox, W, w)
            sy, sx = math.floor(fy), math.floor(fx)
            total = 0.0
            for j in range(-1, 3):
                for i in range(-1, 3):
                    weight = _keys(fy - (sy + j)) * _keys(fx - (sx + i))
                    total += weight * image[min(max(sy + j, 0), H - 1), min(max(sx + i, 0), W - 1)]
            out[oy, ox] = total
    return out


def _reference_area(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Shrinking: each output pixel is the mean of the source area it covers, [o·s, (o+1)·s) each way."""
    (H, W), (h, w) = image.shape, size

    def overlap(n_in, n_out):
        s = n_in / n_out
        return np.array([[max(0.0, min(i + 1, (o + 1) * s) - max(i, o * s)) / s for i in range(n_in)] for o in range(n_out)])

    return overlap(H, h) @ image @ overlap(W, w).T


@settings(max_examples=20, deadline=None)
@given(src=_sizes, dst=_sizes, seed=st.integers(0, 2**16))
def test_bilinear_and_bicubic_are_opencvs_geometry(src, dst, seed):
    image = np.random.default_rng(seed).random(src)
    x = torch.from_numpy(image)[None]
    for name, reference, mode in (("bilinear", _reference_linear, "bilinear"), ("bicubic", _reference_cubic, "bicubic")):
        ours = resample(x, dst, interpolation=name)[0].numpy()
        np.testing.assert_allclose(ours, reference(image, dst), rtol=0, atol=1e-12)
        torch_way = torch.nn.functional.interpolate(x[None], size=dst, mode=mode, align_corners=False)[0, 0].numpy()
        np.testing.assert_allclose(ours, torch_way, rtol=0, atol=1e-10)  # (a second implementation of the same)
    assert torch.equal(resample(x, dst, interpolation="linear"), resample(x, dst, interpolation="bilinear"))
    assert torch.equal(resample(x, dst, interpolation="cubic"), resample(x, dst, interpolation="bicubic"))


@settings(max_examples=20, deadline=None)
@given(src=_sizes, data=st.data(), seed=st.integers(0, 2**16))
def test_area_shrinking_is_the_mean_over_each_covered_area(src, data, seed):
    dst = (data.draw(st.integers(1, src[0])), data.draw(st.integers(1, src[1])))
    image = np.random.default_rng(seed).random(src)
    ours = resample(torch.from_numpy(image)[None], dst, interpolation="area")[0].numpy()
    np.testing.assert_allclose(ours, _reference_area(image, dst), rtol=0, atol=1e-12)


def test_area_by_whole_factors_is_average_pooling_and_area_growing_keeps_opencvs_weights():
    image = torch.rand(3, 12, 18, dtype=torch.float64)
    pooled = torch.nn.functional.avg_pool2d(image[None], 3)[0]
    torch.testing.assert_close(resample(image, (4, 6), interpolation="area"), pooled, rtol=0, atol=1e-14)
    grown = resample(image, (24, 36), interpolation="area")  # OpenCV's area-mode linear weights: exact 2x repeats
    torch.testing.assert_close(grown, image.repeat_interleave(2, 1).repeat_interleave(2, 2), rtol=0, atol=1e-14)


@settings(max_examples=40, deadline=None)
@given(src=_sizes, dst=_sizes)
def test_nearest_picks_pils_pixel_but_at_exact_ties(src, dst):
    """OpenCV's INTER_NEAREST_EXACT picks the pixel whose centre is nearest, as PIL's NEAREST does
    (OpenCV's comment; kohya's too) — except where the source position falls exactly between two
    pixels, where each library's rounding picks one of the two (4 -> 3 pixels: OpenCV 0, 1, 3, PIL 0, 2, 3;
    8 -> 10: OpenCV picks 6 at 6.0, PIL 5)."""
    H, W = src
    coords = np.arange(H * W, dtype=np.float64).reshape(H, W)  # each pixel's value: its index
    ours = resample(torch.from_numpy(coords)[None], dst, interpolation="nearest")[0].numpy().astype(int)
    pil = _pil_float(coords, dst, Image.Resampling.NEAREST).astype(int)
    for axis, (n_in, n_out) in enumerate(zip(src, dst)):
        picked, wanted = (np.divmod(ours, W)[axis], np.divmod(pil, W)[axis])
        o = np.arange(n_out).reshape((-1, 1) if axis == 0 else (1, -1))
        tie = ((2 * o + 1) * n_in) % (2 * n_out) == 0  # (o + ½)·in/out a whole number
        assert np.all((picked == wanted) | (tie & (np.abs(picked - wanted) == 1)))


def test_kohyas_default_and_the_names():
    assert kohya_default((100, 80), (64, 64)) == "area" and kohya_default((100, 60), (64, 64)) == "lanczos"
    assert set(RESIZE_INTERPOLATIONS) == {"lanczos", "nearest", "bilinear", "linear", "bicubic", "cubic", "area", "box"}
    with pytest.raises(ValueError, match="must be one of lanczos"):
        check_interpolation("lanczos4")
    overshoot = resample(torch.tensor([[[-1.0, -1.0, 1.0, 1.0]]]), (1, 9), interpolation="lanczos")
    assert overshoot.min() < -1 and resample(torch.tensor([[[-1.0, -1.0, 1.0, 1.0]]]), (1, 9), interpolation="lanczos",
                                             bounds=(-1.0, 1.0)).min() == -1


def test_training_images_and_dataset_toml_subsets_use_it(tmp_path):
    """A record's interpolation scales its image (and its loss mask); a dataset TOML subset's
    ``resize_interpolation`` (else the dataset's, else the run's) lands on its records."""
    from sdadapt.images import read_image
    from sdadapt.jobs import TrainOptions
    from sdadapt.jobs.train import _data_config_fallback
    from sdadapt.training.data import ImageRecord, _scaled
    from sdadapt.training.dataset_config import dataset_records, read_dataset_config

    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(_smooth_rgb(40, 56, seed=3)).save(tmp_path / folder / "x.png")
        (tmp_path / folder / "x.txt").write_text("a shape")
    record = ImageRecord(tmp_path / "a" / "x.png", "a shape", resized=(30, 42), interpolation="lanczos")
    want = resample(read_image(record.path), (30, 42), interpolation="lanczos", bounds=(-1.0, 1.0))
    torch.testing.assert_close(_scaled(record), want, rtol=0, atol=0)
    toml = tmp_path / "d.toml"
    toml.write_text(f"[[datasets]]\nresolution = 32\nresize_interpolation = 'box'\n[[datasets.subsets]]\nimage_dir = "
                    f"'{tmp_path / 'a'}'\ncaption_extension = '.txt'\nresize_interpolation = 'nearest'\n"
                    f"[[datasets.subsets]]\nimage_dir = '{tmp_path / 'b'}'\ncaption_extension = '.txt'\n")
    config = read_dataset_config(toml, fallback=_data_config_fallback(TrainOptions(images=".", resize_interpolation="area")))
    records = dataset_records(config)[0]
    assert sorted((r.folder, r.interpolation) for r in records) == [("a", "nearest"), ("b", "box")]
    from sdadapt.jobs.train import _check_saving_options

    with pytest.raises(ValueError, match="--resize-interpolation must be one of"):
        _check_saving_options(TrainOptions(images=".", resize_interpolation="lanczos4"))


def test_the_train_command_takes_it(three_shapes, tmp_path, capsys):
    from train_inputs import lora_train_args

    from sdadapt.cli import main

    out = tmp_path / "l.safetensors"
    assert main(lora_train_args(three_shapes, "--steps", "1", "--resolution", "24", "--resize-interpolation", "lanczos",
                                "-o", out, "-q")) == 0, capsys.readouterr().err
    assert out.is_file()
    config = tmp_path / "k.toml"
    config.write_text("resize_interpolation = 'cubic'\n")
    assert main(lora_train_args(three_shapes, "--config", config, "--steps", "1", "--resolution", "24",
                                "-o", tmp_path / "k.safetensors", "-q")) == 0, capsys.readouterr().err


@pytest.mark.parametrize("source, resized", [((20, 28), (30, 42)), ((45, 60), (30, 42))])
def test_without_a_method_images_and_masks_take_kohyas_default(tmp_path, source, resized):
    """No ``resize_interpolation``: kohya's ``resize_image`` default (``lanczos`` up, ``area`` down),
    for the image and for its loss mask alike."""
    from sdadapt.images import read_image
    from sdadapt.training.data import ImageRecord, _scaled
    from sdadapt.training.loss_masks import mask_like_image

    Image.fromarray(_smooth_rgb(*source, seed=5)).save(tmp_path / "x.png")
    record = ImageRecord(tmp_path / "x.png", "a shape", size=source, bucket=(24, 40), resized=resized, crop=(3, 1))
    method = "lanczos" if resized[0] > source[0] else "area"
    assert kohya_default(source, resized) == method
    image = read_image(record.path)
    torch.testing.assert_close(_scaled(record), resample(image, resized, interpolation=method, bounds=(-1.0, 1.0)),
                               rtol=0, atol=0)
    mask = torch.from_numpy(np.random.default_rng(1).random(source, dtype=np.float32))[None]
    want = resample(mask, resized, interpolation=method, bounds=(0.0, 1.0))[:, 3: 3 + 24, 1: 1 + 40]
    torch.testing.assert_close(mask_like_image(mask, record, size=(24, 40)), want, rtol=0, atol=1e-7)


@settings(max_examples=15, deadline=None)
@given(src=_sizes, dst=_sizes, name=st.sampled_from(RESIZE_INTERPOLATIONS), seed=st.integers(0, 2**16))
def test_the_sparse_row_pass_is_the_gathered_one(src, dst, name, seed):
    """On the host the pass across is one sparse product (:func:`_host_matrix`); elsewhere the taps are
    gathered (:func:`_apply`): the same sums."""
    from sdadapt.resampling import _apply, _host_matrix, _table

    x = torch.from_numpy(np.random.default_rng(seed).random((2, *src)))
    shrinking = src[0] >= dst[0] and src[1] >= dst[1]
    gathered = _apply(x, 2, *_table(name, src[1], dst[1], shrinking=shrinking, like=x))
    sparse = (x.reshape(-1, src[1]) @ _host_matrix(name, src[1], dst[1], shrinking=shrinking, dtype=x.dtype)).reshape(2, src[0], dst[1])
    torch.testing.assert_close(sparse, gathered, rtol=0, atol=1e-14)
