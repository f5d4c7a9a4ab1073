"""``main`` builds only the parser of the command a command line names (``_parser_for``): it must be
that command's parser of the whole CLI, option for option, and a command line naming no known command
still gets the whole parser (its ``--help``, its "invalid choice" listing every command)."""

from __future__ import annotations

import argparse

import pytest

from sdadapt.cli import _COMMAND_MODULES, _parser_for, build_parser, main


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return dict(sub.choices)


def _flags(parser: argparse.ArgumentParser) -> list[tuple]:
    """Every option of a parser and of its sub-commands, with what it parses to."""
    out = []
    for action in parser._actions:
        out.append((tuple(action.option_strings), action.dest, repr(action.default), repr(action.choices)
                    if not isinstance(action, argparse._SubParsersAction) else None, action.nargs, action.help))
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                out.append((name, _flags(child)))
    return out


def test_the_command_map_names_every_command_of_the_whole_parser_in_its_order():
    assert list(_commands(build_parser())) == list(_COMMAND_MODULES)


@pytest.mark.parametrize("command", list(_COMMAND_MODULES))
def test_a_command_lines_parser_is_that_commands_parser_of_the_whole_cli(command):
    whole = _commands(build_parser())[command]
    alone = _parser_for([command, "--anything"])
    assert command in _commands(alone)
    assert _flags(_commands(alone)[command]) == _flags(whole)
    assert _commands(alone)[command].format_help() == whole.format_help()


@pytest.mark.parametrize("argv", [[], ["--version"], ["frobnicate"], ["-h"]])
def test_a_command_line_naming_no_command_gets_the_whole_parser(argv):
    assert list(_commands(_parser_for(argv))) == list(_COMMAND_MODULES)


def test_a_misspelt_command_is_refused_with_every_command_listed(capsys):
    with pytest.raises(SystemExit) as info:
        main(["trian"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and all(command in err for command in _COMMAND_MODULES), err
