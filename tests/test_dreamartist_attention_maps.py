"""The DreamArtist extension's attention maps (its "Attention Map" option, on by default): ``<name>_att.png`` beside
an image weighs that image's loss per latent element — grey ≤ 127 to 0..1, above to 1..5 (dataset.py) — and is
never a training image itself (sdadapt trained on the maps as images before)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from sdadapt.training.data import find_images
from sdadapt.training.loss_masks import LossMaskSource, attention_map_file, attention_weights, is_attention_map


def test_the_weights_are_the_extensions_mapping():
    v = torch.tensor([0.0, 63.5, 127.0, 128.0, 191.0, 255.0]) / 255
    expected = torch.tensor([0.0, 0.5, 1.0, 1 + 4 / 128, 3.0, 5.0])
    torch.testing.assert_close(attention_weights(v), expected)


def _write(path, array):
    Image.fromarray(array).save(path)
    return path


def test_a_map_weighs_its_image_and_an_image_without_one_weighs_1(tmp_path):
    rng = np.random.default_rng(0)
    _write(tmp_path / "a.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    _write(tmp_path / "b.png", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    grey = np.zeros((16, 16), dtype=np.uint8)
    grey[:, 8:] = 255  # (left half no attention: weight 0; right half the most: 5)
    _write(tmp_path / "a_att.png", np.stack([grey] * 3, axis=-1))
    assert is_attention_map(tmp_path / "a_att.png") and not is_attention_map(tmp_path / "a.png")
    assert attention_map_file(tmp_path / "a.png") == tmp_path / "a_att.png"
    assert attention_map_file(tmp_path / "b.png") is None
    records, _ = find_images(tmp_path, default_caption="x")
    source = LossMaskSource(attention=True)
    by_name = {r.path.name: r for r in records}
    for record in records:  # (as the bucket plan leaves a 16 x 16 image: uncropped, unscaled)
        record.size = record.bucket = record.resized = (16, 16)
        record.crop = (0, 0)
    weights = source.latent_mask(by_name["a.png"], size=(2, 2))
    torch.testing.assert_close(weights, torch.tensor([[[0.0, 5.0], [0.0, 5.0]]]))
    assert torch.equal(source.latent_mask(by_name["b.png"], size=(2, 2)), torch.ones(1, 2, 2))
    assert source.missing(records) == []


def test_train_leaves_the_maps_out_of_the_images_and_weighs_with_them(tmp_path, monkeypatch):
    from sdadapt.cli import main
    from sdadapt.jobs import train as train_job

    rng = np.random.default_rng(1)
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("a", "b"):
        _write(images / f"{name}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        (images / f"{name}.txt").write_text("a sks circle")
    _write(images / "a_att.png", np.full((32, 32, 3), 255, dtype=np.uint8))
    seen = {}
    real_fit = train_job.fit

    def spy(system, adaptation, data, *args, **kwargs):
        seen["records"] = [r.path.name for r in data.records]
        seen["masks"] = data.loss_masks
        return real_fit(system, adaptation, data, *args, **kwargs)

    monkeypatch.setattr(train_job, "fit", spy)
    assert main(["train", "dreamartist", "--images", str(images), "--model", "toy", "--token", "sks", "--steps", "1",
                 "-q", "-o", str(tmp_path / "s.pt")]) == 0
    assert sorted(seen["records"]) == ["a.png", "b.png"] and seen["masks"] == LossMaskSource(attention=True)
