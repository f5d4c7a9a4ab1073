"""VAE (AutoencoderKL) keys: LDM ``first_stage_model.*`` <-> diffusers ``vae.*``.

Structure: the encoder's ``down.i`` is ``down_blocks.i``; the decoder's ``up.b`` counts from the
*output* end, so ``up.b`` is ``up_blocks.(n - 1 - b)`` with ``n`` up blocks (read from the keys).
The mid-block attention uses 1x1 convs ``q``/``k``/``v``/``proj_out`` in LDM and Linear
``to_q``/``to_k``/``to_v``/``to_out.0`` in diffusers: weights are reshaped (C, C, 1, 1) <-> (C, C). Read too (with a
note; never written): an LDM file whose mid-block attention keeps diffusers' names, (C, C) or (C, C, 1, 1) —
EveryDream2's converter (``utils/convert_diff_to_ckpt.py``) maps only diffusers' pre-0.15 ``query``/``key``/
``value``/``proj_attn`` names, so every checkpoint it writes from a newer diffusers has them.
"""

from __future__ import annotations

from collections.abc import Mapping

from .key_rules import KeyRule, plan_by_rules
from .key_source import PlanBuilder

__all__ = ["VAE_RULES", "plan_vae"]

_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_SIDE = {"encoder": "encoder", "decoder": "decoder"}
_ATTENTION = {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_MID_RESNET = {"block_1": "resnets.0", "block_2": "resnets.1"}

VAE_RULES = (
    KeyRule("{side}.conv_in.{p}", "{side}.conv_in.{p}", words={"side": _SIDE}),
    KeyRule("{side}.conv_out.{p}", "{side}.conv_out.{p}", words={"side": _SIDE}),
    KeyRule("{side}.norm_out.{p}", "{side}.conv_norm_out.{p}", words={"side": _SIDE}),
    KeyRule("quant_conv.{p}", "quant_conv.{p}"),
    KeyRule("post_quant_conv.{p}", "post_quant_conv.{p}"),
    KeyRule(
        "encoder.down.{i}.block.{j}.{layer}.{p}",
        "encoder.down_blocks.{i}.resnets.{j}.{layer}.{p}",
        words={"layer": _RESNET},
    ),
    KeyRule("encoder.down.{i}.downsample.conv.{p}", "encoder.down_blocks.{i}.downsamplers.0.conv.{p}"),
    KeyRule(
        "decoder.up.{b}.block.{j}.{layer}.{p}",
        "decoder.up_blocks.{b}.resnets.{j}.{layer}.{p}",
        words={"layer": _RESNET},
        flip="b",
    ),
    KeyRule("decoder.up.{b}.upsample.conv.{p}", "decoder.up_blocks.{b}.upsamplers.0.conv.{p}", flip="b"),
    KeyRule(
        "{side}.mid.{res}.{layer}.{p}",
        "{side}.mid_block.{res}.{layer}.{p}",
        words={"side": _SIDE, "res": _MID_RESNET, "layer": _RESNET},
    ),
    KeyRule("{side}.mid.attn_1.norm.{p}", "{side}.mid_block.attentions.0.group_norm.{p}", words={"side": _SIDE}),
    KeyRule(
        "{side}.mid.attn_1.{proj}.{p}",
        "{side}.mid_block.attentions.0.{proj}.{p}",
        kind="conv1x1",
        words={"side": _SIDE, "proj": _ATTENTION},
    ),
    # read only (the rule above writes both ways): EveryDream2's single files keep diffusers' names there
    KeyRule(
        "{side}.mid.attn_1.{proj}.{p}",
        "{side}.mid_block.attentions.0.{proj}.{p}",
        kind="conv1x1",
        words={"side": _SIDE, "proj": {name: name for name in _ATTENTION.values()}},
    ),
)
#: the mid-block attention's diffusers names under an LDM prefix (EveryDream2's ``convert_diff_to_ckpt.py`` maps only
#: diffusers' old ``query`` / ``key`` / ``value`` / ``proj_attn``, so its files keep the names diffusers >= 0.15 saves)
_DIFFUSERS_NAMED_ATTENTION = tuple(f".mid.attn_1.{name}." for name in _ATTENTION.values())


def _up_block_count(keys, *, to: str, prefix: str) -> int:
    marker = prefix + ("decoder.up." if to == "diffusers" else "decoder.up_blocks.")
    found = {k[len(marker) :].split(".", 1)[0] for k in keys if k.startswith(marker)}
    return len({int(i) for i in found if i.isdigit()})


def plan_vae(
    shapes: Mapping[str, tuple[int, ...]], builder: PlanBuilder, *, to: str, source_prefix: str, target_prefix: str
) -> None:
    """Plan the VAE keys of ``shapes`` (all under ``source_prefix``); unknown ones go to unmatched."""
    counts = {"b": _up_block_count(shapes, to=to, prefix=source_prefix)}
    if to == "diffusers" and any(marker in key for key in shapes for marker in _DIFFUSERS_NAMED_ATTENTION):
        builder.notes.append("the VAE's mid-block attention has diffusers' names (to_q / to_k / to_v / to_out.0) under "
                             "its LDM prefix, as EveryDream2's checkpoints do: read as LDM's q / k / v / proj_out")
    left = plan_by_rules(
        VAE_RULES, shapes, builder, to=to, source_prefix=source_prefix, target_prefix=target_prefix, counts=counts
    )
    builder.unmatched.extend(left)
