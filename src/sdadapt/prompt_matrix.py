"""A1111's "Prompt matrix" script (``scripts/prompt_matrix.py``): a prompt ``base | part 1 | part 2 | ...`` made
into every combination of its parts, and the labels of the grid of them (``images.draw_prompt_matrix``).

Torch-free; :mod:`sdadapt.jobs.generate_prompt_matrix` runs it (``generate --prompt-matrix``).
"""

from __future__ import annotations

import math

__all__ = ["matrix_labels", "matrix_prompts"]


def matrix_prompts(text: str, *, at_start: bool = False, join: str = "comma") -> tuple[list[str], list[str]]:
    """A1111's combinations of ``text`` split at every ``|``: combination ``i`` is the first part with each later
    part ``n`` whose bit ``1 << n`` is set in ``i`` (stripped of blanks and commas at its ends), joined by ``", "``
    (``join`` ``"comma"``) or ``" "`` (``"space"``), the first part first — or last with ``at_start`` ("Put variable
    parts at start of prompt").

    ``"a cat | hat | red"`` -> ``["a cat ", "a cat , hat", "a cat , red", "a cat , hat, red"]`` (the first part kept
    as written, as in A1111).

    Returns:
        ``(prompts, parts)``: the ``2 ** (len(parts) - 1)`` prompts and the parts as split.

    Raises:
        ValueError: ``join`` neither ``"comma"`` nor ``"space"``.
    """
    if join not in ("comma", "space"):
        raise ValueError(f"join must be 'comma' or 'space' (A1111's 'Select joining char'), got {join!r}")
    delimiter = ", " if join == "comma" else " "
    parts = text.split("|")
    prompts = []
    for combination in range(2 ** (len(parts) - 1)):
        selected = [part.strip().strip(",") for n, part in enumerate(parts[1:]) if combination & (1 << n)]
        selected = [*selected, parts[0]] if at_start else [parts[0], *selected]
        prompts.append(delimiter.join(selected))
    return prompts, parts


def matrix_labels(parts: list[str]) -> tuple[int, list[list[tuple[str, bool]]], list[list[tuple[str, bool]]]]:
    """A1111's grid of a prompt matrix (``image_grid(rows=1 << ((len(parts) - 1) // 2))``,
    ``draw_prompt_matrix``): ``(rows, column labels, row labels)`` — the first ``ceil(k / 2)`` variable parts over
    the columns, the rest over the rows, each label every part of its side as ``(text, active)``, active where the
    column's (row's) bit is set. Image ``i`` sits at column ``i % cols``, row ``i // cols``."""
    variable = parts[1:]
    boundary = math.ceil(len(variable) / 2)
    horizontal, vertical = variable[:boundary], variable[boundary:]
    columns = [[(text, pos & (1 << i) != 0) for i, text in enumerate(horizontal)]
               for pos in range(1 << len(horizontal))]
    rows = [[(text, pos & (1 << i) != 0) for i, text in enumerate(vertical)] for pos in range(1 << len(vertical))]
    return 1 << ((len(parts) - 1) // 2), columns, rows
