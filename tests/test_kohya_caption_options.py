"""kohya's caption options: ``caption_prefix`` / ``caption_suffix``, ``caption_dropout_every_n_epochs``,
``enable_wildcard``, ``keep_tokens_separator``, ``secondary_separator``, ``token_warmup_min`` /
``token_warmup_step`` (``weighted_captions``: tests/test_weighted_captions.py).

kohya (library/train_util.py, ``BaseDataset.process_caption``), in this order::

    if subset.caption_prefix: caption = subset.caption_prefix + " " + caption
    if subset.caption_suffix: caption = caption + " " + subset.caption_suffix
    is_drop_out = rate > 0 and random.random() < rate
    is_drop_out = is_drop_out or every_n > 0 and self.current_epoch % every_n == 0   # current_epoch = epoch + 1
    if is_drop_out: caption = ""
    else:
        if enable_wildcard:  multi-line caption -> random.choice(lines); "{{"/"}}" escaped;
                             re.sub(r"\\{([^}]+)\\}", random.choice(group(1).split("|")))
        if shuffle or token_warmup_step > 0 or tag_dropout > 0:
            if keep_tokens_separator in caption: fixed | flex [| fixed_suffix]   (split once, twice)
            else: fixed = tokens[:keep_tokens]; flex = tokens[keep_tokens:]
            if token_warmup_step < 1: token_warmup_step = floor(token_warmup_step * max_train_steps)
            if token_warmup_step and current_step < token_warmup_step:
                flex = flex[:floor(current_step * ((len(flex) - token_warmup_min) / token_warmup_step)) + token_warmup_min]
            shuffle flex; drop tags; caption = ", ".join(fixed + flex + fixed_suffix)
        if secondary_separator: caption = caption.replace(secondary_separator, caption_separator)

``current_step`` is the optimiser step (``global_step``), ``current_epoch`` counts from 1. Captions
read with ``enable_wildcard`` keep every non-empty line. Without a keep_tokens_separator in the caption
kohya's split keeps the empty tags (``[t.strip() for t in caption.strip().split(sep)]``: ``"a, b, "`` is
three tags); with one it drops them (``if t.strip()``). ``_kohya_process_caption`` (kohya_captions.py) is that code
(sd-scripts 48d368fa, library/train_util.py) with the random module passed in; runs recorded before
sdadapt kept empty tags (``keep_empty_tags=False``) dropped them everywhere. sdadapt draws from
``random.Random(f"{seed}/captions/{micro}")`` (a resumed run makes the same draws) and takes the
``keep_tokens_separator`` out of a caption even when nothing shuffles or drops (kohya then leaves it in).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kohya_captions import process_caption as _kohya_process_caption
from safetensors import safe_open
from train_inputs import captioned_pngs, lora_train_args

from sdadapt.cli import build_parser, main
from sdadapt.jobs.train import TrainOptions, _check_resume, _write_run_record
from sdadapt.methods import METHODS, FitConfig, fit
from sdadapt.toy import build_toy
from sdadapt.toy.evaluate import concept_data
from sdadapt.training.data import (
    CaptionOptions,
    Dataset,
    encode_buckets,
    expand_wildcards,
    find_images,
    records_from_tensors,
    token_warmup_step_count,
)


# ----------------------------------------------------------------------------- references
def _kohya_caption(caption: str, *, prefix=None, suffix=None, every_n=0, epoch=1, keep_tokens=0, keep_separator="",
                   secondary=None, warmup_step=0.0, warmup_min=1, step=0, max_steps=100) -> str:
    """kohya's process_caption without its random draws (no shuffle, no dropout rates, no wildcards),
    written from the rules in the module docstring; ``epoch`` counts from 1, as kohya's."""
    if prefix:
        caption = prefix + " " + caption
    if suffix:
        caption = caption + " " + suffix
    if every_n > 0 and epoch % every_n == 0:
        return ""
    if warmup_step > 0:  # (the tag branch; kohya also enters it for shuffle or tag dropout)
        fixed, flex, tail = [], [], []
        if keep_separator and keep_separator in caption:
            head, rest = caption.split(keep_separator, 1)
            if keep_separator in rest:
                rest, end = rest.split(keep_separator, 1)
                tail = [t.strip() for t in end.split(",") if t.strip()]
            fixed = [t.strip() for t in head.split(",") if t.strip()]
            flex = [t.strip() for t in rest.split(",") if t.strip()]
        else:
            tokens = [t.strip() for t in caption.strip().split(",")]
            flex = tokens[:]
            if keep_tokens > 0:
                fixed, flex = flex[:keep_tokens], tokens[keep_tokens:]
        if warmup_step < 1:
            warmup_step = math.floor(warmup_step * max_steps)
        if warmup_step and step < warmup_step:
            flex = flex[:math.floor(step * ((len(flex) - warmup_min) / warmup_step)) + warmup_min]
        caption = ", ".join(fixed + flex + tail)
    if secondary:
        caption = caption.replace(secondary, ",")
    return caption


def _old_apply(options: CaptionOptions, caption: str, rng: random.Random) -> str:
    """CaptionOptions.apply as it was before these options (templates, dropout, keep_tokens, tag
    dropout, shuffle): the new code must give exactly this, with the same draws, when they are off."""
    if not (options.shuffle or options.dropout or options.tag_dropout or options.templates):
        return caption
    if not caption and options.templates:
        caption = options.templates[rng.randrange(len(options.templates))]
    if options.dropout and rng.random() < options.dropout:
        return ""
    if not (options.shuffle or options.dropout or options.tag_dropout):
        return caption
    tags = [t for t in (t.strip() for t in caption.split(options.separator)) if t]
    fixed, rest = tags[: options.keep_tokens], tags[options.keep_tokens:]
    if options.tag_dropout:
        rest = [t for t in rest if rng.random() >= options.tag_dropout]
    if options.shuffle:
        rng.shuffle(rest)
    return f"{options.separator} ".join(fixed + rest)


# ----------------------------------------------------------------------------- CaptionOptions
@pytest.mark.parametrize("case", [
    {"prefix": "masterpiece", "suffix": "high quality"},
    {"prefix": "sks"},
    {"suffix": "by artist"},
    {"every_n": 2, "epoch": 2},
    {"every_n": 2, "epoch": 3, "prefix": "p"},
    {"every_n": 1, "epoch": 1},
    {"secondary": ";;;"},
    {"keep_separator": "|||", "warmup_step": 5, "step": 9},
    {"keep_separator": "|||", "warmup_step": 8, "step": 3, "warmup_min": 2},
    {"keep_tokens": 2, "warmup_step": 10, "step": 4, "prefix": "p"},
    {"warmup_step": 0.25, "step": 7, "max_steps": 40},
    {"warmup_step": 10, "step": 0, "warmup_min": 0},
    {"warmup_step": 6, "step": 1, "warmup_min": 9},  # more than there are: all of them
    {"secondary": ";;;", "keep_separator": "|||", "warmup_step": 12, "step": 6, "suffix": "s"},
])
@pytest.mark.parametrize("caption", [
    "sks dog, running, grass;;;field, sunny, blue sky, photo",
    "trigger ||| red, green, blue;;;cyan, white ||| tail, end",
    "one, two ||| three",
])
def test_the_deterministic_options_are_kohyas_process_caption(case, caption):
    options = CaptionOptions(prefix=case.get("prefix") or "", suffix=case.get("suffix") or "",
                             dropout_every_n_epochs=case.get("every_n", 0), keep_tokens=case.get("keep_tokens", 0),
                             keep_tokens_separator=case.get("keep_separator", ""),
                             secondary_separator=case.get("secondary") or "",
                             token_warmup_min=case.get("warmup_min", 1),
                             token_warmup_steps=token_warmup_step_count(case.get("warmup_step", 0), case.get("max_steps", 100)))
    got = options.apply(caption, random.Random(0), epoch=case.get("epoch", 1) - 1, step=case.get("step", 0))
    assert got == _kohya_caption(caption, **case)


@pytest.mark.parametrize("caption, kohya, legacy", [
    ("sks dog, running, ", "sks dog, running, ", "sks dog, running"),
    ("a,,b, c", "a, , b, c", "a, b, c"),
    (", lead", ", lead", "lead"),
    ("x ||| a,,b, ||| t,", "x, a, b, t", "x, a, b, t"),  # (the separator's split drops them in kohya too)
])
def test_empty_tags_are_kept_as_kohyas_process_caption_keeps_them(caption, kohya, legacy):
    options = CaptionOptions(token_warmup_min=1, token_warmup_steps=10, keep_tokens_separator="|||")
    got = options.apply(caption, random.Random(0), step=20)  # (warm-up over: every tag, in caption order)
    assert got == _kohya_caption(caption, warmup_step=10, step=20, keep_separator="|||") == kohya
    old = dataclasses.replace(options, keep_empty_tags=False)  # (a resumed run recorded before)
    assert old.apply(caption, random.Random(0), step=20) == legacy
    # the warm-up counts the empty tag: 3 movable tags, step 5 of 10 from 1 -> floor(5 * 2 / 10) + 1 = 2
    assert options.apply("a, b, ", random.Random(0), step=5) == "a, b"
    assert old.apply("a, b, ", random.Random(0), step=5) == "a"  # (2 tags: floor(5 * 1 / 10) + 1 = 1)


_TAGS = ["red", "Blue sky", "", " ", "x;;;y", "1girl", "a b"]


def _tag_case(seed: int) -> dict:
    """One case of :func:`test_the_tag_steps_are_kohyas_with_empty_tags`, every piece drawn from
    ``random.Random(seed)`` (one hypothesis draw per case: drawing each of its ~40 pieces through
    hypothesis cost ~20x the test body). The caption: comma-separated tags (empty ones, spaces around
    them) in 1-3 parts joined by ``|||``: 0-6 tags a part, each one of :data:`_TAGS` after "", " " or
    "  ", each part ending in "", ",", ", " or " ,"."""
    rng = random.Random(seed)
    parts = []
    for _ in range(rng.randint(1, 3)):
        tags = [rng.choice(["", " ", "  "]) + rng.choice(_TAGS) for _ in range(rng.randint(0, 6))]
        parts.append(",".join(tags) + rng.choice(["", ",", ", ", " ,"]))
    return {"caption": " ||| ".join(parts), "keep_tokens": rng.randint(0, 3), "with_separator": rng.random() < 0.5,
            "shuffle": rng.random() < 0.5, "tag_dropout": rng.choice([0.0, 0.3, 1.0]), "dropout": rng.choice([0.0, 0.25]),
            "warmup": rng.choice([0, 4, 9]), "warmup_min": rng.randint(0, 3), "step": rng.randint(0, 10),
            "secondary": rng.choice(["", ";;;"]), "seed": rng.randint(0, 2**16), "separator": rng.choice([",", ";"])}


@settings(max_examples=400, deadline=None, derandomize=True)
@given(case=st.integers(0, 2**32 - 1).map(_tag_case))
def test_the_tag_steps_are_kohyas_with_empty_tags(case):
    """sdadapt drops tags before it shuffles, kohya after (the same distribution); with only one of the
    two the draws are kohya's own (the whole-caption draw, then the shuffle or one draw per movable tag in
    order), so a seeded draw equals the transcription exactly, empty tags and all."""
    caption, keep_tokens, with_separator, shuffle, tag_dropout, dropout, warmup, warmup_min, step, secondary, seed, \
        separator = (case[k] for k in ("caption", "keep_tokens", "with_separator", "shuffle", "tag_dropout", "dropout",
                                        "warmup", "warmup_min", "step", "secondary", "seed", "separator"))
    shuffle = shuffle or not (tag_dropout or warmup)  # (kohya splits only to shuffle, drop tags or warm up)
    caption = caption.replace(",", separator)  # (review R1: the empty tags of another caption_separator too)
    keep_separator = "|||" if with_separator else ""
    kwargs = {"keep_tokens": keep_tokens, "keep_separator": keep_separator, "tag_dropout": tag_dropout,
              "dropout": dropout, "warmup_step": warmup, "warmup_min": warmup_min, "step": step, "secondary": secondary,
              "shuffle": shuffle, "separator": separator}
    options = CaptionOptions(shuffle=shuffle, keep_tokens=keep_tokens, keep_tokens_separator=keep_separator,
                             tag_dropout=tag_dropout, dropout=dropout, token_warmup_steps=warmup,
                             token_warmup_min=warmup_min, secondary_separator=secondary,
                             separator=separator)
    ours, theirs = random.Random(seed), random.Random(seed)
    got, want = options.apply(caption, ours, step=step), _kohya_process_caption(caption, theirs, **kwargs)
    if not (shuffle and tag_dropout):
        assert got == want
        assert ours.getstate() == theirs.getstate()  # (as many draws)
    elif tag_dropout == 1.0:
        assert got == want  # (every movable tag dropped)
    else:  # (some of the tags kohya's split gives, dropped then shuffled)
        kept = _kohya_process_caption(caption, random.Random(seed), **{**kwargs, "tag_dropout": 0.0})
        if kept == "":
            assert got == ""
        else:
            pool = kept.split(", ")
            for tag in got.split(", ") if got else []:
                assert tag in pool
                pool.remove(tag)


def test_the_warmup_grows_the_tag_count_as_kohyas_formula():
    """n = ⌊step·(len − min)/W⌋ + min tags (in caption order) before step W, all of them from W on."""
    tags = [f"t{i}" for i in range(9)]
    caption = ", ".join(tags)
    for warmup, low in [(10, 1), (7, 3), (4.0, 0), (3, 12)]:
        options = CaptionOptions(token_warmup_steps=warmup, token_warmup_min=low)
        counts = []
        for step in range(12):
            got = options.apply(caption, random.Random(step), step=step)
            kept = got.split(", ") if got else []
            assert kept == tags[:len(kept)]  # the first ones, in order
            counts.append(len(kept))
            want = len(tags) if step >= warmup else max(0, min(len(tags), math.floor(step * (len(tags) - low) / warmup) + low))
            assert len(kept) == want, (warmup, low, step)
        assert counts[-1] == len(tags)
    # kohya's fraction: a share of the run's steps, rounded down; from 1 on a count
    assert [token_warmup_step_count(v, 40) for v in (0, 0.25, 0.999, 1, 1.5, 30)] == [0, 10, 39, 1, 1.5, 30]
    with pytest.raises(ValueError, match="token_warmup_step must be >= 0"):
        token_warmup_step_count(-1, 10)


def test_caption_dropout_every_n_epochs_empties_every_nth_epoch_counted_from_one():
    options = CaptionOptions(dropout_every_n_epochs=3)
    assert [options.apply("a, b", random.Random(0), epoch=e) for e in range(7)] == [
        "a, b", "a, b", "", "a, b", "a, b", "", "a, b"]  # kohya's epochs 3 and 6
    # with a dropout rate: the same draws as without it, epochs off the cycle give the same captions
    rate = CaptionOptions(dropout=0.3, shuffle=True)
    both = dataclasses.replace(rate, dropout_every_n_epochs=2)
    for seed in range(50):
        assert both.apply("a, b, c, d", random.Random(seed), epoch=0) == rate.apply("a, b, c, d", random.Random(seed))
        assert both.apply("a, b, c, d", random.Random(seed), epoch=1) == ""


def test_wildcards_draw_each_choice_and_line_and_keep_escaped_braces():
    seen = {expand_wildcards("a {red|green|blue} {cat|dog}", random.Random(s)) for s in range(200)}
    assert seen == {f"a {c} {a}" for c in ("red", "green", "blue") for a in ("cat", "dog")}
    assert expand_wildcards("{{not}} a {x} {{y|z}}", random.Random(0)) == "{not} a x {y|z}"
    assert expand_wildcards("no braces", random.Random(0)) == "no braces"
    lines = {expand_wildcards("one {a|b}\ntwo\nthree", random.Random(s)) for s in range(200)}
    assert lines == {"one a", "one b", "two", "three"}
    # kohya's draw: random.choice over the lines, then over each {…} in order
    rng = random.Random(7)
    line = rng.choice(["x {a|b|c}", "y {d|e}"])
    want = line.replace(line[line.index("{"):], rng.choice(line[line.index("{") + 1:-1].split("|")))
    assert expand_wildcards("x {a|b|c}\ny {d|e}", random.Random(7)) == want
    options = CaptionOptions(wildcards=True, shuffle=True, keep_tokens=1)
    assert options.apply("k, {p|q}, r", random.Random(3)) == options.apply("k, {p|q}, r", random.Random(3))
    assert {options.apply("k, {p|q}, r", random.Random(s)).split(", ")[0] for s in range(50)} == {"k"}


def test_the_keep_tokens_separator_keeps_the_head_and_the_tail_and_the_secondary_one_joins_tags():
    options = CaptionOptions(shuffle=True, keep_tokens=5, keep_tokens_separator="|||", secondary_separator=";;;")
    orders = set()
    for seed in range(300):
        got = options.apply("sks, girl ||| red;;;hat, smile, sky, tree ||| best, quality", random.Random(seed)).split(", ")
        assert got[:2] == ["sks", "girl"] and got[-2:] == ["best", "quality"]  # (keep_tokens is not used)
        middle = got[2:-2]
        assert sorted(middle) == ["red,hat", "sky", "smile", "tree"]  # the joined tags moved as one
        orders.add(tuple(middle))
    assert len(orders) == 24  # every order of the four
    plain = CaptionOptions(keep_tokens_separator="|||")  # nothing shuffles: the separator stays, as kohya's
    assert plain.apply("a, b ||| c, d", random.Random(0)) == "a, b ||| c, d"
    before = CaptionOptions(keep_tokens_separator="|||", kohya_order=False)  # (a run recorded "kohya" or before)
    assert before.apply("a, b ||| c, d", random.Random(0)) == "a, b, c, d"
    assert plain.apply("a, b, c", random.Random(0)) == "a, b, c"  # not in the caption: untouched
    fallback = CaptionOptions(shuffle=True, keep_tokens=1, keep_tokens_separator="|||")
    assert all(fallback.apply("k, x, y", random.Random(s)).startswith("k, ") for s in range(20))


def test_tag_dropout_and_warmup_act_on_the_movable_tags_only():
    options = CaptionOptions(tag_dropout=0.5, keep_tokens_separator="|||", token_warmup_steps=4)
    for seed in range(50):
        got = options.apply("head ||| a, b, c, d ||| tail", random.Random(seed), step=2).split(", ")
        assert got[0] == "head" and got[-1] == "tail" and set(got[1:-1]) <= {"a", "b", "c"}  # ⌊2·3/4⌋ + 1 = 2 ... of a, b
        assert set(got[1:-1]) <= {"a", "b"}


@pytest.mark.parametrize("kwargs", [
    {}, {"shuffle": True}, {"shuffle": True, "keep_tokens": 2}, {"dropout": 0.3}, {"tag_dropout": 0.4, "shuffle": True},
    {"templates": ("a photo of a <x>", "<x>, art")}, {"templates": ("a <x>",), "shuffle": True, "dropout": 0.2},
    {"dropout": 0.2, "tag_dropout": 0.3, "keep_tokens": 1, "shuffle": True},
])
def test_with_the_new_options_off_every_draw_is_as_before(kwargs):
    """Runs recorded before (``keep_empty_tags=False``, ``kohya_assembly=False``) draw as before for every
    caption; new runs make the same draws too for a caption without an empty tag (kohya's empty tags are the
    one change of the draws; a dropout-only caption is no longer re-split: tests/test_caption_leftovers.py)."""
    legacy = CaptionOptions(**kwargs, keep_empty_tags=False, kohya_assembly=False)
    options = CaptionOptions(**kwargs, kohya_assembly=False)
    words = ["red", "green", "blue", " ", "sky", "cat dog", "x"]
    for seed in range(120):
        pick = random.Random(seed)
        caption = "" if seed % 7 == 0 else ",".join(pick.choice(words) for _ in range(pick.randrange(1, 7)))
        checked = [legacy] + ([options] if caption and all(t.strip() for t in caption.split(",")) else [])
        for version in checked:
            new_rng, old_rng = random.Random(f"{seed}/c"), random.Random(f"{seed}/c")
            for epoch, step in [(0, 0), (3, 17)]:
                assert version.apply(caption, new_rng, epoch=epoch, step=step) == _old_apply(version, caption, old_rng)
            assert new_rng.getstate() == old_rng.getstate()  # the same number of draws


def test_bad_caption_options_are_refused():
    with pytest.raises(ValueError, match="is the tag separator"):
        CaptionOptions(keep_tokens_separator=",")
    with pytest.raises(ValueError, match="dropout_every_n_epochs must be >= 0"):
        CaptionOptions(dropout_every_n_epochs=-1)
    with pytest.raises(ValueError, match="token_warmup_steps must be >= 0"):
        CaptionOptions(token_warmup_steps=float("nan"))
    with pytest.raises(ValueError, match="must be a string"):
        CaptionOptions(prefix=None)  # type: ignore[arg-type]


def test_find_images_keeps_the_lines_for_wildcards(tmp_path):
    from sdadapt.images import write_png

    write_png(tmp_path / "a.png", torch.zeros(3, 8, 8))
    (tmp_path / "a.txt").write_text("first  line {x|y}\n\n  second line \n")
    assert find_images(tmp_path)[0][0].caption == "first  line {x|y}"  # kohya: the first line only, stripped
    records = find_images(tmp_path, multiline=True)[0]
    assert records[0].caption == "first  line {x|y}\nsecond line"
    dataset = Dataset(records, captions=CaptionOptions(wildcards=True))
    # kohya's set_tag_frequency splits at "," only: the joined lines are one tag (test_tag_frequency_kohya.py)
    assert dataset.tag_frequency() == {".": {"first  line {x|y}\nsecond line": 1}}


# ----------------------------------------------------------------------------- fit
def _fit_texts(captions: CaptionOptions, *, steps=6, accumulation=1, save_at=None, state=None, resume=None):
    """fit (LoRA on the toy, 4 images, batches of 2: 2 batches an epoch); returns (losses, the texts
    each micro-batch tokenized)."""
    from sdadapt.training.step import StepConfig

    system = build_toy(seed=1)
    pixels, _ = concept_data("cross", 4, seed=0)
    names = ["a, b, c, d, e", "one {x|y}, two, three", "p, q ||| r, s", "solo"]
    dataset = Dataset(records_from_tensors(pixels, names), captions=captions)
    encode_buckets(dataset, system.encode_images, images=pixels)
    texts: list[list[str]] = []
    real = system.tokenize

    def recording(batch):
        texts.append(list(batch))
        return real(batch)

    system.tokenize = recording
    adaptation = METHODS["lora"].adapt(system, seed=1)
    losses = fit(system, adaptation, dataset,
                 config=FitConfig(steps=steps, batch_size=2, learning_rate=1e-3, warmup_steps=0, seed=0,
                                  step=StepConfig(accumulation_steps=accumulation)),
                 on_step=(lambda info: info.save_state(state) if info.step == save_at else None), resume=resume)
    return losses, texts


def test_fit_passes_the_epoch_and_the_optimiser_step(tmp_path):
    captions = CaptionOptions(dropout_every_n_epochs=2, token_warmup_steps=2, token_warmup_min=1, prefix="pre")
    _, texts = _fit_texts(captions, steps=3, accumulation=2)  # 6 micro-batches: epochs 0, 0, 1, 1, 2, 2
    assert len(texts) == 6
    assert all(t == ["", ""] for t in texts[2:4])  # kohya's epoch 2
    for micro in (0, 1, 4, 5):
        step = micro // 2  # the optimiser step, not the micro-batch
        for text in texts[micro]:
            tags = text.split(", ")
            assert tags[0].startswith("pre")  # the prefix joined the first tag
            if step == 0:
                assert len(tags) == 1
    assert any(len(t.split(", ")) > 1 for t in texts[4] + texts[5])  # step 2: all tags


def test_a_resumed_fit_makes_the_same_caption_draws(tmp_path):
    captions = CaptionOptions(wildcards=True, shuffle=True, keep_tokens_separator="|||", token_warmup_steps=3,
                              dropout_every_n_epochs=3, secondary_separator=";;;", suffix="s;;;t")
    # (5 steps, 2 batches an epoch: the warm-up's 3 steps, then kohya's epoch 3, dropped, at step 5)
    losses, texts = _fit_texts(captions, steps=5, save_at=2, state=tmp_path / "state")
    assert _fit_texts(captions, steps=5)[1] == texts  # seeded
    resumed, resumed_texts = _fit_texts(captions, steps=5, resume=tmp_path / "state")
    assert resumed == losses[2:] and resumed_texts == texts[2:]
    assert not any("{" in t or "|||" in t or ";;;" in t for batch in texts for t in batch)


# ----------------------------------------------------------------------------- train / CLI
@pytest.fixture()
def tagged(tmp_path):
    """Three random 32x32 PNGs with tag captions (one of two lines, with a wildcard)."""
    captions = ["red ||| circle;;;round, square\nblue {circle|square}", "a red circle, big", "circle, red ||| small"]
    return captioned_pngs(tmp_path / "imgs", [(32, 32)] * 3, caption=captions)


def test_a_kohya_config_with_the_caption_options_trains_records_and_resumes(tagged, tmp_path, train_fit_calls, capsys):
    config = tmp_path / "kohya.toml"
    config.write_text("""
[dataset_arguments]
shuffle_caption = true
caption_prefix = "photo"
caption_suffix = ""
enable_wildcard = true
keep_tokens_separator = "|||"
secondary_separator = ";;;"
token_warmup_min = 2
token_warmup_step = 0.5
weighted_captions = false
[training_arguments]
caption_dropout_every_n_epochs = 3
""")
    out = tmp_path / "k.safetensors"
    assert main(lora_train_args(tagged, "--config", config, "--steps", "4", "--save-every-n-steps", "2", "-o", out, "-q")) == 0
    seen = [call.dataset for call in train_fit_calls]
    captions = seen[0].captions
    assert (captions.prefix, captions.suffix, captions.wildcards, captions.keep_tokens_separator,
            captions.secondary_separator, captions.token_warmup_min, captions.token_warmup_steps,
            captions.dropout_every_n_epochs) == ("photo", "", True, "|||", ";;;", 2, 2.0, 3)  # 0.5 of 4 steps
    assert "\n" in seen[0].records[0].caption  # the lines kept for the wildcard draw
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_caption_dropout_every_n_epochs"] == "3"
    record = json.loads((tmp_path / "k-state" / "run.json").read_text())["captions"]
    assert {k: record[k] for k in ("caption_prefix", "enable_wildcard", "keep_tokens_separator", "secondary_separator",
                                   "token_warmup_min", "token_warmup_step", "caption_dropout_every_n_epochs")} == {
        "caption_prefix": "photo", "enable_wildcard": True, "keep_tokens_separator": "|||", "secondary_separator": ";;;",
        "token_warmup_min": 2, "token_warmup_step": 0.5, "caption_dropout_every_n_epochs": 3}
    # a changed option is refused; the same ones resume to the straight run's weights
    assert main(lora_train_args(tagged, "--config", config, "--caption-prefix", "art", "--steps", "4",
                       "-o", tmp_path / "x.safetensors", "--resume", tmp_path / "k-state")) == 2
    assert "caption_prefix 'photo' (now 'art')" in capsys.readouterr().err
    resumed = tmp_path / "r.safetensors"
    assert main(lora_train_args(tagged, "--config", config, "--steps", "4", "-o", resumed, "--resume", tmp_path / "k-state", "-q")) == 0
    with safe_open(str(out), "pt") as a, safe_open(str(resumed), "pt") as b:
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())  # noqa: SIM118


def test_the_flags_reach_the_options():
    args = build_parser().parse_args(["train", "lora", "--images", ".", "--caption-prefix", "p", "--caption-suffix", "s",
                                      "--enable-wildcard", "--keep-tokens-separator", "|||", "--secondary-separator",
                                      ";;;", "--token-warmup-min", "3", "--token-warmup-step", "0.2",
                                      "--caption-dropout-every-n-epochs", "4"])
    assert (args.caption_prefix, args.caption_suffix, args.enable_wildcard, args.keep_tokens_separator,
            args.secondary_separator, args.token_warmup_min, args.token_warmup_step,
            args.caption_dropout_every_n_epochs) == ("p", "s", True, "|||", ";;;", 3, 0.2, 4)


@pytest.mark.parametrize("flags, message", [
    (["--keep-tokens-separator", ",,"], "--keep-tokens-separator ',,' holds the tag separator"),
    (["--keep-tokens-separator", "||", "--secondary-separator", "||"], "give them different strings"),
    (["--caption-dropout-every-n-epochs", "-1"], "--caption-dropout-every-n-epochs must be a whole number >= 0"),
    (["--token-warmup-step", "-0.5"], "--token-warmup-step must be >= 0"),
    (["--weighted-captions"], ("--weighted-captions (A1111 emphasis, (word:1.2) / [word], in the captions) cannot work "
                               "with the toy model")),
])
def test_bad_caption_options_are_refused_before_training(red_circles, tmp_path, capsys, flags, message):
    out = tmp_path / "x.safetensors"
    assert main(lora_train_args(red_circles, *flags, "--steps", "1", "-o", out)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_options_given_without_what_they_act_with_are_reported():
    from sdadapt.jobs.train import _inactive_option_notes

    notes = " | ".join(_inactive_option_notes(TrainOptions(images=".", token_warmup_min=3, keep_tokens=1)))
    assert "--token-warmup-min 3: not used without --token-warmup-step" in notes
    assert "--keep-tokens 1: not used without" in notes
    assert not _inactive_option_notes(TrainOptions(images=".", token_warmup_min=3, token_warmup_step=10, keep_tokens=1))


def test_resume_reads_records_from_before_the_options_and_refuses_changes(tmp_path):
    options = TrainOptions(images=".")
    _write_run_record(tmp_path, "lora", options, 1, 2)
    (tmp_path / "state.json").write_text(json.dumps({"step": 1}))
    record = json.loads((tmp_path / "run.json").read_text())
    assert set(record["captions"]) == {"prompt", "caption_extension", "shuffle_caption", "keep_tokens",
                                       "caption_dropout_rate", "caption_tag_dropout_rate", "caption_template",
                                       "templates"}  # off: recorded as before
    _check_resume(tmp_path, "lora", options)
    with pytest.raises(ValueError, match="token_warmup_step 0 \\(now 5\\)"):
        _check_resume(tmp_path, "lora", TrainOptions(images=".", token_warmup_step=5))
    set_on = TrainOptions(images=".", secondary_separator=";;;")
    _write_run_record(tmp_path, "lora", set_on, 1, 2)
    with pytest.raises(ValueError, match="secondary_separator ';;;' \\(now None\\)"):
        _check_resume(tmp_path, "lora", options)
    _check_resume(tmp_path, "lora", set_on)
