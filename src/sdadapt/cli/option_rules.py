"""Options that only mean something together with another one: refused when given without it.

``generate --aesthetic-steps 10`` without ``--aesthetic FILE`` would otherwise run and silently
ignore the ``10``. A command declares such options once, beside their definitions::

    only_with(parser, ["--aesthetic-steps", "--aesthetic-lr"], needs="--aesthetic FILE",
              when=lambda args: args.aesthetic is not None)

and the parse (a :class:`CheckedParser`, which every ``python -m sdadapt`` parser is) fails with one
usage error naming the option and the fix (``--aesthetic-steps only applies with --aesthetic FILE:
add --aesthetic FILE, or leave --aesthetic-steps out``), exit 2, before anything is loaded.

"Given" means typed on the command line — an option whose value equals its default counts too: the
parse starts from a namespace where the watched options hold a private marker, so argparse leaves
it there exactly when the option was not given; the documented default (or the value a namespace
passed to the parse held, which argparse would have kept) is put in afterwards, as argparse sets it
(a string default through the option's ``type``; a ``SUPPRESS`` default leaves the attribute out).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["CheckedParser", "only_with"]


class _NotGiven:
    """What a watched option holds while the parse has not set it."""

    def __repr__(self) -> str:
        return "<not given>"


_NOT_GIVEN = _NotGiven()


@dataclass(frozen=True)
class _Rule:
    """``flags`` (their ``dests``) apply only when ``when(args)``; ``message`` names the fix."""

    flags: tuple[str, ...]
    dests: tuple[str, ...]
    when: Callable[[argparse.Namespace], bool]
    message: str


class CheckedParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that enforces its :func:`only_with` rules after each parse (sub-command
    parsers made by ``add_subparsers`` are of the same class, so they enforce theirs)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.option_rules: list[_Rule] = []

    def parse_known_args(self, args: Sequence[str] | None = None,  # type: ignore[override]
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        if not self.option_rules:
            return super().parse_known_args(args, namespace)
        namespace = argparse.Namespace() if namespace is None else namespace
        watched = {dest for rule in self.option_rules for dest in rule.dests}
        # a value the caller's namespace already holds stays when the option is not given (argparse
        # leaves it too), but the option is still watched: typed, it is given whatever was there
        before = {dest: getattr(namespace, dest) for dest in watched if hasattr(namespace, dest)}
        for dest in watched:
            setattr(namespace, dest, _NOT_GIVEN)
        namespace, extras = super().parse_known_args(args, namespace)
        given = {dest for dest in watched if getattr(namespace, dest) is not _NOT_GIVEN}
        for dest in watched - given:
            if dest in before:
                setattr(namespace, dest, before[dest])
            else:
                self._set_default(namespace, dest)
        for rule in self.option_rules:
            used = [flag for flag, dest in zip(rule.flags, rule.dests) if dest in given]
            if used and not rule.when(namespace):
                self.error(rule.message.format(option=used[0]))
        return namespace, extras

    def _set_default(self, namespace: argparse.Namespace, dest: str) -> None:
        """Put in what argparse would have for an option that was not given: the ``default`` of the
        first action with that ``dest`` that is not ``SUPPRESS``, else :meth:`set_defaults`' value
        (neither: the attribute stays out); a string default goes through the option's ``type``."""
        actions = [action for action in self._actions if action.dest == dest]
        defaults = [action.default for action in actions if action.default is not argparse.SUPPRESS]
        if defaults:
            default = defaults[0]
        elif dest in self._defaults:
            default = self._defaults[dest]
        else:
            delattr(namespace, dest)
            return
        if isinstance(default, str):
            for action in actions:
                if action.default is default:  # argparse converts only an action's own default
                    default = self._get_value(action, default)
                    break
        setattr(namespace, dest, default)


def only_with(
    parser: argparse.ArgumentParser,
    flags: Sequence[str],
    *,
    when: Callable[[argparse.Namespace], bool],
    needs: str,
    message: str | None = None,
) -> None:
    """Declare that each of ``flags`` applies only when ``when(args)`` holds (``needs`` says what in words).

    Args:
        parser: a :class:`CheckedParser` holding the options (already added).
        flags: the dependent options, by one of their option strings (``"--aesthetic-steps"``).
        when: whether they apply, from the parsed arguments (defaults filled in).
        needs: the condition as the user fixes it, e.g. ``"--aesthetic FILE"``.
        message: the error (``{option}``: the option given); default ``"{option} only applies with
            NEEDS: add NEEDS, or leave {option} out"``.

    Raises:
        TypeError: ``parser`` is not a :class:`CheckedParser` (the rule would never be checked).
        ValueError: a flag the parser does not have, or an ``append``/``count`` option (those build on
            the value already there, so "not given" cannot be told that way).
    """
    if not isinstance(parser, CheckedParser):
        raise TypeError(f"only_with needs a CheckedParser (python -m sdadapt's parsers are), got {type(parser).__name__}")
    actions = {option: action for action in parser._actions for option in action.option_strings}
    missing = [flag for flag in flags if flag not in actions]
    if missing:
        raise ValueError(f"{parser.prog} has no option {', '.join(missing)}")
    cumulative = [f for f in flags if isinstance(actions[f], (argparse._AppendAction, argparse._CountAction))]
    if cumulative:
        raise ValueError(f"{parser.prog}: {', '.join(cumulative)} append or count; only_with watches single-value options")
    text = message if message is not None else f"{{option}} only applies with {needs}: add {needs}, or leave {{option}} out"
    parser.option_rules.append(_Rule(tuple(flags), tuple(actions[f].dest for f in flags), when, text))
