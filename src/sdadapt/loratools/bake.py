"""Bake adapter files into a checkpoint: ``W ← W + Σ_i s_i · b_i(layer) · Δ_i`` for every matched weight.

Every family a file can hold (LoRA/LoCon, LoHa, LoKr, Tucker variants, full ``diff``/``diff_b``,
DoRA over any of them) goes through the one delta path,
:func:`sdadapt.adapters.registry.file_layer_delta` — the code ``inject``/``apply_lora`` run — with
``scale = strength × block weight`` (each layer's module is built once, when the layer is checked,
and its delta computed from it: :func:`~sdadapt.adapters.registry.adapter_layer_delta`). For DoRA that moves the weight towards DoRA's ``W'``:
``W + s · (W' − W)``. Bias deltas (``diff_b``) go to the layer's ``.bias`` tensor.

Memory. The modules keep the file's dtype (an fp16 file's layers hold its size, not twice it): each
``get`` computes on a float32 working copy of the one module it needs
(:func:`~sdadapt.adapters.registry.adapter_working_copy`), dropped after. Peak: the file's layers,
the checkpoint tensor being merged (float32) and one layer's float32 working set; one ``aminmax``
per tensor finds NaN/inf and the output dtype's overflow (:func:`~sdadapt.checks.nonfinite_scan`).

Order. Additive families commute; DoRA does not (its ``W'`` depends on the weight it adapts). The
files are applied in the order given, each DoRA layer on the weight *with the earlier files'
deltas already in it* — so ``merge-lora BASE A B`` equals ``apply_lora`` of A, then of B, on the
loaded model (up to the one final cast).

The baked checkpoint is a lazy source (:class:`BakedCheckpoint`, the merge engine's ``Source``
API) written by the engine's own writer, :func:`sdadapt.merge.engine.write_source`: one tensor in
memory at a time.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..adapters.base import AdapterModule, LayerGeometry
from ..adapters.input_pad import ChannelPadAdapter, is_inpainting_conv_in_delta
from ..adapters.registry import (
    adapter_from_file_tensors,
    adapter_layer_delta,
    adapter_working_copy,
    weight_shape_of_file_tensors,
)
from ..checks import cast_checked, check_result, finite_numbers, nonfinite_scan
from ..errors import InputError
from ..formats import WeightFileError
from ..formats.clip_keys import SD2_UNUSED_FROM_LAYER, encoder_layer_index
from ..formats.layers import group_by_layer
from ..merge.model_metadata import inherited_metadata
from .block_weights import expand_block_weights, lora_block_weight_fn
from .checkpoint_layers import LayerSlot, checkpoint_layers, detect_base_model, unet_layers_per_block
from .output import (
    BakeReport,
    Progress,
    check_inputs,
    check_not_input,
    check_output,
    check_save_dtype,
    load_components,
    per_file,
    same_layer_shape,
    slot_shape,
    weight_bytes,
)

__all__ = ["BakedCheckpoint", "merge_loras_into_checkpoint"]


@dataclass(frozen=True)
class _Entry:
    """One file layer scheduled onto one checkpoint tensor (and its bias)."""

    module: AdapterModule  # the family's module, built once from the layer's file tensors (their dtype; never moved)
    scale: float  # strength × block weight
    rows: slice | None  # the rows of a fused weight (OpenCLIP in_proj), None = all
    uses_base: bool  # the family reads the base weight (DoRA)
    name: str  # "file: component:layer" for messages


class BakedCheckpoint:
    """A checkpoint with adapter files baked in, as a lazy source: ``keys()``, ``shape``, ``dtype``, ``get``.

    Every layer of every file is matched and checked when the object is built (nothing is computed
    yet); ``get(key)`` reads that key from ``base`` and adds the deltas scheduled on it, in float32
    (float64 stays float64), cast once to the output dtype. Keys, shapes and order are ``base``'s.
    Write it with :func:`sdadapt.merge.engine.write_source`, or feed it to a merge step.

    Args:
        base: checkpoint (LDM single file, diffusers UNet file; ``.safetensors`` or legacy).
        loras: adapter files (kohya, LyCORIS or diffusers) of any family.
        strengths: one multiplier for all files or one per file.
        block_weights: per file, ``None`` or a LoRA block-weight vector (see
            :mod:`sdadapt.loratools.block_weights`); checked before any file is read.
        dtype: output dtype of floating tensors (default: each tensor's own).
        skip_unmatched: leave out layers that match no checkpoint tensor (listed in ``report``)
            instead of raising.
        allow_nonfinite: let NaN/inf already in ``base`` pass through (default: ``get`` refuses
            them); NaN/inf the deltas produce (e.g. an alpha of 1e38) is always refused.

    Attributes:
        report: :class:`~sdadapt.loratools.output.BakeReport` (``merged`` fills as keys are computed).

    Raises:
        WeightFileError: layers that match no tensor, or that do not fit their tensor (shapes,
            no family, a bias delta without a bias) — every such layer listed in one message.
    """

    def __init__(
        self,
        base: str | os.PathLike,
        loras: Sequence[str | os.PathLike],
        *,
        strengths: Sequence[float] | float = 1.0,
        block_weights: Sequence[Sequence[float] | None] | None = None,
        dtype: torch.dtype | None = None,
        skip_unmatched: bool = False,
        allow_nonfinite: bool = False,
    ) -> None:
        from ..merge.sources import open_source

        self.allow_nonfinite = allow_nonfinite
        check_save_dtype(dtype)
        if not loras:
            raise InputError("merge needs at least one LoRA file")
        self.strengths = per_file(strengths, len(loras), "strength")
        self.block_weights = _vectors(block_weights, len(loras))
        check_inputs(base, *loras)
        self.loras = [Path(p) for p in loras]
        self.path = Path(base)
        self.report = BakeReport(path=Path(f"<baked {self.path.name}>"))
        self._source = open_source(base)
        try:
            self._shapes = {k: tuple(self._source.shape(k)) for k in self._source.keys()}
            # LDM-named LoRA layers (SDXL kohya files) map with the checkpoint's own UNet layout
            layers = unet_layers_per_block(list(self._shapes))
            loaded = [load_components(path, layers_per_block=layers)[0] for path in loras]
            self._dtypes = {
                k: (dtype if dtype is not None and self._source.dtype(k).is_floating_point else self._source.dtype(k))
                for k in self._shapes
            }
            self._plan, self._bias_plan = self._schedule(loaded, skip_unmatched)
        except BaseException:
            self._source.close()
            raise
        # the fields that say what model it is (as a merge keeps them: sdadapt.merge.model_metadata); the base's title,
        # hashes and training keys describe other bytes (kohya's merge_lora.py writes fresh metadata too)
        self.metadata, _ = inherited_metadata([(self.path.name, dict(self._source.metadata or {}))])
        self.metadata["sdadapt.merge_lora"] = json.dumps(
            {
                "base": self.path.name,
                "loras": [
                    {"name": p.name, "strength": s, "block_weights": list(v) if v is not None else None}
                    for p, s, v in zip(self.loras, self.strengths, self.block_weights)
                ],
            }
        )

    # ------------------------------------------------------------------------------ planning
    def _schedule(
        self, loaded: Sequence[Mapping[str, Mapping[str, Tensor]]], skip_unmatched: bool
    ) -> tuple[dict[str, list[_Entry]], dict[str, list[_Entry]]]:
        slots = checkpoint_layers(self._shapes, norms=True)  # LyCORIS norm modules' 1-D weights too
        model = detect_base_model(self._shapes)
        plan: dict[str, list[_Entry]] = {}
        bias_plan: dict[str, list[_Entry]] = {}
        unmatched: list[str] = []
        unused: list[str] = []  # (SD2 text-encoder layers the base does not hold and SD2 never reads: reported)
        problems: list[str] = []
        for path, components, strength, vector in zip(self.loras, loaded, self.strengths, self.block_weights):
            weigh = _block_weigher(vector, model)
            for component, state in components.items():
                layers = group_by_layer(state)
                state.clear()  # (each layer's tensors are dropped once its module holds them)
                for layer in list(layers):
                    tensors = layers.pop(layer)
                    label = f"{path.name}: {component}:{layer}"
                    slot = slots.get((component, layer))
                    if slot is None:
                        if model == "sd2" and component == "text_encoder" and (
                                encoder_layer_index(layer) or 0) >= SD2_UNUSED_FROM_LAYER:
                            unused.append(label)  # (a base without OpenCLIP's last layer: SD2 never reads it)
                        else:
                            unmatched.append(label)
                        continue
                    checked = self._check_layer(tensors, slot, f"{component}:{layer}")
                    if isinstance(checked, str):
                        problems.append(f"{path.name}: {checked}")
                        continue
                    module, bias_key = checked
                    scale = strength * weigh(component, layer)
                    if scale == 0.0:
                        continue
                    entry = _Entry(module, scale, slot.row_slice(), module.uses_base_weight, label)
                    plan.setdefault(slot.key, []).append(entry)
                    if bias_key is not None:
                        bias_plan.setdefault(bias_key, []).append(entry)
        # (the advice comes before the list: the command line prints one line of at most 2000 characters)
        if problems:
            raise WeightFileError(
                f"{len(problems)} LoRA layer(s) do not fit the shapes of {self.path}: the LoRA was made for a different "
                f"model ({self.path.name} looks like an {model.upper()} checkpoint; SD1 vs SD2 vs SDXL, or another "
                f"fine-tune size):{_first(problems)}"
            )
        if unmatched and not skip_unmatched:
            raise WeightFileError(
                f"{len(unmatched)} LoRA layer(s) match no tensor of {self.path}. Is the LoRA for this model (SD1 vs SD2 "
                "vs SDXL; a UNet-only file has no text encoder)? Pass --skip-unmatched (skip_unmatched=True) to merge "
                f"the layers that do match:{_first(unmatched)}"
            )
        self.report.unmatched = unmatched + unused
        return plan, bias_plan

    def _check_layer(
        self, tensors: Mapping[str, Tensor], slot: LayerSlot, name: str
    ) -> tuple[AdapterModule, str | None] | str:
        """``(the family's module, bias key or None)`` of a layer on its slot, or why it does not fit.

        The family decides (its ``from_file_tensors`` raises for tensors that do not fit); the module
        it builds (CPU, the file's dtype) is the one :meth:`get` computes the delta from (on a float32
        working copy: the module itself keeps the file's dtype). A file
        layer saved Linear for a 1x1 convolution (or the reverse) takes the file's own geometry and
        its delta is reshaped onto the tensor.
        """
        want = slot_shape(self._shapes[slot.key], slot)
        try:
            implied = weight_shape_of_file_tensors(tensors, name=name)
        except ValueError as exc:
            return str(exc)
        bias_key = _bias_key(slot.key)
        padded = None  # (a plain model's 4-channel conv_in delta on an inpainting model's 9-channel conv_in)
        if implied is not None and not same_layer_shape(implied, want):
            layer = LayerGeometry.from_weight_shape(tuple(want), has_bias=bias_key in self._shapes)
            try:  # zero-padded 4 -> 9 input channels, as apply_lora and A1111 (sdadapt.adapters.input_pad)
                fits = is_inpainting_conv_in_delta(tensors, layer, slot.key.removesuffix(".weight"))
            except ValueError as exc:
                return str(exc)
            if not fits:
                return f"{name}: delta {implied} vs {slot.key} {want}"
            padded = layer
        shape = implied if implied is not None else want
        try:
            geometry = LayerGeometry.from_weight_shape(tuple(shape), has_bias=bias_key in self._shapes)
            module = adapter_from_file_tensors(geometry, dict(tensors), name=name)
            module = module if padded is None else ChannelPadAdapter(module, padded)
            has_bias_delta = module.bias_delta() is not None
        except ValueError as exc:
            return f"{exc!s} (checkpoint tensor {slot.key} {want})"
        if not has_bias_delta:
            return module, None
        if bias_key not in self._shapes:
            return f"{name}: has a bias delta but the checkpoint has no {bias_key}"
        return module, bias_key

    # ------------------------------------------------------------------------------ source API
    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: object) -> bool:
        return key in self._shapes

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def get(self, key: str) -> Tensor:
        """``key``'s tensor with its scheduled deltas added (CPU, output dtype)."""
        value = self._source.get(key)
        entries, bias_entries = self._plan.get(key, []), self._bias_plan.get(key, [])
        if not entries and not bias_entries:
            extremes = None
            if not self.allow_nonfinite:
                nonfinite, extremes = nonfinite_scan(value)  # (the range serves cast_checked's overflow check)
                if nonfinite:
                    check_result(value, key=key, inputs=[value], what=f"{self.path.name}'s tensor")
            return cast_checked(value, self._dtypes[key], key=key, hint="write float32 (--dtype fp32)",
                                extremes=extremes)
        compute = torch.float64 if value.dtype == torch.float64 else torch.float32
        merged = value.to(compute, copy=True)
        for entry in entries:
            target = merged if entry.rows is None else merged[entry.rows]
            # DoRA sees the weight with the earlier files' deltas in it (apply_lora in turn)
            # (a float32 working copy of the module: the entry's keeps the file's dtype, see the module doc)
            delta, _ = adapter_layer_delta(  # (consumable: a full delta scales its float32 copy in place)
                adapter_working_copy(entry.module, compute, consumable=True), base_weight=target if entry.uses_base else None,
                scale=entry.scale, dtype=compute, name=entry.name,
            )
            target.add_(delta.reshape(target.shape))  # type: ignore[union-attr]
            del delta
        for entry in bias_entries:  # (Δb reads no base weight: the family's bias_delta takes none)
            _, bias = adapter_layer_delta(
                adapter_working_copy(entry.module, compute, vectors_only=True), scale=entry.scale, dtype=compute,
                name=entry.name, weight=False,  # (only the vectors in float32: no copy of a full delta's diff)
            )
            target = merged if entry.rows is None else merged[entry.rows]
            target.add_(bias.reshape(target.shape))  # type: ignore[union-attr]
        self.report.merged[key] = len(entries) + len(bias_entries)
        nonfinite, extremes = nonfinite_scan(merged)  # (one pass: the NaN/inf check and cast_checked's range)
        if nonfinite:
            names = ", ".join(entry.name for entry in entries + bias_entries)
            check_result(merged, key=key, inputs=[value], allow_nonfinite=self.allow_nonfinite,
                         what=f"the merged weight ({names})",
                         hint="the LoRA's deltas overflow (check its alphas and the --scale)")
        return cast_checked(merged, self._dtypes[key], key=key,
                            hint="write float32 (--dtype fp32) or lower --scale", extremes=extremes)

    def planned_bytes(self) -> int:
        """Bytes of the tensors the output file will hold."""
        return sum(weight_bytes({k: s}, self._dtypes[k]) for k, s in self._shapes.items())

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> BakedCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
    allow_nonfinite: bool = False,
) -> BakeReport:
    """Bake adapter files of any family into a checkpoint: ``W ← W + Σ_i s_i · b_i(layer) · Δ_i``.

    Streams ``base`` one tensor at a time; each touched tensor is merged in float32 and cast once
    (to its own dtype, or ``dtype``). UNet layers are matched through the LDM <-> diffusers naming,
    text encoders through the CLIP/OpenCLIP naming (q/k/v onto the thirds of a fused
    ``in_proj_weight``). Keys and untouched tensors of ``base`` are kept. DoRA layers see the
    weight with the earlier files' deltas in it (see the module doc).

    Args:
        loras: kohya, LyCORIS or diffusers adapter files (LoRA/LoCon, LoHa, LoKr, full, DoRA ...).
        strengths: one multiplier for all files or one per file.
        block_weights: per file, ``None`` or a LoRA block-weight vector (kohya's LBW: 12/20 values
            for SDXL, 17/26 for SD1/SD2; see :mod:`sdadapt.loratools.block_weights`); the family's
            delta is computed at ``strength × block weight``.
        dtype: cast floating tensors of the output (default: keep each tensor's dtype).
        skip_unmatched: merge what matches and report the rest, instead of raising.
        allow_nonfinite: let NaN/inf already in ``base`` pass through (default: refused).

    Raises:
        WeightFileError: layers that match no checkpoint tensor or do not fit it (lists them),
            missing files.
        InputError: a strength that is not finite or beyond ±100; ``out`` is one of the inputs.
        NonFiniteError: a merged tensor would hold NaN/inf or overflow ``dtype`` (names the key).
        OutputExistsError: ``out`` exists and ``overwrite`` is false (also if it appears meanwhile).
        DiskSpaceError: not enough disk space.
    """
    from ..merge.engine import write_source

    check_save_dtype(dtype)
    if not loras:
        raise InputError("merge needs at least one LoRA file")
    per_file(strengths, len(loras), "strength")
    _vectors(block_weights, len(loras))  # the length checks, before any file is read
    check_inputs(base, *loras)
    check_output(out, overwrite=overwrite, needed_bytes=0)
    check_not_input(out, base, *loras)
    with BakedCheckpoint(
        base, loras, strengths=strengths, block_weights=block_weights, dtype=dtype, skip_unmatched=skip_unmatched,
        allow_nonfinite=allow_nonfinite,
    ) as baked:
        baked.report.path = Path(out)
        check_output(out, overwrite=overwrite, needed_bytes=baked.planned_bytes() + 2**20)
        write_source(out, baked, overwrite=overwrite, progress=progress)
        return baked.report


def _first(lines: Sequence[str], count: int = 5) -> str:
    """The first ``count`` of ``lines`` as an indented list, and how many more there are."""
    more = f"\n  ... and {len(lines) - count} more" if len(lines) > count else ""
    return "\n  " + "\n  ".join(lines[:count]) + more


def _vectors(
    block_weights: Sequence[Sequence[float] | None] | None, count: int
) -> list[Sequence[float] | None]:
    """One block-weight vector (or ``None``) per file; each vector's length checked."""
    if block_weights is None:
        return [None] * count
    if len(block_weights) not in (1, count):
        raise ValueError(
            f"give one block-weight vector for all LoRAs or one per LoRA: {count} LoRAs, "
            f"{len(block_weights)} vectors"
        )
    vectors = list(block_weights) * (count if len(block_weights) == 1 else 1)
    for vector in vectors:
        if vector is not None:
            finite_numbers(vector, name="block weight", low=-100.0, high=100.0)
            expand_block_weights(vector)
    return vectors


def _bias_key(weight_key: str) -> str:
    """``x.weight`` -> ``x.bias``; OpenCLIP's fused ``in_proj_weight`` -> ``in_proj_bias``."""
    if weight_key.endswith("_weight"):
        return weight_key[: -len("_weight")] + "_bias"
    return weight_key[: -len("weight")] + "bias" if weight_key.endswith("weight") else weight_key + ".bias"


def _block_weigher(vector: Sequence[float] | None, model: str) -> Callable[[str, str], float]:
    """``(component, layer) -> weight`` for a LoRA block-weight vector (1.0 everywhere when ``None``)."""
    if vector is None:
        return lambda component, layer: 1.0
    return lora_block_weight_fn(list(vector), model)
