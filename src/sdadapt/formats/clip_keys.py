"""Text-encoder keys: OpenAI CLIP-L and OpenCLIP (ViT-H, ViT-bigG) in LDM files <-> diffusers.

- CLIP-L (SD1 ``cond_stage_model.transformer.``, SDXL ``conditioner.embedders.0.transformer.``)
  is a transformers ``CLIPTextModel`` on both sides: the keys only change prefix
  (``text_model.…`` stays). ``text_model.embeddings.position_ids`` (an int64 (1, 77) buffer some
  LDM files carry) is dropped towards diffusers: transformers >= 4.31 keeps it non-persistent and
  transformers 5's ``CLIPTextModel.state_dict()`` has no such key.
- OpenCLIP (SD2 ``cond_stage_model.model.``, SDXL ``conditioner.embedders.1.model.``) has its own
  names and a fused ``attn.in_proj_weight`` (3D, D) = [q; k; v]; ``positional_embedding`` is a bare
  (77, D) parameter; ``text_projection`` is (D, P) and diffusers' ``text_projection.weight`` is its
  transpose (P, D). ``logit_scale`` (and an ``attn_mask`` buffer, if present) have no diffusers
  counterpart and are dropped, as is a transformers ``…embeddings.position_ids`` buffer some writers
  leave under the OpenCLIP prefix (ComfyUI's SDXL saves, WD 1.4's SD2; kohya's loaders drop it too).
- SD2 reads OpenCLIP-H's *penultimate* layer: diffusers' SD2 text encoder has 23 layers where the
  file has 24, and no projection. Like diffusers' single-file loader (which skips
  ``resblocks.23.*`` and ``text_projection``), layers with index >= 23 and ``text_projection`` of
  ``cond_stage_model.model.`` are dropped towards diffusers (reported); they never affect SD2's output.

Two other spellings are read (with a note): LDM CLIP-L keys without ``text_model.`` (old SD1 files;
A1111 renames them the same way) and diffusers keys without ``text_model.`` (transformers 5
``CLIPTextModel.state_dict()``). Outputs always use ``text_model.``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TypeVar

from .key_rules import KeyRule, plan_by_rules
from .key_source import KeySource, PlanBuilder

__all__ = [
    "CLIP_RULES",
    "OPEN_CLIP_RULES",
    "SD2_UNUSED_FROM_LAYER",
    "encoder_layer_index",
    "without_layers_past",
    "plan_clip",
    "plan_open_clip",
    "add_text_model",
    "open_clip_to_diffusers",
]

#: first OpenCLIP-H layer SD2 never uses (it reads the output of layer 22, the penultimate one)
SD2_UNUSED_FROM_LAYER = 23

Shapes = Mapping[str, tuple[int, ...]]
_T = TypeVar("_T")
_LAYER_INDEX = re.compile(r"(?:^|\.)encoder\.layers\.(\d+)\.")


def encoder_layer_index(key: str) -> int | None:
    """The encoder layer a text-encoder key or layer path names (``…encoder.layers.<n>.…``), else ``None``."""
    match = _LAYER_INDEX.search(key + ".")
    return None if match is None else int(match.group(1))


def without_layers_past(state: Mapping[str, _T], layers: int) -> tuple[dict[str, _T], int]:
    """A text-encoder adapter state (``…encoder.layers.<n>.…`` keys) without the encoder layers of index >= ``layers``,
    and how many adapter layers (modules) were left out.

    An SD2 text encoder here is diffusers' (OpenCLIP-H's first :data:`SD2_UNUSED_FROM_LAYER` layers): a LoRA on the
    24-layer model — ComfyUI's "Extract and Save Lora" writes layer 23 for every SD2 text-encoder diff, zeros where
    unchanged — changes nothing SD2 reads (A1111 and ComfyUI apply it to a layer whose output is never used, kohya's
    loader skips it), so such layers are left out rather than refused."""
    from .layers import split_key

    kept: dict[str, _T] = {}
    dropped: set[str] = set()
    for key, value in state.items():
        index = encoder_layer_index(key)
        if index is not None and index >= layers:
            dropped.add(split_key(key)[0])
        else:
            kept[key] = value
    return kept, len(dropped)


def _same(*words: str) -> dict[str, str]:
    return {w: w for w in words}


_LAYER = "text_model.encoder.layers.{n}"
CLIP_RULES = (
    KeyRule(
        "text_model.embeddings.{emb}.weight",
        "text_model.embeddings.{emb}.weight",
        words={"emb": _same("token_embedding", "position_embedding")},
    ),
    KeyRule(
        _LAYER + ".self_attn.{proj}.{p}",
        _LAYER + ".self_attn.{proj}.{p}",
        words={"proj": _same("q_proj", "k_proj", "v_proj", "out_proj")},
    ),
    KeyRule(_LAYER + ".{ln}.{p}", _LAYER + ".{ln}.{p}", words={"ln": _same("layer_norm1", "layer_norm2")}),
    KeyRule(_LAYER + ".mlp.{fc}.{p}", _LAYER + ".mlp.{fc}.{p}", words={"fc": _same("fc1", "fc2")}),
    KeyRule("text_model.final_layer_norm.{p}", "text_model.final_layer_norm.{p}"),
)

_BLOCK = "transformer.resblocks.{n}"
OPEN_CLIP_RULES = (
    KeyRule("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    KeyRule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    KeyRule("ln_final.{p}", "text_model.final_layer_norm.{p}"),
    KeyRule("text_projection", "text_projection.weight", kind="transpose"),
    KeyRule(_BLOCK + ".{ln}.{p}", _LAYER + ".{ln}.{p}", words={"ln": {"ln_1": "layer_norm1", "ln_2": "layer_norm2"}}),
    KeyRule(_BLOCK + ".mlp.{fc}.{p}", _LAYER + ".mlp.{fc}.{p}", words={"fc": {"c_fc": "fc1", "c_proj": "fc2"}}),
    KeyRule(_BLOCK + ".attn.out_proj.{p}", _LAYER + ".self_attn.out_proj.{p}"),
    KeyRule(_BLOCK + ".attn.in_proj_{p}", _LAYER + ".self_attn.{qkv}_proj.{p}", kind="fused_qkv"),
)

_FLAT_HEADS = ("embeddings.", "encoder.", "final_layer_norm.")


def open_clip_to_diffusers(key: str) -> tuple[tuple[str, ...], str] | None:
    """The diffusers (transformers CLIP) key(s) of one OpenCLIP key, by :data:`OPEN_CLIP_RULES`.

    Args:
        key: relative to the OpenCLIP model (``transformer.resblocks.3.mlp.c_fc.weight``, without
            the ``cond_stage_model.model.`` / ``conditioner.embedders.1.model.`` prefix).

    Returns:
        ``(keys, kind)``: one key for a rename (``kind`` ``"same"``, or ``"transpose"`` for
        ``text_projection``), or the q, k, v keys, in the row order of the fused tensor, for
        ``attn.in_proj_weight``/``_bias`` (``kind`` ``"fused_qkv"``: row thirds); ``None`` for a
        key no rule knows.

    >>> open_clip_to_diffusers("transformer.resblocks.0.attn.out_proj.weight")
    (('text_model.encoder.layers.0.self_attn.out_proj.weight',), 'same')
    """
    for rule in OPEN_CLIP_RULES:
        fields = rule.match("ldm", key)
        if fields is None:
            continue
        fields = rule.translate(fields, to="diffusers", counts={})
        if rule.kind == "fused_qkv":
            return tuple(rule.render("diffusers", {**fields, "qkv": qkv}) for qkv in "qkv"), rule.kind
        return (rule.render("diffusers", fields),), rule.kind
    return None
_POSITION_IDS = "text_model.embeddings.position_ids"
#: OpenCLIP-prefixed transformers buffers some files carry (``transformer.text_model.embeddings.position_ids`` ...)
_STRAY_POSITION_IDS = "embeddings.position_ids"
_SD2_UNUSED = (
    f"SD2 conditions on OpenCLIP-H's penultimate layer: layers >= {SD2_UNUSED_FROM_LAYER} and text_projection"
    " never affect it, and diffusers' SD2 text encoder (23 layers, no projection) has no place for them;"
    " diffusers' single-file loader skips the same keys"
)


def add_text_model(key: str, prefix: str) -> str:
    """``prefix + "encoder.…"`` -> ``prefix + "text_model.encoder.…"`` (transformers-5 / old-LDM spelling)."""
    if not key.startswith(prefix):
        return key
    local = key[len(prefix) :]
    return prefix + "text_model." + local if local.startswith(_FLAT_HEADS) else key


def _respell(shapes: Shapes, prefix: str, builder: PlanBuilder, where: str) -> tuple[dict, dict]:
    """Shapes with flat CLIP keys given ``text_model.``, and the map back to the real keys."""
    spelled, real = {}, {}
    for key, shape in shapes.items():
        new = add_text_model(key, prefix)
        if new != key and new in shapes:
            builder.unmatched.append(key)
            builder.notes.append(f"{key!r} duplicates {new!r}; kept {new!r}")
            continue
        if new != key:
            real[new] = key
        spelled[new] = shape
    if real:
        example = next(iter(real.values()))
        builder.notes.append(
            f"read {len(real)} {where} key(s) without 'text_model.' (e.g. {example!r}) as 'text_model.…'"
        )
    return spelled, real


def plan_clip(shapes: Shapes, builder: PlanBuilder, *, to: str, source_prefix: str, target_prefix: str) -> None:
    """Plan CLIP-L keys (transformers naming on both sides): prefix change, position_ids handled."""
    where = "LDM CLIP" if to == "diffusers" else "transformers-5 CLIP"
    spelled, real = _respell(shapes, source_prefix, builder, where)
    position_ids = source_prefix + _POSITION_IDS
    if position_ids in spelled:
        key = real.get(position_ids, position_ids)
        if to == "diffusers":
            builder.drop(
                [key],
                "CLIP position_ids is a non-persistent buffer in transformers (not in CLIPTextModel.state_dict());"
                " the model rebuilds it as arange(max_position_embeddings)",
            )
        else:
            builder.add(target_prefix + _POSITION_IDS, KeySource((key,), tuple(spelled[position_ids])), by=key)
        del spelled[position_ids]
    left = plan_by_rules(
        CLIP_RULES, spelled, builder, to=to, source_prefix=source_prefix, target_prefix=target_prefix, real_keys=real
    )
    builder.unmatched.extend(real.get(k, k) for k in left)


def _sd2_unused(key: str, prefix: str) -> bool:
    parts = key[len(prefix) :].split(".")
    if parts == ["text_projection"]:
        return True
    return parts[:2] == ["transformer", "resblocks"] and parts[2].isdigit() and int(parts[2]) >= SD2_UNUSED_FROM_LAYER


def plan_open_clip(
    shapes: Shapes, builder: PlanBuilder, *, to: str, source_prefix: str, target_prefix: str, sd2: bool
) -> None:
    """Plan OpenCLIP keys (``source_prefix``: the LDM ``….model.`` prefix or the diffusers component)."""
    if to == "diffusers":
        real: dict[str, str] = {}
        extras = [source_prefix + name for name in ("logit_scale", "attn_mask") if source_prefix + name in shapes]
        builder.drop(extras, "OpenCLIP's logit_scale / causal attn_mask have no place in a diffusers text encoder")
        # a transformers position_ids buffer some writers leave under the OpenCLIP prefix (ComfyUI's SDXL saves:
        # ``transformer.text_model.embeddings.position_ids``; WD 1.4's SD2): dropped as kohya's readers do
        stray = [key for key in shapes if key[len(source_prefix) :].endswith(_STRAY_POSITION_IDS)]
        builder.drop(stray, "a transformers position_ids buffer inside an OpenCLIP model (OpenCLIP has none): rebuilt as"
                     " arange(max_position_embeddings), as kohya's loaders drop it")
        extras += stray
        unused = [key for key in shapes if sd2 and _sd2_unused(key, source_prefix)]
        builder.drop(unused, _SD2_UNUSED)
        spelled = {k: v for k, v in shapes.items() if k not in {*extras, *unused}}
    else:
        spelled, real = _respell(shapes, source_prefix, builder, "transformers-5 CLIP")
        position_ids = source_prefix + _POSITION_IDS
        if position_ids in spelled:
            builder.drop([real.get(position_ids, position_ids)], "OpenCLIP has no position_ids buffer")
            del spelled[position_ids]
    left = plan_by_rules(
        OPEN_CLIP_RULES, spelled, builder,
        to=to, source_prefix=source_prefix, target_prefix=target_prefix, real_keys=real,
    )
    builder.unmatched.extend(real.get(k, k) for k in left)
