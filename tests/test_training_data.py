"""Training data: kohya folder layout, captions, aspect-ratio buckets, epoch batches."""

from __future__ import annotations

import random

import pytest
import torch

from sdadapt.images import ImageFolderError, write_png
from sdadapt.training.data import (
    EMPTIES_DROPPED,
    CaptionOptions,
    Dataset,
    bucket_sizes,
    encode_buckets,
    epoch_batches,
    find_images,
    image_size,
    plan_dataset,
)


def _png(path, h, w, seed=0):
    write_png(path, torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1)
    return path


def test_bucket_sizes_are_kohyas():
    sizes = bucket_sizes(512, step=64, min_size=256, max_size=1024)
    assert (512, 512) in sizes and (384, 640) in sizes and (640, 384) in sizes
    assert all(h * w <= 512 * 512 and h % 64 == 0 and w % 64 == 0 for h, w in sizes)
    assert all(256 <= min(s) and max(s) <= 1024 for s in sizes)
    with pytest.raises(ValueError, match="multiple"):
        bucket_sizes(500, step=64)


def test_each_image_goes_to_its_nearest_aspect_bucket_and_says_so(tmp_path):
    for name, (h, w) in {"wide": (300, 600), "tall": (700, 350), "square": (512, 512), "small": (100, 120)}.items():
        _png(tmp_path / f"{name}.png", h, w)
    records, _ = find_images(tmp_path, default_caption="a photo")
    assert {r.path.name: r.size for r in records}["wide.png"] == (300, 600)
    plan_dataset(records, resolution=512, step=64)
    by_name = {r.path.name: r for r in records}
    wide, tall = by_name["wide.png"], by_name["tall.png"]
    assert wide.bucket[1] > wide.bucket[0] and tall.bucket[0] > tall.bucket[1]
    for r in records:  # scaled to cover the bucket, the crop inside the scaled image
        assert r.resized[0] >= r.bucket[0] and r.resized[1] >= r.bucket[1]
        assert 0 <= r.crop[0] <= r.resized[0] - r.bucket[0] and 0 <= r.crop[1] <= r.resized[1] - r.bucket[1]
        assert "-> bucket" in r.note
    assert "scaled up" in by_name["small.png"].note
    plan_dataset(records, resolution=512, step=64, no_upscale=True)
    # kohya's bucket_no_upscale: cropped at its own size, unscaled (tests/test_bucket_reference.py)
    assert by_name["small.png"].bucket == (64, 64) and "kept, cropped" in by_name["small.png"].note
    plan_dataset(records, resolution=256, buckets=False)
    assert {r.bucket for r in records} == {(256, 256)}


def test_kohya_repeat_folders_captions_and_reports(tmp_path):
    _png(tmp_path / "a.png", 32, 32)
    (tmp_path / "a.txt").write_text("  red circle,  photo \n")
    (tmp_path / "10_sks dog").mkdir()
    _png(tmp_path / "10_sks dog" / "b.png", 32, 48)
    (tmp_path / "misc").mkdir()
    records, notes = find_images(tmp_path)
    by_name = {r.path.name: r for r in records}
    assert by_name["a.png"].caption == "red circle,  photo" and by_name["a.png"].repeats == 1
    assert by_name["b.png"].caption == "sks dog" and by_name["b.png"].repeats == 10  # kohya class tokens
    assert any("misc" in n for n in notes)
    dataset = Dataset(records)
    plan_dataset(records, resolution=32, step=8)
    assert dataset.samples_per_epoch == 11
    assert dataset.dataset_dirs() == {".": {"n_repeats": 1, "img_count": 1}, "10_sks dog": {"n_repeats": 10, "img_count": 1}}
    assert dataset.tag_frequency()["."] == {"red circle": 1, "photo": 1}
    assert any(line.startswith("10_sks dog/b.png") and "(x10)" in line for line in dataset.report())
    (tmp_path / "c.png").write_bytes(b"junk")
    with pytest.raises(ImageFolderError, match="c.png"):
        image_size(tmp_path / "c.png")


def test_a_caption_file_is_its_first_line_as_kohya_reads_it(tmp_path):
    """kohya's ``read_caption``: ``lines[0].strip()`` unless ``enable_wildcard`` (then every non-empty
    line, one drawn at each use). A tagger's notes or a second caption below the first are not trained."""
    for name in ("a", "b", "c"):
        _png(tmp_path / f"{name}.png", 16, 16)
    (tmp_path / "a.txt").write_text("1girl,  red hair\nsecond caption\n\nnotes: reviewed\n")
    (tmp_path / "b.txt").write_text("one line, no newline")
    (tmp_path / "c.txt").write_text("\nbelow an empty first line\n")
    records, notes = find_images(tmp_path, default_caption="fallback")
    # (kohya's read_caption returns "" for c: the image trains on the empty caption, not on the fallback)
    assert {r.path.name: r.caption for r in records} == {
        "a.png": "1girl,  red hair", "b.png": "one line, no newline", "c.png": ""}
    assert any("1 image(s) have a caption file with an empty caption (c.png): they train on the empty caption" in n
               for n in notes)
    legacy, _ = find_images(tmp_path, default_caption="fallback", empties=EMPTIES_DROPPED)  # (runs recorded before)
    assert {r.path.name: r.caption for r in legacy}["c.png"] == "fallback"
    records, _ = find_images(tmp_path, default_caption="fallback", multiline=True)
    assert {r.path.name: r.caption for r in records}["a.png"] == "1girl,  red hair\nsecond caption\nnotes: reviewed"


def test_the_first_line_ends_only_at_a_newline_as_kohyas_readlines(tmp_path):
    import io

    text = "red\u2028ball, blue\x0cgreen\nsecond line\n"
    write_png(tmp_path / "a.png", torch.zeros(3, 8, 8))
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    kohya = io.StringIO(text, newline=None).readlines()[0].strip()  # (open(..., "rt").readlines(), as kohya)
    assert kohya == "red\u2028ball, blue\x0cgreen"
    assert find_images(tmp_path)[0][0].caption == kohya


def test_missing_captions_and_empty_prompt_are_errors(tmp_path):
    _png(tmp_path / "x.png", 16, 16)
    with pytest.raises(ImageFolderError, match="no caption file"):
        find_images(tmp_path)
    with pytest.raises(ValueError, match="empty"):
        find_images(tmp_path, default_caption="  ")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="no images"):
        find_images(tmp_path / "empty")
    with pytest.raises(ImageFolderError, match="not a folder"):
        find_images(tmp_path / "nothing")
    # a caller that fills captions in itself (trigger-word templates) gets "" for the uncaptioned image
    (tmp_path / "y.png").write_bytes((tmp_path / "x.png").read_bytes())
    (tmp_path / "y.txt").write_text("a photo")
    records, _ = find_images(tmp_path, uncaptioned=True)
    assert [(r.path.name, r.caption) for r in records] == [("x.png", ""), ("y.png", "a photo")]


def test_caption_options_keep_shuffle_drop():
    caption = "sks, red, circle, photo, big"
    rng = random.Random(0)
    keep = CaptionOptions(shuffle=True, keep_tokens=1)
    drawn = {keep.apply(caption, rng) for _ in range(30)}
    assert len(drawn) > 1 and all(d.startswith("sks, ") and sorted(d.split(", ")) == sorted(caption.split(", ")) for d in drawn)
    assert CaptionOptions(dropout=1.0).apply(caption, rng) == ""
    tags = CaptionOptions(tag_dropout=1.0, keep_tokens=2).apply(caption, rng)
    assert tags == "sks, red"
    assert CaptionOptions().apply(caption, rng) == caption  # off: untouched
    a, b = random.Random(5), random.Random(5)
    assert keep.apply(caption, a) == keep.apply(caption, b)  # reproducible from the rng
    with pytest.raises(ValueError, match="probability"):
        CaptionOptions(dropout=2)


def test_epoch_batches_come_from_one_bucket_and_cover_every_repeat(tmp_path):
    for i, (h, w) in enumerate([(32, 64), (32, 64), (64, 32), (48, 48), (48, 48), (48, 48)]):
        _png(tmp_path / f"{i}.png", h, w, seed=i)
    (tmp_path / "3_more").mkdir()
    _png(tmp_path / "3_more" / "m.png", 32, 64, seed=9)
    records, _ = find_images(tmp_path, default_caption="x")
    plan_dataset(records, resolution=48, step=8)
    dataset = Dataset(records)
    encode_buckets(dataset, lambda x: torch.nn.functional.avg_pool2d(x, 2), batch=2)
    assert sum(len(v) for v in dataset.latents.values()) == len(records)
    for bucket, latents in dataset.latents.items():
        assert latents.shape[-2:] == (bucket[0] // 2, bucket[1] // 2)
    batches = epoch_batches(dataset, 2, seed=0, epoch=0)
    assert len(batches) == dataset.batches_per_epoch(2)
    seen = []
    for bucket, positions in batches:
        assert 1 <= len(positions) <= 2
        seen += [dataset.members[bucket][p] for p in positions]
    assert sorted(seen) == sorted(i for i, r in enumerate(records) for _ in range(r.repeats))
    assert epoch_batches(dataset, 2, seed=0, epoch=0) == batches != epoch_batches(dataset, 2, seed=0, epoch=1)
