"""A cheaper toy for tests whose property is about the training / sampling machinery, not the UNet's topology
(helper group "s1": fp8 base, host syncs, sampler wiring).

Most of a toy step's CPU time on one thread is per-op overhead (dispatch, adapter hooks, a recording
``TorchDispatchMode``), not arithmetic: a narrower toy barely helps, fewer layers do.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["one_level_toy"]


class _NoMidBlock(nn.Module):
    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return x


def one_level_toy(*, seed: int = 1):
    """The toy system (:class:`sdadapt.toy.system.ToySystem`: its tokenizer, text encoder, CLIP and
    ``condition`` / ``denoiser`` / ``encode_images``) at half width with a one-layer text encoder, and its
    UNet cut to one level: conv_in, the time and image embeddings, one resnet (Convs, GroupNorms, the time
    Linear) and one transformer (GroupNorm, 1x1 Convs, LayerNorms, self- and cross-attention, GEGLU
    Linears), conv_out. Every kind of layer the full toy has (adapters, autocast and casts meet the same
    module types), at about a ninth of its ops per forward. ``unet(x (B,12,H,W), t, context) -> (B,12,H,W)``.
    """
    from sdadapt.toy.clip import ToyCLIP
    from sdadapt.toy.system import ToySystem
    from sdadapt.toy.text_encoder import ToyTextEncoder
    from sdadapt.toy.tokenizer import ToyTokenizer
    from sdadapt.toy.unet import ToyUNet, _Block

    torch.manual_seed(seed)
    vocab = len(ToyTokenizer())
    unet = ToyUNet(widths=(16, 32), context_dim=32, image_embed_dim=32, groups=8)
    system = ToySystem(unet, ToyTextEncoder(vocab_size=vocab, dim=32, layers=1, heads=2, hidden=64),
                       ToyCLIP(vocab_size=vocab, dim=32))
    temb = unet.time_embedding.linear_1.out_features
    unet.down_blocks = nn.ModuleList([_Block([16], 16, temb, 32, 8, down=False, up=False)])
    unet.mid_block, unet.up_blocks = _NoMidBlock(), nn.ModuleList()
    return system
