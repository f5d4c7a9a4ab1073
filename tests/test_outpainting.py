"""``generate --outpaint``: A1111's "Poor man's outpainting" (``scripts/poor_mans_outpainting.py``) against its
geometry transcribed here (the canvas, both masks, the grids, which tiles run) and end to end on a tiny SD model:
each run tile's image, mask and latent mask, its seed, and the PNG, A1111's blend of the inpainted tiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from sdadapt.outpainting import outpainting_canvas
from tests.test_inpaint import plain_sd  # noqa: F401  (module fixture: the tiny SD folder)
from tests.test_sd_upscale import _a1111_combine_grid, _a1111_split_grid


def _a1111_canvas(init_img, pixels, mask_blur, direction, tile_w, tile_h):
    """The script's ``run`` up to its img2img calls: ``(grid, mask grid, latent grid, work indices, borders)``."""
    left = pixels if "left" in direction else 0
    right = pixels if "right" in direction else 0
    up = pixels if "up" in direction else 0
    down = pixels if "down" in direction else 0
    target_w = math.ceil((init_img.width + left + right) / 64) * 64
    target_h = math.ceil((init_img.height + up + down) / 64) * 64
    if left > 0:
        left = left * (target_w - init_img.width) // (left + right)
    if right > 0:
        right = target_w - init_img.width - left
    if up > 0:
        up = up * (target_h - init_img.height) // (up + down)
    if down > 0:
        down = target_h - init_img.height - up
    img = Image.new("RGB", (target_w, target_h))
    img.paste(init_img, (left, up))
    mask = Image.new("L", (img.width, img.height), "white")
    draw = ImageDraw.Draw(mask)
    draw.rectangle((left + (mask_blur * 2 if left > 0 else 0), up + (mask_blur * 2 if up > 0 else 0),
                    mask.width - right - (mask_blur * 2 if right > 0 else 0),
                    mask.height - down - (mask_blur * 2 if down > 0 else 0)), fill="black")
    latent_mask = Image.new("L", (img.width, img.height), "white")
    latent_draw = ImageDraw.Draw(latent_mask)
    latent_draw.rectangle((left + (mask_blur // 2 if left > 0 else 0), up + (mask_blur // 2 if up > 0 else 0),
                           mask.width - right - (mask_blur // 2 if right > 0 else 0),
                           mask.height - down - (mask_blur // 2 if down > 0 else 0)), fill="black")
    grid = _a1111_split_grid(img, tile_w=tile_w, tile_h=tile_h, overlap=pixels)
    grid_mask = _a1111_split_grid(mask, tile_w=tile_w, tile_h=tile_h, overlap=pixels)
    grid_latent_mask = _a1111_split_grid(latent_mask, tile_w=tile_w, tile_h=tile_h, overlap=pixels)
    work, index = [], 0
    for (y, h, row), (_, _, row_mask), (_, _, row_latent) in zip(grid.tiles, grid_mask.tiles, grid_latent_mask.tiles):
        for tiledata, tiledata_mask, tiledata_latent in zip(row, row_mask, row_latent):
            x, w = tiledata[0:2]
            if not (x >= left and x + w <= img.width - right and y >= up and y + h <= img.height - down):
                work.append((index, tiledata[2], tiledata_mask[2], tiledata_latent[2]))
            index += 1
    return grid, work, (left, right, up, down)


def _image(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@settings(max_examples=40, deadline=None)
@given(w=st.integers(20, 150), h=st.integers(20, 150), pixels=st.sampled_from([8, 16, 32, 48]),
       blur=st.integers(0, 12), sides=st.sets(st.sampled_from(["left", "right", "up", "down"]), min_size=1),
       tile=st.sampled_from([64, 96]))
def test_canvas_masks_and_tiles_are_a1111s(w, h, pixels, blur, sides, tile):
    image = _image(w, h, w + h)
    directions = [d for d in ("left", "right", "up", "down") if d in sides]
    try:
        grid, work, borders = _a1111_canvas(image, pixels, blur, directions, tile, tile)
    except (ZeroDivisionError, ValueError):  # (A1111 fails for a canvas below a tile; we refuse it)
        with pytest.raises(ValueError):
            outpainting_canvas(image, pixels=pixels, mask_blur=blur, directions=directions, tile_w=tile, tile_h=tile)
        return
    if grid.image_w < tile or grid.image_h < tile:
        return
    ours = outpainting_canvas(image, pixels=pixels, mask_blur=blur, directions=directions, tile_w=tile, tile_h=tile)
    assert ours.borders == borders and ours.grid.size == (grid.image_w, grid.image_h)
    assert list(ours.run) == [index for index, *_ in work]
    for index, tile_image, tile_mask, tile_latent in work:
        assert np.array_equal(np.asarray(ours.grid.tiles[index]), np.asarray(tile_image))
        assert np.array_equal(np.asarray(ours.masks[index]), np.asarray(tile_mask))
        assert np.array_equal(np.asarray(ours.latent_masks[index]), np.asarray(tile_latent))


def _cli(model, out, *extra):
    from sdadapt.cli import main

    return main(["generate", "--model", str(model), "--prompt", "a photo", "--steps", "3", "--sampler", "euler",
                 "--seed", "5", "--quiet", "--out", str(out), "--width", "64", "--height", "64",
                 "--denoising-strength", "0.9", *extra])


def test_cli_outpaint_is_a1111s_script(plain_sd, tmp_path, monkeypatch):  # noqa: F811
    """64 x 64 grown by 32 on each side -> 128 x 128, 8 of 3 x 3 tiles inpainted (the middle one is the image):
    each from A1111's tile, mask (blur 8) and latent mask with seed 5 + k, the PNG A1111's blend of them."""
    from generate_recorder import record_generate

    from sdadapt.jobs import generate_inpaint
    from sdadapt.jobs.generate_tiles import TiledRun

    _image(64, 64, 3).save(tmp_path / "in.png")
    inputs, generated = [], []
    real_inputs, real_add = generate_inpaint.inpaint_inputs, TiledRun.add
    def spy_inputs(system, image_path, mask_path, **kw):
        inputs.append((np.asarray(Image.open(image_path)), np.asarray(Image.open(mask_path)),
                       np.asarray(Image.open(kw["latent_mask"])), kw["mask_blur"], kw["inpainting_fill"]))
        return real_inputs(system, image_path, mask_path, **kw)

    def spy_add(self, image):
        generated.append(image.clone())
        return real_add(self, image)

    calls = record_generate(monkeypatch)
    monkeypatch.setattr(generate_inpaint, "inpaint_inputs", spy_inputs)
    monkeypatch.setattr(TiledRun, "add", spy_add)
    assert _cli(plain_sd, tmp_path / "out.png", "--init-image", str(tmp_path / "in.png"), "--outpaint", "32") == 0
    grid, work, _ = _a1111_canvas(Image.open(tmp_path / "in.png").convert("RGB"), 32, 4,
                                  ["left", "right", "up", "down"], 64, 64)
    assert len(work) == 8 and [kw["seed"] for kw, _ in calls] == [5 + k for k in range(8)]
    for (_, tile, tile_mask, tile_latent), (image, mask, latent, blur, fill) in zip(work, inputs):
        assert np.array_equal(image, np.asarray(tile)) and np.array_equal(mask, np.asarray(tile_mask))
        assert np.array_equal(latent, np.asarray(tile_latent)) and blur == (8, 8) and fill == "fill"
    flat = [item for _, _, row in grid.tiles for item in row]
    for (index, *_), image in zip(work, generated):
        flat[index][2] = Image.fromarray(((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
                                         .permute(1, 2, 0).numpy())
    out = Image.open(tmp_path / "out.png")
    assert out.size == (128, 128)
    assert np.array_equal(np.asarray(out.convert("RGB")), np.asarray(_a1111_combine_grid(grid)))
    assert "Seed: 5, Size: 64x64" in out.text["parameters"]
    assert "Mask blur: 8, Masked content: fill" in out.text["parameters"]


def test_latent_mask_makes_the_latent_mask_and_the_fill(plain_sd, tmp_path):  # noqa: F811
    """A1111's ``p.latent_mask``: the latent mask and the fill come from it as it is; the overlay from the mask."""
    from sdadapt import inpaint
    from sdadapt.jobs.generate_inpaint import inpaint_inputs
    from sdadapt.jobs.models import load_system

    _image(64, 64, 4).save(tmp_path / "in.png")
    mask, latent = Image.new("L", (64, 64), 0), Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 40, 64))
    latent.paste(255, (0, 0, 20, 64))
    mask.save(tmp_path / "mask.png")
    latent.save(tmp_path / "latent.png")
    system = load_system(str(plain_sd), device=torch.device("cpu"))
    ours = inpaint_inputs(system, tmp_path / "in.png", tmp_path / "mask.png", height=64, width=64,
                          inpainting_fill="fill", latent_mask=tmp_path / "latent.png")
    assert torch.equal(ours.latmask.cpu(), inpaint.latent_mask(latent, tuple(ours.init.shape[-2:])))
    filled = inpaint.fill_masked_pixels(Image.open(tmp_path / "in.png").convert("RGB"), latent)
    want = torch.from_numpy(np.asarray(filled).astype(np.float32) / 255.0).permute(2, 0, 1) * 2 - 1
    assert torch.equal(ours.pixels, want)
    plain = inpaint_inputs(system, tmp_path / "in.png", tmp_path / "mask.png", height=64, width=64,
                           inpainting_fill="fill")
    assert not torch.equal(plain.latmask, ours.latmask) and ours.mask.tobytes() == plain.mask.tobytes()


def test_cli_outpaint_refusals(plain_sd, tmp_path, capsys):  # noqa: F811
    _image(64, 64, 3).save(tmp_path / "in.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    with pytest.raises(SystemExit):
        _cli(plain_sd, tmp_path / "a.png", "--outpaint", "32")
    assert "--outpaint only applies with --init-image IMAGE" in capsys.readouterr().err
    for extra, message in [(["--mask", str(tmp_path / "mask.png")], "not with --mask"),
                           (["--count", "2"], "--count"), (["--outpaint-directions", "left", "--outpaint-mask-blur",
                                                             "-1"], "at least 0")]:
        assert _cli(plain_sd, tmp_path / "a.png", "--init-image", str(tmp_path / "in.png"), "--outpaint", "32",
                    *extra) != 0, extra
        assert message in capsys.readouterr().err, extra
    assert not (tmp_path / "a.png").exists()


def test_the_outpainting_and_latent_resize_examples_in_docs_samplers_md_run():
    from docs_pages import run_block_with

    run_block_with("samplers.md", "outpainting_canvas(image, pixels=32")
    run_block_with("samplers.md", "latent_resize(latents, (4, 6))")
