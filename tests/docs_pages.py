"""The docs pages' code blocks, for the tests that run them (each page's example is tested where its subject is)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def code_blocks(page: str, language: str = "python") -> list[str]:
    """The ```language fenced blocks of ``docs/<page>``, in order."""
    return re.findall(rf"```{language}\n(.*?)```", (ROOT / "docs" / page).read_text(), re.S)


def run_block(page: str, index: int = 0, namespace: dict | None = None) -> dict:
    """Execute python block ``index`` of ``docs/<page>`` in ``namespace`` (a new dict by default) and return it."""
    blocks = code_blocks(page)
    if len(blocks) <= index:
        raise AssertionError(f"docs/{page} has {len(blocks)} python block(s), the test runs block {index}")
    namespace = {} if namespace is None else namespace
    exec(compile(blocks[index], f"docs/{page}", "exec"), namespace)
    return namespace


def run_block_with(page: str, marker: str, namespace: dict | None = None) -> dict:
    """Execute the first python block of ``docs/<page>`` that contains ``marker`` in ``namespace`` (a new dict by
    default) and return it."""
    block = next((b for b in code_blocks(page) if marker in b), None)
    if block is None:
        raise AssertionError(f"docs/{page} has no python block with {marker!r}")
    namespace = {} if namespace is None else namespace
    exec(compile(block, f"docs/{page}", "exec"), namespace)  # noqa: S102 - the docs page's own example
    return namespace
