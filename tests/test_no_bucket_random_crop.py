"""kohya's ``random_crop`` without buckets (its uncached path, sd-scripts 48d368fa library/train_util.py:1629-1650):
no image is scaled; a resolution-sized window of the image at its own size is cut at each use, SDXL conditions it
as an uncropped image of the resolution (``original_size = target_size``, crop 0; mirrored, the crop's left edge is
the target width), and an image smaller than the resolution stops the run ("image too small")."""

from __future__ import annotations

import random

import torch
from train_inputs import captioned_pngs, lora_train_args

from sdadapt.cli import main
from sdadapt.images import read_image
from sdadapt.training.data import Dataset, find_images, plan_dataset, size_conditioning
from sdadapt.training.pixel_augment import PixelAugment


def test_windows_are_cut_from_the_unscaled_image_and_conditioned_as_kohyas(tmp_path):
    folder = captioned_pngs(tmp_path / "imgs", [(40, 56)])
    records, _ = find_images(folder)
    plan_dataset(records, resolution=32, buckets=False, full_size_crop=True)
    (record,) = records
    assert (record.bucket, record.resized) == ((32, 32), (40, 56))  # kept at its size
    dataset = Dataset(records, augment=PixelAugment(random_crop=True))
    full = read_image(record.path, alpha="drop")
    seen = set()
    for seed in range(16):
        for flipped in (False, True):
            images, crops = dataset.pixel_batch([record], [flipped], random.Random(seed))
            top, left = crops[0]
            window = full[:, top: top + 32, left: left + 32]
            assert torch.equal(images[0], window.flip(-1) if flipped else window)
            # kohya: original_size = target_size = the resolution, crop (0, 0); mirrored crop_left = target width
            assert size_conditioning(record, flipped=flipped, crop=crops[0]) == (32, 32, 0, 32 if flipped else 0, 32, 32)
            seen.add((top, left))
    assert len(seen) > 4 and max(t for t, _ in seen) <= 8 and max(left for _, left in seen) <= 24


def test_scaled_as_before_without_random_crop_or_with_buckets(tmp_path):
    folder = captioned_pngs(tmp_path / "imgs", [(40, 56)])
    records, _ = find_images(folder)
    plan_dataset(records, resolution=32, buckets=False)
    assert records[0].resized == (32, 45) and not records[0].full_size  # (kohya's cached path: scaled to cover)


def test_an_image_smaller_than_the_resolution_is_refused_naming_it(tmp_path, capsys):
    folder = captioned_pngs(tmp_path / "imgs", [(40, 56), (24, 40)])
    code = main(lora_train_args(folder, "--model", "toy", "--steps", "1", "--resolution", "32", "--no-bucket",
                                "--random-crop", "-o", tmp_path / "out.safetensors"))
    err = capsys.readouterr().err
    assert code != 0 and "1.png: 40x24 is smaller than the resolution 32x32" in err and "image too small" in err
    assert not (tmp_path / "out.safetensors").exists()
