"""A1111's ``modules/prompt_parser.py``, transcribed for the tests (never imported by sdadapt).

* :func:`learned_conditioning_prompt_schedules`: ``get_learned_conditioning_prompt_schedules(prompts,
  base_steps, hires_steps=None, use_old_scheduling=False)`` (28bd8e142d5f, A1111 1.6+: new prompt-editing
  timelines, empty alternatives) for one prompt, on its lark grammar (lark 1.1.2 as A1111 pins it; the caller
  passes the ``lark`` module, so a test without lark can skip);
* :func:`balanced`: whether a prompt has no stray bracket or colon, where lark's ambiguity resolution is not followed;
* :func:`parse_prompt_attention`: ``parse_prompt_attention`` (1.10: ``re_attention``, ``re_break``, the merge of
  equal weights), with kohya's older copy as options.
"""

from __future__ import annotations

import re

__all__ = ["GRAMMAR", "balanced", "learned_conditioning_prompt_schedules", "parse_prompt_attention"]

GRAMMAR = r"""
!start: (prompt | /[][():]/+)*
prompt: (emphasized | scheduled | alternate | plain | WHITESPACE)*
!emphasized: "(" prompt ")"
        | "(" prompt ":" prompt ")"
        | "[" prompt "]"
scheduled: "[" [prompt ":"] prompt ":" [WHITESPACE] NUMBER [WHITESPACE] "]"
alternate: "[" prompt ("|" [prompt])+ "]"
WHITESPACE: /\s+/
plain: /([^\\\[\]():|]|\\.)+/
%import common.SIGNED_NUMBER -> NUMBER
"""
_PARSER: list = []


def learned_conditioning_prompt_schedules(lark, prompt: str, base_steps: int, hires_steps: int | None = None,
                                          use_old_scheduling: bool = False) -> list[tuple[int, str]]:
    """A1111's ``[(end_at_step, text), ...]`` of ``prompt``: the first pass's (``hires_steps`` None) or the hires
    pass's, which continues the first pass's timeline (``int_offset`` / ``flt_offset``) unless
    ``use_old_scheduling``."""
    if not _PARSER:
        _PARSER.append(lark.Lark(GRAMMAR))
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, steps = 0, 0, base_steps
    else:
        int_offset, flt_offset, steps = base_steps, 1.0, hires_steps
    try:
        tree = _PARSER[0].parse(prompt)
    except lark.exceptions.LarkError:
        return [(steps, prompt)]
    ends = [steps]

    class Collect(lark.Visitor):
        def scheduled(self, node):
            text = node.children[-2]
            v = float(text)
            if use_old_scheduling:
                v = v * steps if v < 1 else v
            elif "." in text:
                v = (v - flt_offset) * steps
            else:
                v = v - int_offset
            node.children[-2] = min(steps, int(v))
            if node.children[-2] >= 1:
                ends.append(node.children[-2])

        def alternate(self, node):
            ends.extend(range(1, steps + 1))

    Collect().visit(tree)

    def at_step(step):
        class At(lark.Transformer):
            def scheduled(self, args):
                before, after, _, when, _ = args
                yield before or () if step <= when else after

            def alternate(self, args):
                args = ["" if not arg else arg for arg in args]
                yield args[(step - 1) % len(args)]

            def start(self, args):
                def flat(x):
                    if isinstance(x, str):
                        yield x
                    else:
                        for part in x:
                            yield from flat(part)
                return "".join(flat(args))

            def plain(self, args):
                yield args[0].value

            def __default__(self, data, children, meta):
                yield from children

        return At().transform(tree)

    return [(end, at_step(end)) for end in sorted(set(ends))]


def balanced(prompt: str) -> bool:
    """No stray bracket or colon outside a construct (lark's ambiguity resolution there is not followed)."""
    from sdadapt.prompt_schedule import _Parser

    parser, i = _Parser(prompt), 0
    while i < len(prompt):
        _, i = parser.prompt(i)
        if i < len(prompt):
            return False
    return True


_RE_ATTENTION = r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|
:{space}([+-]?[.\d]+){space}\)|
\)|]|[^\\()\[\]:]+|:
"""
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str, *, spaced: bool = True, breaks: bool = True) -> list[list]:
    """A1111's ``parse_prompt_attention``: ``[[text, weight], ...]``; ``spaced=False``: its regex before ``\\s*``
    around the weight was added (kohya's ``library/strategy_base.py`` copy, what sdadapt's weighted captions keep);
    ``breaks=False``: kohya's, no BREAK pieces."""
    pattern = re.compile(_RE_ATTENTION.replace("{space}", r"\s*" if spaced else ""), re.X)
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start, multiplier):
        for p in range(start, len(res)):
            res[p][1] *= multiplier

    for m in pattern.finditer(text):
        token, weight = m.group(0), m.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif token == ")" and round_brackets:
            multiply_range(round_brackets.pop(), 1.1)
        elif token == "]" and square_brackets:
            multiply_range(square_brackets.pop(), 1 / 1.1)
        else:
            parts = re.split(_RE_BREAK, token) if breaks else [token]
            for i, part in enumerate(parts):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])
    for pos in round_brackets:
        multiply_range(pos, 1.1)
    for pos in square_brackets:
        multiply_range(pos, 1 / 1.1)
    if len(res) == 0:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res
