"""kohya's caption assembly, second revision (``caption_assembly = "kohya-2"``), and ``--resume`` of a run
recorded ``"kohya"``.

Transcribed in kohya_captions.py from kohya sd-scripts 48d368fa (library/train_util.py ``BaseDataset.process_caption``,
``FineTuningDataset.__init__``; train_textual_inversion.py's ``add_replacement("", templates)``), with kohya's
module-level ``random`` passed in as ``rng``:

* the textual-inversion templates replace the whole caption *last*, after the prefix / suffix, the dropout,
  the wildcards, the tag steps and the secondary separator drew on it, and never a dropped caption;
* the caption is split into tags only to shuffle, drop tags or warm up: a ``keep_tokens_separator`` alone
  stays in the caption;
* without ``enable_wildcard`` the first line is cut after the prefix / suffix are added (a ``"\\n"`` in them cuts);
* a fine-tuning caption keeps its white space as the metadata has it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kohya_captions import finetuning_caption as _kohya_finetuning_caption
from kohya_captions import process_caption as _kohya_process_caption
from train_inputs import random_png

from sdadapt.cli import main
from sdadapt.jobs.caption_lines import recorded_caption_assembly
from sdadapt.training.data import (
    ASSEMBLY_BEFORE,
    ASSEMBLY_KOHYA,
    ASSEMBLY_KOHYA_2,
    CaptionOptions,
    find_images,
)
from sdadapt.training.dataset_config import metadata_caption

_TEMPLATES = ("a photo of a <x>", "a rendering of a <x>", "the photo of the <x>")


_TAG = st.sampled_from(["a", "b c", "", " d ", "e  f", "{g|h}", "{{i}}", "j;;;k", "l|||m", "|||", "\nn", "o\n"])


@settings(max_examples=60, deadline=None)
@given(tags=st.lists(_TAG, max_size=6), captioned=st.booleans(), prefix=st.sampled_from(["", "pre", "p1\np2", "p, q"]),
       suffix=st.sampled_from(["", "suf", "s1\ns2"]), dropout=st.sampled_from([0.0, 0.3]), every_n=st.sampled_from([0, 2]),
       epoch=st.integers(0, 3), wildcard=st.booleans(), shuffle=st.booleans(), keep_tokens=st.integers(0, 2),
       keep_separator=st.sampled_from(["", "|||"]), tag_dropout=st.sampled_from([0.0, 0.4]),
       warmup=st.sampled_from([0, 4]), step=st.integers(0, 6), secondary=st.sampled_from(["", ";;;"]),
       separator=st.sampled_from([",", " "]), seed=st.integers(0, 2**16))
def test_a_draw_is_kohyas_process_caption_with_the_same_random_stream(
        tags, captioned, prefix, suffix, dropout, every_n, epoch, wildcard, shuffle, keep_tokens, keep_separator,
        tag_dropout, warmup, step, secondary, separator, seed):
    """Items 2-3: text and random state after one draw equal kohya's, templates (uncaptioned: ``""``) last."""
    caption = ",".join(tags).replace(",", separator) if captioned else ""
    options = CaptionOptions(templates=_TEMPLATES, prefix=prefix, suffix=suffix, dropout=dropout,
                             dropout_every_n_epochs=every_n, wildcards=wildcard, shuffle=shuffle, keep_tokens=keep_tokens,
                             keep_tokens_separator=keep_separator, tag_dropout=tag_dropout, token_warmup_steps=warmup,
                             secondary_separator=secondary, separator=separator, kohya_order=True)
    ours, theirs = random.Random(seed), random.Random(seed)
    got = options.apply(caption, ours, epoch=epoch, step=step)
    want = _kohya_process_caption(
        caption, theirs, replacements={} if caption else {"": list(_TEMPLATES)}, prefix=prefix, suffix=suffix,
        dropout=dropout, every_n=every_n, epoch=epoch + 1, wildcard=wildcard, shuffle=shuffle, keep_tokens=keep_tokens,
        keep_separator=keep_separator, tag_dropout=tag_dropout, warmup_step=warmup, step=step, secondary=secondary,
        separator=separator)
    assert got == want
    assert ours.getstate() == theirs.getstate()  # (the same draws: the next caption is kohya's next one too)


@pytest.mark.parametrize("kwargs, caption, kohya_2, kohya", [
    (dict(keep_tokens_separator="|||"), "a, b ||| c", "a, b ||| c", "a, b, c"),  # (nothing splits: kohya keeps it)
    (dict(prefix="p1\np2"), "cap", "p1", "p1\np2 cap"),  # (kohya cuts the first line after the prefix)
    (dict(suffix="s1\ns2"), "cap", "cap s1", "cap s1\ns2"),
    (dict(prefix="pre", templates=("a <x>",)), "", "a <x>", "pre a <x>"),  # (the template replaces it all, last)
    (dict(shuffle=True, keep_tokens=1, templates=("a <x>, b, c, d",)), "", "a <x>, b, c, d", "a <x>, c, b, d"),
])
def test_what_changed_and_what_a_run_recorded_kohya_keeps(kwargs, caption, kohya_2, kohya):
    """The differences one by one; ``kohya_order`` off (a resumed ``"kohya"`` run) keeps the old text."""
    assert CaptionOptions(kohya_order=True, **kwargs).apply(caption, random.Random(3)) == kohya_2
    assert CaptionOptions(kohya_order=False, **kwargs).apply(caption, random.Random(3)) == kohya


def test_a_dropped_uncaptioned_image_draws_no_template_and_an_old_run_draws_it_first():
    """kohya draws the dropout first and no template for a dropped caption; a run recorded ``"kohya"`` drew
    the template before the dropout: its stream is the old one (one ``randrange`` ahead)."""
    options = CaptionOptions(templates=_TEMPLATES, dropout=0.5, kohya_order=True)
    for seed in range(20):
        rng, theirs = random.Random(seed), random.Random(seed)
        got = options.apply("", rng)
        assert got == _kohya_process_caption("", theirs, replacements={"": list(_TEMPLATES)}, dropout=0.5)
        old, replay = random.Random(seed), random.Random(seed)
        template = _TEMPLATES[replay.randrange(len(_TEMPLATES))]
        expected_old = "" if replay.random() < 0.5 else template
        assert CaptionOptions(templates=_TEMPLATES, dropout=0.5, kohya_order=False).apply("", old) == expected_old
        assert old.getstate() == replay.getstate()


@settings(max_examples=40, deadline=None)
@given(lines=st.one_of(st.none(), st.lists(st.sampled_from(["a  b", " c", "d ,e", "", "  ", "f\tg"]), min_size=1, max_size=3)),
       tags=st.sampled_from([None, "", "t1,  t2", "k\nl"]), wildcard=st.booleans(), prefix=st.sampled_from(["", "pre"]),
       suffix=st.sampled_from(["", "suf"]), shuffle=st.booleans(), seed=st.integers(0, 2**16))
def test_a_fine_tuning_caption_keeps_its_white_space_as_kohyas(lines, tags, wildcard, prefix, suffix, shuffle, seed):
    """Item 3: with ``"kohya-2"`` the metadata caption and its draw are kohya's text exactly (no folded runs)."""
    raw = None if lines is None else "\n".join(lines)
    caption, cut = metadata_caption(raw or "", tags, wildcards=wildcard, assembly=ASSEMBLY_KOHYA_2)
    options = CaptionOptions(prefix=prefix, suffix="" if cut else suffix, wildcards=wildcard, shuffle=shuffle,
                             kohya_order=True)
    ours, theirs = random.Random(seed), random.Random(seed)
    got = options.apply(caption, ours)
    want = _kohya_process_caption(_kohya_finetuning_caption(raw, tags, separator=",", wildcard=wildcard), theirs,
                                  replacements={}, prefix=prefix, suffix=suffix, wildcard=wildcard, shuffle=shuffle)
    assert got == want
    assert ours.getstate() == theirs.getstate()
    folded = metadata_caption(raw or "", tags, wildcards=wildcard, assembly=ASSEMBLY_KOHYA)[0]  # (a "kohya" run's)
    assert folded == "\n".join(" ".join(line.split()) for line in caption.split("\n"))


def test_the_recorded_assembly_of_new_old_and_edited_runs():
    assert recorded_caption_assembly(None) == ASSEMBLY_KOHYA_2
    assert recorded_caption_assembly({"step": 2, "caption_assembly": "kohya"}) == ASSEMBLY_KOHYA
    assert recorded_caption_assembly({"step": 2, "caption_assembly": "kohya-2"}) == ASSEMBLY_KOHYA_2
    assert recorded_caption_assembly({"step": 2}) == ASSEMBLY_BEFORE
    with pytest.raises(ValueError, match="caption_assembly 'x' is not 'kohya-2', 'kohya' or 'before-kohya'"):
        recorded_caption_assembly({"step": 2, "caption_assembly": "x"})


def test_an_other_caption_file_and_class_tokens_are_said_as_kohya_warns(tmp_path):
    """Item 1: kohya's ``read_caption`` reads the caption extension only and warns about images taking the class
    tokens; sdadapt still reads ``NAME.txt`` / ``NAME.caption`` and says which images kohya would not caption so."""
    random_png(tmp_path / "2_cat" / "a.png", 0)
    random_png(tmp_path / "2_cat" / "b.png", 1)
    (tmp_path / "2_cat" / "a.txt").write_text("red")
    records, notes = find_images(tmp_path, caption_extension=".caption")
    assert [r.caption for r in records] == ["red", "cat"]
    assert any("a.png <- a.txt" in n and "kohya reads .caption files only" in n for n in notes)
    assert any("1 image(s) without a .caption file train on their folder's class tokens (2_cat/b.png)" in n for n in notes)
    assert not any("another caption file" in n for n in find_images(tmp_path, caption_extension=".txt")[1])


class _Stop(Exception):
    """Raised in place of the resumed run's training: its caption options are all the test reads."""


def test_a_new_run_records_kohya_2_and_a_resumed_kohya_run_keeps_its_order(tmp_path, train_fit_calls, monkeypatch):
    """A new run trains with ``kohya_order`` and records ``"kohya-2"``; a state recorded ``"kohya"`` resumes with
    the old caption options (the template first, the separator taken out: the captions it started with)."""
    import inspect

    import sdadapt.jobs.train as jobs
    from sdadapt.methods import fit

    root = tmp_path / "img"
    for i in range(2):
        random_png(root / f"{i}.png", i, (16, 16))
        (root / f"{i}.txt").write_text("a red circle ||| small")
    args = ["train", "lora", "--images", str(root), "--batch-size", "2", "--no-prior", "--keep-tokens-separator", "|||",
            "--resolution", "16", "--seed", "1", "-q"]
    assert main([*args, "--steps", "1", "--save-state-on-train-end", "-o", str(tmp_path / "a.safetensors")]) == 0
    captions = train_fit_calls[-1].dataset.captions
    assert captions.kohya_order and captions.apply("a red circle ||| small", random.Random(0)) == "a red circle ||| small"
    record_file = tmp_path / "a-state" / "run.json"
    record = json.loads(record_file.read_text())
    assert record["caption_assembly"] == "kohya-2"
    record["caption_assembly"] = "kohya"  # (a state saved by the version before)
    record_file.write_text(json.dumps(record))
    seen = []
    signature = inspect.signature(fit)

    def stop(*args, **kwargs):
        seen.append(signature.bind(*args, **kwargs).arguments["images"].captions)
        raise _Stop

    monkeypatch.setattr(jobs, "fit", stop)
    main([*args, "--steps", "2", "--resume", str(tmp_path / "a-state"), "-o", str(tmp_path / "b.safetensors")])  # (_Stop)
    assert not seen[0].kohya_order and seen[0].kohya_assembly
    assert seen[0].apply("a red circle ||| small", random.Random(0)) == "a red circle, small"


def _kohya_config_dirs(subsets: list[tuple[str, int, int, bool]]) -> tuple[dict, dict]:
    """train_network.py's dataset-config branch (48d368fa) over ``(image_dir, num_repeats, images, is_reg)`` of one
    DreamBooth dataset, after DreamBoothDataset skipped the subsets without images (``set_tag_frequency`` ran for
    them first): ``(ss_dataset_dirs, the dataset's tag_frequency keys)``."""
    tag_frequency: dict = {}
    kept = []
    for image_dir, repeats, count, is_reg in subsets:
        tag_frequency.setdefault(image_dir.rsplit("/", 1)[-1], {})  # (set_tag_frequency, before the skip)
        if count < 1:
            continue  # ("ignore subset with image_dir=...: no images found")
        kept.append((image_dir, repeats, count, is_reg))
    dataset_dirs_info: dict = {}
    for image_dir, repeats, count, is_reg in kept:
        image_dir_or_metadata_file = None if is_reg else image_dir.rsplit("/", 1)[-1]
        if image_dir_or_metadata_file is not None:
            v, i = image_dir_or_metadata_file, 2
            while v in dataset_dirs_info:
                v = image_dir_or_metadata_file + f" ({i})"
                i += 1
            dataset_dirs_info[v] = {"n_repeats": repeats, "img_count": count}
    return dataset_dirs_info, tag_frequency


def test_a_subset_without_images_is_skipped_and_numbers_nothing_as_kohyas(tmp_path):
    """Item 4: a dataset-config subset whose folder holds no images is skipped with a note (not refused), takes no
    ``ss_dataset_dirs`` key or number (a later subset of its name is ``cat``, not ``cat (2)``), and is no
    ``ss_datasets`` subset; its folder has an empty ``ss_tag_frequency`` entry, as kohya's."""
    from sdadapt.jobs.train import TrainOptions, _data_config_fallback
    from sdadapt.training.data import Dataset, plan_dataset
    from sdadapt.training.dataset_config import (
        dataset_records,
        kohya_config_dataset_dirs,
        kohya_datasets_metadata,
        read_dataset_config,
    )

    (tmp_path / "a" / "cat").mkdir(parents=True)
    (tmp_path / "e").mkdir()
    for i in range(2):
        random_png(tmp_path / "b" / "cat" / f"{i}.png", i)
        (tmp_path / "b" / "cat" / f"{i}.txt").write_text("red, cat")
    random_png(tmp_path / "c" / "cat" / "0.png", 5)
    (tmp_path / "c" / "cat" / "0.txt").write_text("blue")
    toml = tmp_path / "d.toml"
    subsets = [("a/cat", 2, 0, False), ("b/cat", 3, 2, False), ("e", 1, 0, False), ("c/cat", 1, 1, False)]
    toml.write_text("[[datasets]]\n" + "".join(
        f'[[datasets.subsets]]\nimage_dir = "{tmp_path / d}"\nnum_repeats = {n}\n' for d, n, _, _ in subsets))
    config = read_dataset_config(toml, fallback=_data_config_fallback(TrainOptions(images=".")))
    train, reg, _, notes = dataset_records(config)
    assert sum("holds no images" in n and "skipped" in n for n in notes) == 2
    want_dirs, want_tags = _kohya_config_dirs([(str(tmp_path / d), n, c, r) for d, n, c, r in subsets])
    assert kohya_config_dataset_dirs(config, train) == want_dirs == {"cat": {"n_repeats": 3, "img_count": 2},
                                                                      "cat (2)": {"n_repeats": 1, "img_count": 1}}
    plan_dataset(train, resolution=32, buckets=False)
    meta = kohya_datasets_metadata(config, Dataset(train, captions=CaptionOptions()), reg, batch_size=1,
                                   resolution=(32, 32))
    assert [(s["image_dir"], s["img_count"]) for s in meta[0]["subsets"]] == [("cat", 2), ("cat", 1)]
    assert set(meta[0]["tag_frequency"]) == set(want_tags) == {"cat", "e"}
    assert meta[0]["tag_frequency"]["e"] == {} and meta[0]["tag_frequency"]["cat"] == {"red": 2, "cat": 2, "blue": 1}
    (tmp_path / "b" / "cat" / "0.png").unlink()
    (tmp_path / "b" / "cat" / "1.png").unlink()
    (tmp_path / "c" / "cat" / "0.png").unlink()
    with pytest.raises(Exception, match="no training images"):
        dataset_records(config)


# --- review RK ------------------------------------------------------------------------------------------------------

def _before_apply(o: CaptionOptions, caption: str, rng: random.Random, *, epoch: int = 0, step: int = 0) -> str:
    """``CaptionOptions.apply`` as the version before ``"kohya-2"`` had it (HEAD before the change; the way a
    resumed ``"kohya"`` / ``"before-kohya"`` run must keep drawing): the template first, ``|||`` always split out,
    no first-line cut, nothing done when no option is on."""
    active = (o.shuffle or o.dropout > 0 or o.tag_dropout > 0 or bool(o.templates)
              or bool(o.prefix or o.suffix or o.keep_tokens_separator or o.secondary_separator)
              or o.wildcards or o.dropout_every_n_epochs > 0 or o.token_warmup_steps > 0)
    if not active:
        return caption
    if not caption and o.templates:
        caption = o.templates[rng.randrange(len(o.templates))]
    if o.prefix:
        caption = f"{o.prefix} {caption}"
    if o.suffix:
        caption = f"{caption} {o.suffix}"
    if o.dropout and rng.random() < o.dropout:
        return ""
    if o.dropout_every_n_epochs and (epoch + 1) % o.dropout_every_n_epochs == 0:
        return ""
    if o.wildcards:
        caption = _kohya_process_caption(caption, rng, replacements={}, wildcard=True)  # (kohya's wildcard step alone)
    sep = o.keep_tokens_separator
    if (o.shuffle or (not o.kohya_assembly and o.dropout and o.separator == ",") or o.tag_dropout
            or o.token_warmup_steps or (sep and sep in caption)):
        def split(text):
            return [t for t in (t.strip() for t in text.split(o.separator)) if t]
        tail: list[str] = []
        if sep and sep in caption:
            head, rest = caption.split(sep, 1)
            if sep in rest:
                rest, end = rest.split(sep, 1)
                tail = split(end)
            fixed, flex = split(head), split(rest)
        else:
            tags = [t.strip() for t in caption.strip().split(o.separator)] if o.keep_empty_tags else split(caption)
            fixed, flex = tags[:o.keep_tokens], tags[o.keep_tokens:]
        if o.token_warmup_steps and step < o.token_warmup_steps:
            flex = flex[:math.floor(step * ((len(flex) - o.token_warmup_min) / o.token_warmup_steps)) + o.token_warmup_min]
        if o.shuffle and o.kohya_assembly:
            rng.shuffle(flex)
        if o.tag_dropout:
            flex = [t for t in flex if rng.random() >= o.tag_dropout]
        if o.shuffle and not o.kohya_assembly:
            rng.shuffle(flex)
        caption = ", ".join(fixed + flex + tail)
    if o.secondary_separator:
        caption = caption.replace(o.secondary_separator, o.separator)
    return caption


def _mostly(off, *on):
    """Each option off in most examples (so "nothing on" is drawn too)."""
    return st.sampled_from([off] * 3 + list(on))


@settings(max_examples=80, deadline=None)
@given(tags=st.lists(_TAG, max_size=5), captioned=st.booleans(), templates=_mostly((), _TEMPLATES),
       prefix=_mostly("", "pre", "p1\np2"), suffix=_mostly("", "s1\ns2"), dropout=_mostly(0.0, 0.3),
       every_n=_mostly(0, 2), wildcard=_mostly(False, True), shuffle=_mostly(False, True),
       keep_separator=_mostly("", "|||"), tag_dropout=_mostly(0.0, 0.4), warmup=_mostly(0, 4),
       secondary=_mostly("", ";;;"), keep_empty=st.booleans(), assembly=st.booleans(), seed=st.integers(0, 2**16))
def test_review_every_option_off_or_on_over_epochs_is_kohyas_and_the_old_order_is_the_version_befores(
        tags, captioned, templates, prefix, suffix, dropout, every_n, wildcard, shuffle, keep_separator, tag_dropout,
        warmup, secondary, keep_empty, assembly, seed):
    """Review RK. ``kohya_order`` on: kohya's ``process_caption`` also when no option is on (a caption of several
    lines trains on its first line, no draw). ``kohya_order`` off (a resumed ``"kohya"`` run) and
    ``kohya_assembly`` off (``"before-kohya"``, whatever ``kohya_order`` says): the text and random stream of the
    version before, over several micro-batches of fit's per-micro-batch streams and epochs — a resumed run draws
    byte for byte what it drew before."""
    caption = ",".join(tags) if captioned else ""
    common = dict(templates=templates, prefix=prefix, suffix=suffix, dropout=dropout, dropout_every_n_epochs=every_n,
                  wildcards=wildcard, shuffle=shuffle, keep_tokens=1, keep_tokens_separator=keep_separator,
                  tag_dropout=tag_dropout, token_warmup_steps=warmup, secondary_separator=secondary,
                  keep_empty_tags=keep_empty)
    new = CaptionOptions(**common, kohya_order=True)
    old = CaptionOptions(**common, kohya_assembly=assembly, kohya_order=False)
    before_kohya = CaptionOptions(**common, kohya_assembly=False, kohya_order=True)  # (kohya_order needs kohya_assembly)
    for micro in range(6):
        epoch, step = micro // 2, micro
        ours, theirs = random.Random(f"{seed}/captions/{micro}"), random.Random(f"{seed}/captions/{micro}")
        want = _kohya_process_caption(
            caption, theirs, replacements={"": list(templates)} if templates and not caption else {}, prefix=prefix,
            suffix=suffix, dropout=dropout, every_n=every_n, epoch=epoch + 1, wildcard=wildcard, shuffle=shuffle,
            keep_tokens=1, keep_separator=keep_separator, tag_dropout=tag_dropout, warmup_step=warmup, step=step,
            secondary=secondary) if keep_empty else None  # (kohya keeps empty tags: its transcription needs that)
        got = new.apply(caption, ours, epoch=epoch, step=step)
        if want is not None:
            assert got == want
            assert ours.getstate() == theirs.getstate()
        for options in (old, before_kohya):
            ours, theirs = random.Random(f"{seed}/captions/{micro}"), random.Random(f"{seed}/captions/{micro}")
            assert options.apply(caption, ours, epoch=epoch, step=step) == _before_apply(
                options if options is old else dataclasses.replace(options, kohya_order=False), caption, theirs,
                epoch=epoch, step=step)
            assert ours.getstate() == theirs.getstate()


def test_review_a_resumed_kohya_dataset_config_run_keeps_the_old_order_in_every_subset(tmp_path, monkeypatch):
    """Review RK. With a dataset config each record draws with its subset's own options (built again once the
    token warm-up's steps are known): a run recorded ``"kohya"`` must get ``kohya_order`` off there too, or its
    resumed captions change (``|||`` kept, the template last). (The recorded value is put in place of a resume.)"""
    import inspect

    import sdadapt.jobs.caption_lines as caption_lines
    import sdadapt.jobs.train as jobs
    from sdadapt.methods import fit

    for name in ("a", "b"):
        for i in range(2):
            random_png(tmp_path / name / f"{i}.png", i, (16, 16))
            (tmp_path / name / f"{i}.txt").write_text("red ||| circle")
    toml = tmp_path / "d.toml"
    toml.write_text("[general]\nkeep_tokens_separator = \"|||\"\n[[datasets]]\nbatch_size = 2\nresolution = 16\n"
                    f'[[datasets.subsets]]\nimage_dir = "{(tmp_path / "a").as_posix()}"\n'
                    f'[[datasets.subsets]]\nimage_dir = "{(tmp_path / "b").as_posix()}"\ncaption_prefix = "p1\\np2"\n')
    seen = []
    signature = inspect.signature(fit)

    def stop(*args, **kwargs):
        seen.append(signature.bind(*args, **kwargs).arguments["images"])
        raise _Stop

    monkeypatch.setattr(jobs, "fit", stop)
    for recorded, order in ((ASSEMBLY_KOHYA, False), (ASSEMBLY_KOHYA_2, True)):
        monkeypatch.setattr(caption_lines, "recorded_caption_assembly", lambda record, value=recorded: value)
        main(["train", "lora", "--dataset-config", str(toml), "--seed", "1", "-q", "--steps", "2", "--no-prior",
              "--token-warmup-step", "0.5", "-o", str(tmp_path / f"{recorded}.safetensors")])  # (stops at fit)
        assert len(seen) == 1 + 2 * order
        images = seen[-1]
        assert images.captions.kohya_order is order
        assert len(images.records) == 4 and all(r.captions.kohya_order is order for r in images.records)
        drawn = sorted(r.captions.apply(r.caption, random.Random(0), step=5) for r in images.records)
        # (the warm-up over, every tag kept; "kohya-2": the prefix's first line only, as kohya's process_caption)
        assert drawn == (["p1", "p1", "red, circle", "red, circle"] if order
                         else ["p1\np2 red, circle", "p1\np2 red, circle", "red, circle", "red, circle"])
        # --images (no warm-up: the options built before the steps are known are the ones that train)
        main(["train", "lora", "--images", str(tmp_path / "a"), "--seed", "1", "-q", "--steps", "2", "--no-prior",
              "--resolution", "16", "--keep-tokens-separator", "|||", "-o", str(tmp_path / f"i-{recorded}.safetensors")])
        assert len(seen) == 2 * (1 + order) and seen[-1].captions.kohya_order is order
        assert seen[-1].captions.apply("red ||| circle", random.Random(0)) == ("red ||| circle" if order else "red, circle")


@pytest.mark.parametrize("caption", ["a, b\nc", "\nc", "a ||| b\n"])
def test_review_with_no_option_on_a_caption_of_several_lines_is_cut_as_kohyas_and_the_old_order_leaves_it(caption):
    """Review RK. kohya's ``process_caption`` cuts at the first ``"\\n"`` whatever option is on (no draw); a run
    recorded ``"kohya"`` (``kohya_order`` off) returned a caption untouched when no option was on."""
    ours, theirs = random.Random(5), random.Random(5)
    assert CaptionOptions().apply(caption, ours) == _kohya_process_caption(caption, theirs, replacements={})
    assert ours.getstate() == theirs.getstate() == random.Random(5).getstate()
    assert CaptionOptions(kohya_order=False).apply(caption, random.Random(5)) == caption


def test_review_an_image_taking_the_default_caption_is_not_said_to_take_class_tokens(tmp_path):
    """Review RK. Only images in an ``N_name`` folder take class tokens; one directly in ``--images`` without a
    caption file takes ``--prompt`` (kohya: the subset's class_tokens) and is not counted among them."""
    random_png(tmp_path / "a.png", 0)
    random_png(tmp_path / "2_cat" / "b.png", 1)
    records, notes = find_images(tmp_path, default_caption="a dog")
    assert sorted(r.caption for r in records) == ["a dog", "cat"]
    assert any("1 image(s) without a .txt file train on their folder's class tokens (2_cat/b.png)" in n for n in notes)


def test_review_a_subset_folder_whose_images_are_in_sub_folders_is_not_skipped_unnamed(tmp_path):
    """Review RK. kohya skips such a subset too ("no images found"); sdadapt should at least name the sub-folders
    holding the images (or refuse, as before), so the user sees that ``image_dir = reg`` meant ``reg/1_dog``."""
    from sdadapt.images import ImageFolderError
    from sdadapt.jobs.train import TrainOptions, _data_config_fallback
    from sdadapt.training.dataset_config import dataset_records, read_dataset_config

    for i in range(2):
        random_png(tmp_path / "train" / f"{i}.png", i, (16, 16))
        random_png(tmp_path / "reg" / "1_dog" / f"{i}.png", i + 5, (16, 16))
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{(tmp_path / "train").as_posix()}"\nclass_tokens = "cat"\n'
                    f'[[datasets.subsets]]\nimage_dir = "{(tmp_path / "reg").as_posix()}"\nis_reg = true\n'
                    'class_tokens = "dog"\n')
    config = read_dataset_config(toml, fallback=_data_config_fallback(TrainOptions(images=".")))
    try:
        _, reg, _, notes = dataset_records(config)
    except ImageFolderError as exc:
        assert "1_dog" in str(exc)
    else:
        assert reg is None and any("holds no images" in n and "1_dog" in n for n in notes)


def test_review_a_block_left_without_training_images_but_with_class_images_is_said_by_name(tmp_path):
    """Review RK. kohya registers no reg image for a dataset without training images (its balancing loop never
    runs) and warns; sdadapt should leave that block's class images out with a note naming the block, or refuse
    naming it — not raise reg_data's context-free ValueError."""
    from sdadapt.images import ImageFolderError
    from sdadapt.jobs.train import TrainOptions, _data_config_fallback
    from sdadapt.training.dataset_config import dataset_records, read_dataset_config

    (tmp_path / "empty").mkdir()
    for i in range(2):
        random_png(tmp_path / "train" / f"{i}.png", i, (16, 16))
        random_png(tmp_path / "dog" / f"{i}.png", i + 5, (16, 16))
    toml = tmp_path / "d.toml"
    toml.write_text(f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{(tmp_path / "empty").as_posix()}"\n'
                    f'[[datasets.subsets]]\nimage_dir = "{(tmp_path / "dog").as_posix()}"\nis_reg = true\nclass_tokens = "dog"\n'
                    f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{(tmp_path / "train").as_posix()}"\nclass_tokens = "cat"\n')
    config = read_dataset_config(toml, fallback=_data_config_fallback(TrainOptions(images=".")))
    try:
        train, _, _, notes = dataset_records(config)
    except ImageFolderError as exc:
        assert "datasets[0]" in str(exc)
    else:
        assert len(train) == 2 and any("datasets[0]" in n for n in notes)
