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
  counterpart and are dropped.
- SD2 reads OpenCLIP-H's *penultimate* layer: diffusers' SD2 text encoder has 23 layers where the
  file has 24, and no projection. Like diffusers' single-file loader (which skips
  ``resblocks.23.*`` and ``text_projection``), layers with index >= 23 and ``text_projection`` of
  ``cond_stage_model.model.`` are dropped towards diffusers (reported); they never affect SD2's output.

Two other spellings are read (with a note): LDM CLIP-L keys without ``text_model.`` (old SD1 files;
A1111 renames them the same way) and diffusers keys without ``text_model.`` (transformers 5
``CLIPTextModel.state_dict()``). Outputs always use ``text_model.``.
"""

from __future__ import annotations

from collections.abc import Mapping

from .key_rules import KeyRule, plan_by_rules
from .key_source import KeySource, PlanBuilder

__all__ = ["CLIP_RULES", "OPEN_CLIP_RULES", "SD2_UNUSED_FROM_LAYER", "plan_clip", "plan_open_clip", "add_text_model"]

#: first OpenCLIP-H layer SD2 never uses (it reads the output of layer 22, the penultimate one)
SD2_UNUSED_FROM_LAYER = 23

_IDENTITY_WORDS = {
    "emb": {"token_embedding": "token_embedding", "position_embedding": "position_embedding"},
    "proj": {x: x for x in ("q_proj", "k_proj", "v_proj", "out_proj")},
    "ln": {"layer_norm1": "layer_norm1", "layer_norm2": "layer_norm2"},
    "fc": {"fc1": "fc1", "fc2": "fc2"},
}

CLIP_RULES = (
    KeyRule("text_model.embeddings.{emb}.weight", "text_model.embeddings.{emb}.weight", words={"emb": _IDENTITY_WORDS["emb"]}),
    KeyRule("text_model.encoder.layers.{n}.self_attn.{proj}.{p}", "text_model.encoder.layers.{n}.self_attn.{proj}.{p}", words={"proj": _IDENTITY_WORDS["proj"]}),
    KeyRule("text_model.encoder.layers.{n}.{ln}.{p}", "text_model.encoder.layers.{n}.{ln}.{p}", words={"ln": _IDENTITY_WORDS["ln"]}),
    KeyRule("text_model.encoder.layers.{n}.mlp.{fc}.{p}", "text_model.encoder.layers.{n}.mlp.{fc}.{p}", words={"fc": _IDENTITY_WORDS["fc"]}),
    KeyRule("text_model.final_layer_norm.{p}", "text_model.final_layer_norm.{p}"),
)

OPEN_CLIP_RULES = (
    KeyRule("token_embedding.weight", "text_model.embeddings.token_embedding.weight"),
    KeyRule("positional_embedding", "text_model.embeddings.position_embedding.weight"),
    KeyRule("ln_final.{p}", "text_model.final_layer_norm.{p}"),
    KeyRule("text_projection", "text_projection.weight", kind="transpose"),
    KeyRule("transformer.resblocks.{n}.{ln}.{p}", "text_model.encoder.layers.{n}.{ln}.{p}", words={"ln": {"ln_1": "layer_norm1", "ln_2": "layer_norm2"}}),
    KeyRule("transformer.resblocks.{n}.mlp.{fc}.{p}", "text_model.encoder.layers.{n}.mlp.{fc}.{p}", words={"fc": {"c_fc": "fc1", "c_proj": "fc2"}}),
    KeyRule("transformer.resblocks.{n}.attn.out_proj.{p}", "text_model.encoder.layers.{n}.self_attn.out_proj.{p}"),
    KeyRule("transformer.resblocks.{n}.attn.in_proj_{p}", "text_model.encoder.layers.{n}.self_attn.{qkv}_proj.{p}", kind="fused_qkv"),
)

_FLAT_HEADS = ("embeddings.", "encoder.", "final_layer_norm.")
_POSITION_IDS = "text_model.embeddings.position_ids"


def add_text_model(key: str, prefix: str) -> str:
    """``prefix + "encoder.…"`` -> ``prefix + "text_model.encoder.…"`` (transformers-5 / old-LDM spelling)."""
    if not key.startswith(prefix):
        return key
    local = key[len(prefix) :]
    return prefix + "text_model." + local if local.startswith(_FLAT_HEADS) else key


def _respell(shapes: Mapping[str, tuple[int, ...]], prefix: str, builder: PlanBuilder, where: str):
    """Shapes with flat CLIP keys given ``text_model.``, and the map back to the real keys."""
    spelled, real = {}, {}
    for key, shape in shapes.items():
        new = add_text_model(key, prefix)
        if new != key:
            real[new] = key
            if new in shapes:
                builder.unmatched.append(key)
                builder.notes.append(f"{key!r} duplicates {new!r}; kept {new!r}")
                continue
        spelled[new] = shape
    if real:
        builder.notes.append(f"read {len(real)} {where} key(s) without 'text_model.' (e.g. {next(iter(real.values()))!r}) as 'text_model.…'")
    return spelled, real


def plan_clip(shapes: Mapping[str, tuple[int, ...]], builder: PlanBuilder, *, to: str, source_prefix: str, target_prefix: str) -> None:
    """Plan CLIP-L keys (transformers naming on both sides): prefix change, position_ids handled."""
    spelled, real = _respell(shapes, source_prefix, builder, "LDM CLIP" if to == "diffusers" else "transformers-5 CLIP")
    position_ids = source_prefix + _POSITION_IDS
    if position_ids in spelled:
        if to == "diffusers":
            builder.drop([real.get(position_ids, position_ids)], "CLIP position_ids is a non-persistent buffer in transformers"
                         " (not in CLIPTextModel.state_dict()); the model rebuilds it as arange(max_position_embeddings)")
        else:
            builder.add(target_prefix + _POSITION_IDS, KeySource((real.get(position_ids, position_ids),), tuple(spelled[position_ids])), by=position_ids)
        spelled = {k: v for k, v in spelled.items() if k != position_ids}
    left = plan_by_rules(CLIP_RULES, spelled, builder, to=to, source_prefix=source_prefix, target_prefix=target_prefix, real_keys=real)
    builder.unmatched.extend(real.get(k, k) for k in left)


def plan_open_clip(
    shapes: Mapping[str, tuple[int, ...]], builder: PlanBuilder, *, to: str, source_prefix: str, target_prefix: str, sd2: bool
) -> None:
    """Plan OpenCLIP keys (``source_prefix`` is the LDM ``….model.`` or the diffusers component prefix)."""
    if to == "diffusers":
        spelled, real = dict(shapes), {}
        extras = [source_prefix + name for name in ("logit_scale", "attn_mask") if source_prefix + name in spelled]
        builder.drop(extras, "OpenCLIP's contrastive temperature / causal-mask buffer have no place in a diffusers text encoder")
        unused = []
        if sd2:
            for key in spelled:
                local = key[len(source_prefix) :]
                parts = local.split(".")
                if local == "text_projection" or (
                    local.startswith("transformer.resblocks.") and parts[2].isdigit() and int(parts[2]) >= SD2_UNUSED_FROM_LAYER
                ):
                    unused.append(key)
            builder.drop(unused, f"SD2 conditions on OpenCLIP-H's penultimate layer: layers >= {SD2_UNUSED_FROM_LAYER} and"
                                 " text_projection never affect it, and diffusers' SD2 text encoder (23 layers, no projection)"
                                 " has no place for them; diffusers' single-file loader skips the same keys")
        spelled = {k: v for k, v in spelled.items() if k not in set(extras) | set(unused)}
    else:
        spelled, real = _respell(shapes, source_prefix, builder, "transformers-5 CLIP")
        position_ids = source_prefix + _POSITION_IDS
        if position_ids in spelled:
            builder.drop([real.get(position_ids, position_ids)], "OpenCLIP has no position_ids buffer (positions are implicit)")
            spelled.pop(position_ids)
    left = plan_by_rules(OPEN_CLIP_RULES, spelled, builder, to=to, source_prefix=source_prefix, target_prefix=target_prefix, real_keys=real)
    builder.unmatched.extend(real.get(k, k) for k in left)

