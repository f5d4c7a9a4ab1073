"""PNG writer/reader without PIL, checked against PIL; image folders and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.images import ImageFolderError, decode_png, encode_png, image_grid, load_image_folder, read_image, write_png

PIL = pytest.importorskip("PIL")
from PIL import Image  # noqa: E402


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.sampled_from([1, 3, 4]), st.integers(0, 2**31 - 1))
def test_png_round_trip_and_pil_agrees(h, w, c, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    data = encode_png(pixels)
    assert np.array_equal(decode_png(data), pixels)
    import io

    with Image.open(io.BytesIO(data)) as im:
        theirs = np.asarray(im)
    assert np.array_equal(theirs.reshape(h, w, c), pixels)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_reader_decodes_pil_written_pngs_with_every_filter(tmp_path, mode):
    """PIL picks adaptive per-row filters (sub/up/average/paeth) for smooth images: decode them all."""
    yy, xx = np.mgrid[0:23, 0:17]
    base = np.stack([(xx * 11) % 256, (yy * 7 + xx) % 256, (xx * yy) % 256, 255 - xx * 3], -1).astype(np.uint8)
    arr = {"RGB": base[..., :3], "RGBA": base, "L": base[..., 0]}[mode]
    Image.fromarray(arr, mode).save(tmp_path / "x.png", optimize=True)
    decoded = decode_png((tmp_path / "x.png").read_bytes())
    assert np.array_equal(decoded.reshape(arr.shape), arr)


def test_write_png_and_read_image(tmp_path):
    image = torch.rand(3, 8, 6) * 2 - 1
    write_png(tmp_path / "a.png", image)
    back = read_image(tmp_path / "a.png")
    assert back.shape == (3, 8, 6) and (back - image).abs().max() <= 1 / 127.5 + 1e-6
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255  # red, fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "t.png")
    assert torch.allclose(read_image(tmp_path / "t.png"), torch.ones(3, 4, 4))
    Image.fromarray(np.full((10, 20), 128, dtype=np.uint8), "L").save(tmp_path / "g.png")
    g = read_image(tmp_path / "g.png", size=8)
    assert g.shape == (3, 8, 8) and torch.allclose(g, torch.full_like(g, 128 / 255 * 2 - 1), atol=1e-5)


def test_corrupt_pngs_are_named(tmp_path):
    data = encode_png(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ImageFolderError, match="not a PNG"):
        decode_png(b"GIF89a....", source="x.gif")
    with pytest.raises(ImageFolderError, match="truncated|corrupt"):
        decode_png(data[:30], source="cut.png")


def test_grid_layout():
    images = torch.stack([torch.full((3, 2, 2), float(i)) for i in range(5)])
    grid = image_grid(images, columns=3, padding=1, fill=-1.0)
    assert grid.shape == (3, 2 * 3 + 1, 3 * 3 + 1)
    assert grid[0, 1, 1] == 0 and grid[0, 1, 4] == 1 and grid[0, 4, 4] == 4 and grid[0, 4, 7] == -1


def test_image_folder_captions_and_errors(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    with pytest.raises(ImageFolderError, match="no images"):
        load_image_folder(folder, size=8)
    write_png(folder / "a.png", torch.zeros(3, 8, 8))
    write_png(folder / "b.png", torch.zeros(3, 8, 8))
    (folder / "a.txt").write_text("a red circle\n")
    with pytest.raises(ImageFolderError, match="b.png"):
        load_image_folder(folder, size=8)
    images, captions = load_image_folder(folder, size=8, default_caption="a shape")
    assert images.shape == (2, 3, 8, 8) and captions == ["a red circle", "a shape"]
    (folder / "c.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageFolderError, match="c.png"):
        load_image_folder(folder, size=8, default_caption="x")
    with pytest.raises(ImageFolderError, match="not a folder"):
        load_image_folder(tmp_path / "nope", size=8)


@settings(max_examples=20, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), c=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 99))
def test_every_row_filter_decodes_against_its_forward_form(h, w, c, seed):
    """Each row written with filter y % 5 (None, Sub, Up, Average, Paeth) by the PNG spec's forward formulas, in
    plain Python ints here: the reader gives the pixels back."""
    import struct
    import zlib

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    rows, prev = [], [0] * (w * c)
    for y in range(h):
        line, kind, out = [int(v) for v in pixels[y].reshape(-1)], y % 5, []
        for x, value in enumerate(line):
            a = line[x - c] if x >= c else 0
            b = prev[x]
            cc = prev[x - c] if x >= c else 0
            p = a + b - cc
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - cc)
            predictor = [0, a, b, (a + b) // 2, a if pa <= pb and pa <= pc else b if pb <= pc else cc][kind]
            out.append((value - predictor) & 0xFF)
        rows.append(bytes([kind, *out]))
        prev = line

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    colour = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    data = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    assert np.array_equal(decode_png(data), pixels)
