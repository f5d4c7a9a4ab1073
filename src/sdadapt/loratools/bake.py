"""Bake LoRAs into a checkpoint: ``W ← W + Σ_i s_i · b_i(layer) · Δ_i`` for every matched weight."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import Tensor

from ..formats import WeightFileError
from ..formats.layers import group_by_layer
from .block_weights import expand_block_weights, lora_block_weight_fn
from .checkpoint_layers import LayerSlot, checkpoint_layers, detect_base_model
from .combine import add_delta, layer_delta
from .output import (
    BakeReport,
    Progress,
    check_inputs,
    check_output,
    check_save_dtype,
    load_components,
    per_file,
    slot_shape,
    weight_bytes,
)

__all__ = ["merge_loras_into_checkpoint"]


def merge_loras_into_checkpoint(
    base: str | os.PathLike,
    loras: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    strengths: Sequence[float] | float = 1.0,
    block_weights: Sequence[Sequence[float] | None] | None = None,
    dtype: torch.dtype | None = None,
    skip_unmatched: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> BakeReport:
    """Bake LoRAs into a checkpoint: ``W ← W + Σ_i s_i · b_i(layer) · Δ_i`` for every matched weight.

    Streams ``base`` one tensor at a time; each touched tensor is merged in float32 and cast once
    (to its own dtype, or ``dtype``). UNet layers are matched through the LDM <-> diffusers naming,
    text encoders through the CLIP/OpenCLIP naming (q/k/v onto the thirds of a fused
    ``in_proj_weight``). Keys, order and untouched tensors of ``base`` are kept.

    Args:
        loras: kohya or diffusers LoRA files.
        strengths: one multiplier for all LoRAs or one per LoRA.
        block_weights: per LoRA, ``None`` or a LoRA block-weight vector (kohya's LBW: 12/20 values
            for SDXL, 17/26 for SD1/SD2; see :mod:`sdadapt.loratools.block_weights`).
        dtype: cast floating tensors of the output (default: keep each tensor's dtype).
        skip_unmatched: merge what matches and report the rest, instead of raising.

    Raises:
        WeightFileError: LoRA layers that match no checkpoint tensor (lists them), missing files,
            not enough disk space.
        FileExistsError: ``out`` exists and ``overwrite`` is false.
    """
    from ..merge.sources import open_source
    from ..merge.writer import write_streaming

    check_save_dtype(dtype)
    if not loras:
        raise ValueError("merge needs at least one LoRA file")
    values = per_file(strengths, len(loras), "strength")
    vectors: list[Sequence[float] | None] = [None] * len(loras)
    if block_weights is not None:
        if len(block_weights) not in (1, len(loras)):
            raise ValueError(
                f"give one block-weight vector for all LoRAs or one per LoRA: {len(loras)} LoRAs, "
                f"{len(block_weights)} vectors"
            )
        vectors = list(block_weights) * (len(loras) if len(block_weights) == 1 else 1)
        for vector in vectors:
            if vector is not None:
                expand_block_weights(vector)  # the length check, before any file is read
    check_inputs(base, *loras)
    check_output(out, overwrite=overwrite, needed_bytes=0)
    loaded = [load_components(path)[0] for path in loras]
    report = BakeReport(path=Path(out))
    with open_source(base) as src:
        shapes = {k: tuple(src.shape(k)) for k in src.keys()}
        slots = checkpoint_layers(shapes)
        model = detect_base_model(shapes)
        # checkpoint key -> [(lora index, component, layer, tensors, strength, rows)]
        plan: dict[str, list[tuple[Mapping[str, Tensor], float, slice | None, str]]] = {}
        unmatched: list[str] = []
        mismatched: list[str] = []
        for index, (path, components, strength, vector) in enumerate(zip(loras, loaded, values, vectors)):
            weigh = _block_weigher(vector, model)
            for component, state in components.items():
                for layer, tensors in group_by_layer(state).items():
                    slot = slots.get((component, layer))
                    if slot is None:
                        unmatched.append(f"{Path(path).name}: {component}:{layer}")
                        continue
                    problem = _shape_problem(tensors, slot_shape(shapes[slot.key], slot), slot)
                    if problem:
                        mismatched.append(f"{Path(path).name}: {component}:{layer}: {problem}")
                        continue
                    factor = strength * weigh(component, layer)
                    if factor == 0.0:
                        continue
                    plan.setdefault(slot.key, []).append((tensors, factor, slot.row_slice(), f"{component}:{layer}"))
        if mismatched:
            more = f"\n  ... and {len(mismatched) - 10} more" if len(mismatched) > 10 else ""
            raise WeightFileError(
                f"{len(mismatched)} LoRA layer(s) do not fit the shapes of {base}:\n  " + "\n  ".join(mismatched[:10])
                + more + "\nThe LoRA was made for a different model (SD1 vs SD2 vs SDXL, or another fine-tune size)."
            )
        if unmatched and not skip_unmatched:
            more = f"\n  ... and {len(unmatched) - 10} more" if len(unmatched) > 10 else ""
            raise WeightFileError(
                f"{len(unmatched)} LoRA layer(s) match no tensor of {base}:\n  " + "\n  ".join(unmatched[:10]) + more
                + "\nIs the LoRA for this model (SD1 vs SD2 vs SDXL; a UNet-only file has no text encoder)? "
                "Pass --skip-unmatched (skip_unmatched=True) to merge the layers that do match."
            )
        report.unmatched = unmatched
        out_dtypes = {k: (dtype if dtype is not None and src.dtype(k).is_floating_point else src.dtype(k)) for k in shapes}
        check_output(
            out, overwrite=overwrite,
            needed_bytes=sum(weight_bytes({k: s}, out_dtypes[k]) for k, s in shapes.items()) + 2**20,
        )
        total = len(shapes)

        def tensors():
            for done, key in enumerate(shapes, 1):
                value = src.get(key)
                entries = plan.get(key)
                if entries:
                    deltas = [(layer_delta(t, name=name), f, rows) for t, f, rows, name in entries]
                    value = add_delta(value, deltas, dtype=out_dtypes[key], name=key)
                    report.merged[key] = len(entries)
                elif value.dtype != out_dtypes[key]:
                    value = value.to(out_dtypes[key])
                if progress is not None:
                    progress(done, total, key)
                yield key, value

        metadata = dict(src.metadata or {})
        metadata["sdadapt.merge_lora"] = json.dumps(
            {
                "base": Path(base).name,
                "loras": [
                    {"name": Path(p).name, "strength": s, "block_weights": list(v) if v is not None else None}
                    for p, s, v in zip(loras, values, vectors)
                ],
            }
        )
        write_streaming(
            out, {k: (out_dtypes[k], shapes[k]) for k in shapes}, tensors(), metadata=metadata, overwrite=overwrite
        )
    return report


def _shape_problem(tensors: Mapping[str, Tensor], want: tuple[int, ...], slot: LayerSlot) -> str | None:
    """Why a LoRA layer cannot be added to a weight of shape ``want`` (``None`` if it can)."""
    down, up = tensors.get("lora_down.weight"), tensors.get("lora_up.weight")
    if down is None or up is None:
        return f"has {sorted(tensors)}, not lora_down/lora_up (only LoRA/LoCon layers can be merged)"
    implied = (int(up.shape[0]), *(int(d) for d in down.shape[1:]))
    numel = 1
    for d in implied:
        numel *= d
    wanted = 1
    for d in want:
        wanted *= d
    if implied[0] != want[0] or numel != wanted:
        return f"LoRA delta {implied} vs {slot.key} {want}"
    return None


def _block_weigher(vector: Sequence[float] | None, model: str) -> Callable[[str, str], float]:
    """``(component, layer) -> weight`` for a LoRA block-weight vector (1.0 everywhere when ``None``)."""
    if vector is None:
        return lambda component, layer: 1.0
    return lora_block_weight_fn(list(vector), model)
