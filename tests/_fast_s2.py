"""Cheaper builders for helper group "s2"'s tests (fit under ``torch.compile``).

A Dynamo + AOT-autograd trace costs in proportion to the ops traced: these keep the code paths a test is
about with fewer layers.
"""

from __future__ import annotations

import torch

__all__ = ["two_level_toy"]


def two_level_toy(*, seed: int = 1):
    """:func:`_fast_compile.small_toy` (the toy at half width, a one-layer text encoder) with its UNet cut to one
    resnet + transformer per block and no mid block, keeping what the one-level toy (``_fast_s1``) drops: the
    stride-2 downsampler, the nearest-upsample conv, the skip concatenations (resnets with a ``conv_shortcut``)
    and two resolutions. conv_in -> down (res, attn, down) -> up (res+skip, attn, up) -> up (res+skip, attn) ->
    conv_out: about 40% of the toy UNet's ops per forward. ``unet(x (B,12,H,W), t, context) -> (B,12,H,W)``."""
    from _fast_s1 import _NoMidBlock
    from torch import nn

    from sdadapt.toy.clip import ToyCLIP
    from sdadapt.toy.system import ToySystem
    from sdadapt.toy.text_encoder import ToyTextEncoder
    from sdadapt.toy.tokenizer import ToyTokenizer
    from sdadapt.toy.unet import ToyUNet, _Block

    torch.manual_seed(seed)
    vocab = len(ToyTokenizer())
    w0, w1, groups, context = 16, 32, 8, 32
    unet = ToyUNet(widths=(w0, w1), context_dim=context, image_embed_dim=32, groups=groups)
    temb = unet.time_embedding.linear_1.out_features
    # skips: conv_in w0, d0 w0, d0-down w0 (half size); popped last first by the up resnets
    unet.down_blocks = nn.ModuleList([_Block([w0], w0, temb, context, groups, down=True, up=False)])
    unet.mid_block = _NoMidBlock()
    unet.up_blocks = nn.ModuleList([
        _Block([w0 + w0], w1, temb, context, groups, down=False, up=True),
        _Block([w1 + w0], w0, temb, context, groups, down=False, up=False),
    ])
    return ToySystem(unet, ToyTextEncoder(vocab_size=vocab, dim=32, layers=1, heads=2, hidden=64),
                     ToyCLIP(vocab_size=vocab, dim=32))
