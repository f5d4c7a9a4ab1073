"""How one converted tensor is made from source tensors, what a conversion left out, and its error.

A *key plan* is ``{target key: KeySource}``. It is built from key names and shapes only (a
safetensors header is enough), so a streaming engine can plan a whole checkpoint before it reads a
single tensor, then materialise targets one at a time with :func:`sdadapt.formats.model_keys.apply_plan`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

__all__ = ["KeySource", "KeyReport", "KeyMapError", "PlanBuilder", "fit_report", "name_keys"]

Shape = tuple[int, ...]


@dataclass(frozen=True)
class KeySource:
    """Recipe for one target tensor.

    Steps, in order: read ``keys``; transpose each (2-D only) when ``transpose``; concatenate along
    dim 0 when there is more than one key; when ``part = (index, count)`` cut dim 0 into ``count``
    equal chunks and keep chunk ``index``; reshape to ``shape``.

    Examples: a rename is ``KeySource(("a",), shape)``; LDM VAE ``q.weight`` (C, C, 1, 1) -> diffusers
    ``to_q.weight`` is a reshape to (C, C); OpenCLIP ``in_proj_weight`` (3D, D) -> ``k_proj.weight``
    is ``part=(1, 3)``, shape (D, D); the inverse concatenates ``keys=(q, k, v)``; OpenCLIP
    ``text_projection`` (D, P) -> ``text_projection.weight`` (P, D) is ``transpose=True``.
    """

    keys: tuple[str, ...]
    shape: Shape
    part: tuple[int, int] | None = None
    transpose: bool = False


@dataclass(frozen=True)
class KeyReport:
    """What a key plan could not or did not carry over, by key name.

    Attributes:
        unmatched: source keys that no rule knows; they are not in the plan.
        dropped: source keys left out on purpose (buffers the target side has no place for, EMA
            copies, the layer SD2 never uses ...); ``notes`` says why.
        notes: one line per decision worth knowing (drops, aliases read, reshapes to fit a model).
        missing: keys a complete target needs but cannot be made (a fused tensor whose parts are not
            all there, or ``target_shapes`` keys the plan does not produce).
        mismatched: ``"key: reason"`` for shapes that do not fit the rule or the given target shapes.
        unexpected: planned target keys absent from the given ``target_shapes``.
    """

    unmatched: tuple[str, ...] = ()
    dropped: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    mismatched: tuple[str, ...] = ()
    unexpected: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True when nothing is unmatched, missing, mismatched or unexpected (drops are fine)."""
        return not (self.unmatched or self.missing or self.mismatched or self.unexpected)

    def problems(self) -> str:
        """Human-readable list of the offending keys (up to 20 per kind), for error messages."""
        parts = []
        for label, keys in (
            ("unknown source keys (no rule maps them)", self.unmatched),
            ("missing keys", self.missing),
            ("shape mismatches", self.mismatched),
            ("unexpected keys (the target model has no such key)", self.unexpected),
        ):
            if keys:
                parts.append(f"{len(keys)} {label}: {name_keys(keys)}")
        return "; ".join(parts)


def fit_report(shapes: Mapping[str, Shape], expected: Mapping[str, Shape]) -> KeyReport:
    """How tensors of ``shapes`` (``{key: shape}``) fit a model's ``expected`` ``{key: shape}``, key
    for key: its ``missing`` keys, ``unexpected`` keys and shape ``mismatched`` ones
    (``"key: shape (..), the model's (..)"``); ``ok`` when they load as they are."""
    return KeyReport(
        missing=tuple(k for k in expected if k not in shapes),
        mismatched=tuple(f"{k}: shape {tuple(shapes[k])}, the model's {tuple(expected[k])}" for k in expected
                         if k in shapes and tuple(shapes[k]) != tuple(expected[k])),
        unexpected=tuple(k for k in shapes if k not in expected),
    )


class KeyMapError(ValueError):
    """A checkpoint's keys cannot be converted as asked; ``report`` holds the full lists."""

    def __init__(self, message: str, report: KeyReport | None = None):
        super().__init__(message)
        self.report = report


def name_keys(keys: Iterable[str], *, limit: int = 20) -> str:
    """``'a', 'b', ... (+N more)`` — at most ``limit`` names, sorted."""
    keys = sorted(keys)
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


@dataclass
class PlanBuilder:
    """Collects targets and report entries while component rules walk the source keys."""

    plan: dict[str, KeySource] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    _producer: dict[str, str] = field(default_factory=dict)

    def add(self, target: str, source: KeySource, *, by: str) -> None:
        """Plan ``target``; ``by`` is the source key that asked (for duplicate detection)."""
        known = self.plan.get(target)
        if known is None:
            self.plan[target] = source
            self._producer[target] = by
        elif known != source:
            self.unmatched.append(by)
            self.notes.append(
                f"{by!r} and {self._producer[target]!r} both map to {target!r}; kept the first,"
                f" listed {by!r} as unmatched — remove one of them from the checkpoint"
            )

    def drop(self, keys: Iterable[str], reason: str) -> None:
        keys = sorted(keys)
        if keys:
            self.dropped.extend(keys)
            self.notes.append(f"dropped {len(keys)} key(s) ({name_keys(keys, limit=3)}): {reason}")

    def report(self) -> KeyReport:
        return KeyReport(
            unmatched=tuple(dict.fromkeys(self.unmatched)),
            dropped=tuple(dict.fromkeys(self.dropped)),
            notes=tuple(dict.fromkeys(self.notes)),
            missing=tuple(dict.fromkeys(self.missing)),
            mismatched=tuple(dict.fromkeys(self.mismatched)),
            unexpected=tuple(dict.fromkeys(self.unexpected)),
        )
