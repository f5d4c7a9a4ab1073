"""``ss_tag_frequency`` counted exactly as kohya counts it.

Reference (transcribed below): sd-scripts ``library/train_util.py`` — ``DreamBoothDataset``'s
``read_caption`` (the caption file's first line, stripped; wildcard mode: the non-empty lines joined
by "\\n"), the class tokens of an ``N_tokens`` folder for an image without a caption file, and
``BaseDataset.set_tag_frequency`` (split at ",", strip, skip empty, lower-case, count every
occurrence) called for every subset, the regularisation folders too, keyed by folder name.
"""

from __future__ import annotations

import os

from train_inputs import random_png

from sdadapt.training.data import find_images, tag_frequency_of
from sdadapt.training.reg_data import find_reg_images


def kohya_read_caption(img_path: str, caption_extension: str, enable_wildcard: bool) -> str | None:
    base_name = os.path.splitext(img_path)[0]
    cap_path = base_name + caption_extension
    if not os.path.isfile(cap_path):
        return None
    with open(cap_path, "rt", encoding="utf-8") as f:
        lines = f.readlines()
    if enable_wildcard:
        return "\n".join([line.strip() for line in lines if line.strip() != ""])
    return lines[0].strip()


def kohya_tag_frequency(subset_dirs: list[str], *, enable_wildcard: bool = False) -> dict[str, dict[str, int]]:
    """train_util.py's loop: per subset (folder ``N_class tokens``), captions, then set_tag_frequency."""
    tag_frequency: dict[str, dict[str, int]] = {}
    for image_dir in subset_dirs:
        class_tokens = os.path.basename(image_dir).split("_", 1)[1]
        captions = []
        for img_path in sorted(os.path.join(image_dir, n) for n in os.listdir(image_dir) if n.endswith(".png")):
            cap_for_img = kohya_read_caption(img_path, ".txt", enable_wildcard)
            if cap_for_img is None and class_tokens is None:
                captions.append("")
            else:
                captions.append(class_tokens if cap_for_img is None else cap_for_img)
        dir_name = os.path.basename(image_dir)  # set_tag_frequency(dir_name, captions)
        frequency_for_dir = tag_frequency.get(dir_name, {})
        tag_frequency[dir_name] = frequency_for_dir
        for caption in captions:
            for tag in caption.split(","):
                tag = tag.strip()
                if tag:
                    tag = tag.lower()
                    frequency = frequency_for_dir.get(tag, 0)
                    frequency_for_dir[tag] = frequency + 1
    return tag_frequency


CAPTIONS = {
    "3_sks dog": ["Red, red, circle", "RED,  , blue square ,circle", None, "green\nsecond line, ignored",
                  "a; b, c;d"],
    "1_cat": ["Cat, cat, CAT", ",,", "solo"],
}
REG = {"1_dog": ["a dog, Dog", None, "dog, photo"]}


def _write(root, folders):
    for name, captions in folders.items():
        (root / name).mkdir(parents=True)
        for i, caption in enumerate(captions):
            random_png(root / name / f"i{i}.png", i, (8, 8))
            if caption is not None:
                (root / name / f"i{i}.txt").write_text(caption + "\n")
    return [str(root / name) for name in folders]


def test_tag_frequency_matches_kohyas_loop_train_and_reg(tmp_path):
    train_dirs = _write(tmp_path / "train", CAPTIONS)
    reg_dirs = _write(tmp_path / "reg", REG)
    records, _ = find_images(tmp_path / "train")
    reg = find_reg_images(tmp_path / "reg", train_samples=100)  # (every reg image used)
    want = kohya_tag_frequency(train_dirs + reg_dirs)
    assert tag_frequency_of([*records, *reg.records]) == want
    assert want["3_sks dog"]["red"] == 3 and want["1_cat"]["cat"] == 3 and want["3_sks dog"]["sks dog"] == 1
    assert want["1_dog"] == {"a dog": 1, "dog": 3, "photo": 1}  # (the caption-less image: its class tokens)


def test_wildcard_captions_count_as_kohya_joins_them(tmp_path):
    dirs = _write(tmp_path, {"2_x": ["a, b\nc, D", "one"]})
    records, _ = find_images(tmp_path, multiline=True)
    assert tag_frequency_of(records) == kohya_tag_frequency(dirs, enable_wildcard=True)
