"""``generate --xyz-x TYPE VALUES [--xyz-y ...] [--xyz-z ...]``: A1111's "X/Y/Z plot" script — one run of generate
per cell, each with its axes' values set, and the grid of the cells' first images, with A1111's legend.

The model is loaded once (:class:`~sdadapt.jobs.loaded_models.LoadedModels`); every cell runs on its own copy of
it, so each cell's image is the one its own run makes. The values are read (:func:`sdadapt.xyz_plot.axis_values`)
and checked — samplers, schedules, upscalers, checkpoints, sizes — before the model loads.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

__all__ = ["XyzRun", "run_xyz_plot", "xyz_cell_settings"]

#: A1111's "RNG source" values -> ``--noise``
_RNG_SOURCES = {"gpu": "a1111", "cpu": "a1111-cpu", "nv": "a1111-nv"}
_AUTOMATIC = ("auto", "automatic", "none", "")


class XyzRun:
    """The axes of one X/Y/Z plot, read and checked: ``axes`` (x, y, z: each an :class:`~sdadapt.xyz_plot.XyzAxis`,
    its values, the text they were read from)."""

    def __init__(self, axes: Sequence[tuple[str, str] | None], given: Mapping[str, object], *,
                 keep_random_seeds: bool = False, style_table: Mapping[str, object] | None = None) -> None:
        from ..xyz_plot import axis_values, find_axis
        from .generate_seed import RANDOM_SEED, fixed_seed

        self.axes = []
        for name, spec in zip("XYZ", [*axes, None, None, None][:3]):
            label, text = spec if spec is not None else ("Nothing", "")
            try:
                axis = find_axis(label)
                values = axis_values(axis, text)
            except ValueError as exc:
                raise ValueError(f"--xyz-{name.lower()}: {exc}") from None
            if axis.label in ("Seed", "Var. seed") and not keep_random_seeds:  # (A1111's fix_axis_seeds)
                values = [fixed_seed(value) if value == RANDOM_SEED else value for value in values]
            self.axes.append((axis, values, text))
        used = [axis.label for axis, _, _ in self.axes if axis.label != "Nothing"]
        twice = next((label for label in used if used.count(label) > 1), None)
        if twice is not None:
            raise ValueError(f"--xyz-x/-y/-z: {twice!r} on two axes; give each type once")
        self.given = dict(given)
        for position, (name, (axis, values, _)) in enumerate(zip("xyz", self.axes)):  # (every value checked now,
            for value in values:  # on the run as the other axes' first values set it: a refiner, A1111's noise)
                settings = dict(self.given)
                for other, (other_axis, other_values, _) in enumerate(self.axes):
                    if other != position:
                        with contextlib.suppress(ValueError):  # (its own values are checked in their turn)
                            settings.update(xyz_cell_settings(other_axis, other_values[0], other_values, settings,
                                                              style_table=style_table))
                try:
                    xyz_cell_settings(axis, value, values, settings, style_table=style_table)
                except ValueError as exc:
                    raise ValueError(f"--xyz-{name} {axis.label!r}: {exc}") from None

    @property
    def lengths(self) -> tuple[int, int, int]:
        return tuple(len(values) for _, values, _ in self.axes)  # type: ignore[return-value]

    def fields(self, *, z: bool, keep_random_seeds: bool) -> dict[str, str]:
        """The fields A1111 adds to a grid's infotext: "Script", each axis's "Type", "Values" (as typed) and, for a
        seed axis, "Fixed Values" (the seeds drawn for -1); the Z axis's on the main grid only."""
        fields = {"Script": "X/Y/Z plot"}
        for name, (axis, values, text) in zip("XYZ", self.axes):
            if axis.label == "Nothing" or (name == "Z" and not z):
                continue
            fields[f"{name} Type"] = axis.label
            fields[f"{name} Values"] = text
            if axis.label in ("Seed", "Var. seed") and not keep_random_seeds:
                fields[f"Fixed {name} Values"] = ", ".join(str(value) for value in values)
        return fields


def xyz_cell_settings(axis, value: object, values: Sequence[object], settings: Mapping[str, object], *,
                      style_table: Mapping[str, object] | None = None) -> dict:
    """What one axis value changes in :func:`~sdadapt.jobs.generate.run_generate`'s ``settings`` (the cell's so
    far: A1111 applies x, then y, then z to its copy of the run), as A1111's axis ``apply`` functions set it.

    Raises:
        ValueError: a value this axis cannot take (an unknown sampler, schedule, upscaler, checkpoint, size), or an
            axis that changes nothing in this run (a hires axis without the hires fix, ``Denoising`` in plain
            txt2img, a variation seed without A1111's noise, ``Refiner switch at`` without a refiner).
    """
    from ..sampler_tables import (
        HIRES_UPSCALER_LABELS,
        canonical_schedule,
    )
    from ..sampler_tables import sampler_schedule_from_label as sampler_label
    from ..xyz_plot import prompt_order, prompt_sr
    from .models import checkpoint_by_name

    label = axis.label
    hires = any(settings.get(key) is not None for key in ("hires_scale", "hires_width", "hires_height"))
    if label == "Nothing":
        return {}
    if label == "Styles":  # (A1111's apply_styles: p.styles.extend(x.split(",")), after the run's own)
        from ..prompt_styles import find_styles

        if style_table is None:
            raise ValueError("give the styles file its names are in (--styles-file styles.csv)")
        names = [name.strip() for name in str(value).split(",") if name.strip()]
        return {"styles": [*settings.get("styles", ()), *find_styles(names, style_table)]}  # type: ignore[arg-type]
    if label == "Prompt S/R":
        prompt, negative = prompt_sr(str(settings.get("prompt", "")), str(settings.get("negative", "")), str(value),
                                     str(values[0]))
        return {"prompt": prompt, "negative": negative}
    if label == "Prompt order":
        prompt = str(settings.get("prompt", ""))
        missing = [piece for piece in value if piece not in prompt]  # type: ignore[attr-defined]
        if missing:
            raise ValueError(f"{missing[0]!r} is not in the prompt")
        return {"prompt": prompt_order(str(settings.get("prompt", "")), value)}  # type: ignore[arg-type]
    if label == "Size":
        width, _, height = str(value).partition("x")
        try:
            return {"width": int(width.strip()), "height": int(height.strip())}
        except ValueError:
            raise ValueError(f"{value!r} is no size WIDTHxHEIGHT (512x768)") from None
    if label == "Denoising":
        if settings.get("init_image") is not None:
            return {"denoising_strength": value}
        if hires:
            return {"hires_denoising": value}
        raise ValueError("txt2img without the hires fix has no denoising strength: add --init-image or --hires-scale")
    if label in ("Hires steps", "Hires sampler", "Hires upscaler") and not hires:
        raise ValueError("the hires fix's setting, and this run has none: add --hires-scale (or --hires-width / "
                         "--hires-height)")
    if label in ("Var. seed", "Var. strength") and settings.get("noise") is None:
        raise ValueError("a variation seed is A1111's noise: add --noise a1111 (or a1111-cpu)")
    if label == "Refiner switch at" and settings.get("refiner") is None:
        raise ValueError("no --refiner to switch to")
    if label in ("Sampler", "Hires sampler"):
        sampler_label(str(value))
    elif label == "Schedule type":
        value = canonical_schedule(str(value))
    elif label == "Hires upscaler":  # (a name, or an ESRGAN model file: checked here, loaded by the cell's run)
        from ..sd_upscale import pixel_upscaler

        chosen = pixel_upscaler("--hires-upscaler", str(value), HIRES_UPSCALER_LABELS)
        value = chosen if isinstance(chosen, str) else str(value)
    elif label == "Checkpoint name":
        value = checkpoint_by_name(str(value), beside=str(settings.get("model", "toy")), option="Checkpoint name")
    elif label == "Refiner checkpoint":
        value = None if str(value).strip().lower() in _AUTOMATIC else checkpoint_by_name(
            str(value), beside=str(settings.get("model", "toy")), option="Refiner checkpoint")
    elif label == "VAE":
        value = None if str(value).strip().lower() in _AUTOMATIC else checkpoint_by_name(
            str(value), beside=str(settings.get("vae") or settings.get("model", "toy")), option="VAE",
            suffixes=(".safetensors", ".ckpt", ".pt"))
    elif label == "RNG source":
        if str(value).lower() not in _RNG_SOURCES:
            raise ValueError(f"{value!r}: A1111's RNG sources are GPU, CPU and NV")
        value = _RNG_SOURCES[str(value).lower()]
    elif label in ("Always discard next-to-last sigma", "SGM noise multiplier"):
        value = str(value).lower() == "true"  # (A1111's apply_override(boolean=True))
    return {axis.option: value}


def _grid_infotext(text: str, fields: Mapping[str, str]) -> str:
    """A cell's infotext with A1111's X/Y/Z fields added where its ``extra_generation_params`` go: before
    ``Version`` (at the end when there is none)."""
    from .infotext import quote

    added = ", ".join(f"{key}: {quote(value)}" for key, value in fields.items())
    head, cut, tail = text.rpartition(", Version: ")
    return f"{head}, {added}{cut}{tail}" if cut else f"{text}, {added}"


def run_xyz_plot(axes: Sequence[tuple[str, str] | None], *, style_table: Mapping[str, object] | None = None,
                 legend: bool = True, keep_random_seeds: bool = False,
                 vary_seeds: Sequence[str] = (), sub_grids: bool = False, margin: int = 0,
                 font: str | os.PathLike | None = None, progress: Callable[..., None] | None = None,
                 log: Callable[[str], None] | None = None, **given: object) -> dict:
    """Run A1111's X/Y/Z plot: :func:`~sdadapt.jobs.generate.run_generate` once per cell with ``given`` (its
    arguments) changed by the cell's x, y and z values (:func:`xyz_cell_settings`), then the grid.

    Args:
        axes: up to three ``(A1111 axis label, values text)`` (``None``: "Nothing"), e.g.
            ``[("Steps", "10-30 (+10)"), ("CFG Scale", "5, 7.5"), None]``.
        legend: A1111's "Draw legend" (Pillow draws it: :func:`sdadapt.labelled_grid.annotate_grid`).
        keep_random_seeds: A1111's "Keep -1 for seeds": off, a seed -1 (the run's, a Seed axis's) is drawn once
            for every cell it applies to.
        vary_seeds: A1111's "Vary seeds for X/Y/Z" (``"x"``, ``"y"``, ``"z"``): the cell's seed plus its index
            along those axes (``ix + iy·nx + iz·nx·ny``, each term only for a varied axis).
        sub_grids: A1111's "Include Sub Grids": with several z values, each z's grid written too
            (``OUT-zNN.png``).
        margin: A1111's "Grid margins (px)", between the cells of a legend grid.
        font: a TrueType font for the legend (A1111's "Font for image grids"); default Pillow's.
        style_table: the saved styles a Styles axis names (:func:`sdadapt.prompt_styles.read_styles`).

    Cell ``k = ix + iy·nx + iz·nx·ny`` writes ``OUT-kk.png`` (``OUT-kk-ii.png`` for several images); the grid of
    their first images is ``out``, with the first cell's infotext and A1111's "Script", "X Type", "X Values" ...
    fields. Cells run in A1111's order (the costliest axis outermost: a checkpoint, a VAE).

    Returns:
        ``{"files": [grid, sub grids..., cells...], "grid": path, "cells": [each cell's run_generate result]}``.

    Raises:
        ValueError: an axis type or value not taken (:class:`XyzRun`), with another of A1111's scripts.
        FileExistsError: an output exists and ``overwrite`` is false (checked before anything runs).
        ImportError: ``legend`` without Pillow.
    """
    from ..images import numbered
    from ..labelled_grid import annotate_grid, cells_grid
    from ..xyz_plot import axis_label, cell_order
    from .generate_runs import (
        check_outputs_free,
        check_script_alone,
        cell_pictures,
        require_pillow,
        run_named,
        write_grid,
    )
    from .generate_seed import RANDOM_SEED, fixed_seed
    from .loaded_models import LoadedModels

    check_script_alone("--xyz-x", given)
    odd = [name for name in vary_seeds if name not in ("x", "y", "z")]
    if odd:
        raise ValueError(f"vary_seeds: {odd[0]!r}; the axes are 'x', 'y' and 'z'")
    if legend:
        require_pillow("the X/Y/Z plot's legend (or --xyz-no-legend)")
    if vary_seeds and keep_random_seeds and int(given.get("seed", 0)) == RANDOM_SEED:  # type: ignore[call-overload]
        raise ValueError("--xyz-vary-seeds with --xyz-keep-random-seeds and --seed -1: A1111 adds each cell's index "
                         "to the -1 itself (seeds 0, 1, ... after a random first one); give a seed, or leave one of "
                         "the two options out")
    run = XyzRun(axes, given, keep_random_seeds=keep_random_seeds, style_table=style_table)
    nx, ny, nz = run.lengths
    say = log if log is not None else (lambda _line: None)
    out = Path(str(given["out"]))
    count = int(given.get("count", 1))  # type: ignore[call-overload]
    cell_files = [numbered(out, k) for k in range(nx * ny * nz)]
    outputs = [out, *([out.with_name(f"{out.stem}-z{iz:02d}{out.suffix}") for iz in range(nz)] if sub_grids and nz > 1
                      else [])]
    for cell in cell_files:
        outputs += [cell] if count == 1 else [numbered(cell, i) for i in range(count)]
    check_outputs_free(outputs, overwrite=bool(given.get("overwrite")))
    seed = int(given.get("seed", 0))  # type: ignore[call-overload]
    if seed == RANDOM_SEED and not keep_random_seeds:  # (A1111's fix_seed: one seed for every cell)
        seed = fixed_seed(seed)
        say(f"--seed -1: drew {seed} for every cell (pass --seed {seed} to make the same grid again)")
    subseed = given.get("subseed")
    if subseed is not None and int(subseed) == RANDOM_SEED and not keep_random_seeds:  # type: ignore[call-overload]
        subseed = fixed_seed(RANDOM_SEED)  # (fix_seed fixes p.subseed too: one variation seed for every cell)
        given = {**given, "subseed": subseed}
        say(f"--subseed -1: drew {subseed} for every cell (pass --subseed {subseed} to make the same grid again)")
    say(f"X/Y/Z plot: {nx * ny * nz * count} images on {nz} {nx}x{ny} grid{'s' if nz > 1 else ''}"
        + (f"; {count} images per cell" if count > 1 else ""))
    loaded = LoadedModels()
    results: dict[int, dict] = {}
    order = cell_order(run.lengths, tuple(axis.cost for axis, _, _ in run.axes))  # type: ignore[arg-type]
    for done, (ix, iy, iz) in enumerate(order):
        index = ix + iy * nx + iz * nx * ny
        settings: dict[str, object] = {**given, "seed": seed}
        labels = []
        for position, ((axis, values, _), at) in enumerate(zip(run.axes, (ix, iy, iz))):
            settings.update(xyz_cell_settings(axis, values[at], values, settings, style_table=style_table))
            if axis.label != "Nothing":
                labels.append(axis_label(axis, values[at]) or f"{'xyz'[position]}={values[at]}")
        xdim, ydim = (nx if "x" in vary_seeds else 1), (ny if "y" in vary_seeds else 1)  # (A1111's cell())
        settings["seed"] = int(settings["seed"]) + sum(  # type: ignore[call-overload]
            step for name, step in (("x", ix), ("y", iy * xdim), ("z", iz * xdim * ydim)) if name in vary_seeds)
        settings["out"] = str(cell_files[index])
        say(f"cell {index}: {'; '.join(labels) or 'the run as given'}")
        results[index] = run_named(f"X/Y/Z cell {index} ({'; '.join(labels)})", settings, loaded=loaded, log=log)
        if progress is not None:
            progress(done + 1, len(order), cell_files[index].name)
    pictures, texts = cell_pictures(results[k] for k in range(nx * ny * nz))  # (a batch: its grid, as A1111's)
    x_labels = [axis_label(run.axes[0][0], value) for value in run.axes[0][1]]
    y_labels = [axis_label(run.axes[1][0], value) for value in run.axes[1][1]]
    z_labels = [axis_label(run.axes[2][0], value) for value in run.axes[2][1]]
    grids = []
    for iz in range(nz):
        cells = pictures[iz * nx * ny:(iz + 1) * nx * ny]
        grid = cells_grid(cells, rows=ny)
        if legend:
            grid = annotate_grid(grid, max(c.shape[1] for c in cells), max(c.shape[0] for c in cells), x_labels,
                                 y_labels, margin=margin, font=font)
        grids.append(grid)
    whole = cells_grid(grids, rows=1)
    if legend:
        whole = annotate_grid(whole, max(g.shape[1] for g in grids), max(g.shape[0] for g in grids), z_labels, [""],
                              font=font)
    written = [str(write_grid(out, whole, parameters=_grid_infotext(
        texts[0], run.fields(z=True, keep_random_seeds=keep_random_seeds)), given=given, say=say))]
    if sub_grids and nz > 1:
        for iz, grid in enumerate(grids):
            written.append(str(write_grid(outputs[1 + iz], grid, parameters=_grid_infotext(
                texts[iz * nx * ny], run.fields(z=False, keep_random_seeds=keep_random_seeds)), given=given, say=say)))
    cells_written = [file for k in range(nx * ny * nz) for file in results[k]["files"]]
    return {"files": written + cells_written, "grid": written[0], "cells": [results[k] for k in range(nx * ny * nz)]}
