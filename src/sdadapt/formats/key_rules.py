"""A small two-way rule language for state-dict keys: one template per naming, fields in braces.

``KeyRule(ldm="encoder.down.{i}.block.{j}.{resnet}.{p}",
diffusers="encoder.down_blocks.{i}.resnets.{j}.{resnet}.{p}", words={"resnet": {...}})`` matches a
key on either side and writes the other. Fields:

- ``{p}``: ``weight`` or ``bias``;
- ``{qkv}`` (diffusers side of a ``fused_qkv`` rule only): ``q``, ``k`` or ``v``;
- a field named in ``words``: one of its words, translated LDM word -> diffusers word;
- any other field: a decimal index, copied (or counted from the other end for ``flip``).

Rule kinds say how the tensor changes: ``same`` (rename), ``conv1x1`` (LDM (O, I, 1, 1) conv weight
<-> diffusers (O, I) linear weight; biases unchanged), ``transpose`` (2-D, LDM (D, P) <-> diffusers
(P, D)), ``fused_qkv`` (LDM one (3D, ...) tensor <-> diffusers q, k, v of (D, ...) each).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .key_source import KeySource, PlanBuilder

__all__ = ["KeyRule", "plan_by_rules", "SIDES"]

SIDES = ("ldm", "diffusers")
_FIELD = re.compile(r"\{(\w+)\}")
_KINDS = ("same", "conv1x1", "transpose", "fused_qkv")


def _compile(template: str, words: Mapping[str, Iterable[str]]) -> re.Pattern:
    out, pos = [], 0
    for m in _FIELD.finditer(template):
        out.append(re.escape(template[pos : m.start()]))
        name = m.group(1)
        if name in words:
            alternatives = "|".join(re.escape(w) for w in sorted(words[name], key=len, reverse=True))
        elif name == "p":
            alternatives = "weight|bias"
        elif name == "qkv":
            alternatives = "q|k|v"
        else:
            alternatives = r"\d+"
        out.append(f"(?P<{name}>{alternatives})")
        pos = m.end()
    out.append(re.escape(template[pos:]))
    return re.compile("".join(out) + r"\Z")


@dataclass(frozen=True)
class KeyRule:
    """One key shape in both namings (see the module docstring for the template syntax)."""

    ldm: str
    diffusers: str
    kind: str = "same"
    words: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    flip: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"KeyRule kind must be one of {_KINDS}, got {self.kind!r}")
        ldm_words = {k: list(v) for k, v in self.words.items()}
        diffusers_words = {k: list(v.values()) for k, v in self.words.items()}
        patterns = {"ldm": _compile(self.ldm, ldm_words), "diffusers": _compile(self.diffusers, diffusers_words)}
        object.__setattr__(self, "_patterns", patterns)

    def match(self, side: str, key: str) -> dict[str, str] | None:
        m = self._patterns[side].match(key)  # type: ignore[attr-defined]
        return None if m is None else m.groupdict()

    def render(self, side: str, fields: Mapping[str, str]) -> str:
        return self.ldm.format(**fields) if side == "ldm" else self.diffusers.format(**fields)

    def translate(self, fields: Mapping[str, str], *, to: str, counts: Mapping[str, int]) -> dict[str, str]:
        """Fields of a key matched on the other side, rewritten for side ``to``."""
        out = dict(fields)
        for name, table in self.words.items():
            out[name] = table[fields[name]] if to == "diffusers" else {v: k for k, v in table.items()}[fields[name]]
        if self.flip is not None:
            out[self.flip] = str(counts[self.flip] - 1 - int(fields[self.flip]))
        return out


def plan_by_rules(
    rules: Iterable[KeyRule],
    shapes: Mapping[str, tuple[int, ...]],
    builder: PlanBuilder,
    *,
    to: str,
    source_prefix: str,
    target_prefix: str,
    counts: Mapping[str, int] | None = None,
    real_keys: Mapping[str, str] | None = None,
) -> list[str]:
    """Plan every key of ``shapes`` (all starting with ``source_prefix``) that a rule knows.

    ``real_keys`` maps a key of ``shapes`` that the caller respelled (an alias, such as a
    transformers-5 CLIP key without ``text_model.``) to the key really in the checkpoint; plans read
    the real key. Returns the keys of ``shapes`` no rule matched (the caller decides whether they
    are unmatched or dropped), in the caller's spelling.
    """
    rules = list(rules)
    real_keys = real_keys or {}
    source = "ldm" if to == "diffusers" else "diffusers"
    counts = counts or {}
    left = []
    for key, shape in shapes.items():
        local = key[len(source_prefix) :]
        for rule in rules:
            fields = rule.match(source, local)
            if fields is not None:
                _plan_one(
                    rule, fields, key, tuple(shape), shapes, builder,
                    to=to, source_prefix=source_prefix, target_prefix=target_prefix,
                    counts=counts, real_keys=real_keys,
                )
                break
        else:
            left.append(key)
    return left


def _plan_one(
    rule: KeyRule,
    fields: dict[str, str],
    key: str,
    shape: tuple[int, ...],
    shapes: Mapping[str, tuple[int, ...]],
    builder: PlanBuilder,
    *,
    to: str,
    source_prefix: str,
    target_prefix: str,
    counts: Mapping[str, int],
    real_keys: Mapping[str, str],
) -> None:
    source = "ldm" if to == "diffusers" else "diffusers"
    real = real_keys.get(key, key)
    if rule.kind == "fused_qkv":
        if to == "diffusers":
            if not shape or shape[0] % 3:
                builder.mismatched.append(f"{real}: shape {shape}, expected dim 0 divisible by 3 (fused q, k, v)")
                return
            for index, qkv in enumerate("qkv"):
                local = rule.render("diffusers", {**rule.translate(fields, to=to, counts=counts), "qkv": qkv})
                target = target_prefix + local
                builder.add(target, KeySource((real,), (shape[0] // 3, *shape[1:]), part=(index, 3)), by=real)
            return
        members = tuple(source_prefix + rule.render("diffusers", {**fields, "qkv": qkv}) for qkv in "qkv")
        absent = [m for m in members if m not in shapes]
        if absent:
            builder.missing.extend(absent)
            builder.notes.append(f"{real}: cannot fuse q, k, v without {', '.join(absent)}")
            return
        member_shapes = {tuple(shapes[m]) for m in members}
        if len(member_shapes) != 1:
            builder.mismatched.append(f"{real}: q, k, v shapes differ {[tuple(shapes[m]) for m in members]}")
            return
        fields = {k: v for k, v in fields.items() if k != "qkv"}
        target = target_prefix + rule.render("ldm", rule.translate(fields, to=to, counts=counts))
        parts = tuple(real_keys.get(m, m) for m in members)
        builder.add(target, KeySource(parts, (3 * shape[0], *shape[1:])), by=real)
        return
    target = target_prefix + rule.render(to, rule.translate(fields, to=to, counts=counts))
    if rule.kind == "same" or len(shape) == 1:
        builder.add(target, KeySource((real,), shape), by=real)
    elif rule.kind == "transpose":
        if len(shape) != 2:
            builder.mismatched.append(f"{real}: shape {shape}, expected a 2-D matrix to transpose")
            return
        builder.add(target, KeySource((real,), (shape[1], shape[0]), transpose=True), by=real)
    elif rule.kind == "conv1x1":
        if len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1)):
            new = shape[:2] if to == "diffusers" else (*shape[:2], 1, 1)
            builder.add(target, KeySource((real,), new), by=real)
        else:
            side = "(O, I, 1, 1) conv" if source == "ldm" else "(O, I) linear"
            builder.mismatched.append(f"{real}: shape {shape}, expected a {side} weight or (O, I)")
