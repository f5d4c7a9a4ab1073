"""kohya sd-scripts LoRA / LoCon files (also what A1111, ComfyUI and LyCORIS read and write).

Key = ``<prefix>_<layer path with "." -> "_">.<tensor>``; prefixes ``lora_unet``, ``lora_te``
(SD1/SD2 text encoder), ``lora_te1`` / ``lora_te2`` (SDXL's two text encoders). Tensors
``lora_down.weight`` (r, in[, kh, kw]), ``lora_up.weight`` (out, r[, 1, 1]) and a 0-dim ``alpha``
(scale = alpha / r; absent means alpha = r). sdadapt writes and returns ``alpha`` as float32 (files from
``diffusers.utils.convert_state_dict_to_kohya`` hold int64 alphas, half-precision files fp16 ones).

The trap: SD1/SD2 files name UNet layers with **diffusers** paths
(``lora_unet_down_blocks_0_attentions_0_...``) while SDXL files use **LDM** paths
(``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``). :func:`from_kohya` returns
canonical diffusers paths either way, :func:`to_kohya` writes each base model's convention.

LyCORIS files (``lycoris.kohya``) use the same prefixes and paths with their own tensor names:
``hada_w1_a/b``, ``hada_w2_a/b`` (+ ``hada_t1/t2``) for LoHa, ``lokr_w1[_a/_b]``,
``lokr_w2[_a/_b]`` (+ ``lokr_t2``) for LoKr, ``lora_mid.weight`` for Tucker LoCon, ``diff`` /
``diff_b`` for full deltas, ``weight`` + ``on_input`` for (IA)³, ``oft_blocks`` (+ ``rescale``; ``alpha`` is the
COFT constraint there) for Diag-OFT / BOFT, ``a1/a2/b1/b2.weight`` (+ ``bm.weight``, LyCORIS 3.0.0's
Tucker core) for GLoRA, ``w_norm`` / ``b_norm`` for norm modules (``train_norm``) and ``dora_scale``
next to any of them for DoRA. kohya's own OFT
files (``oft_unet_<layer>.oft_blocks`` / ``.alpha``) are read as Diag-OFT; a state in kohya's layout
(:func:`kohya_oft_dim_alpha`, which LyCORIS cannot load) is written back with ``oft_unet_`` and
``ss_network_module = "networks.oft"``, any other OFT state as LyCORIS' ``lora_unet_``. They pass through
unchanged (exact keys, exact bits; ``alpha`` as float32); :func:`kohya_metadata` then records
``ss_network_module = "lycoris.kohya"`` and the ``algo``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
import time
from datetime import datetime

import torch
from torch import Tensor

from ..adapters.registry import algorithm_of_keys, file_keys, file_rank, lycoris_algo_of_keys
from ..errors import InputError
from ..model_args import check_components
from .bundled_embeddings import without_bundled
from .files import (
    WeightFileError,
    check_finite,
    check_finite_output,
    check_safetensors_name,
    read_weights,
    write_safetensors,
)
from .layers import canonical_layer_path, canonical_state, split_key, underscore_to_path
from .unet_names import attention_up_blocks, diffusers_to_ldm_unet

__all__ = [
    "BASE_MODELS",
    "to_kohya",
    "from_kohya",
    "is_kohya_state",
    "kohya_metadata",
    "kohya_hashes",
    "carried_metadata",
    "metadata_base_model",
    "kohya_oft_dim_alpha",
    "modelspec_date",
    "NETWORK_METADATA",
    "STALE_METADATA",
    "save_kohya",
    "load_kohya",
    "cast_factors",
]

#: base model -> (ss_base_model_version, ss_v2, modelspec architecture, implementation)
BASE_MODELS: dict[str, tuple[str, str, str, str]] = {
    "sd1": ("sd_v1", "False", "stable-diffusion-v1/lora", "diffusers"),
    "sd2": ("sd_v2", "True", "stable-diffusion-v2-512/lora", "diffusers"),
    "sd2-v": ("sd_v2_v", "True", "stable-diffusion-v2-768-v/lora", "diffusers"),
    "sdxl": (
        "sdxl_base_v1-0",
        "False",
        "stable-diffusion-xl-v1-base/lora",
        "https://github.com/Stability-AI/generative-models",
    ),
}

#: the four keys that say what network the file holds (kohya's train_network.py writes them from its arguments)
NETWORK_METADATA: tuple[str, ...] = ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args")
#: metadata a file written from another never inherits: the sshs hashes, which kohya recomputes on every save
#: (train_util.precalculate_safetensors_hashes), hashes of the old bytes, the writing tool's version, and the
#: container formats' own keys (a diffusers file's peft config, safetensors' ``format``)
STALE_METADATA: frozenset[str] = frozenset({
    "sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256", "modelspec.implementation_version",
    "lora_adapter_metadata", "format",
})
# base-model keys, rewritten when the file is written for another base model than its metadata says
_BASE_METADATA = ("ss_v2", "ss_base_model_version", "modelspec.architecture", "modelspec.implementation",
                  "modelspec.resolution", "modelspec.prediction_type")
# ss_network_args entries that describe the network's shape (ranks, factorisation) rather than its training: a
# re-factored file (resize) gets them from its tensors, keeping only the others (dropout, preset, lr ratios ...)
_SHAPE_ARGS = frozenset({
    "conv_dim", "conv_alpha", "block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas", "unit",
    "block_size", "algo", "use_tucker", "use_cp", "dora_wd", "wd_on_output", "factor", "decompose_both",
    "full_matrix", "use_scalar", "constraint", "rescaled", "train_norm", "bypass_mode", "rank_dropout_scale",
})
# kohya network modules whose files hold plain lora_down/lora_up/alpha layers (networks/lora.py, dylora.py,
# lora_fa.py), and LyCORIS algos that write the same layout (lycoris/modules/locon.py, dylora.py)
_LORA_LAYOUT_MODULES = frozenset({"networks.lora", "networks.dylora", "networks.lora_fa"})
_LORA_LAYOUT_ALGOS = frozenset({"lora", "locon", "dylora"})
_ALGO_ALIASES = {"locon": "lora", "diff": "full", "oft": "diag-oft"}

_PREFIX_TO_COMPONENT = {
    "lora_unet": "unet",
    "oft_unet": "unet",  # kohya's networks.oft (UNet only; written back so when LyCORIS cannot load it)
    "lora_te": "text_encoder",
    "lora_te1": "text_encoder",
    "lora_te2": "text_encoder_2",
    # LyCORIS' own wrapper (lycoris.create_lycoris + save_weights, SimpleTuner's files): diffusers UNet paths under
    # LycorisNetwork.LORA_PREFIX "lycoris" (ComfyUI reads them as the UNet's: comfy/lora.py model_lora_keys_unet)
    "lycoris": "unet",
}


def _prefixes(base_model: str) -> dict[str, str]:
    if base_model == "sdxl":
        return {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    return {"unet": "lora_unet", "text_encoder": "lora_te"}


def _check_base_model(base_model: str) -> None:
    if base_model not in BASE_MODELS:
        raise ValueError(f"base_model must be one of {sorted(BASE_MODELS)}, got {base_model!r}")


#: The text-context width of the UNet's cross-attention K/V inputs: SD1 768, SD2 1024, SDXL 2048.
_CONTEXT_WIDTHS = {"sd1": 768, "sd2": 1024, "sd2-v": 1024, "sdxl": 2048}


def _check_context_width(unet_state: Mapping[str, Tensor], base_model: str) -> None:
    """Refuse an SDXL UNet LoRA written as SD1/SD2 (or the reverse): the UNet names would be the wrong
    family's (kohya's SDXL files use LDM names) and its metadata the wrong model's. (Some loaders map either
    naming — ComfyUI reads diffusers-style names for any UNet — but the file would follow no SDXL tool's naming.)

    The width is read from a LoRA ``attn2.to_k``/``to_v`` down weight ``(r, context width)``; only SDXL's
    2048 is decided on (SD1 768 vs SD2 1024 write the same names), and states without such a layer pass.
    """
    widths = {
        int(value.shape[1])
        for key, value in unet_state.items()
        if re.search(r"attn2\.to_[kv]\.lora_down\.weight$", key) and value.dim() >= 2
    }
    sdxl_width = _CONTEXT_WIDTHS["sdxl"]
    if base_model != "sdxl" and sdxl_width in widths:
        raise ValueError(
            f"the UNet LoRA's cross-attention takes {sdxl_width}-wide text states (SDXL) but base_model={base_model!r}: "
            "pass base_model='sdxl' (on the command line --base-model sdxl; kohya's SDXL files use LDM layer names, and "
            "written with SD1's names the file would follow no SDXL tool's naming and its metadata would name the wrong model)"
        )
    if base_model == "sdxl" and widths and widths <= {768, 1024}:
        raise ValueError(
            f"the UNet LoRA's cross-attention takes {min(widths)}-wide text states (SD1/SD2), not SDXL's "
            f"{sdxl_width}: pass base_model='sd1' (or 'sd2' / 'sd2-v' for 1024; on the command line --base-model)"
        )


def to_kohya(
    components: Mapping[str, Mapping[str, Tensor]],
    *,
    base_model: str = "sd1",
    up_blocks_with_attention: set[int] | None = None,
    layers_per_block: int = 2,
) -> dict[str, Tensor]:
    """Canonical component states -> one flat kohya state dict.

    Args:
        components: ``{"unet": state, "text_encoder": state[, "text_encoder_2": state]}`` with
            canonical (or live) layer paths, e.g. from ``AdapterHandle.state_dict()``.
        base_model: ``"sd1"``, ``"sd2"``, ``"sd2-v"`` or ``"sdxl"`` (decides UNet naming and
            text-encoder prefixes).
        up_blocks_with_attention: for SDXL-style LDM naming of upsamplers; derived from the
            state's own paths when ``None``.
        layers_per_block: resnets per down block of the UNet the LoRA is for (the LDM block
            arithmetic of SDXL names and of LDM-named live paths; 2 in SD1/SD2/SDXL).

    Raises:
        ValueError: unknown base model or component.
        InputError: (IA)³ vectors read from a peft adapter without its model (``scales_bias``,
            :mod:`sdadapt.formats.peft_ia3`): no kohya/LyCORIS file can say that peft scales a bias.
    """
    check_components(components, caller="to_kohya")
    _check_base_model(base_model)
    _check_context_width(components.get("unet") or {}, base_model)
    prefixes = _prefixes(base_model)
    if kohya_oft_dim_alpha(components) is not None:  # kohya's own OFT layout keeps kohya's prefix
        prefixes["unet"] = "oft_unet"
    out: dict[str, Tensor] = {}
    for component, state in components.items():
        if component not in prefixes:
            sdxl = " (an SDXL LoRA: pass base_model='sdxl')" if component == "text_encoder_2" else ""
            raise ValueError(
                f"component {component!r} has no kohya prefix for base_model={base_model!r}{sdxl}; "
                f"use one of {sorted(prefixes)}"
            )
        _refuse_peft_bias_scaling(component, state)
        canonical = canonical_state(component, state, layers_per_block=layers_per_block)
        layers = [split_key(k)[0] for k in canonical]
        up_attention = up_blocks_with_attention
        if up_attention is None and base_model == "sdxl":
            up_attention = attention_up_blocks(layers) or {0, 1}
        for key, value in canonical.items():
            layer, suffix = split_key(key)
            if component == "unet" and base_model == "sdxl":
                layer = diffusers_to_ldm_unet(
                    layer, layers_per_block=layers_per_block, up_blocks_with_attention=up_attention
                ) or layer
            if suffix == "alpha":
                value = value.to(torch.float32)
            out[f"{prefixes[component]}_{layer.replace('.', '_')}.{suffix}"] = value
    return out


def kohya_oft_dim_alpha(components: Mapping[str, Mapping[str, Tensor]]) -> tuple[int, float] | None:
    """``(dim, alpha)`` (the most common blocks per layer and constraint) when ``components`` is kohya's own
    OFT (``networks.oft``): UNet layers only, each a Diag-OFT ``oft_blocks`` ``(n, b, b)`` (+ ``alpha``, no
    ``rescale``), some with ``b > n``; else ``None``.

    kohya splits a layer into ``dim`` blocks (``b = out / dim``, 80x80 blocks for dim 4 on 320 rows); LyCORIS
    rebuilds a file's layer as ``factorization(out, b)`` blocks with ``b <= n`` and cannot load ``b > n``
    (shape mismatch). Such a state is written with kohya's ``oft_unet_`` prefix and ``ss_network_module =
    networks.oft``, as kohya wrote it, so kohya's ``--network_weights`` reads it back.
    """
    if {component for component, state in components.items() if state} != {"unet"}:
        return None
    layers: dict[str, dict[str, Tensor]] = {}
    for key, value in components["unet"].items():
        layer, suffix = split_key(key)
        layers.setdefault(layer, {})[suffix] = value
    shapes: dict[tuple[int, float], int] = {}
    kohya_layout = False
    for tensors in layers.values():
        blocks = tensors.get("oft_blocks")
        if blocks is None or blocks.dim() != 3 or set(tensors) - {"oft_blocks", "alpha"}:
            return None
        kohya_layout |= blocks.shape[-1] > blocks.shape[0]
        key = (int(blocks.shape[0]), float(tensors["alpha"]) if "alpha" in tensors else 0.0)
        shapes[key] = shapes.get(key, 0) + 1
    return max(shapes, key=shapes.get) if kohya_layout else None


def _refuse_peft_bias_scaling(component: str, state: Mapping[str, Tensor]) -> None:
    """Refuse peft (IA)³ vectors whose bias scaling is unresolved (``<layer>.scales_bias``).

    The marker is sdadapt's own, in memory only: LyCORIS/A1111/ComfyUI do not know the key, and
    without it the vector means LyCORIS' (IA)³, which leaves a bias alone — another output on a
    biased layer. Resolving it needs the layer, so the fix goes through the model.
    """
    layers = sorted(key[: -len(".scales_bias")] for key in state if key.endswith(".scales_bias"))
    if layers:
        raise InputError(
            f"{component}: {len(layers)} (IA)³ layer(s) come from a peft adapter read without its model, e.g. "
            f"{layers[:3]}: peft scales an output-scaled layer's bias too (y = (W x + b) * ia3_l), which a kohya/LyCORIS "
            "file cannot say (its (IA)³ leaves the bias alone). Load the adapter onto its model first — "
            "handle = sdadapt.load_adapter(model, state) (exact on bias-free layers, refused on biased ones) — and "
            "save handle.state_dict(); or keep it a peft adapter (save_peft / convert --to peft)."
        )


def is_kohya_state(state: Mapping[str, Tensor]) -> bool:
    """True when every key starts with a kohya prefix (``lora_unet_``, ``lora_te*_``; kohya OFT's ``oft_unet_``;
    LyCORIS' wrapper's ``lycoris_``)."""
    return bool(state) and all(k.split("_", 2)[0] in ("lora", "oft", "lycoris") and _component_of(k) is not None
                               for k in state)


def _component_of(key: str) -> tuple[str, str] | None:
    name = key.split(".", 1)[0]
    for prefix in sorted(_PREFIX_TO_COMPONENT, key=len, reverse=True):
        if name.startswith(prefix + "_"):
            return _PREFIX_TO_COMPONENT[prefix], name[len(prefix) + 1 :]
    return None


def _unread_form(keys: list[str]) -> str:
    """What a file of these unread keys is, when their names tell (``""`` otherwise)."""
    if any(k.endswith(".magnitude") for k in keys):
        return (": '.magnitude' tensors are ai-toolkit's DoRA (its toolkit/models/DoRA.py), which stores no alpha: "
                "its LoRA part's scale is not in the file, so no loader can rebuild the adapter it trained")
    if any(k.endswith((".q_layer.weight", ".p_layer.weight", ".lambda_layer")) for k in keys):
        return (": 'q_layer' / 'p_layer' / 'lambda_layer' are LyCORIS' T-LoRA (algo tlora), whose rank depends on the "
                "timestep; train a LoRA / LoCon / LoKr for a file the UIs and sdadapt read")
    return ""


def _diffusers_kohya_spelling(name: str, suffix: str, value: Tensor) -> tuple[str, str, Tensor]:
    """A key of diffusers' ``convert_state_dict_to_kohya`` as kohya spells it: the files diffusers' SDXL DreamBooth
    LoRA script writes with ``--output_kohya_format`` keep peft's ``<layer>_lora.down.weight`` / ``_lora.up.weight``
    on the UNet (-> ``<layer>.lora_down.weight``) and half-convert DoRA's magnitudes, ``<prefix>.<rest>.
    lora_magnitude_vector`` (out,) (-> ``<prefix>_<rest>.dora_scale`` (out, 1), peft's per-output-row norm)."""
    if suffix in ("down.weight", "up.weight") and name.endswith("_lora"):
        return name[: -len("_lora")], f"lora_{suffix}", value
    if suffix == "lora_magnitude_vector" or suffix.endswith(".lora_magnitude_vector"):
        rest = suffix[: -len("lora_magnitude_vector")].rstrip(".")
        full = f"{name}_{rest.replace('.', '_')}" if rest else name
        return full, "dora_scale", value.reshape(-1, 1) if value.dim() == 1 else value
    return name, suffix, value


def from_kohya(
    state: Mapping[str, Tensor], *, source: str = "<state>", layers_per_block: int = 2
) -> dict[str, dict[str, Tensor]]:
    """Flat kohya state -> ``{component: canonical state}`` (UNet paths in diffusers naming,
    text-encoder paths with ``text_model.``).

    ``layers_per_block`` is the UNet's resnets per down block (2 in SD1/SD2/SDXL), used to map
    LDM-named (SDXL-style) UNet layers; a file cannot tell it, pass the model's for other UNets.

    Raises:
        WeightFileError: a key has no kohya prefix or an unknown tensor name (lists them).
    """
    out: dict[str, dict[str, Tensor]] = {}
    unknown: list[str] = []
    known = set(file_keys())
    for key, value in state.items():
        found = _component_of(key)
        if found is None or "." not in key:
            unknown.append(key)
            continue
        component, name = found
        suffix = key.split(".", 1)[1]
        name, suffix, value = _diffusers_kohya_spelling(name, suffix, value)
        if suffix not in known:  # the whole tensor name (GLoRA's `a1.weight` is not (IA)³'s `weight`)
            unknown.append(key)
            continue
        # canonical paths: SDXL's LDM UNet names -> diffusers; a text encoder's layers without
        # `text_model.` (diffusers' convert_state_dict_to_kohya on transformers 5) get it back
        path = canonical_layer_path(component, underscore_to_path(name), layers_per_block=layers_per_block)
        if suffix == "alpha":
            value = value.to(torch.float32)
        out.setdefault(component, {})[f"{path}.{suffix}"] = value
    if unknown:
        raise WeightFileError(
            f"{source}: {len(unknown)} key(s) are not kohya LoRA keys (nor LyCORIS ones), e.g. {unknown[:5]}; expected "
            "'lora_unet_*', 'lora_te_*', 'lora_te1_*' or 'lora_te2_*' with one of "
            f"{', '.join(sorted(file_keys()))}. Is this a diffusers/peft file? Use load_lora() to auto-detect. "
            "A LyCORIS tensor outside that list is of an algorithm or version sdadapt does not read"
            + _unread_form(unknown) + "."
        )
    return out


def kohya_metadata(
    components: Mapping[str, Mapping[str, Tensor]],
    *,
    base_model: str = "sd1",
    title: str = "sdadapt-lora",
    extra: Mapping[str, str | None] | None = None,
    source: Mapping[str, str] | None = None,
    reshaped: bool = False,
) -> dict[str, str]:
    """The ``ss_*`` minimum set and ModelSpec 1.0.1 fields kohya writes (all strings); ``source``'s own
    metadata over them where it still holds; ``extra`` last (a ``None`` value leaves its key out: kohya's
    ``merge_lora.py`` writes no ``ss_network_args``, nor ``train_network.py`` without ``--network_args``).

    ``ss_network_dim``/``ss_network_alpha`` are the most common rank and alpha; ``ss_network_args``
    records ``conv_dim``/``conv_alpha`` when convolutions have their own rank. A state with LyCORIS
    tensors (LoHa, LoKr, Tucker, full, DoRA) gets ``ss_network_module = "lycoris.kohya"`` and
    ``algo`` (plus ``dora_wd``/``use_tucker``) in the args, as LyCORIS writes them. An OFT-only state
    (no rank) gets kohya's values for a LyCORIS OFT run: ``ss_network_dim`` the block size, ``ss_network_alpha``
    1 (kohya's default, unused by OFT), the constraint and ``rescaled`` in the args.

    ``source`` is the metadata of the file these tensors come from (convert, ``--dtype``, resize). What a user
    expects of the copy is kohya's ``resize_lora.py`` rule (it copies the input's metadata, updates what the
    operation changed, networks/resize_lora.py:342-368): every training key (``ss_training_comment``,
    ``ss_datasets``, ``modelspec.title`` / ``date`` ...) is kept; :data:`STALE_METADATA` never is (the sshs hashes
    are recomputed by :func:`save_kohya`); the base-model keys are kept unless ``base_model`` differs from the
    one they name. The network keys (:data:`NETWORK_METADATA`): with ``reshaped=False`` (the same tensors, any
    dtype) the source's are kept when its ``ss_network_module`` writes these tensors' layout — so a kohya DyLoRA
    (``networks.dylora``, ``unit``) or a LyCORIS LoCon (``lycoris.kohya``, ``algo``, ``preset``, ``dropout`` ...)
    still says so — else the ones generated here. With ``reshaped=True`` (new ranks) they are generated, the
    source's non-shape ``ss_network_args`` (dropouts, preset ...) kept when the module stays the same.
    """
    _check_base_model(base_model)
    version, v2, architecture, implementation = BASE_MODELS[base_model]
    ranks: dict[tuple[int, float], int] = {}
    conv_ranks: dict[tuple[int, float], int] = {}
    algorithms: dict[str, int] = {}
    lycoris_algos: dict[str, int] = {}
    train_norm = False
    oft_blocks: dict[tuple[int, float], int] = {}  # (block size, constraint) of OFT layers, which have no rank
    oft_rescaled = False
    for state in components.values():
        groups: dict[str, dict[str, Tensor]] = {}
        for key, value in state.items():
            layer, suffix = split_key(key)
            groups.setdefault(layer, {})[suffix] = value
        for tensors in groups.values():
            algorithm = algorithm_of_keys(tensors)
            algorithms[algorithm] = algorithms.get(algorithm, 0) + 1
            lycoris = lycoris_algo_of_keys(tensors)
            if lycoris:
                lycoris_algos[lycoris] = lycoris_algos.get(lycoris, 0) + 1
            elif algorithm == "norm":  # no algo of its own: LyCORIS' norm modules beside one (train_norm)
                train_norm = True
            if algorithm == "unknown":
                continue
            if lycoris in ("diag-oft", "boft"):
                blocks = tensors["oft_blocks"] if "oft_blocks" in tensors else tensors["oft_diag"]  # (old LyCORIS)
                key = (int(blocks.shape[-1]), float(tensors["alpha"]) if "alpha" in tensors else 0.0)
                oft_blocks[key] = oft_blocks.get(key, 0) + 1
                oft_rescaled |= "rescale" in tensors
            rank, is_kxk = file_rank({k: tuple(v.shape) for k, v in tensors.items()})
            if rank is None:
                continue
            alpha = float(tensors["alpha"]) if "alpha" in tensors else float(rank)
            bucket = conv_ranks if is_kxk else ranks
            bucket[(rank, alpha)] = bucket.get((rank, alpha), 0) + 1
    dim, alpha = max(ranks, key=ranks.get) if ranks else (None, None)
    oft_constraint = max(oft_blocks, key=oft_blocks.get)[1] if oft_blocks else 0.0
    oft_default = False  # (kohya's --network_alpha left at its argparse default, the int 1: written "1")
    if dim is None and oft_blocks:  # an OFT-only state: what kohya's train_network writes for a LyCORIS OFT run,
        # network_dim (the block size: given back as LyCORIS' network_dim it rebuilds this layout) and
        # network_alpha (kohya's default 1; LyCORIS' OFT ignores it, its constraint is an arg)
        dim, alpha = max(oft_blocks, key=oft_blocks.get)[0], 1.0
        oft_default = True
    args: dict[str, str] = {}
    if conv_ranks:
        conv_dim, conv_alpha = max(conv_ranks, key=conv_ranks.get)
        args = {"conv_dim": str(conv_dim), "conv_alpha": _num(conv_alpha)}
    network_module = "networks.lora"
    kohya_oft = kohya_oft_dim_alpha(components)
    if kohya_oft is not None:  # kohya's networks.oft: dim = blocks per layer, alpha = the constraint
        network_module, (dim, alpha), args = "networks.oft", kohya_oft, {}
        oft_default = False  # (the constraint, given as --network_alpha: str(float))
    elif set(algorithms) - {"lora", "unknown"}:
        network_module = "lycoris.kohya"
        args["algo"] = max(lycoris_algos, key=lycoris_algos.get) if lycoris_algos else "lora"
        if train_norm:
            args["train_norm"] = "True"
        if oft_constraint:
            args["constraint"] = _num(float(f"{oft_constraint:.7g}"))  # the float32 alpha's shortest decimal
        if oft_rescaled:
            args["rescaled"] = "True"
        if any("dora" in a for a in algorithms):
            args["dora_wd"] = "True"
            scales = [v for state in components.values() for k, v in state.items() if k.endswith(".dora_scale")]
            if scales and all(v.dim() >= 2 and v.shape[0] == 1 and v.shape[1] > 1 for v in scales):
                args["wd_on_output"] = "False"  # (every magnitude per input column: LyCORIS' network arg)
        if any("tucker" in a for a in algorithms):
            args["use_tucker"] = "True"
    from .. import __version__

    meta = {
        "ss_v2": v2,
        "ss_base_model_version": version,
        "ss_network_module": network_module,
        "ss_network_dim": str(dim),
        "ss_network_alpha": _alpha_text(alpha, kohya_default=oft_default),
        "ss_network_args": json.dumps(args),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": architecture,
        "modelspec.implementation": implementation,
        "modelspec.title": title,
        "modelspec.resolution": "1024x1024" if base_model == "sdxl" else ("768x768" if base_model == "sd2-v" else "512x512"),
        "modelspec.date": modelspec_date(),
        "modelspec.implementation_version": f"sdadapt/{__version__}",
    }
    if source:
        meta.update(_inherited_metadata(source, meta, base_model=base_model, reshaped=reshaped))
    for key, value in (extra or {}).items():  # (None: the key left out, as a kohya tool that writes none of it)
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    if "modelspec.prediction_type" not in meta and "modelspec.prediction_type" not in (extra or {}):
        # (kohya's sai_model_spec: "v" with v_parameterization, else "epsilon", for every SD model it writes)
        v = base_model == "sd2-v" or meta.get("ss_v_parameterization") == "True"
        meta["modelspec.prediction_type"] = "v" if v else "epsilon"
    return meta


def metadata_base_model(metadata: Mapping[str, str]) -> str | None:
    """The base model (a :data:`BASE_MODELS` key) kohya metadata names (``ss_base_model_version``, else
    ``ss_v2``), or ``None`` when it names none."""
    version = str(metadata.get("ss_base_model_version", ""))
    if version.startswith("sdxl"):
        return "sdxl"
    if version == "sd_v2_v":
        return "sd2-v"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1"):
        return "sd1"
    return None


def _network_args(metadata: Mapping[str, str]) -> dict | None:
    """``ss_network_args`` as a dict; ``None`` when absent or not a JSON object ("None", malformed, nested too
    deeply: :func:`~sdadapt.formats.header.load_json`, no ``RecursionError``)."""
    from .header import load_json

    try:
        args = load_json(metadata.get("ss_network_args") or "null", source="ss_network_args", what="ss_network_args")
    except (TypeError, ValueError):
        return None
    return args if isinstance(args, dict) else None


def _algo(args: Mapping | None) -> str:
    algo = str((args or {}).get("algo") or "lora").lower()  # LyCORIS' default (lycoris/kohya.py create_network)
    return _ALGO_ALIASES.get(algo, algo)


def _writes_layout(source: Mapping[str, str], generated: Mapping[str, str]) -> bool:
    """Whether the network ``source`` names writes the tensors ``generated`` describes (same module family; for
    LyCORIS the same ``algo``)."""
    module, own = str(source.get("ss_network_module", "")), generated["ss_network_module"]
    if own == "networks.lora":
        return module in _LORA_LAYOUT_MODULES or (
            module == "lycoris.kohya" and _algo(_network_args(source)) in _LORA_LAYOUT_ALGOS)
    if own == "lycoris.kohya":
        args = _network_args(source)
        return module == own and args is not None and _algo(args) == _algo(_network_args(generated))
    return module == own


def _inherited_metadata(source: Mapping[str, str], generated: Mapping[str, str], *, base_model: str,
                        reshaped: bool) -> dict[str, str]:
    """What ``source`` (the input file's metadata) gives a file written from it (see :func:`kohya_metadata`)."""
    out = {str(k): str(v) for k, v in source.items() if k not in STALE_METADATA and k not in NETWORK_METADATA}
    if metadata_base_model(source) not in (None, base_model):
        for key in _BASE_METADATA:
            out.pop(key, None)
    if not reshaped and _writes_layout(source, generated):
        out.update({key: str(source[key]) for key in NETWORK_METADATA if key in source})
    elif reshaped and source.get("ss_network_module") == generated["ss_network_module"]:
        args = _network_args(source)
        if args:
            kept = {k: v for k, v in args.items() if k not in _SHAPE_ARGS}
            fresh = json.loads(generated["ss_network_args"])
            shape = {k for k in args if k in _SHAPE_ARGS}
            if shape == set(fresh) and all(_same_arg(args[k], v) for k, v in fresh.items()):
                out["ss_network_args"] = str(source["ss_network_args"])  # still true: as kohya's resize_lora.py, which
                # never touches it (networks/resize_lora.py:342-358), the text as it was ("conv_alpha": "1.0" stays)
            else:  # (kohya would keep the old conv_dim / block_dims, which no longer describe the tensors)
                out["ss_network_args"] = json.dumps({**kept, **fresh})
    return out


def _same_arg(old: object, new: object) -> bool:
    """Whether two ``ss_network_args`` values say the same (``"1.0"`` and ``"1"`` and ``1`` do)."""
    try:
        return float(old) == float(new)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return str(old) == str(new)


def carried_metadata(source: Mapping[str, str] | None) -> dict[str, str]:
    """The metadata a re-encoding of a file (the same tensors in another format or dtype: a diffusers LoRA
    file, a peft adapter's ``adapter_model.safetensors``) carries over: ``source`` less :data:`STALE_METADATA`.
    The training metadata (``ss_*``, ``modelspec.*``) then still says what trained it, and comes back when the
    copy is converted to kohya again."""
    return {str(k): str(v) for k, v in (source or {}).items() if k not in STALE_METADATA}


def kohya_hashes(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """kohya's ``sshs_model_hash`` / ``sshs_legacy_hash`` of a file holding ``tensors`` (as written) and ``metadata``.

    kohya's ``train_util.precalculate_safetensors_hashes`` (library/train_util.py:3259-3298, what
    sd-webui-additional-networks shows): the safetensors serialisation of the tensors with only the ``ss_*``
    metadata; ``sshs_model_hash`` = sha256 of its bytes after the header, ``sshs_legacy_hash`` = the first 8 hex
    digits of the sha256 of its bytes ``0x100000 … 0x110000`` (of no bytes, for a file under 1 MiB). kohya recomputes both on every save (resize_lora.py:366-368, merge_lora.py:283-285, LoRANetwork
    .save_weights).
    """
    from safetensors.torch import save

    kept = {str(k): str(v) for k, v in metadata.items() if str(k).startswith("ss_")}
    data = save({k: v.detach().contiguous() for k, v in tensors.items()}, kept)
    header = int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[8 + header:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]}


def modelspec_date(timestamp: float | None = None) -> str:
    """``modelspec.date`` as kohya writes it: the local time of ``timestamp`` (default: now) in whole
    seconds, ISO 8601 without an offset (``"2024-01-02T03:04:05"``) — sd-scripts@48d368fa
    ``library/sai_model_spec.py:425-427``: ``datetime.fromtimestamp(int(timestamp)).isoformat()``."""
    return datetime.fromtimestamp(int(time.time() if timestamp is None else timestamp)).isoformat()


def _alpha_text(alpha: float | None, *, kohya_default: bool = False) -> str:
    """``ss_network_alpha`` for an alpha read from the tensors: ``str(float)`` (``"4.0"``, ``"0.5"``), as
    kohya's tools write it (``networks/extract_lora_from_models.py:253`` ``str(float(dim))``,
    ``networks/resize_lora.py:161,352`` ``str(float(scale * new_rank))``) and ``train_network.py:1022,1223``
    for ``--network_alpha`` given on its command line (argparse ``type=float``); ``"1"`` for
    ``kohya_default`` (the argparse default, the int 1, is not passed through ``type``); ``"None"``
    without one."""
    if alpha is None:
        return "None"
    return "1" if kohya_default else str(float(alpha))


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def save_kohya(
    path: str | os.PathLike,
    components: Mapping[str, Mapping[str, Tensor]],
    *,
    base_model: str = "sd1",
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str | None] | None = None,
    title: str | None = None,
    overwrite: bool = True,
    layers_per_block: int = 2,
    source_metadata: Mapping[str, str] | None = None,
    reshaped: bool = False,
) -> None:
    """Write a kohya LoRA ``.safetensors`` atomically, with kohya/ModelSpec metadata and kohya's sshs hashes
    (:func:`kohya_hashes`, of the file as written).

    Args:
        components: ``{"unet": handle.state_dict(), "text_encoder": ...}``.
        dtype: cast adapter weights (not ``alpha``, kept float32, nor integer flags such as
            (IA)³'s ``on_input``) e.g. to ``torch.float16``
            (values the dtype cannot hold are refused before the cast, naming the tensor).
        metadata: extra string metadata merged over the generated (and inherited) fields (``None``: key left out).
        source_metadata: the metadata of the file ``components`` were read from, kept where it still holds
            (:func:`kohya_metadata`); ``reshaped``: the tensors were re-factored (new ranks), not only re-cast.
        overwrite: replace an existing file (False: refuse, also if it appears while writing).
        layers_per_block: the UNet's resnets per down block (see :func:`to_kohya`; 2 in SD).

    Raises:
        NonFiniteError: a tensor holds NaN/inf or overflows ``dtype``; nothing is written.
        ValueError: ``path`` ends in a pickle suffix (``.pt``, ``.ckpt`` …): loaders would ``torch.load`` it.
    """
    check_components(components, caller="save_kohya")
    check_safetensors_name(path, caller="save_kohya")
    state = cast_factors(to_kohya(components, base_model=base_model, layers_per_block=layers_per_block), dtype)
    check_finite_output(state, path=path)
    title = title or os.path.splitext(os.path.basename(str(path)))[0]
    meta = kohya_metadata(components, base_model=base_model, title=title, extra=metadata, source=source_metadata,
                          reshaped=reshaped)
    meta.update(kohya_hashes(state, meta))
    write_safetensors(path, state, meta, overwrite=overwrite)


def cast_factors(state: Mapping[str, Tensor], dtype: torch.dtype | None) -> dict[str, Tensor]:
    """An adapter state's floating tensors in ``dtype`` (``None``: unchanged); alphas stay float32
    and integer flags ((IA)³'s ``on_input``) integers.

    Raises:
        NonFiniteError: a value ``dtype`` cannot hold (names the tensor; hint: save in float32).
    """
    from ..checks import cast_checked

    if dtype is None:
        return dict(state)
    return {k: (v if k.endswith(".alpha") or not v.is_floating_point()
                else cast_checked(v, dtype, key=k, hint="save in float32"))
            for k, v in state.items()}


def load_kohya(
    path: str | os.PathLike, *, layers_per_block: int = 2
) -> tuple[dict[str, dict[str, Tensor]], dict[str, str]]:
    """Read a kohya LoRA file: ``({component: canonical state}, metadata)``; ``layers_per_block``
    as in :func:`from_kohya`.

    Raises:
        WeightFileError: unreadable/truncated file, non-kohya keys, NaN/inf weights.
    """
    state, metadata = read_weights(path)
    state = without_bundled(state)  # (bundled embeddings: sdadapt.formats.bundled_embeddings)
    check_finite(state, source=str(path))
    return from_kohya(state, source=str(path), layers_per_block=layers_per_block), metadata
