"""kohya's ``face_crop_aug_range``: crops around the face a file's name gives, drawn at each use.

The reference is kohya's code (sd-scripts library/train_util.py ``load_image_with_face_info`` and
``BaseDataset.crop_target``) transcribed below with its ``random`` calls made on a ``random.Random``
seeded as sdadapt's (the same draws in the same order), and OpenCV's resize replaced by the size it
gives (the windows are compared; the pixels are the area-scaled image cut at that window).
kohya uses the faces only without buckets, on images read at each step (not cached latents).
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from fit_runs import toy_lora_fit
from train_inputs import lora_train_args, read_kohya_table

from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.images import read_image, scale_image, write_png
from sdadapt.resampling import kohya_default
from sdadapt.training.data import (
    Dataset,
    encode_buckets,
    find_images,
    flip_draws,
    plan_dataset,
    size_conditioning,
)
from sdadapt.training.face_crop import (
    check_face_image,
    face_box_from_name,
    face_crop,
    face_crop_window,
    parse_face_crop_range,
)
from sdadapt.training.pixel_augment import PixelAugment


def _kohya_face_info(image_path: str) -> tuple[int, int, int, int]:
    """kohya's load_image_with_face_info (the name part), verbatim."""
    face_cx = face_cy = face_w = face_h = 0
    tokens = os.path.splitext(os.path.basename(image_path))[0].split("_")
    if len(tokens) >= 5:
        face_cx = int(tokens[-4])
        face_cy = int(tokens[-3])
        face_w = int(tokens[-2])
        face_h = int(tokens[-1])
    return face_cx, face_cy, face_w, face_h


def _kohya_crop_target(target_hw, image_hw, face, face_crop_aug_range, random_crop, random):
    """kohya's crop_target, float64 Python as kohya's, ``random`` a ``random.Random``; the resize is
    replaced by the size it makes. Returns ``((nh, nw), (top, left))``, or ``None`` when kohya returns
    the image as it is."""
    self_height, self_width = target_hw
    height, width = image_hw
    face_cx, face_cy, face_w, face_h = face
    if height == self_height and width == self_width:
        return None
    face_size = max(face_w, face_h)
    size = min(self_height, self_width)
    min_scale = max(self_height / height, self_width / width)
    min_scale = min(1.0, max(min_scale, size / (face_size * face_crop_aug_range[1])))
    max_scale = min(1.0, max(min_scale, size / (face_size * face_crop_aug_range[0])))
    if min_scale >= max_scale:
        scale = min_scale
    else:
        scale = random.uniform(min_scale, max_scale)
    nh = int(height * scale + 0.5)
    nw = int(width * scale + 0.5)
    assert nh >= self_height and nw >= self_width
    face_cx = int(face_cx * scale + 0.5)
    face_cy = int(face_cy * scale + 0.5)
    height, width = nh, nw
    corner = []
    for axis, (target_size, length, face_p) in enumerate(zip((self_height, self_width), (height, width), (face_cy, face_cx))):
        p1 = face_p - target_size // 2
        if random_crop:
            range_ = max(length - face_p, face_p)
            p1 = p1 + (random.randint(0, range_) + random.randint(0, range_)) - range_
        else:
            if face_crop_aug_range[0] != face_crop_aug_range[1]:  # noqa: SIM102 (kohya's code as written)
                if face_size > size // 10 and face_size >= 40:
                    p1 = p1 + random.randint(-face_size // 20, +face_size // 20)
        p1 = max(0, min(p1, length - target_size))
        corner.append(p1)
    return (nh, nw), (corner[0], corner[1])


def _cases(count: int, seed: int):
    """Random (target, image size, face, range, random_crop) draws: faces small and large (kohya's jitter
    needs face_size >= 40 and > size // 10), ranges equal or not, images from the target's size up."""
    draw = random.Random(seed)
    for _ in range(count):
        th, tw = draw.choice([(64, 64), (64, 96), (96, 64), (512, 512), (768, 512), (40, 56), (33, 47), (47, 33)])
        h, w = th + draw.choice([0, 0, 1, draw.randint(1, 2000)]), tw + draw.choice([0, 1, draw.randint(1, 2000)])
        fw, fh = draw.randint(1, max(1, w // 2)), draw.randint(1, max(1, h // 2))
        face = (draw.randint(1, w - 1), draw.randint(1, h - 1), fw, fh)
        low = draw.choice([0.5, 1.0, 2.0, 3.0])
        high = low if draw.random() < 0.25 else low + draw.choice([0.5, 1.0, 2.0, 5.0])
        yield (th, tw), (h, w), face, (low, high), draw.random() < 0.4


def test_the_window_is_kohyas_crop_target_for_many_sizes_and_faces():
    jittered = drew_scale = wide = 0
    for case, (target, size, face, crop_range, random_crop) in enumerate(_cases(3000, seed=0)):
        ours, theirs = random.Random(case), random.Random(case)
        want = _kohya_crop_target(target, size, face, crop_range, random_crop, theirs)
        got = face_crop_window(size, target, face, crop_range, random_crop=random_crop, rng=ours)
        assert got == (want or (size, (0, 0))), (target, size, face, crop_range, random_crop)
        assert ours.random() == theirs.random()  # the same number of draws: the streams stay in step
        (nh, nw), (top, left) = got
        assert 0 <= top <= nh - target[0] and 0 <= left <= nw - target[1]
        if want is not None:
            drew_scale += crop_range[0] != crop_range[1]
            wide += random_crop
            jittered += not random_crop and crop_range[0] != crop_range[1] and max(face[2:]) >= 40
    assert min(jittered, drew_scale, wide) > 200  # each of kohya's branches taken many times


@pytest.mark.parametrize("face_size", [39, 40, 41, 51, 52])
@pytest.mark.parametrize("target", [(512, 512), (400, 520), (33, 47)])
def test_the_window_at_kohyas_jitter_boundaries(face_size, target):
    """kohya jitters the centred window only for ``face_size > size // 10 and face_size >= 40`` (``size``
    the target's shorter side): faces at those edges, odd targets (``target_size // 2``)."""
    for seed in range(40):
        size, face = (1500, 1400), (700, 650, face_size, face_size - 1)
        ours, theirs = random.Random(seed), random.Random(seed)
        want = _kohya_crop_target(target, size, face, (1.0, 3.0), False, theirs)
        assert face_crop_window(size, target, face, (1.0, 3.0), random_crop=False, rng=ours) == want
        assert ours.random() == theirs.random()


def test_apply_face_is_the_crop_then_the_colour_then_the_flip():
    """``PixelAugment.apply_face``: kohya's order (crop_target with the subset's random_crop, color_aug,
    flip), the draws from one stream in that order."""
    from sdadapt.training.pixel_augment import color_aug

    g = torch.Generator().manual_seed(1)
    image = torch.rand(3, 120, 90, generator=g) * 2 - 1
    face, crop_range = (40, 60, 44, 50), (1.0, 2.5)
    for random_crop in (False, True):
        for seed in range(6):
            augment = PixelAugment(random_crop=random_crop, color_aug=True, face_crop_range=crop_range)
            got = augment.apply_face(image, bucket=(48, 40), face=face, flipped=seed % 2 == 0, rng=random.Random(seed))
            rng = random.Random(seed)
            want = color_aug(face_crop(image, (48, 40), face, crop_range, random_crop=random_crop, rng=rng), rng)
            torch.testing.assert_close(got, want.flip(-1) if seed % 2 == 0 else want, rtol=0, atol=0)


def test_the_pixels_are_the_area_scaled_image_cut_at_the_window():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 150, 97, generator=g, dtype=torch.float64) * 2 - 1
    for seed in range(20):
        window = face_crop_window((150, 97), (32, 48), (50, 70, 30, 40), (1.5, 4.0), random_crop=seed % 2 == 1,
                                  rng=random.Random(seed))
        (nh, nw), (top, left) = window
        # kohya's default when shrinking, OpenCV's INTER_AREA, written out in float64: each output pixel the
        # mean over the source area it covers (fractional pixels at its edges weighted by the share covered)
        def overlap(n_in: int, n_out: int) -> torch.Tensor:
            s = n_in / n_out
            return torch.tensor([[max(0.0, min(i + 1, (o + 1) * s) - max(i, o * s)) / s for i in range(n_in)]
                                 for o in range(n_out)], dtype=torch.float64)

        want = (overlap(150, nh) @ image @ overlap(97, nw).T)[:, top: top + 32, left: left + 48]
        got = face_crop(image, (32, 48), (50, 70, 30, 40), (1.5, 4.0), random_crop=seed % 2 == 1, rng=random.Random(seed))
        assert got.shape == (3, 32, 48)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["photo.png", "a_b_c.png", "x_1_2_3.png", "img_120_80_40_50.png",
                                  "my_long_name_120_80_40_50.jpg", "face_0_80_40_50.png", "face_-3_80_40_50.png",
                                  "a_b_7_8_9_10.png"])
def test_the_name_gives_the_face_as_kohya_reads_it(name):
    cx, cy, w, h = _kohya_face_info(f"/data/{name}")
    want = (cx, cy, w, h) if cx > 0 else None  # kohya: face-cropped only with face_cx > 0
    assert face_box_from_name(f"/data/{name}") == want


def test_names_kohya_cannot_read_are_refused_with_the_file_named():
    with pytest.raises(ValueError):  # kohya fails on it
        _kohya_face_info("a_b_c_d_e.png")
    with pytest.raises(InputError, match=r"a_b_c_d_e\.png.*four integers"):
        face_box_from_name("/data/a_b_c_d_e.png")
    with pytest.raises(InputError, match="size 0x0"):
        face_box_from_name("/data/img_10_10_0_0.png")
    with pytest.raises(InputError, match="smaller than the training size"):
        check_face_image("/data/img_1_1_4_4.png", (60, 200), (64, 64))
    check_face_image("/data/img_1_1_4_4.png", (64, 64), (64, 64))  # the target's size: taken as it is


@pytest.mark.parametrize("value, want", [("2.0,4.0", (2.0, 4.0)), ([1, 3], (1.0, 3.0)), ((2.5, 2.5), (2.5, 2.5)),
                                         ("", None), (None, None), ([], None)])
def test_the_range_reads_as_kohya_parses_it(value, want):
    assert parse_face_crop_range(value) == want


@pytest.mark.parametrize("value", ["4,2", "2", "a,b", [1, 2, 3], "0,2", "1,inf"])
def test_bad_ranges_are_refused(value):
    with pytest.raises(InputError, match="face_crop_aug_range"):
        parse_face_crop_range(value)


@pytest.fixture()
def face_images(tmp_path):
    """Four images larger than the toy's 32x32: three named with a face (one of them 64 px tall), one without."""
    folder = tmp_path / "faces"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for name, (h, w) in {"a_40_30_20_24": (80, 96), "b_60_50_48_40": (120, 100), "c_9_12_8_8": (64, 40),
                         "plain": (48, 56)}.items():
        write_png(folder / f"{name}.png", torch.rand(3, h, w, generator=g) * 2 - 1)
        (folder / f"{name}.txt").write_text("a red circle")
    return folder


def test_each_use_is_kohyas_face_crop_of_the_file_then_the_flip(face_images, monkeypatch):
    """fit trains on the toy VAE's encoding of a replay of kohya's crop_target on each face image (the
    scale and offsets drawn from the micro-batch's pixel stream, then the flip), the faceless image as
    before (scaled to cover, centre crop); SDXL's size rows are kohya's for its no-bucket path."""
    from sdadapt.jobs.train import TrainOptions, _face_crop_records
    from sdadapt.methods import FitConfig
    from sdadapt.methods.fit import epoch_batches_of
    from sdadapt.toy import build_toy

    records, _ = find_images(face_images)
    plan_dataset(records, resolution=32, buckets=False)
    options = TrainOptions(images=str(face_images), face_crop_aug_range="1.5,3", enable_bucket=False)
    notes: list[str] = []
    assert _face_crop_records(records, options.face_crop_aug_range, buckets=False, loss_masks=None, notes=notes) == 3
    assert "3 of 4 image(s)" in notes[0]
    dataset = Dataset(records, flip=True, augment=PixelAugment(face_crop_range=(1.5, 3.0)))
    encode_buckets(dataset, build_toy(seed=1).encode_images)
    assert not dataset.latents  # read at each use
    sizes: list = []
    _, seen = toy_lora_fit(dataset, steps=6, monkeypatch=monkeypatch, sizes=sizes)
    encode = build_toy(seed=1).encode_images
    config = FitConfig(steps=6, batch_size=2, seed=0)
    per_epoch = len(epoch_batches_of(dataset, config))
    windows = set()
    for micro, batch in enumerate(seen):
        bucket, positions = epoch_batches_of(dataset, config, epoch=micro // per_epoch)[micro % per_epoch]
        batch_records = [dataset.records[dataset.members[bucket][p]] for p in positions]
        rng = random.Random(f"0/pixels/{micro}")
        want, rows = [], []
        for record, flipped in zip(batch_records, flip_draws(0, micro, len(batch_records)), strict=True):
            image = read_image(record.path)
            face = _kohya_face_info(str(record.path))
            if face[0] > 0:
                (nh, nw), (top, left) = _kohya_crop_target((32, 32), tuple(image.shape[1:]), face, (1.5, 3.0), False, rng)
                windows.add((record.path.name, nh, top, left))
                crop = scale_image(image, (nh, nw), interpolation="area")[:, top: top + 32, left: left + 32]
                rows.append([32, 32, 0, 32 if flipped else 0, 32, 32])  # kohya: original = target, crop (0, 0, 0, 0)
            else:
                scaled = scale_image(image, record.resized,
                                     interpolation=kohya_default(tuple(image.shape[1:]), record.resized))
                top, left = record.crop
                crop = scaled[:, top: top + 32, left: left + 32]
                rows.append([*record.size, top, record.resized[1] - 32 - left if flipped else left, 32, 32])
            want.append(crop.flip(-1) if flipped else crop)
        torch.testing.assert_close(batch, encode(torch.stack(want)), rtol=0, atol=0)
        assert sizes[micro] == rows
    assert len(windows) > 3  # other scales / offsets at other uses
    plain = next(r for r in dataset.records if r.face is None)
    assert size_conditioning(plain) == (*plain.size, *plain.crop, 32, 32)


def test_train_reads_the_flag_records_it_and_refuses_a_changed_resume(face_images, tmp_path, capsys):
    out = tmp_path / "f.safetensors"
    args = lora_train_args(face_images, "--no-bucket", "--face-crop-aug-range", "1.5,3", "--steps", "4",
                           "--save-every-n-steps", "2", "-o", out)
    assert main(args) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "--face-crop-aug-range: the pixels change at every use" in err and "3 of 4 image(s)" in err
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_face_crop_aug_range"], meta["ss_cache_latents"]) == ("(1.5, 3.0)", "False")
    state = tmp_path / "f-state"
    assert json.loads((state / "run.json").read_text())["augmentations"]["face_crop_aug_range"] == [1.5, 3.0]
    assert main(lora_train_args(face_images, "--no-bucket", "--face-crop-aug-range", "2,3", "--steps", "4", "-o",
                                tmp_path / "g.safetensors", "--resume", state)) != 0
    assert "face_crop_aug_range [1.5, 3.0] (now [2.0, 3.0])" in capsys.readouterr().err
    resumed = tmp_path / "r.safetensors"
    assert main(lora_train_args(face_images, "--no-bucket", "--face-crop-aug-range", "1.5,3", "--steps", "4", "-o", resumed,
                                "--resume", state, "-q")) == 0
    with safe_open(str(out), "pt") as a, safe_open(str(resumed), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118


def test_with_buckets_the_faces_are_unused_as_kohyas(face_images, tmp_path, capsys):
    assert main(lora_train_args(face_images, "--face-crop-aug-range", "2,4", "--steps", "1", "-o",
                                tmp_path / "b.safetensors")) == 0
    err = capsys.readouterr().err
    assert "unused with bucketing" in err and "nothing is cached" not in err


def test_refusals(face_images, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    write_png(small / "s_10_10_8_8.png", torch.zeros(3, 20, 40))
    (small / "s_10_10_8_8.txt").write_text("a red circle")
    assert main(lora_train_args(small, "--no-bucket", "--face-crop-aug-range", "2,4", "--steps", "1", "-o",
                                tmp_path / "s.safetensors")) != 0
    assert "s_10_10_8_8.png: 40x20 is smaller than the training size 32x32" in capsys.readouterr().err
    assert main(lora_train_args(face_images, "--no-bucket", "--face-crop-aug-range", "2,4", "--alpha-mask", "--steps", "1",
                                "-o", tmp_path / "m.safetensors")) != 0
    assert "loss masks do not follow a face crop" in capsys.readouterr().err
    assert main(lora_train_args(face_images, "--face-crop-aug-range", "4,2", "--steps", "1", "-o",
                                tmp_path / "x.safetensors")) != 0
    assert "LO must not be above HI" in capsys.readouterr().err


def test_kohya_config_reads_the_range_and_cache_latents_drops_it_as_kohya(tmp_path):
    options, _, _ = read_kohya_table(tmp_path / "a.toml", {"face_crop_aug_range": "2.0,4.0"})
    assert options == {"face_crop_aug_range": "2.0,4.0"}
    options, _, notes = read_kohya_table(tmp_path / "b.toml", {"face_crop_aug_range": "2.0,4.0", "cache_latents": True})
    assert "face_crop_aug_range" not in options
    assert any("ignored face_crop_aug_range (cache_latents" in n for n in notes)
    data = tmp_path / "data.toml"  # (a dataset TOML's subsets: not dropped there, so refused with cache_latents)
    data.write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "x"\n  face_crop_aug_range = [2.0, 4.0]\n')
    with pytest.raises(ValueError, match="cache_latents with a dataset_config .* face_crop_aug_range is set"):
        read_kohya_table(tmp_path / "c.toml", {"dataset_config": str(data), "cache_latents": True})
    options, _, _ = read_kohya_table(tmp_path / "d.toml", {"dataset_config": str(data)})
    assert options["dataset_config"] == str(data)
    data.write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "x"\n')
    read_kohya_table(tmp_path / "e.toml", {"dataset_config": str(data), "cache_latents": True})



def test_a_dataset_toml_face_crops_its_subsets(face_images, tmp_path, capsys):
    """kohya's dataset TOML: ``face_crop_aug_range`` per subset (one value for the training subsets here, as
    random_crop), the face crops with ``enable_bucket = false``; the resume record keeps the subset's range."""
    toml = tmp_path / "data.toml"
    toml.write_text(f'[general]\nenable_bucket = false\n[[datasets]]\nresolution = 32\nbatch_size = 2\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{face_images}"\n  caption_extension = ".txt"\n'
                    f'  face_crop_aug_range = [1.5, 3.0]\n')
    out = tmp_path / "d.safetensors"
    assert main(["train", "lora", "--dataset-config", str(toml), "--no-prior", "--steps", "2", "--save-every-n-steps", "1",
                 "-o", str(out)]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "3 of 4 image(s)" in err and "--face-crop-aug-range: the pixels change at every use" in err
    record = json.loads((tmp_path / "d-state" / "run.json").read_text())
    assert record["dataset"]["subsets"][0]["face_crop_aug_range"] == [1.5, 3.0]
    assert record["augmentations"]["face_crop_aug_range"] == [1.5, 3.0]


def test_a_face_named_image_takes_the_caption_of_its_name_without_the_face(tmp_path):
    """kohya's read_caption: ``<name>_<cx>_<cy>_<w>_<h>.png`` without its own caption file takes ``<name>.txt``
    (its own first, when there); other names as before."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("me_40_30_20_24", "you_40_30_20_24", "plain_1", "a_b_c_d"):
        write_png(folder / f"{name}.png", torch.zeros(3, 8, 8))
    (folder / "me.txt").write_text("the shared caption")
    (folder / "you_40_30_20_24.txt").write_text("its own")
    (folder / "you.txt").write_text("not this one")
    (folder / "plain.txt").write_text("not for plain_1")
    (folder / "a.txt").write_text("not for a_b_c_d (four parts)")
    records, notes = find_images(folder, caption_extension=".txt", uncaptioned=True)
    captions = {r.path.stem: r.caption for r in records}
    assert captions["me_40_30_20_24"] == "the shared caption" and captions["you_40_30_20_24"] == "its own"
    assert captions["plain_1"] == "" and captions["a_b_c_d"] == ""
    said = (f"{folder}: 1 image(s) named <name>_<cx>_<cy>_<w>_<h> without their own .txt file take <name>.txt's "
            "caption, as kohya's read_caption (me_40_30_20_24.png <- me.txt)")
    assert [n for n in notes if "read_caption" in n] == [said]  # (said, not silent: runs before took no file's text)


def test_class_images_with_faces_are_face_cropped_too(tmp_path, monkeypatch):
    """kohya's reg subsets take the run's face_crop_aug_range: the --reg-data-dir images with a face in
    their name are cropped around it at each use, training images without faces or not."""
    from train_inputs import captioned_pngs

    import sdadapt.jobs.train as train_job
    from sdadapt.jobs import TrainOptions, run_train

    plain = captioned_pngs(tmp_path / "plain", [(40, 48), (48, 40)])

    reg = tmp_path / "reg" / "1_circle"
    reg.mkdir(parents=True)
    write_png(reg / "r_30_30_20_20.png", torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1)
    write_png(reg / "q.png", torch.zeros(3, 40, 40))
    seen = {}
    real = train_job.fit

    def spying(system, adaptation, dataset, *args, prior=None, **kwargs):
        seen["train"], seen["reg"] = dataset, prior[0]
        return real(system, adaptation, dataset, *args, prior=prior, **kwargs)

    monkeypatch.setattr(train_job, "fit", spying)
    run_train("lora", TrainOptions(images=str(plain), model="toy", steps=1, batch_size=2, enable_bucket=False,
                                   face_crop_aug_range=(1.5, 3.0), reg_data_dir=str(tmp_path / "reg"), log_with="csv",
                                   out=str(tmp_path / "r.safetensors")))
    assert seen["reg"].augment.face_crop_range == (1.5, 3.0) and seen["train"].augment.face_crop_range is None
    assert {r.path.name: r.face for r in seen["reg"].records} == {"r_30_30_20_20.png": (30, 30, 20, 20), "q.png": None}
