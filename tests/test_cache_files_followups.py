"""kohya cache files: one file, one image (``--cache-latents-to-disk``, ``--cache-text-encoder-outputs-to-disk``).

kohya's names drop the image's extension (sd-scripts@48d368fa library/strategy_sd.py:152-157 ``get_latents_npz_path``:
``<stem>_<W>x<H>_sd.npz``, or an old ``<stem>.npz`` when it exists; library/strategy_sdxl.py:235-236
``get_outputs_npz_path``: ``<stem>_te_outputs.npz``), and ``glob_images`` (library/train_util.py:2847-2856) lists
``a.png`` and ``a.jpg`` both, so two images can map to one file; kohya checks nothing (the second image trains on the
first's file or overwrites it). sdadapt refuses such a run before anything is encoded, naming both images and the
file. The same image listed twice is one image (kohya keys its images by path, train_util.py:983-985) and one file,
accepted when both uses need the same content (same bucket / same caption); one image needing two contents of its
one file (two buckets, two captions) is refused too.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sdadapt.images import write_png
from sdadapt.training import kohya_latent_files, kohya_text_files
from sdadapt.training.data import Dataset, encode_buckets, find_images, plan_dataset
from sdadapt.training.kohya_latent_files import KohyaLatentFiles, claim_files
from sdadapt.training.kohya_text_files import KohyaTextFiles
from sdadapt.training.text_cache import cache_text_conditions


def _jpg(path: Path, height: int, width: int, seed: int = 1) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(pixels).save(path, quality=95)
    return path


def _folder(folder: Path, *, jpg_size: tuple[int, int] = (32, 32), extra: bool = True) -> Path:
    """``a.png`` (32x32), ``a.jpg`` (``jpg_size``) and, with ``extra``, ``b.png``; captioned."""
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    write_png(folder / "a.png", torch.rand(3, 32, 32, generator=g) * 2 - 1)
    _jpg(folder / "a.jpg", *jpg_size)
    if extra:
        write_png(folder / "b.png", torch.rand(3, 32, 32, generator=g) * 2 - 1)
    for stem in ("a", "b"):
        (folder / f"{stem}.txt").write_text(f"a photo of {stem}")
    return folder


def _records(folder: Path, resolution: int = 32):
    records, _ = find_images(folder, default_caption="a photo")
    plan_dataset(records, resolution=resolution, buckets=False)
    return records


class _Encodes:
    """Counts the images a system's encoder is run on."""

    def __init__(self, system):
        self.images, self.system = 0, system
        self.real = system.encode_images

    def __call__(self, pixels):
        self.images += pixels.shape[0]
        return self.real(pixels)


@pytest.fixture(scope="module")
def toy():
    from sdadapt.toy import load_toy

    return load_toy()


# ------------------------------------------------------------------ latent files
def test_two_images_one_latent_file_are_refused_before_any_encode(toy, tmp_path, monkeypatch):
    folder = _folder(tmp_path / "imgs")
    dataset = Dataset(_records(folder), flip=True)
    encodes = _Encodes(toy)
    monkeypatch.setattr(toy, "encode_images", encodes)
    disk = KohyaLatentFiles(toy)
    with pytest.raises(ValueError) as info:
        encode_buckets(dataset, toy.encode_images, latents_of=disk)
    message = str(info.value)
    for name in ("a.png", "a.jpg", "a_0032x0032_sd.npz", "--cache-latents-to-disk", "rename one"):
        assert name in message, message
    assert encodes.images == 0 and not list(folder.glob("*.npz"))
    # share_out (data parallel or not) and claim refuse as well, before anything is encoded
    with pytest.raises(ValueError, match="a_0032x0032_sd.npz"):
        KohyaLatentFiles(toy).share_out(dataset.records, flip=True, group=None)
    assert encodes.images == 0 and not list(folder.glob("*.npz"))


def test_an_old_npz_joins_images_of_other_sizes(toy, tmp_path):
    """With kohya's old ``<stem>.npz`` there both images read and write it, whatever their sizes."""
    folder = _folder(tmp_path / "imgs", jpg_size=(48, 32), extra=False)
    records = _records(folder)
    names = {kohya_latent_files.npz_path_for(r.path, size=r.size).name for r in records}
    assert names == {"a_0032x0032_sd.npz", "a_0032x0048_sd.npz"}  # (two sizes: two files, accepted)
    KohyaLatentFiles(toy).claim(records)
    (folder / "a.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"a\.npz"):
        KohyaLatentFiles(toy).claim(records)


def test_the_same_image_twice_is_one_file_written_once(toy, tmp_path, monkeypatch):
    """An image listed twice (two subsets of one folder) needs one file: accepted, written once, and both entries
    train on the latents of one process encoding the folder once."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for stem in ("a", "b"):
        write_png(folder / f"{stem}.png", torch.rand(3, 32, 32, generator=g) * 2 - 1)
    records = _records(folder)
    twice = [*records, *(dataclasses.replace(r, caption="another subset") for r in records)]
    writes = []
    real = kohya_latent_files.write_npz_latents
    monkeypatch.setattr(kohya_latent_files, "write_npz_latents", lambda path, *a, **k: writes.append(Path(path).name)
                        or real(path, *a, **k))
    disk = KohyaLatentFiles(toy)
    dataset = Dataset(twice)
    encode_buckets(dataset, toy.encode_images, latents_of=disk)
    assert sorted(writes) == ["a_0032x0032_sd.npz", "b_0032x0032_sd.npz"]  # (the first batch had both once)
    alone = Dataset(list(records))
    encode_buckets(alone, toy.encode_images)
    (bucket,) = alone.latents
    assert torch.equal(dataset.latents[bucket], torch.cat([alone.latents[bucket]] * 2))
    # a same path given another way (./, a symlinked folder) is the same image
    os.symlink(folder, tmp_path / "link")
    other = [dataclasses.replace(r, path=tmp_path / "link" / "." / r.path.name) for r in records]
    disk.claim(other)


def test_one_image_at_two_buckets_is_refused(toy, tmp_path):
    """One file keeps one size of latents: an image in two datasets of other resolutions cannot share it."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_png(folder / "a.png", torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    small, large = _records(folder, 32), _records(folder, 64)
    disk = KohyaLatentFiles(toy)
    disk.claim(small)
    with pytest.raises(ValueError) as info:
        disk.claim(large)
    message = str(info.value)
    assert "a.png is used at 32x32" in message and "at 64x64" in message and "a_0064x0064_sd.npz" in message, message


def test_claims_across_calls_training_then_class_images(toy, tmp_path):
    """The training images' files are claimed first; a class image (another call) mapping to one is refused."""
    train = tmp_path / "train"
    train.mkdir()
    write_png(train / "a.png", torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    _jpg(train / "a.jpg", 32, 32)
    only_png = [r for r in _records(train) if r.path.suffix == ".png"]
    only_jpg = [r for r in _records(train) if r.path.suffix == ".jpg"]
    disk = KohyaLatentFiles(toy)
    disk.claim(only_png)
    disk.claim(only_png)  # (again: the same image, the same need)
    with pytest.raises(ValueError, match=r"a\.png and .*a\.jpg would keep their latents in one file"):
        disk.claim(only_jpg)


def test_claim_files_compares_real_paths(tmp_path):
    taken: dict = {}
    a = tmp_path / "a.png"
    claim_files(taken, [(a, tmp_path / "a.npz", 1, "x"), (tmp_path / "." / "a.png", tmp_path / "sub" / ".." / "a.npz", 1,
                                                            "x")], option="--o", what="w")
    assert len(taken) == 1
    with pytest.raises(ValueError, match=r"--o: .*a\.png is used x and y, but its one file .*a\.npz"):
        claim_files(taken, [(a, tmp_path / "a.npz", 2, "y")], option="--o", what="w")


# ------------------------------------------------------------------ text-encoder output files
@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from tiny_systems import tiny_diffusers_system

    return tiny_diffusers_system(tmp_path_factory.mktemp("te_clash"), sdxl=True, max_token_length=75)


def _encode(system, calls):
    def encode(texts):
        calls.append(list(texts))
        return cache_text_conditions(system, texts, batch=4, per_image_sizes=True)

    return encode


def test_two_images_one_text_file_are_refused_before_any_encode(sdxl, tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    entries = [(folder / "a.png", "ab cd"), (folder / "b.png", "kl"), (folder / "a.jpg", "ef gh")]
    calls: list = []
    files = KohyaTextFiles(sdxl)
    with pytest.raises(ValueError) as info:
        files(_encode(sdxl, calls), entries, ["ab cd", "kl", "ef gh"])
    message = str(info.value)
    for name in ("a.png", "a.jpg", "a_te_outputs.npz", "--cache-text-encoder-outputs-to-disk", "rename one"):
        assert name in message, message
    assert calls == [] and not list(folder.glob("*.npz"))
    with pytest.raises(ValueError, match="a_te_outputs.npz"):
        files.check_images(image for image, _ in entries)
    files.check_images([folder / "a.png", folder / "b.png", folder / "a.png"])  # (the same image twice: one file)


def test_the_same_image_twice_with_one_caption_is_one_file(sdxl, tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    folder.mkdir()
    writes = []
    real = kohya_text_files.write_npz_text_outputs
    monkeypatch.setattr(kohya_text_files, "write_npz_text_outputs",
                        lambda path, *a, **k: writes.append(Path(path).name) or real(path, *a, **k))
    entries = [(folder / "a.png", "ab cd"), (folder / "b.png", "kl"), (folder / "a.png", "ab cd")]
    calls: list = []
    files = KohyaTextFiles(sdxl)
    cache = files(_encode(sdxl, calls), entries, ["ab cd", "kl"])
    assert sorted(writes) == ["a_te_outputs.npz", "b_te_outputs.npz"] and files.encoded == 2 and files.read == 0
    want = cache_text_conditions(sdxl, ["ab cd", "kl"], batch=4, per_image_sizes=True)
    assert all(torch.equal(cache.values[k], want.values[k]) for k in want.values)
    again = KohyaTextFiles(sdxl)
    again(_encode(sdxl, calls), entries, ["ab cd", "kl"])
    assert (again.read, again.encoded, again.rewritten) == (2, 0, [])


def test_one_image_with_two_captions_is_refused(sdxl, tmp_path):
    """The image in two subsets of other caption options: its one file can keep one caption's outputs (kohya keys the
    image by path and keeps one of its captions); refused before the encoders run."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    calls: list = []
    with pytest.raises(ValueError) as info:
        KohyaTextFiles(sdxl)(_encode(sdxl, calls), [(folder / "a.png", "sks ab"), (folder / "a.png", "ab")],
                             ["sks ab", "ab"])
    message = str(info.value)
    assert "with the caption 'sks ab' and with the caption 'ab'" in message and "a_te_outputs.npz" in message, message
    assert calls == [] and not list(folder.glob("*.npz"))


# ------------------------------------------------------------------ the train command
def test_train_refuses_a_latent_file_clash_before_encoding(tmp_path, capsys):
    from sdadapt.cli import main

    folder = _folder(tmp_path / "imgs")
    code = main(["train", "lora", "--model", "toy", "--images", str(folder), "--steps", "1", "--batch-size", "1",
                 "--cache-latents-to-disk", "-o", str(tmp_path / "o.safetensors")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "a.png" in last and "a.jpg" in last and "a_0032x0032_sd.npz" in last, last
    assert not list(folder.glob("*.npz"))


def test_train_refuses_a_clash_between_training_and_held_out_images_before_encoding(tmp_path, capsys):
    """``a.png`` trains and ``a.jpg`` is held out for the validation loss (another encode than the training images'):
    refused before the training images are encoded."""
    from sdadapt.cli import main
    from sdadapt.training.validation import split_for_validation

    folder = _folder(tmp_path / "imgs")
    write_png(folder / "c.png", torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1)
    (folder / "c.txt").write_text("a photo of c")
    names = sorted(str(p) for p in folder.glob("*.[pj][np]g"))
    pair = {str(folder / "a.png"), str(folder / "a.jpg")}
    seed = next(s for s in range(100)  # (a seed holding out one of the two: find_images' paths, the job's split)
                if len(pair & set(split_for_validation(names, split=0.5, seed=s)[1])) == 1)
    code = main(["train", "lora", "--model", "toy", "--images", str(folder), "--steps", "1", "--batch-size", "1",
                 "--validation-split", "0.5", "--validation-seed", str(seed), "--cache-latents-to-disk",
                 "-o", str(tmp_path / "o.safetensors")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "a.png" in last and "a.jpg" in last and "a_0032x0032_sd.npz" in last, last
    assert not list(folder.glob("*.npz"))


def test_train_refuses_a_text_file_clash_before_any_encode(tmp_path, capsys):
    """An SDXL run caching both to disk: the text files' clash (a.jpg's image size differs: no latent clash) is
    refused before the VAE encodes anything."""
    from tiny_checkpoints import tiny_sdxl_file

    from sdadapt.cli import main

    folder = _folder(tmp_path / "imgs", jpg_size=(32, 48))
    model = tiny_sdxl_file(tmp_path / "sdxl.safetensors")
    code = main(["train", "lora", "--model", str(model), "--images", str(folder), "--resolution", "16",
                 "--steps", "1", "--batch-size", "1", "--no-text-encoder", "--cache-latents-to-disk",
                 "--cache-text-encoder-outputs-to-disk", "-o", str(tmp_path / "o.safetensors")])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and "a_te_outputs.npz" in last and "a.png" in last and "a.jpg" in last, last
    assert not list(folder.glob("*.npz"))


def test_kohya_files_read_back_after_the_refusal_is_fixed(tmp_path, capsys):
    """Renaming one image (as the message says) makes the run go through, with one file per image."""
    from sdadapt.cli import main

    folder = _folder(tmp_path / "imgs")
    (folder / "a.jpg").rename(folder / "a2.jpg")
    (folder / "a2.txt").write_text("a photo of a2")
    assert main(["train", "lora", "--model", "toy", "--images", str(folder), "--steps", "1", "--batch-size", "1",
                 "--cache-latents-to-disk", "-o", str(tmp_path / "o.safetensors")]) == 0, capsys.readouterr().err
    names = sorted(p.name for p in folder.glob("*.npz"))
    assert names == ["a2_0032x0032_sd.npz", "a_0032x0032_sd.npz", "b_0032x0032_sd.npz"]
    with np.load(folder / "a2_0032x0032_sd.npz") as npz:
        assert json.dumps(npz["original_size"].tolist()) == "[32, 32]"


# ------------------------------------------------------------------ the pixel-changing flags (one list, two uses)
@pytest.mark.parametrize("options, named", [
    ({"random_crop": True}, "--random-crop"),
    ({"color_aug": True}, "--color-aug"),
    ({"face_crop_aug_range": (0.4, 0.6)}, "--face-crop-aug-range"),
    ({"resize_aug": True}, "--resize-aug"),
    ({"random_crop": True, "color_aug": True, "face_crop_aug_range": (0.4, 0.6), "resize_aug": True},
     "--random-crop and --color-aug and --face-crop-aug-range and --resize-aug"),
])
def test_cache_latents_to_disk_names_each_pixel_changing_flag(options, named):
    from sdadapt.jobs.train import TrainOptions

    with pytest.raises(ValueError, match=f"--cache-latents-to-disk keeps each image's latents in a file, but {named} "
                                         "change the pixels"):
        TrainOptions(images="x", cache_latents_to_disk=True, **options)


def test_the_run_names_the_flags_its_augmentation_uses(tmp_path, capsys):
    """Without the cache: the run says which flags keep it from caching; ``--face-crop-aug-range`` only when the run
    crops faces (the augmentation's range, not the option: bucketing leaves it unused)."""
    from sdadapt.cli import main
    from sdadapt.jobs.train import TrainOptions, _pixel_changing_flags

    given = TrainOptions(images="x", face_crop_aug_range=(0.4, 0.6), resize_aug=True)
    assert _pixel_changing_flags(given, face_crop=False) == ["--resize-aug"]
    assert _pixel_changing_flags(given, face_crop=True) == ["--face-crop-aug-range", "--resize-aug"]
    folder = tmp_path / "imgs"
    folder.mkdir()
    write_png(folder / "a.png", torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    (folder / "a.txt").write_text("a photo of <sks>")
    assert main(["train", "custom-diffusion", "--model", "toy", "--images", str(folder), "--steps", "1",
                 "--batch-size", "1", "--resize-aug", "--token", "<sks>", "-o", str(tmp_path / "o.safetensors")]) == 0, capsys.readouterr().err
    assert "--resize-aug: the pixels change at every use, so nothing is cached" in capsys.readouterr().err
