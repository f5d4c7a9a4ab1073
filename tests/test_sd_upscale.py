"""``generate --sd-upscale``: A1111's "SD upscale" script (``scripts/sd_upscale.py``) against its code transcribed
here — ``images.split_grid`` / ``combine_grid`` (``modules/images.py``) and ``Upscaler.upscale`` with the built-in
Lanczos / Nearest upscalers (``modules/upscaler.py``) — and end to end on a tiny SD model: the tiles handed to
img2img, their seeds, the blend of their images and the infotext."""

from __future__ import annotations

import math
from collections import namedtuple

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from sdadapt.sd_upscale import check_sd_upscale, combine_grid, split_grid, upscale_image
from tests.test_inpaint import inpainting_sd, plain_sd  # noqa: F401  (module fixtures: the tiny SD folders)

# ------------------------------------------------------------------------------------ A1111's code, transcribed
Grid = namedtuple("Grid", ["tiles", "tile_w", "tile_h", "image_w", "image_h", "overlap"])


def _a1111_split_grid(image, tile_w=512, tile_h=512, overlap=64):
    w = image.width
    h = image.height
    non_overlap_width = tile_w - overlap
    non_overlap_height = tile_h - overlap
    cols = math.ceil((w - overlap) / non_overlap_width)
    rows = math.ceil((h - overlap) / non_overlap_height)
    dx = (w - tile_w) / (cols - 1) if cols > 1 else 0
    dy = (h - tile_h) / (rows - 1) if rows > 1 else 0
    grid = Grid([], tile_w, tile_h, w, h, overlap)
    for row in range(rows):
        row_images = []
        y = int(row * dy)
        if y + tile_h >= h:
            y = h - tile_h
        for col in range(cols):
            x = int(col * dx)
            if x + tile_w >= w:
                x = w - tile_w
            tile = image.crop((x, y, x + tile_w, y + tile_h))
            row_images.append([x, tile_w, tile])
        grid.tiles.append([y, tile_h, row_images])
    return grid


def _a1111_combine_grid(grid):
    def make_mask_image(r):
        r = r * 255 / grid.overlap
        r = r.astype(np.uint8)
        return Image.fromarray(r, "L")

    mask_w = make_mask_image(np.arange(grid.overlap, dtype=np.float32).reshape((1, grid.overlap)).repeat(grid.tile_h,
                                                                                                          axis=0))
    mask_h = make_mask_image(np.arange(grid.overlap, dtype=np.float32).reshape((grid.overlap, 1)).repeat(grid.image_w,
                                                                                                          axis=1))
    combined_image = Image.new("RGB", (grid.image_w, grid.image_h))
    for y, h, row in grid.tiles:
        combined_row = Image.new("RGB", (grid.image_w, h))
        for x, w, tile in row:
            if x == 0:
                combined_row.paste(tile, (0, 0))
                continue
            combined_row.paste(tile.crop((0, 0, grid.overlap, h)), (x, 0), mask=mask_w)
            combined_row.paste(tile.crop((grid.overlap, 0, w, h)), (x + grid.overlap, 0))
        if y == 0:
            combined_image.paste(combined_row, (0, 0))
            continue
        combined_image.paste(combined_row.crop((0, 0, combined_row.width, grid.overlap)), (0, y), mask=mask_h)
        combined_image.paste(combined_row.crop((0, grid.overlap, combined_row.width, h)), (0, y + grid.overlap))
    return combined_image


def _a1111_upscale(img, scale, resample):
    """``Upscaler.upscale`` with ``UpscalerLanczos`` / ``UpscalerNearest``'s ``do_upscale`` (``resample``), or a
    model upscaler's (``resample`` a callable)."""
    dest_w = int((img.width * scale) // 8 * 8)
    dest_h = int((img.height * scale) // 8 * 8)
    for i in range(3):
        if img.width >= dest_w and img.height >= dest_h and (i > 0 or scale != 1):
            break
        shape = (img.width, img.height)
        if callable(resample):
            img = resample(img)
        else:
            img = img.resize((int(img.width * scale), int(img.height * scale)), resample=resample)
        if shape == (img.width, img.height):
            break
    if img.width != dest_w or img.height != dest_h:
        img = img.resize((int(dest_w), int(dest_h)), resample=Image.LANCZOS)
    return img


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ------------------------------------------------------------------------------------------------------ geometry
@settings(max_examples=60, deadline=None)
@given(w=st.integers(16, 120), h=st.integers(16, 120), tw=st.integers(8, 48), th=st.integers(8, 48),
       overlap=st.integers(1, 24), seed=st.integers(0, 99))
def test_split_and_combine_are_a1111s_bit_for_bit(w, h, tw, th, overlap, seed):
    """The tiles (places and pixels) and the blend of other images in their places, over sizes, tiles, overlaps —
    images smaller than a tile too (one tile reaching past the edge, black there, as A1111's)."""
    if overlap >= min(tw, th, w, h):
        return
    image = _image(w, h, seed)
    theirs = _a1111_split_grid(image, tile_w=tw, tile_h=th, overlap=overlap)
    ours = split_grid(image, tile_w=tw, tile_h=th, overlap=overlap)
    assert [(y, hh, [(x, ww) for x, ww, _ in row]) for y, hh, row in theirs.tiles] == [
        (y, hh, list(row)) for y, hh, row in ours.rows]
    flat = [tile for _, _, row in theirs.tiles for _, _, tile in row]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(flat, ours.tiles))
    others = [_image(tw, th, seed + 100 + k) for k in range(len(flat))]  # (img2img's results, in the tiles' places)
    k = 0
    for _, _, row in theirs.tiles:
        for item in row:
            item[2] = others[k]
            k += 1
    assert np.array_equal(np.asarray(combine_grid(ours, others)), np.asarray(_a1111_combine_grid(theirs)))
    # its own tiles: the image back where the tiles reach (A1111's rounding can leave the last row or column out:
    # black there, in A1111's combine as in ours — TileGrid.uncovered says so)
    # (an image smaller than a tile: its one tile per row pasted through the overlap's ramp over black — A1111's blend
    # fades the first overlap + x columns, TileGrid.faded — the image elsewhere)
    (right, bottom), (left, top) = ours.uncovered, ours.faded
    back = np.asarray(combine_grid(ours))
    assert left == (max(0, w - tw + overlap) if tw > w else 0) and top == (max(0, h - th + overlap) if th > h else 0)
    assert np.array_equal(back[top:h - bottom, left:w - right], np.asarray(image)[top:h - bottom, left:w - right])
    assert not back[h - bottom:].any() and not back[:, w - right:].any()
    x, y = w - tw, h - th
    ramp_x = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)[-x:][:left] / 255.0
    ramp_y = (np.arange(overlap, dtype=np.float32) * 255 / overlap).astype(np.uint8)[-y:][:top] / 255.0
    faded = np.asarray(image).astype(np.float64)
    faded[:, :left] *= ramp_x[None, :, None]
    faded[:top] *= ramp_y[:, None, None]
    edge = np.zeros((h, w), dtype=bool)
    edge[:, :left] = edge[:top] = True
    assert np.abs(back[edge] - faded[edge]).max(initial=0) <= 2.0


def test_a1111s_rounding_can_leave_the_last_row_black_and_it_is_said():
    """(w 16, h 117, 8 px tiles, overlap 3: int(22 * (109 / 22)) == 108, one row short of the clamp.)"""
    image = _image(16, 117, 0)
    grid = split_grid(image, tile_w=8, tile_h=8, overlap=3)
    assert grid.uncovered == (0, 1)
    back = np.asarray(combine_grid(grid))
    assert np.array_equal(back, np.asarray(_a1111_combine_grid(_a1111_split_grid(image, tile_w=8, tile_h=8,
                                                                                   overlap=3))))
    assert not back[116].any() and back[115].any()
    assert split_grid(_image(16, 116, 0), tile_w=8, tile_h=8, overlap=3).uncovered == (0, 0)


@pytest.mark.parametrize("upscaler,resample", [("Lanczos", Image.LANCZOS), ("Nearest", Image.NEAREST)])
@pytest.mark.parametrize("size,scale", [((40, 30), 2.0), ((37, 23), 1.5), ((64, 48), 1.0), ((50, 41), 1.27),
                                        ((33, 20), 3.9)])
def test_upscale_is_a1111s_upscaler(upscaler, resample, size, scale):
    image = _image(*size, seed=size[0])
    ours, theirs = upscale_image(image, scale, upscaler=upscaler), _a1111_upscale(image, scale, resample)
    assert ours.size == theirs.size and np.array_equal(np.asarray(ours), np.asarray(theirs))
    assert upscale_image(image, scale, upscaler="None") is image


def test_check_and_split_refuse_what_a1111_cannot_run():
    assert check_sd_upscale(2.0, 64, "LANCZOS") == "Lanczos" and check_sd_upscale(1, 0, "none") == "None"
    with pytest.raises(ValueError, match="ESRGAN model file"):
        check_sd_upscale(2.0, 64, "R-ESRGAN 4x+")
    with pytest.raises(ValueError, match="no such file"):
        check_sd_upscale(2.0, 64, "models/4x-UltraSharp.pth")
    with pytest.raises(ValueError, match="above 0"):
        check_sd_upscale(0.0, 64, "lanczos")
    with pytest.raises(ValueError, match="below the tile"):
        split_grid(_image(200, 200, 0), tile_w=64, tile_h=96, overlap=64)
    with pytest.raises(ValueError, match="at least 0"):
        check_sd_upscale(2.0, -1, "lanczos")
    small = _image(60, 80, 0)  # (smaller than a tile: one tile reaching past it, black there, as A1111's)
    ours, theirs = split_grid(small, tile_w=64, tile_h=64, overlap=8), _a1111_split_grid(small, 64, 64, 8)
    assert [(y, h, [(x, w) for x, w, _ in row]) for y, h, row in theirs.tiles] == [
        (y, h, list(row)) for y, h, row in ours.rows]
    assert all(np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip([t for _, _, row in theirs.tiles for _, _, t in row], ours.tiles))


# --------------------------------------------------------------------------------------------- end to end (CLI)
def _cli(model, out, *extra):
    from sdadapt.cli import main

    return main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", "3", "--sampler", "euler",
                 "--seed", "5", "--quiet", "--out", str(out), "--width", "64", "--height", "64",
                 "--denoising-strength", "0.4", *extra])


def test_cli_sd_upscale_is_a1111s_script(plain_sd, tmp_path, monkeypatch):  # noqa: F811
    """80 x 96 at 1.5 by Lanczos -> 144 x 120, 3 x 3 tiles of 64 overlapping by 16: each tile img2img'd from A1111's
    tile pixels with seed 5 + k, the PNG A1111's blend of the tiles' images, with the first tile's infotext; a second
    upscale (--count 2) starts at seed 6."""
    from generate_recorder import record_generate

    from sdadapt import resize_modes
    from sdadapt.jobs.generate_tiles import TiledRun
    from sdadapt.resize_modes import open_init_image

    _image(96, 80, 1).save(tmp_path / "small.png")
    pixels, tiles = [], []
    real_encode, real_add = resize_modes.init_image_pixels, TiledRun.add
    def spy_pixels(path, size, **kw):
        out = real_encode(path, size, **kw)
        pixels.append(out.clone())
        return out

    def spy_add(self, image):
        tiles.append(image.clone())
        return real_add(self, image)

    calls = record_generate(monkeypatch)
    monkeypatch.setattr(resize_modes, "init_image_pixels", spy_pixels)
    monkeypatch.setattr(TiledRun, "add", spy_add)
    assert _cli(plain_sd, tmp_path / "up.png", "--init-image", str(tmp_path / "small.png"), "--sd-upscale", "1.5",
                "--sd-upscale-overlap", "16", "--count", "2") == 0
    assert [kw["seed"] for kw, _ in calls] == [5 + k for k in range(9)] + [6 + k for k in range(9)]
    big = _a1111_upscale(open_init_image(tmp_path / "small.png"), 1.5, Image.LANCZOS)
    grid = _a1111_split_grid(big, tile_w=64, tile_h=64, overlap=16)
    flat = [item for _, _, row in grid.tiles for item in row]
    assert len(flat) == 9 and big.size == (144, 120)
    for k, item in enumerate(flat):  # (the pixels each tile's VAE encoding takes: A1111's tile, / 255 · 2 − 1)
        want = torch.from_numpy(np.asarray(item[2]).astype(np.float32) / 255.0).permute(2, 0, 1) * 2 - 1
        assert torch.equal(pixels[k], want) and torch.equal(pixels[9 + k], want)
    for n, name in enumerate(["up-00.png", "up-01.png"]):
        for k, item in enumerate(flat):
            item[2] = Image.fromarray(((tiles[9 * n + k].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                                      .permute(1, 2, 0).numpy())
        out = Image.open(tmp_path / name)
        assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(_a1111_combine_grid(grid)))
        text = out.text["parameters"]
        assert "Seed: 5, Size: 64x64" in text and "SD upscale overlap: 16, SD upscale upscaler: Lanczos" in text
    assert not torch.equal(tiles[0], tiles[9])  # (the second upscale: other seeds)
    from sdadapt.cli import main

    assert main(["generate", "--model", str(plain_sd), "--quiet", "--out", str(tmp_path / "again.png"),
                 "--infotext", str(tmp_path / "up-00.png"), "--init-image", str(tmp_path / "small.png"),
                 "--sd-upscale", "1.5"]) == 0  # (the overlap, the size, seed and strength from the infotext)
    again, first = (np.asarray(Image.open(tmp_path / name)) for name in ("again.png", "up-00.png"))
    assert np.array_equal(again, first)


def test_cli_sd_upscale_of_an_image_smaller_than_a_tile_runs_as_a1111s(plain_sd, tmp_path, monkeypatch, capsys):  # noqa: F811
    """40 x 48 at scale 1 in 64 x 64 tiles overlapping by 32: one tile reaching past the image (black there), run
    and blended back as A1111's script does — its first 8 columns and 16 rows faded from black, which is said."""
    from sdadapt.jobs.generate_tiles import TiledRun

    _image(40, 48, 3).save(tmp_path / "tiny.png")
    tiles, real_add = [], TiledRun.add
    monkeypatch.setattr(TiledRun, "add", lambda self, image: (tiles.append(image.clone()), real_add(self, image))[1])
    assert _cli(plain_sd, tmp_path / "up.png", "--init-image", str(tmp_path / "tiny.png"), "--sd-upscale", "1",
                "--sd-upscale-overlap", "32") == 0
    assert "fades its first 8 pixel columns and 16 rows from black" in capsys.readouterr().err
    grid = _a1111_split_grid(Image.open(tmp_path / "tiny.png").convert("RGB"), tile_w=64, tile_h=64, overlap=32)
    assert [(y, [x for x, _, _ in row]) for y, _, row in grid.tiles] == [(-16, [-24])] and len(tiles) == 1
    grid.tiles[0][2][0][2] = Image.fromarray(((tiles[0].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                                             .permute(1, 2, 0).numpy())
    out = Image.open(tmp_path / "up.png")
    assert out.size == (40, 48)
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(_a1111_combine_grid(grid)))


def test_cli_sd_upscale_refusals(plain_sd, tmp_path, capsys):  # noqa: F811
    _image(96, 80, 1).save(tmp_path / "small.png")
    Image.new("L", (96, 80), 255).save(tmp_path / "mask.png")
    with pytest.raises(SystemExit):
        _cli(plain_sd, tmp_path / "a.png", "--sd-upscale", "2")
    assert "--sd-upscale only applies with --init-image IMAGE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(plain_sd, tmp_path / "a.png", "--init-image", str(tmp_path / "small.png"), "--sd-upscale-overlap", "8")
    assert "--sd-upscale-overlap only applies with --sd-upscale SCALE" in capsys.readouterr().err
    for extra, message in [(["--mask", str(tmp_path / "mask.png")], "no --mask"),
                           (["--sd-upscale-upscaler", "ESRGAN_4x"], "ESRGAN"),
                           (["--sd-upscale-overlap", "64"], "below the tile"),
                           (["--sd-upscale", "0.5", "--sd-upscale-overlap", "40"], "no larger than the 40 px")]:
        args = ["--init-image", str(tmp_path / "small.png"), "--sd-upscale", "2", *extra]
        assert _cli(plain_sd, tmp_path / "a.png", *args) != 0, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "a.png").exists()


def test_the_sd_upscale_example_in_docs_samplers_md_runs():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "split_grid(big")


def test_cli_sd_upscale_with_a_variation_seed_moves_the_seed_not_the_subseed(plain_sd, tmp_path,  # noqa: F811
                                                                            monkeypatch):
    """A1111's script sets ``p.seed = processed.seed + 1`` after each tile, variation strength or not, and leaves
    ``p.subseed``: every tile draws with its own seed and the one variation seed."""
    from generate_recorder import record_generate

    _image(96, 80, 1).save(tmp_path / "small.png")
    calls = record_generate(monkeypatch)
    assert _cli(plain_sd, tmp_path / "up.png", "--init-image", str(tmp_path / "small.png"), "--sd-upscale", "1.5",
                "--sd-upscale-overlap", "16", "--noise", "a1111-cpu", "--subseed", "7", "--subseed-strength",
                "0.5") == 0
    assert [(kw["seed"], kw["noise"].subseed) for kw, _ in calls] == [(5 + k, 7) for k in range(9)]


def test_cli_sd_upscale_on_an_inpainting_model_writes_its_conditioning_weight(inpainting_sd, tmp_path):  # noqa: F811
    """The tiles of an inpainting model are conditioned as its img2img (a mask of ones), and the infotext says so
    ("Conditional mask weight"), as for one image."""
    _image(96, 80, 1).save(tmp_path / "small.png")
    assert _cli(inpainting_sd, tmp_path / "up.png", "--init-image", str(tmp_path / "small.png"), "--sd-upscale",
                "1.5", "--sd-upscale-overlap", "16", "--inpainting-mask-weight", "0.5") == 0
    assert "Conditional mask weight: 0.5" in Image.open(tmp_path / "up.png").text["parameters"]
