"""What every LoRA file job shares: output checks, input checks, reports, the base-model guess.

Each job reads lazily (:func:`sdadapt.merge.sources.open_source`: one tensor at a time), checks its
output before doing any work (exists → needs ``overwrite=True``; not enough free disk space →
error naming both numbers), and writes atomically (a temporary file in the target folder, renamed
at the end). LoRAs are written in kohya format (:func:`sdadapt.formats.save_kohya`) with per-layer
alphas, which kohya, A1111, ComfyUI and diffusers load.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..checks import finite_numbers
from ..errors import InputError, NonFiniteError, ResourceError, SdadaptError
from ..formats import WeightFileError, load_lora
from ..formats.files import check_input_file, check_output_file, read_safetensors_header, sniff_format
from ..formats.kohya import BASE_MODELS, metadata_base_model
from ..adapters.base import LayerGeometry
from .checkpoint_layers import LayerSlot, checkpoint_layers, unet_layers_per_block

__all__ = [
    "Progress",
    "context_widths",
    "LayerReport",
    "LoRAJobReport",
    "BakeReport",
    "check_output",
    "check_inputs",
    "check_not_input",
    "layer_errors",
    "MAX_LORA_STRENGTH",
    "check_base_model",
    "check_save_dtype",
    "lora_base_model",
    "load_components",
    "per_file",
    "slot_shape",
    "weight_bytes",
    "BaseLayers",
    "base_layers_per_block",
    "same_layer_shape",
    "layer_geometry",
]

#: ``progress(done, total, label)``; called after each unit of work
Progress = Callable[[int, int, str], None]

_SAVE_DTYPES = (None, torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LayerReport:
    """One written layer: rank, alpha, ``residual_norm`` = ``‖Δ − (alpha/r)·up⋅down‖_F`` of the factors
    as written (after any clamp and the cast to the file's dtype) and ``norm`` = ``‖Δ‖_F``."""

    rank: int
    alpha: float
    residual_norm: float
    norm: float


@dataclass
class LoRAJobReport:
    """What an extract/resize/combine job wrote.

    Attributes:
        path: the output file (``None``: nothing written, :func:`~sdadapt.loratools.extract.extract_lora_state`).
        base_model: ``"sd1"``, ``"sd2"``, ``"sd2-v"`` or ``"sdxl"`` (decides the kohya naming).
        layers: ``{"component:layer": LayerReport}``.
        skipped: ``{"component:layer": reason}`` — layers (or whole text encoders) not written.
    """

    path: Path | None
    base_model: str
    layers: dict[str, LayerReport] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def worst_layer(self) -> tuple[str, float] | None:
        """The layer with the largest relative error ``‖Δ − LoRA‖_F / ‖Δ‖_F`` and that error (``None``: no layers)."""
        if not self.layers:
            return None
        name, info = max(self.layers.items(), key=lambda kv: kv[1].residual_norm / max(kv[1].norm, 1e-30))
        return name, info.residual_norm / max(info.norm, 1e-30)


@dataclass
class BakeReport:
    """What :func:`sdadapt.loratools.bake.merge_loras_into_checkpoint` wrote: ``{checkpoint key: number of deltas}`` and
    the LoRA layers that matched no checkpoint tensor (only when ``skip_unmatched=True``)."""

    path: Path
    merged: dict[str, int] = field(default_factory=dict)
    unmatched: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------- checks
#: the package's one output check (:func:`sdadapt.formats.files.check_output_file`): refuses an
#: existing output (unless ``overwrite``), a non-``.safetensors`` name, a folder, a missing folder,
#: or less than ``needed_bytes`` free disk space
check_output = check_output_file


def check_inputs(*paths: str | os.PathLike) -> None:
    """Every path is a readable, non-empty regular file (else a :class:`WeightFileError` saying what it is)."""
    for path in paths:
        if Path(path).is_dir() and (Path(path) / "adapter_model.safetensors").is_file():
            continue  # a peft adapter folder (load_lora reads it)
        check_input_file(path)


def check_not_input(out: str | os.PathLike, *inputs: str | os.PathLike | None) -> None:
    """Refuse an output path that is one of the inputs (``--overwrite`` would replace an input)."""
    target = Path(out)
    if not target.exists():
        return
    for path in inputs:
        if path is not None and Path(path).exists() and os.path.samefile(path, target):
            raise InputError(f"{target}: is also an input ({path}); write the output to another file")


@contextmanager
def layer_errors(source: str | os.PathLike, layer: str) -> Iterator[None]:
    """Errors while computing one layer, as one line naming the file and the layer.

    Tensors that do not fit together (a rank that does not match, shapes torch cannot multiply)
    become :class:`WeightFileError`; an SVD that does not converge (NaN/inf or extreme values) a
    :class:`NonFiniteError`; torch running out of memory a :class:`ResourceError`.
    """
    try:
        yield
    except SdadaptError as exc:
        text = str(exc)
        if str(source) in text:
            raise
        text = text.removeprefix(f"{layer}: ")  # (a message that names the layer already: named once)
        raise type(exc)(f"{source}: layer {layer}: {text}") from None
    except torch.linalg.LinAlgError as exc:
        raise NonFiniteError(f"{source}: layer {layer}: the SVD did not converge ({_first_line(exc)}); the weights "
                             "hold NaN/inf or extreme values") from None
    except ValueError as exc:  # the families' own checks: the message says what does not fit
        raise WeightFileError(f"{source}: layer {layer}: {_first_line(exc)}") from None
    except (IndexError, RuntimeError) as exc:  # torch refusing shapes that cannot be multiplied
        text = _first_line(exc)
        if isinstance(exc, RuntimeError) and ("memory" in text.lower() or "alloc" in text.lower()):
            raise ResourceError(f"{source}: layer {layer}: out of memory ({text})") from None
        raise WeightFileError(f"{source}: layer {layer}: its tensors do not fit together ({text}); the file is "
                              "corrupt or not what it claims") from None


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + "...") if len(text) > 300 else (text or type(exc).__name__)


def check_base_model(base_model: str | None) -> None:
    if base_model is not None and base_model not in BASE_MODELS:
        raise InputError(f"base_model must be one of {sorted(BASE_MODELS)}, got {base_model!r}")


def check_save_dtype(dtype: torch.dtype | None) -> None:
    if dtype not in _SAVE_DTYPES:
        raise InputError(f"save dtype must be float32, float16 or bfloat16 (or None), got {dtype}")


def lora_base_model(path: str | os.PathLike, components: Mapping[str, object], metadata: Mapping[str, str]) -> str:
    """SD1/SD2/SDXL of a LoRA file: kohya metadata, else its key naming (LDM UNet names or a
    second text encoder mean SDXL), else ``"sd1"`` (SD1 and SD2 files are named alike)."""
    told = metadata_base_model(metadata)
    if told is not None:
        return told
    if "text_encoder_2" in components:
        return "sdxl"
    if sniff_format(path) == "safetensors":
        keys, _ = read_safetensors_header(path)
        if any(k.startswith(tuple(f"{p}_{b}" for p in ("lora_unet", "oft_unet")
                                    for b in ("input_blocks", "output_blocks", "middle_block"))) for k in keys):
            return "sdxl"
    if 2048 in context_widths({name: state for name, state in components.items() if isinstance(state, Mapping)}):
        return "sdxl"  # (a diffusers-named UNet LoRA without metadata: SDXL's cross-attention context)
    return "sd1"


def context_widths(components: Mapping[str, Mapping[str, Tensor]]) -> set[int]:
    """In-features of the layers that read the text encoder's width: UNet cross-attention
    ``attn2.to_k``/``to_v`` and the first text encoder's attention projections (SD1 768, SD2 1024,
    SDXL context 2048; a first text encoder of 768 is SD1's or SDXL's CLIP-L, so not counted);
    layers whose file tensors cannot tell a shape are skipped."""
    from ..adapters.registry import weight_shape_of_file_tensors
    from ..formats.layers import group_by_layer

    widths: set[int] = set()
    for component, state in components.items():
        if component not in ("unet", "text_encoder"):
            continue
        ends = (".attn2.to_k", ".attn2.to_v") if component == "unet" else (".self_attn.q_proj", ".self_attn.k_proj")
        for layer, tensors in group_by_layer(state).items():
            if layer.endswith(ends):
                try:
                    shape = weight_shape_of_file_tensors(tensors, name=layer)
                except ValueError:
                    continue
                if shape is not None and len(shape) >= 2 and (component == "unet" or shape[1] != 768):
                    widths.add(int(shape[1]))
    return widths


def weight_bytes(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> int:
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n * item
    return total


def load_components(
    path: str | os.PathLike, *, layers_per_block: int = 2
) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """A LoRA file's ``({component: canonical state}, metadata)``; LDM-named UNet layers (SDXL kohya
    files) are mapped with ``layers_per_block`` (the base checkpoint's, see :func:`base_layers_per_block`).

    Raises:
        WeightFileError: a missing or unreadable file, or a peft adapter without pipeline components.
    """
    check_inputs(path)
    components, metadata = load_lora(path, layers_per_block=layers_per_block)
    if "model" in components:
        raise WeightFileError(
            f"{path}: a peft adapter without pipeline components; the LoRA tools need a kohya or diffusers "
            "pipeline LoRA (unet / text_encoder layers)"
        )
    return components, metadata


#: the largest |strength| of a LoRA in merge-lora / combine-loras
MAX_LORA_STRENGTH = 100.0


def per_file(values: Sequence[float] | float, count: int, what: str) -> list[float]:
    """One finite value in [-100, 100] per file (a single value repeats); :class:`InputError` otherwise."""
    if isinstance(values, (int, float)) and not isinstance(values, bool):
        values = [values]
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise InputError(f"{what}: give one number or one per LoRA, got {str(values)[:60]!r}")
    checked = list(finite_numbers(values, name=f"{what} (--scale)", low=-MAX_LORA_STRENGTH, high=MAX_LORA_STRENGTH))
    if len(checked) == 1:
        return checked * count
    if len(checked) != count:
        raise InputError(f"give one {what} for all LoRAs or one per LoRA: {count} LoRAs, {len(checked)} {what}s")
    return checked


def slot_shape(shape: tuple[int, ...], slot: LayerSlot) -> tuple[int, ...]:
    if slot.rows is None:
        return shape
    return (slot.rows[1] - slot.rows[0], *shape[1:])


# ------------------------------------------------------------------- the base model's layers
def base_layers_per_block(path: str | os.PathLike | None) -> int:
    """Resnets per down block of a base checkpoint's UNet (reads only its header); 2 (SD's) without one."""
    from ..merge.sources import open_source

    if path is None:
        return 2
    check_inputs(path)
    with open_source(path) as source:
        return unet_layers_per_block(list(source.keys()))


class BaseLayers:
    """A base checkpoint's LoRA-able layers, for jobs whose input files cannot tell a layer's shape.

    LoHa and LoKr store a kxk convolution's factors flattened, and DoRA's delta depends on the
    base weight; ``resize-lora`` / ``combine-loras`` then read the layer from the model the LoRA
    was made for (``--base CKPT``): an LDM single file or a diffusers UNet file, matched through
    :func:`~sdadapt.loratools.checkpoint_layers.checkpoint_layers` (fused OpenCLIP ``in_proj``
    rows included). Reads lazily, one tensor per :meth:`weight` call. Use as a context manager.

    Raises:
        WeightFileError: a missing file, or one with no LoRA-able layer.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        from ..merge.sources import open_source

        check_inputs(path)
        self.path = Path(path)
        self._source = open_source(path)
        try:
            self._shapes = {k: tuple(self._source.shape(k)) for k in self._source.keys()}
            self.slots = checkpoint_layers(self._shapes)
        except BaseException:
            self._source.close()
            raise
        if not self.slots:
            self._source.close()
            raise WeightFileError(
                f"{path}: has no layer a LoRA could target; pass the base model as an LDM single-file "
                "checkpoint or a diffusers UNet file"
            )

    def shape(self, component: str, layer: str) -> tuple[int, ...] | None:
        """(out, in, *kernel) of a canonical layer (its rows for a fused weight), ``None`` if absent."""
        slot = self.slots.get((component, layer))
        return None if slot is None else slot_shape(self._shapes[slot.key], slot)

    def weight(self, component: str, layer: str) -> Tensor | None:
        """The layer's base weight (out, in, *kernel) in the file's dtype, ``None`` if absent."""
        slot = self.slots.get((component, layer))
        if slot is None:
            return None
        value = self._source.get(slot.key)
        return value if slot.rows is None else value[slot.row_slice()].clone()

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> BaseLayers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _squeezed(shape: tuple[int, ...]) -> tuple[int, ...]:
    """A 1x1 kernel dropped: a Linear layer and a 1x1 convolution take the same delta."""
    return tuple(shape[:2]) if len(shape) > 2 and all(k == 1 for k in shape[2:]) else tuple(shape)


def same_layer_shape(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    """``a`` and ``b`` are one layer's weight shape, up to a 1x1 kernel (Linear vs 1x1 conv)."""
    return _squeezed(tuple(a)) == _squeezed(tuple(b))


def _why_no_shape(tensors: Mapping[str, Tensor], name: str) -> str:
    """Why a layer's file tensors do not tell its weight shape, by the layer's family."""
    from ..adapters.registry import family_of_keys

    try:
        family = family_of_keys(tensors, name=name).name
    except ValueError:
        family = None
    if family == "ia3":
        return "an (IA)³ layer holds one scale per channel, and its delta W ⊙ w is made from the base weight"
    if family == "oft":
        return "an OFT layer rotates the base weight's output rows: its delta R·W − W is made from the base weight"
    return ("LoHa, and LoKr with a low-rank w2, store a convolution's factors flattened (r, in*kh*kw), like a "
            "Linear layer's")


def layer_geometry(
    tensors: Mapping[str, Tensor],
    *,
    component: str,
    layer: str,
    base: BaseLayers | None = None,
    shapes: Sequence[tuple[int, ...] | None] = (),
) -> LayerGeometry:
    """The :class:`LayerGeometry` of one file layer, for computing its dense delta.

    The shape comes from the file tensors (:func:`sdadapt.adapters.registry.weight_shape_of_file_tensors`),
    else from ``shapes`` (what other files' tensors of the same layer imply), else from the base
    checkpoint; when both the file and ``base`` know it they must agree (up to a 1x1 kernel).

    Raises:
        InputError: the shape cannot be told (names the layer and asks for ``--base``).
        WeightFileError: the base has no such layer, or the shapes disagree (both ``ValueError`` s).
    """
    from ..adapters.registry import weight_shape_of_file_tensors

    name = f"{component}:{layer}"
    shape = weight_shape_of_file_tensors(tensors, name=name)
    if shape is not None and len(shape) == 1:
        raise InputError(f"{name}: a LyCORIS norm module's offsets (w_norm/b_norm of a GroupNorm/LayerNorm, shape "
                         f"{shape}) have no rank and no matrix a LoRA could hold; resize-lora / combine-loras write LoRA "
                         "layers only. Bake the file into the checkpoint with merge-lora, or leave its norm layers out.")
    if shape is None:
        shape = next((s for s in shapes if s is not None), None)
    base_shape = base.shape(component, layer) if base is not None else None
    if base is not None and base_shape is None:
        raise WeightFileError(f"{name}: the base checkpoint {base.path.name} has no such layer; is it the LoRA's model?")
    if shape is None:
        if base_shape is None:
            raise InputError(f"{name}: the file does not tell the layer's shape ({_why_no_shape(tensors, name)}); pass "
                             "the base checkpoint the LoRA was made for: base=PATH (--base CKPT)")
        shape = base_shape
    elif base_shape is not None and not same_layer_shape(shape, base_shape):
        raise WeightFileError(
            f"{name}: the file's delta has shape {shape}, the base checkpoint's layer {base_shape}; "
            f"{base.path.name if base is not None else 'the base'} is not the model the LoRA was made for"
        )
    return LayerGeometry(int(shape[0]), int(shape[1]), tuple(int(k) for k in shape[2:]))
