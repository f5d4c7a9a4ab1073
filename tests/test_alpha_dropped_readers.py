"""Every reader of a user's images for training or inversion takes a transparent image's stored colour with the
alpha dropped (PIL's ``convert("RGB")``), as the tool each follows reads it: class images (kohya, diffusers'
DreamBooth), aesthetic-embedding folders (vicgalle's script and the A1111 extension: openai-CLIP's
``convert("RGB")``), null-text inversion (the prompt-to-prompt notebook's ``load_512``: ``[:, :, :3]``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdadapt.aesthetic import aesthetic_embedding_from_folder
from sdadapt.training.class_folder import read_class_folder

Image = pytest.importorskip("PIL.Image")


def _cut_out(path) -> torch.Tensor:
    """A 16x16 RGBA PNG: opaque blue left, red stored under alpha 0 right; returns convert("RGB") in [-1, 1]."""
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[:, :8] = (20, 40, 220, 255)
    rgba[:, 8:] = (230, 10, 10, 0)
    Image.fromarray(rgba, "RGBA").save(path)
    with Image.open(path) as saved:
        return torch.from_numpy(np.asarray(saved.convert("RGB")).astype(np.float32) / 127.5 - 1).permute(2, 0, 1)


def test_class_images_keep_the_stored_colour(tmp_path):
    want = _cut_out(tmp_path / "000000.png")
    images, _ = read_class_folder(tmp_path, count=1, class_prompt="a dog")
    torch.testing.assert_close(images[0], want, rtol=0, atol=1e-6)


def test_aesthetic_folders_keep_the_stored_colour(tmp_path):
    want = _cut_out(tmp_path / "a.png")
    seen = []

    def encoder(batch):
        seen.append(batch.clone())
        return batch.flatten(1)[:, :4]

    aesthetic_embedding_from_folder(tmp_path, encoder, size=16)
    torch.testing.assert_close(seen[0][0], want, rtol=0, atol=1e-6)


def test_null_text_inversion_reads_the_stored_colour(tmp_path, monkeypatch):
    import importlib

    job = importlib.import_module("sdadapt.inversion.job")
    want = _cut_out(tmp_path / "in.png")
    seen = {}

    class Stop(Exception):
        pass

    def invert_image(system, picture, *args, **kwargs):
        seen["picture"] = picture
        raise Stop

    monkeypatch.setattr(job, "invert_image", invert_image)
    with pytest.raises(Stop):
        job.run_invert(tmp_path / "in.png", prompt="a square", out=tmp_path / "out.png", model="toy", steps=2)
    picture = seen["picture"]
    assert picture.shape[-2:] == (32, 32)  # (the toy's size: 16 -> 32, bilinear)
    expected = torch.nn.functional.interpolate(want[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(picture.reshape(expected.shape), expected, rtol=0, atol=1e-5)
