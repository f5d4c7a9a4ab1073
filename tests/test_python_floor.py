"""The library runs on the oldest Python ``pyproject.toml`` promises (``requires-python``): its sources parse with
that version's grammar, and import nothing the standard library gained later unless inside a ``try`` that
catches ``ImportError`` (a fallback) or under ``if TYPE_CHECKING:``. CI runs a newer Python, so without this a
``from typing import Self`` or an unguarded ``import tomllib`` would pass every other test and break
``import sdadapt.freeu`` for a Python 3.10 user."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "src" / "sdadapt").rglob("*.py"))

# names the standard library gained after Python 3.10, by module
_NEWER = {
    "tomllib": None,  # the whole module (3.11)
    "typing": {"Self", "Never", "LiteralString", "assert_never", "assert_type", "reveal_type", "Unpack", "Required",
               "NotRequired", "TypeVarTuple", "dataclass_transform", "override", "TypeAliasType", "ReadOnly", "TypeIs",
               "get_overloads", "clear_overloads"},
    "enum": {"StrEnum", "ReprEnum", "verify", "EnumCheck", "FlagBoundary", "global_enum", "member", "nonmember",
             "property"},
    "datetime": {"UTC"},
    "itertools": {"batched"},
    "hashlib": {"file_digest"},
    "asyncio": {"TaskGroup", "timeout", "Runner"},
    "contextlib": {"chdir"},
}


def _floor() -> tuple[int, int]:
    text = (ROOT / "pyproject.toml").read_text()
    found = re.search(r'requires-python\s*=\s*">=\s*(\d+)\.(\d+)', text)
    assert found, "pyproject.toml states no requires-python floor"
    return int(found.group(1)), int(found.group(2))


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside a ``try`` whose handlers catch ImportError (or every exception), or under ``if TYPE_CHECKING``."""
    child, parent = node, parents.get(node)
    while parent is not None:
        if isinstance(parent, ast.Try) and child in parent.body:
            for handler in parent.handlers:
                names = {n.id for n in ast.walk(handler.type) if isinstance(n, ast.Name)} if handler.type else None
                if names is None or names & {"ImportError", "ModuleNotFoundError", "Exception"}:
                    return True
        if isinstance(parent, ast.If) and child in parent.body and "TYPE_CHECKING" in ast.unparse(parent.test):
            return True
        child, parent = parent, parents.get(parent)
    return False


def _newer_imports(tree: ast.Module) -> list[str]:
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [(node.module, alias.name) for alias in node.names]
        else:
            continue
        for module, name in names:
            if module not in _NEWER or _guarded(node, parents):
                continue
            newer = _NEWER[module]
            if newer is None or (name is not None and name in newer):
                found.append(f"line {node.lineno}: {module}{'' if name is None else '.' + name}")
    return found


def test_the_floor_is_the_one_these_checks_know():
    assert _floor() == (3, 10), "update _NEWER for the new floor"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: str(p.relative_to(ROOT / "src")))
def test_each_module_parses_and_imports_as_the_oldest_python_allows(source):
    text = source.read_text(encoding="utf-8")
    tree = ast.parse(text, filename=str(source), feature_version=_floor())
    assert not _newer_imports(tree), f"{source}: needs a newer Python than requires-python: {_newer_imports(tree)}"


def test_the_checks_find_what_they_look_for():
    """The checker itself: each kind of import it must refuse, and the guards it must accept."""
    refused = ["import tomllib", "from typing import Self", "from typing import Any, Never",
               "def f():\n    from enum import StrEnum"]
    accepted = ["try:\n    import tomllib\nexcept ImportError:\n    import tomli as tomllib",
                "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from typing import Self",
                "from typing import Any", "import enum", "from .tomllib import x"]
    for text in refused:
        assert _newer_imports(ast.parse(text)), text
    for text in accepted:
        assert not _newer_imports(ast.parse(text)), text
    with pytest.raises(SyntaxError):
        ast.parse("try:\n    pass\nexcept* ValueError:\n    pass", feature_version=(3, 10))


def test_a_flags_help_is_as_written_on_every_python():
    """argparse's ``BooleanOptionalAction`` on Python 3.10 appends `` (default: …)`` to a flag's help — ``train``'s
    flags, whose default is a marker, read ``(default: <unset>)`` — and 3.11+ do not: the CLI's
    :class:`~sdadapt.cli.options.BooleanFlag` keeps the help as written on both."""
    import argparse

    from sdadapt.cli.options import BooleanFlag

    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--shuffle", action=BooleanFlag, default=True, help="shuffle the tags")
    text = " ".join(parser.format_help().split())
    assert "--shuffle, --no-shuffle shuffle the tags" in text and "(default:" not in text
    assert parser.parse_args(["--no-shuffle"]).shuffle is False and parser.parse_args([]).shuffle is True
