"""ComfyUI's own LoRA files: what its "Extract and Save Lora" node (``comfy_extras/nodes_lora_extract.py``, the
``LoraSave`` node) writes, named by the models' own state-dict keys, which ComfyUI's loader (``comfy/lora.py``
``model_lora_keys_unet`` / ``model_lora_keys_clip``) takes as they are.

Key = ``<module>.<tensor>``: the UNet's modules by their LDM names under ``diffusion_model.``
(``diffusion_model.input_blocks.1.1.proj_in.lora_up.weight``), a text encoder's by ComfyUI's CLIP names under
``text_encoders.`` — ``clip_l.transformer.`` (SD1, SDXL's first), ``clip_h.transformer.`` (SD2),
``clip_g.transformer.`` (SDXL's second), then transformers' path (``text_model.encoder.layers.0.self_attn.q_proj``). Tensors are kohya's and
LyCORIS' (``lora_up.weight``, ``lora_down.weight``, optional ``alpha``, ``diff`` / ``diff_b`` for full deltas ...).
The node writes no ``alpha`` (ComfyUI then scales by 1: alpha = rank), every weight of two or more dimensions as
an SVD LoRA in float16 (``lora_type`` "standard") or whole as ``diff`` ("full_diff"), and with "bias_diff" (its
default) the biases as ``diff_b`` and the norms' weights as ``diff``. A norm's ``diff`` / ``diff_b`` are read as
LyCORIS' ``w_norm`` / ``b_norm`` (both are added to the layer as they are) and written back so; a ``diff_b`` beside a
LoRA layer's factors is the LoRA layer's own bias delta (:class:`sdadapt.adapters.lora.LoRAModule`). ComfyUI's CLIP-L
and -H carry a ``text_projection`` (the identity) that the models' encoders here do not: the all-zero LoRA the node
writes for it is left out on reading (it changes nothing); a non-zero one is kept, and refused where it is applied.

:func:`from_comfy` / :func:`to_comfy` are one bijective renaming to sdadapt's canonical states (diffusers UNet paths,
``text_model.`` text-encoder paths): the tensors pass through unchanged, keys round-trip exactly for the base model
given (its text encoders' ComfyUI names: ``clip_l`` / ``clip_h`` / ``clip_l`` + ``clip_g``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from torch import Tensor

from ..adapters.registry import file_keys
from .bundled_embeddings import without_bundled
from .files import WeightFileError, check_finite, read_weights, write_safetensors
from .layers import canonical_layer_path, canonical_state, split_key
from .unet_names import diffusers_to_ldm_unet

__all__ = ["COMFY_PREFIXES", "from_comfy", "is_comfy_lora_keys", "load_comfy", "save_comfy", "to_comfy"]

#: the key prefixes of a ComfyUI LoRA file -> the component they name
COMFY_PREFIXES: dict[str, str] = {
    "diffusion_model.": "unet",
    "text_encoders.clip_l.transformer.": "text_encoder",
    "text_encoders.clip_h.transformer.": "text_encoder",
    "text_encoders.clip_g.transformer.": "text_encoder_2",
}
#: peft's factor names, which ComfyUI's loader takes beside kohya's (OneTrainer writes its "COMFY" and "ORIGINAL"
#: LoRA files with them): read as kohya's, written as kohya's
_PEFT_TENSORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
# the tensor names of a LoRA-family layer, longest first ((IA)³'s bare `weight` / `on_input` left out: a UNet's own
# `diffusion_model.<module>.weight` is a checkpoint key, and ComfyUI's node writes no (IA)³)
_TENSORS = tuple(sorted((set(file_keys()) - {"weight", "on_input"}) | set(_PEFT_TENSORS), key=len, reverse=True))
#: the LDM UNet's top-level modules: OneTrainer's "ORIGINAL" LoRA format names the UNet's layers so, without
#: ``diffusion_model.`` (its UNet only), read as ComfyUI's ``diffusion_model.`` keys
_BARE_UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb.", "out.0.", "out.2.")


def _split(key: str) -> tuple[str, str, str] | None:
    """``(prefix, module path, tensor name)`` of a ComfyUI LoRA key (a bare LDM UNet name counts as
    ``diffusion_model.``'s), else ``None``."""
    prefix = next((p for p in COMFY_PREFIXES if key.startswith(p)), None)
    if prefix is None and not key.startswith(_BARE_UNET_ROOTS):
        return None
    rest = key[len(prefix):] if prefix is not None else key
    prefix = prefix or "diffusion_model."
    tensor = next((t for t in _TENSORS if rest.endswith("." + t)), None)
    if tensor is None or len(rest) == len(tensor) + 1:
        return None
    return prefix, rest[:-len(tensor) - 1], tensor


def is_comfy_lora_keys(keys: Iterable[str]) -> bool:
    """Whether every key is a ComfyUI LoRA key (:data:`COMFY_PREFIXES`, a LoRA-family tensor name) — a UNet or CLIP
    state dict of the same prefixes (``....weight`` / ``.bias``) is not."""
    keys = list(keys)
    return bool(keys) and all(_split(key) is not None for key in keys)


def from_comfy(state: Mapping[str, Tensor], *, source: str = "<state>",
               layers_per_block: int = 2) -> dict[str, dict[str, Tensor]]:
    """Flat ComfyUI LoRA state -> ``{component: canonical state}`` (UNet paths in diffusers naming, text-encoder
    paths with ``text_model.``); ``layers_per_block`` maps the LDM names (2 in SD1/SD2/SDXL).

    Raises:
        WeightFileError: keys that are not ComfyUI LoRA keys, or an LDM UNet name with no diffusers module.
    """
    layers: dict[tuple[str, str], dict[str, Tensor]] = {}  # ((prefix, module path), {tensor name: tensor})
    unknown = []
    for key, value in state.items():
        found = _split(key)
        if found is None:
            unknown.append(key)
        else:
            layers.setdefault(found[:2], {})[found[2]] = value
    out: dict[str, dict[str, Tensor]] = {}
    for (prefix, path), tensors in layers.items():
        if path == "text_projection" and prefix in _NO_PROJECTION and _is_zero(tensors):
            continue  # (ComfyUI's CLIP-L / -H identity projection, unchanged: the model's encoder has none)
        component = COMFY_PREFIXES[prefix]
        canonical = canonical_layer_path(component, path if component != "unet" else prefix + path,
                                         layers_per_block=layers_per_block)
        if component == "unet" and canonical.startswith(prefix):
            unknown.extend(f"{prefix}{path}.{tensor}" for tensor in tensors)  # (an LDM name the UNet does not have)
            continue
        norm = _is_norm(tensors)  # (a norm's 1-D weight delta and its bias delta: LyCORIS' norm tensors)
        for tensor, value in tensors.items():
            name = _NORM_TENSORS[tensor] if norm else _PEFT_TENSORS.get(tensor, tensor)
            out.setdefault(component, {})[f"{canonical}.{name}"] = value
    if unknown:
        raise WeightFileError(
            f"{source}: {len(unknown)} key(s) are not ComfyUI LoRA keys, e.g. {unknown[:5]}; expected "
            f"{', '.join(repr(p + '*') for p in COMFY_PREFIXES)} module names of the model (LDM UNet names) with one "
            f"of {', '.join(_TENSORS)}")
    return out


#: a norm layer's tensors: ComfyUI's node writes its weight's delta as `diff` (one dimension) and its bias's as
#: `diff_b`, both added to the layer as they are — LyCORIS' `w_norm` / `b_norm`
_NORM_TENSORS = {"diff": "w_norm", "diff_b": "b_norm"}
_COMFY_NORM = {value: key for key, value in _NORM_TENSORS.items()}


#: the text encoders whose ComfyUI CLIP has a `text_projection` the model's encoder does not (SD1's CLIP-L, SD2's
#: OpenCLIP-H as a transformers CLIPTextModel, SDXL's first): ComfyUI fills it with the identity, so the node writes
#: an all-zero LoRA for it
_NO_PROJECTION = ("text_encoders.clip_l.transformer.", "text_encoders.clip_h.transformer.")


def _is_zero(tensors: Mapping[str, Tensor]) -> bool:
    """Whether every tensor of one layer but its alpha is all zeros."""
    factors = [value for name, value in tensors.items() if name != "alpha"]
    return bool(factors) and all(not bool(value.any()) for value in factors)


def _is_norm(tensors: Mapping[str, Tensor]) -> bool:
    """Whether one layer is a norm's: nothing but ``diff`` / ``diff_b``, its ``diff`` one-dimensional."""
    return set(tensors) <= set(_NORM_TENSORS) and "diff" in tensors and tensors["diff"].dim() == 1


def _clip_names(base_model: str) -> dict[str, str]:
    """Each text encoder's ComfyUI prefix for ``base_model``."""
    first = "text_encoders.clip_h.transformer." if base_model.startswith("sd2") else "text_encoders.clip_l.transformer."
    return {"text_encoder": first, "text_encoder_2": "text_encoders.clip_g.transformer."}


def to_comfy(components: Mapping[str, Mapping[str, Tensor]], *, base_model: str = "sd1",
             layers_per_block: int = 2) -> dict[str, Tensor]:
    """``{component: canonical state}`` -> a flat ComfyUI LoRA state (the inverse of :func:`from_comfy`): the UNet's
    diffusers paths as LDM names under ``diffusion_model.``, the text encoders under their ComfyUI CLIP names for
    ``base_model`` (``"sd1"``, ``"sd2"``, ``"sd2-v"``, ``"sdxl"``).

    Raises:
        ValueError: a component ComfyUI's file has no place for, a second text encoder outside SDXL, a UNet path
            with no LDM name.
    """
    clips = _clip_names(base_model)
    out: dict[str, Tensor] = {}
    for component, given in components.items():
        state = canonical_state(component, given, layers_per_block=layers_per_block)
        if component == "unet":
            up_blocks = {0, 1} if base_model == "sdxl" else {1, 2, 3}  # (the up blocks with attention: LDM numbering)
            for key, value in state.items():
                path, tensor = split_key(key)
                ldm = diffusers_to_ldm_unet(path, layers_per_block=layers_per_block,
                                            up_blocks_with_attention=up_blocks)
                if ldm is None:
                    raise ValueError(f"unet layer {path!r} has no LDM name, so ComfyUI's file cannot hold it")
                out[f"diffusion_model.{ldm}.{_COMFY_NORM.get(tensor, tensor)}"] = value
        elif component in clips:
            if component == "text_encoder_2" and base_model != "sdxl":
                raise ValueError(f"a second text encoder is SDXL's (clip_g), not {base_model}'s")
            for key, value in state.items():
                path, tensor = split_key(key)
                out[f"{clips[component]}{path}.{_COMFY_NORM.get(tensor, tensor)}"] = value
        else:
            raise ValueError(f"component {component!r}: a ComfyUI LoRA holds the unet and the text encoders only")
    return out


def load_comfy(path: str | os.PathLike, *, layers_per_block: int = 2) -> tuple[dict[str, dict[str, Tensor]],
                                                                                dict[str, str]]:
    """Read a ComfyUI LoRA file: ``({component: canonical state}, metadata)``.

    Raises:
        WeightFileError: unreadable or truncated file, keys that are not ComfyUI LoRA keys, NaN/inf weights.
    """
    state, metadata = read_weights(path)
    state = without_bundled(state)  # (bundled embeddings: sdadapt.formats.bundled_embeddings)
    check_finite(state, source=str(path))
    return from_comfy(state, source=str(path), layers_per_block=layers_per_block), metadata


def save_comfy(path: str | os.PathLike, components: Mapping[str, Mapping[str, Tensor]], *, base_model: str = "sd1",
               metadata: Mapping[str, str] | None = None, overwrite: bool = True) -> None:
    """Write ``components`` as a ComfyUI LoRA file (:func:`to_comfy`), atomically; ``metadata`` kept in the header
    (ComfyUI's node writes none)."""
    write_safetensors(path, to_comfy(components, base_model=base_model), metadata=dict(metadata or {}),
                      overwrite=overwrite)
