"""What is this weights file? Classification from key names and metadata alone."""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from ..adapters.registry import algorithm_of_keys, file_rank
from .files import _check_is_file, read_safetensors_header, read_weights, sniff_format
from .kohya import is_kohya_state

__all__ = ["FILE_KINDS", "detect_kind", "describe_file"]

FILE_KINDS = (
    "kohya-lora",
    "lycoris",
    "diffusers-lora",
    "peft-lora",
    "custom-diffusion",
    "embedding",
    "hypernetwork",
    "checkpoint",
    "unknown",
)

_CHECKPOINT_MARKERS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.", "down_blocks.", "encoder.down.", "text_model.", "encoder.layers.", "input_blocks.")


# safetensors header dtypes -> torch names, so a .safetensors and a .pt report dtypes alike
_SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def _suffix(key: str) -> str:
    return key.split(".", 1)[1] if "." in key else ""


def detect_kind(keys: list[str], metadata: Mapping[str, str]) -> str:
    """Classify by keys/metadata; one of :data:`FILE_KINDS`."""
    if not keys:
        return "unknown"
    key_set = set(keys)
    if any("custom_diffusion" in k for k in keys):
        return "custom-diffusion"
    if all(k.split("_", 2)[0] == "lora" for k in keys) and is_kohya_state(dict.fromkeys(keys)):  # type: ignore[arg-type]
        layers: dict[str, set[str]] = {}
        for key in keys:
            layers.setdefault(key.split(".", 1)[0], set()).add(_suffix(key))
        plain = ("lora", "unknown")  # anything else (LoHa, Tucker, DoRA ...) is a LyCORIS file
        if metadata.get("ss_network_module", "").startswith("lycoris") or any(
            algorithm_of_keys(names) not in plain for names in layers.values()
        ):
            return "lycoris"
        return "kohya-lora"
    if any(k.startswith("base_model.model.") for k in keys) and any("lora_" in k for k in keys):
        return "peft-lora"
    if any(k.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2") for k in keys) and any(
        ("lora" in k) for k in keys
    ):
        return "diffusers-lora"
    if any(k.startswith("string_to_param") for k in keys) or key_set in ({"emb_params"}, {"clip_l", "clip_g"}):
        return "embedding"
    if any(k.split(".", 1)[0].isdigit() and ".linear." in k for k in keys):
        return "hypernetwork"
    if any(k.startswith(_CHECKPOINT_MARKERS) for k in keys) or any(k.startswith("state_dict.") for k in keys):
        return "checkpoint"
    if len(keys) == 1 or len(keys) <= 2 and all("." not in k for k in keys):
        return "embedding"  # diffusers concept file {token: tensor}
    return "unknown"


def describe_file(path: str | os.PathLike) -> dict:
    """A JSON-able summary: kind, modules, ranks, alphas, dtypes, size, metadata.

    Safetensors files are summarised from the header alone where possible (no tensor data
    is read except the 0-dim alphas); legacy pickles are read with ``weights_only=True``.
    """
    file = Path(path)
    if file.is_dir() and (file / "adapter_model.safetensors").is_file():
        file = file / "adapter_model.safetensors"  # a peft adapter folder
    _check_is_file(file)
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: Counter[str] = Counter()
    tensors: dict[str, Tensor] | None = None
    if sniff_format(file) != "pickle":
        header, metadata = read_safetensors_header(file)
        for key, info in header.items():
            shapes[key] = tuple(info["shape"])
            dtypes[_SAFETENSORS_DTYPES.get(str(info["dtype"]), str(info["dtype"]).lower())] += 1
    else:
        tensors, metadata = read_weights(file)
        for key, value in tensors.items():
            shapes[key] = tuple(value.shape)
            dtypes[str(value.dtype).replace("torch.", "")] += 1
    keys = list(shapes)
    kind = detect_kind(keys, metadata)
    summary: dict = {
        "file": str(file),
        "kind": kind,
        "tensors": len(keys),
        "size_bytes": file.stat().st_size,
        "dtypes": dict(dtypes),
        "metadata": dict(metadata),
    }
    if kind in ("kohya-lora", "lycoris", "diffusers-lora", "peft-lora"):
        summary.update(_adapter_summary(file, shapes, tensors, kind, metadata))
    return summary


def _adapter_summary(
    file: Path, shapes: dict[str, tuple[int, ...]], tensors, kind: str, metadata: Mapping[str, str] | None = None
) -> dict:
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        layer, _, suffix = key.partition(".") if kind in ("kohya-lora", "lycoris") else _split_diffusers(key)
        modules.setdefault(layer, {})[suffix] = shape
    ranks: Counter[int] = Counter()
    algorithms: Counter[str] = Counter()
    components: Counter[str] = Counter()
    layer_ranks: dict[str, int | None] = {}
    for layer, parts in modules.items():
        algo, rank = _algorithm(parts)
        algorithms[algo] += 1
        layer_ranks[layer] = rank
        if rank is not None:
            ranks[rank] += 1
        components[_component(layer, kind)] += 1
    alphas: Counter[str] = Counter()
    alpha_keys = {k[: -len(".alpha")]: k for k in shapes if k.endswith(".alpha")}
    if alpha_keys:
        if tensors is None:
            from safetensors import safe_open

            with safe_open(str(file), framework="pt", device="cpu") as handle:
                values = {layer: handle.get_tensor(key) for layer, key in alpha_keys.items() if _is_scalar(shapes[key])}
        else:
            values = {layer: tensors[key] for layer, key in alpha_keys.items() if _is_scalar(shapes[key])}
        values = {layer: float(value) for layer, value in values.items()}  # malformed alphas: "absent"
    else:
        values = {}
    configs = _peft_configs(file, kind, metadata or {}) if kind in ("diffusers-lora", "peft-lora") else None
    for layer, rank in layer_ranks.items():
        alpha = values.get(layer)
        if alpha is None and configs and rank is not None:
            alpha = _config_alpha(configs, layer, rank, kind)
        alphas[_fmt(alpha) if alpha is not None else "absent (alpha = rank)"] += 1
    families = sorted({_family_label(a) for a in algorithms if a != "unknown"})
    return {
        "modules": len(modules),
        "components": dict(components),
        "family": families[0] if len(families) == 1 else ("mixed: " + ", ".join(families) if families else "unknown"),
        "algorithms": dict(algorithms),
        "ranks": {str(k): v for k, v in sorted(ranks.items())},
        "alphas": dict(alphas),
    }


def _is_scalar(shape: tuple[int, ...]) -> bool:
    n = 1
    for size in shape:
        n *= size
    return n == 1


def _peft_configs(file: Path, kind: str, metadata: Mapping[str, str]) -> dict[str, dict]:
    """``{component: peft LoraConfig dict}`` that scales a diffusers file / peft adapter ("" for peft)."""
    import json

    try:
        if kind == "peft-lora":
            config_file = file.parent / "adapter_config.json"
            return {"": json.loads(config_file.read_text())} if config_file.is_file() else {}
        config_all = json.loads(metadata.get("lora_adapter_metadata") or "{}")
    except (OSError, ValueError):
        return {}
    if not isinstance(config_all, dict):
        return {}
    out: dict[str, dict] = {}
    for key, value in config_all.items():
        component, _, field = key.partition(".")
        out.setdefault(component, {})[field] = value
    return out


def _config_alpha(configs: dict[str, dict], layer: str, rank: int, kind: str) -> float | None:
    """The alpha (scale · r) peft gives ``layer`` under its config, or None without a config."""
    from .diffusers import _pattern_value

    if kind == "peft-lora":
        component, name = "", layer[len("base_model.model.") :] if layer.startswith("base_model.model.") else layer
    else:
        component, _, name = layer.partition(".")
    config = configs.get(component)
    if not isinstance(config, dict) or not config:
        return None
    try:
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank)))  # type: ignore[arg-type]
    except (TypeError, ValueError, AttributeError, re.error):
        return None  # a malformed config: report the alpha as unknown rather than fail
    if config.get("use_rslora"):
        alpha = alpha * rank / rank**0.5
    return alpha


def _split_diffusers(key: str) -> tuple[str, str, str]:
    for marker in (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", ".lora_linear_layer.", "_lora.", ".lora_magnitude_vector"):
        index = key.find(marker)
        if index >= 0:
            return key[:index], ".", key[index + 1 :]
    return key.rsplit(".", 1)[0], ".", key.rsplit(".", 1)[-1]


def _family_label(algorithm: str) -> str:
    """``loha-tucker+dora`` -> ``loha+dora``; ``locon`` -> ``lora`` (the family, not the layer kind)."""
    if algorithm == "dora":  # DoRA over a plain LoRA/LoCon layer
        return "lora+dora"
    base, plus, rest = algorithm.partition("+")
    base = base.replace("-tucker", "").replace("locon", "lora")
    return base + plus + rest


#: diffusers / peft spellings of a LoRA layer's tensors -> the canonical ones the families use
_LORA_SPELLINGS = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
}


def _algorithm(parts: dict[str, tuple[int, ...]]) -> tuple[str, int | None]:
    """(per-layer algorithm label, rank) from one layer's tensor names and shapes, through the
    families' own vocabulary (:mod:`sdadapt.adapters.registry`)."""
    canonical = {_LORA_SPELLINGS.get(name, name): shape for name, shape in parts.items()}
    algo = algorithm_of_keys(canonical)
    if algo == "unknown":
        return "unknown", None
    try:
        rank, is_kxk = file_rank(canonical)
    except ValueError:  # a wrapper whose wrapped tensors are incomplete
        return algo, None
    if algo == "lora" and is_kxk:
        algo = "locon"
    return algo, rank


def _component(layer: str, kind: str) -> str:
    if kind in ("kohya-lora", "lycoris"):
        for prefix in ("lora_unet", "lora_te1", "lora_te2", "lora_te"):
            if layer.startswith(prefix + "_"):
                return {"lora_unet": "unet", "lora_te": "text_encoder", "lora_te1": "text_encoder", "lora_te2": "text_encoder_2"}[prefix]
    if kind == "peft-lora":
        return "model"
    return layer.split(".", 1)[0]


def _fmt(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:g}"
