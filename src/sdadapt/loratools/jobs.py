"""LoRA tools on files: extract from two checkpoints, resize a LoRA, merge LoRAs into a checkpoint,
combine LoRAs into one.

Each job reads lazily (:func:`sdadapt.merge.sources.open_source`: one tensor at a time), checks its
output before doing any work (exists → needs ``overwrite=True``; not enough free disk space →
error naming both numbers), and writes atomically (a temporary file in the target folder, renamed
at the end). LoRAs are written in kohya format (:func:`sdadapt.formats.save_kohya`) with per-layer
alphas, which kohya, A1111, ComfyUI and diffusers load; the math lives in
:mod:`~sdadapt.loratools.extract`, :mod:`~sdadapt.loratools.resize` and
:mod:`~sdadapt.loratools.combine`.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ..formats import WeightFileError, load_lora, save_kohya
from ..formats.files import read_safetensors_header, sniff_format
from ..formats.kohya import BASE_MODELS
from ..formats.layers import group_by_layer
from .block_weights import expand_block_weights, lora_block_weight_fn
from .checkpoint_layers import LayerSlot, checkpoint_layers, detect_base_model, is_lora_target
from .combine import add_delta, combine_lora_states, layer_delta
from .extract import RANK_METHODS, extract_layer
from .resize import resize_lora_state

if TYPE_CHECKING:
    from ..merge.sources import TensorSource

__all__ = [
    "LayerReport",
    "LoRAJobReport",
    "MergeReport",
    "extract_lora",
    "resize_lora",
    "merge_loras_into_checkpoint",
    "combine_loras",
    "check_output",
    "lora_base_model",
]

#: ``progress(done, total, label)``; called after each unit of work
Progress = Callable[[int, int, str], None]

_SAVE_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LayerReport:
    """One written layer: rank, alpha and the Frobenius error it carries (before clamping)."""

    rank: int
    alpha: float
    residual_norm: float
    norm: float


@dataclass
class LoRAJobReport:
    """What an extract/resize/combine job wrote.

    Attributes:
        path: the output file.
        base_model: ``"sd1"``, ``"sd2"``, ``"sd2-v"`` or ``"sdxl"`` (decides the kohya naming).
        layers: ``{"component:layer": LayerReport}``.
        skipped: ``{"component:layer": reason}`` — layers (or whole text encoders) not written.
    """

    path: Path
    base_model: str
    layers: dict[str, LayerReport] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


@dataclass
class MergeReport:
    """What :func:`merge_loras_into_checkpoint` wrote: ``{checkpoint key: number of deltas}`` and
    the LoRA layers that matched no checkpoint tensor (only when ``skip_unmatched=True``)."""

    path: Path
    merged: dict[str, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- checks
def check_output(path: str | os.PathLike, *, overwrite: bool, needed_bytes: int) -> Path:
    """Refuse an existing output (unless ``overwrite``), a missing folder, or too little disk space.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is false.
        WeightFileError: the folder does not exist, or has less than ``needed_bytes`` free (the
            temporary file is written beside the target, so an overwrite needs the full size too).
    """
    target = Path(path)
    if target.suffix.lower() != ".safetensors":
        raise WeightFileError(f"{target}: sdadapt writes .safetensors files only; name the output *.safetensors")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target}: already exists; pass --overwrite (overwrite=True) to replace it")
    if target.is_dir():
        raise WeightFileError(f"{target}: is a folder; give a file name such as {target / 'out.safetensors'}")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise WeightFileError(f"{target}: folder {folder} does not exist; create it first")
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise WeightFileError(
            f"{target}: not enough disk space in {folder}: the output needs about "
            f"{needed_bytes / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; free some space or write elsewhere"
        )
    return target


def _check_inputs(*paths: str | os.PathLike) -> None:
    for path in paths:
        if not Path(path).exists():
            raise WeightFileError(f"{path}: no such file")


def _check_method(method: str, param: float | None) -> None:
    if method not in RANK_METHODS:
        raise ValueError(f"rank method must be one of {RANK_METHODS}, got {method!r}")
    if method != "fixed" and param is None:
        raise ValueError(f"rank method {method!r} needs its parameter (dynamic_param / --dynamic-param)")


def _check_base_model(base_model: str | None) -> None:
    if base_model is not None and base_model not in BASE_MODELS:
        raise ValueError(f"base_model must be one of {sorted(BASE_MODELS)}, got {base_model!r}")


def _check_dtype(dtype: torch.dtype | None) -> None:
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"save dtype must be float32, float16 or bfloat16 (or None), got {dtype}")


def lora_base_model(path: str | os.PathLike, components: Mapping[str, object], metadata: Mapping[str, str]) -> str:
    """SD1/SD2/SDXL of a LoRA file: kohya metadata, else its key naming (LDM UNet names or a
    second text encoder mean SDXL), else ``"sd1"`` (SD1 and SD2 files are named alike)."""
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl"):
        return "sdxl"
    if version == "sd_v2_v":
        return "sd2-v"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    if "text_encoder_2" in components:
        return "sdxl"
    if sniff_format(path) == "safetensors":
        keys, _ = read_safetensors_header(path)
        if any(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block")) for k in keys):
            return "sdxl"
    return "sd1"


def _weight_bytes(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n * item
    return total


# -------------------------------------------------------------------------------- extraction
def _slot_shape(shape: tuple[int, ...], slot: LayerSlot) -> tuple[int, ...]:
    if slot.rows is None:
        return shape
    return (slot.rows[1] - slot.rows[0], *shape[1:])


def extract_lora(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int = 4,
    conv_rank: int | None = None,
    alpha: float | None = None,
    conv_alpha: float | None = None,
    method: str = "fixed",
    param: float | None = None,
    clamp_quantile: float | None = 0.99,
    min_diff: float = 0.01,
    min_layer_diff: float = 0.0,
    split: str = "up",
    randomized: bool = False,
    niter: int = 2,
    device: str | torch.device | None = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> LoRAJobReport:
    """Extract a LoRA (``tuned − base``) from two checkpoints and write it in kohya format.

    Targets are kohya's: every Linear / 1x1 conv in the UNet's transformer blocks, and the text
    encoders' q/k/v/out and MLP layers; with ``conv_rank`` also the resnets, down- and upsamplers
    (LoCon; kxk convs get ``conv_rank``/``conv_alpha``).

    Args:
        base, tuned: LDM single-file checkpoints (``.safetensors`` or ``.ckpt``) or diffusers UNet
            files, same architecture.
        rank: fixed rank, or the cap of a dynamic ``method`` (``sv_ratio``/``sv_cumulative``/
            ``sv_fro`` with ``param``).
        alpha: alpha to write (default ``alpha = rank`` of each layer, scale 1).
        clamp_quantile: kohya's outlier clamp (0.99); ``None``/1.0 disables it.
        min_diff: a text encoder whose largest ``|Δ|`` is at most this is left out entirely
            (kohya's rule and default: text encoders barely change in most fine-tunes).
        min_layer_diff: any layer whose largest ``|Δ|`` is at most this is left out (default 0:
            only identical layers).
        randomized, niter: randomized SVD (:func:`torch.svd_lowrank`) for speed on big layers.
        device: run the SVDs there (e.g. ``"cuda"``); default ``"cuda"`` when available.
        base_model: kohya naming/metadata; default detected from the checkpoint's keys.
        dtype: dtype of the written factors (default float32; alphas are always float32).

    Returns:
        :class:`LoRAJobReport` (ranks, alphas, truncation errors, skipped layers).

    Raises:
        WeightFileError: missing/unreadable inputs, different architectures (lists the keys),
            nothing to extract, not enough disk space.
        FileExistsError: ``out`` exists and ``overwrite`` is false.
    """
    from ..merge.sources import open_source

    _check_method(method, param)
    _check_dtype(dtype)
    _check_base_model(base_model)
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise ValueError(f"ranks must be >= 1, got rank={rank}, conv_rank={conv_rank}")
    _check_inputs(base, tuned)
    check_output(out, overwrite=overwrite, needed_bytes=0)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    with open_source(base) as base_src, open_source(tuned) as tuned_src:
        base_shapes = {k: tuple(base_src.shape(k)) for k in base_src.keys()}
        tuned_shapes = {k: tuple(tuned_src.shape(k)) for k in tuned_src.keys()}
        base_layers = checkpoint_layers(base_shapes)
        tuned_layers = checkpoint_layers(tuned_shapes)
        if not base_layers:
            sample = ", ".join(list(base_shapes)[:5])
            raise WeightFileError(
                f"{base}: no UNet or text-encoder weights found (keys look like: {sample}); expected an LDM "
                "checkpoint (model.diffusion_model.*, cond_stage_model.*, conditioner.*) or a diffusers UNet file"
            )
        _check_same_architecture(base, tuned, base_layers, tuned_layers, base_shapes, tuned_shapes)
        model = base_model or detect_base_model(base_shapes)
        conv = conv_rank is not None
        todo = [
            (name, slot)
            for name, slot in base_layers.items()
            if is_lora_target(slot.component, slot.layer, _slot_shape(base_shapes[slot.key], slot), conv=conv)
        ]
        if not todo:
            raise WeightFileError(f"{base}: none of its layers is a LoRA target (attention/MLP Linear layers)")
        report = LoRAJobReport(path=Path(out), base_model=model)
        components: dict[str, dict[str, Tensor]] = {}
        max_diff: dict[str, float] = {}
        cache: dict[str, tuple[Tensor, Tensor]] = {}
        for done, ((component, layer), slot) in enumerate(todo, 1):
            base_w, tuned_w = _read_pair(base_src, tuned_src, slot, tuned_layers[(component, layer)], cache)
            diff = float((tuned_w.float() - base_w.float()).abs().max()) if base_w.numel() else 0.0
            max_diff[component] = max(max_diff.get(component, 0.0), diff)
            name = f"{component}:{layer}"
            if diff <= min_layer_diff:
                report.skipped[name] = f"max |Δ| = {diff:.3g} <= min_layer_diff {min_layer_diff:g}"
            else:
                is_kxk = base_w.dim() == 4 and base_w.shape[2] * base_w.shape[3] > 1
                extracted = extract_layer(
                    base_w, tuned_w,
                    rank=conv_rank if is_kxk and conv_rank is not None else rank,
                    alpha=conv_alpha if is_kxk and conv_alpha is not None else alpha,
                    method=method, param=param, clamp_quantile=clamp_quantile, split=split,  # type: ignore[arg-type]
                    randomized=randomized, niter=niter, device=device,
                )
                state = components.setdefault(component, {})
                write_dtype = dtype or torch.float32
                state[f"{layer}.lora_down.weight"] = extracted.down.to(write_dtype)
                state[f"{layer}.lora_up.weight"] = extracted.up.to(write_dtype)
                state[f"{layer}.alpha"] = torch.tensor(extracted.alpha, dtype=torch.float32)
                report.layers[name] = LayerReport(extracted.rank, extracted.alpha, extracted.residual_norm, extracted.norm)
            if progress is not None:
                progress(done, len(todo), layer)
    for component, largest in max_diff.items():
        if component.startswith("text_encoder") and largest <= min_diff and component in components:
            for layer_key in [k for k in components[component] if k.endswith(".alpha")]:
                name = f"{component}:{layer_key[: -len('.alpha')]}"
                report.layers.pop(name, None)
                report.skipped[name] = f"text encoder unchanged: its max |Δ| = {largest:.3g} <= min_diff {min_diff:g}"
            del components[component]
    if not components:
        raise WeightFileError(
            f"{tuned}: no layer differs from {base} by more than the thresholds (min_diff={min_diff:g}, "
            f"min_layer_diff={min_layer_diff:g}); is it really a fine-tune of that base?"
        )
    meta = {
        "ss_training_comment": f"extracted by sdadapt from {Path(tuned).name} - {Path(base).name}",
        "sdadapt.extract": json.dumps(
            {"rank": rank, "conv_rank": conv_rank, "alpha": alpha, "conv_alpha": conv_alpha, "method": method,
             "param": param, "clamp_quantile": clamp_quantile, "min_diff": min_diff, "split": split,
             "randomized": randomized}
        ),
    }
    if method != "fixed":
        meta.update({"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"})
    needed = sum(t.numel() * t.element_size() for s in components.values() for t in s.values()) + 2**20
    check_output(out, overwrite=overwrite, needed_bytes=needed)
    save_kohya(out, components, base_model=model, metadata=meta)
    return report


def _check_same_architecture(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    base_layers: Mapping[tuple[str, str], LayerSlot],
    tuned_layers: Mapping[tuple[str, str], LayerSlot],
    base_shapes: Mapping[str, tuple[int, ...]],
    tuned_shapes: Mapping[str, tuple[int, ...]],
) -> None:
    problems: list[str] = []
    for name, slot in base_layers.items():
        other = tuned_layers.get(name)
        if other is None:
            problems.append(f"{slot.key} (in {Path(base).name} only)")
        elif _slot_shape(base_shapes[slot.key], slot) != _slot_shape(tuned_shapes[other.key], other):
            problems.append(
                f"{slot.key}: shape {_slot_shape(base_shapes[slot.key], slot)} vs {_slot_shape(tuned_shapes[other.key], other)}"
            )
    for name, slot in tuned_layers.items():
        if name not in base_layers:
            problems.append(f"{slot.key} (in {Path(tuned).name} only)")
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise WeightFileError(
            f"{base} and {tuned} are different architectures ({len(problems)} layer(s) differ):\n  "
            + "\n  ".join(problems[:10]) + more
            + "\nExtract from a fine-tune of the same base model (SD1 vs SD2 vs SDXL, same UNet/text encoders)."
        )


def _read_pair(
    base_src: TensorSource, tuned_src: TensorSource, slot: LayerSlot, tuned_slot: LayerSlot, cache: dict
) -> tuple[Tensor, Tensor]:
    """Base and tuned weights of one layer (fused in_proj weights are read once for q, k and v)."""
    if slot.key not in cache:
        cache.clear()
        cache[slot.key] = (base_src.get(slot.key), tuned_src.get(tuned_slot.key))
    base_w, tuned_w = cache[slot.key]
    if slot.rows is not None:
        base_w = base_w[slot.rows[0] : slot.rows[1]]
        tuned_w = tuned_w[tuned_slot.rows[0] : tuned_slot.rows[1]]  # type: ignore[index]
    return base_w, tuned_w


# ------------------------------------------------------------------------------------ resize
def _load_components(path: str | os.PathLike) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    _check_inputs(path)
    components, metadata = load_lora(path)
    if "model" in components:
        raise WeightFileError(
            f"{path}: a peft adapter without pipeline components; the LoRA tools need a kohya or diffusers "
            "pipeline LoRA (unet / text_encoder layers)"
        )
    return components, metadata


_REGENERATED = {
    "ss_network_dim", "ss_network_alpha", "ss_network_args", "modelspec.date", "modelspec.implementation_version",
    "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256",
}


def resize_lora(
    lora: str | os.PathLike,
    out: str | os.PathLike,
    *,
    rank: int,
    conv_rank: int | None = None,
    method: str = "fixed",
    param: float | None = None,
    clamp_quantile: float | None = None,
    split: str = "up",
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> LoRAJobReport:
    """Resize every layer of a LoRA file to ``rank`` (or a dynamic rank) keeping ``alpha / rank``.

    Args:
        lora: kohya or diffusers LoRA file.
        rank: new rank (cap for dynamic ``method``) for Linear/1x1 layers; ``conv_rank`` for kxk
            convs (default ``rank``).
        base_model: naming of the output; default from the file's metadata/keys.
        dtype: dtype of the written factors (default: each layer's own).

    Returns:
        :class:`LoRAJobReport` with each layer's new rank, alpha and the error it added.
    """
    _check_method(method, param)
    _check_dtype(dtype)
    _check_base_model(base_model)
    components, metadata = _load_components(lora)
    check_output(out, overwrite=overwrite, needed_bytes=0)
    model = base_model or lora_base_model(lora, components, metadata)
    report = LoRAJobReport(path=Path(out), base_model=model)
    resized: dict[str, dict[str, Tensor]] = {}
    for done, (component, state) in enumerate(components.items(), 1):
        new_state, layers = resize_lora_state(
            state, rank=rank, conv_rank=conv_rank, method=method, param=param,
            clamp_quantile=clamp_quantile, split=split, dtype=dtype,  # type: ignore[arg-type]
        )
        resized[component] = new_state
        for layer, info in layers.items():
            report.layers[f"{component}:{layer}"] = LayerReport(info.rank, info.alpha, info.residual_norm, info.norm)
        if progress is not None:
            progress(done, len(components), component)
    kept = {k: v for k, v in metadata.items() if k not in _REGENERATED}
    note = f"resized by sdadapt to rank {rank}" + (f" ({method} {param})" if method != "fixed" else "")
    kept["ss_training_comment"] = note + (f"; {metadata['ss_training_comment']}" if metadata.get("ss_training_comment") else "")
    if method != "fixed":
        kept.update({"ss_network_dim": "Dynamic", "ss_network_alpha": "Dynamic"})
    needed = sum(t.numel() * t.element_size() for s in resized.values() for t in s.values()) + 2**20
    check_output(out, overwrite=overwrite, needed_bytes=needed)
    save_kohya(out, resized, base_model=model, metadata=kept, title=kept.get("modelspec.title"))
    return report


# --------------------------------------------------------------------------------- combining
def combine_loras(
    loras: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    strengths: Sequence[float] | float = 1.0,
    mode: str = "concat",
    rank: int | None = None,
    conv_rank: int | None = None,
    method: str = "fixed",
    param: float | None = None,
    clamp_quantile: float | None = None,
    base_model: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> LoRAJobReport:
    """Combine several LoRA files into one that applies ``Σ s_i Δ_i`` (see
    :func:`sdadapt.loratools.combine.combine_lora_states`): ``mode="concat"`` exact (rank = sum of
    ranks), ``mode="svd"`` re-compressed to ``rank``."""
    _check_method(method, param)
    _check_dtype(dtype)
    _check_base_model(base_model)
    if not loras:
        raise ValueError("combine_loras needs at least one LoRA file")
    values = _per_file(strengths, len(loras), "strength")
    loaded = [_load_components(path) for path in loras]
    check_output(out, overwrite=overwrite, needed_bytes=0)
    models = {lora_base_model(p, c, m) for p, (c, m) in zip(loras, loaded)}
    if base_model is None and len(models) > 1:
        raise WeightFileError(f"the LoRAs are for different base models ({sorted(models)}); combine LoRAs of one model")
    model = base_model or models.pop()
    names = sorted({c for components, _ in loaded for c in components})
    combined: dict[str, dict[str, Tensor]] = {}
    for component in names:
        present = [(c[component], s) for (c, _), s in zip(loaded, values) if component in c]
        combined[component] = combine_lora_states(
            [p[0] for p in present], [p[1] for p in present], mode=mode, rank=rank, conv_rank=conv_rank,  # type: ignore[arg-type]
            method=method, param=param, clamp_quantile=clamp_quantile, dtype=dtype,
        )
    report = LoRAJobReport(path=Path(out), base_model=model)
    meta = {
        "ss_training_comment": "combined by sdadapt: "
        + ", ".join(f"{s:g} x {Path(p).name}" for p, s in zip(loras, values)) + f" ({mode})",
    }
    needed = sum(t.numel() * t.element_size() for s in combined.values() for t in s.values()) + 2**20
    check_output(out, overwrite=overwrite, needed_bytes=needed)
    save_kohya(out, combined, base_model=model, metadata=meta)
    return report


def _per_file(values: Sequence[float] | float, count: int, what: str) -> list[float]:
    if isinstance(values, (int, float)):
        return [float(values)] * count
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"give one {what} for all LoRAs or one per LoRA: {count} LoRAs, {len(values)} {what}s")
    return values


# --------------------------------------------------------------------------- merge into checkpoint
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
) -> MergeReport:
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

    _check_dtype(dtype)
    if not loras:
        raise ValueError("merge needs at least one LoRA file")
    values = _per_file(strengths, len(loras), "strength")
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
    _check_inputs(base, *loras)
    check_output(out, overwrite=overwrite, needed_bytes=0)
    loaded = [_load_components(path)[0] for path in loras]
    report = MergeReport(path=Path(out))
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
                    problem = _shape_problem(tensors, _slot_shape(shapes[slot.key], slot), slot)
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
            needed_bytes=sum(_weight_bytes({k: s}, out_dtypes[k]) for k, s in shapes.items()) + 2**20,
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
