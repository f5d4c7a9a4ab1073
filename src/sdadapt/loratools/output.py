"""What every LoRA file job shares: output checks, input checks, reports, the base-model guess.

Each job reads lazily (:func:`sdadapt.merge.sources.open_source`: one tensor at a time), checks its
output before doing any work (exists → needs ``overwrite=True``; not enough free disk space →
error naming both numbers), and writes atomically (a temporary file in the target folder, renamed
at the end). LoRAs are written in kohya format (:func:`sdadapt.formats.save_kohya`) with per-layer
alphas, which kohya, A1111, ComfyUI and diffusers load.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..formats import WeightFileError, load_lora
from ..formats.files import read_safetensors_header, sniff_format
from ..formats.kohya import BASE_MODELS
from .checkpoint_layers import LayerSlot

__all__ = [
    "Progress",
    "LayerReport",
    "LoRAJobReport",
    "BakeReport",
    "check_output",
    "check_inputs",
    "check_base_model",
    "check_save_dtype",
    "lora_base_model",
    "load_components",
    "per_file",
    "slot_shape",
    "weight_bytes",
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
class BakeReport:
    """What :func:`sdadapt.loratools.bake.merge_loras_into_checkpoint` wrote: ``{checkpoint key: number of deltas}`` and
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


def check_inputs(*paths: str | os.PathLike) -> None:
    for path in paths:
        if not Path(path).exists():
            raise WeightFileError(f"{path}: no such file")


def check_base_model(base_model: str | None) -> None:
    if base_model is not None and base_model not in BASE_MODELS:
        raise ValueError(f"base_model must be one of {sorted(BASE_MODELS)}, got {base_model!r}")


def check_save_dtype(dtype: torch.dtype | None) -> None:
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


def weight_bytes(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n * item
    return total


def load_components(path: str | os.PathLike) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    check_inputs(path)
    components, metadata = load_lora(path)
    if "model" in components:
        raise WeightFileError(
            f"{path}: a peft adapter without pipeline components; the LoRA tools need a kohya or diffusers "
            "pipeline LoRA (unet / text_encoder layers)"
        )
    return components, metadata


def per_file(values: Sequence[float] | float, count: int, what: str) -> list[float]:
    if isinstance(values, (int, float)):
        return [float(values)] * count
    values = [float(v) for v in values]
    if len(values) == 1:
        return values * count
    if len(values) != count:
        raise ValueError(f"give one {what} for all LoRAs or one per LoRA: {count} LoRAs, {len(values)} {what}s")
    return values


def slot_shape(shape: tuple[int, ...], slot: LayerSlot) -> tuple[int, ...]:
    if slot.rows is None:
        return shape
    return (slot.rows[1] - slot.rows[0], *shape[1:])
