"""Dataset folders and TOMLs as kohya reads them (audit against sd-scripts 48d368fa's config_util / train_util):
hidden files are not images (macOS ``._name.png`` resource forks stopped a run), an image with both a ``.txt`` and a
``.caption`` file says which one it read, a dataset TOML leaving keys to the run says where sdadapt's defaults
differ from kohya's, and bucket limits outside the resolution are refused as kohya refuses them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from train_inputs import random_png

from sdadapt.images import is_image_file
from sdadapt.jobs.train import TrainOptions, _bucket_plan, _data_config_fallback
from sdadapt.training.data import find_images
from sdadapt.training.dataset_config import read_dataset_config, subset_records


def test_hidden_files_are_not_images(tmp_path):
    random_png(tmp_path / "a.png", 1)
    random_png(tmp_path / "B.PNG", 2)
    (tmp_path / "._a.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble junk")  # (not an image: reading it fails)
    (tmp_path / ".hidden.png").write_bytes(b"junk")
    (tmp_path / "folder.png").mkdir()
    random_png(tmp_path / "2_cat" / "c.png", 3)
    (tmp_path / "2_cat" / "._c.png").write_bytes(b"junk")
    for name in ("a.png", "B.PNG", "2_cat/c.png"):
        assert is_image_file(tmp_path / name), name
    for name in ("._a.png", ".hidden.png", "folder.png"):
        assert not is_image_file(tmp_path / name), name
    records, notes = find_images(tmp_path, default_caption="a cat")
    assert sorted(r.path.name for r in records) == ["B.PNG", "a.png", "c.png"]
    assert [r.repeats for r in sorted(records, key=lambda r: r.path.name)] == [1, 1, 2]
    hidden = [n for n in notes if "hidden file(s)" in n]
    assert len(hidden) == 1 and "3 hidden file(s)" in hidden[0] and "2_cat/._c.png" in hidden[0]


def test_avif_images_and_folders_inside_an_n_name_folder_are_said_skipped(tmp_path):
    """kohya's glob_images reads no folder inside an N_name one, and an .avif image only with the pillow_avif plugin
    (not in its requirements); they were skipped without a word."""
    random_png(tmp_path / "a.png", 1)
    (tmp_path / "b.avif").write_bytes(b"\x00\x00\x00\x1cftypavif")
    random_png(tmp_path / "2_cat" / "c.png", 3)
    random_png(tmp_path / "2_cat" / "more" / "d.png", 4)
    records, notes = find_images(tmp_path, default_caption="a cat")
    assert sorted(r.path.name for r in records) == ["a.png", "c.png"]
    said = [n for n in notes if "skipped" in n and "glob_images" in n]
    assert len(said) == 1 and "2_cat/more" in said[0] and "b.avif" in said[0]


def test_an_image_with_both_caption_files_says_which_it_read(tmp_path):
    random_png(tmp_path / "a.png", 1)
    (tmp_path / "a.txt").write_text("1girl, dog, grass")  # (kohya's WD14 tagger writes .txt)
    (tmp_path / "a.caption").write_text("a photo of a dog on grass")  # (its BLIP captioner writes .caption)
    random_png(tmp_path / "b.png", 2)
    (tmp_path / "b.txt").write_text("only a txt")
    for extension, read, other in ((".txt", "1girl, dog, grass", "a.caption"),
                                   (".caption", "a photo of a dog on grass", "a.txt")):
        records, notes = find_images(tmp_path, caption_extension=extension)
        assert {r.path.name: r.caption for r in records}["a.png"] == read
        both = [n for n in notes if "both a .txt and a .caption" in n]
        assert len(both) == 1 and "1 image(s)" in both[0] and f"not {other}" in both[0], notes


def _toml(tmp_path, *, general: str = "", subset: str = "") -> object:
    random_png(tmp_path / "img" / "a.png", 1)
    (tmp_path / "img" / "a.txt").write_text("a photo")
    toml = tmp_path / "d.toml"
    toml.write_text(f'[general]\n{general}\n[[datasets]]\nresolution = 32\n  [[datasets.subsets]]\n'
                    f'  image_dir = "{(tmp_path / "img").as_posix()}"\n  {subset}\n')
    return toml


@pytest.mark.parametrize("kohya_run", [False, True])
def test_a_dataset_toml_leaving_keys_to_the_run_notes_sdadapts_defaults(tmp_path, kohya_run):
    toml = _toml(tmp_path)
    options = TrainOptions(images=".", **({"caption_extension": ".caption", "batch_size": 1, "enable_bucket": False}
                                          if kohya_run else {}))
    notes = read_dataset_config(toml, fallback=_data_config_fallback(options)).notes
    said = {name for name in ("caption_extension", "batch_size", "enable_bucket")
            if any(n.startswith(f"{name} is not in the file") for n in notes)}
    # (sdadapt's defaults: .txt, 4, buckets on — each differs from kohya's .caption, 1, off)
    assert said == (set() if kohya_run else {"caption_extension", "batch_size", "enable_bucket"}), notes
    toml = _toml(tmp_path, general='caption_extension = ".txt"\nbatch_size = 4\nenable_bucket = true')
    assert not [n for n in read_dataset_config(toml, fallback=_data_config_fallback(TrainOptions(images="."))).notes
                if "is not in the file" in n]
    records, _ = subset_records(read_dataset_config(toml, fallback=_data_config_fallback(options)).subsets[0])
    assert [r.caption for r in records] == ["a photo"]


def _kohya_accepts(resolution: tuple[int, int], low: int, high: int, steps: int) -> bool:
    """kohya's BaseDataset.adjust_min_max_bucket_reso_by_steps (sd-scripts 48d368fa library/train_util.py:747-773),
    transcribed: the limits moved onto the step (min down, max up), then asserted against the resolution."""
    if low % steps != 0:
        low = low - low % steps
    if high % steps != 0:
        high = high + steps - high % steps
    return min(resolution) >= low and max(resolution) <= high


@settings(max_examples=60, deadline=None)
@given(height=st.sampled_from([256, 512, 768]), width=st.sampled_from([256, 512, 1024]),
       low=st.integers(64, 1100), high=st.integers(128, 2200), steps=st.sampled_from([32, 64]))
def test_bucket_limits_outside_the_resolution_are_refused_as_kohya(height, width, low, high, steps):
    options = TrainOptions(images=".", resolution=(height, width), min_bucket_reso=low, max_bucket_reso=high,
                           bucket_reso_steps=steps)
    if _kohya_accepts((width, height), low, high, steps):
        assert _bucket_plan(options, native=512, multiple=8) == (height, width, steps)
    else:
        with pytest.raises(ValueError, match="bucket-reso .*kohya refuses it"):
            _bucket_plan(options, native=512, multiple=8)
    # without buckets the limits are unused (kohya adjusts them only with enable_bucket)
    off = TrainOptions(images=".", resolution=(height, width), min_bucket_reso=low, max_bucket_reso=high,
                       bucket_reso_steps=steps, enable_bucket=False)
    assert _bucket_plan(off, native=512, multiple=8) == (height, width, steps)
