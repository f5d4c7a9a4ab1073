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
``ia3``                       attention ``to_k``/``to_v``, ``ff.net.2`` (its input scaled by       ``k_proj``, ``v_proj``,
                              the ``ia3`` method)                                                ``mlp.fc2``
============================  ================================================================  ================

The selections are name patterns (diffusers and LDM/"compvis" UNet names, transformers 4/5 CLIP
names), so they work on every UNet sdadapt trains. The file keys are kohya's
(``lora_unet_conv_in``, ``lora_unet_time_embedding_linear_1`` ...): the names LyCORIS writes.

A preset that is a path is a LyCORIS preset file (:mod:`sdadapt.methods.lycoris_preset_files`): its
selection depends on the classes around a layer, so :meth:`LycorisPreset.on` makes it on a system.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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
from .lycoris_preset_files import LycorisPresetFile, read_lycoris_preset_file
from .system import text_encoders

__all__ = ["LYCORIS_PRESETS", "IA3_ON_INPUT", "LycorisPreset", "lycoris_preset"]

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
# LyCORIS' ``ia3`` preset: the attention keys/values and the feed-forward output layers (diffusers
# and LDM UNet names agree here: attn1/attn2.to_k/to_v, ff.net.2)
_UNET_IA3 = by_regex(r"(^|\.)(to_k|to_v|ff\.net\.2)$") & by_type(nn.Linear)
_TEXT_IA3 = TEXT_ENCODER & by_regex(r"\.(self_attn\.(k_proj|v_proj)|mlp\.fc2)$")
#: the layers LyCORIS' ``ia3`` preset trains with ``train_on_input`` (its ``name_algo_map``): the
#: feed-forward output layers ``ff.net.2`` (UNet) and ``mlp.fc2`` (text encoders)
IA3_ON_INPUT = Target(by_regex(r"(^|\.)(ff\.net\.2|mlp\.fc2)$") & by_type(nn.Linear), "IA3_ON_INPUT")


@dataclass(frozen=True)
class LycorisPreset:
    """The layers one LyCORIS preset adapts: ``unet`` / ``text_encoder`` targets (``None``: none there).

    A preset file (``file``: :mod:`sdadapt.methods.lycoris_preset_files`) selects by the classes of
    a layer's enclosing modules, which a ``(name, module)`` predicate cannot see: :meth:`on` gives
    the preset's targets on one system's models (built-in presets return themselves)."""

    name: str
    unet: Target | None
    text_encoder: Target | None
    file: LycorisPresetFile | None = None

    def on(self, system: object) -> LycorisPreset:
        """This preset's layers in ``system`` (its ``unet`` and ``text_encoder`` / ``text_encoder_2``):
        a preset file's selection made on those models (``None`` where it selects nothing, as
        LyCORIS then creates no module there); a built-in preset as it is.

        Raises:
            InputError: the file reaches a layer twice (LyCORIS' "duplicated lora name").
        """
        if self.file is None:
            return self
        unet = getattr(system, "unet", None)
        chosen_unet = self.file.select(unet, text_encoder=False) if isinstance(unet, nn.Module) else []
        chosen_text = [layer for _, module in text_encoders(system)
                       for _, layer in self.file.select(module, text_encoder=True)]
        return LycorisPreset(self.name, _layers(chosen_unet, f"LyCORIS preset file {self.name}"),
                             _layers([(None, m) for m in chosen_text], f"LyCORIS preset file {self.name}"), self.file)


    def parts(self, system: object, *, unet: bool, text_encoder: bool) -> list[tuple[str, nn.Module, Target]]:
        """``(component, model, targets)`` for each of ``system``'s models this preset adapts (call on
        :meth:`on`'s result): the UNet when ``unet``, the text encoder(s) when ``text_encoder`` and the
        preset names text-encoder layers.

        Raises:
            InputError: ``unet`` but the preset adapts no UNet layer, or nothing would be adapted.
        """
        parts: list[tuple[str, nn.Module, Target]] = []
        if unet:
            if self.unet is None:
                raise InputError(f"LyCORIS preset {self.name} adapts no UNet layer")
            parts.append(("unet", system.unet, self.unet))
        if text_encoder and self.text_encoder is not None:
            parts += [(component, module, self.text_encoder) for component, module in text_encoders(system)]
        if not parts:
            raise InputError("neither the UNet nor a text encoder would be adapted: nothing to train")
        return parts


def _layers(chosen: list, description: str) -> Target | None:
    """The layers ``chosen`` (``(name, module)`` pairs) by identity; ``None`` when there are none."""
    ids = {id(module) for _, module in chosen}
    return Target(lambda name, module: id(module) in ids, description) if ids else None


def _unresolved(name: str) -> Target:
    def refuse(_: str, __: nn.Module) -> bool:
        raise InputError(f"LyCORIS preset file {name}: its layers depend on the model; use "
                         "lycoris_preset(...).on(system) before selecting with it")

    return Target(refuse, f"LyCORIS preset file {name} (unresolved)")


def _preset(name: str, unet: Target | None, text_encoder: Target | None) -> LycorisPreset:
    if unet is not None:
        unet = Target(unet, f"LyCORIS preset {name}")
    return LycorisPreset(name, unet, text_encoder)


_FULL_UNET = UNET_LOCON | _CONV_IN_OUT | _TIME_EMBEDDING

#: LyCORIS' built-in presets for SD UNets + CLIP (``ia3``: the layers only; the ``ia3`` method also
#: scales the inputs of :data:`IA3_ON_INPUT`, as LyCORIS' preset does)
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
        _preset("ia3", _UNET_IA3, _TEXT_IA3),
    )
}


def lycoris_preset(name: str) -> LycorisPreset:
    """The LyCORIS preset ``name`` (``network_args = ["preset=NAME"]``): a built-in name, or the
    path of a LyCORIS preset TOML file (read by
    :func:`~sdadapt.methods.lycoris_preset_files.read_lycoris_preset_file`; select with
    :meth:`LycorisPreset.on`).

    Raises:
        InputError: an unknown name; a preset file missing, unreadable or asking for what sdadapt
            cannot honour (the message names the file and the key).
    """
    key = str(name).strip()
    if key in LYCORIS_PRESETS:
        return LYCORIS_PRESETS[key]
    if key.lower().endswith((".toml", ".json")) or "/" in key or "\\" in key or Path(key).is_file():
        rules = read_lycoris_preset_file(key)
        unet = _unresolved(key) if rules.unet_modules or rules.unet_names else None
        text = _unresolved(key) if rules.text_modules or rules.text_names else None
        return LycorisPreset(key, unet, text, rules)
    raise InputError(f"unknown LyCORIS preset {key!r}; choose {', '.join(LYCORIS_PRESETS)} or give the path of a "
                     "LyCORIS preset TOML file")
