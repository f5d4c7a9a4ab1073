"""A1111's "X/Y/Z plot" script (``scripts/xyz_grid.py``, A1111 1.10 and Forge): the axes' values as A1111 reads
them, the runs' order and seeds, and the grid it draws.

The pure parts, torch-free: :func:`csv_values` and :func:`axis_values` (A1111's ``process_axis``: ``1-5``,
``1-9 (+2)``, ``0-1 [5]``), :data:`XYZ_AXES` (every axis type by its A1111 label, what it sets), :func:`prompt_sr`
and :func:`prompt_order` (the two prompt axes), :func:`cell_order` (A1111's loop nesting by cost). The grid is
:mod:`sdadapt.labelled_grid`'s; :mod:`sdadapt.jobs.generate_xyz` runs it (``generate --xyz-x TYPE VALUES``).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import os
import re
from collections.abc import Sequence

import numpy as np

__all__ = [
    "XYZ_AXES",
    "XyzAxis",
    "axis_label",
    "axis_values",
    "cell_order",
    "csv_values",
    "find_axis",
    "prompt_order",
    "prompt_sr",
]


@dataclasses.dataclass(frozen=True)
class XyzAxis:
    """One of A1111's axis types: its ``label``, how a value reads (``kind``: ``"int"``, ``"float"``, ``"str"`` or
    ``"permutations"``), the :func:`~sdadapt.jobs.generate.run_generate` argument it sets (``option``; ``None`` for
    the axes the runner handles itself: ``Nothing``, the prompt axes, ``Size``, ``Denoising``), A1111's ``cost``
    (a slow axis loops outermost) and how A1111 labels its values (``legend``: ``"label"`` ``"Steps: 20"``,
    ``"value"`` ``20``, ``"join"`` ``"a, b"``, ``"basename"``, ``"nothing"``)."""

    label: str
    kind: str
    option: str | None
    cost: float = 0.0
    legend: str = "label"


#: A1111 1.10's axis types that sdadapt runs, by label (its ``axis_options``)
XYZ_AXES: dict[str, XyzAxis] = {axis.label: axis for axis in (
    XyzAxis("Nothing", "str", None, legend="nothing"),
    XyzAxis("Seed", "int", "seed"),
    XyzAxis("Var. seed", "int", "subseed"),
    XyzAxis("Var. strength", "float", "subseed_strength"),
    XyzAxis("Steps", "int", "steps"),
    XyzAxis("Hires steps", "int", "hires_steps"),
    XyzAxis("CFG Scale", "float", "guidance"),
    XyzAxis("Prompt S/R", "str", None, legend="value"),
    XyzAxis("Prompt order", "permutations", None, legend="join"),
    XyzAxis("Sampler", "str", "sampler", legend="value"),
    XyzAxis("Hires sampler", "str", "hires_sampler"),
    XyzAxis("Checkpoint name", "str", "model", cost=1.0, legend="basename"),
    XyzAxis("Negative Guidance minimum sigma", "float", "ngms"),
    XyzAxis("Sigma Churn", "float", "sigma_churn"),
    XyzAxis("Sigma min", "float", "sigma_tmin"),
    XyzAxis("Sigma max", "float", "sigma_tmax"),
    XyzAxis("Sigma noise", "float", "sigma_noise"),
    XyzAxis("Schedule type", "str", "schedule"),
    XyzAxis("Schedule min sigma", "float", "sigma_min"),
    XyzAxis("Schedule max sigma", "float", "sigma_max"),
    XyzAxis("Schedule rho", "float", "rho"),
    XyzAxis("Beta schedule alpha", "float", "beta_alpha"),
    XyzAxis("Beta schedule beta", "float", "beta_beta"),
    XyzAxis("Eta", "float", "eta"),
    XyzAxis("Clip skip", "int", "clip_skip"),
    XyzAxis("Denoising", "float", None),
    XyzAxis("Initial noise multiplier", "float", "noise_multiplier"),
    XyzAxis("Extra noise", "float", "extra_noise"),
    XyzAxis("Hires upscaler", "str", "hires_upscaler"),
    XyzAxis("Cond. Image Mask Weight", "float", "inpainting_mask_weight"),
    XyzAxis("VAE", "str", "vae", cost=0.7),
    XyzAxis("Token merging ratio", "float", "token_merging_ratio"),
    XyzAxis("Token merging ratio high-res", "float", "token_merging_ratio_hr"),
    XyzAxis("Always discard next-to-last sigma", "str", "always_discard_next_to_last_sigma"),
    XyzAxis("SGM noise multiplier", "str", "sgm_noise_multiplier"),
    XyzAxis("Refiner checkpoint", "str", "refiner", cost=1.0, legend="basename"),
    XyzAxis("Refiner switch at", "float", "refiner_switch_at"),
    XyzAxis("RNG source", "str", "noise"),
    XyzAxis("Size", "str", None),
    XyzAxis("Styles", "str", "styles"),
)}

#: A1111's axis types sdadapt does not run, and why
_NOT_HERE = {
    "Image CFG Scale": "instruct-pix2pix models are not run here",
    "UniPC Order": "UniPC's order is not a setting here",
    "Face restore": "face restoration (GFPGAN / CodeFormer) is not in sdadapt",
    "FP8 mode": "fp8 weight storage is not a generate setting here",
    "Distilled CFG Scale": "Forge's distilled CFG is for Flux models, which are not run here",
}

# A1111's re_range, re_range_float, re_range_count, re_range_count_float
_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
_RANGE_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)(?:\s*\(([+-]\d+(?:.\d*)?)\s*\))?\s*")
_RANGE_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
_RANGE_COUNT_FLOAT = re.compile(r"\s*([+-]?\s*\d+(?:.\d*)?)\s*-\s*([+-]?\s*\d+(?:.\d*)?)"
                                r"(?:\s*\[(\d+(?:.\d*)?)\s*])?\s*")


def find_axis(label: str) -> XyzAxis:
    """The axis type of A1111's ``label`` (case and repeated blanks ignored).

    Raises:
        ValueError: a label A1111 has and sdadapt does not run (why), or one A1111 does not have (the labels listed).
    """
    wanted = " ".join(label.split()).casefold()
    for name, axis in XYZ_AXES.items():
        if name.casefold() == wanted:
            return axis
    for name, why in _NOT_HERE.items():
        if name.casefold() == wanted:
            raise ValueError(f"X/Y/Z axis {name!r}: {why}")
    raise ValueError(f"X/Y/Z axis {label!r}: no such axis type; A1111's types run here: {', '.join(XYZ_AXES)}")


def csv_values(text: str) -> list[str]:
    """A1111's ``csv_string_to_list_strip``: ``text`` as one CSV record (quotes keep commas), each value stripped.

    ``'a, "b, c", d'`` -> ``["a", "b, c", "d"]``.
    """
    return [value.strip() for row in csv.reader(io.StringIO(text), skipinitialspace=True) for value in row]


def _int(text: str) -> int:
    return int(text)  # (A1111's int(): "+ 5" is refused, as there)


def axis_values(axis: XyzAxis, text: str) -> list:
    """An axis's values from A1111's "X values" text, as its ``process_axis`` reads them.

    ``int``: each value, or a range ``1-5`` (both ends), ``1-9 (+2)`` (a step), ``1-10 [4]`` (a count,
    ``np.linspace`` truncated to int); ``float``: ``0.5-1.5 (+0.5)`` (``np.arange(start, end + step, step)``),
    ``0-1 [5]`` (``np.linspace``), a bare ``a-b`` with step 1; ``permutations``: every order of the values
    (``itertools.permutations``); ``str``: the values. Empty values are dropped (numbers) or kept (text), as there.

    Raises:
        ValueError: a value that is no number for a number axis, or no values.
    """
    if axis.label == "Nothing":
        return [0]
    values: list = csv_values(text)
    if axis.kind in ("int", "float"):
        plain, step_range, count_range = ((int, _RANGE, _RANGE_COUNT) if axis.kind == "int" else
                                          (float, _RANGE_FLOAT, _RANGE_COUNT_FLOAT))
        expanded: list = []
        for value in values:
            if value.strip() == "":
                continue
            stepped, counted = step_range.fullmatch(value), count_range.fullmatch(value)
            try:
                if stepped is not None and axis.kind == "int":
                    step = int(stepped.group(3)) if stepped.group(3) is not None else 1
                    expanded += list(range(int(stepped.group(1)), int(stepped.group(2)) + 1, step))
                elif stepped is not None:
                    start, end = float(stepped.group(1)), float(stepped.group(2))
                    step = float(stepped.group(3)) if stepped.group(3) is not None else 1
                    expanded += np.arange(start, end + step, step).tolist()
                elif counted is not None:
                    num = int(counted.group(3)) if counted.group(3) is not None else 1
                    spaced = np.linspace(start=plain(counted.group(1)), stop=plain(counted.group(2)), num=num)
                    expanded += [int(x) for x in spaced.tolist()] if axis.kind == "int" else spaced.tolist()
                else:
                    expanded.append(plain(value))
            except ValueError:
                raise ValueError(f"X/Y/Z axis {axis.label!r}: {value!r} is no {'whole ' if axis.kind == 'int' else ''}"
                                 "number, nor a range (1-5, 1-9 (+2), 0-1 [5])") from None
        values = expanded
    elif axis.kind == "permutations":
        values = list(itertools.permutations(values))
    if not values:
        raise ValueError(f"X/Y/Z axis {axis.label!r}: no values in {text!r}")
    return values


def axis_label(axis: XyzAxis, value: object) -> str:
    """A1111's legend text for ``value`` (``format_value_add_label`` and its kin): ``"Steps: 20"``,
    ``"CFG Scale: 7.5"`` (floats rounded to 8 places), a Prompt S/R value as it is, a permutation joined by
    ``", "``, a checkpoint's file name, ``""`` for Nothing."""
    if axis.legend == "nothing":
        return ""
    if axis.legend == "join":
        return ", ".join(value)  # type: ignore[arg-type]
    if axis.legend == "basename":
        return os.path.basename(str(value))
    if type(value) is float:
        value = round(value, 8)
    return str(value) if axis.legend == "value" else f"{axis.label}: {value}"


def prompt_sr(prompt: str, negative: str, value: str, first: str) -> tuple[str, str]:
    """A1111's Prompt S/R (``apply_prompt``): ``first`` (the axis's first value) replaced by ``value`` everywhere in
    the prompt and the negative prompt.

    Raises:
        ValueError: ``first`` in neither (A1111's "Prompt S/R did not find ...").
    """
    if first not in prompt and first not in negative:
        raise ValueError(f"Prompt S/R did not find {first} in prompt or negative prompt.")
    return prompt.replace(first, value), negative.replace(first, value)


def prompt_order(prompt: str, order: Sequence[str]) -> str:
    """A1111's Prompt order (``apply_order``): the pieces ``order`` names, found in ``prompt`` (each its first
    place, earliest first), put back in ``order``'s order; the text around them kept."""
    found = sorted(((prompt.find(piece), piece) for piece in order), key=lambda item: item[0])
    parts = []
    for _, piece in found:
        at = prompt.find(piece)
        parts.append(prompt[0:at])
        prompt = prompt[at + len(piece):]
    return "".join(part + order[i] for i, part in enumerate(parts)) + prompt


def cell_order(lengths: tuple[int, int, int], costs: tuple[float, float, float]) -> list[tuple[int, int, int]]:
    """The cells ``(ix, iy, iz)`` in the order A1111 runs them: the costliest axis (a checkpoint, a VAE) outermost,
    then the next (A1111's ``first_axes_processed`` / ``second_axes_processed``; by default z, then y, then x)."""
    cx, cy, cz = costs
    first, second = 2, 1
    if cx > cy and cx > cz:
        first, second = 0, (1 if cy > cz else 2)
    elif cy > cx and cy > cz:
        first, second = 1, (0 if cx > cz else 2)
    elif cz > cx and cz > cy:
        first, second = 2, (0 if cx > cy else 1)
    third = 3 - first - second
    cells = []
    for a in range(lengths[first]):
        for b in range(lengths[second]):
            for c in range(lengths[third]):
                index = [0, 0, 0]
                index[first], index[second], index[third] = a, b, c
                cells.append((index[0], index[1], index[2]))
    return cells
