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
    """train_util.py's loop: per subset (folder ``N_class tokens``; a folder without ``_``: a dataset-TOML
    subset without class tokens), captions, then set_tag_frequency."""
    tag_frequency: dict[str, dict[str, int]] = {}
    for image_dir in subset_dirs:
        name = os.path.basename(image_dir)
        class_tokens = name.split("_", 1)[1] if "_" in name else None
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


def test_reg_images_balancing_leaves_unused_are_counted_as_kohya_counts_them(tmp_path):
    """kohya counts every reg caption in load_dreambooth_dir, before balancing drops the unused images: with 2
    training samples only 2 of the 3 reg images train, all 3 are counted (RegImages.found)."""
    reg_dirs = _write(tmp_path / "reg", REG)
    reg = find_reg_images(tmp_path / "reg", train_samples=2)
    assert len(reg.records) == 2 and len(reg.found) == 3
    assert tag_frequency_of(reg.found) == kohya_tag_frequency(reg_dirs) != tag_frequency_of(reg.records)


def test_wildcard_captions_count_as_kohya_joins_them(tmp_path):
    dirs = _write(tmp_path, {"2_x": ["a, b\nc, D", "one"]})
    records, _ = find_images(tmp_path, multiline=True)
    assert tag_frequency_of(records) == kohya_tag_frequency(dirs, enable_wildcard=True)


# ----------------------------------------------------------------------------- review RM additions


def test_every_occurrence_counts_and_templates_only_for_caption_less_images():
    from sdadapt.training.data import ImageRecord

    records = [ImageRecord(None, "x,x, X ,y", folder="2_a"), ImageRecord(None, "", folder="2_a"),
               ImageRecord(None, "z", folder="1_b")]
    assert tag_frequency_of(records) == {"2_a": {"x": 3, "y": 1}, "1_b": {"z": 1}}
    # sdadapt's trigger-word templates: a caption-less image counts each template's tags, a captioned one its own
    got = tag_frequency_of(records, templates=("a photo of sks, Toy", "sks"))
    assert got == {"2_a": {"x": 3, "y": 1, "a photo of sks": 1, "toy": 1, "sks": 1}, "1_b": {"z": 1}}


def test_inner_whitespace_is_kept_as_kohya_reads_it(tmp_path):
    """kohya's read_caption keeps ``lines[0].strip()``: the tag is ``"red  ball"`` (two spaces), in the
    wildcard mode too; the CLIP tokenizer folds the white space, so the ids trained on are those of the
    collapsed text that sdadapt read before."""
    from sdadapt.clip_tokenizer import CLIPTokenizer

    dirs = _write(tmp_path, {"1_x": ["red  ball,\tblue"]})
    records, _ = find_images(tmp_path)
    assert records[0].caption == "red  ball,\tblue"
    assert tag_frequency_of(records) == kohya_tag_frequency(dirs) == {"1_x": {"red  ball": 1, "blue": 1}}
    wild, _ = find_images(tmp_path, multiline=True)
    assert tag_frequency_of(wild) == kohya_tag_frequency(dirs, enable_wildcard=True)
    tokenizer = CLIPTokenizer.from_file()
    assert tokenizer.encode(records[0].caption) == tokenizer.encode("red ball, blue")


def test_fine_tuning_subsets_count_only_the_tags(tmp_path):
    import json

    from sdadapt.training.dataset_config import dataset_records, in_json_config

    (tmp_path / "img").mkdir()
    for i in range(2):
        random_png(tmp_path / "img" / f"i{i}.png", i, (8, 8))
    (tmp_path / "meta.json").write_text(json.dumps({"i0": {"caption": "A photo of a dog", "tags": "dog, Solo"},
                                                     "i1": {"caption": "a cat", "tags": ""}}))
    train, _, _, _ = dataset_records(in_json_config(tmp_path / "meta.json", image_dir=tmp_path / "img", fallback={}))
    assert tag_frequency_of(train) == {"meta.json": {"dog": 1, "solo": 1}}


def test_the_folder_keys_are_kohyas_subset_names(tmp_path):
    """``--images imgs`` with images directly in it is kohya's dataset TOML with a subset ``image_dir = imgs``
    (its ``train_data_dir`` reads only the ``N_name`` sub-folders): train_network.py keys ``ss_dataset_dirs``
    / ``ss_reg_dataset_dirs`` and ``set_tag_frequency`` by ``os.path.basename(subset.image_dir)``, so the
    images directly in ``imgs`` are ``imgs`` (not ``"."``), and ``--reg-data-dir regs``' are ``regs``."""
    import json

    from safetensors import safe_open

    from sdadapt.cli import main

    imgs, regs = tmp_path / "data" / "imgs", tmp_path / "data" / "regs"
    folders = {imgs: ["Red, circle", "red, ball, "], imgs / "2_sks toy": [None, "\nan empty first line"],
               regs: ["a toy, Red"], regs / "1_toy": [None, "toy, photo"]}
    for seed, (folder, captions) in enumerate(folders.items()):
        for i, caption in enumerate(captions):
            random_png(folder / f"i{i}.png", 10 * seed + i, (32, 32))
            if caption is not None:
                (folder / f"i{i}.txt").write_text(caption + "\n")
    out = tmp_path / "a.safetensors"
    assert main(["train", "lora", "--images", str(imgs), "--reg-data-dir", str(regs), "--steps", "1", "--batch-size",
                 "2", "--network-dim", "2", "-o", str(out), "-q"]) == 0
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    subsets = [(str(imgs), 1, 2), (str(imgs / "2_sks toy"), 2, 2)]  # (image_dir, num_repeats, img_count)
    reg_subsets = [(str(regs), 1, 1), (str(regs / "1_toy"), 1, 2)]
    kohya_dirs = {os.path.basename(d): {"n_repeats": n, "img_count": c} for d, n, c in subsets}
    kohya_reg_dirs = {os.path.basename(d): {"n_repeats": n, "img_count": c} for d, n, c in reg_subsets}
    assert json.loads(meta["ss_dataset_dirs"]) == kohya_dirs and set(kohya_dirs) == {"imgs", "2_sks toy"}
    assert json.loads(meta["ss_reg_dataset_dirs"]) == kohya_reg_dirs
    want = kohya_tag_frequency([d for d, _, _ in subsets + reg_subsets])
    assert json.loads(meta["ss_tag_frequency"]) == want
    assert want["imgs"] == {"red": 2, "circle": 1, "ball": 1} and want["regs"] == {"a toy": 1, "red": 1}
    assert want["2_sks toy"] == {"sks toy": 1}  # (the empty first line counts nothing, not the class tokens)
