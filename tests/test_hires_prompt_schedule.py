"""Prompt editing in the hires fix's second pass, against A1111 (AUTOMATIC1111/stable-diffusion-webui
``modules/prompt_parser.py`` at 28bd8e142d5f, ``get_learned_conditioning_prompt_schedules(prompts, base_steps,
hires_steps=None, use_old_scheduling=False)``, transcribed on its lark grammar in a1111_prompt_parser.py;
``modules/processing.py`` ``calculate_hr_conds`` passes it the first pass's total steps as ``base_steps`` and the
hires pass's as ``hires_steps``).

A1111 1.6+ continues the first pass's timeline in the hires pass: a step number ``n`` is hires step ``n - base``
(``int_offset``), a fraction ``f`` hires step ``(f - 1.0) * hires`` (``flt_offset``); alternation counts the hires
steps from 1 again. Its "Use old prompt editing timelines" plans the hires pass with the first pass's steps and no
offsets. sdadapt planned the hires pass as a first pass of its own steps before.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from a1111_prompt_parser import balanced, learned_conditioning_prompt_schedules
from a1111_prompt_parser import parse_prompt_attention as a1111_parse_attention
from hypothesis import given, settings
from hypothesis import strategies as st

from png_pixels import pixels as _pixels
from sdadapt.errors import InputError
from sdadapt.prompt_schedule import prompt_schedule

# (prompt, first-pass steps, hires steps, old timelines, A1111's schedule for the hires pass)
A1111_HIRES = [
    # A1111's own doctests (base 10, hires 10)
    ("a [b:.5] c", 10, 10, False, [(10, "a b c")]),
    ("a [b:1.5] c", 10, 10, False, [(5, "a  c"), (10, "a b c")]),
    # step numbers count from the first pass: 25 after 20 is hires step 5
    ("[cat:dog:25]", 20, 10, False, [(5, "cat"), (10, "dog")]),
    ("[cat:dog:20]", 20, 10, False, [(10, "dog")]),  # (hires step 0: dog from the start)
    ("[cat:dog:3]", 20, 10, False, [(10, "dog")]),
    ("[cat:dog:35]", 20, 10, False, [(10, "cat")]),  # (min(hires, 15))
    # fractions: (f - 1.0) of the hires steps
    ("[cat:dog:0.5]", 20, 10, False, [(10, "dog")]),
    ("[cat:dog:1.5]", 20, 10, False, [(5, "cat"), (10, "dog")]),
    ("[cat:dog:1.0]", 20, 10, False, [(10, "dog")]),
    ("[cat:dog:2.0]", 20, 10, False, [(10, "cat")]),
    ("[cat:dog:1.3]", 20, 10, False, [(3, "cat"), (10, "dog")]),  # ((1.3 - 1.0) * 10 = 3.0000000000000004)
    ("[cat:dog:1.2]", 20, 100, False, [(19, "cat"), (100, "dog")]),  # ((1.2 - 1.0) * 100 = 19.999999999999996)
    ("[cat::22] [:hat:1.75]", 20, 4, False, [(2, "cat "), (3, " "), (4, " hat")]),
    # alternation: the hires pass's own count from 1
    ("[x|y]", 20, 3, False, [(1, "x"), (2, "y"), (3, "x")]),
    ("[x|y] [a:b:21]", 20, 3, False, [(1, "x a"), (2, "y b"), (3, "x b")]),
    # "Use old prompt editing timelines": the first pass's schedule, no offsets
    ("[cat:dog:0.5]", 20, 10, True, [(10, "cat"), (20, "dog")]),
    ("[cat:dog:25]", 20, 10, True, [(20, "cat")]),
    ("[cat:dog:1.5]", 20, 10, True, [(1, "cat"), (20, "dog")]),  # (1.5 is no fraction there: step 1)
    ("[cat:dog:5]", 20, 10, True, [(5, "cat"), (20, "dog")]),
    ("[x|y]", 4, 10, True, [(1, "x"), (2, "y"), (3, "x"), (4, "y")]),
    # a prompt the grammar does not read: one text, ending at the pass's (A1111: the planned) steps
    ("a | b", 20, 10, False, [(10, "a | b")]),
    ("a | b", 20, 10, True, [(20, "a | b")]),
]


@pytest.mark.parametrize(("prompt", "base", "hires", "old", "expected"), A1111_HIRES)
def test_hires_schedules_are_a1111s(prompt, base, hires, old, expected):
    assert prompt_schedule(prompt, hires, first_pass_steps=base, old_scheduling=old) == expected


def test_a_first_pass_of_no_steps_is_refused():
    with pytest.raises(InputError, match="first_pass_steps"):
        prompt_schedule("[a:b:3]", 10, first_pass_steps=0)


# ---- A1111's function itself on its lark grammar, where lark is installed ------------------------------------

_PIECES = ["a", " ", "[", "]", "(", ")", ":", "|", "\\:", "\n", "1.75", "[a:b:3]", "[c|d]", "(e:1.2)", "[x::0.5]",
           "[:y:25]", "[p:q:1.5]", "[r:s:12]", "[t:u:1.0 ]", "[v|]", "[w:z:-3]", "[g:h:2.0]", "[i:j:.25]",
           "[k:l:1e1]", "[m:n:+21]", "[[o|p]:q:22]"]


@pytest.mark.skipif(importlib.util.find_spec("lark") is None,
                    reason="A1111's grammar runs on lark (pip install lark==1.1.2, A1111's pin); the table above runs")
@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=8), st.sampled_from([1, 3, 10, 20]),
       st.sampled_from([None, 1, 3, 10, 25]), st.booleans())
def test_random_prompts_plan_the_hires_pass_as_a1111(pieces, base, hires, old):
    import lark

    prompt = "".join(pieces)
    expected = learned_conditioning_prompt_schedules(lark, prompt, base, hires, old)
    if not balanced(prompt):
        return
    if hires is None:
        assert prompt_schedule(prompt, base, old_scheduling=old) == expected
    else:
        assert prompt_schedule(prompt, hires, first_pass_steps=base, old_scheduling=old) == expected


# ---- end to end: the conditioning each model call of the hires pass gets -----------------------------------------

pytest.importorskip("diffusers")
pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    from test_cli_train import _tiny_pipeline

    return _tiny_pipeline(tmp_path_factory.mktemp("hires_schedule"), prediction_type="epsilon")


def _a1111_text_at(schedule, call):
    """``reconstruct_cond_batch``: the first entry whose end_at_step >= the call count, else the first."""
    for end, text in schedule:
        if call <= end:
            return text
    return schedule[0][1]


def test_each_hires_model_call_gets_a1111s_scheduled_text(tiny_sd, tmp_path, monkeypatch):
    """generate with --hires-*: heun for 2 steps first (A1111 plans 4 schedule steps: total_steps), then 4 euler
    hires steps. Each model call's positive states are matched (bit for bit) to the plan's encoded texts: the
    hires pass switches cat -> dog at its call 3 (6 - 4 = hires step 2), is blue from its first call (0.5 of the
    first pass is over) and alternates x/y from its own step 1; before, it planned [cat:dog:6] as all cat and
    switched red -> blue half way."""
    import sdadapt.prompt_guidance as guidance
    from sdadapt.jobs.generate import run_generate

    passes, real = [], guidance.PromptPlan.guidance

    def spied(self, model, conds, negative_conds, scale, **options):
        seen = []
        passes.append((self.texts, conds, seen))

        def record(x, t, cond):
            states = cond["context"] if isinstance(cond, dict) else cond
            seen.append(states[-1].clone())  # (B = 1: rows uncond, cond; the last is the prompt's)
            return model(x, t, cond)

        return real(self, record, conds, negative_conds, scale, **options)

    monkeypatch.setattr(guidance.PromptPlan, "guidance", spied)
    prompt = "[cat:dog:6] [red:blue:0.5] [x|y]"
    run_generate(model=str(tiny_sd), prompt=prompt, out=tmp_path / "h.png", steps=2, sampler="heun", seed=1,
                 guidance=3.0, width=16, height=16, hires_scale=2.0, hires_steps=4, hires_denoising=0.5,
                 hires_sampler="euler", log=lambda _: None)
    (first_texts, first_conds, first_seen), (hires_texts, hires_conds, hires_seen) = passes
    schedules = [prompt_schedule(prompt, 4), prompt_schedule(prompt, 4, first_pass_steps=4)]
    assert schedules[1] == [(1, "cat blue x"), (2, "cat blue y"), (3, "dog blue x"), (4, "dog blue y")]
    assert len(first_seen) == 3 and len(hires_seen) == 4  # (heun's 2 steps: 3 calls; euler: 4)

    def texts_seen(texts, conds, seen):
        out = []
        for states in seen:
            same = [text for text, cond in zip(texts, conds)
                    if torch.equal((cond["context"] if isinstance(cond, dict) else cond)[0], states)]
            assert len(set(same)) == 1, same
            out.append(same[0])
        return out

    for schedule, (texts, conds, seen) in zip(schedules, passes):
        assert texts_seen(texts, conds, seen) == [_a1111_text_at(schedule, call) for call in range(len(seen))]
    assert texts_seen(hires_texts, hires_conds, hires_seen) == ["cat blue x", "cat blue x", "cat blue y",
                                                                "dog blue x"]


# ---- generate's emphasis: A1111's pattern; training's weighted captions: kohya's ---------------------------------
# (kohya sd-scripts ``re_attention``: ``:([+-]?[.\d]+)\)``; A1111 28bd8e142d5f ``re_attention``:
# ``:\s*([+-]?[.\d]+)\s*\)``; the same ``parse_prompt_attention`` around either: a1111_prompt_parser's)

@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ca t:()[]\\1.2-+\n", max_size=30))
def test_the_default_reading_is_kohyas_and_a1111_reads_a1111s(text):
    """Training's weighted captions (the default) keep kohya's reading exactly; ``a1111=True`` is A1111's."""
    from sdadapt.prompt_weights import parse_prompt_attention

    try:  # (a weight the patterns let through that float() refuses, "(c:1.2.)": refused by both)
        kohya = [tuple(p) for p in a1111_parse_attention(text, spaced=False, breaks=False)]
    except ValueError:
        with pytest.raises(ValueError):
            parse_prompt_attention(text)
    else:
        assert parse_prompt_attention(text) == kohya
    try:
        a1111 = [tuple(p) for p in a1111_parse_attention(text, breaks=False)]
    except ValueError:
        with pytest.raises(ValueError):
            parse_prompt_attention(text, a1111=True)
    else:
        assert parse_prompt_attention(text, a1111=True) == a1111


def test_weighted_ids_keep_each_reading_apart_in_the_token_cache(tiny_sd):
    """``tokenize_weighted`` (training's weighted captions) reads kohya's pattern; ``a1111=True`` (generate's) A1111's,
    each cached on its own: asking for one reading never hands back the other's."""
    from sdadapt.jobs.models import load_system
    from sdadapt.prompt_weights import weighted_token_ids

    system = load_system(str(tiny_sd), device="cpu")
    prompts = ["a (cat: 1.2 )"]
    length = system.tokenize(prompts).shape[-1]
    kohya = weighted_token_ids(system.tokenizer, prompts, length)
    a1111 = weighted_token_ids(system.tokenizer, prompts, length, a1111=True)
    assert not torch.equal(kohya[1], a1111[1]) and bool((a1111[1] == torch.tensor(1.2)).any())
    for flag in (False, True, False, True):
        out = system.tokenize_weighted(prompts, a1111=flag) if flag else system.tokenize_weighted(prompts)
        expected = a1111 if flag else kohya
        assert torch.equal(out["ids"], expected[0]) and torch.equal(out["weights"], expected[1])


def test_generate_reads_blanks_around_a_weight_as_a1111(tiny_sd, tmp_path):
    """``(cat: 1.2 )`` in generate's prompt and negative prompt is ``(cat:1.2)``: the same PNG, bit for bit (before,
    kohya's pattern read ``: 1.2 `` as text at x1.1)."""
    from sdadapt.jobs.generate import run_generate

    def png(name, prompt, negative):
        run_generate(model=str(tiny_sd), prompt=prompt, negative=negative, out=tmp_path / f"{name}.png", steps=3,
                     sampler="euler", seed=1, guidance=3.0, width=16, height=16, log=lambda _: None)
        return _pixels(tmp_path / f"{name}.png")

    assert png("blanks", "a (cat: 1.2 )", "(ugly:\t0.8)") == png("tight", "a (cat:1.2)", "(ugly:0.8)")


# ---- review RH2 ----------------------------------------------------------------------------------------------

def test_the_hires_negative_prompt_continues_the_first_pass_timeline_too():
    """A1111's calculate_hr_conds plans ``hr_uc`` (the negative) with the same base/hires steps as ``hr_c``."""
    from sdadapt.prompt_guidance import plan_prompt

    plan = plan_prompt("a", "[ugly:blurry:1.5] [x:y:6]", steps=4, first_pass_steps=4)
    assert plan.negative.ends == (2, 4)
    assert [plan.negative_texts[i] for i in plan.negative.texts] == ["ugly x", "blurry y"]


def test_an_edit_only_the_hires_pass_reaches_is_scheduled(tiny_sd, tmp_path, monkeypatch):
    import sdadapt.sampling as sampling
    from sdadapt.jobs.generate import run_generate

    calls, real = [], sampling.generate

    def spied(system, prompts, **options):
        calls.append((list(prompts), options.get("plan")))
        return real(system, prompts, **options)

    monkeypatch.setattr(sampling, "generate", spied)
    run_generate(model=str(tiny_sd), prompt="[cat:dog:1.5]", out=tmp_path / "h.png", steps=2, sampler="euler",
                 seed=1, guidance=3.0, width=16, height=16, hires_scale=2.0, hires_steps=4, hires_denoising=0.5,
                 log=lambda _: None)
    (first_prompts, first_plan), (hires_prompts, hires_plan) = calls
    assert first_prompts == ["cat"] and first_plan is None  # (first pass: min(2, int(1.5 * 2)) = 2: all cat)
    assert hires_plan is not None  # (A1111: (1.5 - 1.0) * 4 = hires step 2, then dog)
    assert hires_plan.texts == ("cat", "dog") and hires_plan.parts[0][0].ends == (2, 4)


def _png(tiny_sd, path, **options):
    from sdadapt.jobs.generate import run_generate

    run_generate(model=str(tiny_sd), out=path, steps=2, sampler="euler", seed=1, guidance=3.0, width=16, height=16,
                 log=lambda _: None, **options)
    return _pixels(path)


def test_the_hires_prompt_reads_blanks_around_a_weight_as_a1111(tiny_sd, tmp_path):
    hires = dict(prompt="a dog", hires_scale=2.0, hires_steps=2, hires_denoising=0.7)
    assert _png(tiny_sd, tmp_path / "blanks.png", hires_prompt="a (cat: 1.2 )", **hires) == \
        _png(tiny_sd, tmp_path / "tight.png", hires_prompt="a (cat:1.2)", **hires)


def test_sample_prompts_without_a_plan_keep_kohyas_reading(tiny_sd):
    """train's sample images (sampling.generate, no plan) read kohya's pattern: ``(cat: 1.2 )`` is text x1.1, so
    its latents are not ``(cat:1.2)``'s; generate's plans read A1111's (the test above)."""
    from sdadapt.jobs.models import load_system
    from sdadapt.sampling import generate

    system = load_system(str(tiny_sd), device="cpu")

    def latents(prompt):
        return generate(system, [prompt], seed=1, steps=2, sampler="euler", guidance=3.0, height=16, width=16,
                        output="latents")

    assert not torch.equal(latents("a (cat: 1.2 )"), latents("a (cat:1.2)"))


def test_break_chunks_read_a1111s_emphasis_pattern(tiny_sd):
    """A1111's BREAK / long-prompt chunks (generate's plans) weigh ``(cat: 1.2 )`` as ``(cat:1.2)``."""
    from sdadapt.jobs.models import load_system
    from sdadapt.prompt_chunks import prompt_chunks

    tokenizer = load_system(str(tiny_sd), device="cpu").tokenizer
    blanks = prompt_chunks(tokenizer, "a (cat: 1.2 ) BREAK dog")
    tight = prompt_chunks(tokenizer, "a (cat:1.2) BREAK dog")
    assert torch.equal(blanks[0], tight[0]) and torch.equal(blanks[1], tight[1])


def test_the_toys_emphasis_removal_reads_a1111s_pattern():
    from sdadapt.jobs.generate import _without_emphasis

    said = []
    assert _without_emphasis("a (cat: 1.2 ) [dog]", said.append) == "a cat dog"
    assert said and "'a cat dog'" in said[0]


def test_aesthetic_with_an_edit_only_the_hires_pass_reaches_is_refused(tiny_sd, tmp_path, monkeypatch):
    """(review RH2) --aesthetic personalises one conditioning: an edit the hires pass reaches ([cat:dog:1.5]) would
    be sampled with both; refused as the first pass's editing is, before any image is written."""
    import sdadapt.jobs.generate as job

    monkeypatch.setattr(job, "check_aesthetic_request", lambda *a, **k: None, raising=False)
    import sdadapt.jobs.aesthetic as aesthetic_job

    monkeypatch.setattr(aesthetic_job, "check_aesthetic_request", lambda *a, **k: None)
    with pytest.raises(ValueError, match=r"--aesthetic personalises one prompt's conditioning; the hires pass"):
        job.run_generate(model=str(tiny_sd), prompt="[cat:dog:1.5]", out=tmp_path / "h.png", steps=2,
                         sampler="euler", seed=1, guidance=3.0, width=16, height=16, hires_scale=2.0, hires_steps=4,
                         hires_denoising=0.5, aesthetic=tmp_path / "style.pt", log=lambda _: None)
    assert not (tmp_path / "h.png").exists()


