"""LyCORIS' built-in presets (``network_args = ["preset=full", ...]``) as sdadapt target selections.

LyCORIS' kohya network (``lycoris.kohya.create_network``, lycoris-lora 4.x ``lycoris/config.py``)
adapts every ``nn.Linear`` / ``nn.Conv2d`` inside the modules whose *class* a preset lists, plus
the modules it names; kxk convolutions only where the preset enables convolutions (they then
train at ``conv_dim``, which LyCORIS defaults to the network dim), 1x1 convolutions always (at
the network dim). On a Stable Diffusion UNet (diffusers, or kohya's own UNet whose attention
class is ``CrossAttention``) and a CLIP text encoder that means:

============================  ================================================================  ================
preset                        UNet                                                              text encoder(s)
============================  ================================================================  ================
``full`` (LyCORIS' default)   transformer blocks, ResNets, down/upsamplers, ``conv_in``,        attention + MLP
                              ``conv_out``, ``time_embedding.linear_1/2``
``full-lin``                  as ``full`` without the kxk convolutions (so no samplers,          attention + MLP
                              ``conv_in``/``conv_out``; ResNets' ``time_emb_proj`` and 1x1
                              ``conv_shortcut`` stay)
``attn-mlp``                  transformer blocks (kohya's LoRA default)                          attention + MLP
``attn-only``                 attention q/k/v/out (kohya's ``CrossAttention``)                   attention
``unet-only``                 as ``full``                                                        none
``unet-transformer-only``     transformer blocks                                                 none
``unet-convblock-only``       ResNets, down/upsamplers, ``conv_in``, ``conv_out``                 none
============================  ================================================================  ================

The selections are name patterns (diffusers and LDM/"compvis" UNet names, transformers 4/5 CLIP
names), so they work on every UNet sdadapt trains. The file keys are kohya's
(``lora_unet_conv_in``, ``lora_unet_time_embedding_linear_1`` ...): the names LyCORIS writes.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import InputError
from ..targets import (
    TEXT_ENCODER,
    UNET_ATTENTION,
    UNET_KOHYA,
    UNET_LOCON,
    Target,
    by_regex,
    by_type,
)

__all__ = ["LYCORIS_PRESETS", "LycorisPreset", "lycoris_preset"]

_LINEAR_OR_CONV = by_type(nn.Linear, nn.Conv2d)


def _kxk_conv(name: str, module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


_KXK_CONV = Target(_kxk_conv, "kxk Conv2d")
_NOT_KXK_CONV = ~_KXK_CONV

# conv_in / conv_out: diffusers names; LDM input_blocks.0.0 and out.2
_CONV_IN_OUT = by_regex(r"(^|\.)(conv_in|conv_out|input_blocks\.0\.0|out\.2)$") & _LINEAR_OR_CONV
# time_embedding.linear_1/2 (diffusers), time_embed.0/2 (LDM)
_TIME_EMBEDDING = by_regex(r"(^|\.)(time_embedding\.linear_[12]|time_embed\.[02])$") & by_type(nn.Linear)
# ResnetBlock2D / Downsample2D / Upsample2D (LDM ResBlock, Downsample, Upsample): every block layer
# outside the transformer blocks
_CONV_BLOCKS = UNET_LOCON & ~UNET_KOHYA
_TEXT_ATTENTION = TEXT_ENCODER & by_regex(r"\.self_attn\.")


@dataclass(frozen=True)
class LycorisPreset:
    """The layers one LyCORIS preset adapts: ``unet`` / ``text_encoder`` targets (``None``: none there)."""

    name: str
    unet: Target | None
    text_encoder: Target | None


def _preset(name: str, unet: Target | None, text_encoder: Target | None) -> LycorisPreset:
    if unet is not None:
        unet = Target(unet, f"LyCORIS preset {name}")
    return LycorisPreset(name, unet, text_encoder)


_FULL_UNET = UNET_LOCON | _CONV_IN_OUT | _TIME_EMBEDDING

#: LyCORIS' built-in presets for SD UNets + CLIP (``ia3`` is not here: sdadapt trains no IA³)
LYCORIS_PRESETS: dict[str, LycorisPreset] = {
    preset.name: preset
    for preset in (
        _preset("full", _FULL_UNET, TEXT_ENCODER),
        _preset("full-lin", (UNET_LOCON | _TIME_EMBEDDING) & _NOT_KXK_CONV, TEXT_ENCODER),
        _preset("attn-mlp", UNET_KOHYA, TEXT_ENCODER),
        _preset("attn-only", UNET_ATTENTION, _TEXT_ATTENTION),
        _preset("unet-only", _FULL_UNET, None),
        _preset("unet-transformer-only", UNET_KOHYA, None),
        _preset("unet-convblock-only", _CONV_BLOCKS | _CONV_IN_OUT, None),
    )
}


def lycoris_preset(name: str) -> LycorisPreset:
    """The LyCORIS preset ``name`` (``network_args = ["preset=NAME"]``).

    Raises:
        InputError: ``ia3``, a preset file (LyCORIS reads a TOML/JSON path) or an unknown name.
    """
    key = str(name).strip()
    if key in LYCORIS_PRESETS:
        return LYCORIS_PRESETS[key]
    if key == "ia3":
        raise InputError("preset=ia3 is LyCORIS' preset for its IA³ algo, which sdadapt does not train; choose "
                         f"one of {', '.join(LYCORIS_PRESETS)}")
    if key.lower().endswith((".toml", ".json")) or "/" in key or "\\" in key:
        raise InputError(f"preset={key}: LyCORIS preset files are not read; choose a built-in preset "
                         f"({', '.join(LYCORIS_PRESETS)}) or select layers with --network-targets")
    raise InputError(f"unknown LyCORIS preset {key!r}; choose {', '.join(LYCORIS_PRESETS)}")
