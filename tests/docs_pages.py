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
