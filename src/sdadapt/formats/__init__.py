"""Every foreign file format as one translation to and from sdadapt's canonical adapter state.

Canonical state: ``{component: {"<layer path>.<tensor>": tensor}}`` with component one of
``unet``, ``text_encoder``, ``text_encoder_2``; layer paths in diffusers (UNet) and
transformers-4 (``text_model.…``, CLIP) spelling; tensors ``lora_down.weight``,
``lora_up.weight`` and ``alpha`` (scale = alpha / r), or the LyCORIS names of the other families
(``hada_*``, ``lokr_*``, ``lora_mid.weight``, ``diff``/``diff_b``, ``dora_scale``; see
``docs/lycoris.md``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor

from .comfy_lora import from_comfy, load_comfy, save_comfy, to_comfy
from .detect import KOHYA_LAYOUT_KINDS, describe_file, detect_kind
from .diffusers import from_diffusers, load_diffusers, load_peft, save_diffusers, save_peft, to_diffusers
from .embeddings import EMBEDDING_FORMATS, load_embedding, save_embedding
from .files import WeightFileError, read_safetensors_header, read_weights, sniff_format, write_safetensors
from .kohya import from_kohya, load_kohya, save_kohya, to_kohya
from .layers import LayerNotFoundError, canonical_state, resolve_layers
from .lora_tensors import check_lora_tensors
from .mixed_lora import is_mixed_lora, load_mixed_lora
from .peft_component import peft_component
from .model_keys import (
    DIFFUSERS_COMPONENTS,
    KeyMapError,
    KeyReport,
    KeySource,
    apply_plan,
    checkpoint_architecture,
    checkpoint_naming,
    convert_checkpoint,
    diffusers_to_ldm,
    key_plan,
    join_components,
    ldm_to_diffusers,
    split_components,
)

__all__ = [
    "load_lora",
    "save_lora",
    "from_kohya",
    "to_kohya",
    "load_kohya",
    "save_kohya",
    "from_diffusers",
    "to_diffusers",
    "load_diffusers",
    "save_diffusers",
    "load_peft",
    "save_peft",
    "peft_component",
    "from_comfy",
    "to_comfy",
    "load_comfy",
    "save_comfy",
    "describe_file",
    "load_embedding",
    "save_embedding",
    "EMBEDDING_FORMATS",
    "detect_kind",
    "read_weights",
    "write_safetensors",
    "canonical_state",
    "resolve_layers",
    "WeightFileError",
    "LayerNotFoundError",
    "DIFFUSERS_COMPONENTS",
    "KeySource",
    "KeyReport",
    "KeyMapError",
    "checkpoint_naming",
    "checkpoint_architecture",
    "key_plan",
    "apply_plan",
    "convert_checkpoint",
    "ldm_to_diffusers",
    "diffusers_to_ldm",
    "split_components",
    "join_components",
]


def load_lora(
    path: str | os.PathLike, *, layers_per_block: int = 2
) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """Read a kohya, LyCORIS (LoHa/LoKr/LoCon/full/DoRA), diffusers, peft or ComfyUI LoRA file, whichever it is.

    ``layers_per_block`` (2 in SD1/SD2/SDXL) maps LDM-named UNet layers (SDXL kohya files) for a
    UNet with another number of resnets per block; a file cannot tell it.

    Returns:
        ``({component: canonical state}, metadata)``; a peft adapter has the single component
        ``"model"``.

    Raises:
        WeightFileError: unreadable file, a file that is not a LoRA (says what it is), or one whose tensors no
            adapter is built from (:func:`~sdadapt.formats.lora_tensors.check_lora_tensors`).
    """
    components, metadata = _read_lora(path, layers_per_block=layers_per_block)
    check_lora_tensors(components, source=path)
    return components, metadata


def _read_lora(path: str | os.PathLike, *, layers_per_block: int) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """:func:`load_lora`'s reading, by the file's kind."""
    if os.path.isdir(path):  # (the metadata of its adapter_model.safetensors: training metadata carried there)
        weights = os.path.join(path, "adapter_model.safetensors")
        return {"model": load_peft(path)}, (read_safetensors_header(weights)[1] if os.path.isfile(weights) else {})
    if os.path.isfile(path) and sniff_format(path) == "safetensors":  # the kind from the header: the file read once
        header, metadata = read_safetensors_header(path)
        keys = list(header)
    else:  # (a legacy pickle: its keys are in the pickle; the loaders read it again)
        state, metadata = read_weights(path)
        keys = list(state)
        del state
    kind = detect_kind(keys, metadata)
    if kind in (*KOHYA_LAYOUT_KINDS, "diffusers-lora") and is_mixed_lora(keys):
        return load_mixed_lora(path, layers_per_block=layers_per_block)  # (SimpleTuner's comfyui export)
    if kind in KOHYA_LAYOUT_KINDS:
        return load_kohya(path, layers_per_block=layers_per_block)
    if kind == "diffusers-lora":
        return load_diffusers(path)
    if kind == "comfy-lora":
        return load_comfy(path, layers_per_block=layers_per_block)
    if kind in ("peft-lora", "peft-ia3"):
        return {"model": load_peft(path)}, metadata
    use_instead = {
        "embedding": "; it is a textual-inversion embedding: use it with `generate --embedding FILE` (load_embedding)",
        "hypernetwork": "; it is an A1111 hypernetwork: use it with `generate --hypernetwork FILE[:STRENGTH]`, or "
                        "in Python with load_hypernetwork + inject_hypernetwork (docs/hypernetworks.md)",
        "checkpoint": "; it is a model, not an adapter: use it as --model, or as merge-lora's BASE",
        "aesthetic-embedding": "; it is an aesthetic embedding: use it with `generate --aesthetic FILE`",
        "custom-diffusion": "; it is a Custom Diffusion result: use it with `generate --custom-diffusion FILE[:SCALE]`, "
                            "or in Python with apply_custom_diffusion (docs/custom-diffusion.md)",
    }.get(kind, "")
    raise WeightFileError(
        f"{path}: this is {'an' if kind[:1] in 'aeiou' else 'a'} {kind} file, not a LoRA that sdadapt can load{use_instead}"
        "; run `python -m sdadapt inspect FILE` to see what it holds."
    )


def save_lora(
    path: str | os.PathLike,
    components: Mapping[str, Mapping[str, Tensor]],
    *,
    format: str = "kohya",
    base_model: str = "sd1",
    **options,
) -> None:
    """Write a LoRA as ``format="kohya"`` (A1111, ComfyUI, kohya; LyCORIS naming for LoHa/LoKr/full/DoRA),
    ``"diffusers"`` (diffusers/peft; LoRA and output-axis DoRA only) or ``"comfy"`` (ComfyUI's own naming,
    :func:`save_comfy`)."""
    if format == "kohya":
        save_kohya(path, components, base_model=base_model, **options)
    elif format == "comfy":
        save_comfy(path, components, base_model=base_model, **options)
    elif format == "diffusers":
        save_diffusers(path, components, **options)
    elif format == "peft":
        raise ValueError("format='peft' is a folder of one model's adapter: use "
                         "sdadapt.formats.save_peft(folder, components['unet']) (or the component meant)")
    else:
        raise ValueError(f"format must be 'kohya', 'diffusers' or 'comfy', got {format!r}")
