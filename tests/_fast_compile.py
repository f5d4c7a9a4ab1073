"""Cheaper models for the torch.compile / captured-step tests (helper group "compile").

A Dynamo + AOT-autograd trace costs in proportion to the ops of the traced model: these builders keep every
layer kind and code path of the usual test models with fewer layers and narrower channels.
"""

from __future__ import annotations

import torch


def small_toy(*, seed: int = 1):
    """The toy system (:func:`sdadapt.toy.build_toy`'s topology: every UNet block, transformer and up/down sampler)
    at half width, with a one-layer text encoder: what fit compiles is the text encoder and the UNet, traced op by op."""
    from sdadapt.toy.clip import ToyCLIP
    from sdadapt.toy.system import ToySystem
    from sdadapt.toy.text_encoder import ToyTextEncoder
    from sdadapt.toy.tokenizer import ToyTokenizer
    from sdadapt.toy.unet import ToyUNet

    torch.manual_seed(seed)
    vocab = len(ToyTokenizer())
    return ToySystem(ToyUNet(widths=(16, 32), context_dim=32, image_embed_dim=32, groups=8),
                     ToyTextEncoder(vocab_size=vocab, dim=32, layers=1, heads=2, hidden=64),
                     ToyCLIP(vocab_size=vocab, dim=32))


def one_layer_clip_text():
    """``embedding_models.tiny_clip_text()`` (the same vocabulary, width, heads and positions, so its
    ``tiny_tokenizer`` fits) with one encoder layer instead of two: every op kind of the text encoder, half the trace."""
    import pytest

    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.CLIPTextConfig(
        vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=12, eos_token_id=513, bos_token_id=512, projection_dim=16,
    )
    return transformers.CLIPTextModel(config).eval()
