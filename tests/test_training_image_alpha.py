"""Training reads a transparent image's colour as stored under its alpha, the alpha dropped — PIL's
``convert("RGB")``, as kohya's ``load_image`` (sd-scripts 48d368fa library/train_util.py:2956), diffusers' training
scripts and A1111's training datasets read it (it was composited on white, which none of them does)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdadapt.images import read_image
from sdadapt.training.data import Dataset, encode_buckets, find_images, plan_dataset

Image = pytest.importorskip("PIL.Image")


def _transparent_png(path, mode: str) -> np.ndarray:
    """A 32x32 image: opaque blue left, red stored under alpha 0 right, green under alpha 128 in the middle columns;
    returns PIL's ``convert("RGB")`` of the file, (32, 32, 3) uint8."""
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[:, :16] = (20, 40, 220, 255)
    rgba[:, 16:] = (230, 10, 10, 0)
    rgba[:, 14:18] = (10, 200, 30, 128)
    image = Image.fromarray(rgba, "RGBA")
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "P":
        image = image.quantize(colors=8, method=Image.Quantize.FASTOCTREE)
    image.save(path)
    with Image.open(path) as saved:
        return np.asarray(saved.convert("RGB"))


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_training_pixels_are_pils_convert_rgb_of_the_file(tmp_path, mode):
    want = _transparent_png(tmp_path / "img.png", mode)
    (tmp_path / "img.txt").write_text("a photo")
    records, _ = find_images(tmp_path)
    plan_dataset(records, resolution=32, buckets=False)
    dataset = Dataset(records)
    encode_buckets(dataset, lambda pixels: pixels)  # (the "latents" are the pixels themselves)
    (pixels,) = dataset.latents.values()
    expected = torch.from_numpy(want.astype(np.float32) / 255.0).permute(2, 0, 1) * 2 - 1
    torch.testing.assert_close(pixels[0], expected, rtol=0, atol=1e-6)
    composited = read_image(tmp_path / "img.png")  # (generate / CLIP-inversion reads keep the white background)
    if mode != "P":  # (the quantized palette may hold no transparent entry)
        assert not torch.allclose(composited, expected)
