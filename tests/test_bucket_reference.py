"""Aspect-ratio buckets and SDXL size conditioning against kohya sd-scripts and diffusers, integer for integer.

References (transcribed below, never imported):
- kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb
  library/model_util.py:1316-1344 ``make_bucket_resolutions``;
  library/train_util.py:216-366 ``BucketManager`` (``round_to_steps`` 282, ``select_bucket`` 286-346,
  ``get_crop_ltrb`` 349-366), 747-773 ``adjust_min_max_bucket_reso_by_steps``, 1014-1052 ``make_buckets``
  (without buckets: one predefined bucket, the resolution), 2965-2993 ``trim_and_resize_if_required`` (centre
  trim ``trim_size // 2``), 1686-1693 the SDXL ``original_sizes_hw`` / ``crop_top_lefts`` / ``target_sizes_hw``;
  library/sdxl_train_util.py:211-216 ``get_size_embeddings`` (orig, crop, target: each (h, w)).
- huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951
  examples/text_to_image/train_text_to_image_sdxl.py:881-908 ``preprocess_train`` (resize, flip, then crop:
  ``crop_top_left = (y1, x1)`` in the flipped resized image), 1107-1112 ``compute_time_ids``
  (``original_size + crops_coords_top_left + target_size``).
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from sdadapt.training.data import (
    BUCKETS_BEFORE,
    BUCKETS_KOHYA,
    Dataset,
    ImageRecord,
    bucket_sizes,
    plan_dataset,
    size_conditioning,
)

# ---- kohya, transcribed (sizes are (width, height) there) -------------------------------------------------


def kohya_make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64):
    # sd-scripts@48d368fa library/model_util.py:1316-1344
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    resos = list(resos)
    resos.sort()
    return resos


class KohyaBucketManager:
    """sd-scripts@48d368fa library/train_util.py:216-346 (``select_bucket`` and what it needs)."""

    def __init__(self, no_upscale, max_reso, min_size, max_size, reso_steps, predefined=None):
        self.no_upscale = no_upscale
        self.max_area = max_reso[0] * max_reso[1]
        self.reso_steps = reso_steps
        if predefined is None and not no_upscale:
            predefined = kohya_make_bucket_resolutions(max_reso, min_size, max_size, reso_steps)
        if predefined is not None:
            self.predefined_resos = predefined.copy()
            self.predefined_resos_set = set(predefined)
            self.predefined_aspect_ratios = np.array([w / h for w, h in predefined])

    def round_to_steps(self, x):
        x = int(x + 0.5)
        return x - x % self.reso_steps

    def select_bucket(self, image_width, image_height):
        aspect_ratio = image_width / image_height
        if not self.no_upscale:
            reso = (image_width, image_height)
            if reso in self.predefined_resos_set:
                pass
            else:
                ar_errors = self.predefined_aspect_ratios - aspect_ratio
                predefined_bucket_id = np.abs(ar_errors).argmin()
                reso = self.predefined_resos[predefined_bucket_id]
            ar_reso = reso[0] / reso[1]
            if aspect_ratio > ar_reso:
                scale = reso[1] / image_height
            else:
                scale = reso[0] / image_width
            resized_size = (int(image_width * scale + 0.5), int(image_height * scale + 0.5))
        else:
            if image_width * image_height > self.max_area:
                resized_width = math.sqrt(self.max_area * aspect_ratio)
                resized_height = self.max_area / resized_width
                b_width_rounded = self.round_to_steps(resized_width)
                b_height_in_wr = self.round_to_steps(b_width_rounded / aspect_ratio)
                ar_width_rounded = b_width_rounded / b_height_in_wr
                b_height_rounded = self.round_to_steps(resized_height)
                b_width_in_hr = self.round_to_steps(b_height_rounded * aspect_ratio)
                ar_height_rounded = b_width_in_hr / b_height_rounded
                if abs(ar_width_rounded - aspect_ratio) < abs(ar_height_rounded - aspect_ratio):
                    resized_size = (b_width_rounded, int(b_width_rounded / aspect_ratio + 0.5))
                else:
                    resized_size = (int(b_height_rounded * aspect_ratio + 0.5), b_height_rounded)
            else:
                resized_size = (image_width, image_height)
            bucket_width = resized_size[0] - resized_size[0] % self.reso_steps
            bucket_height = resized_size[1] - resized_size[1] % self.reso_steps
            reso = (bucket_width, bucket_height)
        return reso, resized_size


def kohya_adjust_min_max(min_bucket_reso, max_bucket_reso, steps):
    # sd-scripts@48d368fa library/train_util.py:751-764
    if min_bucket_reso % steps != 0:
        min_bucket_reso = min_bucket_reso - min_bucket_reso % steps
    if max_bucket_reso % steps != 0:
        max_bucket_reso = max_bucket_reso + steps - max_bucket_reso % steps
    return min_bucket_reso, max_bucket_reso


def kohya_trim_offsets(reso, resized_size):
    """(top, left) of ``trim_and_resize_if_required``'s centre trim (train_util.py:2976-2985)."""
    left = (resized_size[0] - reso[0]) // 2 if resized_size[0] > reso[0] else 0
    top = (resized_size[1] - reso[1]) // 2 if resized_size[1] > reso[1] else 0
    return top, left


def kohya_plan(size_hw, *, resolution_hw, min_size, max_size, step, no_upscale, buckets=True):
    """kohya's (bucket, resized, crop), each (h, w) / (top, left), for an image of ``size_hw``."""
    max_reso = (resolution_hw[1], resolution_hw[0])
    if buckets:
        low, high = kohya_adjust_min_max(min_size, max_size, step)
        manager = KohyaBucketManager(no_upscale, max_reso, low, high, step)
    else:  # make_buckets without buckets: BucketManager(False, ...) with the one predefined bucket (1047-1051)
        manager = KohyaBucketManager(False, max_reso, None, None, None, predefined=[max_reso])
    reso, resized = manager.select_bucket(size_hw[1], size_hw[0])
    return (reso[1], reso[0]), (resized[1], resized[0]), kohya_trim_offsets(reso, resized)


def sdadapt_plan(size_hw, **kw):
    record = ImageRecord(None, "x", size=size_hw)
    plan_dataset([record], **kw)
    return record.bucket, record.resized, record.crop


def _sizes(seed: int, n: int, low: int = 40, high: int = 3000) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(low, high), rng.randint(low, high)) for _ in range(n)]


# ---- the bucket lists --------------------------------------------------------------------------------------


@pytest.mark.parametrize("resolution_hw, low, high", [
    ((512, 512), 256, 1024), ((768, 768), 256, 1024), ((1024, 1024), 256, 2048), ((1024, 1024), 512, 2048),
    ((512, 768), 256, 1024), ((768, 512), 256, 1024), ((832, 1216), 256, 2048), ((96, 64), 32, 160),
])
def test_the_bucket_list_is_kohyas(resolution_hw, low, high):
    """kohya's defaults (256 / 1024 / 64) and SDXL's usual 2048; a non-square resolution has kohya's square
    bucket of side ⌊√area / step⌋·step (576×576 for 512×768)."""
    step = 32 if resolution_hw == (96, 64) else 64
    kohya = sorted((h, w) for w, h in kohya_make_bucket_resolutions(resolution_hw[::-1], low, high, step))
    assert sorted(bucket_sizes(resolution_hw, step=step, min_size=low, max_size=high)) == kohya
    if resolution_hw == (512, 768):
        assert (576, 576) in kohya


# ---- which bucket, the resize and the crop ------------------------------------------------------------------


@pytest.mark.parametrize("no_upscale", [False, True])
@pytest.mark.parametrize("resolution_hw, low, high, step", [
    ((512, 512), 256, 1024, 64), ((768, 768), 256, 1024, 64), ((1024, 1024), 256, 2048, 64),
    ((512, 768), 256, 1024, 64), ((96, 64), 32, 160, 8), ((1024, 1024), 300, 1000, 64),
])
def test_each_image_takes_kohyas_bucket_resize_and_crop(resolution_hw, low, high, step, no_upscale):
    sizes = _sizes(hash((resolution_hw, low, step)) % 1000, 300) + [
        (1215, 1296),  # at 1024 (256..2048): 16/15, halfway between 1024×1024 and 960×1088: kohya takes its first
        (2984, 2048),  # at 768: 2048 · 640/2048 ... 2984 · 0.3125 = 932.5, rounded half up to 933
        (512, 543), (1161, 2048), (504, 402), (2661, 104), (1677, 1822), (512, 512), (768, 1024),
        (4096, 96)]  # at 512×768 (area 96 · 4096), no upscale: as is, cropped to 4096×64 (kohya: ">" the area)
    for size in sizes:
        kohya = kohya_plan(size, resolution_hw=resolution_hw, min_size=low, max_size=high, step=step,
                           no_upscale=no_upscale)
        if 0 in kohya[0]:  # (kohya fails on a bucket side of 0)
            continue
        assert sdadapt_plan(size, resolution=resolution_hw, step=step, min_size=low, max_size=high,
                            no_upscale=no_upscale) == kohya, size


def test_without_buckets_each_image_is_kohyas_single_bucket_rounded_half_up():
    for size in _sizes(5, 300) + [(1070, 1024)]:  # 1070 · 0.75 = 802.5: kohya 803
        kohya = kohya_plan(size, resolution_hw=(768, 768), min_size=256, max_size=1024, step=64, no_upscale=False,
                           buckets=False)
        assert sdadapt_plan(size, resolution=768, buckets=False) == kohya, size


def test_the_worked_cases():
    """The integers, spelled out (h, w): bucket, resized, crop."""
    assert sdadapt_plan((2984, 2048), resolution=768, min_size=256, max_size=1024) == ((896, 640), (933, 640), (18, 0))
    assert sdadapt_plan((1215, 1296), resolution=1024, min_size=256, max_size=2048)[0] == (1024, 1024)
    assert sdadapt_plan((1070, 1024), resolution=768, buckets=False) == ((768, 768), (803, 768), (17, 0))
    assert sdadapt_plan((600, 600), resolution=(512, 768), min_size=256, max_size=1024)[0] == (576, 576)
    # no upscale: a smaller image is cropped at its own size, unscaled; a larger one goes to about the area first
    assert sdadapt_plan((504, 402), resolution=512, no_upscale=True) == ((448, 384), (504, 402), (28, 9))
    assert sdadapt_plan((1758, 1342), resolution=512, no_upscale=True) == ((448, 384), (503, 384), (27, 0))
    # the limits move onto the step as kohya's (300 -> 256, 1000 -> 1024): every side a multiple of 64
    assert sdadapt_plan((3000, 700), resolution=1024, min_size=300, max_size=1000) == ((1024, 256), (1097, 256), (36, 0))


def test_runs_recorded_before_keep_their_plan():
    """``rule=BUCKETS_BEFORE``: the plan before kohya's rule (Python's round, float32 ties to the lower ratio,
    no square bucket, limits as given, no-upscale scaling a small image down to cover its own bucket)."""
    before = {"rule": BUCKETS_BEFORE}
    assert sdadapt_plan((2984, 2048), resolution=768, min_size=256, max_size=1024, **before)[1] == (932, 640)
    assert sdadapt_plan((1215, 1296), resolution=1024, min_size=256, max_size=2048, **before)[0] == (960, 1088)
    assert sdadapt_plan((1070, 1024), resolution=768, buckets=False, **before)[1] == (802, 768)
    assert sdadapt_plan((600, 600), resolution=(512, 768), min_size=256, max_size=1024, **before)[0] == (640, 576)
    assert sdadapt_plan((504, 402), resolution=512, no_upscale=True, **before) == ((448, 384), (481, 384), (16, 0))
    assert sdadapt_plan((1758, 1342), resolution=512, no_upscale=True, **before)[0] == (576, 448)
    assert sdadapt_plan((1677, 1822), resolution=512, no_upscale=True, **before)[0] == (512, 512)
    assert sdadapt_plan((3000, 700), resolution=1024, min_size=300, max_size=1000, **before)[0][1] == 300
    assert sorted(bucket_sizes((512, 768), min_size=256, max_size=1024, kohya_square=False)) == sorted(
        set(bucket_sizes((512, 768), min_size=256, max_size=1024)) - {(576, 576)})
    with pytest.raises(ValueError, match="bucket rule"):
        plan_dataset([], resolution=512, rule="kohya-2")
    assert BUCKETS_KOHYA == "kohya"


# ---- SDXL's six numbers -------------------------------------------------------------------------------------


def diffusers_crop_top_left(resized_hw, bucket_hw, crop_in_plain, flipped):
    """diffusers' (y1, x1): the window's offset in the (flipped) resized image it is cut from
    (train_text_to_image_sdxl.py:889-900 flips first, then crops). sdadapt picks the window in the plain
    image (``crop_in_plain``); mirrored, the same pixels start at ``W - x1 - w`` of the flipped image."""
    top, left = crop_in_plain
    return (top, resized_hw[1] - left - bucket_hw[1]) if flipped else (top, left)


def test_size_conditioning_is_original_crop_target_in_kohya_and_diffusers_order():
    """``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``: kohya's get_size_embeddings(orig, crop,
    target), each (h, w), and diffusers' original_size + crops_coords_top_left + target_size; the crop the
    window's offset in the scaled (mirrored) image, as diffusers' — for centre, random and mirrored crops."""
    rng = random.Random(3)
    for size in _sizes(4, 60, 100, 2000):
        record = ImageRecord(None, "x", size=size)
        plan_dataset([record], resolution=512, min_size=256, max_size=1024)
        columns = torch.arange(record.resized[1])
        slack_h, slack_w = record.resized[0] - record.bucket[0], record.resized[1] - record.bucket[1]
        for crop in (None, (rng.randint(0, slack_h), rng.randint(0, slack_w))):
            for flipped in (False, True):
                used = record.crop if crop is None else crop
                numbers = size_conditioning(record, flipped=flipped, crop=crop)
                assert numbers == (*size, *diffusers_crop_top_left(record.resized, record.bucket, used, flipped),
                                   *record.bucket)
                window = columns[used[1]: used[1] + record.bucket[1]]  # the pixels trained, mirrored or not
                seen = columns.flip(0) if flipped else columns
                assert torch.equal(seen[numbers[3]: numbers[3] + record.bucket[1]], window.flip(0) if flipped else window)


def kohya_get_crop_ltrb(bucket_reso, image_size):
    # sd-scripts@48d368fa library/train_util.py:349-366 ((w, h) sizes)
    bucket_ar = bucket_reso[0] / bucket_reso[1]
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:
        resized_width = bucket_reso[1] * image_ar
        resized_height = bucket_reso[1]
    else:
        resized_width = bucket_reso[0]
        resized_height = bucket_reso[0] / image_ar
    crop_left = (bucket_reso[0] - resized_width) // 2
    crop_top = (bucket_reso[1] - resized_height) // 2
    return crop_left, crop_top, crop_left + resized_width, crop_top + resized_height


def test_kohyas_crop_numbers_are_its_letterbox_not_the_crop_a_documented_difference():
    """kohya's SDXL crop (train_util.py:1686-1692 from get_crop_ltrb) is where the image would sit fitted
    *inside* the bucket, and ignores random crops; sdadapt gives the crop taken (the SDXL paper's c_crop, as
    diffusers'; docs/train.md). A wide image: kohya (top > 0, left 0), sdadapt (top 0, left > 0)."""
    record = ImageRecord(None, "x", size=(300, 580))  # wider than its bucket 640×384: scaled to 742×384
    plan_dataset([record], resolution=512, min_size=256, max_size=1024)
    bh, bw = record.bucket
    left, top, right, _ = kohya_get_crop_ltrb((bw, bh), (580, 300))
    kohya = (int(top), int(left)), (int(top), int(bw - right))  # plain, mirrored (1686-1689)
    ours = size_conditioning(record)[2:4], size_conditioning(record, flipped=True)[2:4]
    assert kohya[0][0] > 0 and kohya[0][1] == 0 and ours[0][0] == 0 and ours[0][1] > 0
    assert ours == ((0, 51), (0, 51)) and kohya == ((26, 0), (26, 0))


def test_bucket_info_numbers_the_buckets_in_kohyas_order():
    """kohya's ss_bucket_info (train_util.py:1059-1073): buckets numbered by their sorted (w, h) sizes
    (BucketManager.sort), counts with repeats, the mean |ar error| over images."""
    records = [ImageRecord(None, "x", repeats=r, size=s) for r, s in ((2, (600, 300)), (3, (300, 600)), (1, (512, 512)))]
    plan_dataset(records, resolution=512, min_size=256, max_size=1024)
    info = Dataset(records).bucket_info()
    kohya = sorted((r.bucket[1], r.bucket[0]) for r in records)
    assert [b["resolution"] for b in info["buckets"].values()] == [list(x) for x in kohya]
    assert list(info["buckets"]) == ["0", "1", "2"] and [b["count"] for b in info["buckets"].values()] == [2, 1, 3]
    errors = [abs(r.bucket[1] / r.bucket[0] - r.size[1] / r.size[0]) for r in records]
    assert info["mean_img_ar_error"] == pytest.approx(float(np.mean(errors)), rel=0, abs=1e-15)


# ---- train --resume: a run recorded before kohya's buckets keeps its own ---------------------------------
def test_train_records_the_bucket_rule_and_a_resumed_older_run_keeps_its_buckets(tmp_path, train_fit_calls):
    """A square image at a non-square resolution (the toy's step 4): kohya's square bucket (36x36) for a new
    run, recorded as ``bucket_rule`` in run.json; a record without it (saved before) resumes with the buckets
    it planned (no square bucket: 40x36), and its further records keep saying so."""
    import json

    from sdadapt.cli import main
    from train_inputs import captioned_pngs

    images = captioned_pngs(tmp_path / "img", [(40, 40), (40, 40)])
    base = ["train", "lora", "--images", str(images), "--resolution", "32,48", "--batch-size", "2", "--no-prior",
            "--seed", "1", "-q", "--save-state-on-train-end"]
    assert main([*base, "--steps", "1", "-o", str(tmp_path / "a.safetensors")]) == 0
    assert [r.bucket for r in train_fit_calls[-1].dataset.records] == [(36, 36)] * 2
    record_file = tmp_path / "a-state" / "run.json"
    record = json.loads(record_file.read_text())
    assert record["bucket_rule"] == BUCKETS_KOHYA
    del record["bucket_rule"]  # (a state saved before)
    record_file.write_text(json.dumps(record))
    assert main([*base, "--steps", "2", "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "b.safetensors")]) == 0
    assert [r.bucket for r in train_fit_calls[-1].dataset.records] == [(40, 36)] * 2
    assert json.loads(record_file.read_text())["bucket_rule"] == BUCKETS_BEFORE


def test_the_metadata_states_kohyas_bucket_limits(tmp_path):
    """``ss_min_bucket_reso`` / ``ss_max_bucket_reso`` are what kohya's train_network.py writes
    (``dataset.min_bucket_reso``: the limits moved onto the step by ``adjust_min_max_bucket_reso_by_steps``,
    ``None`` without buckets), not the smallest / largest side in use."""
    from safetensors import safe_open

    from sdadapt.cli import main
    from train_inputs import captioned_pngs

    images = captioned_pngs(tmp_path / "img", [(32, 40), (40, 32)])
    base = ["train", "lora", "--images", str(images), "--resolution", "32", "--batch-size", "2", "--no-prior",
            "--steps", "1", "--seed", "1", "-q"]
    assert main([*base, "--min-bucket-reso", "13", "--max-bucket-reso", "70", "-o", str(tmp_path / "a.safetensors")]) == 0
    assert main([*base, "--no-bucket", "-o", str(tmp_path / "b.safetensors")]) == 0
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        meta = f.metadata()
    step = int(meta["ss_bucket_reso_steps"])
    assert 13 % step and 70 % step  # (the limits are off the step: kohya moves them)
    assert (meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == (str(13 - 13 % step), str(70 + (-70) % step))
    with safe_open(str(tmp_path / "b.safetensors"), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_enable_bucket"], meta["ss_min_bucket_reso"], meta["ss_max_bucket_reso"]) == ("False", "None", "None")
