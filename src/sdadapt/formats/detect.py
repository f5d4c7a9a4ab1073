"""What is this weights file? Classification from key names and metadata alone."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..adapters.registry import algorithm_of_keys, file_rank
from .bundled_embeddings import BUNDLE_PREFIX
from .embeddings import OUTPUT_KEYS, PARAM_KEYS
from .files import _check_is_file, read_safetensors_header, read_safetensors_scalars, sniff_format
from .comfy_lora import COMFY_PREFIXES, is_comfy_lora_keys
from .kohya import _component_of, _network_args, is_kohya_state
from .layers import split_key

__all__ = ["ADAPTER_KINDS", "FILE_KINDS", "KOHYA_LAYOUT_KINDS", "DyLoRANetwork", "detect_kind", "describe_file",
           "dylora_network"]

FILE_KINDS = (
    "kohya-lora",
    "lycoris",
    "kohya-oft",
    "diffusers-lora",
    "comfy-lora",
    "peft-lora",
    "peft-ia3",
    "custom-diffusion",
    "embedding",
    "aesthetic-embedding",
    "hypernetwork",
    "checkpoint",
    "unknown",
)

_CHECKPOINT_MARKERS = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.", "conditioner.", "down_blocks.", "encoder.down.", "encoder.conv_in.", "text_model.", "encoder.layers.", "input_blocks.")


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


#: what takes each kind of file (``inspect`` prints it as ``use:``)
_USES = {
    "kohya-lora": "generate --lora FILE:SCALE; merge-lora, resize-lora, combine-loras, convert",
    "lycoris": "generate --lora FILE:SCALE; merge-lora, resize-lora, combine-loras, convert",
    "kohya-oft": "generate --lora FILE:SCALE; train --network-weights FILE; merge-lora, resize-lora, convert",
    "diffusers-lora": "generate --lora FILE:SCALE; merge-lora, resize-lora, combine-loras, convert",
    "comfy-lora": "generate --lora FILE:SCALE; merge-lora, resize-lora, combine-loras, convert",
    "peft-lora": "generate --lora FOLDER:SCALE; convert --to kohya --component unet|text_encoder (then merge-lora, "
                 "resize-lora, combine-loras)",
    "peft-ia3": "generate --lora FOLDER:SCALE; convert --to kohya --component unet|text_encoder (then merge-lora)",
    "custom-diffusion": "generate --custom-diffusion FILE:SCALE; merge-custom-diffusion",
    "embedding": "generate --embedding FILE (the file name is the trigger word); convert",
    "aesthetic-embedding": "generate --aesthetic FILE",
    "hypernetwork": "generate --hypernetwork FILE:STRENGTH",
}


#: the kinds :func:`_adapter_summary` describes (layers, families, ranks, alphas)
#: the kinds kohya's layout holds (``lora_unet_…`` / ``oft_unet_…`` names, read by ``load_kohya``)
KOHYA_LAYOUT_KINDS = ("kohya-lora", "lycoris", "kohya-oft")
#: every adapter-file kind
ADAPTER_KINDS = (*KOHYA_LAYOUT_KINDS, "diffusers-lora", "comfy-lora", "peft-lora", "peft-ia3")
#: per-layer algorithms with no rank and no alpha: what ``ranks`` / ``alphas`` say instead
_UNRANKED = {"ia3": "IA3 vectors", "norm": "norm weight/bias offsets", "full": "full weight deltas"}


class DyLoRANetwork(NamedTuple):
    """What a file's training metadata says of its DyLoRA network (:func:`dylora_network`)."""

    #: ``"kohya networks.dylora"`` or ``"LyCORIS algo=dylora"``
    trainer: str
    #: the rows trained together (kohya's ``unit``, LyCORIS' ``block_size``): the file is a trained LoRA at every
    #: multiple of it; ``None`` when the metadata gives no positive int
    unit: int | None


def _positive_int(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        return None
    try:
        number = int(value)  # (kohya and LyCORIS read the network_args strings with int())
    except ValueError:
        return None
    return number if number > 0 else None


def dylora_network(metadata: Mapping[str, str]) -> DyLoRANetwork | None:
    """The DyLoRA network a LoRA file was trained as, from its kohya training metadata; ``None`` for any other file.

    A DyLoRA file holds plain ``lora_down`` / ``lora_up`` / ``alpha`` tensors (its keys cannot tell it from a
    LoRA); the metadata kohya's ``train_network.py`` writes can (``ss_network_module``, and ``ss_network_args``:
    the ``--network_args`` given, as strings, ``json.dumps``'d: sd-scripts@48d368fa train_network.py:664-668, 1204):

    * kohya's own DyLoRA: ``ss_network_module = "networks.dylora"``; ``unit`` from ``ss_network_args``, 1 when
      absent (``networks/dylora.py:193-205``: ``int(unit)`` if given, else 1);
    * LyCORIS' (``lycoris.kohya`` with ``algo=dylora``, which LyCORIS lowercases): the unit is ``block_size``,
      4 when absent or empty (LyCORIS@f49d30d ``lycoris/kohya.py:47, 55``: ``int(kwargs.get("block_size", None)
      or 4)``).

    Example: ``dylora_network({"ss_network_module": "networks.dylora", "ss_network_args": '{"unit": "4"}'})``
    is ``DyLoRANetwork("kohya networks.dylora", 4)``.
    """
    module = str(metadata.get("ss_network_module", ""))
    if module != "networks.dylora" and not module.startswith("lycoris"):
        return None
    # (absent: the defaults; malformed or not an object: a DyLoRA file whose unit is unknown)
    args = _network_args(metadata) if metadata.get("ss_network_args") else {}
    if module == "networks.dylora":
        return DyLoRANetwork("kohya networks.dylora", _positive_int(args.get("unit", 1)) if args is not None else None)
    if args is None or str(args.get("algo", "")).lower() != "dylora":
        return None
    return DyLoRANetwork("LyCORIS algo=dylora", _positive_int(args.get("block_size") or 4))


def _suffix(key: str) -> str:
    return key.split(".", 1)[1] if "." in key else ""


#: the tensor names of a peft LoRA layer (``<layer>.lora_A.weight`` ...), as diffusers' ``save_lora_adapter`` writes them,
#: and of diffusers' older UNet-only files (``save_attn_procs``: ``…processor.to_q_lora.up.weight``, ``….lora.up.weight``,
#: ``….lora_linear_layer.up.weight``, no ``unet.`` prefix), which ComfyUI's loader reads too
_BARE_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight", ".lora_magnitude_vector", "_lora.down.weight",
                       "_lora.up.weight", ".lora.down.weight", ".lora.up.weight", ".lora_linear_layer.down.weight",
                       ".lora_linear_layer.up.weight")


def detect_kind(keys: list[str], metadata: Mapping[str, str]) -> str:
    """Classify by keys/metadata; one of :data:`FILE_KINDS`."""
    keys = [k for k in keys if not k.startswith(BUNDLE_PREFIX)] or keys  # (a LoRA's bundled embeddings: not its kind)
    if not keys:
        return "unknown"
    if metadata.get("format") == "sdadapt-toy/1":  # the shipped toy model and its fine-tunes (save_toy)
        return "checkpoint"
    key_set = set(keys)
    if any("custom_diffusion" in k for k in keys):
        return "custom-diffusion"
    if is_kohya_state(dict.fromkeys(keys)):  # type: ignore[arg-type]
        layers: dict[str, set[str]] = {}
        for key in keys:
            layers.setdefault(key.split(".", 1)[0], set()).add(_suffix(key))
        module = metadata.get("ss_network_module", "")
        if module == "networks.oft" or all(k.startswith("oft_") for k in keys):
            return "kohya-oft"  # kohya's own OFT (sd-scripts networks/oft.py: oft_unet_*, OFT_PREFIX_UNET)
        plain = ("lora", "unknown")  # anything else (LoHa, Tucker, DoRA ...) is a LyCORIS file
        if module.startswith("lycoris") or any(
            algorithm_of_keys(names) not in plain for names in layers.values()
        ):
            return "lycoris"
        return "kohya-lora"
    if any(k.startswith("base_model.model.") for k in keys) and any(k.endswith(".ia3_l") for k in keys):
        return "peft-ia3"  # (peft's IA3Config: one ia3_l vector per layer)
    if any(k.startswith("base_model.model.") for k in keys) and any(
        "lora_" in k or ".hada_" in k or ".lokr_" in k for k in keys
    ):
        return "peft-lora"  # (also peft's LoHa / LoKr: LyCORIS' tensor names, the scale in adapter_config.json)
    if any(k.split(".", 1)[0] in ("unet", "text_encoder", "text_encoder_2") for k in keys) and any(
        ("lora" in k) for k in keys
    ):
        return "diffusers-lora"
    if all(k.endswith(_BARE_PEFT_SUFFIXES) for k in keys):
        return "diffusers-lora"  # (one model's adapter without a component: diffusers' model-level save_lora_adapter)
    if is_comfy_lora_keys(keys):
        return "comfy-lora"  # (ComfyUI's "Extract and Save Lora": diffusion_model.* / text_encoders.clip_*.*)
    if key_set in ({"aesthetic_embedding"}, {""}):  # sdadapt's .safetensors; the A1111 extension's .pt: a bare tensor
        return "aesthetic-embedding"
    if (any(k.startswith("string_to_param") for k in keys) or key_set == {"clip_l", "clip_g"}
            or len(key_set) == 1 and key_set <= set(PARAM_KEYS)):
        return "embedding"  # (emp_params: OneTrainer's SD1/SD2 saver)
    if key_set & OUTPUT_KEYS and key_set <= OUTPUT_KEYS | {*PARAM_KEYS, "clip_l", "clip_g"}:
        return "embedding"  # (OneTrainer's output embeddings: load_embedding says why they cannot be used)
    if any(k.split(".", 1)[0].isdigit() and (".linear." in k or ".linear1." in k) for k in keys):
        return "hypernetwork"  # A1111: "<width>.<0|1>.linear.<i>.*" (old files: linear1/linear2)
    if any(k.startswith(_CHECKPOINT_MARKERS) for k in keys) or any(k.startswith("state_dict.") for k in keys):
        return "checkpoint"
    if len(keys) == 1 or len(keys) <= 2 and all("." not in k for k in keys):
        return "embedding"  # diffusers concept file {token: tensor}
    return "unknown"


def describe_file(path: str | os.PathLike) -> dict:
    """A JSON-able summary: kind, modules, ranks, alphas, dtypes, size, metadata.

    Bounded work, whatever the file claims: safetensors files are summarised from their validated
    header (no tensor data is read except the 0-dim alphas); legacy pickles from their pickle
    stream alone, run through a restricted unpickler that reads no tensor data, imports nothing
    and refuses code (:func:`sdadapt.formats.pickles.pickle_header`).
    """
    from .header import _no_gc

    with _no_gc():  # ~10 objects per tensor, none cyclic: the collector's passes would dominate
        return _describe(Path(path))


def _describe(file: Path) -> dict:
    from .pickles import pickle_header, pickle_scalars

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
        found = pickle_header(file)
        metadata = dict(found.extras)
        for key, stub in found.tensors.items():
            shapes[key] = stub.shape
            dtypes[stub.dtype] += 1
        alpha_stubs = {k: v for k, v in found.tensors.items() if k.endswith(".alpha")}
        tensors = {k: torch.tensor(v) for k, v in pickle_scalars(file, alpha_stubs).items()} if alpha_stubs else {}
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
    if kind in ADAPTER_KINDS:
        summary.update(_adapter_summary(file, shapes, tensors, kind, metadata))
    if kind == "hypernetwork":
        summary.update(_hypernetwork_summary(keys, metadata))
    if kind == "checkpoint":
        summary.update(_checkpoint_summary(shapes, metadata))
    if kind == "aesthetic-embedding":
        summary["dims"] = {"image embedding": shapes[keys[0]][-1] if shapes[keys[0]] else 0}
    if kind in _USES:
        summary["use"] = _USES[kind]
    if kind in KOHYA_LAYOUT_KINDS:  # (a DyLoRA file: its keys are a LoRA's, its metadata tells)
        summary.update(_dylora_summary(summary, metadata))
    if kind == "embedding":  # trigger word, vectors, widths, encoders, which tool wrote it
        from .embeddings import embedding_summary

        summary.update(embedding_summary(file, shapes, metadata))
    return summary


_VAE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "first_stage_model.")
_TEXT_PREFIXES = ("text_model.", "encoder.layers.", "embeddings.", "final_layer_norm.", "text_projection.",
                  "logit_scale", "cond_stage_model.", "conditioner.")
_UNET_ONLY = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in.", "conv_out.", "conv_norm_out.", "time_embedding.",
              "add_embedding.", "model.diffusion_model.", "input_blocks.", "output_blocks.", "middle_block.", "out.",
              "time_embed.", "label_emb.")


def _checkpoint_summary(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> dict:
    """Which model a whole checkpoint is: sdadapt's toy (``format: sdadapt-toy/1``), else SD1/SD2/SDXL,
    or one component of one (a VAE, a text encoder, a UNet); and what takes it."""
    if metadata.get("format") == "sdadapt-toy/1":
        return {"model": "sdadapt toy text-to-image model (32x32, load with --model FILE or sdadapt.toy.load_toy)",
                "use": "--model FILE (generate, train, invert)"}
    from .model_keys import KeyMapError, checkpoint_architecture

    shapes = {k.removeprefix("state_dict."): v for k, v in shapes.items()}  # (a .ckpt's {"state_dict": ...})
    keys = list(shapes)
    if all(k.startswith(_VAE_PREFIXES) for k in keys) and not all(k.startswith("encoder.layers.") for k in keys):
        return {"model": "a VAE alone (AutoencoderKL)", "use": "generate --vae FILE, train --vae FILE"}
    names = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}
    try:
        architecture = checkpoint_architecture(shapes)
    except KeyMapError:
        if all(k.startswith(_TEXT_PREFIXES) for k in keys):
            return {"model": "a text encoder alone (CLIP)"}
        return {}
    if all(k.startswith(_UNET_ONLY) for k in keys):
        return {"model": f"a {names[architecture]} UNet alone ({architecture})",
                "use": "merge, merge-lora BASE, extract-lora (UNet only); --model needs a whole checkpoint or folder"}
    from .model_keys import is_sdxl_refiner

    if architecture == "sdxl" and is_sdxl_refiner(keys):  # (OpenCLIP-bigG alone, at conditioner.embedders.0.model.)
        return {"model": "Stable Diffusion XL refiner (sdxl)",
                "use": "--model FILE (generate, usually with --init-image); merge, convert"}
    from .unclip import unclip_variant

    unclip = unclip_variant(shapes) if architecture == "sd2" else None
    if unclip is not None:  # (SD 2.1 unCLIP)
        variant = "L (OpenAI ViT-L/14; needs karlo's ViT-L-14_stats.th: --clip-stats)" if unclip == "l" else \
            "H (OpenCLIP ViT-H-14)"
        return {"model": f"Stable Diffusion 2.1 unCLIP, {variant} (sd2, v-prediction, label_emb)",
                "use": "--model FILE (generate: img2img as A1111's image variation; clip-invert); convert"}
    from .edm import has_edm_stats

    if architecture == "sdxl" and has_edm_stats(keys):  # (edm_mean / edm_std: ComfyUI's and diffusers' test)
        return {"model": "Playground v2.5: SDXL layout in the EDM formulation (sdxl, edm_mean / edm_std)",
                "use": "--model FILE (generate --sampler dpmsolver++ or euler); merge with EDM models only, convert"}
    from .prediction_markers import EDM_V_KEYS, markers_said

    if any(k in keys for k in EDM_V_KEYS):  # (ComfyUI's EDM v-prediction markers: CosXL)
        return {"model": f"{names[architecture]} layout in the EDM v-prediction formulation (CosXL; "
                         f"{' / '.join(k for k in EDM_V_KEYS if k in keys)})",
                "use": "--model FILE (generate --sampler euler or dpmsolver++: the EDM v-prediction formulation, σ_data 1, "
                       "as ComfyUI samples it); convert"}
    said = markers_said(keys)
    return {"model": f"{names[architecture]} ({architecture}{', ' + said if said else ''})",
            "use": "--model FILE (generate, train, invert); merge, merge-lora BASE, extract-lora, convert"}


def _hypernetwork_summary(keys: list[str], metadata: Mapping[str, str]) -> dict:
    """Context widths and the A1111 settings that shape the MLPs (metadata values are JSON)."""
    from .header import load_json

    out: dict = {"widths": list(dict.fromkeys(int(k.split(".", 1)[0]) for k in keys if k.split(".", 1)[0].isdigit()))}
    for key in ("layer_structure", "activation_func", "is_layer_norm", "activate_output", "dropout_structure"):
        if key in metadata:
            try:
                out[key] = load_json(metadata[key], source=key, what="hypernetwork metadata", max_depth=8)
            except ValueError:
                out[key] = metadata[key]
    return out


def _adapter_summary(
    file: Path, shapes: dict[str, tuple[int, ...]], tensors, kind: str, metadata: Mapping[str, str] | None = None
) -> dict:
    modules: dict[str, dict[str, tuple[int, ...]]] = {}
    bundled = sorted({key.split(".", 2)[1] for key in shapes if key.startswith(BUNDLE_PREFIX) and key.count(".") >= 2})
    from .mixed_lora import diffusers_spelling, is_mixed_lora

    file_keys: dict[str, str] = {}  # (a mixed kohya + diffusers file: its keys spelled one way, and the file's names)
    if is_mixed_lora(shapes):
        file_keys = diffusers_spelling(shapes)
        shapes = {key: shapes[name] for key, name in file_keys.items()}
        tensors = None if tensors is None else {key: tensors[name] for key, name in file_keys.items()}
        kind = "diffusers-lora"
    shapes = {key: shape for key, shape in shapes.items() if not key.startswith(BUNDLE_PREFIX)}  # (not layers)
    for key, shape in shapes.items():
        layer, _, suffix = (key.partition(".") if kind in KOHYA_LAYOUT_KINDS else _split_comfy(key)
                            if kind == "comfy-lora" else _split_diffusers(key))
        modules.setdefault(layer, {})[suffix] = shape
    ranks: Counter[int] = Counter()
    algorithms: Counter[str] = Counter()
    components: Counter[str] = Counter()
    layer_ranks: dict[str, int | None] = {}
    rankless: Counter[str] = Counter()  # (IA)³ vectors, norm offsets, full deltas: no rank and no alpha
    rotations: Counter[str] = Counter()  # OFT layers: rotation blocks, no rank; their alpha is the COFT constraint
    oft_layers: list[str] = []
    for layer, parts in modules.items():
        algo, rank = _algorithm(parts)
        if algo == "oft":  # LyCORIS names the layout (algo diag-oft / boft); kohya's networks.oft is its own
            blocks = parts.get("oft_blocks", parts.get("oft_diag", ()))
            layout = "boft" if len(blocks) == 4 else "diag-oft"
            algo = "kohya-oft" if kind == "kohya-oft" else layout
        algorithms[algo] += 1
        if algo in _UNRANKED:
            rankless[algo] += 1
            components[_component(layer, kind)] += 1
            continue
        if algo in ("diag-oft", "boft", "kohya-oft"):
            rotations[f"none (OFT rotations: {layout} blocks of {blocks[-1] if blocks else '?'})"] += 1
            oft_layers.append(layer)
            components[_component(layer, kind)] += 1
            continue
        layer_ranks[layer] = rank
        if rank is not None:
            ranks[rank] += 1
        components[_component(layer, kind)] += 1
    alphas: Counter[str] = Counter()
    alpha_keys = {k[: -len(".alpha")]: k for k in shapes if k.endswith(".alpha")}
    values: dict[str, float] = {}
    if alpha_keys and tensors is not None:
        values = {layer: float(tensors[key]) for layer, key in alpha_keys.items() if key in tensors}
    elif alpha_keys:
        wanted = {file_keys.get(key, key): layer for layer, key in alpha_keys.items() if _is_scalar(shapes[key])}
        for key, value in read_safetensors_scalars(file, list(wanted)).items():
            values[wanted[key]] = value  # other dtypes: reported as "absent"
    configs = _peft_configs(file, kind, metadata or {}) if kind in ("diffusers-lora", "peft-lora") else None  # (IA3: no alphas)
    for layer, rank in layer_ranks.items():
        alpha = values.get(layer)
        if alpha is None and configs and rank is not None:
            alpha = _config_alpha(configs, layer, rank, kind)
        if alpha is not None:
            alphas[_fmt(alpha)] += 1
        else:  # an alpha tensor sdadapt did not read (old-format pickle) is not an absent one
            alphas["in the file (not read)" if layer in alpha_keys else "absent (alpha = rank)"] += 1
    for algo, count in rankless.items():
        alphas[f"none ({_UNRANKED[algo]})"] = count
    for layer in oft_layers:  # an OFT's alpha bounds ‖Q‖ (c = alpha · out; 0 or absent: none), it scales nothing
        alpha = values.get(layer)
        alphas[f"constraint {_fmt(alpha)} (OFT)" if alpha else "no constraint (OFT)"] += 1
    families = sorted({_family_label(a) for a in algorithms if a != "unknown"})
    return {
        "modules": len(modules),
        "components": dict(components),
        "family": families[0] if len(families) == 1 else ("mixed: " + ", ".join(families) if families else "unknown"),
        "algorithms": dict(algorithms),
        "ranks": {**{str(k): v for k, v in sorted(ranks.items())},
                  **({"unfactored (full matrix, e.g. a small LoKr factor)": unranked} if (unranked := sum(
                      1 for r in layer_ranks.values() if r is None) - algorithms.get("unknown", 0)) > 0 else {}),
                  **{f"none ({_UNRANKED[a]})": n for a, n in rankless.items()}, **rotations},
        "alphas": dict(alphas),
        **({"bias_deltas": biases} if (biases := sum("diff_b" in parts for parts in modules.values())) else {}),
        # (embeddings the file bundles: generate loads them with the LoRA, as A1111; sdadapt.formats.bundled_embeddings)
        **({"bundled_embeddings": bundled} if bundled else {}),
    }


def _dylora_summary(summary: Mapping, metadata: Mapping[str, str]) -> dict:
    """A DyLoRA file's report (:func:`dylora_network` reads its metadata): its LoRA/LoCon layers are ``dylora``
    layers of that family, and ``dylora`` says which network trained it, its unit and the ranks it was trained at;
    ``{}`` for any other file, or one whose layers are not all LoRA/LoCon."""
    network = dylora_network(metadata)
    algorithms = dict(summary.get("algorithms") or {})
    if network is None or not algorithms or set(algorithms) - {"lora", "locon"}:
        return {}
    unit = network.unit
    ranks = sorted(int(r) for r in summary.get("ranks", {}) if str(r).isdigit())
    trained = ("unknown (no unit in ss_network_args)" if unit is None else
               f"every multiple of {unit}" + (f" up to {ranks[-1]}" if len(ranks) == 1 else ""))
    info: dict = {"trained by": network.trainer, "unit": unit if unit is not None else "unknown",
                  "trained ranks": trained}
    if network.trainer.startswith("LyCORIS"):  # (docs/lycoris.md: its training forward scaled alpha·block_size/r)
        info["strength"] = (f"apply at {unit} (its block_size) for its training forward's scale"
                            if unit is not None else "its training forward's scale needs its block_size")
    use = "generate --lora FILE:SCALE (<lora:NAME:M:dyn=r>: its first r ranks); cut-dylora FILE --rank r; " \
          "merge-lora, resize-lora, combine-loras, convert"
    return {"family": "dylora", "algorithms": {"dylora": sum(algorithms.values())}, "dylora": info, "use": use}


def _is_scalar(shape: tuple[int, ...]) -> bool:
    n = 1
    for size in shape:
        n *= size
    return n == 1


def _peft_configs(file: Path, kind: str, metadata: Mapping[str, str]) -> dict[str, dict]:
    """``{component: peft LoraConfig dict}`` that scales a diffusers file / peft adapter ("" for peft)."""
    from .header import load_json

    try:
        if kind == "peft-lora":
            config_file = file.parent / "adapter_config.json"
            if not config_file.is_file() or config_file.stat().st_size > 16 << 20:
                return {}
            return {"": load_json(config_file.read_bytes(), source=str(config_file), what="adapter_config.json")}
        config_all = load_json(metadata.get("lora_adapter_metadata") or "{}", source=str(file),
                               what="lora_adapter_metadata")
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
    from ..patterns import PatternError
    from .diffusers import _pattern_value

    if kind == "peft-lora":
        component, name = "", layer[len("base_model.model.") :] if layer.startswith("base_model.model.") else layer
    else:
        component, _, name = layer.partition(".")
    config = configs.get(component)
    if not isinstance(config, dict) or not config:
        return None
    try:
        default = config.get("lora_alpha", config.get("alpha", rank))  # (LoraConfig's lora_alpha; LoHa/LoKr's alpha)
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, name, default))  # type: ignore[arg-type]
    except (TypeError, ValueError, AttributeError, OverflowError, PatternError):
        return None  # a malformed config or pattern: report the alpha as unknown rather than fail
    if config.get("use_rslora"):
        alpha = alpha * rank / rank**0.5
    return alpha


def _split_comfy(key: str) -> tuple[str, str, str]:
    """A ComfyUI LoRA key as ``(layer, ".", tensor name)``."""
    layer, tensor = split_key(key)
    return layer, ".", tensor


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
    "ia3_l": "on_input",  # peft's (IA)³ vector: (IA)³'s marker key names the family
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
    if kind in KOHYA_LAYOUT_KINDS and (found := _component_of(layer)) is not None:  # (kohya's prefixes)
        return found[0]
    if kind in ("peft-lora", "peft-ia3"):
        return "model"
    if kind == "comfy-lora":
        return next((name for prefix, name in COMFY_PREFIXES.items() if layer.startswith(prefix)), "unknown")
    return layer.split(".", 1)[0]


def _fmt(value: float) -> str:
    return str(int(value)) if value.is_integer() else f"{value:g}"
