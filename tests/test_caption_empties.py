"""Empty captions and empty tags as kohya reads them, and ``--resume`` of a run recorded before.

kohya (sd-scripts 48d368fa, library/train_util.py): ``DreamBoothDataset.read_caption`` returns
``lines[0].strip()`` for a caption file (``""`` for an empty first line; with ``enable_wildcard`` the
non-empty lines joined), and ``load_dreambooth_dir`` uses the class tokens only when it returns ``None``
(no caption file), so such an image trains on ``""``. ``FineTuningDataset`` makes ``caption + separator +
tags`` and ``process_caption`` keeps its first line (``caption.split("\\n")[0]``), ``""`` when that line
is empty. ``process_caption`` keeps empty tags (tests/test_kohya_caption_options.py). Runs recorded before
(``run.json`` without ``caption_empties``) took the class tokens / ``--prompt`` and dropped empty tags;
a resumed one keeps doing so.
"""

from __future__ import annotations

import json
import os

import pytest
from train_inputs import captioned_pngs, lora_train_args, random_png

from sdadapt.cli import main
from sdadapt.errors import InputError
from sdadapt.images import ImageFolderError
from sdadapt.jobs.caption_lines import recorded_caption_empties
from sdadapt.training.data import EMPTIES_DROPPED, EMPTIES_KEPT, find_images
from sdadapt.training.dataset_config import dataset_records, in_json_config


def _kohya_read_caption(img_path: str, caption_extension: str, enable_wildcard: bool) -> str | None:
    """read_caption as kohya wrote it (without the face-crop name; an empty file is kohya's assert)."""
    cap_path = os.path.splitext(img_path)[0] + caption_extension
    if not os.path.isfile(cap_path):
        return None
    with open(cap_path, encoding="utf-8") as f:
        lines = f.readlines()
    if not lines:
        raise AssertionError(f"caption file is empty: {cap_path}")
    if enable_wildcard:
        return "\n".join([line.strip() for line in lines if line.strip() != ""])
    return lines[0].strip()


def _kohya_captions(folder, class_tokens: str | None, *, enable_wildcard: bool = False) -> dict[str, str]:
    """load_dreambooth_dir's captions: the file's, else the class tokens, else "" (kohya warns)."""
    out = {}
    for name in sorted(n for n in os.listdir(folder) if n.endswith(".png")):
        cap = _kohya_read_caption(os.path.join(folder, name), ".txt", enable_wildcard)
        out[name] = "" if cap is None and class_tokens is None else (class_tokens if cap is None else cap)
    return out


TEXTS = {"a": "\nbelow an empty first line\n", "b": "   \n\n", "c": "a red circle\n", "d": None, "e": " \t \nx, y"}


@pytest.fixture()
def blank_first_lines(tmp_path):
    folder = tmp_path / "imgs" / "2_sks toy"
    for i, (name, text) in enumerate(TEXTS.items()):
        random_png(folder / f"{name}.png", i, (8, 8))
        if text is not None:
            (folder / f"{name}.txt").write_text(text)
    return folder


@pytest.mark.parametrize("wildcard", [False, True])
def test_an_empty_first_line_is_the_empty_caption_as_kohyas_read_caption(blank_first_lines, wildcard):
    records, notes = find_images(blank_first_lines.parent, multiline=wildcard)
    got = {r.path.name: r.caption for r in records}
    assert got == _kohya_captions(blank_first_lines, "sks toy", enable_wildcard=wildcard)
    if not wildcard:
        assert got == {"a.png": "", "b.png": "", "c.png": "a red circle", "d.png": "sks toy", "e.png": ""}
        assert any("3 image(s) have a caption file with an empty caption" in n and "they train on the empty caption"
                   in n for n in notes)
    else:  # (the non-empty lines: only b has none)
        assert got["a.png"] == "below an empty first line" and got["b.png"] == "" and got["e.png"] == "x, y"
    # runs recorded before: the folder's class tokens (or --prompt) took their place
    legacy, notes = find_images(blank_first_lines.parent, multiline=wildcard, empties=EMPTIES_DROPPED)
    assert {r.path.name: r.caption for r in legacy}["b.png"] == "sks toy"
    assert not any("empty caption" in n for n in notes)
    with pytest.raises(ValueError, match="empties must be 'kept' or 'dropped'"):
        find_images(blank_first_lines.parent, empties="none")


def test_an_empty_caption_file_is_not_a_missing_one(tmp_path):
    """No class tokens and no --prompt: a missing caption file is an error, an empty caption is not (kohya
    trains both on ""; sdadapt refuses the missing one). A trigger-word method counts it as uncaptioned."""
    random_png(tmp_path / "a.png", 0, (8, 8))
    (tmp_path / "a.txt").write_text("\nsecond")
    random_png(tmp_path / "b.png", 1, (8, 8))
    (tmp_path / "b.txt").write_text("")  # (kohya asserts on a file without a line; sdadapt reads it as "")
    records, _ = find_images(tmp_path)
    assert [r.caption for r in records] == ["", ""]
    records, notes = find_images(tmp_path, uncaptioned=True)
    assert [r.caption for r in records] == ["", ""] and any("they count as uncaptioned" in n for n in notes)
    with pytest.raises(ImageFolderError, match="2 image\\(s\\) have no caption file"):
        find_images(tmp_path, empties=EMPTIES_DROPPED)  # (as runs recorded before)


def test_a_fine_tuning_entry_whose_first_line_is_empty_trains_on_the_empty_caption(tmp_path):
    for i in range(3):
        random_png(tmp_path / "img" / f"i{i}.png", i, (8, 8))
    meta = {"i0": {"caption": "\nsecond line", "tags": ""}, "i1": {"caption": "a cat", "tags": "x"},
            "i2": {"caption": "", "tags": "\nfoo"}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    config = in_json_config(tmp_path / "meta.json", image_dir=tmp_path / "img", fallback={})
    train, _, _, notes = dataset_records(config)
    # kohya: (caption + "," + tags).split("\n")[0]: "", "a cat,x", ""
    assert {r.path.name: r.caption for r in train} == {"i0.png": "", "i1.png": "a cat,x", "i2.png": ""}
    assert any("2 image(s) of" in n and "they train on the empty caption" in n for n in notes)
    with pytest.raises(ImageFolderError, match="neither a caption nor tags"):
        dataset_records(config, empties=EMPTIES_DROPPED)  # (runs recorded before refused them)
    meta["i1"] = {"caption": "", "tags": ""}  # (neither: still refused, as a missing caption file)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises((ImageFolderError, InputError), match="neither a caption nor tags \\(i1\\)"):
        dataset_records(in_json_config(tmp_path / "meta.json", image_dir=tmp_path / "img", fallback={}))


def test_the_recorded_rule():
    assert recorded_caption_empties(None) == EMPTIES_KEPT
    assert recorded_caption_empties({"step": 2, "caption_lines": "first-line", "vae": None}) == EMPTIES_DROPPED
    assert recorded_caption_empties({"step": 2, "caption_empties": "kept"}) == EMPTIES_KEPT
    assert recorded_caption_empties({"step": 2, "caption_empties": "dropped"}) == EMPTIES_DROPPED
    with pytest.raises(ValueError, match="caption_empties 'none' is not 'kept' or 'dropped'; the file was edited"):
        recorded_caption_empties({"step": 2, "caption_empties": "none"})


def test_resume_of_an_old_state_keeps_dropping_empties_and_a_new_run_keeps_them(tmp_path, train_fit_calls):
    images = captioned_pngs(tmp_path / "imgs", [(32, 32)] * 3, caption=["\nsecond line", "red, circle, ", "a blue square"])
    args = lora_train_args(images, "--seed", "1", "--prompt", "fallback", "--shuffle-caption", "-q")
    assert main([*args, "--steps", "1", "--save-state-on-train-end", "-o", str(tmp_path / "a.safetensors")]) == 0
    dataset = train_fit_calls[-1].dataset
    assert [r.caption for r in dataset.records][:2] == ["", "red, circle,"] and dataset.captions.keep_empty_tags
    record_file = tmp_path / "a-state" / "run.json"
    record = json.loads(record_file.read_text())
    assert record["caption_empties"] == "kept"

    assert main([*args, "--steps", "2", "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "b.safetensors"),
                 "--no-save-state"]) == 0
    assert train_fit_calls[-1].dataset.records[0].caption == "" and train_fit_calls[-1].dataset.captions.keep_empty_tags

    del record["caption_empties"]  # (a state saved before empties were kept)
    record_file.write_text(json.dumps(record))
    assert main([*args, "--steps", "2", "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "c.safetensors"),
                 "--save-state-on-train-end"]) == 0
    dataset = train_fit_calls[-1].dataset
    assert dataset.records[0].caption == "fallback" and not dataset.captions.keep_empty_tags
    assert json.loads(record_file.read_text())["caption_empties"] == "dropped"  # (a further resume keeps dropping)


# --- review R1: every path of a resumed run keeps its recorded rule --------------------------------------------------


@pytest.fixture()
def fit_priors(monkeypatch):
    """fit's ``images`` and ``prior`` (the class-image dataset and weight, or None) at each call."""
    import importlib
    import inspect

    jobs = importlib.import_module("sdadapt.jobs.train")
    calls: list[tuple] = []
    real = jobs.fit
    signature = inspect.signature(real)

    def spy(*args, **kwargs):
        bound = signature.bind(*args, **kwargs).arguments
        calls.append((bound["images"], bound.get("prior")))
        return real(*args, **kwargs)

    monkeypatch.setattr(jobs, "fit", spy)
    return calls


def test_a_resumed_old_run_keeps_dropping_with_class_images_warmup_and_periodic_saves(tmp_path, fit_priors):
    """--reg-data-dir's captions, the token warm-up's caption options (rebuilt once the steps are known)
    and the run.json of a periodic save all keep the resumed run's ``caption_empties``."""
    images = captioned_pngs(tmp_path / "imgs", [(32, 32)] * 2, caption=["\nsecond line", "red, circle, "])
    regs = tmp_path / "regs" / "1_toy"
    for i, text in enumerate(["\nan empty first line", "a toy, photo"]):
        random_png(regs / f"r{i}.png", 20 + i, (32, 32))
        (regs / f"r{i}.txt").write_text(text)
    args = ["train", "lora", "--images", str(images), "--batch-size", "2", "--reg-data-dir", str(tmp_path / "regs"),
            "--prompt", "fallback", "--shuffle-caption", "--token-warmup-step", "1", "--seed", "1", "-q"]
    assert main([*args, "--steps", "1", "--save-state-on-train-end", "-o", str(tmp_path / "a.safetensors")]) == 0
    dataset, (reg_dataset, _) = fit_priors[-1]
    assert [r.caption for r in reg_dataset.records] == ["", "a toy, photo"]  # (kohya's: "" for the empty first line)
    assert dataset.captions.keep_empty_tags and reg_dataset.captions.keep_empty_tags
    assert dataset.captions.token_warmup_steps == 1  # (the warm-up's options: rebuilt once the steps are known)

    record_file = tmp_path / "a-state" / "run.json"
    record = json.loads(record_file.read_text())
    del record["caption_empties"]  # (a state saved before empties were kept)
    record_file.write_text(json.dumps(record))
    assert main([*args, "--steps", "3", "--resume", str(tmp_path / "a-state"), "--save-every-n-steps", "1",
                 "-o", str(tmp_path / "b.safetensors")]) == 0
    dataset, (reg_dataset, _) = fit_priors[-1]
    assert [r.caption for r in dataset.records] == ["fallback", "red, circle,"]
    assert [r.caption for r in reg_dataset.records] == ["toy", "a toy, photo"]  # (the folder's class tokens, as before)
    assert dataset.captions.token_warmup_steps == 1
    assert not dataset.captions.keep_empty_tags and not reg_dataset.captions.keep_empty_tags
    assert json.loads(record_file.read_text())["step"] == 2  # (the periodic save of step 2 wrote this record)
    assert json.loads(record_file.read_text())["caption_empties"] == "dropped"


def test_a_resumed_old_run_keeps_dropping_in_a_dataset_toml(tmp_path, train_fit_calls):
    """A dataset TOML's subsets (their records and their own caption options) and its is_reg subsets keep the
    resumed run's ``caption_empties`` too."""
    data = tmp_path / "data"
    for name, texts in (("imgs", ["\nsecond line", "red, circle, "]), ("regs", ["\nempty first line", "a toy"])):
        for i, text in enumerate(texts):
            random_png(data / name / f"{name}{i}.png", len(name) + i, (32, 32))
            (data / name / f"{name}{i}.txt").write_text(text)
    toml = tmp_path / "data.toml"
    toml.write_text("[general]\nshuffle_caption = true\n[[datasets]]\nbatch_size = 2\n"
                    f'[[datasets.subsets]]\nimage_dir = "{(data / "imgs").as_posix()}"\nclass_tokens = "sks toy"\n'
                    "keep_tokens = 1\n"
                    f'[[datasets.subsets]]\nimage_dir = "{(data / "regs").as_posix()}"\nclass_tokens = "toy"\n'
                    "is_reg = true\n")
    args = ["train", "lora", "--dataset-config", str(toml), "--seed", "1", "-q"]
    assert main([*args, "--steps", "1", "--save-state-on-train-end", "-o", str(tmp_path / "a.safetensors")]) == 0
    records = train_fit_calls[-1].dataset.records
    assert [r.caption for r in records] == ["", "red, circle,"]
    assert all(r.captions is not None and r.captions.keep_empty_tags and r.captions.keep_tokens == 1 for r in records)

    record_file = tmp_path / "a-state" / "run.json"
    record = json.loads(record_file.read_text())
    del record["caption_empties"]  # (a state saved before empties were kept)
    record_file.write_text(json.dumps(record))
    assert main([*args, "--steps", "2", "--resume", str(tmp_path / "a-state"), "--no-save-state",
                 "-o", str(tmp_path / "b.safetensors")]) == 0
    records = train_fit_calls[-1].dataset.records
    assert [r.caption for r in records] == ["sks toy", "red, circle,"]  # (the subset's class tokens, as before)
    assert all(r.captions is not None and not r.captions.keep_empty_tags and r.captions.keep_tokens == 1 for r in records)


def test_the_root_folder_key_is_the_folders_name_as_written_without_the_dot(tmp_path, monkeypatch):
    """``--images .`` / ``--reg-data-dir .`` (and a trailing slash): the images directly in the folder are keyed
    by the folder's own name (kohya's ``os.path.basename(image_dir)`` of the path written without the dot or
    the slash; kohya itself would write ``"."`` and ``""`` for those spellings)."""
    from sdadapt.training.data import (
        dataset_dirs_of,
        kohya_folder_name,
        kohya_folder_names,
    )
    from sdadapt.training.reg_data import find_reg_images

    root = tmp_path / "data" / "my imgs"
    for i in range(2):
        random_png(root / f"i{i}.png", i, (8, 8))
        (root / f"i{i}.txt").write_text("a toy")
    random_png(root / "3_sks toy" / "j.png", 5, (8, 8))
    monkeypatch.chdir(root)
    assert kohya_folder_name(".") == kohya_folder_name("./") == kohya_folder_name(root) == "my imgs"
    assert kohya_folder_name(f"{root}{os.sep}") == "my imgs"
    records, _ = find_images(".")
    assert {r.folder for r in records} == {".", "3_sks toy"}  # (the records keep their folder relative to the root)
    assert dataset_dirs_of(kohya_folder_names(records, ".")) == {
        "my imgs": {"n_repeats": 1, "img_count": 2}, "3_sks toy": {"n_repeats": 3, "img_count": 1}}
    reg = find_reg_images(".", train_samples=5)
    assert reg.dirs == {"my imgs": {"n_repeats": 1, "img_count": 2}, "3_sks toy": {"n_repeats": 3, "img_count": 1}}
    assert sorted({r.folder for r in reg.found}) == ["3_sks toy", "my imgs"]


def test_a_toml_subset_of_the_current_folder_is_not_keyed_by_the_empty_name(tmp_path, monkeypatch):
    from sdadapt.jobs.train import TrainOptions, _data_config_fallback
    from sdadapt.training.data import kohya_folder_name
    from sdadapt.training.dataset_config import read_dataset_config

    root = tmp_path / "imgs"
    random_png(root / "i0.png", 0, (8, 8))
    (root / "i0.txt").write_text("a toy")
    (tmp_path / "data.toml").write_text('[[datasets]]\n[[datasets.subsets]]\nimage_dir = "."\n')
    monkeypatch.chdir(root)
    subset = read_dataset_config(tmp_path / "data.toml", fallback=_data_config_fallback(TrainOptions(images="."))).subsets[0]
    assert subset.label in {".", kohya_folder_name(".")}  # (kohya's literal basename, or sdadapt's --images . name)
