"""What a merged file keeps of its inputs' own metadata: the fields that say what model it is.

A merge writes new tensors with A1111's ``sd_merge_recipe`` / ``sd_merge_models`` and sdadapt's
recipe (:mod:`.recipe`); without more, the fields a loader reads to know the model are lost —
``modelspec.prediction_type = v`` above all: an SD2 768-v merge read back as epsilon samples noise
(sdadapt's single-file reader, :class:`sdadapt.formats.single_file.SingleFile`, decides the
prediction type from it; ComfyUI and the SAI ModelSpec readers too). They are taken from the first
input, which decides the output's keys, naming and dtypes (A1111's "copy metadata" lets later inputs win
instead: an inpainting add-difference, A = the inpainting model, would then be described as C, its base;
supermerger copies none). A value another input contradicts is reported, never silently mixed. One
exception: a first input that says nothing of its prediction type while every other input says the same
one (``v``) gives the merge that one, with a note — a v model is not silently turned into epsilon.

Only model-describing fields travel: ``modelspec.architecture``, ``.implementation``,
``.sai_model_spec``, ``.prediction_type``, ``.resolution`` and ``sdadapt.configs`` (the exact
component configs). Titles, authors, hashes, training metadata and licences describe the input, not
the merge, and are left out.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = ["INHERITED_FIELDS", "inherited_metadata"]

#: the input metadata a merge carries over (from the first input)
INHERITED_FIELDS: tuple[str, ...] = (
    "modelspec.sai_model_spec",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.prediction_type",
    "modelspec.predict_key",  # (ComfyUI's spelling of the prediction, which the single-file reader reads too)
    "modelspec.resolution",
    "sdadapt.configs",
)


def inherited_metadata(
    inputs: Sequence[tuple[str, Mapping[str, str]]],
) -> tuple[dict[str, str], list[str]]:
    """The model-describing metadata of a merge of ``inputs`` and what the report should say about it.

    Args:
        inputs: ``(name, metadata)`` per input file, the first input first (names only label notes).

    Returns:
        ``(fields, notes)``: the :data:`INHERITED_FIELDS` the first input has, with its values; one note
        per field another input gives a different value (or, for ``modelspec.prediction_type``, omits
        while the first says ``v``: a loader then takes it for epsilon — worth a look).
    """
    if not inputs:
        return {}, []
    first_name, first = inputs[0]
    fields = {k: first[k] for k in INHERITED_FIELDS if isinstance(first.get(k), str)}
    notes = []
    prediction = "modelspec.prediction_type"
    others = {meta.get(prediction) for _, meta in inputs[1:]}
    if prediction not in fields and len(inputs) > 1 and len(others) == 1 and isinstance(next(iter(others)), str):
        fields[prediction] = next(iter(others))
        notes.append(f"{prediction}: {first_name} has none; every other input says {fields[prediction][:40]}, "
                     "so the merge says so too")
    for key in INHERITED_FIELDS:
        if key == "sdadapt.configs" or (key == prediction and key not in first and key in fields):
            continue  # (JSON text: spelled differently for the same configs; the architecture check covers it)
        mine = first.get(key)
        other = sorted({f"{name}: {meta.get(key, 'none')}" for name, meta in inputs[1:] if meta.get(key) != mine
                        and (meta.get(key) is not None or key == "modelspec.prediction_type")})
        if other:
            shown = "; ".join(o[:80] for o in other[:3])
            notes.append(f"{key}: kept {first_name}'s {str(mine)[:40] if mine is not None else 'none'}; other inputs "
                         f"say {shown}")
    return fields, notes
