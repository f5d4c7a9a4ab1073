"""``train --templates-replace-captions``: kohya's ``use_object_template`` / ``use_style_template`` make
EVERY caption of the training dataset group a template drawn at each use (not only the missing ones,
sdadapt's ``--templates`` alone) — against a transcription of kohya's ``process_caption``, what the
dataset hands the text encoder in a toy run, the kohya TOML keys and ``--resume`` of older runs.
"""

from __future__ import annotations

import json
import random

import pytest
from test_trigger_captions import _folder

from sdadapt.cli import main
from sdadapt.methods.textual_inversion import OBJECT_TEMPLATES, STYLE_TEMPLATES


def kohya_process_caption(caption: str, *, replacements: dict, prefix: str = "", suffix: str = "",
                          dropout_rate: float = 0.0, shuffle: bool = False, tag_dropout_rate: float = 0.0,
                          separator: str = ",", rng: random.Random) -> str:
    """kohya-ss/sd-scripts@48d368fa557731ad0488c07304dfeba8c07910eb:library/train_util.py:821-934
    (``BaseDataset.process_caption``; no wildcards, keep_tokens, warm-up, secondary separator; ``random``
    is ``rng``). train_textual_inversion.py:336-346 sets ``replacements = {"": templates}`` on the
    training dataset group (train_util.py:2601-2603: every dataset of it, the is_reg subsets included:
    train_util.py:2143-2150 registers the reg images in the same dataset, 1718 calls this for each)."""
    if prefix:
        caption = prefix + " " + caption
    if suffix:
        caption = caption + " " + suffix
    is_drop_out = dropout_rate > 0 and rng.random() < dropout_rate
    if is_drop_out:
        caption = ""
    else:
        caption = caption.split("\n")[0]
        if shuffle or tag_dropout_rate > 0:
            tokens = [t.strip() for t in caption.strip().split(separator)]
            flex_tokens = tokens[:]
            if shuffle:
                rng.shuffle(flex_tokens)
            flex_tokens = [t for t in flex_tokens if not tag_dropout_rate > 0 or rng.random() >= tag_dropout_rate]
            caption = ", ".join(flex_tokens)
        for str_from, str_to in replacements.items():  # textual inversion対応 (inside the else: not after a drop)
            if str_from == "":
                caption = rng.choice(str_to) if type(str_to) == list else str_to  # noqa: E721 (transcribed)
            else:
                caption = caption.replace(str_from, str_to)
    return caption


OWN = ["a red circle", "<sks>, a blue ring", ""]  # two captioned images (one mentions the token), one without
TEMPLATES = [t.format("<sks>") for t in OBJECT_TEMPLATES]


def _drawn(monkeypatch) -> list[tuple[str, str]]:
    """Every ``(caption as stored, caption drawn)`` the dataset hands the text encoder from now on (each record's
    draw, a caption template around its own caption included: ``ImageRecord.draw_caption``)."""
    from sdadapt.training.data import ImageRecord

    seen: list[tuple[str, str]] = []
    draw = ImageRecord.draw_caption

    def recording(self, options, rng, **kw):
        out = draw(self, options, rng, **kw)
        seen.append((self.caption, out))
        return out

    monkeypatch.setattr(ImageRecord, "draw_caption", recording)
    return seen


def test_every_caption_is_a_template_drawn_at_each_use_as_kohyas_process_caption(tmp_path, monkeypatch, capsys):
    # kohya: whatever the caption, prefix / suffix / shuffle / tag dropout, the text is a template or ""
    # (a whole-caption dropout); a captioned image draws many templates, never its own words
    rng = random.Random(0)
    options = dict(prefix="PRE", suffix="SUF", dropout_rate=0.25, shuffle=True, tag_dropout_rate=0.3)
    kohya = {own: [kohya_process_caption(own, replacements={"": TEMPLATES}, rng=rng, **options) for _ in range(200)]
             for own in OWN}
    for own, drawn in kohya.items():
        assert set(drawn) <= {*TEMPLATES, ""} and "" in drawn and len(set(drawn)) > 10, own
    # sdadapt: the same images, the same options, several steps of a toy run
    images = _folder(tmp_path / "imgs", n=3, captions=OWN)
    (images / "img2.txt").unlink()  # (uncaptioned)
    seen = _drawn(monkeypatch)
    assert main(["train", "textual-inversion", "--images", str(images), "--token", "<sks>", "--model", "toy",
                 "-o", str(tmp_path / "x.pt"), "--steps", "8", "--batch-size", "3", "--templates-replace-captions",
                 "--caption-prefix", "PRE", "--caption-suffix", "SUF", "--caption-dropout-rate", "0.25",
                 "--shuffle-caption", "--caption-tag-dropout-rate", "0.3", "--seed", "3"]) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert ("--templates-replace-captions: all 3 training image(s) train on one of the 27 object template captions "
            "with <sks> drawn at each use (e.g. 'a photo of a <sks>'); their own captions (2 with one)") in err
    assert "caption(s) without <sks>: written as" not in err  # (the caption template is not used)
    assert len(seen) == 24 and {stored for stored, _ in seen} == {""}  # every image, every use: a template slot
    drawn = [out for _, out in seen]
    assert set(drawn) <= set(kohya["a red circle"]) | set(TEMPLATES) and len(set(drawn) - {""}) > 8
    own_words = {"PRE", "SUF", "red", "blue", "circle", "ring"}
    assert not any(own_words & set(c.replace(",", " ").split()) for c in drawn)  # no own words


def test_class_images_draw_templates_too_and_validation_images_keep_theirs(tmp_path, monkeypatch, capsys):
    """kohya's replacement is on the training dataset group, whose datasets hold the is_reg subsets too
    (train_util.py:2143-2150, 2601-2603); the validation group has none (train_textual_inversion.py:346)."""
    images = _folder(tmp_path / "imgs", n=4, captions=["a <sks> circle"] * 4)
    reg = _folder(tmp_path / "reg" / "1_ring", n=2, captions=["a green ring", "a yellow ring"])
    seen = _drawn(monkeypatch)
    assert main(["train", "textual-inversion", "--images", str(images), "--token", "<sks>", "--model", "toy",
                 "-o", str(tmp_path / "x.pt"), "--steps", "3", "--batch-size", "2", "--templates-replace-captions",
                 "--reg-data-dir", str(tmp_path / "reg"), "--validation-split", "0.25", "--validate-every-n-steps", "3",
                 "-q"]) == 0, capsys.readouterr().err
    training = [out for stored, out in seen if stored == ""]
    assert len(training) > 3 * 2 and set(training) <= set(TEMPLATES)  # (over 3 steps x 2: the class images' draws too)
    assert not any("green" in out or "yellow" in out for _, out in seen)  # the class images' own: not used
    assert "a <sks> circle" in {out for _, out in seen}  # the held-out image's caption, for the validation loss


# ----------------------------------------------------------------------------------- the TOML keys, the CLI
def _toml(tmp_path, images, key: str) -> str:
    config = tmp_path / f"{key}.toml"
    config.write_text(f'train_data_dir = "{images.as_posix()}"\ntoken_string = "<sks>"\n{key} = true\n'
                      f'max_train_steps = 2\noutput_dir = "{tmp_path.as_posix()}"\noutput_name = "kt"\n')
    return str(config)


@pytest.mark.parametrize("key, templates", [("use_object_template", TEMPLATES),
                                            ("use_style_template", [t.format("<sks>") for t in STYLE_TEMPLATES])])
def test_kohya_template_keys_replace_every_caption(tmp_path, monkeypatch, capsys, key, templates):
    images = _folder(tmp_path / "imgs", n=2, captions=["a red circle", "a <sks> ring"])
    seen = _drawn(monkeypatch)
    assert main(["train", "textual-inversion", "--config", _toml(tmp_path, images, key), "--model", "toy", "-q"]) == 0, \
        capsys.readouterr().err
    assert len(seen) == 2 and all(stored == "" and out in templates for stored, out in seen)  # (kohya's batch: 1)


def test_the_cli_templates_option_alone_fills_only_uncaptioned_images(tmp_path, monkeypatch, capsys):
    images = _folder(tmp_path / "imgs", n=3, captions=OWN)
    (images / "img2.txt").unlink()
    seen = _drawn(monkeypatch)
    assert main(["train", "textual-inversion", "--images", str(images), "--token", "<sks>", "--model", "toy",
                 "-o", str(tmp_path / "x.pt"), "--steps", "2", "--batch-size", "3", "--templates", "object", "-q"]) == 0
    drawn = sorted(out for _, out in seen if out not in TEMPLATES)
    assert drawn == ["<sks>, a blue ring", "<sks>, a blue ring", "<sks>, a red circle", "<sks>, a red circle"]
    from sdadapt.jobs import TrainOptions

    assert TrainOptions(images=str(images)).templates_replace_captions is False


def test_refused_for_methods_without_a_trigger_word(tmp_path, capsys):
    images = _folder(tmp_path / "imgs", n=1, captions=["a red circle"])
    assert main(["train", "lora", "--images", str(images), "--model", "toy", "-o", str(tmp_path / "l.safetensors"),
                 "--steps", "1", "--templates-replace-captions"]) == 2
    assert "--templates-replace-captions are for methods that learn a trigger word" in capsys.readouterr().err


# ----------------------------------------------------------------------------------- --resume
def test_resume_of_a_run_recorded_without_the_option(tmp_path, capsys):
    """A run.json written before the option existed (no such key) resumes as without it; with it, refused."""
    images = _folder(tmp_path / "imgs", n=2, captions=["a red circle", "a <sks> ring"])
    base = ["train", "textual-inversion", "--images", str(images), "--token", "<sks>", "--model", "toy", "-q"]
    assert main([*base, "-o", str(tmp_path / "a.pt"), "--steps", "2", "--save-state-on-train-end"]) == 0
    record = json.loads((tmp_path / "a-state" / "run.json").read_text())
    assert "templates_replace_captions" not in record["captions"]  # (recorded only when on: older records unchanged)
    resumed = ["--steps", "3", "--resume", str(tmp_path / "a-state"), "--no-save-state"]
    assert main([*base, "-o", str(tmp_path / "c.pt"), *resumed, "--templates-replace-captions"]) == 2
    assert "templates_replace_captions False (now True)" in capsys.readouterr().err
    assert main([*base, "-o", str(tmp_path / "b.pt"), *resumed]) == 0, capsys.readouterr().err


def test_a_dataset_configs_is_reg_subsets_draw_templates_too(tmp_path, monkeypatch, capsys):
    """The same through a dataset TOML (each subset's caption options; the token warm-up's options made
    again once the steps are known)."""
    train = _folder(tmp_path / "train", n=2, captions=["a <sks> circle, red", "a <sks> ring, blue"])
    reg = _folder(tmp_path / "reg", n=2, captions=["a green ring", "a yellow ring"])
    toml = tmp_path / "data.toml"
    toml.write_text(f'[[datasets]]\nresolution = 32\nbatch_size = 2\nenable_bucket = false\n\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{train.as_posix()}"\n\n'
                    f'  [[datasets.subsets]]\n  image_dir = "{reg.as_posix()}"\n  is_reg = true\n')
    seen = _drawn(monkeypatch)
    assert main(["train", "textual-inversion", "--dataset-config", str(toml), "--token", "<sks>", "--model", "toy",
                 "-o", str(tmp_path / "x.pt"), "--steps", "2", "--templates-replace-captions", "--token-warmup-step", "2",
                 "-q"]) == 0, capsys.readouterr().err
    assert len(seen) > 2 * 2 and {s for s, _ in seen} == {""} and {out for _, out in seen} <= set(TEMPLATES)


def test_class_images_draw_templates_with_the_token_warmup(tmp_path, monkeypatch, capsys):
    """(--token-warmup-step makes the caption options again once the steps are known: the class images' too.)"""
    images = _folder(tmp_path / "imgs", n=2, captions=["a <sks> circle"] * 2)
    _folder(tmp_path / "reg" / "1_ring", n=2, captions=["a green ring", "a yellow ring"])
    seen = _drawn(monkeypatch)
    assert main(["train", "textual-inversion", "--images", str(images), "--token", "<sks>", "--model", "toy",
                 "-o", str(tmp_path / "x.pt"), "--steps", "2", "--batch-size", "2", "--templates-replace-captions",
                 "--reg-data-dir", str(tmp_path / "reg"), "--token-warmup-step", "2", "-q"]) == 0, capsys.readouterr().err
    assert len(seen) > 2 * 2 and {out for _, out in seen} <= set(TEMPLATES)
