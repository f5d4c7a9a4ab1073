"""`train --dataset-config TOML` (kohya's dataset TOML) and `--in-json FILE` (kohya's fine-tuning metadata).

kohya (library/config_util.py): a value is searched in the subset, then its ``[[datasets]]`` block,
then ``[general]``, then the command-line arguments, then the ``*Params`` dataclass default
(``BlueprintGenerator.generate_params_by_fallbacks``); DreamBooth-style subsets need ``image_dir``,
fine-tuning subsets ``metadata_file`` (``Required`` in ``ConfigSanitizer``), and one dataset cannot
mix them. train_util.DreamBoothDataset: images directly in ``image_dir`` (``glob_images(dir, "*")``),
caption = the caption file, else ``class_tokens``; ``is_reg`` subsets' images are balanced against
``num_train_images`` (test_reg_data_dir.py pins the rule). FineTuningDataset: ``caption +
caption_separator + tags`` (``caption_separator`` default ``","``), images at ``image_dir / key``.
"""

from __future__ import annotations

import importlib
import json
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from train_inputs import random_png

from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.formats.files import read_safetensors
from sdadapt.images import ImageFolderError
from sdadapt.jobs.train import TrainOptions, _data_config_fallback
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import load_toy
from sdadapt.training.data import CaptionOptions, Dataset, encode_buckets, plan_dataset
from sdadapt.training.dataset_config import (
    dataset_records,
    in_json_config,
    read_dataset_config,
)


@pytest.fixture()
def layout(tmp_path):
    """Two training folders and a regularisation folder, and a dataset TOML naming them."""
    dog, cat, reg = tmp_path / "dog", tmp_path / "cat", tmp_path / "reg"
    random_png(dog / "a.png", 1)
    (dog / "a.txt").write_text("a red circle, small, centre")
    random_png(dog / "b.png", 2)  # no caption: the class tokens
    random_png(dog / "9_sub" / "z.png", 3)  # a kohya subset does not read sub-folders
    random_png(cat / "c.png", 4)
    (cat / "c.caption").write_text("a blue square")
    (cat / "c.txt").write_text("never read: the subset's extension is .caption")  # (.caption is tried first)
    random_png(reg / "r1.png", 5)
    random_png(reg / "r2.png", 6)
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"""
[general]
shuffle_caption = true
keep_tokens = 1
caption_extension = ".txt"

[[datasets]]
resolution = 32
batch_size = 2
enable_bucket = false

  [[datasets.subsets]]
  image_dir = "{dog}"
  num_repeats = 3
  class_tokens = "a red circle"

  [[datasets.subsets]]
  image_dir = "{cat}"
  num_repeats = 2
  caption_extension = "caption"
  shuffle_caption = false
  caption_dropout_rate = 0.5

  [[datasets.subsets]]
  image_dir = "{reg}"
  is_reg = true
  class_tokens = "a circle"
""")
    return toml, dog, cat, reg


def _read(toml, **options):
    return read_dataset_config(toml, fallback=_data_config_fallback(TrainOptions(images=".", **options)))


def test_subsets_resolve_through_dataset_general_and_the_run_options(layout):
    toml, dog, cat, reg = layout
    config = _read(toml, caption_tag_dropout_rate=0.25, flip_aug=True)
    assert config.options == {"resolution": (32, 32), "batch_size": 2, "enable_bucket": False, "min_bucket_reso": None,
                              "max_bucket_reso": None, "bucket_reso_steps": None, "bucket_no_upscale": False,
                              "flip_aug": True, "random_crop": False, "color_aug": False, "face_crop_aug_range": None}
    first, second, third = config.subsets
    assert (first.image_dir, first.num_repeats, first.class_tokens, first.caption_extension, first.is_reg) == (
        dog, 3, "a red circle", ".txt", False)
    assert (second.image_dir, second.num_repeats, second.class_tokens, second.caption_extension) == (cat, 2, None, ".caption")
    assert (third.image_dir, third.num_repeats, third.is_reg, third.class_tokens) == (reg, 1, True, "a circle")
    # caption options: subset > [general] > the run's options (--caption-tag-dropout-rate) > kohya's default
    assert {k: first.captions[k] for k in ("shuffle_caption", "keep_tokens", "caption_dropout_rate",
                                           "caption_tag_dropout_rate", "caption_separator")} == {
        "shuffle_caption": True, "keep_tokens": 1, "caption_dropout_rate": 0.0, "caption_tag_dropout_rate": 0.25,
        "caption_separator": ","}
    assert (second.captions["shuffle_caption"], second.captions["caption_dropout_rate"], second.captions["keep_tokens"]) == (
        False, 0.5, 1)
    # kohya's (width, height) resolution
    wide = toml.with_name("wide.toml")
    wide.write_text(toml.read_text().replace("resolution = 32", "resolution = [48, 32]"))
    assert _read(wide).options["resolution"] == (32, 48)
    # the JSON form (kohya's load_user_config reads .json too) resolves the same
    from sdadapt.training.dataset_config import read_config_table

    as_json = toml.with_suffix(".json")
    as_json.write_text(json.dumps(read_config_table(toml, flag="--dataset-config")))
    from_json = _read(as_json, caption_tag_dropout_rate=0.25, flip_aug=True)
    assert (from_json.subsets, from_json.options) == (config.subsets, config.options)
    as_json.write_text("{not json")
    with pytest.raises(InputError, match="--dataset-config .*dataset.json: not valid JSON"):
        _read(as_json)


def test_records_and_balanced_reg_images_match_a_hand_written_expectation(layout):
    toml, *_ = layout
    train, reg_images, by_label, notes = dataset_records(_read(toml))
    assert [(r.path.name, r.caption, r.repeats, r.folder) for r in train] == [
        ("a.png", "a red circle, small, centre", 3, "dog"), ("b.png", "a red circle", 3, "dog"),
        ("c.png", "a blue square", 2, "cat")]
    # 8 training samples (2 x 3 + 1 x 2); 2 regularisation samples: 1, 1 -> +1 each until 8: 4, 4
    assert [(r.path.name, r.caption, r.repeats, r.folder) for r in reg_images.records] == [
        ("r1.png", "a circle", 4, "reg"), ("r2.png", "a circle", 4, "reg")]
    assert reg_images.samples == 2 and reg_images.dirs == {"reg": {"n_repeats": 1, "img_count": 2}}
    assert list(by_label) == ["dog", "cat", "reg"]
    assert any("repeated to 8 per epoch" in n for n in notes)
    assert any("subsets[0]: sub-folders not read (9_sub)" in n for n in notes)


def _spy_fit(monkeypatch):
    jobs = importlib.import_module("sdadapt.jobs.train")
    seen: dict = {}

    def fake_fit(system, adaptation, dataset, *, prior, config, **kwargs):
        seen.update(dataset=dataset, prior=prior, config=config)
        return [0.0] * config.steps

    monkeypatch.setattr(jobs, "fit", fake_fit)
    return seen


def test_each_subset_trains_with_its_own_caption_options(layout, tmp_path, monkeypatch):
    toml, *_ = layout
    seen = _spy_fit(monkeypatch)
    main_config = tmp_path / "kohya.toml"  # kohya's key in the training config; the run's options are the fallback
    main_config.write_text(f'dataset_config = "{toml}"\ncaption_tag_dropout_rate = 0.25\ntrain_batch_size = 7\n')
    assert main(["train", "lora", "--config", str(main_config), "--steps", "1", "-o", str(tmp_path / "x.safetensors"),
                 "-q"]) == 0
    dataset, (reg, weight), config = seen["dataset"], seen["prior"], seen["config"]
    assert config.batch_size == 2 and weight == 1.0  # the dataset block's batch_size wins, as kohya's
    by_name = {r.path.name: r.captions for r in [*dataset.records, *reg.records]}
    dog = CaptionOptions(shuffle=True, keep_tokens=1, tag_dropout=0.25)
    assert by_name["a.png"] == dog and by_name["b.png"] == dog
    assert by_name["c.png"] == CaptionOptions(keep_tokens=1, dropout=0.5, tag_dropout=0.25)
    assert by_name["r1.png"] == dog  # the reg subset: [general]'s options
    assert {r.bucket for r in dataset.records} == {(32, 32)}


def test_fit_draws_each_records_own_caption_options(tmp_path, monkeypatch):
    """fit's caption of record r at micro-batch m is ``(r.captions or dataset.captions).apply(caption,
    Random(f"{seed}/captions/{m}"), ...)``, the records of the batch in order on one stream."""
    for i in range(4):
        random_png(tmp_path / f"{i}.png", i)
    from sdadapt.training.data import find_images

    records, _ = find_images(tmp_path, default_caption="a red circle, small, blue, square")
    own = CaptionOptions(shuffle=True, keep_tokens=1)
    for record in records[:2]:
        record.captions = own
    plan_dataset(records, resolution=32, step=8)
    shared = CaptionOptions(dropout=0.5)
    dataset = Dataset(records, captions=shared)
    toy = load_toy()
    encode_buckets(dataset, toy.encode_images)
    texts: list[list[str]] = []
    real = toy.tokenize
    monkeypatch.setattr(toy, "tokenize", lambda captions: texts.append(list(captions)) or real(captions), raising=False)
    adaptation = METHODS["lora"].adapt(toy, rank=2)
    steps = 6
    try:
        fit(toy, adaptation, dataset, config=FitConfig(steps=steps, batch_size=2, learning_rate=1e-3, seed=3))
    finally:
        adaptation.remove()
    from sdadapt.training.data import epoch_batches

    per_epoch = len(epoch_batches(dataset, 2, seed=3, epoch=0))
    expected = []
    for micro in range(steps):
        bucket, positions = epoch_batches(dataset, 2, seed=3, epoch=micro // per_epoch)[micro % per_epoch]
        rng = random.Random(f"3/captions/{micro}")
        batch = [dataset.records[dataset.members[bucket][p]] for p in positions]
        expected.append([(own if r.captions is own else shared).apply(r.caption, rng) for r in batch])
    assert texts[-steps:] == expected
    assert any(t == "" for batch in expected for t in batch)  # the shared options' dropout happened
    assert any(t.startswith("a red circle, ") and t != "a red circle, small, blue, square" for batch in expected for t in batch)


def test_a_toy_run_from_a_dataset_config_writes_metadata_and_resumes_exactly(layout, tmp_path, capsys):
    toml, *_ = layout
    out = tmp_path / "a.safetensors"
    args = ["train", "lora", "--dataset-config", str(toml), "--steps", "4", "--network-dim", "2", "--prior-weight", "0.5"]
    assert main([*args, "--save-every-n-steps", "2", "-o", str(out)]) == 0
    captured = capsys.readouterr()
    assert "+ 2 class images" in captured.out and "the is_reg subsets" in captured.err
    # keep_tokens = 1 acts in the dog subset (it shuffles) though the run's --shuffle-caption is off: no "not used" note
    assert "--keep-tokens 1: not used" not in captured.err
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_num_train_images"] == "8" and meta["ss_num_reg_images"] == "2"
    # kohya's use_user_config branch: the run-wide dataset keys are left out (each dataset's own is in ss_datasets)
    assert "ss_batch_size_per_device" not in meta and "ss_enable_bucket" not in meta
    assert json.loads(meta["ss_dataset_dirs"]) == {"dog": {"n_repeats": 3, "img_count": 2},
                                                   "cat": {"n_repeats": 2, "img_count": 1}}
    assert "ss_reg_dataset_dirs" not in meta
    # kohya's ss_datasets (written with a dataset config): one dataset, its subsets as kohya lists them
    (entry,) = json.loads(meta["ss_datasets"])
    assert (entry["is_dreambooth"], entry["num_train_images"], entry["num_reg_images"], entry["batch_size_per_device"],
            entry["resolution"], entry["enable_bucket"]) == (True, 8, 2, 2, [32, 32], False)
    assert [(s["image_dir"], s["img_count"], s["num_repeats"], s["is_reg"], s["class_tokens"], s["shuffle_caption"],
             s["keep_tokens"]) for s in entry["subsets"]] == [
        ("dog", 2, 3, False, "a red circle", True, 1), ("cat", 1, 2, False, None, False, 1),
        ("reg", 2, 1, True, "a circle", True, 1)]
    resumed = tmp_path / "b.safetensors"
    assert main([*args, "--resume", str(tmp_path / "a-state"), "-o", str(resumed)]) == 0
    first, _ = read_safetensors(out)
    second, _ = read_safetensors(resumed)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    # an edited dataset config on resume is refused
    toml.write_text(toml.read_text().replace("num_repeats = 3", "num_repeats = 4"))
    assert main([*args, "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "c.safetensors")]) == 2
    assert "the dataset config / metadata: subsets[0].num_repeats 3 (now 4)" in capsys.readouterr().err


def _edited(toml: Path, old: str, new: str) -> Path:
    other = toml.with_name("edited.toml")
    other.write_text(toml.read_text().replace(old, new, 1))
    return other


def test_refusals_name_the_key_and_the_fix(layout, tmp_path):
    toml, dog, cat, reg = layout
    with pytest.raises(InputError, match="unknown key 'num_repeat' in datasets\\[0\\].subsets\\[0\\]; did you mean num_repeats"):
        _read(_edited(toml, "num_repeats = 3", "num_repeat = 3"))
    with pytest.raises(InputError, match="unknown key 'shufle_caption' in \\[general\\]; did you mean shuffle_caption"):
        _read(_edited(toml, "shuffle_caption = true", "shufle_caption = true"))
    with pytest.raises(InputError, match="unknown top-level key 'dataset'; did you mean datasets"):
        _read(_edited(toml, "[[datasets]]", "[[dataset]]"))
    with pytest.raises(InputError, match="subsets\\[0\\] has no image_dir"):
        _read(_edited(toml, f'image_dir = "{dog}"', 'is_reg = false'))
    with pytest.raises(InputError, match="keep_tokens: must be a whole number"):
        _read(_edited(toml, "keep_tokens = 1", "keep_tokens = 1.5"))
    with pytest.raises(InputError, match="subsets\\[1\\].flip_aug = true but datasets\\[0\\].subsets\\[0\\] has false"):
        _read(_edited(toml, "caption_dropout_rate = 0.5", "caption_dropout_rate = 0.5\n  flip_aug = true"))
    two = toml.with_name("two.toml")
    two.write_text(toml.read_text() + f'\n[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{dog}"\n')
    read = _read(two)  # (several blocks: kohya's, each its own resolution: tests/test_dataset_config_multi.py)
    assert [s.dataset for s in read.subsets] == [0, 0, 0, 1] and read.blocks[1]["resolution"] == (64, 64)
    with pytest.raises(InputError, match="mixes DreamBooth-style subsets"):
        _read(_edited(toml, f'image_dir = "{cat}"', f'metadata_file = "{tmp_path / "m.json"}"'))
    with pytest.raises(InputError, match="face_crop_aug_range = \\(2.0, 4.0\\) but datasets\\[0\\].subsets\\[0\\] has none"):
        _read(_edited(toml, "caption_dropout_rate = 0.5", "caption_dropout_rate = 0.5\n  face_crop_aug_range = [2.0, 4.0]"))
    with pytest.raises(InputError, match="LO must not be above HI"):
        _read(_edited(toml, "keep_tokens = 1", "keep_tokens = 1\nface_crop_aug_range = [4.0, 2.0]"))
    read = _read(_edited(toml, "keep_tokens = 1", "keep_tokens = 1\nface_crop_aug_range = [2.0, 4.0]"))  # ([general]: all)
    assert read.options["face_crop_aug_range"] == (2.0, 4.0) and read.reg_augment["face_crop_aug_range"] == (2.0, 4.0)
    assert read.record()["subsets"][0]["face_crop_aug_range"] == [2.0, 4.0]
    with pytest.raises(InputError, match="no training subset"):
        _read(_edited(_edited(toml, "num_repeats = 3", "num_repeats = 3\n  is_reg = true"), "num_repeats = 2",
                      "num_repeats = 2\n  is_reg = true"))
    # kohya's dataset-level validation_seed / validation_split: read into the run's options (held out when training)
    read = _read(_edited(toml, "keep_tokens = 1", "keep_tokens = 1\nvalidation_seed = 3\nvalidation_split = 0.25"))
    assert read.options["validation_seed"] == 3 and read.options["validation_split"] == 0.25
    # a missing folder: when the images are read (before the model loads), naming the subset
    with pytest.raises(ImageFolderError, match="subsets\\[0\\]: image_dir .* is not a folder"):
        dataset_records(_read(_edited(toml, f'image_dir = "{dog}"', f'image_dir = "{tmp_path / "nope"}"')))
    (tmp_path / "bare").mkdir()
    random_png(tmp_path / "bare" / "x.png", 9)
    with pytest.raises(ImageFolderError, match="subsets\\[0\\]: .*set class_tokens for the subset"):
        dataset_records(_read(_edited(_edited(toml, f'image_dir = "{dog}"', f'image_dir = "{tmp_path / "bare"}"'),
                                      'class_tokens = "a red circle"', "")))
    # duplicated subsets and num_repeats = 0 are skipped with a note, as kohya
    config = _read(_edited(toml, f'image_dir = "{cat}"', f'image_dir = "{dog}"'))
    assert [s.image_dir for s in config.subsets] == [dog, reg] and any("repeats image_dir" in n for n in config.notes)


def test_option_clashes_before_the_model_loads(layout, tmp_path, capsys):
    toml, _, _, reg = layout
    # (a reg folder beside a dataset TOML is unused, as kohya ignores it: said when the run starts,
    # tests/test_kohya_gui_configs.py; the kohya_ss GUI writes such pairs)
    TrainOptions(dataset_config=str(toml), reg_data_dir=str(reg))
    with pytest.raises(ValueError, match="no images"):
        TrainOptions()
    with pytest.raises(ValueError, match="fine-tuning data"):
        TrainOptions(images=".", in_json="m.json", reg_data_dir=str(reg))
    out = tmp_path / "o.safetensors"
    assert main(["train", "lora", "--dataset-config", str(toml), "--no-prior", "-o", str(out)]) == 2
    assert "--no-prior" in capsys.readouterr().err and not out.exists()
    assert main(["train", "lora", "--dataset-config", str(_edited(toml, "num_repeats = 3", "num_repeat = 3")),
                 "-o", str(out)]) == 2
    assert "did you mean num_repeats" in capsys.readouterr().err
    # a subset's caption option out of range: named with the subset, before the model loads
    assert main(["train", "lora", "--dataset-config", str(_edited(toml, "caption_dropout_rate = 0.5",
                                                                   "caption_dropout_rate = 1.5")), "-o", str(out)]) == 2
    assert "datasets[0].subsets[1]" in capsys.readouterr().err and not out.exists()
    # a dataset-block value out of range: named with the file
    zero = _edited(toml, "batch_size = 2", "batch_size = 0")
    assert main(["train", "lora", "--dataset-config", str(zero), "-o", str(out)]) == 2
    assert f"--dataset-config {zero}: --batch-size must be >= 1" in capsys.readouterr().err and not out.exists()
    with pytest.raises(InputError, match="resize_interpolation must be one of lanczos, nearest"):
        _read(_edited(toml, "keep_tokens = 1", 'keep_tokens = 1\nresize_interpolation = "lanczos3"'))


def test_in_json_captions_and_tags(tmp_path, monkeypatch):
    images = tmp_path / "imgs"
    random_png(images / "a.png", 1)
    random_png(images / "b.png", 2)
    random_png(tmp_path / "elsewhere" / "c.png", 3)
    metadata = {"a": {"caption": "a red circle", "tags": "small, centre"},  # key = the stem (kohya's default)
                "b.png": {"tags": "blue, square"},  # tags only
                str(tmp_path / "elsewhere" / "c.png"): {"caption": "a green circle\nsecond line"}}  # absolute key
    meta_file = tmp_path / "meta_cap.json"
    meta_file.write_text(json.dumps(metadata))
    fallback = _data_config_fallback(TrainOptions(images=str(images), repeats=2))
    train, reg, by_label, _ = dataset_records(in_json_config(meta_file, image_dir=images, fallback=fallback))
    assert reg is None and list(by_label) == ["meta_cap.json"]
    assert [(r.path, r.caption, r.repeats, r.folder) for r in train] == [
        (images / "a.png", "a red circle,small, centre", 2, "meta_cap.json"),
        (images / "b.png", "blue, square", 2, "meta_cap.json"),
        (tmp_path / "elsewhere" / "c.png", "a green circle", 2, "meta_cap.json")]
    # JSONL as kohya reads it
    lines = tmp_path / "meta.jsonl"
    lines.write_text(json.dumps({"image_path": "a.png", "caption": "a red circle"}) + "\n")
    assert [r.caption for r in dataset_records(in_json_config(lines, image_dir=images, fallback=fallback))[0]] == [
        "a red circle"]
    # missing images, missing captions: errors naming them
    meta_file.write_text(json.dumps({"nope": {"caption": "x"}}))
    with pytest.raises(ImageFolderError, match="not found \\(nope\\)"):
        dataset_records(in_json_config(meta_file, image_dir=images, fallback=fallback))
    meta_file.write_text(json.dumps({"a": {}}))
    with pytest.raises(ImageFolderError, match="neither a caption nor tags \\(a\\)"):
        dataset_records(in_json_config(meta_file, image_dir=images, fallback=fallback))
    # through train (kohya's TOML key in_json), captions reaching fit
    meta_file.write_text(json.dumps(metadata))
    seen = _spy_fit(monkeypatch)
    config = tmp_path / "kohya.toml"
    config.write_text(f'train_data_dir = "{images}"\nin_json = "{meta_file}"\ndataset_repeats = 2\n')
    assert main(["train", "lora", "--config", str(config), "--steps", "1", "-o", str(tmp_path / "x.safetensors"), "-q"]) == 0
    assert [r.caption for r in seen["dataset"].records] == ["a red circle,small, centre", "blue, square", "a green circle"]


def test_the_dataset_toml_in_docs_train_md_reads_as_the_page_says(tmp_path, monkeypatch):
    from docs_pages import code_blocks

    (block,) = [b for b in code_blocks("train.md", "toml") if "[[datasets.subsets]]" in b and b.count("[[datasets]]") == 1]
    monkeypatch.chdir(tmp_path)  # (paths are read from the current folder, as kohya)
    random_png(tmp_path / "img" / "sks_dog" / "a.png", 1)
    random_png(tmp_path / "img" / "extra" / "b.png", 2)
    (tmp_path / "img" / "extra" / "b.txt").write_text("a dog, on grass")
    random_png(tmp_path / "img" / "dogs" / "c.png", 3)
    (tmp_path / "dataset.toml").write_text(block)
    config = _read(tmp_path / "dataset.toml")
    assert config.options["resolution"] == (512, 512) and config.options["batch_size"] == 2
    train, reg, by_label, _ = dataset_records(config)
    assert [(r.caption, r.repeats) for r in train] == [("sks dog", 10), ("a dog, on grass", 2)]
    assert [(r.caption, r.repeats) for r in reg.records] == [("dog", 12)]  # balanced against 12 training samples
    assert (by_label["sks_dog"].captions["shuffle_caption"], by_label["extra"].captions["shuffle_caption"],
            by_label["extra"].captions["caption_dropout_rate"]) == (True, False, 0.1)


def test_subsets_with_the_same_folder_name_keep_their_own_options(tmp_path):
    random_png(tmp_path / "a" / "img" / "x.png", 1)
    random_png(tmp_path / "b" / "img" / "y.png", 2)
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "{tmp_path / "a" / "img"}"\n  class_tokens = "a, b"\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{tmp_path / "b" / "img"}"\n  class_tokens = "c, d"\n'
                    '  shuffle_caption = true\n')
    train, _, by_label, _ = dataset_records(_read(toml))
    assert [(r.path.name, r.folder) for r in train] == [("x.png", "img"), ("y.png", "img (2)")]
    assert (by_label["img"].captions["shuffle_caption"], by_label["img (2)"].captions["shuffle_caption"]) == (False, True)


def test_reg_subsets_never_take_the_runs_prompt_as_class_tokens(layout):
    """kohya has no run-wide class tokens; sdadapt lets a training subset fall back to --prompt, but
    the trained subject's words must never caption the prior (is_reg) images."""
    toml, *_ = layout
    bare = _edited(_edited(toml, 'class_tokens = "a circle"', ""), 'class_tokens = "a red circle"', "")
    config = _read(bare, prompt="sks circle")
    assert [(s.is_reg, s.class_tokens) for s in config.subsets] == [(False, "sks circle"), (False, "sks circle"),
                                                                    (True, None)]
    with pytest.raises(ImageFolderError, match="subsets\\[2\\]: .*set class_tokens for the subset"):
        dataset_records(config)
    # the file's own class_tokens ([general] here) still reach a reg subset, as kohya's lookup
    general = _edited(bare, "[general]", '[general]\nclass_tokens = "a shape"')
    assert [s.class_tokens for s in _read(general, prompt="sks circle").subsets] == ["a shape"] * 3


def test_the_resume_record_holds_absolute_paths_and_names_what_changed(tmp_path, monkeypatch):
    """A relative image_dir read from another current folder is other images: the record differs."""
    from sdadapt.training.dataset_config import record_changes

    for base in ("one", "two"):
        random_png(tmp_path / base / "img" / "x.png", 1)
        (tmp_path / base / "d.toml").write_text('[[datasets]]\n  [[datasets.subsets]]\n  image_dir = "img"\n'
                                                '  class_tokens = "a circle"\n  num_repeats = 3\n')
    monkeypatch.chdir(tmp_path / "one")
    here = json.loads(json.dumps(_read(Path("d.toml")).record()))
    assert here["subsets"][0]["image_dir"] == str((tmp_path / "one" / "img").resolve())
    assert json.loads(json.dumps(_read(Path("./d.toml")).record())) == here  # the same file, spelled otherwise
    monkeypatch.chdir(tmp_path / "two")
    there = json.loads(json.dumps(_read(Path("d.toml")).record()))
    one, two = (tmp_path / "one").resolve(), (tmp_path / "two").resolve()
    assert record_changes(here, there) == [f"source {str(one / 'd.toml')!r} (now {str(two / 'd.toml')!r})",
                                           f"subsets[0].image_dir {str(one / 'img')!r} (now {str(two / 'img')!r})"]
    assert record_changes(here, {**here, "subsets": []}) == ["subsets: 1 entry (now 0)"]


def test_fine_tuning_subsets_name_a_missing_metadata_file_and_keep_tags_only_captions(tmp_path):
    random_png(tmp_path / "imgs" / "a.png", 1)
    meta = tmp_path / "meta.json"
    toml = tmp_path / "ft.toml"
    toml.write_text(f'[[datasets]]\n  [[datasets.subsets]]\n  metadata_file = "{meta}"\n  image_dir = "{tmp_path / "imgs"}"\n'
                    "  enable_wildcard = true\n")
    with pytest.raises(ImageFolderError, match="subsets\\[0\\]: metadata_file .*meta.json: no such file"):
        dataset_records(_read(toml))
    meta.write_text("{not json")
    with pytest.raises(InputError, match="--dataset-config .*ft.toml: datasets\\[0\\].subsets\\[0\\]: .*meta.json: not valid JSON"):
        dataset_records(_read(toml))
    # with wildcards each caption line gets the tags; with no caption line kohya's join gives "" (runs recorded
    # before took the tags alone)
    meta.write_text(json.dumps({"a": {"tags": "blue,\nsquare"}}))
    assert [r.caption for r in dataset_records(_read(toml))[0]] == [""]
    assert [r.caption for r in dataset_records(_read(toml), assembly="before-kohya")[0]] == ["blue,,square"]
    meta.write_text(json.dumps({"a": {"caption": "one\ntwo", "tags": "blue"}}))
    assert [r.caption for r in dataset_records(_read(toml))[0]] == ["one,blue\ntwo,blue"]
