"""``generate --prompt-matrix``: A1111's "Prompt matrix" script — one run per combination of the prompt's ``|``
parts (:func:`sdadapt.prompt_matrix.matrix_prompts`), and their grid with the parts as A1111 labels them (a part
left out grey and struck through)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

__all__ = ["run_prompt_matrix"]


def run_prompt_matrix(*, at_start: bool = False, different_seeds: bool = False, negative_matrix: bool = False,
                      join: str = "comma", margin: int = 0, font: str | os.PathLike | None = None,
                      progress: Callable[..., None] | None = None, log: Callable[[str], None] | None = None,
                      **given: object) -> dict:
    """Run A1111's prompt matrix: :func:`~sdadapt.jobs.generate.run_generate` once per combination of ``given``'s
    ``prompt`` (``negative_matrix``: of its ``negative``; A1111's "Select prompt") split at ``|``, then the grid.

    Combination ``i`` (its bits: which parts it has) is written as ``OUT-ii.png`` with seed ``seed`` (``+ i`` with
    ``different_seeds``, "Use different seed for each picture") and, as A1111 hands a batch its variation seeds,
    ``subseed + i``; a seed ``-1`` is drawn once (A1111's ``fix_seed``). The grid (``out``) is A1111's: ``1 << (k //
    2)`` rows for ``k`` parts, the first half of the parts labelled over the columns and the rest left of the rows
    (:func:`sdadapt.prompt_matrix.matrix_labels`, :func:`sdadapt.labelled_grid.annotate_grid`), ``margin`` px between
    cells, with the first image's infotext. The model is loaded once, each combination run on its own copy
    (:class:`~sdadapt.jobs.loaded_models.LoadedModels`).

    Returns:
        ``{"files": [grid, images...], "grid": path, "prompts": [...], "images": [each run_generate result]}``.

    Raises:
        ValueError: ``count`` above 1 (A1111 sets the batch count itself), another of A1111's scripts, ``join``
            not comma / space.
        FileExistsError: an output exists and ``overwrite`` is false (checked before anything runs).
        ImportError: without Pillow (the grid's labels).
    """
    from ..images import numbered
    from ..labelled_grid import annotate_grid, cells_grid
    from ..prompt_matrix import matrix_labels, matrix_prompts
    from .generate_runs import (
        check_outputs_free,
        check_script_alone,
        first_pictures,
        require_pillow,
        run_named,
        write_grid,
    )
    from .generate_seed import RANDOM_SEED, fixed_seed
    from .loaded_models import LoadedModels

    check_script_alone("--prompt-matrix", given)
    if int(given.get("count", 1)) != 1:  # type: ignore[call-overload]
        raise ValueError(f"--prompt-matrix makes one image per combination (A1111 sets the batch count itself); leave "
                         f"out --count {given['count']}")
    require_pillow("the prompt matrix's labels")
    key = "negative" if negative_matrix else "prompt"
    prompts, parts = matrix_prompts(str(given.get(key) or ""), at_start=at_start, join=join)
    say = log if log is not None else (lambda _line: None)
    out = Path(str(given["out"]))
    files = [numbered(out, i) for i in range(len(prompts))]
    check_outputs_free((out, *files), overwrite=bool(given.get("overwrite")))
    seed = fixed_seed(int(given.get("seed", 0)))  # type: ignore[call-overload]
    subseed = fixed_seed(given.get("subseed"))  # type: ignore[arg-type]
    if int(given.get("seed", 0)) == RANDOM_SEED:  # type: ignore[call-overload]
        say(f"--seed -1: drew {seed} (pass --seed {seed} to make the same grid again)")
    say(f"Prompt matrix will create {len(prompts)} images.")
    loaded = LoadedModels()
    results = []
    for i, (text, file) in enumerate(zip(prompts, files)):
        settings = {**given, key: text, "seed": seed + (i if different_seeds else 0), "out": str(file),
                    **({} if subseed is None else {"subseed": subseed + i})}
        results.append(run_named(f"prompt matrix image {i} ({text!r})", settings, loaded=loaded, log=log))
        if progress is not None:
            progress(i + 1, len(prompts), file.name)
    pictures, texts = first_pictures(results)
    rows, columns, row_labels = matrix_labels(parts)
    grid = annotate_grid(cells_grid(pictures, rows=rows), pictures[0].shape[1], pictures[0].shape[0], columns,
                         row_labels, margin=margin, font=font)
    grid_file = str(write_grid(out, grid, parameters=texts[0], given=given, say=say))
    return {"files": [grid_file, *(str(file) for file in files)], "grid": grid_file, "prompts": prompts,
            "images": results}
