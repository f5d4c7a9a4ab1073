"""LyCORIS' ``train_norm``: which GroupNorm / LayerNorm layers get a norm module beside a network.

LyCORIS' kohya network (``network_args = ["train_norm=True"]``) puts a ``NormModule``
(:class:`~sdadapt.adapters.NormConfig`) on every normalisation layer *inside the modules its preset
targets*. On a Stable Diffusion UNet (diffusers or LDM names) that is:

=====================================================  =========================================================
the network's UNet layers                              its norms
=====================================================  =========================================================
transformer blocks (kohya's default, ``attn-mlp``,     each ``Transformer2DModel``'s GroupNorm ``norm`` and its
``unet-transformer-only``)                             blocks' LayerNorms ``norm1``/``norm2``/``norm3``
ResNets (``unet-convblock-only``)                      each ``ResnetBlock2D``'s ``norm1``/``norm2`` (LDM
                                                       ``in_layers.0``/``out_layers.0``)
both (``locon``, ``full``, ``full-lin``, ``unet-only``)   both
attention only (``attention``, ``attn-only``)          none: refused
=====================================================  =========================================================

The text encoders get none: LyCORIS' presets target CLIP's attention and MLP modules, which hold no
norm. A LyCORIS preset file is refused with ``train_norm`` (its classes would decide).
"""

from __future__ import annotations

from torch import nn

from ..errors import InputError
from ..targets import Target, by_regex, by_type

__all__ = ["UNET_TRANSFORMER_NORMS", "UNET_RESNET_NORMS", "norm_targets"]

_NORM = by_type(nn.GroupNorm, nn.LayerNorm)

#: the norms of each Transformer2DModel (LDM SpatialTransformer): its GroupNorm and the blocks' LayerNorms
UNET_TRANSFORMER_NORMS = by_regex(
    r"(^|\.)(attentions\.\d+|(input_blocks|output_blocks)\.\d+\.\d+|middle_block\.1)\."
    r"(norm|transformer_blocks\.\d+\.norm[123])$"
) & _NORM
UNET_TRANSFORMER_NORMS.description = "UNET_TRANSFORMER_NORMS"

#: the GroupNorms of each ResnetBlock2D (LDM ResBlock's in_layers.0 / out_layers.0)
UNET_RESNET_NORMS = by_regex(
    r"(^|\.)(resnets\.\d+\.norm[12]|(input_blocks|output_blocks)\.\d+\.0\.(in|out)_layers\.0|"
    r"middle_block\.[02]\.(in|out)_layers\.0)$"
) & _NORM
UNET_RESNET_NORMS.description = "UNET_RESNET_NORMS"

_BY_TARGETS: dict[str | None, Target | None] = {
    None: UNET_TRANSFORMER_NORMS,
    "kohya": UNET_TRANSFORMER_NORMS,
    "attn-mlp": UNET_TRANSFORMER_NORMS,
    "unet-transformer-only": UNET_TRANSFORMER_NORMS,
    "unet-convblock-only": UNET_RESNET_NORMS,
    "locon": UNET_TRANSFORMER_NORMS | UNET_RESNET_NORMS,
    "full": UNET_TRANSFORMER_NORMS | UNET_RESNET_NORMS,
    "full-lin": UNET_TRANSFORMER_NORMS | UNET_RESNET_NORMS,
    "unet-only": UNET_TRANSFORMER_NORMS | UNET_RESNET_NORMS,
    "attention": None,
    "attn-only": None,
}


def norm_targets(targets: str | None, *, convs: bool = False) -> Target:
    """The UNet norms ``train_norm`` adapts beside a network on ``targets`` (``--network-targets`` /
    LyCORIS ``preset``; ``None``: the method's default, kohya's transformer blocks, with the ResNets
    too when ``convs`` — kohya's ``conv_dim`` adds them as ``locon`` does).

    Raises:
        InputError: targets whose modules hold no norm (attention only), a preset file, or an unknown name.
    """
    if targets is None and convs:
        targets = "locon"
    if targets not in _BY_TARGETS:
        raise InputError(f"train_norm with targets {targets!r}: sdadapt places LyCORIS' norm modules for "
                         f"{', '.join(str(t) for t in _BY_TARGETS if t)} (a preset file's classes would decide; "
                         "leave train_norm out, or use a built-in preset)")
    chosen = _BY_TARGETS[targets]
    if chosen is None:
        raise InputError(f"train_norm with targets {targets!r}: the attention modules hold no GroupNorm/LayerNorm, so "
                         "LyCORIS adds no norm module; leave train_norm out or pick attn-mlp / full")
    return chosen
