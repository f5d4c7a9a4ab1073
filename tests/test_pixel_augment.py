"""kohya's ``random_crop`` and ``color_aug``: drawn at each use of an image, so the batch's pixels
are augmented and encoded before each step (no latent cache).

kohya (library/train_util.py):

* ``trim_and_resize_if_required``: ``if image_width > reso[0]: p = random.randint(0, trim_size)``
  (``trim_size // 2`` without random_crop), then the same for the height.
* ``AugHelper.color_aug``: ``if random.random() <= 0.33: if random.random() > 0.5:`` hue shift
  ``random.uniform(-8, 8)`` OpenCV hue units (2 degrees) on ``cv2.cvtColor(image, COLOR_BGR2HSV)``
  of an RGB image, ``(h + shift) % 180`` stored back into the uint8 channel (whole units: truncated); ``else:`` ``gamma = random.uniform(0.95, 1.05)``,
  ``np.clip(image**gamma, 0, 255)`` on 0-255 values.
* order in ``__getitem__``: crop, colour augmentation, flip.
"""

from __future__ import annotations

import colorsys
import json
import random

import numpy as np
import pytest
import torch
from fit_runs import toy_lora_fit
from safetensors import safe_open
from train_inputs import captioned_pngs, lora_train_args

from sdadapt.cli import main
from sdadapt.images import write_png
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.training.data import (
    Dataset,
    _scaled,
    encode_buckets,
    find_images,
    flip_draws,
    plan_dataset,
)
from sdadapt.training.host_syncs import HostSyncs
from sdadapt.training.pixel_augment import (
    PixelAugment,
    color_aug,
    hue_shift,
    kohya_gamma,
    random_crop_box,
)


@pytest.fixture()
def images(tmp_path):
    """Random images larger than their buckets on one side (so a crop has slack), one caption."""
    return captioned_pngs(tmp_path / "imgs", [(32, 44), (44, 32), (32, 40), (36, 32)])


def test_the_random_crop_box_is_kohyas_draw():
    for seed in range(50):
        rng, ref = random.Random(seed), random.Random(seed)
        top, left = random_crop_box((40, 57), (32, 48), rng)
        want_left = ref.randint(0, 57 - 48)  # the width first (kohya), both ends inclusive
        want_top = ref.randint(0, 40 - 32)
        assert (top, left) == (want_top, want_left)
    rng = random.Random(0)
    seen = {random_crop_box((32, 40), (32, 32), rng) for _ in range(400)}
    assert seen == {(0, left) for left in range(9)}  # every offset of the slack, nothing drawn for the height
    state = random.Random(1)
    before = state.getstate()
    assert random_crop_box((32, 32), (32, 32), state) == (0, 0) and state.getstate() == before  # no slack: no draw
    with pytest.raises(ValueError, match="does not cover"):
        random_crop_box((30, 40), (32, 32), random.Random(0))


def test_the_hue_shift_is_an_hsv_hue_rotation_in_float64():
    """Against Python's colorsys, pixel by pixel in float64; saturation and value unchanged; turning back undoes it."""
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 6, 5, generator=g, dtype=torch.float64) * 2 - 1
    image[:, 0, 0] = torch.tensor([0.2, 0.2, 0.2], dtype=torch.float64)  # grey: no hue
    image[:, 0, 1] = torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64)  # black
    image[:, 0, 2] = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)  # pure red
    for degrees in (-16.0, 7.5, 123.0):
        got = hue_shift(image, degrees)
        want = torch.empty_like(image)
        for y in range(image.shape[1]):
            for x in range(image.shape[2]):
                r, g_, b = ((image[:, y, x] + 1) / 2).tolist()
                h, s, v = colorsys.rgb_to_hsv(r, g_, b)
                want[:, y, x] = torch.tensor(colorsys.hsv_to_rgb((h + degrees / 360) % 1.0, s, v), dtype=torch.float64) * 2 - 1
        assert torch.allclose(got, want, atol=1e-12, rtol=0)
        assert torch.allclose(hue_shift(got, -degrees), image, atol=1e-12, rtol=0)
    assert torch.allclose(hue_shift(image, 40.0)[:, 0, 0], image[:, 0, 0], atol=1e-15, rtol=0)  # grey stays grey
    assert torch.allclose(hue_shift(image, 120.0)[:, 0, 2], torch.tensor([-1.0, 1.0, -1.0], dtype=torch.float64))  # red -> green


def test_the_hue_turns_the_way_kohyas_bgr_conversion_of_an_rgb_image_turns_it():
    """kohya converts its RGB array with ``COLOR_BGR2HSV``, adds ``s`` OpenCV hue units (2 degrees each)
    and converts back with ``COLOR_HSV2BGR``: channel 0 (red) is read and written as blue. Written
    out here with colorsys on the swapped channels, in float64: the same as ``hue_shift(image, -2 s)``
    (the sign color_aug uses)."""
    g = torch.Generator().manual_seed(3)
    image = torch.rand(3, 4, 5, generator=g, dtype=torch.float64) * 2 - 1
    for units in (-8.0, -3.5, 2.0, 8.0):
        want = torch.empty_like(image)
        for y in range(image.shape[1]):
            for x in range(image.shape[2]):
                r, g_, b = ((image[:, y, x] + 1) / 2).tolist()
                h, s, v = colorsys.rgb_to_hsv(b, g_, r)  # OpenCV reads the array as B, G, R
                red, green, blue = colorsys.hsv_to_rgb((h + 2 * units / 360) % 1.0, s, v)
                want[:, y, x] = torch.tensor([blue, green, red], dtype=torch.float64) * 2 - 1  # written back as B, G, R
        assert torch.allclose(hue_shift(image, -2.0 * units), want, atol=1e-12, rtol=0)


def test_the_gamma_is_kohyas_on_0_255_values():
    image = torch.linspace(-1, 1, 11, dtype=torch.float64).view(1, 1, 11).expand(3, 2, 11)
    for gamma in (0.95, 1.0, 1.05):
        got = kohya_gamma(image, gamma)
        for value, out in zip(image[0, 0].tolist(), got[0, 0].tolist(), strict=True):
            levels = (value + 1) * 127.5
            assert out == pytest.approx(min(255.0, levels**gamma) / 127.5 - 1, abs=1e-12)
    assert torch.allclose(kohya_gamma(image, 1.0), image, atol=1e-12)


def _kohya_hue_units(drawn: float) -> int:
    """The whole OpenCV hue units kohya's ``hsv_img[:, :, 0] = (hsv_img[:, :, 0] + hue_shift) % 180`` turns every
    8-bit hue by (``hue_shift`` made positive first): the float sum stored back into the uint8 channel truncates."""
    shift = 180 + drawn if drawn < 0 else drawn
    hues = np.arange(180, dtype=np.uint8)[None]
    turned = hues.copy()
    turned[:, :] = (hues + shift) % 180
    (units,) = set(((turned.astype(int) - hues.astype(int)) % 180).ravel().tolist())  # (one turn for every hue)
    return units if units < 90 else units - 180


def test_color_aug_draws_as_kohya_in_the_same_order():
    image = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
    kinds = {"none": 0, "hue": 0, "gamma": 0}
    for seed in range(600):
        got = color_aug(image, random.Random(seed))
        ref = random.Random(seed)
        if ref.random() <= 0.33:
            if ref.random() > 0.5:
                want, kind = hue_shift(image, -2.0 * _kohya_hue_units(ref.uniform(-8, 8))), "hue"
            else:
                want, kind = kohya_gamma(image, ref.uniform(0.95, 1.05)), "gamma"
        else:
            want, kind = image, "none"
        assert torch.equal(got, want)
        kinds[kind] += 1
    assert 0.28 < (kinds["hue"] + kinds["gamma"]) / 600 < 0.38 and kinds["hue"] > 60 and kinds["gamma"] > 60


def _dataset(folder, *, random_crop=True, color_aug=False, flip=False) -> Dataset:
    records, _ = find_images(folder)
    plan_dataset(records, resolution=32, step=4)
    dataset = Dataset(records, flip=flip, augment=PixelAugment(random_crop=random_crop, color_aug=color_aug))
    encode_buckets(dataset, build_toy(seed=1).encode_images)
    return dataset


def test_each_step_encodes_its_own_random_crops_and_a_resume_draws_the_same(images, tmp_path, monkeypatch):
    """The latents each step trains on are the toy VAE's encoding of the crops a replay of the seeded
    draws gives (crop, then the mirror), not a cache; a resumed run trains on the same ones."""
    from sdadapt.methods.fit import epoch_batches_of

    dataset = _dataset(images, flip=True)
    assert not dataset.latents and dataset.members  # nothing cached
    sizes: list = []
    losses, seen = toy_lora_fit(dataset, steps=4, save_at=2, state=tmp_path / "state", monkeypatch=monkeypatch, sizes=sizes)
    encode = build_toy(seed=1).encode_images
    config = FitConfig(steps=4, batch_size=2, seed=0)
    per_epoch = len(epoch_batches_of(dataset, config))
    offsets = set()
    for micro, batch in enumerate(seen):
        bucket, positions = epoch_batches_of(dataset, config, epoch=micro // per_epoch)[micro % per_epoch]
        records = [dataset.records[dataset.members[bucket][p]] for p in positions]
        rng = random.Random(f"0/pixels/{micro}")
        flips = flip_draws(0, micro, len(records))
        want, rows = [], []
        for record, flipped in zip(records, flips, strict=True):
            scaled = _scaled(record)
            (sh, sw), (bh, bw) = scaled.shape[1:], record.bucket
            left = rng.randint(0, sw - bw) if sw > bw else 0
            top = rng.randint(0, sh - bh) if sh > bh else 0
            offsets.add((record.path.name, top, left))
            crop = scaled[:, top: top + bh, left: left + bw]
            want.append(crop.flip(-1) if flipped else crop)
            # SDXL's crop conditioning: the window taken, its left edge seen from the left of what is trained on
            rows.append([*record.size, top, sw - bw - left if flipped else left, bh, bw])
        assert torch.equal(batch, encode(torch.stack(want)))
        assert sizes[micro] == rows
    assert len(offsets) > len(dataset.records)  # the same image at other offsets
    resumed, resumed_seen = toy_lora_fit(dataset, steps=4, resume=tmp_path / "state", monkeypatch=monkeypatch)
    assert resumed == losses[2:]
    assert all(torch.equal(a, b) for a, b in zip(resumed_seen, seen[2:], strict=True))


def test_color_aug_changes_some_uses_and_adds_no_host_sync(images, monkeypatch):
    dataset = _dataset(images, random_crop=False, color_aug=True)
    plain = Dataset(dataset.records)
    encode_buckets(plain, build_toy(seed=1).encode_images)
    cached = {tuple(v.flatten()[:8].tolist()) for bucket in plain.latents.values() for v in bucket}
    _, seen = toy_lora_fit(dataset, steps=6, monkeypatch=monkeypatch)
    rows = [row for batch in seen for row in batch]
    changed = sum(tuple(row.flatten()[:8].tolist()) not in cached for row in rows)
    assert 0 < changed < len(rows)  # a third of the 12 uses, roughly
    system = build_toy(seed=1)
    adaptation = METHODS["lora"].adapt(system, seed=1)
    per_step: list[list] = []
    with HostSyncs() as syncs:
        fit(system, adaptation, dataset, config=FitConfig(steps=3, batch_size=2, learning_rate=1e-3, warmup_steps=0),
            on_step=lambda progress: (per_step.append(list(syncs.events)), syncs.events.clear()))
    for events in per_step[1:]:
        assert [(e.kind, e.op) for e in events] == [("read", "tolist")], "\n".join(map(str, events))


def test_tensor_images_cannot_be_augmented():
    from sdadapt.training.data import records_from_tensors

    pixels = torch.zeros(2, 3, 32, 32)
    dataset = Dataset(records_from_tensors(pixels, ["a", "b"]), augment=PixelAugment(random_crop=True))
    with pytest.raises(ValueError, match="read the image files"):
        encode_buckets(dataset, build_toy(seed=1).encode_images, images=pixels)


def test_train_random_crop_and_color_aug_from_toml_and_flags(images, tmp_path, capsys):
    config = tmp_path / "kohya.toml"
    config.write_text("[dataset_arguments]\nrandom_crop = true\ncolor_aug = true\n")
    out = tmp_path / "a.safetensors"
    assert main(lora_train_args(images, "--config", config, "--steps", "4", "--save-every-n-steps", "2", "-o", out)) == 0
    err = capsys.readouterr().err
    assert "--random-crop and --color-aug: the pixels change at every use, so nothing is cached" in err
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_random_crop"], meta["ss_color_aug"], meta["ss_cache_latents"]) == ("True", "True", "False")
    state = tmp_path / "a-state"
    assert json.loads((state / "run.json").read_text())["augmentations"] == {
        "flip_aug": False, "random_crop": True, "color_aug": True}
    assert main(lora_train_args(images, "--random-crop", "--steps", "4", "-o", tmp_path / "b.safetensors", "--resume", state)) == 2
    assert "color_aug True (now False)" in capsys.readouterr().err
    resumed = tmp_path / "r.safetensors"
    assert main(lora_train_args(images, "--random-crop", "--color-aug", "--steps", "4", "-o", resumed, "--resume", state, "-q")) == 0
    with safe_open(str(out), "pt") as a, safe_open(str(resumed), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118 (safe_open is not iterable)
    plain = tmp_path / "p.safetensors"
    assert main(lora_train_args(images, "--steps", "1", "-o", plain, "-q")) == 0
    with safe_open(str(plain), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_random_crop"], meta["ss_color_aug"], meta["ss_cache_latents"]) == ("False", "False", "True")


def test_sdxl_trains_on_random_mirrored_crops_with_their_crop_conditioning(tmp_path, monkeypatch):
    """A tiny SDXL single file: the VAE encodes each step's crops, and the time ids SDXL is conditioned
    on carry each use's window (top, left as seen in the image trained on) within its scaled image."""
    pytest.importorskip("diffusers")
    from tiny_checkpoints import tiny_sdxl_file

    from sdadapt.diffusers_system import DiffusersSystem

    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for name, (h, w) in {"wide": (16, 28), "tall": (28, 16)}.items():
        write_png(folder / f"{name}.png", torch.rand(3, h, w, generator=g) * 2 - 1)
        (folder / f"{name}.txt").write_text("sks toy")
    model = tiny_sdxl_file(tmp_path / "sdxl.safetensors")
    rows: list[list[float]] = []
    real = DiffusersSystem.condition

    def condition(self, ids):
        if isinstance(ids, dict):
            rows.extend(ids["time_ids"].tolist())
        return real(self, ids)

    monkeypatch.setattr(DiffusersSystem, "condition", condition)
    out = tmp_path / "xl.safetensors"
    assert main(["train", "lora", "--model", str(model), "--images", str(folder), "--resolution", "16", "--steps", "4",
                 "--batch-size", "1", "--no-prior", "--random-crop", "--flip-aug", "--color-aug", "--bucket-reso-steps",
                 "8", "-o", str(out), "-q"]) == 0
    assert len(rows) == 4
    lefts = set()
    for orig_h, orig_w, top, left, bucket_h, bucket_w in rows:
        assert (orig_h, orig_w) in ((16, 28), (28, 16))
        scale = max(bucket_h / orig_h, bucket_w / orig_w)
        assert 0 <= top <= round(orig_h * scale) - bucket_h and 0 <= left <= round(orig_w * scale) - bucket_w
        lefts.add((orig_w, left, top))
    assert len(lefts) > 1
