"""Review of the DreamBooth class-image folder (sdadapt.training.class_folder): reading a folder that holds other
files, other prompts, other sizes and your own images (diffusers' DreamBoothDataset reads every image of
--class_data_dir and captions each with --class_prompt: examples/dreambooth/train_dreambooth.py:647-655)."""

from __future__ import annotations

import pytest
import torch

from sdadapt.errors import InputError
from sdadapt.images import write_png
from sdadapt.training.class_folder import (
    PROMPT_KEY,
    class_image_files,
    read_class_folder,
)


def _png(path, *, prompt=None, h=8, w=8, value=0.0):
    write_png(path, torch.full((3, h, w), value), text=None if prompt is None else {PROMPT_KEY: prompt})
    return path


def test_only_image_files_in_index_order_then_by_name(tmp_path):
    _png(tmp_path / "10-b.png", prompt="dog")
    _png(tmp_path / "9-a.png", prompt="dog")
    _png(tmp_path / "mine.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "2-x.json").write_text("{}")
    (tmp_path / "sub").mkdir()
    assert [p.name for p in class_image_files(tmp_path)] == ["9-a.png", "10-b.png", "mine.png"]
    assert class_image_files(tmp_path / "missing") == []


def test_captions_and_refusals_name_the_file(tmp_path):
    _png(tmp_path / "0-a.png", prompt="a dog", value=0.5)
    _png(tmp_path / "1-b.png", value=-0.5)  # (your own image: no prompt recorded)
    images, captions = read_class_folder(tmp_path, count=2, class_prompt="a dog")
    assert captions == ["a dog", "a dog"] and images.shape == (2, 3, 8, 8)
    assert images[0, 0, 0, 0].item() == pytest.approx(0.5, abs=1 / 255) and images[1].mean() < 0
    with pytest.raises(InputError, match="1-b.png records no prompt"):
        read_class_folder(tmp_path, count=2, class_prompt=None)
    assert read_class_folder(tmp_path, count=1, class_prompt=None)[1] == ["a dog"]
    with pytest.raises(InputError, match="0-a.png was made for the class prompt 'a dog', not 'a cat'"):
        read_class_folder(tmp_path, count=1, class_prompt="a cat")
    with pytest.raises(InputError, match="holds 2 class image\\(s\\), 3 wanted"):
        read_class_folder(tmp_path, count=3, class_prompt="a dog")


def test_one_size_without_a_size_asked(tmp_path):
    _png(tmp_path / "0-a.png", prompt="p", h=8, w=8)
    _png(tmp_path / "1-b.png", prompt="p", h=8, w=16)
    with pytest.raises(InputError, match="1-b.png is 16x8 \\(width x height\\), the class images here are 8x8"):
        read_class_folder(tmp_path, count=2, class_prompt="p")
    with pytest.raises(InputError, match="0-a.png is 8x8"):
        read_class_folder(tmp_path, count=1, class_prompt="p", size=(8, 16))
    assert read_class_folder(tmp_path, count=0, class_prompt="p")[0].shape == (0, 3, 0, 0)
