"""diffusers pipeline LoRA files and peft adapter folders.

diffusers (``pytorch_lora_weights.safetensors``): keys ``<component>.<layer>.lora_A.weight`` (down,
(r, in[, k, k])) and ``.lora_B.weight`` (up, (out, r[, 1, 1])), component ``unet``,
``text_encoder``, ``text_encoder_2``. No alpha tensors: the scale comes from the safetensors
metadata ``lora_adapter_metadata`` (JSON of peft ``LoraConfig`` fields, keys prefixed by component:
``unet.r``, ``unet.lora_alpha``, ``unet.rank_pattern``, ``unet.alpha_pattern`` ...); without it
``alpha = r`` (scale 1). sdadapt writes exact per-layer ``rank_pattern``/``alpha_pattern`` so
diffusers rebuilds the same scales. Text-encoder keys keep the ecosystem's ``text_model.`` paths,
but the metadata names text-encoder layers *without* ``text_model.`` (``encoder.layers.0.mlp.fc1``):
diffusers strips ``text_model.`` from the tensor keys for transformers-5 ``CLIPTextModel`` (which has
no ``text_model``) but passes the metadata to peft unchanged, and peft matches ``target_modules`` and
patterns as dotted suffixes — so the short names fit transformers 4 and 5 models alike.

diffusers' model-level ``save_lora_adapter`` writes one model's adapter without the component (``<layer>.lora_A.weight``,
the config unprefixed): read as the component ``"model"``, as a peft folder, whose model the caller names.

Older spellings read too: ``…to_q.lora.down.weight`` / ``…q_proj.lora_linear_layer.up.weight``
("new diffusers" format) and the attention-processor era's ``…attn1.processor.to_q_lora.down.weight``
(UNet) and ``…self_attn.to_q_lora.down.weight`` (text encoder; ``to_out_lora`` is ``out_proj``) —
what diffusers' ``lora_state_dict`` still returns for a kohya file.

peft (``adapter_model.safetensors`` + ``adapter_config.json``): keys
``base_model.model.<layer>.lora_A.weight``, scale from the config's ``r``/``lora_alpha``/patterns.
peft (IA)³ adapters (``ia3_l``) are read and written by :mod:`sdadapt.formats.peft_ia3`.

DoRA (``use_dora``): peft/diffusers add ``<layer>.lora_magnitude_vector``, (out,) for linear and
(1, out, 1, 1) for conv, the magnitude per output row. It is read into the canonical ``dora_scale``
(out, 1[, 1, 1]) and written back from it; a per-input-column ``dora_scale`` (older LyCORIS) has
no peft form and is refused (save it as kohya/LyCORIS instead).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapters.lora import lora_scale
from ..model_args import as_module, check_components
from ..patterns import own_pattern_entries, peft_pattern_value
from .bundled_embeddings import without_bundled
from .files import (
    check_safetensors_name,
    WeightFileError,
    atomic_write,
    check_finite,
    check_finite_output,
    check_input_file,
    read_weights,
    staged_outputs,
    write_safetensors,
)
from .header import load_json
from .layers import COMPONENTS, canonical_state, split_key
from .peft_ia3 import from_peft_ia3, is_peft_ia3, to_peft_ia3
from .peft_lycoris import from_peft_lycoris, is_peft_lycoris, lycoris_family, to_peft_lycoris
from .peft_names import peft_layer_names

__all__ = [
    "to_diffusers",
    "from_diffusers",
    "save_diffusers",
    "load_diffusers",
    "to_peft",
    "from_peft",
    "save_peft",
    "load_peft",
    "METADATA_KEY",
]

METADATA_KEY = "lora_adapter_metadata"

# spelling of (down, up) in diffusers files, longest first
_DOWN_UP_SPELLINGS = (
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_down.weight", ".lora_up.weight"),
)
# attention-processor era: UNet `attn1.processor.to_q_lora.down.weight` (-> attn1.to_q, to_out -> to_out.0),
# CLIP `self_attn.to_q_lora.down.weight` (-> self_attn.q_proj, to_out -> out_proj)
_OLD_ATTENTION = re.compile(r"(\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_OLD_CLIP_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _without_processor(layer: str) -> str:
    """An attention projection named through its processor (``attn1.processor.to_q``, ``…processor.to_out``: the
    spelling ComfyUI's loader maps, ``unet.<path>.processor.to_q.lora.up.weight``) -> the module's path
    (``attn1.to_q``, ``attn1.to_out.0``)."""
    if ".processor.to_" not in layer:
        return layer
    layer = layer.replace(".processor.to_", ".to_")
    return layer + ".0" if layer.endswith(".to_out") else layer


def _config_for(state: Mapping[str, Tensor], *, strip_prefix: str = "") -> dict:
    """peft ``LoraConfig`` fields that reproduce each layer's rank and alpha exactly.

    ``strip_prefix`` is removed from the layer names used in ``target_modules`` and the patterns
    (peft matches them as dotted suffixes of the live module names).
    """
    ranks: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, value in state.items():
        layer, suffix = split_key(key)
        if suffix == "lora_down.weight":
            name = layer[len(strip_prefix) :] if strip_prefix and layer.startswith(strip_prefix) else layer
            alpha = state.get(f"{layer}.alpha")
            ranks[name] = int(value.shape[0])
            alphas[name] = float(alpha) if alpha is not None else float(value.shape[0])
    r = Counter(ranks.values()).most_common(1)[0][0] if ranks else 8
    lora_alpha = Counter(alphas.values()).most_common(1)[0][0] if alphas else float(r)
    return {
        "r": r,
        "lora_alpha": _int_if_whole(lora_alpha),
        "rank_pattern": own_pattern_entries(ranks, r),
        "alpha_pattern": {k: _int_if_whole(v) for k, v in own_pattern_entries(alphas, lora_alpha).items()},
        "target_modules": sorted(ranks),
        "use_rslora": False,
        "use_dora": any(split_key(key)[1] == "dora_scale" for key in state),
        "lora_dropout": 0.0,
        "bias": "none",
        **({"lora_bias": True} if any(split_key(key)[1] == "diff_b" for key in state) else {}),  # (peft ≥ 0.14's)
        "init_lora_weights": True,
    }


def _int_if_whole(value: float) -> float | int:
    return int(value) if float(value).is_integer() else float(value)


def _peft_keys(state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    out = {}
    for key, value in state.items():
        layer, suffix = split_key(key)
        if suffix == "lora_down.weight":
            out[f"{prefix}{layer}.lora_A.weight"] = value
        elif suffix == "lora_up.weight":
            down = state.get(f"{layer}.lora_down.weight")
            if value.dim() == 2 and down is not None and down.dim() == 4:  # LyCORIS DyLoRA's flat conv up (out, r):
                value = value.reshape(*value.shape, 1, 1)  # peft's Conv2d lora_B is a 1x1 conv (out, r, 1, 1)
            out[f"{prefix}{layer}.lora_B.weight"] = value
        elif suffix == "dora_scale":
            out[f"{prefix}{layer}.lora_magnitude_vector"] = _peft_magnitude(key, value, state.get(f"{layer}.lora_up.weight"))
        elif suffix == "diff_b" and f"{layer}.lora_down.weight" in state:  # peft's lora_bias: lora_B.bias · scale
            alpha = state.get(f"{layer}.alpha")
            out[f"{prefix}{layer}.lora_B.bias"] = value / lora_scale(None if alpha is None else float(alpha),
                                                                     state[f"{layer}.lora_down.weight"].shape[0])
        elif suffix != "alpha":
            raise ValueError(f"{key}: diffusers/peft LoRA files hold only LoRA tensors, not {suffix!r}; save other "
                             "families as kohya/LyCORIS files (format='kohya')"
                             + ("; (IA)³ also as a peft IA3 adapter folder (save_peft)" if f"{layer}.on_input" in state else ""))
    return out


def _peft_magnitude(key: str, dora_scale: Tensor, up: Tensor | None) -> Tensor:
    """Canonical output-axis ``dora_scale`` (out, 1[, 1, 1]) -> peft magnitude (out,) / (1, out, 1, 1)."""
    out_features = up.shape[0] if up is not None else dora_scale.shape[0]
    if dora_scale.shape[0] != out_features or dora_scale[0].numel() != 1:
        raise ValueError(
            f"{key}: dora_scale of shape {tuple(dora_scale.shape)} is per input column (older LyCORIS); "
            "diffusers/peft DoRA keeps the magnitude per output row and cannot express it. Save this "
            "adapter with format='kohya' (LyCORIS naming) instead."
        )
    if dora_scale.dim() == 4:
        return dora_scale.reshape(1, out_features, 1, 1)
    return dora_scale.reshape(out_features)


def to_diffusers(components: Mapping[str, Mapping[str, Tensor]]) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Canonical component states -> (diffusers state dict, safetensors metadata with alphas)."""
    check_components(components, caller="to_diffusers")
    state: dict[str, Tensor] = {}
    config: dict[str, object] = {}
    for component, comp_state in components.items():
        if component not in COMPONENTS:
            raise ValueError(f"unknown component {component!r}; use one of {COMPONENTS}")
        canonical = canonical_state(component, comp_state)
        state.update(_peft_keys(canonical, f"{component}."))
        strip = "text_model." if component.startswith("text_encoder") else ""
        config.update({f"{component}.{k}": v for k, v in _config_for(canonical, strip_prefix=strip).items()})
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, indent=2, sort_keys=True)}
    return state, metadata


def _pattern_value(patterns: Mapping[str, object], layer: str, default: object, *, source: str = "alpha_pattern") -> object:
    """peft's pattern lookup: the key matches the layer name or a dotted suffix of it.

    The keys are regular expressions *from the file*: matched in linear time by
    :func:`sdadapt.patterns.peft_pattern_value` (never by a backtracking ``re``); an invalid or
    unsupported key raises :class:`~sdadapt.patterns.PatternError` naming ``source``.
    """
    if not isinstance(patterns, Mapping):
        raise WeightFileError(f"{source}: must be an object mapping patterns to values, got {type(patterns).__name__}")
    if len(patterns) > 100_000:
        raise WeightFileError(f"{source}: {len(patterns)} patterns, more than any real adapter has; refusing it")
    return peft_pattern_value(patterns, layer, default, what=source)


def _normalise_spelling(key: str) -> tuple[str, str] | None:
    """A diffusers/peft key -> (layer, "lora_down.weight"|"lora_up.weight"|"alpha") or None."""
    match = _OLD_ATTENTION.search(key)
    if match:
        parent, proj = key[: match.start()], match.group(2)
        if not match.group(1) and parent.endswith("self_attn"):  # CLIP attention
            proj = _OLD_CLIP_PROJ[proj]
        elif proj == "to_out":
            proj = "to_out.0"
        return f"{parent}.{proj}", "lora_down.weight" if match.group(3) == "down" else "lora_up.weight"
    for down, up in _DOWN_UP_SPELLINGS:
        if key.endswith(down):
            return _without_processor(key[: -len(down)]), "lora_down.weight"
        if key.endswith(up):
            return _without_processor(key[: -len(up)]), "lora_up.weight"
    if key.endswith(".alpha"):
        return key[: -len(".alpha")], "alpha"
    if key.endswith(".lora_B.bias"):  # (peft's lora_bias=True: merged as bias += lora_B.bias · scale)
        return key[: -len(".lora_B.bias")], "lora_up.bias"
    for magnitude in (".lora_magnitude_vector", ".lora_magnitude_vector.weight"):
        if key.endswith(magnitude):
            return key[: -len(magnitude)], "dora_scale"
    return None


def _config_number(value: object, *, source: str, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise WeightFileError(f"{source}: {what} must be a number, got {str(value)[:60]!r}")
    number = float(value)
    if not math.isfinite(number):
        raise WeightFileError(f"{source}: {what} is {number}; the file is broken")
    return number


def _with_alphas(layers: dict[str, dict[str, Tensor]], config: Mapping | None, *, source: str = "<state>") -> dict[str, Tensor]:
    """Add the canonical ``alpha`` (scale · r) to every layer from a peft-style config."""
    out: dict[str, Tensor] = {}
    config = dict(config or {})
    rsl = bool(config.get("use_rslora", False))
    for layer, tensors in layers.items():
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            raise WeightFileError(f"{source}: layer {layer}: has {sorted(tensors)} but LoRA needs both down (lora_A) "
                                  "and up (lora_B)")
        if tensors["lora_down.weight"].dim() == 0:
            raise WeightFileError(f"{source}: layer {layer}: lora_A is a 0-dim tensor; the file is corrupt")
        rank = int(tensors["lora_down.weight"].shape[0])
        if "alpha" in tensors:
            if tensors["alpha"].numel() != 1:
                raise WeightFileError(f"{source}: layer {layer}: alpha has {tensors['alpha'].numel()} values, not one")
            alpha = float(tensors["alpha"])
        elif config:
            value = _pattern_value(config.get("alpha_pattern") or {}, layer, config.get("lora_alpha", rank),
                                   source=f"{source}: {METADATA_KEY} alpha_pattern")
            alpha = _config_number(value, source=source, what=f"the alpha of {layer}")
            if rsl:  # peft scale = alpha / sqrt(r); store alpha' with alpha' / r == scale
                alpha = alpha * rank / rank**0.5
        else:
            alpha = float(rank)
        out[f"{layer}.lora_down.weight"] = tensors["lora_down.weight"]
        out[f"{layer}.lora_up.weight"] = tensors["lora_up.weight"]
        out[f"{layer}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
        if "lora_up.bias" in tensors:  # peft's lora_bias: the bias moves by lora_B.bias · scale, sdadapt's diff_b as is
            out[f"{layer}.diff_b"] = tensors["lora_up.bias"] * lora_scale(alpha, rank)
        if "dora_scale" in tensors:  # peft magnitude (out,) / (1, out, 1, 1) -> (out, 1[, 1, 1])
            magnitude, down = tensors["dora_scale"], tensors["lora_down.weight"]
            out_features = tensors["lora_up.weight"].shape[0]
            if magnitude.numel() != out_features:
                raise WeightFileError(
                    f"{layer}: lora_magnitude_vector has {magnitude.numel()} values but the layer has {out_features} outputs"
                )
            out[f"{layer}.dora_scale"] = magnitude.reshape(out_features, 1, *([1] * (down.dim() - 2)))
    return out


def from_diffusers(
    state: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None, *, source: str = "<state>"
) -> dict[str, dict[str, Tensor]]:
    """diffusers state (any spelling) -> ``{component: canonical state}`` with alphas.

    The alphas come from alpha tensors if present, else from the ``lora_adapter_metadata`` config of
    the component (``lora_alpha``/``alpha_pattern``, ``use_rslora``), else ``alpha = r``.

    Raises:
        WeightFileError: keys without a component prefix or LoRA tensor name (listed).
    """
    config_all: dict = {}
    if metadata and metadata.get(METADATA_KEY):
        config_all = load_json(metadata[METADATA_KEY], source=source, what=METADATA_KEY, max_depth=8)
        if not isinstance(config_all, dict):
            raise WeightFileError(f"{source}: {METADATA_KEY} must be a JSON object, got {type(config_all).__name__}")
    grouped: dict[str, dict[str, dict[str, Tensor]]] = {}
    unknown: list[str] = []
    # one model's adapter, no component in its keys nor its config (diffusers' model-level save_lora_adapter):
    # "model", as a peft folder is
    bare = bool(state) and not any(key.partition(".")[0] in COMPONENTS for key in state)
    if bare:
        config_all = {f"model.{k}": v for k, v in config_all.items()}
    for key, value in state.items():
        component, rest = ("model", key) if bare else key.partition(".")[::2]
        parsed = _normalise_spelling(rest) if component in (*COMPONENTS, "model") else None
        if parsed is None:
            unknown.append(key)
            continue
        layer, suffix = parsed
        grouped.setdefault(component, {}).setdefault(layer, {})[suffix] = value
    if unknown:
        raise WeightFileError(
            f"{source}: {len(unknown)} key(s) are not diffusers LoRA keys, e.g. {unknown[:5]}; expected "
            f"'<component>.<layer>.lora_A.weight' / '.lora_B.weight' with component in {COMPONENTS} (or none: one "
            "model's adapter)."
        )
    out = {}
    for component, layers in grouped.items():
        config = {k[len(component) + 1 :]: v for k, v in config_all.items() if k.startswith(component + ".")}
        # alphas from the file's own layer names (the patterns were written for them), then
        # canonical paths (a transformers-5 text encoder's `encoder.layers...` gets `text_model.`)
        out[component] = canonical_state(component, _with_alphas(layers, config, source=source))
    return out


def save_diffusers(
    path: str | os.PathLike,
    components: Mapping[str, Mapping[str, Tensor]],
    *,
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a diffusers LoRA file (``pipe.load_lora_weights`` reads it) atomically.

    ``metadata``: string metadata written beside the file's own (``format``, ``lora_adapter_metadata``, which
    win), e.g. the training metadata of the file it was converted from (``carried_metadata``)."""
    from ..checks import cast_checked

    check_components(components, caller="save_diffusers")
    check_safetensors_name(path, caller="save_diffusers")
    state, own = to_diffusers(components)
    if dtype is not None:
        state = {k: cast_checked(v, dtype, key=k, hint="save in float32") for k, v in state.items()}
    check_finite_output(state, path=path)
    write_safetensors(path, state, {**{str(k): str(v) for k, v in (metadata or {}).items()}, **own})


def load_diffusers(path: str | os.PathLike) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """Read a diffusers LoRA file: ``({component: canonical state}, metadata)``."""
    state, metadata = read_weights(path)
    state = without_bundled(state)  # (bundled embeddings: sdadapt.formats.bundled_embeddings)
    check_finite(state, source=str(path))
    return from_diffusers(state, metadata, source=str(path)), metadata


# ---------------------------------------------------------------------------------------- peft
_PEFT_PREFIX = "base_model.model."


def to_peft(state: Mapping[str, Tensor], *, model: nn.Module | None = None) -> tuple[dict[str, Tensor], dict]:
    """One model's adapter state (live layer paths) -> (peft state dict, adapter_config dict).

    LoRA (and DoRA) states give a ``LoraConfig`` adapter; LoHa / LoKr states a ``LoHaConfig`` /
    ``LoKrConfig`` one (:func:`sdadapt.formats.peft_lycoris.to_peft_lycoris`, which reads the layers'
    base weight shapes from ``model`` when given; LoRA ignores it)."""
    if lycoris_family(state) is not None:
        return to_peft_lycoris(state, model=model)
    peft_state = _peft_keys(state, _PEFT_PREFIX)
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, **_config_for(state)}
    return peft_state, config


def from_peft(state: Mapping[str, Tensor], config: Mapping | None, *, source: str = "<state>") -> dict[str, Tensor]:
    """peft adapter state + config -> canonical state (layer paths as in the peft-wrapped model, without
    torch.compile's ``_orig_mod`` segments: :func:`~sdadapt.formats.layers.strip_compiled_segments`).

    LoRA (and DoRA) adapters; (IA)³ ones (``peft_type = "IA3"``, ``ia3_l`` keys) through
    :func:`sdadapt.formats.peft_ia3.from_peft_ia3`, LoHa / LoKr ones (``peft_type = "LOHA"`` / ``"LOKR"``)
    through :func:`sdadapt.formats.peft_lycoris.from_peft_lycoris`."""
    # (the configs' patterns name the file's own layers: read with them, then drop the wrapper segments)
    return canonical_state("model", _from_peft_file_names(state, config, source=source))


def _from_peft_file_names(state: Mapping[str, Tensor], config: Mapping | None, *, source: str) -> dict[str, Tensor]:
    """:func:`from_peft` with the layer names as the file spells them."""
    if is_peft_ia3(state, config if isinstance(config, Mapping) else None):
        return from_peft_ia3(state, config if isinstance(config, Mapping) else None, source=source)
    if is_peft_lycoris(state, config if isinstance(config, Mapping) else None):
        return from_peft_lycoris(state, config if isinstance(config, Mapping) else None, source=source)
    if config is not None and not isinstance(config, Mapping):
        raise WeightFileError(f"{source}: adapter_config.json must be a JSON object, got {type(config).__name__}")
    _check_peft_lora_config(config or {}, source=source)
    layers: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, value in state.items():
        rest = key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key
        parsed = _normalise_spelling(rest)
        if parsed is None:
            unknown.append(key)
            continue
        layers.setdefault(parsed[0], {})[parsed[1]] = value
    if unknown:
        raise WeightFileError(f"{source}: {len(unknown)} key(s) are not peft LoRA keys, e.g. {unknown[:5]}")
    return _with_alphas(layers, config, source=source)


#: peft's ``init_lora_weights`` that change the base weight as they make the factors (PiSSA / CorDA: the principal
#: part moved into the factors, OLoRA: a QR of W, LoftQ: a quantised base, LoRA-GA: W − s·B₀A₀)
_BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def _check_peft_lora_config(config: Mapping, *, source: str) -> None:
    """Refuse a peft LoRA config whose factors are not the change to the base model: another tuner (``peft_type``),
    or an ``init_lora_weights`` that changed the base weight when the factors were made (peft rebuilds that base
    when it loads the folder; the factors alone, added to the original weight, are wrong — with no error)."""
    peft_type = str(config.get("peft_type", "LORA"))
    if peft_type != "LORA":
        why = (" (peft's OFT / BOFT rotate a layer's input, W·Rᵀ; LyCORIS' and kohya's, which sdadapt reads, rotate its "
               "output rows: no exact conversion without the base weight)" if peft_type in ("OFT", "BOFT") else "")
        raise WeightFileError(f"{source}: peft_type {peft_type[:40]!r}: sdadapt reads peft's LORA, LOHA, LOKR and IA3 "
                              f"adapters{why}")
    whole = [f"{name} = {config[name]!r}"[:80] for name in ("modules_to_save", "bias")
             if config.get(name) not in (None, [], "none")]
    if whole:  # (whole tensors beside the adapter: peft's modules_to_save copies, bias="all" / "lora_only")
        raise WeightFileError(f"{source}: {', '.join(whole)}: the folder holds whole trained tensors beside the LoRA, "
                              "which a LoRA file has no place for; save the adapter without them (peft's LoraConfig "
                              "defaults) or merge it in peft (merge_and_unload) and convert the model")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_BASE_CHANGING_INITS):
        raise WeightFileError(
            f"{source}: init_lora_weights {init!r}: peft made these factors by changing the base weight too (W − s·B₀A₀), "
            "and rebuilds that base when it loads the folder; the factors alone on the original model are not the "
            "adapter. Save it in peft with save_pretrained(..., path_initial_model_for_weight_conversion=<the folder "
            "saved right after get_peft_model>): a plain LoRA of the original model (rank 2r), which reads here exactly")


def save_peft(
    folder: str | os.PathLike, state: Mapping[str, Tensor], *, model: nn.Module | None = None,
    component: str | None = None, metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``adapter_model.safetensors`` + ``adapter_config.json`` (``PeftModel.from_pretrained`` reads it).

    ``metadata``: string metadata for ``adapter_model.safetensors`` beside peft's own ``format`` (which wins),
    e.g. the training metadata of the file it was converted from; peft reads neither.

    Layers are written under the names the model has (:func:`~sdadapt.formats.peft_names.peft_layer_names`):
    ``model``'s own module names when it is given, else pipeline ``component``'s (``"text_encoder"``: the installed
    transformers' ``CLIPTextModel``, which in transformers 5 has no ``text_model.``; ``"text_encoder_2"``:
    ``CLIPTextModelWithProjection``, which has), else the state's own, as given (less ``_orig_mod.``): right for a
    UNet, for ``CLIPTextModelWithProjection`` and for a live state of the model, but a transformers-5
    ``CLIPTextModel`` (SD1's / SDXL's ``text_encoder``) has no ``text_model.``: pass ``component="text_encoder"`` or
    ``model=`` for a canonical (``load_lora``) text-encoder state.

    Both appear together or not at all (:func:`~sdadapt.formats.files.staged_outputs`): a failed save
    never leaves new weights beside an old config (whose rank and alpha would scale them wrongly).
    An (IA)³ state (``.on_input`` keys) is written as peft's ``IA3Config`` adapter
    (:func:`~sdadapt.formats.peft_ia3.to_peft_ia3`); a LoHa / LoKr state as a ``LoHaConfig`` /
    ``LoKrConfig`` adapter (:func:`~sdadapt.formats.peft_lycoris.to_peft_lycoris`; ``model``, the model
    the adapter is for, lets it check convolution layers whose flattened factors hide their kernel).

    Raises:
        ValueError: a state no peft config expresses (families mixed, a LoKr split peft would not make ...),
            naming the layer, or two keys that become one peft name; nothing is written then.
        LayerNotFoundError: a layer that matches no module of ``model``."""
    if model is not None:  # (a torch.compile'd model: its own module's names, not `_orig_mod.`-prefixed ones)
        model = as_module(model, caller="save_peft", one_model=False)
    state = peft_layer_names(state, model=model, component=component)
    ia3 = any(key.endswith(".on_input") for key in state)
    peft_state, config = to_peft_ia3(state) if ia3 else to_peft(state, model=model)
    target = Path(folder)  # (a missing folder is made by the writes, and removed again if the save fails)
    check_finite_output(peft_state, path=target / "adapter_model.safetensors")
    with staged_outputs() as stage:
        write_safetensors(target / "adapter_model.safetensors", peft_state,
                          {**{str(k): str(v) for k, v in (metadata or {}).items()}, "format": "pt"}, stage=stage)
        atomic_write(target / "adapter_config.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)),
                     stage=stage)


def load_peft(folder: str | os.PathLike) -> dict[str, Tensor]:
    """Read a peft adapter folder (or its ``adapter_model.safetensors``) into a canonical state."""
    target = Path(folder)
    weights = target / "adapter_model.safetensors" if target.is_dir() else target
    if not weights.exists() and target.is_dir():
        weights = target / "adapter_model.bin"
    config_file = weights.parent / "adapter_config.json"
    config = None
    if config_file.exists():
        check_input_file(config_file, what="adapter_config.json")
        if config_file.stat().st_size > 16 << 20:
            raise WeightFileError(f"{config_file}: {config_file.stat().st_size} bytes, not a peft adapter config")
        config = load_json(config_file.read_bytes(), source=str(config_file), what="adapter_config.json", max_depth=8)
    state, _ = read_weights(weights)
    check_finite(state, source=str(weights))
    return from_peft(state, config, source=str(weights))
