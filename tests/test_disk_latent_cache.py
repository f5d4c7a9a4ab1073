"""``train --cache-latents-to-disk`` (kohya's ``cache_latents_to_disk``): latents in kohya's ``.npz`` files.

Reference (kohya sd-scripts): ``library/strategy_sd.py`` ``SdSdxlLatentsCachingStrategy.get_latents_npz_path``
(``<stem>_<W:04d>x<H:04d>_sd.npz``, an older ``<stem>.npz`` first), ``library/strategy_base.py``
``LatentsCachingStrategy.save_latents_to_disk`` (keys ``latents``, ``original_size``, ``crop_ltrb``,
``latents_flipped``; float32, unscaled VAE latents) and ``_default_is_disk_cached_latents_expected`` (a file
missing ``latents`` / ``latents_flipped`` under flip_aug is encoded again), ``library/train_util.py``
``BucketManager.get_crop_ltrb`` and ``is_disk_cached_latents_is_expected`` (the latent size check).
The kohya writer and crop rule are transcribed below (:func:`_kohya_save`, :func:`_kohya_crop_ltrb`).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_cli_train import _tiny_pipeline

from sdadapt.cli import main
from sdadapt.images import write_png
from sdadapt.training.data import Dataset, encode_buckets, find_images, plan_dataset
from sdadapt.training.kohya_latent_files import KohyaLatentFiles

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

SIZES = [(32, 48), (32, 32)]  # (height, width) of img0, img1


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return _tiny_pipeline(tmp_path_factory.mktemp("disk_latents") / "pipe", prediction_type="epsilon")


@pytest.fixture(scope="module")
def system(pipe):
    from sdadapt.diffusers_system import DiffusersSystem

    return DiffusersSystem.from_folder(pipe)


def _images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(SIZES):
        write_png(folder / f"img{i}.png", torch.rand(3, h, w, generator=g) * 2 - 1)
        (folder / f"img{i}.txt").write_text(f"a photo {i}")
    return folder


def _dataset(folder, *, resolution=32, flip=False) -> Dataset:
    records, _ = find_images(folder)
    plan_dataset(records, resolution=resolution, buckets=False)
    return Dataset(records, flip=flip)


def _encode(system, folder, **kw) -> tuple[Dataset, KohyaLatentFiles]:
    dataset, disk = _dataset(folder, **kw), KohyaLatentFiles(system)
    encode_buckets(dataset, system.encode_images, latents_of=disk)
    return dataset, disk


def _kohya_crop_ltrb(bucket_reso, image_size):
    """Transcription of kohya's BucketManager.get_crop_ltrb (library/train_util.py): (W, H) arguments."""
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        resized_width, resized_height = bucket_reso[1] * image_ar, bucket_reso[1]
    else:
        resized_width, resized_height = bucket_reso[0], bucket_reso[0] / image_ar
    crop_left = (bucket_reso[0] - resized_width) // 2
    crop_top = (bucket_reso[1] - resized_height) // 2
    return crop_left, crop_top, crop_left + resized_width, crop_top + resized_height


def _kohya_save(npz_path, latents, original_size, crop_ltrb, flipped=None):
    """Transcription of kohya's LatentsCachingStrategy.save_latents_to_disk (library/strategy_base.py), SD keys."""
    kwargs = {"latents": latents.float().cpu().numpy(), "original_size": np.array(original_size),
              "crop_ltrb": np.array(crop_ltrb)}
    if flipped is not None:
        kwargs["latents_flipped"] = flipped.float().cpu().numpy()
    np.savez(npz_path, **kwargs)


def test_files_are_kohyas_and_read_back_to_the_same_bits(system, tmp_path):
    folder = _images(tmp_path / "imgs")
    first, disk = _encode(system, folder, flip=True)
    assert (disk.read, disk.encoded) == (0, 2)
    # kohya's names: the image file's own size, W x H, four digits each
    assert sorted(p.name for p in folder.glob("*.npz")) == ["img0_0048x0032_sd.npz", "img1_0032x0032_sd.npz"]
    records = {r.path.name: r for r in first.records}
    for name, (h, w) in zip(("img0", "img1"), SIZES):
        with np.load(folder / f"{name}_{w:04d}x{h:04d}_sd.npz", allow_pickle=False) as npz:
            assert set(npz.files) == {"latents", "original_size", "crop_ltrb", "latents_flipped", "sdadapt"}
            assert npz["latents"].dtype == np.float32 and npz["latents"].shape == system.latent_shape(32, 32)  # (C, 32/f, 32/f)
            assert npz["original_size"].tolist() == [w, h]
            assert npz["crop_ltrb"].tolist() == list(_kohya_crop_ltrb((32, 32), (w, h)))
            # unscaled: the VAE's posterior mean of the training crop (kohya scales at each step)
            from sdadapt.training.data import _load
            pixels = _load(records[f"{name}.png"])[None]
            with torch.no_grad():
                mean = system.vae.encode(pixels).latent_dist.mean[0]
                mirrored = system.vae.encode(pixels.flip(3)).latent_dist.mean[0]
            torch.testing.assert_close(torch.from_numpy(npz["latents"]), mean, rtol=0, atol=1e-6)
            torch.testing.assert_close(torch.from_numpy(npz["latents_flipped"]), mirrored, rtol=0, atol=1e-6)
    second, disk = _encode(system, folder, flip=True)
    assert (disk.read, disk.encoded, disk.rewritten) == (2, 0, [])
    uncached = _dataset(folder, flip=True)
    encode_buckets(uncached, system.encode_images)  # (the in-memory path: encode_images)
    for bucket in first.latents:
        assert torch.equal(first.latents[bucket], second.latents[bucket])
        assert torch.equal(first.latents_flipped[bucket], second.latents_flipped[bucket])
        assert torch.equal(uncached.latents[bucket], second.latents[bucket])
        assert torch.equal(uncached.latents_flipped[bucket], second.latents_flipped[bucket])


@pytest.mark.parametrize("old_layout", [False, True], ids=["sd-npz", "old-stem-npz"])
def test_a_file_kohya_wrote_is_read_with_its_values(system, tmp_path, old_layout):
    folder = _images(tmp_path / "imgs")
    g = torch.Generator().manual_seed(3)
    written = {}
    for name, (h, w) in zip(("img0", "img1"), SIZES):
        values = torch.randn(*system.latent_shape(32, 32), generator=g)  # (a posterior sample, as kohya writes: any values)
        path = folder / (f"{name}.npz" if old_layout else f"{name}_{w:04d}x{h:04d}_sd.npz")
        _kohya_save(path, values, (w, h), _kohya_crop_ltrb((32, 32), (w, h)))
        written[name] = values
    dataset, disk = _encode(system, folder)
    assert (disk.read, disk.encoded) == (2, 0)
    got = {dataset.records[i].path.stem: dataset.latents[b][k]
           for b, members in dataset.members.items() for k, i in enumerate(members)}
    for name, values in written.items():  # × the VAE's scaling factor, as kohya's training step
        assert torch.equal(got[name], values * system.scaling_factor)
    assert not list(folder.glob("*_sd.npz")) or not old_layout  # (the old file is the one kohya reads: kept)


def test_a_wrong_size_or_incomplete_or_broken_entry_is_encoded_again(system, tmp_path):
    folder = _images(tmp_path / "imgs")
    fresh, _ = _encode(system, folder / ".." / "imgs")  # the right entries (written beside the images)
    bad0 = folder / "img0_0048x0032_sd.npz"
    bad1 = folder / "img1_0032x0032_sd.npz"
    _kohya_save(bad0, torch.ones(4, 2, 2), (48, 32), (0, 0, 16, 16))  # another resolution's latents
    bad1.write_bytes(bad1.read_bytes()[:100])  # cut short (an interrupted write)
    again, disk = _encode(system, folder)
    assert (disk.read, disk.encoded) == (0, 2)
    reasons = {p.name: why for p, why in disk.rewritten}
    assert str(tuple(torch.ones(4, 2, 2).shape)) in reasons["img0_0048x0032_sd.npz"] and "unreadable" in reasons["img1_0032x0032_sd.npz"]
    assert any("img0_0048x0032_sd.npz" in line and "rewritten" in line for line in disk.report())
    for bucket in fresh.latents:
        assert torch.equal(fresh.latents[bucket], again.latents[bucket])
    with np.load(bad0, allow_pickle=False) as npz:
        assert npz["latents"].shape == system.latent_shape(32, 32)
    # flip_aug needs latents_flipped: the files written without it are encoded again, with it
    _, disk = _encode(system, folder, flip=True)
    assert disk.encoded == 2 and all("latents_flipped" in why for _, why in disk.rewritten)
    # another resolution: every entry is the wrong size
    _, disk = _encode(system, folder, resolution=16)
    assert disk.encoded == 2 and all(str(system.latent_shape(32, 32)) in why for _, why in disk.rewritten)


def test_train_reads_the_files_it_wrote_and_trains_the_same_bits(pipe, tmp_path, capsys):
    from safetensors.torch import load_file

    folder = _images(tmp_path / "imgs")
    base = ["train", "lora", "--images", str(folder), "--model", str(pipe), "--steps", "2", "--resolution", "32",
            "--no-bucket"]
    outs = []
    for i, extra in enumerate([[], ["--cache-latents-to-disk"], ["--cache-latents-to-disk"]]):
        outs.append(tmp_path / f"o{i}.safetensors")
        code = main([*base, *extra, "-o", str(outs[-1])])
        err = capsys.readouterr().err
        assert code == 0, err
        if i == 1:
            assert "0 image(s)' latents read from their .npz files, 2 encoded" in err
        if i == 2:
            assert "2 image(s)' latents read from their .npz files, 0 encoded" in err
    assert len(list(folder.glob("*_sd.npz"))) == 2
    a, b, c = (load_file(str(o)) for o in outs)
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(b[k], c[k]) for k in a)  # encoded now / read back: the same bits
    # without the option: the same latent values (test above), held channels-last as the CPU VAE gives them, so
    # the steps' kernels may round the last bits differently (Adam's first steps then move near-zero gradients' weights
    # by ±lr): the losses agree
    losses = [[float(line.split(",")[2]) for line in o.with_name(o.stem + "-log.csv").read_text().splitlines()[1:]]
              for o in outs]
    assert losses[1] == losses[2] and losses[0] == pytest.approx(losses[1], rel=1e-5)


@pytest.mark.parametrize("extra", [["--random-crop"], ["--color-aug"]])
def test_pixel_augmentations_are_refused_with_it(tmp_path, capsys, extra):
    folder = _images(tmp_path / "imgs")
    code = main(["train", "lora", "--images", str(folder), "--steps", "1", "--cache-latents-to-disk", *extra,
                 "-o", str(tmp_path / "o.safetensors")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "--cache-latents-to-disk" in last and extra[0] in last, last


def test_a_kohya_toml_turns_it_on_and_refuses_random_crop_with_it(tmp_path, capsys):
    from train_inputs import captioned_pngs, toy_kohya_toml

    images = captioned_pngs(tmp_path / "imgs", [(32, 32), (32, 48)])
    main(["train", "lora", "--config", str(toy_kohya_toml(tmp_path, images, {"cache_latents_to_disk": True})),
          "--no-prior"])
    err = capsys.readouterr().err
    assert "0 image(s)' latents read from their .npz files, 2 encoded" in err, err
    assert sorted(p.name for p in images.glob("*.npz")) == ["0_0032x0032_sd.npz", "1_0048x0032_sd.npz"]
    code = main(["train", "lora", "--config", str(toy_kohya_toml(tmp_path, images, {
        "cache_latents_to_disk": True, "random_crop": True})), "--no-prior"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "--cache-latents-to-disk" in last and "--random-crop" in last, last
