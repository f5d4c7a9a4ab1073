"""Whole-UNet state-dict keys: LDM ``model.diffusion_model.*`` <-> diffusers ``unet.*``.

Module paths map by the block arithmetic of :mod:`sdadapt.formats.unet_names` (shared with the
LoRA key maps); this module adds what a whole state dict needs: ``layers_per_block`` and the
up blocks that carry attention are read from the keys, and every key is checked against the
grammar of diffusers UNet parameter names below, so a key that only *looks* convertible is
reported instead of being renamed into something no model loads. Tensors never change shape:
SD1 stores ``proj_in``/``proj_out`` as 1x1 convs on both sides, SD2 and SDXL as Linear on both
sides (``use_linear_projection`` / ``use_linear_in_transformer``), as diffusers' single-file loader
copies them. Fitting a file to a model with the other projection kind is
:func:`sdadapt.formats.model_keys.key_plan`'s ``target_shapes`` job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from .key_source import KeySource, PlanBuilder
from .unet_names import attention_up_blocks, diffusers_to_ldm_unet, ldm_to_diffusers_unet

__all__ = ["DIFFUSERS_UNET_KEY", "plan_unet", "layers_per_block_of", "checked_layers_per_block", "model_layers_per_block"]

_BLOCK = r"(?:down_blocks\.\d+|up_blocks\.\d+)"
_TRANSFORMER_PARAM = (
    r"transformer_blocks\.\d+\.(?:norm[123]|attn[12]\.to_[qkv]|attn[12]\.to_out\.0|ff\.net\.0\.proj|ff\.net\.2)"
)
#: every parameter name of an SD1/SD2/SDXL diffusers UNet2DConditionModel
DIFFUSERS_UNET_KEY = re.compile(
    r"(?:"
    r"(?:conv_in|conv_out|conv_norm_out|time_embedding\.linear_[12]|add_embedding\.linear_[12])"
    rf"|(?:{_BLOCK}\.resnets\.\d+|mid_block\.resnets\.[01])\.(?:norm1|conv1|time_emb_proj|norm2|conv2|conv_shortcut)"
    rf"|(?:{_BLOCK}\.attentions\.\d+|mid_block\.attentions\.0)\.(?:norm|proj_in|proj_out|{_TRANSFORMER_PARAM})"
    r"|down_blocks\.\d+\.downsamplers\.0\.conv|up_blocks\.\d+\.upsamplers\.0\.conv"
    r")\.(?:weight|bias)\Z"
)


def layers_per_block_of(local_keys: Iterable[str], *, naming: str) -> int:
    """Resnets per down block, read from UNet keys without prefix (2 for SD1, SD2, SDXL).

    diffusers: ``1 + max j`` of ``down_blocks.i.resnets.j``. LDM: with ``N`` the largest
    ``input_blocks`` index and ``D`` the number of downsamplers (``input_blocks.n.0.op``), the
    ``D + 1`` levels hold ``L`` resnets each and all but the last a downsampler, so
    ``N = (D + 1) L + D``.
    """
    local_keys = list(local_keys)
    if naming == "diffusers":
        found = [int(k.split(".")[3]) for k in local_keys if re.match(r"down_blocks\.\d+\.resnets\.\d+\.", k)]
        return max(found) + 1 if found else 2
    blocks = {int(k.split(".")[1]) for k in local_keys if re.match(r"input_blocks\.\d+\.", k)}
    downsamplers = {int(k.split(".")[1]) for k in local_keys if re.match(r"input_blocks\.\d+\.0\.op\.", k)}
    if not blocks or max(blocks) == 0:
        return 2
    layers, rest = divmod(max(blocks) - len(downsamplers), len(downsamplers) + 1)
    return layers if layers > 0 and rest == 0 else 2


def checked_layers_per_block(local_keys: Iterable[str], *, naming: str) -> int:
    """:func:`layers_per_block_of`, checked against the up path; SD's 2 when the keys do not add up.

    Up blocks hold ``L + 1`` resnets each (diffusers: max ``j`` of ``up_blocks.i.resnets.j`` is
    ``L``; LDM: ``D + 1`` levels of ``L + 1`` ``output_blocks``, ``D`` the downsamplers). Whole
    checkpoints and models always add up; a partial list of names (a few layers of a LoRA, a
    stand-in model, down blocks without up blocks) may not, and then the default layout is the
    safer guess.
    """
    local_keys = [k if k.endswith(".") else k + "." for k in local_keys]
    layers = layers_per_block_of(local_keys, naming=naming)
    if naming == "diffusers":
        up = [int(k.split(".")[3]) for k in local_keys if re.match(r"up_blocks\.\d+\.resnets\.\d+\.", k)]
        return layers if up and max(up) == layers else 2
    outputs = [int(k.split(".")[1]) for k in local_keys if re.match(r"output_blocks\.\d+\.", k)]
    levels = 1 + len({int(k.split(".")[1]) for k in local_keys if re.match(r"input_blocks\.\d+\.0\.op\.", k)})
    return layers if outputs and max(outputs) == levels * (layers + 1) - 1 else 2


def model_layers_per_block(unet: object) -> int:
    """A live UNet's resnets per down block: its diffusers ``config.layers_per_block`` (2, SD's, for
    a model without one, e.g. ``None`` or an LDM module). LoRA files with LDM UNet names (SDXL kohya
    files) map onto the model with it (:func:`sdadapt.formats.load_lora` ``layers_per_block``)."""
    layers = getattr(getattr(unet, "config", None), "layers_per_block", 2)
    return layers if isinstance(layers, int) and not isinstance(layers, bool) and layers > 0 else 2


def plan_unet(
    shapes: Mapping[str, tuple[int, ...]], builder: PlanBuilder, *, to: str, source_prefix: str, target_prefix: str
) -> None:
    """Plan UNet keys (all under ``source_prefix``); unknown ones go to the report's unmatched."""
    local = {key[len(source_prefix) :]: key for key in shapes}
    layers = layers_per_block_of(local, naming="ldm" if to == "diffusers" else "diffusers")
    if to == "ldm":
        with_attention = attention_up_blocks(local)
    for path, key in local.items():
        if to == "diffusers":
            new = ldm_to_diffusers_unet(path, layers_per_block=layers)
            valid = new is not None and DIFFUSERS_UNET_KEY.match(new)
        else:
            valid = DIFFUSERS_UNET_KEY.match(path)
            new = (
                diffusers_to_ldm_unet(path, layers_per_block=layers, up_blocks_with_attention=with_attention)
                if valid
                else None
            )
        if valid and new is not None:
            builder.add(target_prefix + new, KeySource((key,), tuple(shapes[key])), by=key)
        else:
            builder.unmatched.append(key)
