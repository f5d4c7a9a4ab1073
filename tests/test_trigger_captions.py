"""Trigger-word methods train on captions that mention the trigger: template captions for images
without one, a caption template (A1111's ``[name], [filewords]``) for captions that lack it — the
caption function against hand-written expectations, and ``train`` on the toy model and a tiny
diffusers folder writing files that load.
"""

from __future__ import annotations

import json

import pytest
import torch

import sdadapt
from sdadapt.cli import main
from sdadapt.formats.files import read_safetensors
from sdadapt.images import write_png
from sdadapt.methods.textual_inversion import (
    DEFAULT_CAPTION_TEMPLATE,
    OBJECT_TEMPLATES,
    STYLE_TEMPLATES,
    caption_template,
    mentions,
    trigger_captions,
)


def _folder(path, n=3, captions=None):
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        write_png(path / f"img{i}.png", torch.rand(3, 32, 32, generator=g) * 2 - 1)
        if captions is not None:
            (path / f"img{i}.txt").write_text(captions[i])
    return path


# ----------------------------------------------------------------------------------- the caption function
def test_caption_template_fills_captions_without_the_token():
    own = ["a red circle", None, "a <sks> on a table", "", "a <sks>-like ring"]
    got = trigger_captions(own, "<sks>", template=DEFAULT_CAPTION_TEMPLATE, seed=3)
    assert got[0] == "<sks>, a red circle"  # A1111's [name], [filewords]
    assert got[2] == "a <sks> on a table"  # mentions it: kept as it is
    assert got[4] == "<sks>, a <sks>-like ring"  # '<sks>-like' is another word
    assert got[1].replace("<sks>", "{}") in OBJECT_TEMPLATES and got[3].replace("<sks>", "{}") in OBJECT_TEMPLATES
    assert all(mentions(c, "<sks>") for c in got)
    assert trigger_captions(own, "<sks>", template=DEFAULT_CAPTION_TEMPLATE, seed=3) == got  # seeded
    styled = trigger_captions([None, "sunset"], "zz", templates=STYLE_TEMPLATES, template="a painting by [name], [filewords]")
    assert styled[0].replace("zz", "{}") in STYLE_TEMPLATES and styled[1] == "a painting by zz, sunset"
    assert trigger_captions(["sunset"], "zz", template="a photo of {token}") == ["a photo of zz"]  # no {caption}: replaced
    with pytest.raises(ValueError, match="do not mention the trigger word 'zz'.*--caption-template"):
        trigger_captions(["sunset"], "zz")  # no template: refused, and the message says what to pass


@pytest.mark.parametrize("bad", ["a photo of {caption}", "{token} {who}", "{token", "[filewords] only"])
def test_bad_caption_templates_are_refused(bad):
    with pytest.raises(ValueError, match="caption template"):
        caption_template(bad)
    assert caption_template("[name], [filewords]") == DEFAULT_CAPTION_TEMPLATE


# ----------------------------------------------------------------------------------- train
def test_train_textual_inversion_on_a_folder_without_captions(tmp_path, capsys):
    images = _folder(tmp_path / "nocap")
    out = tmp_path / "x.pt"
    assert main(["train", "textual-inversion", "--images", str(images), "--token", "<sks>", "--model", "toy",
                 "-o", str(out), "--steps", "2"]) == 0
    err = capsys.readouterr().err
    assert "3 image(s) without a caption: one of the 27 object template captions with <sks> drawn at each use" in err
    assert "<sks>" not in err.split("does not know")[-1].split("(they")[0]  # the trigger is not an unknown word
    embedding = sdadapt.load_embedding(out)
    assert embedding.name == "x" and embedding.vectors["text_encoder"].shape == (1, 64)
    # the captions trained on are in the kohya metadata of a .safetensors run: every one mentions the token
    st = tmp_path / "style.safetensors"
    assert main(["train", "textual-inversion", "--images", str(images), "--token", "<sks>", "--model", "toy",
                 "-o", str(st), "--steps", "1", "--templates", "style", "-q"]) == 0
    tags = json.loads(read_safetensors(st)[1]["ss_tag_frequency"])
    captions = [tag for folder in tags.values() for tag in folder]
    assert captions and all(c.replace("<sks>", "{}") in STYLE_TEMPLATES for c in captions)


def test_train_captioned_folder_gets_the_caption_template(tmp_path, capsys):
    images = _folder(tmp_path / "cap", captions=["a red circle", "a <sks> on a white background", "a blue ring"])
    out = tmp_path / "cd.safetensors"
    assert main(["train", "textual-inversion", "--images", str(images), "--token", "<sks>", "--model", "toy", "-o", str(out),
                 "--steps", "1", "--caption-template", "a photo of [name], [filewords]"]) == 0
    assert "2 caption(s) without <sks>: written as 'a photo of {token}, {caption}'" in capsys.readouterr().err
    tags = json.loads(read_safetensors(out)[1]["ss_tag_frequency"])
    # kohya counts comma-separated tags: the template's head, the original captions, the kept one
    seen = {tag for folder in tags.values() for tag in folder}
    assert {"a photo of <sks>", "a red circle", "a blue ring", "a <sks> on a white background"} <= seen


def test_trigger_options_are_refused_elsewhere_and_checked(tmp_path, capsys):
    images = _folder(tmp_path / "cap", captions=["a red circle"] * 3)
    base = ["train", "lora", "--images", str(images), "--model", "toy", "-o", str(tmp_path / "l.safetensors"), "--steps", "1"]
    assert main([*base, "--caption-template", "{token}, {caption}"]) == 2
    assert "methods that learn a trigger word" in capsys.readouterr().err
    ti = ["train", "textual-inversion", "--images", str(images), "--token", "<sks>", "-o", str(tmp_path / "t.pt")]
    assert main([*ti, "--caption-template", "{caption} only"]) == 2
    assert "caption template" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # argparse's choices
        main([*ti, "--templates", "scenery"])
    assert exit_info.value.code == 2
    from sdadapt.jobs import TrainOptions

    with pytest.raises(ValueError, match="--templates must be one of object, style"):  # the TOML path
        TrainOptions(images=str(images), templates="scenery")
    assert not (tmp_path / "l.safetensors").exists() and not (tmp_path / "t.pt").exists()


def test_dreamartist_trains_on_template_captions(tmp_path, capsys):
    images = _folder(tmp_path / "nocap", n=2)
    out = tmp_path / "da.pt"
    assert main(["train", "dreamartist", "--images", str(images), "--token", "<da>", "--model", "toy", "-o", str(out),
                 "--steps", "1", "-q"]) == 0
    assert sdadapt.load_embedding(out).name == "da" and sdadapt.load_embedding(tmp_path / "da-neg.pt").name == "da-neg"


def test_train_textual_inversion_on_a_diffusers_folder_without_captions(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from test_cli_train import _tiny_pipeline

    pipe = _tiny_pipeline(tmp_path / "pipe")
    images = _folder(tmp_path / "nocap", n=2)
    out = tmp_path / "sks.pt"
    assert main(["train", "textual-inversion", "--images", str(images), "--token", "<sks>", "--model", str(pipe),
                 "-o", str(out), "--steps", "2", "--init-word", "photo"]) == 0, capsys.readouterr().err
    assert "template captions with <sks>" in capsys.readouterr().err
    embedding = sdadapt.load_embedding(out)
    assert embedding.vectors["text_encoder"].shape == (1, 32) and torch.isfinite(embedding.vectors["text_encoder"]).all()


def test_kohya_textual_inversion_config_keys(tmp_path, capsys):
    images = _folder(tmp_path / "nocap", n=2)
    config = tmp_path / "ti.toml"
    config.write_text(f'train_data_dir = "{images.as_posix()}"\ntoken_string = "<kt>"\nnum_vectors_per_token = 2\n'
                      f'use_style_template = true\nmax_train_steps = 1\noutput_dir = "{tmp_path.as_posix()}"\n'
                      'output_name = "kt"\n')
    assert main(["train", "textual-inversion", "--config", str(config), "--model", "toy"]) == 0, capsys.readouterr().err
    assert "style template captions with <kt>" in capsys.readouterr().err
    embedding = sdadapt.load_embedding(tmp_path / "kt.safetensors")
    assert embedding.vectors["text_encoder"].shape == (2, 64)
    tags = json.loads(read_safetensors(tmp_path / "kt.safetensors")[1]["ss_tag_frequency"])
    assert all(c.replace("<kt>", "{}") in STYLE_TEMPLATES for folder in tags.values() for c in folder)


# ----------------------------------------------------------------------------------- templates drawn per use
def test_template_captions_are_drawn_at_each_use_and_leave_captioned_images_alone():
    import random

    from sdadapt.training.data import CaptionOptions

    templates = tuple(t.format("<sks>") for t in OBJECT_TEMPLATES)
    options = CaptionOptions(templates=templates)
    drawn = [options.apply("", random.Random(f"0/captions/{i}")) for i in range(40)]
    assert set(drawn) <= set(templates) and len(set(drawn)) > 10
    assert drawn == [options.apply("", random.Random(f"0/captions/{i}")) for i in range(40)]  # seeded
    shuffled = CaptionOptions(shuffle=True, templates=templates)
    for i in range(5):  # a captioned image draws exactly as without templates (same rng use)
        assert shuffled.apply("a, b, c", random.Random(i)) == CaptionOptions(shuffle=True).apply("a, b, c", random.Random(i))
    assert CaptionOptions().apply("", random.Random(0)) == ""
    # templates alone change nothing of a caption as written (its commas and spaces stayed as they were
    # before templates made the options active: "<sks>, red,, car," became "<sks>, red, car")
    for caption in ("<sks>, red,, car,", "a photo of <sks>  ,blue", "<sks>"):
        assert options.apply(caption, random.Random(0)) == caption
    with pytest.raises(ValueError, match="tuple of non-empty captions"):
        CaptionOptions(templates="a photo of a <sks>")


def _template_run(system, images, *, seed, steps, save_at=None, state=None, resume=None):
    """Textual inversion on ``images`` through fit; returns the captions tokenized per step, as
    ``(step, caption)`` for every image drawn."""
    from sdadapt.methods import METHODS, FitConfig, fit
    from sdadapt.training.data import (
        CaptionOptions,
        Dataset,
        encode_buckets,
        find_images,
        plan_dataset,
    )

    records, _ = find_images(images, uncaptioned=True)
    records[-1].caption = "a <sks> on a table"
    plan_dataset(records, resolution=32, buckets=False)
    templates = tuple(t.format("<sks>") for t in OBJECT_TEMPLATES)
    dataset = Dataset(records, captions=CaptionOptions(templates=templates))
    encode_buckets(dataset, system.encode_images)
    adaptation = METHODS["textual-inversion"].adapt(system, seed=seed, token="<sks>")
    seen: list[str] = []
    tokenize = adaptation.tokenize

    def recording(captions):
        seen.extend(captions)
        return tokenize(captions)

    adaptation.tokenize = recording
    try:
        fit(system, adaptation, dataset, config=FitConfig(steps=steps, batch_size=1, seed=seed, warmup_steps=0),
            on_step=(lambda info: info.save_state(state) if info.step == save_at else None), resume=resume)
    finally:
        adaptation.remove()
    return seen


def test_uncaptioned_images_see_several_templates_across_epochs_reproducibly_and_resume_continues(tmp_path):
    from sdadapt.toy import load_toy

    system = load_toy(None)
    images = _folder(tmp_path / "imgs", n=3)
    full = _template_run(system, images, seed=1, steps=12, save_at=5, state=tmp_path / "state")
    assert len(full) == 12
    templated = [c for c in full if c != "a <sks> on a table"]
    assert len(templated) == 8 and len(set(templated)) >= 4  # 2 uncaptioned images x 4 epochs: templates vary
    assert all(c.replace("<sks>", "{}") in OBJECT_TEMPLATES for c in templated)
    assert full.count("a <sks> on a table") == 4  # the captioned image keeps its caption
    assert _template_run(system, images, seed=1, steps=12) == full  # same seed, same sequence
    assert _template_run(system, images, seed=2, steps=12) != full
    resumed = _template_run(system, images, seed=1, steps=12, resume=tmp_path / "state")
    assert resumed == full[5:]  # the resumed run continues the sequence


def test_train_draws_a_new_template_at_each_use(tmp_path):
    """End to end: Custom Diffusion records the captions it trained on; one uncaptioned image seen 6
    times trains on several templates (it was one template, fixed per image)."""
    from sdadapt.formats.custom_diffusion import load_custom_diffusion

    images = _folder(tmp_path / "one", n=1)
    out = tmp_path / "cd.safetensors"
    assert main(["train", "custom-diffusion", "--images", str(images), "--token", "<sks>", "--model", "toy", "-o", str(out),
                 "--steps", "6", "--batch-size", "1", "--no-prior", "-q"]) == 0
    prompts = load_custom_diffusion(out).prompts
    assert len(prompts) >= 3 and all(p.replace("<sks>", "{}") in OBJECT_TEMPLATES for p in prompts)


# ------------------------------------------------------------------- the template around each draw (A1111's)
def test_the_caption_options_draw_on_the_own_caption_and_the_template_goes_around_it():
    """A1111's ``create_text`` shuffles and drops only ``[filewords]``'s tags: the trigger word and the template's
    words are never moved or dropped. Each draw is the template around the options' draw of the own caption (the
    same rng use), or ``""`` where that draw is empty (a whole-caption dropout)."""
    import random

    from sdadapt.training.data import CaptionOptions, ImageRecord

    own = "red, blue, green, small, shiny"
    record = ImageRecord(None, "a photo of <sks>, " + own, wrapped=("a photo of <sks>, ", own, ""))
    options = CaptionOptions(shuffle=True, tag_dropout=0.5, dropout=0.1)
    drawn = [record.draw_caption(options, random.Random(i)) for i in range(2000)]
    for i, text in enumerate(drawn):
        inner = options.apply(own, random.Random(i))
        assert text == ("a photo of <sks>, " + inner if inner else "")
    kept = [t for t in drawn if t]
    assert all(t.startswith("a photo of <sks>, ") for t in kept)  # (was: the trigger among the shuffled tags)
    assert 0.85 < len(kept) / len(drawn) < 0.95  # (the whole-caption dropout's 0.1, and nothing else, empties it)
    assert len({t for t in kept}) > 50
    plain = ImageRecord(None, own)  # (no template: drawn as it is)
    assert plain.draw_caption(options, random.Random(3)) == options.apply(own, random.Random(3))


@pytest.mark.parametrize("way", ["wrapped", "filled"])
def test_trigger_captions_wrap_only_captions_put_into_the_template(way):
    from sdadapt.jobs import TrainOptions
    from sdadapt.jobs.train import _trigger_captions
    from sdadapt.training.data import ImageRecord

    records = [ImageRecord(None, "red, blue"), ImageRecord(None, "a <sks> toy"), ImageRecord(None, "")]
    options = TrainOptions(images=".", caption_template="a photo of [name], [filewords] by day")
    _trigger_captions(records, "<sks>", options, trigger_captions_way=way)
    assert [r.caption for r in records] == ["a photo of <sks>, red, blue by day", "a <sks> toy", ""]
    assert records[0].wrapped == (("a photo of <sks>, ", "red, blue", " by day") if way == "wrapped" else None)
    assert records[1].wrapped is None and records[2].wrapped is None  # (its own mention; a template at each use)
    replaced = [ImageRecord(None, "red, blue")]  # (a template without {caption} replaces the caption: nothing around)
    _trigger_captions(replaced, "<sks>", TrainOptions(images=".", caption_template="a photo of [name]"))
    assert replaced[0].caption == "a photo of <sks>" and replaced[0].wrapped is None


def test_train_keeps_the_trigger_word_under_tag_dropout_and_records_the_way(tmp_path):
    """End to end: Custom Diffusion records the captions it trained on; with the tags shuffled and half of them
    dropped, every one still starts with the template and its trigger word; run.json says how (resume keeps it)."""
    from sdadapt.formats.custom_diffusion import load_custom_diffusion

    images = _folder(tmp_path / "imgs", n=2, captions=["red, blue, green, small", "square, dark, large, round"])
    out = tmp_path / "cd.safetensors"
    assert main(["train", "custom-diffusion", "--images", str(images), "--token", "<sks>", "--model", "toy", "-o", str(out),
                 "--steps", "8", "--batch-size", "1", "--no-prior", "-q", "--shuffle-caption",
                 "--caption-tag-dropout-rate", "0.5", "--caption-template", "a photo of [name], [filewords]",
                 "--save-state"]) == 0
    prompts = load_custom_diffusion(out).prompts
    assert len(prompts) >= 4 and all(p.startswith("a photo of <sks>") for p in prompts), prompts
    record = json.loads((tmp_path / "cd-state" / "run.json").read_text())
    assert record["trigger_captions"] == "wrapped"


def test_text_encoder_rates_are_said_to_do_nothing_for_a_trigger_word(tmp_path, capsys):
    """The trigger's rows live in hooks, not in the encoders: --text-encoder-lr reaches nothing (kohya's and diffusers'
    textual inversion train them at one rate); the run says so rather than ignoring it silently."""
    images = _folder(tmp_path / "imgs", n=1, captions=["a <sks> circle"])
    assert main(["train", "textual-inversion", "--images", str(images), "--token", "<sks>", "--model", "toy", "-o",
                 str(tmp_path / "t.pt"), "--steps", "1", "--batch-size", "1", "--text-encoder-lr", "0"]) == 0
    assert "--text-encoder-lr 0.0: not used by textual-inversion" in capsys.readouterr().err
