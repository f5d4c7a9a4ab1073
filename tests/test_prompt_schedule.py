"""sdadapt.prompt_schedule against A1111's prompt_parser / extra_networks / Lora extension.

The expected schedules are A1111's own results (``get_learned_conditioning_prompt_schedules`` of A1111
1.6 and later — new prompt-editing timelines, empty alternatives — run with its lark grammar, lark 1.1.2
as A1111 pins it) written out here; where lark is installed the same grammar and transformer, transcribed in
a1111_prompt_parser.py, are also compared with sdadapt's parser on random prompts.
"""

from __future__ import annotations

import importlib.util
import re

import pytest
from a1111_prompt_parser import balanced, learned_conditioning_prompt_schedules
from hypothesis import given, settings
from hypothesis import strategies as st

from sdadapt.errors import InputError
from sdadapt.prompt_schedule import (
    ExtraNetworkTag,
    composable_prompts,
    extra_network_tags,
    hypernetwork_multiplier,
    lora_multipliers,
    prompt_schedule,
    schedule_index,
    schedule_steps,
)

# A1111's results at 10 steps (its doctests first, then prompt editing edge cases)
A1111_AT_10 = [
    ('test', [(10, 'test')]),
    ('a [b:3]', [(3, 'a '), (10, 'a b')]),
    ('a [b: 3]', [(3, 'a '), (10, 'a b')]),
    ('a [[[b]]:2]', [(2, 'a '), (10, 'a [[b]]')]),
    ('[(a:2):3]', [(3, ''), (10, '(a:2)')]),
    ('a [b : c : 1] d', [(1, 'a b  d'), (10, 'a  c  d')]),
    ('a[b:[c:d:2]:1]e', [(1, 'abe'), (2, 'ace'), (10, 'ade')]),
    ('a [unbalanced', [(10, 'a [unbalanced')]),
    ('a [b:.5] c', [(5, 'a  c'), (10, 'a b c')]),
    ('((a][:b:c [d:3]', [(3, '((a][:b:c '), (10, '((a][:b:c d')]),
    ('[a|(b:1.1)]', [(1, 'a'), (2, '(b:1.1)'), (3, 'a'), (4, '(b:1.1)'), (5, 'a'), (6, '(b:1.1)'), (7, 'a'),
                     (8, '(b:1.1)'), (9, 'a'), (10, '(b:1.1)')]),
    (('fantasy landscape with a [mountain:lake:0.25] and [an oak:a christmas tree:0.75][ in foreground::0.6]'
      '[ in background:0.25] [shoddy:masterful:0.5]'),
     [(2, 'fantasy landscape with a mountain and an oak in foreground shoddy'),
      (5, 'fantasy landscape with a lake and an oak in foreground in background shoddy'),
      (6, 'fantasy landscape with a lake and an oak in foreground in background masterful'),
      (7, 'fantasy landscape with a lake and an oak in background masterful'),
      (10, 'fantasy landscape with a lake and a christmas tree in background masterful')]),
    ('[(x) y|z]', [(1, '(x) y'), (2, 'z'), (3, '(x) y'), (4, 'z'), (5, '(x) y'), (6, 'z'), (7, '(x) y'), (8, 'z'),
                   (9, '(x) y'), (10, 'z')]),
    ('[fe|]male', [(1, 'female'), (2, 'male'), (3, 'female'), (4, 'male'), (5, 'female'), (6, 'male'), (7, 'female'),
                   (8, 'male'), (9, 'female'), (10, 'male')]),
    ('[fe|||]male', [(1, 'female'), (2, 'male'), (3, 'male'), (4, 'male'), (5, 'female'), (6, 'male'), (7, 'male'),
                     (8, 'male'), (9, 'female'), (10, 'male')]),
    ('[ a|b ]', [(1, ' a'), (2, 'b '), (3, ' a'), (4, 'b '), (5, ' a'), (6, 'b '), (7, ' a'), (8, 'b '), (9, ' a'),
                 (10, 'b ')]),
    ('a | b', [(10, 'a | b')]),
    ('[a:3 ]', [(3, ''), (10, 'a')]),
    ('[a:b:-1]', [(10, 'b')]),
    ('[a:b:0]', [(10, 'b')]),
    ('[a:b:1.0]', [(10, 'a')]),  # (a point: a fraction, 1.0 of the steps)
    ('[a:b:1.]', [(10, 'a')]),
    ('[a:b:0.0]', [(10, 'b')]),
    ('[a:b:1e1]', [(10, 'a')]),
    ('[a:b:0.29]', [(2, 'a'), (10, 'b')]),
    ('\\[a:b:3\\]', [(10, '\\[a:b:3\\]')]),
    ('[a\\:b:c:3]', [(3, 'a\\:b'), (10, 'c')]),
    ('[a|b', [(10, '[a|b')]),
    ('[a:b:c:3]', [(10, '[a:b:c:3]')]),
    ('[a|b:3]', [(10, '[a|b:3]')]),
    ('[x [a|b] y:z:5]', [(1, 'x a y'), (2, 'x b y'), (3, 'x a y'), (4, 'x b y'), (5, 'x a y'), (6, 'z'), (7, 'z'),
                         (8, 'z'), (9, 'z'), (10, 'z')]),
    ('([a:b:3]:1.2)', [(3, '(a:1.2)'), (10, '(b:1.2)')]),
    ('(a:[1.2:1.5:3])', [(3, '(a:1.2)'), (10, '(a:1.5)')]),
    ('[a:b:3][c|d]', [(1, 'ac'), (2, 'ad'), (3, 'ac'), (4, 'bd'), (5, 'bc'), (6, 'bd'), (7, 'bc'), (8, 'bd'),
                      (9, 'bc'), (10, 'bd')]),
    ('[a:b:+2]', [(2, 'a'), (10, 'b')]),
    ('[a::0.5]', [(5, 'a'), (10, '')]),
    ('[:b:0.5]', [(5, ''), (10, 'b')]),
    ('[a:b:.999]', [(9, 'a'), (10, 'b')]),
    ('[a:b:1]', [(1, 'a'), (10, 'b')]),
    ('[a:b:1.5]', [(10, 'a')]),
    ('a (b [c:d:2]) e', [(2, 'a (b c) e'), (10, 'a (b d) e')]),
    ('[[a|b]:c:4]', [(1, 'a'), (2, 'b'), (3, 'a'), (4, 'b'), (5, 'c'), (6, 'c'), (7, 'c'), (8, 'c'), (9, 'c'),
                     (10, 'c')]),
    ('trailing \\', [(10, 'trailing \\')]),
    ('[a:b:3] and (c:1.3) and \\(d\\)', [(3, 'a and (c:1.3) and \\(d\\)'), (10, 'b and (c:1.3) and \\(d\\)')]),
    ('[a:b:2e-1]', [(10, 'b')]),  # (no point: the step int(0.2) = 0)
    ('[red:blue:11]', [(10, 'red')]),
]

# fractions multiplied out in floating point and truncated, as A1111 does (0.29 * 100 = 28.999...)
A1111_OTHER_STEPS = [
    ('[a:b:0.29]', 100, [(28, 'a'), (100, 'b')]),
    ('[a:b:0.3]', 7, [(2, 'a'), (7, 'b')]),
    ('[a:b:0.7]', 10, [(7, 'a'), (10, 'b')]),
    ('[a:b:0.57]', 100, [(56, 'a'), (100, 'b')]),
    ('[a|b] [c:d:0.5]', 3, [(1, 'a c'), (2, 'b d'), (3, 'a d')]),
    ('[a:b:0.5]', 1, [(1, 'b')]),
    ('[a:b:0.1]', 5, [(5, 'b')]),
]

# A1111's setting "Use old prompt editing timelines": below 1 a fraction, else a step number
A1111_OLD_TIMELINES = [
    ('[a:b:1.5]', 10, [(1, 'a'), (10, 'b')]),
    ('[a:b:1.0]', 10, [(1, 'a'), (10, 'b')]),
    ('[a:b:2e-1]', 10, [(2, 'a'), (10, 'b')]),
    ('[a:b:0.5]', 10, [(5, 'a'), (10, 'b')]),
    ('[a:b:0]', 10, [(10, 'b')]),
    ('[a:b:0.5]', 1, [(1, 'b')]),
    ('[a:b:3]', 10, [(3, 'a'), (10, 'b')]),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_AT_10)
def test_schedules_are_a1111s_at_10_steps(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


@pytest.mark.parametrize(("prompt", "steps", "expected"), A1111_OTHER_STEPS)
def test_fractional_steps_round_as_a1111(prompt, steps, expected):
    assert prompt_schedule(prompt, steps) == expected


@pytest.mark.parametrize(("prompt", "steps", "expected"), A1111_OLD_TIMELINES)
def test_old_timelines_as_a1111s_setting(prompt, steps, expected):
    assert prompt_schedule(prompt, steps, old_scheduling=True) == expected


def test_an_empty_alternative_is_the_empty_text():
    assert prompt_schedule("[a|]", 2) == [(1, "a"), (2, "")]
    assert prompt_schedule("[|a]", 2) == [(1, ""), (2, "a")]
    assert prompt_schedule("[a| ]", 2) == [(1, "a"), (2, " ")]


# ---- the lark grammar itself, where lark is installed -------------------------------------------------------

_PIECES = ["a", "b c", " ", "  ", "[", "]", "(", ")", ":", "|", "\\[", "\\:", "1", "0.5", ".3", "-2", "2e-1",
           "1.0", "1.5", "0", "[a:b:3]", "[c|d]", "(e:1.2)", "[x::0.5]", "[:y:2]", "[p:q:1.0 ]", "[r|]", "\n"]


@pytest.mark.skipif(importlib.util.find_spec("lark") is None,
                    reason="A1111's grammar runs on lark (pip install lark==1.1.2, A1111's pin); the tables above still run")
@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(_PIECES), max_size=12), st.sampled_from([1, 2, 3, 7, 10, 25]), st.booleans())
def test_random_prompts_schedule_as_the_lark_grammar(pieces, steps, old):
    import lark
    prompt = "".join(pieces)
    expected = learned_conditioning_prompt_schedules(lark, prompt, steps, use_old_scheduling=old)
    if balanced(prompt):
        assert prompt_schedule(prompt, steps, old_scheduling=old) == expected


# ---- AND --------------------------------------------------------------------------------------------------

def _a1111_and(prompt):
    """A transcription of get_multicond_prompt_list for one prompt (without its de-duplication)."""
    out = []
    for sub in re.split(r"\bAND\b", prompt):
        match = re.search(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", sub)
        text, weight = match.groups() if match is not None else (sub, 1.0)
        out.append((text, float(weight) if weight is not None else 1.0))
    return out


@pytest.mark.parametrize(("prompt", "expected"), [
    ("a cat AND a dog", [("a cat", 1.0), (" a dog", 1.0)]),
    ("a cat:1.2 AND a dog : -0.5", [("a cat", 1.2), (" a dog", -0.5)]),
    ("a cat:.5AND b", [("a cat:.5AND b", 1.0)]),  # (\bAND\b: no word boundary)
    ("(red:1.3) ball", [("(red:1.3) ball", 1.0)]),
    ("cat:2.", [("cat", 2.0)]),
    ("one\ntwo:0.5", [("one\ntwo", 0.5)]),  # (A1111 1.6+: the text may hold newlines)
    ("ANDROID AND x", [("ANDROID", 1.0), (" x", 1.0)]),
])
def test_and_splits_as_a1111(prompt, expected):
    assert composable_prompts(prompt) == expected == _a1111_and(prompt)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["a", " ", "AND", ":", "0.5", "-1", ".", "\n", "(b:1.2)", "x1"]), max_size=10))
def test_and_on_random_prompts_is_the_transcription(pieces):
    prompt = "".join(pieces)
    assert composable_prompts(prompt) == _a1111_and(prompt)


# ---- which entry a model call uses ------------------------------------------------------------------------

def _a1111_index(ends, call):
    target = 0
    for current, end in enumerate(ends):
        if call <= end:
            target = current
            break
    return target


@given(st.lists(st.integers(-5, 30), min_size=1, max_size=6, unique=True).map(sorted), st.integers(0, 40))
def test_schedule_index_is_reconstruct_cond_batchs(ends, call):
    assert schedule_index(ends, call) == _a1111_index(ends, call)


# A1111's samplers_k_diffusion / samplers_timesteps: the labels whose options say "second_order": True
A1111_SECOND_ORDER = {"Heun", "DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "Restart"}
A1111_FIRST_ORDER = {"Euler", "Euler a", "LMS", "DPM++ 2M", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE",
                     "DPM fast", "DPM adaptive", "LCM", "DDIM", "UniPC"}


def test_second_order_samplers_schedule_twice_the_steps():
    """SamplerData.total_steps: twice the steps for A1111's second-order samplers, read through sdadapt's labels."""
    from sdadapt.samplers.labels import sampler_schedule_from_label

    for label in A1111_SECOND_ORDER | A1111_FIRST_ORDER:
        name, _ = sampler_schedule_from_label(label)
        assert schedule_steps(name, 10) == (20 if label in A1111_SECOND_ORDER else 10), label


# ---- extra-network tags -----------------------------------------------------------------------------------

def test_tags_are_taken_out_and_split_as_a1111():
    text, tags = extra_network_tags("a <lora:ink:0.6> cat <hypernet:style> <lyco:x:1:unet=0.2:a=b=c>")
    assert text == "a  cat  "
    assert [t.kind for t in tags] == ["lora", "hypernet", "lyco"]
    assert tags[2].positional == ("x", "1", "a=b=c") and tags[2].named == {"unet": "0.2"}
    assert extra_network_tags("a <not a tag> <lora:>")[1] == []  # (\w+ before ":", something after it)


@pytest.mark.parametrize(("args", "expected"), [
    ("ink", ("ink", 1.0, 1.0)),
    ("ink:0.6", ("ink", 0.6, 0.6)),
    ("ink:0.6:0.2", ("ink", 0.6, 0.2)),
    ("ink:te=0.3", ("ink", 0.3, 0.3)),
    ("ink:0.6:unet=0.1", ("ink", 0.6, 0.1)),
    ("ink:0.6:0.2:te=1.5", ("ink", 1.5, 0.2)),
])
def test_lora_multipliers_as_the_lora_extension(args, expected):
    (tag,) = extra_network_tags(f"<lora:{args}>")[1]
    assert lora_multipliers(tag) == expected


def test_bad_tags_are_refused_naming_the_tag():
    with pytest.raises(InputError, match=r"<lora:ink:x>.*'x' is not a number"):
        lora_multipliers(extra_network_tags("<lora:ink:x>")[1][0])
    assert lora_multipliers(extra_network_tags("<lora:ink:1:dyn=4>")[1][0]) == ("ink", 1.0, 1.0)  # (A1111's dyn)
    with pytest.raises(InputError, match=r"<lora:ink:1:dyn=x>: dyn 'x' is not an int"):
        lora_multipliers(extra_network_tags("<lora:ink:1:dyn=x>")[1][0])
    assert hypernetwork_multiplier(ExtraNetworkTag("hypernet", ("h", "0.7"))) == ("h", 0.7)
    assert hypernetwork_multiplier(extra_network_tags("<hypernet:h>")[1][0]) == ("h", 1.0)


def test_the_prompts_page_example_runs(capsys):
    from docs_pages import run_block

    run_block("prompts.md")
    assert "('a cat', 'a dog', ' a hat') ('ugly', 'bad')" in capsys.readouterr().out


@pytest.mark.parametrize(("text", "expected"), [
    ("a BREAK b (c BREAK d:1.2)", [("a", 1.0), ("BREAK", -1.0), ("b ", 1.0), ("c", 1.2), ("BREAK", -1.2), ("d", 1.2)]),
    ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
    ("aBREAK b BREAKS", [("aBREAK b BREAKS", 1.0)]),  # (the word only)
    ("a\nBREAK\nb", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
])
def test_break_pieces_are_a1111s_parse_prompt_attention(text, expected):
    from sdadapt.prompt_weights import parse_prompt_attention

    assert parse_prompt_attention(text, breaks=True) == expected
    assert all(weight > 0 for _, weight in parse_prompt_attention(text))  # (without breaks=True: kohya's, the word as text)
