"""kohya's several ``[[datasets]]`` blocks in a dataset TOML: each bucketed alone, at its own resolution
and batch size, the epoch the shuffled concatenation of every dataset's batches.

kohya (library/config_util.py ``generate_dataset_group_by_blueprint``; library/train_util.py): each
``[[datasets]]`` block is one ``DreamBoothDataset`` / ``FineTuningDataset`` with its own
``BucketManager`` (``make_bucket_resolutions(resolution, min, max, steps)``, each image to the bucket of
the nearest aspect ratio, or to the resolution itself without ``enable_bucket``), whose
``make_buckets`` puts each image ``num_repeats`` times in its bucket and cuts each bucket into
``ceil(n / batch_size)`` batches of the dataset's own ``batch_size``; ``DatasetGroup`` is a
``ConcatDataset`` of those batches, iterated by a ``DataLoader(shuffle=True)``, so
``len(train_dataloader)`` (the steps of an epoch before accumulation) is the sum over the datasets
and a batch never mixes datasets. train_network.py with a dataset config writes ``ss_datasets`` (one
entry per dataset: ``batch_size_per_device``, ``num_train_images``, ``num_reg_images``,
``resolution`` as (width, height), ``enable_bucket``, ``subsets`` …), ``ss_num_train_images`` (the
group's total), ``ss_num_batches_per_epoch`` = ``len(train_dataloader)``, ``ss_dataset_dirs``
(every non-reg subset), and no ``ss_batch_size_per_device`` / ``ss_resolution`` / ``ss_bucket_info``.
A ``DreamBoothDataset`` balances its own ``is_reg`` images against its own training images.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_inputs import random_png

import sdadapt.training.data as data_module
from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.formats.files import read_safetensors
from sdadapt.jobs.train import TrainOptions, _data_config_fallback
from sdadapt.training.dataset_config import dataset_records, read_dataset_config


def _kohya_buckets(resolution: tuple[int, int], *, min_size: int, max_size: int, divisible: int) -> list[tuple[int, int]]:
    """kohya's ``model_util.make_bucket_resolutions``: (width, height) buckets (the transcription in
    test_bucket_reference)."""
    from test_bucket_reference import kohya_make_bucket_resolutions

    return sorted(kohya_make_bucket_resolutions(resolution, min_size=min_size, max_size=max_size, divisible=divisible))


def _kohya_bucket(size: tuple[int, int], block: dict) -> tuple[int, int]:
    """kohya's ``BucketManager.select_bucket`` for an image of (height, width) ``size`` in a dataset
    ``block`` (its TOML keys): the (height, width) it trains at. The test's images have exactly a
    bucket's aspect ratio, so no float rounding decides."""
    res = block["resolution"]
    if not block.get("enable_bucket"):
        return (res, res)
    buckets = _kohya_buckets((res, res), min_size=block["min_bucket_reso"], max_size=block["max_bucket_reso"],
                             divisible=block["bucket_reso_steps"])
    h, w = size
    exact = [(bh, bw) for bw, bh in buckets if bw * h == bh * w]
    assert len(exact) == 1, (size, buckets)
    return exact[0]


#: the two blocks (kohya's keys) and their subsets: folder -> (num_repeats, image sizes (h, w)); "r" is is_reg
BLOCKS = [
    {"resolution": 32, "batch_size": 2, "enable_bucket": False,
     "subsets": {"a": (2, [(32, 32), (32, 32), (32, 32), (32, 48)])}},
    {"resolution": 64, "batch_size": 3, "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128,
     "bucket_reso_steps": 32,
     "subsets": {"b": (2, [(64, 64), (64, 64), (32, 96), (96, 32)]), "c": (1, [(32, 96)])}},
]
REG = (2, (64, 64))  # block 1's is_reg subset "r": two 64x64 images, num_repeats 1


def _write(tmp_path: Path, *, reg: bool = True, general: str = "") -> Path:
    """The images on disk and the dataset TOML naming them (block 1 with an is_reg subset)."""
    seed = 0
    lines = ["[general]", 'caption_extension = ".txt"', general, ""]
    for block in BLOCKS:
        lines.append("[[datasets]]")
        lines += [f"{k} = {str(v).lower() if isinstance(v, bool) else v}" for k, v in block.items() if k != "subsets"]
        for folder, (repeats, sizes) in block["subsets"].items():
            for i, size in enumerate(sizes):
                seed += 1
                random_png(tmp_path / folder / f"{folder}{i}.png", seed, size)
            lines += ["  [[datasets.subsets]]", f'  image_dir = "{tmp_path / folder}"', f"  num_repeats = {repeats}",
                      f'  class_tokens = "a red circle {folder}"']
    if reg:
        for i in range(REG[0]):
            random_png(tmp_path / "r" / f"r{i}.png", 100 + i, REG[1])
        lines += ["  [[datasets.subsets]]", f'  image_dir = "{tmp_path / "r"}"', "  is_reg = true",
                  '  class_tokens = "a circle"']
    toml = tmp_path / "datasets.toml"
    toml.write_text("\n".join(lines) + "\n")
    return toml


def _reference_batches() -> Counter:
    """kohya's epoch as a multiset of (block, bucket (h, w), batch size): each dataset bucketed alone, each
    bucket's images x repeats cut into batches of the dataset's size."""
    out: Counter = Counter()
    for index, block in enumerate(BLOCKS):
        samples: Counter = Counter()
        for repeats, sizes in block["subsets"].values():
            for size in sizes:
                samples[_kohya_bucket(size, block)] += repeats
        for bucket, n in samples.items():
            full, rest = divmod(n, block["batch_size"])
            if full:
                out[(index, bucket, block["batch_size"])] += full
            if rest:
                out[(index, bucket, rest)] += 1
    return out


def test_the_reference_is_what_the_test_means():  # (the hand count of the blocks above)
    assert _reference_batches() == Counter({(0, (32, 32), 2): 4, (1, (64, 64), 3): 1, (1, (64, 64), 1): 1,
                                            (1, (32, 96), 3): 1, (1, (96, 32), 2): 1})


ARGS = ["train", "lora", "--network-dim", "2", "--prior-weight", "0.5", "--seed", "5"]


def test_two_datasets_train_as_kohya_batches_and_metadata(tmp_path, monkeypatch, capsys):
    toml = _write(tmp_path)
    calls: list[tuple[object, int, list]] = []
    real = data_module.epoch_batches

    def recording(dataset, batch_size, *, seed, epoch):
        batches = real(dataset, batch_size, seed=seed, epoch=epoch)
        calls.append((dataset, epoch, batches))
        return batches

    monkeypatch.setattr(data_module, "epoch_batches", recording)
    out = tmp_path / "out.safetensors"  # (8 batches an epoch: step 9 is epoch 2's first, which draws epoch 2's order)
    assert main([*ARGS, "--dataset-config", str(toml), "--steps", "9", "-o", str(out)]) == 0
    report = capsys.readouterr().err
    assert "buckets: datasets[0] 32x32: 4 images, datasets[1] 96x32: 2 images, datasets[1] 64x64: 2 images, " \
           "datasets[1] 32x96: 1 image" in report  # (WIDTHxHEIGHT)
    reference = _reference_batches()
    per_epoch = sum(reference.values())
    # the training data: the dataset whose records are block 0's and 1's training images
    train_calls = [(d, e, b) for d, e, b in calls if {r.folder for r in d.records} == {"a", "b", "c"}]
    assert {e for _, e, _ in train_calls} == {0, 1}
    for dataset, epoch, batches in train_calls:
        seen = Counter()
        for key, positions in batches:
            records = [dataset.records[dataset.members[key][p]] for p in positions]
            assert len({(r.dataset, r.bucket) for r in records}) == 1  # a batch never mixes datasets or buckets
            seen[(records[0].dataset, records[0].bucket, len(records))] += 1
        assert seen == reference, epoch
        # each block's images keep their own repeats within the epoch
        uses = Counter(str(dataset.records[dataset.members[k][p]].path) for k, ps in batches for p in ps)
        assert all(uses[str(r.path)] == r.repeats for r in dataset.records)
        order = [dataset.records[dataset.members[k][0]].dataset for k, _ in batches]
        assert order != sorted(order) and order != sorted(order, reverse=True)  # shuffled together, not block by block
    first = {e: b for _, e, b in train_calls}
    assert first[0] != first[1]  # a new order each epoch (seeded: the same for the same seed)
    # the class images: block 1's, balanced against block 1's 9 training samples, at its size and batch size
    reg_calls = [(d, b) for d, e, b in calls if {r.folder for r in d.records} == {"r"}]
    dataset, batches = reg_calls[0]
    assert {r.dataset for r in dataset.records} == {1} and sum(r.repeats for r in dataset.records) == 9
    assert sorted(len(p) for _, p in batches) == [3, 3, 3]
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_batches_per_epoch"] == str(per_epoch) and meta["ss_max_train_steps"] == "9" == str(per_epoch + 1)
    assert meta["ss_num_epochs"] == "2" and meta["ss_num_train_images"] == str(8 + 9) and meta["ss_num_reg_images"] == "2"
    for key in ("ss_batch_size_per_device", "ss_resolution", "ss_bucket_info", "ss_enable_bucket", "ss_min_bucket_reso"):
        assert key not in meta  # kohya writes them per dataset only (ss_datasets)
    assert json.loads(meta["ss_dataset_dirs"]) == {"a": {"n_repeats": 2, "img_count": 4}, "b": {"n_repeats": 2, "img_count": 4},
                                                   "c": {"n_repeats": 1, "img_count": 1}}
    # kohya calls set_tag_frequency for every subset, is_reg ones too (train_util.py load_dreambooth_dir)
    assert set(json.loads(meta["ss_tag_frequency"])) == {"a", "b", "c", "r"}
    first_entry, second_entry = json.loads(meta["ss_datasets"])
    assert {k: first_entry[k] for k in ("is_dreambooth", "batch_size_per_device", "num_train_images", "num_reg_images",
                                        "resolution", "enable_bucket")} == {
        "is_dreambooth": True, "batch_size_per_device": 2, "num_train_images": 8, "num_reg_images": 0,
        "resolution": [32, 32], "enable_bucket": False}
    assert {k: second_entry[k] for k in ("is_dreambooth", "batch_size_per_device", "num_train_images", "num_reg_images",
                                         "resolution", "enable_bucket", "min_bucket_reso", "max_bucket_reso")} == {
        "is_dreambooth": True, "batch_size_per_device": 3, "num_train_images": 9, "num_reg_images": 2,
        "resolution": [64, 64], "enable_bucket": True, "min_bucket_reso": 32, "max_bucket_reso": 128}  # (configured)
    assert (first_entry["min_bucket_reso"], first_entry["max_bucket_reso"]) == (None, None)  # (kohya's: no buckets)
    assert [(s["image_dir"], s["img_count"], s["num_repeats"], s["is_reg"]) for s in first_entry["subsets"]] == [
        ("a", 4, 2, False)]
    assert [(s["image_dir"], s["img_count"], s["num_repeats"], s["is_reg"]) for s in second_entry["subsets"]] == [
        ("b", 4, 2, False), ("c", 1, 1, False), ("r", 2, 1, True)]
    assert sorted((b["resolution"][1], b["resolution"][0], b["count"]) for b in second_entry["bucket_info"]["buckets"].values()) \
        == sorted((h, w, n) for (h, w), n in [((64, 64), 4), ((32, 96), 3), ((96, 32), 2)])
    assert list(first_entry["bucket_info"]["buckets"].values()) == [{"resolution": [32, 32], "count": 8}]


def test_resume_continues_the_same_order_and_a_changed_block_is_refused(tmp_path, capsys):
    toml = _write(tmp_path, reg=False)
    # (8 batches an epoch: saved at step 7, the resume trains epoch 1's last batch and crosses into epoch 2;
    # 4 generated class images, not 2 x 9: their sampling was most of the test's time, and the class picks
    # of each position are drawn from 4 as from 18)
    args = [*ARGS, "--dataset-config", str(toml), "--steps", "9", "--class-images", "4"]
    out = tmp_path / "a.safetensors"
    assert main([*args, "--save-every-n-steps", "7", "-o", str(out)]) == 0
    resumed = tmp_path / "b.safetensors"
    assert main([*args, "--resume", str(tmp_path / "a-state"), "-o", str(resumed)]) == 0
    first, _ = read_safetensors(out)
    second, _ = read_safetensors(resumed)
    assert first.keys() == second.keys() and all((first[k] == second[k]).all() for k in first)
    capsys.readouterr()
    toml.write_text(toml.read_text().replace("batch_size = 3", "batch_size = 2"))
    assert main([*args, "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "c.safetensors")]) == 2
    assert "blocks[1].batch_size 3 (now 2)" in capsys.readouterr().err


def _read(toml: Path):
    return read_dataset_config(toml, fallback=_data_config_fallback(TrainOptions(dataset_config=str(toml))))


def test_several_blocks_resolve_each_its_own(tmp_path):
    toml = _write(tmp_path, general="batch_size = 5")
    config = _read(toml)
    assert [(s.where, s.dataset) for s in config.subsets] == [
        ("datasets[0].subsets[0]", 0), ("datasets[1].subsets[0]", 1), ("datasets[1].subsets[1]", 1),
        ("datasets[1].subsets[2]", 1)]
    assert [(b["resolution"], b["batch_size"], b["enable_bucket"]) for b in config.blocks] == [
        ((32, 32), 2, False), ((64, 64), 3, True)]
    assert config.options["resolution"] == (32, 32) and config.options["batch_size"] == 2  # (the run's: the first block's)
    assert config.record()["blocks"][1]["batch_size"] == 3 and config.record()["subsets"][1]["dataset"] == 1
    one = tmp_path / "one.toml"  # one block: the record as before (a resumed older run's record matches)
    one.write_text(toml.read_text().split("[[datasets]]")[0] + "[[datasets]]" + toml.read_text().split("[[datasets]]")[1])
    assert "blocks" not in _read(one).record() and "dataset" not in _read(one).record()["subsets"][0]
    # the same folder in two blocks: kohya keeps both (only a repeat within one dataset is dropped)
    twice = tmp_path / "twice.toml"
    twice.write_text(toml.read_text().replace(f'image_dir = "{tmp_path / "c"}"', f'image_dir = "{tmp_path / "a"}"'))
    assert [s.image_dir.name for s in _read(twice).subsets] == ["a", "b", "a", "r"]


@pytest.mark.parametrize("old, new, message", [
    ("bucket_reso_steps = 32", "bucket_reso_step = 32",
     "unknown key 'bucket_reso_step' in datasets\\[1\\]; did you mean bucket_reso_steps"),
    ("num_repeats = 1", "num_repeat = 1", "unknown key 'num_repeat' in datasets\\[1\\].subsets\\[1\\]"),
    ("batch_size = 3", "batch_size = 3.5", "datasets\\[1\\].batch_size: must be a whole number"),
    ("is_reg = true", "is_reg = true\n  metadata_file = 'm.json'", "datasets\\[1\\] mixes DreamBooth-style subsets"),
])
def test_a_bad_block_is_named(tmp_path, old, new, message):
    toml = _write(tmp_path)
    toml.write_text(toml.read_text().replace(old, new, 1))
    with pytest.raises(InputError, match=message):
        _read(toml)


def test_a_block_without_training_images_or_subsets_is_named(tmp_path, capsys):
    toml = _write(tmp_path)
    text = toml.read_text()
    (tmp_path / "no_train.toml").write_text(text + '\n[[datasets]]\nresolution = 32\n  [[datasets.subsets]]\n'
                                            f'  image_dir = "{tmp_path / "r"}"\n  is_reg = true\n')
    with pytest.raises(InputError, match="datasets\\[2\\] has no training subset"):
        _read(tmp_path / "no_train.toml")
    (tmp_path / "bare.toml").write_text(text + "\n[[datasets]]\nresolution = 32\n")
    with pytest.raises(InputError, match="datasets\\[2\\] has no \\[\\[datasets.subsets\\]\\]"):
        _read(tmp_path / "bare.toml")
    # a block's value the run refuses: named by the block, before the model loads
    (tmp_path / "zero.toml").write_text(text.replace("batch_size = 3", "batch_size = 0"))
    assert main([*ARGS, "--dataset-config", str(tmp_path / "zero.toml"), "--steps", "1",
                 "-o", str(tmp_path / "z.safetensors")]) == 2
    assert "datasets[1]: " in capsys.readouterr().err
    # a block's size the bucket step does not divide: named by the block
    (tmp_path / "step.toml").write_text(text.replace("resolution = 64", "resolution = 80"))
    assert main([*ARGS, "--dataset-config", str(tmp_path / "step.toml"), "--steps", "1",
                 "-o", str(tmp_path / "s.safetensors")]) == 2
    assert f"{tmp_path / 'step.toml'}: datasets[1]: --resolution 80x80 must be a multiple of the bucket step 32" \
        in capsys.readouterr().err


def test_the_several_blocks_toml_in_docs_train_md_reads_as_the_page_says(tmp_path, monkeypatch):
    from docs_pages import code_blocks

    (block,) = [b for b in code_blocks("train.md", "toml") if b.count("[[datasets]]") == 2]
    monkeypatch.chdir(tmp_path)  # (paths are read from the current folder, as kohya)
    for i, folder in enumerate(("faces", "body", "women")):
        random_png(tmp_path / "img" / folder / f"{folder}.png", i)
    (tmp_path / "dataset.toml").write_text(block)
    config = _read(tmp_path / "dataset.toml")
    assert [(b["resolution"], b["batch_size"], b["enable_bucket"]) for b in config.blocks] == [
        ((512, 512), 4, False), ((1024, 768), 2, True)]
    train, reg, _, _ = dataset_records(config)
    assert [(r.folder, r.dataset, r.repeats) for r in train] == [("faces", 0, 4), ("body", 1, 2)]
    assert [(r.folder, r.dataset, r.repeats) for r in reg.records] == [("women", 1, 2)]  # (block 1's 2 samples)


def test_blocks_may_be_of_different_kinds(tmp_path):
    """kohya: each dataset is DreamBooth-style or fine-tuning; a DatasetGroup may hold both."""
    toml = _write(tmp_path, reg=False)
    random_png(tmp_path / "ft" / "k.png", 50)
    (tmp_path / "ft.json").write_text(json.dumps({"k": {"caption": "a green circle", "tags": "small"}}))
    toml.write_text(toml.read_text() + f'\n[[datasets]]\nresolution = 32\n  [[datasets.subsets]]\n'
                    f'  metadata_file = "{tmp_path / "ft.json"}"\n  image_dir = "{tmp_path / "ft"}"\n')
    config = _read(toml)
    train, _, _, _ = dataset_records(config)
    assert [(r.folder, r.dataset, r.caption) for r in train if r.dataset == 2] == [("ft.json", 2, "a green circle,small")]


def test_each_block_holds_out_by_its_own_validation_split(tmp_path, monkeypatch, capsys):
    """kohya's validation_split / validation_seed are dataset params: a block without one holds out nothing."""
    from sdadapt.jobs import train as train_job

    toml = _write(tmp_path, reg=False)
    toml.write_text(toml.read_text().replace("resolution = 64", "resolution = 64\nvalidation_split = 0.5\nvalidation_seed = 4"))
    config = _read(toml)
    assert [(b["validation_split"], b["validation_seed"]) for b in config.blocks] == [(0.0, None), (0.5, 4)]
    seen = {}
    real = train_job._hold_out_for_validation

    def spy(records, options, notes, blocks=()):
        kept, held = real(records, options, notes, blocks)
        seen["held"] = held
        return kept, held

    monkeypatch.setattr(train_job, "_hold_out_for_validation", spy)
    real_fit = train_job.fit

    def fit_spy(*args, validation=None, **kwargs):
        seen["validation"] = validation
        return real_fit(*args, validation=validation, **kwargs)

    monkeypatch.setattr(train_job, "fit", fit_spy)
    out = tmp_path / "v.safetensors"
    assert main([*ARGS, "--dataset-config", str(toml), "--steps", "1", "--no-prior", "-o", str(out)]) == 0
    validation = seen["validation"]  # (the held-out images batched by their own block: its batch size 3)
    assert validation.batch_sizes == (2, 3) and validation.members and all(key[0] == 1 for key in validation.members)
    assert all(validation.batch_size_of(key, 2) == 3 for key in validation.members)
    assert "the blocks' validation_split: 2 image(s) held out" in capsys.readouterr().err
    # block 1's subset b: 4 images, ceil(4 x 0.5) kept; c: 1 image, kept (kohya keeps ceil(n x (1 - split)))
    assert sorted((r.folder, r.dataset) for r in seen["held"]) == [("b", 1), ("b", 1)]
    from sdadapt.training.validation import split_for_validation

    group = sorted((tmp_path / "b").glob("*.png"))
    reference = split_for_validation(group, split=0.5, seed=4, key=str)[1]  # (block 1's own seed, not the run's 5)
    assert sorted(str(r.path) for r in seen["held"]) == sorted(map(str, reference))
    assert sorted(map(str, reference)) != sorted(map(str, split_for_validation(group, split=0.5, seed=5, key=str)[1]))
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_num_validation_images"] == "2"


def test_fit_trains_each_block_at_its_batch_size_with_each_images_own_size_conditioning(tmp_path, monkeypatch):
    """fit over a two-block dataset: each micro-batch is one block's batch (its size), and SDXL's size
    conditioning rows are each drawn image's own (original size, crop, its block's bucket)."""
    from fit_runs import toy_lora_fit

    from sdadapt.toy import build_toy
    from sdadapt.training.data import (
        Dataset,
        encode_buckets,
        epoch_batches,
        plan_dataset,
        size_conditioning,
    )

    toml = _write(tmp_path, reg=False)
    config = _read(toml)
    records, _, _, _ = dataset_records(config)
    for index, block in enumerate(config.blocks):
        plan_dataset([r for r in records if r.dataset == index], resolution=block["resolution"],
                     buckets=block["enable_bucket"], step=block["bucket_reso_steps"] or 32,
                     min_size=block["min_bucket_reso"], max_size=block["max_bucket_reso"])
    dataset = Dataset(records, batch_sizes=tuple(b["batch_size"] for b in config.blocks))
    encode_buckets(dataset, build_toy(seed=1).encode_images)
    batches = epoch_batches(dataset, 2, seed=0, epoch=0)
    assert len(batches) == sum(_reference_batches().values()) == dataset.batches_per_epoch(2)
    sizes: list = []
    _, seen = toy_lora_fit(dataset, steps=len(batches), monkeypatch=monkeypatch, sizes=sizes)
    expected = [[list(map(float, size_conditioning(dataset.records[dataset.members[key][p]]))) for p in positions]
                for key, positions in batches]
    assert sizes == expected
    assert [tuple(latents.shape[0] for latents in seen)] == [tuple(len(p) for _, p in batches)]
    assert {len(p) for _, p in batches} == {1, 2, 3}  # (block 0's 2, block 1's 3 and a partial bucket's 1)


def test_one_block_draws_and_metadata_are_pinned_to_the_version_before_several_blocks(tmp_path, monkeypatch):
    """One ``[[datasets]]`` block takes the path it took before several blocks existed: the same batches
    (buckets keyed by (h, w) alone, the run's batch size) and the one-dataset metadata keys. The values
    are pinned from the version before (its epoch_batches and metadata for this very file and seed)."""
    toml = _write(tmp_path)
    general, _, second = toml.read_text().split("[[datasets]]")
    toml.write_text(general + "[[datasets]]" + second)  # (block 1 alone, with its is_reg subset)
    calls: list = []
    real = data_module.epoch_batches

    def recording(dataset, batch_size, *, seed, epoch):
        batches = real(dataset, batch_size, seed=seed, epoch=epoch)
        calls.append((dataset, batch_size, epoch, batches))
        return batches

    monkeypatch.setattr(data_module, "epoch_batches", recording)
    out = tmp_path / "one.safetensors"
    assert main([*ARGS, "--dataset-config", str(toml), "--steps", "1", "-o", str(out)]) == 0
    (train,) = {id(d): d for d, *_ in calls if {r.folder for r in d.records} == {"b", "c"}}.values()
    (reg,) = {id(d): d for d, *_ in calls if {r.folder for r in d.records} == {"r"}}.values()
    assert train.batch_sizes == () and reg.batch_sizes == () and {r.dataset for r in train.records} == {0}
    pinned_train = {0: [((64, 64), [1]), ((64, 64), [0, 0, 1]), ((96, 32), [0, 0]), ((32, 96), [1, 0, 0])],
                    1: [((64, 64), [1, 0, 1]), ((64, 64), [0]), ((96, 32), [0, 0]), ((32, 96), [0, 0, 1])]}
    pinned_reg = {0: [((64, 64), [0, 0, 0]), ((64, 64), [1, 1, 0]), ((64, 64), [0, 1, 1])],
                  1: [((64, 64), [1, 0, 1]), ((64, 64), [0, 1, 0]), ((64, 64), [0, 0, 1])]}
    for epoch in (0, 1):
        assert real(train, 3, seed=5, epoch=epoch) == pinned_train[epoch]
        assert real(reg, 3, seed=6, epoch=epoch) == pinned_reg[epoch]  # (the class images' stream: seed + 1)
    assert {(b, e) for d, b, e, _ in calls if d is train} == {(3, 0)}  # (the run's batch size: batch_sizes unused)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert {k: meta.get(k) for k in ("ss_num_batches_per_epoch", "ss_num_train_images", "ss_num_reg_images")} == {
        "ss_num_batches_per_epoch": "4", "ss_num_train_images": "9", "ss_num_reg_images": "2"}
    for key in ("ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_enable_bucket",
                "ss_min_bucket_reso", "ss_max_bucket_reso", "ss_bucket_reso_steps", "ss_bucket_info"):
        assert key not in meta  # kohya's use_user_config branch (one block too): each dataset's own in ss_datasets
    (entry,) = json.loads(meta["ss_datasets"])
    assert entry["bucket_info"] == {"buckets": {"0": {"resolution": [32, 96], "count": 2},  # kohya's [w, h] order
                                                "1": {"resolution": [64, 64], "count": 4},
                                                "2": {"resolution": [96, 32], "count": 3}},
                                    "mean_img_ar_error": 0.0}
    assert (entry["batch_size_per_device"], entry["num_train_images"], entry["num_reg_images"], entry["resolution"],
            entry["enable_bucket"], entry["min_bucket_reso"], entry["max_bucket_reso"]) == (3, 9, 2, [64, 64], True, 32, 128)


def test_the_same_images_in_two_blocks_are_cached_and_batched_per_block(tmp_path):
    """One folder in three blocks: two at the same size (the same bucket, other batch sizes) and one at
    another size. Each block's use is its own record, its latents cached under (block, h, w) at its
    block's scale, and its batches cut at its block's size — never pooled with the other blocks' uses."""
    from sdadapt.toy import build_toy
    from sdadapt.training.data import (
        Dataset,
        encode_buckets,
        epoch_batches,
        plan_dataset,
    )

    for i in range(4):
        random_png(tmp_path / "a" / f"a{i}.png", 10 + i, (32, 32))
    block = '[[datasets]]\nresolution = {res}\nbatch_size = {batch}\nenable_bucket = false\n  [[datasets.subsets]]\n' \
            f'  image_dir = "{tmp_path / "a"}"\n  num_repeats = 2\n  class_tokens = "a red circle"\n'
    toml = tmp_path / "same.toml"
    toml.write_text('[general]\ncaption_extension = ".txt"\n' + "".join(
        block.format(res=res, batch=batch) for res, batch in ((32, 2), (32, 3), (64, 3))))
    config = _read(toml)
    records, _, _, _ = dataset_records(config)
    assert [(r.folder, r.dataset) for r in records] == [("a", 0)] * 4 + [("a (2)", 1)] * 4 + [("a (3)", 2)] * 4
    for index, options in enumerate(config.blocks):
        plan_dataset([r for r in records if r.dataset == index], resolution=options["resolution"], buckets=False, step=32)
    assert {(r.dataset, r.bucket, r.resized) for r in records} == {
        (0, (32, 32), (32, 32)), (1, (32, 32), (32, 32)), (2, (64, 64), (64, 64))}
    dataset = Dataset(records, batch_sizes=tuple(b["batch_size"] for b in config.blocks))
    toy = build_toy(seed=1)
    encode_buckets(dataset, toy.encode_images)
    small = tuple(toy.encode_images(torch.zeros(1, 3, 32, 32)).shape[1:])
    large = tuple(toy.encode_images(torch.zeros(1, 3, 64, 64)).shape[1:])
    assert small != large
    assert {key: tuple(t.shape) for key, t in dataset.latents.items()} == {
        (0, 32, 32): (4, *small), (1, 32, 32): (4, *small), (2, 64, 64): (4, *large)}
    assert torch.equal(dataset.latents[(0, 32, 32)], dataset.latents[(1, 32, 32)])  # (the same pixels, encoded twice)
    # 8 samples a block: block 0 in 4 batches of 2, blocks 1 and 2 each in 3, 3, 2
    batches = epoch_batches(dataset, 1, seed=0, epoch=0)
    assert Counter((key, len(p)) for key, p in batches) == Counter({
        ((0, 32, 32), 2): 4, ((1, 32, 32), 3): 2, ((1, 32, 32), 2): 1, ((2, 64, 64), 3): 2, ((2, 64, 64), 2): 1})
    assert dataset.batches_per_epoch(1) == len(batches) == 10


def _kohya_reg_repeats(images: int, repeats: int, train_samples: int) -> list[int]:
    """kohya's ``DreamBoothDataset`` balancing loop (transcribed) for one reg subset of ``images`` images:
    each image's ``num_repeats`` after it (the first pass registers them, later passes add 1 each)."""
    counts, n, first = [0] * images, 0, True
    while n < train_samples:
        for i in range(images):
            if first:
                counts[i] = repeats
                n += repeats
            else:
                counts[i] += 1
                n += 1
            if n >= train_samples:
                break
        first = False
    return counts


def test_each_block_balances_its_own_reg_images(tmp_path):
    """Both blocks with is_reg subsets: each balanced against its own block's training samples
    (block 0: 4 images x 2 = 8, block 1: 4 x 2 + 1 = 9), as each kohya DreamBoothDataset does."""
    toml = _write(tmp_path)
    for i in range(3):
        random_png(tmp_path / "q" / f"q{i}.png", 200 + i)
    general, first, second = toml.read_text().split("[[datasets]]")
    first += (f'  [[datasets.subsets]]\n  image_dir = "{tmp_path / "q"}"\n  is_reg = true\n'
              '  class_tokens = "a square"\n\n')
    toml.write_text(f"{general}[[datasets]]{first}[[datasets]]{second}")
    train, reg, _, _ = dataset_records(_read(toml))
    assert sum(r.repeats for r in train if r.dataset == 0) == 8 and sum(r.repeats for r in train if r.dataset == 1) == 9
    by_block = {b: [r.repeats for r in reg.records if r.dataset == b] for b in (0, 1)}
    assert by_block == {0: _kohya_reg_repeats(3, 1, 8), 1: _kohya_reg_repeats(2, 1, 9)} == {0: [3, 3, 2], 1: [5, 4]}
    assert reg.samples == 3 + 2  # (kohya's num_reg_images: images x repeats before balancing, summed over the blocks)


def test_a_non_square_block_is_trained_and_written_at_its_own_width_and_height(tmp_path, monkeypatch):
    """resolution = [WIDTH, HEIGHT] in a second block: its images train at (HEIGHT, WIDTH), and
    ss_datasets writes kohya's (width, height) for it."""
    toml = _write(tmp_path, reg=False)
    toml.write_text(toml.read_text().replace("resolution = 32", "resolution = [64, 32]"))
    sizes: list = []
    real = data_module.epoch_batches

    def recording(dataset, batch_size, *, seed, epoch):
        sizes.extend({r.bucket for r in dataset.records if r.dataset == 0})
        return real(dataset, batch_size, seed=seed, epoch=epoch)

    monkeypatch.setattr(data_module, "epoch_batches", recording)
    out = tmp_path / "wide.safetensors"  # (--no-prior: generating class images is unrelated to the block's size)
    assert main([*ARGS, "--dataset-config", str(toml), "--steps", "1", "--no-prior", "-o", str(out)]) == 0
    assert set(sizes) == {(32, 64)}  # (height, width)
    with safe_open(str(out), "pt") as f:
        first_entry, second_entry = json.loads(f.metadata()["ss_datasets"])
    assert first_entry["resolution"] == [64, 32] and second_entry["resolution"] == [64, 64]
    assert list(first_entry["bucket_info"]["buckets"].values()) == [{"resolution": [64, 32], "count": 8}]


def test_face_crops_follow_each_blocks_own_enable_bucket(tmp_path, monkeypatch, capsys):
    """kohya crops around a face only in a dataset without buckets: with face_crop_aug_range for every
    block, the unbucketed block's face images crop around their faces, the bucketed block's do not."""
    for folder in ("f", "g"):
        for i in range(2):
            random_png(tmp_path / folder / f"{folder}{i}_20_20_8_8.png", 300 + i, (40, 40))
    toml = tmp_path / "faces.toml"
    toml.write_text(f"""[general]
caption_extension = ".txt"
face_crop_aug_range = [2.0, 3.0]
[[datasets]]
resolution = 32
batch_size = 2
enable_bucket = false
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'f'}"
  class_tokens = "a face"
[[datasets]]
resolution = 32
batch_size = 2
enable_bucket = true
min_bucket_reso = 32
max_bucket_reso = 64
bucket_reso_steps = 32
  [[datasets.subsets]]
  image_dir = "{tmp_path / 'g'}"
  class_tokens = "a face"
""")
    faces: dict = {}
    real = data_module.epoch_batches

    def recording(dataset, batch_size, *, seed, epoch):
        faces.update({(r.folder, r.path.name): r.face for r in dataset.records})
        return real(dataset, batch_size, seed=seed, epoch=epoch)

    monkeypatch.setattr(data_module, "epoch_batches", recording)
    assert main([*ARGS, "--dataset-config", str(toml), "--steps", "1", "--no-prior",  # (class images: unrelated)
                 "-o", str(tmp_path / "f.safetensors")]) == 0
    assert {k: v is not None for k, v in faces.items()} == {
        ("f", "f0_20_20_8_8.png"): True, ("f", "f1_20_20_8_8.png"): True,
        ("g", "g0_20_20_8_8.png"): False, ("g", "g1_20_20_8_8.png"): False}
    assert "face_crop_aug_range 2,3: unused with bucketing" in capsys.readouterr().err
