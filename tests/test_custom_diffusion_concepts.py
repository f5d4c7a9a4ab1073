"""diffusers' ``--concepts_list`` for ``train custom-diffusion --concepts-list FILE.json``
(:mod:`sdadapt.custom_diffusion.concepts`), against a transcription of
huggingface/diffusers@58eb52c0803ea9af3abec60841c2a093bdf1f951, examples/custom_diffusion/train_custom_diffusion.py:
the list read with ``json.load`` (:724-726), class images generated where a folder holds fewer than
``--num_class_images`` (:750-782), and ``CustomDiffusionDataset`` pairing each concept's images with its
``instance_prompt`` and its class images with its ``class_prompt`` (:200-223, :260-310)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from sdadapt.cli import main
from sdadapt.custom_diffusion import concept_class_images, concept_records, read_concepts_list
from sdadapt.custom_diffusion.concepts import missing_class_images
from sdadapt.errors import InputError
from sdadapt.images import read_image_channels, to_uint8, write_png


def _images(folder: Path, n: int, *, seed: int = 0, size: int = 16, names: str = "img") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    for i in range(n):
        write_png(folder / f"{names}{i}.png", torch.rand(3, size, size, generator=g) * 2 - 1)
    return folder


def _diffusers_dataset(concepts_list_file: str, *, with_prior_preservation: bool, num_class_images: int):
    """diffusers' reading and pairing, transcribed (58eb52c0: train_custom_diffusion.py). The two ``sorted``
    are the only change: ``Path.iterdir()`` lists in the file system's order, sdadapt by name."""
    with open(concepts_list_file, "r") as f:  # :725-726
        concepts_list = json.load(f)
    instance_images_path, class_images_path = [], []
    for concept in concepts_list:  # CustomDiffusionDataset.__init__ :200-218
        inst_img_path = [
            (x, concept["instance_prompt"]) for x in sorted(Path(concept["instance_data_dir"]).iterdir()) if x.is_file()
        ]
        instance_images_path.extend(inst_img_path)
        if with_prior_preservation:
            class_data_root = Path(concept["class_data_dir"])
            assert os.path.isdir(class_data_root)  # (the retrieved-list branch, --real_prior, is not supported)
            class_images_path_ = sorted(class_data_root.iterdir())
            class_prompt = [concept["class_prompt"] for _ in range(len(class_images_path_))]
            class_img_path = list(zip(class_images_path_, class_prompt))
            class_images_path.extend(class_img_path[:num_class_images])
    num_instance_images, num_class_images_ = len(instance_images_path), len(class_images_path)
    length = max(num_class_images_, num_instance_images)  # :223
    examples = []
    for index in range(length):  # __getitem__ :260-310, the paths and prompts of one example
        instance_image, instance_prompt = instance_images_path[index % num_instance_images]
        example = {"instance": (instance_image, instance_prompt)}
        if with_prior_preservation:
            example["class"] = class_images_path[index % num_class_images_]
        examples.append(example)
    return instance_images_path, class_images_path, examples


def _diffusers_num_new_images(concept: dict, num_class_images: int) -> int:
    """:751-771: ``cur_class_images = len(list(class_images_dir.iterdir()))``; ``num_class_images - cur`` when short."""
    class_images_dir = Path(concept["class_data_dir"])
    cur_class_images = len(list(class_images_dir.iterdir())) if class_images_dir.exists() else 0
    return num_class_images - cur_class_images if cur_class_images < num_class_images else 0


def _two_concepts(root: Path) -> list[dict]:
    _images(root / "data" / "cat", 3, seed=0)
    _images(root / "data" / "pot", 2, seed=1, names="p")
    _images(root / "reg" / "cat", 5, seed=2)  # more than num_class_images: the first ones by name
    _images(root / "reg" / "pot", 2, seed=3)
    return [{"instance_prompt": "photo of a <new1> cat", "class_prompt": "cat",
             "instance_data_dir": "data/cat", "class_data_dir": "reg/cat"},
            {"instance_prompt": "photo of a <new2> wooden pot", "class_prompt": "wooden pot",
             "instance_data_dir": "data/pot", "class_data_dir": "reg/pot"}]


def test_concepts_pair_images_and_class_images_with_their_prompts_as_diffusers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative folders are read from the current folder, as diffusers (not the JSON's)
    table = _two_concepts(tmp_path)
    (tmp_path / "lists").mkdir()
    file = tmp_path / "lists" / "concepts.json"
    file.write_text(json.dumps(table))
    instances, classes, examples = _diffusers_dataset(str(file), with_prior_preservation=True, num_class_images=3)
    concepts = read_concepts_list(file, tokens=("<new1>", "<new2>"))
    records, notes = concept_records(concepts)
    assert [(r.path, r.caption) for r in records] == instances and not notes
    assert [r.folder for r in records] == ["cat"] * 3 + ["pot"] * 2
    assert missing_class_images(concepts, count=3) == [_diffusers_num_new_images(c, 3) for c in table] == [0, 1]
    # every folder full: nothing generated, the system is not used
    reg = concept_class_images(None, concepts, count=2)
    want = [c for c in classes if c[0].parent.name == "cat"][:2] + [c for c in classes if c[0].parent.name == "pot"][:2]
    _, want_two, _ = _diffusers_dataset(str(file), with_prior_preservation=True, num_class_images=2)
    assert want == want_two
    assert [(r.path, r.caption) for r in reg.records] == want_two and reg.samples == 4 and not reg.notes
    assert all(r.repeats == 1 for r in reg.records)  # every class image once (diffusers cycles through all of them)
    assert reg.dirs == {"cat": {"n_repeats": 1, "img_count": 2}, "pot": {"n_repeats": 1, "img_count": 2}}
    # diffusers' examples: each image with its own concept's prompt, each class image with its own class prompt
    caption_of = {r.path: r.caption for r in records}
    class_caption_of = {r.path: r.caption for r in reg.records}
    for example in _diffusers_dataset(str(file), with_prior_preservation=True, num_class_images=2)[2]:
        path, prompt = example["instance"]
        assert caption_of[path] == prompt
        class_path, class_prompt = example["class"]
        assert class_caption_of[class_path] == class_prompt
        assert class_prompt == {"cat": "cat", "pot": "wooden pot"}[class_path.parent.name]


def test_caption_files_are_not_read_and_without_prior_the_class_keys_may_be_left_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _images(tmp_path / "dog", 2)
    (folder / "img0.txt").write_text("a caption diffusers never reads")
    (folder / "sub").mkdir()
    file = tmp_path / "c.json"
    file.write_text(json.dumps([{"instance_prompt": "a <new1> dog", "instance_data_dir": "dog"}]))
    with pytest.raises(InputError, match=r"c.json: \[0\]: no class_prompt"):
        read_concepts_list(file, tokens=("<new1>",))
    concepts = read_concepts_list(file, tokens=("<new1>",), prior=False)
    assert concepts[0].class_prompt is None and concepts[0].class_data_dir is None
    records, notes = concept_records(concepts)
    assert [r.caption for r in records] == ["a <new1> dog"] * 2
    assert any("1 caption file(s) beside the images not read" in n for n in notes)
    assert any("sub-folders of dog not read (sub)" in n for n in notes)
    # without prior preservation the class keys, when given, are not used (diffusers reads them only with it)
    file.write_text(json.dumps([{"instance_prompt": "a <new1> dog", "instance_data_dir": "dog", "class_prompt": "a dog",
                                 "class_data_dir": "reg"}]))
    (concept,) = read_concepts_list(file, tokens=("<new1>",), prior=False)
    assert concept.class_prompt is None and concept.class_data_dir is None


@pytest.mark.parametrize("content, match", [
    ("not json", "not a JSON file"),
    ("[]", "non-empty JSON list of concept tables.*an empty list"),
    ('{"instance_prompt": "a <new1> cat"}', "non-empty JSON list.*got dict"),
    ('["a <new1> cat"]', r"\[0\]: a concept must be a table"),
    ('[{"instance_prompt": "a <new1> cat", "instance_data_dir": "data", "class_prompt": "cat", "class_data_dir": "reg",'
     ' "instance_dir": "x"}]', r"\[0\]: unknown key 'instance_dir'; did you mean instance_data_dir\?"),
    ('[{"instance_data_dir": "data", "class_prompt": "cat", "class_data_dir": "reg"}]', r"\[0\]: no instance_prompt"),
    ('[{"instance_prompt": "a <new1> cat", "class_prompt": "cat", "class_data_dir": "reg"}]', "no instance_data_dir"),
    ('[{"instance_prompt": "a <new1> cat", "instance_data_dir": "data", "class_data_dir": "reg"}]', "no class_prompt"),
    ('[{"instance_prompt": "a <new1> cat", "instance_data_dir": "data", "class_prompt": "cat"}]', "no class_data_dir"),
    ('[{"instance_prompt": " ", "instance_data_dir": "data", "class_prompt": "cat", "class_data_dir": "reg"}]',
     "instance_prompt must be non-empty text"),
    ('[{"instance_prompt": "a <new1> cat", "instance_data_dir": 3, "class_prompt": "cat", "class_data_dir": "reg"}]',
     "instance_data_dir must be non-empty text, got 3"),
    ('[{"instance_prompt": "a <new1> cat", "instance_data_dir": "nowhere", "class_prompt": "cat", "class_data_dir": "reg"}]',
     "instance_data_dir nowhere is not a folder"),
    ('[{"instance_prompt": "a <new1> cat", "instance_data_dir": "empty", "class_prompt": "cat", "class_data_dir": "reg"}]',
     "instance_data_dir empty holds no images"),
    ('[{"instance_prompt": "a <new1> cat", "instance_data_dir": "data", "class_prompt": "cat", "class_data_dir": "reg"},'
     ' {"instance_prompt": "a cat", "instance_data_dir": "data", "class_prompt": "cat", "class_data_dir": "reg"}]',
     r"\[1\]: instance_prompt 'a cat' names none of the modifier tokens <new1>\+<new2>"),
    ('[{"instance_prompt": "a <new1> cat", "instance_data_dir": "data", "class_prompt": "caption.txt",'
     ' "class_data_dir": "images.txt"}]', "class_data_dir images.txt is a file.*--real_prior"),
])
def test_bad_concepts_lists_are_refused_naming_the_concept(tmp_path, monkeypatch, content, match):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "data", 1)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no image here")
    (tmp_path / "images.txt").write_text("a.jpg\n")
    file = tmp_path / "c.json"
    file.write_text(content)
    with pytest.raises(InputError, match=match):
        read_concepts_list(file, tokens=("<new1>", "<new2>"))
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_concepts_list(tmp_path / "missing.json")


def test_train_cli_two_concepts_generate_their_own_class_images_and_train_on_them(tmp_path, monkeypatch, capsys):
    """The toy, two concepts with different class prompts: concept 0's class folder does not exist (2 images made
    for 'a red circle'), concept 1's holds one image (1 made for 'a blue square'); the run's class images are those
    files, each on its own concept's class prompt, and its instance images on their instance prompts."""
    import sdadapt.jobs.train as train_job
    from sdadapt.methods import class_images
    from sdadapt.toy import load_toy

    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "circles", 2, seed=0)
    _images(tmp_path / "squares", 2, seed=1)
    _images(tmp_path / "reg_squares", 1, seed=2, size=32, names="own")
    (tmp_path / "c.json").write_text(json.dumps([
        {"instance_prompt": "a <new1> circle", "class_prompt": "a red circle", "instance_data_dir": "circles",
         "class_data_dir": "reg_circles"},
        {"instance_prompt": "a <new2> square", "class_prompt": "a blue square", "instance_data_dir": "squares",
         "class_data_dir": "reg_squares"}]))
    seen = {}
    real_fit = train_job.fit

    def spy(system, adaptation, dataset, **kw):
        seen["train"] = [(r.path.parent.name, r.caption) for r in dataset.records]
        seen["class"] = [(r.path.parent.name, r.path.name, r.caption) for r in kw["prior"][0].records]
        return real_fit(system, adaptation, dataset, **kw)

    monkeypatch.setattr(train_job, "fit", spy)
    args = ["train", "custom-diffusion", "--concepts-list", "c.json", "--token", "<new1>+<new2>", "--init-word", "red+blue",
            "--model", "toy", "--resolution", "16", "--steps", "1", "--batch-size", "2", "--class-images", "2", "--seed", "3",
            "-o", "cd.safetensors"]
    assert main(args) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert "[0]: 2 class image(s) of 'a red circle' generated into reg_circles (0 there, 2 wanted)" in err
    assert "[1]: 1 class image(s) of 'a blue square' generated into reg_squares (1 there, 2 wanted)" in err
    made = {folder: sorted(p.name for p in (tmp_path / folder).iterdir()) for folder in ("reg_circles", "reg_squares")}
    assert [n.split("-")[0] for n in made["reg_circles"]] == ["0", "1"] and made["reg_squares"][1] == "own0.png"
    assert made["reg_squares"][0].startswith("1-")
    assert seen["train"] == [("circles", "a <new1> circle")] * 2 + [("squares", "a <new2> square")] * 2
    assert seen["class"] == [("reg_circles", n, "a red circle") for n in made["reg_circles"]] + \
        [("reg_squares", n, "a blue square") for n in made["reg_squares"]]
    # the generated files are what the unadapted toy makes for each concept's own class prompt
    toy = load_toy()
    red, _ = class_images(toy, ["a red circle"] * 2, seed=3, size=(16, 16))
    # (concept 1's folder held 1 image: its image 1 is image 1 of the 2 an empty folder gets, seeded 3 + 100003 —
    # sdadapt.training.class_folder.fill_class_folder)
    blue, _ = class_images(toy, ["a blue square"] * 2, seed=3 + 100_003, size=(16, 16))
    for image, name in zip(red, made["reg_circles"]):
        assert np.array_equal(read_image_channels(tmp_path / "reg_circles" / name)[..., :3], to_uint8(image))
    assert np.array_equal(read_image_channels(tmp_path / "reg_squares" / made["reg_squares"][0])[..., :3], to_uint8(blue[1]))
    # a second run finds the folders full: nothing generated, the same class images
    seen.clear()
    assert main([*args[:-1], "cd2.safetensors", "-q"]) == 0
    assert "generated" not in capsys.readouterr().err and len(seen["class"]) == 4
    assert {folder: sorted(p.name for p in (tmp_path / folder).iterdir()) for folder in made} == made


@pytest.mark.parametrize("extra, match", [
    (["--images", "x"], "so --images would not be used"),
    (["--class-prompt", "a cat"], "so --class-prompt would not be used"),
    (["--templates", "style"], "--templates: with --concepts-list every image trains on its concept's instance_prompt"),
    (["--caption-template", "{token} {caption}"], "--caption-template: with --concepts-list"),
    (["--token", "<new2>"], "instance_prompt 'a <new1> cat' names none of the modifier tokens <new2>"),
])
def test_train_cli_refuses_what_a_concepts_list_replaces(tmp_path, monkeypatch, capsys, extra, match):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "cats", 1)
    (tmp_path / "c.json").write_text(json.dumps([{"instance_prompt": "a <new1> cat", "instance_data_dir": "cats"}]))
    assert main(["train", "custom-diffusion", "--concepts-list", "c.json", "--token", "<new1>", "--model", "toy",
                 "--no-prior", "--steps", "1", *extra, "-o", "x.safetensors"]) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()


def test_train_cli_without_prior_needs_no_class_keys_and_makes_no_class_images(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "cats", 2)
    (tmp_path / "c.json").write_text(json.dumps([{"instance_prompt": "a <new1> cat", "instance_data_dir": "cats",
                                                  "class_prompt": "a cat", "class_data_dir": "reg"}]))
    assert main(["train", "custom-diffusion", "--concepts-list", "c.json", "--token", "<new1>", "--model", "toy",
                 "--resolution", "16", "--no-prior", "--steps", "1", "-o", "x.safetensors"]) == 0, capsys.readouterr().err
    assert "trained custom-diffusion on 2 images for 1 step" in capsys.readouterr().out
    assert not (tmp_path / "reg").exists()


def test_train_cli_concepts_list_is_for_custom_diffusion_only(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _images(tmp_path / "cats", 1)
    (tmp_path / "c.json").write_text(json.dumps([{"instance_prompt": "a <new1> cat", "instance_data_dir": "cats"}]))
    assert main(["train", "textual-inversion", "--concepts-list", "c.json", "--token", "<new1>", "--model", "toy",
                 "--steps", "1", "-o", "x.safetensors"]) == 2
    assert "--concepts-list is diffusers' train_custom_diffusion.py concepts list" in capsys.readouterr().err


def test_templates_style_with_several_tokens_is_refused_not_ignored(tmp_path, capsys):
    """diffusers has no caption templates; with several modifier tokens every image needs its own caption, so
    ``--templates style`` could never be drawn: it was accepted and silently unused."""
    images = tmp_path / "data"
    _images(images / "1_<new1> circle", 1)
    _images(images / "1_<new2> square", 1, seed=1)
    assert main(["train", "custom-diffusion", "--images", str(images), "--token", "<new1>+<new2>", "--templates", "style",
                 "--model", "toy", "--resolution", "16", "--steps", "1", "--no-prior",
                 "-o", str(tmp_path / "x.safetensors")]) == 2
    assert "--templates style: with several modifier tokens" in capsys.readouterr().err
