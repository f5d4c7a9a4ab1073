"""A1111's prompt syntax, read as stable-diffusion-webui reads it (pure text; no model).

* :func:`strip_comments` — A1111's "Enable comments" (on by default, 1.8 and later:
  ``modules/processing_scripts/comments.py``): a ``#`` and the rest of its line are left out of the
  prompt before anything else reads it (a commented ``<lora:...>`` tag loads nothing).
* :func:`extra_network_tags` — ``<lora:NAME:MULT>``, ``<lyco:...>``, ``<hypernet:NAME:MULT>``: every
  ``<word:args>`` tag is taken out of the prompt (``modules/extra_networks.py`` ``parse_prompt``, the
  pattern ``<(\\w+):([^>]+)>``), its ``:``-separated arguments split into positional ones and
  ``key=value`` ones (:class:`ExtraNetworkTag`); :func:`lora_multipliers` (:func:`lora_tag_arguments`
  with A1111's ``dyn``) and
  :func:`hypernetwork_multiplier` read them as the built-in Lora extension and the hypernetwork
  network do.
* :func:`composable_prompts` — ``AND`` (composable diffusion): ``a cat AND a dog:0.7`` is the
  sub-prompts ``("a cat", 1.0)``, ``(" a dog", 0.7)`` (``prompt_parser.get_multicond_prompt_list``:
  split at the word ``AND``, an optional trailing ``:weight`` on each).
* :func:`prompt_schedule` — prompt editing ``[from:to:when]``, ``[to:when]``, ``[from::when]`` and
  alternation ``[a|b|c]`` (``prompt_parser.get_learned_conditioning_prompt_schedules``, A1111 1.6 and
  later): the texts to encode and the last step each is used at. A ``when`` written with a decimal
  point (``0.5``, ``.3``, ``1.0``) is a fraction of the steps, any other (``3``, ``1e1``) a step number:
  ``min(steps, int(when))`` after the fraction is multiplied out in floating point, as A1111 rounds
  (``old_scheduling``: A1111's "Use old prompt editing timelines", below 1 a fraction); the brackets
  nest; alternation switches on every step, an empty choice (``[fe|]male``) being the empty text. A
  prompt the grammar does not read (a ``|`` outside brackets, a lone trailing ``\\``) is one text for
  all steps, as in A1111. Emphasis brackets and escapes (``\\[``, ``\\:``) are kept in the texts for
  the emphasis parser. A hires fix's second pass (``first_pass_steps``) continues the first pass's
  timeline: ``[a:b:25]`` after 20 first-pass steps switches at hires step 5, ``[a:b:1.5]`` halfway
  through the hires pass (A1111's ``hires_steps``).
* :func:`schedule_index` — which entry of a schedule the sampler's ``k``-th model call uses
  (``prompt_parser.reconstruct_cond_batch``); :func:`schedule_steps` — the step count A1111 builds
  the schedules for (twice the steps for its second-order samplers: ``SamplerData.total_steps``).

A1111's quirks are kept on purpose, so a pasted prompt gets A1111's schedule: the model-call counter
starts at 0 and entry ``i`` is used while ``k <= end_i`` (``[b:3]`` holds the first text for calls
0..3); calls past the last entry go back to the first entry; an edit whose step comes out below 1
(``[a:b:0]``, ``[a:b:0.01]`` of 25 steps) is ``b`` from the start.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .errors import InputError

#: A1111's comment rules (``comments.py`` ``strip_comments``): a whole ``#`` line, then a ``#`` within a line
_COMMENT_LINE = re.compile("(^|\n)#[^\n]*(\n|$)")
_COMMENT_TAIL = re.compile("#[^\n]*(\n|$)")

__all__ = [
    "OLD_TIMELINES_FIELD",
    "SECOND_ORDER_SAMPLERS",
    "ExtraNetworkTag",
    "composable_prompts",
    "extra_network_tags",
    "hypernetwork_multiplier",
    "lora_multipliers",
    "lora_tag_arguments",
    "prompt_schedule",
    "schedule_index",
    "schedule_steps",
    "strip_comments",
    "strip_prompt_comments",
]

#: A1111's infotext key of its "Use old prompt editing timelines" (``old_scheduling``), written where they change a
#: schedule (``get_conds_with_caching``)
OLD_TIMELINES_FIELD = "Old prompt editing timelines"

#: sdadapt's names of the samplers A1111 marks ``second_order`` (Heun, DPM2, DPM2 a, DPM++ 2S a,
#: DPM++ SDE, Restart): their prompt schedules are built for twice the steps
SECOND_ORDER_SAMPLERS: tuple[str, ...] = ("heun", "dpm_2", "dpm_2_a", "dpmpp_2s_a", "dpmpp_sde", "restart")

_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
_AND = re.compile(r"\bAND\b")
# a sub-prompt (newlines included, A1111 1.6+) and its optional ":weight" at the end
_WEIGHT = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")
# lark's SIGNED_NUMBER (A1111's NUMBER): sign, then an integer, a decimal or either with an exponent
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_STOPS = "[]():|"


@dataclass(frozen=True)
class ExtraNetworkTag:
    """One ``<kind:arg:arg:key=value>`` tag: ``kind`` (``lora``, ``lyco``, ``hypernet``, ...),
    ``positional`` arguments and ``named`` (``key=value``) ones, as A1111's ``ExtraNetworkParams``
    splits them (an argument with exactly one ``=`` is named)."""

    kind: str
    positional: tuple[str, ...]
    named: dict[str, str] = field(default_factory=dict)
    text: str = ""


def extra_network_tags(prompt: str) -> tuple[str, list[ExtraNetworkTag]]:
    """``prompt`` without its ``<kind:args>`` tags, and the tags in order.

    >>> extra_network_tags("a cat <lora:ink:0.6> on a mat")
    ('a cat  on a mat', [ExtraNetworkTag(kind='lora', positional=('ink', '0.6'), named={}, text='<lora:ink:0.6>')])
    """
    tags: list[ExtraNetworkTag] = []

    def take(match: re.Match) -> str:
        positional, named = [], {}
        for item in match.group(2).split(":"):
            parts = item.split("=", 2)
            if len(parts) == 2:
                named[parts[0]] = parts[1]
            else:
                positional.append(item)
        tags.append(ExtraNetworkTag(match.group(1), tuple(positional), named, match.group(0)))
        return ""

    return _EXTRA_NETWORK.sub(take, prompt), tags


def _number(tag: ExtraNetworkTag, value: str, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise InputError(f"prompt tag {tag.text}: the {what} {value!r} is not a number") from None


def lora_tag_arguments(tag: ExtraNetworkTag) -> tuple[str, float, float, int | None]:
    """``(name, te, unet, dyn)`` of a ``<lora:...>`` / ``<lyco:...>`` tag, the one parser of LoRA tags (A1111's
    ``extensions-builtin/Lora/extra_networks_lora.py`` ``activate``): the multipliers of :func:`lora_multipliers`
    and A1111's ``dyn`` (``<lora:NAME:TE:UNET:DYN>`` or ``dyn=N``, the named one winning; ``None`` when not
    given), the leading LoRA ranks to keep (:func:`sdadapt.loratools.dylora.a1111_dyn_state`).

    Raises:
        InputError: no name, a multiplier that is no number, a ``dyn`` that is not a positive int (A1111 reads
            it with ``int()``), or more than four positional arguments.
    """
    dyn_text = tag.named.get("dyn", tag.positional[3] if len(tag.positional) > 3 else None)
    if len(tag.positional) > 4:
        raise InputError(f"prompt tag {tag.text}: at most <lora:NAME:TE:UNET:DYN>; {tag.positional[4]!r} is one "
                         "argument too many")
    dyn = None
    if dyn_text is not None:
        try:
            dyn = int(dyn_text)
        except ValueError:
            raise InputError(f"prompt tag {tag.text}: dyn {dyn_text!r} is not an int (the number of leading LoRA "
                             "ranks to keep, e.g. dyn=8)") from None
        if dyn < 1:
            raise InputError(f"prompt tag {tag.text}: dyn {dyn} keeps no rank; give a positive number of leading "
                             "LoRA ranks, or leave dyn out")
    name, te, unet = _multipliers(tag)
    return name, te, unet, dyn


def lora_multipliers(tag: ExtraNetworkTag) -> tuple[str, float, float]:
    """``(name, te, unet)`` of a ``<lora:...>`` / ``<lyco:...>`` tag, A1111's Lora extension's rule:
    ``<lora:NAME>`` 1, 1; ``<lora:NAME:M>`` M, M; ``<lora:NAME:TE:UNET>``; ``te=``/``unet=`` override
    the positional ones (``<lora:NAME:0.8:unet=0.3>``), the UNet's defaulting to the text encoder's.

    The first three of :func:`lora_tag_arguments`, the one parser: a tag A1111 accepts is accepted here,
    ``dyn`` included (``<lora:NAME:TE:UNET:DYN>``, ``dyn=N``: checked as A1111 reads it, not returned; read
    it with :func:`lora_tag_arguments`, as ``generate`` does).

    Raises:
        InputError: as :func:`lora_tag_arguments`: no name, a multiplier that is no number, a ``dyn`` that is
            not a positive int, or more than four positional arguments.
    """
    name, te, unet, _ = lora_tag_arguments(tag)
    return name, te, unet


def _multipliers(tag: ExtraNetworkTag) -> tuple[str, float, float]:
    if not tag.positional or not tag.positional[0]:
        raise InputError(f"prompt tag {tag.text}: no LoRA name; write <lora:NAME:0.8>")
    te = _number(tag, tag.positional[1], "multiplier") if len(tag.positional) > 1 else 1.0
    te = _number(tag, tag.named["te"], "te multiplier") if "te" in tag.named else te
    unet = _number(tag, tag.positional[2], "UNet multiplier") if len(tag.positional) > 2 else te
    unet = _number(tag, tag.named["unet"], "UNet multiplier") if "unet" in tag.named else unet
    return tag.positional[0], te, unet


def hypernetwork_multiplier(tag: ExtraNetworkTag) -> tuple[str, float]:
    """``(name, multiplier)`` of a ``<hypernet:NAME>`` / ``<hypernet:NAME:M>`` tag (default 1, A1111's)."""
    items = (tag.text[1:-1].split(":")[1:] if tag.text  # (A1111 reads the raw arguments in order, named ones too)
             else [*tag.positional, *(f"{k}={v}" for k, v in tag.named.items())])
    if not items or not items[0]:
        raise InputError(f"prompt tag {tag.text}: no hypernetwork name; write <hypernet:NAME:0.8>")
    return items[0], _number(tag, items[1], "multiplier") if len(items) > 1 else 1.0


def composable_prompts(prompt: str) -> list[tuple[str, float]]:
    """``prompt`` split at ``AND`` into ``(sub-prompt, weight)`` pairs (A1111's composable diffusion).

    >>> composable_prompts("a cat AND a dog:0.7")
    [('a cat', 1.0), (' a dog', 0.7)]
    """
    pieces = []
    for part in _AND.split(prompt):
        match = _WEIGHT.search(part)
        text, weight = match.groups() if match is not None else (part, None)
        pieces.append((text, float(weight) if weight is not None else 1.0))
    return pieces


# ---- prompt editing and alternation: a small parser of A1111's lark grammar --------------------------------

@dataclass
class _Group:  # emphasis brackets, kept as written: "(" a ")" / "(" a ":" b ")" / "[" a "]"
    parts: list


@dataclass
class _Edit:  # [before:after:when] / [after:when]
    before: list | None
    after: list
    number: str
    when: int = 0


@dataclass
class _Alternate:  # [a|b|c]
    options: list[list]


class _NoParse(Exception):
    pass


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text

    def prompt(self, i: int) -> tuple[list, int]:
        """Items from ``i`` up to the first character a prompt cannot hold (or a bracket that does not parse)."""
        items: list = []
        text = self.text
        while i < len(text):
            char = text[i]
            if char in "[(":
                try:
                    node, i = self.bracket(i)
                except _NoParse:
                    return items, i
                items.append(node)
            elif char in _STOPS:
                return items, i
            else:
                start = i
                while i < len(text) and text[i] not in _STOPS:
                    if text[i] == "\\":
                        if i + 1 >= len(text) or text[i + 1] == "\n":
                            break
                        i += 1
                    i += 1
                if i == start:  # a lone trailing backslash: nothing reads it
                    return items, i
                items.append(text[start:i])
        return items, i

    def bracket(self, i: int) -> tuple[object, int]:
        text = self.text
        first, j = self.prompt(i + 1)
        at = text[j:j + 1]
        if text[i] == "(":
            if at == ")":
                return _Group(["(", *first, ")"]), j + 1
            if at == ":":
                second, k = self.prompt(j + 1)
                if text[k:k + 1] == ")":
                    return _Group(["(", *first, ":", *second, ")"]), k + 1
            raise _NoParse
        if at == "]":
            return _Group(["[", *first, "]"]), j + 1
        if at == "|":
            options = [first]
            while text[j:j + 1] == "|":
                option, j = self.prompt(j + 1)
                options.append(option)
            if text[j:j + 1] == "]":
                return _Alternate(options), j + 1
            raise _NoParse
        if at == ":":
            end = self.when(j + 1)
            if end is not None:
                return _Edit(None, first, *end[:1]), end[1]
            second, k = self.prompt(j + 1)
            if text[k:k + 1] == ":":
                end = self.when(k + 1)
                if end is not None:
                    return _Edit(first, second, end[0]), end[1]
        raise _NoParse

    def when(self, i: int) -> tuple[str, int] | None:
        """``[blanks] NUMBER [blanks] ]`` at ``i``: (the number's text, the index after ``]``), or None."""
        text = self.text
        while i < len(text) and text[i].isspace():
            i += 1
        match = _NUMBER.match(text, i)
        if match is None:
            return None
        end = match.end()
        while end < len(text) and text[end].isspace():  # (A1111 1.6+: blanks before "]" too)
            end += 1
        if text[end:end + 1] != "]":
            return None
        return match.group(0), end + 1

    def start(self) -> list:
        items: list = []
        i = 0
        while i < len(self.text):
            more, i = self.prompt(i)
            items += more
            if i < len(self.text):
                if self.text[i] not in "[]():":
                    raise _NoParse  # "|" outside an alternation, a lone trailing backslash
                items.append(self.text[i])
                i += 1
        return items


def _nodes(items: list):
    for item in items:
        if isinstance(item, str):
            continue
        yield item
        if isinstance(item, _Group):
            yield from _nodes(item.parts)
        elif isinstance(item, _Edit):
            yield from _nodes(item.before or [])
            yield from _nodes(item.after)
        else:
            for option in item.options:
                yield from _nodes(option)


def _render(items: list, step: int, prompt: str) -> str:
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, _Group):
            out.append(_render(item.parts, step, prompt))
        elif isinstance(item, _Edit):
            out.append(_render(item.before or [], step, prompt) if step <= item.when else _render(item.after, step, prompt))
        else:
            out.append(_render(item.options[(step - 1) % len(item.options)], step, prompt))  # ([a|] : "a", "")
    return "".join(out)


def prompt_schedule(prompt: str, steps: int, *, old_scheduling: bool = False,
                    first_pass_steps: int | None = None) -> list[tuple[int, str]]:
    """The texts ``prompt`` stands for over ``steps`` sampler steps: ``[(end_at_step, text), ...]``,
    ``end_at_step`` rising, the last ``steps`` (A1111's ``get_learned_conditioning_prompt_schedules``).

    ``when`` of ``[from:to:when]``: a number with a decimal point is a fraction of ``steps``, any other
    a step number (A1111 1.6 and later); ``old_scheduling``: A1111's setting "Use old prompt editing
    timelines" (below 1 a fraction, else a step number). Either way ``min(steps, int(...))``.

    ``first_pass_steps``: ``prompt``'s schedule for a hires fix's second pass of ``steps`` schedule steps
    after a first pass of ``first_pass_steps`` (A1111's ``hires_steps`` / ``base_steps``, 1.6 and later):
    the timeline runs on from the first pass, a step number ``n`` being hires step ``n - first_pass_steps``
    and a fraction ``f`` hires step ``(f - 1.0) * steps`` (``[a:b:0.5]``: ``b`` all through the hires pass;
    ``[a:b:1.5]``: ``b`` from its middle); an alternation counts the hires pass's own steps from 1 again.
    With ``old_scheduling`` A1111 plans the hires pass as the first pass (the schedule of
    ``first_pass_steps`` steps, no offset: calls past its last entry take its first).

    >>> prompt_schedule("a [cat:dog:0.5] on a mat", 10)
    [(5, 'a cat on a mat'), (10, 'a dog on a mat')]
    >>> prompt_schedule("[red|blue] ball", 3)
    [(1, 'red ball'), (2, 'blue ball'), (3, 'red ball')]
    >>> prompt_schedule("[cat:dog:25] [a:b:1.5]", 10, first_pass_steps=20)
    [(5, 'cat a'), (10, 'dog b')]

    Raises:
        InputError: ``steps`` or ``first_pass_steps`` below 1, a ``when`` too large to be a step.
    """
    if steps < 1:
        raise InputError(f"steps must be >= 1, got {steps}")
    if first_pass_steps is not None and first_pass_steps < 1:
        raise InputError(f"first_pass_steps (the hires fix's first pass) must be >= 1, got {first_pass_steps}")
    int_offset, fraction_offset = 0, 0.0
    if first_pass_steps is not None:
        if old_scheduling:  # (A1111's old timelines: the hires pass gets the first pass's schedule)
            steps = first_pass_steps
        else:  # (A1111 1.6+: the hires pass's timeline continues the first pass's)
            int_offset, fraction_offset = first_pass_steps, 1.0
    try:
        tree = _Parser(prompt).start()
    except _NoParse:
        return [(steps, prompt)]
    ends = {steps}
    for node in _nodes(tree):
        if isinstance(node, _Edit):
            when = float(node.number)
            if old_scheduling:  # A1111's "Use old prompt editing timelines": below 1 a fraction
                when = when * steps if when < 1 else when
            elif "." in node.number:  # A1111 1.6+: a number with a point is a fraction of the steps
                when = (when - fraction_offset) * steps
            else:
                when = when - int_offset
            try:
                node.when = min(steps, int(when))
            except OverflowError:
                raise InputError(f"prompt {prompt!r}: the step {node.number} of [from:to:when] is no number of "
                                 "steps") from None
            if node.when >= 1:  # (an edit at step 0 or before: its "to" from the first step on)
                ends.add(node.when)
        elif isinstance(node, _Alternate):
            ends.update(range(1, steps + 1))
    return [(end, _render(tree, end, prompt)) for end in sorted(ends)]


def schedule_index(ends: Sequence[int], call: int) -> int:
    """The entry of a schedule (its ``end_at_step`` values, rising) that model call ``call`` (0, 1, ...)
    uses: the first with ``call <= end``; 0 past the last one (A1111's ``reconstruct_cond_batch``)."""
    for index, end in enumerate(ends):
        if call <= end:
            return index
    return 0


def schedule_steps(sampler: str, steps: int) -> int:
    """The step count A1111 builds prompt schedules for: ``2 * steps`` for the samplers in
    :data:`SECOND_ORDER_SAMPLERS` (two model calls a step), else ``steps``."""
    return 2 * steps if sampler in SECOND_ORDER_SAMPLERS else steps


def strip_comments(text: str) -> str:
    r"""``text`` without A1111's ``#`` comments (its "Enable comments" option, on by default): A1111's
    two substitutions in order — a line that starts with ``#`` (``(^|\n)#[^\n]*(\n|$)`` -> ``\n``),
    then ``#`` to the end of a line anywhere (``#[^\n]*(\n|$)`` -> ``\n``). The line breaks left are
    A1111's (the tokenizer reads them as spaces); a text without ``#`` is returned unchanged.

    Example: ``"a cat # old idea\n# <lora:x:1>\nsitting"`` -> ``"a cat \nsitting"`` (as A1111 gives it).
    """
    if "#" not in text:
        return text
    return _COMMENT_TAIL.sub("\n", _COMMENT_LINE.sub("\n", text))


def strip_prompt_comments(prompt: str, *, fix: str) -> str:
    """:func:`strip_comments` of a job's ``--prompt``, refusing a prompt that is all comments (nothing left to
    condition on): ``ValueError`` naming the prompt, then ``fix`` (what to give instead)."""
    stripped = strip_comments(prompt)
    if prompt.strip() and not stripped.strip():
        raise ValueError(f"--prompt {prompt!r} is all # comments (A1111's comment syntax: '#' to the end of the line "
                         f"is left out); {fix}")
    return stripped
