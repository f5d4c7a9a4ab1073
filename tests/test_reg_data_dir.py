"""`train --reg-data-dir DIR` (kohya's ``reg_data_dir``): the user's class images as the prior data.

kohya (library/train_util.py, ``DreamBoothDataset``): ``num_reg_images`` = Σ folder repeats × images
of the reg subsets; if it is not 0, the reg images are walked in order — the first pass registers
each with its folder's repeats (``n += info.num_repeats``), later passes add one repeat to each in
turn (``info.num_repeats += 1; n += 1``) — and the walk stops as soon as ``n >= num_train_images``.
train_network.py records ``ss_num_reg_images`` (the count before balancing) and
``ss_reg_dataset_dirs`` (``{basename: {"n_repeats", "img_count"}}`` of each reg folder).
"""

from __future__ import annotations

import importlib
import json
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from train_inputs import random_png

from sdadapt.cli import main
from sdadapt.formats.files import read_safetensors
from sdadapt.images import ImageFolderError
from sdadapt.jobs.train import TrainOptions
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import load_toy
from sdadapt.training.data import (
    CaptionOptions,
    Dataset,
    encode_buckets,
    find_images,
    plan_dataset,
)
from sdadapt.training.reg_data import balanced_repeats, find_reg_images


def _kohya_balance(repeats: list[int], num_train_images: int) -> list[int]:
    """kohya's loop, written as it is there (objects whose num_repeats is rewritten)."""

    class Info:
        def __init__(self, r):
            self.num_repeats, self.registered = r, False

    infos = [Info(r) for r in repeats]
    n, first_loop = 0, True
    while n < num_train_images:
        for info in infos:
            if first_loop:
                info.registered = True
                n += info.num_repeats
            else:
                info.num_repeats += 1
                n += 1
            if n >= num_train_images:
                break
        first_loop = False
    return [i.num_repeats if i.registered else 0 for i in infos]


def test_balancing_by_hand():
    # 6 reg samples for 10 train samples: 2,1,3 (6) then +1 each: 3,2,4 (9) then the first again: 4 (10)
    assert balanced_repeats([2, 1, 3], 10) == [4, 2, 4]
    # more reg samples than train samples: the walk stops inside the first pass; the rest is unused
    assert balanced_repeats([5, 5, 5], 7) == [5, 5, 0]
    assert balanced_repeats([1], 1) == [1]
    assert balanced_repeats([], 5) == []
    with pytest.raises(ValueError):
        balanced_repeats([1, 0], 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=8), st.integers(1, 80))
def test_balancing_is_kohyas_loop(repeats, train):
    counts = balanced_repeats(repeats, train)
    assert counts == _kohya_balance(repeats, train)
    assert sum(counts) >= train and sum(counts) - train < max(repeats)


@pytest.fixture()
def reg_folder(tmp_path):
    """kohya reg layout: 2_dog/ (two images, one with its own caption), 1_cat/ (one image)."""
    root = tmp_path / "reg"
    random_png(root / "2_dog" / "a.png", 10)
    random_png(root / "2_dog" / "b.png", 11)
    (root / "2_dog" / "b.txt").write_text("a brown dog")
    random_png(root / "1_cat" / "c.png", 12)
    return root


def test_folder_layout_captions_counts_and_dirs(reg_folder):
    reg = find_reg_images(reg_folder, train_samples=9)
    # sorted folders: 1_cat (1) then 2_dog (2, 2): 5 samples, balanced to 9: 1+2+2, +1 each (8), +1 cat (9)
    assert [(r.path.name, r.caption, r.repeats) for r in reg.records] == [
        ("c.png", "cat", 3), ("a.png", "dog", 3), ("b.png", "a brown dog", 3)]
    assert reg.samples == 5
    assert reg.dirs == {"1_cat": {"n_repeats": 1, "img_count": 1}, "2_dog": {"n_repeats": 2, "img_count": 2}}
    assert any("repeated to 9 per epoch" in n for n in reg.notes)
    few = find_reg_images(reg_folder, train_samples=2)  # the walk stops at the second image
    assert [r.path.name for r in few.records] == ["c.png", "a.png"] and few.samples == 5
    assert any("only the first 2 of 3 images are used" in n for n in few.notes)


def test_missing_empty_and_uncaptioned_folders_are_clear_errors(tmp_path):
    with pytest.raises(ImageFolderError, match="--reg-data-dir: .*not a folder"):
        find_reg_images(tmp_path / "nope", train_samples=3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ImageFolderError, match="--reg-data-dir: .*no images"):
        find_reg_images(tmp_path / "empty", train_samples=3)
    random_png(tmp_path / "bare" / "x.png", 1)  # no caption file, no N_class folder
    with pytest.raises(ImageFolderError, match="--class-prompt for all of them"):
        find_reg_images(tmp_path / "bare", train_samples=3)
    assert find_reg_images(tmp_path / "bare", train_samples=3, default_caption="a photo of a dog").records[0].caption == (
        "a photo of a dog")


def test_refused_combinations_before_the_model_loads(reg_folder, red_circles, tmp_path, capsys):
    with pytest.raises(ValueError, match="--class-images 4 asks for generated ones"):
        TrainOptions(images=".", reg_data_dir=str(reg_folder), class_images=4)
    with pytest.raises(ValueError, match="cannot go with --no-prior"):
        TrainOptions(images=".", reg_data_dir=str(reg_folder), prior=False)
    assert main(["train", "lora", "--images", str(red_circles), "--reg-data-dir", str(tmp_path / "none"),
                 "-o", str(tmp_path / "o.safetensors")]) != 0
    assert "--reg-data-dir" in capsys.readouterr().err


def _datasets(red_circles, reg_folder):
    records, _ = find_images(red_circles)
    plan_dataset(records, resolution=32, step=8)
    dataset = Dataset(records)
    reg = find_reg_images(reg_folder, train_samples=dataset.samples_per_epoch)
    plan_dataset(reg.records, resolution=32, step=8)
    reg_dataset = Dataset(reg.records, captions=CaptionOptions())
    toy = load_toy()
    encode_buckets(dataset, toy.encode_images)
    encode_buckets(reg_dataset, toy.encode_images)
    return toy, dataset, reg_dataset


def test_prior_batches_come_from_the_folder_with_kohyas_counts(red_circles, reg_folder, monkeypatch):
    """Over one epoch of the regularisation set, each class image is trained on as often as the
    balancing says, with the --prior-weight, as the second forward's batch."""
    toy, dataset, reg = _datasets(red_circles, reg_folder)
    fitting = importlib.import_module("sdadapt.methods.fit")
    seen: list[tuple[torch.Tensor, float]] = []
    real_step = fitting.train_step

    def train_step(model, batch, *, prior=None, **kwargs):
        seen.append((prior[0]["latents"].clone(), prior[1]))
        return real_step(model, batch, prior=prior, **kwargs)

    monkeypatch.setattr(fitting, "train_step", train_step)
    steps = reg.batches_per_epoch(2)
    adaptation = METHODS["lora"].adapt(toy, rank=2)
    try:
        fit(toy, adaptation, dataset, config=FitConfig(steps=steps, batch_size=2, learning_rate=1e-3), prior=(reg, 0.75))
    finally:
        adaptation.remove()
    latents = {i: reg.latents[b][p] for b, members in reg.members.items() for p, i in enumerate(members)}
    counts: Counter = Counter()
    for rows, weight in seen:
        assert weight == 0.75
        for row in rows:
            (match,) = [i for i, lat in latents.items() if torch.equal(lat, row)]
            counts[match] += 1
    # 3 train samples; reg 1_cat (1) + 2_dog a (2) = 3: b unused
    assert [r.path.name for r in reg.records] == ["c.png", "a.png"]
    assert {i: counts[i] for i in latents} == {0: 1, 1: 2}


def test_a_run_with_a_reg_folder_writes_kohyas_metadata_and_resumes_exactly(red_circles, reg_folder, tmp_path, capsys):
    out = tmp_path / "a.safetensors"
    args = ["train", "lora", "--images", str(red_circles), "--reg-data-dir", str(reg_folder), "--steps", "4",
            "--batch-size", "2", "--network-dim", "2", "--prior-weight", "0.5"]
    assert main([*args, "--save-every-n-steps", "2", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "--reg-data-dir" in captured.err and "+ 5 class images" in captured.out
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_reg_images"] == "5" and meta["ss_prior_loss_weight"] == "0.5"
    assert json.loads(meta["ss_reg_dataset_dirs"]) == {"1_cat": {"n_repeats": 1, "img_count": 1},
                                                        "2_dog": {"n_repeats": 2, "img_count": 2}}
    # resumed from step 2: the same draws (class batches included), the same weights
    resumed = tmp_path / "b.safetensors"
    assert main([*args, "--resume", str(tmp_path / "a-state"), "-o", str(resumed)]) == 0
    first, _ = read_safetensors(out)
    second, _ = read_safetensors(resumed)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # another folder on resume is refused
    other = tmp_path / "other"
    random_png(other / "1_cat" / "c.png", 12)
    assert main(["train", "lora", "--images", str(red_circles), "--reg-data-dir", str(other), "--steps", "4",
                 "--batch-size", "2", "--network-dim", "2", "--prior-weight", "0.5", "--resume",
                 str(tmp_path / "a-state"), "-o", str(tmp_path / "c.safetensors")]) == 2
    assert "reg_data_dir" in capsys.readouterr().err


def test_kohya_toml_reg_data_dir(red_circles, reg_folder, tmp_path, monkeypatch):
    jobs = importlib.import_module("sdadapt.jobs.train")
    seen: list = []

    def fit(system, adaptation, dataset, *, prior, **kwargs):
        seen.append(prior)
        return [0.0] * kwargs["config"].steps

    monkeypatch.setattr(jobs, "fit", fit)
    config = tmp_path / "kohya.toml"
    config.write_text(f'reg_data_dir = "{reg_folder}"\nprior_loss_weight = 0.3\n')
    assert main(["train", "dreambooth", "--images", str(red_circles), "--config", str(config), "--steps", "1",
                 "-o", str(tmp_path / "d.safetensors"), "-q"]) == 0
    ((reg, weight),) = seen
    assert isinstance(reg, Dataset) and weight == 0.3 and {r.caption for r in reg.records} <= {"cat", "dog", "a brown dog"}
